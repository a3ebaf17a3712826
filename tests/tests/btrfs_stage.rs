//! The installer on a btrfs root (a loop-mounted btrfs; needs root): staging is a
//! subvolume, generations are read-only subvolumes, snapshots are btrfs snapshots.

mod util;

use std::fs;
use std::path::Path;
use std::process::Command;

use util::*;

fn stage_cmd(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root).arg("-q");
    c
}

fn app(dir: &Path, version: &str, content: &str) -> std::path::PathBuf {
    let d = dir.join(format!("app-{version}"));
    fs::create_dir_all(d.join("bin")).unwrap();
    fs::write(
        d.join("manifest.yaml"),
        format!("name: app\nversion: {version}\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\nverify:\n  - command: test -f bin/app\n"),
    )
    .unwrap();
    fs::write(d.join("bin/app"), content).unwrap();
    d
}

#[test]
fn btrfs_loop_root_tar_images_land_in_read_only_subvolumes() {
    let fs_ = LoopBtrfs::new(512);
    let work = tempfile::tempdir().unwrap();
    let key = keygen(work.path(), "k");
    let store = work.path().join("store");
    let root = fs_.mnt.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).arg("init"));
    ok(stage_cmd(&root).args(["trust", "add"]).arg(work.path().join("k.pub")));
    let staging = root.join("var/lib/op-dbus/staging");
    assert!(subvol::is_subvolume(&staging).unwrap(), "staging is not a subvolume on a btrfs root");
    // An operator's file in the way: backing it up crosses from the root's subvolume into
    // the staging subvolume (no rename across subvolumes: copied, then removed).
    fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    fs::write(root.join("usr/local/bin/app"), "operator's\n").unwrap();
    let status = json(&ok(stage_cmd(&root).args(["--json", "status"])));
    assert_eq!(status["backend"], "btrfs");

    for (v, c) in [("1.0.0", "one\n"), ("1.1.0", "two\n")] {
        let d = app(work.path(), v, c);
        ok(image(&store, Some(&key)).args(["-q", "build", "--format", "tar"]).arg(&d));
        let out = work.path().join(format!("app-{v}.oci.tar"));
        ok(image(&store, Some(&key)).args(["-q", "export", &format!("app:{v}"), "--out"]).arg(&out));
        ok(stage_cmd(&root).arg("deploy").arg(&out));
    }
    let active = fs::canonicalize(staging.join("app")).unwrap();
    assert!(subvol::is_subvolume(&active).unwrap(), "{} is not a subvolume", active.display());
    assert!(subvol::is_readonly(&active).unwrap(), "generations must be read-only");
    assert!(fs::write(active.join("bin/app"), "tamper").is_err());
    assert_eq!(fs::read_to_string(root.join("var/lib/op-dbus/staging/app/bin/app")).unwrap(), "two\n");
    ok(stage_cmd(&root).arg("verify"));

    let snaps = json(&ok(stage_cmd(&root).args(["--json", "snapshots"])));
    let list = snaps["snapshots"].as_array().unwrap();
    assert!(list.len() >= 4);
    for s in list {
        assert_eq!(s["btrfs"], true, "{s}");
        assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
        let sub = staging.join("snapshots").join(s["name"].as_str().unwrap());
        assert!(subvol::is_readonly(&sub).unwrap());
    }

    ok(stage_cmd(&root).args(["rollback", "app"]));
    assert_eq!(fs::read_to_string(root.join("var/lib/op-dbus/staging/app/bin/app")).unwrap(), "one\n");
    ok(stage_cmd(&root).args(["remove", "app"]));
    ok(stage_cmd(&root).args(["gc", "--keep", "0"]));
    assert_eq!(fs::read_to_string(root.join("usr/local/bin/app")).unwrap(), "operator's\n");
}

/// `init --dry-run` reports the backend the real run gets, from the same check: here the
/// root is on a plain filesystem and its /var/lib a btrfs mount, so the staging area
/// becomes a subvolume.
#[test]
fn init_dry_run_reports_the_backend_the_real_run_gets() {
    let fsys = LoopBtrfs::new(256);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let var_lib = root.join("var/lib");
    fs::create_dir_all(&var_lib).unwrap();
    ok(Command::new("mount").arg("--bind").arg(&fsys.mnt).arg(&var_lib));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _bound = Unmount(&var_lib);
    let dry = json(&ok(stage_cmd(&root).args(["--json", "--dry-run", "init"])));
    assert!(!var_lib.join("op-dbus").exists(), "init --dry-run created something");
    let real = json(&ok(stage_cmd(&root).args(["--json", "init"])));
    assert_eq!(real["backend"], "btrfs", "{real}");
    assert_eq!(dry["backend"], real["backend"], "dry run {dry}\nreal run {real}");
}
