//! `backup create|list|info|verify|restore|prune` (see [`crate::backup`] for the archive).
//! `create` takes the lock (nothing changes while it reads) and writes only under
//! `/var/lib/op-dbus/backups`; `restore` extracts and checks the whole archive in the
//! installer's temp area first, then plans the steps that put each saved path back (pure:
//! [`plan_restore`]) and applies them as one journaled transaction, like every change.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{FileType as RawType, Mode as RawMode, OFlags};
use serde::Serialize;

use formats::StageName;
use formats::digest::{Digest, sha256_reader};
use formats::manifest::{EntryKind, FileType};
use formats::path::TargetPath;

use crate::backup::{self, Item, Manifest, Source, StageRef, Summary, Wanted, Writer};
use crate::error::{Malformed, Refused, Usage};
use crate::host::Host;
use crate::ops::{Ctx, Report, execute};
use crate::plan::Plan;
use crate::receive::Trust;
use crate::state::{Placement, State};
use crate::txn::{Cleanup, Step};

/// How `backup create` encrypts, and whether secrets go in.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub include_secrets: bool,
    /// `--recipient age1...`.
    pub recipients: Vec<String>,
    /// `--recipients-file FILE`.
    pub recipients_files: Vec<PathBuf>,
}

/// `backup create --json`.
#[derive(Debug, Serialize)]
pub struct Created {
    pub name: String,
    pub dry_run: bool,
    /// The archive's host path (absent in a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<PathBuf>,
    pub encrypted: bool,
    pub secrets: bool,
    pub stages: Vec<StageRef>,
    /// Entries saved (files, directories, links).
    pub entries: usize,
    /// The bytes of the files saved.
    pub bytes: u64,
    /// The archive file's size.
    pub archive_bytes: u64,
    pub notes: Vec<String>,
}

/// Whether a `files:` entry of this type is a secret (`type: secret`).
fn is_secret(kind: FileType) -> bool {
    kind.as_str() == "secret"
}

