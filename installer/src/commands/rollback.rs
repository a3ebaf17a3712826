//! `rollback STAGE` / `rollback --all`: plan the move back to each stage's previous
//! generation (re-admitted against today's trust and policy), then apply it.

use anyhow::{Context, Result, bail};

use formats::StageName;
use formats::layout::Layout;

use crate::admit;
use crate::error::Usage;
use crate::ops::{Ctx, Report, execute};
use crate::plan;
use crate::receive::{self, Trust};
use crate::snapshot;
use crate::state::Generation;
use crate::txn::Cleanup;

/// Going back to a generation that is not active now checks it again as a deploy would:
/// its image's signatures against today's trust store (revocations, scopes, thresholds)
/// and its manifest against today's policy. The image is read from the local store, where
/// every deployed image is kept.
pub(crate) fn readmit(ctx: &Ctx, trust: &Trust, store: &Layout, stage: &StageName, g: &Generation) -> Result<()> {
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
    let resolved = admit::resolutions(&ctx.host, &trust.policy, &config);
    admit::policy(&trust.policy, &config, &what, &verified.signers, &resolved)
}

/// `rollback STAGE` or `rollback --all`: back to each stage's previous generation.
#[tracing::instrument(name = "rollback", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
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
    let plan = plan::transition(&ctx.view(&state, &desired), &state, desired, None)?;
    let names = targets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", "rollback"), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("rollback {names}"), state, plan, &targets, cleanup)
}
