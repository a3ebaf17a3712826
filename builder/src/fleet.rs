//! `deploy`: images from the store to many hosts over the system's OpenSSH client.
//!
//! Per host: ask the installer what its store has (`op-dbus-stage --json list`), stream an
//! archive without the layers it has into `op-dbus-stage --json deploy -`, and read its
//! report. Hosts run in parallel (`--limit`), a canary wave first when asked; connection
//! failures (ssh's exit 255) are retried with backoff, a transfer that stops moving is
//! abandoned after `--stall-timeout`, and the whole deploy on one host after
//! `--activation-timeout`. The installer's transaction makes every attempt all or nothing
//! on the host, so a retry after a cut connection is safe.
//!
//! The hosts come from `--on`: names of an inventory (TOML, [`Inventory`]), `@TAG`s of it,
//! or ssh destinations as they are (so `~/.ssh/config`, agents, jump hosts and
//! ControlMaster apply as the operator set them up).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use formats::archive::ExportPlan;
use formats::layout::Layout;
use formats::{Digest, Reference};

use crate::inspect::StoredImage;

/// The largest inventory file read.
const MAX_INVENTORY_BYTES: u64 = 1 << 20;
/// The most of a remote command's stdout and stderr kept.
const MAX_REMOTE_OUTPUT: u64 = 4 << 20;
/// ssh's own exit status for a connection or authentication failure.
const SSH_FAILED: i32 = 255;

/// An inventory file: defaults for every host, and the hosts by name.
///
/// ```toml
/// [defaults]
/// user = "root"
/// root = "/"
///
/// [hosts.web1]
/// address = "10.0.0.11"
/// tags = ["web", "canary"]
///
/// [hosts.db1]
/// address = "db1.example.net"
/// port = 2222
/// root = "/srv/op-dbus-root"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// What every host has unless its entry says otherwise (no `address` or `tags`).
    #[serde(default)]
    pub defaults: HostEntry,
    #[serde(default)]
    pub hosts: BTreeMap<String, HostEntry>,
}

/// One host of an inventory, or the defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// The address or ssh host name (default: the entry's name).
    pub address: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The ssh user (default: ssh's own choice, from ~/.ssh/config or the local user).
    pub user: Option<String>,
    pub port: Option<u16>,
    /// The installer's `--root` on the host (default `/`).
    pub root: Option<String>,
    /// The installer's command on the host (default `op-dbus-stage`).
    pub installer: Option<String>,
    /// Extra `-o OPTION=VALUE` for ssh.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// The host's age recipient (`op-dbus-stage identity`): a stage whose `recipients:`
    /// names `@TAG` encrypts its secrets to every host with that tag.
    pub recipient: Option<String>,
}

