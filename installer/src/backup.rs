//! Backups of what the stages leave on a host that no image holds: the `data:` paths the
//! services write and every `copy` / `copy-if-not-exists` (and secret) target as it is now
//! (an operator's edited config). One backup is a tar+zstd archive, optionally an age
//! stream to X25519 recipients (stock `age -d -i IDENTITY` decrypts it), with a manifest of
//! every entry (path, type, owner, mode, time, size, sha256) inside and a summary beside it:
//!
//! ```text
//! ROOT/var/lib/op-dbus/backups/          0700, never in a snapshot
//!   <NAME>.tar.zst | <NAME>.tar.zst.age  root/<target path>... entries, then backup.json
//!   <NAME>.json                          the summary: time, host, stages, sizes, the
//!                                        archive's sha256, every entry (a secret's sha256
//!                                        only inside the encrypted archive)
//! ```
//!
//! Writing streams (memory does not grow with the data): every file is read through the
//! root ([`Host::lstat`]; a link on the way that root does not own is refused, and no link
//! inside a data directory is followed), hashed as it passes into the archive, and the
//! archive is hashed as it is written. Reading checks every entry against the manifest and
//! the archive against its summary; what does not match is reported, never trusted.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, FileType as RawType, Mode as RawMode, OFlags};
use serde::{Deserialize, Serialize};

use formats::digest::{Digest, HashingReader, HashingWriter};
use formats::manifest::{EntryKind, Mode};
use formats::path::TargetPath;
use formats::{StageName, Version};

use crate::error::{Malformed, NotFound, Untrusted, Usage};
use crate::host::Host;

/// Where backups are kept, relative to the root.
pub const DIR: &str = "var/lib/op-dbus/backups";
/// The host identity the secrets of this host are decrypted with, relative to the root.
pub const HOST_IDENTITY: &str = "etc/op-dbus/host.age";
/// The manifest's name inside the archive (its last entry).
const MANIFEST: &str = "backup.json";
/// What every entry's name inside the archive starts with.
const TOP: &str = "root/";
/// Most entries one backup holds.
pub const MAX_ENTRIES: usize = 1_000_000;
/// The largest manifest or summary read.
const MAX_MANIFEST: u64 = 256 << 20;
/// The largest identity or recipients file read.
const MAX_KEY_FILE: u64 = 1 << 20;
/// Deepest directory tree saved.
const MAX_DEPTH: u32 = 256;

/// Where an entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A `data:` path of the stage (or something inside it).
    Data,
    Copy,
    CopyIfNotExists,
    /// A `type: secret` target (only with `--include-secrets`, only encrypted).
    Secret,
}

/// One saved path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub path: TargetPath,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub stage: StageName,
    pub source: Source,
    pub mode: Mode,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Files: the content's sha256 (in the summary, absent for secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    /// Symlinks: the link text (restored as it is, never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// A stage a backup holds, in the version active when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRef {
    pub name: StageName,
    pub version: Version,
}

/// The manifest inside the archive (and, with the archive's own digest added, the summary
/// beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    /// When it was taken (UTC, RFC 3339).
    pub created: String,
    pub host: String,
    pub stages: Vec<StageRef>,
    /// Whether secret targets are in it.
    pub secrets: bool,
    /// Entries in the order they were saved (a directory before what it holds).
    pub items: Vec<Item>,
}

/// `<NAME>.json`: the manifest and what the archive file is. (Not `deny_unknown_fields`:
/// serde does not support it with `flatten`; the summary is checked against the manifest
/// inside the archive instead.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(flatten)]
    pub manifest: Manifest,
    /// The archive's file name beside this one.
    pub archive: String,
    pub encrypted: bool,
    /// The age recipients it is encrypted to.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// The archive file's size and sha256 (what `backup verify` checks without a key).
    pub archive_bytes: u64,
    pub archive_sha256: Digest,
    /// The bytes of the files saved.
    pub bytes: u64,
}

impl Manifest {
    pub const SCHEMA_VERSION: u32 = 1;

    /// The bytes of the files saved.
    pub fn bytes(&self) -> u64 {
        self.items.iter().filter_map(|i| i.size).sum()
    }

