//! Snapshot retention, in the spirit of snapper's number cleanup: keep the newest
//! `[snapshots] keep` snapshots (stage.toml, 10 by default), the pre-snapshot of the
//! running set (the newest `pre-` one: what the last change would go back to) and every
//! snapshot marked to keep (`snapshots keep NAME`, `deploy --keep`); prune the rest. Then
//! the generations that neither the state nor a kept snapshot names go, and the store's
//! images of deployed stages that nothing kept names, with the blobs no image needs.
//!
//! Runs after every committed change, and as `snapshots prune` and `gc`. Every deletion is
//! idempotent and ordered so that a crash only leaves things that the next run removes
//! (snapshots first, then the generations they held; tags first, then blobs).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

use formats::StageName;
use formats::digest::Digest;
use formats::oci::{self, ImageManifest};

use crate::ops::{Ctx, GenerationRef};
use crate::snapshot;
use crate::state::State;
use crate::txn::{self, Staging};

/// Why a snapshot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// One of the newest `keep`.
    Newest,
    /// The pre-snapshot of the running set.
    RunningPre,
    /// Marked to keep.
    Marked,
}

/// Which snapshots stay and which go. `names` is oldest first (see [`order`]); `marked`
/// the ones marked to keep. The pure part of retention.
pub fn choose(names: &[String], marked: &BTreeSet<String>, keep: usize) -> (BTreeMap<String, Reason>, Vec<String>) {
    let mut kept = BTreeMap::new();
    for n in names.iter().rev().take(keep) {
        kept.insert(n.clone(), Reason::Newest);
    }
    if let Some(pre) = names.iter().rev().find(|n| n.starts_with("pre-")) {
        kept.entry(pre.clone()).or_insert(Reason::RunningPre);
    }
    for n in names.iter().filter(|n| marked.contains(*n)) {
        kept.entry(n.clone()).or_insert(Reason::Marked);
    }
    let pruned = names.iter().filter(|n| !kept.contains_key(*n)).cloned().collect();
    (kept, pruned)
}

/// What each snapshot alone keeps: the generations it names that neither the live state
/// (`live`) nor any other snapshot names, sized by `size`. What pruning it frees.
pub fn exclusive(
    snapshots: &[(String, BTreeSet<(StageName, u64)>)],
    live: &BTreeSet<(StageName, u64)>,
    size: impl Fn(&(StageName, u64)) -> u64,
) -> BTreeMap<String, u64> {
    let mut users: BTreeMap<&(StageName, u64), usize> = BTreeMap::new();
    for (_, gens) in snapshots {
        for g in gens {
            *users.entry(g).or_default() += 1;
        }
    }
    snapshots
        .iter()
        .map(|(name, gens)| {
            let bytes = gens.iter().filter(|g| !live.contains(*g) && users[g] == 1).map(&size).sum();
            (name.clone(), bytes)
        })
        .collect()
}

/// The order of snapshots, oldest first: by the transaction their state records, and for
/// one state the post-snapshot of the change that made it before the pre-snapshot of the
/// next change; then by name.
pub fn order(snaps: &mut [(String, State)]) {
    snaps.sort_by(|(a, sa), (b, sb)| (sa.txid, a.starts_with("pre-"), a).cmp(&(sb.txid, b.starts_with("pre-"), b)));
}

/// Every snapshot with its state, oldest first.
pub fn snapshots(staging: &Staging) -> Result<Vec<(String, State)>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(staging.snapshots()) else { return Ok(out) };
    for e in entries {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else { continue };
        if name.starts_with('.') {
            continue;
        }
        out.push((name.to_owned(), State::read(&p)?));
    }
    order(&mut out);
    Ok(out)
}

fn marker(staging: &Staging, name: &str) -> std::path::PathBuf {
    staging.snapshots().join(format!("{name}.keep"))
}

/// Whether `name` is marked to keep.
pub fn is_marked(staging: &Staging, name: &str) -> bool {
    marker(staging, name).exists()
}

