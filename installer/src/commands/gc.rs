//! `gc --keep N`: plan which generations go (kept previous ones beyond N, and orphans of
//! a crash) and apply that plan: the state after and the deletions at clean-up, journaled.

use std::collections::BTreeSet;
use std::fs;

use anyhow::Result;

use formats::StageName;

use crate::ops::{Ctx, GenerationRef, Report, execute};
use crate::plan::Plan;
use crate::snapshot;
use crate::txn::Cleanup;

/// `gc --keep N`: keep N previous generations per stage; delete the rest unless a
/// snapshot needs them. The report says what was removed and what was kept, and why.
#[tracing::instrument(name = "gc", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
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
    // Every generation not needed goes at clean-up, through the journal: orphans of a crash
    // (published, never committed) too, in the dry run's plan as in the real run's.
    let cleanup = Cleanup {
        snapshots: Vec::new(),
        drop_generations: on_disk.iter().filter(|g| !needed.contains_key(*g)).cloned().collect(),
    };
    let plan = Plan { steps: Vec::new(), after, notes: Vec::new() };
    let mut report = execute(ctx, format!("gc --keep {keep}"), state, plan, &[], cleanup)?;
    report.removed = removed;
    report.kept = kept;
    Ok(report)
}
