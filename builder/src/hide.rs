//! Build steps never see the signing key.
//!
//! The key is read into memory before any step runs. Then, before the first step, this
//! process moves into a private mount namespace (and, when not root, a user namespace
//! that maps only its own user and group) where `/dev/null` is bind-mounted over the
//! key's file, and becomes non-dumpable (so that a step of the same user cannot open
//! `/proc/<builder>/mem`, `environ` or `root`). Steps inherit the namespace, and run
//! without `$OP_DBUS_SIGNING_KEY`. The path stays visible on the builder's command line;
//! what it names is not readable there.
//!
//! Limits: a step running as root keeps the capabilities to undo a mount or read another
//! process's memory, and another hard link to the key's file is not covered. Build machines
//! that run other people's stage folders build with `--no-sign` and sign elsewhere.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rustix::mount::{MountPropagationFlags, mount_bind, mount_change};
use rustix::process::{DumpableBehavior, set_dumpable_behavior};
use rustix::thread::UnshareFlags;

/// The environment variable that names the key; removed from every step's environment.
pub const KEY_ENV: &str = "OP_DBUS_SIGNING_KEY";

/// Hides `key` (its file, wherever its symlinks lead) from this process and its children
/// from now on.
pub fn hide_key(key: &Path) -> Result<()> {
    let advice = "build with --no-sign (and without --key or OP_DBUS_SIGNING_KEY), then sign the image with \
                  `op-dbus-image sign` where no build step runs";
    let real = key.canonicalize().with_context(|| format!("resolving the signing key path {}", key.display()))?;
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_owned())));
    if threads.as_deref() != Some("1") {
        bail!("cannot hide the signing key from the build steps: the builder already runs several threads; {advice}");
    }
    let uid = rustix::process::geteuid();
    let gid = rustix::process::getegid();
    let fail = |what: &str, e: std::io::Error| {
        anyhow::anyhow!("cannot hide the signing key from the build steps ({what}: {e}); {advice}")
    };
    if uid.is_root() {
        #[allow(deprecated)] // `unshare_unsafe` is the same call, marked unsafe for UnshareFlags::FILES only.
        rustix::thread::unshare(UnshareFlags::NEWNS).map_err(|e| fail("a private mount namespace", e.into()))?;
    } else {
        #[allow(deprecated)]
        rustix::thread::unshare(UnshareFlags::NEWUSER | UnshareFlags::NEWNS)
            .map_err(|e| fail("a user and mount namespace", e.into()))?;
        // The same user and group inside as outside: steps run as who they ran as before.
        std::fs::write("/proc/self/setgroups", "deny").map_err(|e| fail("/proc/self/setgroups", e))?;
        std::fs::write("/proc/self/uid_map", format!("{0} {0} 1\n", uid.as_raw()))
            .map_err(|e| fail("/proc/self/uid_map", e))?;
        std::fs::write("/proc/self/gid_map", format!("{0} {0} 1\n", gid.as_raw()))
            .map_err(|e| fail("/proc/self/gid_map", e))?;
    }
    mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .map_err(|e| fail("making the mounts private", e.into()))?;
    mount_bind("/dev/null", &real).map_err(|e| fail(&format!("covering {}", real.display()), e.into()))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(|e| fail("PR_SET_DUMPABLE", e.into()))?;
    // What a step would see: nothing.
    if std::fs::read(&real).is_ok_and(|b| !b.is_empty()) {
        bail!("cannot hide the signing key from the build steps: {} is still readable; {advice}", real.display());
    }
    Ok(())
}
