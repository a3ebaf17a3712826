//! A snapshot of every `--json` document of both binaries (docs/json.md describes them),
//! so that a change of machine output is reviewed, not accidental. Temp paths, digests,
//! key ids and times are redacted.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// Replaces what varies between runs: the temp folder, sha256 digests (and the
/// `sha256-HEX` of signature tags), key ids, times.
fn redact(text: &str, tmp: &Path, key_ids: &[String]) -> String {
    let mut s = text.replace(&tmp.display().to_string(), "[TMP]");
    for id in key_ids {
        s = s.replace(id, "[KEY_ID]");
    }
    let mut out = String::new();
    let mut rest = s.as_str();
    // sha256:<64 hex> and sha256-<64 hex>
    while let Some(i) = rest.find("sha256") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let hex = tail.get(7..71).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match (tail.as_bytes().get(6), hex) {
            (Some(b':' | b'-'), Some(_)) => {
                out.push_str(&tail[..7]);
                out.push_str("[DIGEST]");
                rest = &tail[71..];
            }
            _ => {
                out.push_str("sha256");
                rest = &tail[6..];
            }
        }
    }
    out.push_str(rest);
    redact_times(&redact_hashes(&redact_recipients(&out)))
}

/// An age recipient (`age1` and 58 bech32 characters) becomes `[RECIPIENT]`.
fn redact_recipients(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("age1") {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let key = tail.get(4..62).filter(|k| k.bytes().all(|b| b"qpzry9x8gf2tvdw0s3jn54khce6mua7l".contains(&b)));
        if key.is_some() {
            out.push_str("[RECIPIENT]");
            rest = &tail[62..];
        } else {
            out.push_str("age1");
            rest = &tail[4..];
        }
    }
    out.push_str(rest);
    out
}

