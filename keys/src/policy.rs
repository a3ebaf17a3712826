//! [`Policy`]: the installer's trust and target policy, `/etc/op-dbus/stage.toml`.
//!
//! The trusted keys themselves are the `*.pub` files in `/etc/op-dbus/trusted-keys/`; this
//! file says what they may do, and where any stage may place files (docs/stage-toml.md). Every
//! setting is optional: an absent or empty file is [`Policy::default`].
//!
//! ```toml
//! # Host prefixes a stage may place files under. Absent: the six below.
//! allowed_prefixes = ["/usr/local", "/opt", "/etc/op-dbus", "/etc/systemd/system",
//!                     "/var/www", "/var/lib/op-dbus"]
//!
//! # Features enabled on this host, for a stage's `requires_feature`. Absent: none.
//! features = ["openflow"]
//!
//! # Revoked key ids (16 hex digits, as `op-dbus-image key show KEY.pub` prints them):
//! # their signatures never count, even while the .pub is still in trusted-keys/.
//! revoked = ["0123456789abcdef"]
//!
//! # Keys limited to some stage names (globs: `*` any run, `?` one character).
//! # A key not listed here may sign any stage.
//! [scopes]
//! "3f9a0c41d2e87b65" = ["stage-1-*", "stage-2-plugins"]
//! "5c2e9b0d7a41f836" = ["web-*"]
//!
//! # Keys whose stages may only place files under some of the allowed prefixes. A target
//! # must be under a prefix of enough signers (as many as the stage's threshold) that
//! # counted for it; a key not listed here narrows nothing. `trust add --scope` leaves
//! # this table alone.
//! [scope_prefixes]
//! "5c2e9b0d7a41f836" = ["/var/www"]
//!
//! # Signatures by distinct trusted keys required per stage glob. A stage no glob
//! # matches needs 1; when several match, the longest glob wins (on a tie, the larger
//! # number).
//! [[threshold]]
//! stages = "stage-*"
//! signatures = 2
//!
//! [[threshold]]
//! stages = "stage-9-lab"
//! signatures = 1
//!
//! # The user verify commands of a stage run as (per stage glob; the longest matching
//! # glob wins, on a tie the one that sorts first): a user name of this host's /etc/passwd
//! # or "UID:GID". Absent or unmatched: "nobody". Only this file chooses: a stage's
//! # manifest cannot ask for a user.
//! [verify_users]
//! "stage-1-*" = "op-dbus"
//! "stage-9-lab" = "1000:1000"
//! ```
//!
//! Parsing is strict ([`Policy::parse`]): an unknown key, a wrong type, a prefix that is not
//! a normalised absolute path, a malformed key id or glob, a threshold outside 1 to
//! [`MAX_THRESHOLD`] is a [`PolicyError`] naming the file, the line and the setting. A typo
//! in a trust policy must not quietly widen it.
//!
//! [`set_scope`] and [`add_revoked`] edit the text for `op-dbus-stage trust add --scope` and
//! `trust revoke`, keeping the operator's comments and layout; they refuse to edit a file
//! that does not parse, and what they return always parses.
//!
//! Some targets are never allowed, whatever the prefixes say ([`RESERVED_TARGETS`]): the
//! trust store, this file and the installer's own state. A stage that could write them
//! could widen its own trust.
//!
//! ```
//! use std::path::Path;
//! use keys::policy::Policy;
//!
//! let text = "features = [\"openflow\"]\n[[threshold]]\nstages = \"stage-*\"\nsignatures = 2\n";
//! let policy = Policy::parse(text, Path::new("/etc/op-dbus/stage.toml"))?;
//! assert!(policy.feature_enabled("openflow"));
//! assert_eq!(policy.threshold(&"stage-1-core-dbus".parse().unwrap()), 2);
//! assert_eq!(policy.threshold(&"other".parse().unwrap()), 1);
//! assert!(policy.target_allowed(&"/usr/local/bin/op-dbus".parse().unwrap()));
//! assert!(!policy.target_allowed(&"/etc/shadow".parse().unwrap()));
//! # Ok::<(), keys::policy::PolicyError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use formats::StageName;
use formats::path::TargetPath;
use serde::Deserialize;
use toml::Spanned;
use toml_edit::{Array, DocumentMut, Item, Key, Value};

use crate::KeyId;

/// Where the installer reads its policy.
pub const DEFAULT_PATH: &str = "/etc/op-dbus/stage.toml";

/// `allowed_prefixes` when the file does not set it.
pub const DEFAULT_ALLOWED_PREFIXES: [&str; 6] =
    ["/usr/local", "/opt", "/etc/op-dbus", "/etc/systemd/system", "/var/www", "/var/lib/op-dbus"];

/// Targets no stage may place anything at or under, whatever `allowed_prefixes` says: the
/// trust store, the policy itself, and the installer's staging area, image store, audit trail
/// and backups.
pub const RESERVED_TARGETS: [&str; 6] = [
    "/etc/op-dbus/trusted-keys",
    DEFAULT_PATH,
    "/var/lib/op-dbus/staging",
    "/var/lib/op-dbus/deployment",
    "/var/lib/op-dbus/history",
    "/var/lib/op-dbus/backups",
];

/// The user verify commands run as when no `[verify_users]` glob matches the stage.
pub const DEFAULT_VERIFY_USER: &str = "nobody";

/// The longest user name `[verify_users]` accepts (that of `useradd`).
pub const MAX_USER_NAME: usize = 32;

/// The largest `signatures` of a `[[threshold]]`.
pub const MAX_THRESHOLD: u32 = 16;
/// The largest `stage.toml` read.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// The longest stage glob, in characters (as long as the longest stage name).
pub const MAX_GLOB: usize = 128;
/// How many of the newest snapshots are kept when `[snapshots] keep` is not set (each
/// change takes one or two, so this covers the last five deploys).
pub const DEFAULT_SNAPSHOT_KEEP: usize = 10;
/// The largest `[snapshots] keep`.
pub const MAX_SNAPSHOT_KEEP: usize = 10_000;
/// How many of the newest backups `backup prune` keeps when `[backups] keep` is not set.
pub const DEFAULT_BACKUP_KEEP: usize = 7;
/// The largest `[backups] keep`.
pub const MAX_BACKUP_KEEP: usize = 10_000;

/// Why a policy file or an edit of it was refused. Each names the file, the line when
/// known, the setting and what to write instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{}: {message}{}; correct the file", at(path, *line), quoted(line_text))]
    Syntax { path: PathBuf, line: Option<usize>, message: String, line_text: Option<String> },

    /// A value of the right type that is not acceptable.
    /// `value` is shown as written in TOML; `reason` follows it ("is not a key id: ...").
    #[error("{}: {field}: {value} {reason}", at(path, *line))]
    Invalid { path: PathBuf, line: Option<usize>, field: String, value: String, reason: String },

    /// An edit could not be made to the file as written.
    #[error("cannot edit {}: {reason}; edit the file by hand", path.display())]
    Edit { path: PathBuf, reason: String },
}

