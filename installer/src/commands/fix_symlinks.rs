//! `fix-symlinks STAGE`: plan putting back the stage's links that are missing or wrong
//! ([`crate::plan::fix_links`]) and its missing plugin registrations, then apply it.

use anyhow::Result;

use formats::StageName;

use crate::error::Usage;
use crate::ops::{Ctx, Report, execute};
use crate::plan;
use crate::txn::Cleanup;

/// `fix-symlinks STAGE`: put back the stage's links that are missing or wrong.
#[tracing::instrument(name = "fix-symlinks", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn fix_symlinks(ctx: &Ctx, stage: &StageName) -> Result<Report> {
    let state = ctx.state()?;
    if !state.stages.contains_key(stage) {
        return Err(Usage(format!("{stage} is not deployed (see `op-dbus-stage list`)")).into());
    }
    let links = state.placed.iter().filter(|(_, p)| &p.stage == stage).map(|(t, _)| t);
    let view = plan::HostView::of_targets(&ctx.fs(), &state, links);
    let mut plan = plan::fix_links(&view, &state, stage)?;
    // Missing plugin registrations are written again too.
    let (steps, notes) = crate::plugins::repair(&ctx.host, stage, &state.stages[stage])?;
    plan.steps.extend(steps);
    plan.notes.extend(notes);
    execute(ctx, format!("fix-symlinks {stage}"), state, plan, &[], Cleanup::default())
}
