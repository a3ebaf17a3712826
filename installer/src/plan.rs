//! Planning a transition from the deployed state to a desired one: which generations to
//! publish, which stage links to switch, which target links and copies to add or remove,
//! what to back up and restore. Deploy, rollback, remove and restore all go through here.
//!
//! A target link reads `/var/lib/op-dbus/staging/<stage>/<path>`, through the stage link, so
//! a stage that keeps a file across generations keeps its link untouched: switching
//! generations is the one rename of the stage link, whatever the number of files.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use serde::Serialize;

use formats::manifest::{EntryKind, FileType};
use formats::path::{RelPath, TargetPath};
use formats::{Digest, StageName};

use crate::error::{Malformed, Refused};
use crate::host::{TargetState, link_text};
use crate::hostfs::HostFs;
use crate::state::{Placed, Placement, StageState, State};
use crate::txn::Step;

/// What a desired stage wants at one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub stage: StageName,
    pub generation: u64,
    pub path: RelPath,
    pub kind: FileType,
    pub sha256: Option<Digest>,
    pub mode: u32,
}

/// The plan of one transaction: steps and the state after.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    #[serde(skip)]
    pub after: State,
    /// Things left alone that the operator may want to know about.
    pub notes: Vec<String>,
}

/// Every target the `stages` want, from their generations' embedded manifests.
pub fn wants(stages: &BTreeMap<StageName, StageState>) -> Result<BTreeMap<TargetPath, Want>> {
    let mut out: BTreeMap<TargetPath, Want> = BTreeMap::new();
    for (name, st) in stages {
        for f in &st.active.activation.files {
            if f.entry == EntryKind::Dir && f.kind != FileType::Symlink {
                return Err(Refused::Conflict(format!(
                    "{name}: {} is a directory; only `type: symlink` can place a directory (at {})",
                    f.path, f.target
                ))
                .into());
            }
            if let Some(other) = out.get(&f.target) {
                return Err(Refused::Conflict(format!(
                    "{} is wanted by both {} ({}) and {name} ({}); remove one of them first",
                    f.target, other.stage, other.path, f.path
                ))
                .into());
            }
            if let Some((t, w)) = out.iter().find(|(t, _)| f.target.is_under(t) || t.is_under(&f.target)) {
                return Err(Refused::Conflict(format!(
                    "{} ({name}) and {t} ({}) lie inside one another",
                    f.target, w.stage
                ))
                .into());
            }
            out.insert(
                f.target.clone(),
                Want {
                    stage: name.clone(),
                    generation: st.active.generation,
                    path: f.path.clone(),
                    kind: f.kind,
                    sha256: f.sha256,
                    mode: f.mode,
                },
            );
        }
    }
    Ok(out)
}

fn keeps(p: &Placed, w: &Want) -> bool {
    p.stage == w.stage
        && p.path == w.path
        && p.how.kind() == w.kind
        && match w.kind {
            FileType::Symlink | FileType::CopyIfNotExists => true,
            FileType::Copy | FileType::Secret => p.how.digest() == w.sha256,
        }
}

/// A read of the host that failed while gathering a [`HostView`]: an error only if the
/// plan needs that read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    pub kind: std::io::ErrorKind,
    pub message: String,
}

impl ReadError {
    fn of(e: &anyhow::Error) -> ReadError {
        let kind = e.downcast_ref::<std::io::Error>().map_or(std::io::ErrorKind::Other, std::io::Error::kind);
        ReadError { kind, message: format!("{e:#}") }
    }

    fn error(&self) -> anyhow::Error {
        std::io::Error::new(self.kind, self.message.clone()).into()
    }
}

/// What is at one target, as far as planning needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub state: Result<TargetState, ReadError>,
    /// The content of a regular file (read only where a copy of ours was placed). Where a
    /// secret of ours was placed: the digest of its ciphertext when the target still holds
    /// what that decrypts to, else none (the plaintext is never digested).
    pub digest: Result<Option<Digest>, ReadError>,
}

/// The host as a plan sees it: what is at every target that matters (those placed before
/// and those wanted), which of the wanted targets' ancestor directories exist, and whether
/// units can be managed. Gathered once by [`HostView::gather`]; planning reads nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    pub targets: BTreeMap<TargetPath, Seen>,
    pub dirs: BTreeMap<TargetPath, Result<bool, ReadError>>,
    pub systemctl: bool,
}

impl HostView {
    /// Reads what planning the move from `before` to `desired` needs from the host: the
    /// targets that change (a placement kept as it is reads nothing, so switching
    /// generations reads nothing in proportion to the files a stage keeps). Stages that
    /// conflict read nothing: planning refuses them first.
    pub fn gather(fs: &dyn HostFs, before: &State, desired: &BTreeMap<StageName, StageState>) -> HostView {
        let Ok(wants) = wants(desired) else {
            // Planning refuses these stages before it looks at anything.
            return HostView::default();
        };
        let kept = |t: &TargetPath| before.placed.get(t).zip(wants.get(t)).is_some_and(|(p, w)| keeps(p, w));
        let changing = before.placed.keys().chain(wants.keys()).filter(|t| !kept(t));
        HostView::of_targets(fs, before, changing)
    }

    /// Reads what is at each of `targets` (and, for copies `before` placed, their content)
    /// and which directories above them exist.
    pub fn of_targets<'a>(
        fs: &dyn HostFs,
        before: &State,
        targets: impl IntoIterator<Item = &'a TargetPath>,
    ) -> HostView {
        let mut view = HostView { systemctl: fs.systemctl_available(), ..HostView::default() };
        for target in targets {
            if view.targets.contains_key(target) {
                continue;
            }
            let state = fs.state(target).map_err(|e| ReadError::of(&e));
            let placed = before.placed.get(target);
            let copied = placed.is_some_and(|p| p.how.digest().is_some());
            let digest = match (&state, placed.map(|p| &p.how)) {
                (Ok(TargetState::File), Some(Placement::Secret { sha256 })) => match secret_source(before, target) {
                    Some(from) => fs.secret_at(target, &from).map(|ours| ours.then_some(*sha256)),
                    None => Ok(None),
                }
                .map_err(|e| ReadError::of(&e)),
                (Ok(TargetState::File), _) if copied => fs.file_digest(target).map_err(|e| ReadError::of(&e)),
                _ => Ok(None),
            };
            view.targets.insert(target.clone(), Seen { state, digest });
            for dir in ancestors(target) {
                view.dirs.entry(dir).or_insert_with_key(|d| fs.dir_exists(d).map_err(|e| ReadError::of(&e)));
            }
        }
        view
    }

    /// What is at `target`.
    pub fn state(&self, target: &TargetPath) -> Result<TargetState> {
        match self.targets.get(target).map(|s| &s.state) {
            Some(Ok(s)) => Ok(s.clone()),
            Some(Err(e)) => Err(e.error()),
            None => Err(anyhow::anyhow!("{target} was not looked at before planning")),
        }
    }

    /// The digest of the regular file at `target` (gathered where a copy of ours was).
    pub fn file_digest(&self, target: &TargetPath) -> Result<Option<Digest>> {
        match self.targets.get(target).map(|s| &s.digest) {
            Some(Ok(d)) => Ok(*d),
            Some(Err(e)) => Err(e.error()),
            None => Err(anyhow::anyhow!("{target} was not looked at before planning")),
        }
    }

    /// Whether the directory `dir` exists.
    pub fn dir_exists(&self, dir: &TargetPath) -> Result<bool> {
        match self.dirs.get(dir) {
            Some(Ok(b)) => Ok(*b),
            Some(Err(e)) => Err(e.error()),
            None => Err(anyhow::anyhow!("{dir} was not looked at before planning")),
        }
    }
}

