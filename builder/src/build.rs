//! `build` and `create`: run build steps, assemble the tree, write the payload, the embedded
//! stage manifest and the image manifest into the store, and sign.
//!
//! One pass for a full image: each file is read once, hashed and compressed as it streams.
//! A delta image (`--parent`) hashes the tree first, then streams only what changed, with
//! OCI whiteouts for what disappeared, on top of the parent's layers (shared blobs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use formats::digest::sha256_reader;
use formats::layout::{Layout, SealedBlob};
use formats::manifest::{CONFIG_MEDIA_TYPE, Entry, FileSpec, FileType, StageConfig, StageDefinition};
use formats::oci::{self, Descriptor, ImageManifest};
use formats::path::{RelPath, TargetPath};
use formats::payload::{Compression, TarZstdWriter};
use formats::unpack::check::LayerCheck;
use formats::{Digest, Reference, StageName, Version};

use crate::assemble::{self, Node, Tree};
use crate::error::InputError;
use crate::inspect::StoredImage;

/// Payload format asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// btrfs when the stage folder is on btrfs, tar+zstd otherwise.
    Auto,
    Tar,
    Btrfs,
}

/// Settings shared by `build` and `create`.
#[derive(Debug)]
pub struct Settings<'a> {
    /// The store to write to; `None` for a dry run, which touches no store.
    pub layout: Option<&'a Layout>,
    pub format: Format,
    pub parent: Option<Reference>,
    pub quiet: bool,
    /// The signing key's file, hidden from build steps (the key itself is in memory).
    pub hide_key: Option<PathBuf>,
    /// Replace NAME:VERSION when the store has it (versions are immutable otherwise).
    pub force: bool,
    /// Where a stage's `recipients: ["@TAG"]` are looked up (`build --inventory`).
    pub inventory: Option<&'a crate::fleet::Inventory>,
}

/// The payload format a build ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Payload {
    Tar,
    /// btrfs send streams, assembled in this work directory.
    Btrfs(PathBuf),
}

fn resolve_format(format: Format, stage_dir: Option<&Path>) -> Result<Payload> {
    let payload = resolve_format_inner(format, stage_dir)?;
    match &payload {
        Payload::Tar => tracing::debug!(?format, "payload format tar"),
        Payload::Btrfs(work) => {
            tracing::debug!(?format, work = %work.display(), "payload format btrfs: the work directory is on btrfs")
        }
    }
    Ok(payload)
}

fn resolve_format_inner(format: Format, stage_dir: Option<&Path>) -> Result<Payload> {
    match format {
        Format::Tar => Ok(Payload::Tar),
        Format::Auto if !crate::btrfs::available(stage_dir) => Ok(Payload::Tar),
        Format::Auto | Format::Btrfs => match crate::btrfs::workdir(stage_dir) {
            Some(w) => Ok(Payload::Btrfs(w)),
            None => bail!(
                "--format btrfs needs a stage folder on btrfs or $OP_DBUS_BTRFS_WORKDIR on btrfs; build with --format tar"
            ),
        },
    }
}

/// What `build` and `create` print (`--json`: at least `reference` and `digest`).
#[derive(Debug, Serialize)]
pub struct Built {
    pub reference: String,
    pub digest: Digest,
    pub entries: usize,
    pub content_bytes: u64,
    pub payload_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signed_by: Vec<String>,
}

/// What `build --dry-run` prints.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub reference: String,
    pub build_steps: Vec<String>,
    pub entries: Vec<String>,
    pub content_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The outcome of `build` or `create`.
#[derive(Debug)]
pub enum Outcome {
    Built(Built),
    Planned(Plan),
}

/// `SOURCE_DATE_EPOCH`, when set: the time of every entry and the `created` annotation.
pub fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s.trim().parse::<i64>().ok().filter(|t| *t >= 0).map(Some).with_context(|| {
            format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds since 1970; unset it or fix it")
        }),
        Err(_) => Ok(None),
    }
}

