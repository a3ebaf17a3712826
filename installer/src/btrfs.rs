//! Staging btrfs send-stream layers.
//!
//! Every command of every layer is validated before a byte of it reaches the kernel
//! (`formats::btrfs`), its compressed bytes hashed against the signed digest. On a btrfs
//! staging area each command goes to `btrfs receive` as soon as it is validated, in one
//! read of the layer (`formats::btrfs::forward_stream`); the stream's END only once the
//! whole stream passed and the blob matched its digest, and a receive of a refused
//! stream is stopped and what it made removed. An incremental image whose parent image
//! is one of this stage's generations on the host is received against that generation:
//! only the layers above it are received, not the whole chain. Off btrfs the streams are
//! applied in userspace onto plain directories. The layers are read from the store, or
//! from a deploy's source as they arrive ([`Layers::Arriving`], see `crate::stream`):
//! then each is read once, teed into the store as it is received.
//!
//! The result is then compared with the signed manifest. The last stream's files that it
//! writes in order from their creation are hashed as the stream passes
//! (`formats::btrfs::forward_stream_hashing`); only the others (cloned into, written out
//! of order, a parent generation's) are read back from the received subvolume.
//!
//! ```text
//! .tmp/recv-<gen>/<subvolume>      btrfs: what `btrfs receive` created, layer by layer
//! .tmp/work-<gen>-<i>/             directories: layer i applied on a copy of layer i-1
//! .tmp/<dest>                      the result, renamed into place; then checked against
//!                                  the signed manifest like any generation
//! ```

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use formats::btrfs::{
    FileDigests, Progress, ReceiveError, Receiver, StreamSummary, Uuid, apply_to_dir_watched, copy_tree,
};
use formats::digest::HashingReader;
use formats::layout::Layout;
use formats::manifest::{EntryKind, StageConfig};
use formats::oci::{self, Descriptor};
use formats::unpack::Budget;

use crate::error::Malformed;
use crate::host_parent::HostGeneration;
use crate::stream::LayerReaders;

/// Where the layers' blobs come from: the store (or a received layout), or the source of
/// a deploy as they arrive ([`LayerReaders`], in order: see `stream`).
#[derive(Debug)]
pub enum Layers<'a> {
    Stored(&'a Layout),
    Arriving(&'a mut LayerReaders),
}

/// A reader of one layer's blob, and whether it arrives from the source (such a reader
/// checks the blob's digest itself).
type Blob<'a> = (Box<dyn Read + Send + 'a>, bool);

impl Layers<'_> {
    /// The blob of `layers[i]`; layers are asked for in order, each once. Those the caller
    /// does not need are passed to [`Layers::skip`].
    fn open(&mut self, layer: &Descriptor) -> Result<Blob<'_>> {
        match self {
            Layers::Stored(layout) => Ok((Box::new(layout.open_blob(&layer.digest)?), false)),
            Layers::Arriving(readers) => {
                let (l, reader, checked) = readers.next_layer()?.context("more layers than the image has")?;
                if l.digest != layer.digest {
                    bail!("layer {} arrived where {} was expected", l.digest, layer.digest);
                }
                Ok((reader, checked))
            }
        }
    }

    /// Passes over a layer that is not needed (below the host's generation): one that
    /// arrives is still read to its end, which it reaches only once its digest matched;
    /// one in the store is not read.
    fn skip(&mut self, layer: &Descriptor) -> Result<()> {
        if let Layers::Arriving(_) = self {
            let (mut reader, arriving) = self.open(layer)?;
            if arriving {
                io::copy(&mut reader, &mut io::sink()).with_context(|| format!("reading layer {}", layer.digest))?;
            }
        }
        Ok(())
    }
}

type LayerReader<'a> = zstd::stream::read::Decoder<'static, BufReader<HashingReader<Box<dyn Read + Send + 'a>>>>;

