//! The installer core on the in-memory host: unit tests of planning, admission and the
//! transaction steps, and a property test over random sequences of deploy, rollback,
//! remove, restore and operator edits. No disk, no root: they run in well under a second.

use std::collections::{BTreeMap, BTreeSet};

use formats::manifest::{EntryKind, FileType};
use formats::path::TargetPath;
use formats::{Digest, StageName};
use proptest::prelude::*;

use super::mem::{MemFs, Node, Tree, World};
use super::{HostFs, Kept};
use crate::plan::{HostView, ReadError, Seen, transition};
use crate::plugins::PluginReg;
use crate::state::{Activation, ActiveFile, Generation, Placement, StageState, State};
use crate::txn::{self, Journal, Step};

/// Targets that nest, share parents and sit under several prefixes.
const TARGETS: [&str; 8] = [
    "/opt/a",
    "/opt/a/b",
    "/opt/app/conf",
    "/opt/app/data/x",
    "/usr/local/bin/tool",
    "/usr/local/bin/other",
    "/usr/local/lib",
    "/etc/op-dbus/x.conf",
];
const NAMES: [&str; 3] = ["app", "web", "core.x"];
const UNITS: [&str; 3] = ["a.service", "b.service", "c.timer"];
/// Previous generations kept per stage, as `deploy` keeps them by default.
const KEEP: usize = 2;

fn t(s: &str) -> TargetPath {
    s.parse().unwrap()
}

fn name(s: &str) -> StageName {
    s.parse().unwrap()
}

/// One file of a generation: target, how placed (0 link, 1 copy, 2 copy-if-not-exists, 3 secret),
/// staged kind (0/1 file, 2 directory, 3 link) and content.
type FileSpec = (usize, u8, u8, u8);

/// A generation's staged tree and its state entry.
fn generation(stage: &StageName, generation: u64, files: &[FileSpec], units: u8) -> (Tree, Generation) {
    let mut tree = Tree::new();
    tree.insert(String::new(), Node::Dir);
    let mut active = Vec::new();
    for (i, &(target, how, entry, content)) in files.iter().enumerate() {
        let path = format!("f{i}");
        let (entry, sha256) = match entry {
            0 | 1 => {
                let data = format!("{stage}-{generation}-{i}-{content}").into_bytes();
                let d = Digest::of(&data);
                tree.insert(path.clone(), Node::File { data, mode: 0o644 });
                (EntryKind::File, Some(d))
            }
            2 => {
                tree.insert(path.clone(), Node::Dir);
                (EntryKind::Dir, None)
            }
            _ => {
                tree.insert(path.clone(), Node::Link("f0".into()));
                (EntryKind::Symlink, None)
            }
        };
        let kind = [FileType::Symlink, FileType::Copy, FileType::CopyIfNotExists, FileType::Secret][how as usize % 4];
        active.push(ActiveFile {
            path: path.parse().unwrap(),
            target: t(TARGETS[target % TARGETS.len()]),
            kind,
            entry,
            sha256,
            mode: 0o644,
        });
    }
    let services = UNITS.iter().enumerate().filter(|(i, _)| units & (1 << i) != 0).map(|(_, u)| u.to_string());
    // Plugins follow the unit bits: one of the stage's own per bit, whose registration
    // changes with the generation, and `shared` on bit 2 (two stages with it conflict).
    let plugins = (0..3)
        .filter(|i| units & (1 << i) != 0)
        .map(|i| PluginReg {
            name: if i == 2 { "shared".into() } else { format!("{stage}-p{i}") },
            file: Some(format!("/opt/{stage}/{generation}")),
        })
        .collect();
    let g = Generation {
        generation,
        digest: Digest::of(format!("{stage}{generation}").as_bytes()),
        version: "1.0.0".parse().unwrap(),
        signers: Vec::new(),
        deployed_at: String::new(),
        activation: Activation { files: active, services: services.collect(), plugins, ..Activation::default() },
    };
    (tree, g)
}

/// What `init` makes that activation relies on: the plugin registrations' folder.
fn init_dirs(fs: &MemFs) {
    for d in ["/etc", "/etc/op-dbus", crate::plugins::PLUGIN_DIR] {
        fs.world.borrow_mut().nodes.insert(d.into(), Node::Dir);
    }
}

/// The world without the temp area (undoing a publish deletes the generation; it does not
/// unpack it again).
fn settled(w: &World) -> World {
    World { tmp: BTreeMap::new(), ..w.clone() }
}

