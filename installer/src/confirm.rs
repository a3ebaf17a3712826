//! Confirmation ("magic rollback"): `deploy --confirm-timeout SECONDS` activates, then
//! waits for `confirm TOKEN`, which the operator's tool sends over a new connection. Until
//! it arrives the change is pending: `staging/confirm.json` names it, its token, its
//! deadline and the snapshot to go back to (the pre- snapshot of the deploy). A waiter
//! process (`confirm-wait`, the installer itself, in a session of its own, so that it
//! outlives the ssh session that started it) holds `staging/confirm.lock` while it waits;
//! at the deadline it takes the host's lock and restores the snapshot, as one journaled
//! transaction recorded in history. A waiter that is gone (the host restarted, the process
//! was killed) leaves the lock free: the next `recover`, or any changing command's
//! implicit recovery, restores the snapshot then.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::error::{NotFound, Refused};
use crate::ops::{Ctx, Report};
use crate::txn::Staging;

/// The hidden subcommand the waiter runs as.
pub const WAITER: &str = "confirm-wait";
/// The largest `confirm.json` read.
const MAX_PENDING_BYTES: u64 = 64 << 10;
/// The longest confirmation timeout (a day).
pub const MAX_TIMEOUT: u64 = 86_400;
/// How often the waiter looks whether the change was confirmed.
const POLL: Duration = Duration::from_millis(200);
/// How long `deploy` waits for the waiter to hold its lock.
const WAITER_START: Duration = Duration::from_secs(10);
/// How long the waiter waits for the host's lock at the deadline (another change may run).
pub const WAITER_LOCK_TIMEOUT: u64 = 3600;

/// A change that awaits its confirmation (`staging/confirm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// What `confirm` must name: 32 lowercase hex digits.
    pub token: String,
    /// The change, as history names it (`deploy app:1.1.0`).
    pub operation: String,
    /// The snapshot the host goes back to without a confirmation.
    pub snapshot: String,
    pub timeout_seconds: u64,
    /// Seconds since the epoch after which the change is rolled back.
    pub deadline: u64,
    /// Whether the snapshot was marked to keep for the wait (and is unmarked after it).
    pub marked: bool,
    /// The waiter's process id, once it runs.
    pub waiter: Option<u32>,
}

/// A pending confirmation, as `deploy --json` and `confirm --json` report it.
#[derive(Debug, Clone, Serialize)]
pub struct Confirmation {
    pub token: String,
    pub operation: String,
    pub snapshot: String,
    pub timeout_seconds: u64,
    /// The deadline, RFC 3339 (UTC).
    pub deadline: String,
    pub waiter: Option<u32>,
}

impl From<&Pending> for Confirmation {
    fn from(p: &Pending) -> Confirmation {
        Confirmation {
            token: p.token.clone(),
            operation: p.operation.clone(),
            snapshot: p.snapshot.clone(),
            timeout_seconds: p.timeout_seconds,
            deadline: rfc3339(p.deadline),
            waiter: p.waiter,
        }
    }
}

fn rfc3339(secs: u64) -> String {
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| secs.to_string())
}

/// `status`: the change awaiting its confirmation, and whether its waiter still runs.
#[derive(Debug, Clone, Serialize)]
pub struct Awaiting {
    #[serde(flatten)]
    pub confirmation: Confirmation,
    /// false: the host restarted or the waiter was stopped; the next `recover` (or changing
    /// command) rolls the change back.
    pub waiter_running: bool,
}

/// The change awaiting its confirmation, for `status` (creates nothing).
pub fn awaiting(staging: &Staging) -> Result<Option<Awaiting>> {
    let Some(p) = read(staging)? else { return Ok(None) };
    Ok(Some(Awaiting { confirmation: Confirmation::from(&p), waiter_running: waiter_alive(staging)? }))
}

