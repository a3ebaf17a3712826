//! Staging tar+zstd layers: into an empty tree, or, for an image with patch layers
//! (`tar-patch+zstd`, see `docs/formats.md`) whose parent image is one of the stage's
//! generations on the host, only the layers above that generation applied onto a copy of
//! it (a writable snapshot on btrfs): the patches apply to the host's files, and nothing
//! below is unpacked again.
//!
//! Either way the unpacker checks the whole result against the signed manifest (every
//! file's sha256, every mode, nothing missing, nothing extra), so a host generation that
//! was changed since it was deployed makes the deploy fail (exit 7) and nothing is
//! activated. A thin export whose parent is neither in the store nor on the host is
//! refused before this, when it is received.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use formats::layout::Layout;
use formats::manifest::StageConfig;
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
    if on_btrfs && subvol::is_subvolume(&generation.dir).unwrap_or(false) {
        subvol::snapshot(&generation.dir, tmp, dest, false)?;
    } else {
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        formats::btrfs::copy_tree(&generation.dir, &target)
            .with_context(|| format!("copying the generation {}", generation.dir.display()))?;
    }
    // The generation's own manifest.json is not part of the image's tree.
    match fs::remove_file(target.join("manifest.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut unpacker = Unpacker::over(config, &target, &layers[first..])?;
    for layer in &layers[first..] {
        unpacker.apply_next(layout.open_blob(&layer.digest)?)?;
    }
    unpacker.finish()?;
    Ok(())
}

/// The topmost layer whose parent image is deployed here, and that generation.
fn onto_host<'a>(layers: &[Descriptor], host: &'a [HostGeneration]) -> Option<(usize, &'a HostGeneration)> {
    layers.iter().enumerate().skip(1).rev().find_map(|(i, l)| {
        let parent = l.annotations.get(oci::ANNOTATION_PARENT_DIGEST)?;
        host_parent::find(host, parent).map(|g| (i, g))
    })
}
