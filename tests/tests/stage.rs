//! End-to-end tests of `op-dbus-stage`: images built and signed by `op-dbus-image`,
//! deployed with `--root` into temp directories, as an operator would.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use util::*;

impl Scratch {
    /// Builds `dir` and exports it alone.
    fn build_export(&self, dir: &Path) -> PathBuf {
        let r = self.build(dir);
        self.export(&[&r], &format!("{}.oci.tar", r.replace(':', "-")))
    }
    fn enable_feature(&self, feature: &str) {
        let p = self.root().join("etc/op-dbus/stage.toml");
        let mut text = fs::read_to_string(&p).unwrap();
        text.push_str(&format!("features = [\"{feature}\"]\n"));
        fs::write(p, text).unwrap();
    }
}

/// Every path under `dir` with its type, mode and content or link text.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(rel, format!("link {}", fs::read_link(&p).unwrap().display()));
            } else if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &p, out);
            } else {
                out.insert(rel, format!("file {mode:o} {}", String::from_utf8_lossy(&fs::read(&p).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The host outside the installer's own state (what the operator sees).
fn host_tree(root: &Path) -> BTreeMap<String, String> {
    tree(root).into_iter().filter(|(k, _)| !k.starts_with("var/lib/op-dbus")).collect()
}

const APP_FILES: &str = "files:
  - path: bin/app
    target: /usr/local/bin/app
    type: symlink
  - path: etc/app.conf
    target: /etc/op-dbus/app.conf
    type: copy-if-not-exists
";

#[test]
fn example_stages_deploy_and_verify_in_a_scratch_root() {
    let s = Scratch::new();
    s.trust();
    s.enable_feature("openflow");
    let mut refs = Vec::new();
    for e in fs::read_dir(repo().join("images")).unwrap() {
        let dir = e.unwrap().path();
        if dir.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue;
        }
        let copy = s.dir.path().join("src").join(dir.file_name().unwrap());
        fs::create_dir_all(copy.parent().unwrap()).unwrap();
        copy_tree(&dir, &copy);
        refs.push(s.build(&copy));
    }
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let export = s.export(&refs, "all.oci.tar");
    let out = json(&ok(s.stage().args(["--json", "deploy"]).arg(&export)));
    // One transaction for the whole archive.
    assert_eq!(out["deployed"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(
        out["deployed"][0]["actions"].as_array().unwrap().iter().filter(|a| a["op"] == "publish-generation").count(),
        refs.len(),
        "{out}"
    );
    let list = json(&ok(s.stage().args(["--json", "list"])));
    let deployed = deployed_names(&list);
    assert_eq!(deployed.len(), refs.len(), "{list}");
    ok(s.stage().arg("verify"));

    // Links read as seen from inside the root and resolve inside it.
    let link = fs::read_link(s.root().join("usr/local/bin/op-dbus")).unwrap();
    assert_eq!(link, Path::new("/var/lib/op-dbus/staging/stage-1-core-dbus/bin/op-dbus"));
    let inside = s.root().join(link.strip_prefix("/").unwrap());
    assert!(fs::read_to_string(inside).unwrap().contains("op-dbus"));
    assert!(s.root().join("var/www/op-dbus").is_symlink(), "a folder entry becomes one directory link");
    // Deploying the same export again changes nothing.
    let again = json(&ok(s.stage().args(["--json", "deploy"]).arg(&export)));
    assert_eq!(again["deployed"].as_array().unwrap().len(), 0);
}

#[test]
fn untrusted_signer_exits_3_and_changes_nothing() {
    let s = Scratch::new();
    let dir =
        stage_dir(s.dir.path(), "app", "1.0.0", APP_FILES, &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")]);
    let export = s.build_export(&dir);
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(&export));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("trust add"), "{err}");
    assert_eq!(tree(&s.root()), before, "a refused deploy changed the root");
    // Trusted by another key only: still refused.
    let other = keygen(s.dir.path(), "other.key");
    ok(s.stage().args(["trust", "add"]).arg(other.with_extension("key.pub")));
    let before = tree(&s.root());
    let (code, _) = fails(s.stage().arg("deploy").arg(&export));
    assert_eq!(code, 3);
    assert_eq!(tree(&s.root()), before);
}

#[test]
fn dependencies_downgrades_and_policy_exit_4() {
    let s = Scratch::new();
    s.trust();
    let base = stage_dir(s.dir.path(), "base", "1.0.0", "", &[("share/x", "x\n")]);
    let app = stage_dir(
        s.dir.path(),
        "app",
        "1.0.0",
        &format!("dependencies:\n  - base >=1.0\n{APP_FILES}"),
        &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")],
    );
    let app_export = s.build_export(&app);
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(&app_export));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("base") && err.contains("deploy base first"), "{err}");
    assert_eq!(tree(&s.root()), before);

    ok(s.stage().arg("deploy").arg(s.build_export(&base)));
    ok(s.stage().arg("deploy").arg(&app_export));
    let v2 = stage_dir(
        s.dir.path(),
        "app",
        "2.0.0",
        &format!("dependencies:\n  - base >=1.0\n{APP_FILES}"),
        &[("bin/app", "#!/bin/sh\necho 2\n"), ("etc/app.conf", "x\n")],
    );
    ok(s.stage().arg("deploy").arg(s.build_export(&v2)));
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(&app_export));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("--allow-downgrade"), "{err}");
    assert_eq!(tree(&s.root()), before);
    ok(s.stage().args(["deploy", "--allow-downgrade"]).arg(&app_export));

    // A target outside the allowed prefixes, and a feature not enabled.
    let evil = stage_dir(
        s.dir.path(),
        "evil",
        "1.0.0",
        "files:\n  - path: shadow\n    target: /etc/shadow\n",
        &[("shadow", "root::0:0\n")],
    );
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(s.build_export(&evil)));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("/etc/shadow") && err.contains("allowed"), "{err}");
    let feat = stage_dir(s.dir.path(), "feat", "1.0.0", "requires_feature: openflow\n", &[("x", "x\n")]);
    let (code, err) = fails(s.stage().arg("deploy").arg(s.build_export(&feat)));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("openflow"), "{err}");
    assert_eq!(tree(&s.root()), before);
    // Removing a stage others depend on is refused.
    let (code, err) = fails(s.stage().args(["remove", "base"]));
    assert_eq!(code, 4, "{err}");
}

