//! A stage's systemd units at run time: started, restarted, stopped and checked.
//!
//! Enabling and disabling are transaction steps (`systemctl --root ROOT enable`, see
//! [`crate::txn::Step::EnableUnit`]); the links `systemctl` makes are then pointed at the
//! unit's stable target path (`/etc/systemd/system/UNIT`), never into a generation, so
//! that they survive the generation going away ([`repoint_links`]). What the running
//! manager does is decided here, around the steps of a transaction:
//!
//! ```text
//! before the steps   stop the units no stage wants any more
//! after the steps    daemon-reload; start new units; restart a unit whose unit file or a
//!                    file it runs (Exec*=, EnvironmentFile=) changed; leave the rest alone
//! checks             `systemctl is-active UNIT` for the units of the checked stages
//! on failure         stop what was started, undo the steps, daemon-reload, start what was
//!                    stopped, restart what was restarted (on the old files again)
//! ```
//!
//! Only when the root is `/` and a systemd manager runs there (`/run/systemd/system`), or
//! `OP_DBUS_SYSTEMCTL` names the command that reaches the root's manager; otherwise the
//! units are enabled and disabled in the root, and a note says what to start or stop by
//! hand.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use formats::manifest::StageConfig;
use formats::path::{RelPath, TargetPath};
use formats::{Digest, StageName};

use crate::checks::CheckResult;
use crate::host::{Host, STAGING, TargetState};
use crate::state::State;

/// Unit directories a stage's unit file may be linked into, searched in this order.
pub const UNIT_DIRS: [&str; 2] = ["/etc/systemd/system", "/usr/local/lib/systemd/system"];
/// The largest unit file read.
const MAX_UNIT: u64 = 1 << 20;
/// How long a unit may stay activating or deactivating before it is judged.
pub const SETTLE_MAX: Duration = Duration::from_secs(30);
/// How long a started unit is given to fail before its state is read.
const SETTLE_MIN: Duration = Duration::from_millis(500);

/// Every unit the stages of `state` declare, with the stage and generation declaring it.
pub fn units_of(state: &State) -> BTreeMap<String, (StageName, u64)> {
    let mut out = BTreeMap::new();
    for (name, s) in &state.stages {
        for u in &s.active.activation.services {
            out.entry(u.clone()).or_insert_with(|| (name.clone(), s.active.generation));
        }
    }
    out
}

/// What moving from one set of units to another does to the running ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UnitChanges {
    pub stop: Vec<String>,
    pub start: Vec<String>,
    /// Kept units whose generation changed: restarted when their [`fingerprint`] changed.
    pub kept: Vec<String>,
}

impl UnitChanges {
    pub fn between(before: &State, after: &State) -> UnitChanges {
        let (b, a) = (units_of(before), units_of(after));
        UnitChanges {
            stop: b.keys().filter(|u| !a.contains_key(*u)).cloned().collect(),
            start: a.keys().filter(|u| !b.contains_key(*u)).cloned().collect(),
            kept: a.iter().filter(|(u, g)| b.get(*u).is_some_and(|old| old != *g)).map(|(u, _)| u.clone()).collect(),
        }
    }

    /// What a dry run says about running units.
    pub fn dry_run_notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.stop.is_empty() {
            out.push(format!("would stop {}", self.stop.join(" ")));
        }
        if !self.start.is_empty() {
            out.push(format!("would start {}", self.start.join(" ")));
        }
        if !self.kept.is_empty() {
            out.push(format!("would restart {} if its unit file or a file it runs changed", self.kept.join(" ")));
        }
        out
    }
}

/// Most paths taken from one unit file.
pub const MAX_RUN_PATHS: usize = 256;

