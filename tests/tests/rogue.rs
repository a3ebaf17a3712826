//! A signer gone rogue and an unprivileged local user: images signed by a trusted key, and
//! a host where a user owns a directory under an allowed prefix, that still must not make
//! the installer write where it should not, forget what it deployed, or wedge.
//!
//! Each test drives the real `op-dbus-stage` into a scratch root and checks, besides the
//! exit code, that nothing changed that should not have and that the host stays usable
//! (`recover`, `list`, a good deploy) afterwards.

mod hostile_util;
mod util;

use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use hostile_util::*;
use util::ok;

fn trusted_host() -> (Host, keys::PrivateKey) {
    let host = Host::new();
    let key = host.key("signing.key");
    host.trust("signing.key");
    (host, key)
}

/// The host still works: `recover` and `list` succeed and the base image deploys.
fn still_usable(host: &Host, key: &keys::PrivateKey) {
    ok(host.stage().arg("recover"));
    ok(host.stage().arg("list"));
    let good = host.export(&Forge::tar(key, &base_raw()));
    let run = host.deploy(&good, &[]);
    assert_eq!(run.code(), 0, "a good image no longer deploys: {}", run.stderr());
}

/// A forge of the base payload under another stage name.
fn named<'k>(key: &'k keys::PrivateKey, name: &str) -> Forge<'k> {
    // A target of its own: nothing but the name stands in its way.
    let mut config = config(name, json!([{"path": "d/f", "target": "/usr/local/bin/named-f"}]), base_entries());
    config["name"] = json!(name);
    let mut f = Forge::new(key, &config, vec![zst(&tar_bytes(&base_raw()))]);
    f.name = name.into();
    f
}

/// The base stage at `version`, its `d/f` placed at `target`.
fn versioned<'k>(key: &'k keys::PrivateKey, version: &str, target: &str) -> Forge<'k> {
    let mut config = config(NAME, json!([{"path": "d/f", "target": target}]), base_entries());
    config["version"] = json!(version);
    let mut f = Forge::new(key, &config, vec![zst(&tar_bytes(&base_raw()))]);
    f.version = version.into();
    f
}

fn write_policy(host: &Host, text: &str) {
    fs::write(host.root().join("etc/op-dbus/stage.toml"), text).unwrap();
}

fn active_version(host: &Host) -> String {
    let list = util::json(&ok(host.stage().args(["--json", "list"])));
    let stages = list["stages"].as_array().unwrap();
    let active = stages.iter().find(|s| s["name"] == NAME && s["status"] == "deployed");
    active.map(|s| s["version"].as_str().unwrap().to_owned()).unwrap_or_default()
}

// 1. Stage names that are the installer's own files.
#[test]
fn stage_names_that_are_the_installers_own_files_are_refused() {
    let (host, key) = trusted_host();
    // Something deployed, so that losing state.json would show.
    let first = host.export(&Forge::tar(&key, &base_raw()));
    assert_eq!(host.deploy(&first, &[]).code(), 0);
    let mut cases = Vec::new();
    for name in ["state.json", "lock", "journal", "snapshots", "backups", "Backups", "x.json"] {
        cases.push(case(format!("stage named {name}"), host.export(&named(&key, name)), MALFORMED));
        // With a failing verify command too: that is how state.json was once deleted.
        let mut f = named(&key, name);
        let mut config: Value = serde_json::from_slice(&f.config).unwrap();
        config["verify"] = json!([{"command": "false"}]);
        f.config = to_bytes(&config);
        cases.push(case(format!("stage named {name}, failing verify"), host.export(&f), MALFORMED));
    }
    run_cases(&host, cases);
    let state = fs::read_to_string(host.root().join("var/lib/op-dbus/staging/state.json")).unwrap();
    assert!(state.contains("\"app\""), "the state forgot the deployed stage: {state}");
    still_usable(&host, &key);
}

