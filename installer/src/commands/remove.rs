//! `remove STAGE`: plan the move to the state without it, then apply it.

use anyhow::Result;

use formats::StageName;

use crate::error::{Refused, Usage};
use crate::ops::{Ctx, Report, execute};
use crate::plan;
use crate::snapshot;
use crate::txn::Cleanup;

/// `remove STAGE`.
#[tracing::instrument(name = "remove", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
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
    let plan = plan::transition(&ctx.view(&state, &desired), &state, desired, None)?;
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", &format!("remove-{stage}")), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("remove {stage}"), state, plan, &[], cleanup)
}
