//! The stage manifest: `manifest.yaml` in a stage folder (the builder's input) and the
//! [`StageConfig`] embedded in every image as its OCI config (the installer's input).
//!
//! ```text
//! images/stage-1-core-dbus/
//!   manifest.yaml        StageDefinition (YAML, strict: unknown fields are errors)
//!   bin/op-dbus          staged files, laid out as they will be staged
//!   etc/op-dbus/state.json
//! ```
//!
//! The seed manifests of the users' documents are accepted as written: a `dependencies`
//! entry that is not `STAGE-NAME [VERSION-REQ]` is a host requirement (kept and shown), and
//! `cleanup` notes are kept as text.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{StageName, Version};
pub use crate::owners::{Principal, UserSpec};
use crate::path::{RelPath, TargetPath};

/// Largest accepted `manifest.yaml`.
pub const MAX_DEFINITION_BYTES: u64 = 1 << 20;
/// Largest accepted embedded config.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// Most entries one image may stage.
pub const MAX_ENTRIES: usize = 1_000_000;
const MAX_TEXT: usize = 4096;
const MAX_LIST: usize = 4096;

/// Media type of the embedded stage manifest (the OCI config blob).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.op-dbus.stage.manifest.v1+json";

/// A manifest that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file} is larger than {max} bytes")]
    TooLarge { file: PathBuf, max: u64 },
    #[error("{file}: {}", excerpt(message))]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: field `{}`: {}", excerpt(field), excerpt(reason))]
    Invalid { file: PathBuf, field: String, reason: String },
    #[error("{file} is {kind}; it must be a regular file in the stage folder")]
    NotRegular { file: PathBuf, kind: &'static str },
}

/// Longest quoted value an error message shows, in characters.
const EXCERPT_QUOTED: usize = 24;
/// Longest error message text shown from a parser, in characters.
const EXCERPT_TOTAL: usize = 240;

/// `message` as shown to people: its first line only (a parser's later lines quote the
/// source), control characters escaped, each quoted value cut to a few characters and the
/// whole to a line or two, so that an error about a file never echoes much of what the
/// file holds (it may not be what it claims to be).
pub fn excerpt(message: &str) -> String {
    let mut out = String::new();
    let mut quoted: Option<usize> = None;
    let mut prev = '\0';
    let first = message.lines().next().unwrap_or_default();
    let mut shown = 0usize;
    for c in first.chars() {
        if shown >= EXCERPT_TOTAL {
            out.push('…');
            break;
        }
        match quoted {
            Some(_) if c == '"' && prev != '\\' => quoted = None,
            Some(k) if k == EXCERPT_QUOTED => {
                out.push('…');
                quoted = Some(k + 1);
                prev = c;
                continue;
            }
            Some(k) if k > EXCERPT_QUOTED => {
                prev = c;
                continue;
            }
            Some(k) => quoted = Some(k + 1),
            None if c == '"' => quoted = Some(0),
            None => {}
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        shown += 1;
        prev = c;
    }
    if quoted.is_some_and(|k| k > EXCERPT_QUOTED) {
        out.push('"');
    }
    out
}

/// A file mode, written in YAML as octal (`0755`, `755` or `0o755`), in JSON as `"0755"`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mode(u32);

/// Read from its text as the document holds it (YAML's plain `0755` too), without a copy.
impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::digest::from_text(d, "a file mode in octal, such as \"0755\"")
    }
}

/// Written as four octal digits (`"0755"`), formatted on the stack.
impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let digit = |shift: u32| b'0' + ((self.0 >> shift) & 7) as u8;
        let text = [digit(9), digit(6), digit(3), digit(0)];
        s.serialize_str(std::str::from_utf8(&text).expect("ASCII"))
    }
}

impl Mode {
    pub const fn new(bits: u32) -> Option<Mode> {
        if bits <= 0o7777 { Some(Mode(bits)) } else { None }
    }
    pub fn bits(self) -> u32 {
        self.0
    }
    /// Whether setuid, setgid or sticky bits are set.
    pub fn is_special(self) -> bool {
        self.0 & 0o7000 != 0
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let bad = || format!("{s:?} is not an octal file mode such as 0644 or 0755");
        if digits.is_empty() || digits.len() > 5 {
            return Err(bad());
        }
        let bits = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
        Mode::new(bits).ok_or_else(bad)
    }
}

impl TryFrom<String> for Mode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Mode> for String {
    fn from(m: Mode) -> String {
        format!("{:04o}", m.0)
    }
}

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// A verify command's timeout: `30s`, `5m`, `1h` or plain seconds; 1 s to 24 h.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timeout(u64);

impl Timeout {
    pub fn duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl Default for Timeout {
    fn default() -> Self {
        Timeout(30)
    }
}

impl FromStr for Timeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a timeout such as 30s, 5m or 1h (1 s to 24 h)");
        let (num, mult) = match s.as_bytes().last() {
            Some(b's') => (&s[..s.len() - 1], 1),
            Some(b'm') => (&s[..s.len() - 1], 60),
            Some(b'h') => (&s[..s.len() - 1], 3600),
            _ => (s, 1),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let secs = n.checked_mul(mult).ok_or_else(bad)?;
        if !(1..=86400).contains(&secs) {
            return Err(bad());
        }
        Ok(Timeout(secs))
    }
}

impl TryFrom<String> for Timeout {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Timeout> for String {
    fn from(t: Timeout) -> String {
        format!("{}s", t.0)
    }
}

impl fmt::Debug for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

/// How a staged file reaches its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileType {
    /// The target is a symlink into the active generation.
    #[default]
    Symlink,
    /// The target is a copy, replaced on every activation.
    Copy,
    /// The target is copied only when nothing is there: never overwrites the operator's config.
    CopyIfNotExists,
    /// The staged file is an age-encrypted secret: activation decrypts it with the host's
    /// identity into the target (mode 0600 unless declared), replaced on every activation.
    Secret,
}

impl FileType {
    /// The name a manifest gives it (`copy-if-not-exists`).
    pub fn as_str(self) -> &'static str {
        match self {
            FileType::Symlink => "symlink",
            FileType::Copy => "copy",
            FileType::CopyIfNotExists => "copy-if-not-exists",
            FileType::Secret => "secret",
        }
    }
}

/// One `files:` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: RelPath,
    pub target: TargetPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, rename = "type")]
    pub kind: FileType,
    /// The owner of the staged path (and everything under a directory): a user name or
    /// number; default root. The payload's own uid/gid are never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Principal>,
    /// The group: a name or number; default the owner's primary group (root's without an owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Principal>,
}

/// One `verify:` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    pub command: String,
    #[serde(default)]
    pub expect_exit: i32,
    #[serde(default)]
    pub timeout: Timeout,
}

/// One `build:` step, run by the builder with `sh -c` in `cwd` (relative to the stage folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildStep {
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// One `sources:` entry: a build output copied into the stage tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Relative to the stage folder; may leave it (`../../target/release/op-dbus`).
    pub from: String,
    /// Where it lands in the stage tree.
    pub to: RelPath,
}

