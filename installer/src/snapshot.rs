//! Named restore points: `snapshots/<name>.json` holds the whole state (every stage's
//! generation, the link table, the backups), so `restore` returns the host to that point.
//! Generations a snapshot names are kept by `gc`; which snapshots stay is
//! [`crate::retention`]'s choice.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::state::State;
use crate::txn::Staging;

/// Writes a snapshot (idempotent: an existing one of that name is left as it is).
#[tracing::instrument(name = "snapshot", skip_all, fields(name))]
pub fn write(staging: &Staging, name: &str, state: &State) -> Result<()> {
    let path = staging.snapshots().join(format!("{name}.json"));
    fs::create_dir_all(staging.snapshots())?;
    // On btrfs a snapshot is also a read-only snapshot of the staging subvolume (state,
    // stage links, backups as they are now).
    let sub = staging.snapshots().join(name);
    if subvol::is_subvolume(&staging.dir).unwrap_or(false) && !sub.exists() {
        subvol::snapshot(&staging.dir, &staging.snapshots(), name, true)
            .with_context(|| format!("taking the btrfs snapshot {}", sub.display()))?;
    }
    if path.exists() {
        tracing::debug!("the snapshot exists already: left as it is");
        return Ok(());
    }
    tracing::info!(path = %path.display(), "writing a snapshot");
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    fsx::write_atomic(&path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// A snapshot name for `kind` (`pre`/`post`) of `stage` now, unique among the existing ones.
pub fn name(staging: &Staging, kind: &str, stage: &str) -> String {
    let now = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let base = format!("{kind}-{stage}-{now}");
    let mut name = base.clone();
    let mut i = 2;
    while staging.snapshots().join(format!("{name}.json")).exists() {
        name = format!("{base}-{i}");
        i += 1;
    }
    name
}

/// One line of `snapshots`.
#[derive(Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub stages: Vec<String>,
    /// Bytes of the generations this snapshot keeps (and of its btrfs snapshot).
    pub bytes: u64,
    /// Bytes of the generations only this snapshot keeps (no other snapshot, no deployed
    /// stage): what pruning it frees.
    pub exclusive_bytes: u64,
    /// Marked to keep (`snapshots keep`, `deploy --keep`): retention never prunes it.
    pub keep: bool,
    /// Whether it is also a read-only btrfs snapshot.
    pub btrfs: bool,
    /// When it was taken (RFC 3339, UTC), from its name.
    pub created: Option<String>,
}

/// The time in a snapshot name (`KIND-STAGE-YYYYMMDDTHHMMSSZ[-N]`) as RFC 3339, with the
/// counter that orders snapshots of the same second.
fn created(name: &str) -> Option<(String, u32)> {
    let words: Vec<&str> = name.split('-').collect();
    let i = words.iter().rposition(|w| w.len() == 16 && w.ends_with('Z') && w.as_bytes().get(8) == Some(&b'T'))?;
    let t = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", words[i]).ok()?;
    let n = words.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(1);
    Some((t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(), n))
}

pub fn read(staging: &Staging, name: &str) -> Result<State> {
    if name.contains('/') || name.starts_with('.') {
        return Err(cli_support::exit::NotFound(format!(
            "{name:?} is not a snapshot name (see `op-dbus-stage snapshots`)"
        ))
        .into());
    }
    let path = staging.snapshots().join(format!("{name}.json"));
    if !path.exists() {
        return Err(cli_support::exit::NotFound(format!(
            "no snapshot {name:?} in {}; list them with `op-dbus-stage snapshots`",
            staging.snapshots().display()
        ))
        .into());
    }
    State::read(&path)
}

pub fn list(staging: &Staging) -> Result<Vec<SnapshotInfo>> {
    let dir = staging.snapshots();
    let all = crate::retention::snapshots(staging)?;
    let live = State::read(&staging.state_file())?.generations();
    let gens: Vec<_> = all.iter().map(|(n, s)| (n.clone(), s.generations())).collect();
    let exclusive = crate::retention::exclusive(&gens, &live, |(s, g)| tree_size(&staging.generation(s, *g)));
    let mut out = Vec::new();
    for (name, state) in all {
        let sub = dir.join(&name);
        let btrfs = subvol::is_subvolume(&sub).unwrap_or(false);
        let bytes = state.generations().iter().map(|(s, g)| tree_size(&staging.generation(s, *g))).sum::<u64>()
            + if btrfs { tree_size(&sub) } else { 0 };
        out.push(SnapshotInfo {
            stages: state.stages.iter().map(|(n, s)| format!("{n}:{}", s.active.version)).collect(),
            bytes,
            exclusive_bytes: exclusive.get(&name).copied().unwrap_or(0),
            keep: crate::retention::is_marked(staging, &name),
            btrfs,
            created: created(&name).map(|(t, _)| t),
            name,
        });
    }
    Ok(out)
}

/// Bytes of the files below `path` (not following links).
pub fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).map(|rd| rd.flatten().map(|e| tree_size(&e.path())).sum()).unwrap_or(0)
}

/// The states of every snapshot (for keeping their generations).
pub fn list_states(staging: &Staging) -> Result<Vec<State>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(staging.snapshots()) else { return Ok(out) };
    for e in entries {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            out.push(State::read(&p)?);
        }
    }
    Ok(out)
}
