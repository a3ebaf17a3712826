//! End-to-end tests of pulling from a channel: `op-dbus-image channel set` publishes a
//! signed channel document to a real registry (Debian's `docker-registry` on 127.0.0.1,
//! started for each test and killed on drop), and `op-dbus-stage update` on scratch host
//! roots takes what it offers: newer versions with what they need, only on the hosts the
//! rollout reaches, never from a document whose signature does not hold. Also: the shipped
//! systemd units pass `systemd-analyze verify`.

mod util;

use std::fs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::registry::Registry;
use util::*;

/// The build machine (store and key) and the registry prefix it publishes to.
struct Builder {
    dir: tempfile::TempDir,
    prefix: String,
}

impl Builder {
    fn new(reg: &Registry) -> Builder {
        let dir = tempfile::tempdir().unwrap();
        keygen(dir.path(), "signing.key");
        Builder { dir, prefix: format!("{}/op-dbus", reg.host()) }
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("signing.key")
    }
    fn image(&self) -> Command {
        let mut c = image(&self.dir.path().join("store"), Some(&self.key()));
        c.env_remove("REGISTRY_AUTH_FILE").env("HOME", self.dir.path());
        c
    }
    /// Builds NAME VERSION (with `extra` manifest lines) and pushes it to PREFIX/NAME.
    fn publish(&self, name: &str, version: &str, extra: &str) {
        let src = self.dir.path().join(format!("src-{name}-{version}"));
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(
            src.join("manifest.yaml"),
            format!(
                "name: {name}\nversion: {version}\n{extra}files:\n  - path: bin/{name}\n    target: \
                 /usr/local/bin/{name}\n"
            ),
        )
        .unwrap();
        fs::write(src.join("bin").join(name), format!("#!/bin/sh\necho {name} {version}\n")).unwrap();
        ok(self.image().args(["-q", "build"]).arg(&src));
        ok(self.image().args(["-q", "push", &format!("{name}:{version}"), &format!("{}/{name}", self.prefix)]));
    }
    /// `channel set PREFIX --channel stable IMAGES... --rollout N`.
    fn channel(&self, images: &[&str], rollout: u8) -> serde_json::Value {
        json(&ok(self
            .image()
            .args(["--json", "channel", "set", &self.prefix, "--channel", "stable", "--rollout", &rollout.to_string()])
            .args(images)))
    }
}

/// A host root that trusts the builder's key, with the machine id given.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new(b: &Builder, machine_id: &str) -> Host {
        let h = Host { dir: tempfile::tempdir().unwrap() };
        fs::create_dir_all(h.root().join("etc")).unwrap();
        fs::write(h.root().join("etc/machine-id"), format!("{machine_id}\n")).unwrap();
        ok(h.stage().arg("init"));
        ok(h.stage().args(["trust", "add"]).arg(b.dir.path().join("signing.key.pub")));
        h
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root()).env_remove("REGISTRY_AUTH_FILE").env("HOME", self.dir.path());
        c
    }
    fn update(&self, b: &Builder, extra: &[&str]) -> Command {
        let mut c = self.stage();
        c.args(["--json", "update", "--from", &b.prefix, "--channel", "stable"]).args(extra);
        c
    }
    /// NAME:VERSION of each deployed stage.
    fn deployed(&self) -> Vec<String> {
        let list = json(&ok(self.stage().args(["--json", "list"])));
        list["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["status"] == "deployed")
            .map(|x| format!("{}:{}", x["name"].as_str().unwrap(), x["version"].as_str().unwrap()))
            .collect()
    }
    /// The installer's state and history, to show that nothing changed.
    fn fingerprint(&self) -> (String, String) {
        (ok(self.stage().args(["--json", "list"])), ok(self.stage().args(["--json", "history"])))
    }
}

/// A machine id whose place in the rollouts of `stable` is below (`inside`) or at least `rollout`.
fn machine_id(rollout: u8, inside: bool) -> String {
    (0u32..)
        .map(|i| format!("{:032x}", 0x5eed_0000_u64 + u64::from(i)))
        .find(|id| (formats::channel::rollout_bucket(id, "stable") < rollout) == inside)
        .unwrap()
}

/// The content of the file the link `path` of `root` points to (an absolute target, inside `root`).
fn linked(root: &Path, path: &str) -> String {
    let target = fs::read_link(root.join(path)).unwrap();
    fs::read_to_string(root.join(target.strip_prefix("/").unwrap_or(&target))).unwrap()
}

