//! Staging tar+zstd layers: into an empty tree, or, for an image with patch layers
//! (`tar-patch+zstd`, see `docs/formats.md`) whose parent image is one of the stage's
//! generations on the host, only the layers above that generation applied onto a copy of
//! it (a writable snapshot on btrfs): the patches apply to the host's files, and nothing
//! below is unpacked again. The copy (off btrfs) leaves out the files whose signed sha256
//! differs from the generation's (the layers write them; their patches read the
//! generation's file) and hashes every file it copies, so that no file is read twice.
//!
//! An image of an archive or a layout directory is usually unpacked while it arrives
//! (see [`crate::stream`]); this module unpacks the others from the received layout.
//!
//! Either way the unpacker checks the whole result against the signed manifest (every
//! file's sha256, every mode, nothing missing, nothing extra), so a host generation that
//! was changed since it was deployed makes the deploy fail (exit 7) and nothing is
//! activated. A thin export whose parent is neither in the store nor on the host is
//! refused before this, when it is received.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, FileType, Mode as RawMode, OFlags};

use formats::Digest;
use formats::digest::HashingWriter;
use formats::layout::Layout;
use formats::manifest::{EntryKind, MAX_CONFIG_BYTES, StageConfig};
use formats::oci::{self, Descriptor};
use formats::unpack::Unpacker;

use crate::host_parent::{self, HostGeneration};

