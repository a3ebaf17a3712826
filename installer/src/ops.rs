//! What the commands of `op-dbus-stage` share: the options, the opened host ([`Ctx`]),
//! the report of a changing command and `execute`, which applies a plan as one journaled
//! transaction under the lock. Every changing command plans first, then applies that plan
//! (or, with `--dry-run`, reports it): one module per command under [`crate::commands`].

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use formats::StageName;
use formats::layout::Layout;
use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};

use crate::checks::{self, CheckResult};
use crate::error::VerifyFailed;
use crate::host::{Host, STORE};
use crate::hostfs::RealFs;
use crate::lock::Lock;
use crate::plan::{HostView, Plan};
use crate::receive::Trust;
use crate::services;
use crate::snapshot;
use crate::state::{StageState, State};
use crate::txn::{self, Cleanup, Journal, RecoverOutcome, Staging, Step};

pub use crate::commands::deploy::{Batch, DeployReport, deploy};
pub use crate::commands::feature::{FeatureChanged, set_feature};
pub use crate::commands::fix_symlinks::fix_symlinks;
pub use crate::commands::gc::gc;
pub use crate::commands::init::{DEFAULT_POLICY, InitReport, init};
pub use crate::commands::inspect::{
    Listed, StageStatus, StageVerify, Status, VerifyReport, have, list, status, verify,
};
pub use crate::commands::remove::remove;
pub use crate::commands::repair::repair;
pub use crate::commands::restore::restore;
pub use crate::commands::rollback::rollback;
pub use crate::commands::trust::{TrustAdded, TrustRevoked, TrustedInfo, trust_add, trust_list, trust_revoke};

/// Options shared by the operations.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub dry_run: bool,
    pub quiet: bool,
    pub lock_timeout: Duration,
    pub allow_downgrade: bool,
    pub allow_expired: bool,
    /// Previous generations kept per stage after a deploy.
    pub keep: usize,
    /// Mark the snapshots this change takes to keep (`--keep`): retention never prunes them.
    pub keep_snapshots: bool,
    /// Take a backup of the deployed stages a deploy changes first (`deploy --backup`).
    pub backup_first: bool,
    /// How long a source may send nothing before it is abandoned (`--stall-timeout`).
    pub stall_timeout: Duration,
}

/// An opened host: root, staging area, store, and (for changes) the lock.
#[derive(Debug)]
pub struct Ctx {
    pub host: Host,
    pub staging: Staging,
    pub opts: Options,
    _lock: Option<Lock>,
    /// What recovery did before this command, if anything.
    pub recovered: Option<RecoverOutcome>,
    /// The change recovery rolled back because nobody waited for its confirmation any more
    /// (see [`crate::confirm`]).
    pub unconfirmed: Option<String>,
}

impl Ctx {
    /// Opens the host for a command that changes it: takes the lock and finishes any
    /// interrupted transaction first.
    pub fn changing(opts: &Options) -> Result<Ctx> {
        let mut ctx = Ctx::changing_confirming(opts)?;
        ctx.unconfirmed = crate::confirm::recover(&ctx)?;
        Ok(ctx)
    }

    /// [`Ctx::changing`] without rolling back a change whose confirmation nobody waits for:
    /// for `confirm` itself (a confirmation that arrives in time keeps the change).
    pub fn changing_confirming(opts: &Options) -> Result<Ctx> {
        let host = open_initialised(opts)?;
        Ctx::changing_host(host, opts)
    }

    pub(crate) fn changing_host(host: Host, opts: &Options) -> Result<Ctx> {
        let staging = Staging { dir: host.staging().context("creating the staging area")? };
        staging.create_dirs()?;
        let lock = Lock::take(&staging.lock_file(), opts.lock_timeout)?;
        let mut ctx = Ctx { host, staging, opts: opts.clone(), _lock: Some(lock), recovered: None, unconfirmed: None };
        // A dry run changes nothing, an interrupted transaction included: it says what
        // recovery would do, and plans from state.json, which is what recovery leaves.
        ctx.recovered = if opts.dry_run { ctx.pending_outcome()? } else { ctx.recover_pending()? };
        Ok(ctx)
    }

    /// Opens the host for reading: no lock, nothing created.
    pub fn reading(opts: &Options) -> Result<Ctx> {
        let host = open_initialised(opts)?;
        let dir = host.staging_if_exists()?.unwrap_or_else(|| host.root.join(crate::host::STAGING));
        Ok(Ctx { host, staging: Staging { dir }, opts: opts.clone(), _lock: None, recovered: None, unconfirmed: None })
    }

    /// What recovery would do, without doing it.
    fn pending_outcome(&self) -> Result<Option<RecoverOutcome>> {
        let Some(j) = Journal::read(&self.staging)? else { return Ok(None) };
        let o = j.outcome(&self.staging)?;
        if !self.opts.quiet {
            let what = match o {
                RecoverOutcome::Completed => "completed",
                RecoverOutcome::RolledBack => "rolled back",
            };
            eprintln!("an interrupted transaction ({}) would be {what} first", j.operation);
        }
        Ok(Some(o))
    }

