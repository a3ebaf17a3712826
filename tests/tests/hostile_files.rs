//! The installer's policy files and the builder's inputs and outputs, handled as an
//! attacker would prepare them: a FIFO or an oversized `stage.toml`, symlinks in
//! `trusted-keys/` that point out of `--root`, a stage folder whose `manifest.yaml` leads
//! to the signing key, build steps that look for the signing key, and an export folder
//! someone else can write to.

mod util;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use util::*;

impl Scratch {
    /// The base64 body of the private key: what must never be shown or readable.
    fn secret(&self) -> String {
        let pem = fs::read_to_string(self.key()).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.len() > 40, "{pem}");
        body
    }
    fn stage_dir(&self, name: &str, extra: &str) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(
            dir.join("manifest.yaml"),
            format!("name: app\nversion: 1.0.0\n{extra}files:\n  - path: bin/app\n    target: /usr/local/bin/app\n"),
        )
        .unwrap();
        fs::write(dir.join("bin/app"), "#!/bin/sh\necho app\n").unwrap();
        fs::set_permissions(dir.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }
}

/// Runs `cmd` for at most `limit`: `(exit code or None if killed, stdout, stderr)`.
fn run_for(cmd: &mut Command, limit: Duration) -> (Option<i32>, Vec<u8>, String) {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st.code().unwrap_or(-1));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, o.join().unwrap(), e.join().unwrap())
}

fn key_id(pub_file: &Path) -> String {
    let out = ok(Command::new(bin("op-dbus-image")).args(["--json", "key", "show"]).arg(pub_file));
    json(&out)["key_id"].as_str().unwrap().to_owned()
}

// Point 3: policy files.

#[test]
fn a_fifo_at_stage_toml_is_refused_not_waited_on() {
    let s = Scratch::new();
    let policy = s.root().join("etc/op-dbus/stage.toml");
    fs::remove_file(&policy).unwrap();
    ok(Command::new("mkfifo").arg(&policy));
    for args in [&["trust", "list"][..], &["trust", "revoke", "0123456789abcdef"][..]] {
        let (code, _, err) = run_for(s.stage().args(args), Duration::from_secs(20));
        assert!(code.is_some(), "{args:?} hung on the FIFO");
        assert_ne!(code, Some(0), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }
}

#[test]
fn an_oversized_stage_toml_is_refused() {
    let s = Scratch::new();
    let policy = s.root().join("etc/op-dbus/stage.toml");
    let mut text = String::from("features = []\n");
    while text.len() < 4 << 20 {
        text += "# padding padding padding padding padding padding padding padding padding\n";
    }
    fs::write(&policy, text).unwrap();
    let (code, _, err) = run_for(s.stage().args(["trust", "list"]), Duration::from_secs(20));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("larger than"), "{err}");
}

#[test]
fn trusted_key_symlinks_resolve_inside_the_root() {
    let s = Scratch::new();
    // A key outside the root, and an absolute symlink to it in trusted-keys/.
    let outside = keygen(s.dir.path(), "outside.key");
    let outside_pub = keys::private_key::pub_path(&outside);
    let evil = key_id(&outside_pub);
    let keys_dir = s.root().join("etc/op-dbus/trusted-keys");
    symlink(&outside_pub, keys_dir.join("evil.pub")).unwrap();
    // A key inside the root, by an absolute symlink that means the root's own /keys.
    let inside = keygen(s.dir.path(), "inside.key");
    let inside_pub = keys::private_key::pub_path(&inside);
    fs::create_dir_all(s.root().join("keys")).unwrap();
    fs::copy(&inside_pub, s.root().join("keys/inside.pub")).unwrap();
    symlink("/keys/inside.pub", keys_dir.join("inside.pub")).unwrap();

    let (code, out, err) = run_for(s.stage().args(["--json", "trust", "list"]), Duration::from_secs(20));
    let out = String::from_utf8_lossy(&out);
    assert!(!out.contains(&evil), "a key outside the root is trusted: {out}");
    if code == Some(0) {
        assert!(out.contains(&key_id(&inside_pub)), "{out}");
    } else {
        assert!(err.contains("evil.pub"), "{err}");
    }
    // Without the dangling one, the inside key is listed.
    fs::remove_file(keys_dir.join("evil.pub")).unwrap();
    let out = ok(s.stage().args(["--json", "trust", "list"]));
    assert!(out.contains(&key_id(&inside_pub)), "{out}");
}

// Point 4: the builder's input.

