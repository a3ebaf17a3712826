//! End-to-end tests of secrets: `type: secret` files encrypted with age to the hosts'
//! recipients, carried as ciphertext only, decrypted into their targets on activation.
//! Needs Debian's `age` (the stock tool reads and writes what the binaries do).

mod util;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::registry::Registry;
use util::{Scratch, fails, json, ok, require_tool};

const TOKEN: &str = "s3cr3t-T0KEN-4f1c9a7e-never-in-clear";
const CONTROL: &str = "visible-CONTROL-9b2d5e13-in-clear";
const TARGET: &str = "etc/op-dbus/api-token";

impl Scratch {
    /// This host's recipient, as `op-dbus-stage identity` prints it.
    fn recipient(&self) -> String {
        let r = ok(self.stage().arg("identity")).trim().to_owned();
        let doc = json(&ok(self.stage().args(["identity", "--json"])));
        assert_eq!(doc["recipient"], r.as_str());
        r
    }
}

/// A stage folder `app-VERSION` with the secret `secrets/token.age` (owned 4242:4343, not
/// added yet) for `recipients`, and a plain copy holding [`CONTROL`].
fn secret_stage(s: &Scratch, version: &str, recipients: &[&str], secret_extra: &str) -> PathBuf {
    let extra = format!(
        "recipients: [{}]\nfiles:\n  - path: secrets/token.age\n    target: /{TARGET}\n    type: secret\n    owner: 4242\n    \
         group: \"4343\"\n{secret_extra}  - path: etc/visible.conf\n    target: /etc/op-dbus/visible.conf\n    type: copy\n",
        recipients.join(", ")
    );
    util::stage_dir(s.dir.path(), "app", version, &extra, &[("etc/visible.conf", CONTROL)])
}

/// `op-dbus-image secret add DIR secrets/token.age` with `plaintext` on stdin.
fn secret_add(s: &Scratch, dir: &Path, plaintext: &str) -> serde_json::Value {
    let mut child = s
        .image()
        .args(["--json", "secret", "add"])
        .arg(dir)
        .arg("secrets/token.age")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(plaintext.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "secret add: {}", String::from_utf8_lossy(&out.stderr));
    json(&String::from_utf8(out.stdout).unwrap())
}

/// Whether `needle` is in `bytes`, or in what they hold: zstd frames are decompressed and
/// tar archives opened, recursively (the layers of a store, an export, a registry).
fn holds(bytes: &[u8], needle: &[u8], depth: u32) -> bool {
    if bytes.windows(needle.len()).any(|w| w == needle) {
        return true;
    }
    if depth > 3 {
        return false;
    }
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut out = Vec::new();
        if zstd::stream::read::Decoder::new(bytes).and_then(|mut d| d.read_to_end(&mut out)).is_ok()
            && holds(&out, needle, depth + 1)
        {
            return true;
        }
    }
    if bytes.len() > 512 && &bytes[257..262] == b"ustar" {
        let mut a = tar::Archive::new(bytes);
        if let Ok(entries) = a.entries() {
            for mut e in entries.flatten() {
                let mut content = Vec::new();
                if e.read_to_end(&mut content).is_ok() && holds(&content, needle, depth + 1) {
                    return true;
                }
            }
        }
    }
    false
}

/// The files under `dir` (not following links) that hold `needle`, except `except`.
fn files_holding(dir: &Path, needle: &str, except: Option<&Path>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let meta = std::fs::symlink_metadata(&d).unwrap();
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file()
            && Some(d.as_path()) != except
            && holds(&std::fs::read(&d).unwrap(), needle.as_bytes(), 0)
        {
            found.push(d);
        }
    }
    found
}

/// The file at `path` in the layers of the exported archive `export`.
fn from_export(export: &Path, path: &str) -> Vec<u8> {
    let mut a = tar::Archive::new(std::fs::File::open(export).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut blob = Vec::new();
        e.read_to_end(&mut blob).unwrap();
        let Ok(layer) = zstd::decode_all(&blob[..]) else { continue };
        let mut inner = tar::Archive::new(&layer[..]);
        let Ok(entries) = inner.entries() else { continue };
        for f in entries {
            let mut f = f.unwrap();
            if f.path().unwrap().to_str() == Some(path) {
                let mut out = Vec::new();
                f.read_to_end(&mut out).unwrap();
                return out;
            }
        }
    }
    panic!("{path} is not in the layers of {}", export.display());
}

