//! Staging btrfs send-stream layers.
//!
//! Every layer is validated command by command before a byte reaches the kernel
//! (`formats::btrfs`), its compressed bytes hashed against the signed digest. On a btrfs
//! staging area the validated streams are then received with `btrfs receive` (in
//! order: the full stream, then each incremental one against the subvolume before it);
//! elsewhere they are applied in userspace onto plain directories.
//!
//! ```text
//! .tmp/recv-<gen>/<subvolume>      btrfs: what `btrfs receive` created, layer by layer
//! .tmp/work-<gen>-<i>/             directories: layer i applied on a copy of layer i-1
//! .tmp/<dest>                      the result, renamed into place; then checked against
//!                                  the signed manifest like any generation
//! ```

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use formats::btrfs::{
    ParentTree, StreamSummary, Uuid, apply_to_dir, copy_tree, validate_stream, validate_stream_against,
    validate_stream_onto,
};
use formats::digest::HashingReader;
use formats::layout::Layout;
use formats::oci::Descriptor;
use formats::unpack::Budget;

use crate::error::Malformed;

type LayerReader = zstd::stream::read::Decoder<'static, BufReader<HashingReader<File>>>;

fn open(layout: &Layout, layer: &Descriptor) -> Result<LayerReader> {
    let f = layout.open_blob(&layer.digest)?;
    // The whole blob is hashed (a longer file fails the digest check at the end).
    Ok(zstd::stream::read::Decoder::new(HashingReader::new(f))?)
}

/// Reads what the decoder left of the compressed blob and checks its digest and size.
fn check_digest(dec: LayerReader, layer: &Descriptor) -> Result<()> {
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
/// `on_btrfs`, a directory otherwise. The caller checks the result against the manifest.
///
/// Each stream is bounded by what the signed manifest declares (`budget`, as for tar
/// payloads): the bytes it makes the receiver store (written, cloned, reserved) and the
/// entries it creates, per layer and over all layers, checked on the validating pass
/// before a byte of it is received or applied.
pub fn stage(
    layout: &Layout,
    layers: &[Descriptor],
    budget: &Budget,
    tmp: &Path,
    dest: &str,
    on_btrfs: bool,
) -> Result<PathBuf> {
    let _span = tracing::info_span!("stage payload", dest, layers = layers.len(), on_btrfs).entered();
    tracing::debug!(
        "btrfs send streams: `btrfs receive` when the staging area is on btrfs, otherwise applied to a directory"
    );
    let work = tmp.join(format!("recv-{dest}"));
    let _ = crate::txn::remove_tree(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut spent = Spent::default();
    let result = if on_btrfs {
        receive(layout, layers, budget, &mut spent, &work)
    } else {
        apply(layout, layers, budget, &mut spent, &work)
    };
    let final_path = match result {
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
    Ok(target)
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
    let (bytes, entries) = (summary.bytes_stored(), summary.entries_created());
    spent.bytes = spent.bytes.saturating_add(bytes);
    spent.entries = spent.entries.saturating_add(entries);
    let checks = [
        ("store", "bytes", bytes, spent.bytes, budget.layer_bytes, budget.image_bytes),
        ("create", "entries", entries, spent.entries, budget.layer_entries, budget.image_entries),
    ];
    for (verb, unit, this, all, per_layer, per_image) in checks {
        if this > per_layer || all > per_image {
            return Err(Malformed(format!(
                "layer {} would {verb} {this} {unit} ({all} in all layers so far), more than the signed manifest \
                 allows ({per_layer} per layer, {per_image} per image)",
                layer.digest
            ))
            .into());
        }
    }
    Ok(())
}

fn receive(layout: &Layout, layers: &[Descriptor], budget: &Budget, spent: &mut Spent, work: &Path) -> Result<PathBuf> {
    let btrfs = ["/usr/bin/btrfs", "/bin/btrfs", "/usr/sbin/btrfs", "/sbin/btrfs"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("`btrfs` is not installed: apt-get install btrfs-progs")?;
    let mut prev: Option<(Uuid, PathBuf)> = None;
    for layer in layers {
        // 1. Validate the whole stream (against the parent's tree on disk) and its digest.
        let mut dec = open(layout, layer)?;
        let summary = match &prev {
            None => validate_stream(&mut dec, None),
            Some((uuid, dir)) => validate_stream_against(&mut dec, *uuid, &ParentTree::scan(dir)?),
        }
        .with_context(|| format!("validating layer {}", layer.digest))?;
        check_digest(dec, layer)?;
        within_budget(&summary, layer, budget, spent)?;
        // 2. Only then let the kernel receive it.
        let mut child = Command::new(&btrfs)
            .args(["receive", "-e", "-q"])
            .arg(work)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running btrfs receive")?;
        let mut dec = open(layout, layer)?;
        let copied = io::copy(&mut dec, child.stdin.as_mut().expect("piped"));
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        copied.context("feeding btrfs receive")?;
        check_digest(dec, layer)?;
        if !out.status.success() {
            bail!("btrfs receive of layer {} failed: {}", layer.digest, String::from_utf8_lossy(&out.stderr).trim());
        }
        let path = work.join(&summary.name);
        if let Some((_, old)) = prev.replace((summary.uuid, path)) {
            // The layer below is no longer needed once the next one is received.
            let name = old.file_name().and_then(|n| n.to_str()).context("subvolume name")?.to_owned();
            subvol::delete(work, &name)?;
        }
    }
    prev.map(|(_, p)| p).context("an image without payload layers")
}

fn apply(layout: &Layout, layers: &[Descriptor], budget: &Budget, spent: &mut Spent, work: &Path) -> Result<PathBuf> {
    let mut prev: Option<PathBuf> = None;
    for (i, layer) in layers.iter().enumerate() {
        // A validating pass first, so that the budget holds before anything is written.
        let mut dec = open(layout, layer)?;
        let parent = prev.as_deref().map(ParentTree::scan).transpose()?;
        let summary = validate_stream_onto(&mut dec, parent.as_ref())
            .with_context(|| format!("validating layer {}", layer.digest))?;
        check_digest(dec, layer)?;
        within_budget(&summary, layer, budget, spent)?;
        let dest = work.join(format!("layer-{i}"));
        fs::create_dir(&dest).with_context(|| format!("creating {}", dest.display()))?;
        if let Some(p) = &prev {
            copy_tree(p, &dest)?;
        }
        let mut dec = open(layout, layer)?;
        apply_to_dir(&mut dec, &dest, prev.as_deref()).with_context(|| format!("applying layer {}", layer.digest))?;
        check_digest(dec, layer)?;
        if let Some(p) = prev.replace(dest) {
            crate::txn::remove_tree(&p)?;
        }
    }
    prev.context("an image without payload layers")
}