/// Unpacks `layers` into `tmp/<dest>` (a subvolume when `on_btrfs`), created here.
pub fn stage(
    layout: &Layout,
    layers: &[Descriptor],
    config: &StageConfig,
    tmp: &Path,
    dest: &str,
    on_btrfs: bool,
    host: &[HostGeneration],
) -> Result<()> {
    let target = tmp.join(dest);
    let patches = layers.iter().any(|l| l.media_type == oci::TAR_PATCH_MEDIA_TYPE);
    let onto = if patches { onto_host(layers, host) } else { None };
    let Some((first, generation)) = onto else {
        if on_btrfs {
            subvol::create(tmp, dest)?;
        } else {
            fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        }
        formats::unpack::unpack_layers(layout, layers, config, &target)?;
        return Ok(());
    };
    tracing::info!(
        generation = %generation.dir.display(),
        "applying the layers above layer {first} onto a copy of the host's generation of the parent image"
    );
    let mut unpacker = if on_btrfs && subvol::is_subvolume(&generation.dir).unwrap_or(false) {
        subvol::snapshot(&generation.dir, tmp, dest, false)?;
        // The generation's own manifest.json is not part of the image's tree.
        match fs::remove_file(target.join("manifest.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        Unpacker::over(config, &target, &layers[first..])?
    } else {
        // A copy without the files the layers replace (their patches read the
        // generation's files), every file hashed as it is copied: read once.
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        let replaced = replaced_files(&generation.dir, config);
        let known = copy_hashing(&generation.dir, &target, &replaced)
            .with_context(|| format!("copying the generation {}", generation.dir.display()))?;
        Unpacker::over_base(config, &target, &layers[first..], &generation.dir, known)?
    };
    for layer in &layers[first..] {
        unpacker.apply_next(layout.open_blob(&layer.digest)?)?;
    }
    unpacker.finish()?;
    Ok(())
}

/// The files of `config` whose content differs from the generation's at `dir` (its
/// `manifest.json`, the signed manifest it was deployed from): the layers above it write
/// them. Nothing when that manifest cannot be read (the whole generation is copied).
fn replaced_files(dir: &Path, config: &StageConfig) -> BTreeSet<String> {
    let old = fs::File::open(dir.join("manifest.json")).and_then(|f| {
        let mut bytes = Vec::new();
        f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    let Some(old) = old.ok().and_then(|b| StageConfig::from_bytes(&b).ok()) else { return BTreeSet::new() };
    config
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .filter(|e| old.entry(&e.path).is_some_and(|o| o.kind == EntryKind::File && o.sha256 != e.sha256))
        .map(|e| e.path.to_string())
        .collect()
}

/// Copies the tree at `from` into the empty directory `to` (directories with their modes,
/// files, symlinks; not the top-level `manifest.json`, nor the files in `leave_out`),
/// without following a symlink; returns every copied file's digest and size, hashed as
/// written.
fn copy_hashing(from: &Path, to: &Path, leave_out: &BTreeSet<String>) -> Result<BTreeMap<String, (Digest, u64)>> {
    let src = fsx::open_root(from).with_context(|| format!("opening {}", from.display()))?;
    let dst = fsx::open_root(to).with_context(|| format!("opening {}", to.display()))?;
    let mut known = BTreeMap::new();
    copy_dir(&src, &dst, None, leave_out, &mut known, 0)?;
    rustix::fs::syncfs(&dst).with_context(|| format!("syncing {}", to.display()))?;
    Ok(known)
}

fn copy_dir(
    src: &OwnedFd,
    dst: &OwnedFd,
    prefix: Option<&str>,
    leave_out: &BTreeSet<String>,
    known: &mut BTreeMap<String, (Digest, u64)>,
    depth: usize,
) -> Result<()> {
    if depth > formats::path::MAX_DEPTH {
        anyhow::bail!("{}: nested deeper than {} directories", prefix.unwrap_or("."), formats::path::MAX_DEPTH);
    }
    for name in fsx::list_dir(src)? {
        let text = name.to_string_lossy();
        let path = prefix.map_or_else(|| text.to_string(), |p| format!("{p}/{text}"));
        if (prefix.is_none() && text == "manifest.json") || leave_out.contains(&path) {
            continue;
        }
        let st = rustix::fs::statat(src, &name, AtFlags::SYMLINK_NOFOLLOW).with_context(|| path.clone())?;
        let mode = RawMode::from_raw_mode(st.st_mode & 0o7777);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let s = rustix::fs::openat(src, &name, flags, RawMode::empty()).with_context(|| path.clone())?;
                rustix::fs::mkdirat(dst, &name, RawMode::from_raw_mode(0o700)).with_context(|| path.clone())?;
                let d = rustix::fs::openat(dst, &name, flags, RawMode::empty()).with_context(|| path.clone())?;
                copy_dir(&s, &d, Some(&path), leave_out, known, depth + 1)?;
                rustix::fs::fchmod(&d, mode).with_context(|| path.clone())?;
            }
            FileType::RegularFile => {
                let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let s = rustix::fs::openat(src, &name, flags, RawMode::empty()).with_context(|| path.clone())?;
                let create = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let d = rustix::fs::openat(dst, &name, create, RawMode::from_raw_mode(0o600))
                    .with_context(|| path.clone())?;
                let mut out = HashingWriter::new(fs::File::from(d));
                io::copy(&mut fs::File::from(s), &mut out).with_context(|| format!("copying {path}"))?;
                let (digest, size, file) = out.finish();
                rustix::fs::fchmod(&file, mode).with_context(|| path.clone())?;
                known.insert(path, (digest, size));
            }
            FileType::Symlink => {
                let text = rustix::fs::readlinkat(src, &name, Vec::new()).with_context(|| path.clone())?;
                rustix::fs::symlinkat(&text, dst, &name).with_context(|| path.clone())?;
            }
            // Nothing else is part of a generation (the final check names what is missing).
            _ => {}
        }
    }
    Ok(())
}

/// The topmost layer whose parent image is deployed here, and that generation.
fn onto_host<'a>(layers: &[Descriptor], host: &'a [HostGeneration]) -> Option<(usize, &'a HostGeneration)> {
    layers.iter().enumerate().skip(1).rev().find_map(|(i, l)| {
        let parent = l.annotations.get(oci::ANNOTATION_PARENT_DIGEST)?;
        host_parent::find(host, parent).map(|g| (i, g))
    })
}