fn mode_owner(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn a_secret_is_ciphertext_in_the_store_export_registry_and_on_the_host_but_its_target_0600_owned_as_declared() {
    let reg = Registry::start(None);
    let s = Scratch::trusted();
    let r = s.recipient();
    // The identity init made: root's, 0600.
    assert_eq!(mode_owner(&s.root().join("etc/op-dbus/host.age")), (0o600, 0, 0));
    let dir = secret_stage(&s, "1.0.0", &[&r], "");
    let added = secret_add(&s, &dir, TOKEN);
    assert_eq!(added["recipients"][0], r.as_str());
    assert!(files_holding(&dir, TOKEN, None).is_empty(), "the stage folder holds only ciphertext");
    let listed = json(&ok(s.image().args(["--json", "secret", "list"]).arg(&dir)));
    assert_eq!(listed["secrets"][0]["encrypted_to"], 1, "{listed}");
    assert_eq!(listed["secrets"][0]["mode"], "0600");
    assert!(listed["secrets"][0]["problem"].is_null(), "{listed}");

    let reference = s.build(&dir);
    let export = s.export(&[&reference], "app.oci.tar");
    ok(s.image().args(["-q", "push", &reference, &format!("{}/op-dbus/app", reg.host())]));
    ok(s.stage().args(["-q", "deploy"]).arg(&export));

    // Deployed: the target holds the plaintext, 0600, owned as declared.
    let target = s.root().join(TARGET);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), TOKEN);
    assert_eq!(mode_owner(&target), (0o600, 4242, 4343));
    // Nowhere else: not the builder's store, the export, the registry, nor anything under
    // the root (image store, generations, state, snapshots, journal, backups, history).
    // The plain copy beside it is found everywhere: the search sees through the layers.
    let places = [s.store(), export.clone(), reg.storage(), s.root()];
    for place in &places {
        assert!(!files_holding(place, CONTROL, None).is_empty(), "the search finds the control in {}", place.display());
        let leaks = files_holding(place, TOKEN, Some(&target));
        assert!(leaks.is_empty(), "the plaintext is in {leaks:?}");
    }
    // The generation keeps the ciphertext, with the declared owner.
    let staged = s.root().join("var/lib/op-dbus/staging/app/secrets/token.age");
    assert!(std::fs::read(&staged).unwrap().starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(mode_owner(&staged).1, 4242);
    // state.json records what was placed without anything of the plaintext.
    let state = json(&std::fs::read_to_string(s.root().join("var/lib/op-dbus/staging/state.json")).unwrap());
    assert_eq!(state["placed"]["/etc/op-dbus/api-token"]["type"], "secret", "{state}");
    ok(s.stage().arg("verify"));
}

#[test]
fn verify_catches_a_changed_mode_and_an_identity_that_cannot_decrypt() {
    let s = Scratch::trusted();
    let r = s.recipient();
    let dir = secret_stage(&s, "1.0.0", &[&r], "    mode: \"0640\"\n");
    secret_add(&s, &dir, TOKEN);
    let reference = s.build(&dir);
    ok(s.stage().args(["-q", "deploy"]).arg(s.export(&[&reference], "app.oci.tar")));
    let target = s.root().join(TARGET);
    assert_eq!(mode_owner(&target), (0o640, 4242, 4343), "the declared mode");
    ok(s.stage().arg("verify"));

    // A changed mode: verify fails (exit 5) naming it.
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = util::run(s.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mode 0644, the manifest says 0640"), "{text}");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    // A changed owner and a changed content too.
    std::os::unix::fs::chown(&target, Some(0), Some(0)).unwrap();
    assert_eq!(util::run(s.stage().arg("verify")).status.code(), Some(5));
    std::os::unix::fs::chown(&target, Some(4242), Some(4343)).unwrap();
    std::fs::write(&target, "edited").unwrap();
    let out = util::run(s.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stdout).contains("differs from the secret"));
    std::fs::write(&target, TOKEN).unwrap();
    ok(s.stage().arg("verify"));

    // Another identity in place of the host's: the ciphertext no longer decrypts (exit 3),
    // naming the secret and the host's (new) recipient.
    let other = tempfile::tempdir().unwrap();
    ok(Command::new(util::bin("op-dbus-stage")).arg("--root").arg(other.path()).args(["-q", "init"]));
    std::fs::copy(other.path().join("etc/op-dbus/host.age"), s.root().join("etc/op-dbus/host.age")).unwrap();
    let new = s.recipient();
    assert_ne!(new, r);
    let out = util::run(s.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("secrets/token.age") && text.contains(&new), "{text}");
    let doc = json(&String::from_utf8(util::run(s.stage().args(["verify", "--json"])).stdout).unwrap());
    assert_eq!(doc["not_for_this_host"][0], "app: secrets/token.age", "{doc}");
}

