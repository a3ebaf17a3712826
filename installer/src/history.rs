//! The audit trail: `history.log` in `/var/lib/op-dbus/history/` (outside the staging
//! area, so that btrfs snapshots of it do not each carry a copy), one line per change, appended and
//! never rewritten, each line chained to the one before by a hash; `history.head` holds
//! the number and hash of the last entry, so that a log cut short is told from a complete
//! one.
//!
//! ```text
//! <hash> <entry as one line of JSON>
//! hash = sha256(<hash of the previous entry, 64 hex digits; zeros for the first> + " " + <the JSON bytes>)
//! ```
//!
//! The entry's JSON names its own number (`seq`, from 1) and the previous hash (`prev`), so
//! an entry moved, removed, inserted or edited breaks the chain where it happened. The chain
//! has no secret: it detects an edited or truncated log, not one rewritten whole together
//! with its head by someone who recomputes every hash.

use std::fs;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use formats::digest::Digest;
use formats::{StageName, Version};

use crate::state::State;
use std::path::Path;

/// Where the log lives, relative to the root (a reserved target: no stage may write it).
pub const DIR: &str = "var/lib/op-dbus/history";

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The longest line read back (an entry of a change of many stages with long messages).
pub const MAX_LINE: usize = 1 << 20;
/// The longest error message kept in an entry.
const MAX_ERROR: usize = 4096;

/// One generation as an entry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenRecord {
    pub version: Version,
    pub generation: u64,
    pub digest: Digest,
    /// Who signed it (key ids).
    pub signers: Vec<keys::KeyId>,
}

/// What a change did to one stage (`from` absent: deployed; `to` absent: removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub stage: StageName,
    pub from: Option<GenRecord>,
    pub to: Option<GenRecord>,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// The previous entry's hash ([`GENESIS`] for the first).
    pub prev: String,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Who ran it: the user id, and `$SUDO_USER` when set.
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo_user: Option<String>,
    /// The command, as reports name it (`deploy app:1.0.0`, `rollback app`, `gc --keep 2`).
    pub operation: String,
    /// `committed` or `rolled-back`.
    pub outcome: String,
    /// The transaction id the change committed as (or would have).
    pub txid: u64,
    /// Stages whose active generation changed, with who signed the new one.
    pub changes: Vec<Change>,
    /// Snapshots the change took.
    pub snapshots: Vec<String>,
    /// Snapshots pruned after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
    /// Why it was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The stages whose active generation differs between `before` and `after`.
pub fn changes(before: &State, after: &State) -> Vec<Change> {
    let rec = |s: &crate::state::StageState| GenRecord {
        version: s.active.version.clone(),
        generation: s.active.generation,
        digest: s.active.digest,
        signers: s.active.signers.clone(),
    };
    let names: std::collections::BTreeSet<&StageName> = before.stages.keys().chain(after.stages.keys()).collect();
    names
        .into_iter()
        .filter_map(|n| {
            let (from, to) = (before.stages.get(n).map(rec), after.stages.get(n).map(rec));
            (from != to).then(|| Change { stage: n.clone(), from, to })
        })
        .collect()
}

/// The entry of a change, not yet chained (`seq` and `prev` are set by [`append`]).
pub fn entry(operation: &str, outcome: &str, before: &State, after: &State, snapshots: Vec<String>) -> Entry {
    Entry {
        seq: 0,
        prev: String::new(),
        time: crate::ops::now(),
        uid: rustix::process::getuid().as_raw(),
        sudo_user: std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty() && u.len() <= 64),
        operation: operation.to_owned(),
        outcome: outcome.to_owned(),
        txid: after.txid,
        changes: changes(before, after),
        snapshots,
        pruned: Vec::new(),
        error: None,
    }
}

impl Entry {
    /// With the error that undid the change.
    pub fn failed(mut self, e: &anyhow::Error) -> Entry {
        let mut text = format!("{e:#}");
        if text.len() > MAX_ERROR {
            let mut cut = MAX_ERROR;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" [...]");
        }
        self.error = Some(text);
        self
    }
}

/// Records a committed change.
pub(crate) fn record(ctx: &crate::ops::Ctx, journal: &crate::txn::Journal) -> Result<()> {
    let e = entry(&journal.operation, "committed", &journal.before, &journal.after, snapshot_names(journal));
    append(&dir_of(ctx, true)?.expect("made"), e)
        .context("the change was committed, but recording it in history.log failed")?;
    Ok(())
}