/// The staged ciphertext (relative to the staging area) of the secret `before` placed at
/// `target`: in the active generation of its stage, which holds that very ciphertext (a
/// new ciphertext replaces the placement, see `keeps`).
pub fn secret_source(before: &State, target: &TargetPath) -> Option<String> {
    let p = before.placed.get(target)?;
    let generation = before.stages.get(&p.stage)?.active.generation;
    Some(format!(".generations/{}/{generation}/{}", p.stage, p.path))
}

/// The mode the secret `before` placed at `target` was given.
fn secret_mode(before: &State, target: &TargetPath) -> u32 {
    let active = before.placed.get(target).and_then(|p| before.stages.get(&p.stage));
    active
        .and_then(|s| s.active.activation.files.iter().find(|f| &f.target == target))
        .map_or(formats::manifest::SECRET_MODE.bits(), |f| f.mode)
}

/// The directories above `target`, outermost first.
pub fn ancestors(target: &TargetPath) -> Vec<TargetPath> {
    target.relative().ancestors().filter_map(|a| TargetPath::parse(&format!("/{a}")).ok()).collect()
}

/// The stages with `new` as the active generation of `name`, the one it replaces kept for
/// rollback (at most `keep` previous generations, the oldest dropped first).
pub fn with_generation(
    stages: &BTreeMap<StageName, StageState>,
    name: &StageName,
    new: crate::state::Generation,
    keep: usize,
) -> BTreeMap<StageName, StageState> {
    let mut desired = stages.clone();
    let entry = match desired.remove(name) {
        Some(mut old) => {
            old.previous.push(old.active.clone());
            let excess = old.previous.len().saturating_sub(keep);
            old.previous.drain(..excess);
            StageState { active: new, previous: old.previous }
        }
        None => StageState { active: new, previous: Vec::new() },
    };
    desired.insert(name.clone(), entry);
    desired
}

/// Plans the move from `before` to `desired` stages. `publish` is a new generation
/// (stage, generation, its temp dir name under `.tmp/`) to move into place first.
///
/// ```text
/// disable units going away, unregister plugins going away | publish | unlink/stash ours
/// that go | switch stage links | mkdir, back up what is in the way, link/copy | restore
/// displaced originals | register plugins | enable new units | rmdir directories nothing needs
/// ```
pub fn transition(
    host: &HostView,
    before: &State,
    desired: BTreeMap<StageName, StageState>,
    publish: Option<(StageName, u64, String)>,
) -> Result<Plan> {
    transition_publishing(host, before, desired, publish.into_iter().collect())
}

/// [`transition`] publishing any number of new generations first (a batch deploy: several
/// stages in one transaction).
pub fn transition_publishing(
    host: &HostView,
    before: &State,
    desired: BTreeMap<StageName, StageState>,
    publish: Vec<(StageName, u64, String)>,
) -> Result<Plan> {
    let wants = wants(&desired)?;
    let mut p = Planner::new(host, before);
    p.after.stages = desired.clone();
    for (stage, generation, tmp) in publish {
        p.after.next_generation = p.after.next_generation.max(generation + 1);
        p.steps.push(Step::PublishGeneration { stage, generation, tmp });
    }
    let freed = p.take_away(before, &wants)?;
    let (disable, enable) = p.units(&before.stages, &desired);
    let (unregister, register) = crate::plugins::steps(&before.stages, &desired)?;
    p.steps.splice(0..0, disable.into_iter().chain(unregister));
    p.switch_stage_links(&before.stages, &desired);
    let freed = p.place(&wants, freed)?;
    // Displaced originals whose target nobody wants any more come back.
    for (target, backup) in freed {
        if let Some(b) = backup {
            p.steps.push(Step::Restore { backup: b, target });
        }
    }
    p.steps.extend(register);
    p.steps.extend(enable);
    p.remove_unneeded_dirs();
    Ok(Plan { steps: p.steps, after: p.after, notes: p.notes })
}

/// A plan being made: the steps so far, the state after, the notes, and the counter that
/// names backups and stashed copies (`b<txid>-<n>`, `s<txid>-<n>`: never reused).
struct Planner<'a> {
    host: &'a HostView,
    steps: Vec<Step>,
    notes: Vec<String>,
    after: State,
    n: u64,
}

impl<'a> Planner<'a> {
    fn new(host: &'a HostView, before: &State) -> Planner<'a> {
        let mut after = before.clone();
        after.txid = before.txid + 1;
        after.placed = BTreeMap::new();
        Planner { host, steps: Vec::new(), notes: Vec::new(), after, n: 0 }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}{}-{}", self.after.txid, self.n)
    }

