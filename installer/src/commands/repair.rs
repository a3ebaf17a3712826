//! `repair [STAGE...]`: finds deployed stages whose active generation is missing or
//! damaged (deleted by hand, as the staging guide's `btrfs subvolume delete
//! /var/lib/op-dbus/staging/stage-X` does through the stage link, emptied, edited) or whose
//! stage link is gone, and rebuilds them in place from the image store: the same generation
//! number, so that snapshots naming it can be restored again. The image's signatures are
//! checked again against today's trust store, and the rebuilt tree against the signed
//! manifest, as a deploy does; then the stage's verify commands run. When the store lacks
//! the image, the error names the image to bring. `deploy` of an image that is active but
//! whose generation is broken rebuilds it the same way (`rebuild`).

use std::fs;
use std::path::Path;

use anyhow::Result;

use formats::StageName;
use formats::layout::Layout;
use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};

use crate::commands::deploy::unpack;
use crate::error::NotFound;
use crate::ops::{Ctx, Report, execute};
use crate::plan::Plan;
use crate::receive::{self, Received, Trust, Verified};
use crate::state::{Activation, Generation, State};
use crate::txn::{Cleanup, Staging, Step};

/// The state of a stage's active generation on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationHealth {
    Intact,
    /// `.generations/<stage>/<n>` is not there.
    Missing,
    /// It is there, but not as its signed manifest says (the first difference).
    Damaged(String),
}

/// What is wrong with a deployed stage in the staging area, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub generation: GenerationHealth,
    /// The stage link `staging/<stage>` when it does not point at the active generation.
    pub link: Option<String>,
}

impl Health {
    pub fn is_ok(&self) -> bool {
        self.generation == GenerationHealth::Intact && self.link.is_none()
    }

    /// What is wrong, or none when all is well.
    pub fn what(&self, generation: u64) -> Option<String> {
        let mut parts = Vec::new();
        match &self.generation {
            GenerationHealth::Intact => {}
            GenerationHealth::Missing => parts.push(format!("generation {generation} is missing")),
            GenerationHealth::Damaged(d) => parts.push(format!("generation {generation} is damaged: {d}")),
        }
        if let Some(l) = &self.link {
            parts.push(format!("the stage link {l}"));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// [`Health::what`] with the command that mends it, for `status`, `list` and `verify`.
    pub fn problem(&self, stage: &StageName, generation: u64) -> Option<String> {
        self.what(generation).map(|w| format!("{w}; `op-dbus-stage repair {stage}` rebuilds it from the image store"))
    }
}

/// Looks at the active generation `g` of `stage`: whether it is there, has its manifest,
/// and (`thorough`) whether every staged file matches the signed manifest, which reads
/// every file; and whether the stage link points at it.
pub fn health(staging: &Staging, stage: &StageName, g: &Generation, thorough: bool) -> Health {
    let dir = staging.generation(stage, g.generation);
    let generation = generation_health(&dir, g, thorough);
    let want = Path::new(".generations").join(stage.as_str()).join(g.generation.to_string());
    let link = match fs::read_link(staging.stage_link(stage)) {
        Ok(t) if t == want => None,
        Ok(t) => Some(format!("points at {} instead of {}", t.display(), want.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("is missing".to_owned()),
        Err(_) => Some("is not a symlink".to_owned()),
    };
    Health { generation, link }
}

fn generation_health(dir: &Path, g: &Generation, thorough: bool) -> GenerationHealth {
    match fs::symlink_metadata(dir) {
        Err(_) => return GenerationHealth::Missing,
        Ok(m) if !m.is_dir() => return GenerationHealth::Damaged("it is not a directory".into()),
        Ok(_) => {}
    }
    let manifest = dir.join("manifest.json");
    let config = match read_manifest(&manifest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return GenerationHealth::Damaged("its manifest.json is missing".into());
        }
        Err(e) => return GenerationHealth::Damaged(format!("its manifest.json cannot be read ({e})")),
        Ok(bytes) => match StageConfig::from_bytes(&bytes) {
            Ok(c) => c,
            Err(e) => return GenerationHealth::Damaged(format!("its manifest.json does not parse ({e})")),
        },
    };
    if !thorough {
        return GenerationHealth::Intact;
    }
    if Activation::of(&config) != g.activation {
        return GenerationHealth::Damaged("its manifest.json is not the one deployed".into());
    }
    match formats::unpack::check_tree_ignoring(dir, &config, &["manifest.json"]) {
        Ok(m) if m.is_empty() => GenerationHealth::Intact,
        Ok(m) => GenerationHealth::Damaged(format!("{}: {} ({} difference(s))", m[0].path, m[0].problem, m.len())),
        Err(e) => GenerationHealth::Damaged(format!("its files cannot be checked ({e:#})")),
    }
}

/// The bytes of a generation's `manifest.json`: a regular file of at most
/// [`MAX_CONFIG_BYTES`].
fn read_manifest(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!("not a regular file of at most {MAX_CONFIG_BYTES} bytes")));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    Ok(bytes)
}

/// A stage to rebuild: its health and the temp folder (under `.tmp/`) its tree is unpacked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub stage: StageName,
    pub health: Health,
    pub tmp: String,
}