/// What to do about a pending change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Its waiter waits for the confirmation or the deadline.
    Wait,
    /// The deadline passed: the waiter rolls it back.
    Expired,
    /// Nobody waits for it (the host restarted, the waiter was killed): roll it back now.
    Orphaned,
}

/// The pure rule: an orphaned change is rolled back whatever its deadline; a watched one at
/// its deadline.
pub fn due(p: &Pending, now: u64, waiter_alive: bool) -> Due {
    match (waiter_alive, now >= p.deadline) {
        (false, _) => Due::Orphaned,
        (true, true) => Due::Expired,
        (true, false) => Due::Wait,
    }
}

/// Whether `confirm TOKEN` confirms `pending` at `now`: the token must match and the
/// deadline not have passed.
pub fn check(pending: Option<&Pending>, token: &str, now: u64) -> Result<()> {
    let Some(p) = pending else {
        return Err(NotFound(
            "nothing awaits confirmation here (it was confirmed already, or rolled back when it was not \
             confirmed in time: see `op-dbus-stage history`)"
                .into(),
        )
        .into());
    };
    if !same(&p.token, token) {
        return Err(NotFound(format!(
            "`{}` awaits confirmation, but not with this token (a later deploy replaced the one you confirm?)",
            p.operation
        ))
        .into());
    }
    if now > p.deadline {
        return Err(Refused::Conflict(format!(
            "the confirmation of `{}` came {} s after its deadline ({}): the host goes back to {}",
            p.operation,
            now - p.deadline,
            rfc3339(p.deadline),
            p.snapshot
        ))
        .into());
    }
    Ok(())
}

/// Token comparison that does not stop at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn valid_token(t: &str) -> bool {
    t.len() == 32 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Pending {
    /// Parses `confirm.json` strictly.
    pub fn from_bytes(bytes: &[u8]) -> Result<Pending> {
        let p: Pending = serde_json::from_slice(bytes).context("parsing confirm.json")?;
        if !valid_token(&p.token) {
            bail!("confirm.json: the token is not 32 lowercase hex digits");
        }
        if p.snapshot.is_empty() || p.snapshot.contains('/') || p.snapshot.starts_with('.') || p.snapshot.len() > 255 {
            bail!("confirm.json: {:?} is not a snapshot name", p.snapshot);
        }
        if p.operation.len() > 16 << 10 || p.timeout_seconds == 0 || p.timeout_seconds > MAX_TIMEOUT {
            bail!("confirm.json: the operation or the timeout is out of bounds");
        }
        Ok(p)
    }
}

fn file(staging: &Staging) -> PathBuf {
    staging.dir.join("confirm.json")
}

fn lock_file(staging: &Staging) -> PathBuf {
    staging.dir.join("confirm.lock")
}

fn log_file(staging: &Staging) -> PathBuf {
    staging.dir.join(".confirm.log")
}

/// The pending change, if any.
pub fn read(staging: &Staging) -> Result<Option<Pending>> {
    let p = file(staging);
    let f = match fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", p.display())),
    };
    let mut bytes = Vec::new();
    f.take(MAX_PENDING_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", p.display()))?;
    if bytes.len() as u64 > MAX_PENDING_BYTES {
        bail!("{} is larger than {MAX_PENDING_BYTES} bytes", p.display());
    }
    Pending::from_bytes(&bytes).map(Some).with_context(|| format!("{}", p.display()))
}

fn write(staging: &Staging, p: &Pending) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(p)?;
    fsx::write_atomic(&file(staging), &bytes).with_context(|| format!("writing {}", file(staging).display()))
}

/// Whether a waiter holds `confirm.lock` (the lock goes with its process).
pub fn waiter_alive(staging: &Staging) -> Result<bool> {
    let p = lock_file(staging);
    // The waiter makes the file: without it, nobody waits (and a reader creates nothing).
    let f = match fs::File::options().write(true).open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", p.display())),
    };
    match f.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", p.display())),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_token() -> Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A deploy is refused while another change awaits its confirmation and its waiter runs.
