//! Helpers for end-to-end tests: the built binaries, temp dirs, required tools.
#![allow(dead_code)]

pub mod fleet;
pub mod registry;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub mod systemd;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A binary of the workspace, built by `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    // OP_DBUS_BIN_DIR runs the tests against other builds (e.g. to see a new test fail on
    // the code before a fix).
    let path = match std::env::var_os("OP_DBUS_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join(name)
        }
    };
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before `cargo test` (the README's test command does both)",
        path.display()
    );
    path
}

/// A tool these tests need; fails with the package to install when it is missing.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is required by this test and is not installed: run `apt-get install {package}` (the README's test command does)"
    );
}

/// Runs a command, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `op-dbus-image` command with `--store STORE`, and the key when given.
pub fn image(store: &Path, key: Option<&Path>) -> Command {
    let mut c = Command::new(bin("op-dbus-image"));
    c.arg("--store")
        .arg(store)
        .env_remove("OP_DBUS_SIGNING_KEY")
        .env_remove("OP_DBUS_STORE")
        .env("SOURCE_DATE_EPOCH", "1700000000");
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    c
}

/// Generates a signing key in `dir`, returning its path (KEY.pub beside it).
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    ok(Command::new(bin("op-dbus-image")).args(["key", "generate", "--out"]).arg(&k));
    k
}

/// sha256 of a file as `sha256sum` computes it (from outside our code).
pub fn sha256sum(path: &Path) -> String {
    let out = ok(Command::new(require_tool("sha256sum", "coreutils")).arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

/// Parses JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Copies a directory tree with `cp -a`.
pub fn copy_tree(from: &Path, to: &Path) {
    ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The exit code and stderr of a command expected to fail.
pub fn fails(cmd: &mut Command) -> (i32, String) {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded: {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

pub fn arg<S: AsRef<OsStr>>(s: S) -> std::ffi::OsString {
    s.as_ref().to_owned()
}

/// `op-dbus-stage` built with the `fault-injection` feature (aborts at OP_DBUS_FAULT_AT=N).
pub fn fault_bin() -> PathBuf {
    let path = repo().join("target/fault-injection/debug/op-dbus-stage");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p installer --features fault-injection --target-dir target/fault-injection` \
         (the README's test command does)",
        path.display()
    );
    path
}

/// Whether this process runs as root (mounts, loop devices).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Every path under `dir` with its type, mode and content or link text.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(rel, format!("link {}", std::fs::read_link(&p).unwrap().display()));
            } else if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &p, out);
            } else {
                out.insert(rel, format!("file {mode:o} {}", String::from_utf8_lossy(&std::fs::read(&p).unwrap())));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A btrfs filesystem in a loop-mounted image file, unmounted (and its loop device
/// released) on drop. Needs root, `mkfs.btrfs` (btrfs-progs) and loop devices.
pub struct LoopBtrfs {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl LoopBtrfs {
    pub fn new(mib: u64) -> LoopBtrfs {
        assert!(is_root(), "this test mounts a loop-device btrfs: run it as root (CI does)");
        let mkfs = require_tool("mkfs.btrfs", "btrfs-progs");
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        ok(Command::new(mkfs).arg("-q").arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = run(Command::new(require_tool("mount", "mount")).args(["-o", "loop"]).arg(&img).arg(&mnt));
        assert!(
            out.status.success(),
            "mounting a loop btrfs failed ({}): the kernel needs btrfs and loop devices",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopBtrfs { dir, mnt }
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.mnt).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A build machine (store + key) and a scratch host root, initialised: what most
/// end-to-end tests start from. Test files add their own methods in `impl Scratch`.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// `signing.key` made, `root/` initialised (the temp dir is 0755, so that an
    /// unprivileged verify user can reach the root).
    pub fn new() -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let s = Scratch { dir: tempfile::tempdir().unwrap() };
        std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        keygen(s.dir.path(), "signing.key");
        std::fs::create_dir_all(s.root()).unwrap();
        ok(s.stage().arg("init"));
        s
    }
    /// [`Scratch::new`], and the root trusts the key.
    pub fn trusted() -> Scratch {
        let s = Scratch::new();
        s.trust();
        s
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn root(&self) -> PathBuf {
        self.path("root")
    }
    pub fn store(&self) -> PathBuf {
        self.path("store")
    }
    pub fn key(&self) -> PathBuf {
        self.path("signing.key")
    }
    pub fn pub_key(&self) -> PathBuf {
        self.path("signing.key.pub")
    }
    /// `op-dbus-image` on the store, signing with the key.
    pub fn image(&self) -> Command {
        image(&self.store(), Some(&self.key()))
    }
    /// `op-dbus-stage --root ROOT`.
    pub fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root());
        c
    }
    pub fn trust(&self) {
        ok(self.stage().args(["trust", "add"]).arg(self.pub_key()));
    }
    /// Builds the stage folder `dir`; returns its NAME:VERSION.
    pub fn build(&self, dir: &Path) -> String {
        let out = json(&ok(self.image().args(["--json", "-q", "build"]).arg(dir)));
        out["reference"].as_str().unwrap().to_owned()
    }
    /// Exports `refs` as `name` in the scratch dir.
    pub fn export(&self, refs: &[&str], name: &str) -> PathBuf {
        let out = self.path(name);
        ok(self.image().args(["-q", "export"]).args(refs).arg("--out").arg(&out));
        out
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// A stage folder `PARENT/NAME-VERSION` with a manifest (`extra` appended to its name
/// and version) and `files` (path, content); those under `bin/` are 0755, others 0644.
pub fn stage_dir(parent: &Path, name: &str, version: &str, extra: &str, files: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join(format!("{name}-{version}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.yaml"), format!("name: {name}\nversion: {version}\n{extra}")).unwrap();
    for (p, content) in files {
        let f = dir.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, content).unwrap();
        let mode = if p.starts_with("bin/") { 0o755 } else { 0o644 };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir
}

/// The names of the stages a `list --json` document shows as deployed.
pub fn deployed_names(list: &serde_json::Value) -> Vec<String> {
    list["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["status"] == "deployed")
        .filter_map(|x| x["name"].as_str().map(str::to_owned))
        .collect()
}

/// `len` bytes that zstd cannot shrink much and that differ for each seed (xorshift, mod 251
/// so that no period of 256 lines up with blocks).
pub fn varied(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 251) as u8
        })
        .collect()
}

/// Runs `cmd` (a `deploy -`) with `archive` on its stdin, all but its last `held_back`
/// bytes first: waits until `arrived()` holds while the command still waits for the rest
/// (it fails the test, naming `what`, when the command ends first or 20 s pass), then
/// sends the rest and returns the command's output.
pub fn deploy_held_back(
    cmd: &mut Command,
    archive: &[u8],
    held_back: usize,
    what: &str,
    arrived: impl Fn() -> bool,
) -> Output {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&archive[..archive.len() - held_back]).unwrap();
    stdin.flush().unwrap();
    let started = Instant::now();
    while !arrived() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what}: the deploy ended ({st}) before the archive was whole");
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{what}: not unpacked while the archive arrived");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "{what}: still waiting for the end of the archive");
    stdin.write_all(&archive[archive.len() - held_back..]).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// The `stream-*` trees in the staging temp area `tmp` that hold a non-empty file at one
/// of `files` (relative paths).
pub fn streamed_trees(tmp: &Path, files: &[&str]) -> usize {
    std::fs::read_dir(tmp)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stream-"))
        .filter(|e| files.iter().any(|f| std::fs::metadata(e.path().join(f)).is_ok_and(|m| m.len() > 0)))
        .count()
}