    /// The host as the transaction steps change it.
    pub fn fs(&self) -> RealFs<'_> {
        RealFs::new(&self.host, &self.staging)
    }

    /// What planning the move from `before` to `desired` reads from the host.
    pub fn view(&self, before: &State, desired: &std::collections::BTreeMap<StageName, StageState>) -> HostView {
        HostView::gather(&self.fs(), before, desired)
    }

    fn recover_pending(&self) -> Result<Option<RecoverOutcome>> {
        let out = match Journal::read(&self.staging)? {
            Some(j) => {
                let o = j.recover(&self.fs(), &self.staging).context("finishing the interrupted transaction")?;
                crate::history::record_recovered(self, &j, o);
                // Units may have been started or restarted on the files just undone.
                if o == RecoverOutcome::RolledBack {
                    for n in services::after_recover(&self.host, &j.before, &j.after) {
                        eprintln!("warning: {n}");
                    }
                }
                if !self.opts.quiet {
                    let what = match o {
                        RecoverOutcome::Completed => "completed",
                        RecoverOutcome::RolledBack => "rolled back",
                    };
                    eprintln!("recovered an interrupted transaction ({}): {what}", j.operation);
                }
                Some(o)
            }
            None => None,
        };
        let tmp = self.staging.tmp();
        if tmp.exists() {
            txn::remove_tree(&tmp)?;
            fs::create_dir_all(&tmp)?;
        }
        // Receiving directories a killed command left in the store's temp area.
        if let Ok(p) = self.host.resolve(&format!("{STORE}/.tmp")) {
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("recv-") {
                    txn::remove_tree(&e.path())?;
                }
            }
        }
        // Temp files of atomic writes a killed command left (state.json, snapshots).
        for dir in [self.staging.dir.clone(), self.staging.snapshots()] {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with(".tmp") && e.path().is_file() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(out)
    }

    pub fn state(&self) -> Result<State> {
        State::read(&self.staging.state_file())
    }

    pub fn store(&self) -> Result<Layout> {
        let p = self.host.ensure_dir(STORE)?;
        let layout = Layout::open_or_create(&p)?;
        // The receiving area lives in the store (see `deploy`); made here, once.
        fs::create_dir_all(p.join(".tmp")).with_context(|| format!("creating {}/.tmp", p.display()))?;
        Ok(layout)
    }

    /// The embedded manifest of a published generation.
    pub fn config_of(&self, stage: &StageName, generation: u64) -> Result<StageConfig> {
        let p = self.staging.generation(stage, generation).join("manifest.json");
        let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            bail!("{} is too large", p.display());
        }
        StageConfig::from_bytes(&bytes).with_context(|| format!("{}", p.display()))
    }
}

/// Opens a root that `init` prepared; anything else is refused (exit 2) with the command
/// that prepares it.
fn open_initialised(opts: &Options) -> Result<Host> {
    let not_initialised = || {
        cli_support::exit::NotFound(format!(
            "{} is not initialised (no {}): run `op-dbus-stage init` first",
            opts.root.display(),
            crate::host::STAGING
        ))
    };
    if !opts.root.is_dir() {
        return Err(not_initialised().into());
    }
    let host = Host::open(&opts.root)?;
    if host.staging_if_exists()?.is_none() {
        return Err(not_initialised().into());
    }
    Ok(host)
}

/// What a changing command did or would do.
#[derive(Debug, Serialize)]
pub struct Report {
    pub operation: String,
    pub dry_run: bool,
    /// The plan, one line per step, for people.
    pub steps: Vec<String>,
    /// The same plan as typed steps (tagged by `op`; see docs/json.md).
    pub actions: Vec<Step>,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// `gc`: the generations deleted (or that a dry run would delete).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<GenerationRef>,
    /// `gc`: the generations kept, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<GenerationRef>,
    /// The snapshots retention pruned after the change (see `crate::retention`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
}

/// A generation of a stage, in `gc` reports.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationRef {
    pub stage: StageName,
    pub generation: u64,
    /// Its size on disk in bytes.
    pub bytes: u64,
    /// Why it is kept: `active`, `previous` or `snapshot`; absent for removed ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Applies a plan as one transaction, running the verify commands of `check` stages