    /// What goes away or changes: removes ours (what the operator changed stays theirs)
    /// and keeps the rest. Returns the freed targets with what each had displaced.
    fn take_away(
        &mut self,
        before: &State,
        wants: &BTreeMap<TargetPath, Want>,
    ) -> Result<BTreeMap<TargetPath, Option<String>>> {
        let mut freed = BTreeMap::new();
        for (target, p) in &before.placed {
            if let Some(w) = wants.get(target)
                && keeps(p, w)
            {
                self.after.placed.insert(target.clone(), p.clone());
                continue;
            }
            let removed = match &p.how {
                Placement::Symlink { link } => match self.host.state(target)? {
                    TargetState::Symlink(t) if &t == link => {
                        self.steps.push(Step::Unlink { target: target.clone(), text: link.clone() });
                        true
                    }
                    TargetState::Missing => true,
                    _ => {
                        self.notes.push(format!("{target} was changed by someone else; left as it is"));
                        false
                    }
                },
                Placement::Copy { sha256 } | Placement::CopyIfNotExists { sha256 } => {
                    match self.host.file_digest(target)? {
                        Some(d) if d == *sha256 => {
                            let stash = self.fresh("s");
                            self.steps.push(Step::Stash { target: target.clone(), stash, sha256: *sha256 });
                            true
                        }
                        None if self.host.state(target)? == TargetState::Missing => true,
                        _ => {
                            self.notes
                                .push(format!("{target} was modified after it was copied; kept as the operator's"));
                            false
                        }
                    }
                }
                // Removed, never stashed: the plaintext stays out of the journal. Undone by
                // decrypting the ciphertext again (its generation outlives the transaction).
                Placement::Secret { sha256 } => match (self.host.file_digest(target)?, secret_source(before, target)) {
                    (Some(d), Some(from)) if d == *sha256 => {
                        let mode = secret_mode(before, target);
                        self.steps.push(Step::Unsecret { target: target.clone(), from, sha256: *sha256, mode });
                        true
                    }
                    (None, _) if self.host.state(target)? == TargetState::Missing => true,
                    _ => {
                        self.notes.push(format!(
                            "{target} no longer holds the secret that was decrypted there; kept as the operator's"
                        ));
                        false
                    }
                },
            };
            if removed {
                freed.insert(target.clone(), p.backup.clone());
            } else if let Some(b) = &p.backup {
                self.notes.push(format!("the original of {target} stays in backups/{b}"));
            }
        }
        Ok(freed)
    }

    /// The units to disable (before the links go) and to enable (after they come).
    fn units(
        &mut self,
        before: &BTreeMap<StageName, StageState>,
        desired: &BTreeMap<StageName, StageState>,
    ) -> (Vec<Step>, Vec<Step>) {
        let units = |stages: &BTreeMap<StageName, StageState>| -> BTreeSet<String> {
            stages.values().flat_map(|s| s.active.activation.services.iter().cloned()).collect()
        };
        let (units_before, units_after) = (units(before), units(desired));
        let new: Vec<String> = units_after.difference(&units_before).cloned().collect();
        if !self.host.systemctl {
            if !new.is_empty() {
                self.notes.push(format!("systemctl not found: enable {} by hand", new.join(" ")));
            }
            return (Vec::new(), Vec::new());
        }
        let disable = units_before.difference(&units_after).map(|u| Step::DisableUnit { unit: u.clone() }).collect();
        (disable, new.into_iter().map(|unit| Step::EnableUnit { unit }).collect())
    }

    fn switch_stage_links(
        &mut self,
        before: &BTreeMap<StageName, StageState>,
        desired: &BTreeMap<StageName, StageState>,
    ) {
        let names: BTreeSet<&StageName> = before.keys().chain(desired.keys()).collect();
        for name in names {
            let from = before.get(name).map(|s| s.active.generation);
            let to = desired.get(name).map(|s| s.active.generation);
            if from != to {
                self.steps.push(Step::SetStageLink { stage: name.clone(), from, to });
            }
        }
    }

    /// What comes: directories, backups of what is in the way, links and copies. Returns
    /// the freed targets nobody takes again.
    fn place(
        &mut self,
        wants: &BTreeMap<TargetPath, Want>,
        mut freed: BTreeMap<TargetPath, Option<String>>,
    ) -> Result<BTreeMap<TargetPath, Option<String>>> {
        let mut planned_dirs = BTreeSet::new();
        for (target, w) in wants {
            if self.after.placed.contains_key(target) {
                continue;
            }
            for dir in ancestors(target) {
                if !planned_dirs.contains(&dir) && !self.host.dir_exists(&dir)? {
                    planned_dirs.insert(dir.clone());
                    self.after.dirs.insert(dir.clone());
                    self.steps.push(Step::MkDir { path: dir });
                }
            }
            let backup = match freed.remove(target) {
                Some(carried) => carried,
                None if self.host.state(target)? == TargetState::Missing => None,
                None if w.kind == FileType::CopyIfNotExists => {
                    self.notes.push(format!("{target} exists; kept (copy-if-not-exists)"));
                    continue;
                }
                None => {
                    let id = self.fresh("b");
                    self.steps.push(Step::Backup { target: target.clone(), backup: id.clone() });
                    Some(id)
                }
            };
            let how = self.put(target, w)?;
            self.after
                .placed
                .insert(target.clone(), Placed { stage: w.stage.clone(), path: w.path.clone(), how, backup });
        }
        Ok(freed)
    }

    /// The step that puts `w` at the free `target`.
    fn put(&mut self, target: &TargetPath, w: &Want) -> Result<Placement> {
        if w.kind == FileType::Symlink {
            let text = link_text(w.stage.as_str(), &w.path);
            self.steps.push(Step::Link { target: target.clone(), text: text.clone() });
            return Ok(Placement::Symlink { link: text });
        }
        let Some(sha256) = w.sha256 else {
            return Err(Malformed(format!(
                "{}: {} is not a staged regular file, so it cannot be copied to {target}",
                w.stage, w.path
            ))
            .into());
        };
        let from = format!(".generations/{}/{}/{}", w.stage, w.generation, w.path);
        if w.kind == FileType::Secret {
            self.steps.push(Step::Secret { target: target.clone(), from, sha256, mode: w.mode });
            return Ok(Placement::Secret { sha256 });
        }
        self.steps.push(Step::Copy { target: target.clone(), from, sha256, mode: w.mode });
        Ok(if w.kind == FileType::CopyIfNotExists {
            Placement::CopyIfNotExists { sha256 }
        } else {
            Placement::Copy { sha256 }
        })
    }

    /// Directories we made that nothing needs any more go, deepest first.
    fn remove_unneeded_dirs(&mut self) {
        let mut dirs: Vec<TargetPath> = self.after.dirs.iter().cloned().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.as_str().len()));
        for d in dirs {
            if !self.after.placed.keys().any(|t| t.is_under(&d)) {
                self.after.dirs.remove(&d);
                self.steps.push(Step::RmDir { path: d });
            }
        }
    }
}

/// Plans putting back the links of `stage` that are missing or wrong (`fix-symlinks`):
/// whatever is in their way is backed up first.
pub fn fix_links(host: &HostView, state: &State, stage: &StageName) -> Result<Plan> {
    let mut steps = Vec::new();
    let mut after = state.clone();
    after.txid += 1;
    let mut n = 0;
    for (target, p) in state.placed.iter().filter(|(_, p)| &p.stage == stage) {
        let Placement::Symlink { link } = &p.how else { continue };
        match host.state(target)? {
            TargetState::Symlink(t) if &t == link => continue,
            TargetState::Missing => {}
            _ => {
                n += 1;
                let backup = format!("b{}-{n}", after.txid);
                steps.push(Step::Backup { target: target.clone(), backup: backup.clone() });
                if let Some(pl) = after.placed.get_mut(target)
                    && pl.backup.is_none()
                {
                    pl.backup = Some(backup);
                }
            }
        }
        for dir in ancestors(target) {
            if !host.dir_exists(&dir)? && !steps.contains(&Step::MkDir { path: dir.clone() }) {
                after.dirs.insert(dir.clone());
                steps.push(Step::MkDir { path: dir });
            }
        }
        steps.push(Step::Link { target: target.clone(), text: link.clone() });
    }
    Ok(Plan { steps, after, notes: Vec::new() })
}

