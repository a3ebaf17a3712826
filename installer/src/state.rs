//! `state.json`: what is deployed. Written atomically; the commit point of every transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use formats::manifest::{Dependency, EntryKind, FileType, StageConfig, VerifySpec};
use formats::path::{RelPath, TargetPath};
use formats::{Digest, StageName, Version};

/// One generation of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    pub generation: u64,
    pub digest: Digest,
    pub version: Version,
    pub signers: Vec<keys::KeyId>,
    pub deployed_at: String,
    /// What activating it takes, from its signed manifest: kept here so that switching
    /// generations reads nothing in proportion to the number of staged files.
    pub activation: Activation,
}

/// The part of a stage manifest that activation needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub files: Vec<ActiveFile>,
    pub services: Vec<String>,
    pub verify: Vec<VerifySpec>,
    pub dependencies: Vec<Dependency>,
}

/// One `files:` entry with what the manifest promises about its staged path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveFile {
    pub path: RelPath,
    pub target: TargetPath,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub entry: EntryKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    pub mode: u32,
}

impl Activation {
    /// From a validated stage manifest.
    pub fn of(config: &StageConfig) -> Activation {
        Activation {
            files: config
                .files
                .iter()
                .map(|f| {
                    let e = config.entry(&f.path).expect("validated: every files: path is staged");
                    ActiveFile {
                        path: f.path.clone(),
                        target: f.target.clone(),
                        kind: f.kind,
                        entry: e.kind,
                        sha256: e.sha256,
                        mode: e.mode.bits(),
                    }
                })
                .collect(),
            services: config.services.clone(),
            verify: config.verify.clone(),
            dependencies: config.dependencies.clone(),
        }
    }
}

/// A deployed stage: its active generation and the ones kept for rollback (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageState {
    pub active: Generation,
    #[serde(default)]
    pub previous: Vec<Generation>,
}

/// Something this tool placed at a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placed {
    pub stage: StageName,
    pub path: RelPath,
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Symlinks: the link text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Copies: the content we wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    /// What was at the target before (a name under backups/), restored when this goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

/// The whole deployed state of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub schema_version: u32,
    /// The last committed transaction.
    pub txid: u64,
    /// The next generation number to hand out.
    pub next_generation: u64,
    pub stages: BTreeMap<StageName, StageState>,
    /// The highest version ever installed per stage (downgrade protection).
    pub highest: BTreeMap<StageName, Version>,
    /// The link table: every target we placed something at.
    pub placed: BTreeMap<TargetPath, Placed>,
    /// Directories we created for targets, removed when they are empty again.
    pub dirs: BTreeSet<TargetPath>,
}

/// The largest `state.json` read, and written: a state that would be larger is refused
/// before the transaction that would make it changes anything (its commit could not be read
/// back). The snapshots under `snapshots/` hold states too, read with the same bound.
pub const MAX_STATE: u64 = 64 << 20;
/// The largest state one generation of a stage adds (its [`Activation`]: the `files:`
/// entries with their targets, services, verify commands and dependencies, as JSON). A
/// typical stage adds a few KiB; 2 MiB is some 5,000 linked files with long paths. With
/// [`MAX_STATE`] it leaves room for 32 such generations (a few stages with their kept
/// generations), so that no accepted manifest can make `state.json` unreadable alone.
pub const MAX_STAGE_STATE: usize = 2 << 20;

impl State {
    pub fn new() -> State {
        State { schema_version: 1, next_generation: 1, ..State::default() }
    }

    /// Reads `state.json`; a missing file is an empty state.
    pub fn read(path: &Path) -> Result<State> {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut buf = Vec::new();
        f.take(MAX_STATE).read_to_end(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&buf).with_context(|| {
            format!(
                "{} is corrupt; restore it from a snapshot (snapshots/) or run `op-dbus-stage recover`",
                path.display()
            )
        })
    }

    /// The bytes [`State::write`] writes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("state serializes")
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        if bytes.len() as u64 > MAX_STATE {
            anyhow::bail!(
                "not writing {}: {} bytes, more than the {MAX_STATE} the installer reads back",
                path.display(),
                bytes.len()
            );
        }
        formats::layout::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Every generation some stage references (active or kept).
    pub fn generations(&self) -> BTreeSet<(StageName, u64)> {
        let mut out = BTreeSet::new();
        for (name, s) in &self.stages {
            out.insert((name.clone(), s.active.generation));
            for g in &s.previous {
                out.insert((name.clone(), g.generation));
            }
        }
        out
    }
}