#[test]
fn a_host_not_among_the_recipients_is_refused_at_deploy_and_nothing_is_activated() {
    let s = Scratch::trusted();
    let mine = s.recipient();
    // A stage for another host only.
    let other = tempfile::tempdir().unwrap();
    ok(Command::new(util::bin("op-dbus-stage")).arg("--root").arg(other.path()).args(["-q", "init"]));
    let theirs = ok(Command::new(util::bin("op-dbus-stage")).arg("--root").arg(other.path()).arg("identity"));
    let dir = secret_stage(&s, "1.0.0", &[theirs.trim()], "");
    secret_add(&s, &dir, TOKEN);
    let export = s.export(&[&s.build(&dir)], "app.oci.tar");
    let (code, err) = fails(s.stage().arg("deploy").arg(&export));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("secrets/token.age") && err.contains(&mine), "{err}");
    assert!(util::deployed_names(&json(&ok(s.stage().args(["list", "--json"])))).is_empty());
    assert!(!s.root().join(TARGET).exists() && !s.root().join("etc/op-dbus/visible.conf").exists());
}

#[test]
fn stock_age_decrypts_the_image_ciphertext_and_a_secret_made_with_age_r_deploys() {
    let age = require_tool("age", "age");
    let s = Scratch::trusted();
    let r = s.recipient();
    let identity = s.root().join("etc/op-dbus/host.age");
    let dir = secret_stage(&s, "1.0.0", &[&r], "");
    secret_add(&s, &dir, TOKEN);
    let export = s.export(&[&s.build(&dir)], "app.oci.tar");
    // The ciphertext as the image carries it, decrypted by the stock tool with the host identity.
    let ct = s.path("token.age");
    std::fs::write(&ct, from_export(&export, "secrets/token.age")).unwrap();
    let plain = ok(Command::new(&age).arg("-d").arg("-i").arg(&identity).arg(&ct));
    assert_eq!(plain, TOKEN);

    // A secret encrypted by `age -r`, put where `secret add` puts it, deploys.
    let dir = secret_stage(&s, "1.1.0", &[&r], "");
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    let by_age = "made-by-stock-age-7d3a";
    let mut child = Command::new(&age)
        .args(["-r", &r, "-o"])
        .arg(dir.join("secrets/token.age"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(by_age.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    ok(s.stage().args(["-q", "deploy"]).arg(s.export(&[&s.build(&dir)], "app2.oci.tar")));
    let target = s.root().join(TARGET);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), by_age);
    assert_eq!(mode_owner(&target), (0o600, 4242, 4343));
    ok(s.stage().arg("verify"));
}

#[test]
fn rollback_and_remove_of_a_stage_with_a_secret_restore_what_was_at_the_target() {
    let s = Scratch::trusted();
    let r = s.recipient();
    let target = s.root().join(TARGET);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, "the operator's own token").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (one, two) = ("first-secret-1a2b3c", "second-secret-4d5e6f");
    for (version, plain) in [("1.0.0", one), ("1.1.0", two)] {
        let dir = secret_stage(&s, version, &[&r], "");
        secret_add(&s, &dir, plain);
        ok(s.stage().args(["-q", "deploy"]).arg(s.export(&[&s.build(&dir)], &format!("app-{version}.oci.tar"))));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), plain);
    }
    let clean = |what: &str| {
        for plain in [one, two] {
            let leaks = files_holding(&s.root(), plain, Some(&target));
            assert!(leaks.is_empty(), "{what}: {plain} is in {leaks:?}");
        }
    };
    clean("after the upgrade");
    ok(s.stage().args(["-q", "rollback", "app"]));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), one);
    assert_eq!(mode_owner(&target), (0o600, 4242, 4343));
    clean("after the rollback");
    ok(s.stage().arg("verify"));
    ok(s.stage().args(["-q", "remove", "app"]));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "the operator's own token");
    assert_eq!(mode_owner(&target).0, 0o640);
    clean("after the removal");
}