    /// Checks what the types cannot: schema, entries sorted, unique and bounded, fields
    /// fitting each entry's type.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.schema_version != Self::SCHEMA_VERSION {
            return Err(format!("schema_version {} is not supported (expected 1)", self.schema_version));
        }
        check_name(&self.name)?;
        if self.items.len() > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for it in &self.items {
            if !seen.insert(&it.path) {
                return Err(format!("entry {} is listed twice", it.path));
            }
            let fits = match it.kind {
                EntryKind::File => it.size.is_some() && it.link.is_none(),
                EntryKind::Dir => it.size.is_none() && it.sha256.is_none() && it.link.is_none(),
                EntryKind::Symlink => {
                    it.size.is_none() && it.sha256.is_none() && it.link.as_ref().is_some_and(|l| valid_link(l))
                }
            };
            if !fits || it.mtime_nsec >= 1_000_000_000 {
                return Err(format!("entry {}: its fields do not fit a {}", it.path, it.kind.noun()));
            }
        }
        // Nothing is saved through a link (a data directory's links are saved, never
        // followed): an entry below a saved link would be written through it on restore.
        let links: std::collections::BTreeSet<&TargetPath> =
            self.items.iter().filter(|i| i.kind == EntryKind::Symlink).map(|i| &i.path).collect();
        for it in &self.items {
            if let Some(l) = crate::plan::ancestors(&it.path).iter().find(|a| links.contains(a)) {
                return Err(format!("entry {} lies below the saved link {l}", it.path));
            }
        }
        Ok(())
    }
}

fn valid_link(l: &str) -> bool {
    !l.is_empty() && l.len() <= 4096 && !l.contains('\0')
}

/// A backup's name: letters, digits, '.', '_', '-', not starting with '.' or '-'.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok { Ok(()) } else { Err(format!("{name:?} is not a backup name (as `backup list` shows them)")) }
}

/// The backups directory (made 0700 when `create`).
pub fn dir(host: &Host, create: bool) -> Result<Option<PathBuf>> {
    if create {
        let d = host.ensure_dir(DIR).with_context(|| format!("creating /{DIR}"))?;
        fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("making {} private", d.display()))?;
        return Ok(Some(d));
    }
    match host.resolve(DIR) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening /{DIR}")),
    }
}

fn summary_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Every backup, oldest first. A summary that cannot be read is an error naming it.
pub fn list(host: &Host) -> Result<Vec<Summary>> {
    let Some(dir) = dir(host, false)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = n.strip_suffix(".json")
            && check_name(name).is_ok()
        {
            out.push(read_summary(&dir, name)?);
        }
    }
    out.sort_by(|a, b| (&a.manifest.created, &a.manifest.name).cmp(&(&b.manifest.created, &b.manifest.name)));
    Ok(out)
}

/// The summary of backup `name` (exit 2 when there is none).
pub fn find(host: &Host, name: &str) -> Result<(PathBuf, Summary)> {
    check_name(name).map_err(Usage)?;
    let missing = || NotFound(format!("there is no backup {name}: `op-dbus-stage backup list` shows them"));
    let dir = dir(host, false)?.ok_or_else(missing)?;
    if !summary_file(&dir, name).exists() {
        return Err(missing().into());
    }
    let s = read_summary(&dir, name)?;
    Ok((dir, s))
}

