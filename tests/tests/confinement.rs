//! What a stage and its signer may reach on the host (issue 9): backups keep what they back
//! up across filesystems, verify commands run confined, and a key's scope can narrow the
//! target prefixes. These tests need root (mounts, ownership, namespaces).

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use util::*;

impl Scratch {
    /// Builds the stage folder `dir`, signed with `key`, and exports it alone.
    fn build_export_with(&self, dir: &Path, key: &Path) -> PathBuf {
        let store = self.dir.path().join("store");
        let out = json(&ok(image(&store, Some(key)).args(["--json", "-q", "build"]).arg(dir)));
        let r = out["reference"].as_str().unwrap().to_owned();
        let file = self.dir.path().join(format!("{}.oci.tar", r.replace(':', "-")));
        ok(image(&store, Some(key)).args(["-q", "export", &r, "--out"]).arg(&file));
        file
    }
    fn build_export(&self, dir: &Path) -> PathBuf {
        self.build_export_with(dir, &self.key())
    }
    fn policy(&self) -> PathBuf {
        self.root().join("etc/op-dbus/stage.toml")
    }
    fn append_policy(&self, text: &str) {
        let mut t = fs::read_to_string(self.policy()).unwrap();
        t.push_str(text);
        fs::write(self.policy(), t).unwrap();
    }
}

/// A tmpfs mounted at a path, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, opts: &str) -> Tmpfs {
        assert!(is_root(), "this test mounts a tmpfs and sets owners: run it as root (CI does)");
        fs::create_dir_all(at).unwrap();
        ok(Command::new(require_tool("mount", "mount")).args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(at));
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every path under `dir` with type, owner, group, mode, atime and mtime (ns), xattrs and
/// link text; contents are not read (reading would move atimes), see [`contents`].
fn metadata_tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let kind = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                "dir".to_owned()
            } else {
                "file".to_owned()
            };
            let mut xattrs = Vec::new();
            if !m.file_type().is_symlink() {
                let mut names = vec![0u8; 4096];
                let n = rustix::fs::listxattr(&p, &mut names).unwrap();
                for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                    let name = std::ffi::CString::new(name).unwrap();
                    let mut value = vec![0u8; 4096];
                    let len = rustix::fs::getxattr(&p, name.as_c_str(), &mut value).unwrap();
                    xattrs.push(format!("{}={}", name.to_string_lossy(), String::from_utf8_lossy(&value[..len])));
                }
            }
            xattrs.sort();
            out.insert(
                rel,
                format!(
                    "{kind} uid {} gid {} mode {:o} atime {}.{:09} mtime {}.{:09} xattrs [{}]",
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777,
                    m.atime(),
                    m.atime_nsec(),
                    m.mtime(),
                    m.mtime_nsec(),
                    xattrs.join(", ")
                ),
            );
            if m.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The contents of the regular files under `dir`.
fn contents(dir: &Path) -> BTreeMap<String, String> {
    tree(dir).into_iter().filter(|(_, v)| v.starts_with("file")).collect()
}

