//! End-to-end tests of what makes a stage run: its system users and the owners of its
//! files, its systemd units under a real systemd (see `util::systemd`), and its plugin
//! registrations.

mod util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use util::*;

impl Scratch {
    /// Builds `dir` and exports it alone.
    fn build_export(&self, dir: &Path) -> PathBuf {
        let r = self.build(dir);
        self.export(&[&r], &format!("{}.oci.tar", r.replace(':', "-")))
    }
}

/// The uid and gid of `path` (not followed).
fn owner(path: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid())
}

/// The uid and gid `passwd` gives `name`.
fn passwd_ids(root: &Path, name: &str) -> (u32, u32) {
    let text = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name}: {text}"));
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

#[test]
fn owners_as_declared_users_created_once_and_verify_catches_a_chown() {
    let s = Scratch::trusted();
    fs::create_dir_all(s.root().join("etc")).unwrap();
    fs::write(s.root().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(s.root().join("etc/group"), "root:x:0:\n").unwrap();
    let manifest = "users:\n  - name: op-dbus\n    description: op-dbus service\nfiles:\n  - path: bin/app\n    \
                    target: /usr/local/bin/app\n    owner: op-dbus\n  - path: etc/app.conf\n    target: \
                    /etc/op-dbus/app.conf\n    owner: 4242\n    group: \"4343\"\n";
    let files = [("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x=1\n"), ("etc/other", "y\n")];
    let v1 = stage_dir(s.dir.path(), "app", "1.0.0", manifest, &files);
    let out = json(&ok(s.stage().args(["--json", "deploy"]).arg(s.build_export(&v1))));
    let notes = out["deployed"][0]["notes"].to_string();
    assert!(notes.contains("created system user op-dbus"), "{notes}");
    let (uid, gid) = passwd_ids(&s.root(), "op-dbus");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");

    let gen_dir = fs::canonicalize(s.root().join("var/lib/op-dbus/staging/app")).unwrap();
    assert_eq!(owner(&gen_dir.join("bin/app")), (uid, gid));
    assert_eq!(owner(&gen_dir.join("etc/app.conf")), (4242, 4343));
    assert_eq!(owner(&gen_dir.join("etc/other")), (0, 0));
    assert_eq!(owner(&gen_dir.join("etc")), (0, 0));
    // The embedded manifest records the owners as declared.
    let m = json(&fs::read_to_string(gen_dir.join("manifest.json")).unwrap());
    assert_eq!(m["files"][0]["owner"], "op-dbus");
    assert_eq!(m["files"][1]["owner"], 4242);
    assert_eq!(m["files"][1]["group"], 4343);
    assert_eq!(m["users"][0]["name"], "op-dbus");
    ok(s.stage().arg("verify"));

    // A chown by hand is found, named, and is a failed verify.
    std::os::unix::fs::lchown(gen_dir.join("bin/app"), Some(0), Some(0)).unwrap();
    let out = run(s.stage().args(["verify", "app"]));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bin/app") && text.contains("owned by 0:0"), "{text}");
    std::os::unix::fs::lchown(gen_dir.join("bin/app"), Some(uid), Some(gid)).unwrap();
    ok(s.stage().arg("verify"));

    // The next version finds the user there: not created again, not changed.
    let passwd = fs::read_to_string(s.root().join("etc/passwd")).unwrap();
    let v2 = stage_dir(s.dir.path(), "app", "1.1.0", manifest, &files);
    let out = json(&ok(s.stage().args(["--json", "deploy"]).arg(s.build_export(&v2))));
    assert!(!out["deployed"][0]["notes"].to_string().contains("created"), "{out}");
    assert_eq!(fs::read_to_string(s.root().join("etc/passwd")).unwrap(), passwd);
    let gen2 = fs::canonicalize(s.root().join("var/lib/op-dbus/staging/app")).unwrap();
    assert_ne!(gen2, gen_dir);
    assert_eq!(owner(&gen2.join("bin/app")), (uid, gid));

    // An owner the root does not know is refused before anything changes (exit 4).
    let ghost = "files:\n  - path: bin/app\n    target: /usr/local/bin/app2\n    owner: ghost\n";
    let v3 = stage_dir(s.dir.path(), "other", "1.0.0", ghost, &files);
    let (code, err) = fails(s.stage().arg("deploy").arg(s.build_export(&v3)));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("ghost") && err.contains("users:"), "{err}");
    assert!(!s.root().join("usr/local/bin/app2").exists());
}
