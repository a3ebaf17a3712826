//! The operations of `op-dbus-stage`: each computes a plan, prints it for `--dry-run`, or
//! applies it as one journaled transaction under the lock.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use formats::StageName;
use formats::layout::Layout;
use formats::manifest::{FileType, MAX_CONFIG_BYTES, StageConfig};

use crate::checks::{self, CheckResult};
use crate::error::{Malformed, Refused, Usage, VerifyFailed};
use crate::host::{Host, STORE, TargetState};
use crate::lock::Lock;
use crate::plan::{self, Plan};
use crate::receive::{self, Received, Source, Trust, Verified};
use crate::snapshot;
use crate::state::{Activation, Generation, StageState, State};
use crate::txn::{self, Cleanup, Journal, RecoverOutcome, Staging, Step};

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
}

impl Ctx {
    /// Opens the host for a command that changes it: takes the lock and finishes any
    /// interrupted transaction first.
    pub fn changing(opts: &Options) -> Result<Ctx> {
        let host = open_initialised(opts)?;
        Ctx::changing_host(host, opts)
    }

    fn changing_host(host: Host, opts: &Options) -> Result<Ctx> {
        let staging = Staging { dir: host.staging().context("creating the staging area")? };
        staging.create_dirs()?;
        let lock = Lock::take(&staging.lock_file(), opts.lock_timeout)?;
        let mut ctx = Ctx { host, staging, opts: opts.clone(), _lock: Some(lock), recovered: None };
        ctx.recovered = ctx.recover_pending()?;
        Ok(ctx)
    }

    /// Opens the host for reading: no lock, nothing created.
    pub fn reading(opts: &Options) -> Result<Ctx> {
        let host = open_initialised(opts)?;
        let dir = host.staging_if_exists()?.unwrap_or_else(|| host.root.join(crate::host::STAGING));
        Ok(Ctx { host, staging: Staging { dir }, opts: opts.clone(), _lock: None, recovered: None })
    }

