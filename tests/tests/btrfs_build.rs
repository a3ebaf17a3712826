//! The builder's btrfs payloads (a loop-mounted btrfs; needs root): what it signs is
//! checked as the installer checks it, and an incremental build finds its parent from
//! any checkout of the stage folder.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

fn stage_cmd(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root).arg("-q");
    c
}

fn write_stage(dir: &Path, version: &str, data: &[u8]) {
    fs::create_dir_all(dir.join("share")).unwrap();
    fs::write(dir.join("share/data.bin"), data).unwrap();
    fs::write(dir.join("share/note.txt"), format!("version {version}\n")).unwrap();
    fs::write(
        dir.join("manifest.yaml"),
        format!("name: app\nversion: {version}\nfiles:\n  - path: share\n    target: /opt/app/share\n"),
    )
    .unwrap();
}

/// `op-dbus-image ARGS` in a private mount namespace where `btrfs` is `wrapper` (a shell
/// script given the real btrfs as $REAL_BTRFS): how a test makes `btrfs send` misbehave.
fn image_with_btrfs(store: &Path, key: &Path, dir: &Path, wrapper: &str) -> Command {
    let real = fs::canonicalize(require_tool("btrfs", "btrfs-progs")).unwrap();
    let copy = dir.join("real-btrfs");
    fs::copy(&real, &copy).unwrap();
    let script = dir.join("btrfs-wrapper");
    fs::write(&script, format!("#!/bin/sh\nREAL_BTRFS={}\n{wrapper}\n", copy.display())).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let inner = image(store, Some(key));
    let mut c = Command::new(require_tool("unshare", "util-linux"));
    c.args(["-m", "--propagation", "private", "sh", "-c", "for b in /usr/bin/btrfs /bin/btrfs /usr/sbin/btrfs /sbin/btrfs; do [ -e $b ] && mount --bind \"$0\" $b; done; exec \"$@\""])
        .arg(&script)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

#[test]
fn the_builder_refuses_to_sign_an_empty_or_cut_btrfs_stream() {
    let b = LoopBtrfs::new(512);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let store = m.join("store");
    let stage = m.join("src/app");
    write_stage(&stage, "1.0.0", &util::varied(1 << 20, 3));
    let cases = [
        ("empty", "[ \"$1\" = send ] && exit 0\nexec $REAL_BTRFS \"$@\""),
        ("cut", "[ \"$1\" = send ] || exec $REAL_BTRFS \"$@\"\n$REAL_BTRFS \"$@\" | head -c 300000\nexit 0"),
    ];
    for (what, wrapper) in cases {
        let (code, err) =
            fails(image_with_btrfs(&store, &key, m, wrapper).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
        assert_eq!(code, 7, "{what}: {err}");
        assert!(err.contains("would refuse") && err.contains("nothing was signed"), "{what}: {err}");
        let listed = json(&ok(image(&store, None).args(["--json", "list"])));
        assert!(!listed.to_string().contains("1.0.0"), "{what}: the store has the image: {listed}");
    }
    // The real `btrfs send`: built and signed.
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
}

#[test]
fn an_incremental_btrfs_build_from_a_fresh_checkout_finds_its_parent() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let store = m.join("store");
    let data = util::varied(4 << 20, 5);
    // 1.0.0 is built in one checkout (its snapshot is kept beside it) ...
    let first = m.join("ci-1/app");
    write_stage(&first, "1.0.0", &data);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&first));
    // ... 1.1.0 in another, whose work directory has never seen 1.0.0.
    let second = m.join("ci-2/app");
    let mut data2 = data.clone();
    for b in &mut data2[1 << 20..(1 << 20) + 64 * 1024] {
        *b = b.wrapping_add(1);
    }
    write_stage(&second, "1.1.0", &data2);
    assert!(!m.join("ci-2/.op-dbus-build").exists());
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&second));
    let sizes: Vec<u64> = json(&ok(image(&store, None).args(["--json", "inspect", "app:1.1.0"])))["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.len(), 2);
    assert!(sizes[1] * 10 < sizes[0], "the incremental layer is not small: {sizes:?}");
    // A third checkout builds 1.2.0 on 1.1.0: the parent's chain is received from the store.
    let third = m.join("ci-3/app");
    write_stage(&third, "1.2.0", &data2);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.1.0"]).arg(&third));

    // Deployed on a btrfs root: the whole chain, then a thin update.
    let export = |r: &str, since: Option<&str>, name: &str| -> PathBuf {
        let out = m.join(name);
        let mut c = image(&store, Some(&key));
        c.args(["-q", "export", r, "--out"]).arg(&out);
        if let Some(s) = since {
            c.args(["--since", s]);
        }
        ok(&mut c);
        out
    };
    let v11 = export("app:1.1.0", None, "v11.oci.tar");
    let v12 = export("app:1.2.0", Some("app:1.1.0"), "v12-thin.oci.tar");
    let root = m.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).arg("init"));
    ok(stage_cmd(&root).args(["trust", "add"]).arg(m.join("k.pub")));
    ok(stage_cmd(&root).arg("deploy").arg(&v11));
    assert_eq!(fs::read(root.join("var/lib/op-dbus/staging/app/share/data.bin")).unwrap(), data2);
    ok(stage_cmd(&root).arg("deploy").arg(&v12));
    assert_eq!(fs::read_to_string(root.join("var/lib/op-dbus/staging/app/share/note.txt")).unwrap(), "version 1.2.0\n");
    ok(stage_cmd(&root).arg("verify"));
}