/// A dependency on another stage, optionally with a version requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub stage: StageName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<String>,
}

impl Dependency {
    /// Parses `NAME` or `NAME REQ` (`stage-1-core-dbus >=1.0`); `None` for free text.
    pub fn parse(s: &str) -> Option<Dependency> {
        let s = s.trim();
        let (name, req) = match s.split_once(char::is_whitespace) {
            Some((n, r)) => (n, Some(r.trim())),
            None => (s, None),
        };
        let stage: StageName = name.parse().ok()?;
        // A bare word must look like a stage (contain a '-' or digit) to be one.
        if req.is_none() && !name.contains('-') {
            return None;
        }
        if let Some(r) = req {
            semver::VersionReq::parse(r).ok()?;
        }
        Some(Dependency { stage, req: req.map(str::to_owned) })
    }

    /// Whether `version` meets the requirement (always, without one).
    pub fn matches(&self, version: &Version) -> bool {
        match &self.req {
            None => true,
            Some(r) => semver::VersionReq::parse(r).is_ok_and(|r| r.matches(version.semver())),
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.req {
            Some(r) => write!(f, "{} {}", self.stage, r),
            None => write!(f, "{}", self.stage),
        }
    }
}

/// `manifest.yaml` as written by the user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDefinition {
    #[serde(default)]
    pub stage: Option<u32>,
    #[serde(default)]
    pub name: Option<StageName>,
    #[serde(default)]
    pub component: Option<String>,
    pub version: Version,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub plugins: Vec<String>,
    #[serde(default)]
    pub requires_feature: Option<String>,
    #[serde(default)]
    pub dependencies: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Paths the service writes (files or directories on the host, not staged): kept
    /// across upgrades and saved by `op-dbus-stage backup create`.
    #[serde(default)]
    pub data: Vec<TargetPath>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub users: Vec<UserSpec>,
    #[serde(default)]
    pub verify: Vec<VerifySpec>,
    #[serde(default)]
    pub build: Vec<BuildStep>,
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub cleanup: Vec<String>,
    /// The age X25519 recipients (`age1...`, what `op-dbus-stage identity` prints) of the
    /// hosts that may decrypt this stage's `type: secret` files, or `@TAG`: every host of
    /// the builder's inventory with that tag. Used by the builder only.
    #[serde(default)]
    pub recipients: Vec<String>,
}

/// The mode of a secret's target when its entry declares none.
pub const SECRET_MODE: Mode = Mode(0o600);

impl FileSpec {
    /// The mode a `type: secret` target gets: the declared one, or 0600.
    pub fn secret_mode(&self) -> Mode {
        self.mode.unwrap_or(SECRET_MODE)
    }
}

impl StageDefinition {
    /// Reads and validates `file` (at most [`MAX_DEFINITION_BYTES`]).
    pub fn read(file: &Path) -> Result<StageDefinition, ManifestError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| ManifestError::Io { file: file.to_owned(), source };
        // Not through a symlink, not a FIFO or device: a regular file, checked once open.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits()
                    as i32,
            )
            .open(file)
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
                    ManifestError::NotRegular { file: file.to_owned(), kind: "a symlink" }
                }
                _ => io(e),
            })?;
        let t = f.metadata().map_err(io)?.file_type();
        if !t.is_file() {
            let kind = if t.is_dir() { "a directory" } else { "a FIFO, socket or device" };
            return Err(ManifestError::NotRegular { file: file.to_owned(), kind });
        }
        let mut text = String::new();
        f.take(MAX_DEFINITION_BYTES + 1).read_to_string(&mut text).map_err(io)?;
        if text.len() as u64 > MAX_DEFINITION_BYTES {
            return Err(ManifestError::TooLarge { file: file.to_owned(), max: MAX_DEFINITION_BYTES });
        }
        Self::parse(&text, file)
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<StageDefinition, ManifestError> {
        let def: StageDefinition = serde_saphyr::from_str(text)
            .map_err(|e| ManifestError::Syntax { file: file.to_owned(), message: e.to_string() })?;
        def.validate(file)?;
        Ok(def)
    }

    fn validate(&self, file: &Path) -> Result<(), ManifestError> {
        let invalid = |field: String, reason: String| ManifestError::Invalid { file: file.to_owned(), field, reason };
        check_common(
            self.component.as_deref(),
            self.description.as_deref(),
            &self.plugins,
            self.requires_feature.as_deref(),
            &self.files,
            &self.services,
            &self.users,
            &self.verify,
            &self.cleanup,
        )
        .map_err(|(f, r)| invalid(f, r))?;
        check_data(&self.data, &self.files).map_err(|(f, r)| invalid(f, r))?;
        check_list("dependencies", &self.dependencies).map_err(|(f, r)| invalid(f, r))?;
        check_list("build", &self.build).map_err(|(f, r)| invalid(f, r))?;
        check_list("sources", &self.sources).map_err(|(f, r)| invalid(f, r))?;
        check_list("recipients", &self.recipients).map_err(|(f, r)| invalid(f, r))?;
        for (i, r) in self.recipients.iter().enumerate() {
            check_recipient(&format!("recipients[{i}]"), r).map_err(|(f, r)| invalid(f, r))?;
        }
        if self.recipients.is_empty()
            && let Some(i) = self.files.iter().position(|f| f.kind == FileType::Secret)
        {
            return Err(invalid(
                format!("files[{i}].type"),
                "a stage with `type: secret` files lists the hosts that may read them in `recipients:` (age1... as \
                 `op-dbus-stage identity` prints)"
                    .into(),
            ));
        }
        for (i, d) in self.dependencies.iter().enumerate() {
            check_text(&format!("dependencies[{i}]"), d).map_err(|(f, r)| invalid(f, r))?;
        }
        for (i, b) in self.build.iter().enumerate() {
            check_text(&format!("build[{i}].run"), &b.run).map_err(|(f, r)| invalid(f, r))?;
        }
        for (i, s) in self.sources.iter().enumerate() {
            check_text(&format!("sources[{i}].from"), &s.from).map_err(|(f, r)| invalid(f, r))?;
        }
        Ok(())
    }

    /// The stage dependencies (entries of the form `NAME [REQ]`).
    pub fn stage_dependencies(&self) -> Vec<Dependency> {
        self.dependencies.iter().filter_map(|d| Dependency::parse(d)).collect()
    }

    /// Free-text `dependencies` entries: requirements on the host, shown, not enforced.
    pub fn host_requirements(&self) -> Vec<String> {
        self.dependencies.iter().filter(|d| Dependency::parse(d).is_none()).cloned().collect()
    }
}