fn set_times(p: &Path, atime: SystemTime, mtime: SystemTime) {
    let times = fs::FileTimes::new().set_accessed(atime).set_modified(mtime);
    fs::File::open(p).unwrap().set_times(times).unwrap();
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

fn set_xattr(p: &Path, name: &str, value: &str) {
    rustix::fs::setxattr(p, name, value.as_bytes(), rustix::fs::XattrFlags::empty()).unwrap();
}

#[test]
fn backups_across_filesystems_keep_owner_mode_times_and_xattrs_needs_root() {
    let s = Scratch::new();
    s.trust();
    // The operator's /opt is another filesystem (noatime, so that the test's own reads do
    // not move the times it compares).
    let opt = s.root().join("opt");
    let _mnt = Tmpfs::mount(&opt, "noatime,mode=755");
    fs::create_dir_all(opt.join("app")).unwrap();
    let tool = opt.join("app/tool");
    fs::write(&tool, "operator's tool\n").unwrap();
    std::os::unix::fs::chown(&tool, Some(1234), Some(2345)).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o751)).unwrap();
    set_xattr(&tool, "user.origin", "operator");
    set_times(&tool, at(1_577_836_800, 123_456_789), at(1_609_459_200, 987_654_321));
    let data = opt.join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("notes"), "operator's notes\n").unwrap();
    std::os::unix::fs::chown(data.join("notes"), Some(1234), Some(1234)).unwrap();
    fs::set_permissions(data.join("notes"), fs::Permissions::from_mode(0o600)).unwrap();
    set_xattr(&data.join("notes"), "user.kind", "notes");
    set_times(&data.join("notes"), at(1_500_000_000, 1), at(1_500_000_001, 2));
    std::os::unix::fs::symlink("notes", data.join("latest")).unwrap();
    std::os::unix::fs::lchown(data.join("latest"), Some(1234), Some(2345)).unwrap();
    std::os::unix::fs::chown(&data, Some(1234), Some(2345)).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o2750)).unwrap();
    set_xattr(&data, "user.kind", "dir");
    set_times(&data, at(1_400_000_000, 111), at(1_400_000_000, 222));
    // And one on the root's own filesystem (a rename).
    let bin = s.root().join("usr/local/bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(bin.join("tool"), "operator's other tool\n").unwrap();
    std::os::unix::fs::chown(bin.join("tool"), Some(1234), Some(2345)).unwrap();
    fs::set_permissions(bin.join("tool"), fs::Permissions::from_mode(0o4750)).unwrap();
    set_xattr(&bin.join("tool"), "user.origin", "operator");
    set_times(&bin.join("tool"), at(1_577_836_800, 5), at(1_577_836_800, 6));
    let before = metadata_tree(&opt);
    let before_bin = metadata_tree(&bin);
    let before_contents = contents(&opt);

    let dir = stage_dir(
        s.dir.path(),
        "app",
        "1.0.0",
        "files:
  - path: bin/tool
    target: /opt/app/tool
    type: copy
  - path: share
    target: /opt/data
    type: symlink
  - path: bin/other
    target: /usr/local/bin/tool
    type: symlink
",
        &[
            ("bin/tool", "#!/bin/sh\necho stage tool\n"),
            ("bin/other", "#!/bin/sh\n"),
            ("share/readme", "from the stage\n"),
        ],
    );
    ok(s.stage().arg("deploy").arg(s.build_export(&dir)));
    assert_eq!(fs::read_to_string(&tool).unwrap(), "#!/bin/sh\necho stage tool\n");
    assert!(data.is_symlink());
    ok(s.stage().args(["remove", "app"]));
    // `app` itself stayed where it was: only its entries changed (and with them its mtime).
    let without_parent = |mut t: BTreeMap<String, String>| {
        t.remove("app");
        t
    };
    assert_eq!(without_parent(metadata_tree(&opt)), without_parent(before), "the operator's files came back changed");
    assert_eq!(metadata_tree(&bin), before_bin, "the operator's file came back changed");
    assert_eq!(contents(&opt), before_contents);
    assert_eq!(fs::read_to_string(bin.join("tool")).unwrap(), "operator's other tool\n");
}

/// A stage `app` whose verify commands are `commands` (each expecting exit 0).
fn verifying_stage(s: &Scratch, version: &str, commands: &[&str], files: &[(&str, &str)]) -> PathBuf {
    let mut extra =
        String::from("files:\n  - path: bin/app\n    target: /usr/local/bin/app\n    type: symlink\nverify:\n");
    for c in commands {
        extra += &format!("  - command: {c:?}\n    expect_exit: 0\n    timeout: 10s\n");
    }
    let mut all = vec![("bin/app", "#!/bin/sh\necho app\n")];
    all.extend_from_slice(files);
    s.build_export(&stage_dir(s.dir.path(), "app", version, &extra, &all))
}

#[test]
fn verify_commands_cannot_change_the_host_and_do_not_run_as_root_needs_root() {
    assert!(is_root(), "this test checks that verify commands drop root: run it as root (CI does)");
    let s = Scratch::new();
    s.trust();
    let policy_before = fs::read_to_string(s.policy()).unwrap();
    let outside = s.dir.path().join("outside-the-root");
    let gen_dir = s.root().join("var/lib/op-dbus/staging/.generations/app");
    // Each write is tried and its failure ignored: what counts is what is left on disk.
    let export = verifying_stage(
        &s,
        "1.0.0",
        &[
            "echo 'allowed_prefixes = [\"/etc\"]' >> \"$OP_DBUS_ROOT/etc/op-dbus/stage.toml\" || true",
            "rm -f \"$OP_DBUS_ROOT/etc/op-dbus/stage.toml\" || true",
            &format!("touch {} || true", outside.display()),
            "touch \"$OP_DBUS_ROOT/planted\" || true",
            "touch ./planted bin/app || true; echo x >> bin/app || true",
            "test \"$(id -u)\" -ne 0 && test \"$(id -g)\" -ne 0",
            // No capabilities left, none to gain.
            "grep -q '^CapEff:[[:space:]]*0000000000000000$' /proc/self/status",
            "grep -q '^CapBnd:[[:space:]]*0000000000000000$' /proc/self/status",
            "grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/self/status",
        ],
        &[],
    );
    let out = run(s.stage().arg("deploy").arg(&export));
    assert_eq!(fs::read_to_string(s.policy()).ok(), Some(policy_before), "a verify command rewrote stage.toml");
    assert!(!outside.exists(), "a verify command wrote outside the root");
    assert!(!s.root().join("planted").exists(), "a verify command wrote into the root");
    for e in fs::read_dir(&gen_dir).unwrap() {
        let g = e.unwrap().path();
        assert!(!g.join("planted").exists(), "a verify command wrote into its generation");
        assert_eq!(fs::read_to_string(g.join("bin/app")).unwrap(), "#!/bin/sh\necho app\n");
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.root().join("usr/local/bin/app").is_symlink(), "the checks passed, so the stage is active");
}

