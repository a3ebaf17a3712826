//! System users and the owners of staged files.
//!
//! A stage's `users:` are created in the root's `/etc/passwd` and `/etc/group` by
//! `systemd-sysusers --root ROOT` (its semantics: created if missing, never changed or
//! removed when present, so neither rollback nor removal takes a user away). Every staged
//! path of a generation belongs to root, except what a `files:` entry gives an `owner:` or
//! `group:` (the entry's path and everything below it); names are those of the root's own
//! user database. The uid and gid a payload carries (a tar header, a btrfs `chown`) are
//! never used: a generation's owners are set here, from the signed manifest, before it is
//! published, and `verify` compares them again.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use formats::manifest::{Entry, Principal, StageConfig, UserSpec};
use formats::path::RelPath;

use crate::host::Host;

/// The largest `/etc/passwd` or `/etc/group` read.
const MAX_DB: u64 = 16 << 20;

/// The root's users and groups: name -> (uid, primary gid), name -> gid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    pub users: BTreeMap<String, (u32, u32)>,
    pub groups: BTreeMap<String, u32>,
}

impl Ids {
    /// Reads the root's `/etc/passwd` and `/etc/group` (missing ones are empty).
    pub fn read(host: &Host) -> Result<Ids> {
        let passwd = read_db(host, "etc/passwd")?;
        let group = read_db(host, "etc/group")?;
        Ok(Ids::parse(&passwd, &group))
    }

    /// From the text of `passwd` and `group`; malformed lines are skipped.
    pub fn parse(passwd: &str, group: &str) -> Ids {
        let mut ids = Ids::default();
        for l in passwd.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if let [name, _, uid, gid, ..] = f[..]
                && let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse())
            {
                ids.users.entry(name.to_owned()).or_insert((uid, gid));
            }
        }
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if let [name, _, gid, ..] = f[..]
                && let Ok(gid) = gid.parse()
            {
                ids.groups.entry(name.to_owned()).or_insert(gid);
            }
        }
        ids
    }

    /// The uid and gid a `files:` entry asks for: root's without `owner:` and `group:`; the
    /// group defaults to the owner's primary group (root's when the owner is a number
    /// without a passwd entry).
    pub fn of(&self, owner: Option<&Principal>, group: Option<&Principal>) -> Result<(u32, u32)> {
        let (uid, primary) = match owner {
            None => (0, 0),
            Some(Principal::Id(n)) => (*n, self.users.values().find(|(u, _)| u == n).map_or(0, |(_, g)| *g)),
            Some(Principal::Name(n)) => *self.users.get(n).with_context(|| {
                format!(
                    "the owner {n:?} is not a user of the root's /etc/passwd; declare it under `users:` or name a uid"
                )
            })?,
        };
        let gid = match group {
            None => primary,
            Some(Principal::Id(n)) => *n,
            Some(Principal::Name(n)) => *self.groups.get(n).with_context(|| {
                format!(
                    "the group {n:?} is not a group of the root's /etc/group; declare it under `users:` or name a gid"
                )
            })?,
        };
        Ok((uid, gid))
    }
}

fn read_db(host: &Host, rel: &str) -> Result<String> {
    let path = match host.resolve(rel) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e).with_context(|| format!("finding /{rel} in {}", host.root.display())),
    };
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_DB).read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(text)
}

/// The `users:` of `config` the root does not have yet (users, or the group a user names).
pub fn missing<'a>(ids: &Ids, users: &'a [UserSpec]) -> Vec<&'a UserSpec> {
    users
        .iter()
        .filter(|u| !ids.users.contains_key(&u.name) || u.group.as_ref().is_some_and(|g| !ids.groups.contains_key(g)))
        .collect()
}

/// `ids` with the `users:` it lacks as if they were there (ids unknown until created), for a
/// dry run to judge the owners by.
pub fn with_planned(mut ids: Ids, users: &[UserSpec]) -> Ids {
    for u in users {
        let group = u.group.clone().unwrap_or_else(|| u.name.clone());
        ids.groups.entry(group).or_insert(u32::MAX - 1);
        ids.users.entry(u.name.clone()).or_insert((u32::MAX - 1, u32::MAX - 1));
    }
    ids
}