/// Builds the stage folder `stage_dir` (holding `manifest.yaml`).
#[tracing::instrument(name = "build", skip_all, fields(stage_dir = %stage_dir.display()))]
pub fn build(stage_dir: &Path, settings: &Settings<'_>) -> Result<Outcome> {
    let manifest = stage_dir.join("manifest.yaml");
    // Not followed here: a symlink is refused when it is read.
    if manifest.symlink_metadata().is_err() {
        return Err(InputError::Path {
            path: stage_dir.to_owned(),
            reason: "no manifest.yaml here: a stage folder holds manifest.yaml and the stage's files".into(),
        }
        .into());
    }
    let def = StageDefinition::read(&manifest)?;
    let name = match &def.name {
        Some(n) => n.clone(),
        None => folder_name(stage_dir, &manifest)?,
    };
    tracing::info!(image = %Reference::new(name.clone(), def.version.clone()), "building");
    let payload = resolve_format(settings.format, Some(stage_dir))?;
    let Some(layout) = settings.layout else {
        tracing::debug!("a dry run: the tree is assembled, nothing is written");
        let tree = assemble::stage_tree(stage_dir, &manifest, &def)?;
        crate::secrets::check(&tree, &manifest, &def, settings.inventory)?;
        return Ok(Outcome::Planned(Plan {
            reference: Reference::new(name, def.version.clone()).to_string(),
            build_steps: def.build.iter().map(|b| b.run.clone()).collect(),
            entries: tree.nodes.keys().map(|p| p.to_string()).collect(),
            content_bytes: tree.content_bytes(),
            parent: settings.parent.as_ref().map(|p| p.to_string()),
        }));
    };
    let replaced = check_new_version(layout, &Reference::new(name.clone(), def.version.clone()), settings.force)?;
    if !def.build.is_empty()
        && let Some(key) = &settings.hide_key
    {
        crate::hide::hide_key(key)?;
    }
    run_build_steps(stage_dir, &manifest, &def, settings.quiet)?;
    let tree = assemble::stage_tree(stage_dir, &manifest, &def)?;
    crate::secrets::check(&tree, &manifest, &def, settings.inventory)?;
    let config = StageConfig::from_definition(name, &def, Vec::new());
    let built = write_image(layout, config, &tree, settings, &payload)?;
    drop_old_signatures(layout, replaced, &built).map(|()| Outcome::Built(built))
}

/// Builds an ad-hoc stage from `files` (`SRC[:TARGET]`): a file with a target is staged at
/// the target's path (without the leading `/`) and linked there; one without at its name.
#[tracing::instrument(name = "create", skip_all, fields(image = %Reference::new(name.clone(), version.clone())))]
pub fn create(
    name: StageName,
    version: Version,
    files: &[String],
    target_prefix: Option<&TargetPath>,
    settings: &Settings<'_>,
) -> Result<Outcome> {
    let payload = resolve_format(settings.format, None)?;
    let listed = crate::listed::resolve(files, target_prefix)?;
    let mut tree = Tree::default();
    let mut specs = Vec::new();
    for l in &listed {
        if std::fs::symlink_metadata(&l.src).is_err() {
            let reason = format!("{} does not exist", l.src.display());
            return Err(InputError::Field { file: PathBuf::from("--files"), field: l.arg.clone(), reason }.into());
        }
        if let Some(t) = &l.target {
            specs.push(FileSpec {
                path: l.at.clone(),
                target: t.clone(),
                mode: None,
                kind: FileType::Symlink,
                owner: None,
                group: None,
            });
        }
        tree.add(&l.src, Some(&l.at), &|_| false)?;
    }
    if let Some(note) = crate::listed::unlinked_note(&listed)
        && !settings.quiet
    {
        eprintln!("{note}");
    }
    let def_text = serde_json::json!({ "version": version.to_string() }).to_string();
    let mut def = StageDefinition::parse(&def_text, Path::new("--files"))?;
    def.files = specs;
    let Some(layout) = settings.layout else {
        return Ok(Outcome::Planned(Plan {
            reference: Reference::new(name, version).to_string(),
            build_steps: Vec::new(),
            entries: tree.nodes.keys().map(|p| p.to_string()).collect(),
            content_bytes: tree.content_bytes(),
            parent: settings.parent.as_ref().map(|p| p.to_string()),
        }));
    };
    let replaced = check_new_version(layout, &Reference::new(name.clone(), version.clone()), settings.force)?;
    let config = StageConfig::from_definition(name, &def, Vec::new());
    let built = write_image(layout, config, &tree, settings, &payload)?;
    drop_old_signatures(layout, replaced, &built).map(|()| Outcome::Built(built))
}

