//! Stalled sources and progress: a source that stops sending mid-blob is abandoned after
//! `--stall-timeout` (nothing activated, the lock released, exit 1 naming the stall), and
//! `--progress=json` prints one JSON event per line on stderr.

mod util;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// 2 MiB of hex text from `seed` (compresses to about half).
fn hex_noise(seed: u64) -> String {
    let mut x = seed;
    let mut text = String::with_capacity(2 << 20);
    while text.len() < 2 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:016x}"));
    }
    text
}

/// An archive of `app` with a 2 MiB payload (so that half of it ends inside the layer).
fn big_app(s: &Scratch) -> std::path::PathBuf {
    let payload = hex_noise(0x2545_F491_4F6C_DD1D);
    let extra = "files:\n  - path: bin/app\n    target: /usr/local/bin/app\nverify:\n  - command: test -f bin/app\n";
    let d = stage_dir(&s.path("src"), "app", "1.0.0", extra, &[("bin/app", &payload)]);
    let r = s.build(&d);
    s.export(&[&r], "app.oci.tar")
}

/// `op-dbus-stage --root ROOT`.
fn stage_at(root: &std::path::Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root);
    c
}

/// Half an export on stdin, then silence: the deploy ends within the stall timeout plus
/// 5 s, exit 1 naming the stall; a second command then gets the lock; nothing is stored or
/// activated.
fn stops_mid_blob(root: &std::path::Path) {
    let s = Scratch::new();
    std::fs::create_dir_all(root).unwrap();
    ok(stage_at(root).args(["-q", "init"]));
    ok(stage_at(root).args(["-q", "trust", "add"]).arg(s.pub_key()));
    let archive = std::fs::read(big_app(&s)).unwrap();
    let stall = 2;
    let mut child = stage_at(root)
        .args(["--stall-timeout", &stall.to_string(), "deploy", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Half the export, then silence with the pipe held open (a writer that went to sleep).
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&archive[..archive.len() / 2]).unwrap();
    stdin.flush().unwrap();
    let silent_since = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if silent_since.elapsed() > Duration::from_secs(stall + 5) {
            let _ = child.kill();
            panic!("the deploy still waits {} s after its source went silent", stall + 5);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = silent_since.elapsed();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(took >= Duration::from_secs(stall - 1), "gave up after {took:?}, before the stall timeout");
    assert!(err.contains("stdin stalled") && err.contains("--stall-timeout"), "{err}");
    // A second command gets the lock at once, and nothing was activated or stored.
    ok(stage_at(root).args(["--lock-timeout", "1", "-q", "gc"]));
    let list = json(&ok(stage_at(root).args(["--json", "list"])));
    assert!(deployed_names(&list).is_empty(), "{list}");
    assert!(list["stages"].as_array().unwrap().is_empty(), "nothing stored either: {list}");
    assert!(!root.join("usr/local/bin/app").exists());
    assert_eq!(
        std::fs::read_dir(root.join("var/lib/op-dbus/staging/.tmp")).unwrap().count(),
        0,
        "nothing left in the temp area"
    );
    drop(stdin);
}

#[test]
fn a_source_that_stops_mid_blob_is_abandoned_and_the_lock_freed() {
    let d = tempfile::tempdir().unwrap();
    stops_mid_blob(&d.path().join("root"));
}

#[test]
fn a_source_that_stops_mid_blob_on_a_loop_btrfs_root_needs_root() {
    let fs_ = LoopBtrfs::new(512);
    stops_mid_blob(&fs_.mnt.join("root"));
}

#[test]
fn a_slow_source_that_keeps_sending_is_not_a_stall() {
    let s = Scratch::trusted();
    let archive = std::fs::read(big_app(&s)).unwrap();
    let mut child = s
        .stage()
        .args(["--stall-timeout", "1", "-q", "deploy", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Longer in total than the stall timeout, never silent for as long.
    let chunks: Vec<&[u8]> = archive.chunks(archive.len() / 6 + 1).collect();
    for c in chunks {
        stdin.write_all(c).unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deployed_names(&json(&ok(s.stage().args(["--json", "list"])))), ["app"]);
}

#[test]
fn progress_json_is_one_event_per_line_for_each_phase() {
    let s = Scratch::trusted();
    let archive = big_app(&s);
    let out = Command::new(bin("op-dbus-stage"))
        .arg("--root")
        .arg(s.root())
        .args(["--progress=json", "--json", "deploy", "-"])
        .stdin(std::fs::File::open(&archive).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    json(&String::from_utf8(out.stdout).unwrap());
    let err = String::from_utf8(out.stderr).unwrap();
    let events: Vec<serde_json::Value> = err.lines().map(json).collect();
    assert!(!events.is_empty());
    let mut phases = Vec::new();
    for e in &events {
        assert_eq!(e["event"], "progress", "{e}");
        assert!(e["elapsed_ms"].is_u64(), "{e}");
        let p = e["phase"].as_str().unwrap().to_owned();
        if phases.last() != Some(&p) {
            phases.push(p);
        }
    }
    for want in ["receive", "verify", "unpack", "activate", "check"] {
        assert!(phases.iter().any(|p| p == want), "no {want} event: {phases:?}");
    }
    let received = events.iter().rfind(|e| e["phase"] == "receive").unwrap();
    assert_eq!(received["bytes"].as_u64().unwrap(), std::fs::metadata(&archive).unwrap().len(), "{received}");
    assert_eq!(received["step"], "received");
    assert!(received["rate"].is_u64());
    assert!(events.iter().any(|e| e["phase"] == "verify" && e["stage"] == "app:1.0.0"), "{err}");
    // Without --progress=json, and stderr not a terminal: no progress at all.
    let out = Command::new(bin("op-dbus-stage"))
        .arg("--root")
        .arg(s.root())
        .args(["rollback", "app"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("\"progress\""));
}

/// On a terminal (a pty made by `script`), deploy shows a progress line with the phase and
/// the bytes received; the archive arrives in two parts a second apart, so that the line is
/// drawn while the command waits.
#[test]
fn a_terminal_shows_the_progress_line() {
    let script = require_tool("script", "bsdutils");
    let s = Scratch::trusted();
    let archive = big_app(&s);
    let cmd = format!(
        "{{ head -c 1000000 '{a}'; sleep 1; tail -c +1000001 '{a}'; }} | '{bin}' --root '{root}' deploy -",
        a = archive.display(),
        bin = bin("op-dbus-stage").display(),
        root = s.root().display()
    );
    let out = Command::new(script).args(["-q", "-e", "-c", &cmd, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("receive") && text.contains("KiB"), "no progress line: {text}");
    assert!(!text.contains("\"event\""), "JSON events only when asked for: {text}");
    assert_eq!(deployed_names(&json(&ok(s.stage().args(["--json", "list"])))), ["app"]);
}

/// One read of the payload: a deploy unpacks the layer while the archive arrives on
/// stdin. With the end of the archive held back, the image's file is already being
/// written in the staging temp area (before the change, the layer was stored whole and
/// only then read again to unpack it); once the rest arrives the deploy succeeds and
/// leaves nothing in the temp area.
#[test]
fn a_deploy_unpacks_the_layer_while_the_archive_arrives() {
    let s = Scratch::trusted();
    let archive = std::fs::read(big_app(&s)).unwrap();
    let tmp = s.root().join("var/lib/op-dbus/staging/.tmp");
    let out = deploy_held_back(
        s.stage().args(["--stall-timeout", "30", "-q", "deploy", "-"]),
        &archive,
        64 << 10,
        "app",
        || streamed_trees(&tmp, &["bin/app"]) == 1,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deployed_names(&json(&ok(s.stage().args(["--json", "list"])))), ["app"]);
    ok(s.stage().args(["-q", "verify"]));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "nothing left in the temp area");
}

/// The images of an archive of several are unpacked side by side while the archive
/// arrives: with its end held back, both images' trees are in the staging temp area with
/// their files (before, an archive of several images was stored whole, then unpacked).
#[test]
fn a_deploy_unpacks_every_image_of_an_archive_while_it_arrives() {
    let s = Scratch::trusted();
    let (a, b) = (hex_noise(3), hex_noise(5));
    let app = stage_dir(&s.path("src"), "app", "1.0.0", "", &[("bin/app", a.as_str())]);
    let tool = stage_dir(&s.path("src"), "tool", "1.0.0", "", &[("bin/tool", b.as_str())]);
    let (ra, rb) = (s.build(&app), s.build(&tool));
    let archive = std::fs::read(s.export(&[&ra, &rb], "both.oci.tar")).unwrap();
    let tmp = s.root().join("var/lib/op-dbus/staging/.tmp");
    let out = deploy_held_back(
        s.stage().args(["--stall-timeout", "30", "-q", "deploy", "-"]),
        &archive,
        64 << 10,
        "app and tool",
        || streamed_trees(&tmp, &["bin/app", "bin/tool"]) == 2,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deployed_names(&json(&ok(s.stage().args(["--json", "list"])))), ["app", "tool"]);
    ok(s.stage().args(["-q", "verify"]));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "nothing left in the temp area");
}
