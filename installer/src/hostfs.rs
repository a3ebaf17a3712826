//! Every change the installer makes to a host goes through [`HostFs`]: the target
//! operations (directories, links, copies, moves to and from `backups/` and the stash) and
//! the staging operations (publishing a generation, switching a stage link, units). The
//! transaction steps ([`crate::txn`]) are written against it; [`RealFs`] is the host under
//! `--root` (directory handles, openat2), and the tests have an in-memory one
//! (`hostfs::mem`), so that planning and undoing are checked without a disk or root.
//!
//! The few reads here are the ones a step needs to stay idempotent (is the link already
//! there, is this copy still ours); planning reads through a gathered
//! [`crate::plan::HostView`] instead.

use std::fs;

use anyhow::{Context, Result};

use formats::StageName;
use formats::digest::Digest;
use formats::path::TargetPath;

use crate::host::{Host, TargetState};
use crate::txn::{Staging, remove_tree, sync_dir};

/// Where the installer keeps what it moved away from a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kept {
    /// `backups/<name>`: what the operator had at a target before we placed something.
    Backup,
    /// `journal/stash/<name>`: a copy of ours on its way out (deleted at clean-up).
    Stash,
}

/// `systemctl enable` or `disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    Enable,
    Disable,
}

impl UnitAction {
    pub fn verb(self) -> &'static str {
        match self {
            UnitAction::Enable => "enable",
            UnitAction::Disable => "disable",
        }
    }
}

/// The host as the transaction steps change it.
pub trait HostFs {
    /// What is at `target` now (the last component is not followed).
    fn state(&self, target: &TargetPath) -> Result<TargetState>;
    /// The sha256 of the regular file at `target`, if there is one.
    fn file_digest(&self, target: &TargetPath) -> Result<Option<Digest>>;
    /// Whether the directory `dir` exists.
    fn dir_exists(&self, dir: &TargetPath) -> Result<bool>;
    /// Whether `name` exists in `area`.
    fn has_kept(&self, area: Kept, name: &str) -> Result<bool>;
    /// Whether units can be enabled and disabled here.
    fn systemctl_available(&self) -> bool;

    /// Creates the directory `dir` (its parent must exist); no error if it exists.
    fn mkdir(&self, dir: &TargetPath) -> Result<()>;
    /// Removes the directory `dir` if it exists and is empty.
    fn rmdir_if_empty(&self, dir: &TargetPath) -> Result<()>;
    /// Makes `target` a symlink with `text`, atomically replacing a link or file there.
    fn replace_symlink(&self, target: &TargetPath, text: &str) -> Result<()>;
    /// Removes the file or link at `target`; nothing if it is missing.
    fn remove(&self, target: &TargetPath) -> Result<()>;
    /// Removes the temp entry a killed command may have left beside `target`.
    fn remove_temp(&self, target: &TargetPath) -> Result<()>;
    /// Moves what is at `target` to `name` in `area`.
    fn move_out(&self, target: &TargetPath, area: Kept, name: &str) -> Result<()>;
    /// Moves `name` of `area` to `target`, which must be free.
    fn move_in(&self, area: Kept, name: &str, target: &TargetPath) -> Result<()>;
    /// Copies the staged file `staged` (relative to the staging area) to `target` with `mode`.
    fn copy_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()>;
    /// Writes `bytes` to `target` with `mode` (through a temp file renamed into place).
    fn write_new(&self, target: &TargetPath, bytes: &[u8], mode: u32) -> Result<()>;
    /// Whether `target` is a regular file holding what the staged age file `staged`
    /// decrypts to with the host identity (a secret of ours, unchanged).
    fn secret_at(&self, target: &TargetPath, staged: &str) -> Result<bool>;
    /// Decrypts the staged age file `staged` with the host identity into `target` with
    /// `mode` and the staged file's owner (through a temp file renamed into place).
    fn decrypt_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()>;

