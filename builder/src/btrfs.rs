//! btrfs send-stream payloads (`--format btrfs`, or `auto` on btrfs).
//!
//! ```text
//! WORK/                         on the stage folder's btrfs (default STAGE/../.op-dbus-build,
//!                               or $OP_DBUS_BTRFS_WORKDIR)
//!   tmp-NAME-VERSION-PID        a writable subvolume: the tree being assembled
//!                               (a snapshot of the parent's snapshot for --parent)
//!   snapshots/NAME/VERSION      read-only snapshots the builder keeps as parents
//!   recv-PID/                   the parent's layers received from the store, when its
//!                               snapshot is not here (another checkout built it)
//! ```
//!
//! The parent's snapshot is used when it is the one the store's parent image was sent
//! from (its UUID, or its received UUID, is the one the parent's last layer carries);
//! otherwise the parent's layers are received from the store into the work directory,
//! each command checked before `btrfs receive` sees it, and that becomes the snapshot.
//! So a `--parent` build works from any checkout of the stage folder (every CI run).
//!
//! The tree is written into the subvolume (hashing every file as it is copied), snapshotted
//! read-only, and sent with `btrfs send --proto 2` (the CLI: it streams the ioctl's output
//! for us and checks the kernel's protocol support), compressed with zstd into the blob.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use formats::btrfs::{ParentTree, Receiver, Uuid, forward_stream};
use formats::digest::Digest;
use formats::layout::Layout;
use formats::manifest::{Entry, StageConfig};
use formats::oci::{self, Descriptor};
use formats::{Reference, StageName, Version};

use crate::assemble::{Node, Tree};

/// Annotation of a btrfs layer: the UUID of the subvolume its stream creates.
pub const ANNOTATION_UUID: &str = oci::ANNOTATION_BTRFS_UUID;
/// Annotation of an incremental btrfs layer: the UUID of the parent subvolume.
pub const ANNOTATION_PARENT_UUID: &str = oci::ANNOTATION_BTRFS_PARENT_UUID;

/// The builder's btrfs work directory for `stage_dir`.
pub fn workdir(stage_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(w) = std::env::var_os("OP_DBUS_BTRFS_WORKDIR") {
        return Some(PathBuf::from(w));
    }
    let dir = stage_dir?.canonicalize().ok()?;
    Some(dir.parent()?.join(".op-dbus-build"))
}

/// Whether `stage_dir` (or the work directory) is on btrfs.
pub fn available(stage_dir: Option<&Path>) -> bool {
    let Some(w) = workdir(stage_dir) else { return false };
    let probe = if w.exists() { w } else { w.parent().map(Path::to_owned).unwrap_or(w) };
    subvol::is_btrfs(&probe).unwrap_or(false)
}

fn snapshot_dir(work: &Path, name: &StageName) -> PathBuf {
    work.join("snapshots").join(name.as_str())
}

/// The builder's read-only snapshot of NAME:VERSION, kept as a parent for later versions.
pub fn snapshot_path(work: &Path, name: &StageName, version: &Version) -> PathBuf {
    snapshot_dir(work, name).join(version.to_string())
}