/// Marks (or unmarks) the snapshot `name` to keep; it must exist.
pub fn mark(staging: &Staging, name: &str, keep: bool) -> Result<()> {
    snapshot::read(staging, name)?;
    let p = marker(staging, name);
    if keep {
        fsx::write_atomic(&p, b"").with_context(|| format!("writing {}", p.display()))?;
    } else {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    Ok(())
}

/// After a committed change: marks its snapshots when `--keep` asked for it, then prunes.
/// The change stands whatever happens here; a failure to prune is a note of the report
/// (the next change, `snapshots prune` or `gc` tries again).
pub(crate) fn after_commit(ctx: &Ctx, journal: &crate::txn::Journal, report: &mut crate::ops::Report) {
    let run = || -> Result<Pruned> {
        if ctx.opts.keep_snapshots {
            for (name, _) in &journal.cleanup.snapshots {
                mark(&ctx.staging, name, true)?;
            }
        }
        prune(ctx, false)
    };
    match run() {
        Ok(p) => {
            if !p.images.is_empty() || p.blobs > 0 {
                report.notes.push(format!(
                    "pruned {} store image(s) and {} blob(s) ({}) no kept snapshot needs",
                    p.images.len(),
                    p.blobs,
                    cli_support::human_bytes(p.blob_bytes)
                ));
            }
            if !p.snapshots.is_empty()
                && let Err(e) = crate::history::record_event(ctx, "snapshots prune", &p.snapshots)
            {
                report.notes.push(format!("{e:#}"));
            }
            report.pruned = p.snapshots;
            // `gc` listed what kept snapshots needed before the prune: what went is not kept.
            report.kept.retain(|k| !p.generations.iter().any(|g| (&g.stage, g.generation) == (&k.stage, k.generation)));
            report.removed.extend(p.generations);
        }
        Err(e) => report
            .notes
            .push(format!("pruning snapshots failed ({e:#}); the change stands: run `op-dbus-stage snapshots prune`")),
    }
}

/// The snapshots the prune after a change would delete, for its dry run: the existing ones
/// and those the change would take (`cleanup`), chosen as after the real change.
pub(crate) fn would_prune(ctx: &Ctx, cleanup: &crate::txn::Cleanup) -> Result<Vec<String>> {
    let keep = crate::receive::Trust::load(&ctx.host)?.policy.snapshot_keep();
    let mut all = snapshots(&ctx.staging)?;
    let mut marked: BTreeSet<String> =
        all.iter().map(|(n, _)| n).filter(|n| is_marked(&ctx.staging, n)).cloned().collect();
    for (name, state) in &cleanup.snapshots {
        if ctx.opts.keep_snapshots {
            marked.insert(name.clone());
        }
        all.push((name.clone(), state.clone()));
    }
    order(&mut all);
    let names: Vec<String> = all.into_iter().map(|(n, _)| n).collect();
    Ok(choose(&names, &marked, keep).1)
}

/// What a prune removed (or, in a dry run, would remove).
#[derive(Debug, Default, Serialize)]
pub struct Pruned {
    /// Snapshots deleted.
    pub snapshots: Vec<String>,
    /// Generations deleted (no kept snapshot and no stage names them).
    pub generations: Vec<GenerationRef>,
    /// Store images deleted (`NAME:VERSION`).
    pub images: Vec<String>,
    /// Store blobs deleted and their bytes.
    pub blobs: usize,
    pub blob_bytes: u64,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.generations.is_empty() && self.images.is_empty() && self.blobs == 0
    }
}

