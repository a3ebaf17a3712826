//! The confinement of verify commands: checks, not installers.
//!
//! A verify command runs through a small helper, the installer binary itself re-executed
//! (`/proc/self/exe`, the hidden subcommand [`HELPER`]), which confines itself and then
//! executes the host's own `/bin/sh -c COMMAND` (never a `sh` found on `PATH`, which lists
//! directories inside the root):
//!
//! ```text
//! op-dbus-stage (root)                      the lock, the timeout, the process group
//!  └─ /proc/self/exe __verify-confined UID GID -- COMMAND
//!       unshare(CLONE_NEWNS)                its own mount namespace
//!       mount --make-rprivate /             nothing it mounts reaches the host
//!       every mount: bind remount ro        keeps nosuid, nodev, noexec; the host is untouched
//!       capability bounding set emptied     (needs CAP_SETPCAP, so before the uid changes)
//!       setgroups([]), setresgid, setresuid the verify user (`nobody` unless stage.toml says)
//!       capabilities emptied                a configured uid 0 keeps none either
//!       no_new_privs                        no setuid binary or file capability gives them back
//!       exec /bin/sh -c COMMAND             same pid: the timeout kills its process group
//! ```
//!
//! The helper is a fresh single-threaded process, so the per-thread credential calls of
//! rustix change the whole process, and `unshare(CLONE_NEWNS)` (which implies
//! `CLONE_FS`) is allowed. Everything goes through rustix's safe wrappers: no `unsafe`,
//! no `pre_exec` closure in the multi-threaded installer.
//!
//! When the helper cannot confine itself it prints [`FAILED`] and the reason on the
//! command's output and exits [`FAILED_EXIT`]; the installer then reports an error instead
//! of running the command unconfined.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// The hidden subcommand of `op-dbus-stage` that runs one confined verify command.
pub const HELPER: &str = "__verify-confined";

/// The exit code of a helper that could not confine itself (as `env` and `chroot` use 125).
pub const FAILED_EXIT: i32 = 125;

/// What a helper that could not confine itself prints first on the command's output.
pub const FAILED: &str = "op-dbus-stage: cannot confine the verify command:";

/// The shell verify commands run with: the host's own.
pub const SHELL: &str = "/bin/sh";

/// The command that runs `command` confined as `uid`:`gid` (cwd, environment, stdio and
/// process group are the caller's to set).
pub fn command(command: &str, uid: u32, gid: u32) -> Command {
    let mut c = Command::new("/proc/self/exe");
    c.arg(HELPER).arg(uid.to_string()).arg(gid.to_string()).arg("--").arg(command);
    c
}

/// In the helper: confines this process and replaces it with `/bin/sh -c command`.
/// Returns only on failure.
pub fn exec_confined(uid: u32, gid: u32, command: &OsString) -> io::Error {
    if let Err(e) = confine(uid, gid) {
        return e;
    }
    let e = Command::new(SHELL).arg("-c").arg(command).exec();
    io::Error::new(e.kind(), format!("executing {SHELL}: {e}"))
}

fn confine(uid: u32, gid: u32) -> io::Result<()> {
    let step = |what: &'static str| {
        move |e: rustix::io::Errno| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
    };
    // Deprecated in rustix only because `CLONE_FILES` can strand descriptors other threads
    // use; `CLONE_NEWNS` in this single-threaded helper has no such effect.
    #[allow(deprecated)]
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS).map_err(step("unshare(CLONE_NEWNS)"))?;
    rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .map_err(step("making the mounts private"))?;
    read_only_mounts()?;

    for cap in CapabilitySet::all().iter() {
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // A capability this kernel does not know.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(step("emptying the capability bounding set")(e)),
        }
    }
    rustix::thread::set_thread_groups(&[]).map_err(step("dropping the supplementary groups"))?;
    let (uid, gid) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(step("setresgid"))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(step("setresuid"))?;
    let none = CapabilitySet::empty();
    rustix::thread::set_capabilities(None, CapabilitySets { effective: none, permitted: none, inheritable: none })
        .map_err(step("dropping the capabilities"))?;
    rustix::thread::set_no_new_privs(true).map_err(step("setting no_new_privs"))?;
    Ok(())
}

/// One line of `/proc/self/mountinfo`: the ids, the mount point and its per-mount options.
#[derive(Debug, PartialEq, Eq)]
struct MountPoint {
    id: u64,
    parent: u64,
    path: String,
    options: Vec<String>,
}