// 2. A staged symlink that escapes through another staged symlink.
#[test]
fn a_link_chain_that_resolves_out_of_the_stage_is_refused() {
    let (host, key) = trusted_host();
    let chain = |links: Vec<(&str, &str)>, target_of: &str| {
        let mut entries = base_entries();
        let mut raw = base_raw();
        for (path, text) in &links {
            entries.push(e_link(path, text));
            raw.push(symlink(path, text));
        }
        // Entries are signed sorted.
        entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        let files = json!([{"path": target_of, "target": "/usr/local/bin/chained"}]);
        host.export(&Forge::new(&key, &config(NAME, files, entries), vec![zst(&tar_bytes(&raw))]))
    };
    let cases = vec![
        case(
            "a -> b/../../../../etc/shadow, b -> ../../x",
            chain(vec![("a", "b/../../../../etc/shadow"), ("b", "../../x")], "a"),
            MALFORMED,
        ),
        case("a -> d/up/../../etc, d/up -> ..", chain(vec![("a", "d/up/../../etc"), ("d/up", "..")], "a"), MALFORMED),
        case("a -> b, b -> a (a loop)", chain(vec![("a", "b"), ("b", "a")], "a"), MALFORMED),
        case(
            "three links, the last climbs out",
            chain(vec![("a", "b/x"), ("b", "c"), ("c", "d/../..")], "a"),
            MALFORMED,
        ),
    ];
    run_cases(&host, cases);
    // A chain that stays inside still deploys.
    let inside = chain(vec![("a", "b/f"), ("b", "d")], "a");
    let run = host.deploy(&inside, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    still_usable(&host, &key);
}

// 3. Targets judged by where they resolve: a user's symlink is never followed, and the
// allowed prefixes hold for the resolved path.
#[test]
fn targets_never_go_through_a_users_symlink_or_out_of_the_prefixes() {
    let (host, key) = trusted_host();
    let root = host.root();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/shadow"), b"root:secret\n").unwrap();
    // An unprivileged user owns /var/www/site and points `static` at /etc.
    fs::create_dir_all(root.join("var/www/site")).unwrap();
    std::os::unix::fs::chown(root.join("var/www/site"), Some(1234), Some(1234)).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("var/www/site/static")).unwrap();
    lchown(root.join("var/www/site/static"), Some(1234), Some(1234)).unwrap();
    // And a relative one, and one through a directory of theirs.
    std::os::unix::fs::symlink("../../../etc", root.join("var/www/site/rel")).unwrap();
    lchown(root.join("var/www/site/rel"), Some(1234), Some(1234)).unwrap();
    // Root's own link out of the prefixes: followed (root made it), but the resolved
    // target is outside the allowed prefixes.
    fs::create_dir_all(root.join("usr/local")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("usr/local/etc-link")).unwrap();
    // Root's link into the installer's own area.
    std::os::unix::fs::symlink("/var/lib/op-dbus/staging", root.join("usr/local/staging-link")).unwrap();
    let placed = |kind: &str, target: &str| {
        let files = json!([{"path": "d/f", "target": target, "type": kind}]);
        host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&base_raw()))]))
    };
    let cases = vec![
        case("copy through a user's absolute link", placed("copy", "/var/www/site/static/shadow"), POLICY),
        case("symlink through a user's absolute link", placed("symlink", "/var/www/site/static/shadow"), POLICY),
        case("copy through a user's relative link", placed("copy", "/var/www/site/rel/shadow"), POLICY),
        case("through a user's link, a new file", placed("copy", "/var/www/site/static/new"), POLICY),
        case("through root's link to /etc", placed("copy", "/usr/local/etc-link/shadow"), POLICY),
        case("through root's link into staging", placed("symlink", "/usr/local/staging-link/state.json"), POLICY),
    ];
    run_cases(&host, cases);
    assert_eq!(fs::read(root.join("etc/shadow")).unwrap(), b"root:secret\n");
    // A plain directory the user owns is written into (the file is the stage's), and
    // root's link that stays inside the prefixes is followed.
    fs::create_dir_all(root.join("opt/real")).unwrap();
    std::os::unix::fs::symlink("/opt/real", root.join("usr/local/to-opt")).unwrap();
    let files = json!([
        {"path": "d/f", "target": "/var/www/site/index.html"},
        {"path": "l", "target": "/usr/local/to-opt/l"},
    ]);
    let fine = host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&base_raw()))]));
    let run = host.deploy(&fine, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(root.join("var/www/site/index.html").is_symlink());
    assert!(root.join("opt/real/l").is_symlink());
    // The user swaps their directory for a link after the deploy: removing the stage
    // does not follow it either.
    ok(host.stage().args(["remove", NAME]));
    still_usable(&host, &key);
}

