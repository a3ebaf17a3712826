//! Progress of receive, verification, unpack and activation on stderr: a line that
//! changes in place when stderr is a terminal (cli-support's spinner: bytes, rate, stage,
//! step), or with `--progress=json` one JSON event per line (docs/json.md) for a caller
//! such as a remote deploy. Nothing otherwise, and nothing with `--quiet` (except JSON,
//! which was asked for).
//!
//! The reporter is one per process (set once by the command line), so that the places
//! that report need no handle passed down to them.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Mode {
    /// A progress line when stderr is a terminal.
    #[default]
    Auto,
    /// One JSON event per line on stderr.
    Json,
    /// None.
    None,
}

/// One progress event (`--progress=json`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Always `progress`.
    pub event: &'static str,
    /// `receive`, `verify`, `unpack`, `activate` or `check`.
    pub phase: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// What is being done, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Bytes received so far (`receive`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Bytes per second since the phase began (`receive`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Milliseconds since the command began.
    pub elapsed_ms: u64,
}

struct Reporter {
    mode: Mode,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
    last_bytes: Option<Instant>,
}

static REPORTER: OnceLock<Mutex<Reporter>> = OnceLock::new();

/// Sets how progress is shown, once per process.
pub fn init(mode: Mode, quiet: bool) {
    let mode = if quiet && mode == Mode::Auto { Mode::None } else { mode };
    let _ = REPORTER.set(Mutex::new(Reporter { mode, start: Instant::now(), bar: None, last_bytes: None }));
}

/// Starts the terminal line of a command (a spinner with `message`); a no-op unless the
/// mode is `auto` and stderr a terminal.
pub fn start(message: &str) {
    with(|r| {
        if r.mode == Mode::Auto {
            r.bar = Some(cli_support::progress::spinner(message, false));
        }
    });
}

/// Clears the terminal line.
pub fn finish() {
    with(|r| {
        if let Some(b) = r.bar.take() {
            b.finish_and_clear();
        }
    });
}

fn with(f: impl FnOnce(&mut Reporter)) {
    if let Some(m) = REPORTER.get()
        && let Ok(mut r) = m.lock()
    {
        f(&mut r);
    }
}

fn emit(r: &mut Reporter, mut e: Event) {
    e.elapsed_ms = r.start.elapsed().as_millis() as u64;
    match r.mode {
        Mode::Json => {
            let mut line = serde_json::to_string(&e).expect("an event serializes");
            line.push('\n');
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        Mode::Auto => {
            if let Some(b) = &r.bar {
                b.set_message(describe(&e));
            }
        }
        Mode::None => {}
    }
}

/// The terminal line of an event.
pub fn describe(e: &Event) -> String {
    let mut s = e.phase.to_owned();
    if let Some(st) = &e.stage {
        s += &format!(" {st}");
    }
    if let Some(b) = e.bytes {
        s += &format!(" {}", cli_support::human_bytes(b));
    }
    if let Some(r) = e.rate {
        s += &format!(" ({}/s)", cli_support::human_bytes(r));
    }
    if let Some(step) = &e.step {
        s += &format!(": {step}");
    }
    s
}

/// A step of a phase (`verify`, `unpack`, `activate`, `check`).
pub fn step(phase: &'static str, stage: Option<&str>, step: &str) {
    with(|r| {
        let e = Event {
            event: "progress",
            phase,
            stage: stage.map(str::to_owned),
            step: Some(step.to_owned()),
            bytes: None,
            rate: None,
            elapsed_ms: 0,
        };
        emit(r, e);
    });
}

/// Bytes received so far since `since`; shown at most every 200 ms unless `last`.
pub fn bytes(since: Instant, bytes: u64, last: bool) {
    with(|r| {
        let now = Instant::now();
        if !last && r.last_bytes.is_some_and(|t| now.duration_since(t) < Duration::from_millis(200)) {
            return;
        }
        r.last_bytes = Some(now);
        let secs = now.duration_since(since).as_secs_f64();
        let rate = if secs > 0.0 { (bytes as f64 / secs) as u64 } else { 0 };
        let e = Event {
            event: "progress",
            phase: "receive",
            stage: None,
            step: last.then(|| "received".to_owned()),
            bytes: Some(bytes),
            rate: Some(rate),
            elapsed_ms: 0,
        };
        emit(r, e);
    });
}

/// A reader that reports the bytes read through it as `receive` progress.
#[derive(Debug)]
pub struct Counting<R> {
    pub inner: R,
    since: Instant,
    total: u64,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> Counting<R> {
        Counting { inner, since: Instant::now(), total: 0 }
    }
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        // The end is reported by the receiver once the archive is read (a reader of an
        // archive may stop before the end of its input).
        if n > 0 {
            bytes(self.since, self.total, false);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_documented() {
        let e = Event {
            event: "progress",
            phase: "receive",
            stage: None,
            step: None,
            bytes: Some(2048),
            rate: Some(1024),
            elapsed_ms: 5,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "progress", "phase": "receive", "bytes": 2048, "rate": 1024, "elapsed_ms": 5})
        );
        assert_eq!(describe(&e), "receive 2.0 KiB (1.0 KiB/s)");
    }
}