fn check_text(field: &str, s: &str) -> Result<(), (String, String)> {
    if s.trim().is_empty() {
        return Err((field.to_owned(), "must not be empty".into()));
    }
    if s.len() > MAX_TEXT {
        return Err((field.to_owned(), format!("longer than {MAX_TEXT} bytes")));
    }
    if s.contains('\0') {
        return Err((field.to_owned(), "has a NUL byte".into()));
    }
    Ok(())
}

/// An age X25519 recipient as text: `age1` and 58 bech32 characters (the key itself is
/// checked where it is used), or `@TAG` (an inventory tag).
fn check_recipient(field: &str, s: &str) -> Result<(), (String, String)> {
    const BECH32: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    if let Some(tag) = s.strip_prefix('@') {
        return check_word(field, tag);
    }
    let ok = s.len() == 62 && s.starts_with("age1") && s.as_bytes()[4..].iter().all(|c| BECH32.contains(c));
    if ok {
        Ok(())
    } else {
        Err((
            field.to_owned(),
            format!("{s:?} is not an age X25519 recipient (age1... as `op-dbus-stage identity` prints) or @TAG"),
        ))
    }
}

fn check_list<T>(field: &str, v: &[T]) -> Result<(), (String, String)> {
    if v.len() > MAX_LIST {
        return Err((field.to_owned(), format!("more than {MAX_LIST} entries")));
    }
    Ok(())
}

/// `data:` paths: each once, none inside another (one would be saved twice), none at or
/// inside a `files:` target (what the stage places is not the service's data; a data
/// directory may hold a placed file).
fn check_data(data: &[TargetPath], files: &[FileSpec]) -> Result<(), (String, String)> {
    check_list("data", data)?;
    for (i, d) in data.iter().enumerate() {
        if let Some(o) = data[..i].iter().find(|o| d.is_under(o) || o.is_under(d)) {
            let reason = if o == d { format!("{d} is listed twice") } else { format!("{d} and {o} nest") };
            return Err((format!("data[{i}]"), reason));
        }
        if let Some(f) = files.iter().find(|f| d.is_under(&f.target)) {
            return Err((format!("data[{i}]"), format!("{d} lies at or inside the target {} of files:", f.target)));
        }
    }
    Ok(())
}

fn check_unit(field: &str, s: &str) -> Result<(), (String, String)> {
    const SUFFIXES: [&str; 7] = [".service", ".socket", ".timer", ".path", ".target", ".mount", ".slice"];
    let ok = s.len() <= 255
        && SUFFIXES.iter().any(|x| s.len() > x.len() && s.ends_with(x))
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"@._:-\\".contains(&c))
        && !s.starts_with('.')
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err((field.to_owned(), format!("{s:?} is not a systemd unit name such as op-dbus.service")))
    }
}

fn check_word(field: &str, s: &str) -> Result<(), (String, String)> {
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok { Ok(()) } else { Err((field.to_owned(), format!("{s:?}: use letters, digits, '.', '_' or '-'"))) }
}

#[allow(clippy::too_many_arguments)]
fn check_common(
    component: Option<&str>,
    description: Option<&str>,
    plugins: &[String],
    requires_feature: Option<&str>,
    files: &[FileSpec],
    services: &[String],
    users: &[UserSpec],
    verify: &[VerifySpec],
    cleanup: &[String],
) -> Result<(), (String, String)> {
    if let Some(c) = component {
        check_word("component", c)?;
    }
    if let Some(d) = description {
        check_text("description", d)?;
    }
    check_list("plugins", plugins)?;
    for (i, p) in plugins.iter().enumerate() {
        check_word(&format!("plugins[{i}]"), p)?;
    }
    if let Some(f) = requires_feature {
        check_word("requires_feature", f)?;
    }
    check_list("files", files)?;
    let mut paths = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for (i, f) in files.iter().enumerate() {
        if !paths.insert(&f.path) {
            return Err((format!("files[{i}].path"), format!("{} is listed twice", f.path)));
        }
        if !targets.insert(&f.target) {
            return Err((format!("files[{i}].target"), format!("{} is the target of two entries", f.target)));
        }
    }
    // One target inside another would make one link shadow the other.
    let list: Vec<_> = targets.into_iter().collect();
    for w in list.windows(2) {
        if w[1].is_under(w[0]) {
            return Err(("files".into(), format!("target {} lies inside target {}", w[1], w[0])));
        }
    }
    check_list("services", services)?;
    for (i, s) in services.iter().enumerate() {
        check_unit(&format!("services[{i}]"), s)?;
    }
    check_list("users", users)?;
    let mut names = BTreeSet::new();
    for (i, u) in users.iter().enumerate() {
        u.check().map_err(|(f, r)| (format!("users[{i}].{f}"), r))?;
        if !names.insert(&u.name) {
            return Err((format!("users[{i}].name"), format!("{} is listed twice", u.name)));
        }
    }
    check_list("verify", verify)?;
    for (i, v) in verify.iter().enumerate() {
        check_text(&format!("verify[{i}].command"), &v.command)?;
        if !(0..=255).contains(&v.expect_exit) {
            return Err((format!("verify[{i}].expect_exit"), "must be 0 to 255".into()));
        }
    }
    check_list("cleanup", cleanup)?;
    for (i, c) in cleanup.iter().enumerate() {
        check_text(&format!("cleanup[{i}]"), c)?;
    }
    Ok(())
}

/// What kind of thing a staged path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    /// "file", "directory" or "symlink", for messages.
    pub fn noun(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symlink",
        }
    }
}

/// One staged path with what the signature promises about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub path: RelPath,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub mode: Mode,
    /// Files: the size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Files: the sha256 of the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    /// Symlinks: the link text (relative, confined to the stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// The stage manifest embedded in an image as its OCI config
/// ([`CONFIG_MEDIA_TYPE`]): the definition, normalised, plus every staged entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub schema_version: u32,
    pub name: StageName,
    pub version: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub plugins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires_feature: Option<String>,
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
    #[serde(default)]
    pub host_requirements: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// The service's data paths (absent when none, so that older images keep their digests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<TargetPath>,
    #[serde(default)]
    pub services: Vec<String>,
    /// System users to create if missing (absent when none, so that older images keep
    /// their digests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserSpec>,
    #[serde(default)]
    pub verify: Vec<VerifySpec>,
    #[serde(default)]
    pub cleanup: Vec<String>,
    /// Every staged path, sorted, parents before children.
    pub entries: Vec<Entry>,
}

/// Why an embedded config is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("embedded stage manifest is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("embedded stage manifest is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("embedded stage manifest: field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

impl StageConfig {
    pub const SCHEMA_VERSION: u32 = 1;

    /// Builds the config from a definition and the entries of its assembled tree.
    pub fn from_definition(name: StageName, def: &StageDefinition, entries: Vec<Entry>) -> Self {
        StageConfig {
            schema_version: Self::SCHEMA_VERSION,
            name,
            version: def.version.clone(),
            stage: def.stage,
            component: def.component.clone(),
            description: def.description.clone(),
            plugins: def.plugins.clone(),
            requires_feature: def.requires_feature.clone(),
            dependencies: def.stage_dependencies(),
            host_requirements: def.host_requirements(),
            files: def.files.clone(),
            data: def.data.clone(),
            services: def.services.clone(),
            users: def.users.clone(),
            verify: def.verify.clone(),
            cleanup: def.cleanup.clone(),
            entries,
        }
    }