    /// Moves the unpacked tree `.tmp/<tmp>` to `.generations/<stage>/<generation>` (nothing
    /// if it is there already).
    fn publish_generation(&self, stage: &StageName, generation: u64, tmp: &str) -> Result<()>;
    /// Deletes a published generation (and the stage's folder when it was its last).
    fn unpublish_generation(&self, stage: &StageName, generation: u64) -> Result<()>;
    /// Moves the published generation to `journal/stash/<name>` (nothing if it is missing).
    fn set_aside_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()>;
    /// Moves `journal/stash/<name>` back to the generation's place, which must be free.
    fn take_back_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()>;
    /// Points `staging/<stage>` at a generation, or removes it.
    fn set_stage_link(&self, stage: &StageName, generation: Option<u64>) -> Result<()>;
    /// Enables or disables a unit.
    fn unit(&self, action: UnitAction, unit: &str) -> Result<()>;
}

/// The host under `--root` and its staging area.
#[derive(Debug, Clone, Copy)]
pub struct RealFs<'a> {
    pub host: &'a Host,
    pub staging: &'a Staging,
}

impl<'a> RealFs<'a> {
    pub fn new(host: &'a Host, staging: &'a Staging) -> RealFs<'a> {
        RealFs { host, staging }
    }

    fn kept(&self, area: Kept, name: &str) -> std::path::PathBuf {
        match area {
            Kept::Backup => self.staging.backup(name),
            Kept::Stash => self.staging.stash(name),
        }
    }
}

