//! Transactions: a journaled list of steps applied under the lock, undone on failure or by
//! `recover` after a crash.
//!
//! ```text
//! 1. plan        steps + the state after, computed from the state before
//! 2. journal     journal/tx.json written atomically: {txid, steps, before, after, cleanup}
//! 3. apply       each step in order; every step is idempotent and has an idempotent undo
//! 4. check       (deploy) verify commands; a failure undoes every step
//! 5. commit      state.json := after (atomic rename): the commit point
//! 6. clean up    delete stashed copies, snapshots; remove journal/tx.json
//! ```
//!
//! After a crash, `recover` (and every command, before it starts) reads the journal: if
//! `state.json` carries the journal's txid the transaction committed and only the clean-up
//! is redone (the host is as after); otherwise every step is undone in reverse (the host is
//! as before). Undoing a step that never ran changes nothing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use formats::StageName;
use formats::digest::Digest;
use formats::path::TargetPath;

use crate::host::TargetState;
use crate::hostfs::{HostFs, Kept, UnitAction};
use crate::state::State;

/// One reversible change to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Step {
    /// Move an unpacked tree from `.tmp/<tmp>` to `.generations/<stage>/<generation>`.
    PublishGeneration { stage: StageName, generation: u64, tmp: String },
    /// Put a rebuilt tree `.tmp/<tmp>` in place of a published generation that went missing
    /// (`aside` none) or was damaged (moved to `journal/stash/<aside>` first, deleted at
    /// clean-up): `repair`, and `deploy` of the same image.
    RebuildGeneration { stage: StageName, generation: u64, tmp: String, aside: Option<String> },
    /// Point `staging/<stage>` at a generation (`None`: remove the link).
    SetStageLink { stage: StageName, from: Option<u64>, to: Option<u64> },
    /// Create a directory for targets.
    MkDir { path: TargetPath },
    /// Remove a directory we created, if it is empty.
    RmDir { path: TargetPath },
    /// Move what the operator had at `target` to `backups/<backup>`.
    Backup { target: TargetPath, backup: String },
    /// Move `backups/<backup>` back to `target`.
    Restore { backup: String, target: TargetPath },
    /// Create our symlink at a free `target`.
    Link { target: TargetPath, text: String },
    /// Remove our symlink.
    Unlink { target: TargetPath, text: String },
    /// Copy a staged file to a free `target`.
    Copy { target: TargetPath, from: String, sha256: Digest, mode: u32 },
    /// Move our copy at `target` to `journal/stash/<stash>` (deleted at clean-up).
    Stash { target: TargetPath, stash: String, sha256: Digest },
    /// Decrypt the staged age file `from` (ciphertext digest `sha256`) with the host
    /// identity into a free `target`, with `mode` and the staged file's owner.
    Secret { target: TargetPath, from: String, sha256: Digest, mode: u32 },
    /// Remove our decrypted secret at `target` (what `from` decrypts to). Nothing is
    /// stashed: undoing decrypts `from` again, with `mode`.
    Unsecret { target: TargetPath, from: String, sha256: Digest, mode: u32 },
    /// `systemctl --root ROOT enable UNIT`.
    EnableUnit { unit: String },
    /// Remove the enablement links of UNIT.
    DisableUnit { unit: String },
    /// Write a plugin registration at a free `target` (`/etc/op-dbus/plugins/NAME.toml`).
    Register { target: TargetPath, text: String },
    /// Remove our plugin registration at `target` (left alone when it is not `text`).
    Unregister { target: TargetPath, text: String },
}