// 5. A target name as long as a name can be: the temp names fit, and a transaction whose
// undo fails never wedges the host.
#[test]
fn a_255_byte_target_name_deploys_and_a_failed_undo_does_not_wedge_recovery() {
    let (host, key) = trusted_host();
    let long = format!("/usr/local/bin/{}", "x".repeat(255));
    let mut f = versioned(&key, "1.0.0", &long);
    let mut config: Value = serde_json::from_slice(&f.config).unwrap();
    config["files"] =
        json!([{"path": "d/f", "target": long, "type": "copy"}, {"path": "l", "target": format!("{long}-not")}]);
    f.config = to_bytes(&config);
    // The second target's last component is 259 bytes: refused as malformed, not wedged.
    let bad = host.export(&f);
    let run = host.deploy(&bad, &[]);
    assert_eq!(run.code(), 7, "{}", run.stderr());
    still_usable(&host, &key);
    ok(host.stage().args(["remove", NAME]));
    // 255 bytes exactly: deploys, with a failing verify rolls back cleanly, and removes.
    let mut f = versioned(&key, "1.0.0", &long);
    let good = host.export(&f);
    let run = host.deploy(&good, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(host.root().join(long.trim_start_matches('/')).is_symlink());
    ok(host.stage().args(["remove", NAME]));
    let mut config: Value = serde_json::from_slice(&f.config).unwrap();
    config["files"] = json!([{"path": "d/f", "target": long, "type": "copy"}]);
    config["verify"] = json!([{"command": "false"}]);
    f.config = to_bytes(&config);
    let failing = host.export(&f);
    let run = host.deploy(&failing, &[]);
    assert_eq!(run.code(), 5, "{}", run.stderr());
    assert!(!host.root().join(long.trim_start_matches('/')).exists());
    still_usable(&host, &key);

    // A journal whose undo cannot succeed (what it would put back has nowhere to go):
    // `recover` says so once, keeps the journal aside, and every later command works.
    let staging = host.root().join("var/lib/op-dbus/staging");
    let state: Value = serde_json::from_slice(&fs::read(staging.join("state.json")).unwrap()).unwrap();
    fs::create_dir_all(staging.join("backups")).unwrap();
    fs::write(staging.join("backups/b999-1"), b"operator's file").unwrap();
    let journal = json!({
        "txid": state["txid"].as_u64().unwrap() + 1,
        "operation": "deploy forged",
        "steps": [{"op": "backup", "target": "/opt/gone/deeper/file", "backup": "b999-1"}],
        "before": state,
        "after": state,
    });
    fs::write(staging.join("journal/tx.json"), serde_json::to_vec(&journal).unwrap()).unwrap();
    let first = util::run(host.stage().arg("recover"));
    assert!(!first.status.success());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("could not be undone") && err.contains("failed-"), "{err}");
    assert!(!staging.join("journal/tx.json").exists());
    assert!(staging.join("backups/b999-1").exists(), "the operator's file was lost");
    still_usable(&host, &key);
}