/// A host, its state, and what the operator wrote.
struct Model {
    fs: MemFs,
    state: State,
    /// Restore points: the state before each committed change.
    snapshots: Vec<State>,
    /// The operator's last file at each path: never lost.
    operator: BTreeMap<String, Vec<u8>>,
    /// Targets of ours the operator wrote over since we placed them.
    tampered: BTreeSet<TargetPath>,
    n: u64,
}

impl Model {
    fn new(initial: &[usize]) -> Model {
        let mut m = Model {
            fs: MemFs::new(true),
            state: State::new(),
            snapshots: Vec::new(),
            operator: BTreeMap::new(),
            tampered: BTreeSet::new(),
            n: 0,
        };
        init_dirs(&m.fs);
        for &i in initial {
            m.operator_writes(i, 0);
        }
        m
    }

    /// The operator writes a file at a target (creating missing parents, never through a
    /// file or link in the way, never over a directory).
    fn operator_writes(&mut self, i: usize, content: u8) {
        let target = TARGETS[i % TARGETS.len()];
        let mut w = self.fs.world.borrow_mut();
        let mut parent = String::new();
        let parts: Vec<&str> = target.trim_start_matches('/').split('/').collect();
        for c in &parts[..parts.len() - 1] {
            parent = format!("{parent}/{c}");
            match w.nodes.get(&parent) {
                Some(Node::Dir) => {}
                Some(_) => return,
                None => {
                    w.nodes.insert(parent.clone(), Node::Dir);
                }
            }
        }
        if w.nodes.get(target) == Some(&Node::Dir) {
            return;
        }
        self.n += 1;
        let data = format!("operator-{}-{content}", self.n).into_bytes();
        w.nodes.insert(target.to_owned(), Node::File { data: data.clone(), mode: 0o600 });
        self.operator.insert(target.to_owned(), data);
        if self.state.placed.contains_key(&t(target)) {
            self.tampered.insert(t(target));
        }
    }

    /// Plans the move to `desired`; applies a prefix of it and undoes it (the host must be
    /// exactly as before), then applies it all and commits (or, on a failed step, undoes
    /// it: as before again).
    fn run(&mut self, desired: BTreeMap<StageName, StageState>, publish: Option<(StageName, u64, Tree)>, k: usize) {
        let tmp = publish.as_ref().map(|(s, g, tree)| (format!("gen-{g}-{s}"), tree.clone()));
        if let Some((name, tree)) = &tmp {
            self.fs.world.borrow_mut().tmp.insert(name.clone(), tree.clone());
        }
        let before = self.fs.snapshot();
        let view = HostView::gather(&self.fs, &self.state, &desired);
        let publish = publish.map(|(s, g, _)| (s.clone(), g, format!("gen-{g}-{s}")));
        let Ok(plan) = transition(&view, &self.state, desired, publish) else {
            // Refused before anything changed.
            assert_eq!(self.fs.snapshot(), before);
            self.fs.world.borrow_mut().tmp.clear();
            return;
        };
        let journal = Journal::of("prop", self.state.clone(), plan.clone(), Default::default());
        let k = k % (journal.steps.len() + 1);
        for step in &journal.steps[..k] {
            if txn::apply(&self.fs, step).is_err() {
                break;
            }
        }
        journal.roll_back(&self.fs).unwrap();
        assert_eq!(settled(&self.fs.snapshot()), settled(&before), "applying {k} of {:#?} then undoing", journal.steps);
        // Undoing the whole journal a second time changes nothing either.
        journal.roll_back(&self.fs).unwrap();
        assert_eq!(settled(&self.fs.snapshot()), settled(&before));
        if let Some((name, tree)) = &tmp {
            self.fs.world.borrow_mut().tmp.insert(name.clone(), tree.clone());
        }
        if journal.steps.iter().try_for_each(|s| txn::apply(&self.fs, s)).is_err() {
            journal.roll_back(&self.fs).unwrap();
            assert_eq!(settled(&self.fs.snapshot()), settled(&before), "undoing the failed {:#?}", journal.steps);
            self.fs.world.borrow_mut().tmp.clear();
            return;
        }
        // Applying it again changes nothing (every step is idempotent).
        let applied = self.fs.snapshot();
        journal.steps.iter().try_for_each(|s| txn::apply(&self.fs, s)).unwrap();
        assert_eq!(self.fs.snapshot(), applied, "applying {:#?} twice", journal.steps);
        // Commit and clean up: the stash goes, and generations nothing references.
        self.snapshots.push(self.state.clone());
        self.state = plan.after;
        for s in &journal.steps {
            if let Step::Link { target, .. } | Step::Copy { target, .. } = s {
                self.tampered.remove(target);
            }
        }
        self.tampered.retain(|t| self.state.placed.contains_key(t));
        let mut referenced = self.state.generations();
        for s in &self.snapshots {
            referenced.extend(s.generations());
        }
        let mut w = self.fs.world.borrow_mut();
        w.kept.retain(|(area, _), _| *area != Kept::Stash);
        w.generations.retain(|g, _| referenced.contains(g));
        w.tmp.clear();
    }