/// What of `stages` is saved: their data paths, their copied targets (and secrets when
/// `secrets`), sorted by path. Notes say what is left out.
fn wanted(
    ctx: &Ctx,
    state: &State,
    stages: &[StageName],
    secrets: bool,
    notes: &mut Vec<String>,
) -> Result<Vec<Wanted>> {
    let mut out = Vec::new();
    for name in stages {
        let s = &state.stages[name];
        let config = ctx.config_of(name, s.active.generation)?;
        for d in &config.data {
            out.push(Wanted { path: d.clone(), stage: name.clone(), source: Source::Data });
        }
        for f in s.active.activation.files.iter().filter(|f| f.entry == EntryKind::File) {
            let source = match f.kind {
                FileType::Copy => Source::Copy,
                FileType::CopyIfNotExists => Source::CopyIfNotExists,
                k if is_secret(k) && secrets => Source::Secret,
                k if is_secret(k) => {
                    notes.push(format!("{} (a secret of {name}) is left out: --include-secrets saves it", f.target));
                    continue;
                }
                _ => continue,
            };
            out.push(Wanted { path: f.target.clone(), stage: name.clone(), source });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `backup create [STAGE...]` (every deployed stage when none is named).
#[tracing::instrument(name = "backup_create", skip_all, fields(dry_run = ctx.opts.dry_run))]
pub fn create(ctx: &Ctx, stages: &[StageName], o: &CreateOpts) -> Result<Created> {
    let recipients = backup::recipients(&o.recipients, &o.recipients_files)?;
    if o.include_secrets && recipients.is_empty() {
        return Err(Usage(
            "--include-secrets needs --recipient age1... or --recipients-file FILE: secrets are never written to a \
             backup in clear"
                .into(),
        )
        .into());
    }
    let state = ctx.state()?;
    let stages: Vec<StageName> =
        if stages.is_empty() { state.stages.keys().cloned().collect() } else { stages.to_vec() };
    let mut notes = Vec::new();
    if stages.is_empty() {
        notes.push("no stage is deployed: the backup holds nothing".into());
    }
    let wanted = wanted(ctx, &state, &stages, o.include_secrets, &mut notes)?;
    let host_name = host_name(&ctx.host);
    let manifest = Manifest {
        schema_version: Manifest::SCHEMA_VERSION,
        name: String::new(),
        created: crate::ops::now(),
        host: host_name,
        stages: stages
            .iter()
            .map(|n| StageRef { name: n.clone(), version: state.stages[n].active.version.clone() })
            .collect(),
        secrets: o.include_secrets,
        items: Vec::new(),
    };
    let rendered: Vec<String> = recipients.iter().map(ToString::to_string).collect();
    if ctx.opts.dry_run {
        // What would be saved, read as `create` reads it; written nowhere.
        let mut w = Writer::new(tempfile::tempfile().context("a temp file")?, &recipients, manifest)?;
        for x in &wanted {
            w.add(&ctx.host, x)?;
        }
        let (m, more, _, _, _) = w.finish()?;
        notes.extend(more);
        return Ok(Created {
            name: "(not written)".into(),
            dry_run: true,
            archive: None,
            encrypted: !recipients.is_empty(),
            secrets: o.include_secrets,
            stages: m.stages.clone(),
            entries: m.items.len(),
            bytes: m.bytes(),
            archive_bytes: 0,
            notes,
        });
    }
    let dir = backup::dir(&ctx.host, true)?.expect("made");
    backup::remove_leftovers(&dir)?;
    let name = backup::fresh_name(&dir);
    let archive = backup::archive_name(&name, !recipients.is_empty());
    let tmp = dir.join(format!(".tmp-{archive}"));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = (|| -> Result<Summary> {
        let mut w = Writer::new(file, &recipients, Manifest { name: name.clone(), ..manifest })?;
        for x in &wanted {
            w.add(&ctx.host, x)?;
        }
        let (m, more, archive_bytes, archive_sha256, file) = w.finish()?;
        file.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
        notes.extend(more);
        let bytes = m.bytes();
        let mut beside = m;
        for it in beside.items.iter_mut().filter(|i| i.source == Source::Secret) {
            it.sha256 = None;
        }
        Ok(Summary {
            manifest: beside,
            archive: archive.clone(),
            encrypted: !recipients.is_empty(),
            recipients: rendered.clone(),
            archive_bytes,
            archive_sha256,
            bytes,
        })
    })();
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e.context(format!("writing backup {name}; nothing was kept")));
        }
    };
    fs::rename(&tmp, dir.join(&archive)).with_context(|| format!("renaming {}", tmp.display()))?;
    let json = serde_json::to_vec_pretty(&summary).expect("summary serializes");
    backup::write_private(&dir.join(format!("{name}.json")), &json)?;
    fsx::sync_dir(&dir)?;
    crate::history::record_event(ctx, &format!("backup create {name}"), &[])?;
    Ok(Created {
        name,
        dry_run: false,
        archive: Some(dir.join(&archive)),
        encrypted: summary.encrypted,
        secrets: o.include_secrets,
        stages: summary.manifest.stages.clone(),
        entries: summary.manifest.items.len(),
        bytes: summary.bytes,
        archive_bytes: summary.archive_bytes,
        notes,
    })
}

trait PrivateOpen {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateOpen for fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// The host's name: ROOT/etc/hostname, else the kernel's.
fn host_name(host: &Host) -> String {
    let read = |p: PathBuf| -> Option<String> {
        let mut s = String::new();
        fs::File::open(p).ok()?.take(256).read_to_string(&mut s).ok()?;
        let s = s.trim().to_owned();
        (!s.is_empty() && s.chars().all(|c| c.is_ascii_graphic())).then_some(s)
    };
    host.resolve("etc/hostname")
        .ok()
        .and_then(read)
        .or_else(|| read(PathBuf::from("/proc/sys/kernel/hostname")))
        .unwrap_or_else(|| "unknown".into())
}

/// `backup list --json`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub backups: Vec<ListedBackup>,
}

/// One backup in `backup list`.
#[derive(Debug, Serialize)]
pub struct ListedBackup {
    pub name: String,
    pub created: String,
    pub host: String,
    pub stages: Vec<StageRef>,
    pub encrypted: bool,
    pub secrets: bool,
    pub entries: usize,
    pub bytes: u64,
    pub archive_bytes: u64,
}