/// A quoted string of 64 hex digits (a hash of the history chain) becomes `"[HASH]"`.
fn redact_hashes(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('"') {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let hex = tail.get(1..65).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        if hex.is_some() && tail.as_bytes().get(65) == Some(&b'"') {
            out.push_str("\"[HASH]\"");
            rest = &tail[66..];
        } else {
            out.push('"');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` and `YYYYMMDDTHHMMSSZ` become `[TIME]`.
fn redact_times(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let digit = |j: usize| b.get(j).is_some_and(u8::is_ascii_digit);
    while i < b.len() {
        let long = (0..20).all(|k| match k {
            4 | 7 => b.get(i + k) == Some(&b'-'),
            10 => b.get(i + k) == Some(&b'T'),
            13 | 16 => b.get(i + k) == Some(&b':'),
            19 => b.get(i + k) == Some(&b'Z'),
            _ => digit(i + k),
        });
        let short = (0..16).all(|k| match k {
            8 => b.get(i + k) == Some(&b'T'),
            15 => b.get(i + k) == Some(&b'Z'),
            _ => digit(i + k),
        });
        if long {
            out.push_str("[TIME]");
            i += 20;
        } else if short {
            out.push_str("[TIME]");
            i += 16;
            // The counter of snapshot names taken within one second (`-2`) depends on timing.
            let digits = b[i..].iter().skip(1).take_while(|c| c.is_ascii_digit()).count();
            if b.get(i) == Some(&b'-') && digits > 0 && b.get(i + 1 + digits) == Some(&b'"') {
                i += 1 + digits;
            }
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

struct World {
    dir: tempfile::TempDir,
    key_ids: Vec<String>,
}

impl World {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn image(&self) -> Command {
        image(&self.dir.path().join("store"), Some(&self.dir.path().join("signing.key")))
    }
    fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root());
        c
    }
    /// Runs `cmd` (already with --json) and snapshots its stdout under `name`.
    fn doc(&self, name: &str, cmd: &mut Command, expect: i32) {
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(expect), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        json(&text);
        insta::assert_snapshot!(name, redact(&text, self.dir.path(), &self.key_ids));
    }
}

fn stage_folder(parent: &Path, name: &str, version: &str) -> PathBuf {
    let dir = parent.join(format!("{name}-{version}"));
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(
        dir.join("manifest.yaml"),
        format!("name: {name}\nversion: {version}\nfiles:\n  - path: bin/{name}\n    target: /usr/local/bin/{name}\n"),
    )
    .unwrap();
    fs::write(dir.join(format!("bin/{name}")), format!("#!/bin/sh\necho {version}\n")).unwrap();
    dir
}

#[test]
fn every_json_document() {
    let d = tempfile::tempdir().unwrap();
    let mut w = World { dir: d, key_ids: Vec::new() };
    let p = w.dir.path().to_owned();
    fs::create_dir_all(w.root()).unwrap();

    // op-dbus-image
    let key = p.join("signing.key");
    let generated =
        json(&ok(Command::new(bin("op-dbus-image")).args(["--json", "key", "generate", "--out"]).arg(&key)));
    let id = generated["key_id"].as_str().unwrap().to_owned();
    w.key_ids.push(id.to_uppercase());
    w.key_ids.push(id);
    // The minisign form of the key varies with it too.
    let exported = json(&ok(w.image().args(["--json", "key", "export", "--minisign"]).arg(p.join("signing.key.pub"))));
    for line in exported["minisign"].as_str().unwrap().lines().skip(1) {
        w.key_ids.push(line.to_owned());
    }
    w.doc(
        "image_key_generate_dry_run",
        w.image().args(["--json", "--dry-run", "key", "generate", "--out"]).arg(p.join("k2")),
        0,
    );
    w.doc("image_key_show", w.image().args(["--json", "key", "show"]).arg(p.join("signing.key.pub")), 0);
    w.doc(
        "image_key_export",
        w.image().args(["--json", "key", "export", "--minisign"]).arg(p.join("signing.key.pub")),
        0,
    );
    let v1 = stage_folder(&p, "app", "1.0.0");
    w.doc("image_build_dry_run", w.image().args(["--json", "--dry-run", "build"]).arg(&v1), 0);
    w.doc("image_build", w.image().args(["--json", "-q", "build"]).arg(&v1), 0);
    fs::write(p.join("extra"), "x\n").unwrap();
    w.doc("image_create", w.image().args(["--json", "-q", "create", "extra", "--files"]).arg(p.join("extra")), 0);
    w.doc("image_sign_dry_run", w.image().args(["--json", "--dry-run", "sign", "app:1.0.0"]), 0);
    w.doc("image_sign", w.image().args(["--json", "sign", "app:1.0.0"]), 0);
    w.doc("image_inspect", w.image().args(["--json", "inspect", "app:1.0.0"]), 0);
    w.doc("image_list", w.image().args(["--json", "list"]), 0);
    let tar = p.join("app.oci.tar");
    w.doc("image_export_dry_run", w.image().args(["--json", "--dry-run", "export", "app:1.0.0", "--out"]).arg(&tar), 0);
    w.doc("image_export", w.image().args(["--json", "-q", "export", "app:1.0.0", "--out"]).arg(&tar), 0);
    w.doc("image_error", w.image().args(["--json", "inspect", "nope:1.0.0"]), 2);

    // op-dbus-stage
    w.doc("stage_init_dry_run", w.stage().args(["--json", "--dry-run", "init"]), 0);
    w.doc("stage_init", w.stage().args(["--json", "init"]), 0);
    w.doc("stage_identity", w.stage().args(["--json", "identity"]), 0);
    // A stage folder with a secret for this host.
    let recipient = ok(w.stage().arg("identity")).trim().to_owned();
    let vault = p.join("vault");
    fs::create_dir_all(&vault).unwrap();
    fs::write(
        vault.join("manifest.yaml"),
        format!(
            "version: 1.0.0\nrecipients: [{recipient}]\nfiles:\n  - path: secrets/token.age\n    target: \
             /etc/op-dbus/token\n    type: secret\n    owner: 4242\n"
        ),
    )
    .unwrap();
    fs::write(p.join("token.txt"), "not-in-any-document").unwrap();
    let add = |dry: bool| {
        let mut c = w.image();
        c.arg("--json");
        if dry {
            c.arg("--dry-run");
        }
        c.args(["secret", "add"]).arg(&vault).arg("secrets/token.age").arg("--file").arg(p.join("token.txt"));
        c
    };
    w.doc("image_secret_add_dry_run", &mut add(true), 0);
    w.doc("image_secret_add", &mut add(false), 0);
    w.doc("image_secret_list", w.image().args(["--json", "secret", "list"]).arg(&vault), 0);
    w.doc(
        "image_secret_rm_dry_run",
        w.image().args(["--json", "--dry-run", "secret", "rm"]).arg(&vault).arg("secrets/token.age"),
        0,
    );
    w.doc("stage_trust_add", w.stage().args(["--json", "trust", "add"]).arg(p.join("signing.key.pub")), 0);
    w.doc("stage_trust_list", w.stage().args(["--json", "trust", "list"]), 0);
    w.doc("stage_feature_enable", w.stage().args(["--json", "feature", "enable", "lab"]), 0);
    w.doc("stage_feature_list", w.stage().args(["--json", "feature", "list"]), 0);
    w.doc("stage_receive", w.stage().args(["--json", "receive"]).arg(&tar), 0);
    w.doc("stage_deploy_dry_run", w.stage().args(["--json", "--dry-run", "deploy"]).arg(&tar), 0);
    w.doc("stage_deploy", w.stage().args(["--json", "deploy"]).arg(&tar), 0);
    let v2 = stage_folder(&p, "app", "2.0.0");
    ok(w.image().args(["-q", "build"]).arg(&v2));
    let tar2 = p.join("app2.oci.tar");
    ok(w.image().args(["-q", "export", "app:2.0.0", "--out"]).arg(&tar2));
    ok(w.stage().args(["-q", "deploy"]).arg(&tar2));
    w.doc("stage_list", w.stage().args(["--json", "list"]), 0);
    w.doc("stage_status", w.stage().args(["--json", "status"]), 0);
    w.doc("stage_verify", w.stage().args(["--json", "verify"]), 0);
    w.doc("stage_rollback", w.stage().args(["--json", "rollback", "app"]), 0);
    w.doc("stage_fix_symlinks", w.stage().args(["--json", "fix-symlinks", "app"]), 0);
    w.doc("stage_snapshots", w.stage().args(["--json", "snapshots"]), 0);
    // A generation deleted by hand: verify names it, repair rebuilds it.
    let generation = fs::canonicalize(w.root().join("var/lib/op-dbus/staging/app")).unwrap();
    fs::remove_dir_all(generation).unwrap();
    w.doc("stage_verify_missing_generation", w.stage().args(["--json", "verify"]), 5);
    w.doc("stage_repair", w.stage().args(["--json", "repair", "ap"]), 0);
    let snaps = json(&ok(w.stage().args(["--json", "snapshots"])));
    let first = snaps["snapshots"][0]["name"].as_str().unwrap().to_owned();
    w.doc("stage_snapshots_keep", w.stage().args(["--json", "snapshots", "keep", &first]), 0);
    w.doc("stage_snapshots_prune_dry_run", w.stage().args(["--json", "--dry-run", "snapshots", "prune"]), 0);
    w.doc("stage_gc_dry_run", w.stage().args(["--json", "--dry-run", "gc", "--keep", "0"]), 0);
    w.doc("stage_remove_dry_run", w.stage().args(["--json", "--dry-run", "remove", "app"]), 0);
    w.doc("stage_restore", w.stage().args(["--json", "restore", &first, "--yes"]), 0);
    w.doc("stage_recover", w.stage().args(["--json", "recover"]), 0);
    w.doc("stage_trust_revoke", w.stage().args(["--json", "trust", "revoke", "0123456789abcdef"]), 0);
    // A stage that provides a plugin, from the store.
    let plugs = p.join("plugs-1.0.0");
    fs::create_dir_all(plugs.join("plugins")).unwrap();
    fs::write(plugs.join("manifest.yaml"), "name: plugs\nversion: 1.0.0\nplugins: [lxc]\n").unwrap();
    fs::write(plugs.join("plugins/lxc.json"), "{}\n").unwrap();
    ok(w.image().args(["-q", "build"]).arg(&plugs));
    let plugs_tar = p.join("plugs.oci.tar");
    ok(w.image().args(["-q", "export", "plugs:1.0.0", "--out"]).arg(&plugs_tar));
    ok(w.stage().args(["-q", "receive"]).arg(&plugs_tar));
    w.doc("stage_deploy_plugin", w.stage().args(["--json", "deploy-plugin", "lxc"]), 0);
    w.doc("stage_update_plugin", w.stage().args(["--json", "update-plugin", "lxc"]), 0);
    w.doc("stage_error", w.stage().args(["--json", "remove", "nope"]), 2);
    w.doc("stage_history", w.stage().args(["--json", "history"]).env_remove("SUDO_USER"), 0);
    w.doc("stage_history_verify", w.stage().args(["--json", "history", "--verify"]), 0);
    let listed = json(&ok(w.stage().args(["--json", "snapshots"])));
    assert!(listed["snapshots"].as_array().unwrap().iter().all(|s| s["bytes"].is_u64() && s["created"].is_string()));
}
