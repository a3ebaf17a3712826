//! `export`: images (with their signatures) into one `.oci.tar`, plus a detached
//! `FILE.minisig` when a key is at hand.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use formats::Reference;
use formats::archive::ExportPlan;
use formats::layout::Layout;
use keys::PrivateKey;

use crate::inspect::StoredImage;

/// What `export` prints.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub path: PathBuf,
    pub images: Vec<String>,
    pub bytes: u64,
    pub blobs: usize,
    /// Payload layers left out because `--since` has them.
    pub omitted_layers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minisig: Option<PathBuf>,
    pub unsigned: Vec<String>,
}

/// `export --dry-run`: what would go into the file.
#[derive(Debug, Serialize)]
pub struct ExportDryRun {
    pub path: PathBuf,
    pub index: Vec<String>,
    pub blobs: Vec<String>,
    pub omitted_layers: Vec<String>,
}

pub fn plan(layout: &Layout, images: &[Reference], since: Option<&Reference>) -> Result<ExportPlan> {
    let mut exclude = BTreeSet::new();
    if let Some(s) = since {
        let base = StoredImage::load(layout, s).with_context(|| format!("loading {s} named by --since"))?;
        exclude.extend(base.manifest.layers.iter().map(|l| l.digest));
    }
    for r in images {
        StoredImage::load(layout, r)?;
    }
    let tags: Vec<String> = images.iter().map(|r| r.to_string()).collect();
    Ok(ExportPlan::new(layout, &tags, &exclude)?)
}

pub fn dry_run(plan: &ExportPlan, out: &Path) -> ExportDryRun {
    ExportDryRun {
        path: out.to_owned(),
        index: plan
            .index
            .manifests
            .iter()
            .filter_map(|d| d.annotation(formats::oci::ANNOTATION_REF_NAME).map(str::to_owned))
            .collect(),
        blobs: plan.blobs.iter().map(|d| format!("{} {} {}", d.digest, d.size, d.media_type)).collect(),
        omitted_layers: plan.omitted.iter().map(|d| d.digest.to_string()).collect(),
    }
}

pub fn export(
    layout: &Layout,
    images: &[Reference],
    plan: &ExportPlan,
    out: &Path,
    key: Option<&PrivateKey>,
    quiet: bool,
) -> Result<Exported> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let total: u64 = plan.blobs.iter().map(|d| d.size).sum();
    let bar = crate::progress::bytes(total, &format!("exporting to {}", out.display()), quiet);
    let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    let w = plan
        .write(layout, BufWriter::with_capacity(1 << 20, tmp), |n| bar.inc(n))
        .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    let tmp = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", out.display()))?;
    tmp.as_file().sync_all()?;
    let bytes = tmp.as_file().metadata()?.len();
    tmp.persist(out).with_context(|| format!("moving the export to {}", out.display()))?;

    let minisig = match key {
        Some(key) => {
            let sig_path = PathBuf::from(format!("{}.minisig", out.display()));
            let file_name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let names: Vec<String> = images.iter().map(|r| r.to_string()).collect();
            let comment = format!("file:{file_name} images:{}", names.join(","));
            let f = File::open(out).with_context(|| format!("reading back {}", out.display()))?;
            let text = keys::minisign::sign_detached(key, f, &comment)?;
            formats::layout::write_atomic(&sig_path, text.as_bytes())?;
            Some(sig_path)
        }
        None => None,
    };
    let mut unsigned = Vec::new();
    for r in images {
        let image = StoredImage::load(layout, r)?;
        if image.signature_manifest(layout)?.is_none() {
            unsigned.push(r.to_string());
        }
    }
    Ok(Exported {
        path: out.to_owned(),
        images: images.iter().map(|r| r.to_string()).collect(),
        bytes,
        blobs: plan.blobs.len(),
        omitted_layers: plan.omitted.len(),
        minisig,
        unsigned,
    })
}