pub fn refuse_if_pending(ctx: &Ctx) -> Result<()> {
    if let Some(p) = read(&ctx.staging)?
        && waiter_alive(&ctx.staging)?
    {
        return Err(Refused::Conflict(format!(
            "`{}` awaits its confirmation until {}: confirm it (`op-dbus-stage confirm TOKEN`) or let it roll \
             back, then deploy again",
            p.operation,
            rfc3339(p.deadline)
        ))
        .into());
    }
    Ok(())
}

/// After a committed deploy: records the pending confirmation (going back to `snapshot`)
/// and starts its waiter. Holds the host's lock throughout, so that nothing sees the
/// pending change without its waiter. When the waiter cannot start, the change is rolled
/// back at once.
pub fn arm(ctx: &Ctx, operation: &str, snapshot: &str, timeout: u64) -> Result<Confirmation> {
    let marked = !crate::retention::is_marked(&ctx.staging, snapshot);
    if marked {
        crate::retention::mark(&ctx.staging, snapshot, true)?;
    }
    let mut p = Pending {
        token: new_token()?,
        operation: operation.to_owned(),
        snapshot: snapshot.to_owned(),
        timeout_seconds: timeout,
        deadline: now_secs() + timeout,
        marked,
        waiter: None,
    };
    write(&ctx.staging, &p)?;
    match spawn_waiter(ctx, &p.token) {
        Ok(pid) => {
            p.waiter = Some(pid);
            write(&ctx.staging, &p)?;
            Ok(Confirmation::from(&p))
        }
        Err(e) => {
            let why = format!("its confirmation waiter did not start: {e:#}");
            match expire(ctx, &p, &why) {
                Ok(_) => Err(e.context(format!("the confirmation waiter did not start; {} was restored", p.snapshot))),
                Err(u) => {
                    Err(e.context(format!("the confirmation waiter did not start, and rolling back failed: {u:#}")))
                }
            }
        }
    }
}

