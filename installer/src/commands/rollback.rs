//! `rollback STAGE` / `rollback --all`: plan the move back to each stage's previous
//! generation (re-admitted against today's trust and policy), or, for a stage on its first
//! generation, to the host as before it was deployed; then apply it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};

use formats::StageName;
use formats::layout::Layout;

use crate::admit;
use crate::commands::repair::stored_image;
use crate::error::{Refused, Usage};
use crate::ops::{Ctx, Report, execute};
use crate::plan;
use crate::receive::Trust;
use crate::snapshot;
use crate::state::{Generation, StageState};
use crate::txn::Cleanup;

/// Going back to a generation that is not active now checks it again as a deploy would:
/// its image's signatures against today's trust store (revocations, scopes, thresholds)
/// and its manifest against today's policy. The image is read from the local store, where
/// every deployed image is kept.
pub(crate) fn readmit(ctx: &Ctx, trust: &Trust, store: &Layout, stage: &StageName, g: &Generation) -> Result<()> {
    let verified = stored_image(ctx, trust, store, stage, g)?.ok_or_else(|| {
        crate::error::Untrusted(format!(
            "{stage} {} ({}) is no longer in the local store, so its signatures cannot be checked again; \
             deploy it again from its image instead",
            g.version, g.digest
        ))
    })?;
    let config = &verified.candidate().config;
    let what = format!("{stage} {} (generation {})", g.version, g.generation);
    let resolved = admit::resolutions(&ctx.host, &trust.policy, config);
    admit::policy(&trust.policy, config, &what, &verified.signers, &resolved)
}

/// Where `rollback` takes the stages: the desired stages, the ones going back to their
/// previous generation, and the ones on their first generation, which go away (the host as
/// before that stage was deployed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Back {
    pub desired: BTreeMap<StageName, StageState>,
    pub to_previous: Vec<StageName>,
    pub removed: Vec<StageName>,
}

/// Plans `rollback STAGE...` (`named`) or `rollback --all` (`named` empty) on `stages`: a
/// stage with a kept generation goes back to it; a stage on its first generation is
/// removed. `--all` takes back every stage with a kept generation, or, when every stage is
/// on its first one, removes them all (the host as before the earliest deploy). A stage in
/// `trimmed` has had older generations deleted: without a kept one it is refused, not
/// removed. A stage removed while another that stays depends on it is refused (exit 4).
pub fn plan_back(
    stages: &BTreeMap<StageName, StageState>,
    trimmed: &BTreeSet<StageName>,
    named: &[StageName],
) -> Result<Back> {
    let targets: Vec<StageName> = if !named.is_empty() {
        named.to_vec()
    } else if stages.values().any(|s| !s.previous.is_empty()) {
        stages.iter().filter(|(_, s)| !s.previous.is_empty()).map(|(n, _)| n.clone()).collect()
    } else if stages.is_empty() {
        bail!("nothing is deployed, so there is nothing to roll back");
    } else if !trimmed.is_empty() {
        bail!("no stage has a previous generation to roll back to");
    } else {
        stages.keys().cloned().collect()
    };
    let mut back = Back { desired: stages.clone(), to_previous: Vec::new(), removed: Vec::new() };
    for name in &targets {
        if back.to_previous.contains(name) || back.removed.contains(name) {
            continue;
        }
        let s = back
            .desired
            .get_mut(name)
            .ok_or_else(|| Usage(format!("{name} is not deployed (see `op-dbus-stage list`)")))?;
        match s.previous.pop() {
            Some(prev) => {
                s.active = prev;
                back.to_previous.push(name.clone());
            }
            None if trimmed.contains(name) => {
                bail!(
                    "{name} has no previous generation to roll back to (older ones were deleted); \
                     `op-dbus-stage remove {name}` takes it away"
                );
            }
            None => {
                back.desired.remove(name);
                back.removed.push(name.clone());
            }
        }
    }
    for gone in &back.removed {
        for (n, s) in &back.desired {
            if s.active.activation.dependencies.iter().any(|d| &d.stage == gone) {
                return Err(Refused::Dependency(format!(
                    "{gone} is on its first generation, so rolling it back removes it, and {n} depends on it; \
                     roll back or remove {n} first"
                ))
                .into());
            }
        }
    }
    Ok(back)
}

