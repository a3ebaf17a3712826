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

#[cfg(test)]
impl Generation {
    /// Generation `generation` of version 1.0.0, digest of its number, nothing to activate.
    pub(crate) fn for_tests(generation: u64) -> Generation {
        Generation {
            generation,
            digest: Digest::of(&generation.to_be_bytes()),
            version: "1.0.0".parse().unwrap(),
            signers: Vec::new(),
            deployed_at: String::new(),
            activation: Activation::default(),
        }
    }
}

/// The part of a stage manifest that activation needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub files: Vec<ActiveFile>,
    pub services: Vec<String>,
    pub verify: Vec<VerifySpec>,
    pub dependencies: Vec<Dependency>,
    /// Plugins registered while it is active (absent in states of earlier versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<crate::plugins::PluginReg>,
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
                        // A secret's target: the declared mode, else 0600 (never the
                        // mode the ciphertext was staged with).
                        mode: if f.kind == FileType::Secret { f.secret_mode().bits() } else { e.mode.bits() },
                    }
                })
                .collect(),
            services: config.services.clone(),
            verify: config.verify.clone(),
            dependencies: config.dependencies.clone(),
            plugins: crate::plugins::of(config),
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

/// Something this tool placed at a target. `state.json` keeps it in the flat form of
/// earlier versions (`type`, `link` or `sha256`, `backup`): see `PlacedRecord`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PlacedRecord", into = "PlacedRecord")]
pub struct Placed {
    pub stage: StageName,
    pub path: RelPath,
    /// How it was placed, with what that placement leaves to check.
    pub how: Placement,
    /// What was at the target before (a name under backups/), restored when this goes.
    pub backup: Option<String>,
}

/// How something was placed at a target: the kind decides what is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A symlink with this text.
    Symlink { link: String },
    /// A copy with this content.
    Copy { sha256: Digest },
    /// A copy made where nothing was, with this content.
    CopyIfNotExists { sha256: Digest },
    /// A secret decrypted from the staged age file with this digest (of the ciphertext:
    /// nothing about the plaintext is recorded).
    Secret { sha256: Digest },
}

impl Placement {
    /// The `files:` type it came from.
    pub fn kind(&self) -> FileType {
        match self {
            Placement::Symlink { .. } => FileType::Symlink,
            Placement::Copy { .. } => FileType::Copy,
            Placement::CopyIfNotExists { .. } => FileType::CopyIfNotExists,
            Placement::Secret { .. } => FileType::Secret,
        }
    }

    /// The content written, for copies.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Placement::Symlink { .. } => None,
            Placement::Copy { sha256 } | Placement::CopyIfNotExists { sha256 } | Placement::Secret { sha256 } => {
                Some(*sha256)
            }
        }
    }
}

/// [`Placed`] as `state.json` spells it (the format of every earlier version).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacedRecord {
    stage: StageName,
    path: RelPath,
    #[serde(rename = "type")]
    kind: FileType,
    /// Symlinks: the link text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
    /// Copies: the content we wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<String>,
}

impl TryFrom<PlacedRecord> for Placed {
    type Error = String;

    fn try_from(r: PlacedRecord) -> std::result::Result<Placed, String> {
        let how = match (r.kind, r.link, r.sha256) {
            (FileType::Symlink, Some(link), None) => Placement::Symlink { link },
            (FileType::Copy, None, Some(sha256)) => Placement::Copy { sha256 },
            (FileType::CopyIfNotExists, None, Some(sha256)) => Placement::CopyIfNotExists { sha256 },
            (FileType::Secret, None, Some(sha256)) => Placement::Secret { sha256 },
            (FileType::Symlink, ..) => return Err(format!("the link placed for {} has no `link` alone", r.path)),
            _ => return Err(format!("the copy placed for {} has no `sha256` alone", r.path)),
        };
        Ok(Placed { stage: r.stage, path: r.path, how, backup: r.backup })
    }
}

impl From<Placed> for PlacedRecord {
    fn from(p: Placed) -> PlacedRecord {
        let kind = p.how.kind();
        let (link, sha256) = match p.how {
            Placement::Symlink { link } => (Some(link), None),
            Placement::Copy { sha256 } | Placement::CopyIfNotExists { sha256 } | Placement::Secret { sha256 } => {
                (None, Some(sha256))
            }
        };
        PlacedRecord { stage: p.stage, path: p.path, kind, link, sha256, backup: p.backup }
    }
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
    /// Stages whose generations before the oldest kept one were deleted (`gc`, or beyond
    /// the number a deploy keeps): `rollback` past their oldest kept generation is refused,
    /// since the stage was there before it. A stage not named here, on its first generation,
    /// is removed by `rollback`. Kept up to date by [`State::note_trimmed`].
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub trimmed: BTreeSet<StageName>,
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

