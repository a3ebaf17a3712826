//! End-to-end tests of `op-dbus-image`: keys, the image format checked from outside the
//! code (skopeo, openssl, minisign, zstd, tar, sha256sum), reproducibility, refusals.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use util::*;

/// The manifest digest of `images/stage-2-plugins` 1.0.0 built with SOURCE_DATE_EPOCH=1700000000.
/// A change here is a change of the image format or of that stage: say which in the commit.
const GOLDEN_STAGE_2: &str = "sha256:68e1386ea6c33427d3893650e7a4885a5833ff882ca86ae9a03fd4bfed98ce5e";

fn blob(store: &Path, digest: &str) -> PathBuf {
    store.join("blobs/sha256").join(digest.strip_prefix("sha256:").expect("sha256 digest"))
}

fn read_json(path: &Path) -> Value {
    json(&fs::read_to_string(path).unwrap())
}

fn tag(store: &Path, name: &str) -> Value {
    let index = read_json(&store.join("index.json"));
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no tag {name} in {index}"))
        .clone()
}

/// Checks that a blob's name is the sha256 of its bytes and its size matches the descriptor.
fn check_descriptor(store: &Path, d: &Value) -> PathBuf {
    let digest = d["digest"].as_str().unwrap();
    let p = blob(store, digest);
    assert_eq!(format!("sha256:{}", sha256sum(&p)), digest, "blob {} is not what its name says", p.display());
    assert_eq!(fs::metadata(&p).unwrap().len(), d["size"].as_u64().unwrap(), "size of {digest}");
    p
}

