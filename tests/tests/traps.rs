//! The traps a new user fell into (issue 10, point 6), one end-to-end test each, and the
//! one exit-code map of both binaries (issue 11, point 3).

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use util::*;

impl Scratch {
    fn stage_dir(&self, name: &str, version: &str, extra: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("{name}-{version}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("share")).unwrap();
        fs::write(dir.join("manifest.yaml"), format!("name: {name}\nversion: {version}\n{extra}")).unwrap();
        fs::write(dir.join("share/x"), format!("{name} {version}\n")).unwrap();
        dir
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// A dry run plans a batch as the real run would: stage 2 of an archive may depend on
// stage 1 of the same archive.
#[test]
fn dry_run_deploy_of_a_batch_plans_as_the_real_run() {
    let s = Scratch::new();
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()));
    let base = s.build(&s.stage_dir("base", "1.0.0", ""));
    let app = s.build(&s.stage_dir("app", "1.0.0", "dependencies:\n  - base >=1.0\n"));
    let both = s.export(&[&base, &app], "both.oci.tar");
    let before = tree(&s.root());
    let operations = |doc: &serde_json::Value| -> Vec<String> {
        doc["deployed"].as_array().unwrap().iter().map(|r| r["operation"].as_str().unwrap().to_owned()).collect()
    };
    // One transaction for the archive; with --each, one per stage, each planned on the
    // state the one before leaves.
    let plan = json(&ok(s.stage().args(["--json", "--dry-run", "deploy"]).arg(&both)));
    assert_eq!(operations(&plan), ["deploy base:1.0.0 app:1.0.0"], "{plan}");
    let each = json(&ok(s.stage().args(["--json", "--dry-run", "deploy", "--each"]).arg(&both)));
    assert_eq!(operations(&each), ["deploy base:1.0.0", "deploy app:1.0.0"], "{each}");
    assert_eq!(tree(&s.root()), before, "--dry-run changed the root");
    // The real run does what the dry run said.
    let real = json(&ok(s.stage().args(["--json", "deploy"]).arg(&both)));
    assert_eq!(operations(&real), operations(&plan), "{real}");
    assert_eq!(real["deployed"][0]["steps"], plan["deployed"][0]["steps"]);
}

// `trust add --scope` adds to the key's scopes; `--replace` sets them. The hint of a scope
// refusal is a command that works, with the --root it was given.
#[test]
fn trust_add_scope_adds_and_the_hint_works() {
    let s = Scratch::new();
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()).args(["--scope", "web-*"]));
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()).args(["--scope", "db-*"]));
    let listed = json(&ok(s.stage().args(["--json", "trust", "list"])));
    assert_eq!(listed["keys"][0]["scopes"], serde_json::json!(["web-*", "db-*"]), "{listed}");
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()).args(["--scope", "app*", "--replace"]));
    let listed = json(&ok(s.stage().args(["--json", "trust", "list"])));
    assert_eq!(listed["keys"][0]["scopes"], serde_json::json!(["app*"]), "{listed}");
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()).args(["--scope", "web-*", "--replace"]));

    let app = s.build(&s.stage_dir("app", "1.0.0", ""));
    let export = s.export(&[&app], "app.oci.tar");
    let out = run(s.stage().arg("deploy").arg(&export));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    let root = s.root().display().to_string();
    let hint = err
        .split('`')
        .find(|c| c.contains("trust add") && c.contains("--scope"))
        .unwrap_or_else(|| panic!("no trust add hint: {err}"));
    assert!(hint.contains(&format!("--root {root}")), "the hint must carry --root: {err}");
    // Follow it, with the glob for this stage.
    let words: Vec<String> =
        hint.split_whitespace().skip(1).map(|w| if w == "GLOB" { "app".to_owned() } else { w.to_owned() }).collect();
    ok(Command::new(bin("op-dbus-stage")).args(&words));
    let listed = json(&ok(s.stage().args(["--json", "trust", "list"])));
    assert_eq!(listed["keys"][0]["scopes"], serde_json::json!(["web-*", "app"]), "{listed}");
    ok(s.stage().arg("deploy").arg(&export));
}