fn at(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

fn quoted(line_text: &Option<String>) -> String {
    line_text.as_ref().map(|l| format!(", in `{l}`")).unwrap_or_default()
}

/// One `[[threshold]]` entry: stages whose name matches `stages` need `signatures`
/// signatures by distinct trusted keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    pub stages: String,
    pub signatures: u32,
}

/// Whom a stage's verify commands run as (`[verify_users]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyUser {
    /// A user name, looked up in the host's `/etc/passwd` when the commands run.
    Name(String),
    /// `"UID:GID"`.
    Ids { uid: u32, gid: u32 },
}

impl std::fmt::Display for VerifyUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyUser::Name(n) => f.write_str(n),
            VerifyUser::Ids { uid, gid } => write!(f, "{uid}:{gid}"),
        }
    }
}

impl std::str::FromStr for VerifyUser {
    type Err = String;

    /// `NAME` (a letter or `_`, then up to 31 letters, digits, `_`, `.` or `-`) or `UID:GID`.
    fn from_str(s: &str) -> Result<VerifyUser, String> {
        const USE: &str = "give a user name of this host (such as nobody) or UID:GID (such as 1000:1000)";
        if let Some((uid, gid)) = s.split_once(':') {
            let id = |x: &str| x.parse::<u32>().ok().filter(|_| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()));
            return match (id(uid), id(gid)) {
                (Some(uid), Some(gid)) => Ok(VerifyUser::Ids { uid, gid }),
                _ => Err(format!("is not UID:GID: {USE}")),
            };
        }
        let ok = s.len() <= MAX_USER_NAME
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            return Err(format!("is not a user name: {USE}"));
        }
        Ok(VerifyUser::Name(s.to_owned()))
    }
}

/// The parsed, validated policy. [`Policy::default`] is what an absent file means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allowed_prefixes: Vec<TargetPath>,
    features: BTreeSet<String>,
    revoked: BTreeSet<KeyId>,
    scopes: BTreeMap<KeyId, Vec<String>>,
    scope_prefixes: BTreeMap<KeyId, Vec<TargetPath>>,
    thresholds: Vec<Threshold>,
    /// `[verify_users]`: stage glob and user, sorted by glob.
    verify_users: Vec<(String, VerifyUser)>,
    /// `[snapshots] keep`: how many of the newest snapshots retention keeps.
    snapshot_keep: usize,
    /// `[backups] keep`: how many of the newest backups `backup prune` keeps.
    backup_keep: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_prefixes: DEFAULT_ALLOWED_PREFIXES
                .iter()
                .map(|p| TargetPath::parse(p).expect("the default prefixes are normalised"))
                .collect(),
            features: BTreeSet::new(),
            revoked: BTreeSet::new(),
            scopes: BTreeMap::new(),
            scope_prefixes: BTreeMap::new(),
            thresholds: Vec::new(),
            verify_users: Vec::new(),
            snapshot_keep: DEFAULT_SNAPSHOT_KEEP,
            backup_keep: DEFAULT_BACKUP_KEEP,
        }
    }
}

/// The file as written; every value keeps its span for messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    allowed_prefixes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    features: Vec<Spanned<String>>,
    #[serde(default)]
    revoked: Vec<Spanned<String>>,
    #[serde(default)]
    scopes: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    scope_prefixes: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    threshold: Vec<RawThreshold>,
    #[serde(default)]
    verify_users: BTreeMap<String, Spanned<String>>,
    snapshots: Option<RawSnapshots>,
    backups: Option<RawSnapshots>,
}

/// `[snapshots]` and `[backups]`: the retention policy of the installer's snapshots and backups.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnapshots {
    keep: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThreshold {
    stages: Spanned<String>,
    signatures: Spanned<i64>,
}