#[test]
fn keys_interoperate_with_openssl_and_loose_keys_are_refused() {
    let openssl = require_tool("openssl", "openssl");
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path(), "signing.key");
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let derived = ok(Command::new(&openssl).args(["pkey", "-pubout", "-in"]).arg(&key));
    assert_eq!(derived, fs::read_to_string(d.path().join("signing.key.pub")).unwrap());

    // key show: the first 16 hex digits of sha256 of the raw 32-byte key.
    let der = d.path().join("pub.der");
    ok(Command::new(&openssl)
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(d.path().join("signing.key.pub"))
        .arg("-out")
        .arg(&der));
    let raw = fs::read(&der).unwrap();
    let raw_path = d.path().join("raw");
    fs::write(&raw_path, &raw[raw.len() - 32..]).unwrap();
    let id = ok(Command::new(bin("op-dbus-image")).args(["key", "show"]).arg(d.path().join("signing.key.pub")));
    assert_eq!(id.trim(), &sha256sum(&raw_path)[..16]);

    // An openssl-made key works as a signing key.
    let ossl_key = d.path().join("ossl.key");
    ok(Command::new(&openssl).args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&ossl_key));
    fs::set_permissions(&ossl_key, fs::Permissions::from_mode(0o600)).unwrap();
    let store = d.path().join("store");
    ok(image(&store, Some(&ossl_key)).arg("build").arg(repo().join("images/stage-2-plugins")));

    // A private key readable by others is refused, naming the file and the fix.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = fails(image(&store, Some(&key)).arg("build").arg(repo().join("images/stage-2-plugins")));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("signing.key") && err.contains("chmod 600"), "{err}");
    // Generating over an existing key is refused.
    let (_, err) = fails(Command::new(bin("op-dbus-image")).args(["key", "generate", "--out"]).arg(&key));
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn image_meets_the_design_checked_from_outside() {
    let openssl = require_tool("openssl", "openssl");
    let skopeo = require_tool("skopeo", "skopeo");
    let minisign = require_tool("minisign", "minisign");
    let zstd = require_tool("zstd", "zstd");
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path(), "k");
    let store = d.path().join("store");
    let out = ok(image(&store, Some(&key)).args(["--json", "build"]).arg(repo().join("images/stage-1-core-dbus")));
    let built = json(&out);
    assert_eq!(built["reference"], "stage-1-core-dbus:1.0.0");
    let digest = built["digest"].as_str().unwrap().to_owned();

    // index.json tags the image by NAME:VERSION; the manifest is what its digest says.
    assert_eq!(read_json(&store.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
    let desc = tag(&store, "stage-1-core-dbus:1.0.0");
    assert_eq!(desc["digest"], digest.as_str());
    let manifest_path = check_descriptor(&store, &desc);
    let m = read_json(&manifest_path);
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["artifactType"], "application/vnd.op-dbus.stage.v1");
    assert_eq!(m["annotations"]["org.opencontainers.image.title"], "stage-1-core-dbus");
    assert_eq!(m["annotations"]["org.opencontainers.image.version"], "1.0.0");
    assert_eq!(m["annotations"]["org.opencontainers.image.created"], "2023-11-14T22:13:20Z");
    assert_eq!(m["config"]["mediaType"], "application/vnd.op-dbus.stage.manifest.v1+json");
    let config = read_json(&check_descriptor(&store, &m["config"]));
    assert_eq!(config["name"], "stage-1-core-dbus");
    assert_eq!(config["version"], "1.0.0");
    assert_eq!(config["host_requirements"][0], "D-Bus system bus");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.op-dbus.stage.payload.v1.tar+zstd");
    let layer = check_descriptor(&store, &layers[0]);

    // Every staged file: the payload, unpacked by zstd and tar, has the signed size, mode and sha256.
    let unpacked = d.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    ok(Command::new("sh").arg("-c").arg(format!(
        "{} -dc '{}' | tar -x --no-same-owner -C '{}'",
        zstd.display(),
        layer.display(),
        unpacked.display()
    )));
    let entries = config["entries"].as_array().unwrap();
    let mut files = 0;
    for e in entries {
        let p = unpacked.join(e["path"].as_str().unwrap());
        let meta = fs::symlink_metadata(&p).unwrap_or_else(|_| panic!("{} is not in the payload", p.display()));
        let mode = u32::from_str_radix(e["mode"].as_str().unwrap(), 8).unwrap();
        match e["type"].as_str().unwrap() {
            "file" => {
                files += 1;
                assert_eq!(e["sha256"], format!("sha256:{}", sha256sum(&p)).as_str(), "{}", p.display());
                assert_eq!(e["size"].as_u64().unwrap(), meta.len());
                assert_eq!(meta.permissions().mode() & 0o7777, mode, "{}", p.display());
            }
            "dir" => assert!(meta.is_dir()),
            "symlink" => assert!(meta.file_type().is_symlink()),
            t => panic!("unknown type {t}"),
        }
    }
    assert!(files >= 5);
    let staged = ok(Command::new("find").arg(&unpacked).arg("-mindepth").arg("1"));
    assert_eq!(staged.lines().count(), entries.len(), "payload and signed entries differ");

    // The cosign signature: tag sha256-<hex>.sig, subject = the image, simple-signing payload
    // naming the digest, name and version, ed25519 signature that openssl verifies.
    let hex = digest.strip_prefix("sha256:").unwrap();
    let sig_desc = tag(&store, &format!("stage-1-core-dbus:sha256-{hex}.sig"));
    let sig_manifest = read_json(&check_descriptor(&store, &sig_desc));
    assert_eq!(sig_manifest["subject"]["digest"], digest.as_str());
    let sig_layer = &sig_manifest["layers"][0];
    assert_eq!(sig_layer["mediaType"], "application/vnd.dev.cosign.simplesigning.v1+json");
    let payload_path = check_descriptor(&store, sig_layer);
    let payload = read_json(&payload_path);
    assert_eq!(payload["critical"]["image"]["docker-manifest-digest"], digest.as_str());
    assert_eq!(payload["critical"]["type"], "cosign container image signature");
    assert_eq!(payload["optional"]["op-dbus.stage/name"], "stage-1-core-dbus");
    assert_eq!(payload["optional"]["op-dbus.stage/version"], "1.0.0");
    let sig_b64 = sig_layer["annotations"]["dev.cosignproject.cosign/signature"].as_str().unwrap();
    let sig_file = d.path().join("sig.b64");
    fs::write(&sig_file, format!("{sig_b64}\n")).unwrap();
    let sig_bin = d.path().join("sig.bin");
    ok(Command::new(&openssl).args(["base64", "-d", "-in"]).arg(&sig_file).arg("-out").arg(&sig_bin));
    let verify = |payload: &Path| {
        run(Command::new(&openssl)
            .args(["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey"])
            .arg(d.path().join("k.pub"))
            .arg("-in")
            .arg(payload)
            .arg("-sigfile")
            .arg(&sig_bin))
    };
    assert!(verify(&payload_path).status.success(), "openssl does not verify the cosign signature");
    let forged = d.path().join("forged");
    fs::write(&forged, fs::read_to_string(&payload_path).unwrap().replace("1.0.0", "9.0.0")).unwrap();
    assert!(!verify(&forged).status.success());

    // skopeo reads the store and the export.
    let raw = ok(Command::new(&skopeo)
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:stage-1-core-dbus:1.0.0", store.display())));
    assert_eq!(raw.as_bytes(), fs::read(&manifest_path).unwrap());
    let export = d.path().join("stage-1.oci.tar");
    ok(image(&store, Some(&key)).args(["export", "stage-1-core-dbus:1.0.0", "--out"]).arg(&export));
    let raw = ok(Command::new(&skopeo)
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:stage-1-core-dbus:1.0.0", export.display())));
    assert_eq!(raw.as_bytes(), fs::read(&manifest_path).unwrap());

    // Entry order: layout, index, signatures, manifests, configs, then payload layers.
    let listing = ok(Command::new("tar").arg("-tf").arg(&export));
    let names: Vec<&str> = listing.lines().collect();
    let pos = |digest: &str| names.iter().position(|n| n.ends_with(digest.strip_prefix("sha256:").unwrap())).unwrap();
    assert_eq!(&names[..2], ["oci-layout", "index.json"]);
    let sig_pos = pos(sig_desc["digest"].as_str().unwrap()).max(pos(sig_layer["digest"].as_str().unwrap()));
    assert!(sig_pos < pos(&digest) && pos(&digest) < pos(m["config"]["digest"].as_str().unwrap()));
    assert_eq!(pos(layers[0]["digest"].as_str().unwrap()), names.len() - 1);

    // Stock minisign verifies the export and refuses it after one flipped byte.
    let minisign_pub = d.path().join("k.minisign.pub");
    fs::write(
        &minisign_pub,
        ok(Command::new(bin("op-dbus-image")).args(["key", "export", "--minisign"]).arg(d.path().join("k.pub"))),
    )
    .unwrap();
    let check = || run(Command::new(&minisign).arg("-Vm").arg(&export).arg("-p").arg(&minisign_pub));
    assert!(check().status.success(), "{:?}", check());
    let mut bytes = fs::read(&export).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&export, bytes).unwrap();
    assert!(!check().status.success(), "minisign accepted a tampered export");
}

#[test]
fn same_folder_same_epoch_same_digest_and_golden() {
    let d = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for (i, (stamp, umask_mode)) in [("2020-01-01 00:00", 0o644), ("2024-06-30 12:34", 0o664)].iter().enumerate() {
        let folder = d.path().join(format!("copy{i}"));
        fs::create_dir(&folder).unwrap();
        let stage = folder.join("stage-2-plugins");
        copy_tree(&repo().join("images/stage-2-plugins"), &stage);
        ok(Command::new("find").arg(&stage).args(["-exec", "touch", "-h", "-d", stamp, "{}", "+"]));
        for e in walk(&stage) {
            if e.is_file() && !e.ends_with("manifest.yaml") {
                fs::set_permissions(&e, fs::Permissions::from_mode(*umask_mode)).unwrap();
            }
        }
        let store = d.path().join(format!("store{i}"));
        let built = json(&ok(image(&store, None).args(["--json", "-q", "build"]).arg(&stage)));
        digests.push(built["digest"].as_str().unwrap().to_owned());
    }
    assert_eq!(digests[0], digests[1], "same folder and SOURCE_DATE_EPOCH gave different images");
    assert_eq!(digests[0], GOLDEN_STAGE_2, "the golden digest of images/stage-2-plugins changed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn stage_folder(root: &Path, name: &str, manifest: &str, files: &[&str]) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("manifest.yaml"), manifest).unwrap();
    for f in files {
        let p = dir.join(f);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("content of {f}\n")).unwrap();
    }
    dir
}

#[test]
fn malformed_stage_input_exits_7_naming_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let cases: &[(&str, &str, &[&str], &[&str])] = &[
        ("bad-yaml", "version: 1.0.0\nfiles: [\n", &[], &["manifest.yaml", "line 2"]),
        ("unknown-field", "version: 1.0.0\nfiless: []\n", &[], &["manifest.yaml", "filess"]),
        (
            "path-out",
            "version: 1.0.0\nfiles:\n  - path: ../../etc/passwd\n    target: /usr/local/x\n",
            &[],
            &["manifest.yaml", "..", "line 3"],
        ),
        (
            "missing-file",
            "version: 1.0.0\nfiles:\n  - path: bin/tool\n    target: /usr/local/bin/tool\n",
            &[],
            &["manifest.yaml", "files[0].path", "bin/tool", "does not exist"],
        ),
        (
            "bad-target",
            "version: 1.0.0\nfiles:\n  - path: x\n    target: /usr/local/../../etc/shadow\n",
            &["x"],
            &["manifest.yaml", "target"],
        ),
        ("bad-version", "version: latest\n", &[], &["manifest.yaml", "version"]),
        (
            "bad-mode",
            "version: 1.0.0\nfiles:\n  - path: x\n    target: /opt/x\n    mode: 0999\n",
            &["x"],
            &["manifest.yaml", "mode"],
        ),
    ];
    for (name, manifest, files, needles) in cases {
        let dir = stage_folder(d.path(), name, manifest, files);
        let (code, err) = fails(image(&store, None).arg("build").arg(&dir));
        assert_eq!(code, 7, "{name}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{name}: {n:?} not in {err}");
        }
    }
    // A symlink out of the stage folder.
    let dir = stage_folder(d.path(), "link-out", "version: 1.0.0\n", &[]);
    std::os::unix::fs::symlink("/etc/shadow", dir.join("shadow")).unwrap();
    let (code, err) = fails(image(&store, None).arg("build").arg(&dir));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("shadow") && err.contains("outside"), "{err}");
    // Not a stage folder at all.
    let (code, err) = fails(image(&store, None).arg("build").arg(d.path().join("nowhere")));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("manifest.yaml"), "{err}");
    assert!(!store.join("index.json").exists() || tag_count(&store) == 0, "a refused build left a tag");
}

