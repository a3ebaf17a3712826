//! `deploy SOURCE...` / `receive SOURCE...`: receive and verify images, then, in dependency
//! order, admit each (pure, from gathered resolutions) against the state the ones before it
//! leave, unpack them into the temp area, plan one transition and apply it as one
//! transaction: all of them or none (`--each`: one transaction per image).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

use formats::StageName;
use formats::layout::Layout;
use formats::manifest::MAX_CONFIG_BYTES;

use crate::admit;
use crate::commands::{repair, with_deps};
use crate::error::{Refused, Usage};
use crate::ops::{Ctx, Report, execute, now};
use crate::plan;
use crate::receive::{self, Received, Source, Trust, Verified};
use crate::snapshot;
use crate::state::{Activation, Generation, State};
use crate::txn::{self, Cleanup};

/// `deploy SOURCE...` / `receive SOURCE...`.
#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub received: Vec<Verified>,
    pub deployed: Vec<Report>,
    pub skipped: Vec<String>,
    /// `--confirm-timeout`: the change awaits `confirm TOKEN` (see `crate::confirm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<crate::confirm::Confirmation>,
    /// `--backup`: the backup taken first (absent when no stage being deployed was deployed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::commands::backup::Created>,
}

/// How `deploy` applies several images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// All of them in one transaction: every one or none (the default).
    Whole,
    /// One transaction per image, in dependency order (`--each`).
    Each,
}

/// An image received from one of the sources.
type Image<'a> = (&'a Received, &'a Verified);

