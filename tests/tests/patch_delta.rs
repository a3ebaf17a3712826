//! Patch deltas of tar images (`tar-patch+zstd` layers): a changed file of a `--parent`
//! build is carried as a patch against the parent's version, and the installer applies
//! it against the host's generation of the parent, checking the result's sha256.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

const PATCH_MEDIA: &str = "application/vnd.op-dbus.stage.payload.v1.tar-patch+zstd";

fn write_stage(dir: &Path, version: &str, files: &[(&str, &[u8])]) {
    let _ = fs::remove_dir_all(dir);
    for (p, data) in files {
        let f = dir.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(f, data).unwrap();
    }
    fs::write(
        dir.join("manifest.yaml"),
        format!("name: app\nversion: {version}\nfiles:\n  - path: lib\n    target: /opt/app/lib\n"),
    )
    .unwrap();
}

/// Builds app:1.0.0 and app:1.1.0 (a 1% change of a 6 MiB library, a rewritten small
/// file, one file gone and one new) with `--parent`; exports 1.0.0 and 1.1.0 thin.
struct Images {
    s: Scratch,
    v1: PathBuf,
    v2_thin: PathBuf,
    v2_full: PathBuf,
    lib2: Vec<u8>,
}

fn images() -> Images {
    let s = Scratch::trusted();
    let lib = varied(6 << 20, 11);
    let mut lib2 = lib.clone();
    for k in 0..16 {
        let at = k * (6 << 20) / 16 + 999;
        for b in &mut lib2[at..at + 4000] {
            *b = b.wrapping_add(1);
        }
    }
    let stage = s.path("src/app");
    write_stage(&stage, "1.0.0", &[("lib/libapp.so", &lib), ("lib/version", b"1\n"), ("lib/gone", b"bye\n")]);
    ok(s.image().args(["-q", "build", "--format", "tar"]).arg(&stage));
    write_stage(&stage, "1.1.0", &[("lib/libapp.so", &lib2), ("lib/version", b"2\n"), ("lib/new", b"hi\n")]);
    ok(s.image().args(["-q", "build", "--format", "tar", "--parent", "app:1.0.0"]).arg(&stage));
    let v1 = s.export(&["app:1.0.0"], "v1.oci.tar");
    let v2_full = s.export(&["app:1.1.0"], "v2.oci.tar");
    let v2_thin = s.path("v2-thin.oci.tar");
    ok(s.image().args(["-q", "export", "app:1.1.0", "--since", "app:1.0.0", "--out"]).arg(&v2_thin));
    Images { s, v1, v2_thin, v2_full, lib2 }
}

fn staged(root: &Path, p: &str) -> PathBuf {
    root.join("var/lib/op-dbus/staging/app").join(p)
}

fn host(s: &Scratch, name: &str) -> PathBuf {
    let root = s.path(name);
    fs::create_dir_all(&root).unwrap();
    let stage = |r: &Path| {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(r).arg("-q");
        c
    };
    ok(stage(&root).arg("init"));
    ok(stage(&root).args(["trust", "add"]).arg(s.pub_key()));
    root
}

fn stage_on(root: &Path) -> Command {
    let mut c = Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(root);
    c
}

#[test]
fn a_patch_delta_round_trips_onto_the_hosts_parent() {
    let i = images();
    let s = &i.s;
    let inspected = json(&ok(s.image().args(["--json", "inspect", "app:1.1.0"])));
    let layers = inspected["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1]["mediaType"], PATCH_MEDIA);
    let (full, delta) = (layers[0]["size"].as_u64().unwrap(), layers[1]["size"].as_u64().unwrap());
    // 64 KB changed of 6 MiB: the patch layer is a small fraction of the whole file.
    assert!(delta < 200_000, "the patch layer is {delta} bytes (the full layer {full})");

    let root = host(s, "root");
    ok(stage_on(&root).args(["-q", "deploy"]).arg(&i.v1));
    let out = run(stage_on(&root).args(["-v", "deploy"]).arg(&i.v2_thin));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("applying the layers above layer 1 onto a copy of the host's generation"), "{log}");
    assert_eq!(fs::read(staged(&root, "lib/libapp.so")).unwrap(), i.lib2);
    assert_eq!(fs::read(staged(&root, "lib/version")).unwrap(), b"2\n");
    assert_eq!(fs::read(staged(&root, "lib/new")).unwrap(), b"hi\n");
    assert!(!staged(&root, "lib/gone").exists());
    ok(stage_on(&root).args(["-q", "verify"]));

    // A host that never had 1.0.0 deploys the whole image: the patches apply to the
    // files its own lower layer holds.
    let fresh = host(s, "fresh");
    ok(stage_on(&fresh).args(["-q", "deploy"]).arg(&i.v2_full));
    assert_eq!(fs::read(staged(&fresh, "lib/libapp.so")).unwrap(), i.lib2);
    ok(stage_on(&fresh).args(["-q", "verify"]));

    // Without the parent at all: the thin export's refusal, naming it; nothing changes.
    let bare = host(s, "bare");
    let before = tree(&bare);
    let (code, err) = fails(stage_on(&bare).args(["-q", "deploy"]).arg(&i.v2_thin));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("app:1.0.0"), "{err}");
    assert_eq!(tree(&bare), before);
}