fn tag_count(store: &Path) -> usize {
    read_json(&store.join("index.json"))["manifests"].as_array().unwrap().len()
}

#[test]
fn seed_manifests_are_accepted_as_written() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let seeds = repo().join("tests/fixtures/seed-manifests");
    for (seed, folder) in [
        ("stage-1-core-dbus.full.yaml", "stage-1-core-dbus"),
        ("stage-1-core-dbus.plugins.yaml", "stage-1-core-dbus"),
        ("stage-2-plugins.yaml", "stage-2-plugins"),
        ("stage-3-openflow.yaml", "stage-3-openflow"),
    ] {
        let dir = d.path().join(seed).join(folder);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("etc/op-dbus")).unwrap();
        fs::copy(seeds.join(seed), dir.join("manifest.yaml")).unwrap();
        fs::write(dir.join("bin/op-dbus"), "#!/bin/sh\necho op-dbus 1.0.0\n").unwrap();
        fs::write(dir.join("etc/op-dbus/state.json"), "{}\n").unwrap();
        // Two seeds are versions of one stage: the second replaces the first (--force).
        let built = json(&ok(image(&store, None).args(["--json", "-q", "build", "--force"]).arg(&dir)));
        assert_eq!(built["reference"], format!("{folder}:1.0.0"), "{seed}: the name defaults to the folder's");
        let shown = json(&ok(image(&store, None).args(["--json", "inspect"]).arg(format!("{folder}:1.0.0"))));
        if seed.ends_with("full.yaml") {
            assert_eq!(shown["manifest"]["host_requirements"][0], "D-Bus system bus");
            assert_eq!(
                shown["manifest"]["cleanup"][0],
                "/etc/op-dbus/state.json (if default, remove; if modified, keep)"
            );
            let text = ok(image(&store, None).arg("inspect").arg(format!("{folder}:1.0.0")));
            assert!(text.contains("D-Bus system bus") && text.contains("cleanup"), "{text}");
        }
        if seed.starts_with("stage-3") {
            assert_eq!(shown["manifest"]["requires_feature"], "openflow");
            assert_eq!(shown["manifest"]["dependencies"][1]["stage"], "stage-2-plugins");
        }
    }
}

