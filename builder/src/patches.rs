//! Patch deltas of tar images (`formats::patch`): a changed file of a `--parent` build is
//! carried as a patch against the parent's version when that is smaller than the file.
//!
//! The parent's versions come from the store: the parent image is unpacked (and checked
//! against its signed manifest, as the installer would) into a temporary directory of
//! the store, `.tmp/parent-PID/`, removed when the build ends. Each patch is written to a
//! spool file there first (a tar header names the size before the data), so memory holds
//! one patch window at a time (see `formats::patch`), never a whole file.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use formats::layout::Layout;
use formats::manifest::{EntryKind, StageConfig};
use formats::oci::Descriptor;
use formats::path::RelPath;
use formats::unpack::Unpacker;

/// The parent's tree, unpacked on demand.
#[derive(Debug)]
pub struct ParentFiles<'a> {
    layout: &'a Layout,
    config: &'a StageConfig,
    layers: &'a [Descriptor],
    dir: Option<PathBuf>,
}

/// What [`ParentFiles::patch`] made.
#[derive(Debug)]
pub struct Patch {
    pub file: File,
    pub len: u64,
    /// The new file's sha256, hashed as the patch read it.
    pub sha256: formats::Digest,
}

impl<'a> ParentFiles<'a> {
    pub fn new(layout: &'a Layout, config: &'a StageConfig, layers: &'a [Descriptor]) -> Self {
        ParentFiles { layout, config, layers, dir: None }
    }

    fn tree(&mut self) -> Result<&Path> {
        if self.dir.is_none() {
            let dir = self.layout.root().join(".tmp").join(format!("parent-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("tree"))?;
            self.dir = Some(dir.clone());
            let tree = dir.join("tree");
            let mut unpacker = Unpacker::new(self.config, &tree, self.layers)?;
            for layer in self.layers {
                unpacker.apply_next(self.layout.open_blob(&layer.digest)?)?;
            }
            unpacker.finish().with_context(|| format!("unpacking the parent image into {}", tree.display()))?;
        }
        Ok(self.dir.as_deref().expect("set above"))
    }

    /// A patch turning the parent's `path` into `new` (`size` bytes, hashing to what the
    /// caller signs), when the parent has a file there and the patch is smaller than the
    /// file; `None` otherwise.
    pub fn patch(&mut self, path: &RelPath, new: &Path, size: u64) -> Result<Option<Patch>> {
        let Some(old) = self.config.entry(path).filter(|e| e.kind == EntryKind::File) else { return Ok(None) };
        let old_size = old.size.unwrap_or(0);
        if size == 0 || old_size == 0 {
            return Ok(None);
        }
        let dir = self.tree()?;
        let mut reference = BufReader::new(File::open(dir.join("tree").join(path.as_str()))?);
        let spool_path = dir.join("patch");
        let mut spool = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&spool_path)?;
        let src = File::open(new).with_context(|| format!("reading {}", new.display()))?;
        let (sha256, len) = {
            let mut out = BufWriter::new(&mut spool);
            let made = formats::patch::make(&mut reference, old_size, BufReader::new(src), size, &mut out)
                .with_context(|| format!("making the patch of {path}"))?;
            io::Write::flush(&mut out)?;
            made
        };
        tracing::debug!(%path, size, patch = len, "patch against the parent's version");
        if len >= size {
            return Ok(None);
        }
        spool.seek(SeekFrom::Start(0))?;
        Ok(Some(Patch { file: spool, len, sha256 }))
    }
}

impl Drop for ParentFiles<'_> {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}
