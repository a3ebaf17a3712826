//! Snapshot retention (stage.toml `[snapshots] keep`): upgrading one stage many times
//! keeps the staging area and the store bounded, on a plain root and on a loop-mounted
//! btrfs root; `snapshots` shows what each snapshot holds alone; `snapshots prune`, `gc`,
//! `snapshots keep` and `deploy --keep` follow the same policy.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// A stage of four 64 KiB files whose content differs per version (no two generations
/// share a byte), built and exported by the scratch's builder.
fn version_dir(parent: &Path, n: u32) -> PathBuf {
    let version = format!("1.0.{n}");
    let d = parent.join(format!("app-{version}"));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.join("data")).unwrap();
    fs::write(
        d.join("manifest.yaml"),
        format!(
            "name: app\nversion: {version}\nfiles:\n  - path: data/f0\n    target: /opt/app/f0\nverify:\n  - command: test -f data/f0\n"
        ),
    )
    .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(n).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    for f in 0..4 {
        let mut bytes = Vec::with_capacity(64 << 10);
        while bytes.len() < 64 << 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        fs::write(d.join(format!("data/f{f}")), bytes).unwrap();
    }
    d
}

/// Bytes of regular files (and link texts) below `dir`, links not followed: what the
/// staging area holds, every btrfs snapshot's copy counted in full.
fn bytes_below(dir: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(dir) else { return 0 };
    if !m.is_dir() {
        return m.len();
    }
    fs::read_dir(dir).unwrap().map(|e| bytes_below(&e.unwrap().path())).sum()
}

fn stage_at(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root).arg("-q");
    c
}

