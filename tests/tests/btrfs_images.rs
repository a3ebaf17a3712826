//! btrfs send-stream images end to end (a loop-mounted btrfs; needs root): full and
//! incremental images build, deploy, verify and roll back on a btrfs root and on a plain
//! directory root; a thin export deploys where the parent is and is refused elsewhere.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

fn stage_cmd(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root).arg("-q");
    c
}

fn root_with_trust(root: &Path, key_pub: &Path) {
    fs::create_dir_all(root).unwrap();
    ok(stage_cmd(root).arg("init"));
    ok(stage_cmd(root).args(["trust", "add"]).arg(key_pub));
}

fn layer_sizes(store: &Path, reference: &str) -> Vec<u64> {
    let i = json(&ok(image(store, None).args(["--json", "inspect", reference])));
    i["layers"].as_array().unwrap().iter().map(|l| l["size"].as_u64().unwrap()).collect()
}

#[test]
fn btrfs_loop_root_full_and_incremental_images() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let key_pub = m.join("k.pub");
    let store = m.join("store");
    // A stage with a 8 MiB file of varied bytes and some small files.
    let stage = m.join("src/app");
    fs::create_dir_all(stage.join("bin")).unwrap();
    fs::create_dir_all(stage.join("share/old")).unwrap();
    let mut x: u64 = 7;
    let big: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 251) as u8
        })
        .collect();
    fs::write(stage.join("share/data.bin"), &big).unwrap();
    fs::write(stage.join("bin/app"), "#!/bin/sh\necho 1\n").unwrap();
    fs::write(stage.join("share/old/gone.txt"), "bye\n").unwrap();
    let manifest = |v: &str| {
        format!(
            "name: app\nversion: {v}\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n  - path: share\n    target: /opt/app/share\nverify:\n  - command: test -f share/data.bin\n"
        )
    };
    fs::write(stage.join("manifest.yaml"), manifest("1.0.0")).unwrap();
    let built = json(&ok(image(&store, Some(&key)).args(["--json", "-q", "build"]).arg(&stage)));
    assert_eq!(built["reference"], "app:1.0.0");
    let full = layer_sizes(&store, "app:1.0.0");
    // 1% change: 80 KiB of the big file rewritten, one file gone, one added, one changed.
    let mut big2 = big.clone();
    for b in &mut big2[1 << 20..(1 << 20) + 80 * 1024] {
        *b = b.wrapping_add(1);
    }
    fs::write(stage.join("share/data.bin"), &big2).unwrap();
    fs::remove_dir_all(stage.join("share/old")).unwrap();
    fs::write(stage.join("share/new.txt"), "new\n").unwrap();
    fs::write(stage.join("bin/app"), "#!/bin/sh\necho 2\n").unwrap();
    fs::write(stage.join("manifest.yaml"), manifest("1.1.0")).unwrap();
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&stage));
    let incr = layer_sizes(&store, "app:1.1.0");
    assert_eq!(incr.len(), 2);
    assert_eq!(incr[0], full[0], "the incremental image shares its parent's layer");
    eprintln!(
        "btrfs layers: full {} bytes, incremental for a 1% change {} bytes ({:.1}%)",
        full[0],
        incr[1],
        100.0 * incr[1] as f64 / full[0] as f64
    );
    assert!(incr[1] * 10 < full[0], "the incremental layer is not small: {} vs {}", incr[1], full[0]);
    let inspected = json(&ok(image(&store, None).args(["--json", "inspect", "app:1.1.0"])));
    let l = &inspected["layers"][1];
    assert_eq!(l["mediaType"], "application/vnd.op-dbus.stage.payload.v1.btrfs-send+zstd");
    assert_eq!(l["annotations"]["dev.op-dbus.stage/parent"], "app:1.0.0");
    assert!(l["annotations"]["dev.op-dbus.stage/btrfs-parent-uuid"].as_str().unwrap().len() == 36);

    let export = |refs: &[&str], name: &str, since: Option<&str>| -> PathBuf {
        let out = m.join(name);
        let mut c = image(&store, Some(&key));
        c.args(["-q", "export"]).args(refs).arg("--out").arg(&out);
        if let Some(s) = since {
            c.args(["--since", s]);
        }
        ok(&mut c);
        out
    };
    let v1 = export(&["app:1.0.0"], "v1.oci.tar", None);
    let v2 = export(&["app:1.1.0"], "v2.oci.tar", None);
    let v2_thin = export(&["app:1.1.0"], "v2-thin.oci.tar", Some("app:1.0.0"));
    assert!(fs::metadata(&v2_thin).unwrap().len() < fs::metadata(&v2).unwrap().len());

    // On a btrfs root: received subvolumes, read-only; thin update; rollback.
    let root = m.join("root");
    root_with_trust(&root, &key_pub);
    ok(stage_cmd(&root).arg("deploy").arg(&v1));
    ok(stage_cmd(&root).arg("deploy").arg(&v2_thin));
    let active = fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap();
    assert!(subvol::is_subvolume(&active).unwrap() && subvol::is_readonly(&active).unwrap());
    assert_eq!(fs::read(root.join("var/lib/op-dbus/staging/app/share/data.bin")).unwrap(), big2);
    assert!(!root.join("var/lib/op-dbus/staging/app/share/old").exists());
    ok(stage_cmd(&root).arg("verify"));
    ok(stage_cmd(&root).args(["rollback", "app"]));
    assert_eq!(fs::read(root.join("var/lib/op-dbus/staging/app/share/data.bin")).unwrap(), big);
    ok(stage_cmd(&root).arg("verify"));

    // On a plain-directory root: the streams applied in userspace.
    let plain = tempfile::tempdir().unwrap();
    let proot = plain.path().join("root");
    root_with_trust(&proot, &key_pub);
    ok(stage_cmd(&proot).arg("deploy").arg(&v2));
    let status = json(&ok(stage_cmd(&proot).args(["--json", "status"])));
    assert_eq!(status["backend"], "directory");
    assert_eq!(fs::read(proot.join("var/lib/op-dbus/staging/app/share/data.bin")).unwrap(), big2);
    assert_eq!(fs::read_to_string(proot.join("var/lib/op-dbus/staging/app/bin/app")).unwrap(), "#!/bin/sh\necho 2\n");
    ok(stage_cmd(&proot).arg("verify"));

    // A thin incremental export where the parent is missing: refused, naming it.
    let other = plain.path().join("other");
    root_with_trust(&other, &key_pub);
    let before = tree(&other);
    let (code, err) = fails(stage_cmd(&other).arg("deploy").arg(&v2_thin));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("app:1.0.0"), "{err}");
    assert_eq!(tree(&other), before);
}
