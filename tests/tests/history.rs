//! The audit trail: every change is an entry of /var/lib/op-dbus/history/history.log
//! (who signed, what changed, which snapshots, outcome); `history --verify` finds an
//! edited byte or a cut log and names the entry. On a plain root and on a btrfs root.

mod util;

use std::fs;
use std::path::Path;
use std::process::Command;

use util::*;

fn stage_at(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root);
    c
}

fn app(s: &Scratch, version: &str, verify: &str) -> std::path::PathBuf {
    let extra = format!("files:\n  - path: bin/app\n    target: /usr/local/bin/app\nverify:\n  - command: {verify}\n");
    let d = stage_dir(&s.path("src"), "app", version, &extra, &[("bin/app", version)]);
    let r = s.build(&d);
    s.export(&[&r], &format!("app-{version}.oci.tar"))
}

fn history_of(root: &Path) {
    let s = Scratch::new();
    fs::create_dir_all(root).unwrap();
    ok(stage_at(root).args(["-q", "init"]));
    let empty = json(&ok(stage_at(root).args(["--json", "history"])));
    assert_eq!(empty["entries"], serde_json::json!([]));
    ok(stage_at(root).args(["-q", "trust", "add"]).arg(s.pub_key()));
    let key_id =
        json(&ok(stage_at(root).args(["--json", "trust", "list"])))["keys"][0]["key_id"].as_str().unwrap().to_owned();

    ok(stage_at(root).args(["-q", "deploy"]).arg(app(&s, "1.0.0", "test -f bin/app")));
    ok(stage_at(root).args(["-q", "deploy"]).arg(app(&s, "1.1.0", "test -f bin/app")));
    let (code, err) = fails(stage_at(root).args(["-q", "deploy"]).arg(app(&s, "1.2.0", "'false'")));
    assert_eq!(code, 5, "{err}");
    ok(stage_at(root).args(["-q", "rollback", "app"]));

    let h = json(&ok(stage_at(root).args(["--json", "history"])));
    let all = h["entries"].as_array().unwrap();
    assert_eq!(all.len(), 5, "{h}");
    assert_eq!(all.iter().map(|x| x["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(all[0]["operation"], format!("trust add {key_id}"), "a trust change is recorded too");
    assert_eq!(all[0]["changes"], serde_json::json!([]));
    let e = &all[1..];
    assert_eq!(e[0]["outcome"], "committed");
    assert_eq!(e[0]["operation"], "deploy app:1.0.0");
    assert_eq!(e[0]["changes"][0]["stage"], "app");
    assert!(e[0]["changes"][0]["from"].is_null(), "{h}");
    assert_eq!(e[0]["changes"][0]["to"]["version"], "1.0.0");
    assert_eq!(e[0]["changes"][0]["to"]["signers"], serde_json::json!([key_id]));
    assert_eq!(e[0]["snapshots"].as_array().unwrap().len(), 2, "a pre- and a post-snapshot: {h}");
    assert_eq!(e[1]["changes"][0]["from"]["version"], "1.0.0");
    assert_eq!(e[2]["outcome"], "rolled-back");
    assert!(e[2]["error"].as_str().unwrap().contains("false"), "{h}");
    assert_eq!(e[3]["operation"], "rollback app");
    assert_eq!(e[3]["changes"][0]["to"]["version"], "1.0.0");
    let text = ok(stage_at(root).arg("history"));
    assert!(text.contains("deploy app:1.1.0") && text.contains("rolled-back"), "{text}");
    assert!(text.contains(&key_id), "who signed is shown: {text}");

    let ok_doc = json(&ok(stage_at(root).args(["--json", "history", "--verify"])));
    assert_eq!((ok_doc["ok"].clone(), ok_doc["entries"].clone()), (serde_json::json!(true), serde_json::json!(5)));

    // One byte of the third entry edited ("1.1.0" -> "1.1.1" in its operation).
    let log = root.join("var/lib/op-dbus/history/history.log");
    let orig = fs::read(&log).unwrap();
    let at = find(&orig, b"deploy app:1.1.0").unwrap() + "deploy app:1.1.".len();
    assert_eq!(orig[..at].iter().filter(|&&b| b == b'\n').count(), 2, "on the third line");
    let mut edited = orig.clone();
    edited[at] = b'1';
    fs::write(&log, &edited).unwrap();
    let out = run(stage_at(root).args(["--json", "history", "--verify"]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["line"], 3, "{doc}");
    assert!(doc["problem"].as_str().unwrap().contains("edited"), "{doc}");
    let out = run(stage_at(root).args(["history", "--verify"]));
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("entry 3"), "{text}");

    // The last entry cut off: the head still names it.
    let last = orig[..orig.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    fs::write(&log, &orig[..last]).unwrap();
    let out = run(stage_at(root).args(["--json", "history", "--verify"]));
    assert_eq!(out.status.code(), Some(5));
    let doc = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(doc["line"], 5, "{doc}");
    assert!(doc["problem"].as_str().unwrap().contains("truncated"), "{doc}");
    // A later change does not hide the cut.
    ok(stage_at(root).args(["-q", "gc"]));
    assert_eq!(run(stage_at(root).args(["history", "--verify"])).status.code(), Some(5));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn history_records_changes_and_verify_finds_an_edit_and_a_cut() {
    let d = tempfile::tempdir().unwrap();
    history_of(&d.path().join("root"));
}

#[test]
fn history_on_a_loop_btrfs_root_needs_root() {
    let fs_ = LoopBtrfs::new(512);
    history_of(&fs_.mnt.join("root"));
}

/// Stopped at every fault point of a deploy (the fault-injection build), then recovered:
/// the log verifies, and it records the deploy as committed exactly when the host has it
/// (by the deploy itself, or by the recovery that finished it), else as rolled back or not
/// at all.
#[test]
fn every_crash_of_a_deploy_leaves_a_log_that_verifies_and_tells_the_truth() {
    let s = Scratch::trusted();
    let archive = app(&s, "1.0.0", "test -f bin/app");
    let fault = fault_bin();
    let pristine = s.path("pristine");
    copy_tree(&s.root(), &pristine);
    let mut points = 0;
    for n in 1.. {
        let root = s.path("attempt");
        let _ = fs::remove_dir_all(&root);
        copy_tree(&pristine, &root);
        let out = run(Command::new(&fault)
            .arg("--root")
            .arg(&root)
            .args(["-q", "deploy"])
            .arg(&archive)
            .env("OP_DBUS_FAULT_AT", n.to_string()));
        let finished = out.status.success();
        ok(stage_at(&root).args(["-q", "recover"]));
        let v = run(stage_at(&root).args(["--json", "history", "--verify"]));
        assert_eq!(v.status.code(), Some(0), "point {n}: {}", String::from_utf8_lossy(&v.stdout));
        let deployed = deployed_names(&json(&ok(stage_at(&root).args(["--json", "list"])))) == ["app"];
        let h = json(&ok(stage_at(&root).args(["--json", "history"])));
        let committed: Vec<&serde_json::Value> = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["operation"].as_str().unwrap().ends_with("deploy app:1.0.0") && e["outcome"] == "committed")
            .collect();
        assert_eq!(committed.len(), usize::from(deployed), "point {n} (deployed: {deployed}): {h}");
        if finished {
            break;
        }
        points += 1;
        assert!(n < 500);
    }
    assert!(points > 5, "only {points} fault points");
}