/// Versions are immutable: NAME:VERSION already in the store is refused (exit 4) unless
/// `force`; returns the digest it had, to be replaced.
fn check_new_version(layout: &Layout, reference: &Reference, force: bool) -> Result<Option<Digest>> {
    let Some(old) = layout.resolve(&reference.to_string())? else { return Ok(None) };
    tracing::debug!(%reference, digest = %old.digest, force, "the store already has this version");
    if !force {
        return Err(cli_support::exit::Refused::Conflict(format!(
            "{reference} is already in the store {} ({}), and versions are immutable: bump `version` in the \
             stage's manifest.yaml (or --version), or pass --force to replace it and its signatures",
            layout.root().display(),
            old.digest
        ))
        .into());
    }
    Ok(Some(old.digest))
}

/// After a forced rebuild, the replaced image's signatures go with it.
fn drop_old_signatures(layout: &Layout, replaced: Option<Digest>, built: &Built) -> Result<()> {
    let Some(old) = replaced.filter(|d| *d != built.digest) else { return Ok(()) };
    let name = built.reference.split_once(':').map_or(built.reference.as_str(), |(n, _)| n);
    let tag = format!("{name}:{}", old.signature_tag());
    tracing::info!(%tag, "dropping the signatures of the replaced image {old}");
    layout.update_index(|i| {
        i.remove(&tag);
    })?;
    Ok(())
}

fn folder_name(stage_dir: &Path, manifest: &Path) -> Result<StageName> {
    let folder = stage_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .unwrap_or_default();
    folder.parse().map_err(|e: formats::names::InvalidName| {
        InputError::Field {
            file: manifest.to_owned(),
            field: "name".into(),
            reason: format!("not given, and the folder name is not a stage name: {e}"),
        }
        .into()
    })
}