impl Inventory {
    pub fn read(path: &Path) -> Result<Inventory> {
        let mut text = String::new();
        std::fs::File::open(path)
            .with_context(|| format!("opening the inventory {}", path.display()))?
            .take(MAX_INVENTORY_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading the inventory {}", path.display()))?;
        if text.len() as u64 > MAX_INVENTORY_BYTES {
            return Err(cli_support::exit::Malformed(format!(
                "the inventory {} is larger than {MAX_INVENTORY_BYTES} bytes",
                path.display()
            ))
            .into());
        }
        let inv: Inventory = toml::from_str(&text)
            .map_err(|e| cli_support::exit::Malformed(format!("the inventory {}: {e}", path.display())))?;
        if inv.defaults.address.is_some() || !inv.defaults.tags.is_empty() || inv.defaults.recipient.is_some() {
            return Err(cli_support::exit::Malformed(format!(
                "the inventory {}: [defaults] cannot give an address, tags or a recipient (they are each host's own)",
                path.display()
            ))
            .into());
        }
        for (name, h) in &inv.hosts {
            let what = format!("the inventory {}: host {name:?}", path.display());
            check_word(name, &what)?;
            for t in &h.tags {
                check_word(t, &format!("{what}: tag"))?;
            }
            if let Some(a) = &h.address {
                check_word(a, &format!("{what}: address"))?;
            }
            if let Some(r) = &h.recipient {
                r.parse::<keys::secret::Recipient>()
                    .map_err(|e| cli_support::exit::Malformed(format!("{what}: recipient: {e}")))?;
            }
        }
        Ok(inv)
    }

    /// The recipients of the hosts with `tag` (a stage's `recipients: ["@TAG"]`): every
    /// such host must have one.
    pub fn recipients_tagged(&self, tag: &str) -> Result<Vec<String>> {
        let hosts: Vec<_> = self.hosts.iter().filter(|(_, h)| h.tags.iter().any(|t| t == tag)).collect();
        if hosts.is_empty() {
            return Err(
                cli_support::exit::Usage(format!("no host of the inventory has the tag {tag:?} (@{tag})")).into()
            );
        }
        hosts
            .into_iter()
            .map(|(name, h)| {
                h.recipient.clone().ok_or_else(|| {
                    cli_support::exit::Usage(format!(
                        "host {name:?} of the inventory has the tag {tag:?} but no `recipient` (its `op-dbus-stage \
                         identity`)"
                    ))
                    .into()
                })
            })
            .collect()
    }

    /// The hosts `--on` names: inventory names, `@TAG`s, or ssh destinations as they are.
    pub fn select(&self, on: &[String]) -> Result<Vec<Target>> {
        let mut out: Vec<Target> = Vec::new();
        let mut push = |t: Target| {
            if !out.iter().any(|o| o.name == t.name) {
                out.push(t);
            }
        };
        for item in on.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            if let Some(tag) = item.strip_prefix('@') {
                let hosts: Vec<_> = self.hosts.iter().filter(|(_, h)| h.tags.iter().any(|t| t == tag)).collect();
                if hosts.is_empty() {
                    return Err(cli_support::exit::Usage(format!(
                        "no host of the inventory has the tag {tag:?} (--on @{tag})"
                    ))
                    .into());
                }
                for (name, h) in hosts {
                    push(self.target(name, Some(h))?);
                }
            } else {
                push(self.target(item, self.hosts.get(item))?);
            }
        }
        Ok(out)
    }

    fn target(&self, name: &str, entry: Option<&HostEntry>) -> Result<Target> {
        check_word(name, "--on: host")?;
        let d = &self.defaults;
        let e = entry.cloned().unwrap_or_default();
        let user = e.user.or_else(|| d.user.clone());
        if let Some(u) = &user {
            check_word(u, &format!("host {name}: user"))?;
        }
        let root = e.root.or_else(|| d.root.clone()).unwrap_or_else(|| "/".to_owned());
        let installer = e.installer.or_else(|| d.installer.clone()).unwrap_or_else(|| "op-dbus-stage".to_owned());
        for (what, v) in [("root", &root), ("installer", &installer)] {
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(
                    cli_support::exit::Malformed(format!("host {name}: {what} {v:?} is not a usable path")).into()
                );
            }
        }
        let mut ssh_options = d.ssh_options.clone();
        ssh_options.extend(e.ssh_options);
        for o in &ssh_options {
            if o.starts_with('-') || o.chars().any(char::is_control) {
                return Err(cli_support::exit::Malformed(format!(
                    "host {name}: ssh option {o:?} must be OPTION=VALUE (it is passed as -o)"
                ))
                .into());
            }
        }
        Ok(Target {
            name: name.to_owned(),
            address: e.address.unwrap_or_else(|| name.to_owned()),
            user,
            port: e.port.or(d.port),
            root,
            installer,
            ssh_options,
        })
    }
}

/// A word that goes to ssh as an argument: no leading `-` (it would be read as an option),
/// no whitespace or control characters, not empty, at most 255 bytes.
fn check_word(s: &str, what: &str) -> Result<()> {
    if s.is_empty() || s.len() > 255 || s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(cli_support::exit::Malformed(format!(
            "{what} {s:?}: not a usable name (empty, too long, starting with '-', or with spaces or control characters)"
        ))
        .into());
    }
    Ok(())
}

/// One host to deploy to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub address: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub root: String,
    pub installer: String,
    pub ssh_options: Vec<String>,
}

/// How `deploy` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub ssh: PathBuf,
    pub ssh_config: Option<PathBuf>,
    pub ssh_options: Vec<String>,
    pub limit: usize,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    pub activation_timeout: Duration,
    pub canary: usize,
    pub max_failures: Option<usize>,
    pub full: bool,
    pub quiet: bool,
    /// How long the host waits for the confirmation before it rolls back by itself
    /// (`--confirm-timeout`; zero: no confirmation).
    pub confirm_timeout: Duration,
}

