//! A real systemd for tests: PID 1 of its own PID and mount namespace, over a scratch root.
//!
//! ```text
//! setpriv --pdeathsig KILL unshare --pid --fork --mount --propagation private --kill-child sh -c BOOT
//!   ROOT/usr            the host's /usr, bind-mounted read-only; bin, sbin, lib, lib64 link into it
//!   ROOT/usr/local      ROOT/usr-local, writable (a stage's default targets are there)
//!   ROOT/op-dbus-bin    the built binaries, bind-mounted read-only
//!   ROOT/etc            passwd, group, nsswitch.conf, os-release, an empty machine-id
//!   ROOT/proc, sys, dev mounted for systemd
//!   chroot ROOT env container=op-dbus-test /lib/systemd/systemd --system --unit=op-dbus-test.target
//! ```
//!
//! `op-dbus-test.target` is empty: nothing else starts, so the manager is up in well under
//! a second. [`Systemd::enter`] runs a command inside (`nsenter -t PID -m -p -r`), where
//! the scratch root is `/` and `systemctl` talks to this manager. Dropping the value kills
//! the manager; the namespace and every mount in it go with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{bin, is_root, require_tool, run};

/// The binaries' folder inside the root.
pub const BIN_DIR: &str = "/op-dbus-bin";
/// The fault-injection build's folder inside the root ([`Systemd::boot_with_faults`]).
pub const FAULT_DIR: &str = "/op-dbus-fault";

const BOOT: &str = r#"
set -eu
R=$1 BIN=$2 FAULT=$3
mkdir -p "$R/usr" "$R/etc/systemd/system" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/tmp" "$R/var" "$R/op-dbus-bin"
if [ -n "$FAULT" ]; then
  mkdir -p "$R/op-dbus-fault"
  mount --bind "$FAULT" "$R/op-dbus-fault"
fi
mount --bind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
mkdir -p "$R/usr-local"
mount --bind "$R/usr-local" "$R/usr/local"
mount --bind "$BIN" "$R/op-dbus-bin"
mount -o remount,bind,ro "$R/op-dbus-bin"
for d in bin sbin lib lib64; do [ -e "$R/$d" ] || [ -L "$R/$d" ] || ln -s "usr/$d" "$R/$d"; done
[ -e "$R/etc/passwd" ] || echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
[ -e "$R/etc/group" ] || echo 'root:x:0:' > "$R/etc/group"
printf 'passwd: files\ngroup: files\nshadow: files\n' > "$R/etc/nsswitch.conf"
cp /usr/lib/os-release "$R/etc/os-release"
: > "$R/etc/machine-id"
printf '[Unit]\nDescription=op-dbus tests\n' > "$R/etc/systemd/system/op-dbus-test.target"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
exec chroot "$R" env container=op-dbus-test /lib/systemd/systemd --system --unit=op-dbus-test.target \
  --log-target=console --log-level=warning
"#;

/// A running systemd over `root`, stopped on drop.
pub struct Systemd {
    pub root: PathBuf,
    /// The manager's PID as the host sees it.
    pub pid: u32,
    unshare: Child,
    /// One manager at a time in this process: the managers share the host's cgroup tree
    /// (`/sys` is the host's), so two of them would create, and fight over, the same
    /// `system.slice/UNIT` cgroups (a unit then fails with 219/CGROUP).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static ONE_MANAGER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Systemd {
    /// Boots a manager over `root` (created if missing) and waits until it runs. Fails with
    /// what to install when the machine cannot.
    pub fn boot(root: &Path) -> Systemd {
        Systemd::start(root, None)
    }

    /// [`Systemd::boot`], with the fault-injection build of the installer inside too
    /// ([`Systemd::fault_stage`]).
    pub fn boot_with_faults(root: &Path) -> Systemd {
        Systemd::start(root, Some(super::fault_bin().parent().unwrap().to_owned()))
    }

    fn start(root: &Path, fault_dir: Option<PathBuf>) -> Systemd {
        assert!(is_root(), "this test runs systemd in its own namespaces: run it as root (CI does)");
        let unshare = require_tool("unshare", "util-linux");
        require_tool("nsenter", "util-linux");
        assert!(
            Path::new("/lib/systemd/systemd").is_file() && Path::new("/usr/bin/systemctl").is_file(),
            "this test needs a real systemd (it runs one as PID 1 of a namespace): apt-get install systemd"
        );
        // A test that failed while holding it poisons nothing the next one relies on.
        let one_at_a_time = ONE_MANAGER.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(root).unwrap();
        let bin_dir = bin("op-dbus-stage").parent().unwrap().to_owned();
        // setpriv --pdeathsig: should this test process die without dropping the value,
        // unshare is killed, and --kill-child takes the manager with it.
        let setpriv = require_tool("setpriv", "util-linux");
        let mut child = Command::new(setpriv)
            .args(["--pdeathsig", "KILL"])
            .arg(unshare)
            .args(["--pid", "--fork", "--mount", "--propagation", "private", "--kill-child", "sh", "-c", BOOT, "sh"])
            .arg(root)
            .arg(&bin_dir)
            .arg(fault_dir.unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running unshare");
        let deadline = Instant::now() + Duration::from_secs(20);
        // The manager is unshare's only child (its PID 1 inside).
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                let p: u32 = p.parse().unwrap();
                let exe = std::fs::read_link(format!("/proc/{p}/exe")).unwrap_or_default();
                if exe.ends_with("systemd") {
                    break p;
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("systemd did not start in its namespace ({st}): {err}");
            }
            assert!(Instant::now() < deadline, "systemd did not start within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let sd = Systemd { root: root.to_owned(), pid, unshare: child, _one_at_a_time: one_at_a_time };
        loop {
            let out = run(sd.enter("systemctl").args(["is-system-running"]));
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "systemd did not come up within 20 s (state {state:?})");
            std::thread::sleep(Duration::from_millis(50));
        }
        sd
    }

    /// `program` run inside the namespaces, with the scratch root as `/`.
    pub fn enter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-p", "-r", "-w"]).arg(program);
        c
    }

    /// `op-dbus-stage --root /` inside.
    pub fn stage(&self) -> Command {
        let mut c = self.enter(&format!("{BIN_DIR}/op-dbus-stage"));
        c.args(["--root", "/"]);
        c
    }

    /// The fault-injection build's `op-dbus-stage --root /` inside.
    pub fn fault_stage(&self) -> Command {
        let mut c = self.enter(&format!("{FAULT_DIR}/op-dbus-stage"));
        c.args(["--root", "/"]);
        c
    }

    /// `systemctl ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        run(self.enter("systemctl").args(args))
    }

    /// The first line `systemctl is-active UNIT` prints.
    pub fn is_active(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.systemctl(&["is-active", unit]).stdout).trim().to_owned()
    }

    /// The main PID of `unit` (inside the namespace), 0 when it has none.
    pub fn main_pid(&self, unit: &str) -> u32 {
        let out = self.systemctl(&["show", "-p", "MainPID", "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    /// The real uid of the process `pid` (inside the namespace).
    pub fn uid_of(&self, pid: u32) -> u32 {
        let out = run(self.enter("cat").arg(format!("/proc/{pid}/status")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text.lines().find(|l| l.starts_with("Uid:")).unwrap_or_else(|| panic!("no process {pid}: {text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to a namespace's init kills everything in it; its mounts go with it.
        let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
        let _ = self.unshare.wait();
    }
}