/// Builds [`PolicyError::Invalid`] for values of one file.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.to_owned(),
            line: Some(self.line(span)),
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// The 1-based line of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Policy {
    /// Parses the text of a policy file; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let line_text = line.and_then(|l| text.lines().nth(l - 1)).map(|l| l.trim().to_owned());
            let line_text = line_text.filter(|l| !l.is_empty() && l.len() <= 200);
            PolicyError::Syntax { path: path.to_owned(), line, message: e.message().trim().to_owned(), line_text }
        })?;
        let src = Source { text, path };
        let mut policy = Policy::default();

        if let Some(prefixes) = raw.allowed_prefixes {
            policy.allowed_prefixes.clear();
            for p in prefixes {
                let prefix = TargetPath::parse(p.get_ref()).map_err(|e| {
                    src.invalid(
                        p.span(),
                        "allowed_prefixes",
                        quote(p.get_ref()),
                        format!("is not a prefix: {e}; give a directory such as /opt/op-dbus, without a trailing '/'"),
                    )
                })?;
                if !policy.allowed_prefixes.contains(&prefix) {
                    policy.allowed_prefixes.push(prefix);
                }
            }
        }

        for f in raw.features {
            let ok = !f.get_ref().is_empty()
                && f.get_ref().len() <= 128
                && f.get_ref().bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
            if !ok {
                return Err(src.invalid(
                    f.span(),
                    "features",
                    quote(f.get_ref()),
                    "is not a feature name: use 1 to 128 letters, digits, '.', '_' or '-', as in a stage's `requires_feature`",
                ));
            }
            policy.features.insert(f.into_inner());
        }

        for r in raw.revoked {
            let id = parse_key_id(r.get_ref())
                .map_err(|reason| src.invalid(r.span(), "revoked", quote(r.get_ref()), reason))?;
            policy.revoked.insert(id);
        }

        for (key, globs) in raw.scopes {
            let field = format!("scopes.{key:?}");
            let id = parse_key_id(&key).map_err(|reason| src.invalid(globs.span(), "scopes", quote(&key), reason))?;
            if globs.get_ref().is_empty() {
                return Err(src.invalid(
                    globs.span(),
                    field,
                    "[]",
                    format!(
                        "would let key {id} sign nothing: list the stage globs it may sign, \
                         or revoke it with `op-dbus-stage trust revoke {id}`"
                    ),
                ));
            }
            let mut list = Vec::new();
            for g in globs.get_ref() {
                check_glob(g.get_ref()).map_err(|reason| src.invalid(g.span(), &field, quote(g.get_ref()), reason))?;
                if !list.contains(g.get_ref()) {
                    list.push(g.get_ref().clone());
                }
            }
            if policy.scopes.insert(id, list).is_some() {
                return Err(src.invalid(
                    globs.span(),
                    "scopes",
                    quote(&key),
                    format!("names key {id} again (in another case): keep one entry per key"),
                ));
            }
        }

        for (key, prefixes) in raw.scope_prefixes {
            let field = format!("scope_prefixes.{key:?}");
            let id = parse_key_id(&key)
                .map_err(|reason| src.invalid(prefixes.span(), "scope_prefixes", quote(&key), reason))?;
            if prefixes.get_ref().is_empty() {
                return Err(src.invalid(
                    prefixes.span(),
                    field,
                    "[]",
                    format!(
                        "would let key {id} place nothing: list the prefixes its stages may use, \
                         or revoke it with `op-dbus-stage trust revoke {id}`"
                    ),
                ));
            }
            let mut list: Vec<TargetPath> = Vec::new();
            for p in prefixes.get_ref() {
                let prefix = TargetPath::parse(p.get_ref()).map_err(|e| {
                    src.invalid(
                        p.span(),
                        &field,
                        quote(p.get_ref()),
                        format!("is not a prefix: {e}; give a directory such as /var/www, without a trailing '/'"),
                    )
                })?;
                if !list.contains(&prefix) {
                    list.push(prefix);
                }
            }
            if policy.scope_prefixes.insert(id, list).is_some() {
                return Err(src.invalid(
                    prefixes.span(),
                    "scope_prefixes",
                    quote(&key),
                    format!("names key {id} again (in another case): keep one entry per key"),
                ));
            }
        }

        for (i, t) in raw.threshold.iter().enumerate() {
            let stages = t.stages.get_ref();
            check_glob(stages).map_err(|reason| {
                src.invalid(t.stages.span(), format!("threshold[{i}].stages"), quote(stages), reason)
            })?;
            let n = *t.signatures.get_ref();
            let signatures = u32::try_from(n).ok().filter(|n| (1..=MAX_THRESHOLD).contains(n)).ok_or_else(|| {
                src.invalid(
                    t.signatures.span(),
                    format!("threshold[{i}].signatures"),
                    n.to_string(),
                    format!("is out of range: give a number of signatures from 1 to {MAX_THRESHOLD}"),
                )
            })?;
            if policy.thresholds.iter().any(|o| o.stages == *stages) {
                return Err(src.invalid(
                    t.stages.span(),
                    format!("threshold[{i}].stages"),
                    quote(stages),
                    "is the `stages` of an earlier [[threshold]] too: keep one",
                ));
            }
            policy.thresholds.push(Threshold { stages: stages.clone(), signatures });
        }

        for (glob, user) in raw.verify_users {
            let field = format!("verify_users.{glob:?}");
            check_glob(&glob).map_err(|reason| src.invalid(user.span(), "verify_users", quote(&glob), reason))?;
            let parsed = user
                .get_ref()
                .parse()
                .map_err(|reason| src.invalid(user.span(), &field, quote(user.get_ref()), reason))?;
            policy.verify_users.push((glob, parsed));
        }

        if let Some(keep) = raw.snapshots.and_then(|s| s.keep) {
            let n = *keep.get_ref();
            policy.snapshot_keep = usize::try_from(n).ok().filter(|n| *n <= MAX_SNAPSHOT_KEEP).ok_or_else(|| {
                src.invalid(
                    keep.span(),
                    "snapshots.keep",
                    n.to_string(),
                    format!("is out of range: give a number of snapshots from 0 to {MAX_SNAPSHOT_KEEP}"),
                )
            })?;
        }

        if let Some(keep) = raw.backups.and_then(|s| s.keep) {
            let n = *keep.get_ref();
            policy.backup_keep = usize::try_from(n).ok().filter(|n| *n <= MAX_BACKUP_KEEP).ok_or_else(|| {
                src.invalid(
                    keep.span(),
                    "backups.keep",
                    n.to_string(),
                    format!("is out of range: give a number of backups from 0 to {MAX_BACKUP_KEEP}"),
                )
            })?;
        }

        Ok(policy)
    }

    /// The host prefixes stages may place files under.
    pub fn allowed_prefixes(&self) -> &[TargetPath] {
        &self.allowed_prefixes
    }

    /// Whether a stage may place a file at `target`: strictly below one of the allowed
    /// prefixes (a stage may not replace `/opt` itself), and not at or under one of the
    /// [`RESERVED_TARGETS`].
    pub fn target_allowed(&self, target: &TargetPath) -> bool {
        !is_reserved(target) && self.allowed_prefixes.iter().any(|p| target != p && target.is_under(p))
    }

    /// How many of the newest snapshots the installer keeps (`[snapshots] keep`); the
    /// pre-snapshot of the running set and snapshots marked to keep are kept besides.
    pub fn snapshot_keep(&self) -> usize {
        self.snapshot_keep
    }

    /// How many of the newest backups `backup prune` keeps (`[backups] keep`).
    pub fn backup_keep(&self) -> usize {
        self.backup_keep
    }

    /// Whether `feature` is enabled on this host.
    pub fn feature_enabled(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }

    /// The features enabled on this host, sorted (`feature list`).
    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(String::as_str)
    }

    pub fn is_revoked(&self, key: &KeyId) -> bool {
        self.revoked.contains(key)
    }

    /// The stage globs `key` is limited to; `None` when it may sign any stage.
    pub fn scope(&self, key: &KeyId) -> Option<&[String]> {
        self.scopes.get(key).map(Vec::as_slice)
    }

    /// Whether `key`'s scope lets it sign stage `name`.
    pub fn in_scope(&self, key: &KeyId, name: &StageName) -> bool {
        self.scope(key).is_none_or(|globs| globs.iter().any(|g| glob_match(g, name.as_str())))
    }

    /// The prefixes `key`'s stages are limited to (`[scope_prefixes]`); `None` when its
    /// scope does not narrow them.
    pub fn scope_prefixes(&self, key: &KeyId) -> Option<&[TargetPath]> {
        self.scope_prefixes.get(key).map(Vec::as_slice)
    }

    /// Whether `key`'s scope lets it vouch for a file at `target`: strictly below one of its
    /// `[scope_prefixes]`, or anywhere when it has none. The host's own
    /// [`target_allowed`](Self::target_allowed) applies as well.
    pub fn key_may_place(&self, key: &KeyId, target: &TargetPath) -> bool {
        self.scope_prefixes(key).is_none_or(|ps| ps.iter().any(|p| target != p && target.is_under(p)))
    }

    /// How many signatures by distinct trusted keys stage `name` needs: that of the longest
    /// matching `[[threshold]]` glob (on a tie, the larger number), else 1.
    pub fn threshold(&self, name: &StageName) -> u32 {
        self.thresholds
            .iter()
            .filter(|t| glob_match(&t.stages, name.as_str()))
            .max_by_key(|t| (t.stages.chars().count(), t.signatures))
            .map_or(1, |t| t.signatures)
    }
}