impl Step {
    /// A line for plans and dry runs.
    pub fn describe(&self) -> String {
        match self {
            Step::PublishGeneration { stage, generation, .. } => format!("stage {stage} generation {generation}"),
            Step::RebuildGeneration { stage, generation, aside, .. } => match aside {
                Some(_) => format!("rebuild {stage} generation {generation} (the damaged one set aside)"),
                None => format!("rebuild {stage} generation {generation} (it was missing)"),
            },
            Step::SetStageLink { stage, from, to } => {
                format!("switch {stage}: {} -> {}", gen_name(*from), gen_name(*to))
            }
            Step::MkDir { path } => format!("mkdir {path}"),
            Step::RmDir { path } => format!("rmdir {path} (if empty)"),
            Step::Backup { target, backup } => format!("back up {target} to backups/{backup}"),
            Step::Restore { backup, target } => format!("restore {target} from backups/{backup}"),
            Step::Link { target, text } => format!("link {target} -> {text}"),
            Step::Unlink { target, text } => format!("unlink {target} (-> {text})"),
            Step::Copy { target, from, .. } => format!("copy {from} to {target}"),
            Step::Stash { target, .. } => format!("remove copy {target}"),
            Step::Secret { target, from, .. } => format!("decrypt {from} to {target}"),
            Step::Unsecret { target, .. } => format!("remove secret {target}"),
            Step::EnableUnit { unit } => format!("enable {unit}"),
            Step::DisableUnit { unit } => format!("disable {unit}"),
            Step::Register { target, .. } => format!("register plugin {target}"),
            Step::Unregister { target, .. } => format!("unregister plugin {target}"),
        }
    }
}

fn gen_name(g: Option<u64>) -> String {
    g.map_or("none".into(), |g| g.to_string())
}

/// Paths of the staging area.
#[derive(Debug, Clone)]
pub struct Staging {
    pub dir: PathBuf,
}

impl Staging {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn journal_file(&self) -> PathBuf {
        self.dir.join("journal/tx.json")
    }
    pub fn stash(&self, name: &str) -> PathBuf {
        self.dir.join("journal/stash").join(name)
    }
    pub fn backup(&self, name: &str) -> PathBuf {
        self.dir.join("backups").join(name)
    }
    pub fn tmp(&self) -> PathBuf {
        self.dir.join(".tmp")
    }
    pub fn generation(&self, stage: &StageName, generation: u64) -> PathBuf {
        self.dir.join(".generations").join(stage.as_str()).join(generation.to_string())
    }
    pub fn stage_link(&self, stage: &StageName) -> PathBuf {
        self.dir.join(stage.as_str())
    }
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Creates the directories of the staging area.
    pub fn create_dirs(&self) -> Result<()> {
        for d in [".generations", "snapshots", "journal/stash", "backups", ".tmp"] {
            let p = self.dir.join(d);
            fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok(())
    }
}

/// What clean-up does after the commit point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleanup {
    /// Snapshots to write (name, state).
    #[serde(default)]
    pub snapshots: Vec<(String, State)>,
    /// Generations no longer referenced, deleted.
    #[serde(default)]
    pub drop_generations: Vec<(StageName, u64)>,
}

/// The journal of the transaction in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub txid: u64,
    pub operation: String,
    pub steps: Vec<Step>,
    pub before: State,
    pub after: State,
    #[serde(default)]
    pub cleanup: Cleanup,
}

impl Journal {
    /// The journal of carrying out `plan` from `before`.
    pub fn of(operation: impl Into<String>, before: State, plan: crate::plan::Plan, cleanup: Cleanup) -> Journal {
        Journal {
            txid: plan.after.txid,
            operation: operation.into(),
            steps: plan.steps,
            before,
            after: plan.after,
            cleanup,
        }
    }
}