#[test]
fn a_manifest_yaml_symlink_to_the_key_is_refused_without_quoting_it() {
    let s = Scratch::new();
    let secret = s.secret();
    let dir = s.stage_dir("src", "");
    fs::remove_file(dir.join("manifest.yaml")).unwrap();
    symlink(s.key(), dir.join("manifest.yaml")).unwrap();
    for dry in [true, false] {
        let mut c = s.image();
        if dry {
            c.arg("--dry-run");
        }
        let (code, _, err) = run_for(c.arg("build").arg(&dir), Duration::from_secs(30));
        assert_ne!(code, Some(0), "{err}");
        assert!(!err.contains(&secret[..24]) && !err.contains(&secret[secret.len() - 24..]), "the key leaked: {err}");
        assert!(err.contains("regular file"), "{err}");
    }
    // /proc/self/environ: its environment stays out of the message too.
    fs::remove_file(dir.join("manifest.yaml")).unwrap();
    symlink("/proc/self/environ", dir.join("manifest.yaml")).unwrap();
    let (code, _, err) = run_for(
        s.image().env("A_SECRET_TOKEN", "hunter2hunter2").arg("--dry-run").arg("build").arg(&dir),
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(!err.contains("hunter2hunter2"), "{err}");
}

#[test]
fn yaml_errors_quote_only_a_short_escaped_excerpt() {
    let s = Scratch::new();
    let dir = s.stage_dir("src", "");
    let long = "Z".repeat(5000);
    for text in [
        fs::read_to_string(s.key()).unwrap(),
        format!("name: app\nversion: 1.0.0\ndescription: [{long}\n"),
        format!("name: app\nversion: \"{long}\"\n"),
        format!("name: app\nversion: 1.0.0\nbogus_{long}: 1\n"),
        format!("name: app\nversion: 1.0.0\ndescription: \"\\e[31mred\\u0007{long}\"\nfiles: 3\n"),
    ] {
        fs::write(dir.join("manifest.yaml"), &text).unwrap();
        let (code, _, err) = run_for(s.image().arg("--dry-run").arg("build").arg(&dir), Duration::from_secs(30));
        assert_ne!(code, Some(0), "{err}");
        assert!(!err.contains(&"Z".repeat(100)), "{} bytes of error: {err}", err.len());
        assert!(!err.contains(&s.secret()[20..60]), "{err}");
        assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "control characters: {err:?}");
        assert!(err.len() < 1200, "{} bytes of error: {err}", err.len());
    }
}

// Point 5: build steps never see the signing key.