fn actions(report: &serde_json::Value) -> Vec<String> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}:{}", s["name"].as_str().unwrap(), s["action"].as_str().unwrap()))
        .collect()
}

#[test]
fn update_takes_a_new_channel_version_with_its_dependency_and_then_changes_nothing() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    b.channel(&["app:1.0.0"], 100);
    let host = Host::new(&b, &machine_id(100, true));

    // A stage the host does not run is not installed, unless --all.
    let r = json(&ok(&mut host.update(&b, &[])));
    assert_eq!(actions(&r), ["app:not-deployed"], "{r}");
    assert!(host.deployed().is_empty());
    let r = json(&ok(&mut host.update(&b, &["--all"])));
    assert_eq!(actions(&r), ["app:update"], "{r}");
    assert_eq!(host.deployed(), ["app:1.0.0"]);
    assert!(linked(&host.root(), "usr/local/bin/app").contains("app 1.0.0"));

    // A new version that needs a stage the host lacks: both come, as one transaction.
    b.publish("lib", "1.0.0", "");
    b.publish("app", "1.1.0", "dependencies:\n  - lib >=1.0\n");
    let set = b.channel(&["app:1.1.0", "lib:1.0.0"], 100);
    assert_eq!(set["channel"]["rollout"], 100, "{set}");
    // A dry run says what would come and changes nothing.
    let before = host.fingerprint();
    let r = json(&ok(&mut host.update(&b, &["--dry-run"])));
    assert_eq!(actions(&r), ["app:update", "lib:dependency"], "{r}");
    assert_eq!(r["dry_run"], true, "{r}");
    assert_eq!(host.fingerprint(), before);
    let r = json(&ok(&mut host.update(&b, &[])));
    assert_eq!(actions(&r), ["app:update", "lib:dependency"], "{r}");
    assert_eq!(r["deploy"]["deployed"].as_array().unwrap().len(), 1, "one transaction: {r}");
    let mut deployed = host.deployed();
    deployed.sort();
    assert_eq!(deployed, ["app:1.1.0", "lib:1.0.0"]);
    assert!(linked(&host.root(), "usr/local/bin/app").contains("app 1.1.0"));

    // The host runs what the channel offers: nothing is fetched, deployed or recorded.
    let before = host.fingerprint();
    let r = json(&ok(&mut host.update(&b, &[])));
    assert_eq!(actions(&r), ["app:up-to-date", "lib:up-to-date"], "{r}");
    assert!(r.get("deploy").is_none(), "{r}");
    assert_eq!(host.fingerprint(), before);

    // A channel that goes back to an older version never downgrades.
    b.channel(&["app:1.0.0"], 100);
    let r = json(&ok(&mut host.update(&b, &[])));
    assert_eq!(actions(&r), ["app:newer-running"], "{r}");
    assert_eq!(host.fingerprint(), before);
}

#[test]
fn rollout_reaches_the_same_subset_of_hosts_and_grows_from_it() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    b.channel(&["app:1.0.0"], 100);
    let inside = Host::new(&b, &machine_id(30, true));
    let outside = Host::new(&b, &machine_id(30, false));
    for h in [&inside, &outside] {
        ok(&mut h.update(&b, &["--all"]));
        assert_eq!(h.deployed(), ["app:1.0.0"]);
    }

    b.publish("app", "2.0.0", "");
    b.channel(&["app:2.0.0"], 30);
    let r = json(&ok(&mut inside.update(&b, &[])));
    assert_eq!(r["in_rollout"], true, "{r}");
    assert!(r["bucket"].as_u64().unwrap() < 30, "{r}");
    assert_eq!(inside.deployed(), ["app:2.0.0"]);
    // The host outside stays where it is, however often its timer runs.
    let before = outside.fingerprint();
    for _ in 0..2 {
        let r = json(&ok(&mut outside.update(&b, &[])));
        assert_eq!(r["in_rollout"], false, "{r}");
        assert!(r["bucket"].as_u64().unwrap() >= 30, "{r}");
        assert_eq!(actions(&r), ["app:outside-rollout"], "{r}");
    }
    assert_eq!(outside.deployed(), ["app:1.0.0"]);
    assert_eq!(outside.fingerprint(), before);

    // The whole fleet once the rollout is raised.
    b.channel(&["app:2.0.0"], 100);
    ok(&mut outside.update(&b, &[]));
    assert_eq!(outside.deployed(), ["app:2.0.0"]);

    // A rollout under 100 places hosts by their machine id: without one, nothing happens.
    b.publish("app", "3.0.0", "");
    b.channel(&["app:3.0.0"], 50);
    fs::remove_file(inside.root().join("etc/machine-id")).unwrap();
    let (code, err) = fails(&mut inside.update(&b, &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("machine-id") && err.contains("systemd-machine-id-setup"), "{err}");
    assert_eq!(inside.deployed(), ["app:2.0.0"]);
}