/// Applies `step` (idempotent).
pub fn apply(fs: &dyn HostFs, step: &Step) -> Result<()> {
    crate::faults::point("apply");
    match step {
        Step::PublishGeneration { stage, generation, tmp } => fs.publish_generation(stage, *generation, tmp),
        Step::RebuildGeneration { stage, generation, tmp, aside } => {
            if let Some(a) = aside
                && !fs.has_kept(Kept::Stash, a)?
            {
                fs.set_aside_generation(stage, *generation, a)?;
            }
            fs.publish_generation(stage, *generation, tmp)
        }
        Step::SetStageLink { stage, to, .. } => fs.set_stage_link(stage, *to),
        Step::MkDir { path } => fs.mkdir(path).with_context(|| format!("creating {path}")),
        Step::RmDir { path } => fs.rmdir_if_empty(path).with_context(|| format!("removing {path}")),
        Step::Backup { target, backup } => {
            if fs.has_kept(Kept::Backup, backup)? {
                return Ok(());
            }
            fs.move_out(target, Kept::Backup, backup).with_context(|| format!("backing up {target}"))
        }
        Step::Restore { backup, target } => {
            if !fs.has_kept(Kept::Backup, backup)? {
                return Ok(());
            }
            fs.move_in(Kept::Backup, backup, target)
                .with_context(|| format!("restoring {target} from backups/{backup}"))
        }
        Step::Link { target, text } => match fs.state(target)? {
            TargetState::Missing => fs.replace_symlink(target, text).with_context(|| format!("linking {target}")),
            TargetState::Symlink(t) if &t == text => Ok(()),
            other => {
                anyhow::bail!("{target} appeared while deploying ({other}); nothing was changed: run the command again")
            }
        },
        Step::Unlink { target, text } => match fs.state(target)? {
            TargetState::Symlink(t) if &t == text => fs.remove(target).with_context(|| format!("removing {target}")),
            _ => Ok(()),
        },
        Step::Copy { target, from, sha256, mode } => {
            if fs.file_digest(target)? == Some(*sha256) {
                return Ok(());
            }
            if fs.state(target)? != TargetState::Missing {
                anyhow::bail!("{target} appeared while deploying; nothing was changed: run the command again");
            }
            fs.copy_in(from, target, *mode).with_context(|| format!("copying to {target}"))
        }
        Step::Stash { target, stash, sha256 } => {
            if fs.file_digest(target)? != Some(*sha256) {
                return Ok(());
            }
            fs.move_out(target, Kept::Stash, stash).with_context(|| format!("removing {target}"))
        }
        Step::Secret { target, from, mode, .. } => {
            if fs.state(target)? == TargetState::Missing {
                return fs
                    .decrypt_in(from, target, *mode)
                    .with_context(|| format!("decrypting the secret to {target}"));
            }
            if fs.secret_at(target, from)? {
                return Ok(());
            }
            anyhow::bail!("{target} appeared while deploying; nothing was changed: run the command again")
        }
        Step::Unsecret { target, from, .. } => {
            if fs.state(target)? == TargetState::File && fs.secret_at(target, from)? {
                fs.remove(target).with_context(|| format!("removing {target}"))?;
            }
            Ok(())
        }
        Step::EnableUnit { unit } => fs.unit(UnitAction::Enable, unit),
        Step::DisableUnit { unit } => fs.unit(UnitAction::Disable, unit),
        Step::Register { target, text } => {
            if fs.file_digest(target)? == Some(Digest::of(text.as_bytes())) {
                return Ok(());
            }
            if fs.state(target)? != TargetState::Missing {
                anyhow::bail!(
                    "{target} exists and is not this stage's registration: move it away (it is not the installer's) \
                     and run the command again"
                );
            }
            if let Some(parent) = target.relative().parent() {
                let dir = TargetPath::parse(&format!("/{parent}"))?;
                if !fs.dir_exists(&dir)? {
                    fs.mkdir(&dir).with_context(|| format!("creating {dir}"))?;
                }
            }
            fs.write_new(target, text.as_bytes(), 0o644).with_context(|| format!("writing {target}"))
        }
        Step::Unregister { target, text } => {
            if fs.file_digest(target)? != Some(Digest::of(text.as_bytes())) {
                return Ok(());
            }
            fs.remove(target).with_context(|| format!("removing {target}"))
        }
    }
}