#[test]
fn build_steps_cannot_read_the_signing_key() {
    let s = Scratch::new();
    let secret = s.secret();
    let key = s.key();
    let spy = s.path("spy.txt");
    let script = s.path("spy.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec >>{spy} 2>&1\necho '== env'; env\necho '== key'; cat {key}\n\
             echo '== cmdline'; tr '\\0' ' ' </proc/$PPID/cmdline\n\
             echo '== parent environ'; tr '\\0' '\\n' </proc/$PPID/environ\n\
             echo '== parent root'; cat /proc/$PPID/root{key}\n\
             for f in /proc/$PPID/fd/*; do [ -f \"$f\" ] && head -c 4096 \"$f\"; done\n\
             echo '== key by env'; cat \"$OP_DBUS_SIGNING_KEY\"\necho '== done'\n",
            spy = spy.display(),
            key = key.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let dir = s.stage_dir("src", &format!("build:\n  - run: {}\n", script.display()));
    // The key by the environment (as CI does), and by --key.
    let mut by_env = image(&s.path("store"), None);
    by_env.env("OP_DBUS_SIGNING_KEY", &key);
    for mut c in [by_env, s.image()] {
        let _ = fs::remove_file(&spy);
        let out = json(&ok(c.args(["--json", "-q", "build", "--force", "--format", "tar"]).arg(&dir)));
        assert!(!out["signed_by"].as_array().unwrap().is_empty(), "{out}");
        let seen = fs::read_to_string(&spy).unwrap();
        assert!(seen.contains("== done"), "{seen}");
        assert!(!seen.contains(&secret[20..60]), "a build step read the signing key:\n{seen}");
        assert!(!seen.contains("OP_DBUS_SIGNING_KEY="), "the key's variable reached the step:\n{seen}");
    }
    // The key file itself is untouched and still usable afterwards.
    assert!(fs::read_to_string(&key).unwrap().contains(&secret[20..60]));
}

#[test]
fn build_no_sign_then_sign() {
    let s = Scratch::new();
    let dir = s.stage_dir("src", "");
    let mut c = image(&s.path("store"), None);
    c.env("OP_DBUS_SIGNING_KEY", s.key());
    let built = json(&ok(c.args(["--json", "-q", "build", "--force", "--no-sign", "--format", "tar"]).arg(&dir)));
    assert!(built["signed_by"].as_array().is_none_or(|a| a.is_empty()), "{built}");
    let inspect = json(&ok(image(&s.path("store"), None).args(["--json", "inspect", "app:1.0.0"])));
    assert_eq!(inspect["signatures"].as_array().map_or(0, Vec::len), 0, "{inspect}");
    ok(s.image().args(["sign", "app:1.0.0"]));
    let inspect = json(&ok(image(&s.path("store"), None).args(["--json", "inspect", "app:1.0.0"])));
    assert_eq!(inspect["signatures"].as_array().map_or(0, Vec::len), 1, "{inspect}");
}

// Point 6 and pipes: export.

fn built(s: &Scratch) {
    let dir = s.stage_dir("src", "");
    ok(s.image().args(["-q", "build", "--force", "--format", "tar"]).arg(&dir));
}

fn verifies(pub_file: &Path, data: &[u8], sig: &str) -> bool {
    let key = keys::PublicKey::read(pub_file).unwrap();
    keys::minisign::verify_detached(&key, data, sig).is_ok()
}

#[test]
fn the_minisig_covers_exactly_what_export_wrote() {
    let s = Scratch::new();
    built(&s);
    let pub_file = keys::private_key::pub_path(&s.key());
    // The archive as written where nobody interferes (exports are reproducible).
    let clean = s.path("clean.oci.tar");
    ok(s.image().args(["-q", "export", "app:1.0.0", "--out"]).arg(&clean));
    let archive = fs::read(&clean).unwrap();
    assert!(verifies(&pub_file, &archive, &fs::read_to_string(s.path("clean.oci.tar.minisig")).unwrap()));

    // A writer of the export folder swaps the file under --out, over and over.
    let shared = s.path("shared");
    fs::create_dir_all(&shared).unwrap();
    let out = shared.join("app.oci.tar");
    let stop = Arc::new(AtomicBool::new(false));
    let evil = b"not what was exported".to_vec();
    let attackers: Vec<_> = (0..2)
        .map(|i| {
            let (stop, out, evil, shared) = (stop.clone(), out.clone(), evil.clone(), shared.clone());
            std::thread::spawn(move || {
                let tmp = shared.join(format!(".evil{i}"));
                while !stop.load(Ordering::Relaxed) {
                    let _ = fs::write(&tmp, &evil);
                    let _ = fs::rename(&tmp, &out);
                }
            })
        })
        .collect();
    let mut swapped = 0;
    for _ in 0..60 {
        let (code, _, err) =
            run_for(s.image().args(["-q", "export", "app:1.0.0", "--out"]).arg(&out), Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
        let sig = fs::read_to_string(shared.join("app.oci.tar.minisig")).unwrap();
        assert!(!verifies(&pub_file, &evil, &sig), "the .minisig signs the attacker's file");
        assert!(verifies(&pub_file, &archive, &sig), "the .minisig does not sign what was exported");
        if fs::read(&out).map(|b| b == evil).unwrap_or(false) {
            swapped += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    assert!(swapped > 0, "the attacker never swapped the file: the test proved nothing");
}

#[test]
fn export_out_dash_streams_to_stdout_and_never_replaces_a_non_file() {
    let s = Scratch::new();
    built(&s);
    let work = s.path("work");
    fs::create_dir_all(&work).unwrap();
    // `--out -`: the archive on stdout, no file named `-`.
    let (code, stdout, err) = run_for(
        s.image().current_dir(&work).args(["-q", "export", "app:1.0.0", "--out", "-"]),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!work.join("-").exists(), "a file named - was written");
    let clean = s.path("clean.oci.tar");
    ok(s.image().args(["-q", "export", "app:1.0.0", "--out"]).arg(&clean));
    assert_eq!(stdout, fs::read(&clean).unwrap(), "stdout is not the archive");
    // With `--minisig FILE`, the signature of the streamed bytes goes there.
    let sig = s.path("stream.minisig");
    let (code, stdout, err) = run_for(
        s.image().args(["-q", "export", "app:1.0.0", "--out", "-", "--minisig"]).arg(&sig),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{err}");
    let pub_file = keys::private_key::pub_path(&s.key());
    assert!(verifies(&pub_file, &stdout, &fs::read_to_string(&sig).unwrap()));

    // A symlink (as /dev/stdout is) or a FIFO at --out is never replaced.
    let target = work.join("target");
    fs::write(&target, "keep").unwrap();
    let link = work.join("link.oci.tar");
    symlink(&target, &link).unwrap();
    let fifo = work.join("fifo.oci.tar");
    ok(Command::new("mkfifo").arg(&fifo));
    for out in [&link, &fifo] {
        let (code, _, err) =
            run_for(s.image().args(["-q", "export", "app:1.0.0", "--out"]).arg(out), Duration::from_secs(60));
        assert_ne!(code, Some(0), "{err}");
        assert!(err.contains("--out -"), "{err}");
    }
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo_like());
    assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}