/// What happened on one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: String,
    pub address: String,
    /// `deployed`, `failed` or `skipped`.
    pub status: &'static str,
    /// With `--confirm-timeout`: `confirmed` (the change stays), `unconfirmed` (no
    /// confirmation reached the host in time: it rolls itself back) or `refused` (the host
    /// answered that it could not take it: too late, or nothing awaited it); absent when
    /// nothing awaited a confirmation (nothing changed, or `--confirm-timeout 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<&'static str>,
    /// The installer's exit code on the last attempt (255: ssh could not connect).
    pub exit: Option<i32>,
    pub attempts: u32,
    /// Archive bytes sent, over every attempt.
    pub bytes_sent: u64,
    /// Archive bytes sent on the last attempt: after a cut, what the resumed transfer sent.
    pub bytes_last_attempt: u64,
    /// The size of the full archive (what a plain export would send).
    pub bytes_full: u64,
    /// Payload layers left out because the host had them (last attempt).
    pub layers_skipped: usize,
    pub seconds: f64,
    /// The installer's report (`deploy --json`) when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HostReport {
    /// Nothing done yet on `t`.
    fn new(t: &Target, status: &'static str, bytes_full: u64) -> HostReport {
        HostReport {
            host: t.name.clone(),
            address: t.address.clone(),
            status,
            confirmation: None,
            exit: None,
            attempts: 0,
            bytes_sent: 0,
            bytes_last_attempt: 0,
            bytes_full,
            layers_skipped: 0,
            seconds: 0.0,
            report: None,
            error: None,
        }
    }
}

/// `deploy --json`.
#[derive(Debug, Serialize)]
pub struct FleetReport {
    pub images: Vec<String>,
    pub hosts: Vec<HostReport>,
    pub deployed: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// Some hosts failed: the exit code is theirs when they all failed alike, else 1.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} host(s) failed{}", if *.skipped > 0 { format!(", {} skipped", .skipped) } else { String::new() })]
pub struct FleetFailed {
    pub failed: usize,
    pub skipped: usize,
    pub total: usize,
    pub code: cli_support::ExitCode,
}

/// Quotes `s` for the remote shell that ssh hands the command to.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Target {
    /// `ssh ... DESTINATION 'INSTALLER' --root 'ROOT' ARGS...`.
    fn ssh(&self, s: &Options, args: &[&str]) -> Command {
        let mut c = Command::new(&s.ssh);
        if let Some(f) = &s.ssh_config {
            c.arg("-F").arg(f);
        }
        c.args(["-o", "BatchMode=yes"]);
        c.arg("-o").arg(format!("ConnectTimeout={}", s.connect_timeout.as_secs().max(1)));
        for o in s.ssh_options.iter().chain(&self.ssh_options) {
            c.arg("-o").arg(o);
        }
        if let Some(p) = self.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.user {
            c.arg("-l").arg(u);
        }
        let mut remote = vec![shell_quote(&self.installer), "--root".into(), shell_quote(&self.root)];
        remote.extend(args.iter().map(|a| shell_quote(a)));
        c.arg("--").arg(&self.address).arg(remote.join(" "));
        c
    }
}

/// Reads at most [`MAX_REMOTE_OUTPUT`] of `r` in a thread.
fn collect(r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.take(MAX_REMOTE_OUTPUT).read_to_end(&mut v);
        v
    })
}

/// Waits for `child` until `deadline`; kills it then (`None`).
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A remote command's outcome.
struct Remote {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Remote {
    /// The installer's message: its JSON error document's, or the last lines of stderr.
    fn message(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        for line in text.lines().rev() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                && let Some(m) = v.get("error").and_then(|e| e.get("message")).and_then(|m| m.as_str())
            {
                return m.to_owned();
            }
        }
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }
}