/// Builds and exports 50 versions, deploys them one after the other with the default
/// policy, and checks after each that the staging area stays under (kept snapshots + 1)
/// x the stage's size, and the store under (kept snapshots + 1) x one image.
fn fifty_upgrades(root: &Path) {
    let s = Scratch::new();
    fs::create_dir_all(root).unwrap();
    ok(stage_at(root).arg("init"));
    ok(stage_at(root).args(["trust", "add"]).arg(s.pub_key()));
    let staging = root.join("var/lib/op-dbus/staging");
    let store = root.join("var/lib/op-dbus/deployment/images");
    // Build every version into the builder's store first (one process per build), then
    // export each (one process per export).
    let archives: Vec<PathBuf> = (1..=50)
        .map(|n| {
            let r = s.build(&version_dir(&s.path("src"), n));
            s.export(&[&r], &format!("app-{n}.oci.tar"))
        })
        .collect();
    let image_size = fs::metadata(&archives[0]).unwrap().len();
    let mut most = (0u64, 0usize);
    for (i, a) in archives.iter().enumerate() {
        ok(stage_at(root).arg("deploy").arg(a));
        let active = fs::canonicalize(staging.join("app")).unwrap();
        let stage_size = bytes_below(&active);
        let kept = fs::read_dir(staging.join("snapshots"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".json"))
            .count() as u64;
        // The default policy: the 10 newest and the running set's pre-snapshot at most.
        assert!(kept <= 11, "after upgrade {}: {kept} snapshots kept", i + 1);
        let used = bytes_below(&staging);
        assert!(
            used < (kept + 1) * stage_size,
            "after upgrade {}: the staging area holds {used} bytes, more than ({kept} kept snapshots + 1) x {stage_size}",
            i + 1
        );
        let stored = bytes_below(&store);
        assert!(
            stored < (kept + 1) * image_size,
            "after upgrade {}: the store holds {stored} bytes, more than ({kept} kept snapshots + 1) x {image_size}",
            i + 1
        );
        if used > most.0 {
            most = (used, kept as usize);
        }
    }
    // The default policy keeps the 10 newest snapshots (and the running set's pre-snapshot,
    // one of them).
    let snaps = json(&ok(stage_at(root).args(["--json", "snapshots"])));
    let list = snaps["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 10, "{snaps}");
    assert!(list.last().unwrap()["name"].as_str().unwrap().starts_with("post-app-"), "{snaps}");
    // The oldest kept snapshot names a generation no other one does: pruning it frees that.
    assert!(list[0]["exclusive_bytes"].as_u64().unwrap() > 0, "{snaps}");
    assert_eq!(list.last().unwrap()["exclusive_bytes"], 0, "the newest holds the running generation: {snaps}");
    // Every kept snapshot can still be restored: its generations are on disk and its
    // image in the store (restore re-checks the signatures from there).
    let oldest = list[0]["name"].as_str().unwrap();
    ok(stage_at(root).args(["restore", "--yes", oldest]));
    ok(stage_at(root).arg("verify"));
    eprintln!("most the staging area held: {} bytes with {} snapshots kept", most.0, most.1);
}

#[test]
fn fifty_upgrades_stay_bounded_on_a_plain_root() {
    let d = tempfile::tempdir().unwrap();
    fifty_upgrades(&d.path().join("root"));
}

#[test]
fn fifty_upgrades_stay_bounded_on_a_loop_btrfs_root_needs_root() {
    let fs_ = LoopBtrfs::new(512);
    fifty_upgrades(&fs_.mnt.join("root"));
}

/// A scratch with `app` deployed at versions 1..=n, one deploy each.
fn deployed(n: u32, policy: &str) -> Scratch {
    let s = Scratch::trusted();
    fs::write(s.root().join("etc/op-dbus/stage.toml"), policy).unwrap();
    for v in 1..=n {
        let r = s.build(&version_dir(&s.path("src"), v));
        let a = s.export(&[&r], &format!("app-{v}.oci.tar"));
        ok(s.stage().arg("-q").arg("deploy").arg(a));
    }
    s
}

fn snapshot_names(s: &Scratch) -> Vec<String> {
    let snaps = json(&ok(s.stage().args(["--json", "snapshots"])));
    snaps["snapshots"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn keep_marks_survive_pruning_and_prune_applies_a_lowered_limit() {
    let s = deployed(2, "[snapshots]\nkeep = 4\n");
    let first = snapshot_names(&s);
    assert_eq!(first.len(), 4);
    // Mark the oldest (the pre-snapshot of the first deploy: an empty host).
    ok(s.stage().args(["snapshots", "keep", &first[0]]));
    let listed = json(&ok(s.stage().args(["--json", "snapshots"])));
    assert_eq!(listed["snapshots"][0]["keep"], true, "{listed}");
    // A third deploy with --keep marks its own snapshots; its dry run says what the prune
    // after it would delete (keep = 4 of 6, the marked oldest stays).
    let r = s.build(&version_dir(&s.path("src"), 3));
    let a = s.export(&[&r], "app-3.oci.tar");
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "deploy", "--keep"]).arg(&a)));
    assert_eq!(dry["deployed"][0]["pruned"], serde_json::json!([first[1]]), "{dry}");
    assert_eq!(snapshot_names(&s), first, "a dry run prunes nothing");
    let out = json(&ok(s.stage().args(["--json", "deploy", "--keep"]).arg(&a)));
    let taken: Vec<String> =
        out["deployed"][0]["snapshots"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect();
    // keep = 4 of 6: the two oldest after the marked one went.
    let names = snapshot_names(&s);
    assert!(names.contains(&first[0]), "{names:?}");
    assert!(!names.contains(&first[1]), "{names:?}");
    let pruned = out["deployed"][0]["pruned"].as_array().unwrap();
    assert!(pruned.iter().any(|p| p == first[1].as_str()), "{out}");

    // Lower the limit: a dry run says what would go, the real run removes it; the marked
    // ones and the running set's pre-snapshot stay.
    fs::write(s.root().join("etc/op-dbus/stage.toml"), "[snapshots]\nkeep = 0\n").unwrap();
    // An image received and never deployed (newer than any deployed) is not pruned.
    let r9 = s.build(&version_dir(&s.path("src"), 9));
    ok(s.stage().args(["-q", "receive"]).arg(s.export(&[&r9], "app-9.oci.tar")));
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "snapshots", "prune"])));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(snapshot_names(&s), names, "a dry run prunes nothing");
    let done = json(&ok(s.stage().args(["--json", "snapshots", "prune"])));
    assert_eq!(done["snapshots"], dry["snapshots"], "{done}");
    let left = snapshot_names(&s);
    let mut want: Vec<String> = vec![first[0].clone()];
    want.extend(taken.iter().cloned());
    want.sort();
    let mut got = left.clone();
    got.sort();
    assert_eq!(got, want, "the marked ones (pre-app of this deploy is also the running pre)");
    let list = json(&ok(s.stage().args(["--json", "list"])));
    assert!(
        list["stages"].as_array().unwrap().iter().any(|x| x["version"] == "1.0.9" && x["status"] == "available"),
        "{list}"
    );
    // Released, the first one goes at the next prune (here: `gc`).
    ok(s.stage().args(["snapshots", "release", &first[0]]));
    let gc = json(&ok(s.stage().args(["--json", "gc"])));
    assert!(gc["pruned"].as_array().unwrap().iter().any(|p| p == first[0].as_str()), "{gc}");
    assert!(!snapshot_names(&s).contains(&first[0]));
    // Generations 1 and 2 are gone from disk; the active one and what the state keeps stay.
    ok(s.stage().arg("verify"));
    let (code, err) = fails(s.stage().args(["snapshots", "keep", "no-such-snapshot"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_bad_policy_value_is_refused_with_its_line() {
    let s = Scratch::trusted();
    fs::write(s.root().join("etc/op-dbus/stage.toml"), "[snapshots]\nkeep = -3\n").unwrap();
    let (code, err) = fails(s.stage().args(["snapshots", "prune"]));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("snapshots.keep") && err.contains(":2"), "{err}");
}