/// before committing; a failure undoes everything.
pub(crate) fn execute(
    ctx: &Ctx,
    operation: String,
    before: State,
    mut plan: Plan,
    check: &[StageName],
    mut cleanup: Cleanup,
) -> Result<Report> {
    plan.after.note_trimmed(&before);
    // A snapshot of the state after (a deploy's post- one) records the same.
    for (_, s) in cleanup.snapshots.iter_mut().filter(|(_, s)| s.txid == plan.after.txid) {
        s.trimmed = plan.after.trimmed.clone();
    }
    let mut report = Report {
        operation: operation.clone(),
        dry_run: ctx.opts.dry_run,
        steps: plan.steps.iter().map(Step::describe).collect(),
        actions: plan.steps.clone(),
        notes: plan.notes.clone(),
        checks: Vec::new(),
        snapshots: cleanup.snapshots.iter().map(|(n, _)| n.clone()).collect(),
        removed: Vec::new(),
        kept: Vec::new(),
        pruned: Vec::new(),
    };
    let units = services::UnitChanges::between(&before, &plan.after);
    if ctx.opts.dry_run {
        report.pruned = crate::retention::would_prune(ctx, &cleanup)?;
        report.notes.extend(units.dry_run_notes());
        return Ok(report);
    }
    // Generations nobody references any more go at clean-up.
    let mut keep = plan.after.generations();
    for s in snapshot::list_states(&ctx.staging)? {
        keep.extend(s.generations());
    }
    for (_, s) in &cleanup.snapshots {
        keep.extend(s.generations());
    }
    for g in before.generations() {
        if !keep.contains(&g) && !cleanup.drop_generations.contains(&g) {
            cleanup.drop_generations.push(g);
        }
    }
    let journal = Journal::of(operation, before, plan, cleanup);
    journal.write(&ctx.staging)?;
    crate::faults::point("journaled");
    // Running units: stopped before the steps, started or restarted after them (see `services`).
    let mut run = services::Run::default();
    let mut unit_notes = Vec::new();
    let applied = (|run: &mut services::Run, notes: &mut Vec<String>| -> Result<Vec<CheckResult>> {
        *run = services::stop_leaving(&ctx.host, &units, notes)?;
        for step in &journal.steps {
            tracing::debug!(step = %step.describe(), "applying");
            crate::progress::step("activate", None, &step.describe());
            txn::apply(&ctx.fs(), step).with_context(|| step.describe())?;
        }
        let (config, dir) = (|s: &StageName, g| ctx.config_of(s, g), |s: &StageName, g| ctx.staging.generation(s, g));
        services::activate(&config, &dir, &ctx.host, &journal.before, &journal.after, &units, run, notes)?;
        let mut results = Vec::new();
        for stage in check {
            crate::progress::step("check", Some(stage.as_str()), "running the verify commands");
            results.extend(run_checks(ctx, &journal.after, stage)?);
        }
        results.extend(services::checks(&ctx.host, &journal.after, check)?);
        Ok(results)
    })(&mut run, &mut unit_notes);
    report.notes.extend(unit_notes);
    let undo = |e: anyhow::Error| -> anyhow::Error {
        services::undo_before(&run);
        let undone = journal.roll_back(&ctx.fs()).and_then(|()| {
            fs::remove_file(ctx.staging.journal_file())?;
            Ok(())
        });
        services::undo_after(&run);
        match undone {
            Ok(()) => e,
            Err(u) => e.context(format!("and undoing it failed too ({u:#}); run `op-dbus-stage recover`")),
        }
    };
    let results = match applied {
        Ok(r) => r,
        Err(e) => return Err(crate::history::record_failed(ctx, &journal, undo(e))),
    };
    report.checks = results.clone();
    if let Some(bad) = results.iter().find(|r| !r.passed) {
        let what = match (bad.timed_out, bad.exit) {
            (true, _) => "timed out".to_owned(),
            (false, Some(c)) => format!("exited {c}, expected {}", bad.expected),
            (false, None) => "was killed by a signal".to_owned(),
        };
        let e = VerifyFailed(format!(
            "verify command `{}` {what}; the change was rolled back. Its output:\n{}",
            bad.command,
            bad.output.trim_end()
        ));
        return Err(crate::history::record_failed(ctx, &journal, undo(e.into())));
    }
    journal.commit(&ctx.staging)?;
    crate::history::record(ctx, &journal)?;
    crate::retention::after_commit(ctx, &journal, &mut report);
    if journal.steps.iter().any(|s| matches!(s, Step::EnableUnit { .. } | Step::DisableUnit { .. })) {
        checks::daemon_reload(&ctx.host.root);
    }
    Ok(report)
}

/// Runs the verify commands of `stage` as deployed in `state`.
pub fn run_checks(ctx: &Ctx, state: &State, stage: &StageName) -> Result<Vec<CheckResult>> {
    let Some(s) = state.stages.get(stage) else { return Ok(Vec::new()) };
    let stage_dirs: Vec<PathBuf> = state.stages.keys().map(|n| ctx.staging.stage_link(n)).collect();
    let path = checks::verify_path(&ctx.host.root, &stage_dirs);
    let cwd = ctx.staging.generation(stage, s.active.generation);
    if s.active.activation.verify.is_empty() {
        return Ok(Vec::new());
    }
    let user = checks::resolve_user(&Trust::load(&ctx.host)?.policy.verify_user(stage))?;
    s.active.activation.verify.iter().map(|v| checks::run(v, &cwd, &ctx.host.root, &path, user)).collect()
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}