/// A field of `btrfs subvolume show PATH`.
fn show(path: &Path, field: &str) -> String {
    let out = ok(Command::new(require_tool("btrfs", "btrfs-progs")).args(["subvolume", "show"]).arg(path));
    out.lines()
        .find_map(|l| l.trim().strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} in {out}"))
}

#[test]
fn an_incremental_image_is_received_against_the_hosts_generation() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let store = m.join("store");
    let stage = m.join("src/app");
    let data = util::varied(4 << 20, 9);
    write_stage(&stage, "1.0.0", &data);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
    write_stage(&stage, "1.1.0", &data);
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&stage));
    let v1 = m.join("v1.oci.tar");
    ok(image(&store, None).args(["-q", "export", "app:1.0.0", "--out"]).arg(&v1));
    let v2 = m.join("v2.oci.tar");
    ok(image(&store, None).args(["-q", "export", "app:1.1.0", "--out"]).arg(&v2));
    let root = m.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).arg("init"));
    ok(stage_cmd(&root).args(["trust", "add"]).arg(m.join("k.pub")));
    ok(stage_cmd(&root).arg("deploy").arg(&v1));
    let g1 = fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap();
    // The whole image (both layers) arrives; only the layer above 1.0.0 is received, as a
    // snapshot of the host's generation of 1.0.0.
    let out = run(Command::new(bin("op-dbus-stage")).arg("--root").arg(&root).args(["-v", "deploy"]).arg(&v2));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("receiving the layers above layer 1 against the host's generation"), "{log}");
    let g2 = fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap();
    assert_ne!(g1, g2);
    assert_eq!(show(&g2, "Parent UUID:"), show(&g1, "UUID:"), "1.1.0 is not a snapshot of the generation of 1.0.0");
    assert_eq!(fs::read_to_string(root.join("var/lib/op-dbus/staging/app/share/note.txt")).unwrap(), "version 1.1.0\n");
    ok(stage_cmd(&root).arg("verify"));
    // A host generation that was changed is not trusted as it is: the received tree is
    // checked against the signed manifest, and the deploy refused.
    ok(stage_cmd(&root).args(["rollback", "app"]));
    subvol::set_readonly(&g1, false).unwrap();
    fs::write(g1.join("share/data.bin"), "tampered\n").unwrap();
    subvol::set_readonly(&g1, true).unwrap();
    let (code, err) = fails(stage_cmd(&root).arg("deploy").arg(&v2));
    assert_eq!(code, 7, "{err}");
    assert_eq!(fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap(), g1);
}

#[test]
fn a_snapshot_another_store_left_is_not_taken_for_the_parent() {
    let b = LoopBtrfs::new(1024);
    let m = &b.mnt;
    let key = keygen(m, "k");
    let (store_a, store_b) = (m.join("store-a"), m.join("store-b"));
    let stage = m.join("ci/app");
    let data = util::varied(2 << 20, 13);
    write_stage(&stage, "1.0.0", &data);
    ok(image(&store_a, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
    // The same folder built into another store: the kept snapshot of 1.0.0 is now that one.
    ok(image(&store_b, Some(&key)).args(["-q", "build", "--format", "btrfs"]).arg(&stage));
    write_stage(&stage, "1.1.0", &data);
    ok(image(&store_a, Some(&key)).args(["-q", "build", "--format", "btrfs", "--parent", "app:1.0.0"]).arg(&stage));
    // Store A's 1.1.0 is an increment on store A's 1.0.0: the whole chain deploys.
    let v2 = m.join("v2.oci.tar");
    ok(image(&store_a, None).args(["-q", "export", "app:1.1.0", "--out"]).arg(&v2));
    let root = m.join("root");
    fs::create_dir_all(&root).unwrap();
    ok(stage_cmd(&root).arg("init"));
    ok(stage_cmd(&root).args(["trust", "add"]).arg(m.join("k.pub")));
    ok(stage_cmd(&root).arg("deploy").arg(&v2));
    assert_eq!(fs::read_to_string(root.join("var/lib/op-dbus/staging/app/share/note.txt")).unwrap(), "version 1.1.0\n");
}