#[test]
fn a_patch_against_a_tampered_parent_file_is_refused() {
    let i = images();
    let s = &i.s;
    for (what, tamper) in [("same size", false), ("other size", true)] {
        let root = host(s, &format!("root-{}", what.replace(' ', "-")));
        ok(stage_on(&root).args(["-q", "deploy"]).arg(&i.v1));
        let active = fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap();
        let lib = active.join("lib/libapp.so");
        let mut bytes = fs::read(&lib).unwrap();
        if tamper {
            bytes.push(0);
        } else {
            bytes[3 << 20] ^= 0x55;
        }
        fs::write(&lib, &bytes).unwrap();
        let state = fs::read(root.join("var/lib/op-dbus/staging/state.json")).unwrap();
        let (code, err) = fails(stage_on(&root).args(["-q", "deploy"]).arg(&i.v2_thin));
        assert_eq!(code, 7, "{what}: {err}");
        assert!(err.contains("lib/libapp.so"), "{what}: {err}");
        // Nothing activated: the same generation, the same state, no leftovers.
        assert_eq!(fs::canonicalize(root.join("var/lib/op-dbus/staging/app")).unwrap(), active, "{what}");
        assert_eq!(fs::read(root.join("var/lib/op-dbus/staging/state.json")).unwrap(), state, "{what}");
        let tmp = root.join("var/lib/op-dbus/staging/.tmp");
        let left: Vec<_> = fs::read_dir(&tmp).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{what}: left in .tmp: {left:?}");
    }
}

/// The builder checks the tar layer it signs as the installer unpacks it: app:1.1.0 drops
/// a 66 MiB file of 1.0.0, so a delta on 1.0.0 would make the installer write more bytes
/// (the parent's layer below) than the signed manifest of 1.1.0 allows an image (its sizes
/// times its layers, plus 64 MiB). The builder refuses it (exit 7): nothing is tagged or
/// signed. Built whole, 1.1.0 is signed.
#[test]
fn the_builder_refuses_to_sign_a_tar_layer_the_installer_would_refuse() {
    let s = Scratch::trusted();
    let stage = s.path("src/app");
    write_stage(&stage, "1.0.0", &[("lib/big.bin", &[]), ("lib/version", b"1\n")]);
    // Sparse: 66 MiB of zeros, cheap to write, read and compress.
    fs::File::options().write(true).open(stage.join("lib/big.bin")).unwrap().set_len(66 << 20).unwrap();
    ok(s.image().args(["-q", "build", "--format", "tar"]).arg(&stage));
    let blobs = || fs::read_dir(s.store().join("blobs/sha256")).unwrap().count();
    let before = blobs();
    write_stage(&stage, "1.1.0", &[("lib/version", b"2\n")]);
    let (code, err) = fails(s.image().args(["-q", "build", "--format", "tar", "--parent", "app:1.0.0"]).arg(&stage));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("would be refused by the installer") && err.contains("nothing was signed"), "{err}");
    assert!(err.contains("more content bytes than the signed manifest allows"), "{err}");
    let listed = ok(s.image().args(["--json", "list"]));
    assert!(!listed.contains("1.1.0"), "the store has the refused image: {listed}");
    assert_eq!(blobs(), before, "the refused layer's blob was kept");
    ok(s.image().args(["-q", "build", "--format", "tar"]).arg(&stage));
}
