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
        let host = Host::open(&opts.root)?;
        let staging = Staging { dir: host.staging().context("creating the staging area")? };
        staging.create_dirs()?;
        let lock = Lock::take(&staging.lock_file(), opts.lock_timeout)?;
        let mut ctx = Ctx { host, staging, opts: opts.clone(), _lock: Some(lock), recovered: None };
        ctx.recovered = ctx.recover_pending()?;
        Ok(ctx)
    }

    /// Opens the host for reading: no lock, nothing created.
    pub fn reading(opts: &Options) -> Result<Ctx> {
        let host = Host::open(&opts.root)?;
        let dir = host.staging_if_exists()?.unwrap_or_else(|| host.root.join(crate::host::STAGING));
        Ok(Ctx { host, staging: Staging { dir }, opts: opts.clone(), _lock: None, recovered: None })
    }

    fn recover_pending(&self) -> Result<Option<RecoverOutcome>> {
        let out = match Journal::read(&self.staging)? {
            Some(j) => {
                let o = j.recover(&self.host, &self.staging).context("finishing the interrupted transaction")?;
                if !self.opts.quiet {
                    eprintln!("recovered an interrupted transaction ({}): {o:?}", j.operation);
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

/// What a changing command did or would do.
#[derive(Debug, Serialize)]
pub struct Report {
    pub operation: String,
    pub dry_run: bool,
    pub steps: Vec<String>,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
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
        notes: plan.notes.clone(),
        checks: Vec::new(),
        snapshots: cleanup.snapshots.iter().map(|(n, _)| n.clone()).collect(),
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
    s.active.activation.verify.iter().map(|v| checks::run(v, &cwd, &ctx.host.root, &path)).collect()
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
    for v in order(&received) {
        match deploy_one(ctx, &trust, &store, &received, v)? {
            Some(r) => report.deployed.push(r),
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

fn deploy_one(ctx: &Ctx, trust: &Trust, store: &Layout, received: &Received, v: &Verified) -> Result<Option<Report>> {
    let c = v.candidate();
    let config = &c.config;
    let name = &config.name;
    let state = ctx.state()?;
    if state.stages.get(name).is_some_and(|s| s.active.digest == c.digest) {
        return Ok(None);
    }
    // Policy: targets, feature, dependencies, downgrade.
    for f in &config.files {
        if !trust.policy.target_allowed(&f.target) {
            return Err(Refused::Policy(format!(
                "{}: target {} is outside the allowed prefixes ({}); a trusted key is not a licence to write there. \
                 Allow the prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                v.reference,
                f.target,
                trust.policy.allowed_prefixes().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
            ))
            .into());
        }
    }
    if let Some(feature) = &config.requires_feature
        && !trust.policy.feature_enabled(feature)
    {
        return Err(Refused::Policy(format!(
            "{} requires the feature {feature:?}, which this host does not enable; add it to `features` in /etc/op-dbus/stage.toml",
            v.reference
        ))
        .into());
    }
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
                crate::btrfs::stage(layout, layers, &ctx.staging.tmp(), &tmp_name, on_btrfs)
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
        activation: Activation::of(config),
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
    let cleanup = Cleanup {
        snapshots: vec![
            (snapshot::name(&ctx.staging, "pre", name.as_str()), state.clone()),
            (snapshot::name(&ctx.staging, "post", name.as_str()), plan.after.clone()),
        ],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("deploy {}", v.reference), state, plan, std::slice::from_ref(name), cleanup).map(Some)
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
    let plan = plan::transition(&ctx.host, &state, snap.stages.clone(), None)?;
    let changed: Vec<StageName> = snap
        .stages
        .iter()
        .filter(|(n, s)| state.stages.get(*n).map(|x| x.active.generation) != Some(s.active.generation))
        .map(|(n, _)| n.clone())
        .collect();
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
/// snapshot needs them.
pub fn gc(ctx: &Ctx, keep: usize) -> Result<Report> {
    let state = ctx.state()?;
    let mut after = state.clone();
    after.txid += 1;
    for s in after.stages.values_mut() {
        let excess = s.previous.len().saturating_sub(keep);
        s.previous.drain(..excess);
    }
    let plan = Plan { steps: Vec::new(), after, notes: Vec::new() };
    let mut report = execute(ctx, format!("gc --keep {keep}"), state.clone(), plan, &[], Cleanup::default())?;
    if !ctx.opts.dry_run {
        // Orphaned generations (a crash between publish and the state) go too.
        let live = ctx.state()?.generations();
        let mut keep_set = live.clone();
        for s in snapshot::list_states(&ctx.staging)? {
            keep_set.extend(s.generations());
        }
        if let Ok(stages) = fs::read_dir(ctx.staging.dir.join(".generations")) {
            for st in stages.flatten() {
                let Ok(name) = st.file_name().to_string_lossy().parse::<StageName>() else { continue };
                for g in fs::read_dir(st.path())?.flatten() {
                    let Ok(n) = g.file_name().to_string_lossy().parse::<u64>() else { continue };
                    if !keep_set.contains(&(name.clone(), n)) {
                        txn::remove_tree(&g.path())?;
                        report.steps.push(format!("deleted generation {n} of {name}"));
                    }
                }
            }
        }
    }
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
    let host = Host::open(&opts.root)?;
    if opts.dry_run {
        return Ok(InitReport {
            root: host.root.clone(),
            staging: host.root.join(crate::host::STAGING),
            store: host.root.join(STORE),
            trusted_keys: host.root.join("etc/op-dbus/trusted-keys"),
            policy: host.root.join("etc/op-dbus/stage.toml"),
            backend: "directory",
        });
    }
    let ctx = Ctx::changing(opts)?;
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
    pub signers: Vec<String>,
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
                            out.push(format!("{target}: {staged:?} is missing"));
                        }
                    }
                    other => out.push(format!("{target}: expected a link to {want}, found {other:?}")),
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

/// `trust add FILE.pub [--scope GLOB]`.
pub fn trust_add(ctx: &Ctx, file: &Path, scopes: &[String]) -> Result<serde_json::Value> {
    let key = keys::PublicKey::read(file)?;
    let id = key.key_id();
    if ctx.opts.dry_run {
        let dest = ctx.host.root.join(format!("etc/op-dbus/trusted-keys/{id}.pub"));
        return Ok(serde_json::json!({"key_id": id.to_string(), "file": dest, "scopes": scopes, "dry_run": true}));
    }
    // The scope first: a crash in between must never leave the key trusted for every stage.
    if !scopes.is_empty() {
        edit_policy(ctx, |text, path| keys::policy::set_scope(text, path, &id, scopes).map_err(Into::into))?;
    }
    let dest = ctx.host.ensure_dir("etc/op-dbus/trusted-keys")?.join(format!("{id}.pub"));
    formats::layout::write_atomic(&dest, key.to_spki_pem().as_bytes())?;
    Ok(serde_json::json!({"key_id": id.to_string(), "file": dest, "scopes": scopes}))
}

/// `trust revoke KEYID`.
pub fn trust_revoke(ctx: &Ctx, id: &keys::KeyId) -> Result<serde_json::Value> {
    if !ctx.opts.dry_run {
        edit_policy(ctx, |text, path| keys::policy::add_revoked(text, path, id).map_err(Into::into))?;
    }
    Ok(serde_json::json!({"revoked": id.to_string(), "dry_run": ctx.opts.dry_run}))
}

fn edit_policy(ctx: &Ctx, f: impl FnOnce(&str, &Path) -> Result<String>) -> Result<()> {
    let etc = ctx.host.ensure_dir(crate::host::ETC)?;
    let path = etc.join("stage.toml");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DEFAULT_POLICY.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
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
                revoked: trust.policy.is_revoked(&id),
            }
        })
        .collect())
}