/// Starts `confirm-wait TOKEN` detached (it makes its own session), its output appended to
/// `.confirm.log`; returns once it holds `confirm.lock`.
fn spawn_waiter(ctx: &Ctx, token: &str) -> Result<u32> {
    let exe = std::env::current_exe().context("finding the installer's own executable")?;
    let log_path = log_file(&ctx.staging);
    let log = fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .arg("--root")
        .arg(&ctx.opts.root)
        .arg("--lock-timeout")
        .arg(WAITER_LOCK_TIMEOUT.to_string())
        .args(["--progress", "none", WAITER, token])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the confirmation waiter")?;
    let start = Instant::now();
    loop {
        if waiter_alive(&ctx.staging)? {
            return Ok(child.id());
        }
        if let Some(st) = child.try_wait()? {
            bail!("it exited ({st}) before it waited; see {}", log_path.display());
        }
        if start.elapsed() > WAITER_START {
            let _ = child.kill();
            let _ = child.wait();
            bail!("it did not take {} within {WAITER_START:?}", lock_file(&ctx.staging).display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends a pending change: forgets it and unmarks its snapshot (when it marked it).
fn clear(ctx: &Ctx, p: &Pending) -> Result<()> {
    match fs::remove_file(file(&ctx.staging)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing confirm.json"),
    }
    if p.marked {
        // The snapshot may have gone with a restore's retention: nothing to unmark then.
        let _ = crate::retention::mark(&ctx.staging, &p.snapshot, false);
    }
    Ok(())
}

/// Rolls the pending change back: the host as in its snapshot (a journaled `restore`,
/// recorded in history), then forgets it. On an error it stays pending, for the next
/// recovery.
fn expire(ctx: &Ctx, p: &Pending, why: &str) -> Result<Report> {
    let operation = format!("roll back unconfirmed `{}` ({why}): restore {}", p.operation, p.snapshot);
    let r = crate::commands::restore::restore_as(ctx, &p.snapshot, operation)?;
    clear(ctx, p)?;
    Ok(r)
}

/// `confirm TOKEN --json`.
#[derive(Debug, Serialize)]
pub struct Confirmed {
    pub dry_run: bool,
    pub confirmed: Confirmation,
}

/// `confirm TOKEN`: the pending change stays; its waiter ends.
pub fn confirm(ctx: &Ctx, token: &str) -> Result<Confirmed> {
    let pending = read(&ctx.staging)?;
    check(pending.as_ref(), token, now_secs())?;
    let p = pending.expect("checked");
    if !ctx.opts.dry_run {
        clear(ctx, &p)?;
        crate::history::record_event(ctx, &format!("confirm {}", p.operation), &[])?;
    }
    Ok(Confirmed { dry_run: ctx.opts.dry_run, confirmed: Confirmation::from(&p) })
}

/// The implicit part of every changing command (and `recover`): a pending change nobody
/// waits for is rolled back. Returns what was rolled back.
pub fn recover(ctx: &Ctx) -> Result<Option<String>> {
    let Some(p) = read(&ctx.staging)? else { return Ok(None) };
    if due(&p, now_secs(), waiter_alive(&ctx.staging)?) != Due::Orphaned {
        return Ok(None);
    }
    if ctx.opts.dry_run {
        return Ok(Some(p.operation));
    }
    let why = "nobody waited for its confirmation any more: the host restarted, or the waiter was stopped";
    expire(ctx, &p, why).with_context(|| {
        format!(
            "rolling back `{}`, which was never confirmed, to {} failed; fix the cause and run `op-dbus-stage \
             recover`",
            p.operation, p.snapshot
        )
    })?;
    if !ctx.opts.quiet {
        eprintln!("rolled back `{}`: it was never confirmed (restored {})", p.operation, p.snapshot);
    }
    Ok(Some(p.operation))
}

/// The waiter (`confirm-wait TOKEN`): in a session of its own, holding `confirm.lock`,
/// until the change is confirmed (its `confirm.json` goes) or its deadline passes (then it
/// rolls it back under the host's lock).
pub fn wait(opts: &crate::ops::Options, token: &str) -> Result<()> {
    // Not the ssh session's any more: its end (a hang-up) does not reach this process.
    let _ = rustix::process::setsid();
    let host = crate::host::Host::open(&opts.root)?;
    let staging = Staging { dir: host.staging().context("opening the staging area")? };
    let lock_path = lock_file(&staging);
    let lock = fs::File::options().create(true).truncate(false).write(true).open(&lock_path)?;
    let start = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            // A waiter of an earlier change that is about to end.
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < WAITER_START => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("taking {}: {e}", lock_path.display()),
        }
    }
    loop {
        match read(&staging)? {
            Some(p) if same(&p.token, token) => {
                if due(&p, now_secs(), true) == Due::Expired {
                    break;
                }
            }
            _ => return Ok(()),
        }
        std::thread::sleep(POLL);
    }
    let ctx = Ctx::changing(opts)?;
    match read(&ctx.staging)? {
        Some(p) if same(&p.token, token) => {
            let why = format!("no confirmation within {} s", p.timeout_seconds);
            expire(&ctx, &p, &why)?;
            eprintln!("{}: rolled back `{}` to {}: {why}", crate::ops::now(), p.operation, p.snapshot);
        }
        // Confirmed while this waited for the host's lock.
        _ => {}
    }
    drop(lock);
    Ok(())
}

/// Where `deploy` found the snapshot to go back to: the first pre- snapshot of its reports.
pub fn pre_snapshot(reports: &[Report]) -> Option<&str> {
    reports.iter().flat_map(|r| &r.snapshots).map(String::as_str).find(|n| n.starts_with("pre-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(deadline: u64) -> Pending {
        Pending {
            token: "0123456789abcdef0123456789abcdef".into(),
            operation: "deploy app:1.1.0".into(),
            snapshot: "pre-app-1".into(),
            timeout_seconds: 30,
            deadline,
            marked: true,
            waiter: Some(42),
        }
    }

    #[test]
    fn a_watched_change_waits_until_its_deadline_and_an_orphaned_one_goes_back_at_once() {
        let p = pending(100);
        assert_eq!(due(&p, 99, true), Due::Wait);
        assert_eq!(due(&p, 100, true), Due::Expired);
        assert_eq!(due(&p, 500, true), Due::Expired);
        // The host restarted (or the waiter was killed): before the deadline too.
        assert_eq!(due(&p, 0, false), Due::Orphaned);
        assert_eq!(due(&p, 500, false), Due::Orphaned);
    }

    #[test]
    fn confirm_needs_the_same_token_before_the_deadline() {
        let p = pending(100);
        check(Some(&p), &p.token, 100).unwrap();
        let e = check(Some(&p), "0123456789abcdef0123456789abcdee", 50).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2, "{e}");
        assert!(e.to_string().contains("not with this token"), "{e}");
        let e = check(Some(&p), &p.token, 101).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 4, "{e}");
        assert!(e.to_string().contains("after its deadline") && e.to_string().contains("pre-app-1"), "{e}");
        let e = check(None, &p.token, 0).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2, "{e}");
        assert!(!same("abc", "abcd") && same("", "") && !same("abc", "abd"));
    }

    #[test]
    fn the_pending_file_round_trips_and_is_parsed_strictly() {
        let p = pending(100);
        let bytes = serde_json::to_vec(&p).unwrap();
        assert_eq!(Pending::from_bytes(&bytes).unwrap(), p);
        let text = String::from_utf8(bytes).unwrap();
        for bad in [
            text.replace("0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF"),
            text.replace("0123456789abcdef0123456789abcdef", "../x"),
            text.replace("pre-app-1", "../../etc/passwd"),
            text.replace("pre-app-1", ".hidden"),
            text.replace("\"timeout_seconds\":30", "\"timeout_seconds\":0"),
            text.replace("\"marked\":true", "\"marked\":true,\"extra\":1"),
            text.replace("\"deadline\":100", "\"deadline\":-1"),
            "{".into(),
            String::new(),
        ] {
            assert!(Pending::from_bytes(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pending_file_on_disk_is_read_back_bounded_and_the_lock_says_whether_a_waiter_runs() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging { dir: dir.path().to_owned() };
        assert_eq!(read(&staging).unwrap(), None);
        write(&staging, &pending(7)).unwrap();
        assert_eq!(read(&staging).unwrap(), Some(pending(7)));
        fs::write(file(&staging), vec![b' '; MAX_PENDING_BYTES as usize + 1]).unwrap();
        assert!(read(&staging).unwrap_err().to_string().contains("larger than"));
        assert!(!waiter_alive(&staging).unwrap());
        let held = fs::File::options().create(true).truncate(false).write(true).open(lock_file(&staging)).unwrap();
        held.lock().unwrap();
        assert!(waiter_alive(&staging).unwrap());
        drop(held);
        assert!(!waiter_alive(&staging).unwrap());
    }

    #[test]
    fn the_snapshot_to_go_back_to_is_the_first_pre_snapshot() {
        let report = |snaps: &[&str]| Report {
            operation: String::new(),
            dry_run: false,
            steps: vec![],
            actions: vec![],
            notes: vec![],
            checks: vec![],
            snapshots: snaps.iter().map(|s| s.to_string()).collect(),
            removed: vec![],
            kept: vec![],
            pruned: vec![],
        };
        assert_eq!(
            pre_snapshot(&[report(&[]), report(&["pre-a-1", "post-a-1"]), report(&["pre-b-2"])]),
            Some("pre-a-1")
        );
        assert_eq!(pre_snapshot(&[report(&[])]), None);
        assert!(valid_token(&new_token().unwrap()));
    }
}