/// The absolute paths a unit file runs or reads its environment from: the first word of
/// every `Exec*=` line (after the `@-:+!|` prefixes) and every `EnvironmentFile=`; at most
/// [`MAX_RUN_PATHS`].
pub fn run_paths(unit_text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in unit_text.lines().map(str::trim) {
        if out.len() >= MAX_RUN_PATHS {
            break;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let (key, value) = (key.trim(), value.trim());
        let word = if key.starts_with("Exec") {
            value.trim_start_matches(['@', '-', ':', '+', '!', '|']).split_whitespace().next()
        } else if key == "EnvironmentFile" {
            Some(value.trim_start_matches('-'))
        } else {
            None
        };
        if let Some(w) = word.filter(|w| w.starts_with('/'))
            && !out.iter().any(|o| o == w)
        {
            out.push(w.to_owned());
        }
    }
    out
}

/// Where `config` stages the file linked at `target` (directly, or under a directory
/// target), following the stage's own links: `None` when no `files:` entry covers it.
pub fn staged_at(config: &StageConfig, target: &str) -> Option<RelPath> {
    let target = TargetPath::parse(target).ok()?;
    config.files.iter().find_map(|f| {
        if !target.is_under(&f.target) {
            return None;
        }
        let rest = &target.as_str()[f.target.as_str().len()..];
        let path: RelPath = format!("{}{rest}", f.path).parse().ok()?;
        config.resolve_links(&path).ok()?.parse().ok()
    })
}

/// The staged path of `unit`'s file in `config`: the `files:` entry linked at
/// `UNIT_DIR/UNIT`.
pub fn unit_source(config: &StageConfig, unit: &str) -> Option<RelPath> {
    UNIT_DIRS.iter().find_map(|d| staged_at(config, &format!("{d}/{unit}")))
}

/// What a unit's run depends on in `config`: the digest of its unit file and of every
/// file it runs that the stage ships (by target path).
pub fn fingerprint(config: &StageConfig, unit_text: &str, unit_path: &RelPath) -> Fingerprint {
    let digest = |p: &RelPath| config.entry(p).and_then(|e| e.sha256);
    let mut out = vec![(String::new(), digest(unit_path))];
    for p in run_paths(unit_text) {
        let d = staged_at(config, &p).and_then(|s| digest(&s));
        out.push((p, d));
    }
    out
}

/// What a unit's run depends on: the digest of its unit file, then each run path's.
pub type Fingerprint = Vec<(String, Option<Digest>)>;

/// A unit's path in the unit directory and its enablement links (with their texts).
type Enablement = (Option<TargetPath>, Vec<(TargetPath, String)>);

/// The environment variable that says how to reach the manager of a root that is not `/`:
/// the command (split at white space) that stands for `systemctl` there, e.g.
/// `systemctl --machine=NAME` or `nsenter -t PID -m -p -r systemctl`.
pub const MANAGER_ENV: &str = "OP_DBUS_SYSTEMCTL";

/// The command given in [`MANAGER_ENV`], if any.
fn manager_command() -> Option<Vec<String>> {
    let v = std::env::var(MANAGER_ENV).ok()?;
    let words: Vec<String> = v.split_whitespace().map(str::to_owned).collect();
    (!words.is_empty() && words.len() <= 64 && v.len() <= 4096).then_some(words)
}

/// Whether the running manager of the root can be asked to start and stop units: the
/// root is `/` and systemd runs there, or [`MANAGER_ENV`] says how to reach it.
pub fn manager_running(host: &Host) -> bool {
    manager_command().is_some()
        || (host.is_real_root()
            && Path::new("/run/systemd/system").is_dir()
            && crate::checks::systemctl_path().is_some())
}

/// `systemctl ARGS` against the running manager.
fn systemctl(args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = match manager_command() {
        Some(words) => {
            let mut c = Command::new(&words[0]);
            c.args(&words[1..]);
            c
        }
        None => Command::new(crate::checks::systemctl_path().context("systemctl is not installed")?),
    };
    cmd.args(args).stdin(Stdio::null()).output().with_context(|| {
        format!("running systemctl {} (${MANAGER_ENV} may say how to reach the manager)", args.join(" "))
    })
}

fn systemctl_ok(args: &[&str]) -> Result<()> {
    let out = systemctl(args)?;
    if !out.status.success() {
        anyhow::bail!("systemctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What was done to running units in one transaction, to undo it.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Whether a manager was there to ask.
    pub managed: bool,
    pub stopped: Vec<String>,
    pub started: Vec<String>,
    pub restarted: Vec<String>,
}

/// Before the steps: stops the units no stage wants any more. Returns what it did and
/// notes (under a root that is not the running system: what to do by hand).
pub fn stop_leaving(host: &Host, changes: &UnitChanges, notes: &mut Vec<String>) -> Result<Run> {
    let mut run = Run { managed: manager_running(host), ..Run::default() };
    if !run.managed {
        if !changes.stop.is_empty() {
            notes.push(format!(
                "{} is not the running system (and ${MANAGER_ENV} does not say how to reach its manager): stop {} \
                 there by hand (systemctl stop)",
                host.root.display(),
                changes.stop.join(" ")
            ));
        }
        return Ok(run);
    }
    for u in &changes.stop {
        systemctl_ok(&["stop", "--", u]).with_context(|| format!("stopping {u}"))?;
        run.stopped.push(u.clone());
    }
    Ok(run)
}

/// After the steps: daemon-reload, then starts new units and restarts the kept ones whose
/// unit file or a file they run changed (`before`'s generations against `after`'s).
#[allow(clippy::too_many_arguments)]
pub fn activate(
    read_config: &dyn Fn(&StageName, u64) -> Result<StageConfig>,
    generation_dir: &dyn Fn(&StageName, u64) -> std::path::PathBuf,
    host: &Host,
    before: &State,
    after: &State,
    changes: &UnitChanges,
    run: &mut Run,
    notes: &mut Vec<String>,
) -> Result<()> {
    let (b, a) = (units_of(before), units_of(after));
    let mut restart = Vec::new();
    for u in &changes.kept {
        let print = |(stage, g): &(StageName, u64)| -> Result<Option<Fingerprint>> {
            let config = read_config(stage, *g)?;
            let Some(src) = unit_source(&config, u) else { return Ok(None) };
            let text = read_unit(&generation_dir(stage, *g).join(src.as_str()))?;
            Ok(Some(fingerprint(&config, &text, &src)))
        };
        // A generation that cannot be read is taken as changed: restarting is the safe side.
        match (print(&b[u]), print(&a[u])) {
            (Ok(old), Ok(new)) if old == new => {}
            (old, new) => {
                if let Err(e) = old.as_ref().and(new.as_ref()) {
                    tracing::warn!(unit = %u, "restarting: cannot tell whether it changed: {e:#}");
                }
                restart.push(u.clone());
            }
        }
    }
    if !run.managed {
        let mut todo: Vec<String> = Vec::new();
        if !changes.start.is_empty() {
            todo.push(format!("start {}", changes.start.join(" ")));
        }
        if !restart.is_empty() {
            todo.push(format!("restart {}", restart.join(" ")));
        }
        if !todo.is_empty() {
            notes.push(format!(
                "{} is not the running system (and ${MANAGER_ENV} does not say how to reach its manager): {} there \
                 by hand (systemctl daemon-reload first)",
                host.root.display(),
                todo.join(", ")
            ));
        }
        return Ok(());
    }
    if changes.start.is_empty() && restart.is_empty() && changes.stop.is_empty() && changes.kept.is_empty() {
        return Ok(());
    }
    systemctl_ok(&["daemon-reload"])?;
    for u in &changes.start {
        // Recorded first: a start that fails half-way is stopped again on undo.
        run.started.push(u.clone());
        systemctl_ok(&["start", "--", u])
            .map_err(|e| crate::error::VerifyFailed(format!("{e:#}; the change was rolled back")))?;
    }
    for u in &restart {
        run.restarted.push(u.clone());
        systemctl_ok(&["restart", "--", u])
            .map_err(|e| crate::error::VerifyFailed(format!("{e:#}; the change was rolled back")))?;
    }
    if !run.started.is_empty() || !run.restarted.is_empty() {
        std::thread::sleep(SETTLE_MIN);
    }
    Ok(())
}

/// On failure, before the steps are undone: stops what was started.
pub fn undo_before(run: &Run) {
    for u in run.started.iter().rev() {
        let _ = systemctl(&["stop", "--", u]);
    }
}

/// On failure, after the steps are undone: the old unit files are back; reload, start what
/// was stopped, restart what was restarted.
pub fn undo_after(run: &Run) {
    if !run.managed || (run.started.is_empty() && run.stopped.is_empty() && run.restarted.is_empty()) {
        return;
    }
    let _ = systemctl(&["daemon-reload"]);
    for u in run.stopped.iter().chain(&run.restarted) {
        let _ = systemctl(&["restart", "--", u]);
    }
}

/// After `recover` rolled an interrupted transaction back (the host is as `before`): the
/// units may have been stopped, started or restarted on `after`'s files before the
/// crash, and nothing recorded which. So, with a manager: daemon-reload, stop the units
/// only `after` has, start those only `before` has, restart those whose generation the
/// transaction changed (on `before`'s files again). Failures are returned as notes.
pub fn after_recover(host: &Host, before: &State, after: &State) -> Vec<String> {
    let changes = UnitChanges::between(before, after);
    if !manager_running(host) || changes == UnitChanges::default() {
        return Vec::new();
    }
    let mut notes = Vec::new();
    let mut call = |args: &[&str]| {
        if let Err(e) = systemctl_ok(args) {
            notes.push(format!("after recovery: {e:#}"));
        }
    };
    call(&["daemon-reload"]);
    for u in &changes.start {
        call(&["stop", "--", u]);
    }
    for u in changes.stop.iter().chain(&changes.kept) {
        call(&["restart", "--", u]);
    }
    notes
}

/// `systemctl is-active UNIT` as a check: passes when the unit is active. A unit still
/// activating is given up to [`SETTLE_MAX`] to decide.
pub fn is_active(unit: &str) -> Result<CheckResult> {
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        let out = systemctl(&["is-active", "--", unit])?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let settling = matches!(state.as_str(), "activating" | "deactivating" | "reloading" | "refreshing");
        if !settling || Instant::now() >= deadline {
            let passed = out.status.success() && state == "active";
            let mut output = state;
            if !passed && let Ok(st) = systemctl(&["status", "--no-pager", "--lines=5", "--", unit]) {
                output = format!("{output}\n{}", String::from_utf8_lossy(&st.stdout).trim_end());
            }
            return Ok(CheckResult {
                command: format!("systemctl is-active {unit}"),
                expected: 0,
                exit: out.status.code(),
                timed_out: settling,
                passed,
                output,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The is-active checks of the units `stages` declare in `state` (none without a manager).
pub fn checks(host: &Host, state: &State, stages: &[StageName]) -> Result<Vec<CheckResult>> {
    if !manager_running(host) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for s in stages {
        if let Some(st) = state.stages.get(s) {
            for u in &st.active.activation.services {
                out.push(is_active(u)?);
            }
        }
    }
    Ok(out)
}

fn read_unit(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_UNIT).read_to_string(&mut text))
        .with_context(|| format!("reading the unit file {}", path.display()))?;
    Ok(text)
}

/// The enablement links of `unit` in the root: symlinks in `UNIT_DIR` (aliases) and in its
/// `*.wants`, `*.requires` and `*.upholds` folders that point at the unit's own path or
/// into the staging area at a file of its name; with that path (`None`: no unit file).
fn enablement_links(host: &Host, unit: &str) -> Result<Enablement> {
    let Some(unit_path) = UNIT_DIRS.iter().find_map(|d| {
        let t = TargetPath::parse(&format!("{d}/{unit}")).ok()?;
        (!matches!(host.state(&t), Ok(TargetState::Missing) | Err(_))).then_some(t)
    }) else {
        return Ok((None, Vec::new()));
    };
    let staging = format!("/{STAGING}/");
    let dir = UNIT_DIRS[0];
    let Ok(real) = host.resolve(dir.trim_start_matches('/')) else { return Ok((Some(unit_path), Vec::new())) };
    let mut candidates: Vec<String> = Vec::new();
    for e in std::fs::read_dir(&real).with_context(|| format!("reading {}", real.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && [".wants", ".requires", ".upholds"].iter().any(|s| name.ends_with(s)) {
            for inner in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                candidates.push(format!("{dir}/{name}/{}", inner.file_name().to_string_lossy()));
            }
        } else if !is_dir {
            candidates.push(format!("{dir}/{name}"));
        }
    }
    let mut out = Vec::new();
    for c in candidates {
        let Ok(t) = TargetPath::parse(&c) else { continue };
        if t == unit_path {
            continue;
        }
        if let Ok(TargetState::Symlink(text)) = host.state(&t)
            && (text == unit_path.as_str() || (text.starts_with(&staging) && text.rsplit('/').next() == Some(unit)))
        {
            out.push((t, text));
        }
    }
    Ok((Some(unit_path), out))
}

/// After `systemctl enable UNIT`: the links it made follow the unit's link through the
/// stage link into one generation; each is pointed at the unit's own path in the unit
/// directory instead, which stays valid across generations.
pub fn repoint_links(host: &Host, unit: &str) -> Result<()> {
    let (Some(unit_path), links) = enablement_links(host, unit)? else { return Ok(()) };
    for (t, text) in links {
        if text != unit_path.as_str() {
            host.replace_symlink(&t, unit_path.as_str()).with_context(|| format!("pointing {t} at {unit_path}"))?;
        }
    }
    Ok(())
}

/// Disables `unit`: removes its enablement links and nothing else. (`systemctl disable`
/// would also remove the unit's own link in the unit directory, which is the installer's
/// target link, not an enablement.)
pub fn disable(host: &Host, unit: &str) -> Result<()> {
    let (_, links) = enablement_links(host, unit)?;
    for (t, _) in links {
        host.remove(&t).with_context(|| format!("removing {t}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_paths_are_the_programs_and_environment_files() {
        let unit = "[Unit]\nDescription=x\n[Service]\nExecStartPre=-/usr/local/bin/prep --x\nExecStart=@/usr/local/bin/app app \
                    --serve\nExecReload=/bin/kill -HUP $MAINPID\nEnvironmentFile=-/etc/op-dbus/app.env\nExecStop=relative\n\
                    ExecStart=/usr/local/bin/app\nUser=op-dbus\n";
        assert_eq!(run_paths(unit), ["/usr/local/bin/prep", "/usr/local/bin/app", "/bin/kill", "/etc/op-dbus/app.env"]);
        assert!(run_paths("[Service]\nExecStart=\n").is_empty());
    }

    fn config(files: &str, entries: &[(&str, &[u8])]) -> StageConfig {
        let def =
            formats::manifest::StageDefinition::parse(&format!("version: 1.0.0\n{files}"), Path::new("m")).unwrap();
        let mut all = BTreeMap::new();
        for (p, content) in entries {
            let p: RelPath = p.parse().unwrap();
            for a in p.ancestors() {
                all.insert(a.clone(), dir(&a));
            }
            let e = if let Some(link) = content.strip_prefix(b"->") {
                formats::manifest::Entry {
                    path: p.clone(),
                    kind: formats::manifest::EntryKind::Symlink,
                    mode: formats::manifest::Mode::new(0o777).unwrap(),
                    size: None,
                    sha256: None,
                    link: Some(String::from_utf8(link.to_vec()).unwrap()),
                }
            } else {
                formats::manifest::Entry {
                    path: p.clone(),
                    kind: formats::manifest::EntryKind::File,
                    mode: formats::manifest::Mode::new(0o755).unwrap(),
                    size: Some(content.len() as u64),
                    sha256: Some(Digest::of(content)),
                    link: None,
                }
            };
            all.insert(p, e);
        }
        StageConfig::from_definition("s".parse().unwrap(), &def, all.into_values().collect())
    }

    fn dir(p: &RelPath) -> formats::manifest::Entry {
        formats::manifest::Entry {
            path: p.clone(),
            kind: formats::manifest::EntryKind::Dir,
            mode: formats::manifest::Mode::new(0o755).unwrap(),
            size: None,
            sha256: None,
            link: None,
        }
    }

    const FILES: &str = "files:\n  - path: systemd/app.service\n    target: /etc/systemd/system/app.service\n  - path: bin\n    \
                         target: /usr/local/lib/app\n  - path: etc/app.env\n    target: /etc/op-dbus/app.env\n";
    const UNIT: &str = "[Service]\nExecStart=/usr/local/lib/app/app\nEnvironmentFile=/etc/op-dbus/app.env\n";

    #[test]
    fn a_unit_changes_with_its_file_or_what_it_runs_and_nothing_else() {
        let c = |app: &[u8], env: &[u8], other: &[u8]| {
            config(
                FILES,
                &[
                    ("systemd/app.service", UNIT.as_bytes()),
                    ("bin/app", app),
                    ("etc/app.env", env),
                    ("etc/other", other),
                ],
            )
        };
        let base = c(b"v1", b"E=1", b"o1");
        let src = unit_source(&base, "app.service").unwrap();
        assert_eq!(src.as_str(), "systemd/app.service");
        let print = |cfg: &StageConfig| fingerprint(cfg, UNIT, &src);
        assert_eq!(print(&base), print(&c(b"v1", b"E=1", b"o2")), "an unrelated file changed");
        assert_ne!(print(&base), print(&c(b"v2", b"E=1", b"o1")), "the binary changed");
        assert_ne!(print(&base), print(&c(b"v1", b"E=2", b"o1")), "the environment file changed");
        let other_unit = config(
            FILES,
            &[
                ("systemd/app.service", b"[Service]\nExecStart=/bin/true\n"),
                ("bin/app", b"v1"),
                ("etc/app.env", b"E=1"),
            ],
        );
        assert_ne!(print(&base), print(&other_unit), "the unit file changed");
        assert_eq!(unit_source(&base, "nope.service"), None);
    }

    #[test]
    fn staged_paths_follow_directory_targets_and_the_stages_links() {
        let c = config(FILES, &[("systemd/app.service", b"x"), ("bin/app", b"->real"), ("bin/real", b"r")]);
        assert_eq!(staged_at(&c, "/usr/local/lib/app/app").unwrap().as_str(), "bin/real");
        assert_eq!(staged_at(&c, "/usr/local/lib/appx"), None);
        assert_eq!(staged_at(&c, "/bin/true"), None);
    }

    fn state(units: &[(&str, &str, u64)]) -> State {
        let mut s = State::new();
        for (unit, stage, g) in units {
            let name: StageName = stage.parse().unwrap();
            let st = s.stages.entry(name).or_insert_with(|| crate::state::StageState {
                active: crate::state::Generation {
                    generation: *g,
                    digest: Digest::of(b""),
                    version: "1.0.0".parse().unwrap(),
                    signers: Vec::new(),
                    deployed_at: String::new(),
                    activation: Default::default(),
                },
                previous: Vec::new(),
            });
            st.active.activation.services.push(unit.to_string());
        }
        s
    }

    #[test]
    fn units_are_stopped_started_or_kept_by_what_the_states_declare() {
        let before = state(&[("a.service", "s1", 1), ("b.service", "s1", 1), ("c.service", "s2", 4)]);
        let after =
            state(&[("a.service", "s1", 2), ("b.service", "s1", 2), ("d.service", "s3", 5), ("c.service", "s2", 4)]);
        let mut after = after;
        after
            .stages
            .get_mut(&"s1".parse::<StageName>().unwrap())
            .unwrap()
            .active
            .activation
            .services
            .retain(|u| u != "b.service");
        let c = UnitChanges::between(&before, &after);
        assert_eq!(c.stop, ["b.service"]);
        assert_eq!(c.start, ["d.service"]);
        assert_eq!(c.kept, ["a.service"], "c.service's generation did not change");
        assert_eq!(UnitChanges::between(&before, &before), UnitChanges::default());
    }
}