/// Records a transaction an earlier command left unfinished and `recover` (or the next
/// changing command) finished: a change is recorded when it ends, so its entry was not
/// written yet. A failure to record is logged, not fatal: recovery must go on.
pub(crate) fn record_recovered(ctx: &crate::ops::Ctx, journal: &crate::txn::Journal, o: crate::txn::RecoverOutcome) {
    let (outcome, snaps) = match o {
        crate::txn::RecoverOutcome::Completed => ("committed", snapshot_names(journal)),
        crate::txn::RecoverOutcome::RolledBack => ("rolled-back", Vec::new()),
    };
    let operation = format!("recover {}", journal.operation);
    let e = entry(&operation, outcome, &journal.before, &journal.after, snaps);
    if let Err(e) = dir_of(ctx, true).and_then(|d| append(&d.expect("made"), e)) {
        tracing::warn!("recording the recovered transaction in history.log failed: {e:#}");
    }
}

/// Records a change that was undone; returns its error (with a note when the record
/// could not be written).
pub(crate) fn record_failed(ctx: &crate::ops::Ctx, journal: &crate::txn::Journal, e: anyhow::Error) -> anyhow::Error {
    let rec = entry(&journal.operation, "rolled-back", &journal.before, &journal.after, Vec::new()).failed(&e);
    match dir_of(ctx, true).and_then(|d| append(&d.expect("made"), rec)) {
        Ok(_) => e,
        Err(w) => e.context(format!("(and recording it in history.log failed: {w:#})")),
    }
}

/// Records a change outside the transactions: a `snapshots prune` that removed something
/// (`pruned`), a trust or feature edit of the policy.
pub(crate) fn record_event(ctx: &crate::ops::Ctx, operation: &str, pruned: &[String]) -> Result<()> {
    let state = ctx.state()?;
    let mut e = entry(operation, "committed", &state, &state, Vec::new());
    e.pruned = pruned.to_vec();
    append(&dir_of(ctx, true)?.expect("made"), e)
        .with_context(|| format!("`{operation}` was done, but recording it in history.log failed"))?;
    Ok(())
}

fn snapshot_names(journal: &crate::txn::Journal) -> Vec<String> {
    journal.cleanup.snapshots.iter().map(|(n, _)| n.clone()).collect()
}

fn log_file(dir: &Path) -> PathBuf {
    dir.join("history.log")
}

fn head_file(dir: &Path) -> PathBuf {
    dir.join("history.head")
}

/// The log's directory under the root of `ctx` (made when `create`).
pub fn dir_of(ctx: &crate::ops::Ctx, create: bool) -> Result<Option<PathBuf>> {
    if create {
        return Ok(Some(ctx.host.ensure_dir(DIR).with_context(|| format!("creating /{DIR}"))?));
    }
    match ctx.host.resolve(DIR) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening /{DIR}")),
    }
}

/// The last entry as `history.head` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// The hash of an entry's JSON bytes chained to `prev`.
pub fn hash(prev: &str, json: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(prev.len() + 1 + json.len());
    bytes.extend_from_slice(prev.as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(json);
    Digest::of(&bytes).hex()
}

/// The line of `entry` chained after `head`: the entry with its number and previous hash,
/// and the new head.
pub fn chain(head: &Head, mut entry: Entry) -> (String, Head) {
    entry.seq = head.seq + 1;
    entry.prev = head.hash.clone();
    let json = serde_json::to_string(&entry).expect("an entry serializes");
    let h = hash(&head.hash, json.as_bytes());
    (format!("{h} {json}\n"), Head { seq: entry.seq, hash: h })
}

fn read_head(dir: &Path) -> Result<Option<Head>> {
    let p = head_file(dir);
    match fs::read(&p) {
        Ok(b) if b.len() <= 4096 => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))?))
        }
        Ok(_) => anyhow::bail!("{} is too large", p.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Appends `entry` to the log. It chains to the head, not to whatever the log ends with,
/// so that a cut log stays detectable after later appends; only when the log holds one
/// entry past the head (a crash between the two writes) does it chain to that entry.
pub fn append(dir: &Path, entry: Entry) -> Result<Head> {
    let log = log_file(dir);
    let mut head = read_head(dir)?.unwrap_or(Head { seq: 0, hash: GENESIS.to_owned() });
    if let Some((h, e)) = last_line(dir)?
        && e.seq == head.seq + 1
        && e.prev == head.hash
        && hash(&e.prev, &serde_json::to_vec(&e).unwrap_or_default()) == h
    {
        head = Head { seq: e.seq, hash: h };
    }
    let (line, new_head) = chain(&head, entry);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    f.write_all(line.as_bytes()).with_context(|| format!("appending to {}", log.display()))?;
    f.sync_all()?;
    crate::faults::point("history");
    let bytes = serde_json::to_vec(&new_head).expect("a head serializes");
    fsx::write_atomic(&head_file(dir), &bytes).with_context(|| format!("writing {}", head_file(dir).display()))?;
    Ok(new_head)
}

/// The last well-formed line of the log, if any (the crash case of [`append`]).
fn last_line(dir: &Path) -> Result<Option<(String, Entry)>> {
    let Ok(f) = fs::File::open(log_file(dir)) else { return Ok(None) };
    let mut last = None;
    for line in bounded_lines(f) {
        last = Some(line?);
    }
    Ok(last.and_then(|l| split(&l).ok()).map(|(h, e, _)| (h, e)))
}

/// Lines of at most [`MAX_LINE`] bytes (a longer one is an error, never read whole).
fn bounded_lines(f: fs::File) -> impl Iterator<Item = Result<Vec<u8>>> {
    let mut r = std::io::BufReader::new(f);
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match std::io::Read::take(&mut r, MAX_LINE as u64 + 1).read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) if buf.len() > MAX_LINE => Some(Err(anyhow::anyhow!("a line longer than {MAX_LINE} bytes"))),
            Ok(_) => Some(Ok(buf)),
            Err(e) => Some(Err(e.into())),
        }
    })
}