#[tracing::instrument(name = "deploy", skip_all, fields(sources = sources.len(), activate, dry_run = ctx.opts.dry_run))]
pub fn deploy(ctx: &Ctx, sources: &[Source], batch: Batch, with_deps: bool, activate: bool) -> Result<DeployReport> {
    let trust = Trust::load(&ctx.host)?;
    let store = ctx.store()?;
    // Received blobs wait in the store's own temp area, so that storing them is a rename
    // (on btrfs the staging subvolume is another filesystem for rename).
    let recv_tmp = store.root().join(".tmp");
    // A deploy unpacks each image while it arrives (one read of each payload); the tree
    // waits in the staging temp area until the image is admitted.
    let target = (activate && !ctx.opts.dry_run).then(|| {
        let state = ctx.state().unwrap_or_default();
        crate::stream::Target {
            tmp: ctx.staging.tmp(),
            on_btrfs: crate::host::backend(&ctx.staging.dir) == "btrfs",
            skip: state.stages.values().map(|s| s.active.digest).collect(),
            host: state
                .stages
                .keys()
                .map(|name| (name.clone(), crate::host_parent::of_stage(&ctx.staging, &state, name)))
                .collect(),
        }
    });
    let mut all = Vec::new();
    let how = (ctx.opts.allow_expired, ctx.opts.stall_timeout);
    for source in sources {
        all.push(receive::receive(source, &recv_tmp, &store, &trust, how, target.as_ref())?);
    }
    if with_deps && activate {
        add_dependencies(ctx, &store, &trust, &mut all, &recv_tmp)?;
    }
    let mut report = DeployReport {
        received: all.iter().flat_map(|r| r.images.iter().cloned()).collect(),
        deployed: Vec::new(),
        skipped: Vec::new(),
        confirmation: None,
        backup: None,
    };
    if !activate {
        if !ctx.opts.dry_run {
            for received in &all {
                receive::store_received(received, &received.images.iter().collect::<Vec<_>>(), &store)?;
            }
        }
        return Ok(report);
    }
    // The same image named twice (two sources holding it) is deployed once.
    let mut seen = BTreeSet::new();
    let images: Vec<Image> =
        all.iter().flat_map(|r| r.images.iter().map(move |v| (r, v))).filter(|(_, v)| seen.insert(v.digest)).collect();
    let images = order(images);
    if ctx.opts.backup_first {
        // The deployed stages this deploy changes, as they are before it.
        let state = ctx.state()?;
        let changed: Vec<StageName> = images
            .iter()
            .map(|(_, v)| (&v.candidate().config.name, v.digest))
            .filter(|(n, d)| state.stages.get(*n).is_some_and(|s| s.active.digest != *d))
            .map(|(n, _)| n.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !changed.is_empty() {
            let b = crate::commands::backup::create(ctx, &changed, &Default::default())
                .context("taking the backup --backup asks for first; nothing was deployed")?;
            report.backup = Some(b);
        }
    }
    if batch == Batch::Whole {
        twice(&images)?;
        let state = ctx.state()?;
        let (active, fresh): (Vec<Image>, Vec<Image>) = images.into_iter().partition(|(_, v)| {
            state.stages.get(&v.candidate().config.name).is_some_and(|s| s.active.digest == v.digest)
        });
        // An active image whose generation went missing or was damaged rebuilds it first.
        let mut broken = Vec::new();
        for (r, v) in active {
            let name = &v.candidate().config.name;
            let h = repair::health(&ctx.staging, name, &state.stages[name].active, true);
            if h.is_ok() {
                report.skipped.push(format!("{} is already active ({})", v.reference, v.digest));
            } else {
                broken.push((r, v, h));
            }
        }
        let state = if broken.is_empty() {
            state
        } else {
            report.deployed.push(repair::rebuild(ctx, &store, state, broken)?);
            ctx.state()?
        };
        if !fresh.is_empty() {
            report.deployed.push(deploy_batch(ctx, &trust, &store, &fresh, state)?.0);
        }
        return Ok(report);
    }
    // One transaction per image. A dry run plans each image on the state the ones before it
    // would leave, as the real run does.
    let mut planned: Option<State> = None;
    for image in images {
        let state = match (&planned, ctx.opts.dry_run) {
            (Some(p), true) => p.clone(),
            _ => ctx.state()?,
        };
        let v = image.1;
        let name = &v.candidate().config.name;
        if let Some(s) = state.stages.get(name).filter(|s| s.active.digest == v.digest) {
            let h = repair::health(&ctx.staging, name, &s.active, true);
            if h.is_ok() {
                report.skipped.push(format!("{} is already active ({})", v.reference, v.digest));
            } else {
                report.deployed.push(repair::rebuild(ctx, &store, state, vec![(image.0, v, h)])?);
            }
            continue;
        }
        let (r, after) = deploy_batch(ctx, &trust, &store, &[image], state)?;
        planned = Some(after);
        report.deployed.push(r);
    }
    Ok(report)
}

/// `--with-deps`: receives from the host's store the stages the images depend on that
/// neither the images nor the deployed stages satisfy, until nothing is missing.
fn add_dependencies(
    ctx: &Ctx,
    store: &Layout,
    trust: &Trust,
    all: &mut Vec<Received>,
    tmp: &std::path::Path,
) -> Result<()> {
    let state = ctx.state()?;
    let deployed = state.stages.iter().map(|(n, s)| (n.clone(), s.active.version.clone())).collect();
    let stored: Vec<formats::Reference> = store
        .index()?
        .manifests
        .iter()
        .filter_map(|d| d.annotation(formats::oci::ANNOTATION_REF_NAME))
        .filter_map(|t| t.parse().ok())
        .collect();
    loop {
        let members: Vec<with_deps::Member> = all
            .iter()
            .flat_map(|r| &r.images)
            .map(|v| {
                let c = &v.candidate().config;
                (c.name.clone(), c.version.clone(), c.dependencies.clone())
            })
            .collect();
        let add = with_deps::missing(&members, &deployed, &stored)?;
        if add.is_empty() {
            return Ok(());
        }
        for r in add {
            let source = Source::Store(r.name, Some(r.version));
            let how = (ctx.opts.allow_expired, ctx.opts.stall_timeout);
            all.push(receive::receive(&source, tmp, store, trust, how, None)?);
        }
    }
}

/// A batch holds each stage once: two versions of one stage in one transaction would make
/// a generation that was never active its kept one.
fn twice(images: &[Image]) -> Result<()> {
    let mut seen: BTreeMap<&StageName, &str> = BTreeMap::new();
    for (_, v) in images {
        if let Some(first) = seen.insert(&v.candidate().config.name, &v.reference) {
            return Err(Usage(format!(
                "the sources hold {} twice ({first} and {}): deploy one of them, or pass --each to deploy them one \
                 after another",
                v.candidate().config.name,
                v.reference
            ))
            .into());
        }
    }
    Ok(())
}

/// Images in dependency order (dependencies within the set first), then stage number.
fn order(mut left: Vec<Image>) -> Vec<Image> {
    left.sort_by_key(|(_, v)| (v.candidate().config.stage, v.reference.clone()));
    let mut out: Vec<Image> = Vec::new();
    while !left.is_empty() {
        let names: BTreeSet<&StageName> = left.iter().map(|(_, v)| &v.candidate().config.name).collect();
        let pos = left
            .iter()
            .position(|(_, v)| {
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

/// Unpacks the layers of `v` into `.tmp/<tmp_name>` (a subvolume on btrfs), checks the
/// tree against the signed manifest, adds the manifest, and keeps the image in the store.
/// On an error nothing is left in the temp area.
pub(crate) fn unpack(
    ctx: &Ctx,
    store: &Layout,
    received: &Received,
    v: &Verified,
    tmp_name: &str,
    owners: &[(u32, u32)],
    state: &State,
) -> Result<()> {
    let tmp = ctx.staging.tmp().join(tmp_name);
    crate::progress::step("unpack", Some(&v.reference), "unpacking and checking the files");
    let unpacked = (|| -> Result<()> {
        let (c, config) = (v.candidate(), &v.candidate().config);
        txn::remove_tree(&tmp)?;
        let on_btrfs = crate::host::backend(&ctx.staging.dir) == "btrfs";
        let layers = &c.manifest.layers;
        let btrfs_layers = layers.iter().all(|l| l.media_type == formats::oci::BTRFS_ZSTD_MEDIA_TYPE);
        let temp = received.temp.as_ref().map(|t| &t.layout);
        // A thin export has its parent's layers in the store and its own in the temp
        // layout: store the new ones first so that all are in one place.
        let layout = match temp {
            Some(t) if layers.iter().all(|l| t.has_blob(&l.digest)) => t,
            _ => {
                receive::store_received(received, &[v], store)?;
                store
            }
        };
        let host = crate::host_parent::of_stage(&ctx.staging, state, &config.name);
        if let Some(streamed) = received.take_streamed(&v.digest) {
            // Unpacked (or received) and checked while it arrived: moved into place.
            let what = if btrfs_layers { "staging the btrfs layers of" } else { "unpacking" };
            let tree = streamed.with_context(|| format!("{what} {}", v.reference))?;
            fs::rename(&tree, &tmp).with_context(|| format!("moving {} to {}", tree.display(), tmp.display()))?;
        } else if btrfs_layers {
            // Checked against the signed manifest there.
            let layers_from = crate::btrfs::Layers::Stored(layout);
            crate::btrfs::stage(layers_from, layers, config, &ctx.staging.tmp(), tmp_name, on_btrfs, &host)
                .with_context(|| format!("staging the btrfs layers of {}", v.reference))?;
        } else {
            crate::tar_stage::stage(layout, layers, config, &ctx.staging.tmp(), tmp_name, on_btrfs, &host)
                .with_context(|| format!("unpacking {}", v.reference))?;
        }
        // Owners from the signed manifest, never from the payload (see `users`).
        crate::users::own_tree(&tmp, config, owners, btrfs_layers)?;
        // The signed bytes of the embedded manifest, from wherever they arrived.
        let config_digest = &c.manifest.config.digest;
        let from = temp.filter(|l| l.has_blob(config_digest)).unwrap_or(store);
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
    if unpacked.is_err() {
        let _ = txn::remove_tree(&tmp);
    }
    unpacked
}

/// Deploys `images` (in dependency order, none of them active) as one transaction: each is
/// admitted against the state the ones before it leave, all are unpacked, then one plan
/// publishes every generation, switches every stage, runs every stage's verify commands,
/// and commits all of them or undoes all of them. One pre- and one post- snapshot. Returns
/// the report and the state after.
fn deploy_batch(ctx: &Ctx, trust: &Trust, store: &Layout, images: &[Image], state: State) -> Result<(Report, State)> {
    let mut planned = state.clone();
    let mut publish = Vec::new();
    let mut names = Vec::new();
    let mut owners = Vec::new();
    let mut user_notes = Vec::new();
    for (i, (_, v)) in images.iter().enumerate() {
        let c = v.candidate();
        let config = &c.config;
        let name = &config.name;
        // Admission: decided from what was gathered (where each target resolves here).
        let resolved = admit::resolutions(&ctx.host, &trust.policy, config);
        admit::policy(&trust.policy, config, &v.reference.to_string(), &v.signers, &resolved)?;
        admit::against_state(&planned, config, &v.reference.to_string(), ctx.opts.allow_downgrade)?;
        // The stage's system users first (sysusers semantics: never undone), then its owners.
        let ids = crate::users::Ids::read(&ctx.host)?;
        let missing = crate::users::missing(&ids, &config.users);
        if ctx.opts.dry_run {
            user_notes.extend(missing.iter().map(|u| format!("would create system user {}", u.name)));
            crate::users::wanted(config, &crate::users::with_planned(ids, &config.users))
                .map_err(|e| Refused::Dependency(format!("{}: {e:#}", v.reference)))?;
            owners.push(Vec::new());
        } else {
            let notes = crate::users::create(&ctx.host, &missing)?;
            let ids = if notes.is_empty() { ids } else { crate::users::Ids::read(&ctx.host)? };
            owners.push(
                crate::users::wanted(config, &ids)
                    .map_err(|e| Refused::Dependency(format!("{}: {e:#}", v.reference)))?,
            );
            user_notes.extend(notes);
        }
        let generation = state.next_generation + i as u64;
        let new_gen = Generation {
            generation,
            digest: c.digest,
            version: config.version.clone(),
            signers: v.signers.clone(),
            deployed_at: now(),
            activation: Activation::of(config),
        };
        planned.stages = plan::with_generation(&planned.stages, name, new_gen, ctx.opts.keep);
        let highest = planned.highest.entry(name.clone()).or_insert_with(|| config.version.clone());
        if *highest < config.version {
            *highest = config.version.clone();
        }
        publish.push((name.clone(), generation, format!("gen-{}-{name}", state.txid + 1)));
        names.push(name.clone());
    }
    let tmps: Vec<std::path::PathBuf> = publish.iter().map(|(_, _, t)| ctx.staging.tmp().join(t)).collect();
    let drop_tmps = || {
        for t in &tmps {
            let _ = txn::remove_tree(t);
        }
    };
    // Unpack into the temp area and check every file against the signed manifest.
    if !ctx.opts.dry_run {
        for (((received, v), (_, _, tmp_name)), owners) in images.iter().zip(&publish).zip(&owners) {
            // A secret this host cannot decrypt refuses the deploy before anything changes.
            let checked = unpack(ctx, store, received, v, tmp_name, owners, &state).and_then(|()| {
                crate::secrets::check_unpacked(&ctx.host, &ctx.staging.tmp().join(tmp_name), &v.candidate().config)
            });
            if let Err(e) = checked {
                drop_tmps();
                return Err(e);
            }
        }
    }
    let planned_plan = (|| -> Result<plan::Plan> {
        let view = ctx.view(&state, &planned.stages);
        let mut plan = plan::transition_publishing(&view, &state, planned.stages.clone(), publish.clone())?;
        plan.after.highest = planned.highest.clone();
        plan.notes.extend(user_notes.iter().cloned());
        let state_bytes = plan.after.to_bytes().len() as u64;
        if state_bytes > crate::state::MAX_STATE {
            return Err(Refused::Policy(format!(
                "deploying {} would make state.json {state_bytes} bytes, more than the {} the installer reads back; \
                 remove stages or drop kept generations (`op-dbus-stage gc --keep 1`) first",
                images.iter().map(|(_, v)| v.reference.as_str()).collect::<Vec<_>>().join(", "),
                crate::state::MAX_STATE
            ))
            .into());
        }
        Ok(plan)
    })();
    let plan = match planned_plan {
        Ok(p) => p,
        Err(e) => {
            if !ctx.opts.dry_run {
                drop_tmps();
            }
            return Err(e);
        }
    };
    let label = match names.as_slice() {
        [one] => one.to_string(),
        many => format!("deploy-{}-stages", many.len()),
    };
    let cleanup = Cleanup {
        snapshots: vec![
            (snapshot::name(&ctx.staging, "pre", &label), state.clone()),
            (snapshot::name(&ctx.staging, "post", &label), plan.after.clone()),
        ],
        drop_generations: Vec::new(),
    };
    let operation =
        format!("deploy {}", images.iter().map(|(_, v)| v.reference.as_str()).collect::<Vec<_>>().join(" "));
    let after = plan.after.clone();
    execute(ctx, operation, state, plan, &names, cleanup).map(|r| (r, after))
}
