//! A received btrfs image is checked against the signed per-file sha256 without reading
//! back the files its stream wrote in order: those are hashed as the stream passes. The
//! files it changes in part (an incremental layer's writes into the host generation's
//! files) are read back, so a changed host generation is still refused. A loop-mounted
//! btrfs; needs root. (Tampered WRITEs and a CLONE over written content are in
//! `btrfs_hostile.rs`.)

mod util;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use util::*;

fn stage_cmd(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root);
    c
}

fn write_stage(dir: &Path, version: &str, data: &[u8]) {
    fs::create_dir_all(dir.join("share")).unwrap();
    fs::write(dir.join("share/data.bin"), data).unwrap();
    fs::write(dir.join("share/note.txt"), format!("version {version}\n")).unwrap();
    fs::write(dir.join("share/small.txt"), "unchanged\n").unwrap();
    fs::write(
        dir.join("manifest.yaml"),
        format!("name: app\nversion: {version}\nfiles:\n  - path: share\n    target: /opt/app/share\n"),
    )
    .unwrap();
}

/// The installer's count of files hashed from the stream and read back, from its `-v` log.
fn counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("files hashed as they were received"))
        .unwrap_or_else(|| panic!("no count of the files hashed from the stream in the log:\n{log}"));
    let tail = line.split("signed manifest: ").nth(1).unwrap();
    let num = |s: &str| s.split_whitespace().next().unwrap().parse::<u64>().unwrap();
    let hashed = num(tail);
    let read_back = num(tail.split(", ").nth(1).unwrap());
    (hashed, read_back)
}

#[test]
fn btrfs_loop_root_received_files_are_hashed_from_the_stream_and_partial_writes_read_back() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let store = m.join("store");
    let stage = m.join("src/app");
    let mut data = util::varied(4 << 20, 5);
    write_stage(&stage, "1.0.0", &data);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
    // 1.1.0 changes one 128 KiB block of data.bin (sent as a WRITE into the parent's file)
    // and note.txt (as long as before: written in place too).
    data[1 << 20..(1 << 20) + (128 << 10)].copy_from_slice(&util::varied(128 << 10, 6));
    write_stage(&stage, "1.1.0", &data);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&stage));
    let v1 = m.join("v1.oci.tar");
    ok(image(&store, None).args(["-q", "export", "app:1.0.0", "--out"]).arg(&v1));
    let v2 = m.join("v2.oci.tar");
    ok(image(&store, None).args(["-q", "export", "app:1.1.0", "--out"]).arg(&v2));
    let root = m.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).args(["-q", "init"]));
    ok(stage_cmd(&root).args(["-q", "trust", "add"]).arg(m.join("k.pub")));

    // The full image: every file was written in order, none is read back.
    let out = run(stage_cmd(&root).args(["-v", "deploy"]).arg(&v1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(counts(&log), (3, 0), "{log}");
    let g1 = fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap();

    // The increment onto the host's generation: both changed files are the generation's,
    // written in part, and read back (small.txt too: unchanged, the generation's).
    let out = run(stage_cmd(&root).args(["-v", "deploy"]).arg(&v2));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("receiving the layers above layer 1 against the host's generation"), "{log}");
    assert_eq!(counts(&log), (0, 3), "{log}");
    let staged = root.join("var/lib/op-dbus/staging/app/share/data.bin");
    assert_eq!(fs::read(&staged).unwrap(), data);
    ok(stage_cmd(&root).arg("verify"));

    // The host's generation of 1.0.0 changed outside the block the increment rewrites:
    // the received data.bin differs from the signed sha256 only where the stream did not
    // write. Refused (exit 7), nothing activated, nothing left in the temp area.
    ok(stage_cmd(&root).args(["-q", "rollback", "app"]));
    assert_eq!(fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap(), g1);
    subvol::set_readonly(&g1, false).unwrap();
    let f = fs::OpenOptions::new().write(true).open(g1.join("share/data.bin")).unwrap();
    f.write_all_at(b"tampered", 3 << 20).unwrap();
    drop(f);
    subvol::set_readonly(&g1, true).unwrap();
    let before = tree(&root.join("var/lib/op-dbus"));
    let (code, err) = fails(stage_cmd(&root).arg("deploy").arg(&v2));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("share/data.bin: content hashes to"), "{err}");
    assert_eq!(fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap(), g1);
    let tmp = root.join("var/lib/op-dbus/staging/.tmp");
    let left: Vec<_> = fs::read_dir(&tmp).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left in the temp area: {left:?}");
    let after = tree(&root.join("var/lib/op-dbus"));
    let changed: Vec<_> = after.iter().filter(|(k, v)| before.get(*k) != Some(*v)).map(|(k, _)| k).collect();
    assert!(changed.is_empty() && after.len() == before.len(), "the refused deploy changed {changed:?}");
}

/// Every file under `dir` (not following links), with its length.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_dir() {
            out.extend(files_under(&e.path()));
        } else if m.is_file() {
            out.push((e.path(), m.len()));
        }
    }
    out
}

/// A btrfs image deployed from an archive arriving on stdin is received while it arrives
/// (one read of the layer: before, the layer was stored whole, then read again for
/// `btrfs receive`): with the end of the archive held back, `btrfs receive` has already
/// written the image's file in the staging temp area. The increment is received the same
/// way against the host's generation.
#[test]
fn btrfs_loop_root_a_deploy_receives_the_stream_while_the_archive_arrives() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let store = m.join("store");
    let stage = m.join("src/app");
    let data1 = util::varied(4 << 20, 7);
    write_stage(&stage, "1.0.0", &data1);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
    let mut data2 = data1.clone();
    // (Large enough for the increment's stream to reach `btrfs receive` with the end of
    // the archive held back: the decoder hands on 256 KiB at a time.)
    data2[1 << 20..3 << 20].copy_from_slice(&util::varied(2 << 20, 8));
    write_stage(&stage, "1.1.0", &data2);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&stage));
    let root = m.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).args(["-q", "init"]));
    ok(stage_cmd(&root).args(["-q", "trust", "add"]).arg(m.join("k.pub")));
    let tmp = root.join("var/lib/op-dbus/staging/.tmp");

    for (reference, archive, data) in [("app:1.0.0", "v1.oci.tar", &data1), ("app:1.1.0", "v2.oci.tar", &data2)] {
        let path = m.join(archive);
        ok(image(&store, None).args(["-q", "export", reference, "--out"]).arg(&path));
        let bytes = fs::read(&path).unwrap();
        let out = deploy_held_back(
            stage_cmd(&root).args(["--stall-timeout", "30", "-v", "deploy", "-"]),
            &bytes,
            64 << 10,
            reference,
            || files_under(&tmp).into_iter().any(|(p, len)| p.ends_with("share/data.bin") && len > 0),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{reference}: {log}");
        if reference == "app:1.1.0" {
            assert!(log.contains("receiving the layers above layer 1 against the host's generation"), "{log}");
        }
        let staged = root.join("var/lib/op-dbus/staging/app/share/data.bin");
        assert!(fs::read(&staged).unwrap() == *data, "{reference}: the staged data.bin differs");
        ok(stage_cmd(&root).arg("verify"));
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "{reference}: nothing left in the temp area");
    }
}
