//! Crash consistency (docs/README.md, guarantee 3): `deploy`, `rollback`, `remove`, `restore` and `repair` are
//! stopped at every fault point of the installer (a build with the `fault-injection`
//! feature aborts at the N-th point) and at random moments (SIGKILL after a random delay);
//! then `recover` must leave the host exactly as before or exactly as after, and
//! `verify` must pass. Also: two operations at once, and a full disk.
//!
//! `OP_DBUS_CRASH_RANDOM` sets the random kills per operation (default 40); the soak
//! script `scripts/soak-crash.sh` runs thousands.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// A build machine and a host root in one directory, copied whole for every attempt.
struct World {
    dir: PathBuf,
}

impl World {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn stage_with(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.arg("--root").arg(self.root()).arg("-q");
        c
    }
    fn stage(&self) -> Command {
        self.stage_with(&bin("op-dbus-stage"))
    }
    fn copy_to(&self, dest: &Path) -> World {
        let _ = fs::remove_dir_all(dest);
        ok(Command::new("cp").arg("-a").arg(&self.dir).arg(dest));
        World { dir: dest.to_owned() }
    }
    /// What an operator (and `list`) sees: the host outside the installer's own files,
    /// the deployed stages and their active generations.
    fn observe(&self) -> String {
        let host: Vec<String> = tree(&self.root())
            .into_iter()
            .filter(|(k, _)| !k.starts_with("var/lib/op-dbus"))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let list = json(&ok(self.stage().args(["--json", "list"])));
        let deployed: Vec<String> = list["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "deployed")
            .map(|s| format!("{} {} {}", s["name"], s["version"], s["digest"]))
            .collect();
        let staging = self.root().join("var/lib/op-dbus/staging");
        let mut links: Vec<String> = fs::read_dir(&staging)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_symlink())
            .map(|e| format!("{:?} -> {:?}", e.file_name(), fs::read_link(e.path()).unwrap()))
            .collect();
        links.sort();
        format!("{}\n--\n{}\n--\n{}", host.join("\n"), deployed.join("\n"), links.join("\n"))
    }
}

/// Builds two versions of a stage and a host with version 1 deployed and operator files
/// in the way of version 2.
fn base(dir: &Path) -> World {
    let w = World { dir: dir.join("world") };
    fs::create_dir_all(w.root().join("usr/local/bin")).unwrap();
    fs::create_dir_all(w.root().join("etc/op-dbus")).unwrap();
    fs::write(w.root().join("usr/local/bin/c"), "operator's c\n").unwrap();
    fs::write(w.root().join("etc/op-dbus/app.conf"), "operator's config\n").unwrap();
    let key = keygen(&w.dir, "k");
    let store = w.dir.join("store");
    let files = |v: u32| {
        let mut f = String::from(
            "files:\n  - path: bin/a\n    target: /usr/local/bin/a\n  - path: etc/app.conf\n    target: /etc/op-dbus/app.conf\n    type: copy-if-not-exists\n  - path: etc/defaults\n    target: /etc/op-dbus/defaults\n    type: copy\n",
        );
        if v == 1 {
            f += "  - path: bin/b\n    target: /opt/app/bin/b\n";
        } else {
            f += "  - path: bin/c\n    target: /usr/local/bin/c\n  - path: web\n    target: /var/www/app\n";
        }
        f
    };
    for v in [1, 2] {
        let dir = w.dir.join(format!("app-{v}"));
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::create_dir_all(dir.join("web")).unwrap();
        fs::write(
            dir.join("manifest.yaml"),
            format!("name: app\nversion: 1.{v}.0\n{}verify:\n  - command: test -f bin/a\n", files(v)),
        )
        .unwrap();
        fs::write(dir.join("bin/a"), format!("a{v}\n")).unwrap();
        fs::write(dir.join("bin/b"), "b\n").unwrap();
        fs::write(dir.join("bin/c"), "c\n").unwrap();
        fs::write(dir.join("etc/app.conf"), "default\n").unwrap();
        fs::write(dir.join("etc/defaults"), format!("defaults {v}\n")).unwrap();
        fs::write(dir.join("web/index.html"), format!("<p>{v}</p>\n")).unwrap();
        ok(image(&store, Some(&key)).args(["-q", "build"]).arg(&dir));
        ok(image(&store, Some(&key))
            .args(["-q", "export", &format!("app:1.{v}.0"), "--out"])
            .arg(w.dir.join(format!("app-{v}.oci.tar"))));
    }
    ok(w.stage().arg("init"));
    ok(w.stage().args(["trust", "add"]).arg(w.dir.join("k.pub")));
    ok(w.stage().arg("deploy").arg(w.dir.join("app-1.oci.tar")));
    w
}

/// The operation under test, run in world `w` with `bin`.
type Op = fn(&World, &Path) -> Command;