/// Undoes `step` (idempotent; a step that never ran is left alone).
pub fn undo(fs: &dyn HostFs, step: &Step) -> Result<()> {
    crate::faults::point("undo");
    match step {
        Step::PublishGeneration { stage, generation, .. } => fs.unpublish_generation(stage, *generation),
        // What was there comes back: the damaged tree from the stash, or nothing. A damaged
        // one not yet set aside means the step never ran: it stays.
        Step::RebuildGeneration { stage, generation, aside, .. } => match aside {
            Some(a) if fs.has_kept(Kept::Stash, a)? => {
                fs.unpublish_generation(stage, *generation)?;
                fs.take_back_generation(stage, *generation, a)
            }
            Some(_) => Ok(()),
            None => fs.unpublish_generation(stage, *generation),
        },
        Step::SetStageLink { stage, from, .. } => fs.set_stage_link(stage, *from),
        Step::MkDir { path } => fs.rmdir_if_empty(path).with_context(|| format!("removing {path}")),
        Step::RmDir { path } => {
            if let Some(parent) = path.relative().parent()
                && !fs.dir_exists(&TargetPath::parse(&format!("/{parent}"))?)?
            {
                return Ok(());
            }
            fs.mkdir(path).with_context(|| format!("re-creating {path}"))
        }
        Step::Backup { target, backup } => {
            if !fs.has_kept(Kept::Backup, backup)? || fs.state(target)? != TargetState::Missing {
                return Ok(());
            }
            fs.move_in(Kept::Backup, backup, target).with_context(|| format!("putting back {target}"))
        }
        Step::Restore { backup, target } => {
            if fs.has_kept(Kept::Backup, backup)? || fs.state(target)? == TargetState::Missing {
                return Ok(());
            }
            fs.move_out(target, Kept::Backup, backup).with_context(|| format!("moving {target} back to backups/"))
        }
        Step::Link { target, text } => {
            fs.remove_temp(target)?;
            match fs.state(target)? {
                TargetState::Symlink(t) if &t == text => {
                    fs.remove(target).with_context(|| format!("removing {target}"))
                }
                _ => Ok(()),
            }
        }
        Step::Unlink { target, text } => {
            fs.remove_temp(target)?;
            match fs.state(target)? {
                TargetState::Missing => {
                    fs.replace_symlink(target, text).with_context(|| format!("re-linking {target}"))
                }
                _ => Ok(()),
            }
        }
        Step::Copy { target, sha256, .. } => {
            fs.remove_temp(target)?;
            if fs.file_digest(target)? == Some(*sha256) {
                fs.remove(target).with_context(|| format!("removing {target}"))?;
            }
            Ok(())
        }
        Step::Stash { target, stash, .. } => {
            if !fs.has_kept(Kept::Stash, stash)? || fs.state(target)? != TargetState::Missing {
                return Ok(());
            }
            fs.move_in(Kept::Stash, stash, target).with_context(|| format!("putting back {target}"))
        }
        Step::Secret { target, from, .. } => {
            fs.remove_temp(target)?;
            if fs.state(target)? == TargetState::File && fs.secret_at(target, from)? {
                fs.remove(target).with_context(|| format!("removing {target}"))?;
            }
            Ok(())
        }
        Step::Unsecret { target, from, mode, .. } => {
            if fs.state(target)? != TargetState::Missing {
                return Ok(());
            }
            fs.decrypt_in(from, target, *mode).with_context(|| format!("decrypting the secret back to {target}"))
        }
        // A unit whose file is already gone cannot be enabled either: nothing to undo then.
        Step::EnableUnit { unit } => {
            let _ = fs.unit(UnitAction::Disable, unit);
            Ok(())
        }
        Step::DisableUnit { unit } => fs.unit(UnitAction::Enable, unit),
        Step::Register { target, text } => {
            fs.remove_temp(target)?;
            if fs.file_digest(target)? == Some(Digest::of(text.as_bytes())) {
                fs.remove(target).with_context(|| format!("removing {target}"))?;
            }
            Ok(())
        }
        Step::Unregister { target, text } => {
            if fs.state(target)? != TargetState::Missing {
                return Ok(());
            }
            fs.write_new(target, text.as_bytes(), 0o644).with_context(|| format!("writing back {target}"))
        }
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    Ok(fsx::sync_dir(dir)?)
}

/// Removes a tree we own (a generation, a temp dir), making read-only parts writable first.
pub fn remove_tree(path: &Path) -> Result<()> {
    if subvol::is_subvolume(path).unwrap_or(false) {
        // Subvolumes nested inside go first (a generation holds none, but be sure).
        let parent = path.parent().context("a subvolume has a parent")?;
        let name = path.file_name().and_then(|n| n.to_str()).context("subvolume name")?;
        return subvol::delete(parent, name).with_context(|| format!("deleting subvolume {}", path.display()));
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

impl Journal {
    pub fn write(&self, staging: &Staging) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("journal serializes");
        fsx::write_atomic(&staging.journal_file(), &bytes)
            .with_context(|| format!("writing {}", staging.journal_file().display()))
    }

    pub fn read(staging: &Staging) -> Result<Option<Journal>> {
        let path = staging.journal_file();
        match fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is corrupt; move it away and check the host with `op-dbus-stage verify`", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Undoes every step, newest first; the host is as before. A step whose undo fails
    /// does not stop the others: every one is tried, and the failures are the error.
    pub fn roll_back(&self, fs: &dyn HostFs) -> Result<()> {
        let mut failed = Vec::new();
        for (i, step) in self.steps.iter().enumerate().rev() {
            if self.never_ran(fs, i) {
                continue;
            }
            if let Err(e) = undo(fs, step) {
                failed.push(format!("undoing `{}`: {e:#}", step.describe()));
            }
        }
        if failed.is_empty() { Ok(()) } else { Err(UndoFailed(failed).into()) }
    }

    /// Whether step `i` is known not to have run where its own undo cannot tell: an
    /// `rmdir` of a directory of ours that an earlier `restore` brings back from backups/
    /// (a later generation had placed something at it) never ran while that backup is
    /// still there, and re-creating the directory then would stand where the copy or link
    /// undone next must come back.
    fn never_ran(&self, fs: &dyn HostFs, i: usize) -> bool {
        let Step::RmDir { path } = &self.steps[i] else { return false };
        self.steps[..i].iter().any(|s| {
            matches!(s, Step::Restore { backup, target } if target == path
                && fs.has_kept(Kept::Backup, backup).unwrap_or(false))
        })
    }

    /// Commits: writes the state after (the commit point), then cleans up.
    pub fn commit(&self, staging: &Staging) -> Result<()> {
        crate::faults::point("commit");
        self.after.write(&staging.state_file())?;
        crate::faults::point("committed");
        self.clean_up(staging)
    }

    /// The idempotent work after the commit point; removes the journal last.
    pub fn clean_up(&self, staging: &Staging) -> Result<()> {
        for (name, state) in &self.cleanup.snapshots {
            crate::snapshot::write(staging, name, state)?;
            crate::faults::point("cleanup");
        }
        for (stage, g) in &self.cleanup.drop_generations {
            remove_tree(&staging.generation(stage, *g))?;
            crate::faults::point("cleanup");
        }
        let stash = staging.dir.join("journal/stash");
        if stash.exists() {
            // One by one: a generation set aside on btrfs is a subvolume.
            for e in fs::read_dir(&stash).with_context(|| format!("reading {}", stash.display()))? {
                let p = e?.path();
                if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    remove_tree(&p)?;
                } else {
                    fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                }
            }
        }
        fs::remove_file(staging.journal_file())
            .with_context(|| format!("removing {}", staging.journal_file().display()))?;
        sync_dir(&staging.dir.join("journal"))
    }

    /// What [`Journal::recover`] would do: complete the transaction if it committed, else
    /// roll it back.
    pub fn outcome(&self, staging: &Staging) -> Result<RecoverOutcome> {
        let state = State::read(&staging.state_file())?;
        Ok(if state.txid == self.txid { RecoverOutcome::Completed } else { RecoverOutcome::RolledBack })
    }

    /// Finishes an interrupted transaction: as after if it committed, else as before.
    pub fn recover(&self, fs: &dyn HostFs, staging: &Staging) -> Result<RecoverOutcome> {
        if self.outcome(staging)? == RecoverOutcome::Completed {
            self.clean_up(staging)?;
            Ok(RecoverOutcome::Completed)
        } else {
            if let Err(e) = self.roll_back(fs) {
                // Undoing failed twice now (once when the change failed, once here): a
                // journal that can never be finished must not wedge every later command.
                // Keep it for the operator, beside what it names, and go on.
                let kept = staging.dir.join(format!("journal/failed-{}.json", self.txid));
                fs::rename(staging.journal_file(), &kept)
                    .with_context(|| format!("moving the unfinishable journal to {}", kept.display()))?;
                sync_dir(&staging.dir.join("journal"))?;
                return Err(e.context(format!(
                    "the interrupted transaction `{}` could not be undone completely; the host is as before except \
                     for what is listed; its journal is kept at {} and later commands run again: check the host \
                     with `op-dbus-stage verify`",
                    self.operation,
                    kept.display()
                )));
            }
            fs::remove_file(staging.journal_file())?;
            sync_dir(&staging.dir.join("journal"))?;
            Ok(RecoverOutcome::RolledBack)
        }
    }
}

/// Steps whose undo failed, each with its error.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct UndoFailed(pub Vec<String>);

/// What `recover` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoverOutcome {
    Completed,
    RolledBack,
}
