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
use crate::host::{Host, TargetState, link_text};
use crate::state::{Placed, StageState, State};
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
        && p.kind == w.kind
        && match w.kind {
            FileType::Symlink | FileType::CopyIfNotExists => true,
            FileType::Copy => p.sha256 == w.sha256,
        }
}

/// Plans the move from `before` to `desired` stages. `publish` is a new generation
/// (stage, generation, its temp dir name under `.tmp/`) to move into place first.
pub fn transition(
    host: &Host,
    before: &State,
    desired: BTreeMap<StageName, StageState>,
    publish: Option<(StageName, u64, String)>,
) -> Result<Plan> {
    let txid = before.txid + 1;
    let wants = wants(&desired)?;
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    let mut after = before.clone();
    after.txid = txid;
    after.stages = desired.clone();
    after.placed = BTreeMap::new();
    let mut n = 0;
    let mut fresh = |prefix: &str| {
        n += 1;
        format!("{prefix}{txid}-{n}")
    };

    if let Some((stage, generation, tmp)) = publish {
        after.next_generation = after.next_generation.max(generation + 1);
        steps.push(Step::PublishGeneration { stage, generation, tmp });
    }

    // 1. What goes away or changes: remove ours, give back what it displaced.
    let mut freed: BTreeMap<TargetPath, Option<String>> = BTreeMap::new();
    for (target, p) in &before.placed {
        if let Some(w) = wants.get(target)
            && keeps(p, w)
        {
            after.placed.insert(target.clone(), p.clone());
            continue;
        }
        let removed = match p.kind {
            FileType::Symlink => {
                let text = p.link.clone().unwrap_or_default();
                match host.state(target)? {
                    TargetState::Symlink(t) if t == text => {
                        steps.push(Step::Unlink { target: target.clone(), text });
                        true
                    }
                    TargetState::Missing => true,
                    _ => {
                        notes.push(format!("{target} was changed by someone else; left as it is"));
                        false
                    }
                }
            }
            FileType::Copy | FileType::CopyIfNotExists => {
                let Some(sha) = p.sha256 else {
                    return Err(Malformed(format!("state.json: the copy at {target} has no recorded digest")).into());
                };
                match host.file_digest(target)? {
                    Some(d) if d == sha => {
                        steps.push(Step::Stash { target: target.clone(), stash: fresh("s"), sha256: sha });
                        true
                    }
                    None if host.state(target)? == TargetState::Missing => true,
                    _ => {
                        notes.push(format!("{target} was modified after it was copied; kept as the operator's"));
                        false
                    }
                }
            }
        };
        if removed {
            freed.insert(target.clone(), p.backup.clone());
        } else if let Some(b) = &p.backup {
            notes.push(format!("the original of {target} stays in backups/{b}"));
        }
    }

    // Units of stages that go away or no longer list them are disabled before their links go.
    let units = |stages: &BTreeMap<StageName, StageState>| -> BTreeSet<String> {
        stages.values().flat_map(|s| s.active.activation.services.iter().cloned()).collect()
    };
    let (units_before, units_after) = (units(&before.stages), units(&desired));
    let systemctl = crate::checks::systemctl_path().is_some();
    if !systemctl && units_after.difference(&units_before).next().is_some() {
        notes.push(format!(
            "systemctl not found: enable {} by hand",
            units_after.difference(&units_before).cloned().collect::<Vec<_>>().join(" ")
        ));
    }
    let mut disable: Vec<Step> = Vec::new();
    if systemctl {
        disable = units_before.difference(&units_after).map(|u| Step::DisableUnit { unit: u.clone() }).collect();
    }
    steps.splice(0..0, disable);

    // 2. Stage links.
    let names: BTreeSet<&StageName> = before.stages.keys().chain(desired.keys()).collect();
    for name in names {
        let from = before.stages.get(name).map(|s| s.active.generation);
        let to = desired.get(name).map(|s| s.active.generation);
        if from != to {
            steps.push(Step::SetStageLink { stage: name.clone(), from, to });
        }
    }

    // 3. What comes: directories, backups of what is in the way, links and copies.
    let mut planned_dirs = BTreeSet::new();
    for (target, w) in &wants {
        if after.placed.contains_key(target) {
            continue;
        }
        for a in target.relative().ancestors() {
            let dir = TargetPath::parse(&format!("/{a}")).expect("ancestor of a valid path");
            if !planned_dirs.contains(&dir) && !host.dir_exists(&dir)? {
                planned_dirs.insert(dir.clone());
                after.dirs.insert(dir.clone());
                steps.push(Step::MkDir { path: dir });
            }
        }
        let mut backup = None;
        match freed.remove(target) {
            Some(carried) => backup = carried,
            None => {
                if host.state(target)? != TargetState::Missing {
                    if w.kind == FileType::CopyIfNotExists {
                        notes.push(format!("{target} exists; kept (copy-if-not-exists)"));
                        continue;
                    }
                    let id = fresh("b");
                    steps.push(Step::Backup { target: target.clone(), backup: id.clone() });
                    backup = Some(id);
                }
            }
        }
        let placed = match w.kind {
            FileType::Symlink => {
                let text = link_text(w.stage.as_str(), &w.path);
                steps.push(Step::Link { target: target.clone(), text: text.clone() });
                Placed {
                    stage: w.stage.clone(),
                    path: w.path.clone(),
                    kind: w.kind,
                    link: Some(text),
                    sha256: None,
                    backup,
                }
            }
            FileType::Copy | FileType::CopyIfNotExists => {
                let Some(sha256) = w.sha256 else {
                    return Err(Malformed(format!(
                        "{}: {} is not a staged regular file, so it cannot be copied to {target}",
                        w.stage, w.path
                    ))
                    .into());
                };
                steps.push(Step::Copy {
                    target: target.clone(),
                    from: format!(".generations/{}/{}/{}", w.stage, w.generation, w.path),
                    sha256,
                    mode: w.mode,
                });
                Placed {
                    stage: w.stage.clone(),
                    path: w.path.clone(),
                    kind: w.kind,
                    link: None,
                    sha256: Some(sha256),
                    backup,
                }
            }
        };
        after.placed.insert(target.clone(), placed);
    }
    // Displaced originals whose target nobody wants any more come back.
    for (target, backup) in freed {
        if let Some(b) = backup {
            steps.push(Step::Restore { backup: b, target });
        }
    }

    if systemctl {
        steps.extend(units_after.difference(&units_before).map(|u| Step::EnableUnit { unit: u.clone() }));
    }

    // 4. Directories we made that nothing needs any more, deepest first.
    let mut dirs: Vec<TargetPath> = after.dirs.iter().cloned().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.as_str().len()));
    for d in dirs {
        if !after.placed.keys().any(|t| t.is_under(&d)) {
            after.dirs.remove(&d);
            steps.push(Step::RmDir { path: d });
        }
    }
    Ok(Plan { steps, after, notes })
}