fn op_deploy(w: &World, bin: &Path) -> Command {
    let mut c = w.stage_with(bin);
    c.arg("deploy").arg(w.dir.join("app-2.oci.tar"));
    c
}
fn op_rollback(w: &World, bin: &Path) -> Command {
    let mut c = w.stage_with(bin);
    c.args(["rollback", "app"]);
    c
}
fn op_remove(w: &World, bin: &Path) -> Command {
    let mut c = w.stage_with(bin);
    c.args(["remove", "app"]);
    c
}
fn op_restore(w: &World, bin: &Path) -> Command {
    let snaps = json(&ok(w.stage().args(["--json", "snapshots"])));
    let first =
        snaps["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).min().unwrap();
    let mut c = w.stage_with(bin);
    c.args(["restore", &first]);
    c
}

fn op_repair(w: &World, bin: &Path) -> Command {
    let mut c = w.stage_with(bin);
    c.arg("repair");
    c
}

/// Stops `repair` of the damaged world `start` at every fault point and at random moments:
/// after `recover` the generation is as it was (damaged) or rebuilt, nothing else changed,
/// and nothing is left in the journal. Returns the points covered.
fn crash_repairing(name: &str, start: &World, scratch: &Path) -> usize {
    let generation = |w: &World| w.root().join("var/lib/op-dbus/staging/.generations/app/1");
    let before = (start.observe(), tree(&generation(start)));
    let clean = start.copy_to(&scratch.join("clean"));
    ok(&mut op_repair(&clean, &bin("op-dbus-stage")));
    ok(clean.stage().arg("verify"));
    let after = (clean.observe(), tree(&generation(&clean)));
    assert_eq!(before.0, after.0, "{name}: repair changed the host outside its generation");
    assert_ne!(before.1, after.1, "{name}: repair changed nothing");
    let check = |w: &World, what: &str| {
        let out = run(w.stage().arg("recover"));
        assert!(out.status.success(), "{name} {what}: recover failed: {}", String::from_utf8_lossy(&out.stderr));
        let seen = (w.observe(), tree(&generation(w)));
        assert!(
            seen == before || seen == after,
            "{name} {what}: the generation is neither as before nor rebuilt: {seen:#?}"
        );
        let staging = w.root().join("var/lib/op-dbus/staging");
        assert!(!staging.join("journal/tx.json").exists(), "{name} {what}: journal left behind");
        assert_eq!(fs::read_dir(staging.join("journal/stash")).unwrap().count(), 0, "{name} {what}: stash left");
        // Whatever was left, a second repair finishes the job.
        ok(&mut op_repair(w, &bin("op-dbus-stage")));
        ok(w.stage().arg("verify"));
    };
    let fault = fault_bin();
    let mut points = 0;
    for n in 1.. {
        let w = start.copy_to(&scratch.join("attempt"));
        let out = run(op_repair(&w, &fault).env("OP_DBUS_FAULT_AT", n.to_string()));
        if out.status.success() {
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "{name} at point {n}: {}", String::from_utf8_lossy(&out.stderr));
        check(&w, &format!("stopped at point {n}"));
        points += 1;
        assert!(n < 100, "{name}: more than 100 fault points?");
    }
    for i in 0..10u64 {
        let w = start.copy_to(&scratch.join("attempt"));
        let mut child =
            op_repair(&w, &bin("op-dbus-stage")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(5 + 7 * i));
        let _ = child.kill();
        let _ = child.wait();
        check(&w, &format!("killed (run {i})"));
    }
    points + 10
}

#[test]
fn crash_while_repairing_leaves_the_generation_as_it_was_or_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let v1 = base(d.path());
    let generation = v1.root().join("var/lib/op-dbus/staging/.generations/app/1");
    // Damaged: a staged file edited (set aside, then replaced).
    let damaged = v1.copy_to(&d.path().join("damaged"));
    fs::write(damaged.root().join("var/lib/op-dbus/staging/.generations/app/1/bin/a"), "tampered\n").unwrap();
    let mut total = crash_repairing("repair of a damaged generation", &damaged, d.path());
    // Missing: deleted through the stage link (put back).
    fs::remove_dir_all(&generation).unwrap();
    total += crash_repairing("repair of a missing generation", &v1, d.path());
    eprintln!("crash consistency of repair: {total} interruptions checked");
    assert!(total >= 20, "only {total} interruptions");
}