/// Random plans through the planner and the transaction steps on a scratch root: no panic,
/// and the invariants of the host layout hold after every step.
#[cfg(test)]
mod props {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use formats::manifest::{EntryKind, FileType};
    use formats::{Digest, StageName};
    use proptest::prelude::*;

    use super::{HostView, transition};
    use crate::host::Host;
    use crate::hostfs::RealFs;
    use crate::state::{Activation, ActiveFile, Generation, StageState, State};
    use crate::txn::{self, Journal, Staging};

    /// Targets that nest, share parents, sit under several prefixes, and one whose last
    /// component is as long as a name can be.
    fn targets() -> Vec<String> {
        let mut t: Vec<String> = [
            "/opt/a",
            "/opt/a/b",
            "/opt/app/conf",
            "/opt/app/data/x",
            "/usr/local/bin/tool",
            "/usr/local/bin/other",
            "/usr/local/lib",
            "/etc/op-dbus/x.conf",
        ]
        .map(str::to_owned)
        .to_vec();
        t.push(format!("/usr/local/bin/{}", "L".repeat(255)));
        t
    }

    const NAMES: [&str; 3] = ["app", "web", "core.x"];

    #[derive(Debug, Clone)]
    enum Op {
        /// A new generation of a stage: (target, how placed, staged kind, content) per file.
        Deploy {
            stage: usize,
            files: Vec<(usize, u8, u8, u8)>,
            prefix: usize,
        },
        Remove {
            stage: usize,
            prefix: usize,
        },
        Rollback {
            stage: usize,
            prefix: usize,
        },
        /// The operator writes their own file at a target (over whatever file or link is there).
        Operator {
            target: usize,
            content: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let n = targets().len();
        prop_oneof![
            4 => (0..3usize, prop::collection::vec((0..n, 0..3u8, 0..4u8, any::<u8>()), 0..4), any::<usize>())
                .prop_map(|(stage, files, prefix)| Op::Deploy { stage, files, prefix }),
            1 => (0..3usize, any::<usize>()).prop_map(|(stage, prefix)| Op::Remove { stage, prefix }),
            1 => (0..3usize, any::<usize>()).prop_map(|(stage, prefix)| Op::Rollback { stage, prefix }),
            2 => (0..n, any::<u8>()).prop_map(|(target, content)| Op::Operator { target, content }),
        ]
    }

    /// Every file and link under `dir` (directories by name only), skipping the
    /// installer's journal and temp area.
    fn tree(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if rel.ends_with("staging/.tmp") || rel.ends_with("staging/journal") {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let v = if m.is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                tree(&p, base, out);
                "dir".to_owned()
            } else {
                format!("file {}", String::from_utf8_lossy(&fs::read(&p).unwrap()))
            };
            out.insert(rel, v);
        }
    }

    fn snapshot(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        tree(root, root, &mut out);
        out
    }