    /// Canonical JSON bytes (stable field order, no whitespace).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("stage config serializes")
    }

    /// Parses and validates config bytes from an image.
    pub fn from_bytes(bytes: &[u8]) -> Result<StageConfig, ConfigError> {
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge);
        }
        let c: StageConfig = serde_json::from_slice(bytes)?;
        c.validate()?;
        Ok(c)
    }

    /// The entry at `path`.
    pub fn entry(&self, path: &RelPath) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.path.cmp(path)).ok().map(|i| &self.entries[i])
    }

    /// [`StageConfig::entry`] for paths that mostly come in the manifest's order (a full
    /// layer's, a sorted walk's): `next`, the index after the entry found last, is looked
    /// at first. Returns the entry's index. Entries sort as strings, so a `path` that is
    /// no [`RelPath`] matches none.
    pub fn index_in_order(&self, path: &str, next: &mut usize) -> Option<usize> {
        let i = match self.entries.get(*next) {
            Some(e) if e.path.as_str() == path => *next,
            _ => self.entries.binary_search_by(|e| e.path.as_str().cmp(path)).ok()?,
        };
        *next = i + 1;
        Some(i)
    }

    /// Checks everything the types cannot: schema, entry order, uniqueness, parents, the
    /// promises of each entry, and that every `files:` path is staged.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid { field, reason };
        if self.schema_version != Self::SCHEMA_VERSION {
            return Err(invalid(
                "schema_version".into(),
                format!("{} is not supported (expected 1)", self.schema_version),
            ));
        }
        check_common(
            self.component.as_deref(),
            self.description.as_deref(),
            &self.plugins,
            self.requires_feature.as_deref(),
            &self.files,
            &self.services,
            &self.users,
            &self.verify,
            &self.cleanup,
        )
        .map_err(|(f, r)| invalid(f, r))?;
        check_data(&self.data, &self.files).map_err(|(f, r)| invalid(f, r))?;
        check_list("dependencies", &self.dependencies).map_err(|(f, r)| invalid(f, r))?;
        check_list("host_requirements", &self.host_requirements).map_err(|(f, r)| invalid(f, r))?;
        for (i, d) in self.dependencies.iter().enumerate() {
            if let Some(r) = &d.req {
                semver::VersionReq::parse(r).map_err(|e| invalid(format!("dependencies[{i}].req"), e.to_string()))?;
            }
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(invalid("entries".into(), format!("more than {MAX_ENTRIES}")));
        }
        // The parent found last: the entries of one directory mostly come together.
        let mut last_parent: Option<&Entry> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let field = || format!("entries[{i}] ({})", e.path);
            if i > 0 && self.entries[i - 1].path >= e.path {
                return Err(invalid(field(), "entries are not sorted or not unique".into()));
            }
            if let Some((parent, _)) = e.path.as_str().rsplit_once('/') {
                let found = match last_parent {
                    Some(p) if p.path.as_str() == parent => Some(p),
                    _ => self.entries.binary_search_by(|x| x.path.as_str().cmp(parent)).ok().map(|j| &self.entries[j]),
                };
                match found {
                    Some(p) if p.kind == EntryKind::Dir => last_parent = Some(p),
                    _ => return Err(invalid(field(), format!("parent {parent} is not a staged directory"))),
                }
            }
            let ok = match e.kind {
                EntryKind::File => e.size.is_some() && e.sha256.is_some() && e.link.is_none(),
                EntryKind::Dir => e.size.is_none() && e.sha256.is_none() && e.link.is_none(),
                EntryKind::Symlink => {
                    let Some(l) = &e.link else {
                        return Err(invalid(field(), "symlink without link text".into()));
                    };
                    crate::path::confine_link(&e.path, l).map_err(|x| invalid(field(), x.to_string()))?;
                    e.size.is_none() && e.sha256.is_none()
                }
            };
            if !ok {
                return Err(invalid(field(), "fields do not fit its type".into()));
            }
        }
        // Each link on its own stays inside (above); a chain of them must too: judged by
        // where it resolves, following every staged link on the way as the kernel would.
        for (i, e) in self.entries.iter().enumerate().filter(|(_, e)| e.kind == EntryKind::Symlink) {
            self.resolve_links(&e.path).map_err(|reason| invalid(format!("entries[{i}] ({})", e.path), reason))?;
        }
        for (i, f) in self.files.iter().enumerate() {
            let Some(e) = self.entry(&f.path) else {
                return Err(invalid(format!("files[{i}].path"), format!("{} is not staged in the image", f.path)));
            };
            // A copy is of a regular file: a staged link or directory cannot be copied.
            if matches!(f.kind, FileType::Copy | FileType::CopyIfNotExists | FileType::Secret)
                && e.kind != EntryKind::File
            {
                return Err(invalid(
                    format!("files[{i}].path"),
                    format!(
                        "{} is a staged {}; `type: {}` copies regular files only (use `type: symlink`)",
                        f.path,
                        e.kind.noun(),
                        f.kind.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where the staged path `path` leads when every staged symlink on the way is followed
    /// (the last component included): the stage path it names, or why it leaves the stage.
    /// Components that are not staged are taken as they are (the kernel would fail there).
    pub fn resolve_links(&self, path: &RelPath) -> Result<String, String> {
        /// As many links as Linux follows in one path walk.
        const MAX_HOPS: usize = 40;
        let mut hops = 0;
        let mut done: Vec<&str> = Vec::new();
        let mut todo: std::collections::VecDeque<&str> = path.components().collect();
        while let Some(c) = todo.pop_front() {
            match c {
                "" | "." => {}
                ".." => {
                    if done.pop().is_none() {
                        return Err(format!("{path} resolves outside the stage through its links"));
                    }
                }
                c => {
                    done.push(c);
                    let here = done.join("/");
                    let link = self
                        .entries
                        .binary_search_by(|e| e.path.as_str().cmp(&here))
                        .ok()
                        .map(|i| &self.entries[i])
                        .filter(|e| e.kind == EntryKind::Symlink);
                    if let Some(e) = link {
                        hops += 1;
                        if hops > MAX_HOPS {
                            return Err(format!("{path}: more than {MAX_HOPS} links on the way (a loop?)"));
                        }
                        let text = e.link.as_deref().unwrap_or_default();
                        if text.starts_with('/') {
                            return Err(format!("{path} resolves through the absolute link {}", e.path));
                        }
                        done.pop();
                        for part in text.split('/').rev() {
                            todo.push_front(part);
                        }
                    }
                }
            }
        }
        if done.is_empty() {
            return Err(format!("{path} resolves to the stage's own top directory"));
        }
        Ok(done.join("/"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn entries_looked_up_in_order_or_not_are_found_alike() {
        use super::*;
        let def = StageDefinition::parse("version: 1.0.0\n", std::path::Path::new("manifest.yaml")).unwrap();
        let e = |p: &str| Entry {
            path: p.parse().unwrap(),
            kind: EntryKind::Dir,
            mode: Mode::new(0o755).unwrap(),
            size: None,
            sha256: None,
            link: None,
        };
        let c = StageConfig::from_definition("s".parse().unwrap(), &def, vec![e("a"), e("a/b"), e("b"), e("c")]);
        let mut next = 0;
        for p in ["a", "a/b", "c", "b", "nope", "a", "a/b"] {
            let path: RelPath = p.parse().unwrap();
            assert_eq!(c.index_in_order(p, &mut next).map(|i| &c.entries[i]), c.entry(&path), "{p}");
        }
        assert_eq!(next, 2, "after a/b");
    }

    #[test]
    fn modes_are_written_as_four_octal_digits() {
        for bits in [0, 0o7, 0o644, 0o755, 0o1777, 0o4755, 0o7777] {
            let m = super::Mode::new(bits).unwrap();
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{bits:04o}\""));
            assert_eq!(serde_json::from_str::<super::Mode>(&serde_json::to_string(&m).unwrap()).unwrap(), m);
        }
    }

    use super::*;

    #[test]
    fn excerpts_are_short_escaped_and_one_line() {
        let long = "k".repeat(500);
        let e = excerpt(&format!("invalid value \"{long}\" at line 2\n --> source\n1 | secret"));
        assert_eq!(e, format!("invalid value \"{}…\" at line 2", "k".repeat(EXCERPT_QUOTED)));
        assert_eq!(excerpt("bell \u{7} esc \u{1b}[31m"), "bell \\u{7} esc \\u{1b}[31m");
        assert!(excerpt(&"x".repeat(5000)).chars().count() <= EXCERPT_TOTAL + 1);
        assert_eq!(excerpt("unknown field `a`"), "unknown field `a`");
    }

    fn parse(text: &str) -> Result<StageDefinition, ManifestError> {
        StageDefinition::parse(text, Path::new("images/x/manifest.yaml"))
    }

    #[test]
    fn seeds_are_accepted_as_written() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/seed-manifests");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("tests/fixtures/seed-manifests in the repository") {
            let p = e.unwrap().path();
            let def = StageDefinition::read(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(def.version.to_string(), "1.0.0");
            n += 1;
        }
        assert!(n >= 4);
        let full = StageDefinition::read(&dir.join("stage-1-core-dbus.full.yaml")).unwrap();
        assert_eq!(full.host_requirements(), ["D-Bus system bus", "Rust toolchain (build time only)"]);
        assert!(full.stage_dependencies().is_empty());
        assert_eq!(full.files[0].mode.unwrap().bits(), 0o755);
        assert_eq!(full.files[1].kind, FileType::CopyIfNotExists);
        assert_eq!(full.cleanup.len(), 1);
        let s3 = StageDefinition::read(&dir.join("stage-3-openflow.yaml")).unwrap();
        let deps: Vec<_> = s3.stage_dependencies().iter().map(|d| d.stage.to_string()).collect();
        assert_eq!(deps, ["stage-1-core-dbus", "stage-2-plugins"]);
        assert_eq!(s3.requires_feature.as_deref(), Some("openflow"));
    }

    #[test]
    fn modes() {
        for (s, bits) in [("0755", 0o755), ("755", 0o755), ("0o644", 0o644), ("4755", 0o4755)] {
            assert_eq!(s.parse::<Mode>().unwrap().bits(), bits);
        }
        for bad in ["", "0x1", "9", "77777", "0o", "-1", "000000644", "0o000000644"] {
            assert!(bad.parse::<Mode>().is_err(), "{bad}");
        }
        // In YAML, plain or quoted.
        for (yaml, bits) in [("0755", 0o755), ("755", 0o755), ("0o644", 0o644), ("\"0600\"", 0o600), ("'4755'", 0o4755)]
        {
            let text = format!("version: 1.0.0\nfiles:\n  - path: x\n    target: /etc/x\n    mode: {yaml}\n");
            let def =
                StageDefinition::parse(&text, Path::new("manifest.yaml")).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(def.files[0].mode.map(Mode::bits), Some(bits), "{yaml}");
        }
        let e = StageDefinition::parse(
            "version: 1.0.0\nfiles:\n  - path: x\n    target: /etc/x\n    mode: 9\n",
            Path::new("m"),
        );
        assert!(e.is_err());
        // Shown with four octal digits, in messages and debug output alike.
        let m: Mode = "644".parse().unwrap();
        assert_eq!(format!("{m} {m:?} {}", String::from(m)), "0644 0644 0644");
    }

    #[test]
    fn excerpts_close_a_quote_they_cut() {
        let k = |n: usize| "k".repeat(n);
        // An unterminated quoted value: kept as is while short, cut and closed when long.
        assert_eq!(excerpt("bad \"ab"), "bad \"ab");
        let at = format!("bad \"{}", k(EXCERPT_QUOTED));
        assert_eq!(excerpt(&at), at);
        assert_eq!(excerpt(&format!("bad \"{}", k(EXCERPT_QUOTED + 1))), format!("bad \"{}…\"", k(EXCERPT_QUOTED)));
        assert_eq!(excerpt(&format!("bad \"{}", k(100))), format!("bad \"{}…\"", k(EXCERPT_QUOTED)));
    }

    #[test]
    fn dependencies() {
        let d = Dependency::parse("stage-1-core-dbus >=1.0").unwrap();
        assert_eq!(d.to_string(), "stage-1-core-dbus >=1.0");
        assert_eq!(Dependency::parse("stage-1-core-dbus").unwrap().to_string(), "stage-1-core-dbus");
        assert!(d.matches(&"1.2.0".parse().unwrap()));
        assert!(!d.matches(&"0.9.0".parse().unwrap()));
        assert!(Dependency::parse("D-Bus system bus").is_none());
        assert!(Dependency::parse("Rust toolchain (build time only)").is_none());
        assert!(Dependency::parse("dbus").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("version: 1.0.0\nbogus: 1\n").unwrap_err().to_string();
        assert!(e.contains("manifest.yaml") && e.contains("bogus"), "{e}");
        let e = parse("version: 1.0.0\nfiles:\n  - path: ../x\n    target: /usr/local/x\n").unwrap_err().to_string();
        assert!(e.contains("manifest.yaml") && e.contains("..") && e.contains("line"), "{e}");
        let e = parse("version: 1.0.0\nfiles:\n  - path: x\n    target: /usr/../etc/shadow\n").unwrap_err().to_string();
        assert!(e.contains("target") || e.contains(".."), "{e}");
        let e = parse("version: one\n").unwrap_err().to_string();
        assert!(e.contains("version"), "{e}");
        let e = parse("version: 1.0.0\nservices: [nope]\n").unwrap_err().to_string();
        assert!(e.contains("services[0]"), "{e}");
        let e = parse("version: 1.0.0\nverify:\n  - command: x\n    timeout: 3 days\n").unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
        assert!(parse("version: [1\n").is_err());
        assert!(parse("version: 1.0.0\nversion: 1.0.1\n").is_err());
    }

    #[test]
    fn data_paths_are_absolute_apart_and_not_placed_files() {
        let files = "files:\n  - path: etc/x.conf\n    target: /etc/op-dbus/x.conf\n";
        let def = parse(&format!("version: 1.0.0\n{files}data:\n  - /var/lib/op-dbus/app\n  - /etc/op-dbus/app.d\n"))
            .unwrap();
        assert_eq!(def.data.len(), 2);
        // Absent from the embedded manifest when empty: older images keep their digests.
        let c = StageConfig::from_definition("s".parse().unwrap(), &parse("version: 1.0.0\n").unwrap(), Vec::new());
        assert!(!String::from_utf8(c.to_bytes()).unwrap().contains("data"));
        for (bad, says) in [
            ("data:\n  - var/lib/x\n", "not absolute"),
            ("data:\n  - /var/lib/../../etc/shadow\n", ".."),
            ("data:\n  - /var/lib/op-dbus/a\n  - /var/lib/op-dbus/a\n", "twice"),
            ("data:\n  - /var/lib/op-dbus/a\n  - /var/lib/op-dbus/a/b\n", "nest"),
            ("data:\n  - /etc/op-dbus/x.conf\n", "files:"),
            ("data:\n  - /etc/op-dbus/x.conf/y\n", "files:"),
        ] {
            let e = parse(&format!("version: 1.0.0\n{files}{bad}")).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn config_round_trip_and_checks() {
        let def = parse("version: 1.0.0\nfiles:\n  - path: bin/x\n    target: /usr/local/bin/x\n").unwrap();
        let dir = |p: &str| Entry {
            path: p.parse().unwrap(),
            kind: EntryKind::Dir,
            mode: Mode(0o755),
            size: None,
            sha256: None,
            link: None,
        };
        let file = Entry {
            path: "bin/x".parse().unwrap(),
            kind: EntryKind::File,
            mode: Mode(0o755),
            size: Some(3),
            sha256: Some(Digest::of(b"abc")),
            link: None,
        };
        let c = StageConfig::from_definition("s".parse().unwrap(), &def, vec![dir("bin"), file.clone()]);
        let back = StageConfig::from_bytes(&c.to_bytes()).unwrap();
        assert_eq!(back, c);
        // A file whose parent is not staged, and unsorted entries, are refused.
        let mut bad = c.clone();
        bad.entries = vec![file.clone()];
        assert!(bad.validate().is_err());
        bad.entries = vec![file, dir("bin")];
        assert!(bad.validate().is_err());
        let mut text = String::from_utf8(c.to_bytes()).unwrap();
        text = text.replacen("\"entries\"", "\"extra\":1,\"entries\"", 1);
        assert!(StageConfig::from_bytes(text.as_bytes()).is_err());
    }

    fn entry(path: &str, kind: EntryKind, link: Option<&str>) -> Entry {
        let file = kind == EntryKind::File;
        Entry {
            path: path.parse().unwrap(),
            kind,
            mode: Mode(0o755),
            size: file.then_some(1),
            sha256: file.then(|| Digest::of(b"x")),
            link: link.map(str::to_owned),
        }
    }

    fn config(files: &str, entries: Vec<Entry>) -> StageConfig {
        let def = parse(&format!("version: 1.0.0\n{files}")).unwrap();
        StageConfig::from_definition("s".parse().unwrap(), &def, entries)
    }

    #[test]
    fn a_link_chain_that_leaves_the_stage_is_refused() {
        use EntryKind::*;
        // Each text stays inside on its own; followed through `b`, `a` leads out.
        let c = config(
            "",
            vec![entry("a", Symlink, Some("b/../../../../etc/shadow")), entry("b", Symlink, Some("../../x"))],
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("entries[0] (a)") && e.contains("outside the stage"), "{e}");
        // Through a link to a directory and back up: still inside.
        let c = config(
            "",
            vec![
                entry("bin", Dir, None),
                entry("bin/tool", File, None),
                entry("lib", Symlink, Some("bin")),
                entry("x", Symlink, Some("lib/../bin/tool")),
                entry("y", Symlink, Some("lib/tool")),
            ],
        );
        c.validate().unwrap();
        assert_eq!(c.resolve_links(&"y".parse().unwrap()).unwrap(), "bin/tool");
        assert_eq!(c.resolve_links(&"x".parse().unwrap()).unwrap(), "bin/tool");
        // A nested link that climbs out through the directory link it lies under.
        let c = config(
            "",
            vec![
                entry("d", Dir, None),
                entry("d/e", Dir, None),
                entry("d/e/up", Symlink, Some("../..")),
                entry("z", Symlink, Some("d/e/up/../../etc")),
            ],
        );
        assert!(c.validate().is_err());
        // Loops are refused, not followed forever.
        let c = config("", vec![entry("p", Symlink, Some("q")), entry("q", Symlink, Some("p"))]);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("loop"), "{e}");
    }

    #[test]
    fn a_copy_of_a_staged_link_or_directory_is_refused() {
        use EntryKind::*;
        let files = "files:\n  - path: cfg\n    target: /etc/op-dbus/cfg\n    type: copy\n";
        let c = config(files, vec![entry("cfg", Symlink, Some("real")), entry("real", File, None)]);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("files[0].path") && e.contains("symlink") && e.contains("type: copy"), "{e}");
        let files = "files:\n  - path: d\n    target: /etc/op-dbus/d\n    type: copy-if-not-exists\n";
        let c = config(files, vec![entry("d", Dir, None)]);
        assert!(c.validate().unwrap_err().to_string().contains("directory"));
        let files = "files:\n  - path: real\n    target: /etc/op-dbus/cfg\n    type: copy\n";
        config(files, vec![entry("real", File, None)]).validate().unwrap();
    }

    #[test]
    fn validate_refuses_each_broken_promise() {
        use EntryKind::*;
        let ok = || vec![entry("d", Dir, None), entry("d/f", File, None), entry("l", Symlink, Some("d/f"))];
        config("", ok()).validate().unwrap();
        let refused = |entries: Vec<Entry>, why: &str| {
            let e = config("", entries).validate().unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        };
        // The same path twice, and out of order.
        refused(vec![entry("d", Dir, None), entry("d", Dir, None)], "not sorted or not unique");
        refused(vec![entry("l", Symlink, Some("d")), entry("d", Dir, None)], "not sorted or not unique");
        // A parent that is a file or a link, not a directory.
        refused(vec![entry("d", File, None), entry("d/f", File, None)], "parent d is not a staged directory");
        refused(vec![entry("d", Symlink, Some("x")), entry("d/f", File, None)], "parent d is not a staged directory");
        // Fields that do not fit the kind.
        let mut f = entry("f", File, None);
        f.sha256 = None;
        refused(vec![f], "fields do not fit");
        let mut f = entry("f", File, None);
        f.link = Some("x".into());
        refused(vec![f], "fields do not fit");
        let mut d = entry("d", Dir, None);
        d.size = Some(1);
        refused(vec![d], "fields do not fit");
        let mut d = entry("d", Dir, None);
        d.sha256 = Some(Digest::of(b""));
        refused(vec![d], "fields do not fit");
        let mut l = entry("l", Symlink, Some("x"));
        l.size = Some(0);
        refused(vec![l], "fields do not fit");
        refused(vec![entry("l", Symlink, None)], "symlink without link text");
        // A files: path that is not staged.
        let e = config("files:\n  - path: nope\n    target: /opt/nope\n", ok()).validate().unwrap_err().to_string();
        assert!(e.contains("files[0].path") && e.contains("not staged"), "{e}");
        // Another schema.
        let mut c = config("", ok());
        c.schema_version = 2;
        assert!(c.validate().unwrap_err().to_string().contains("schema_version"));
    }

    #[test]
    fn owners_and_users_are_parsed_and_kept_in_the_config() {
        let def = parse(
            "version: 1.0.0\nusers:\n  - name: op-dbus\n    description: op-dbus service\nfiles:\n  - path: bin/x\n    \
             target: /usr/local/bin/x\n    owner: op-dbus\n    group: 1000\n  - path: etc/y\n    target: /etc/op-dbus/y\n    \
             owner: \"42\"\n",
        )
        .unwrap();
        assert_eq!(def.files[0].owner, Some(Principal::Name("op-dbus".into())));
        assert_eq!(def.files[0].group, Some(Principal::Id(1000)));
        assert_eq!(def.files[1].owner, Some(Principal::Id(42)));
        assert_eq!(def.files[1].group, None);
        assert_eq!(def.users[0].name, "op-dbus");
        let c = config_of(&def);
        let json = String::from_utf8(c.to_bytes()).unwrap();
        assert!(
            json.contains(r#""owner":"op-dbus","group":1000"#) && json.contains(r#""users":[{"name":"op-dbus""#),
            "{json}"
        );
        assert_eq!(StageConfig::from_bytes(c.to_bytes().as_slice()).unwrap(), c);
        // Without owners or users the config is byte for byte what it was (image digests hold).
        let plain =
            config_of(&parse("version: 1.0.0\nfiles:\n  - path: bin/x\n    target: /usr/local/bin/x\n").unwrap());
        let text = String::from_utf8(plain.to_bytes()).unwrap();
        assert!(!text.contains("owner") && !text.contains("users"), "{text}");
        for (bad, field) in [
            ("files:\n  - path: x\n    target: /opt/x\n    owner: -1\n", "-1 is not a user or group number"),
            ("files:\n  - path: x\n    target: /opt/x\n    owner: a b\n", "is not a user or group"),
            ("files:\n  - path: x\n    target: /opt/x\n    group: [1]\n", "a user or group name, or a number"),
            ("users:\n  - name: a\n  - name: a\n", "users[1].name"),
            ("users:\n  - name: a\n    uid: 0\n", "users[0].uid"),
            ("users:\n  - name: a\n    shell: /bin/sh\n", "shell"),
        ] {
            let e = parse(&format!("version: 1.0.0\n{bad}")).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_name_their_recipients() {
        let r = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
        let secret =
            "files:\n  - path: secrets/token.age\n    target: /etc/op-dbus/token\n    type: secret\n    owner: 42\n";
        let def = parse(&format!("version: 1.0.0\nrecipients: [{r}]\n{secret}")).unwrap();
        assert_eq!(def.files[0].kind, FileType::Secret);
        assert_eq!(def.files[0].kind.as_str(), "secret");
        assert_eq!(def.files[0].secret_mode().bits(), 0o600);
        assert_eq!(def.recipients, [r]);
        // An inventory tag stands for the recipients of its hosts (resolved by the builder).
        assert!(parse(&format!("version: 1.0.0\nrecipients: [\"@web\"]\n{secret}")).is_ok());
        assert!(parse(&format!("version: 1.0.0\nrecipients: [\"@a b\"]\n{secret}")).is_err());
        // Without recipients, or with one that is not an age recipient: refused.
        let e = parse(&format!("version: 1.0.0\n{secret}")).unwrap_err().to_string();
        assert!(e.contains("files[0].type") && e.contains("recipients"), "{e}");
        for bad in ["age1", "AGE1QL3Z7HJY54PW3HYWW5AYYFG7ZQGVC7W3J2ELW8ZMRJ2KG5SFN9AQMCAC8P", &r.replace('q', "b")] {
            let e = parse(&format!("version: 1.0.0\nrecipients: [\"{bad}\"]\n{secret}")).unwrap_err().to_string();
            assert!(e.contains("recipients[0]"), "{bad}: {e}");
        }
        // A secret is a staged regular file, like a copy.
        use EntryKind::*;
        let c = config(
            &format!("recipients: [{r}]\n{secret}"),
            vec![entry("secrets", Dir, None), entry("secrets/token.age", Dir, None)],
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("type: secret") && e.contains("directory"), "{e}");
        let c = config(
            &format!("recipients: [{r}]\n{secret}"),
            vec![entry("secrets", Dir, None), entry("secrets/token.age", File, None)],
        );
        c.validate().unwrap();
        assert!(String::from_utf8(c.to_bytes()).unwrap().contains(r#""type":"secret""#));
    }

    fn config_of(def: &StageDefinition) -> StageConfig {
        let mut entries = std::collections::BTreeMap::new();
        for f in &def.files {
            for a in f.path.ancestors() {
                entries.insert(a.clone(), entry(a.as_str(), EntryKind::Dir, None));
            }
            entries.insert(f.path.clone(), entry(f.path.as_str(), EntryKind::File, None));
        }
        StageConfig::from_definition("s".parse().unwrap(), def, entries.into_values().collect())
    }

    #[test]
    fn timeouts() {
        for (s, secs) in
            [("30s", 30), ("5m", 300), ("1h", 3600), ("45", 45), ("1s", 1), ("24h", 86400), ("1440m", 86400)]
        {
            assert_eq!(s.parse::<Timeout>().unwrap().duration(), Duration::from_secs(secs), "{s}");
        }
        for bad in ["0s", "0", "86401", "25h", "1441m", "", "s", "1d", "-1s", "1.5s", "18446744073709551615h"] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad}");
        }
        assert_eq!(Timeout::default().duration(), Duration::from_secs(30));
        assert_eq!(String::from("5m".parse::<Timeout>().unwrap()), "300s");
        assert_eq!(format!("{:?}", "1h".parse::<Timeout>().unwrap()), "3600s");
        let def = parse("version: 1.0.0\nverify:\n  - command: x\n    timeout: 5m\n").unwrap();
        assert_eq!(def.verify[0].timeout.duration(), Duration::from_secs(300));
        assert_eq!(parse("version: 1.0.0\nverify:\n  - command: x\n").unwrap().verify[0].timeout, Timeout::default());
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        // Text fields: at most MAX_TEXT bytes, not empty, no NUL.
        let text = |s: &str| format!("version: 1.0.0\ndescription: \"{s}\"\n");
        assert!(parse(&text(&"d".repeat(MAX_TEXT))).is_ok());
        assert!(parse(&text(&"d".repeat(MAX_TEXT + 1))).unwrap_err().to_string().contains("description"));
        assert!(parse(&text("  ")).is_err());
        assert!(parse(&text("a\\0b")).is_err());
        // Lists: at most MAX_LIST entries.
        let plugins = |n: usize| format!("version: 1.0.0\nplugins: [{}]\n", vec!["p"; n].join(", "));
        assert!(parse(&plugins(MAX_LIST)).is_ok());
        assert!(parse(&plugins(MAX_LIST + 1)).unwrap_err().to_string().contains("plugins"));
        // Words (plugins, component, features): 128 bytes of [A-Za-z0-9._-].
        let word = |w: &str| format!("version: 1.0.0\ncomponent: \"{w}\"\n");
        assert!(parse(&word(&"w".repeat(128))).is_ok());
        assert!(parse(&word(&"w".repeat(129))).is_err());
        assert!(parse(&word("a b")).is_err());
        // Units: a known suffix, 255 bytes at most, no leading dot.
        let unit = |u: &str| format!("version: 1.0.0\nservices: [\"{u}\"]\n");
        assert!(parse(&unit("op-dbus.service")).is_ok());
        assert!(parse(&unit(&format!("{}.service", "u".repeat(247)))).is_ok());
        assert!(parse(&unit(&format!("{}.service", "u".repeat(248)))).is_err());
        for bad in [".service", ".x.service", "op-dbus", "a/b.service", "op dbus.service", "-H.service"] {
            assert!(parse(&unit(bad)).is_err(), "{bad}");
        }
        // expect_exit 0 to 255.
        let exit = |n: i64| format!("version: 1.0.0\nverify:\n  - command: x\n    expect_exit: {n}\n");
        assert!(parse(&exit(255)).is_ok());
        assert!(parse(&exit(256)).is_err());
        assert!(parse(&exit(-1)).is_err());
        // Entries of a config: at most MAX_ENTRIES (checked before anything else about them).
        let mut c = config("", Vec::new());
        c.entries = vec![entry("x", EntryKind::Dir, None); MAX_ENTRIES + 1];
        assert!(c.validate().unwrap_err().to_string().contains(&format!("more than {MAX_ENTRIES}")));
        // Exactly MAX_ENTRIES pass the count (these then fail as repeats).
        c.entries.pop();
        assert!(c.validate().unwrap_err().to_string().contains("not sorted or not unique"));
        // Config bytes: at most MAX_CONFIG_BYTES.
        let big = vec![b' '; MAX_CONFIG_BYTES as usize + 1];
        assert!(matches!(StageConfig::from_bytes(&big), Err(ConfigError::TooLarge)));
        // Exactly the limit is parsed (JSON may end in whitespace).
        let mut at = config("", Vec::new()).to_bytes();
        at.resize(MAX_CONFIG_BYTES as usize, b' ');
        assert!(StageConfig::from_bytes(&at).is_ok());
    }

    #[test]
    fn targets_may_not_repeat_or_nest() {
        let files = |a: &str, b: &str| {
            format!("version: 1.0.0\nfiles:\n  - path: a\n    target: {a}\n  - path: b\n    target: {b}\n")
        };
        assert!(parse(&files("/opt/a", "/opt/b")).is_ok());
        assert!(parse(&files("/opt/a", "/opt/a")).unwrap_err().to_string().contains("two entries"));
        assert!(parse(&files("/opt/a", "/opt/a/b")).unwrap_err().to_string().contains("lies inside"));
        assert!(parse(&files("/opt/ab", "/opt/a")).is_ok());
        let twice = "version: 1.0.0\nfiles:\n  - path: a\n    target: /opt/a\n  - path: a\n    target: /opt/b\n";
        assert!(parse(twice).unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn definitions_are_read_from_regular_files_only_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let text = "version: 1.0.0\n";
        let real = d.path().join("manifest.yaml");
        std::fs::write(&real, text).unwrap();
        assert_eq!(StageDefinition::read(&real).unwrap().version.to_string(), "1.0.0");
        // Through a symlink: refused as one, not followed.
        let link = d.path().join("link.yaml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = StageDefinition::read(&link).unwrap_err();
        assert!(matches!(e, ManifestError::NotRegular { kind: "a symlink", .. }), "{e}");
        // A missing file is an I/O error, not a symlink.
        let e = StageDefinition::read(&d.path().join("missing.yaml")).unwrap_err();
        assert!(matches!(e, ManifestError::Io { .. }), "{e}");
        let e = StageDefinition::read(d.path()).unwrap_err();
        assert!(matches!(e, ManifestError::NotRegular { kind: "a directory", .. }), "{e}");
        // A FIFO is refused without waiting for a writer.
        let fifo = d.path().join("fifo.yaml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = StageDefinition::read(&fifo).unwrap_err();
        assert!(matches!(e, ManifestError::NotRegular { kind: "a FIFO, socket or device", .. }), "{e}");
        // Exactly the limit is read (YAML may end in blank lines); one byte more is refused.
        let at = format!("{text}{}", "\n".repeat(MAX_DEFINITION_BYTES as usize - text.len()));
        std::fs::write(&real, &at).unwrap();
        assert_eq!(StageDefinition::read(&real).unwrap().version.to_string(), "1.0.0");
        std::fs::write(&real, at + "\n").unwrap();
        let e = StageDefinition::read(&real).unwrap_err();
        assert!(matches!(e, ManifestError::TooLarge { max: MAX_DEFINITION_BYTES, .. }), "{e}");
    }

    #[test]
    fn link_chains_of_forty_resolve_and_longer_ones_are_refused() {
        use EntryKind::*;
        // l00 -> l01 -> ... -> lNN -> z: as many hops as names before `z`.
        let chain = |hops: usize| {
            let mut entries: Vec<Entry> =
                (0..hops).map(|i| entry(&format!("l{i:02}"), Symlink, Some(&format!("l{:02}", i + 1)))).collect();
            entries.last_mut().unwrap().link = Some("z".into());
            entries.push(entry("z", File, None));
            config("", entries)
        };
        let l00: RelPath = "l00".parse().unwrap();
        assert_eq!(chain(40).resolve_links(&l00).unwrap(), "z");
        let e = chain(41).resolve_links(&l00).unwrap_err();
        assert!(e.contains("more than 40 links"), "{e}");
    }
}
