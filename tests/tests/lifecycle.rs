//! End-to-end tests of the stage lifecycle as the operators' documents run it, on a plain
//! root: rollback of a first generation and `rollback --all` back to before the earliest
//! deploy, stage names by unique prefix, a missing or damaged generation named and rebuilt
//! (`repair`, or `deploy` of the same image), and several stages deployed as one
//! transaction (`--each`: one per stage). The btrfs variants are in btrfs_lifecycle.rs.

mod util;

use std::fs;
use std::path::{Path, PathBuf};

use util::*;

/// The host outside the installer's own area (what the operator sees), byte for byte.
fn host_tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    tree(root).into_iter().filter(|(k, _)| !k.starts_with("var/lib/op-dbus")).collect()
}

/// The deployed stages as `list --json` shows them: (name, version, digest).
fn deployed(s: &Scratch) -> Vec<(String, String, String)> {
    let list = json(&ok(s.stage().args(["--json", "list"])));
    list["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["status"] == "deployed")
        .map(|x| {
            let f = |k: &str| x[k].as_str().unwrap().to_owned();
            (f("name"), f("version"), f("digest"))
        })
        .collect()
}

fn snapshot_names(s: &Scratch) -> Vec<String> {
    let doc = json(&ok(s.stage().args(["--json", "snapshots"])));
    doc["snapshots"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_owned()).collect()
}

/// The three stages of the staging guide, each placing one tool and displacing an operator
/// file at /opt/ops/<n>; stage 2 needs stage 1, stage 3 needs both. `verify3` is stage 3's
/// verify command. Returns their NAME:VERSION references, built into the store.
fn guide_stages(s: &Scratch, version: &str, verify3: &str) -> Vec<String> {
    let stage = |name: &str, n: u32, deps: &str, verify: &str| {
        let extra = format!(
            "{deps}files:\n  - path: bin/tool{n}\n    target: /usr/local/bin/tool{n}\n  - path: etc/ops{n}\n    \
             target: /opt/ops/{n}\nverify:\n  - command: \"{verify}\"\n    timeout: 10s\n"
        );
        let dir = stage_dir(
            s.dir.path(),
            name,
            version,
            &extra,
            &[
                (&format!("bin/tool{n}"), &format!("#!/bin/sh\necho {name} {version}\n")),
                (&format!("etc/ops{n}"), "ours\n"),
            ],
        );
        s.build(&dir)
    };
    vec![
        stage("stage-1-core-dbus", 1, "", "tool1"),
        stage("stage-2-plugins", 2, "dependencies:\n  - stage-1-core-dbus\n", "tool2"),
        stage("stage-3-openflow", 3, "dependencies:\n  - stage-1-core-dbus\n  - stage-2-plugins\n", verify3),
    ]
}

/// The operator's own files where the stages will put theirs.
fn operator_files(s: &Scratch) {
    fs::create_dir_all(s.root().join("opt/ops")).unwrap();
    for n in 1..=3 {
        fs::write(s.root().join(format!("opt/ops/{n}")), format!("the operator's {n}\n")).unwrap();
    }
}

fn export(s: &Scratch, refs: &[String], name: &str) -> PathBuf {
    s.export(&refs.iter().map(String::as_str).collect::<Vec<_>>(), name)
}

#[test]
fn rollback_of_first_generations_returns_the_host_to_before_each_stage() {
    let s = Scratch::trusted();
    operator_files(&s);
    let empty = host_tree(&s.root());
    let refs = guide_stages(&s, "1.0.0", "tool3");
    ok(s.stage().arg("deploy").arg(export(&s, &refs[..2], "s12.oci.tar")));
    let before_3 = host_tree(&s.root());
    ok(s.stage().arg("deploy").arg(export(&s, &refs[2..], "s3.oci.tar")));
    assert!(s.root().join("opt/ops/3").is_symlink(), "stage 3 did not displace the operator's file");

    // Names by a unique prefix; an ambiguous one is refused with the candidates.
    let (code, err) = fails(s.stage().args(["rollback", "stage"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stage-1-core-dbus, stage-2-plugins, stage-3-openflow"), "{err}");
    let (code, err) = fails(s.stage().args(["rollback", "stage-9"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stage-9 is not deployed"), "{err}");
    ok(s.stage().args(["verify", "stage-2"]));

    // A stage others need is not rolled away from under them.
    let (code, err) = fails(s.stage().args(["rollback", "stage-1"]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("depends on it"), "{err}");

    // "rollback stage-3 removes stage 3, restores to pre-stage-3 state".
    let dry = ok(s.stage().args(["--dry-run", "rollback", "stage-3"]));
    assert!(dry.contains("stage-3-openflow (first generation: removed)"), "{dry}");
    ok(s.stage().args(["rollback", "stage-3"]));
    assert_eq!(host_tree(&s.root()), before_3, "rollback of a first generation left the host changed");
    assert_eq!(fs::read_to_string(s.root().join("opt/ops/3")).unwrap(), "the operator's 3\n");
    let names: Vec<String> = deployed(&s).into_iter().map(|d| d.0).collect();
    assert_eq!(names, ["stage-1-core-dbus", "stage-2-plugins"]);

    // "rollback --all rolls back to before Stage 1" when every stage is on its first generation.
    ok(s.stage().args(["rollback", "--all"]));
    assert_eq!(host_tree(&s.root()), empty, "rollback --all did not return to before the earliest deploy");
    assert!(deployed(&s).is_empty());
    ok(s.stage().arg("verify"));
    let (code, err) = fails(s.stage().args(["rollback", "--all"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing is deployed"), "{err}");
}

#[test]
fn rollback_all_with_kept_generations_goes_back_one_generation() {
    let s = Scratch::trusted();
    let v1 = guide_stages(&s, "1.0.0", "tool3");
    ok(s.stage().arg("deploy").arg(export(&s, &v1[..1], "s1.oci.tar")));
    let after_v1 = host_tree(&s.root());
    let v2 = guide_stages(&s, "1.1.0", "tool3");
    ok(s.stage().arg("deploy").arg(export(&s, &v2[..2], "s12.oci.tar")));
    // Stage 1 has a kept generation, stage 2 none: --all takes stage 1 back only.
    ok(s.stage().args(["rollback", "--all"]));
    let d = deployed(&s);
    assert_eq!(
        d.iter().map(|x| (x.0.as_str(), x.1.as_str())).collect::<Vec<_>>(),
        [("stage-1-core-dbus", "1.0.0"), ("stage-2-plugins", "1.1.0")]
    );
    // Then rollback of stage 2 by prefix (first generation) and remove of stage 1 by prefix.
    ok(s.stage().args(["rollback", "stage-2"]));
    assert_eq!(host_tree(&s.root()), after_v1);
    ok(s.stage().args(["remove", "stage-1"]));
    assert!(deployed(&s).is_empty());
}

#[test]
fn a_batch_whose_third_verify_fails_leaves_the_host_as_before() {
    let s = Scratch::trusted();
    operator_files(&s);
    // Stage 1 1.0.0 is deployed; the archive upgrades it and brings stages 2 and 3.
    let v1 = guide_stages(&s, "1.0.0", "tool3");
    ok(s.stage().arg("deploy").arg(export(&s, &v1[..1], "s1.oci.tar")));
    let refs = guide_stages(&s, "1.1.0", "tool3 && exit 3");
    let archive = export(&s, &refs, "three.oci.tar");
    let host = host_tree(&s.root());
    let list = deployed(&s);
    let snaps = snapshot_names(&s);

    let (code, err) = fails(s.stage().arg("deploy").arg(&archive));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("tool3 && exit 3") && err.contains("rolled back"), "{err}");
    assert_eq!(host_tree(&s.root()), host, "a failed batch left the host changed");
    assert_eq!(deployed(&s), list, "a failed batch changed `list`");
    assert_eq!(snapshot_names(&s), snaps, "a failed batch left snapshots");
    ok(s.stage().arg("verify"));
    // Nothing of the batch is left in the staging area either.
    let staging = s.root().join("var/lib/op-dbus/staging");
    assert!(!staging.join("stage-2-plugins").exists() && !staging.join(".generations/stage-2-plugins").exists());
    assert_eq!(fs::read_dir(staging.join(".tmp")).unwrap().count(), 0);

    // --each keeps the stage-by-stage behaviour: stages 1 and 2 stay, 3 fails.
    let (code, err) = fails(s.stage().args(["deploy", "--each"]).arg(&archive));
    assert_eq!(code, 5, "{err}");
    let names: Vec<(String, String)> = deployed(&s).into_iter().map(|d| (d.0, d.1)).collect();
    assert_eq!(names, [("stage-1-core-dbus".into(), "1.1.0".into()), ("stage-2-plugins".into(), "1.1.0".into())]);
}

#[test]
fn a_batch_is_one_transaction_with_one_pre_and_one_post_snapshot() {
    let s = Scratch::trusted();
    let refs = guide_stages(&s, "1.0.0", "tool3");
    let snaps = snapshot_names(&s);
    // Several sources: each stage in its own archive, deployed together.
    let sources: Vec<PathBuf> =
        refs.iter().enumerate().map(|(i, r)| export(&s, std::slice::from_ref(r), &format!("s{i}.oci.tar"))).collect();
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "deploy"]).args(sources.iter().rev())));
    assert_eq!(dry["deployed"].as_array().unwrap().len(), 1, "{dry}");
    assert!(deployed(&s).is_empty(), "--dry-run deployed");
    let r = json(&ok(s.stage().args(["--json", "deploy"]).args(sources.iter().rev())));
    let reports = r["deployed"].as_array().unwrap();
    assert_eq!(reports.len(), 1, "several sources were not one transaction: {r}");
    let checks: Vec<&str> =
        reports[0]["checks"].as_array().unwrap().iter().map(|c| c["command"].as_str().unwrap()).collect();
    assert_eq!(checks, ["tool1", "tool2", "tool3"], "the verify commands of each stage run, in dependency order");
    assert_eq!(reports[0]["snapshots"].as_array().unwrap().len(), 2, "{r}");
    let new: Vec<String> = snapshot_names(&s).into_iter().filter(|n| !snaps.contains(n)).collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(new[0].starts_with("pre-deploy-3-stages-") && new[1].starts_with("post-deploy-3-stages-"), "{new:?}");
    assert_eq!(deployed(&s).len(), 3);
    // The pre- snapshot is the host before all three.
    ok(s.stage().args(["restore", "--yes", &new[0]]));
    assert!(deployed(&s).is_empty());
    // Deploying again: what is active already is skipped, the rest is one transaction.
    ok(s.stage().arg("deploy").arg(&sources[0]));
    let r = json(&ok(s.stage().args(["--json", "deploy"]).args(&sources)));
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["deployed"].as_array().unwrap().len(), 1, "{r}");
    // The same image twice is deployed once; one stage twice in one batch is refused;
    // stdin can be read once.
    let r = json(&ok(s.stage().args(["--json", "deploy"]).args([&sources[1], &sources[1]])));
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1, "{r}");
    let v2 = guide_stages(&s, "1.1.0", "tool3");
    let twice = export(&s, &v2[..1], "s1-v2.oci.tar");
    let (code, err) = fails(s.stage().arg("deploy").arg(&twice).arg(&sources[0]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stage-1-core-dbus twice") && err.contains("--each"), "{err}");
    let (code, err) = fails(s.stage().args(["deploy", "-", "-"]));
    assert_eq!(code, 2, "{err}");
}

/// A stage with a verify command, deployed at 1.0.0 then 1.1.0; returns the 1.1.0 archive.
fn app_upgraded(s: &Scratch) -> PathBuf {
    let files = "files:\n  - path: bin/app\n    target: /usr/local/bin/app\n  - path: etc/app.conf\n    \
                 target: /etc/op-dbus/app.conf\n    type: copy\nverify:\n  - command: \"app\"\n    timeout: 10s\n";
    for v in ["1.0.0", "1.1.0"] {
        let dir = stage_dir(
            s.dir.path(),
            "app-server",
            v,
            files,
            &[("bin/app", &format!("#!/bin/sh\necho app {v}\n")), ("etc/app.conf", "conf\n")],
        );
        let r = s.build(&dir);
        ok(s.stage().arg("deploy").arg(s.export(&[&r], &format!("app-{v}.oci.tar"))));
    }
    s.path("app-1.1.0.oci.tar")
}

fn staging(s: &Scratch) -> PathBuf {
    s.root().join("var/lib/op-dbus/staging")
}

/// `verify` fails (exit 5) and its document names the generation's problem.
fn verify_names(s: &Scratch, what: &str) {
    let out = run(s.stage().args(["--json", "verify"]));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    let problem = doc["stages"][0]["generation"].as_str().unwrap_or_default().to_owned();
    assert!(problem.contains(what) && problem.contains("repair app-server"), "{doc}");
    let status = json(&ok(s.stage().args(["--json", "status"])));
    let listed = json(&ok(s.stage().args(["--json", "list"])));
    if what != "differ" {
        // status and list look without reading every file: they see what is gone.
        assert!(status["stages"][0]["problem"].as_str().unwrap_or_default().contains(what), "{status}");
        let mine = listed["stages"].as_array().unwrap().iter().find(|x| x["status"] == "deployed").unwrap();
        assert!(mine["problem"].as_str().unwrap_or_default().contains(what), "{listed}");
    }
}

#[test]
fn a_missing_or_damaged_generation_is_named_and_rebuilt_from_the_store() {
    let s = Scratch::trusted();
    let archive = app_upgraded(&s);
    let host = host_tree(&s.root());
    let post = snapshot_names(&s).into_iter().rfind(|n| n.starts_with("post-app-server-")).unwrap();
    let generation = fs::read_link(staging(&s).join("app-server")).unwrap();
    let gen_dir = staging(&s).join(&generation);

    // The guide's step on a plain root: the generation is deleted through the stage link.
    fs::remove_dir_all(&gen_dir).unwrap();
    verify_names(&s, "is missing");
    let (code, err) = fails(s.stage().args(["restore", "--yes", &post]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("repair app-server"), "{err}");
    ok(s.stage().args(["--dry-run", "repair"]));
    assert!(!gen_dir.exists(), "--dry-run repaired");
    let r = json(&ok(s.stage().args(["--json", "repair"])));
    assert_eq!(r["checks"][0]["command"], "app", "repair runs the stage's verify commands: {r}");
    ok(s.stage().arg("verify"));
    assert_eq!(fs::read_link(staging(&s).join("app-server")).unwrap(), generation, "not rebuilt in place");
    assert_eq!(host_tree(&s.root()), host);
    // The snapshots naming it can be restored again.
    ok(s.stage().args(["restore", "--yes", &post]));
    let r = json(&ok(s.stage().args(["--json", "repair"])));
    assert!(r["steps"].as_array().unwrap().is_empty(), "an intact host needs no repair: {r}");

    // `rm -rf staging/app-server/` empties the generation; `rm -rf staging/app-server` takes the link.
    ok(std::process::Command::new("rm").arg("-rf").arg(format!("{}/", staging(&s).join("app-server").display())));
    assert!(gen_dir.is_dir() && fs::read_dir(&gen_dir).unwrap().count() == 0);
    verify_names(&s, "manifest.json is missing");
    ok(std::process::Command::new("rm").arg("-rf").arg(staging(&s).join("app-server")));
    verify_names(&s, "stage link is missing");
    ok(s.stage().args(["repair", "app"]));
    ok(s.stage().arg("verify"));
    assert_eq!(host_tree(&s.root()), host);

    // One changed byte: only verify (which reads every file) sees it; deploying the same
    // image again rebuilds it.
    let staged = gen_dir.join("bin/app");
    fs::write(&staged, "#!/bin/sh\necho tampered\n").unwrap();
    verify_names(&s, "differ");
    let r = json(&ok(s.stage().args(["--json", "deploy"]).arg(&archive)));
    assert!(r["deployed"][0]["operation"].as_str().unwrap().starts_with("repair app-server"), "{r}");
    ok(s.stage().arg("verify"));
    assert_eq!(fs::read_to_string(&staged).unwrap(), "#!/bin/sh\necho app 1.1.0\n");
    assert_eq!(fs::read_dir(staging(&s).join("journal/stash")).unwrap().count(), 0, "the damaged tree was kept");

    // Without the image in the store, repair says which image to bring.
    fs::remove_dir_all(s.root().join("var/lib/op-dbus/deployment/images")).unwrap();
    fs::remove_dir_all(&gen_dir).unwrap();
    let (code, err) = fails(s.stage().arg("repair"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("app-server:1.1.0") && err.contains("receive FILE.oci.tar"), "{err}");
    assert!(!gen_dir.exists());
    // Bringing it: deploy of the same image rebuilds it.
    ok(s.stage().arg("deploy").arg(&archive));
    ok(s.stage().arg("verify"));
    assert_eq!(host_tree(&s.root()), host);
}

#[test]
fn rollback_stops_at_the_oldest_kept_generation_once_older_ones_are_deleted() {
    let s = Scratch::trusted();
    // Four versions: a deploy keeps two previous generations, so the first is deleted.
    for v in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        let r = guide_stages(&s, v, "tool3");
        ok(s.stage().arg("deploy").arg(export(&s, &r[..1], &format!("s1-{v}.oci.tar"))));
    }
    ok(s.stage().args(["rollback", "stage-1"]));
    ok(s.stage().args(["rollback", "stage-1"]));
    assert_eq!(deployed(&s)[0].1, "1.1.0");
    // 1.1.0 was not the stage's first generation: no removal.
    let (code, err) = fails(s.stage().args(["rollback", "stage-1"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no previous generation") && err.contains("older ones were deleted"), "{err}");
    let (code, err) = fails(s.stage().args(["rollback", "--all"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(deployed(&s)[0].1, "1.1.0");
}

#[test]
fn with_deps_deploys_the_stored_dependencies_in_the_same_transaction() {
    let s = Scratch::trusted();
    let refs = guide_stages(&s, "1.0.0", "tool3");
    // The host has received stages 1 and 2 (two versions of stage 1), deployed nothing.
    let v11 = guide_stages(&s, "1.1.0", "tool3");
    ok(s.stage().arg("receive").arg(export(&s, &refs[..2], "s12.oci.tar")).arg(export(&s, &v11[..1], "s1b.oci.tar")));
    let s3 = export(&s, &refs[2..], "s3.oci.tar");
    let (code, err) = fails(s.stage().arg("deploy").arg(&s3));
    assert_eq!(code, 4, "{err}");
    let dry = json(&ok(s.stage().args(["--json", "--dry-run", "deploy", "--with-deps"]).arg(&s3)));
    assert!(deployed(&s).is_empty(), "--dry-run deployed");
    let r = json(&ok(s.stage().args(["--json", "deploy", "--with-deps"]).arg(&s3)));
    assert_eq!(r["deployed"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["deployed"][0]["steps"], dry["deployed"][0]["steps"]);
    let got: Vec<(String, String)> = deployed(&s).into_iter().map(|d| (d.0, d.1)).collect();
    assert_eq!(
        got,
        [
            ("stage-1-core-dbus".to_owned(), "1.1.0".to_owned()),
            ("stage-2-plugins".to_owned(), "1.0.0".to_owned()),
            ("stage-3-openflow".to_owned(), "1.0.0".to_owned())
        ]
    );
    // Nothing missing: nothing added.
    ok(s.stage().args(["rollback", "stage-3"]));
    let r = json(&ok(s.stage().args(["--json", "deploy", "--with-deps"]).arg(&s3)));
    assert_eq!(r["received"].as_array().unwrap().len(), 1, "{r}");
}