/// Builds the btrfs layer of `tree`; returns the layer descriptor and the signed entries.
pub fn layer(
    layout: &Layout,
    work: &Path,
    config: &StageConfig,
    tree: &Tree,
    parent: Option<(&Reference, &StageConfig, &Digest, &[Descriptor])>,
    bar: &indicatif::ProgressBar,
) -> Result<(Descriptor, Vec<Entry>)> {
    let probe = if work.exists() { work } else { work.parent().unwrap_or(work) };
    if !subvol::is_btrfs(probe).unwrap_or(false) {
        bail!(
            "{} is not on btrfs: --format btrfs needs the stage folder (or $OP_DBUS_BTRFS_WORKDIR) on btrfs; \
             build with --format tar instead",
            work.display()
        );
    }
    fs::create_dir_all(work).with_context(|| format!("creating the btrfs work directory {}", work.display()))?;
    let btrfs = which_btrfs()?;
    let tmp_name = format!("tmp-{}-{}-{}", config.name, config.version, std::process::id());
    let tmp = work.join(&tmp_name);
    let parent_snap = match parent {
        Some((r, _, _, layers)) => {
            let p = parent_snapshot(layout, &btrfs, work, r, layers)?;
            subvol::snapshot(&p, work, &tmp_name, false)?;
            Some(p)
        }
        None => {
            subvol::create(work, &tmp_name)?;
            None
        }
    };
    let result = (|| -> Result<(Descriptor, Vec<Entry>)> {
        let (mut entries, unhashed) = fill(&tmp, tree, parent.map(|(_, c, _, _)| c), bar)?;
        let snaps = snapshot_dir(work, &config.name);
        fs::create_dir_all(&snaps)?;
        let snap = snapshot_path(work, &config.name, &config.version);
        if snap.exists() {
            subvol::delete(&snaps, &config.version.to_string())?;
        }
        subvol::snapshot(&tmp, &snaps, &config.version.to_string(), true)?;
        // The parent as the stream names it: a snapshot the builder received from the
        // store carries the UUID of the stream it came from.
        let parent_uuid = parent_snap.as_deref().map(|p| stream_uuid(&btrfs, p)).transpose()?;
        let parent_tree = parent_snap.as_deref().map(ParentTree::scan).transpose()?;
        let mut cmd = Command::new(&btrfs);
        // No `-f`: the stream goes to our pipe, never to a path that may not be one.
        cmd.args(["send", "--proto", "2", "-q"]);
        if let Some(p) = &parent_snap {
            cmd.arg("-p").arg(p);
        }
        cmd.arg(&snap).stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().context("running btrfs send")?;
        let blob = layout.blob_writer()?;
        let mut enc = zstd::stream::write::Encoder::new(blob, 3)?;
        enc.multithread(std::thread::available_parallelism().map_or(1, |n| n.get() as u32))?;
        // The tar payload's job size: zstd's default (8 MiB at level 3) doubles the
        // builder's memory for no gain in speed.
        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(formats::payload::JOB_SIZE))?;
        enc.include_checksum(true)?;
        // What is signed is checked as the installer checks it, command by command as it is
        // compressed: an empty, cut or hostile stream is refused before anything is tagged.
        let uuid = parent_uuid.map(|u| u.parse::<Uuid>()).transpose()?;
        let stdout = child.stdout.take().expect("piped");
        // The new files' sources are hashed by a second thread while the stream is sent.
        let (checked, hashed) = std::thread::scope(|scope| {
            let hasher = scope.spawn(|| hash_sources(&unhashed, bar));
            let checked = forward_stream(
                io::BufReader::with_capacity(256 * 1024, stdout),
                uuid,
                parent_tree.as_ref(),
                &mut enc,
                |_| Ok(()),
            );
            (checked, hasher.join().map_err(|_| anyhow::anyhow!("hashing the staged files panicked")))
        });
        let status = child.wait()?;
        if !status.success() {
            bail!("btrfs send of {} failed ({status}); its output is above", snap.display());
        }
        let checked = checked.with_context(|| {
            format!("`btrfs send` of {} wrote a stream the installer would refuse; nothing was signed", snap.display())
        })?;
        for (i, digest) in hashed?? {
            entries[i].sha256 = Some(digest);
        }
        checked.write_end(&mut enc)?;
        tracing::debug!(
            commands = checked.summary.commands,
            bytes = checked.summary.stream_bytes,
            "send stream checked"
        );
        let (digest, size) = enc.finish()?.finish()?;
        let mut desc = Descriptor::new(oci::BTRFS_ZSTD_MEDIA_TYPE, digest, size);
        desc.annotations.insert(ANNOTATION_UUID.into(), subvolume_uuid(&btrfs, &snap)?);
        if let (Some((r, _, pd, _)), Some(p)) = (parent, &parent_snap) {
            desc.annotations.insert(oci::ANNOTATION_PARENT.into(), r.to_string());
            desc.annotations.insert(oci::ANNOTATION_PARENT_DIGEST.into(), pd.to_string());
            desc.annotations.insert(ANNOTATION_PARENT_UUID.into(), stream_uuid(&btrfs, p)?);
        }
        Ok((desc, entries))
    })();
    let _ = subvol::delete(work, &tmp_name);
    result
}