    fn recover_pending(&self) -> Result<Option<RecoverOutcome>> {
        let out = match Journal::read(&self.staging)? {
            Some(j) => {
                let o = j.recover(&self.host, &self.staging).context("finishing the interrupted transaction")?;
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
fn execute(
    ctx: &Ctx,
    operation: String,
    before: State,
    plan: Plan,
    check: &[StageName],
    mut cleanup: Cleanup,
) -> Result<Report> {
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
    };
    if ctx.opts.dry_run {
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
        if !keep.contains(&g) {
            cleanup.drop_generations.push(g);
        }
    }
    let journal = Journal { txid: plan.after.txid, operation, steps: plan.steps, before, after: plan.after, cleanup };
    journal.write(&ctx.staging)?;
    crate::faults::point("journaled");
    let applied = (|| -> Result<Vec<CheckResult>> {
        for step in &journal.steps {
            txn::apply(&ctx.host, &ctx.staging, step).with_context(|| step.describe())?;
        }
        let mut results = Vec::new();
        for stage in check {
            results.extend(run_checks(ctx, &journal.after, stage)?);
        }
        Ok(results)
    })();
    let undo = |e: anyhow::Error| -> anyhow::Error {
        match journal.roll_back(&ctx.host, &ctx.staging).and_then(|()| {
            fs::remove_file(ctx.staging.journal_file())?;
            Ok(())
        }) {
            Ok(()) => e,
            Err(u) => e.context(format!("and undoing it failed too ({u:#}); run `op-dbus-stage recover`")),
        }
    };
    let results = match applied {
        Ok(r) => r,
        Err(e) => return Err(undo(e)),
    };
    report.checks = results.clone();
    if let Some(bad) = results.iter().find(|r| !r.passed) {
        let what = match (bad.timed_out, bad.exit) {
            (true, _) => "timed out".to_owned(),
            (false, Some(c)) => format!("exited {c}, expected {}", bad.expected),
            (false, None) => "was killed by a signal".to_owned(),
        };
        return Err(undo(
            VerifyFailed(format!(
                "verify command `{}` {what}; the change was rolled back. Its output:\n{}",
                bad.command,
                bad.output.trim_end()
            ))
            .into(),
        ));
    }
    journal.commit(&ctx.staging)?;
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

fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `deploy SOURCE` / `receive SOURCE`.
#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub received: Vec<Verified>,
    pub deployed: Vec<Report>,
    pub skipped: Vec<String>,
}

pub fn deploy(ctx: &Ctx, source: &Source, activate: bool) -> Result<DeployReport> {
    let trust = Trust::load(&ctx.host)?;
    let store = ctx.store()?;
    // Received blobs wait in the store's own temp area, so that storing them is a rename
    // (on btrfs the staging subvolume is another filesystem for rename).
    let recv_tmp = store.root().join(".tmp");
    let received = receive::receive(source, &recv_tmp, &store, &trust, ctx.opts.allow_expired)?;
    let mut report = DeployReport { received: received.images.clone(), deployed: Vec::new(), skipped: Vec::new() };
    if !activate {
        if !ctx.opts.dry_run {
            receive::store_received(&received, &received.images.iter().collect::<Vec<_>>(), &store)?;
        }
        return Ok(report);
    }
    // A dry run plans each image on the state the ones before it would leave, as the
    // real run does.
    let mut planned: Option<State> = None;
    for v in order(&received) {
        let state = match (&planned, ctx.opts.dry_run) {
            (Some(p), true) => p.clone(),
            _ => ctx.state()?,
        };
        match deploy_one(ctx, &trust, &store, &received, v, state)? {
            Some((r, after)) => {
                report.deployed.push(r);
                planned = Some(after);
            }
            None => report.skipped.push(format!("{} is already active ({})", v.reference, v.digest)),
        }
    }
    Ok(report)
}

/// Images in dependency order (dependencies within the set first), then stage number.
fn order(received: &Received) -> Vec<&Verified> {
    let mut left: Vec<&Verified> = received.images.iter().collect();
    left.sort_by_key(|v| (v.candidate().config.stage, v.reference.clone()));
    let mut out: Vec<&Verified> = Vec::new();
    while !left.is_empty() {
        let names: BTreeSet<&StageName> = left.iter().map(|v| &v.candidate().config.name).collect();
        let pos = left
            .iter()
            .position(|v| {
                v.candidate()
                    .config
                    .dependencies
                    .iter()
                    .all(|d| !names.contains(&d.stage) || d.stage == v.candidate().config.name)
            })
            .unwrap_or(0);
        out.push(left.remove(pos));
    }
    out
}

fn deploy_one(
    ctx: &Ctx,
    trust: &Trust,
    store: &Layout,
    received: &Received,
    v: &Verified,
    state: State,
) -> Result<Option<(Report, State)>> {
    let c = v.candidate();
    let config = &c.config;
    let name = &config.name;
    if state.stages.get(name).is_some_and(|s| s.active.digest == c.digest) {
        return Ok(None);
    }
    // Policy: targets, feature, dependencies, downgrade.
    admit(&ctx.host, trust, config, &v.reference, &v.signers)?;
    for d in &config.dependencies {
        match state.stages.get(&d.stage) {
            Some(s) if d.matches(&s.active.version) => {}
            Some(s) => {
                return Err(Refused::Dependency(format!(
                    "{} needs {d}, but {} {} is active; deploy a matching version of {} first",
                    v.reference, d.stage, s.active.version, d.stage
                ))
                .into());
            }
            None => {
                return Err(Refused::Dependency(format!(
                    "{} needs {d}, which is not deployed; deploy {} first",
                    v.reference, d.stage
                ))
                .into());
            }
        }
    }
    if let Some(h) = state.highest.get(name)
        && *h > config.version
        && !ctx.opts.allow_downgrade
    {
        return Err(Refused::Downgrade(format!(
            "{} is older than {name} {h}, which was installed before; pass --allow-downgrade to install it anyway \
             (to go back to a kept generation, use `op-dbus-stage rollback {name}`)",
            v.reference
        ))
        .into());
    }

    // The state this generation adds is bounded, so that state.json stays readable.
    let activation = Activation::of(config);
    let activation_bytes = serde_json::to_vec_pretty(&activation).map_or(usize::MAX, |b| b.len());
    if activation_bytes > crate::state::MAX_STAGE_STATE {
        return Err(Malformed(format!(
            "{}: its files:, services:, verify: and dependencies: make {activation_bytes} bytes of deployed state, \
             more than the {} one stage may add (state.json must stay readable); link a directory instead of \
             many files, or shorten the paths",
            v.reference,
            crate::state::MAX_STAGE_STATE
        ))
        .into());
    }

    // Unpack into the temp area and check every file against the signed manifest.
    let generation = state.next_generation;
    let tmp_name = format!("gen-{}-{name}", state.txid + 1);
    let tmp = ctx.staging.tmp().join(&tmp_name);
    if !ctx.opts.dry_run {
        let unpacked = (|| -> Result<()> {
            txn::remove_tree(&tmp)?;
            let on_btrfs = crate::host::backend(&ctx.staging.dir) == "btrfs";
            let layers = &c.manifest.layers;
            let btrfs_layers = layers.iter().all(|l| l.media_type == formats::oci::BTRFS_ZSTD_MEDIA_TYPE);
            let temp = received.temp.as_ref().map(|t| &t.layout);
            let in_temp = |d: &formats::Digest| temp.is_some_and(|t| t.has_blob(d));
            // A thin export has its parent's layers in the store and its own in the temp
            // layout: store the new ones first so that all are in one place.
            if !layers.iter().all(|l| in_temp(&l.digest)) {
                receive::store_received(received, &[v], store)?;
            }
            let layout = if layers.iter().all(|l| in_temp(&l.digest)) { temp.expect("checked") } else { store };
            if btrfs_layers {
                let budget = formats::unpack::Budget::of(config, layers.len());
                crate::btrfs::stage(layout, layers, &budget, &ctx.staging.tmp(), &tmp_name, on_btrfs)
                    .with_context(|| format!("staging the btrfs layers of {}", v.reference))?;
                // A parent found by `btrfs receive` may be a host generation holding our
                // manifest.json (rewritten below); everything else must match exactly.
                let mismatches = formats::unpack::check_tree_ignoring(&tmp, config, &["manifest.json"])?;
                if let Some(m) = mismatches.first() {
                    return Err(Malformed(format!(
                        "{}: the received tree differs from the signed manifest: {}: {} ({} difference(s))",
                        v.reference,
                        m.path,
                        m.problem,
                        mismatches.len()
                    ))
                    .into());
                }
            } else {
                if on_btrfs {
                    subvol::create(&ctx.staging.tmp(), &tmp_name)?;
                } else {
                    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                }
                formats::unpack::unpack_layers(layout, layers, config, &tmp)
                    .with_context(|| format!("unpacking {}", v.reference))?;
            }
            // The signed bytes of the embedded manifest, from wherever they arrived.
            let config_digest = &c.manifest.config.digest;
            let from = received.temp.as_ref().map(|t| &t.layout).filter(|l| l.has_blob(config_digest)).unwrap_or(store);
            let manifest_json = from.read_blob(config_digest, MAX_CONFIG_BYTES)?;
            fs::write(tmp.join("manifest.json"), manifest_json)
                .with_context(|| format!("writing {}/manifest.json", tmp.display()))?;
            txn::sync_dir(&tmp)?;
            crate::faults::point("unpacked");
            // The image passed every check: keep it in the store (the next thin export needs it).
            receive::store_received(received, &[v], store)?;
            crate::faults::point("stored");
            Ok(())
        })();
        if let Err(e) = unpacked {
            let _ = txn::remove_tree(&tmp);
            return Err(e);
        }
    }

    let mut desired = state.stages.clone();
    let new_gen = Generation {
        generation,
        digest: c.digest,
        version: config.version.clone(),
        signers: v.signers.clone(),
        deployed_at: now(),
        activation,
    };
    let entry = match desired.remove(name) {
        Some(mut old) => {
            old.previous.push(old.active.clone());
            let excess = old.previous.len().saturating_sub(ctx.opts.keep);
            old.previous.drain(..excess);
            StageState { active: new_gen, previous: old.previous }
        }
        None => StageState { active: new_gen, previous: Vec::new() },
    };
    desired.insert(name.clone(), entry);
    let mut plan = plan::transition(&ctx.host, &state, desired, Some((name.clone(), generation, tmp_name)))?;
    let highest = plan.after.highest.entry(name.clone()).or_insert_with(|| config.version.clone());
    if *highest < config.version {
        *highest = config.version.clone();
    }
    let state_bytes = plan.after.to_bytes().len() as u64;
    if state_bytes > crate::state::MAX_STATE {
        if !ctx.opts.dry_run {
            let _ = txn::remove_tree(&tmp);
        }
        return Err(Refused::Policy(format!(
            "deploying {} would make state.json {state_bytes} bytes, more than the {} the installer reads back; \
             remove stages or drop kept generations (`op-dbus-stage gc --keep 1`) first",
            v.reference,
            crate::state::MAX_STATE
        ))
        .into());
    }
    let cleanup = Cleanup {
        snapshots: vec![
            (snapshot::name(&ctx.staging, "pre", name.as_str()), state.clone()),
            (snapshot::name(&ctx.staging, "post", name.as_str()), plan.after.clone()),
        ],
        drop_generations: Vec::new(),
    };
    let after = plan.after.clone();
    execute(ctx, format!("deploy {}", v.reference), state, plan, std::slice::from_ref(name), cleanup)
        .map(|r| Some((r, after)))
}

/// What the host's policy asks of a stage before it may be active: every target under the
/// allowed prefixes, by its text and by where it resolves on this host (links on the way
/// that root does not own are never followed), and its required feature enabled.
fn admit(host: &Host, trust: &Trust, config: &StageConfig, what: &str, signers: &[keys::KeyId]) -> Result<()> {
    let prefixes = || trust.policy.allowed_prefixes().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    // The signers' scopes may narrow the prefixes further ([scope_prefixes]).
    let verdict = keys::trust::Verdict { signers: signers.to_vec() };
    let narrowed = |target: &formats::path::TargetPath| -> Result<()> {
        if verdict.may_place(&trust.policy, &config.name, target) {
            return Ok(());
        }
        let scopes: Vec<String> = verdict
            .signers
            .iter()
            .map(|k| match trust.policy.scope_prefixes(k) {
                Some(ps) => format!("key {k}: {}", ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")),
                None => format!("key {k}: any allowed prefix"),
            })
            .collect();
        Err(Refused::Policy(format!(
            "{what}: target {target} is outside the prefixes the scopes of its signers allow ({}; {} needed per target). \
             Widen the key's entry in [scope_prefixes] of /etc/op-dbus/stage.toml if this is intended",
            scopes.join("; "),
            trust.policy.threshold(&config.name)
        ))
        .into())
    };
    for f in &config.files {
        if !trust.policy.target_allowed(&f.target) {
            return Err(Refused::Policy(format!(
                "{what}: target {} is outside the allowed prefixes ({}); a trusted key is not a licence to write there. \
                 Allow the prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                f.target,
                prefixes()
            ))
            .into());
        }
        let resolved = host.resolve_target(&f.target).map_err(|e| match e.get_ref() {
            Some(x) if x.is::<crate::host::UnsafeLink>() => {
                Refused::Policy(format!("{what}: target {}: {e}", f.target)).into()
            }
            _ => anyhow::Error::new(e).context(format!("{what}: resolving target {}", f.target)),
        })?;
        narrowed(&f.target)?;
        if resolved != f.target {
            narrowed(&resolved)?;
        }
        if !trust.policy.target_allowed(&resolved) {
            return Err(Refused::Policy(format!(
                "{what}: target {} resolves to {resolved} on this host (through symlinks), which is outside the allowed \
                 prefixes ({}); allow that prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                f.target,
                prefixes()
            ))
            .into());
        }
    }
    if let Some(feature) = &config.requires_feature
        && !trust.policy.feature_enabled(feature)
    {
        return Err(Refused::Policy(format!(
            "{what} requires the feature {feature:?}, which this host does not enable: `op-dbus-stage feature enable {feature}` enables it"
        ))
        .into());
    }
    Ok(())
}

/// Going back to a generation that is not active now checks it again as a deploy would:
/// its image's signatures against today's trust store (revocations, scopes, thresholds)
/// and its manifest against today's policy. The image is read from the local store, where
/// every deployed image is kept.
fn readmit(ctx: &Ctx, trust: &Trust, store: &Layout, stage: &StageName, g: &Generation) -> Result<()> {
    let index = store.index()?;
    let gone = || {
        crate::error::Untrusted(format!(
            "{stage} {} ({}) is no longer in the local store, so its signatures cannot be checked again; \
             deploy it again from its image instead",
            g.version, g.digest
        ))
    };
    let tag = index
        .manifests
        .iter()
        .filter(|d| d.digest == g.digest)
        .filter_map(|d| d.annotation(formats::oci::ANNOTATION_REF_NAME))
        .find(|t| !t.ends_with(".sig"))
        .map(str::to_owned)
        .ok_or_else(gone)?;
    let c = receive::candidate(store, &index, &tag)?.ok_or_else(gone)?;
    let what = format!("{stage} {} (generation {})", g.version, g.generation);
    if c.config.name != *stage {
        return Err(crate::error::Untrusted(format!("{what}: the stored image is of {}", c.config.name)).into());
    }
    let config = c.config.clone();
    let verified =
        receive::verify(c, trust, ctx.opts.allow_expired).with_context(|| format!("checking {what} again"))?;
    admit(&ctx.host, trust, &config, &what, &verified.signers)
}

/// `rollback STAGE` or `rollback --all`: back to each stage's previous generation.
pub fn rollback(ctx: &Ctx, stages: &[StageName]) -> Result<Report> {
    let state = ctx.state()?;
    let mut desired = state.stages.clone();
    let targets: Vec<StageName> = if stages.is_empty() {
        state.stages.iter().filter(|(_, s)| !s.previous.is_empty()).map(|(n, _)| n.clone()).collect()
    } else {
        stages.to_vec()
    };
    if targets.is_empty() {
        bail!("no stage has a previous generation to roll back to");
    }
    for name in &targets {
        let s =
            desired.get_mut(name).ok_or_else(|| Usage(format!("{name} is not deployed (see `op-dbus-stage list`)")))?;
        let Some(prev) = s.previous.pop() else {
            bail!("{name} has no previous generation to roll back to; `op-dbus-stage remove {name}` takes it away");
        };
        s.active = prev;
    }
    let (trust, store) = (Trust::load(&ctx.host)?, ctx.store()?);
    for name in &targets {
        readmit(ctx, &trust, &store, name, &desired[name].active)?;
    }
    let plan = plan::transition(&ctx.host, &state, desired, None)?;
    let names = targets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", "rollback"), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("rollback {names}"), state, plan, &targets, cleanup)
}

/// `remove STAGE`.
pub fn remove(ctx: &Ctx, stage: &StageName) -> Result<Report> {
    let state = ctx.state()?;
    if !state.stages.contains_key(stage) {
        return Err(Usage(format!("{stage} is not deployed (see `op-dbus-stage list`)")).into());
    }
    for (n, s) in &state.stages {
        if n != stage && s.active.activation.dependencies.iter().any(|d| &d.stage == stage) {
            return Err(Refused::Dependency(format!("{n} depends on {stage}; remove {n} first")).into());
        }
    }
    let mut desired = state.stages.clone();
    desired.remove(stage);
    let plan = plan::transition(&ctx.host, &state, desired, None)?;
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", &format!("remove-{stage}")), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("remove {stage}"), state, plan, &[], cleanup)
}

/// `restore SNAPSHOT` (and `rollback --snapshot`): the whole host back to a snapshot.
pub fn restore(ctx: &Ctx, name: &str) -> Result<Report> {
    let state = ctx.state()?;
    let snap = snapshot::read(&ctx.staging, name)?;
    for (s, g) in snap.generations() {
        if !ctx.staging.generation(&s, g).exists() {
            bail!("snapshot {name} needs generation {g} of {s}, which is gone; it cannot be restored");
        }
    }
    let changed: Vec<StageName> = snap
        .stages
        .iter()
        .filter(|(n, s)| state.stages.get(*n).map(|x| x.active.generation) != Some(s.active.generation))
        .map(|(n, _)| n.clone())
        .collect();
    let (trust, store) = (Trust::load(&ctx.host)?, ctx.store()?);
    for name in &changed {
        readmit(ctx, &trust, &store, name, &snap.stages[name].active)?;
    }
    let plan = plan::transition(&ctx.host, &state, snap.stages.clone(), None)?;
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", "restore"), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("restore {name}"), state, plan, &changed, cleanup)
}

/// `fix-symlinks STAGE`: put back the stage's links that are missing or wrong.
pub fn fix_symlinks(ctx: &Ctx, stage: &StageName) -> Result<Report> {
    let state = ctx.state()?;
    if !state.stages.contains_key(stage) {
        return Err(Usage(format!("{stage} is not deployed (see `op-dbus-stage list`)")).into());
    }
    let mut steps = Vec::new();
    let mut after = state.clone();
    after.txid += 1;
    let mut n = 0;
    for (target, p) in state.placed.iter().filter(|(_, p)| &p.stage == stage && p.kind == FileType::Symlink) {
        let text = p.link.clone().unwrap_or_default();
        match ctx.host.state(target)? {
            TargetState::Symlink(t) if t == text => continue,
            TargetState::Missing => {}
            _ => {
                n += 1;
                let backup = format!("b{}-{n}", after.txid);
                steps.push(Step::Backup { target: target.clone(), backup: backup.clone() });
                if let Some(pl) = after.placed.get_mut(target)
                    && pl.backup.is_none()
                {
                    pl.backup = Some(backup);
                }
            }
        }
        for a in target.relative().ancestors() {
            let dir = formats::path::TargetPath::parse(&format!("/{a}")).expect("valid");
            if !ctx.host.dir_exists(&dir)? && !steps.contains(&Step::MkDir { path: dir.clone() }) {
                after.dirs.insert(dir.clone());
                steps.push(Step::MkDir { path: dir });
            }
        }
        steps.push(Step::Link { target: target.clone(), text });
    }
    let plan = Plan { steps, after, notes: Vec::new() };
    execute(ctx, format!("fix-symlinks {stage}"), state, plan, &[], Cleanup::default())
}

/// `gc --keep N`: keep N previous generations per stage; delete the rest unless a
/// snapshot needs them. The report says what was removed and what was kept, and why.
pub fn gc(ctx: &Ctx, keep: usize) -> Result<Report> {
    let state = ctx.state()?;
    let mut after = state.clone();
    after.txid += 1;
    for s in after.stages.values_mut() {
        let excess = s.previous.len().saturating_sub(keep);
        s.previous.drain(..excess);
    }
    // What stays: the generations of the state after, and those snapshots need.
    let mut needed = std::collections::BTreeMap::new();
    for (name, s) in &after.stages {
        needed.insert((name.clone(), s.active.generation), "active");
        for g in &s.previous {
            needed.insert((name.clone(), g.generation), "previous");
        }
    }
    for s in snapshot::list_states(&ctx.staging)? {
        for g in s.generations() {
            needed.entry(g).or_insert("snapshot");
        }
    }
    // Every generation on disk, orphans of a crash included.
    let mut on_disk = BTreeSet::new();
    if let Ok(stages) = fs::read_dir(ctx.staging.dir.join(".generations")) {
        for st in stages.flatten() {
            let Ok(name) = st.file_name().to_string_lossy().parse::<StageName>() else { continue };
            for g in fs::read_dir(st.path())?.flatten() {
                let Ok(n) = g.file_name().to_string_lossy().parse::<u64>() else { continue };
                on_disk.insert((name.clone(), n));
            }
        }
    }
    let gen_ref = |(stage, generation): &(StageName, u64), reason| GenerationRef {
        stage: stage.clone(),
        generation: *generation,
        bytes: snapshot::tree_size(&ctx.staging.generation(stage, *generation)),
        reason,
    };
    let kept: Vec<GenerationRef> = on_disk.iter().filter_map(|g| needed.get(g).map(|r| gen_ref(g, Some(*r)))).collect();
    let removed: Vec<GenerationRef> =
        on_disk.iter().filter(|g| !needed.contains_key(*g)).map(|g| gen_ref(g, None)).collect();
    let plan = Plan { steps: Vec::new(), after, notes: Vec::new() };
    let mut report = execute(ctx, format!("gc --keep {keep}"), state.clone(), plan, &[], Cleanup::default())?;
    if !ctx.opts.dry_run {
        // Orphaned generations (a crash between publish and the state) go too.
        let live = ctx.state()?.generations();
        let mut keep_set = live.clone();
        for s in snapshot::list_states(&ctx.staging)? {
            keep_set.extend(s.generations());
        }
        for (name, n) in &on_disk {
            let dir = ctx.staging.generation(name, *n);
            if !keep_set.contains(&(name.clone(), *n)) && dir.exists() {
                txn::remove_tree(&dir)?;
                report.steps.push(format!("deleted generation {n} of {name}"));
            }
        }
    }
    report.removed = removed;
    report.kept = kept;
    Ok(report)
}

/// `init`: the staging area, the store, the trust store and a default policy file.
#[derive(Debug, Serialize)]
pub struct InitReport {
    pub root: PathBuf,
    pub staging: PathBuf,
    pub store: PathBuf,
    pub trusted_keys: PathBuf,
    pub policy: PathBuf,
    pub backend: &'static str,
}

pub const DEFAULT_POLICY: &str = r#"# op-dbus-stage policy. Every setting is optional; an empty file means the defaults.
# Where stages may place files:
# allowed_prefixes = ["/usr/local", "/opt", "/etc/op-dbus", "/etc/systemd/system", "/var/www", "/var/lib/op-dbus"]
# Features enabled on this host, for a stage's `requires_feature`:
# features = ["openflow"]
# Revoked key ids:
# revoked = []
"#;

pub fn init(opts: &Options) -> Result<InitReport> {
    if opts.dry_run {
        // The backend the staging area would get: that of the nearest existing folder.
        let root = opts.root.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/"));
        let host_root = if opts.root.is_dir() { fs::canonicalize(&opts.root)? } else { opts.root.clone() };
        return Ok(InitReport {
            root: host_root.clone(),
            staging: host_root.join(crate::host::STAGING),
            store: host_root.join(STORE),
            trusted_keys: host_root.join("etc/op-dbus/trusted-keys"),
            policy: host_root.join("etc/op-dbus/stage.toml"),
            backend: if subvol::is_btrfs(root).unwrap_or(false) { "btrfs" } else { "directory" },
        });
    }
    // A missing root folder is created, like `mkdir -p`.
    fs::create_dir_all(&opts.root).with_context(|| format!("creating the root {}", opts.root.display()))?;
    let ctx = Ctx::changing_host(Host::open(&opts.root)?, opts)?;
    let backend = crate::host::backend(&ctx.staging.dir);
    let store = ctx.store()?;
    let keys_dir = ctx.host.ensure_dir("etc/op-dbus/trusted-keys")?;
    let etc = ctx.host.ensure_dir(crate::host::ETC)?;
    let policy = etc.join("stage.toml");
    if !policy.exists() {
        formats::layout::write_atomic(&policy, DEFAULT_POLICY.as_bytes())?;
    }
    if !ctx.staging.state_file().exists() {
        State::new().write(&ctx.staging.state_file())?;
    }
    Ok(InitReport {
        root: ctx.host.root.clone(),
        staging: ctx.staging.dir.clone(),
        store: store.root().to_owned(),
        trusted_keys: keys_dir,
        policy,
        backend,
    })
}

/// `list`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub status: &'static str,
}

pub fn list(ctx: &Ctx) -> Result<Vec<Listed>> {
    let state = ctx.state()?;
    let mut out: Vec<Listed> = state
        .stages
        .iter()
        .map(|(n, s)| Listed {
            name: n.to_string(),
            version: s.active.version.to_string(),
            digest: s.active.digest.to_string(),
            status: "deployed",
        })
        .collect();
    if let Ok(p) = ctx.host.resolve(STORE)
        && let Ok(store) = Layout::open(&p)
    {
        for d in store.index()?.manifests {
            let Some(tag) = d.annotation(formats::oci::ANNOTATION_REF_NAME) else { continue };
            let Ok(r) = tag.parse::<formats::Reference>() else { continue };
            if state.stages.get(&r.name).is_some_and(|s| s.active.digest == d.digest) {
                continue;
            }
            out.push(Listed {
                name: r.name.to_string(),
                version: r.version.to_string(),
                digest: d.digest.to_string(),
                status: "available",
            });
        }
    }
    out.sort_by(|a, b| (&a.name, a.status, &a.version).cmp(&(&b.name, b.status, &b.version)));
    Ok(out)
}

/// `status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub root: PathBuf,
    pub backend: &'static str,
    pub stages: Vec<StageStatus>,
    pub unfinished_transaction: Option<String>,
    pub broken_links: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StageStatus {
    pub name: String,
    pub version: String,
    pub generation: u64,
    pub digest: String,
    pub signers: Vec<keys::KeyId>,
    pub deployed_at: String,
    pub previous: Vec<String>,
}

pub fn status(ctx: &Ctx) -> Result<Status> {
    let state = ctx.state()?;
    let unfinished = Journal::read(&ctx.staging).ok().flatten().map(|j| j.operation);
    Ok(Status {
        root: ctx.host.root.clone(),
        backend: crate::host::backend(&ctx.staging.dir),
        stages: state
            .stages
            .iter()
            .map(|(n, s)| StageStatus {
                name: n.to_string(),
                version: s.active.version.to_string(),
                generation: s.active.generation,
                digest: s.active.digest.to_string(),
                signers: s.active.signers.clone(),
                deployed_at: s.active.deployed_at.clone(),
                previous: s.previous.iter().map(|g| format!("{} (generation {})", g.version, g.generation)).collect(),
            })
            .collect(),
        unfinished_transaction: unfinished,
        broken_links: link_problems(ctx, &state, None)?,
    })
}

fn link_problems(ctx: &Ctx, state: &State, only: Option<&StageName>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (target, p) in &state.placed {
        if only.is_some_and(|s| s != &p.stage) {
            continue;
        }
        match p.kind {
            FileType::Symlink => {
                let want = p.link.clone().unwrap_or_default();
                match ctx.host.state(target)? {
                    TargetState::Symlink(t) if t == want => {
                        let staged = ctx.staging.stage_link(&p.stage).join(p.path.as_str());
                        if fs::symlink_metadata(&staged).is_err() {
                            out.push(format!("{target}: {} is missing", staged.display()));
                        }
                    }
                    other => out.push(format!("{target}: expected a link to {want}, found {other}")),
                }
            }
            FileType::Copy => {
                if ctx.host.file_digest(target)? != p.sha256 {
                    out.push(format!(
                        "{target}: the copy differs from the staged file (run `deploy` again to replace it)"
                    ));
                }
            }
            FileType::CopyIfNotExists => {}
        }
    }
    Ok(out)
}

/// `verify [STAGE]`.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub stages: Vec<StageVerify>,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct StageVerify {
    pub name: String,
    pub links: Vec<String>,
    pub files: Vec<String>,
    pub checks: Vec<CheckResult>,
}

pub fn verify(ctx: &Ctx, only: Option<&StageName>) -> Result<VerifyReport> {
    let state = ctx.state()?;
    if let Some(s) = only
        && !state.stages.contains_key(s)
    {
        return Err(Usage(format!("{s} is not deployed (see `op-dbus-stage list`)")).into());
    }
    let mut stages = Vec::new();
    for (name, s) in &state.stages {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let config = ctx.config_of(name, s.active.generation)?;
        let dir = ctx.staging.generation(name, s.active.generation);
        let files = formats::unpack::check_tree_ignoring(&dir, &config, &["manifest.json"])
            .with_context(|| format!("checking {}", dir.display()))?
            .into_iter()
            .map(|m| format!("{}: {}", m.path, m.problem))
            .collect();
        let links = link_problems(ctx, &state, Some(name))?;
        let checks = run_checks(ctx, &state, name)?;
        stages.push(StageVerify { name: name.to_string(), links, files, checks });
    }
    let ok = stages.iter().all(|s| s.links.is_empty() && s.files.is_empty() && s.checks.iter().all(|c| c.passed));
    Ok(VerifyReport { stages, ok })
}

/// What `trust add` did or would do.
#[derive(Debug, Serialize)]
pub struct TrustAdded {
    pub key_id: keys::KeyId,
    /// The key's file in the trust store.
    pub file: PathBuf,
    /// The stage globs the key may sign after the command (empty: any stage).
    pub scopes: Vec<String>,
    pub dry_run: bool,
}

/// `trust add FILE.pub [--scope GLOB]... [--replace]`: `--scope` adds to the key's
/// scopes; with `--replace` the given globs become its scopes.
pub fn trust_add(ctx: &Ctx, file: &Path, scopes: &[String], replace: bool) -> Result<TrustAdded> {
    let key = keys::PublicKey::read(file)?;
    let id = key.key_id();
    let policy_path = ctx.host.root.join("etc/op-dbus/stage.toml");
    let current = match fs::read_to_string(&policy_path) {
        Ok(text) => keys::policy::Policy::parse(&text, &policy_path)
            .map_err(|e| Malformed(format!("{e:#}")))?
            .scope(&id)
            .map(<[String]>::to_vec)
            .unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", policy_path.display())),
    };
    let mut wanted = if replace || scopes.is_empty() { Vec::new() } else { current.clone() };
    for g in scopes {
        if !wanted.contains(g) {
            wanted.push(g.clone());
        }
    }
    let after = if scopes.is_empty() { current } else { wanted };
    let dest = ctx.host.root.join(format!("etc/op-dbus/trusted-keys/{id}.pub"));
    if ctx.opts.dry_run {
        return Ok(TrustAdded { key_id: id, file: dest, scopes: after, dry_run: true });
    }
    // The scope first: a crash in between must never leave the key trusted for every stage.
    if !scopes.is_empty() {
        edit_policy(ctx, |text, path| keys::policy::set_scope(text, path, &id, &after).map_err(Into::into))?;
    }
    let dest = ctx.host.ensure_dir("etc/op-dbus/trusted-keys")?.join(format!("{id}.pub"));
    formats::layout::write_atomic(&dest, key.to_spki_pem().as_bytes())?;
    Ok(TrustAdded { key_id: id, file: dest, scopes: after, dry_run: false })
}

/// What `trust revoke` did or would do.
#[derive(Debug, Serialize)]
pub struct TrustRevoked {
    pub revoked: keys::KeyId,
    pub dry_run: bool,
}

/// `trust revoke KEYID`.
pub fn trust_revoke(ctx: &Ctx, id: &keys::KeyId) -> Result<TrustRevoked> {
    if !ctx.opts.dry_run {
        edit_policy(ctx, |text, path| keys::policy::add_revoked(text, path, id).map_err(Into::into))?;
    }
    Ok(TrustRevoked { revoked: *id, dry_run: ctx.opts.dry_run })
}

/// What `feature enable|disable` did or would do.
#[derive(Debug, Serialize)]
pub struct FeatureChanged {
    pub feature: String,
    pub enabled: bool,
    /// Every feature the host enables after the command.
    pub features: Vec<String>,
    pub dry_run: bool,
}

/// `feature enable|disable NAME`: edits `features` of stage.toml, keeping the rest intact.
pub fn set_feature(ctx: &Ctx, feature: &str, enabled: bool) -> Result<FeatureChanged> {
    let path = ctx.host.root.join("etc/op-dbus/stage.toml");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DEFAULT_POLICY.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = keys::policy::set_feature(&text, &path, feature, enabled).map_err(|e| Malformed(format!("{e:#}")))?;
    if !ctx.opts.dry_run && new != text {
        edit_policy(ctx, |_, _| Ok(new.clone()))?;
    }
    let features = keys::policy::Policy::parse(&new, &path)
        .map_err(|e| Malformed(format!("{e:#}")))?
        .features()
        .map(str::to_owned)
        .collect();
    Ok(FeatureChanged { feature: feature.to_owned(), enabled, features, dry_run: ctx.opts.dry_run })
}

fn edit_policy(ctx: &Ctx, f: impl FnOnce(&str, &Path) -> Result<String>) -> Result<()> {
    let etc = ctx.host.ensure_dir(crate::host::ETC)?;
    let path = etc.join("stage.toml");
    let rel = format!("{}/stage.toml", crate::host::ETC);
    let text = match crate::receive::read_in_root(&ctx.host, &rel, keys::policy::MAX_POLICY_BYTES)? {
        Some(bytes) => {
            String::from_utf8(bytes).map_err(|_| Malformed(format!("{}: not UTF-8 text", path.display())))?
        }
        None => DEFAULT_POLICY.to_owned(),
    };
    let new = f(&text, &path).map_err(|e| Malformed(format!("{e:#}")))?;
    formats::layout::write_atomic(&path, new.as_bytes())?;
    Ok(())
}

/// `trust list`.
#[derive(Debug, Serialize)]
pub struct TrustedInfo {
    pub key_id: String,
    pub file: PathBuf,
    pub scopes: Vec<String>,
    /// `[scope_prefixes]`: empty when the key's scope does not narrow the prefixes.
    pub prefixes: Vec<String>,
    pub revoked: bool,
}

pub fn trust_list(ctx: &Ctx) -> Result<Vec<TrustedInfo>> {
    let trust = Trust::load(&ctx.host)?;
    Ok(trust
        .keys
        .iter()
        .map(|k| {
            let id = k.key.key_id();
            TrustedInfo {
                key_id: id.to_string(),
                file: k.source.clone(),
                scopes: trust.policy.scope(&id).map(|s| s.to_vec()).unwrap_or_default(),
                prefixes: trust.policy.scope_prefixes(&id).unwrap_or_default().iter().map(|p| p.to_string()).collect(),
                revoked: trust.policy.is_revoked(&id),
            }
        })
        .collect())
}