fn read_summary(dir: &Path, name: &str) -> Result<Summary> {
    let p = summary_file(dir, name);
    let f = fs::File::open(&p).with_context(|| format!("reading {}", p.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_MANIFEST + 1).read_to_end(&mut buf).with_context(|| format!("reading {}", p.display()))?;
    let bad = |why: String| Malformed(format!("{} is not a backup summary: {why}", p.display()));
    if buf.len() as u64 > MAX_MANIFEST {
        return Err(bad(format!("larger than {MAX_MANIFEST} bytes")).into());
    }
    let s: Summary = serde_json::from_slice(&buf).map_err(|e| bad(e.to_string()))?;
    s.manifest.validate().map_err(bad)?;
    let want = archive_name(name, s.encrypted);
    if s.manifest.name != name || s.archive != want {
        return Err(bad(format!("it names {} / {}, not {name} / {want}", s.manifest.name, s.archive)).into());
    }
    Ok(s)
}

/// The archive's file name.
pub fn archive_name(name: &str, encrypted: bool) -> String {
    if encrypted { format!("{name}.tar.zst.age") } else { format!("{name}.tar.zst") }
}

/// A name for a backup taken now that no backup has yet.
pub fn fresh_name(dir: &Path) -> String {
    let base = format!("backup-{}", jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ"));
    let mut name = base.clone();
    let mut n = 1;
    while summary_file(dir, &name).exists()
        || dir.join(archive_name(&name, false)).exists()
        || dir.join(archive_name(&name, true)).exists()
    {
        n += 1;
        name = format!("{base}-{n}");
    }
    name
}

/// Removes a backup's files (the summary last: a crash leaves an archive without one,
/// which `list` does not show and the next `create` or `prune` removes).
pub fn remove(dir: &Path, s: &Summary) -> Result<()> {
    for p in [dir.join(&s.archive), summary_file(dir, &s.manifest.name)] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    fsx::sync_dir(dir)?;
    Ok(())
}

/// Removes what a killed `create` left: temp archives and archives without a summary.
pub fn remove_leftovers(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        let orphan = [".tar.zst", ".tar.zst.age"]
            .iter()
            .filter_map(|x| n.strip_suffix(x))
            .any(|name| check_name(name).is_ok() && !summary_file(dir, name).exists());
        if n.starts_with(".tmp-") || orphan {
            fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Keys

/// Parses `age1...` recipients: each `--recipient`, then each line of each recipients file
/// (blank lines and `#` comments skipped). Only X25519 recipients are taken.
pub fn recipients(given: &[String], files: &[PathBuf]) -> Result<Vec<age::x25519::Recipient>> {
    let mut out = Vec::new();
    let parse = |s: &str, from: &str| -> Result<age::x25519::Recipient> {
        s.parse::<age::x25519::Recipient>().map_err(|e| {
            Usage(format!("{from}: {:?} is not an age X25519 recipient (age1...): {e}", excerpt(s))).into()
        })
    };
    for r in given {
        out.push(parse(r.trim(), "--recipient")?);
    }
    for f in files {
        let text = read_key_file(f)?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            out.push(parse(line, &f.display().to_string())?);
        }
    }
    Ok(out)
}

fn excerpt(s: &str) -> String {
    s.chars().take(24).collect()
}

fn read_key_file(path: &Path) -> Result<String> {
    let f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_KEY_FILE + 1).read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(Malformed(format!("{} is larger than {MAX_KEY_FILE} bytes", path.display())).into());
    }
    Ok(text)
}

/// An identity to decrypt backups with: a file of age identities (`AGE-SECRET-KEY-1...`).
pub struct Identities {
    pub file: PathBuf,
    list: Vec<Box<dyn age::Identity>>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({})", self.file.display())
    }
}

/// The identity file given, else the host's (ROOT/etc/op-dbus/host.age) when it exists.
/// A private key readable by group or others is refused (exit 3), as a signing key is.
pub fn identities(host: &Host, given: Option<&Path>, recipients: &[String]) -> Result<Option<Identities>> {
    let file = match given {
        Some(p) => p.to_owned(),
        None => match host.resolve(HOST_IDENTITY) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening /{HOST_IDENTITY}")),
        },
    };
    if given.is_none() && !host_is_recipient(&file, recipients) {
        // The host's own identity is the default only for a backup made to it: one made to
        // another key is read with `--identity`, never tried with the host's.
        return Ok(None);
    }
    let meta = fs::metadata(&file).with_context(|| format!("reading {}", file.display()))?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        return Err(Untrusted(format!(
            "{} is readable by group or others: a private key must be mode 0600 (chmod 600 it)",
            file.display()
        ))
        .into());
    }
    let text = read_key_file(&file)?;
    let bad = |e: &dyn std::fmt::Display| Malformed(format!("{} is not an age identity file: {e}", file.display()));
    let list =
        age::IdentityFile::from_buffer(text.as_bytes()).map_err(|e| bad(&e))?.into_identities().map_err(|e| bad(&e))?;
    if list.is_empty() {
        return Err(bad(&"it holds no identity").into());
    }
    Ok(Some(Identities { file, list }))
}

/// Whether the host identity in `file` is one of `recipients` (false when it cannot be read:
/// [`identities`] then says nothing of it, as if it were not there).
fn host_is_recipient(file: &Path, recipients: &[String]) -> bool {
    read_key_file(file)
        .ok()
        .and_then(|text| keys::secret::HostIdentity::parse(text.as_bytes()).ok())
        .is_some_and(|id| recipients.iter().any(|r| r == id.recipient().as_str()))
}

