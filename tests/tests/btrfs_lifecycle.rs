//! The stage lifecycle on a btrfs root (a loop-mounted btrfs; needs root): the staging
//! guide's troubleshooting step `btrfs subvolume delete /var/lib/op-dbus/staging/stage-X`
//! deletes the active generation through the stage link; `verify` and `status` name it and
//! `repair` rebuilds it, a read-only subvolume again, for images of both payload formats.
//! The plain-root variants are in lifecycle.rs.

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

/// Builds and exports stage `name` 1.0.0 in `format` (the folder lies on `dir`).
fn export(dir: &Path, store: &Path, key: &Path, name: &str, format: &str) -> PathBuf {
    let files = format!(
        "files:\n  - path: bin/{name}\n    target: /usr/local/bin/{name}\nverify:\n  - command: \"{name}\"\n    timeout: 10s\n"
    );
    let d = stage_dir(dir, name, "1.0.0", &files, &[(&format!("bin/{name}"), "#!/bin/sh\necho ok\n")]);
    ok(image(store, Some(key)).args(["-q", "build", "--format", format]).arg(&d));
    let out = dir.join(format!("{name}.oci.tar"));
    ok(image(store, Some(key)).args(["-q", "export", &format!("{name}:1.0.0"), "--out"]).arg(&out));
    out
}

fn problem(root: &Path, name: &str) -> (Option<i32>, String, String) {
    let out = util::run(stage_cmd(root).args(["--json", "verify", name]));
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    let status = json(&ok(stage_cmd(root).args(["--json", "status"])));
    let st = status["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["problem"].clone();
    (out.status.code(), doc["stages"][0]["generation"].as_str().unwrap_or_default().to_owned(), st.to_string())
}

#[test]
fn btrfs_the_guides_subvolume_delete_is_named_and_repaired() {
    let btrfs = require_tool("btrfs", "btrfs-progs");
    let fs_ = LoopBtrfs::new(512);
    let work = tempfile::tempdir_in(&fs_.mnt).unwrap();
    let key = keygen(work.path(), "k");
    let store = work.path().join("store");
    let root = fs_.mnt.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).arg("init"));
    ok(stage_cmd(&root).args(["trust", "add"]).arg(work.path().join("k.pub")));
    let staging = root.join("var/lib/op-dbus/staging");
    for (name, format) in [("stage-4-tar", "tar"), ("stage-5-btrfs", "btrfs")] {
        let archive = export(work.path(), &store, &key, name, format);
        ok(stage_cmd(&root).arg("deploy").arg(&archive));
        let generation = fs::canonicalize(staging.join(name)).unwrap();
        assert!(subvol::is_readonly(&generation).unwrap());
        let post = json(&ok(stage_cmd(&root).args(["--json", "snapshots"])))["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .rfind(|n| n.starts_with(&format!("post-{name}-")))
            .unwrap();

        // The guide's step, word for word: it follows the stage link.
        ok(Command::new(&btrfs).args(["subvolume", "delete"]).arg(staging.join(name)));
        assert!(!generation.exists(), "btrfs subvolume delete left {}", generation.display());
        let (code, verify, status) = problem(&root, name);
        assert_eq!(code, Some(5));
        assert!(verify.contains("is missing") && verify.contains(&format!("repair {name}")), "{verify}");
        assert!(status.contains("is missing"), "{status}");
        let (code, err) = fails(stage_cmd(&root).args(["restore", "--yes", &post]));
        assert_ne!(code, 0, "{err}");

        ok(stage_cmd(&root).args(["repair", &name[..7]]));
        ok(stage_cmd(&root).arg("verify"));
        assert_eq!(fs::canonicalize(staging.join(name)).unwrap(), generation, "not rebuilt in place");
        assert!(subvol::is_subvolume(&generation).unwrap() && subvol::is_readonly(&generation).unwrap());
        ok(stage_cmd(&root).args(["restore", "--yes", &post]));

        // Damaged in place (made writable and edited): set aside and replaced, the damaged
        // subvolume gone at clean-up.
        subvol::set_readonly(&generation, false).unwrap();
        fs::write(generation.join(format!("bin/{name}")), "#!/bin/sh\nexit 1\n").unwrap();
        let (code, verify, _) = problem(&root, name);
        assert_eq!(code, Some(5));
        assert!(verify.contains("damaged"), "{verify}");
        ok(stage_cmd(&root).arg("repair"));
        ok(stage_cmd(&root).arg("verify"));
        assert!(subvol::is_readonly(&generation).unwrap());
        assert_eq!(fs::read_dir(staging.join("journal/stash")).unwrap().count(), 0);
    }
}