/// Plans rebuilding the `broken` stages of `before` in place: a damaged generation is set
/// aside and replaced, a missing one put back, a missing or wrong stage link pointed at the
/// active generation again. The state stays as it is (but for the txid).
pub fn plan_repair(before: &State, broken: &[Broken]) -> Plan {
    let mut after = before.clone();
    after.txid = before.txid + 1;
    let mut steps = Vec::new();
    for b in broken {
        let Some(s) = before.stages.get(&b.stage) else { continue };
        let generation = s.active.generation;
        let aside = match b.health.generation {
            GenerationHealth::Intact => None,
            GenerationHealth::Missing => Some(None),
            GenerationHealth::Damaged(_) => Some(Some(format!("g{}-{}", after.txid, b.stage))),
        };
        if let Some(aside) = aside {
            steps.push(Step::RebuildGeneration { stage: b.stage.clone(), generation, tmp: b.tmp.clone(), aside });
        }
        if b.health.link.is_some() {
            steps.push(Step::SetStageLink { stage: b.stage.clone(), from: None, to: Some(generation) });
        }
    }
    Plan { steps, after, notes: Vec::new() }
}

/// The stored image of generation `g` of `stage`, its signatures checked again against
/// today's trust store; `None` when the store does not hold it.
pub(crate) fn stored_image(
    ctx: &Ctx,
    trust: &Trust,
    store: &Layout,
    stage: &StageName,
    g: &Generation,
) -> Result<Option<Verified>> {
    let index = store.index()?;
    let tag = index
        .manifests
        .iter()
        .filter(|d| d.digest == g.digest)
        .filter_map(|d| d.annotation(formats::oci::ANNOTATION_REF_NAME))
        .find(|t| !t.ends_with(".sig"))
        .map(str::to_owned);
    let Some(tag) = tag else { return Ok(None) };
    let Some(c) = receive::candidate(store, &index, &tag)? else { return Ok(None) };
    let what = format!("{stage} {} (generation {})", g.version, g.generation);
    if c.config.name != *stage {
        return Err(crate::error::Untrusted(format!("{what}: the stored image is of {}", c.config.name)).into());
    }
    let verified =
        receive::verify(c, trust, ctx.opts.allow_expired).map_err(|e| e.context(format!("checking {what} again")))?;
    Ok(Some(verified))
}