pub fn list(host: &Host) -> Result<Listed> {
    let backups = backup::list(host)?
        .into_iter()
        .map(|s| ListedBackup {
            entries: s.manifest.items.len(),
            name: s.manifest.name,
            created: s.manifest.created,
            host: s.manifest.host,
            stages: s.manifest.stages,
            encrypted: s.encrypted,
            secrets: s.manifest.secrets,
            bytes: s.bytes,
            archive_bytes: s.archive_bytes,
        })
        .collect();
    Ok(Listed { backups })
}

/// `backup verify --json`.
#[derive(Debug, Serialize)]
pub struct Verified {
    pub name: String,
    pub ok: bool,
    /// Whether the archive file is the one written (its size and sha256).
    pub archive_intact: bool,
    /// Whether every entry was checked against the manifest (false: an encrypted backup
    /// without an identity; only the archive file was checked).
    pub entries_checked: bool,
    pub entries: usize,
    pub problems: Vec<String>,
}

/// `backup verify NAME`: the archive file against its summary, and (when it can be read)
/// every entry's type, size and sha256 against the manifest.
pub fn verify(host: &Host, name: &str, identity: Option<&Path>) -> Result<Verified> {
    let (dir, s) = backup::find(host, name)?;
    let ids = if s.encrypted { backup::identities(host, identity, &s.recipients)? } else { None };
    let r = backup::read(&dir, &s, ids.as_ref(), |_, _| Ok(()))?;
    let archive_intact = r.archive.is_some_and(|(d, n)| d == s.archive_sha256 && n == s.archive_bytes);
    let entries_checked = !s.encrypted || ids.is_some();
    let mut problems = r.problems;
    if s.encrypted && ids.is_none() {
        problems.retain(|p| p.starts_with("the archive file"));
    }
    Ok(Verified {
        name: name.to_owned(),
        ok: problems.is_empty(),
        archive_intact,
        entries_checked,
        entries: s.manifest.items.len(),
        problems,
    })
}

/// `backup prune --json`.
#[derive(Debug, Serialize)]
pub struct Pruned {
    pub dry_run: bool,
    /// `[backups] keep` of stage.toml.
    pub keep: usize,
    pub pruned: Vec<String>,
    pub kept: Vec<String>,
}

/// `backup prune`: keeps the newest `[backups] keep` backups, removes the others.
pub fn prune(ctx: &Ctx) -> Result<Pruned> {
    let keep = Trust::load(&ctx.host)?.policy.backup_keep();
    let all = backup::list(&ctx.host)?;
    let cut = all.len().saturating_sub(keep);
    let (old, new) = all.split_at(cut);
    if !ctx.opts.dry_run
        && let Some(dir) = backup::dir(&ctx.host, false)?
    {
        for s in old {
            backup::remove(&dir, s)?;
        }
        backup::remove_leftovers(&dir)?;
        if !old.is_empty() {
            let names: Vec<&str> = old.iter().map(|s| s.manifest.name.as_str()).collect();
            crate::history::record_event(ctx, &format!("backup prune {}", names.join(" ")), &[])?;
        }
    }
    Ok(Pruned {
        dry_run: ctx.opts.dry_run,
        keep,
        pruned: old.iter().map(|s| s.manifest.name.clone()).collect(),
        kept: new.iter().map(|s| s.manifest.name.clone()).collect(),
    })
}

/// What is at a path a restore writes, as planning needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    Missing,
    /// A regular file: its content and modification time.
    File {
        sha256: Digest,
        mtime: (i64, u32),
    },
    Symlink {
        text: String,
        mtime: (i64, u32),
    },
    Dir,
    Other,
}

/// The steps of a restore, and what it refuses or leaves alone.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
    /// Paths changed since the backup (newer than the saved entry) or of another type now:
    /// the restore is refused while there are any (the newer ones are overwritten with
    /// `--force`).
    pub conflicts: Vec<String>,
    /// Directories the restore makes that the backup holds (owner and mode set after).
    pub made: Vec<usize>,
    pub unchanged: usize,
}