fn mount_points() -> io::Result<Vec<MountPoint>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/mountinfo: {e}")))?;
    text.lines()
        .map(|l| {
            parse_mountinfo_line(l)
                .ok_or_else(|| io::Error::other(format!("unexpected line in /proc/self/mountinfo: {l}")))
        })
        .collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: fields 1, 2, 5 and 6.
fn parse_mountinfo_line(line: &str) -> Option<MountPoint> {
    let mut fields = line.split(' ');
    let id = fields.next()?.parse().ok()?;
    let parent = fields.next()?.parse().ok()?;
    let path = unescape(fields.nth(2)?)?;
    let options = fields.next()?.split(',').map(str::to_owned).collect();
    Some(MountPoint { id, parent, path, options })
}

/// The mounts a path can reach: not those another mount covers at their root (stacked
/// mounts: only the top one is reached), nor those inside a covered mount's tree.
fn reachable(mounts: &[MountPoint]) -> Vec<&MountPoint> {
    let by_id: std::collections::BTreeMap<u64, &MountPoint> = mounts.iter().map(|m| (m.id, m)).collect();
    let covered = |m: &MountPoint| mounts.iter().any(|n| n.parent == m.id && n.path == m.path && n.id != m.id);
    // Whether `m`'s mount point is reached through its ancestors (a covered parent only
    // still shows the mount that covers it).
    let path_reached = |m: &MountPoint| {
        let mut cur = m;
        for _ in 0..mounts.len() {
            let Some(parent) = by_id.get(&cur.parent).filter(|p| p.id != cur.id) else { return true };
            if covered(parent) && cur.path != parent.path {
                return false;
            }
            cur = parent;
        }
        false
    };
    mounts.iter().filter(|m| !covered(m) && path_reached(m)).collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let oct = s.get(i + 1..i + 4)?;
            out.push(u8::from_str_radix(oct, 8).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The flags a bind remount must repeat to keep a mount's options (besides `ro`).
fn kept_flags(options: &[String]) -> MountFlags {
    let mut flags = MountFlags::empty();
    for o in options {
        flags |= match o.as_str() {
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            "noatime" => MountFlags::NOATIME,
            "nodiratime" => MountFlags::NODIRATIME,
            "relatime" => MountFlags::RELATIME,
            "nosymfollow" => MountFlags::NOSYMFOLLOW,
            _ => MountFlags::empty(),
        };
    }
    flags
}

/// Remounts every mount of this (private) namespace that a path reaches read-only,
/// keeping its other options, then checks that each is read-only. The others (covered by
/// another mount) cannot be reached by the command either.
fn read_only_mounts() -> io::Result<()> {
    let mounts = mount_points()?;
    for m in reachable(&mounts) {
        let flags = MountFlags::BIND | MountFlags::RDONLY | kept_flags(&m.options);
        rustix::mount::mount_remount(Path::new(&m.path), flags, "")
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("remounting {} read-only: {e}", m.path)))?;
    }
    let mounts = mount_points()?;
    if let Some(m) = reachable(&mounts).into_iter().find(|m| !m.options.iter().any(|o| o == "ro")) {
        return Err(io::Error::other(format!("{} is still writable after remounting it read-only", m.path)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let m =
            parse_mountinfo_line("36 35 98:0 /mnt1 /mnt\\040two rw,nosuid,nodev master:1 - ext3 /dev/root rw").unwrap();
        assert_eq!(m.path, "/mnt two");
        assert_eq!(m.options, ["rw", "nosuid", "nodev"]);
        assert_eq!(kept_flags(&m.options), MountFlags::NOSUID | MountFlags::NODEV);
        assert_eq!(unescape("/a\\134b\\011"), Some("/a\\b\t".to_owned()));
        assert_eq!(unescape("/a\\9"), None);
        assert_eq!(parse_mountinfo_line("36 35 98:0"), None);
    }

    #[test]
    fn covered_mounts_are_not_reachable() {
        let m = |id, parent, path: &str| MountPoint { id, parent, path: path.into(), options: vec![] };
        let mounts = [
            m(27, 1, "/"),
            m(24, 27, "/dev"),
            m(25, 24, "/dev/shm"),
            m(30, 25, "/dev/shm"),
            m(31, 30, "/dev/shm/x"),
            m(40, 27, "/a"),
            m(41, 40, "/a/b"),
            m(42, 40, "/a"),
            m(43, 42, "/a/c"),
        ];
        let ids: Vec<u64> = reachable(&mounts).iter().map(|m| m.id).collect();
        assert_eq!(ids, [27, 24, 30, 31, 42, 43]);
    }
}