/// The builder's snapshot of the parent `r` (whose payload is `layers`): the one in the
/// work directory when it is what the store's image was sent from, else received anew
/// from the store.
fn parent_snapshot(
    layout: &Layout,
    btrfs: &Path,
    work: &Path,
    r: &Reference,
    layers: &[Descriptor],
) -> Result<PathBuf> {
    let p = snapshot_path(work, &r.name, &r.version);
    let want = layers.last().and_then(|l| l.annotations.get(ANNOTATION_UUID));
    if p.exists() {
        let have = stream_uuid(btrfs, &p)?;
        if want == Some(&have) {
            return Ok(p);
        }
        tracing::info!(
            snapshot = %p.display(),
            %have,
            want = ?want,
            "the builder's snapshot of the parent is not the one the store's image was sent from; receiving it from the store"
        );
    } else {
        tracing::info!(snapshot = %p.display(), "no snapshot of the parent here; receiving its layers from the store");
    }
    let recv = work.join(format!("recv-{}", std::process::id()));
    let _ = remove_received(&recv);
    fs::create_dir_all(&recv)?;
    let result = receive_layers(layout, btrfs, &recv, layers).with_context(|| {
        format!("receiving the parent {r} from the store {} (its snapshot is not here)", layout.root().display())
    });
    let received = match result {
        Ok(path) => path,
        Err(e) => {
            let _ = remove_received(&recv);
            return Err(e);
        }
    };
    let snaps = snapshot_dir(work, &r.name);
    fs::create_dir_all(&snaps)?;
    if p.exists() {
        subvol::delete(&snaps, &r.version.to_string())?;
    }
    // A read-only subvolume cannot move to another directory; the flag alone is cleared
    // for the move (through the ioctl: the received UUID stays).
    subvol::set_readonly(&received, false)?;
    fs::rename(&received, &p).with_context(|| format!("moving {} to {}", received.display(), p.display()))?;
    subvol::set_readonly(&p, true)?;
    remove_received(&recv)?;
    Ok(p)
}

/// Receives `layers` (a full stream, then increments) into `recv`; returns the last
/// subvolume. Each command is checked before `btrfs receive` gets it, each blob hashed.
fn receive_layers(layout: &Layout, btrfs: &Path, recv: &Path, layers: &[Descriptor]) -> Result<PathBuf> {
    let mut prev: Option<(Uuid, PathBuf)> = None;
    for layer in layers {
        if layer.media_type != oci::BTRFS_ZSTD_MEDIA_TYPE {
            bail!("layer {} is a {}, not a btrfs send stream", layer.digest, layer.media_type);
        }
        let receiver =
            Receiver { btrfs, into: recv, parent: prev.as_ref().map(|(u, p)| (*u, p.as_path())), hash_files: false };
        let checked = receiver.receive(layout, layer, |_| Ok(()))?;
        let path = receiver.received(&checked);
        if let Some((_, old)) = prev.replace((checked.summary.uuid, path)) {
            let name = old.file_name().and_then(|n| n.to_str()).context("subvolume name")?.to_owned();
            subvol::delete(recv, &name)?;
        }
    }
    prev.map(|(_, p)| p).context("the parent image has no payload layers")
}

/// Deletes the receive directory and the subvolumes in it.
fn remove_received(recv: &Path) -> Result<()> {
    for e in fs::read_dir(recv)?.flatten() {
        let path = e.path();
        if subvol::is_subvolume(&path).unwrap_or(false) {
            let _ = subvol::set_readonly(&path, false);
            subvol::delete(recv, &e.file_name().to_string_lossy())?;
        } else if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::remove_dir(recv)?;
    Ok(())
}

/// A file copied into the subvolume by cloning, to be hashed from its source: its index
/// in the entries, the source, and its size.
type Unhashed<'t> = (usize, &'t Path, u64);

/// Makes the subvolume at `dest` hold exactly `tree` (it starts empty, or as the parent's
/// tree); returns the entries, with the sha256 of every file updated in place (hashed
/// while copied), and the files cloned from their sources, still to be hashed.
fn fill<'t>(
    dest: &Path,
    tree: &'t Tree,
    parent: Option<&StageConfig>,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<Entry>, Vec<Unhashed<'t>>)> {
    // What the parent had and the new tree does not: removed, deepest first.
    if let Some(p) = parent {
        for e in p.entries.iter().rev() {
            let keep = tree.nodes.get(&e.path).is_some_and(|n| n.kind() == e.kind);
            if !keep {
                let path = dest.join(e.path.as_str());
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => fs::remove_dir_all(&path)?,
                    Ok(_) => fs::remove_file(&path)?,
                    Err(_) => {}
                }
            }
        }
    }
    let mut entries = Vec::with_capacity(tree.nodes.len());
    let mut unhashed = Vec::new();
    for (path, node) in &tree.nodes {
        let target = dest.join(path.as_str());
        let sha256 = match node {
            Node::Dir { mode } => {
                if !target.is_dir() {
                    fs::create_dir(&target).with_context(|| format!("creating {}", target.display()))?;
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode.bits()))?;
                None
            }
            Node::Symlink { link } => {
                if fs::read_link(&target).ok().as_deref() != Some(Path::new(link)) {
                    let _ = fs::remove_file(&target);
                    symlink(link, &target)?;
                }
                None
            }
            &Node::File { mode, ref from, size } => {
                let copying = || format!("copying {} into the subvolume", from.display());
                let digest = if fs::symlink_metadata(&target).is_ok() {
                    let src = File::open(from).with_context(|| format!("reading {}", from.display()))?;
                    Some(copy_hashing(bar.wrap_read(src), &target, size).with_context(copying)?)
                } else {
                    clone(from, &target, size).with_context(copying)?;
                    unhashed.push((entries.len(), from.as_path(), size));
                    None
                };
                fs::set_permissions(&target, fs::Permissions::from_mode(mode.bits()))?;
                digest
            }
        };
        entries.push(crate::build::entry(path, node, sha256));
    }
    Ok((entries, unhashed))
}