/// `repair [STAGE...]` (none: every deployed stage).
#[tracing::instrument(name = "repair", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn repair(ctx: &Ctx, stages: &[StageName]) -> Result<Report> {
    let state = ctx.state()?;
    let mut broken = Vec::new();
    for (name, s) in &state.stages {
        if !stages.is_empty() && !stages.contains(name) {
            continue;
        }
        let h = health(&ctx.staging, name, &s.active, true);
        if !h.is_ok() {
            broken.push((name.clone(), h));
        }
    }
    let (trust, store) = (Trust::load(&ctx.host)?, ctx.store()?);
    let index = store.index()?;
    let mut images = Vec::new();
    let mut lacking = Vec::new();
    for (name, h) in broken {
        let g = &state.stages[&name].active;
        match stored_image(ctx, &trust, &store, &name, g)? {
            Some(v) => images.push((v, h)),
            None => lacking.push(format!("{name}:{} ({})", g.version, g.digest)),
        }
    }
    if !lacking.is_empty() {
        return Err(NotFound(format!(
            "the image store lacks {}, so nothing was repaired: bring the image (an `op-dbus-image export` of it) \
             with `op-dbus-stage receive FILE.oci.tar` and run `op-dbus-stage repair` again, or deploy it with \
             `op-dbus-stage deploy FILE.oci.tar`",
            lacking.join(", ")
        ))
        .into());
    }
    let received =
        Received { images: images.iter().map(|(v, _)| v.clone()).collect(), temp: None, index, streamed: Vec::new() };
    let items: Vec<(&Received, &Verified, Health)> =
        received.images.iter().zip(images).map(|(v, (_, h))| (&received, v, h)).collect();
    rebuild(ctx, &store, state, items)
}