/// `rollback STAGE...` or `rollback --all` (no stages): each stage back to its previous
/// generation, or away when it is on its first ([`plan_back`]).
#[tracing::instrument(name = "rollback", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn rollback(ctx: &Ctx, stages: &[StageName]) -> Result<Report> {
    let state = ctx.state()?;
    let back = plan_back(&state.stages, &state.trimmed, stages)?;
    let (trust, store) = (Trust::load(&ctx.host)?, ctx.store()?);
    for name in &back.to_previous {
        readmit(ctx, &trust, &store, name, &back.desired[name].active)?;
    }
    let plan = plan::transition(&ctx.view(&state, &back.desired), &state, back.desired, None)?;
    let mut names: Vec<String> = back.to_previous.iter().map(|n| n.to_string()).collect();
    names.extend(back.removed.iter().map(|n| format!("{n} (first generation: removed)")));
    let cleanup = Cleanup {
        snapshots: vec![(snapshot::name(&ctx.staging, "pre", "rollback"), state.clone())],
        drop_generations: Vec::new(),
    };
    execute(ctx, format!("rollback {}", names.join(" ")), state, plan, &back.to_previous, cleanup)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use formats::{Digest, StageName};

    use super::plan_back;
    use crate::state::{Activation, Generation, StageState};

    fn generation(n: u64, needs: &[&str]) -> Generation {
        let dependencies =
            needs.iter().map(|d| formats::manifest::Dependency { stage: d.parse().unwrap(), req: None }).collect();
        Generation {
            generation: n,
            digest: Digest::of(&n.to_be_bytes()),
            version: format!("1.0.{n}").parse().unwrap(),
            signers: Vec::new(),
            deployed_at: String::new(),
            activation: Activation { dependencies, ..Activation::default() },
        }
    }

    /// Stages by name: (name, generations oldest first, dependencies of the active one).
    fn stages(list: &[(&str, &[u64], &[&str])]) -> BTreeMap<StageName, StageState> {
        list.iter()
            .map(|&(name, gens, needs)| {
                let (active, previous) = gens.split_last().unwrap();
                let s = StageState {
                    active: generation(*active, needs),
                    previous: previous.iter().map(|g| generation(*g, &[])).collect(),
                };
                (name.parse().unwrap(), s)
            })
            .collect()
    }

    fn n(s: &str) -> StageName {
        s.parse().unwrap()
    }

    fn none() -> BTreeSet<StageName> {
        BTreeSet::new()
    }

    #[test]
    fn a_stage_whose_older_generations_were_deleted_is_not_rolled_away() {
        let st = stages(&[("a", &[4], &[]), ("b", &[5], &[])]);
        let trimmed = BTreeSet::from([n("a")]);
        let e = plan_back(&st, &trimmed, &[n("a")]).unwrap_err().to_string();
        assert!(e.contains("no previous generation") && e.contains("older ones were deleted"), "{e}");
        assert!(plan_back(&st, &trimmed, &[n("b")]).unwrap().removed == vec![n("b")]);
        let e = plan_back(&st, &trimmed, &[]).unwrap_err().to_string();
        assert!(e.contains("no stage has a previous generation"), "{e}");
    }

    #[test]
    fn a_first_generation_goes_away_and_a_later_one_goes_back() {
        let st = stages(&[("a", &[1], &[]), ("b", &[2, 3], &[])]);
        let back = plan_back(&st, &none(), &[n("a"), n("b")]).unwrap();
        assert_eq!(back.removed, vec![n("a")]);
        assert_eq!(back.to_previous, vec![n("b")]);
        assert!(!back.desired.contains_key(&n("a")));
        assert_eq!(back.desired[&n("b")].active.generation, 2);
        assert!(back.desired[&n("b")].previous.is_empty());
        // A name given twice is taken back once.
        let back = plan_back(&st, &none(), &[n("b"), n("b")]).unwrap();
        assert_eq!(back.desired[&n("b")].active.generation, 2);
    }

    #[test]
    fn all_takes_back_the_stages_with_kept_generations_only() {
        let st = stages(&[("a", &[1], &[]), ("b", &[2, 3], &[])]);
        let back = plan_back(&st, &none(), &[]).unwrap();
        assert_eq!((back.to_previous, back.removed), (vec![n("b")], vec![]));
        assert!(back.desired.contains_key(&n("a")));
    }

    #[test]
    fn all_on_first_generations_returns_to_before_the_earliest_deploy() {
        let st = stages(&[("core", &[1], &[]), ("net", &[2], &["core"]), ("flow", &[3], &["net"])]);
        let back = plan_back(&st, &none(), &[]).unwrap();
        assert!(back.desired.is_empty());
        assert_eq!(back.removed.len(), 3);
        assert!(plan_back(&BTreeMap::new(), &none(), &[]).unwrap_err().to_string().contains("nothing is deployed"));
    }

    #[test]
    fn removing_a_stage_another_needs_is_refused_with_exit_4() {
        let st = stages(&[("core", &[1], &[]), ("net", &[2], &["core"])]);
        let e = plan_back(&st, &none(), &[n("core")]).unwrap_err();
        assert!(e.to_string().contains("net depends on it"), "{e}");
        assert!(e.downcast_ref::<crate::error::Refused>().is_some());
        // Both at once is fine: nothing that stays needs core.
        assert!(plan_back(&st, &none(), &[n("net"), n("core")]).unwrap().desired.is_empty());
        assert!(plan_back(&st, &none(), &[n("web")]).unwrap_err().to_string().contains("web is not deployed"));
    }
}