    fn deploy(&mut self, stage: usize, files: &[FileSpec], units: u8, k: usize) {
        let name = name(NAMES[stage]);
        let g = self.state.next_generation;
        let (tree, gen_state) = generation(&name, g, files, units);
        let desired = crate::plan::with_generation(&self.state.stages, &name, gen_state, KEEP);
        self.run(desired, Some((name, g, tree)), k);
    }

    fn remove(&mut self, stage: usize, k: usize) {
        let mut desired = self.state.stages.clone();
        if desired.remove(&name(NAMES[stage])).is_some() {
            self.run(desired, None, k);
        }
    }

    fn rollback(&mut self, stage: usize, k: usize) {
        let mut desired = self.state.stages.clone();
        if let Some(s) = desired.get_mut(&name(NAMES[stage]))
            && let Some(prev) = s.previous.pop()
        {
            s.active = prev;
            self.run(desired, None, k);
        }
    }

    fn restore(&mut self, which: usize, k: usize) {
        if self.snapshots.is_empty() {
            return;
        }
        let snap = self.snapshots[which % self.snapshots.len()].clone();
        self.run(snap.stages, None, k);
    }

    /// The invariants of the host layout (docs/host-layout.md) after a committed change.
    fn check(&self) {
        let w = self.fs.snapshot();
        for (target, p) in &self.state.placed {
            // Every backup the state names exists.
            if let Some(b) = &p.backup {
                assert!(w.kept.contains_key(&(Kept::Backup, b.clone())), "backups/{b} of {target} is missing");
            }
            // Every placed target is what the state says, unless the operator wrote over it.
            if self.tampered.contains(target) {
                continue;
            }
            match &p.how {
                Placement::Symlink { link } => {
                    assert_eq!(w.nodes.get(target.as_str()), Some(&Node::Link(link.clone())), "{target}")
                }
                // The in-memory host models decryption as a copy of the staged bytes.
                Placement::Copy { sha256 } | Placement::CopyIfNotExists { sha256 } | Placement::Secret { sha256 } => {
                    assert_eq!(self.fs.file_digest(target).unwrap(), Some(*sha256), "{target}")
                }
            }
        }
        // Stage links name the active generations, which exist; no others.
        let links: BTreeMap<StageName, u64> =
            self.state.stages.iter().map(|(n, s)| (n.clone(), s.active.generation)).collect();
        assert_eq!(w.stage_links, links);
        for g in self.state.generations() {
            assert!(w.generations.contains_key(&g), "generation {g:?} is gone");
        }
        // Directories we made exist, unless a target of ours took their place (a later
        // generation placing something at a directory an earlier one needed: it waits in
        // backups/ and comes back before it is removed).
        for d in &self.state.dirs {
            let ours = self.state.placed.get(d).is_some_and(|p| p.backup.is_some());
            assert!(ours || w.nodes.get(d.as_str()) == Some(&Node::Dir), "{d}: {:?}", w.nodes.get(d.as_str()));
        }
        // The plugins of the active stages are registered, and only they.
        let wanted = crate::plugins::wanted(&self.state.stages).unwrap();
        let prefix = format!("{}/", crate::plugins::PLUGIN_DIR);
        let registered: BTreeMap<&str, &Node> =
            w.nodes.iter().filter(|(p, _)| p.starts_with(&prefix)).map(|(p, n)| (p.as_str(), n)).collect();
        assert_eq!(registered.len(), wanted.len(), "{registered:#?} {wanted:#?}");
        for (plugin, (_, text)) in &wanted {
            let at = crate::plugins::target(plugin).unwrap();
            assert!(
                matches!(w.nodes.get(at.as_str()), Some(Node::File { data, .. }) if data == text.as_bytes()),
                "{at}: {:?}",
                w.nodes.get(at.as_str())
            );
        }
        // The units of the active stages are enabled, and only they.
        let units: BTreeSet<String> =
            self.state.stages.values().flat_map(|s| s.active.activation.services.iter().cloned()).collect();
        assert_eq!(w.units, units);
        // No operator file lost: each is in the tree or in backups/.
        for (path, data) in &self.operator {
            let is = |n: &Node| matches!(n, Node::File { data: d, .. } if d == data);
            let found = w.nodes.values().any(is)
                || w.kept.iter().any(|((area, _), tree)| *area == Kept::Backup && tree.values().any(is));
            assert!(found, "the operator's {path} is gone: {w:#?}");
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deploy { stage: usize, files: Vec<FileSpec>, units: u8, k: usize },
    Remove { stage: usize, k: usize },
    Rollback { stage: usize, k: usize },
    Restore { which: usize, k: usize },
    Operator { target: usize, content: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    let file = (0..TARGETS.len(), 0..4u8, 0..4u8, any::<u8>());
    prop_oneof![
        4 => (0..3usize, prop::collection::vec(file, 0..4), 0..8u8, any::<usize>())
            .prop_map(|(stage, files, units, k)| Op::Deploy { stage, files, units, k }),
        1 => (0..3usize, any::<usize>()).prop_map(|(stage, k)| Op::Remove { stage, k }),
        2 => (0..3usize, any::<usize>()).prop_map(|(stage, k)| Op::Rollback { stage, k }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(which, k)| Op::Restore { which, k }),
        2 => (0..TARGETS.len(), any::<u8>()).prop_map(|(target, content)| Op::Operator { target, content }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_changes_on_the_in_memory_host_keep_the_invariants(
        initial in prop::collection::vec(0..TARGETS.len(), 0..4),
        ops in prop::collection::vec(op(), 1..16),
    ) {
        let mut m = Model::new(&initial);
        for op in &ops {
            match *op {
                Op::Deploy { stage, ref files, units, k } => m.deploy(stage, files, units, k),
                Op::Remove { stage, k } => m.remove(stage, k),
                Op::Rollback { stage, k } => m.rollback(stage, k),
                Op::Restore { which, k } => m.restore(which, k),
                Op::Operator { target, content } => m.operator_writes(target, content),
            }
            m.check();
        }
        // Everything removed: every operator file is back at its path, unless the operator
        // wrote a file over one of its directories (then it waits in backups/).
        m.run(BTreeMap::new(), None, 0);
        m.check();
        let w = m.fs.snapshot();
        prop_assert!(w.stage_links.is_empty() && w.units.is_empty());
        for (path, data) in &m.operator {
            let here = matches!(w.nodes.get(path), Some(Node::File { data: d, .. }) if d == data);
            let parent_overwritten = TargetPath::parse(path).unwrap().relative().ancestors().any(|a| {
                matches!(w.nodes.get(&format!("/{a}")), Some(n) if *n != Node::Dir)
            });
            prop_assert!(here || parent_overwritten, "{} is not back: {:#?}", path, w);
        }
    }
}

// Unit tests of the planner and the steps on the in-memory host.

fn stage_state(stage: &str, g: u64, files: &[FileSpec]) -> (Tree, StageState) {
    let (tree, generation) = generation(&name(stage), g, files, 0);
    (tree, StageState { active: generation, previous: Vec::new() })
}

/// Plans and applies the move to `desired` on `fs`; returns the state after.
fn change(fs: &MemFs, before: &State, desired: BTreeMap<StageName, StageState>) -> (State, Vec<Step>) {
    let view = HostView::gather(fs, before, &desired);
    let plan = transition(&view, before, desired, None).unwrap();
    for s in &plan.steps {
        txn::apply(fs, s).unwrap();
    }
    (plan.after, plan.steps)
}

#[test]
fn a_first_deploy_makes_the_directories_links_and_copies() {
    let fs = MemFs::new(false);
    let (tree, app) = stage_state("app", 1, &[(4, 0, 0, 1), (7, 1, 0, 2)]);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let (after, steps) = change(&fs, &State::new(), BTreeMap::from([(name("app"), app)]));
    let w = fs.snapshot();
    assert_eq!(w.nodes.get("/usr/local/bin/tool"), Some(&Node::Link("/var/lib/op-dbus/staging/app/f0".into())));
    assert!(matches!(w.nodes.get("/etc/op-dbus/x.conf"), Some(Node::File { .. })));
    assert_eq!(w.stage_links.get(&name("app")), Some(&1));
    // The directories, outermost first, each once.
    let mkdirs: Vec<&str> =
        steps.iter().filter_map(|s| if let Step::MkDir { path } = s { Some(path.as_str()) } else { None }).collect();
    assert_eq!(mkdirs, ["/etc", "/etc/op-dbus", "/usr", "/usr/local", "/usr/local/bin"]);
    assert_eq!(after.dirs.len(), 5);
    // Removing it takes everything away, directories included.
    let (after, _) = change(&fs, &after, BTreeMap::new());
    assert!(after.placed.is_empty() && after.dirs.is_empty());
    let w = fs.snapshot();
    assert!(w.nodes.is_empty() && w.stage_links.is_empty(), "{w:#?}");
}

#[test]
fn the_operators_file_is_backed_up_and_comes_back() {
    let fs = MemFs::new(false);
    fs.mkdir(&t("/opt")).unwrap();
    fs.world.borrow_mut().nodes.insert("/opt/a".into(), Node::File { data: b"mine".to_vec(), mode: 0o600 });
    let before = fs.snapshot();
    let (tree, app) = stage_state("app", 1, &[(0, 0, 0, 0)]);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree.clone());
    let (after, steps) = change(&fs, &State::new(), BTreeMap::from([(name("app"), app)]));
    assert!(matches!(&steps[..], [Step::SetStageLink { .. }, Step::Backup { .. }, Step::Link { .. }]), "{steps:#?}");
    let backup = after.placed[&t("/opt/a")].backup.clone().unwrap();
    assert!(fs.has_kept(Kept::Backup, &backup).unwrap());
    let (after, steps) = change(&fs, &after, BTreeMap::new());
    assert!(steps.contains(&Step::Restore { backup, target: t("/opt/a") }));
    assert!(after.placed.is_empty());
    let mut w = fs.snapshot();
    w.generations.clear();
    assert_eq!(w, before);
}

#[test]
fn a_plan_reads_only_what_it_needs_from_the_view() {
    // A kept link whose target could not be read does not stop a plan that keeps it.
    let fs = MemFs::new(false);
    let (tree, app) = stage_state("app", 1, &[(4, 0, 0, 0)]);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let desired = BTreeMap::from([(name("app"), app)]);
    let (after, _) = change(&fs, &State::new(), desired.clone());
    let mut view = HostView::gather(&fs, &after, &desired);
    let unreadable = ReadError { kind: std::io::ErrorKind::PermissionDenied, message: "denied".into() };
    view.targets
        .insert(t("/usr/local/bin/tool"), Seen { state: Err(unreadable.clone()), digest: Err(unreadable.clone()) });
    let plan = transition(&view, &after, desired, None).unwrap();
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    // Removing it needs that read: the error is the plan's.
    let e = transition(&view, &after, BTreeMap::new(), None).unwrap_err();
    assert!(format!("{e:#}").contains("denied"), "{e:#}");
}

#[test]
fn a_link_in_the_way_of_a_parent_is_not_written_through() {
    // The operator made /opt a file: a target under it cannot be placed, and the failed
    // step is undone, leaving the host as before.
    let fs = MemFs::new(false);
    fs.world.borrow_mut().nodes.insert("/opt".into(), Node::File { data: b"x".to_vec(), mode: 0o600 });
    let (tree, app) = stage_state("app", 1, &[(0, 0, 0, 0)]);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let before = fs.snapshot();
    let desired = BTreeMap::from([(name("app"), app)]);
    let view = HostView::gather(&fs, &State::new(), &desired);
    let plan = transition(&view, &State::new(), desired, None).unwrap();
    let journal = Journal {
        txid: 1,
        operation: "t".into(),
        steps: plan.steps.clone(),
        before: State::new(),
        after: plan.after,
        cleanup: Default::default(),
    };
    assert!(journal.steps.iter().try_for_each(|s| txn::apply(&fs, s)).is_err());
    journal.roll_back(&fs).unwrap();
    assert_eq!(fs.snapshot(), before);
}

#[test]
fn units_are_disabled_before_links_go_and_enabled_after_they_come() {
    let fs = MemFs::new(true);
    init_dirs(&fs);
    let (tree, generation1) = generation(&name("app"), 1, &[(4, 0, 0, 0)], 0b011);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let app = StageState { active: generation1, previous: Vec::new() };
    let (after, steps) = change(&fs, &State::new(), BTreeMap::from([(name("app"), app)]));
    assert!(matches!(steps.last(), Some(Step::EnableUnit { .. })), "{steps:#?}");
    assert_eq!(fs.snapshot().units.len(), 2);
    let (_, steps) = change(&fs, &after, BTreeMap::new());
    assert!(matches!(steps.first(), Some(Step::DisableUnit { .. })), "{steps:#?}");
    assert!(fs.snapshot().units.is_empty());
}

#[test]
fn a_copy_the_operator_edited_stays_theirs() {
    let fs = MemFs::new(false);
    let (tree, app) = stage_state("app", 1, &[(7, 1, 0, 0)]);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let (after, _) = change(&fs, &State::new(), BTreeMap::from([(name("app"), app)]));
    fs.world
        .borrow_mut()
        .nodes
        .insert("/etc/op-dbus/x.conf".into(), Node::File { data: b"edited".to_vec(), mode: 0o600 });
    let view = HostView::gather(&fs, &after, &BTreeMap::new());
    let plan = transition(&view, &after, BTreeMap::new(), None).unwrap();
    assert!(!plan.steps.iter().any(|s| matches!(s, Step::Stash { .. })), "{:?}", plan.steps);
    assert!(plan.notes.iter().any(|n| n.contains("modified after it was copied")));
}

#[test]
fn undoing_a_plan_that_gives_a_directory_of_ours_back_is_exact_at_every_prefix() {
    // Generation 1 links /opt/a/b (making /opt/a); generation 2 copies to /opt/a, backing
    // up the directory; generation 3 wants neither: the copy is stashed, the directory
    // restored then removed. Any prefix of that, undone, must leave the host as before
    // (an undone `rmdir` must not make a directory where the copy is to come back).
    let fs = MemFs::new(false);
    let mut state = State::new();
    for (g, files) in [(1u64, vec![(1usize, 0u8, 0u8, 0u8)]), (2, vec![(0, 1, 0, 0)])] {
        let (tree, app) = stage_state("app", g, &files);
        fs.world.borrow_mut().generations.insert((name("app"), g), tree);
        state = change(&fs, &state, BTreeMap::from([(name("app"), app)])).0;
    }
    let (tree, app) = stage_state("app", 3, &[(4, 0, 0, 0)]);
    fs.world.borrow_mut().generations.insert((name("app"), 3), tree);
    let desired = BTreeMap::from([(name("app"), app)]);
    let view = HostView::gather(&fs, &state, &desired);
    let plan = transition(&view, &state, desired, None).unwrap();
    assert!(plan.steps.iter().any(|s| matches!(s, Step::Restore { .. })), "{:#?}", plan.steps);
    let journal = Journal {
        txid: plan.after.txid,
        operation: "t".into(),
        steps: plan.steps.clone(),
        before: state.clone(),
        after: plan.after,
        cleanup: Default::default(),
    };
    let before = fs.snapshot();
    for k in 0..=journal.steps.len() {
        for s in &journal.steps[..k] {
            txn::apply(&fs, s).unwrap();
        }
        journal.roll_back(&fs).unwrap();
        assert_eq!(fs.snapshot(), before, "applying {k} of {:#?} then undoing", journal.steps);
    }
}

#[test]
fn switching_generations_reads_nothing_for_the_files_a_stage_keeps() {
    let fs = MemFs::new(false);
    let files = [(4usize, 0u8, 0u8, 0u8), (5, 0, 0, 0), (7, 1, 0, 0)];
    let (tree, app) = stage_state("app", 1, &files);
    fs.world.borrow_mut().generations.insert((name("app"), 1), tree);
    let (after, _) = change(&fs, &State::new(), BTreeMap::from([(name("app"), app)]));
    // Generation 2 keeps the links (they read through the stage link) and the same copy.
    let (_, app2) = stage_state("app", 1, &files);
    let mut app2 = app2;
    app2.active.generation = 2;
    let desired = BTreeMap::from([(name("app"), app2)]);
    let view = HostView::gather(&fs, &after, &desired);
    assert!(view.targets.is_empty() && view.dirs.is_empty(), "{view:#?}");
    let plan = transition(&view, &after, desired, None).unwrap();
    assert!(matches!(&plan.steps[..], [Step::SetStageLink { .. }]), "{:#?}", plan.steps);
}