// ---------------------------------------------------------------------------------------
// Writing

/// Where the archive goes: the file, hashed, through age when encrypted.
enum Sink {
    Plain(HashingWriter<fs::File>),
    Age(age::stream::StreamWriter<HashingWriter<fs::File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Age(w) => w.flush(),
        }
    }
}

impl Sink {
    fn finish(self) -> io::Result<HashingWriter<fs::File>> {
        match self {
            Sink::Plain(w) => Ok(w),
            Sink::Age(w) => w.finish(),
        }
    }
}

/// What to save of one stage.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub path: TargetPath,
    pub stage: StageName,
    pub source: Source,
}

/// Writes a backup archive of `wanted` (sorted by path) into `out`; returns the manifest
/// (with `items`) and notes on what was left out. `name`, `created`, `host`, `stages` go
/// into the manifest as given.
pub struct Writer {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, Sink>>,
    pub manifest: Manifest,
    pub notes: Vec<String>,
    saved: std::collections::BTreeSet<TargetPath>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer({})", self.manifest.name)
    }
}

impl Writer {
    /// Starts an archive in `file`, encrypted to `recipients` when there are any.
    pub fn new(file: fs::File, recipients: &[age::x25519::Recipient], manifest: Manifest) -> Result<Writer> {
        let hashed = HashingWriter::new(file);
        let sink = if recipients.is_empty() {
            Sink::Plain(hashed)
        } else {
            let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .context("setting up the encryption")?;
            Sink::Age(enc.wrap_output(hashed).context("writing the age header")?)
        };
        let mut z = zstd::stream::write::Encoder::new(sink, 3).context("starting zstd")?;
        z.include_checksum(true)?;
        let mut tar = tar::Builder::new(z);
        tar.mode(tar::HeaderMode::Complete);
        tar.follow_symlinks(false);
        Ok(Writer { tar, manifest, notes: Vec::new(), saved: std::collections::BTreeSet::new() })
    }