/// Creates the missing `users` in the root with `systemd-sysusers`; returns a note per user
/// created. Users already there are left exactly as they are.
pub fn create(host: &Host, users: &[&UserSpec]) -> Result<Vec<String>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let Some(sysusers) =
        ["/usr/bin/systemd-sysusers", "/bin/systemd-sysusers"].into_iter().find(|p| Path::new(p).exists())
    else {
        bail!(
            "the stage declares users ({}) and systemd-sysusers is not installed: install systemd (apt-get install \
             systemd), or create them by hand first",
            users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    };
    host.ensure_dir("etc").context("creating /etc in the root")?;
    let lines: Vec<String> = users.iter().flat_map(|u| u.sysusers_lines()).collect();
    let out = Command::new(sysusers)
        .arg("--root")
        .arg(&host.root)
        .arg("--inline")
        .args(&lines)
        .stdin(Stdio::null())
        .output()
        .context("running systemd-sysusers")?;
    if !out.status.success() {
        bail!(
            "systemd-sysusers --root {} could not create {}: {}",
            host.root.display(),
            users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(", "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ids = Ids::read(host)?;
    Ok(users
        .iter()
        .map(|u| match ids.users.get(&u.name) {
            Some((uid, gid)) => format!("created system user {} (uid {uid}, gid {gid})", u.name),
            None => format!("created system user {}", u.name),
        })
        .collect())
}

/// Who owns what no `files:` entry gives an owner: root, that is the installer's own user
/// (another one only where the installer runs unprivileged, on a scratch root).
pub fn default_owner() -> (u32, u32) {
    (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw())
}

/// The uid and gid every staged entry of `config` must have, in entry order: the most
/// specific `files:` entry with an owner or group that covers it, else [`default_owner`].
pub fn wanted(config: &StageConfig, ids: &Ids) -> Result<Vec<(u32, u32)>> {
    let mut owned: BTreeMap<&RelPath, (u32, u32)> = BTreeMap::new();
    for (i, f) in config.files.iter().enumerate() {
        if f.owner.is_some() || f.group.is_some() {
            let ids = ids.of(f.owner.as_ref(), f.group.as_ref()).with_context(|| format!("files[{i}] ({})", f.path))?;
            owned.insert(&f.path, ids);
        }
    }
    if owned.is_empty() {
        return Ok(vec![default_owner(); config.entries.len()]);
    }
    // The entry itself, else its nearest ancestor with an owner: the most specific wins.
    let default = default_owner();
    let of = |e: &Entry| -> (u32, u32) {
        if let Some(ids) = owned.get(&e.path) {
            return *ids;
        }
        let ancestors: Vec<RelPath> = e.path.ancestors().collect();
        ancestors.iter().rev().find_map(|a| owned.get(a).copied()).unwrap_or(default)
    };
    Ok(config.entries.iter().map(of).collect())
}

/// Gives every staged entry of the unpacked tree `dir` the owner `wanted` says (links
/// themselves, never what they point at). `all = false` touches only entries that are not
/// [`default_owner`]'s (a tar payload is unpacked by the installer; a btrfs stream may
/// carry its own owners).
/// Modes with setuid or setgid bits are set again after the chown, which clears them.
pub fn own_tree(dir: &Path, config: &StageConfig, wanted: &[(u32, u32)], all: bool) -> Result<()> {
    let root =
        rustix::fs::open(dir, rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY, rustix::fs::Mode::empty())
            .with_context(|| format!("opening {}", dir.display()))?;
    let default = default_owner();
    for (e, &(uid, gid)) in config.entries.iter().zip(wanted) {
        if !all && (uid, gid) == default {
            continue;
        }
        chown_entry(&root, e, uid, gid)
            .with_context(|| format!("setting the owner of {}/{}", dir.display(), e.path))?;
    }
    Ok(())
}

fn chown_entry(root: &impl std::os::fd::AsFd, e: &Entry, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Gid, Mode, Uid};
    // Parents of staged entries are staged directories (the manifest says so and the tree
    // was checked against it), so no component on the way is a link.
    rustix::fs::chownat(
        root,
        e.path.as_str(),
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if e.mode.is_special() && e.kind != formats::manifest::EntryKind::Symlink {
        rustix::fs::chmodat(root, e.path.as_str(), Mode::from_raw_mode(e.mode.bits()), AtFlags::empty())?;
    }
    Ok(())
}

/// Staged entries of the generation `dir` whose owner is not the one `wanted` says, as
/// `path: owned by U:G, the manifest says U:G` lines.
pub fn problems(dir: &Path, config: &StageConfig, wanted: &[(u32, u32)]) -> Result<Vec<String>> {
    let root =
        rustix::fs::open(dir, rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY, rustix::fs::Mode::empty())
            .with_context(|| format!("opening {}", dir.display()))?;
    let mut out = Vec::new();
    for (e, &(uid, gid)) in config.entries.iter().zip(wanted) {
        match rustix::fs::statat(&root, e.path.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if (st.st_uid, st.st_gid) == (uid, gid) => {}
            Ok(st) => out.push(format!(
                "{}: owned by {}:{}, the manifest says {uid}:{gid} (changed by hand? chown it back)",
                e.path, st.st_uid, st.st_gid
            )),
            // A missing entry is the tree check's to report.
            Err(_) => {}
        }
    }
    Ok(out)
}

/// What `verify` reports about the owners of the generation `dir`: entries owned otherwise
/// than the manifest says, or why the owners cannot be known (a user gone from the root).
pub fn verify_generation(host: &Host, dir: &Path, config: &StageConfig) -> Result<Vec<String>> {
    let ids = Ids::read(host)?;
    match wanted(config, &ids) {
        Ok(w) => problems(dir, config, &w),
        Err(e) => Ok(vec![format!("{e:#}")]),
    }
}

/// Whether the copy at `target` has the owner of the staged file it was copied from.
pub fn copy_owner_problem(host: &Host, target: &formats::path::TargetPath, staged: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let copy = host.resolve(target.relative().as_str()).and_then(std::fs::symlink_metadata).ok()?;
    let src = std::fs::metadata(staged).ok()?;
    ((copy.uid(), copy.gid()) != (src.uid(), src.gid())).then(|| {
        format!(
            "{target}: the copy is owned by {}:{}, the manifest says {}:{} (changed by hand? chown it back)",
            copy.uid(),
            copy.gid(),
            src.uid(),
            src.gid()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nop-dbus:x:998:997::/:/usr/sbin/nologin\nbroken\nn:x:abc:1::/:\n";
    const GROUP: &str = "root:x:0:\nop-dbus:x:997:\nweb:x:33:\nbad:x:\n";

    #[test]
    fn names_and_numbers_resolve_through_the_roots_database() {
        let ids = Ids::parse(PASSWD, GROUP);
        assert_eq!(ids.users.len(), 2);
        let name = |s: &str| Principal::Name(s.into());
        assert_eq!(ids.of(None, None).unwrap(), (0, 0));
        assert_eq!(ids.of(Some(&name("op-dbus")), None).unwrap(), (998, 997));
        assert_eq!(ids.of(Some(&name("op-dbus")), Some(&name("web"))).unwrap(), (998, 33));
        assert_eq!(ids.of(Some(&Principal::Id(998)), None).unwrap(), (998, 997));
        assert_eq!(ids.of(Some(&Principal::Id(4000)), None).unwrap(), (4000, 0));
        assert_eq!(ids.of(None, Some(&Principal::Id(5))).unwrap(), (0, 5));
        let e = ids.of(Some(&name("ghost")), None).unwrap_err().to_string();
        assert!(e.contains("ghost") && e.contains("users:"), "{e}");
        assert!(ids.of(None, Some(&name("nogroup"))).unwrap_err().to_string().contains("nogroup"));
    }

    #[test]
    fn the_most_specific_entry_decides_and_the_rest_is_roots() {
        let def = formats::manifest::StageDefinition::parse(
            "version: 1.0.0\nfiles:\n  - path: app\n    target: /opt/app\n    owner: op-dbus\n  - path: app/secret\n    \
             target: /etc/op-dbus/secret\n    owner: 0\n    group: web\n  - path: bin\n    target: /usr/local/bin/x\n",
            Path::new("m.yaml"),
        )
        .unwrap();
        let e = |p: &str, k| Entry {
            path: p.parse().unwrap(),
            kind: k,
            mode: formats::manifest::Mode::new(0o755).unwrap(),
            size: (k == formats::manifest::EntryKind::File).then_some(0),
            sha256: (k == formats::manifest::EntryKind::File).then(|| formats::Digest::of(b"")),
            link: None,
        };
        use formats::manifest::EntryKind::{Dir, File};
        let c = StageConfig::from_definition(
            "s".parse().unwrap(),
            &def,
            vec![e("app", Dir), e("app/a", File), e("app/secret", File), e("bin", File)],
        );
        let w = wanted(&c, &Ids::parse(PASSWD, GROUP)).unwrap();
        assert_eq!(w, [(998, 997), (998, 997), (0, 33), (0, 0)]);
        let e = wanted(&c, &Ids::default()).unwrap_err();
        assert!(format!("{e:#}").contains("files[0] (app)"), "{e:#}");
    }

    #[test]
    fn owners_of_many_entries_are_found_without_a_scan_per_entry() {
        let mut files = String::from("version: 1.0.0\nfiles:\n");
        for i in 0..4096 {
            files += &format!("  - path: d{i}\n    target: /opt/d{i}\n    owner: {}\n", 1000 + i);
        }
        let def = formats::manifest::StageDefinition::parse(&files, Path::new("m.yaml")).unwrap();
        let dir = |p: String| Entry {
            path: p.parse().unwrap(),
            kind: formats::manifest::EntryKind::Dir,
            mode: formats::manifest::Mode::new(0o755).unwrap(),
            size: None,
            sha256: None,
            link: None,
        };
        let mut entries = Vec::new();
        for i in 0..4096 {
            entries.push(dir(format!("d{i}")));
            for j in 0..50 {
                entries.push(dir(format!("d{i}/e{j}")));
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let c = StageConfig::from_definition("s".parse().unwrap(), &def, entries);
        let t = std::time::Instant::now();
        let w = wanted(&c, &Ids::default()).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
        let i = c.entries.iter().position(|e| e.path.as_str() == "d7/e3").unwrap();
        assert_eq!(w[i], (1007, 0));
    }

    /// A tree as a btrfs stream may leave it (every path owned by uid 1000) gets root's
    /// owners, except what the manifest declares; a declared setuid mode survives the chown.
    #[test]
    fn own_tree_replaces_whatever_owners_the_payload_left() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert!(rustix::process::geteuid().is_root(), "this test changes owners: run it as root (CI does)");
        let def = formats::manifest::StageDefinition::parse(
            "version: 1.0.0\nfiles:\n  - path: d/tool\n    target: /usr/local/bin/tool\n    mode: 04755\n    owner: 4242\n    \
             group: 4343\n",
            Path::new("m.yaml"),
        )
        .unwrap();
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/tool"), "x").unwrap();
        std::fs::write(t.path().join("d/other"), "y").unwrap();
        std::os::unix::fs::symlink("tool", t.path().join("d/l")).unwrap();
        for p in ["d", "d/tool", "d/other", "d/l"] {
            std::os::unix::fs::lchown(t.path().join(p), Some(1000), Some(1000)).unwrap();
        }
        std::fs::set_permissions(t.path().join("d/tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        let e = |p: &str, kind, mode| Entry {
            path: p.parse().unwrap(),
            kind,
            mode: formats::manifest::Mode::new(mode).unwrap(),
            size: (kind == formats::manifest::EntryKind::File).then_some(1),
            sha256: (kind == formats::manifest::EntryKind::File).then(|| formats::Digest::of(b"x")),
            link: (kind == formats::manifest::EntryKind::Symlink).then(|| "tool".to_owned()),
        };
        use formats::manifest::EntryKind::{Dir, File, Symlink};
        let c = StageConfig::from_definition(
            "s".parse().unwrap(),
            &def,
            vec![e("d", Dir, 0o755), e("d/l", Symlink, 0o777), e("d/other", File, 0o644), e("d/tool", File, 0o4755)],
        );
        let w = wanted(&c, &Ids::default()).unwrap();
        assert_eq!(problems(t.path(), &c, &w).unwrap().len(), 4, "every path is owned otherwise");
        own_tree(t.path(), &c, &w, true).unwrap();
        let meta = |p: &str| std::fs::symlink_metadata(t.path().join(p)).unwrap();
        for p in ["d", "d/other", "d/l"] {
            assert_eq!((meta(p).uid(), meta(p).gid()), (0, 0), "{p}");
        }
        assert_eq!((meta("d/tool").uid(), meta("d/tool").gid()), (4242, 4343));
        assert_eq!(meta("d/tool").mode() & 0o7777, 0o4755, "the chown cleared the declared setuid bit");
        assert!(problems(t.path(), &c, &w).unwrap().is_empty());
    }

    #[test]
    fn a_dry_run_judges_owners_as_if_the_users_were_there() {
        let u: Vec<UserSpec> = vec![serde_json::from_str(r#"{"name":"new","group":"grp"}"#).unwrap()];
        let ids = with_planned(Ids::parse(PASSWD, GROUP), &u);
        let name = |s: &str| Principal::Name(s.into());
        assert!(ids.of(Some(&name("new")), Some(&name("grp"))).is_ok());
        assert_eq!(ids.of(Some(&name("op-dbus")), None).unwrap(), (998, 997), "users there keep their ids");
        assert!(ids.of(Some(&name("ghost")), None).is_err());
    }

    #[test]
    fn missing_users_are_those_not_in_passwd_or_whose_group_is_missing() {
        let ids = Ids::parse(PASSWD, GROUP);
        let u = |j: &str| serde_json::from_str::<UserSpec>(j).unwrap();
        let users = [u(r#"{"name":"op-dbus"}"#), u(r#"{"name":"new"}"#), u(r#"{"name":"op-dbus","group":"g2"}"#)];
        let m: Vec<&str> = missing(&ids, &users).iter().map(|u| u.name.as_str()).collect();
        assert_eq!(m, ["new", "op-dbus"]);
    }
}