/// A line's hash, entry and JSON bytes.
fn split(line: &[u8]) -> std::result::Result<(String, Entry, Vec<u8>), String> {
    let Some(body) = line.strip_suffix(b"\n") else { return Err("the line is cut (no newline)".into()) };
    let Some(sp) = body.iter().position(|&b| b == b' ') else { return Err("no hash before the entry".into()) };
    let (h, json) = (&body[..sp], &body[sp + 1..]);
    let h = std::str::from_utf8(h).map_err(|_| "the hash is not text".to_owned())?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(format!("{h:?} is not a sha256 hash"));
    }
    let e: Entry = serde_json::from_slice(json).map_err(|e| format!("the entry is not valid JSON: {e}"))?;
    Ok((h.to_owned(), e, json.to_vec()))
}

/// Every entry of the log, for `history` (not checked: see [`verify`]).
pub fn read(dir: &Path) -> Result<Vec<Entry>> {
    let Ok(f) = fs::File::open(log_file(dir)) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (i, line) in bounded_lines(f).enumerate() {
        let line = line?;
        match split(&line) {
            Ok((_, e, _)) => out.push(e),
            Err(why) => {
                anyhow::bail!("history.log line {}: {why}; check it with `op-dbus-stage history --verify`", i + 1)
            }
        }
    }
    Ok(out)
}