/// Hashes the sources of the cloned files: (index, sha256) of each. A source that is not
/// the size it was when it was copied changed while building.
fn hash_sources(files: &[Unhashed<'_>], bar: &indicatif::ProgressBar) -> Result<Vec<(usize, Digest)>> {
    files
        .iter()
        .map(|&(i, from, size)| {
            let src = File::open(from).with_context(|| format!("reading {}", from.display()))?;
            let (digest, n) = formats::digest::sha256_reader(bar.wrap_read(src).take(size + 1))
                .with_context(|| format!("reading {}", from.display()))?;
            if n != size {
                bail!("{}: expected {size} bytes but read {n}; did the file change while building?", from.display());
            }
            Ok((i, digest))
        })
        .collect()
}

/// Copies `src` to `dest`, hashing it. A file already at `dest` (from the parent's
/// snapshot) is updated in place, block by block, writing only blocks that differ: the
/// incremental send stream then carries only those blocks, not the whole file.
fn copy_hashing<R: Read>(mut src: R, dest: &Path, size: u64) -> Result<Digest> {
    use std::io::{Seek, SeekFrom, Write};
    const BLOCK: usize = 128 * 1024;
    let existing = fs::symlink_metadata(dest).map(|m| m.is_file()).unwrap_or(false);
    let mut out = fs::OpenOptions::new().read(true).write(true).create(true).truncate(!existing).open(dest)?;
    let mut hasher = formats::digest::Hasher::new();
    let (mut new, mut old) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut offset = 0u64;
    loop {
        let want = (size - offset).min(BLOCK as u64) as usize;
        if want == 0 {
            break;
        }
        src.read_exact(&mut new[..want])
            .map_err(|e| anyhow::anyhow!("read {offset} of {size} bytes ({e}); did the file change while building?"))?;
        hasher.update(&new[..want]);
        let same = existing && {
            let mut got = 0;
            while got < want {
                match out.read(&mut old[got..want])? {
                    0 => break,
                    n => got += n,
                }
            }
            got == want && old[..want] == new[..want]
        };
        if !same {
            out.seek(SeekFrom::Start(offset))?;
            out.write_all(&new[..want])?;
        }
        offset += want as u64;
        out.seek(SeekFrom::Start(offset))?;
    }
    out.set_len(size)?;
    Ok(hasher.finish())
}

/// A new file: copied with `copy_file_range` (on the same btrfs the kernel shares the
/// extents instead of copying); hashed later from the source ([`hash_sources`]), and a
/// source that changed meanwhile is caught by the hash at deploy time.
fn clone(from: &Path, dest: &Path, size: u64) -> Result<()> {
    let copied = fs::copy(from, dest)?;
    if copied != size {
        bail!("expected {size} bytes but copied {copied}; did the file change while building?");
    }
    Ok(())
}

fn which_btrfs() -> Result<PathBuf> {
    ["/usr/bin/btrfs", "/bin/btrfs", "/usr/sbin/btrfs", "/sbin/btrfs"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("`btrfs` is not installed: apt-get install btrfs-progs (or build with --format tar)")
}

/// The UUID of a subvolume, as `btrfs subvolume show` prints it.
fn subvolume_uuid(btrfs: &Path, path: &Path) -> Result<String> {
    show_field(btrfs, path, "UUID:")?.with_context(|| format!("no UUID in `btrfs subvolume show {}`", path.display()))
}

/// The UUID a send stream names `path` by: its received UUID when it was received (the
/// UUID of the stream it came from), its own otherwise.
fn stream_uuid(btrfs: &Path, path: &Path) -> Result<String> {
    match show_field(btrfs, path, "Received UUID:")? {
        Some(u) => Ok(u),
        None => subvolume_uuid(btrfs, path),
    }
}

/// A UUID field of `btrfs subvolume show` (`None` when it is `-`).
fn show_field(btrfs: &Path, path: &Path, field: &str) -> Result<Option<String>> {
    let out = Command::new(btrfs).args(["subvolume", "show"]).arg(path).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("btrfs subvolume show {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix(field).map(|u| u.trim().to_owned()))
        .filter(|u| u.len() == 36))
}