    /// Saves what is at `w.path` now (a directory with everything in it); a path that is
    /// not there is noted, not an error.
    pub fn add(&mut self, host: &Host, w: &Wanted) -> Result<()> {
        let Some((dir, name, st)) = host.lstat(&w.path).with_context(|| format!("reading {}", w.path))? else {
            self.notes.push(format!("{} ({} of {}) is not there: not saved", w.path, source_noun(w.source), w.stage));
            return Ok(());
        };
        self.entry(&dir, &name, &st, &w.path, w, 0)
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        name: &str,
        st: &rustix::fs::Stat,
        path: &TargetPath,
        w: &Wanted,
        depth: u32,
    ) -> Result<()> {
        if self.manifest.items.len() >= MAX_ENTRIES {
            bail!("more than {MAX_ENTRIES} entries to save: back up fewer stages at a time");
        }
        if !self.saved.insert(path.clone()) {
            // Saved already (a placed file inside a data directory): once is enough.
            return Ok(());
        }
        let mut item = Item {
            path: path.clone(),
            kind: EntryKind::File,
            stage: w.stage.clone(),
            source: w.source,
            mode: Mode::new(st.st_mode & 0o7777).expect("masked"),
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            size: None,
            sha256: None,
            link: None,
        };
        let mut header = tar::Header::new_gnu();
        header.set_mode(item.mode.bits());
        header.set_uid(u64::from(item.uid));
        header.set_gid(u64::from(item.gid));
        header.set_mtime(u64::try_from(item.mtime).unwrap_or(0));
        let tar_path = format!("{TOP}{}", path.relative());
        match RawType::from_raw_mode(st.st_mode) {
            RawType::RegularFile => {
                let f = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    RawMode::empty(),
                )
                .with_context(|| format!("opening {path}"))?;
                let now = rustix::fs::fstat(&f)?;
                if RawType::from_raw_mode(now.st_mode) != RawType::RegularFile || now.st_ino != st.st_ino {
                    bail!("{path} changed while it was being saved: run the backup again");
                }
                let size = now.st_size as u64;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                let mut r = HashingReader::new(fs::File::from(f).take(size));
                self.tar.append_data(&mut header, &tar_path, &mut r).with_context(|| format!("saving {path}"))?;
                let (digest, len, _) = r.finish();
                if len != size {
                    bail!("{path} shrank while it was being saved: stop what writes it, or run the backup again");
                }
                item.size = Some(size);
                item.sha256 = Some(digest);
                self.manifest.items.push(item);
            }
            RawType::Symlink => {
                let text = rustix::fs::readlinkat(dir, name, Vec::new()).with_context(|| format!("reading {path}"))?;
                let text = text.to_string_lossy().into_owned();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                self.tar.append_link(&mut header, &tar_path, &text).with_context(|| format!("saving {path}"))?;
                item.kind = EntryKind::Symlink;
                item.link = Some(text);
                self.manifest.items.push(item);
            }
            RawType::Directory => {
                if depth > MAX_DEPTH {
                    bail!("{path}: a directory tree deeper than {MAX_DEPTH} levels");
                }
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                self.tar.append_data(&mut header, &tar_path, io::empty()).with_context(|| format!("saving {path}"))?;
                item.kind = EntryKind::Dir;
                self.manifest.items.push(item);
                let d = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    RawMode::empty(),
                )
                .with_context(|| format!("opening {path}"))?;
                let mut names: Vec<String> = Vec::new();
                for e in rustix::fs::Dir::read_from(&d).with_context(|| format!("reading {path}"))? {
                    let e = e?;
                    let n = e.file_name().to_bytes();
                    if n == b"." || n == b".." {
                        continue;
                    }
                    match std::str::from_utf8(n) {
                        Ok(s) => names.push(s.to_owned()),
                        Err(_) => self.notes.push(format!("{path}: an entry whose name is not UTF-8: not saved")),
                    }
                }
                names.sort();
                for n in names {
                    let Ok(child) = TargetPath::parse(&format!("{path}/{n}")) else {
                        self.notes.push(format!("{path}/{n}: not a path the installer writes: not saved"));
                        continue;
                    };
                    let st = match rustix::fs::statat(&d, n.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => st,
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(e) => return Err(io::Error::from(e)).with_context(|| format!("reading {child}")),
                    };
                    self.entry(&d, &n, &st, &child, w, depth + 1)?;
                }
            }
            _ => self.notes.push(format!("{path} is a device, FIFO or socket: not saved")),
        }
        Ok(())
    }

    /// Writes the manifest and ends the archive; returns the manifest, the notes and the
    /// archive file's size and sha256.
    pub fn finish(mut self) -> Result<(Manifest, Vec<String>, u64, Digest, fs::File)> {
        let bytes = serde_json::to_vec_pretty(&self.manifest).expect("manifest serializes");
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o600);
        header.set_size(bytes.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut header, MANIFEST, &bytes[..])?;
        let z = self.tar.into_inner().context("ending the archive")?;
        let sink = z.finish().context("ending the zstd stream")?;
        let hashed = sink.finish().context("ending the age stream")?;
        let (digest, len, file) = hashed.finish();
        Ok((self.manifest, self.notes, len, digest, file))
    }
}

fn source_noun(s: Source) -> &'static str {
    match s {
        Source::Data => "data",
        Source::Copy => "copy",
        Source::CopyIfNotExists => "copy-if-not-exists target",
        Source::Secret => "secret",
    }
}

// ---------------------------------------------------------------------------------------
// Reading

/// An entry of an archive as read: type, size and sha256 (files), link text (symlinks).
pub type Found = (EntryKind, Option<u64>, Option<Digest>, Option<String>);

/// What reading an archive found.
#[derive(Debug, Default)]
pub struct Checked {
    /// The manifest inside, when it was read.
    pub manifest: Option<Manifest>,
    /// Entries found, by path: type, size, sha256 (files), link text.
    pub found: BTreeMap<TargetPath, Found>,
    /// The archive file's sha256 and size.
    pub archive: Option<(Digest, u64)>,
    /// What does not match or could not be read.
    pub problems: Vec<String>,
}