    /// Records in `trimmed` the stages of this state (the one after a change from `before`)
    /// that lost generations older than their oldest kept one, and forgets stages no longer
    /// deployed. Generation numbers only grow, so a stage's generations are in age order.
    pub fn note_trimmed(&mut self, before: &State) {
        let oldest = |s: &StageState| s.previous.first().unwrap_or(&s.active).generation;
        for (name, s) in &self.stages {
            if before.stages.get(name).is_some_and(|b| oldest(b) < oldest(s)) {
                self.trimmed.insert(name.clone());
            }
        }
        let stages = &self.stages;
        self.trimmed.retain(|n| stages.contains_key(n));
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
        fsx::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(gens: &[u64]) -> StageState {
        let g = Generation::for_tests;
        let (active, previous) = gens.split_last().unwrap();
        StageState { active: g(*active), previous: previous.iter().map(|n| g(*n)).collect() }
    }

    fn with(stages: &[(&str, &[u64])]) -> State {
        let mut s = State::new();
        s.stages = stages.iter().map(|(n, g)| (n.parse().unwrap(), chain(g))).collect();
        s
    }

    #[test]
    fn stages_that_lose_older_generations_are_noted_and_forgotten_when_gone() {
        let before = with(&[("a", &[1, 2, 3]), ("b", &[4]), ("c", &[5, 6])]);
        // a: a deploy beyond the kept number drops 1; b: upgraded; c: rolled back.
        let mut after = with(&[("a", &[2, 3, 7]), ("b", &[4, 8]), ("c", &[5])]);
        after.note_trimmed(&before);
        assert_eq!(after.trimmed, BTreeSet::from(["a".parse().unwrap()]));
        // gc down to the active one; a removed stage is forgotten.
        let mut gc = with(&[("b", &[8]), ("c", &[5])]);
        gc.trimmed = after.trimmed.clone();
        gc.note_trimmed(&after);
        assert_eq!(gc.trimmed, BTreeSet::from(["b".parse().unwrap()]));
        assert!(gc.to_bytes().windows(7).any(|w| w == b"trimmed"));
        assert!(!State::new().to_bytes().windows(7).any(|w| w == b"trimmed"), "absent when empty");
    }

    /// A `state.json` as the previous version wrote it: a link, a copy and a
    /// copy-if-not-exists, one with a backup.
    const PREVIOUS: &str = r#"{
  "schema_version": 1,
  "txid": 3,
  "next_generation": 2,
  "stages": {},
  "highest": {},
  "placed": {
    "/etc/op-dbus/app.conf": {
      "stage": "app",
      "path": "etc/app.conf",
      "type": "copy",
      "sha256": "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    },
    "/etc/op-dbus/seed.conf": {
      "stage": "app",
      "path": "etc/seed.conf",
      "type": "copy-if-not-exists",
      "sha256": "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    },
    "/usr/local/bin/tool": {
      "stage": "app",
      "path": "bin/tool",
      "type": "symlink",
      "link": "/var/lib/op-dbus/staging/app/bin/tool",
      "backup": "b2-1"
    }
  },
  "dirs": [
    "/etc/op-dbus"
  ]
}"#;

    #[test]
    fn a_state_written_by_the_previous_version_loads_and_is_written_back_the_same() {
        let s: State = serde_json::from_str(PREVIOUS).unwrap();
        let tool = &s.placed[&"/usr/local/bin/tool".parse::<TargetPath>().unwrap()];
        assert_eq!(tool.how, Placement::Symlink { link: "/var/lib/op-dbus/staging/app/bin/tool".into() });
        assert_eq!(tool.backup.as_deref(), Some("b2-1"));
        let seed = &s.placed[&"/etc/op-dbus/seed.conf".parse::<TargetPath>().unwrap()];
        assert_eq!(seed.how.kind(), FileType::CopyIfNotExists);
        assert!(seed.how.digest().is_some());
        assert_eq!(String::from_utf8(s.to_bytes()).unwrap(), PREVIOUS);
    }

    #[test]
    fn a_placement_missing_what_its_kind_needs_is_refused() {
        for bad in [
            r#"{"stage":"app","path":"x","type":"symlink"}"#,
            r#"{"stage":"app","path":"x","type":"copy"}"#,
            r#"{"stage":"app","path":"x","type":"copy","link":"/y","sha256":"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}"#,
        ] {
            assert!(serde_json::from_str::<Placed>(bad).is_err(), "{bad}");
        }
    }
}