// Features have a command; top-level keys stay above the tables of stage.toml.
#[test]
fn feature_enable_keeps_stage_toml_valid() {
    let s = Scratch::new();
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()).args(["--scope", "feat*"]));
    ok(s.stage().args(["feature", "enable", "openflow"]));
    let text = fs::read_to_string(s.root().join("etc/op-dbus/stage.toml")).unwrap();
    let features = text.find("features").unwrap_or_else(|| panic!("{text}"));
    assert!(features < text.find("[scopes]").unwrap(), "features landed inside a table:\n{text}");
    ok(s.stage().args(["trust", "list"]));
    let feat = s.build(&s.stage_dir("feat", "1.0.0", "requires_feature: openflow\n"));
    ok(s.stage().arg("deploy").arg(s.export(&[&feat], "feat.oci.tar")));
    ok(s.stage().args(["remove", "feat"]));
    ok(s.stage().args(["feature", "disable", "openflow"]));
    let out = run(s.stage().arg("deploy").arg(s.dir.path().join("feat.oci.tar")));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("feature enable openflow"), "{}", stderr(&out));
}

// Versions are immutable: building one that exists is refused (exit 4) unless --force.
#[test]
fn build_refuses_to_replace_a_version() {
    let s = Scratch::new();
    let dir = s.stage_dir("app", "1.0.0", "");
    s.build(&dir);
    fs::write(dir.join("share/x"), "changed\n").unwrap();
    let out = run(s.image().arg("build").arg(&dir));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("app:1.0.0") && stderr(&out).contains("--force"), "{}", stderr(&out));
    let out = run(s.image().args(["create", "app", "--version", "1.0.0", "--files"]).arg(dir.join("share/x")));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    ok(s.image().args(["build", "--force"]).arg(&dir));
}

// `init` creates a missing root; a command on a root never initialised says so.
#[test]
fn init_creates_the_root_and_others_name_init() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("missing/root");
    ok(Command::new(bin("op-dbus-stage")).arg("--root").arg(&root).arg("init"));
    assert!(root.join("var/lib/op-dbus/staging").is_dir());
    let empty = d.path().join("empty");
    fs::create_dir(&empty).unwrap();
    for args in [&["status"][..], &["list"], &["deploy", "app:1.0.0"], &["trust", "list"]] {
        let out = run(Command::new(bin("op-dbus-stage")).arg("--root").arg(&empty).args(args));
        assert!(!out.status.success(), "{args:?} succeeded on a root never initialised");
        assert!(
            stderr(&out).contains("not initialised") && stderr(&out).contains("init"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0, "a command wrote into a root never initialised");
}

// Without --store, a non-root user's store is under $XDG_DATA_HOME, not /var/lib.
#[test]
fn non_root_store_is_under_xdg_data_home() {
    assert!(is_root(), "this test switches to the user nobody: run it as root (CI does)");
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let data = d.path().join("data");
    fs::write(d.path().join("f"), "x\n").unwrap();
    let out = Command::new(bin("op-dbus-image"))
        .args(["-q", "create", "app", "--files"])
        .arg(d.path().join("f"))
        .env_remove("OP_DBUS_STORE")
        .env_remove("OP_DBUS_SIGNING_KEY")
        .env("XDG_DATA_HOME", &data)
        .env("HOME", d.path())
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(data.join("op-dbus/images/index.json").is_file(), "no store under $XDG_DATA_HOME/op-dbus/images");
}

// One rule: what the command line names and is not there exits 2, in both binaries.
#[test]
fn not_found_exits_2_everywhere() {
    let s = Scratch::new();
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()));
    s.build(&s.stage_dir("app", "1.0.0", ""));
    let missing = s.dir.path().join("missing.pub");
    let cases: Vec<Command> = vec![
        {
            let mut c = s.image();
            c.args(["inspect", "nope:1.0.0"]);
            c
        },
        {
            let mut c = s.image();
            c.args(["sign", "nope:1.0.0"]);
            c
        },
        {
            let mut c = s.image();
            c.args(["export", "nope:1.0.0", "--out"]).arg(s.dir.path().join("x.tar"));
            c
        },
        {
            let mut c = s.image();
            c.args(["key", "show"]).arg(&missing);
            c
        },
        {
            let mut c = s.stage();
            c.args(["trust", "add"]).arg(&missing);
            c
        },
        {
            let mut c = s.stage();
            c.args(["remove", "nope"]);
            c
        },
        {
            let mut c = s.stage();
            c.args(["rollback", "nope"]);
            c
        },
        {
            let mut c = s.stage();
            c.args(["verify", "nope"]);
            c
        },
        {
            let mut c = s.stage();
            c.args(["restore", "pre-nope-20260101T000000Z"]);
            c
        },
        {
            let mut c = s.stage();
            c.args(["deploy", "nope:1.0.0"]);
            c
        },
        {
            let mut c = s.stage();
            c.args(["deploy", "./missing.oci.tar"]);
            c
        },
    ];
    for mut c in cases {
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(2), "{c:?}: {}", stderr(&out));
    }
}