fn run_build_steps(stage_dir: &Path, manifest: &Path, def: &StageDefinition, quiet: bool) -> Result<()> {
    let total = def.build.len();
    for (i, step) in def.build.iter().enumerate() {
        let cwd = stage_dir.join(step.cwd.as_deref().unwrap_or("."));
        tracing::info!(step = i + 1, of = total, run = %step.run, cwd = %cwd.display(), "running a build step");
        if !quiet {
            eprintln!("==> build step {}/{total}: {} (in {})", i + 1, step.run, cwd.display());
        }
        // Step output goes to stderr: stdout carries the command's result (--json).
        let status = Command::new("sh")
            .arg("-c")
            .arg(&step.run)
            .current_dir(&cwd)
            .env_remove(crate::hide::KEY_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .with_context(|| {
                format!("{}: build[{i}]: cannot run `{}` in {}", manifest.display(), step.run, cwd.display())
            })?;
        if !status.success() {
            bail!(
                "{}: build[{i}] `{}` failed ({status}); its output is above. Fix the step, or run it by hand in {}",
                manifest.display(),
                step.run,
                cwd.display()
            );
        }
    }
    Ok(())
}

/// The parent of a delta image: its tag, manifest and embedded stage manifest.
struct Parent {
    reference: Reference,
    image: StoredImage,
}

fn load_parent(layout: &Layout, reference: &Reference) -> Result<Parent> {
    let image = StoredImage::load(layout, reference)
        .with_context(|| format!("loading the parent image {reference} named by --parent"))?;
    Ok(Parent { reference: reference.clone(), image })
}

fn write_image(
    layout: &Layout,
    mut config: StageConfig,
    tree: &Tree,
    settings: &Settings<'_>,
    payload: &Payload,
) -> Result<Built> {
    let reference = Reference::new(config.name.clone(), config.version.clone());
    let epoch = source_date_epoch()?;
    let mtime = epoch.unwrap_or(0) as u64;
    let parent = settings.parent.as_ref().map(|p| load_parent(layout, p)).transpose()?;
    tracing::debug!(
        source_date_epoch = ?epoch,
        parent = ?parent.as_ref().map(|p| p.reference.to_string()),
        entries = tree.nodes.len(),
        bytes = tree.content_bytes(),
        "writing the image: a delta layer over the parent when there is one"
    );
    let want_media = match payload {
        Payload::Tar => oci::TAR_ZSTD_MEDIA_TYPE,
        Payload::Btrfs(_) => oci::BTRFS_ZSTD_MEDIA_TYPE,
    };
    let same_format =
        |m: &str| m == want_media || (want_media == oci::TAR_ZSTD_MEDIA_TYPE && m == oci::TAR_PATCH_MEDIA_TYPE);
    if let Some(p) = &parent
        && p.image.manifest.layers.iter().any(|l| !same_format(&l.media_type))
    {
        bail!(
            "the parent image {} has payload layers of another format than {want_media};              build with the parent's --format, or without --parent",
            p.reference
        );
    }
    let bar = crate::progress::bytes(tree.content_bytes(), &format!("building {reference}"), settings.quiet);
    let (layer, entries, blob) = match payload {
        Payload::Tar => tar_layer(layout, &config, tree, parent.as_ref(), mtime, &bar)?,
        Payload::Btrfs(work) => {
            let (layer, entries) = crate::btrfs::layer(
                layout,
                work,
                &config,
                tree,
                parent.as_ref().map(|p| (&p.reference, &p.image.config, &p.image.digest, &p.image.manifest.layers[..])),
                &bar,
            )?;
            (layer, entries, None)
        }
    };
    bar.finish_and_clear();
    let layer_size = layer.size;
    config.entries = entries;
    // Side by side: the layer's blob is synced into the store, the stage manifest checked,
    // and written. What the installer would refuse is refused here (a copy of a staged
    // link, a link chain out of the stage, ...), before anything is tagged or signed.
    let config_desc = std::thread::scope(|scope| -> Result<Descriptor> {
        let stored = blob.map(|b| scope.spawn(move || b.persist()));
        let valid = scope.spawn(|| config.validate());
        let config_bytes = config.to_bytes();
        let joined = |what: &str| anyhow::anyhow!("{what} panicked");
        valid
            .join()
            .map_err(|_| joined("checking the stage manifest"))?
            .with_context(|| format!("the stage manifest of {reference}"))?;
        if let Some(stored) = stored {
            stored.join().map_err(|_| joined("storing the layer"))??;
        }
        let digest = layout.write_blob(&config_bytes)?;
        Ok(Descriptor::new(CONFIG_MEDIA_TYPE, digest, config_bytes.len() as u64))
    })?;

    let mut layers = Vec::new();
    if let Some(p) = &parent {
        layers.extend(p.image.manifest.layers.iter().cloned());
    }
    layers.push(layer);
    let created = match epoch {
        Some(t) => jiff::Timestamp::from_second(t).context("SOURCE_DATE_EPOCH is out of range")?,
        None => jiff::Timestamp::now(),
    };
    let annotations = BTreeMap::from([
        (oci::ANNOTATION_TITLE.to_owned(), config.name.to_string()),
        (oci::ANNOTATION_VERSION.to_owned(), config.version.to_string()),
        (oci::ANNOTATION_CREATED.to_owned(), created.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
    ]);
    let manifest = ImageManifest::stage(config_desc, layers, annotations);
    let manifest_bytes = manifest.to_bytes();
    let digest = layout.write_blob(&manifest_bytes)?;
    let mut desc = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &manifest_bytes);
    desc.artifact_type = Some(oci::STAGE_ARTIFACT_TYPE.to_owned());
    layout.update_index(|i| i.set(&reference.to_string(), desc))?;
    Ok(Built {
        reference: reference.to_string(),
        digest,
        entries: config.entries.len(),
        content_bytes: tree.content_bytes(),
        payload_bytes: layer_size,
        parent: parent.map(|p| p.reference.to_string()),
        signed_by: Vec::new(),
    })
}

/// The tar+zstd layer of `tree` (a delta on `parent`'s when given), the signed entries
/// and the layer's blob, to be moved into the store.
///
/// The tar stream is checked as the installer unpacks it, in a second thread as it is
/// compressed (`LayerCheck`, through [`crate::check::pipe`]): a layer it would refuse is
/// refused here, before its blob is stored and anything tagged or signed. The check hashes
/// every file from the stream: those are the sha256 the manifest signs.
fn tar_layer(
    layout: &Layout,
    config: &StageConfig,
    tree: &Tree,
    parent: Option<&Parent>,
    mtime: u64,
    bar: &indicatif::ProgressBar,
) -> Result<(Descriptor, Vec<Entry>, Option<SealedBlob>)> {
    let open = |from: &Path| File::open(from).with_context(|| format!("reading {}", from.display()));
    // What will be signed. A delta hashes the tree first (to find what changed); a full
    // image's files are hashed from the layer by the check.
    let mut entries = Vec::with_capacity(tree.nodes.len());
    for (path, node) in &tree.nodes {
        let sha256 = match node {
            Node::File { from, .. } if parent.is_some() => Some(sha256_reader(bar.wrap_read(open(from)?))?.0),
            _ => None,
        };
        entries.push(entry(path, node, sha256));
    }
    let mut expected = config.clone();
    expected.entries = entries;
    // The delta writer compares what it writes with the entries as the check runs.
    let delta_entries = parent.map(|_| expected.entries.clone()).unwrap_or_default();
    let below = parent.map_or(&[][..], |p| &p.image.config.entries[..]);
    let layers = parent.map_or(0, |p| p.image.manifest.layers.len()) + 1;
    let reference = Reference::new(config.name.clone(), config.version.clone());
    let refused = || format!("the tar layer of {reference} would be refused by the installer; nothing was signed");

    let (written, check) = std::thread::scope(|scope| {
        let (to_check, from_payload) = crate::check::pipe();
        // The check ends (compares its tree with the manifest, frees it) on its own
        // thread, while this one ends the zstd frame.
        let checker = scope.spawn(move || {
            let mut check = LayerCheck::new(expected, below, layers, parent.is_some());
            check.read(from_payload).and_then(|()| check.finish())
        });
        let written = write_tar(layout, tree, parent, &delta_entries, mtime, to_check, bar);
        let check = checker.join().map_err(|_| anyhow::anyhow!("the check of the layer panicked"));
        (written, check)
    });
    // A write refused because the check had stopped: the check says why.
    // A full image signs the hashes of the files as the layer holds them.
    let ((signed, summary), (blob, patched)) = match (check?, written) {
        (Err(e), Ok(_)) => return Err(anyhow::Error::new(e).context(refused())),
        (Err(e), Err(w)) if crate::check::is_stopped(&w) => return Err(anyhow::Error::new(e).context(refused())),
        (_, Err(w)) => return Err(w),
        (Ok(checked), Ok(w)) => (checked, w),
    };
    if summary.patches != patched as u64 {
        bail!("{}: the layer holds {} patches, the builder wrote {patched}", refused(), summary.patches);
    }
    let blob = blob.seal()?;
    let media_type = if patched > 0 { oci::TAR_PATCH_MEDIA_TYPE } else { oci::TAR_ZSTD_MEDIA_TYPE };
    let mut layer = Descriptor::new(media_type, blob.digest, blob.size);
    if let Some(p) = parent {
        layer.annotations.insert(oci::ANNOTATION_PARENT.into(), p.reference.to_string());
        layer.annotations.insert(oci::ANNOTATION_PARENT_DIGEST.into(), p.image.digest.to_string());
    }
    Ok((layer, signed.entries, Some(blob)))
}

/// Writes the layer's tar stream through zstd into a new blob (not yet stored: it hashes
/// what it is given, the layer's digest), a copy of it to `check`; returns the blob and
/// how many files are patches.
fn write_tar(
    layout: &Layout,
    tree: &Tree,
    parent: Option<&Parent>,
    entries: &[Entry],
    mtime: u64,
    check: crate::check::Writer,
    bar: &indicatif::ProgressBar,
) -> Result<(formats::layout::BlobWriter, usize)> {
    let blob = layout.blob_writer()?;
    let mut payload = TarZstdWriter::into_hashing(blob, mtime, Compression::default(), Some(Box::new(check)))
        .context("starting the zstd compressor")?;
    let mut patched = 0;
    match parent {
        None => write_full(&mut payload, tree, bar)?,
        Some(parent) => {
            let mut files =
                crate::patches::ParentFiles::new(layout, &parent.image.config, &parent.image.manifest.layers);
            patched = write_delta(&mut payload, &parent.image.config, entries, tree, &mut files)?;
        }
    }
    let blob = payload.finish_into().context("finishing the payload")?;
    Ok((blob, patched))
}

/// Files up to this size are read ahead by a second thread.
const PREFETCH_MAX: u64 = 256 * 1024;
/// Read-ahead files go in batches of up to this many bytes (one more file may overflow it)
/// and files: one hand-over per batch, not per file.
const BATCH_BYTES: usize = 1 << 20;
const BATCH_FILES: usize = 256;
/// Batches that may wait: at most 2 x (1 MiB + 256 KiB) read ahead.
const BATCHES: usize = 2;

/// Small files read ahead: their contents back to back in `data`, each file's range or
/// its read error in `files`, in tree order.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    files: Vec<std::io::Result<std::ops::Range<usize>>>,
}

