//! `deploy SOURCE` / `receive SOURCE`: receive and verify images, then, per image in
//! dependency order, admit it (pure, from gathered resolutions), unpack it into the temp
//! area, plan the transition and apply it as one transaction.

use std::collections::BTreeSet;
use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

use formats::StageName;
use formats::layout::Layout;
use formats::manifest::MAX_CONFIG_BYTES;

use crate::admit;
use crate::error::{Malformed, Refused};
use crate::ops::{Ctx, Report, execute, now};
use crate::plan;
use crate::receive::{self, Received, Source, Trust, Verified};
use crate::snapshot;
use crate::state::{Activation, Generation, State};
use crate::txn::{self, Cleanup};

/// `deploy SOURCE` / `receive SOURCE`.
#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub received: Vec<Verified>,
    pub deployed: Vec<Report>,
    pub skipped: Vec<String>,
}

#[tracing::instrument(name = "deploy", skip_all, fields(source = ?source, activate, dry_run = ctx.opts.dry_run))]
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

/// Unpacks the layers of `v` into `.tmp/<tmp_name>` (a subvolume on btrfs), checks the
/// tree against the signed manifest, adds the manifest, and keeps the image in the store.
/// On an error nothing is left in the temp area.
fn unpack(ctx: &Ctx, store: &Layout, received: &Received, v: &Verified, tmp_name: &str, state: &State) -> Result<()> {
    let tmp = ctx.staging.tmp().join(tmp_name);
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
        if btrfs_layers {
            let budget = formats::unpack::Budget::of(config, layers.len());
            crate::btrfs::stage(layout, layers, &budget, &ctx.staging.tmp(), tmp_name, on_btrfs, &host)
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
            crate::tar_stage::stage(layout, layers, config, &ctx.staging.tmp(), tmp_name, on_btrfs, &host)
                .with_context(|| format!("unpacking {}", v.reference))?;
        }
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
    // Admission: decided from what was gathered (where each target resolves here).
    let resolved = admit::resolutions(&ctx.host, &trust.policy, config);
    admit::policy(&trust.policy, config, &v.reference.to_string(), &v.signers, &resolved)?;
    admit::against_state(&state, config, &v.reference.to_string(), ctx.opts.allow_downgrade)?;
    let activation = Activation::of(config);

    // Unpack into the temp area and check every file against the signed manifest.
    let generation = state.next_generation;
    let tmp_name = format!("gen-{}-{name}", state.txid + 1);
    let tmp = ctx.staging.tmp().join(&tmp_name);
    if !ctx.opts.dry_run {
        unpack(ctx, store, received, v, &tmp_name, &state)?;
    }
    let new_gen = Generation {
        generation,
        digest: c.digest,
        version: config.version.clone(),
        signers: v.signers.clone(),
        deployed_at: now(),
        activation,
    };
    let desired = plan::with_generation(&state.stages, name, new_gen, ctx.opts.keep);
    let view = ctx.view(&state, &desired);
    let mut plan = plan::transition(&view, &state, desired, Some((name.clone(), generation, tmp_name)))?;
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