/// Rebuilds the generations of active images whose staged tree is broken (`items`: where
/// each image was received, the image, what is wrong) as one transaction, then runs their
/// verify commands.
pub(crate) fn rebuild(
    ctx: &Ctx,
    store: &Layout,
    state: State,
    items: Vec<(&Received, &Verified, Health)>,
) -> Result<Report> {
    let broken: Vec<Broken> = items
        .iter()
        .map(|(_, v, h)| {
            let stage = v.candidate().config.name.clone();
            Broken { tmp: format!("repair-{}-{stage}", state.txid + 1), stage, health: h.clone() }
        })
        .collect();
    let mut plan = plan_repair(&state, &broken);
    if broken.is_empty() {
        plan.notes.push("every deployed generation is intact; nothing to repair".into());
    }
    for b in &broken {
        let g = state.stages[&b.stage].active.generation;
        if let Some(w) = b.health.what(g) {
            plan.notes.push(format!("{}: {w}", b.stage));
        }
    }
    let needs_tree = |b: &Broken| b.health.generation != GenerationHealth::Intact;
    if !ctx.opts.dry_run {
        for ((received, v, _), b) in items.iter().zip(&broken) {
            if !needs_tree(b) {
                continue;
            }
            // The owners the stage declares (its users were created when it was deployed).
            let owners: Result<Vec<(u32, u32)>> = crate::users::Ids::read(&ctx.host).and_then(|ids| {
                crate::users::wanted(&v.candidate().config, &ids)
                    .map_err(|e| crate::error::Refused::Dependency(format!("{}: {e:#}", v.reference)).into())
            });
            if let Err(e) = owners.and_then(|owners| unpack(ctx, store, received, v, &b.tmp, &owners, &state)) {
                for b in &broken {
                    let _ = crate::txn::remove_tree(&ctx.staging.tmp().join(&b.tmp));
                }
                return Err(e);
            }
        }
    }
    let names: Vec<StageName> = broken.iter().map(|b| b.stage.clone()).collect();
    let operation = format!(
        "repair {}",
        if names.is_empty() {
            "(nothing)".to_owned()
        } else {
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ")
        }
    );
    execute(ctx, operation, state, plan, &names, Cleanup::default())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use formats::StageName;

    use super::{Broken, GenerationHealth, Health, plan_repair};
    use crate::hostfs::mem::{MemFs, Node, Tree};
    use crate::hostfs::{HostFs, Kept};
    use crate::state::{Generation, StageState, State};
    use crate::txn::{self, Journal, Step};

    fn n(s: &str) -> StageName {
        s.parse().unwrap()
    }

    fn state() -> State {
        let g = Generation::for_tests;
        let mut s = State::new();
        s.txid = 9;
        s.stages = BTreeMap::from([
            (n("a"), StageState { active: g(3), previous: vec![g(1)] }),
            (n("b"), StageState { active: g(4), previous: Vec::new() }),
        ]);
        s
    }

    fn broken(stage: &str, generation: GenerationHealth, link: bool) -> Broken {
        Broken {
            stage: n(stage),
            health: Health { generation, link: link.then(|| "is missing".to_owned()) },
            tmp: format!("repair-10-{stage}"),
        }
    }

    #[test]
    fn a_missing_generation_is_put_back_and_a_damaged_one_set_aside_first() {
        let before = state();
        let plan = plan_repair(
            &before,
            &[broken("a", GenerationHealth::Missing, false), broken("b", GenerationHealth::Damaged("x".into()), true)],
        );
        assert_eq!(
            plan.steps,
            vec![
                Step::RebuildGeneration { stage: n("a"), generation: 3, tmp: "repair-10-a".into(), aside: None },
                Step::RebuildGeneration {
                    stage: n("b"),
                    generation: 4,
                    tmp: "repair-10-b".into(),
                    aside: Some("g10-b".into())
                },
                Step::SetStageLink { stage: n("b"), from: None, to: Some(4) },
            ]
        );
        // The deployed state is what it was: the same generations, numbers and all.
        assert_eq!(plan.after.stages, before.stages);
        assert_eq!(plan.after.txid, 10);
        // Only a link to put back: no tree.
        let plan = plan_repair(&before, &[broken("a", GenerationHealth::Intact, true)]);
        assert_eq!(plan.steps, vec![Step::SetStageLink { stage: n("a"), from: None, to: Some(3) }]);
    }

    fn tree(text: &str) -> Tree {
        Tree::from([(String::new(), Node::Dir), ("f".into(), Node::File { data: text.into(), mode: 0o644 })])
    }

    #[test]
    fn rebuilding_is_undone_exactly_at_every_point() {
        for aside in [None, Some("g10-a".to_owned())] {
            let fs = MemFs::new(false);
            {
                let mut w = fs.world.borrow_mut();
                if aside.is_some() {
                    w.generations.insert((n("a"), 3), tree("damaged"));
                }
                w.tmp.insert("repair-10-a".into(), tree("rebuilt"));
                w.stage_links.insert(n("a"), 3);
            }
            let start = fs.snapshot();
            let step = Step::RebuildGeneration { stage: n("a"), generation: 3, tmp: "repair-10-a".into(), aside };
            // Undone before it ran: nothing changes (a damaged tree is not deleted).
            txn::undo(&fs, &step).unwrap();
            assert_eq!(fs.snapshot(), start);
            txn::apply(&fs, &step).unwrap();
            txn::apply(&fs, &step).unwrap();
            assert_eq!(fs.world.borrow().generations[&(n("a"), 3)], tree("rebuilt"));
            let stashed = fs.world.borrow().kept.contains_key(&(Kept::Stash, "g10-a".into()));
            assert_eq!(stashed, matches!(&step, Step::RebuildGeneration { aside: Some(_), .. }));
            // Undone after: the tree as it was, the rebuilt one gone with .tmp's copy.
            txn::undo(&fs, &step).unwrap();
            txn::undo(&fs, &step).unwrap();
            let mut want = start.clone();
            want.tmp.clear();
            assert_eq!(fs.snapshot(), want);
            // A journal of it rolls back the same way.
            let j = Journal {
                txid: 10,
                operation: "repair a".into(),
                steps: vec![step.clone()],
                before: State::new(),
                after: State::new(),
                cleanup: Default::default(),
            };
            j.roll_back(&fs).unwrap();
            assert_eq!(fs.snapshot(), want);
            assert!(fs.has_kept(Kept::Stash, "g10-a").is_ok());
        }
    }
}