/// Reads the small files of `tree`, in order, in batches to `tx`; buffers come back on `free`.
fn read_ahead(tree: &Tree, tx: std::sync::mpsc::SyncSender<Batch>, free: std::sync::mpsc::Receiver<Batch>) {
    use std::io::Read;
    let mut batch = Batch::default();
    for node in tree.nodes.values() {
        let Node::File { from, size, .. } = node else { continue };
        if *size > PREFETCH_MAX {
            continue;
        }
        let start = batch.data.len();
        let read = File::open(from).and_then(|f| {
            // One byte more than expected shows a file that grew; the writer takes `size`.
            batch.data.reserve(*size as usize + 1);
            f.take(*size + 1).read_to_end(&mut batch.data)
        });
        batch.files.push(read.map(|_| start..batch.data.len()));
        if batch.data.len() >= BATCH_BYTES || batch.files.len() >= BATCH_FILES {
            let mut next = free.try_recv().unwrap_or_default();
            next.data.clear();
            next.files.clear();
            if tx.send(std::mem::replace(&mut batch, next)).is_err() {
                return;
            }
        }
    }
    if !batch.files.is_empty() {
        let _ = tx.send(batch);
    }
}

/// Writes every node of `tree`, in path order.
fn write_full<W: Write>(payload: &mut TarZstdWriter<W>, tree: &Tree, bar: &indicatif::ProgressBar) -> Result<()> {
    let open = |from: &Path| File::open(from).with_context(|| format!("reading {}", from.display()));
    // Small files are read ahead by a second thread (their syscalls overlap the
    // compression here), in batches; larger ones stream from this thread. At most
    // BATCHES batches are in flight: memory stays bounded.
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(BATCHES);
        let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Batch>(BATCHES + 2);
        scope.spawn(move || read_ahead(tree, tx, free_rx));
        let mut batch = Batch::default();
        let mut next = 0;
        for (path, node) in &tree.nodes {
            match node {
                Node::Dir { mode } => payload.add_dir(path, *mode)?,
                Node::Symlink { link } => payload.add_symlink(path, link)?,
                &Node::File { mode, ref from, size } => {
                    let added = if size <= PREFETCH_MAX {
                        if next == batch.files.len() {
                            let used =
                                std::mem::replace(&mut batch, rx.recv().context("the read-ahead thread stopped")?);
                            let _ = free_tx.try_send(used);
                            next = 0;
                        }
                        let range = std::mem::replace(&mut batch.files[next], Ok(0..0));
                        next += 1;
                        let range = range.with_context(|| format!("reading {}", from.display()))?;
                        bar.inc(range.len() as u64);
                        payload.add_file_data(path, mode, size, &batch.data[range])
                    } else {
                        payload.add_file_data(path, mode, size, bar.wrap_read(open(from)?))
                    };
                    added.with_context(|| format!("adding {}", from.display()))?;
                }
            }
        }
        Ok(())
    })
}