/// Plans putting back `items` (the files' contents extracted as `.tmp/<tmp>/<index>`)
/// over what `current` says is at each path and its parents; `links` are targets the active
/// stages hold as symlinks (left alone). `txid` names the stashed copies. Pure.
pub fn plan_restore(
    items: &[Item],
    current: &BTreeMap<TargetPath, Current>,
    links: &BTreeSet<TargetPath>,
    force: bool,
    tmp: &str,
    txid: u64,
) -> RestorePlan {
    let mut p = RestorePlan::default();
    let mut dirs: BTreeSet<TargetPath> = BTreeSet::new();
    let mut n = 0;
    let mut stash = || {
        n += 1;
        format!("r{txid}-{n}")
    };
    let now = |t: &TargetPath| current.get(t).cloned().unwrap_or(Current::Missing);
    // Parents first: a directory sorts before what it holds component by component.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_cached_key(|&i| items[i].path.relative().components().map(str::to_owned).collect::<Vec<_>>());
    'items: for i in order {
        let it = &items[i];
        let t = &it.path;
        if links.contains(t) {
            p.notes.push(format!("{t} is a link of an active stage now: left alone"));
            continue;
        }
        for a in crate::plan::ancestors(t) {
            if dirs.contains(&a) {
                continue;
            }
            match now(&a) {
                Current::Dir => {}
                Current::Missing => p.steps.push(Step::MkDir { path: a.clone() }),
                other => {
                    p.conflicts.push(format!("{a} is {} now, not a directory", noun(&other)));
                    continue 'items;
                }
            }
            dirs.insert(a);
        }
        let newer = |m: (i64, u32)| m > (it.mtime, it.mtime_nsec);
        let mut replace = |p: &mut RestorePlan, was: &Current, step: Step| {
            match was {
                Current::Missing => {}
                Current::File { mtime, sha256 } => {
                    if newer(*mtime) && !force {
                        p.conflicts.push(format!("{t} was changed after the backup"));
                        return;
                    }
                    p.steps.push(Step::Stash { target: t.clone(), stash: stash(), sha256: *sha256 });
                }
                Current::Symlink { text, mtime } => {
                    if newer(*mtime) && !force {
                        p.conflicts.push(format!("{t} was changed after the backup"));
                        return;
                    }
                    p.steps.push(Step::Unlink { target: t.clone(), text: text.clone() });
                }
                other => {
                    p.conflicts.push(format!("{t} is {} now, the backup has a {}", noun(other), it.kind.noun()));
                    return;
                }
            }
            p.steps.push(step);
        };
        let was = now(t);
        match it.kind {
            EntryKind::Dir => match was {
                Current::Dir => p.unchanged += 1,
                Current::Missing => {
                    p.steps.push(Step::MkDir { path: t.clone() });
                    p.made.push(i);
                    dirs.insert(t.clone());
                }
                other => p.conflicts.push(format!("{t} is {} now, the backup has a directory", noun(&other))),
            },
            EntryKind::File => {
                let Some(sha256) = it.sha256 else { continue };
                if matches!(was, Current::File { sha256: d, .. } if d == sha256) {
                    p.unchanged += 1;
                    continue;
                }
                let step =
                    Step::Copy { target: t.clone(), from: format!(".tmp/{tmp}/{i}"), sha256, mode: it.mode.bits() };
                replace(&mut p, &was, step);
            }
            EntryKind::Symlink => {
                let Some(text) = it.link.clone() else { continue };
                if matches!(&was, Current::Symlink { text: x, .. } if *x == text) {
                    p.unchanged += 1;
                    continue;
                }
                replace(&mut p, &was, Step::Link { target: t.clone(), text });
            }
        }
    }
    p
}

fn noun(c: &Current) -> &'static str {
    match c {
        Current::Missing => "nothing",
        Current::File { .. } => "a file",
        Current::Symlink { .. } => "a symlink",
        Current::Dir => "a directory",
        Current::Other => "a special file",
    }
}