// A public key given as the signing key is called one, not a key to chmod.
#[test]
fn public_key_as_signing_key_says_so() {
    let s = Scratch::new();
    let dir = s.stage_dir("app", "1.0.0", "");
    let out = run(image(&s.store(), Some(&s.pub_key())).arg("build").arg(&dir));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("public key") && !err.contains("chmod"), "{err}");
    assert!(err.contains(&s.key().display().to_string()), "name the private key beside it: {err}");
}

// `restore` that would remove stages asks on a terminal; --yes skips the question.
#[test]
fn restore_that_removes_stages_asks_on_a_terminal() {
    let script = require_tool("script", "bsdutils");
    let s = Scratch::new();
    ok(s.stage().args(["trust", "add"]).arg(s.pub_key()));
    let app = s.build(&s.stage_dir("app", "1.0.0", ""));
    ok(s.stage().arg("deploy").arg(s.export(&[&app], "app.oci.tar")));
    let snaps = json(&ok(s.stage().args(["--json", "snapshots"])));
    let pre = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .find(|n| n.starts_with("pre-app"))
        .unwrap()
        .to_owned();
    let cmd = format!("{} --root {} restore {pre}", bin("op-dbus-stage").display(), s.root().display());
    // Answer "n" on a terminal: nothing changes.
    let mut child = Command::new(&script)
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let _ = stdin.write_all(b"n\n");
    }
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("remove") && shown.contains("app"), "no question: {shown}");
    assert!(!out.status.success(), "declined, yet succeeded: {shown}");
    let listed = json(&ok(s.stage().args(["--json", "list"])));
    assert_eq!(listed["stages"][0]["status"], "deployed", "declined, yet app was removed");
    // --yes on a terminal goes ahead.
    let out = Command::new(&script)
        .args(["-qec", &format!("{cmd} --yes"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let listed = json(&ok(s.stage().args(["--json", "list"])));
    assert!(listed["stages"].as_array().unwrap().iter().all(|x| x["status"] != "deployed"), "{listed}");
}

// The same error gives the same exit code in both binaries.
#[test]
fn same_error_same_exit_code_in_both_binaries() {
    let s = Scratch::new();
    let d = s.dir.path();
    let garbage = d.join("garbage.pub");
    fs::write(&garbage, "not a key\n").unwrap();
    let a_dir = d.join("a-directory.pub");
    fs::create_dir(&a_dir).unwrap();
    let missing = d.join("missing.pub");
    for (what, file) in [("malformed key", &garbage), ("a directory as key", &a_dir), ("missing key", &missing)] {
        let img = run(s.image().args(["key", "show"]).arg(file));
        let stg = run(s.stage().args(["trust", "add"]).arg(file));
        assert!(!img.status.success() && !stg.status.success(), "{what}");
        assert_eq!(
            img.status.code(),
            stg.status.code(),
            "{what}: op-dbus-image {}, op-dbus-stage {}\n{}\n{}",
            img.status.code().unwrap_or(-1),
            stg.status.code().unwrap_or(-1),
            stderr(&img),
            stderr(&stg)
        );
    }
}