/// Runs `args` on the host with a deadline (no input).
fn run_remote(t: &Target, s: &Options, args: &[&str], timeout: Duration) -> Result<Remote> {
    let mut child = t
        .ssh(s, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", s.ssh.display()))?;
    let out = collect(child.stdout.take().expect("piped"));
    let err = collect(child.stderr.take().expect("piped"));
    let status = wait_until(&mut child, Instant::now() + timeout)?;
    Ok(Remote {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The payload layers of `tags`, the blobs a host may have already.
fn payload_layers(layout: &Layout, tags: &[String]) -> Result<BTreeSet<Digest>> {
    let mut out = BTreeSet::new();
    for t in tags {
        let r: Reference = t.parse()?;
        out.extend(StoredImage::load(layout, &r)?.manifest.layers.iter().map(|l| l.digest));
    }
    Ok(out)
}

/// The blobs of `wanted` that `op-dbus-stage have --json` says the host has.
fn had(doc: &serde_json::Value, wanted: &BTreeSet<Digest>) -> BTreeSet<Digest> {
    let listed = doc.get("have").and_then(|h| h.as_array()).into_iter().flatten();
    listed.filter_map(|d| d.as_str()?.parse::<Digest>().ok()).filter(|d| wanted.contains(d)).collect()
}

/// Counts what goes through, for the progress line and the stall watchdog.
struct Meter<W> {
    inner: W,
    sent: Arc<AtomicU64>,
    last: Arc<Mutex<Instant>>,
    bar: ProgressBar,
}

impl<W: Write> Write for Meter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams `plan` into `deploy -` on the host; the stall and activation deadlines apply.
fn send(t: &Target, s: &Options, layout: &Layout, plan: &ExportPlan, bar: &ProgressBar) -> Result<(Remote, u64)> {
    let timeout = s.confirm_timeout.as_secs().to_string();
    // The host gives up on a silent stream sooner than this side does: by the time a retry
    // asks what it has, it has kept what arrived and let go of its lock.
    let stall = (s.stall_timeout.as_secs() / 2).max(1).to_string();
    let mut args: Vec<&str> = vec!["--json", "--stall-timeout", &stall, "deploy"];
    if !s.confirm_timeout.is_zero() {
        args.extend(["--confirm-timeout", &timeout]);
    }
    args.push("-");
    let mut child = t
        .ssh(s, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", s.ssh.display()))?;
    let out = collect(child.stdout.take().expect("piped"));
    let err = collect(child.stderr.take().expect("piped"));
    let stdin = child.stdin.take().expect("piped");
    let sent = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(Instant::now()));
    let done = Arc::new(AtomicBool::new(false));
    let total: u64 = plan.blobs.iter().map(|d| d.size).sum();
    bar.set_length(total);
    bar.set_position(0);
    bar.set_message("sending");
    let status = std::thread::scope(|scope| -> Result<Option<ExitStatus>> {
        let writer = {
            let (sent, last, done) = (sent.clone(), last.clone(), done.clone());
            let bar = bar.clone();
            scope.spawn(move || {
                let w = Meter { inner: std::io::BufWriter::with_capacity(1 << 20, stdin), sent, last, bar };
                // A write error means the other side went away: its exit status says why.
                let _ = plan.write(layout, w, |_| {}).map(|mut w| w.flush());
                done.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            let idle = last.lock().map(|l| l.elapsed()).unwrap_or_default();
            let writing = !done.load(Ordering::Relaxed);
            if (writing && idle > s.stall_timeout) || started.elapsed() > s.activation_timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            if !writing {
                bar.set_message("activating");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = writer.join();
        Ok(status)
    })?;
    let remote = Remote {
        code: status.and_then(|st| st.code()),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if status.is_none() {
        let writing = !done.load(Ordering::Relaxed);
        let why = if writing {
            format!("the transfer stalled: nothing moved for {} s (--stall-timeout)", s.stall_timeout.as_secs())
        } else {
            format!("no answer within {} s (--activation-timeout)", s.activation_timeout.as_secs())
        };
        let mut r = remote;
        r.stderr = why.into_bytes();
        r.code = Some(SSH_FAILED);
        return Ok((r, sent.load(Ordering::Relaxed)));
    }
    Ok((remote, sent.load(Ordering::Relaxed)))
}

/// The whole deploy of one host, with retries.
fn deploy_host(
    t: &Target,
    s: &Options,
    layout: &Layout,
    tags: &[String],
    full: &ExportPlan,
    bar: &ProgressBar,
) -> HostReport {
    let started = Instant::now();
    let bytes_full: u64 = full.blobs.iter().map(|d| d.size).sum();
    let mut r = HostReport::new(t, "failed", bytes_full);
    let mut thin_refused = false;
    let query_timeout = s.connect_timeout + Duration::from_secs(60);
    loop {
        r.attempts += 1;
        if r.attempts > 1 {
            let wait = Duration::from_secs(1 << (r.attempts - 2).min(5));
            bar.set_message(format!("retrying in {} s", wait.as_secs()));
            std::thread::sleep(wait);
        }
        let outcome = (|| -> Result<Remote> {
            let mut exclude = BTreeSet::new();
            if !s.full && !thin_refused {
                bar.set_message("asking what it has");
                let layers = payload_layers(layout, tags)?;
                let digests: Vec<String> = layers.iter().map(ToString::to_string).collect();
                let mut args = vec!["--json", "have"];
                args.extend(digests.iter().map(String::as_str));
                let have = run_remote(t, s, &args, query_timeout)?;
                if have.code != Some(0) {
                    return Ok(have);
                }
                let doc: serde_json::Value = serde_json::from_slice(&have.stdout).unwrap_or_default();
                exclude = had(&doc, &layers);
            }
            let plan = if exclude.is_empty() { None } else { Some(ExportPlan::new(layout, tags, &exclude)?) };
            let plan = plan.as_ref().unwrap_or(full);
            r.layers_skipped = plan.omitted.len();
            let (remote, sent) = send(t, s, layout, plan, bar)?;
            r.bytes_sent += sent;
            r.bytes_last_attempt = sent;
            Ok(remote)
        })();
        match outcome {
            Err(e) => {
                r.error = Some(format!("{e:#}"));
                r.exit = Some(1);
                break;
            }
            Ok(remote) => {
                r.exit = remote.code;
                match remote.code {
                    Some(0) => {
                        r.status = "deployed";
                        r.error = None;
                        r.report = serde_json::from_slice(&remote.stdout).ok();
                        let token = r
                            .report
                            .as_ref()
                            .and_then(|v| v.pointer("/confirmation/token"))
                            .and_then(|v| v.as_str())
                            .map(str::to_owned);
                        if let Some(token) = token {
                            confirm_host(t, s, &token, &mut r, bar);
                        }
                        break;
                    }
                    // A thin archive the host could not complete (its store lost a layer
                    // since it listed it): once more, whole.
                    Some(4 | 7) if r.layers_skipped > 0 && !thin_refused => {
                        thin_refused = true;
                        r.error = Some(remote.message());
                    }
                    Some(SSH_FAILED) | None if r.attempts <= s.retries => {
                        r.error = Some(format!("connection failed: {}", remote.message()));
                    }
                    // The host gave up on a stream that stopped (the link went away on the
                    // way): what arrived whole stays there, and the next attempt asks.
                    Some(1) if r.attempts <= s.retries && remote.message().contains("(--stall-timeout)") => {
                        r.error = Some(remote.message());
                    }
                    _ => {
                        let m = remote.message();
                        r.error = Some(if remote.code == Some(SSH_FAILED) && !m.starts_with("the transfer") {
                            format!("connection failed: {m}")
                        } else {
                            m
                        });
                        break;
                    }
                }
            }
        }
    }
    r.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    bar.set_message(if r.status == "deployed" { "deployed".to_owned() } else { "failed".to_owned() });
    bar.finish();
    r
}

/// Confirms the deploy on the host over a new connection (`confirm TOKEN`), retrying a
/// failed connection until the host's confirmation timeout has passed. Without a
/// confirmation the host rolls itself back: the host failed.
fn confirm_host(t: &Target, s: &Options, token: &str, r: &mut HostReport, bar: &ProgressBar) {
    bar.set_message("confirming");
    // The host's clock started when it armed the waiter, a moment before its report came.
    let deadline = Instant::now() + s.confirm_timeout;
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match run_remote(t, s, &["--json", "confirm", token], left) {
            Ok(remote) if remote.code == Some(0) => {
                r.confirmation = Some("confirmed");
                return;
            }
            Ok(remote) if matches!(remote.code, Some(SSH_FAILED) | None) => {
                last = if remote.code.is_none() { "no answer".to_owned() } else { remote.message() };
                r.exit = remote.code.or(Some(SSH_FAILED));
            }
            Ok(remote) => {
                r.status = "failed";
                r.confirmation = Some("refused");
                r.exit = remote.code;
                r.error = Some(format!("the confirmation was refused: {}", remote.message()));
                return;
            }
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())));
    }
    r.status = "failed";
    r.confirmation = Some("unconfirmed");
    r.error = Some(format!(
        "deployed, but no confirmation reached it within {} s (--confirm-timeout; last: {last}): it rolls itself \
         back to the state before",
        s.confirm_timeout.as_secs()
    ));
}

/// Deploys `images` to `targets`: the canary wave first, then the rest, `limit` at a time.
pub fn deploy(layout: &Layout, images: &[Reference], targets: &[Target], s: &Options) -> Result<FleetReport> {
    let tags: Vec<String> = images.iter().map(ToString::to_string).collect();
    let full = ExportPlan::new(layout, &tags, &BTreeSet::new())?;
    let multi = if !s.quiet && std::io::stderr().is_terminal() {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    };
    let width = targets.iter().map(|t| t.name.len()).max().unwrap_or(0);
    let style = ProgressStyle::with_template("{prefix} {msg:20} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Vec<ProgressBar> = targets
        .iter()
        .map(|t| {
            let b = multi.add(ProgressBar::new(0).with_style(style.clone()));
            b.set_prefix(format!("{:width$}", t.name));
            b.set_message("waiting");
            b
        })
        .collect();
    let reports: Vec<Mutex<Option<HostReport>>> = targets.iter().map(|_| Mutex::new(None)).collect();
    let failures = AtomicU64::new(0);
    let canary = s.canary.min(targets.len());
    let waves: [Vec<usize>; 2] = [(0..canary).collect(), (canary..targets.len()).collect()];
    for (w, wave) in waves.iter().enumerate() {
        if w == 1 && failures.load(Ordering::Relaxed) > 0 && canary > 0 {
            break;
        }
        let queue = Mutex::new(wave.iter().copied().collect::<VecDeque<usize>>());
        std::thread::scope(|scope| {
            for _ in 0..s.limit.max(1).min(wave.len()) {
                scope.spawn(|| {
                    loop {
                        if s.max_failures.is_some_and(|m| failures.load(Ordering::Relaxed) as usize >= m) {
                            return;
                        }
                        let Some(i) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { return };
                        let rep = deploy_host(&targets[i], s, layout, &tags, &full, &bars[i]);
                        if rep.status != "deployed" {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Ok(mut slot) = reports[i].lock() {
                            *slot = Some(rep);
                        }
                    }
                });
            }
        });
    }
    let bytes_full: u64 = full.blobs.iter().map(|d| d.size).sum();
    let hosts: Vec<HostReport> = targets
        .iter()
        .zip(reports)
        .zip(&bars)
        .map(|((t, slot), bar)| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| {
                bar.set_message("skipped");
                bar.finish();
                let why = if canary > 0 { "the canary wave failed" } else { "--max-failures reached" };
                HostReport { error: Some(format!("not started: {why}")), ..HostReport::new(t, "skipped", bytes_full) }
            })
        })
        .collect();
    let _ = multi.clear();
    let count = |st: &str| hosts.iter().filter(|h| h.status == st).count();
    Ok(FleetReport {
        images: tags,
        deployed: count("deployed"),
        failed: count("failed"),
        skipped: count("skipped"),
        hosts,
    })
}

impl FleetReport {
    /// The error to end with when a host did not deploy.
    pub fn outcome(&self) -> Result<()> {
        if self.failed == 0 && self.skipped == 0 {
            return Ok(());
        }
        let codes: BTreeSet<i32> = self.hosts.iter().filter(|h| h.status == "failed").filter_map(|h| h.exit).collect();
        let code = match codes.iter().next() {
            Some(&c) if codes.len() == 1 => cli_support::ExitCode::from_code(c).unwrap_or(cli_support::ExitCode::Other),
            _ => cli_support::ExitCode::Other,
        };
        Err(FleetFailed { failed: self.failed, skipped: self.skipped, total: self.hosts.len(), code }.into())
    }

    /// The final table.
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    match h.confirmation {
                        Some(c) if h.status != "deployed" => format!("{} ({c})", h.status),
                        Some(c) => c.to_owned(),
                        None => h.status.to_owned(),
                    },
                    cli_support::human_bytes(h.bytes_sent),
                    cli_support::human_bytes(h.bytes_full),
                    format!("{:.1}s", h.seconds),
                    h.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut s = cli_support::table(&["HOST", "RESULT", "SENT", "FULL", "TIME", "NOTE"], &rows, &[2, 3, 4]);
        s += &format!(
            "{} deployed, {} failed, {} skipped: {}\n",
            self.deployed,
            self.failed,
            self.skipped,
            self.images.join(" ")
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(text: &str) -> Result<Inventory> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inventory.toml");
        std::fs::write(&p, text).unwrap();
        Inventory::read(&p)
    }

    const INV: &str = r#"
[defaults]
user = "deploy"
root = "/srv/root"

[hosts.web1]
address = "10.0.0.11"
tags = ["web", "canary"]

[hosts.web2]
address = "10.0.0.12"
tags = ["web"]
port = 2222
root = "/"
installer = "/usr/local/bin/op-dbus-stage"
"#;

    #[test]
    fn hosts_come_from_names_tags_and_plain_destinations_with_the_defaults() {
        let inv = inventory(INV).unwrap();
        let t = inv.select(&["@web".into(), "web1".into(), "other.example.net,@canary".into()]).unwrap();
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["web1", "web2", "other.example.net"]);
        assert_eq!(
            (t[0].address.as_str(), t[0].user.as_deref(), t[0].root.as_str()),
            ("10.0.0.11", Some("deploy"), "/srv/root")
        );
        assert_eq!(
            (t[1].port, t[1].root.as_str(), t[1].installer.as_str()),
            (Some(2222), "/", "/usr/local/bin/op-dbus-stage")
        );
        assert_eq!((t[2].address.as_str(), t[2].installer.as_str()), ("other.example.net", "op-dbus-stage"));
        let e = inv.select(&["@db".into()]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2, "{e}");
    }

    #[test]
    fn what_would_reach_ssh_as_an_option_or_the_remote_shell_is_refused_or_quoted() {
        for bad in [
            "[hosts.\"-oProxyCommand=x\"]\n",
            "[hosts.a]\naddress = \"-oProxyCommand=touch /tmp/x\"\n",
            "[hosts.a]\naddress = \"a b\"\n",
            "[hosts.a]\ntags = [\"x\\ny\"]\n",
            "[hosts.a]\nunknown = 1\n",
            "[defaults]\nssh_options = [\"-F/tmp/evil\"]\n[hosts.a]\n",
            "[defaults]\naddress = \"10.0.0.1\"\n[hosts.a]\n",
        ] {
            let r = inventory(bad).and_then(|i| i.select(&["a".into()]));
            let e = r.expect_err(bad);
            assert_eq!(crate::error::exit_code(&e), 7, "{bad}: {e}");
        }
        assert!(inventory(&"#".repeat(MAX_INVENTORY_BYTES as usize + 1)).is_err());
        let e = Inventory::default().select(&["-oProxyCommand=x".into()]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 7, "{e}");
        // The remote command is one string for the remote shell: every word quoted.
        let t = Inventory::default().target("h", None).unwrap();
        let t = Target { root: "/srv/it's; rm -rf /".into(), ..t };
        let s = Options {
            ssh: "ssh".into(),
            ssh_config: None,
            ssh_options: vec![],
            limit: 1,
            retries: 0,
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            activation_timeout: Duration::from_secs(1),
            canary: 0,
            max_failures: None,
            full: false,
            quiet: true,
            confirm_timeout: Duration::ZERO,
        };
        let args: Vec<String> = t.ssh(&s, &["list"]).get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let n = args.len();
        assert_eq!(&args[n - 3..n - 1], ["--", "h"]);
        assert_eq!(args[n - 1], r#"'op-dbus-stage' --root '/srv/it'\''s; rm -rf /' 'list'"#);
    }
}
