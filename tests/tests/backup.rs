//! Backups (`op-dbus-stage backup ...`): a stage's data and its operator-edited config
//! saved, changed, restored byte for byte; newer data kept unless `--force`; secrets never
//! in clear; `backup verify` catching a flipped byte; stock `age` decrypting an encrypted
//! backup; retention; `deploy --backup`.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

const DATA: &str = "var/lib/op-dbus/app";
const CONF: &str = "etc/op-dbus/app.conf";

/// Version `version` of stage `app`: a linked binary, a copy-if-not-exists config and a
/// data directory.
fn app_dir(s: &Scratch, version: &str) -> PathBuf {
    stage_dir(
        &s.path("src"),
        "app",
        version,
        "files:\n  - path: bin/app\n    target: /opt/app/bin/app\n  - path: etc/app.conf\n    target: /etc/op-dbus/app.conf\n    \
         type: copy-if-not-exists\ndata:\n  - /var/lib/op-dbus/app\n",
        &[("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "default = 1\n")],
    )
}

/// A host with `app` 1.0.0 deployed, its data written and its config edited by the operator.
fn deployed() -> Scratch {
    let s = Scratch::trusted();
    let r = s.build(&app_dir(&s, "1.0.0"));
    let a = s.export(&[&r], "app-1.oci.tar");
    ok(s.stage().args(["-q", "deploy"]).arg(a));
    let root = s.root();
    fs::create_dir_all(root.join(DATA).join("sub")).unwrap();
    // Every byte value, so that a restore that is not byte-exact shows.
    fs::write(root.join(DATA).join("db"), (0..=255u8).cycle().take(70_000).collect::<Vec<u8>>()).unwrap();
    fs::write(root.join(DATA).join("sub/state"), "state 1\n").unwrap();
    fs::set_permissions(root.join(DATA).join("sub/state"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("../db", root.join(DATA).join("sub/current")).unwrap();
    fs::write(root.join(CONF), "default = 1\nedited = yes\n").unwrap();
    s
}

fn create(s: &Scratch, args: &[&str]) -> String {
    let out = json(&ok(s.stage().args(["--json", "backup", "create"]).args(args)));
    out["name"].as_str().unwrap().to_owned()
}

/// The saved paths with their content or link text and mode.
fn saved(root: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        tree(&root.join(DATA)).into_iter().map(|(k, v)| (format!("{DATA}/{k}"), v)).collect();
    out.push((CONF.into(), format!("{:?}", fs::read(root.join(CONF)).unwrap())));
    out.push(("db bytes".into(), format!("{:?}", fs::read(root.join(DATA).join("db")).ok())));
    out
}

fn backups_dir(s: &Scratch) -> PathBuf {
    s.root().join("var/lib/op-dbus/backups")
}

/// Flips one byte in the middle of `file`.
fn flip(file: &Path) {
    let mut b = fs::read(file).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x40;
    fs::write(file, b).unwrap();
}

#[test]
fn a_backup_of_data_and_an_edited_config_restores_them_byte_identical() {
    let s = deployed();
    let root = s.root();
    let before = saved(&root);
    let name = create(&s, &[]);
    // Both changed: the data rewritten and a file of it lost, the config edited again.
    fs::write(root.join(DATA).join("db"), b"rewritten").unwrap();
    fs::remove_file(root.join(DATA).join("sub/state")).unwrap();
    fs::remove_file(root.join(DATA).join("sub/current")).unwrap();
    fs::write(root.join(CONF), "broken\n").unwrap();
    assert_ne!(saved(&root), before);
    let r = json(&ok(s.stage().args(["--json", "backup", "restore", &name, "--force"])));
    assert_eq!(r["operation"], format!("backup restore {name}"), "{r}");
    assert_eq!(saved(&root), before, "restored byte for byte, modes and links included");
    // Restored as a journaled change: recorded in the history with the backup's creation.
    let h = ok(s.stage().args(["history"]));
    assert!(h.contains(&format!("backup create {name}")) && h.contains(&format!("backup restore {name}")), "{h}");
    ok(s.stage().args(["history", "--verify"]));
    // Listed with its time, stages and size; its info names every saved path.
    let l = json(&ok(s.stage().args(["--json", "backup", "list"])));
    let b = &l["backups"][0];
    assert_eq!((b["name"].as_str(), b["stages"][0]["name"].as_str()), (Some(name.as_str()), Some("app")), "{l}");
    assert!(b["created"].as_str().unwrap().ends_with('Z') && b["archive_bytes"].as_u64().unwrap() > 0, "{l}");
    let info = ok(s.stage().args(["backup", "info", &name]));
    for p in ["/var/lib/op-dbus/app/db", "/var/lib/op-dbus/app/sub/current", "/etc/op-dbus/app.conf"] {
        assert!(info.contains(p), "{info}");
    }
    assert!(!info.contains("/opt/app/bin/app"), "a linked file is in the image, not the backup: {info}");
    // A backup is private to root and outside every snapshot.
    let mode = fs::metadata(backups_dir(&s)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn restore_refuses_newer_data_without_force_and_puts_back_what_was_lost() {
    let s = deployed();
    let root = s.root();
    let before = saved(&root);
    let name = create(&s, &[]);
    // Lost: put back without --force.
    fs::remove_file(root.join(DATA).join("sub/state")).unwrap();
    ok(s.stage().args(["backup", "restore", &name]));
    assert_eq!(saved(&root), before);
    // Changed after the backup: refused, nothing changed, --force named.
    fs::remove_file(root.join(DATA).join("sub/state")).unwrap();
    fs::write(root.join(DATA).join("db"), b"newer").unwrap();
    let (code, err) = fails(s.stage().args(["backup", "restore", &name]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("/var/lib/op-dbus/app/db was changed after the backup") && err.contains("--force"), "{err}");
    assert_eq!(fs::read(root.join(DATA).join("db")).unwrap(), b"newer");
    assert!(!root.join(DATA).join("sub/state").exists(), "a refused restore changes nothing");
    // A dry run says what it would do and does nothing.
    let r = json(&ok(s.stage().args(["--json", "--dry-run", "backup", "restore", &name, "--force"])));
    assert_eq!(r["dry_run"], true);
    assert!(r["steps"].as_array().unwrap().iter().any(|x| x.as_str().unwrap().contains("/var/lib/op-dbus/app/db")));
    assert_eq!(fs::read(root.join(DATA).join("db")).unwrap(), b"newer");
    ok(s.stage().args(["backup", "restore", &name, "--force"]));
    assert_eq!(saved(&root), before);
}

#[test]
fn a_backup_with_secrets_is_refused_without_a_recipient() {
    let s = deployed();
    let (code, err) = fails(s.stage().args(["backup", "create", "--include-secrets"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--include-secrets needs --recipient") && err.contains("never written to a backup in clear"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(backups_dir(&s)).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing written: {left:?}");
    let (code, err) = fails(s.stage().args(["backup", "create", "--recipient", "age1notakey"]));
    assert_eq!(code, 2, "{err}");
    // A dry run reads what it would save and writes nothing.
    let d = json(&ok(s.stage().args(["--json", "--dry-run", "backup", "create"])));
    assert_eq!((d["dry_run"].as_bool(), d["entries"].as_u64()), (Some(true), Some(6)), "{d}");
    let left: Vec<_> = fs::read_dir(backups_dir(&s)).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

fn age_identity(s: &Scratch) -> (PathBuf, String) {
    let keygen = require_tool("age-keygen", "age");
    let id = s.path("backup.age");
    ok(Command::new(keygen).arg("-o").arg(&id));
    fs::set_permissions(&id, fs::Permissions::from_mode(0o600)).unwrap();
    let public = ok(Command::new(require_tool("age-keygen", "age")).arg("-y").arg(&id));
    (id, public.trim().to_owned())
}

#[test]
fn verify_catches_a_flipped_byte_in_a_plain_and_an_encrypted_backup() {
    let s = deployed();
    let (id, public) = age_identity(&s);
    let plain = create(&s, &[]);
    let sealed = create(&s, &["--recipient", &public]);
    ok(s.stage().args(["backup", "verify", &plain]));
    let v = json(&ok(s.stage().args(["--json", "backup", "verify", &sealed, "--identity"]).arg(&id)));
    assert_eq!((v["ok"].as_bool(), v["entries_checked"].as_bool()), (Some(true), Some(true)), "{v}");
    flip(&backups_dir(&s).join(format!("{plain}.tar.zst")));
    flip(&backups_dir(&s).join(format!("{sealed}.tar.zst.age")));
    let (code, out) = fails(s.stage().args(["backup", "verify", &plain]));
    assert_eq!(code, 5, "{out}");
    let out = String::from_utf8(run(s.stage().args(["backup", "verify", &plain])).stdout).unwrap();
    assert!(out.contains("NOT intact") && out.contains("is not what was written"), "{out}");
    for with_id in [true, false] {
        let mut c = s.stage();
        c.args(["--json", "backup", "verify", &sealed]);
        if with_id {
            c.arg("--identity").arg(&id);
        }
        let o = run(&mut c);
        assert_eq!(o.status.code(), Some(5), "identity {with_id}: {}", String::from_utf8_lossy(&o.stderr));
        let v = json(&String::from_utf8(o.stdout).unwrap());
        assert_eq!(v["archive_intact"], false, "{v}");
    }
    // A damaged backup restores nothing (exit 7).
    fs::write(s.root().join(DATA).join("db"), b"x").unwrap();
    let (code, err) = fails(s.stage().args(["backup", "restore", &plain, "--force"]));
    assert_eq!(code, 7, "{err}");
    assert_eq!(fs::read(s.root().join(DATA).join("db")).unwrap(), b"x");
}

#[test]
fn an_encrypted_backup_decrypts_with_stock_age_and_restores_with_the_identity() {
    let age = require_tool("age", "age");
    let s = deployed();
    let root = s.root();
    let before = saved(&root);
    let (id, public) = age_identity(&s);
    let recipients = s.path("recipients.txt");
    fs::write(&recipients, format!("# the backup key\n{public}\n")).unwrap();
    let name = create(&s, &["--recipients-file", recipients.to_str().unwrap()]);
    let archive = backups_dir(&s).join(format!("{name}.tar.zst.age"));
    let sealed = fs::read(&archive).unwrap();
    assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
    assert!(!sealed.windows(12).any(|w| w == b"edited = yes"), "no plaintext in the archive");
    // Stock age decrypts it; zstd and tar read what comes out.
    let plain = s.path("plain.tar.zst");
    ok(Command::new(&age).arg("-d").arg("-i").arg(&id).arg("-o").arg(&plain).arg(&archive));
    let out = s.path("out");
    fs::create_dir_all(&out).unwrap();
    ok(Command::new(require_tool("tar", "tar")).arg("--zstd").arg("-xf").arg(&plain).arg("-C").arg(&out));
    assert_eq!(fs::read(out.join("root").join(CONF)).unwrap(), fs::read(root.join(CONF)).unwrap());
    assert_eq!(
        fs::read(out.join("root").join(DATA).join("db")).unwrap(),
        fs::read(root.join(DATA).join("db")).unwrap()
    );
    let m = json(&fs::read_to_string(out.join("backup.json")).unwrap());
    assert_eq!(m["name"], name.as_str());
    // Without an identity a restore says what it needs; with it, it restores.
    fs::write(root.join(CONF), "broken\n").unwrap();
    let (code, err) = fails(s.stage().args(["backup", "restore", &name, "--force"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--identity"), "{err}");
    // Another identity cannot decrypt it: a trust failure naming the recipient.
    let other = s.path("other.age");
    ok(Command::new(require_tool("age-keygen", "age")).arg("-o").arg(&other));
    fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = fails(s.stage().args(["backup", "restore", &name, "--force", "--identity"]).arg(&other));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&public), "{err}");
    ok(s.stage().args(["backup", "restore", &name, "--force", "--identity"]).arg(&id));
    assert_eq!(saved(&root), before);
}

#[test]
fn prune_keeps_the_newest_n() {
    let s = deployed();
    let policy = s.root().join("etc/op-dbus/stage.toml");
    let mut text = fs::read_to_string(&policy).unwrap_or_default();
    text.push_str("\n[backups]\nkeep = 2\n");
    fs::write(&policy, text).unwrap();
    let names: Vec<String> = (0..4).map(|_| create(&s, &[])).collect();
    let listed = |s: &Scratch| -> Vec<String> {
        let l = json(&ok(s.stage().args(["--json", "backup", "list"])));
        l["backups"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(listed(&s), names);
    let d = json(&ok(s.stage().args(["--json", "--dry-run", "backup", "prune"])));
    assert_eq!(d["pruned"], serde_json::json!(names[..2]), "{d}");
    assert_eq!(listed(&s), names, "a dry run removes nothing");
    ok(s.stage().args(["backup", "prune"]));
    assert_eq!(listed(&s), names[2..]);
    let files: Vec<String> =
        fs::read_dir(backups_dir(&s)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.len(), 4, "two archives and their summaries: {files:?}");
    assert!(ok(s.stage().args(["history"])).contains(&format!("backup prune {} {}", names[0], names[1])));
}

#[test]
fn deploy_backup_takes_one_of_the_deployed_stages_first() {
    let s = deployed();
    let root = s.root();
    let before = saved(&root);
    let r = s.build(&app_dir(&s, "1.1.0"));
    let a = s.export(&[&r], "app-2.oci.tar");
    let d = json(&ok(s.stage().args(["--json", "deploy", "--backup"]).arg(&a)));
    let name = d["backup"]["name"].as_str().unwrap_or_else(|| panic!("no backup in {d}")).to_owned();
    assert_eq!(d["backup"]["stages"][0]["version"], "1.0.0", "taken before the deploy: {d}");
    fs::write(root.join(DATA).join("db"), b"after the upgrade").unwrap();
    ok(s.stage().args(["backup", "restore", &name, "--force"]));
    assert_eq!(saved(&root), before);
    // Nothing deployed yet of a stage being deployed: nothing to back up.
    let other = stage_dir(&s.path("src"), "other", "1.0.0", "", &[("x", "x")]);
    let a = s.export(&[&s.build(&other)], "other.oci.tar");
    let d = json(&ok(s.stage().args(["--json", "deploy", "--backup"]).arg(&a)));
    assert!(d.get("backup").is_none(), "{d}");
}

#[test]
fn a_data_path_outside_the_allowed_prefixes_is_refused_at_deploy() {
    let s = Scratch::trusted();
    let d = stage_dir(&s.path("src"), "bad", "1.0.0", "data:\n  - /etc/ssh\n", &[("x", "x")]);
    let a = s.export(&[&s.build(&d)], "bad.oci.tar");
    let (code, err) = fails(s.stage().arg("deploy").arg(&a));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("data path /etc/ssh is outside the allowed prefixes"), "{err}");
}

/// `backup restore` stopped at every fault point of the installer (a build with the
/// `fault-injection` feature): `recover` then leaves the saved paths exactly as before the
/// restore or exactly as restored, with no journal left and the history intact.
#[test]
fn a_restore_stopped_at_any_point_recovers_to_before_or_after() {
    let fault = fault_bin();
    let s = deployed();
    let saved_then = saved(&s.root());
    let name = create(&s, &[]);
    fs::write(s.root().join(DATA).join("db"), b"changed").unwrap();
    fs::remove_file(s.root().join(DATA).join("sub/state")).unwrap();
    fs::write(s.root().join(CONF), "changed\n").unwrap();
    let changed = saved(&s.root());
    let attempt = s.path("attempt");
    let mut points = 0;
    for n in 1.. {
        let _ = fs::remove_dir_all(&attempt);
        ok(Command::new("cp").arg("-a").arg(s.root()).arg(&attempt));
        let out = run(Command::new(&fault)
            .arg("--root")
            .arg(&attempt)
            .args(["-q", "backup", "restore", &name, "--force"])
            .env("OP_DBUS_FAULT_AT", n.to_string()));
        if out.status.success() {
            assert_eq!(saved(&attempt), saved_then);
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "point {n}: {}", String::from_utf8_lossy(&out.stderr));
        points += 1;
        ok(Command::new(bin("op-dbus-stage")).arg("--root").arg(&attempt).args(["-q", "recover"]));
        let seen = saved(&attempt);
        assert!(seen == changed || seen == saved_then, "point {n}: neither before nor after: {seen:?}");
        assert!(!attempt.join("var/lib/op-dbus/staging/journal/tx.json").exists(), "point {n}: journal left");
        let tmp: Vec<_> = fs::read_dir(attempt.join("var/lib/op-dbus/staging/.tmp")).unwrap().flatten().collect();
        assert!(tmp.is_empty(), "point {n}: extracted files left: {tmp:?}");
        ok(Command::new(bin("op-dbus-stage")).arg("--root").arg(&attempt).args(["history", "--verify"]));
        assert!(n < 200, "more than 200 fault points?");
    }
    eprintln!("backup restore: stopped at {points} fault points, each recovered");
    assert!(points >= 5, "only {points} fault points");
}

/// A link inside a data directory is saved as a link: what it points at (outside the root
/// here) is never read into the backup.
#[test]
fn links_in_data_are_saved_as_links_never_followed() {
    let s = deployed();
    let outside = s.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), "TOPSECRET-OUTSIDE-THE-ROOT\n").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), s.root().join(DATA).join("leak")).unwrap();
    std::os::unix::fs::symlink(&outside, s.root().join(DATA).join("leakdir")).unwrap();
    let name = create(&s, &[]);
    let info = json(&ok(s.stage().args(["--json", "backup", "info", &name])));
    let kinds: Vec<(String, String)> = info["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["path"].as_str().unwrap().to_owned(), i["type"].as_str().unwrap().to_owned()))
        .collect();
    for l in ["leak", "leakdir"] {
        assert!(kinds.contains(&(format!("/{DATA}/{l}"), "symlink".into())), "{kinds:?}");
    }
    assert!(!kinds.iter().any(|(p, _)| p.contains("leakdir/")), "{kinds:?}");
    let out = s.path("x");
    fs::create_dir_all(&out).unwrap();
    let archive = backups_dir(&s).join(format!("{name}.tar.zst"));
    ok(Command::new(require_tool("tar", "tar")).arg("--zstd").arg("-xf").arg(&archive).arg("-C").arg(&out));
    let all = tree(&out);
    assert!(!all.values().any(|v| v.contains("TOPSECRET")), "{all:?}");
}