fn open<'s>(source: &'s mut Layers<'_>, layer: &Descriptor) -> Result<LayerReader<'s>> {
    let (f, _) = source.open(layer)?;
    // The whole blob is hashed (a longer file fails the digest check at the end).
    Ok(zstd::stream::read::Decoder::new(HashingReader::new(f))?)
}

/// Reads what the decoder left of the compressed blob and checks its digest and size.
fn check_digest(dec: LayerReader<'_>, layer: &Descriptor) -> Result<()> {
    let mut rest = dec.finish();
    io::copy(&mut rest, &mut io::sink())?;
    let (digest, size, _) = rest.into_inner().finish();
    if digest != layer.digest || size != layer.size {
        return Err(Malformed(format!(
            "layer {} is corrupt: its {size} bytes hash to {digest} (expected {} bytes)",
            layer.digest, layer.size
        ))
        .into());
    }
    Ok(())
}

/// Stages `layers` (btrfs send streams, full first) as `tmp/<dest>`: a subvolume when
/// `on_btrfs`, a directory otherwise, and checks the result against the signed `config`
/// (a difference is exit 7; `tmp/<dest>` is then the caller's to remove).
///
/// Each stream is bounded by what the signed manifest declares (as for tar payloads): the bytes it makes the receiver store (written, cloned, reserved) and the
/// entries it creates, per layer and over all layers, checked on the validating pass
/// before a byte of it is received or applied.
///
/// `host` lists this stage's generations on the host (image digest and directory): on
/// btrfs, the layers above one of them are received against it (see the module
/// documentation).
pub fn stage(
    source: Layers<'_>,
    layers: &[Descriptor],
    config: &StageConfig,
    tmp: &Path,
    dest: &str,
    on_btrfs: bool,
    host: &[HostGeneration],
) -> Result<PathBuf> {
    let _span = tracing::info_span!("stage payload", dest, layers = layers.len(), on_btrfs).entered();
    tracing::debug!(
        "btrfs send streams: `btrfs receive` when the staging area is on btrfs, otherwise applied to a directory"
    );
    let work = tmp.join(format!("recv-{dest}"));
    let _ = crate::txn::remove_tree(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let budget = Budget::of(config, layers.len());
    let mut spent = Spent::default();
    let result = if on_btrfs {
        receive(source, layers, &budget, &mut spent, &work, host)
    } else {
        apply(source, layers, &budget, &mut spent, &work).map(|p| (p, FileDigests::new()))
    };
    let (final_path, hashed) = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = remove_work(&work);
            return Err(e);
        }
    };
    let target = tmp.join(dest);
    if on_btrfs {
        // Received subvolumes are read-only; writable for manifest.json until published.
        subvol::set_readonly(&final_path, false)?;
    }
    fs::rename(&final_path, &target).with_context(|| format!("moving {} into place", final_path.display()))?;
    remove_work(&work)?;
    check_received(&target, config, &hashed)?;
    if on_btrfs {
        // `btrfs receive` leaves what it wrote in the page cache: durable before the
        // generation is published, as a tar layer is (one syncfs; the directory root's
        // applier does its own).
        let dir = fs::File::open(&target).with_context(|| format!("opening {}", target.display()))?;
        rustix::fs::syncfs(&dir).with_context(|| format!("syncing {}", target.display()))?;
    }
    Ok(target)
}

/// Compares the tree at `target` with the signed manifest (exit 7 when it differs), taking
/// the files in `hashed` (hashed from the stream as they were received) without reading
/// them. A parent found by `btrfs receive` may be a host generation holding our
/// manifest.json (rewritten by the caller); everything else must match exactly.
fn check_received(target: &Path, config: &StageConfig, hashed: &FileDigests) -> Result<()> {
    let files = config.entries.iter().filter(|e| e.kind == EntryKind::File);
    let read_back = files.filter(|e| !hashed.contains_key(e.path.as_str())).count();
    tracing::info!(
        hashed = hashed.len(),
        read_back,
        "checking the received tree against the signed manifest: {} files hashed as they were received, {read_back} \
         read back",
        hashed.len()
    );
    let mismatches = formats::unpack::check_tree_known(target, config, &["manifest.json"], hashed)?;
    if let Some(m) = mismatches.first() {
        return Err(Malformed(format!(
            "the received tree differs from the signed manifest: {}: {} ({} difference(s))",
            m.path,
            m.problem,
            mismatches.len()
        ))
        .into());
    }
    Ok(())
}