/// Stops `op` at every fault point and at random moments; returns the points covered.
fn crash_everywhere(name: &str, start: &World, op: Op, scratch: &Path) -> usize {
    let before = start.observe();
    let clean = start.copy_to(&scratch.join("clean"));
    let t = Instant::now();
    ok(&mut op(&clean, &bin("op-dbus-stage")));
    let took = t.elapsed();
    let after = clean.observe();
    assert_ne!(before, after, "{name}: the operation changed nothing");
    let check = |w: &World, what: &str| {
        let out = run(w.stage().arg("recover"));
        assert!(out.status.success(), "{name} {what}: recover failed: {}", String::from_utf8_lossy(&out.stderr));
        let seen = w.observe();
        assert!(
            seen == before || seen == after,
            "{name} {what}: the host is neither as before nor as after:\n{seen}\n\nbefore:\n{before}\n\nafter:\n{after}"
        );
        let v = run(w.stage().arg("verify"));
        assert!(
            v.status.success(),
            "{name} {what}: verify failed after recovery: {}",
            String::from_utf8_lossy(&v.stdout)
        );
        assert!(
            !w.root().join("var/lib/op-dbus/staging/journal/tx.json").exists(),
            "{name} {what}: journal left behind"
        );
    };
    let fault = fault_bin();
    let mut points = 0;
    for n in 1.. {
        let w = start.copy_to(&scratch.join("attempt"));
        let out = run(op(&w, &fault).env("OP_DBUS_FAULT_AT", n.to_string()));
        if out.status.success() {
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{name} at point {n}: expected the fault abort, got {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        check(&w, &format!("stopped at point {n}"));
        points += 1;
        assert!(n < 500, "{name}: more than 500 fault points?");
    }
    let randoms: u64 = std::env::var("OP_DBUS_CRASH_RANDOM").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ name.len() as u64;
    let span = took.as_micros().max(1000) as u64;
    for i in 0..randoms {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_micros((seed >> 33) % span);
        let w = start.copy_to(&scratch.join("attempt"));
        let mut child = op(&w, &bin("op-dbus-stage")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        check(&w, &format!("killed after {delay:?} (run {i})"));
    }
    points + randoms as usize
}

#[test]
fn crash_at_every_point_leaves_the_host_old_or_new() {
    let d = tempfile::tempdir().unwrap();
    let v1 = base(d.path());
    let mut total = 0;
    total += crash_everywhere("deploy", &v1, op_deploy, d.path());
    let v2 = v1.copy_to(&d.path().join("v2"));
    ok(&mut op_deploy(&v2, &bin("op-dbus-stage")));
    total += crash_everywhere("rollback", &v2, op_rollback, d.path());
    total += crash_everywhere("restore", &v2, op_restore, d.path());
    total += crash_everywhere("remove", &v1, op_remove, d.path());
    // On its first generation, rollback removes the stage.
    total += crash_everywhere("rollback of a first generation", &v1, op_rollback, d.path());
    eprintln!("crash consistency: {total} interruptions checked");
    assert!(total >= 60, "only {total} interruptions");
}

#[test]
fn a_second_operation_waits_then_exits_6() {
    let d = tempfile::tempdir().unwrap();
    let w = base(d.path());
    // A deploy whose verify command takes a while holds the lock.
    let store = w.dir.join("store");
    let slow = w.dir.join("slow");
    fs::create_dir_all(slow.join("bin")).unwrap();
    fs::write(slow.join("manifest.yaml"), "name: slow\nversion: 1.0.0\nverify:\n  - command: sleep 3\n").unwrap();
    fs::write(slow.join("bin/x"), "x\n").unwrap();
    ok(image(&store, Some(&w.dir.join("k"))).args(["-q", "build"]).arg(&slow));
    ok(image(&store, Some(&w.dir.join("k")))
        .args(["-q", "export", "slow:1.0.0", "--out"])
        .arg(w.dir.join("slow.oci.tar")));
    let first = w
        .stage()
        .arg("deploy")
        .arg(w.dir.join("slow.oci.tar"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let t = Instant::now();
    let (code, err) = fails(w.stage().args(["--lock-timeout", "1", "remove", "app"]));
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("--lock-timeout") && t.elapsed() >= Duration::from_millis(900), "{err}");
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With a long enough timeout the second one waits and then runs.
    ok(w.stage().args(["remove", "slow"]));
    ok(w.stage().arg("verify"));
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_root_needs_root_to_mount_tmpfs() {
    assert!(is_root(), "this test mounts a small tmpfs as the host root: run it as root (CI does)");
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let key = keygen(d.path(), "k");
    let big = d.path().join("big");
    fs::create_dir_all(big.join("data")).unwrap();
    fs::write(big.join("manifest.yaml"), "name: big\nversion: 1.0.0\nfiles:\n  - path: data\n    target: /opt/big\n")
        .unwrap();
    // Incompressible content, so the payload itself is large.
    let mut x: u64 = 1;
    let bytes: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(big.join("data/blob"), &bytes[..3 << 20]).unwrap();
    fs::write(big.join("data/blob2"), &bytes[3 << 20..]).unwrap();
    ok(image(&store, Some(&key)).args(["-q", "build"]).arg(&big));
    let export = d.path().join("big.oci.tar");
    ok(image(&store, Some(&key)).args(["-q", "export", "big:1.0.0", "--out"]).arg(&export));

    let root = d.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let st = Command::new(require_tool("mount", "mount"))
        .args(["-t", "tmpfs", "-o", "size=9m", "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs failed");
    let _m = Mount(root.clone());
    let stage = || {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(&root).arg("-q");
        c
    };
    ok(stage().arg("init"));
    ok(stage().args(["trust", "add"]).arg(d.path().join("k.pub")));
    let before = tree(&root);
    let (code, err) = fails(stage().arg("deploy").arg(&export));
    assert_ne!(code, 0);
    assert!(err.contains("No space left") || err.contains("full"), "{err}");
    assert!(err.contains("free"), "the error should say what to do: {err}");
    assert_eq!(tree(&root), before, "a deploy that ran out of space left files behind");
}