impl Policy {
    /// The user the verify commands of stage `name` run as: that of the longest matching
    /// `[verify_users]` glob (on a tie, the glob that sorts first), else
    /// [`DEFAULT_VERIFY_USER`].
    pub fn verify_user(&self, name: &StageName) -> VerifyUser {
        self.verify_users
            .iter()
            .filter(|(g, _)| glob_match(g, name.as_str()))
            .min_by_key(|(g, _)| (std::cmp::Reverse(g.chars().count()), g.as_str()))
            .map_or_else(|| VerifyUser::Name(DEFAULT_VERIFY_USER.to_owned()), |(_, u)| u.clone())
    }
}

/// Whether `target` is at or under one of the [`RESERVED_TARGETS`].
pub fn is_reserved(target: &TargetPath) -> bool {
    RESERVED_TARGETS.iter().any(|r| target.is_under(&TargetPath::parse(r).expect("reserved targets are normalised")))
}

/// A string value as TOML shows it, for messages.
fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn parse_key_id(s: &str) -> Result<KeyId, String> {
    s.parse()
        .map_err(|_| "is not a key id: expected 16 hex digits, as `op-dbus-image key show KEY.pub` prints".to_owned())
}

/// Checks a stage glob: 1 to [`MAX_GLOB`] characters of stage names (letters, digits,
/// `.`, `_`, `-`) and the wildcards `*` and `?`. The error follows the glob in a message.
fn check_glob(glob: &str) -> Result<(), String> {
    const USE: &str = "use letters, digits, '.', '_', '-' and the wildcards '*' (any run) and '?' (one character)";
    if glob.is_empty() {
        return Err("is not a stage glob: give a stage name or a pattern such as stage-1-*".into());
    }
    if glob.chars().count() > MAX_GLOB {
        return Err(format!("is longer than a stage glob may be ({MAX_GLOB} characters)"));
    }
    if let Some(c) = glob.chars().find(|&c| !(c.is_ascii_alphanumeric() || "._-*?".contains(c))) {
        return Err(format!("is not a stage glob: {c:?} cannot appear in one; {USE}"));
    }
    Ok(())
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (also none)
/// and `?` exactly one; every other character matches itself (case-sensitive).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // After a `*`: where the pattern resumes, and the next name position the `*` may grow to.
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                pi += 1;
                backtrack = Some((pi, ni + 1));
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match backtrack {
                Some((resume, next)) => {
                    pi = resume;
                    ni = next;
                    backtrack = Some((resume, next + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Returns the policy text `text` (of file `path`; empty when the file does not exist) with
/// key `key` limited to the stage globs `scopes`, or with its limit removed (it may then
/// sign any stage) when `scopes` is empty. Comments and layout are kept; an existing entry
/// for the key is replaced in place.
pub fn set_scope(text: &str, path: &Path, key: &KeyId, scopes: &[String]) -> Result<String, PolicyError> {
    Policy::parse(text, path)?;
    let mut wanted: Vec<String> = Vec::new();
    for g in scopes {
        check_glob(g).map_err(|reason| PolicyError::Invalid {
            path: path.to_owned(),
            line: None,
            field: format!("scope of key {key}"),
            value: quote(g),
            reason,
        })?;
        if !wanted.contains(g) {
            wanted.push(g.clone());
        }
    }
    let globs = Array::from_iter(&wanted);
    let mut doc = edit_document(text, path)?;
    let not_table = || PolicyError::Edit { path: path.to_owned(), reason: "`scopes` is not a table".into() };
    if globs.is_empty() {
        if let Some(table) = doc.get_mut("scopes") {
            let table = table.as_table_like_mut().ok_or_else(not_table)?;
            for name in entries_of(table, key) {
                table.remove(&name);
            }
        }
    } else {
        let table = doc.entry("scopes").or_insert_with(toml_edit::table);
        let table = table.as_table_like_mut().ok_or_else(not_table)?;
        let mut value = Value::Array(globs);
        match entries_of(table, key).first().and_then(|name| table.get_mut(name)) {
            Some(item) => {
                // Keep a trailing comment on the line.
                if let Some(old) = item.as_value() {
                    *value.decor_mut() = old.decor().clone();
                }
                *item = Item::Value(value);
            }
            None => {
                let name = Key::parse(&format!("\"{key}\""))
                    .ok()
                    .and_then(|mut k| k.pop())
                    .unwrap_or_else(|| Key::new(key.to_string()));
                table.entry_format(&name).or_insert(Item::Value(value));
            }
        }
    }
    finish_edit(doc, path, |p| p.scope(key).unwrap_or_default() == wanted.as_slice())
}

/// Returns the policy text `text` (of file `path`; empty when the file does not exist) with
/// `key` added to `revoked`. Comments and layout are kept; a key already revoked leaves the
/// text unchanged.
pub fn add_revoked(text: &str, path: &Path, key: &KeyId) -> Result<String, PolicyError> {
    if Policy::parse(text, path)?.is_revoked(key) {
        return Ok(text.to_owned());
    }
    let mut doc = edit_document(text, path)?;
    let id = key.to_string();
    match doc.get_mut("revoked") {
        None => {
            doc.insert("revoked", toml_edit::value(Array::from_iter([id.as_str()])));
        }
        Some(item) => {
            let array = item.as_array_mut().ok_or_else(|| PolicyError::Edit {
                path: path.to_owned(),
                reason: "`revoked` is not an array".into(),
            })?;
            push_like_last(array, &id);
        }
    }
    finish_edit(doc, path, |p| p.is_revoked(key))
}

/// Returns the policy text `text` (of file `path`) with `feature` added to `features`
/// (`enabled`) or taken out of it. Comments and layout are kept; a new `features` key
/// goes among the top-level keys, above every table, so that the file keeps its meaning.
pub fn set_feature(text: &str, path: &Path, feature: &str, enabled: bool) -> Result<String, PolicyError> {
    let policy = Policy::parse(text, path)?;
    if policy.feature_enabled(feature) == enabled {
        return Ok(text.to_owned());
    }
    let mut doc = edit_document(text, path)?;
    let not_array = || PolicyError::Edit { path: path.to_owned(), reason: "`features` is not an array".into() };
    match doc.get_mut("features") {
        None if enabled => {
            // A key of the root table is written before the tables whatever its position.
            doc.insert("features", toml_edit::value(Array::from_iter([feature])));
        }
        None => {}
        Some(item) => {
            let array = item.as_array_mut().ok_or_else(not_array)?;
            if enabled {
                push_like_last(array, feature);
            } else {
                array.retain(|v| v.as_str() != Some(feature));
            }
        }
    }
    finish_edit(doc, path, |p| p.feature_enabled(feature) == enabled)
}

/// Appends `s` to `array` in the layout of its last element, so a one-per-line list stays
/// one per line and a comment after the last element stays on its line.
fn push_like_last(array: &mut Array, s: &str) {
    let mut value = Value::from(s);
    if let Some(last) = array.iter().last() {
        let last_prefix = last.decor().prefix().and_then(|p| p.as_str()).unwrap_or_default().to_owned();
        let mut trailing = array.trailing().as_str().unwrap_or_default().to_owned();
        if !array.trailing_comma() {
            // `"a"\n]`: the line break is the last element's suffix; it now follows the comma.
            let last = array.get_mut(array.len() - 1).expect("the array has a last element");
            let suffix = last.decor().suffix().and_then(|s| s.as_str()).unwrap_or_default().to_owned();
            last.decor_mut().set_suffix("");
            trailing.insert_str(0, &suffix);
        }
        match trailing.find('\n') {
            // One element per line: the new one goes on the line after the last element and
            // its comment, with the same indentation.
            Some(nl) if last_prefix.contains('\n') || array.len() == 1 => {
                let indent = last_prefix.rsplit('\n').next().unwrap_or_default();
                value.decor_mut().set_prefix(format!("{}{indent}", &trailing[..=nl]));
                array.set_trailing(format!("\n{}", &trailing[nl + 1..]));
            }
            _ => {
                value.decor_mut().set_prefix(" ");
                // What followed the last element (say, the line break before `]`) now
                // follows the new one.
                array.set_trailing(trailing);
            }
        }
        value.decor_mut().set_suffix("");
    }
    array.push_formatted(value);
}

/// The keys of `table` naming `key` (in any case).
fn entries_of(table: &dyn toml_edit::TableLike, key: &KeyId) -> Vec<String> {
    table.iter().filter(|(name, _)| name.parse::<KeyId>().ok() == Some(*key)).map(|(name, _)| name.to_owned()).collect()
}

fn edit_document(text: &str, path: &Path) -> Result<DocumentMut, PolicyError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| PolicyError::Edit { path: path.to_owned(), reason: e.message().to_owned() })
}

/// The edited text, checked to parse and to say what was asked.
fn finish_edit(doc: DocumentMut, path: &Path, done: impl Fn(&Policy) -> bool) -> Result<String, PolicyError> {
    let out = doc.to_string();
    let policy = Policy::parse(&out, path)?;
    if !done(&policy) {
        return Err(PolicyError::Edit { path: path.to_owned(), reason: "the edit did not take effect".into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/etc/op-dbus/stage.toml";

    const EXAMPLE: &str = r#"# which host prefixes a stage may place files under (default below when absent)
allowed_prefixes = ["/usr/local", "/opt", "/etc/op-dbus", "/etc/systemd/system", "/var/www", "/var/lib/op-dbus"]
# features enabled on this host, for a stage's `requires_feature`
features = ["openflow"]
# revoked key ids (16 hex digits)
revoked = ["0123456789abcdef"]
# keys limited to some stage names (glob: * and ?); a key not listed may sign any stage
[scopes]
"3f9a0c41d2e87b65" = ["stage-1-*", "stage-2-plugins"]
# signatures required per stage glob (default 1); the most specific (longest) matching glob wins
[[threshold]]
stages = "stage-*"
signatures = 2
"#;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new(P))
    }

    #[test]
    fn set_feature_keeps_top_level_keys_above_tables() {
        let text = "[scopes]\n\"3f9a0c41d2e87b65\" = [\"app*\"]\n";
        let on = set_feature(text, Path::new(P), "openflow", true).unwrap();
        assert!(on.find("features").unwrap() < on.find("[scopes]").unwrap(), "{on}");
        assert!(parse(&on).unwrap().feature_enabled("openflow"));
        assert_eq!(parse(&on).unwrap().scope(&id("3f9a0c41d2e87b65")).unwrap(), ["app*"]);
        let two = set_feature(&on, Path::new(P), "lab", true).unwrap();
        assert_eq!(parse(&two).unwrap().features().collect::<Vec<_>>(), ["lab", "openflow"]);
        let off = set_feature(&two, Path::new(P), "openflow", false).unwrap();
        assert_eq!(parse(&off).unwrap().features().collect::<Vec<_>>(), ["lab"]);
        assert_eq!(set_feature(&off, Path::new(P), "openflow", false).unwrap(), off, "nothing to do");
        assert!(set_feature(text, Path::new(P), "bad name", true).is_err());
    }

    #[test]
    fn snapshot_retention_is_read_and_bounded() {
        assert_eq!(parse("").unwrap().snapshot_keep(), DEFAULT_SNAPSHOT_KEEP);
        assert_eq!(parse("[snapshots]\nkeep = 3\n").unwrap().snapshot_keep(), 3);
        assert_eq!(parse("[snapshots]\n").unwrap().snapshot_keep(), DEFAULT_SNAPSHOT_KEEP);
        assert_eq!(parse("").unwrap().backup_keep(), DEFAULT_BACKUP_KEEP);
        assert_eq!(parse("[backups]\nkeep = 2\n").unwrap().backup_keep(), 2);
        for bad in ["[backups]\nkeep = -1\n", "[backups]\nkeep = 10001\n", "[backups]\nkept = 3\n"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("keep") && e.contains(":2"), "{bad}: {e}");
        }
        for bad in ["[snapshots]\nkeep = -1\n", "[snapshots]\nkeep = 10001\n", "[snapshots]\nkept = 3\n"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("keep") && e.contains(":2"), "{bad}: {e}");
        }
    }

    fn id(s: &str) -> KeyId {
        s.parse().unwrap()
    }

    fn name(s: &str) -> StageName {
        s.parse().unwrap()
    }

    fn target(s: &str) -> TargetPath {
        s.parse().unwrap()
    }

    #[test]
    fn glob_match_cases() {
        for (p, n) in [
            ("stage-1-*", "stage-1-core-dbus"),
            ("stage-1-*", "stage-1-"),
            ("*", ""),
            ("*", "anything"),
            ("stage-?-core", "stage-1-core"),
            ("*-dbus", "stage-1-core-dbus"),
            ("s*e*s", "stages"),
            ("a*b*c", "aXbYbZc"),
            ("**", "x"),
            ("exact", "exact"),
            ("?", "é"),
            ("*a*a*a*", "aaa"),
        ] {
            assert!(glob_match(p, n), "{p} should match {n}");
        }
        for (p, n) in [
            ("stage-1-*", "stage-2-x"),
            ("stage-?-core", "stage-10-core"),
            ("?", ""),
            ("exact", "exactly"),
            ("exact", "Exact"),
            ("a*b", "aXbY"),
            ("", "x"),
            ("*a*a*a*", "aa"),
        ] {
            assert!(!glob_match(p, n), "{p} should not match {n}");
        }
    }

    #[test]
    fn defaults() {
        let p = Policy::default();
        let prefixes: Vec<_> = p.allowed_prefixes().iter().map(TargetPath::as_str).collect();
        assert_eq!(prefixes, DEFAULT_ALLOWED_PREFIXES);
        assert_eq!(parse("").unwrap(), p);
        assert_eq!(parse("# nothing set\n").unwrap(), p);
        assert!(!p.feature_enabled("openflow"));
        assert!(!p.is_revoked(&id("0123456789abcdef")));
        assert_eq!(p.scope(&id("0123456789abcdef")), None);
        assert_eq!(p.threshold(&name("stage-1-core-dbus")), 1);
    }

    #[test]
    fn example_parses() {
        let p = parse(EXAMPLE).unwrap();
        assert_eq!(p.allowed_prefixes().len(), 6);
        assert!(p.feature_enabled("openflow"));
        assert!(!p.feature_enabled("other"));
        assert!(p.is_revoked(&id("0123456789abcdef")));
        assert!(p.is_revoked(&id("0123456789ABCDEF")));
        let key = id("3f9a0c41d2e87b65");
        assert_eq!(p.scope(&key).unwrap(), ["stage-1-*", "stage-2-plugins"]);
        assert!(p.in_scope(&key, &name("stage-1-core-dbus")));
        assert!(!p.in_scope(&key, &name("stage-3-openflow")));
        assert!(p.in_scope(&id("0123456789abcdef"), &name("stage-3-openflow")));
        assert_eq!(p.threshold(&name("stage-1-core-dbus")), 2);
        assert_eq!(p.threshold(&name("PROXMOX-DBUS_STAGE")), 1);
    }

    #[test]
    fn the_module_doc_example_parses() {
        let doc = include_str!("policy.rs")
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| l.strip_prefix("//!").unwrap().strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(doc.contains("[[threshold]]"));
        let p = parse(&doc).unwrap();
        assert_eq!(p.threshold(&name("stage-9-lab")), 1);
        assert_eq!(p.threshold(&name("stage-1-core-dbus")), 2);
    }

    #[test]
    fn scope_prefixes() {
        let (web, other) = (id("5c2e9b0d7a41f836"), id("0123456789abcdef"));
        let p = parse("[scope_prefixes]\n\"5C2E9B0D7A41F836\" = [\"/var/www\", \"/opt/web\", \"/var/www\"]\n").unwrap();
        assert_eq!(p.scope_prefixes(&web).unwrap(), [target("/var/www"), target("/opt/web")]);
        assert_eq!(p.scope_prefixes(&other), None);
        assert!(p.key_may_place(&web, &target("/var/www/site/index.html")));
        assert!(p.key_may_place(&web, &target("/opt/web/x")));
        assert!(!p.key_may_place(&web, &target("/var/www")), "a prefix itself is not a target");
        assert!(!p.key_may_place(&web, &target("/var/wwwx/a")));
        assert!(!p.key_may_place(&web, &target("/usr/local/bin/tool")));
        assert!(p.key_may_place(&other, &target("/usr/local/bin/tool")));
        refused("[scope_prefixes]\n\"5c2e9b0d7a41f836\" = []\n", &[":2:", "place nothing", "trust revoke"]);
        refused("[scope_prefixes]\n\"5c2e9b0d7a41f836\" = [\"var/www\"]\n", &[":2:", "is not a prefix"]);
        refused("[scope_prefixes]\n\"5c2e9b0d7a41f836\" = [\"/var/www/\"]\n", &[":2:", "not normalised"]);
        refused("[scope_prefixes]\nweb = [\"/var/www\"]\n", &[":2:", "is not a key id"]);
        refused(
            "[scope_prefixes]\n\"5c2e9b0d7a41f836\" = [\"/a\"]\n\"5C2E9B0D7A41F836\" = [\"/b\"]\n",
            &["again", "one entry per key"],
        );
        // trust add --scope edits the stage globs only.
        let text = "[scope_prefixes]\n\"5c2e9b0d7a41f836\" = [\"/var/www\"]\n";
        let out = set_scope(text, Path::new(P), &web, &["web-*".into()]).unwrap();
        let p = parse(&out).unwrap();
        assert_eq!(p.scope(&web).unwrap(), ["web-*"]);
        assert_eq!(p.scope_prefixes(&web).unwrap(), [target("/var/www")]);
    }

    #[test]
    fn verify_users() {
        let p = Policy::default();
        assert_eq!(p.verify_user(&name("x")), VerifyUser::Name("nobody".into()));
        let p = parse(
            "[verify_users]\n\"stage-*\" = \"op-dbus\"\n\"stage-1-*\" = \"1000:1001\"\n\"stage-2-?\" = \"a\"\n\"stage-?-x\" = \"b\"\n",
        )
        .unwrap();
        assert_eq!(p.verify_user(&name("stage-1-core")), VerifyUser::Ids { uid: 1000, gid: 1001 });
        assert_eq!(p.verify_user(&name("stage-3-core")), VerifyUser::Name("op-dbus".into()));
        assert_eq!(p.verify_user(&name("stage-2-x")), VerifyUser::Name("a".into()), "a tie: the glob sorting first");
        assert_eq!(p.verify_user(&name("other")), VerifyUser::Name("nobody".into()));
        refused("[verify_users]\n\"a b\" = \"nobody\"\n", &[":2:", "verify_users", "\"a b\""]);
        // Digits only: Rust's integer parser would also take a sign.
        for bad in [
            "",
            "1:",
            ":1",
            "-1:0",
            "+1:0",
            "1:+0",
            "1:2:3",
            "4294967296:0",
            "0user",
            "us er",
            "root;",
            &"a".repeat(33),
        ] {
            refused(&format!("[verify_users]\n\"*\" = \"{bad}\"\n"), &[":2:", "verify_users.\"*\"", "UID:GID"]);
        }
        refused("[verify_users]\n\"*\" = 0\n", &[":2:"]);
        assert_eq!(parse("[verify_users]\n\"*\" = \"0:0\"\n").unwrap().verify_user(&name("x")).to_string(), "0:0");
    }

    #[test]
    fn most_specific_threshold_wins() {
        let p = parse(
            "[[threshold]]\nstages = \"*\"\nsignatures = 3\n\
             [[threshold]]\nstages = \"stage-1-*\"\nsignatures = 1\n\
             [[threshold]]\nstages = \"stage-1-core-dbus\"\nsignatures = 2\n\
             [[threshold]]\nstages = \"stage-2-?\"\nsignatures = 4\n\
             [[threshold]]\nstages = \"stage-?-a\"\nsignatures = 5\n",
        )
        .unwrap();
        assert_eq!(p.threshold(&name("stage-1-core-dbus")), 2);
        assert_eq!(p.threshold(&name("stage-1-other")), 1);
        assert_eq!(p.threshold(&name("unrelated")), 3);
        // Two globs of one length match: the larger number.
        assert_eq!(p.threshold(&name("stage-2-a")), 5);
        assert_eq!(p.thresholds.len(), 5);
    }

    #[test]
    fn targets() {
        let p = Policy::default();
        assert!(p.target_allowed(&target("/usr/local/bin/op-dbus")));
        assert!(p.target_allowed(&target("/etc/op-dbus/state.json")));
        assert!(p.target_allowed(&target("/var/lib/op-dbus/plugins/net")));
        assert!(!p.target_allowed(&target("/etc/shadow")));
        assert!(!p.target_allowed(&target("/usr/local")), "a prefix itself is not a target");
        assert!(!p.target_allowed(&target("/usr/localx/bin")));
        assert!(!p.target_allowed(&target("/usr")));
        for reserved in [
            "/etc/op-dbus/stage.toml",
            "/etc/op-dbus/trusted-keys",
            "/etc/op-dbus/trusted-keys/evil.pub",
            "/var/lib/op-dbus/staging/state.json",
            "/var/lib/op-dbus/deployment/images/index.json",
        ] {
            assert!(is_reserved(&target(reserved)), "{reserved}");
            assert!(!p.target_allowed(&target(reserved)), "{reserved}");
        }
        let p = parse("allowed_prefixes = [\"/srv\"]").unwrap();
        assert!(p.target_allowed(&target("/srv/www/index.html")));
        assert!(!p.target_allowed(&target("/usr/local/bin/x")));
        let p = parse("allowed_prefixes = []").unwrap();
        assert!(!p.target_allowed(&target("/usr/local/bin/x")));
    }

    #[track_caller]
    fn refused(text: &str, needles: &[&str]) -> PolicyError {
        let err = parse(text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(P), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "{msg:?} should contain {n:?}");
        }
        err
    }

    #[test]
    fn strict_parsing() {
        let err = refused("features = []\nallowed_prefix = [\"/opt\"]\n", &[":2:", "unknown field `allowed_prefix`"]);
        assert!(matches!(err, PolicyError::Syntax { line: Some(2), .. }), "{err:?}");
        refused("features = [3]\n", &[":1:", "features = [3]"]);
        refused("revoked = \"0123456789abcdef\"\n", &[":1:", "revoked"]);
        refused("[scopes]\n\"0123456789abcdef\" = \"stage-*\"\n", &[":2:"]);
        refused("[[threshold]]\nstages = \"x\"\n", &["missing field `signatures`"]);
        refused("[[threshold]]\nstages = \"x\"\nsignatures = 1\nextra = 1\n", &[":4:", "unknown field `extra`"]);
        refused("features = [\n", &[":"]);
        refused("[threshold]\nstages = \"x\"\nsignatures = 1\n", &["threshold"]);

        let err = refused(
            "\n\nallowed_prefixes = [\"/opt\", \"usr/local\"]\n",
            &[":3:", "allowed_prefixes: \"usr/local\" is not a prefix"],
        );
        assert!(matches!(err, PolicyError::Invalid { line: Some(3), ref field, .. } if field == "allowed_prefixes"));
        refused("allowed_prefixes = [\"/opt/\"]", &["not normalised"]);
        refused("allowed_prefixes = [\"/opt/../etc\"]", &["'..'"]);
        refused("allowed_prefixes = [\"/\"]", &["\"/\""]);
        refused(
            "revoked = [\n  \"0123456789abcdef\",\n  \"0123\",\n]\n",
            &[":3:", "revoked: \"0123\" is not a key id", "16 hex digits"],
        );
        refused("features = [\"open flow\"]", &["features", "letters, digits"]);
        refused("[scopes]\nnot-a-key = [\"x\"]\n", &[":2:", "scopes: \"not-a-key\" is not a key id"]);
        refused("[scopes]\n\"0123456789abcdef\" = []\n", &[":2:", "trust revoke 0123456789abcdef"]);
        refused("[scopes]\n\"0123456789abcdef\" = [\"stage 1\"]\n", &[":2:", "' '", "wildcards"]);
        refused("[scopes]\n\"0123456789abcdef\" = [\"\"]\n", &["\"\" is not a stage glob"]);
        let long = "a".repeat(MAX_GLOB + 1);
        refused(&format!("[scopes]\n\"0123456789abcdef\" = [\"{long}\"]\n"), &["128 characters"]);
        // Exactly MAX_GLOB characters is a glob.
        let at = "a".repeat(MAX_GLOB);
        let p = parse(&format!("[scopes]\n\"0123456789abcdef\" = [\"{at}\"]\n")).unwrap();
        assert_eq!(p.scope(&id("0123456789abcdef")).unwrap(), [at]);
        refused(
            "[scopes]\n\"0123456789abcdef\" = [\"x\"]\n\"0123456789ABCDEF\" = [\"y\"]\n",
            &["again", "one entry per key"],
        );
        for bad in ["0", "17", "-1", "4294967297"] {
            refused(
                &format!("[[threshold]]\nstages = \"*\"\nsignatures = {bad}\n"),
                &[":3:", "threshold[0].signatures: ", " is out of range", "1 to 16"],
            );
        }
        refused("[[threshold]]\nstages = \"a/b\"\nsignatures = 1\n", &[":2:", "threshold[0].stages"]);
        refused(
            "[[threshold]]\nstages = \"s*\"\nsignatures = 1\n[[threshold]]\nstages = \"s*\"\nsignatures = 2\n",
            &[":5:", "threshold[1].stages: \"s*\" is the `stages` of an earlier"],
        );
    }

    #[test]
    fn set_scope_keeps_comments_and_replaces_in_place() {
        let path = Path::new(P);
        let key = id("3f9a0c41d2e87b65");
        let out = set_scope(EXAMPLE, path, &key, &["stage-3-*".into(), "stage-3-*".into()]).unwrap();
        assert_eq!(out, EXAMPLE.replace(r#"["stage-1-*", "stage-2-plugins"]"#, r#"["stage-3-*"]"#));
        assert_eq!(parse(&out).unwrap().scope(&key).unwrap(), ["stage-3-*"]);

        let other = id("0123456789abcdef");
        let out = set_scope(EXAMPLE, path, &other, &["x".into()]).unwrap();
        assert_eq!(
            out,
            EXAMPLE.replace(
                "\"3f9a0c41d2e87b65\" = [\"stage-1-*\", \"stage-2-plugins\"]\n",
                "\"3f9a0c41d2e87b65\" = [\"stage-1-*\", \"stage-2-plugins\"]\n\"0123456789abcdef\" = [\"x\"]\n"
            )
        );

        // Removing the scope; an entry in upper case is found too; a trailing comment is kept.
        let text = "[scopes] # limits\n\"3F9A0C41D2E87B65\" = [\"a\"] # lab key\n";
        let out = set_scope(text, path, &key, &["b".into()]).unwrap();
        assert_eq!(out, "[scopes] # limits\n\"3F9A0C41D2E87B65\" = [\"b\"] # lab key\n");
        let out = set_scope(text, path, &key, &[]).unwrap();
        assert_eq!(parse(&out).unwrap().scope(&key), None);
        assert!(out.starts_with("[scopes] # limits\n"), "{out}");

        // From an empty file, and into a file with root keys and tables.
        let out = set_scope("", path, &key, &["stage-1-*".into()]).unwrap();
        assert_eq!(out, "[scopes]\n\"3f9a0c41d2e87b65\" = [\"stage-1-*\"]\n");
        assert_eq!(set_scope("", path, &key, &[]).unwrap(), "");
        let text = "# policy\nfeatures = [\"openflow\"]\n\n[[threshold]]\nstages = \"*\"\nsignatures = 2\n";
        let out = set_scope(text, path, &key, &["a".into()]).unwrap();
        assert!(out.starts_with(text), "{out}");
        assert_eq!(parse(&out).unwrap().scope(&key).unwrap(), ["a"]);

        // Inline tables are edited too.
        let out = set_scope("scopes = { \"0123456789abcdef\" = [\"x\"] }\n", path, &key, &["a".into()]).unwrap();
        let p = parse(&out).unwrap();
        assert_eq!(p.scope(&key).unwrap(), ["a"]);
        assert_eq!(p.scope(&other).unwrap(), ["x"]);
    }

    #[test]
    fn set_scope_refuses_bad_globs_and_bad_files() {
        let key = id("3f9a0c41d2e87b65");
        let err = set_scope("", Path::new(P), &key, &["stage 1".into()]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("scope of key 3f9a0c41d2e87b65") && msg.contains("stage 1"), "{msg}");
        let err = set_scope("bogus = 1\n", Path::new(P), &key, &["a".into()]).unwrap_err();
        assert!(matches!(err, PolicyError::Syntax { .. }), "{err}");
    }

    #[test]
    fn add_revoked_keeps_layout() {
        let path = Path::new(P);
        let key = id("3f9a0c41d2e87b65");

        let out = add_revoked(EXAMPLE, path, &key).unwrap();
        assert_eq!(out, EXAMPLE.replace(r#"["0123456789abcdef"]"#, r#"["0123456789abcdef", "3f9a0c41d2e87b65"]"#));
        assert_eq!(add_revoked(&out, path, &key).unwrap(), out, "already revoked: unchanged");

        let text = "revoked = [\n    \"0123456789abcdef\", # lost laptop\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\n    \"0123456789abcdef\", # lost laptop\n    \"3f9a0c41d2e87b65\",\n]\n");

        let text = "revoked = [\n  \"0123456789abcdef\",\n  \"1123456789abcdef\"\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\n  \"0123456789abcdef\",\n  \"1123456789abcdef\",\n  \"3f9a0c41d2e87b65\"\n]\n");

        let text = "revoked = [\n  \"0123456789abcdef\", # c1\n  # more to come\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\n  \"0123456789abcdef\", # c1\n  \"3f9a0c41d2e87b65\",\n  # more to come\n]\n");

        let text = "revoked = [\n  \"0123456789abcdef\" # c1\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\n  \"0123456789abcdef\", # c1\n  \"3f9a0c41d2e87b65\"\n]\n");

        // Elements on one line, the bracket on the next: the new one joins that line.
        let text = "revoked = [\"0123456789abcdef\", \"1123456789abcdef\"\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\"0123456789abcdef\", \"1123456789abcdef\", \"3f9a0c41d2e87b65\"\n]\n");
        // A single element with the bracket on the next line: one per line from now on.
        let text = "revoked = [\"0123456789abcdef\"\n]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(out, "revoked = [\"0123456789abcdef\",\n\"3f9a0c41d2e87b65\"\n]\n");

        let out = add_revoked("revoked = []\n", path, &key).unwrap();
        assert_eq!(out, "revoked = [\"3f9a0c41d2e87b65\"]\n");

        let out = add_revoked("", path, &key).unwrap();
        assert_eq!(out, "revoked = [\"3f9a0c41d2e87b65\"]\n");

        let text = "# my policy\nfeatures = [\"openflow\"]\n\n# limits\n[scopes]\n\"3f9a0c41d2e87b65\" = [\"a\"]\n";
        let out = add_revoked(text, path, &key).unwrap();
        assert_eq!(
            out,
            "# my policy\nfeatures = [\"openflow\"]\nrevoked = [\"3f9a0c41d2e87b65\"]\n\n# limits\n[scopes]\n\"3f9a0c41d2e87b65\" = [\"a\"]\n"
        );
        assert!(parse(&out).unwrap().is_revoked(&key));

        let err = add_revoked("revoked = [\"x\"]\n", path, &key).unwrap_err();
        assert!(matches!(err, PolicyError::Invalid { .. }), "{err}");
    }

    #[test]
    fn policy_files_up_to_one_mib_are_read() {
        // The bound the README gives for stage.toml (the installer reads at most this).
        assert_eq!(MAX_POLICY_BYTES, 1024 * 1024);
    }

    #[test]
    fn syntax_errors_quote_short_lines_only() {
        // A short line is quoted; a line over 200 bytes (it could be anything) is not.
        let short = "features = [\"a\" \"b\"]";
        let err = refused(&format!("{short}\n"), &[":1:"]);
        assert!(err.to_string().contains(short), "{err}");
        let long = format!("features = [\"{}\" \"b\"]", "a".repeat(300));
        let err = refused(&format!("{long}\n"), &[":1:"]);
        assert!(!err.to_string().contains("aaaaaaaaaa"), "{err}");
        assert!(matches!(err, PolicyError::Syntax { line_text: None, .. }), "{err}");
    }

    #[test]
    fn feature_names_are_1_to_128_bytes() {
        let at = "f".repeat(128);
        assert!(parse(&format!("features = [\"{at}\"]\n")).unwrap().feature_enabled(&at));
        refused(&format!("features = [\"{at}f\"]\n"), &[":1:", "features", "1 to 128"]);
        refused("features = [\"\"]\n", &[":1:", "features"]);
    }
}
