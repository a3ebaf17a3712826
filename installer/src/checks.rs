//! Verify commands and systemd units of a stage.
//!
//! A verify command is a check, not an installer: it runs with the host's own `/bin/sh -c`,
//! confined (see [`crate::sandbox`]: its own mount namespace with every mount read-only,
//! no capabilities, `no_new_privs`, as the user `[verify_users]` of stage.toml names for
//! the stage, `nobody` by default), with its timeout, the generation directory as working
//! directory, `OP_DBUS_ROOT` set to the root, and, under a root other than `/`, the
//! `bin/` and `sbin/` of every active stage and the root's bin directories first on
//! `PATH` (target links are written as seen from inside the root, so from outside it they
//! only resolve through the stages' own folders). `PATH` only finds the programs the
//! command calls; the shell itself is never looked up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use formats::manifest::VerifySpec;
use keys::policy::VerifyUser;

use crate::sandbox;

/// The outcome of one verify command.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub command: String,
    pub expected: i32,
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub passed: bool,
    pub output: String,
}

/// The PATH verify commands see.
pub fn verify_path(root: &Path, stage_dirs: &[PathBuf]) -> String {
    let host_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    if root == Path::new("/") {
        return host_path;
    }
    let mut parts: Vec<String> = Vec::new();
    for d in stage_dirs {
        for sub in ["bin", "sbin"] {
            parts.push(d.join(sub).display().to_string());
        }
    }
    for sub in ["usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"] {
        parts.push(root.join(sub).display().to_string());
    }
    parts.push(host_path);
    parts.join(":")
}

/// The largest `/etc/passwd` read to find a verify user.
const MAX_PASSWD: u64 = 16 << 20;

/// The uid and gid of `user` on this host (its own `/etc/passwd`, never the root's): a
/// name must be listed there, except `nobody`, which is 65534:65534 when it is not.
pub fn resolve_user(user: &VerifyUser) -> Result<(u32, u32)> {
    let name = match user {
        VerifyUser::Ids { uid, gid } => return Ok((*uid, *gid)),
        VerifyUser::Name(n) => n,
    };
    let mut text = String::new();
    use std::io::Read;
    match std::fs::File::open("/etc/passwd") {
        Ok(f) => {
            f.take(MAX_PASSWD).read_to_string(&mut text).context("reading /etc/passwd")?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("reading /etc/passwd"),
    }
    let found = text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
    });
    match found {
        Some(ids) => Ok(ids),
        None if name == keys::policy::DEFAULT_VERIFY_USER => Ok((65534, 65534)),
        None => anyhow::bail!(
            "the verify user {name:?} (verify_users in stage.toml) is not a user of this host's /etc/passwd; \
             create it, or name another user or UID:GID there"
        ),
    }
}

/// Runs one verify command, confined, as `user` (uid, gid).
pub fn run(spec: &VerifySpec, cwd: &Path, root: &Path, path: &str, user: (u32, u32)) -> Result<CheckResult> {
    let out_file = tempfile::tempfile().context("creating a file for the command's output")?;
    let mut child = sandbox::command(&spec.command, user.0, user.1)
        .current_dir(cwd)
        .env("OP_DBUS_ROOT", root)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file.try_clone()?))
        .stderr(Stdio::from(out_file.try_clone()?))
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting verify command `{}`", spec.command))?;
    let deadline = Instant::now() + spec.timeout.duration();
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait()? {
            break (Some(st), false);
        }
        if Instant::now() >= deadline {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::io::{Read, Seek};
    let mut f = out_file;
    f.rewind()?;
    let mut output = String::new();
    let _ = f.take(8192).read_to_string(&mut output);
    let exit = status.and_then(|s| s.code());
    if exit == Some(sandbox::FAILED_EXIT) && output.starts_with(sandbox::FAILED) {
        anyhow::bail!(
            "verify command `{}` was not run: {}; verify commands need a kernel with mount namespaces and \
             the installer running as root",
            spec.command,
            output.trim_end()
        );
    }
    Ok(CheckResult {
        command: spec.command.clone(),
        expected: spec.expect_exit,
        exit,
        timed_out,
        passed: !timed_out && exit == Some(spec.expect_exit),
        output,
    })
}

use std::os::unix::process::CommandExt;

/// The systemctl of this machine, if there is one.
pub fn systemctl_path() -> Option<&'static Path> {
    ["/usr/bin/systemctl", "/bin/systemctl"].into_iter().map(Path::new).find(|p| p.exists())
}

/// `systemctl --root ROOT VERB UNIT` (enable and disable are idempotent).
pub fn systemctl(root: &Path, verb: &str, unit: &str) -> Result<()> {
    let Some(systemctl) = systemctl_path() else { return Ok(()) };
    let out = Command::new(systemctl)
        .arg("--root")
        .arg(root)
        .arg(verb)
        .arg("--")
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running systemctl {verb} {unit}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "systemctl --root {} {verb} {unit} failed: {}; check the unit file the stage ships",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `systemctl daemon-reload`, only on the real root with systemd running.
pub fn daemon_reload(root: &Path) {
    if root == Path::new("/")
        && Path::new("/run/systemd/system").exists()
        && let Some(systemctl) = systemctl_path()
    {
        let _ = Command::new(systemctl).arg("daemon-reload").stdin(Stdio::null()).status();
    }
}