impl HostFs for RealFs<'_> {
    fn state(&self, target: &TargetPath) -> Result<TargetState> {
        Ok(self.host.state(target)?)
    }

    fn file_digest(&self, target: &TargetPath) -> Result<Option<Digest>> {
        Ok(self.host.file_digest(target)?)
    }

    fn dir_exists(&self, dir: &TargetPath) -> Result<bool> {
        Ok(self.host.dir_exists(dir)?)
    }

    fn has_kept(&self, area: Kept, name: &str) -> Result<bool> {
        Ok(self.kept(area, name).symlink_metadata().is_ok())
    }

    fn systemctl_available(&self) -> bool {
        crate::checks::systemctl_path().is_some()
    }

    fn mkdir(&self, dir: &TargetPath) -> Result<()> {
        Ok(self.host.mkdir(dir)?)
    }

    fn rmdir_if_empty(&self, dir: &TargetPath) -> Result<()> {
        Ok(self.host.rmdir_if_empty(dir)?)
    }

    fn replace_symlink(&self, target: &TargetPath, text: &str) -> Result<()> {
        Ok(self.host.replace_symlink(target, text)?)
    }

    fn remove(&self, target: &TargetPath) -> Result<()> {
        Ok(self.host.remove(target)?)
    }

    fn remove_temp(&self, target: &TargetPath) -> Result<()> {
        Ok(self.host.remove_temp(target)?)
    }

    fn move_out(&self, target: &TargetPath, area: Kept, name: &str) -> Result<()> {
        Ok(self.host.move_out(target, &self.kept(area, name))?)
    }

    fn move_in(&self, area: Kept, name: &str, target: &TargetPath) -> Result<()> {
        Ok(self.host.move_in(&self.kept(area, name), target)?)
    }

    fn copy_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()> {
        Ok(self.host.copy_in(&self.staging.dir.join(staged), target, mode)?)
    }

    fn write_new(&self, target: &TargetPath, bytes: &[u8], mode: u32) -> Result<()> {
        Ok(self.host.write_new(target, bytes, mode)?)
    }

    fn secret_at(&self, target: &TargetPath, staged: &str) -> Result<bool> {
        let Some(Some(held)) = self.host.read_file(target, keys::secret::MAX_SECRET)? else { return Ok(false) };
        let from = self.staging.dir.join(staged);
        // Not staged (a step undone before its generation was published): nothing at the
        // target can be what it decrypts to.
        if from.symlink_metadata().is_err() {
            return Ok(false);
        }
        let plain = crate::secrets::decrypt_staged(self.host, &from)?;
        let held = keys::secret::Zeroizing::new(held);
        Ok(held[..] == plain[..])
    }

    fn decrypt_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()> {
        let from = self.staging.dir.join(staged);
        let plain = crate::secrets::decrypt_staged(self.host, &from)?;
        Ok(self.host.write_owned_like(&from, &plain, target, mode)?)
    }

    fn publish_generation(&self, stage: &StageName, generation: u64, tmp: &str) -> Result<()> {
        let dest = self.staging.generation(stage, generation);
        if !dest.exists() {
            let parent = dest.parent().context("a generation has a parent")?;
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            fs::rename(self.staging.tmp().join(tmp), &dest)
                .with_context(|| format!("publishing {}", dest.display()))?;
            sync_dir(parent)?;
        }
        // On btrfs a generation is a read-only subvolume (made read-only once in place:
        // a read-only subvolume cannot be renamed).
        if subvol::is_subvolume(&dest).unwrap_or(false) {
            subvol::set_readonly(&dest, true).with_context(|| format!("making {} read-only", dest.display()))?;
        }
        Ok(())
    }

    fn unpublish_generation(&self, stage: &StageName, generation: u64) -> Result<()> {
        let dest = self.staging.generation(stage, generation);
        if dest.exists() {
            remove_tree(&dest)?;
        }
        // The stage's folder of generations, when this was its first.
        if let Some(parent) = dest.parent() {
            match fs::remove_dir(parent) {
                Ok(()) => sync_dir(&self.staging.dir.join(".generations"))?,
                Err(e) if matches!(e.raw_os_error(), Some(39) | Some(2)) => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", parent.display())),
            }
        }
        Ok(())
    }

    fn set_aside_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()> {
        let from = self.staging.generation(stage, generation);
        if from.symlink_metadata().is_err() {
            return Ok(());
        }
        // A read-only subvolume cannot be renamed.
        if subvol::is_subvolume(&from).unwrap_or(false) {
            subvol::set_readonly(&from, false).with_context(|| format!("making {} writable", from.display()))?;
        }
        let to = self.staging.stash(name);
        fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        sync_dir(to.parent().context("the stash has a parent")?)?;
        sync_dir(from.parent().context("a generation has a parent")?)
    }

    fn take_back_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()> {
        let (from, to) = (self.staging.stash(name), self.staging.generation(stage, generation));
        let parent = to.parent().context("a generation has a parent")?;
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        fs::rename(&from, &to).with_context(|| format!("moving {} back to {}", from.display(), to.display()))?;
        if subvol::is_subvolume(&to).unwrap_or(false) {
            subvol::set_readonly(&to, true).with_context(|| format!("making {} read-only", to.display()))?;
        }
        sync_dir(parent)
    }

    fn set_stage_link(&self, stage: &StageName, generation: Option<u64>) -> Result<()> {
        let staging = self.staging;
        let link = staging.stage_link(stage);
        match generation {
            None => match fs::remove_file(&link) {
                Ok(()) => sync_dir(&staging.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", link.display())),
            },
            Some(g) => {
                let text = format!(".generations/{stage}/{g}");
                let dir = fsx::open_root(&staging.dir).with_context(|| format!("opening {}", staging.dir.display()))?;
                let tmp = crate::host::temp_name(stage.as_str(), "tmp");
                fsx::replace_symlink_at(&dir, stage.as_str(), &text, &tmp)
                    .with_context(|| format!("switching {}", link.display()))
            }
        }
    }

    fn unit(&self, action: UnitAction, unit: &str) -> Result<()> {
        match action {
            UnitAction::Enable => {
                crate::checks::systemctl(&self.host.root, action.verb(), unit)?;
                crate::services::repoint_links(self.host, unit)
            }
            UnitAction::Disable => crate::services::disable(self.host, unit),
        }
    }
}

#[cfg(test)]
pub mod mem;
#[cfg(test)]
mod props;