/// Applies the retention policy of the host's stage.toml (see the module doc).
#[tracing::instrument(name = "prune", skip_all, fields(dry_run))]
pub fn prune(ctx: &Ctx, dry_run: bool) -> Result<Pruned> {
    let staging = &ctx.staging;
    let keep = crate::receive::Trust::load(&ctx.host)?.policy.snapshot_keep();
    let all = snapshots(staging)?;
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    let marked: BTreeSet<String> = names.iter().filter(|n| is_marked(staging, n)).cloned().collect();
    let (kept, pruned) = choose(&names, &marked, keep);
    let mut out = Pruned { snapshots: pruned.clone(), ..Pruned::default() };

    let state = ctx.state()?;
    let mut needed = state.generations();
    let mut digests: BTreeSet<Digest> = BTreeSet::new();
    let mut note = |s: &State| {
        for st in s.stages.values() {
            digests.insert(st.active.digest);
            digests.extend(st.previous.iter().map(|g| g.digest));
        }
    };
    note(&state);
    for (n, s) in &all {
        if kept.contains_key(n) {
            needed.extend(s.generations());
            note(s);
        }
    }
    for name in &pruned {
        tracing::info!(snapshot = %name, "pruning");
        if !dry_run {
            txn::remove_tree(&staging.snapshots().join(name))?;
            let json = staging.snapshots().join(format!("{name}.json"));
            fs::remove_file(&json).with_context(|| format!("removing {}", json.display()))?;
            let _ = fs::remove_file(marker(staging, name));
        }
    }
    // Generations on disk that nothing kept names (orphans of a crash too).
    for g in on_disk(staging)? {
        if needed.contains(&g) {
            continue;
        }
        let path = staging.generation(&g.0, g.1);
        out.generations.push(GenerationRef {
            stage: g.0.clone(),
            generation: g.1,
            bytes: snapshot::tree_size(&path),
            reason: None,
        });
        if !dry_run {
            txn::remove_tree(&path)?;
        }
    }
    prune_store(ctx, &state, &digests, dry_run, &mut out)?;
    Ok(out)
}

/// Every generation directory under `.generations/`.
pub fn on_disk(staging: &Staging) -> Result<BTreeSet<(StageName, u64)>> {
    let mut out = BTreeSet::new();
    let Ok(stages) = fs::read_dir(staging.dir.join(".generations")) else { return Ok(out) };
    for st in stages.flatten() {
        let Ok(name) = st.file_name().to_string_lossy().parse::<StageName>() else { continue };
        for g in fs::read_dir(st.path())?.flatten() {
            let Ok(n) = g.file_name().to_string_lossy().parse::<u64>() else { continue };
            out.insert((name.clone(), n));
        }
    }
    Ok(out)
}