#[test]
fn verify_runs_the_hosts_own_sh_needs_root() {
    assert!(is_root(), "this test plants files owned by root: run it as root (CI does)");
    let s = Scratch::new();
    s.trust();
    let marker = s.dir.path().join("planted-sh-ran");
    let planted = format!("#!/bin/sh\necho ran > {}\nexit 42\n", marker.display());
    for p in ["usr/local/sbin/sh", "usr/local/bin/sh", "usr/sbin/sh", "usr/bin/sh", "sbin/sh", "bin/sh"] {
        let f = s.root().join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, &planted).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The stage's own bin/ is on PATH too.
    let export = verifying_stage(&s, "1.0.0", &["true"], &[("bin/sh", &planted)]);
    ok(s.stage().arg("deploy").arg(&export));
    ok(s.stage().arg("verify"));
    assert!(!marker.exists(), "a sh found inside the root ran");
}

#[test]
fn verify_user_comes_from_stage_toml_needs_root() {
    assert!(is_root(), "this test runs verify commands as another user: run it as root (CI does)");
    let s = Scratch::new();
    s.trust();
    // The default is nobody.
    let nobody = verifying_stage(&s, "1.0.0", &["test \"$(id -un)\" = nobody"], &[]);
    ok(s.stage().arg("deploy").arg(&nobody));
    // stage.toml may name another user for some stages.
    s.append_policy("[verify_users]\n\"ap?\" = \"1234:2345\"\n\"*\" = \"nobody\"\n");
    let other = verifying_stage(&s, "1.0.1", &["test \"$(id -u):$(id -g)\" = 1234:2345"], &[]);
    ok(s.stage().arg("deploy").arg(&other));
    ok(s.stage().arg("verify"));
    // Even a configured root has no capabilities and a read-only host.
    let text = fs::read_to_string(s.policy()).unwrap().replace("1234:2345", "0:0");
    fs::write(s.policy(), text).unwrap();
    let root = verifying_stage(
        &s,
        "1.0.2",
        &[
            "test \"$(id -u)\" -eq 0",
            "! touch \"$OP_DBUS_ROOT/planted\"",
            "grep -q '^CapEff:[[:space:]]*0000000000000000$' /proc/self/status",
        ],
        &[],
    );
    ok(s.stage().arg("deploy").arg(&root));
    assert!(!s.root().join("planted").exists());
    // A user this host does not know is refused with the file and the setting named.
    let text = fs::read_to_string(s.policy()).unwrap().replace("0:0", "no-such-user");
    fs::write(s.policy(), text).unwrap();
    let (code, err) = fails(s.stage().arg("verify"));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no-such-user") && err.contains("verify_users"), "{err}");
}

#[test]
fn a_scope_can_narrow_the_target_prefixes_of_a_key() {
    let s = Scratch::new();
    let web_key = keygen(s.dir.path(), "web.key");
    let added = json(&ok(s
        .stage()
        .args(["--json", "trust", "add", "--scope", "web-*"])
        .arg(format!("{}.pub", web_key.display()))));
    let id = added["key_id"].as_str().unwrap().to_owned();
    s.append_policy(&format!("[scope_prefixes]\n\"{id}\" = [\"/var/www\"]\n"));
    let listed = json(&ok(s.stage().args(["--json", "trust", "list"])));
    assert_eq!(listed["keys"][0]["prefixes"], serde_json::json!(["/var/www"]), "{listed}");

    let site = stage_dir(
        s.dir.path(),
        "web-site",
        "1.0.0",
        "files:\n  - path: index.html\n    target: /var/www/site/index.html\n    type: symlink\n",
        &[("index.html", "hello\n")],
    );
    ok(s.stage().arg("deploy").arg(s.build_export_with(&site, &web_key)));
    assert!(s.root().join("var/www/site/index.html").is_symlink());

    // /usr/local is an allowed prefix of the host, but not of this key.
    let evil = stage_dir(
        s.dir.path(),
        "web-evil",
        "1.0.0",
        "files:\n  - path: bin/tool\n    target: /usr/local/bin/tool\n    type: symlink\n",
        &[("bin/tool", "#!/bin/sh\n")],
    );
    let export = s.build_export_with(&evil, &web_key);
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(&export));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("/usr/local/bin/tool") && err.contains(&id) && err.contains("/var/www"), "{err}");
    assert_eq!(tree(&s.root()), before, "a refused deploy changed the root");
    ok(s.stage().arg("recover"));
    let list = json(&ok(s.stage().args(["--json", "list"])));
    let deployed = deployed_names(&list);
    assert_eq!(deployed, ["web-site"], "{list}");

    // Signed by a key whose scope does not narrow the prefixes, the same files may go there.
    s.trust();
    let evil = stage_dir(
        s.dir.path(),
        "web-evil",
        "1.0.1",
        "files:\n  - path: bin/tool\n    target: /usr/local/bin/tool\n    type: symlink\n",
        &[("bin/tool", "#!/bin/sh\n")],
    );
    ok(s.stage().arg("deploy").arg(s.build_export(&evil)));
    assert!(s.root().join("usr/local/bin/tool").is_symlink());
}