/// Reads the archive of `s` in `dir`: hashes the file, decrypts it with `ids` when it is
/// encrypted (without them only the file's digest is checked), checks every entry against
/// the summary and the manifest inside. `sink` gets each file's content (for restoring),
/// with its index in the summary's items.
pub fn read(
    dir: &Path,
    s: &Summary,
    ids: Option<&Identities>,
    mut sink: impl FnMut(usize, &mut dyn Read) -> Result<()>,
) -> Result<Checked> {
    let p = dir.join(&s.archive);
    let file = fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
    let mut hashed = HashingReader::new(io::BufReader::new(file));
    let mut out = Checked::default();
    let mut decode = |hashed: &mut HashingReader<io::BufReader<fs::File>>, out: &mut Checked| -> Result<()> {
        let plain: Box<dyn Read + '_> = if s.encrypted {
            let Some(ids) = ids else { return Ok(()) };
            let d = match age::Decryptor::new(hashed) {
                Ok(d) => d,
                Err(e) => {
                    out.problems.push(format!("the age header does not read: {e}"));
                    return Ok(());
                }
            };
            match d.decrypt(ids.list.iter().map(|i| i.as_ref() as &dyn age::Identity)) {
                Ok(r) => Box::new(r),
                Err(age::DecryptError::NoMatchingKeys) => {
                    return Err(Untrusted(format!(
                        "{} cannot decrypt backup {}: it is encrypted to {}",
                        ids.file.display(),
                        s.manifest.name,
                        s.recipients.join(", ")
                    ))
                    .into());
                }
                Err(e) => {
                    out.problems.push(format!("decrypting: {e}"));
                    return Ok(());
                }
            }
        } else {
            Box::new(hashed)
        };
        let z = zstd::stream::read::Decoder::new(plain).context("starting zstd")?;
        let index: BTreeMap<&TargetPath, usize> =
            s.manifest.items.iter().enumerate().map(|(i, it)| (&it.path, i)).collect();
        let mut tar = tar::Archive::new(z);
        let entries = match tar.entries() {
            Ok(e) => e,
            Err(e) => {
                out.problems.push(format!("the archive does not read: {e}"));
                return Ok(());
            }
        };
        for e in entries {
            let mut e = match e {
                Ok(e) => e,
                Err(e) => {
                    out.problems.push(format!("the archive does not read: {e}"));
                    return Ok(());
                }
            };
            if out.manifest.is_some() {
                out.problems.push("entries after the manifest".into());
                return Ok(());
            }
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let kind = e.header().entry_type();
            if name == MANIFEST && kind == tar::EntryType::Regular {
                if e.size() > MAX_MANIFEST {
                    out.problems.push(format!("its manifest is larger than {MAX_MANIFEST} bytes"));
                    return Ok(());
                }
                let mut buf = Vec::new();
                if let Err(x) = e.read_to_end(&mut buf) {
                    out.problems.push(format!("the archive does not read: {x}"));
                    return Ok(());
                }
                match serde_json::from_slice::<Manifest>(&buf) {
                    Ok(m) => match m.validate() {
                        Ok(()) => out.manifest = Some(m),
                        Err(x) => out.problems.push(format!("its manifest is not valid: {x}")),
                    },
                    Err(x) => out.problems.push(format!("its manifest is not valid: {x}")),
                }
                continue;
            }
            let Some(path) = name.strip_prefix(TOP).and_then(|r| TargetPath::parse(&format!("/{r}")).ok()) else {
                out.problems.push(format!("an entry {:?} that is not a saved path", excerpt(&name)));
                return Ok(());
            };
            let Some(&i) = index.get(&path) else {
                out.problems.push(format!("{path} is in the archive but not in the summary"));
                continue;
            };
            if out.found.contains_key(&path) {
                out.problems.push(format!("{path} is in the archive twice"));
                return Ok(());
            }
            let want = &s.manifest.items[i];
            let got = match kind {
                tar::EntryType::Regular if want.kind == EntryKind::File => {
                    if Some(e.size()) != want.size {
                        out.problems.push(format!("{path}: {} bytes, the summary says {:?}", e.size(), want.size));
                        return Ok(());
                    }
                    let mut r = HashingReader::new(&mut e);
                    sink(i, &mut r)?;
                    io::copy(&mut r, &mut io::sink())?;
                    let (d, len, _) = r.finish();
                    if Some(len) != want.size {
                        out.problems.push(format!("{path} is cut short"));
                        return Ok(());
                    }
                    (EntryKind::File, Some(len), Some(d), None)
                }
                tar::EntryType::Directory if want.kind == EntryKind::Dir => (EntryKind::Dir, None, None, None),
                tar::EntryType::Symlink if want.kind == EntryKind::Symlink => {
                    let l = e.link_name_bytes().map(|b| String::from_utf8_lossy(&b).into_owned());
                    (EntryKind::Symlink, None, None, l)
                }
                other => {
                    out.problems.push(format!("{path} is a {other:?} entry, the summary says a {}", want.kind.noun()));
                    continue;
                }
            };
            out.found.insert(path, got);
        }
        Ok(())
    };
    let decoded = decode(&mut hashed, &mut out);
    if let Err(e) = decoded {
        if e.chain().any(|c| c.is::<Untrusted>()) {
            return Err(e);
        }
        out.problems.push(format!("the archive does not read: {e:#}"));
    }
    // The rest of the file (all of it when it was not decrypted), for its digest.
    io::copy(&mut hashed, &mut io::sink()).with_context(|| format!("reading {}", p.display()))?;
    let (digest, len, _) = hashed.finish();
    out.archive = Some((digest, len));
    if digest != s.archive_sha256 || len != s.archive_bytes {
        out.problems.insert(
            0,
            format!(
                "the archive file {} is not what was written ({} bytes, sha256 {}; written: {} bytes, {})",
                s.archive, len, digest, s.archive_bytes, s.archive_sha256
            ),
        );
    }
    if s.encrypted && ids.is_none() {
        return Ok(out);
    }
    compare(s, &mut out);
    Ok(out)
}