/// The signed entry of a tree node.
pub(crate) fn entry(path: &RelPath, node: &Node, sha256: Option<Digest>) -> Entry {
    Entry {
        path: path.clone(),
        kind: node.kind(),
        mode: node.mode(),
        size: match node {
            Node::File { size, .. } => Some(*size),
            _ => None,
        },
        sha256,
        link: match node {
            Node::Symlink { link } => Some(link.clone()),
            _ => None,
        },
    }
}

/// Writes what changed from `parent` to `entries`: whiteouts for paths that disappeared or
/// changed type (topmost only), then every new or changed entry, in path order: a changed
/// file as a patch against the parent's version when that is smaller. Returns how many
/// files are patches.
fn write_delta<W: Write>(
    payload: &mut TarZstdWriter<W>,
    parent: &StageConfig,
    entries: &[Entry],
    tree: &Tree,
    files: &mut crate::patches::ParentFiles<'_>,
) -> Result<usize> {
    let mut patched = 0;
    let new: BTreeMap<&RelPath, &Entry> = entries.iter().map(|e| (&e.path, e)).collect();
    let mut gone: Vec<&RelPath> = Vec::new();
    for old in &parent.entries {
        let replaced = match new.get(&old.path) {
            None => true,
            Some(e) => e.kind != old.kind,
        };
        if replaced && !gone.iter().any(|g| old.path.starts_with(g)) {
            gone.push(&old.path);
        }
    }
    for g in &gone {
        payload.add_whiteout(g)?;
    }
    for e in entries {
        let old = parent.entry(&e.path);
        if old == Some(e) {
            continue;
        }
        let Some(node) = tree.nodes.get(&e.path) else {
            bail!("{} is in the new entries but not in the assembled tree", e.path);
        };
        match node {
            Node::Dir { .. } => payload.add_dir(&e.path, e.mode)?,
            Node::Symlink { link } => payload.add_symlink(&e.path, link)?,
            Node::File { from, size, .. } => {
                if old.is_some_and(|o| o.kind == e.kind)
                    && let Some(patch) = files.patch(&e.path, from, *size)?
                {
                    // The patch hashed the file as it read it.
                    if Some(patch.sha256) != e.sha256 {
                        bail!("{} changed while building; build again", from.display());
                    }
                    payload.add_patch(&e.path, e.mode, patch.len, patch.file)?;
                    patched += 1;
                    continue;
                }
                let f = File::open(from).with_context(|| format!("reading {}", from.display()))?;
                let d = payload.add_file(&e.path, e.mode, e.size.unwrap_or(0), f)?;
                if Some(d) != e.sha256 {
                    bail!("{} changed while building; build again", from.display());
                }
            }
        }
    }
    Ok(patched)
}