fn remove_work(work: &Path) -> Result<()> {
    for e in fs::read_dir(work).into_iter().flatten().flatten() {
        crate::txn::remove_tree(&e.path())?;
    }
    crate::txn::remove_tree(work)
}

/// What the layers validated so far store and create.
#[derive(Debug, Default)]
struct Spent {
    bytes: u64,
    entries: u64,
}

/// Checks a validated stream against the budget (exit 7 when over).
fn within_budget(summary: &StreamSummary, layer: &Descriptor, budget: &Budget, spent: &mut Spent) -> Result<()> {
    let progress = Progress { bytes_stored: summary.bytes_stored(), entries_created: summary.entries_created() };
    if let Some(reason) = over_budget(progress, budget, spent) {
        return Err(Malformed(format!("layer {} {reason}", layer.digest)).into());
    }
    spent.bytes = spent.bytes.saturating_add(progress.bytes_stored);
    spent.entries = spent.entries.saturating_add(progress.entries_created);
    Ok(())
}

/// Why a layer that has stored and created `this` so far, over `spent` by the layers
/// before it, is over the budget; `None` when it is not.
fn over_budget(this: Progress, budget: &Budget, spent: &Spent) -> Option<String> {
    let checks = [
        ("store", "bytes", this.bytes_stored, spent.bytes, budget.layer_bytes, budget.image_bytes),
        ("create", "entries", this.entries_created, spent.entries, budget.layer_entries, budget.image_entries),
    ];
    for (verb, unit, this, before, per_layer, per_image) in checks {
        let all = before.saturating_add(this);
        if this > per_layer || all > per_image {
            return Some(format!(
                "would {verb} {this} {unit} ({all} in all layers so far), more than the signed manifest \
                 allows ({per_layer} per layer, {per_image} per image)"
            ));
        }
    }
    None
}

/// Where to start receiving `layers` on the host: the index of the first layer to
/// receive, and the generation it is received against (its stream's parent UUID and
/// directory). The topmost layer whose parent image is a generation on the host that
/// carries the received UUID the layer names as its parent.
fn start_on_host(btrfs: &Path, layers: &[Descriptor], host: &[HostGeneration]) -> Option<(usize, Uuid, PathBuf)> {
    for (i, layer) in layers.iter().enumerate().skip(1).rev() {
        let Some(parent_digest) = layer.annotations.get(oci::ANNOTATION_PARENT_DIGEST) else { continue };
        let Some(parent_uuid) = layer.annotations.get(oci::ANNOTATION_BTRFS_PARENT_UUID) else { continue };
        for g in host.iter().filter(|g| g.digest.to_string() == *parent_digest) {
            match received_uuid(btrfs, &g.dir) {
                Ok(Some(u)) if u == *parent_uuid => {
                    tracing::info!(
                        generation = %g.dir.display(),
                        "receiving the layers above layer {i} against the host's generation of the parent image"
                    );
                    return Some((i, u.parse().ok()?, g.dir.clone()));
                }
                other => tracing::debug!(generation = %g.dir.display(), ?other, "not the layer's parent"),
            }
        }
    }
    None
}

/// The received UUID of the subvolume at `path` (`None` when it was not received).
fn received_uuid(btrfs: &Path, path: &Path) -> Result<Option<String>> {
    let out = Command::new(btrfs).args(["subvolume", "show"]).arg(path).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("btrfs subvolume show {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Received UUID:").map(|u| u.trim().to_owned()))
        .filter(|u| u.len() == 36))
}