/// Every entry of the summary against what the archive held and its manifest said.
fn compare(s: &Summary, out: &mut Checked) {
    let Some(m) = out.manifest.clone() else {
        if out.problems.is_empty() {
            out.problems.push("the archive ends before its manifest".into());
        }
        return;
    };
    if m.items.len() != s.manifest.items.len() || m.name != s.manifest.name || m.created != s.manifest.created {
        out.problems.push("the manifest inside differs from the summary beside it".into());
    }
    for (inner, it) in m.items.iter().zip(&s.manifest.items) {
        let mut beside = it.clone();
        if beside.source == Source::Secret {
            beside.sha256 = inner.sha256;
        }
        if *inner != beside {
            out.problems.push(format!("{}: the manifest inside differs from the summary beside it", it.path));
        }
    }
    for it in &m.items {
        match out.found.get(&it.path) {
            None => out.problems.push(format!("{} is missing from the archive", it.path)),
            Some((kind, size, sha, link)) => {
                if *kind != it.kind || *size != it.size || *link != it.link {
                    out.problems.push(format!("{} differs from its manifest entry", it.path));
                } else if *sha != it.sha256 {
                    out.problems.push(format!(
                        "{}: sha256 {} , the manifest says {}",
                        it.path,
                        sha.map(|d| d.to_string()).unwrap_or_default(),
                        it.sha256.map(|d| d.to_string()).unwrap_or_default()
                    ));
                }
            }
        }
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    fsx::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_words() {
        for ok in ["backup-20261130T063000Z", "backup-20261130T063000Z-2", "x.y_z"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    fn item(path: &str, kind: EntryKind) -> Item {
        Item {
            path: path.parse().unwrap(),
            kind,
            stage: "app".parse().unwrap(),
            source: Source::Data,
            mode: Mode::new(0o644).unwrap(),
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: (kind == EntryKind::File).then_some(1),
            sha256: (kind == EntryKind::File).then(|| Digest::of(b"x")),
            link: (kind == EntryKind::Symlink).then(|| "x".into()),
        }
    }

    #[test]
    fn a_manifest_is_sorted_unique_and_fits_its_types() {
        let mut m = Manifest {
            schema_version: 1,
            name: "b".into(),
            created: String::new(),
            host: String::new(),
            stages: Vec::new(),
            secrets: false,
            items: vec![
                item("/opt/a", EntryKind::Dir),
                item("/opt/a/f", EntryKind::File),
                item("/opt/a/l", EntryKind::Symlink),
            ],
        };
        m.validate().unwrap();
        m.items.push(item("/opt/a", EntryKind::Dir));
        assert!(m.validate().unwrap_err().contains("twice"));
        m.items.pop();
        m.items[1].link = Some("y".into());
        assert!(m.validate().unwrap_err().contains("fit"));
        m.items[1].link = None;
        m.items[2].link = Some(String::new());
        assert!(m.validate().is_err());
        m.items[2].link = Some("x".into());
        // An entry below a saved link would be written through it.
        m.items.push(item("/opt/a/l/passwd", EntryKind::File));
        assert!(m.validate().unwrap_err().contains("below the saved link /opt/a/l"));
        m.items.pop();
        m.schema_version = 2;
        assert!(m.validate().is_err());
    }
}