/// Store images of a stage ever deployed here, at or below its highest installed version,
/// whose digest nothing kept names, go (with their signature tags); then every blob that no
/// remaining tag reaches. Images received and never deployed (or newer than anything
/// deployed) stay. When a manifest of the store cannot be read, no blob is swept.
fn prune_store(ctx: &Ctx, state: &State, digests: &BTreeSet<Digest>, dry_run: bool, out: &mut Pruned) -> Result<()> {
    let Ok(root) = ctx.host.resolve(crate::host::STORE) else { return Ok(()) };
    let Ok(store) = formats::layout::Layout::open(&root) else { return Ok(()) };
    let index = store.index()?;
    let mut drop_tags = Vec::new();
    for d in &index.manifests {
        let Some(tag) = d.annotation(oci::ANNOTATION_REF_NAME) else { continue };
        if tag.ends_with(".sig") {
            continue;
        }
        let Ok(r) = tag.parse::<formats::Reference>() else { continue };
        let deployed = state.highest.get(&r.name).is_some_and(|h| r.version <= *h);
        if deployed && !digests.contains(&d.digest) {
            drop_tags.push(tag.to_owned());
            drop_tags.push(format!("{}:{}", r.name, d.digest.signature_tag()));
            out.images.push(tag.to_owned());
        }
    }
    let mut remaining = index.clone();
    for t in &drop_tags {
        remaining.remove(t);
    }
    if !dry_run && !drop_tags.is_empty() {
        store.update_index(|i| {
            for t in &drop_tags {
                i.remove(t);
            }
        })?;
    }
    // Blobs the remaining tags reach.
    let mut reach: BTreeSet<Digest> = BTreeSet::new();
    for d in &remaining.manifests {
        reach.insert(d.digest);
        let Ok(bytes) = store.read_blob(&d.digest, formats::oci::MAX_MANIFEST_BYTES) else {
            if store.has_blob(&d.digest) {
                tracing::warn!(digest = %d.digest, "a manifest of the store cannot be read: no blob is swept");
                return Ok(());
            }
            continue;
        };
        let Ok(m) = ImageManifest::from_bytes(&bytes) else {
            tracing::warn!(digest = %d.digest, "a manifest of the store does not parse: no blob is swept");
            return Ok(());
        };
        reach.insert(m.config.digest);
        reach.extend(m.layers.iter().map(|l| l.digest));
    }
    let blobs = root.join("blobs/sha256");
    let Ok(entries) = fs::read_dir(&blobs) else { return Ok(()) };
    for e in entries.flatten() {
        let Some(hex) = e.file_name().to_str().map(str::to_owned) else { continue };
        let Ok(d) = format!("sha256:{hex}").parse::<Digest>() else { continue };
        if reach.contains(&d) {
            continue;
        }
        out.blobs += 1;
        out.blob_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        if !dry_run {
            fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn keeps_the_newest_the_running_pre_and_the_marked() {
        let all = names(&["pre-a-1", "post-a-1", "pre-a-2", "post-a-2", "pre-a-3", "post-a-3"]);
        let marked = BTreeSet::from(["pre-a-1".to_owned()]);
        let (kept, pruned) = choose(&all, &marked, 1);
        assert_eq!(kept["post-a-3"], Reason::Newest);
        assert_eq!(kept["pre-a-3"], Reason::RunningPre);
        assert_eq!(kept["pre-a-1"], Reason::Marked);
        assert_eq!(pruned, names(&["post-a-1", "pre-a-2", "post-a-2"]));
        // keep = 0: only the pre-snapshot of the running set (and the marked).
        let (kept, pruned) = choose(&all, &BTreeSet::new(), 0);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["pre-a-3"]);
        assert_eq!(pruned.len(), 5);
        // More allowed than there are: nothing goes.
        let (kept, pruned) = choose(&all, &BTreeSet::new(), 10);
        assert_eq!((kept.len(), pruned.len()), (6, 0));
        assert_eq!(choose(&[], &marked, 3).1, Vec::<String>::new());
    }

    #[test]
    fn exclusive_counts_what_only_one_snapshot_keeps() {
        let g = |n: u64| ("app".parse::<StageName>().unwrap(), n);
        let snaps = vec![
            ("s1".to_owned(), BTreeSet::from([g(1), g(2)])),
            ("s2".to_owned(), BTreeSet::from([g(2), g(3)])),
            ("s3".to_owned(), BTreeSet::from([g(3), g(4)])),
        ];
        let live = BTreeSet::from([g(4)]);
        let ex = exclusive(&snaps, &live, |(_, n)| 10 * n);
        assert_eq!(ex["s1"], 10, "generation 1 only; 2 is shared with s2");
        assert_eq!(ex["s2"], 0);
        assert_eq!(ex["s3"], 0, "4 is live, 3 shared");
    }

    #[test]
    fn order_follows_transactions_post_before_the_next_pre() {
        let st = |txid| State { txid, ..State::new() };
        let mut v = vec![
            ("pre-b-20260101T000000Z".to_owned(), st(1)),
            ("post-b-20260101T000000Z".to_owned(), st(2)),
            ("pre-a-20260101T000000Z-2".to_owned(), st(0)),
            ("post-a-20260101T000000Z".to_owned(), st(1)),
        ];
        order(&mut v);
        let got: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            got,
            [
                "pre-a-20260101T000000Z-2",
                "post-a-20260101T000000Z",
                "pre-b-20260101T000000Z",
                "post-b-20260101T000000Z"
            ]
        );
    }
}