#[test]
fn a_failed_verify_undoes_the_secret_and_puts_back_what_was_there() {
    let s = Scratch::trusted();
    let r = s.recipient();
    let target = s.root().join(TARGET);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, "the operator's own token").unwrap();
    let failing = |version: &str, plain: &str| {
        let dir = secret_stage(&s, version, &[&r], "");
        let manifest = dir.join("manifest.yaml");
        let text = std::fs::read_to_string(&manifest).unwrap() + "verify:\n  - command: \"false\"\n";
        std::fs::write(&manifest, text).unwrap();
        secret_add(&s, &dir, plain);
        s.export(&[&s.build(&dir)], &format!("app-{version}.oci.tar"))
    };
    // A first deploy that fails: the operator's file comes back.
    let (code, err) = fails(s.stage().arg("deploy").arg(failing("0.9.0", "never-kept-0a0b0c")));
    assert_eq!(code, 5, "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "the operator's own token");
    // An upgrade that fails: the secret before it is decrypted back.
    let dir = secret_stage(&s, "1.0.0", &[&r], "");
    secret_add(&s, &dir, "kept-1a2b3c");
    ok(s.stage().args(["-q", "deploy"]).arg(s.export(&[&s.build(&dir)], "app-1.0.0.oci.tar")));
    let (code, err) = fails(s.stage().arg("deploy").arg(failing("1.1.0", "never-kept-4d5e6f")));
    assert_eq!(code, 5, "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "kept-1a2b3c");
    assert_eq!(mode_owner(&target), (0o600, 4242, 4343));
    ok(s.stage().arg("verify"));
    for plain in ["never-kept-0a0b0c", "never-kept-4d5e6f", "kept-1a2b3c"] {
        let leaks = files_holding(&s.root(), plain, Some(&target));
        assert!(leaks.is_empty(), "{plain} is in {leaks:?}");
    }
}

#[test]
fn recipients_by_inventory_tag_let_every_tagged_host_decrypt() {
    let s = Scratch::trusted();
    let web1 = s.recipient();
    let other = Scratch::trusted();
    let web2 = other.recipient();
    let inventory = s.path("fleet.toml");
    std::fs::write(
        &inventory,
        format!(
            "[hosts.web1]\ntags = [\"web\"]\nrecipient = \"{web1}\"\n[hosts.web2]\ntags = [\"web\"]\nrecipient = \
             \"{web2}\"\n"
        ),
    )
    .unwrap();
    let dir = secret_stage(&s, "1.0.0", &["\"@web\""], "");
    // Without the inventory the tag cannot be resolved (exit 7).
    let mut add = s.image();
    add.args(["secret", "add"]).arg(&dir).arg("secrets/token.age").arg("--file").arg(&inventory);
    let (code, err) = fails(&mut add);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("--inventory"), "{err}");
    let plain = s.path("token.txt");
    std::fs::write(&plain, TOKEN).unwrap();
    let added = json(&ok(s
        .image()
        .args(["--json", "secret", "add"])
        .arg(&dir)
        .arg("secrets/token.age")
        .arg("--file")
        .arg(&plain)
        .arg("--inventory")
        .arg(&inventory)));
    assert_eq!(added["recipients"].as_array().unwrap().len(), 2, "{added}");
    let (code, err) = fails(s.image().arg("build").arg(&dir));
    assert_eq!(code, 7, "{err}");
    let built = json(&ok(s.image().args(["--json", "-q", "build"]).arg(&dir).arg("--inventory").arg(&inventory)));
    let export = s.export(&[built["reference"].as_str().unwrap()], "app.oci.tar");
    // One image, both hosts of the tag (the other host trusts the same key).
    std::fs::copy(s.pub_key(), other.path("builder.pub")).unwrap();
    ok(other.stage().args(["trust", "add"]).arg(other.path("builder.pub")));
    for host in [&s, &other] {
        ok(host.stage().args(["-q", "deploy"]).arg(&export));
        assert_eq!(std::fs::read_to_string(host.root().join(TARGET)).unwrap(), TOKEN);
    }
}

#[test]
fn a_backup_leaves_secrets_out_unless_asked_and_then_holds_them_only_encrypted() {
    let s = Scratch::trusted();
    let r = s.recipient();
    let dir = secret_stage(&s, "1.0.0", &[&r], "");
    secret_add(&s, &dir, TOKEN);
    ok(s.stage().args(["-q", "deploy"]).arg(s.export(&[&s.build(&dir)], "app.oci.tar")));
    let target = s.root().join(TARGET);
    let backups = s.root().join("var/lib/op-dbus/backups");

    // By default the secret is left out, and said so; the plain copy beside it is saved.
    let plain = json(&ok(s.stage().args(["--json", "backup", "create"])));
    assert!(plain["notes"].to_string().contains("--include-secrets"), "{plain}");
    assert!(!files_holding(&backups, CONTROL, None).is_empty(), "the copy is saved");
    assert!(files_holding(&backups, TOKEN, None).is_empty(), "no plaintext in a backup");
    // Asked for, it needs a recipient; with the host's own, the archive is age ciphertext.
    let (code, err) = fails(s.stage().args(["backup", "create", "--include-secrets"]));
    assert_eq!(code, 2, "{err}");
    let sealed = json(&ok(s.stage().args(["--json", "backup", "create", "--include-secrets", "--recipient", &r])));
    let name = sealed["name"].as_str().unwrap();
    let leaks = files_holding(&s.root(), TOKEN, Some(&target));
    assert!(leaks.is_empty(), "the plaintext is in {leaks:?}");
    // Lost and restored with the host's identity (the default): content, mode and owner.
    std::fs::write(&target, "overwritten").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(s.stage().args(["-q", "backup", "restore", name, "--force"]));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), TOKEN);
    assert_eq!(mode_owner(&target), (0o600, 4242, 4343));
    let leaks = files_holding(&s.root(), TOKEN, Some(&target));
    assert!(leaks.is_empty(), "after the restore the plaintext is in {leaks:?}");
    ok(s.stage().arg("verify"));
}