#[test]
fn operator_files_survive_and_come_back() {
    let s = Scratch::new();
    s.trust();
    fs::create_dir_all(s.root().join("usr/local/bin")).unwrap();
    fs::create_dir_all(s.root().join("etc/op-dbus")).unwrap();
    fs::write(s.root().join("usr/local/bin/app"), "operator's own app\n").unwrap();
    fs::write(s.root().join("etc/op-dbus/app.conf"), "operator's config\n").unwrap();
    let before = host_tree(&s.root());
    let dir = stage_dir(
        s.dir.path(),
        "app",
        "1.0.0",
        APP_FILES,
        &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "default\n")],
    );
    ok(s.stage().arg("deploy").arg(s.build_export(&dir)));
    assert_eq!(fs::read_to_string(s.root().join("etc/op-dbus/app.conf")).unwrap(), "operator's config\n");
    assert!(s.root().join("usr/local/bin/app").is_symlink());
    ok(s.stage().args(["remove", "app"]));
    assert_eq!(host_tree(&s.root()), before, "remove did not give back the operator's files");
}

#[test]
fn update_rollback_restore_and_verify() {
    let s = Scratch::new();
    s.trust();
    let files =
        "files:\n  - path: bin/a\n    target: /usr/local/bin/a\n  - path: bin/b\n    target: /usr/local/bin/b\n";
    let v1 = stage_dir(s.dir.path(), "app", "1.0.0", files, &[("bin/a", "a1\n"), ("bin/b", "b1\n")]);
    let empty = host_tree(&s.root());
    ok(s.stage().arg("deploy").arg(s.build_export(&v1)));
    let after_v1 = host_tree(&s.root());
    let staged_v1 = fs::read_link(s.root().join("var/lib/op-dbus/staging/app")).unwrap();

    // v2: b disappears, c appears, a changes.
    let files2 = "files:\n  - path: bin/a\n    target: /usr/local/bin/a\n  - path: bin/c\n    target: /opt/app/c\n";
    let v2 = stage_dir(s.dir.path(), "app", "1.1.0", files2, &[("bin/a", "a2\n"), ("bin/c", "c2\n")]);
    ok(s.stage().arg("deploy").arg(s.build_export(&v2)));
    assert!(!s.root().join("usr/local/bin/b").exists());
    assert!(s.root().join("opt/app/c").is_symlink());
    assert_eq!(fs::read_to_string(s.root().join("var/lib/op-dbus/staging/app/bin/a")).unwrap(), "a2\n");

    ok(s.stage().args(["rollback", "app"]));
    assert_eq!(host_tree(&s.root()), after_v1, "rollback did not restore the previous generation exactly");
    assert_eq!(fs::read_link(s.root().join("var/lib/op-dbus/staging/app")).unwrap(), staged_v1);

    // The pre- snapshot of the first deploy returns the whole root to empty.
    let snaps = json(&ok(s.stage().args(["--json", "snapshots"])));
    let first_pre = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .filter(|n| n.starts_with("pre-app-"))
        .min()
        .unwrap()
        .to_owned();
    ok(s.stage().args(["--dry-run", "restore", &first_pre]));
    assert_eq!(host_tree(&s.root()), after_v1, "--dry-run changed the root");
    ok(s.stage().args(["restore", &first_pre]));
    assert_eq!(host_tree(&s.root()), empty);
    let list = json(&ok(s.stage().args(["--json", "list"])));
    assert!(list["stages"].as_array().unwrap().iter().all(|x| x["status"] != "deployed"), "{list}");

    // verify finds one changed byte in a staged file.
    ok(s.stage().arg("deploy").arg("app:1.1.0"));
    ok(s.stage().arg("verify"));
    let staged_a = s.root().join("var/lib/op-dbus/staging/app/bin/a");
    let real = fs::canonicalize(&staged_a).unwrap();
    let mut bytes = fs::read(&real).unwrap();
    bytes[0] ^= 1;
    fs::write(&real, bytes).unwrap();
    let (code, _) = fails(s.stage().arg("verify"));
    assert_eq!(code, 5);
    let out = run(s.stage().args(["verify", "app"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bin/a"), "{out:?}");
}

#[test]
fn failing_verify_command_exits_5_without_a_trace() {
    let s = Scratch::new();
    s.trust();
    let extra = format!("{APP_FILES}verify:\n  - command: \"app --check\"\n    expect_exit: 0\n    timeout: 5s\n");
    let dir = stage_dir(
        s.dir.path(),
        "app",
        "1.0.0",
        &extra,
        &[("bin/app", "#!/bin/sh\necho broken >&2\nexit 3\n"), ("etc/app.conf", "x\n")],
    );
    let before = host_tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(s.build_export(&dir)));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("app --check") && err.contains("broken"), "{err}");
    assert_eq!(host_tree(&s.root()), before, "a failed verify left links behind");
    assert!(!s.root().join("var/lib/op-dbus/staging/app").exists());
    // A timeout fails the same way.
    let slow = format!("{APP_FILES}verify:\n  - command: \"sleep 30\"\n    timeout: 1s\n");
    let dir = stage_dir(s.dir.path(), "app", "1.0.1", &slow, &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")]);
    let (code, err) = fails(s.stage().arg("deploy").arg(s.build_export(&dir)));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn sources_stdin_layout_store_and_dry_run() {
    let s = Scratch::new();
    s.trust();
    let dir =
        stage_dir(s.dir.path(), "app", "1.0.0", APP_FILES, &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")]);
    let export = s.build_export(&dir);

    let before = tree(&s.root());
    let plan = json(&ok(s.stage().args(["--json", "--dry-run", "deploy"]).arg(&export)));
    assert!(
        plan["deployed"][0]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().contains("/usr/local/bin/app")),
        "{plan}"
    );
    assert_eq!(tree(&s.root()), before, "--dry-run changed the root");

    // stdin, in one pass.
    let mut child = s
        .stage()
        .args(["deploy", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&fs::read(&export).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(s.stage().args(["remove", "app"]));

    // A truncated archive on stdin: exit 7, nothing changed.
    let before = tree(&s.root());
    let bytes = fs::read(&export).unwrap();
    let mut child = s
        .stage()
        .args(["deploy", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes[..bytes.len() / 2]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(&s.root()), before);

    // An OCI layout directory, and NAME from the local store.
    ok(s.stage().args(["deploy-from-image"]).arg(s.store()));
    ok(s.stage().args(["remove", "app"]));
    ok(s.stage().args(["deploy", "app"]));
    let status = json(&ok(s.stage().args(["--json", "status"])));
    assert_eq!(status["stages"][0]["name"], "app");
    assert_eq!(status["backend"], "directory");
}

#[test]
fn receive_fix_symlinks_gc_and_status() {
    let s = Scratch::new();
    s.trust();
    let dir =
        stage_dir(s.dir.path(), "app", "1.0.0", APP_FILES, &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")]);
    let export = s.build_export(&dir);
    // receive: verified and stored, nothing activated.
    let before = host_tree(&s.root());
    let r = json(&ok(s.stage().args(["--json", "receive"]).arg(&export)));
    assert_eq!(r["received"][0]["reference"], "app:1.0.0");
    assert_eq!(host_tree(&s.root()), before);
    let list = json(&ok(s.stage().args(["--json", "list"])));
    assert_eq!(list["stages"][0]["status"], "available", "{list}");
    ok(s.stage().args(["deploy", "app:1.0.0"]));

    // A broken link shows in status and verify; fix-symlinks puts it back.
    fs::remove_file(s.root().join("usr/local/bin/app")).unwrap();
    let status = json(&ok(s.stage().args(["--json", "status"])));
    assert!(status["broken_links"][0].as_str().unwrap().contains("/usr/local/bin/app"), "{status}");
    let (code, _) = fails(s.stage().arg("verify"));
    assert_eq!(code, 5);
    ok(s.stage().args(["fix-symlinks", "app"]));
    ok(s.stage().arg("verify"));

    // gc keeps N previous generations (and those snapshots need).
    for v in ["1.1.0", "1.2.0", "1.3.0"] {
        let d = stage_dir(s.dir.path(), "app", v, APP_FILES, &[("bin/app", v), ("etc/app.conf", "x\n")]);
        ok(s.stage().arg("deploy").arg(s.build_export(&d)));
    }
    let status = json(&ok(s.stage().args(["--json", "status"])));
    assert_eq!(status["stages"][0]["previous"].as_array().unwrap().len(), 2, "deploy keeps 2 previous generations");
    let report = json(&ok(s.stage().args(["--json", "gc", "--keep", "0"])));
    assert_eq!(report["operation"], "gc --keep 0");
    let status = json(&ok(s.stage().args(["--json", "status"])));
    assert_eq!(status["stages"][0]["previous"].as_array().unwrap().len(), 0);
    ok(s.stage().arg("verify"));
    let (code, err) = fails(s.stage().args(["rollback", "app"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no previous generation"), "{err}");
}

/// Every changing command plans, then applies that plan: `--dry-run` reports the same plan
/// the real run executes and changes nothing, an interrupted transaction included.
#[test]
fn dry_runs_show_the_plan_the_real_run_executes() {
    let s = Scratch::new();
    s.trust();
    let dir =
        stage_dir(s.dir.path(), "app", "1.0.0", APP_FILES, &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x\n")]);
    ok(s.stage().arg("deploy").arg(s.build_export(&dir)));
    let staging = s.root().join("var/lib/op-dbus/staging");

    // gc: an orphaned generation (published, never committed: a crash) goes through the
    // plan and the journal, listed alike by the dry run and the real run.
    let orphan = staging.join(".generations/app/99");
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("manifest.json"), "{}").unwrap();
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "gc", "--keep", "0"])));
    assert!(orphan.exists(), "gc --dry-run deleted a generation");
    let real = json(&ok(s.stage().args(["--json", "gc", "--keep", "0"])));
    assert!(!orphan.exists(), "gc left the orphaned generation");
    assert_eq!(dry["steps"], real["steps"], "dry run {dry}\nreal run {real}");
    assert_eq!(dry["removed"], real["removed"]);
    assert!(real["removed"].as_array().unwrap().iter().any(|g| g["generation"] == 99), "{real}");

    // recover: under --dry-run it says what it would do and does nothing.
    let state: serde_json::Value = json(&fs::read_to_string(staging.join("state.json")).unwrap());
    let journal = serde_json::json!({
        "txid": state["txid"].as_u64().unwrap() + 1,
        "operation": "remove app",
        "steps": [],
        "before": state,
        "after": state,
    });
    fs::write(staging.join("journal/tx.json"), journal.to_string()).unwrap();
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "recover"])));
    assert_eq!(dry["recovered"], "rolled-back", "{dry}");
    assert!(staging.join("journal/tx.json").exists(), "recover --dry-run finished the transaction");
    // Another command's dry run leaves it too.
    ok(s.stage().args(["--dry-run", "remove", "app"]));
    assert!(staging.join("journal/tx.json").exists(), "remove --dry-run finished the transaction");
    let real = json(&ok(s.stage().args(["--json", "recover"])));
    assert_eq!(real["recovered"], "rolled-back", "{real}");
    assert!(!staging.join("journal/tx.json").exists());

    // trust revoke: the dry run plans the edit of stage.toml, so a policy it cannot edit
    // fails the dry run as it fails the real one.
    let policy = s.root().join("etc/op-dbus/stage.toml");
    fs::write(&policy, "revoked = \"not a list\"\n").unwrap();
    let (dry, err) = fails(s.stage().args(["--dry-run", "trust", "revoke", "0123456789abcdef"]));
    let (real, _) = fails(s.stage().args(["trust", "revoke", "0123456789abcdef"]));
    assert_eq!((dry, real), (7, 7), "{err}");
}