/// What is at `target` on the host, read through the root without following a link.
fn current(host: &Host, target: &TargetPath) -> Result<Current> {
    let Some((dir, name, st)) = host.lstat(target).with_context(|| format!("reading {target}"))? else {
        return Ok(Current::Missing);
    };
    let mtime = (st.st_mtime, st.st_mtime_nsec as u32);
    Ok(match RawType::from_raw_mode(st.st_mode) {
        RawType::RegularFile => {
            let f: OwnedFd = rustix::fs::openat(
                &dir,
                name.as_str(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                RawMode::empty(),
            )
            .with_context(|| format!("opening {target}"))?;
            let (sha256, _) = sha256_reader(fs::File::from(f)).with_context(|| format!("reading {target}"))?;
            Current::File { sha256, mtime }
        }
        RawType::Symlink => {
            let text = rustix::fs::readlinkat(&dir, name.as_str(), Vec::new())?;
            Current::Symlink { text: text.to_string_lossy().into_owned(), mtime }
        }
        RawType::Directory => Current::Dir,
        _ => Current::Other,
    })
}

/// `backup restore NAME`: every saved path back as it was saved, as one transaction.
#[tracing::instrument(name = "backup_restore", skip(ctx, identity), fields(dry_run = ctx.opts.dry_run))]
pub fn restore(ctx: &Ctx, name: &str, force: bool, identity: Option<&Path>) -> Result<Report> {
    let (dir, s) = backup::find(&ctx.host, name)?;
    let ids = if s.encrypted {
        let ids = backup::identities(&ctx.host, identity, &s.recipients)?;
        if ids.is_none() {
            return Err(Usage(format!(
                "backup {name} is encrypted: give the identity it was encrypted to with --identity FILE (the host's \
                 own, /{}, is not among its recipients: {})",
                backup::HOST_IDENTITY,
                s.recipients.join(", ")
            ))
            .into());
        }
        ids
    } else {
        None
    };
    let state = ctx.state()?;
    let txid = state.txid + 1;
    let tmp = format!("backup-{txid}");
    let tmp_dir = ctx.staging.tmp().join(&tmp);
    if tmp_dir.exists() {
        crate::txn::remove_tree(&tmp_dir)?;
    }
    fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
    let planned = (|| -> Result<(RestorePlan, Vec<String>)> {
        // Every entry extracted and checked before anything is planned.
        let r = backup::read(&dir, &s, ids.as_ref(), |i, content| {
            let it = &s.manifest.items[i];
            let p = tmp_dir.join(i.to_string());
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_private()
                .open(&p)
                .with_context(|| format!("creating {}", p.display()))?;
            std::io::copy(content, &mut f).with_context(|| format!("extracting {}", it.path))?;
            rustix::fs::fchown(&f, Some(rustix::fs::Uid::from_raw(it.uid)), Some(rustix::fs::Gid::from_raw(it.gid)))
                .with_context(|| format!("giving {} its owner", p.display()))?;
            Ok(())
        })?;
        if !r.problems.is_empty() {
            let shown: Vec<&str> = r.problems.iter().take(8).map(String::as_str).collect();
            return Err(Malformed(format!(
                "backup {name} is damaged ({}); nothing was changed: `op-dbus-stage backup verify {name}` lists \
                 what does not match",
                shown.join("; ")
            ))
            .into());
        }
        let m = r.manifest.expect("checked: no problems means a manifest");
        let policy = Trust::load(&ctx.host)?.policy;
        let mut now = BTreeMap::new();
        for it in &m.items {
            let resolved = ctx.host.resolve_target(&it.path).with_context(|| format!("resolving {}", it.path))?;
            if !policy.target_allowed(&it.path) || !policy.target_allowed(&resolved) {
                return Err(Refused::Policy(format!(
                    "backup {name} holds {} (resolving to {resolved}), outside the prefixes this host allows \
                     (allowed_prefixes of /etc/op-dbus/stage.toml); nothing was changed",
                    it.path
                ))
                .into());
            }
            // A parent reached through a link root owns is the directory it leads to (the
            // policy judged where the path resolves, above).
            for t in crate::plan::ancestors(&it.path) {
                if let std::collections::btree_map::Entry::Vacant(v) = now.entry(t.clone()) {
                    let dir = ctx.host.dir_exists(&t).with_context(|| format!("reading {t}"))?;
                    v.insert(if dir { Current::Dir } else { current(&ctx.host, &t)? });
                }
            }
            now.insert(it.path.clone(), current(&ctx.host, &it.path)?);
        }
        let links: BTreeSet<TargetPath> = state
            .placed
            .iter()
            .filter(|(_, p)| matches!(p.how, Placement::Symlink { .. }))
            .map(|(t, _)| t.clone())
            .collect();
        let mut plan = plan_restore(&m.items, &now, &links, force, &tmp, txid);
        if !plan.conflicts.is_empty() {
            let newer = plan.conflicts.iter().any(|c| c.ends_with("after the backup"));
            return Err(Refused::Conflict(format!(
                "backup {name} was not restored, nothing was changed: {}{}",
                plan.conflicts.join("; "),
                if newer { ". `--force` overwrites what was changed after the backup" } else { "" }
            ))
            .into());
        }
        if plan.steps.is_empty() {
            plan.notes.push(format!("every path of backup {name} is as it was saved: nothing to restore"));
        } else if plan.unchanged > 0 {
            plan.notes.push(format!("{} path(s) are as they were saved", plan.unchanged));
        }
        let modes = plan
            .made
            .iter()
            .map(|&i| {
                let it = &m.items[i];
                format!("{}\t{}\t{}\t{}", it.path, it.uid, it.gid, it.mode.bits())
            })
            .collect();
        Ok((plan, modes))
    })();
    let done = planned.and_then(|(plan, made)| {
        let mut after = state.clone();
        after.txid = txid;
        let report = execute(
            ctx,
            format!("backup restore {name}"),
            state,
            Plan { steps: plan.steps, after, notes: plan.notes },
            &[],
            Cleanup::default(),
        )?;
        if !ctx.opts.dry_run {
            // The directories made get the saved owner and mode (not journaled: a made
            // directory is ours until the owner changes; a crash leaves it root's).
            for line in made {
                let f: Vec<&str> = line.split('\t').collect();
                if let (Ok(t), Ok(uid), Ok(gid), Ok(mode)) =
                    (TargetPath::parse(f[0]), f[1].parse(), f[2].parse(), f[3].parse())
                {
                    ctx.host.set_owner_mode(&t, uid, gid, mode).with_context(|| format!("setting the owner of {t}"))?;
                }
            }
        }
        Ok(report)
    });
    crate::txn::remove_tree(&tmp_dir)?;
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostfs::HostFs;
    use crate::hostfs::mem::{MemFs, Node};
    use crate::txn::{self, Journal};
    use formats::manifest::Mode;

    fn t(s: &str) -> TargetPath {
        s.parse().unwrap()
    }

    fn item(path: &str, kind: EntryKind, data: &[u8], mtime: i64) -> Item {
        Item {
            path: t(path),
            kind,
            stage: "app".parse().unwrap(),
            source: Source::Data,
            mode: Mode::new(0o640).unwrap(),
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: 0,
            size: (kind == EntryKind::File).then_some(data.len() as u64),
            sha256: (kind == EntryKind::File).then(|| Digest::of(data)),
            link: (kind == EntryKind::Symlink).then(|| String::from_utf8_lossy(data).into_owned()),
        }
    }

    /// A host with /opt/app/{db (changed at 200), conf (as saved)} and a backup of
    /// /opt/app with db, conf, a lost file and a lost subdirectory, taken at 100.
    fn host() -> (MemFs, Vec<Item>, BTreeMap<TargetPath, Current>) {
        let fs = MemFs::new(false);
        {
            let mut w = fs.world.borrow_mut();
            for d in ["/opt", "/opt/app"] {
                w.nodes.insert(d.into(), Node::Dir);
            }
            w.nodes.insert("/opt/app/db".into(), Node::File { data: b"new".to_vec(), mode: 0o600 });
            w.nodes.insert("/opt/app/conf".into(), Node::File { data: b"conf".to_vec(), mode: 0o644 });
            let tree = [("2", b"old".to_vec()), ("3", b"lost".to_vec())]
                .into_iter()
                .map(|(k, d)| (k.to_owned(), Node::File { data: d, mode: 0o600 }))
                .chain([(String::new(), Node::Dir)])
                .collect();
            w.tmp.insert("backup-7".into(), tree);
        }
        let items = vec![
            item("/opt/app", EntryKind::Dir, b"", 100),
            item("/opt/app/conf", EntryKind::File, b"conf", 100),
            item("/opt/app/db", EntryKind::File, b"old", 100),
            item("/opt/app/lost", EntryKind::File, b"lost", 100),
            item("/opt/app/sub", EntryKind::Dir, b"", 100),
            item("/opt/app/sub/link", EntryKind::Symlink, b"../db", 100),
        ];
        let now = BTreeMap::from([
            (t("/opt"), Current::Dir),
            (t("/opt/app"), Current::Dir),
            (t("/opt/app/db"), Current::File { sha256: Digest::of(b"new"), mtime: (200, 0) }),
            (t("/opt/app/conf"), Current::File { sha256: Digest::of(b"conf"), mtime: (50, 0) }),
        ]);
        (fs, items, now)
    }

    #[test]
    fn newer_files_are_refused_without_force() {
        let (_, items, now) = host();
        let p = plan_restore(&items, &now, &BTreeSet::new(), false, "backup-7", 7);
        assert_eq!(p.conflicts, ["/opt/app/db was changed after the backup"]);
        // An older change is overwritten without --force.
        let mut older = now.clone();
        older.insert(t("/opt/app/db"), Current::File { sha256: Digest::of(b"new"), mtime: (99, 0) });
        assert!(plan_restore(&items, &older, &BTreeSet::new(), false, "backup-7", 7).conflicts.is_empty());
        // A directory where the backup has a file is refused even with --force.
        older.insert(t("/opt/app/db"), Current::Dir);
        let p = plan_restore(&items, &older, &BTreeSet::new(), true, "backup-7", 7);
        assert_eq!(p.conflicts, ["/opt/app/db is a directory now, the backup has a file"]);
    }

    #[test]
    fn a_restore_puts_back_every_path_and_undoes_to_exactly_before() {
        let (fs, items, now) = host();
        let p = plan_restore(&items, &now, &BTreeSet::new(), true, "backup-7", 7);
        assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
        assert_eq!(p.unchanged, 2, "the directory and conf are as saved");
        let before = fs.snapshot();
        // Every prefix of the steps, then undone (a crash, then `recover`): as before.
        for k in 0..=p.steps.len() {
            let mut after = crate::state::State::new();
            after.txid = 7;
            let j = Journal::of(
                "backup restore b",
                crate::state::State::new(),
                Plan { steps: p.steps.clone(), after, notes: Vec::new() },
                Cleanup::default(),
            );
            for s in &j.steps[..k] {
                txn::apply(&fs, s).unwrap();
            }
            j.roll_back(&fs).unwrap();
            assert_eq!(fs.snapshot(), before, "after {k} steps undone");
        }
        for s in &p.steps {
            txn::apply(&fs, s).unwrap();
        }
        let w = fs.snapshot();
        assert_eq!(w.nodes["/opt/app/db"], Node::File { data: b"old".to_vec(), mode: 0o640 });
        assert_eq!(w.nodes["/opt/app/lost"], Node::File { data: b"lost".to_vec(), mode: 0o640 });
        assert_eq!(w.nodes["/opt/app/sub"], Node::Dir);
        assert_eq!(w.nodes["/opt/app/sub/link"], Node::Link("../db".into()));
        assert_eq!(p.made, [4], "the made directory gets its saved owner and mode");
        // The changed file went to the stash (deleted at clean-up), not lost mid-way.
        assert!(fs.has_kept(crate::hostfs::Kept::Stash, "r7-1").unwrap());
    }

    #[test]
    fn links_of_active_stages_are_left_alone() {
        let (_, items, now) = host();
        let links = BTreeSet::from([t("/opt/app/lost")]);
        let p = plan_restore(&items, &now, &links, true, "backup-7", 7);
        assert!(p.notes.iter().any(|n| n.contains("/opt/app/lost is a link")), "{:?}", p.notes);
        assert!(!p.steps.iter().any(|s| matches!(s, Step::Copy { target, .. } if *target == t("/opt/app/lost"))));
    }
}
