//! `export`: images (with their signatures) into one `.oci.tar`, plus a detached
//! `FILE.minisig` when a key is at hand.

use std::collections::BTreeSet;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use formats::Reference;
use formats::archive::ExportPlan;
use formats::layout::Layout;
use keys::PrivateKey;
use keys::minisign::Hashing;

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

/// What `--out` names: stdout (`-`), or a file that is a regular file or does not exist yet.
fn check_out(path: &Path, flag: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            let kind = if t.is_symlink() {
                "a symlink"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a named pipe"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            };
            anyhow::bail!(
                "{flag} {} is {kind}: export writes a new file or replaces a regular file, nothing else \
                 (use --out - to write the archive to stdout)",
                path.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("looking at {flag} {}", path.display())),
    }
}

/// Whether `--out` means stdout.
pub fn is_stdout(out: &Path) -> bool {
    out.as_os_str() == "-"
}

/// Writes the archive to `out` (a new or regular file, or stdout for `-`), and with a key
/// its `.minisig` to `minisig` (default: `OUT.minisig`; for stdout only when given). The
/// signature is of the bytes as they were written, hashed on their way out: whoever can
/// write the export folder cannot have it sign a file swapped in afterwards.
#[allow(clippy::too_many_arguments)]
#[tracing::instrument(name = "export", skip_all, fields(out = %out.display(), images = images.len()))]
pub fn export(
    layout: &Layout,
    images: &[Reference],
    plan: &ExportPlan,
    out: &Path,
    minisig: Option<&Path>,
    key: Option<&PrivateKey>,
    quiet: bool,
) -> Result<Exported> {
    let to_stdout = is_stdout(out);
    tracing::info!(
        signed = key.is_some(),
        "exporting {}",
        images.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    if !to_stdout {
        check_out(out, "--out")?;
    }
    let sig_path = match (minisig, to_stdout) {
        (Some(p), _) => Some(p.to_owned()),
        (None, false) => Some(PathBuf::from(format!("{}.minisig", out.display()))),
        (None, true) => None,
    };
    if key.is_some()
        && let Some(p) = &sig_path
    {
        check_out(p, "the .minisig")?;
    }
    let shown = if to_stdout { "stdout".to_owned() } else { out.display().to_string() };
    let total: u64 = plan.blobs.iter().map(|d| d.size).sum();
    let bar = crate::progress::bytes(total, &format!("exporting to {shown}"), quiet);
    let names: Vec<String> = images.iter().map(|r| r.to_string()).collect();
    let file_name = if to_stdout {
        "-".to_owned()
    } else {
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let comment = format!("file:{file_name} images:{}", names.join(","));
    let (bytes, signature) = if to_stdout {
        let stdout = std::io::stdout().lock();
        let w = Counting::new(Hashing::new(BufWriter::with_capacity(1 << 20, stdout)));
        let w = plan.write(layout, w, |n| bar.inc(n)).context("writing the archive to stdout")?;
        bar.finish_and_clear();
        let bytes = w.count;
        let (signature, mut buf) = sign(key, w.inner, &comment)?;
        std::io::Write::flush(&mut buf).context("writing the archive to stdout")?;
        (bytes, signature)
    } else {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
        let w = Counting::new(Hashing::new(BufWriter::with_capacity(1 << 20, tmp)));
        let w = plan.write(layout, w, |n| bar.inc(n)).with_context(|| format!("writing {}", out.display()))?;
        bar.finish_and_clear();
        let bytes = w.count;
        let (signature, buf) = sign(key, w.inner, &comment)?;
        let tmp = buf.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", out.display()))?;
        let tmp = fsx::TempFile::from_written(tmp).with_context(|| format!("writing {}", out.display()))?;
        check_out(out, "--out")?;
        tmp.replace(out).with_context(|| format!("moving the export to {}", out.display()))?;
        (bytes, signature)
    };
    let minisig = match (signature, sig_path) {
        (Some(text), Some(p)) => {
            fsx::write_atomic(&p, text.as_bytes())?;
            Some(p)
        }
        (Some(_), None) => {
            if !quiet {
                eprintln!("note: no .minisig for --out - (there is no file to put it beside): pass --minisig FILE");
            }
            None
        }
        (None, _) => None,
    };
    let mut unsigned = Vec::new();
    for r in images {
        let image = StoredImage::load(layout, r)?;
        if image.signature_manifest(layout)?.is_none() {
            unsigned.push(r.to_string());
        }
    }
    Ok(Exported {
        path: if to_stdout { PathBuf::from("-") } else { out.to_owned() },
        images: images.iter().map(|r| r.to_string()).collect(),
        bytes,
        blobs: plan.blobs.len(),
        omitted_layers: plan.omitted.len(),
        minisig,
        unsigned,
    })
}

/// The `.minisig` of what went through `w` (with a key), and the writer underneath.
fn sign<W: std::io::Write>(key: Option<&PrivateKey>, w: Hashing<W>, comment: &str) -> Result<(Option<String>, W)> {
    Ok(match key {
        Some(key) => {
            let (text, inner) = keys::minisign::sign_written(key, w, comment)?;
            (Some(text), inner)
        }
        None => (None, w.into_inner()),
    })
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W> Counting<W> {
    fn new(inner: W) -> Self {
        Counting { inner, count: 0 }
    }
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