/// What `history --verify` found.
#[derive(Debug, Serialize)]
pub struct Verified {
    pub ok: bool,
    /// Entries that check out, from the first.
    pub entries: u64,
    /// The first problem: the line (1-based) and what is wrong there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Checks the chain from the first entry to the head: the first line that fails is named.
pub fn verify(dir: &Path) -> Result<Verified> {
    let head = read_head(dir)?;
    let mut prev = GENESIS.to_owned();
    let mut n = 0u64;
    let bad = |line: u64, n: u64, why: String| Verified { ok: false, entries: n, line: Some(line), problem: Some(why) };
    if let Ok(f) = fs::File::open(log_file(dir)) {
        for line in bounded_lines(f) {
            let line_no = n + 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => return Ok(bad(line_no, n, format!("{e:#}"))),
            };
            let (h, e, json) = match split(&line) {
                Ok(x) => x,
                Err(why) => return Ok(bad(line_no, n, why)),
            };
            if e.seq != line_no {
                return Ok(bad(line_no, n, format!("entry {} where entry {line_no} belongs", e.seq)));
            }
            if e.prev != prev {
                return Ok(bad(line_no, n, "it does not follow the entry before it (`prev` differs)".into()));
            }
            if hash(&prev, &json) != h {
                return Ok(bad(line_no, n, "its hash does not match its content (the entry was edited)".into()));
            }
            prev = h;
            n = line_no;
        }
    }
    match head {
        None if n == 0 => {}
        None => return Ok(bad(n, n, "history.head is missing".into())),
        Some(h) if h.seq == n && h.hash == prev => {}
        // A crash between appending the entry and writing the head.
        Some(h) if h.seq + 1 == n => {}
        Some(h) if h.seq > n => {
            return Ok(bad(
                n + 1,
                n,
                format!("the log ends after entry {n} but history.head names entry {}: it was truncated", h.seq),
            ));
        }
        Some(h) => {
            return Ok(bad(
                h.seq.min(n).max(1),
                n,
                format!("history.head names entry {} with another hash: the log or the head was changed", h.seq),
            ));
        }
    }
    Ok(Verified { ok: true, entries: n, line: None, problem: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().to_owned();
        (d, s)
    }

    fn add(s: &Path, op: &str) {
        append(s, entry(op, "committed", &State::new(), &State::new(), vec![])).unwrap();
    }

    #[test]
    fn an_intact_log_verifies_and_reads_back() {
        let (_d, s) = staging();
        assert!(verify(&s).unwrap().ok, "no log is an empty history");
        for i in 0..5 {
            add(&s, &format!("op {i}"));
        }
        let v = verify(&s).unwrap();
        assert!(v.ok && v.entries == 5, "{v:?}");
        let e = read(&s).unwrap();
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(e[0].prev, GENESIS);
    }

    #[test]
    fn every_edited_byte_is_found_at_its_entry() {
        let (_d, s) = staging();
        for i in 0..3 {
            add(&s, &format!("op {i}"));
        }
        let log = s.join("history.log");
        let orig = fs::read(&log).unwrap();
        let second = orig.iter().position(|&b| b == b'\n').unwrap() + 1;
        let third = second + orig[second..].iter().position(|&b| b == b'\n').unwrap() + 1;
        for i in 0..orig.len() {
            let mut bytes = orig.clone();
            bytes[i] ^= 0x01;
            fs::write(&log, &bytes).unwrap();
            let v = verify(&s).unwrap();
            let want = if i < second {
                1
            } else if i < third {
                2
            } else {
                3
            };
            assert!(!v.ok, "byte {i} flipped went unnoticed");
            assert_eq!(v.line, Some(want), "byte {i}: {v:?}");
        }
    }

    #[test]
    fn truncation_and_removal_are_found_and_appends_keep_them_visible() {
        let (_d, s) = staging();
        for i in 0..3 {
            add(&s, &format!("op {i}"));
        }
        let log = s.join("history.log");
        let orig = fs::read(&log).unwrap();
        let cut = orig.iter().position(|&b| b == b'\n').unwrap() + 1;
        fs::write(&log, &orig[..cut]).unwrap();
        let v = verify(&s).unwrap();
        assert!(!v.ok && v.line == Some(2) && v.problem.as_ref().unwrap().contains("truncated"), "{v:?}");
        // A later change chains to the head, so the gap stays visible.
        add(&s, "later");
        let v = verify(&s).unwrap();
        assert!(!v.ok && v.line == Some(2), "{v:?}");
        // Cut mid-line.
        fs::write(&log, &orig[..orig.len() - 5]).unwrap();
        let v = verify(&s).unwrap();
        assert!(!v.ok && v.line == Some(3), "{v:?}");
        // The head gone.
        fs::write(&log, &orig).unwrap();
        fs::remove_file(s.join("history.head")).unwrap();
        assert!(!verify(&s).unwrap().ok);
    }

    #[test]
    fn a_crash_between_the_entry_and_the_head_is_healed_by_the_next_append() {
        let (_d, s) = staging();
        add(&s, "one");
        let head = fs::read(s.join("history.head")).unwrap();
        add(&s, "two");
        fs::write(s.join("history.head"), &head).unwrap();
        assert!(verify(&s).unwrap().ok);
        add(&s, "three");
        let v = verify(&s).unwrap();
        assert!(v.ok && v.entries == 3, "{v:?}");
    }

    #[test]
    fn changes_name_deploys_upgrades_and_removals() {
        let g = |n: u64, v: &str| crate::state::StageState {
            active: crate::state::Generation {
                generation: n,
                digest: Digest::of(v.as_bytes()),
                version: v.parse().unwrap(),
                signers: vec![],
                deployed_at: String::new(),
                activation: Default::default(),
            },
            previous: vec![],
        };
        let mut a = State::new();
        a.stages.insert("x".parse().unwrap(), g(1, "1.0.0"));
        a.stages.insert("y".parse().unwrap(), g(2, "1.0.0"));
        let mut b = a.clone();
        b.stages.insert("x".parse().unwrap(), g(3, "2.0.0"));
        b.stages.remove(&"y".parse::<StageName>().unwrap());
        b.stages.insert("z".parse().unwrap(), g(4, "1.0.0"));
        let c = changes(&a, &b);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].to.as_ref().unwrap().version.to_string(), "2.0.0");
        assert!(c[1].to.is_none() && c[2].from.is_none());
    }
}