    /// Whether `target`'s parent is a chain of real directories under `root`.
    fn real_parent(root: &Path, target: &str) -> bool {
        let mut p = root.to_path_buf();
        for c in Path::new(target.trim_start_matches('/')).parent().unwrap().components() {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                _ => return false,
            }
        }
        true
    }

    struct World {
        _tmp: tempfile::TempDir,
        root: std::path::PathBuf,
        outside: std::path::PathBuf,
        host: Host,
        staging: Staging,
        state: State,
        /// What the operator last wrote at each target: it must never be lost.
        operator: BTreeMap<String, String>,
        n: u64,
    }

    impl World {
        fn new(initial: &[usize]) -> World {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            let outside = tmp.path().join("outside");
            fs::create_dir_all(&outside).unwrap();
            fs::create_dir_all(tmp.path().join("saved")).unwrap();
            fs::write(outside.join("secret"), "outside").unwrap();
            fs::create_dir_all(&root).unwrap();
            let host = Host::open(&root).unwrap();
            let staging = Staging { dir: host.staging().unwrap() };
            staging.create_dirs().unwrap();
            let mut w =
                World { _tmp: tmp, root, outside, host, staging, state: State::new(), operator: BTreeMap::new(), n: 0 };
            for &t in initial {
                w.operator_writes(t, 0);
            }
            w
        }

        fn operator_writes(&mut self, t: usize, content: u8) {
            let target = &targets()[t];
            let p = self.root.join(target.trim_start_matches('/'));
            if !real_parent(&self.root, target) {
                // Only where the operator has a directory of their own (never into a generation).
                let parent = p.parent().unwrap();
                if fs::symlink_metadata(parent).is_ok() {
                    return;
                }
                // Create the parents unless something in the way is not a directory.
                if fs::create_dir_all(parent).is_err() || !real_parent(&self.root, target) {
                    return;
                }
            }
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => return,
                Ok(_) => fs::remove_file(&p).unwrap(),
                Err(_) => {}
            }
            self.n += 1;
            let text = format!("operator-{}-{content}", self.n);
            fs::write(&p, &text).unwrap();
            self.operator.insert(target.clone(), text);
        }

        /// Runs the plan to `desired`: a prefix applied then undone must leave the host as
        /// before; then the whole plan applied and committed (or, on an error, undone).
        fn run(
            &mut self,
            desired: BTreeMap<StageName, StageState>,
            publish: Option<(StageName, u64, String)>,
            prefix: usize,
        ) {
            let tmp_dir = publish.as_ref().map(|(_, _, t)| self.staging.tmp().join(t));
            let saved = tmp_dir.as_ref().map(|d| {
                let keep = self.outside.with_file_name("saved").join(format!("g{}", self.n));
                copy_dir(d, &keep);
                keep
            });
            let before = snapshot(&self.root);
            let view = HostView::gather(&RealFs::new(&self.host, &self.staging), &self.state, &desired);
            let plan = match transition(&view, &self.state, desired, publish) {
                Ok(p) => p,
                Err(_) => {
                    // Refused before anything changed.
                    if let Some(d) = &tmp_dir {
                        fs::remove_dir_all(d).unwrap();
                    }
                    if let Some(s) = saved {
                        fs::remove_dir_all(s).unwrap();
                    }
                    assert_eq!(snapshot(&self.root), before);
                    return;
                }
            };
            let journal = Journal::of("prop", self.state.clone(), plan.clone(), Default::default());
            let restore_tmp = |w: &World| {
                if let (Some(d), Some(s)) = (&tmp_dir, &saved)
                    && !d.exists()
                {
                    copy_dir(s, d);
                }
                let _ = w;
            };
            // A prefix, then undo: exactly as before.
            let k = prefix % (journal.steps.len() + 1);
            for step in &journal.steps[..k] {
                if txn::apply(&RealFs::new(&self.host, &self.staging), step).is_err() {
                    break;
                }
            }
            journal.roll_back(&RealFs::new(&self.host, &self.staging)).unwrap();
            assert_eq!(snapshot(&self.root), before, "applying {k} steps of {:?} then undoing them", journal.steps);
            restore_tmp(self);
            // The whole plan.
            let applied = journal.steps.iter().try_for_each(|s| txn::apply(&RealFs::new(&self.host, &self.staging), s));
            if applied.is_err() {
                journal.roll_back(&RealFs::new(&self.host, &self.staging)).unwrap();
                assert_eq!(snapshot(&self.root), before, "undoing the failed {:?}", journal.steps);
                if let Some(d) = &tmp_dir {
                    let _ = fs::remove_dir_all(d);
                }
            } else {
                plan.after.write(&self.staging.state_file()).unwrap();
                self.state = plan.after;
            }
            if let Some(s) = saved {
                fs::remove_dir_all(s).unwrap();
            }
        }

        fn deploy(&mut self, stage: usize, files: &[(usize, u8, u8, u8)], prefix: usize) {
            let name: StageName = NAMES[stage].parse().unwrap();
            let generation = self.state.next_generation;
            let tmp = format!("g{generation}");
            let dir = self.staging.tmp().join(&tmp);
            fs::create_dir_all(&dir).unwrap();
            let mut active = Vec::new();
            for (i, &(t, how, entry, content)) in files.iter().enumerate() {
                let path = format!("f{i}");
                let (entry, sha256) = match entry {
                    0 | 1 => {
                        let text = format!("{name}-{generation}-{i}-{content}");
                        fs::write(dir.join(&path), &text).unwrap();
                        (EntryKind::File, Some(Digest::of(text.as_bytes())))
                    }
                    2 => {
                        fs::create_dir_all(dir.join(&path)).unwrap();
                        (EntryKind::Dir, None)
                    }
                    _ => {
                        symlink("f0", dir.join(&path)).unwrap();
                        (EntryKind::Symlink, None)
                    }
                };
                let kind = [FileType::Symlink, FileType::Copy, FileType::CopyIfNotExists][how as usize];
                active.push(ActiveFile {
                    path: path.parse().unwrap(),
                    target: targets()[t].parse().unwrap(),
                    kind,
                    entry,
                    sha256,
                    mode: 0o644,
                });
            }
            let gen_state = Generation {
                generation,
                digest: Digest::of(format!("{name}{generation}").as_bytes()),
                version: "1.0.0".parse().unwrap(),
                signers: Vec::new(),
                deployed_at: String::new(),
                activation: Activation { files: active, ..Activation::default() },
            };
            let mut desired = self.state.stages.clone();
            let entry = match desired.remove(&name) {
                Some(mut old) => {
                    old.previous.push(old.active.clone());
                    StageState { active: gen_state, previous: old.previous }
                }
                None => StageState { active: gen_state, previous: Vec::new() },
            };
            desired.insert(name.clone(), entry);
            self.run(desired, Some((name, generation, tmp)), prefix);
        }

        /// Invariants after every operation.
        fn check(&self) {
            // Nothing outside the root.
            assert_eq!(fs::read_dir(self.outside.parent().unwrap()).unwrap().count(), 3);
            assert_eq!(fs::read_to_string(self.outside.join("secret")).unwrap(), "outside");
            // No operator file lost: each is at its target or in backups/.
            let all = snapshot(&self.root);
            for (target, text) in &self.operator {
                let want = format!("file {text}");
                assert!(all.values().any(|v| *v == want), "the operator's {target} ({text}) is gone: {all:#?}");
            }
            // Every stage link names its active generation, which exists.
            for (name, s) in &self.state.stages {
                let link = fs::read_link(self.staging.stage_link(name)).unwrap();
                assert_eq!(link, Path::new(&format!(".generations/{name}/{}", s.active.generation)));
                assert!(self.staging.generation(name, s.active.generation).is_dir());
            }
            // Every backup the state names exists.
            for p in self.state.placed.values() {
                if let Some(b) = &p.backup {
                    assert!(self.staging.backup(b).symlink_metadata().is_ok(), "backups/{b} is missing");
                }
            }
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            let dest = to.join(e.file_name());
            if m.is_symlink() {
                symlink(fs::read_link(e.path()).unwrap(), dest).unwrap();
            } else if m.is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn random_plans_keep_the_invariants(
            initial in prop::collection::vec(0..9usize, 0..4),
            ops in prop::collection::vec(op(), 1..12),
        ) {
            let mut w = World::new(&initial);
            for op in &ops {
                match *op {
                    Op::Deploy { stage, ref files, prefix } => w.deploy(stage, files, prefix),
                    Op::Remove { stage, prefix } => {
                        let name: StageName = NAMES[stage].parse().unwrap();
                        let mut desired = w.state.stages.clone();
                        if desired.remove(&name).is_some() {
                            w.run(desired, None, prefix);
                        }
                    }
                    Op::Rollback { stage, prefix } => {
                        let name: StageName = NAMES[stage].parse().unwrap();
                        let mut desired = w.state.stages.clone();
                        if let Some(s) = desired.get_mut(&name)
                            && let Some(prev) = s.previous.pop()
                        {
                            s.active = prev;
                            w.run(desired, None, prefix);
                        }
                    }
                    Op::Operator { target, content } => w.operator_writes(target, content),
                }
                w.check();
            }
            // Everything removed: the operator's files are back where they were.
            w.run(BTreeMap::new(), None, 0);
            w.check();
            // (Unless the operator wrote a file over one of its directories: then it waits
            // in backups/, which `check` saw.)
            for (target, text) in &w.operator {
                let p = w.root.join(target.trim_start_matches('/'));
                let parent_overwritten =
                    p.ancestors().skip(1).take_while(|a| *a != w.root).any(|a| a.symlink_metadata().is_ok_and(|m| !m.is_dir()));
                if parent_overwritten {
                    continue;
                }
                let found = fs::read_to_string(&p).ok();
                prop_assert_eq!(found.as_deref(), Some(text.as_str()), "{}", target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::symlink;

    use formats::manifest::{EntryKind, FileType};
    use formats::{Digest, StageName};

    use super::{HostView, Plan, fix_links, transition, with_generation};
    use crate::host::{Host, link_text};
    use crate::hostfs::RealFs;
    use crate::state::{Activation, ActiveFile, Generation, Placed, Placement, StageState, State};
    use crate::txn::Step;

    fn stage(generation: u64, files: &[(&str, &str, FileType, EntryKind)]) -> StageState {
        StageState {
            active: Generation {
                activation: Activation {
                    files: files
                        .iter()
                        .map(|&(path, target, kind, entry)| ActiveFile {
                            path: path.parse().unwrap(),
                            target: target.parse().unwrap(),
                            kind,
                            entry,
                            sha256: (entry == EntryKind::File).then(|| Digest::of(path.as_bytes())),
                            mode: 0o644,
                        })
                        .collect(),
                    ..Activation::default()
                },
                ..Generation::for_tests(generation)
            },
            previous: Vec::new(),
        }
    }

    fn name(s: &str) -> StageName {
        s.parse().unwrap()
    }

    struct Root {
        _tmp: tempfile::TempDir,
        host: Host,
    }

    impl Root {
        fn new() -> Root {
            let tmp = tempfile::tempdir().unwrap();
            let host = Host::open(tmp.path()).unwrap();
            Root { _tmp: tmp, host }
        }
        fn path(&self, p: &str) -> std::path::PathBuf {
            self.host.root.join(p.trim_start_matches('/'))
        }
        fn file(&self, p: &str, content: &str) {
            fs::create_dir_all(self.path(p).parent().unwrap()).unwrap();
            fs::write(self.path(p), content).unwrap();
        }
    }

    /// `before` with one stage deployed and what it placed.
    fn deployed(stage_state: StageState, placed: &[(&str, Placed)]) -> State {
        let mut s = State::new();
        s.txid = 7;
        s.stages.insert(name("a"), stage_state);
        for (t, p) in placed {
            s.placed.insert(t.parse().unwrap(), p.clone());
        }
        s
    }

    fn placed(how: Placement, path: &str) -> Placed {
        Placed { stage: name("a"), path: path.parse().unwrap(), how, backup: None }
    }

    /// Plans on the host under `root` as it is now.
    fn plan_on(root: &Root, before: &State, desired: BTreeMap<StageName, StageState>) -> anyhow::Result<Plan> {
        let staging = crate::txn::Staging { dir: root.path("/var/lib/op-dbus/staging") };
        let view = HostView::gather(&RealFs::new(&root.host, &staging), before, &desired);
        transition(&view, before, desired, None)
    }

    fn plan_removing_a(root: &Root, before: &State) -> Plan {
        plan_on(root, before, BTreeMap::new()).unwrap()
    }

    #[test]
    fn a_link_the_operator_repointed_is_left_alone() {
        let root = Root::new();
        let text = "/var/lib/op-dbus/staging/a/bin/tool";
        fs::create_dir_all(root.path("/opt")).unwrap();
        symlink("/opt/mine", root.path("/opt/tool")).unwrap();
        let before = deployed(
            stage(1, &[("bin/tool", "/opt/tool", FileType::Symlink, EntryKind::File)]),
            &[("/opt/tool", placed(Placement::Symlink { link: text.into() }, "bin/tool"))],
        );
        let plan = plan_removing_a(&root, &before);
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Unlink { .. })), "{:?}", plan.steps);
        assert!(plan.notes.iter().any(|n| n.contains("/opt/tool") && n.contains("changed by someone else")));
        // Ours, untouched: unlinked.
        fs::remove_file(root.path("/opt/tool")).unwrap();
        symlink(text, root.path("/opt/tool")).unwrap();
        let plan = plan_removing_a(&root, &before);
        assert!(plan.steps.contains(&Step::Unlink { target: "/opt/tool".parse().unwrap(), text: text.into() }));
    }

    #[test]
    fn an_edited_copy_is_kept_and_an_unedited_one_removed() {
        let root = Root::new();
        root.file("/etc/op-dbus/app.conf", "edited by the operator");
        let ours = Digest::of(b"as shipped");
        let before = deployed(
            stage(1, &[("etc/app.conf", "/etc/op-dbus/app.conf", FileType::Copy, EntryKind::File)]),
            &[("/etc/op-dbus/app.conf", placed(Placement::Copy { sha256: ours }, "etc/app.conf"))],
        );
        let plan = plan_removing_a(&root, &before);
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Stash { .. })), "{:?}", plan.steps);
        assert!(plan.notes.iter().any(|n| n.contains("modified after it was copied")));
        root.file("/etc/op-dbus/app.conf", "as shipped");
        let plan = plan_removing_a(&root, &before);
        assert!(plan.steps.iter().any(|s| matches!(s, Step::Stash { sha256, .. } if *sha256 == ours)));
    }

    #[test]
    fn backup_ids_never_repeat() {
        let root = Root::new();
        for t in ["/opt/x", "/opt/y", "/opt/z"] {
            root.file(t, "the operator's");
        }
        let mut before = State::new();
        before.txid = 41;
        let files = [
            ("x", "/opt/x", FileType::Symlink, EntryKind::File),
            ("y", "/opt/y", FileType::Copy, EntryKind::File),
            ("z", "/opt/z", FileType::Symlink, EntryKind::File),
        ];
        let desired = BTreeMap::from([(name("a"), stage(1, &files))]);
        let plan = plan_on(&root, &before, desired.clone()).unwrap();
        let ids = |p: &Plan| -> Vec<String> {
            p.steps
                .iter()
                .filter_map(|s| if let Step::Backup { backup, .. } = s { Some(backup.clone()) } else { None })
                .collect()
        };
        let first = ids(&plan);
        assert_eq!(first.len(), 3);
        let unique: std::collections::BTreeSet<_> = first.iter().collect();
        assert_eq!(unique.len(), 3, "{first:?}");
        // The next transaction (txid + 1) names its backups differently.
        before.txid = 42;
        let second = ids(&plan_on(&root, &before, desired).unwrap());
        assert!(second.iter().all(|b| !first.contains(b)), "{first:?} {second:?}");
    }

    #[test]
    fn a_target_inside_another_stages_directory_link_is_refused() {
        let root = Root::new();
        let desired = BTreeMap::from([
            (name("a"), stage(1, &[("web", "/var/www/site", FileType::Symlink, EntryKind::Dir)])),
            (name("b"), stage(2, &[("index.html", "/var/www/site/index.html", FileType::Symlink, EntryKind::File)])),
        ]);
        let e = plan_on(&root, &State::new(), desired).unwrap_err().to_string();
        assert!(e.contains("lie inside one another"), "{e}");
        // The same target twice.
        let desired = BTreeMap::from([
            (name("a"), stage(1, &[("x", "/opt/x", FileType::Symlink, EntryKind::File)])),
            (name("b"), stage(2, &[("x", "/opt/x", FileType::Symlink, EntryKind::File)])),
        ]);
        let e = plan_on(&root, &State::new(), desired).unwrap_err().to_string();
        assert!(e.contains("wanted by both"), "{e}");
        // A directory copied is refused, not a panic.
        let desired = BTreeMap::from([(name("a"), stage(1, &[("d", "/opt/d", FileType::Copy, EntryKind::Dir)]))]);
        assert!(plan_on(&root, &State::new(), desired).is_err());
    }

    #[test]
    fn copy_if_not_exists_keeps_the_operators_file_and_nothing_is_backed_up() {
        let root = Root::new();
        root.file("/etc/op-dbus/state.json", "operator's config");
        let desired = BTreeMap::from([(
            name("a"),
            stage(1, &[("etc/state.json", "/etc/op-dbus/state.json", FileType::CopyIfNotExists, EntryKind::File)]),
        )]);
        let plan = plan_on(&root, &State::new(), desired).unwrap();
        assert!(plan.steps.iter().all(|s| !matches!(s, Step::Backup { .. } | Step::Copy { .. })), "{:?}", plan.steps);
        assert!(plan.after.placed.is_empty());
        assert!(plan.notes.iter().any(|n| n.contains("copy-if-not-exists")));
    }

    fn target(t: &str) -> formats::path::TargetPath {
        t.parse().unwrap()
    }

    fn steps_at<'p>(plan: &'p Plan, t: &str) -> Vec<&'p Step> {
        let t = target(t);
        plan.steps
            .iter()
            .filter(|s| match s {
                Step::Link { target, .. }
                | Step::Unlink { target, .. }
                | Step::Copy { target, .. }
                | Step::Stash { target, .. }
                | Step::Backup { target, .. }
                | Step::Restore { target, .. } => *target == t,
                _ => false,
            })
            .collect()
    }

    #[test]
    fn an_upgrade_replaces_what_changed_and_leaves_the_rest() {
        use EntryKind::File;
        use FileType::{Copy, Symlink};
        let root = Root::new();
        let old = stage(
            1,
            &[
                ("same", "/opt/same", Symlink, File),
                ("old", "/opt/moved", Symlink, File),
                ("conf", "/opt/conf", Copy, File),
                ("kind", "/opt/kind", Copy, File),
            ],
        );
        // The host as generation 1 left it: our links, our copies (`stage` gives a copy the
        // digest of its path).
        fs::create_dir_all(root.path("/opt")).unwrap();
        let mut placed_before = Vec::new();
        for f in &old.active.activation.files {
            let t = f.target.to_string();
            let how = if f.kind == Symlink {
                let text = link_text("a", &f.path);
                symlink(&text, root.path(&t)).unwrap();
                Placement::Symlink { link: text }
            } else {
                root.file(&t, &f.path.to_string());
                Placement::Copy { sha256: f.sha256.unwrap() }
            };
            placed_before.push((t, placed(how, &f.path.to_string())));
        }
        let placed_refs: Vec<(&str, Placed)> = placed_before.iter().map(|(t, p)| (t.as_str(), p.clone())).collect();
        let before = deployed(old, &placed_refs);

        // Generation 2: one link unchanged, one from another path, a copy with new content,
        // a copy that became a link.
        let mut new = stage(
            2,
            &[
                ("same", "/opt/same", Symlink, File),
                ("new", "/opt/moved", Symlink, File),
                ("conf", "/opt/conf", Copy, File),
                ("kind", "/opt/kind", Symlink, File),
            ],
        );
        let changed = Digest::of(b"conf, version 2");
        new.active.activation.files[2].sha256 = Some(changed);
        let plan = plan_on(&root, &before, BTreeMap::from([(name("a"), new)])).unwrap();

        assert!(steps_at(&plan, "/opt/same").is_empty(), "{:?}", plan.steps);
        assert_eq!(plan.after.placed[&target("/opt/same")], before.placed[&target("/opt/same")]);
        let moved = link_text("a", &"new".parse().unwrap());
        assert!(
            steps_at(&plan, "/opt/moved").contains(&&Step::Link { target: target("/opt/moved"), text: moved }),
            "{:?}",
            plan.steps
        );
        let conf = steps_at(&plan, "/opt/conf");
        assert!(conf.iter().any(|s| matches!(s, Step::Stash { .. })), "{conf:?}");
        assert!(conf.iter().any(|s| matches!(s, Step::Copy { sha256, .. } if *sha256 == changed)), "{conf:?}");
        let kind = steps_at(&plan, "/opt/kind");
        assert!(kind.iter().any(|s| matches!(s, Step::Stash { .. })), "{kind:?}");
        assert!(kind.iter().any(|s| matches!(s, Step::Link { .. })), "{kind:?}");
    }

    #[test]
    fn a_target_handed_to_another_stage_is_relinked_into_it() {
        let root = Root::new();
        let text = link_text("a", &"x".parse().unwrap());
        fs::create_dir_all(root.path("/opt")).unwrap();
        symlink(&text, root.path("/opt/x")).unwrap();
        let before = deployed(
            stage(1, &[("x", "/opt/x", FileType::Symlink, EntryKind::File)]),
            &[("/opt/x", placed(Placement::Symlink { link: text.clone() }, "x"))],
        );
        let desired = BTreeMap::from([(name("b"), stage(2, &[("x", "/opt/x", FileType::Symlink, EntryKind::File)]))]);
        let plan = plan_on(&root, &before, desired).unwrap();
        let steps = steps_at(&plan, "/opt/x");
        assert!(steps.contains(&&Step::Unlink { target: target("/opt/x"), text }), "{steps:?}");
        let theirs = link_text("b", &"x".parse().unwrap());
        assert!(steps.contains(&&Step::Link { target: target("/opt/x"), text: theirs }), "{steps:?}");
        assert_eq!(plan.after.placed[&target("/opt/x")].stage, name("b"));
    }

    #[test]
    fn what_the_operator_deleted_frees_its_target_and_the_original_comes_back() {
        let root = Root::new();
        let text = "/var/lib/op-dbus/staging/a/bin/tool".to_string();
        let conf = Digest::of(b"as shipped");
        let backed_up = |how, path: &str, b: &str| Placed { backup: Some(b.into()), ..placed(how, path) };
        let before = deployed(
            stage(
                1,
                &[
                    ("bin/tool", "/opt/tool", FileType::Symlink, EntryKind::File),
                    ("etc/app.conf", "/etc/app.conf", FileType::Copy, EntryKind::File),
                ],
            ),
            &[
                ("/opt/tool", backed_up(Placement::Symlink { link: text }, "bin/tool", "b3-1")),
                ("/etc/app.conf", backed_up(Placement::Copy { sha256: conf }, "etc/app.conf", "b3-2")),
            ],
        );
        // Both deleted by hand: nothing to take away, and the originals come back.
        let plan = plan_removing_a(&root, &before);
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Unlink { .. } | Step::Stash { .. })), "{:?}", plan.steps);
        assert!(plan.steps.contains(&Step::Restore { backup: "b3-1".into(), target: target("/opt/tool") }));
        assert!(plan.steps.contains(&Step::Restore { backup: "b3-2".into(), target: target("/etc/app.conf") }));
        // The copy replaced by a directory of the operator's: theirs, nothing restored over it.
        fs::create_dir_all(root.path("/etc/app.conf")).unwrap();
        let plan = plan_removing_a(&root, &before);
        assert!(steps_at(&plan, "/etc/app.conf").is_empty(), "{:?}", plan.steps);
        assert!(
            plan.notes.iter().any(|n| n.contains("/etc/app.conf") && n.contains("backups/b3-2")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn only_copies_of_ours_are_read_when_planning() {
        let root = Root::new();
        root.file("/opt/theirs", "the operator's");
        root.file("/opt/ours", "as shipped");
        let before = deployed(
            stage(1, &[("ours", "/opt/ours", FileType::Copy, EntryKind::File)]),
            &[("/opt/ours", placed(Placement::Copy { sha256: Digest::of(b"as shipped") }, "ours"))],
        );
        let staging = crate::txn::Staging { dir: root.path("/var/lib/op-dbus/staging") };
        let (theirs, ours) = (target("/opt/theirs"), target("/opt/ours"));
        let view = HostView::of_targets(&RealFs::new(&root.host, &staging), &before, [&theirs, &ours]);
        assert_eq!(view.targets[&theirs].digest, Ok(None));
        assert_eq!(view.targets[&ours].digest, Ok(Some(Digest::of(b"as shipped"))));
    }

    #[test]
    fn a_new_generation_keeps_the_ones_it_replaces_up_to_the_limit() {
        let generations = |s: &StageState| -> (u64, Vec<u64>) {
            (s.active.generation, s.previous.iter().map(|g| g.generation).collect())
        };
        let mut stages = BTreeMap::from([(name("other"), stage(9, &[]))]);
        for g in 1..=4 {
            stages = with_generation(&stages, &name("a"), stage(g, &[]).active, 2);
        }
        assert_eq!(generations(&stages[&name("a")]), (4, vec![2, 3]));
        assert_eq!(generations(&stages[&name("other")]), (9, vec![]));
        let none = with_generation(&stages, &name("a"), stage(5, &[]).active, 0);
        assert_eq!(generations(&none[&name("a")]), (5, vec![]));
    }

    #[test]
    fn units_are_enabled_and_disabled_only_where_systemctl_is() {
        let mut with_unit = stage(1, &[]);
        with_unit.active.activation.services = vec!["app.service".into()];
        let desired = BTreeMap::from([(name("a"), with_unit.clone())]);
        let mut host = HostView { systemctl: true, ..HostView::default() };
        let plan = transition(&host, &State::new(), desired.clone(), None).unwrap();
        assert!(plan.steps.contains(&Step::EnableUnit { unit: "app.service".into() }), "{:?}", plan.steps);
        let removing = transition(&host, &deployed(with_unit, &[]), BTreeMap::new(), None).unwrap();
        assert!(removing.steps.contains(&Step::DisableUnit { unit: "app.service".into() }), "{:?}", removing.steps);
        host.systemctl = false;
        let plan = transition(&host, &State::new(), desired, None).unwrap();
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::EnableUnit { .. })), "{:?}", plan.steps);
        assert!(plan.notes.iter().any(|n| n.contains("enable app.service by hand")), "{:?}", plan.notes);
    }

    #[test]
    fn fix_symlinks_puts_back_what_is_missing_or_wrong_and_backs_up_what_is_in_the_way() {
        use EntryKind::File;
        use FileType::{Copy, Symlink};
        let root = Root::new();
        let files = [
            ("ok", "/opt/ok", Symlink, File),
            ("gone", "/opt/gone", Symlink, File),
            ("file", "/opt/file", Symlink, File),
            ("other", "/opt/other", Symlink, File),
            ("deep1", "/srv/new/deep1", Symlink, File),
            ("deep2", "/srv/new/deep2", Symlink, File),
            ("conf", "/opt/conf", Copy, File),
        ];
        let text = |p: &str| link_text("a", &p.parse().unwrap());
        let mut placed_list: Vec<(&str, Placed)> = files
            .iter()
            .filter(|f| f.2 == Symlink)
            .map(|&(p, t, ..)| (t, placed(Placement::Symlink { link: text(p) }, p)))
            .collect();
        placed_list.push(("/opt/conf", placed(Placement::Copy { sha256: Digest::of(b"conf") }, "conf")));
        // `other` displaced an original once: that backup stays the one to restore.
        placed_list[3].1.backup = Some("b2-1".into());
        let before = deployed(stage(1, &files), &placed_list);
        fs::create_dir_all(root.path("/opt")).unwrap();
        symlink(text("ok"), root.path("/opt/ok")).unwrap();
        root.file("/opt/file", "put there by hand");
        symlink("/elsewhere", root.path("/opt/other")).unwrap();
        // /opt/conf is missing: a copy, not for fix-symlinks.

        let view = HostView::of_targets(
            &RealFs::new(&root.host, &crate::txn::Staging { dir: root.path("/var/lib/op-dbus/staging") }),
            &before,
            before.placed.keys(),
        );
        let plan = fix_links(&view, &before, &name("a")).unwrap();
        let links: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| if let Step::Link { target, .. } = s { Some(target.to_string()) } else { None })
            .collect();
        assert_eq!(links, ["/opt/file", "/opt/gone", "/opt/other", "/srv/new/deep1", "/srv/new/deep2"]);
        assert_eq!(
            steps_at(&plan, "/opt/file")[0],
            &Step::Backup { target: target("/opt/file"), backup: "b8-1".into() }
        );
        assert_eq!(
            steps_at(&plan, "/opt/other")[0],
            &Step::Backup { target: target("/opt/other"), backup: "b8-2".into() }
        );
        assert!(!steps_at(&plan, "/opt/gone").iter().any(|s| matches!(s, Step::Backup { .. })));
        let mkdirs: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| if let Step::MkDir { path } = s { Some(path.to_string()) } else { None })
            .collect();
        assert_eq!(mkdirs, ["/srv", "/srv/new"]);
        assert_eq!(plan.after.txid, 8);
        assert_eq!(plan.after.placed[&target("/opt/file")].backup.as_deref(), Some("b8-1"));
        assert_eq!(plan.after.placed[&target("/opt/other")].backup.as_deref(), Some("b2-1"));
        // Another stage's links are not this command's.
        assert!(fix_links(&view, &before, &name("b")).unwrap().steps.is_empty());
    }
}