fn receive(
    mut source: Layers<'_>,
    layers: &[Descriptor],
    budget: &Budget,
    spent: &mut Spent,
    work: &Path,
    host: &[HostGeneration],
) -> Result<(PathBuf, FileDigests)> {
    let btrfs = ["/usr/bin/btrfs", "/bin/btrfs", "/usr/sbin/btrfs", "/sbin/btrfs"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("`btrfs` is not installed: apt-get install btrfs-progs")?;
    // (the parent's UUID, its directory, whether it is ours to delete once used)
    let (first, mut prev): (usize, Option<(Uuid, PathBuf, bool)>) = match start_on_host(&btrfs, layers, host) {
        Some((i, uuid, dir)) => (i, Some((uuid, dir, false))),
        None => (0, None),
    };
    let mut hashed = FileDigests::new();
    for layer in &layers[..first] {
        source.skip(layer)?;
    }
    for (i, layer) in layers.iter().enumerate().skip(first) {
        // Each command is validated (against the parent's tree on disk) and within the
        // budget before it is written to the receive; END only after the digest check.
        // The files of the last layer's tree are hashed as they pass (those of the layers
        // below are checked through it, or read back). What it received of a refused
        // stream is removed with the work directory.
        let receiver = Receiver {
            btrfs: &btrfs,
            into: work,
            parent: prev.as_ref().map(|(u, dir, _)| (*u, dir.as_path())),
            hash_files: i + 1 == layers.len(),
        };
        let watch = |p| over_budget(p, budget, spent).map_or(Ok(()), Err);
        let checked = match source.open(layer)? {
            (blob, true) => receiver.receive_digest_checked(blob, layer, watch),
            (blob, false) => receiver.receive_blob(blob, layer, watch),
        }
        .map_err(receive_error)?;
        within_budget(&checked.summary, layer, budget, spent)?;
        let path = receiver.received(&checked);
        hashed = checked.files;
        if let Some((_, old, true)) = prev.replace((checked.summary.uuid, path, true)) {
            // The layer below is no longer needed once the next one is received.
            let name = old.file_name().and_then(|n| n.to_str()).context("subvolume name")?.to_owned();
            subvol::delete(work, &name)?;
        }
    }
    match prev {
        Some((_, p, true)) => Ok((p, hashed)),
        _ => bail!("an image without payload layers above the host's generation"),
    }
}

/// A failed receive as the installer reports it: a refused stream keeps its
/// [`formats::btrfs::StreamError`] (exit 7 when it is about the stream), a corrupt blob is
/// malformed input.
fn receive_error(e: ReceiveError) -> anyhow::Error {
    match e {
        ReceiveError::Stream { digest, source } => {
            anyhow::Error::new(source).context(format!("validating layer {digest}"))
        }
        e @ ReceiveError::Digest { .. } => Malformed(e.to_string()).into(),
        e => e.into(),
    }
}

fn apply(
    mut source: Layers<'_>,
    layers: &[Descriptor],
    budget: &Budget,
    spent: &mut Spent,
    work: &Path,
) -> Result<PathBuf> {
    let mut prev: Option<PathBuf> = None;
    for (i, layer) in layers.iter().enumerate() {
        // One read: each command checked, within the budget, then applied.
        let dest = work.join(format!("layer-{i}"));
        fs::create_dir(&dest).with_context(|| format!("creating {}", dest.display()))?;
        if let Some(p) = &prev {
            copy_tree(p, &dest)?;
        }
        let mut dec = open(&mut source, layer)?;
        let mut last = Progress::default();
        apply_to_dir_watched(&mut dec, &dest, prev.as_deref(), |p| {
            last = p;
            over_budget(p, budget, spent).map_or(Ok(()), Err)
        })
        .with_context(|| format!("applying layer {}", layer.digest))?;
        check_digest(dec, layer)?;
        spent.bytes = spent.bytes.saturating_add(last.bytes_stored);
        spent.entries = spent.entries.saturating_add(last.entries_created);
        if let Some(p) = prev.replace(dest) {
            crate::txn::remove_tree(&p)?;
        }
    }
    prev.context("an image without payload layers")
}