#[test]
fn delta_builds_share_parent_blobs_and_thin_exports_leave_them_out() {
    let zstd = require_tool("zstd", "zstd");
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path(), "k");
    let store = d.path().join("store");
    let manifest =
        |v: &str| format!("name: app\nversion: {v}\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n");
    let dir =
        stage_folder(d.path(), "app", &manifest("1.0.0"), &["bin/app", "share/keep.txt", "share/gone.txt", "old/x"]);
    ok(image(&store, Some(&key)).args(["-q", "build"]).arg(&dir));
    fs::write(dir.join("bin/app"), "version 2\n").unwrap();
    fs::remove_file(dir.join("share/gone.txt")).unwrap();
    fs::remove_dir_all(dir.join("old")).unwrap();
    fs::write(dir.join("share/new.txt"), "new\n").unwrap();
    fs::write(dir.join("manifest.yaml"), manifest("1.1.0")).unwrap();
    let built = json(&ok(image(&store, Some(&key)).args(["--json", "-q", "build", "--parent", "app:1.0.0"]).arg(&dir)));
    assert_eq!(built["parent"], "app:1.0.0");

    let m1 = read_json(&blob(&store, tag(&store, "app:1.0.0")["digest"].as_str().unwrap()));
    let m2 = read_json(&blob(&store, built["digest"].as_str().unwrap()));
    let l2 = m2["layers"].as_array().unwrap();
    assert_eq!(l2.len(), 2);
    assert_eq!(l2[0], m1["layers"][0], "the parent's layer blob is shared");
    assert_eq!(l2[1]["annotations"]["dev.op-dbus.stage/parent"], "app:1.0.0");
    assert_eq!(l2[1]["annotations"]["dev.op-dbus.stage/parent-digest"], tag(&store, "app:1.0.0")["digest"]);
    let delta = ok(Command::new("sh").arg("-c").arg(format!(
        "{} -dc '{}' | tar -t",
        zstd.display(),
        blob(&store, l2[1]["digest"].as_str().unwrap()).display()
    )));
    let mut names: Vec<&str> = delta.lines().collect();
    names.sort();
    assert_eq!(names, [".wh.old", "bin/app", "share/.wh.gone.txt", "share/new.txt"]);
    // The embedded manifest describes the whole tree, not the delta.
    let config = read_json(&blob(&store, m2["config"]["digest"].as_str().unwrap()));
    let paths: Vec<&str> = config["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["bin", "bin/app", "share", "share/keep.txt", "share/new.txt"]);

    // A thin export leaves out the parent's layer.
    let full = d.path().join("full.oci.tar");
    let thin = d.path().join("thin.oci.tar");
    ok(image(&store, Some(&key)).args(["-q", "export", "app:1.1.0", "--out"]).arg(&full));
    let out = json(&ok(image(&store, Some(&key))
        .args(["--json", "-q", "export", "app:1.1.0", "--since", "app:1.0.0", "--out"])
        .arg(&thin)));
    assert_eq!(out["omitted_layers"], 1);
    let listing = ok(Command::new("tar").arg("-tf").arg(&thin));
    let parent_layer = m1["layers"][0]["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
    assert!(!listing.contains(parent_layer));
    assert!(ok(Command::new("tar").arg("-tf").arg(&full)).contains(parent_layer));
}

#[test]
fn adhoc_create_dry_run_and_btrfs_refusal() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let tool = d.path().join("proxmox-dbus");
    fs::write(&tool, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    let conf = d.path().join("proxmox.conf");
    fs::write(&conf, "x=1\n").unwrap();

    // --dry-run prints the plan and writes nothing.
    let plan = json(&ok(image(&store, None)
        .args(["--json", "--dry-run", "create", "PROXMOX-DBUS_STAGE", "--files"])
        .arg(format!("{}:/usr/local/bin/proxmox-dbus", tool.display()))
        .arg(&conf)));
    assert_eq!(plan["reference"], "PROXMOX-DBUS_STAGE:0.1.0");
    assert!(!store.exists(), "--dry-run created the store");

    let built = json(&ok(image(&store, None)
        .args(["--json", "-q", "create", "PROXMOX-DBUS_STAGE", "--version", "2.0.0", "--files"])
        .arg(format!("{}:/usr/local/bin/proxmox-dbus", tool.display()))
        .arg(&conf)));
    assert_eq!(built["reference"], "PROXMOX-DBUS_STAGE:2.0.0");
    let shown = json(&ok(image(&store, None).args(["--json", "inspect", "PROXMOX-DBUS_STAGE:2.0.0"])));
    assert_eq!(shown["manifest"]["files"][0]["target"], "/usr/local/bin/proxmox-dbus");
    assert_eq!(shown["manifest"]["files"][0]["path"], "usr/local/bin/proxmox-dbus");
    let paths: Vec<&str> =
        shown["manifest"]["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"proxmox.conf") && paths.contains(&"usr/local/bin/proxmox-dbus"), "{paths:?}");
    let listed = json(&ok(image(&store, None).args(["--json", "list"])));
    assert_eq!(listed["images"][0]["reference"], "PROXMOX-DBUS_STAGE:2.0.0");
    assert_eq!(listed["images"][0]["signatures"], 0);

    let (code, err) =
        fails(image(&store, None).args(["build", "--format", "btrfs"]).arg(repo().join("images/stage-2-plugins")));
    assert_eq!(code, 1);
    assert!(err.contains("--format tar"), "{err}");
    let (code, err) = fails(image(&store, None).args(["inspect", "nope:1.0.0"]));
    assert_eq!(code, 2, "what the command line names and is not there exits 2");
    assert!(err.contains("nope:1.0.0") && err.contains("list"), "{err}");
}

#[test]
fn signing_adds_cosignatures_and_build_steps_run() {
    let d = tempfile::tempdir().unwrap();
    let (k1, k2) = (keygen(d.path(), "k1"), keygen(d.path(), "k2"));
    let store = d.path().join("store");
    let stage = d.path().join("stage-5-mcp-server");
    copy_tree(&repo().join("images/stage-5-mcp-server"), &stage);
    let _ = fs::remove_dir_all(stage.join("generated"));
    let out = run(image(&store, Some(&k1)).args(["--json", "build"]).arg(&stage));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("build step 1/1"));
    json(&String::from_utf8(out.stdout).unwrap());
    let shown = json(&ok(image(&store, None).args(["--json", "inspect", "stage-5-mcp-server:1.0.0"])));
    assert!(shown["manifest"]["entries"].as_array().unwrap().iter().any(|e| e["path"] == "etc/op-dbus/mcp-tools.json"));
    ok(image(&store, Some(&k2)).args(["sign", "stage-5-mcp-server:1.0.0", "--expires", "2099-01-01T00:00:00Z"]));
    ok(image(&store, Some(&k2)).args(["sign", "stage-5-mcp-server:1.0.0"]));
    let shown = json(&ok(image(&store, None).args(["--json", "inspect", "stage-5-mcp-server:1.0.0"])));
    let sigs = shown["signatures"].as_array().unwrap();
    assert_eq!(sigs.len(), 2, "re-signing with one key replaces its signature: {sigs:?}");

    // A failing build step names itself and stops the build.
    let bad = stage_folder(d.path(), "bad-step", "version: 1.0.0\nbuild:\n  - run: exit 3\n", &[]);
    let (code, err) = fails(image(&store, None).arg("build").arg(&bad));
    assert_eq!(code, 1);
    assert!(err.contains("build[0]") && err.contains("exit 3"), "{err}");
}

#[test]
fn create_files_keeps_relative_paths_and_refuses_collisions() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    for p in ["src/state/plugins/lxc.rs", "src/other/lxc.rs", "a/lxc.rs", "b/lxc.rs"] {
        fs::create_dir_all(d.path().join(p).parent().unwrap()).unwrap();
        fs::write(d.path().join(p), p).unwrap();
    }
    // Relative sources keep their paths: two lxc.rs are two entries, and the command says
    // they are linked nowhere and how to link them.
    let out = run(image(&store, None).current_dir(d.path()).args([
        "--json",
        "create",
        "PROXMOX-DBUS_STAGE",
        "--files",
        "src/state/plugins/lxc.rs",
        "src/other/lxc.rs",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("staged but not linked") && err.contains("--target-prefix"), "{err}");
    let shown = json(&ok(image(&store, None).args(["--json", "inspect", "PROXMOX-DBUS_STAGE:0.1.0"])));
    let paths: Vec<&str> =
        shown["manifest"]["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"src/state/plugins/lxc.rs") && paths.contains(&"src/other/lxc.rs"), "{paths:?}");
    assert_eq!(shown["manifest"]["files"].as_array().unwrap().len(), 0);

    // --target-prefix links the lot.
    let out = ok(image(&store, None).current_dir(d.path()).args([
        "--json",
        "--dry-run",
        "create",
        "PROXMOX-DBUS_STAGE",
        "--version",
        "0.2.0",
        "--target-prefix",
        "/usr/local/lib/proxmox",
        "--files",
        "src/state/plugins/lxc.rs",
    ]));
    assert!(json(&out)["entries"].as_array().unwrap().iter().any(|e| e == "src/state/plugins/lxc.rs"));
    ok(image(&store, None).current_dir(d.path()).args([
        "-q",
        "create",
        "PROXMOX-DBUS_STAGE",
        "--version",
        "0.2.0",
        "--target-prefix",
        "/usr/local/lib/proxmox",
        "--files",
        "src/state/plugins/lxc.rs",
    ]));
    let shown = json(&ok(image(&store, None).args(["--json", "inspect", "PROXMOX-DBUS_STAGE:0.2.0"])));
    assert_eq!(shown["manifest"]["files"][0]["target"], "/usr/local/lib/proxmox/src/state/plugins/lxc.rs");

    // Two sources that land on one path: exit 7, both named, nothing stored.
    let (a, b) = (d.path().join("a/lxc.rs"), d.path().join("b/lxc.rs"));
    let (code, err) = fails(
        image(&store, None).args(["create", "PROXMOX-DBUS_STAGE", "--version", "0.3.0", "--files"]).arg(&a).arg(&b),
    );
    assert_eq!(code, 7, "{err}");
    assert!(err.contains(&a.display().to_string()) && err.contains(&b.display().to_string()), "{err}");
    let listed = json(&ok(image(&store, None).args(["--json", "list"])));
    assert_eq!(listed["images"].as_array().unwrap().len(), 2, "{listed}");
}