// 9. Rollback and restore re-check the signatures and today's policy.
#[test]
fn rollback_and_restore_check_signatures_and_policy_again() {
    let host = Host::new();
    let old_key = host.key("old.key");
    let new_key = host.key("new.key");
    host.trust("old.key");
    host.trust("new.key");
    let v1 = host.export(&versioned(&old_key, "1.0.0", "/opt/app/tool"));
    let v2 = host.export(&versioned(&new_key, "2.0.0", "/usr/local/bin/tool"));
    assert_eq!(host.deploy(&v1, &[]).code(), 0);
    assert_eq!(host.deploy(&v2, &[]).code(), 0);
    // The snapshot in which 1.0.0 is the active generation.
    let with_v1 = fs::read_dir(host.root().join("var/lib/op-dbus/staging/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .find(|p| {
            let s: Value = serde_json::from_slice(&fs::read(p).unwrap()).unwrap();
            s["stages"][NAME]["active"]["version"] == "1.0.0"
        })
        .unwrap();
    let pre_v2 = with_v1.file_stem().unwrap().to_string_lossy().into_owned();
    // The old key is revoked: going back to what it signed is refused like a deploy.
    ok(host.stage().args(["trust", "revoke", &old_key.key_id().to_string()]));
    let before = host.snapshot();
    let run = util::run(host.stage().args(["rollback", NAME]));
    assert_eq!(run.status.code(), Some(3), "{}", String::from_utf8_lossy(&run.stderr));
    let run = util::run(host.stage().args(["restore", &pre_v2]));
    assert_eq!(run.status.code(), Some(3), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(before, host.snapshot(), "{}", diff(&before, &host.snapshot()));
    assert_eq!(active_version(&host), "2.0.0");

    // Trusted again, but /opt is no longer allowed: refused by policy.
    let host2 = Host::new();
    let key = host2.key("k");
    host2.trust("k");
    let v1 = host2.export(&versioned(&key, "1.0.0", "/opt/app/tool"));
    let v2 = host2.export(&versioned(&key, "2.0.0", "/usr/local/bin/tool"));
    assert_eq!(host2.deploy(&v1, &[]).code(), 0);
    assert_eq!(host2.deploy(&v2, &[]).code(), 0);
    write_policy(&host2, "allowed_prefixes = [\"/usr/local\"]\n");
    let before = host2.snapshot();
    let run = util::run(host2.stage().args(["rollback", NAME]));
    assert_eq!(run.status.code(), Some(4), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(before, host2.snapshot());
    // The key's scope narrowed to /usr/local: refused too.
    write_policy(&host2, &format!("[scope_prefixes]\n\"{}\" = [\"/usr/local\"]\n", key.key_id()));
    let before = host2.snapshot();
    let run = util::run(host2.stage().args(["rollback", NAME]));
    assert_eq!(run.status.code(), Some(4), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("scope_prefixes"));
    assert_eq!(before, host2.snapshot());
    // With the policy back, the same rollback works.
    write_policy(&host2, "");
    ok(host2.stage().args(["rollback", NAME]));
    assert_eq!(active_version(&host2), "1.0.0");
}

// 10. A file in the current directory never stands in for a store reference.
#[test]
fn a_file_named_like_a_store_reference_is_ambiguous() {
    let (host, key) = trusted_host();
    let v2 = host.export(&versioned(&key, "2.0.0", "/usr/local/bin/tool"));
    let cwd = host.work().join("cwd");
    fs::create_dir_all(&cwd).unwrap();
    fs::copy(&v2, cwd.join("app:2.0.0")).unwrap();
    let before = host.snapshot();
    let run = util::run(host.stage().current_dir(&cwd).args(["deploy", "app:2.0.0"]));
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("ambiguous") && err.contains("local store") && err.contains("./app:2.0.0"), "{err}");
    assert_eq!(before, host.snapshot());
    // Spelled as a path, it is the file.
    ok(host.stage().current_dir(&cwd).args(["deploy", "./app:2.0.0"]));
    assert_eq!(active_version(&host), "2.0.0");
    // A registry-looking relative path that exists is ambiguous too.
    fs::create_dir_all(cwd.join("registry.example")).unwrap();
    fs::copy(&v2, cwd.join("registry.example/app:2.0.0")).unwrap();
    let run = util::run(host.stage().current_dir(&cwd).args(["deploy", "registry.example/app:2.0.0"]));
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("registry reference"));
    // Names ending in .tar are files, whatever else they look like.
    let run = util::run(host.stage().current_dir(&cwd).args(["deploy", "missing.oci.tar"]));
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no such file"));
}

// 11. A copy whose staged path is a symlink: refused by the installer (exit 7, nothing
// stored) and by the builder.
#[test]
fn a_copy_of_a_staged_symlink_is_refused_not_a_panic() {
    let (host, key) = trusted_host();
    let copy_of = |kind: &str, path: &str| {
        let files = json!([{"path": path, "target": "/etc/op-dbus/app.conf", "type": kind}]);
        host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&base_raw()))]))
    };
    let cases = vec![
        case("copy of a staged symlink", copy_of("copy", "l"), MALFORMED),
        case("copy-if-not-exists of a staged symlink", copy_of("copy-if-not-exists", "l"), MALFORMED),
        case("copy of a staged directory", copy_of("copy", "d"), MALFORMED),
    ];
    run_cases(&host, cases);
    still_usable(&host, &key);

    // The builder refuses such a stage folder with exit 7.
    let stage = host.work().join("stage");
    fs::create_dir_all(stage.join("etc")).unwrap();
    fs::write(stage.join("etc/real.conf"), b"x=1\n").unwrap();
    std::os::unix::fs::symlink("real.conf", stage.join("etc/app.conf")).unwrap();
    fs::write(
        stage.join("manifest.yaml"),
        "name: linky\nversion: 1.0.0\nfiles:\n  - path: etc/app.conf\n    target: /etc/op-dbus/app.conf\n    type: copy\n",
    )
    .unwrap();
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o755)).unwrap();
    let store = host.work().join("store");
    let out = util::run(
        Command::new(util::bin("op-dbus-image"))
            .arg("--store")
            .arg(&store)
            .args(["build", "--format", "tar"])
            .arg(&stage),
    );
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etc/app.conf") && err.contains("symlink"), "{err}");
    assert!(
        !Path::new(&store).join("index.json").exists()
            || !fs::read_to_string(store.join("index.json")).unwrap().contains("linky")
    );
}
