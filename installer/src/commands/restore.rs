//! `restore SNAPSHOT` (and `rollback --snapshot`): plan the move to a snapshot's state
//! (changed stages re-admitted), then apply it.

use anyhow::{Result, bail};

use formats::StageName;

use crate::commands::rollback::readmit;
use crate::ops::{Ctx, Report, execute};
use crate::plan;
use crate::receive::Trust;
use crate::snapshot;
use crate::txn::Cleanup;

/// `restore SNAPSHOT` (and `rollback --snapshot`): the whole host back to a snapshot.
#[tracing::instrument(name = "restore", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn restore(ctx: &Ctx, name: &str) -> Result<Report> {
    restore_as(ctx, name, format!("restore {name}"))
}

/// [`restore`], recorded in history as `operation` (a rollback for want of a confirmation).
pub(crate) fn restore_as(ctx: &Ctx, name: &str, operation: String) -> Result<Report> {
    let state = ctx.state()?;
    let snap = snapshot::read(&ctx.staging, name)?;
    for (s, g) in snap.generations() {
        if !ctx.staging.generation(&s, g).exists() {
            if state.stages.get(&s).is_some_and(|x| x.active.generation == g) {
                bail!(
                    "snapshot {name} needs generation {g} of {s}, which is gone; it is the active one: \
                     `op-dbus-stage repair {s}` rebuilds it from the image store, then restore again"
                );
            }
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
    let plan = plan::transition(&ctx.view(&state, &snap.stages), &state, snap.stages.clone(), None)?;
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", "restore"), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, operation, state, plan, &changed, cleanup)
}