/// `GET` the channel manifest `PREFIX:stable` with curl.
fn get_manifest(reg: &Registry) -> serde_json::Value {
    let curl = require_tool("curl", "curl");
    json(&ok(Command::new(curl).args([
        "-sSf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{}/v2/op-dbus/manifests/stable", reg.host()),
    ])))
}

/// `PUT` `manifest` as `PREFIX:stable` with curl.
fn put_manifest(reg: &Registry, manifest: &serde_json::Value, dir: &Path) {
    let file = dir.join("manifest.json");
    fs::write(&file, serde_json::to_vec(manifest).unwrap()).unwrap();
    ok(Command::new(require_tool("curl", "curl"))
        .args(["-sSf", "-X", "PUT", "-H", "Content-Type: application/vnd.oci.image.manifest.v1+json"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{}/v2/op-dbus/manifests/stable", reg.host())));
}

#[test]
fn a_channel_whose_signature_does_not_hold_is_refused_with_exit_3() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    b.publish("app", "1.1.0", "");
    b.channel(&["app:1.0.0"], 100);
    let host = Host::new(&b, &machine_id(100, true));
    ok(&mut host.update(&b, &["--all"]));
    b.channel(&["app:1.1.0"], 100);
    let before = host.fingerprint();

    // The signature altered (the document as signed, the key named trusted).
    let good = get_manifest(&reg);
    let mut bad = good.clone();
    let sig = good["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"].as_str().unwrap().to_owned();
    let flipped = match sig.strip_prefix('A') {
        Some(rest) => format!("B{rest}"),
        None => format!("A{}", &sig[1..]),
    };
    bad["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"] = flipped.into();
    put_manifest(&reg, &bad, b.dir.path());
    let (code, err) = fails(&mut host.update(&b, &[]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not verify") && err.contains("nothing was changed"), "{err}");

    // No signature at all.
    let mut unsigned = good.clone();
    unsigned["layers"][0]["annotations"].as_object_mut().unwrap().remove("dev.cosignproject.cosign/signature");
    put_manifest(&reg, &unsigned, b.dir.path());
    let (code, err) = fails(&mut host.update(&b, &[]));
    assert_eq!(code, 3, "{err}");

    // Signed by a key the host does not trust.
    let stranger = keygen(b.dir.path(), "stranger.key");
    let mut c = image(&b.dir.path().join("store"), Some(&stranger));
    c.env_remove("REGISTRY_AUTH_FILE").env("HOME", b.dir.path());
    ok(c.args(["-q", "channel", "set", &b.prefix, "--channel", "stable", "app:1.1.0"]));
    let (code, err) = fails(&mut host.update(&b, &[]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("trust add"), "{err}");

    // A good document of another channel served under this one's tag.
    ok(b.image().args(["-q", "channel", "set", &b.prefix, "--channel", "beta", "app:1.1.0"]));
    let beta = json(&ok(Command::new(require_tool("curl", "curl")).args([
        "-sSf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{}/v2/op-dbus/manifests/beta", reg.host()),
    ])));
    put_manifest(&reg, &beta, b.dir.path());
    let (code, err) = fails(&mut host.update(&b, &[]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("another channel"), "{err}");

    assert_eq!(host.deployed(), ["app:1.0.0"]);
    assert_eq!(host.fingerprint(), before);
    // The good document, back in place, is taken.
    put_manifest(&reg, &good, b.dir.path());
    ok(&mut host.update(&b, &[]));
    assert_eq!(host.deployed(), ["app:1.1.0"]);
}

#[test]
fn channel_set_refuses_an_image_not_in_the_registry() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    let src = b.dir.path().join("src-app-1.0.0");
    fs::write(
        src.join("manifest.yaml"),
        "name: app\nversion: 1.2.0\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n",
    )
    .unwrap();
    ok(b.image().args(["-q", "build"]).arg(&src));
    let (code, err) = fails(b.image().args(["channel", "set", &b.prefix, "app:1.2.0"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("push it first"), "{err}");
}

#[test]
fn shipped_systemd_units_verify() {
    let analyze = require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("dist/systemd");
    // `verify` wants the ExecStart binary to exist: point it at the one just built.
    for name in ["op-dbus-update.service", "op-dbus-update.timer"] {
        let text = fs::read_to_string(units.join(name)).unwrap();
        assert!(
            name.ends_with(".timer")
                || (text.contains("ExecStart=/usr/local/bin/op-dbus-stage ") && text.contains(" update --from ")),
            "{text}"
        );
        let text = text.replace("/usr/local/bin/op-dbus-stage", bin("op-dbus-stage").to_str().unwrap());
        fs::write(dir.path().join(name), text).unwrap();
    }
    let timer = fs::read_to_string(units.join("op-dbus-update.timer")).unwrap();
    assert!(timer.contains("RandomizedDelaySec="), "{timer}");
    let out = run(Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("op-dbus-update.service"))
        .arg(dir.path().join("op-dbus-update.timer"))
        .env("SYSTEMD_LOG_LEVEL", "notice"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
}

#[test]
fn a_channel_document_older_than_one_taken_is_refused() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    b.publish("app", "1.1.0", "");
    b.channel(&["app:1.0.0"], 100);
    let host = Host::new(&b, &machine_id(100, true));
    ok(&mut host.update(&b, &["--all"]));
    // 1.1.0 offered to every host, then halted (rollout 0) before this host looked.
    b.channel(&["app:1.1.0"], 100);
    let offered = get_manifest(&reg);
    std::thread::sleep(Duration::from_millis(1100));
    b.channel(&["app:1.1.0"], 0);
    let r = json(&ok(&mut host.update(&b, &[])));
    assert_eq!(actions(&r), ["app:outside-rollout"], "{r}");
    // The superseded document, signed and valid, served again: refused, not taken.
    put_manifest(&reg, &offered, b.dir.path());
    let before = host.fingerprint();
    let (code, err) = fails(&mut host.update(&b, &[]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("older than the one this host took before"), "{err}");
    assert_eq!(host.deployed(), ["app:1.0.0"]);
    assert_eq!(host.fingerprint(), before);
}

/// The service's `ExecStart=` as systemd runs it: `${VAR}` words from `Environment=` and
/// the environment file (which wins), the binary the one just built, and `--root ROOT`.
fn service_command(env_file: &str, root: &Path) -> Command {
    let unit = fs::read_to_string(repo().join("dist/systemd/op-dbus-update.service")).unwrap();
    let mut vars = std::collections::BTreeMap::new();
    let assignments = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .chain(env_file.lines())
        .filter_map(|l| l.split_once('='));
    for (k, v) in assignments {
        vars.insert(format!("${{{k}}}"), v.to_owned());
    }
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let mut words = exec.split_whitespace().map(|w| vars.get(w).cloned().unwrap_or_else(|| w.to_owned()));
    assert_eq!(words.next().unwrap(), "/usr/local/bin/op-dbus-stage");
    let mut c = Command::new(bin("op-dbus-stage"));
    c.args(words).arg("--root").arg(root).env_remove("REGISTRY_AUTH_FILE");
    c
}

#[test]
fn the_timer_service_command_takes_a_new_channel_version() {
    let reg = Registry::start(None);
    let b = Builder::new(&reg);
    b.publish("app", "1.0.0", "");
    b.channel(&["app:1.0.0"], 100);
    let host = Host::new(&b, &machine_id(100, true));
    ok(&mut host.update(&b, &["--all"]));
    b.publish("app", "1.1.0", "");
    b.channel(&["app:1.1.0"], 100);
    // /etc/op-dbus/update.env as docs/commands.md writes it (the channel from the default).
    let env = format!("OP_DBUS_UPDATE_FROM={}\n", b.prefix);
    ok(&mut service_command(&env, &host.root()));
    assert_eq!(host.deployed(), ["app:1.1.0"]);
    assert!(linked(&host.root(), "usr/local/bin/app").contains("app 1.1.0"));
    // The next run finds nothing newer.
    let before = host.fingerprint();
    ok(&mut service_command(&format!("{env}OP_DBUS_UPDATE_CHANNEL=stable\n"), &host.root()));
    assert_eq!(host.fingerprint(), before);
}
