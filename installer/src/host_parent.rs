//! The generations of a stage on this host that an update's layers may build on: an
//! incremental btrfs layer is received against the generation its parent image was
//! deployed as, and a patch layer's files are applied against that generation's files
//! (see `docs/formats.md`). What is built on them is checked against the signed manifest
//! like any generation, so a generation that was changed on the host fails that check.

use std::path::PathBuf;

use formats::{Digest, StageName};

use crate::state::State;
use crate::txn::Staging;

/// A generation of the stage being deployed, on the host.
#[derive(Debug, Clone)]
pub struct HostGeneration {
    /// The image it was deployed from.
    pub digest: Digest,
    pub dir: PathBuf,
}

/// `name`'s generations in `state` (active first, then the kept ones) that are on disk.
pub fn of_stage(staging: &Staging, state: &State, name: &StageName) -> Vec<HostGeneration> {
    let Some(s) = state.stages.get(name) else { return Vec::new() };
    std::iter::once(&s.active)
        .chain(&s.previous)
        .map(|g| HostGeneration { digest: g.digest, dir: staging.generation(name, g.generation) })
        .filter(|g| g.dir.symlink_metadata().is_ok_and(|m| m.is_dir()))
        .collect()
}

/// The generation deployed from the image `digest` (an image's parent), if it is here.
pub fn find<'a>(host: &'a [HostGeneration], digest: &str) -> Option<&'a HostGeneration> {
    host.iter().find(|g| g.digest.to_string() == digest)
}
