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
                    /etc/op-dbus/app.conf\n    type: copy\n    owner: 4242\n    group: \"4343\"\n";
    let files = [("bin/app", "#!/bin/sh\n"), ("etc/app.conf", "x=1\n"), ("etc/other", "y\n")];
    let v1 = stage_dir(s.dir.path(), "app", "1.0.0", manifest, &files);
    let export = s.build_export(&v1);
    let shown = ok(s.image().args(["inspect", "app:1.0.0"]));
    assert!(shown.contains("(symlink, owner op-dbus:-)") && shown.contains("(copy, owner 4242:4343)"), "{shown}");
    assert!(shown.contains("user         op-dbus"), "{shown}");
    let plan = json(&ok(s.stage().args(["--json", "--dry-run", "deploy"]).arg(&export)));
    assert!(plan["deployed"][0]["notes"].to_string().contains("would create system user op-dbus"), "{plan}");
    assert!(!fs::read_to_string(s.root().join("etc/passwd")).unwrap().contains("op-dbus"), "--dry-run made the user");
    let out = json(&ok(s.stage().args(["--json", "deploy"]).arg(&export)));
    let notes = out["deployed"][0]["notes"].to_string();
    assert!(notes.contains("created system user op-dbus"), "{notes}");
    let (uid, gid) = passwd_ids(&s.root(), "op-dbus");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");

    let gen_dir = fs::canonicalize(s.root().join("var/lib/op-dbus/staging/app")).unwrap();
    assert_eq!(owner(&gen_dir.join("bin/app")), (uid, gid));
    assert_eq!(owner(&gen_dir.join("etc/app.conf")), (4242, 4343));
    assert_eq!(owner(&gen_dir.join("etc/other")), (0, 0));
    assert_eq!(owner(&gen_dir.join("etc")), (0, 0));
    // A copy carries the declared owner too.
    assert_eq!(owner(&s.root().join("etc/op-dbus/app.conf")), (4242, 4343));
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
    std::os::unix::fs::lchown(s.root().join("etc/op-dbus/app.conf"), Some(0), Some(0)).unwrap();
    let out = run(s.stage().args(["verify", "app"]));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/etc/op-dbus/app.conf: the copy is owned by 0:0"),
        "{out:?}"
    );
    std::os::unix::fs::lchown(s.root().join("etc/op-dbus/app.conf"), Some(4242), Some(4343)).unwrap();
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
    let v3 = s.build_export(&v3);
    let (code, err) = fails(s.stage().args(["--dry-run", "deploy"]).arg(&v3));
    assert_eq!(code, 4, "a dry run judges owners too: {err}");
    let (code, err) = fails(s.stage().arg("deploy").arg(&v3));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("ghost") && err.contains("users:"), "{err}");
    assert!(!s.root().join("usr/local/bin/app2").exists());
}

/// A stage with a service running `bin/app` as the user `op-dbus`; `unit_extra` goes into
/// its `[Service]` section, `files` add to or replace the defaults.
fn service_stage(s: &Scratch, version: &str, app: &str, unit_extra: &str, other: &str) -> PathBuf {
    let manifest = "users:\n  - name: op-dbus\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/op-dbus-app\n  \
                    - path: systemd/op-dbus-app.service\n    target: /etc/systemd/system/op-dbus-app.service\n  - path: \
                    etc/notes\n    target: /etc/op-dbus/notes\nservices: [op-dbus-app.service]\n";
    let unit = format!(
        "[Unit]\nDescription=op-dbus test app\n[Service]\nUser=op-dbus\nExecStart=/usr/local/bin/op-dbus-app\n{unit_extra}\
         [Install]\nWantedBy=multi-user.target\n"
    );
    stage_dir(
        s.dir.path(),
        "svc",
        version,
        manifest,
        &[("bin/app", app), ("systemd/op-dbus-app.service", &unit), ("etc/notes", other)],
    )
}

/// Builds `dir`, exports it into the root's /tmp and deploys it from inside; the output.
fn deploy_inside(s: &Scratch, sd: &util::systemd::Systemd, dir: &Path) -> std::process::Output {
    let export = s.build_export(dir);
    let inside = format!("/tmp/{}", export.file_name().unwrap().to_string_lossy());
    fs::copy(&export, s.root().join(inside.trim_start_matches('/'))).unwrap();
    run(sd.stage().args(["--json", "deploy", &inside]))
}

#[test]
fn services_start_restart_on_change_roll_back_on_failure_and_stop_on_remove_under_real_systemd() {
    let s = Scratch::trusted();
    let sd = util::systemd::Systemd::boot(&s.root());
    let unit = "op-dbus-app.service";
    let app = "#!/bin/sh\nexec sleep 1000\n";

    // First deploy: enabled, started, running as the declared user.
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.0.0", app, "", "n1\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sd.is_active(unit), "active");
    let pid = sd.main_pid(unit);
    assert_ne!(pid, 0);
    let (uid, _) = passwd_ids(&s.root(), "op-dbus");
    assert_eq!(sd.uid_of(pid), uid, "the service runs as op-dbus");
    // The enablement link points at the unit's stable path, not into a generation.
    let wants = s.root().join("etc/systemd/system/multi-user.target.wants").join(unit);
    assert_eq!(fs::read_link(&wants).unwrap(), Path::new("/etc/systemd/system").join(unit));
    let enabled = sd.systemctl(&["is-enabled", unit]);
    assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "enabled");
    // verify checks the unit is active.
    let v = json(&ok(sd.stage().args(["--json", "verify"])));
    assert!(v.to_string().contains(&format!("systemctl is-active {unit}")), "{v}");

    // An upgrade that changes neither the unit nor what it runs leaves the process alone.
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.1.0", app, "", "n2\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sd.main_pid(unit), pid, "an unchanged service was restarted");

    // One that changes its binary restarts it.
    let app2 = "#!/bin/sh\n# 1.2\nexec sleep 1001\n";
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.2.0", app2, "", "n2\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid2 = sd.main_pid(unit);
    assert!(pid2 != 0 && pid2 != pid, "a changed binary did not restart the service ({pid} -> {pid2})");
    assert_eq!(sd.is_active(unit), "active");
    // The previous generation is still there; the link still resolves after the switch.
    assert_eq!(fs::read_link(&wants).unwrap(), Path::new("/etc/systemd/system").join(unit));

    // A version whose service fails to start is rolled back: exit 5, 1.2.0 runs again.
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.3.0", app2, "ExecStartPre=/bin/false\n", "n2\n"));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(unit), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sd.is_active(unit), "active", "the rolled-back service is running again");
    let list = json(&ok(sd.stage().args(["--json", "list"])));
    let svc = list["stages"].as_array().unwrap().iter().find(|x| x["status"] == "deployed").unwrap().clone();
    assert_eq!(svc["version"], "1.2.0", "{list}");
    let unit_text = fs::read_to_string(s.root().join("var/lib/op-dbus/staging/svc/systemd").join(unit)).unwrap();
    assert!(!unit_text.contains("ExecStartPre"), "{unit_text}");

    // One whose program starts and dies at once is found by `systemctl is-active`: rolled back too.
    let dies = "#!/bin/sh\nexit 3\n";
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.3.1", dies, "", "n2\n"));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("systemctl is-active {unit}")) && err.contains("failed"), "{err}");
    assert_eq!(sd.is_active(unit), "active", "the rolled-back service is running again");
    assert_eq!(fs::read_to_string(s.root().join("var/lib/op-dbus/staging/svc/bin/app")).unwrap(), app2);

    // A service that stops by hand fails verify.
    assert!(sd.systemctl(&["stop", unit]).status.success());
    let out = run(sd.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(sd.systemctl(&["start", unit]).status.success());

    // A version without the unit stops and disables it; rolling back starts it again.
    let plain = stage_dir(s.dir.path(), "svc", "2.0.0", "users:\n  - name: op-dbus\n", &[("etc/notes", "n3\n")]);
    let out = deploy_inside(&s, &sd, &plain);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(sd.is_active(unit), "active");
    assert!(fs::symlink_metadata(&wants).is_err(), "the enablement link is left");
    let out = run(sd.stage().args(["rollback", "svc"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sd.is_active(unit), "active");
    assert_eq!(fs::read_link(&wants).unwrap(), Path::new("/etc/systemd/system").join(unit));

    // remove stops and disables it; the unit's own link goes with the stage.
    let out = run(sd.stage().args(["remove", "svc"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(sd.is_active(unit), "active");
    assert!(fs::symlink_metadata(&wants).is_err(), "the enablement link is left");
    assert!(fs::symlink_metadata(s.root().join("etc/systemd/system").join(unit)).is_err());
}

/// A stage providing the plugins lxc (with its file, linked) and dns (without one).
fn plugin_stage(s: &Scratch, version: &str) -> PathBuf {
    let manifest =
        "plugins: [lxc, dns]\nfiles:\n  - path: plugins/lxc.json\n    target: /etc/op-dbus/plugins.d/lxc.json\n";
    stage_dir(s.dir.path(), "plugs", version, manifest, &[("plugins/lxc.json", &format!("{{\"v\": \"{version}\"}}\n"))])
}

#[test]
fn deploy_plugin_registers_update_plugin_moves_on_remove_unregisters_and_verify_checks() {
    let s = Scratch::trusted();
    let reg = s.root().join("etc/op-dbus/plugins/lxc.toml");
    let (code, err) = fails(s.stage().args(["deploy-plugin", "lxc"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lxc") && err.contains("receive"), "{err}");

    // From the local store: the stage that provides lxc is deployed and registered.
    ok(s.stage().arg("receive").arg(s.build_export(&plugin_stage(&s, "1.0.0"))));
    let plan = json(&ok(s.stage().args(["--json", "--dry-run", "deploy-plugin", "lxc"])));
    assert_eq!(plan["outcome"], "deployed", "{plan}");
    assert!(plan["deploy"]["deployed"][0]["steps"].to_string().contains("register plugin"), "{plan}");
    assert!(!reg.exists(), "--dry-run registered the plugin");
    let out = json(&ok(s.stage().args(["--json", "deploy-plugin", "lxc"])));
    assert_eq!(out["outcome"], "deployed", "{out}");
    assert_eq!(out["reference"], "plugs:1.0.0");
    let text = fs::read_to_string(&reg).unwrap();
    assert!(
        text.contains("name = \"lxc\"") && text.contains("stage = \"plugs\"") && text.contains("version = \"1.0.0\"")
    );
    assert!(text.contains("file = \"/etc/op-dbus/plugins.d/lxc.json\""), "{text}");
    let dns = fs::read_to_string(s.root().join("etc/op-dbus/plugins/dns.toml")).unwrap();
    assert!(dns.contains("name = \"dns\"") && !dns.contains("file"), "{dns}");
    ok(s.stage().arg("verify"));
    // Again: already there, nothing done.
    let out = json(&ok(s.stage().args(["--json", "deploy-plugin", "lxc"])));
    assert_eq!(out["outcome"], "already-deployed");
    let out = json(&ok(s.stage().args(["--json", "deploy-plugin", "lxc", "--force"])));
    assert_eq!(out["outcome"], "already-deployed", "the newest image is the active one: {out}");

    // A registration removed by hand fails verify, naming it.
    fs::remove_file(&reg).unwrap();
    let out = run(s.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("plugins/lxc.toml"), "{out:?}");
    ok(s.stage().args(["fix-symlinks", "plugs"]));
    assert_eq!(fs::read_to_string(&reg).unwrap(), text, "fix-symlinks writes it again");
    // So does a plugin file that no longer resolves.
    let linked = s.root().join("etc/op-dbus/plugins.d/lxc.json");
    let kept = fs::read_link(&linked).unwrap();
    fs::remove_file(&linked).unwrap();
    let out = run(s.stage().arg("verify"));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("lxc.json does not resolve"), "{out:?}");
    std::os::unix::fs::symlink(kept, &linked).unwrap();
    ok(s.stage().arg("verify"));

    // update-plugin takes the newer image from a SOURCE; then there is nothing newer.
    let v2 = s.build_export(&plugin_stage(&s, "1.1.0"));
    let out = json(&ok(s.stage().args(["--json", "update-plugin", "lxc"]).arg(&v2)));
    assert_eq!(out["outcome"], "updated", "{out}");
    assert!(fs::read_to_string(&reg).unwrap().contains("version = \"1.1.0\""));
    let out = json(&ok(s.stage().args(["--json", "update-plugin", "lxc"])));
    assert_eq!(out["outcome"], "up-to-date", "{out}");
    ok(s.stage().arg("verify"));
    // Rollback brings the earlier registration back with its generation.
    ok(s.stage().args(["rollback", "plugs"]));
    assert!(fs::read_to_string(&reg).unwrap().contains("version = \"1.0.0\""));
    ok(s.stage().arg("verify"));

    // remove unregisters both plugins.
    ok(s.stage().args(["remove", "plugs"]));
    assert!(!reg.exists() && !s.root().join("etc/op-dbus/plugins/dns.toml").exists());
    let (code, err) = fails(s.stage().args(["update-plugin", "lxc"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("deploy-plugin lxc"), "{err}");
}

#[test]
fn units_under_another_root_are_enabled_there_and_left_to_the_operator() {
    let s = Scratch::trusted();
    let unit = "op-dbus-app.service";
    let export = s.build_export(&service_stage(&s, "1.0.0", "#!/bin/sh\nexec sleep 1000\n", "", "n\n"));
    let plan = json(&ok(s.stage().args(["--json", "--dry-run", "deploy"]).arg(&export)));
    assert!(plan["deployed"][0]["notes"].to_string().contains(&format!("would start {unit}")), "{plan}");
    let out = json(&ok(s.stage().args(["--json", "deploy"]).arg(&export)));
    let notes = out["deployed"][0]["notes"].to_string();
    assert!(notes.contains("is not the running system") && notes.contains(&format!("start {unit}")), "{notes}");
    // Enabled in the root, through the unit's stable path.
    let wants = s.root().join("etc/systemd/system/multi-user.target.wants").join(unit);
    assert_eq!(fs::read_link(&wants).unwrap(), Path::new("/etc/systemd/system").join(unit));
    let out = json(&ok(s.stage().args(["--json", "remove", "svc"])));
    assert!(out["notes"].to_string().contains(&format!("stop {unit}")), "{out}");
    assert!(fs::symlink_metadata(&wants).is_err());
    assert!(fs::symlink_metadata(s.root().join("etc/systemd/system").join(unit)).is_err());
}

#[test]
fn a_manager_named_by_op_dbus_systemctl_runs_units_under_another_root() {
    let s = Scratch::trusted();
    let sd = util::systemd::Systemd::boot(&s.root());
    let unit = "op-dbus-opt.service";
    let manifest = format!(
        "files:\n  - path: bin/app\n    target: /opt/op-dbus-opt/app\n  - path: systemd/{unit}\n    target: \
         /etc/systemd/system/{unit}\nservices: [{unit}]\n"
    );
    let unit_text = "[Service]\nExecStart=/opt/op-dbus-opt/app\n[Install]\nWantedBy=multi-user.target\n";
    let dir = stage_dir(
        s.dir.path(),
        "opt",
        "1.0.0",
        &manifest,
        &[("bin/app", "#!/bin/sh\nexec sleep 1000\n"), (&format!("systemd/{unit}"), unit_text)],
    );
    // The installer runs outside, on the root as a directory; the manager is reached with nsenter.
    let manager = format!("nsenter -t {} -m -p -r systemctl", sd.pid);
    let out = run(s.stage().env("OP_DBUS_SYSTEMCTL", &manager).arg("deploy").arg(s.build_export(&dir)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sd.is_active(unit), "active");
    let out = run(s.stage().env("OP_DBUS_SYSTEMCTL", &manager).args(["verify"]));
    assert!(out.status.success(), "{out:?}");
    let out = run(s.stage().env("OP_DBUS_SYSTEMCTL", &manager).args(["remove", "opt"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(sd.is_active(unit), "active");
}

/// The program line of `pid` inside the namespace (`sleep 1000`).
fn cmdline(sd: &util::systemd::Systemd, pid: u32) -> String {
    let out = run(sd.enter("cat").arg(format!("/proc/{pid}/cmdline")));
    String::from_utf8_lossy(&out.stdout).replace('\0', " ").trim().to_owned()
}

#[test]
fn a_crash_at_any_point_of_an_upgrade_leaves_the_service_running_the_recorded_version() {
    let s = Scratch::trusted();
    let sd = util::systemd::Systemd::boot_with_faults(&s.root());
    let unit = "op-dbus-app.service";
    let out = deploy_inside(&s, &sd, &service_stage(&s, "1.0.0", "#!/bin/sh\nexec sleep 1000\n", "", "n\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = s.build_export(&service_stage(&s, "2.0.0", "#!/bin/sh\nexec sleep 2000\n", "", "n\n"));
    fs::copy(&export, s.root().join("tmp/v2.oci.tar")).unwrap();
    let mut points = 0;
    for n in 1.. {
        let out = run(sd.fault_stage().args(["deploy", "/tmp/v2.oci.tar"]).env("OP_DBUS_FAULT_AT", n.to_string()));
        let done = out.status.success();
        // The next command finishes the transaction (as after) or rolls it back (as before).
        ok(sd.stage().arg("recover"));
        let list = json(&ok(sd.stage().args(["--json", "list"])));
        let deployed = list["stages"].as_array().unwrap().iter().find(|x| x["status"] == "deployed").unwrap().clone();
        let want = if deployed["version"] == "2.0.0" { "sleep 2000" } else { "sleep 1000" };
        assert_eq!(sd.is_active(unit), "active", "after a crash at point {n}");
        assert_eq!(cmdline(&sd, sd.main_pid(unit)), want, "after a crash at point {n} ({})", deployed["version"]);
        if done {
            break;
        }
        points += 1;
        // Back to 1.0.0 for the next point, if the crash left 2.0.0.
        if deployed["version"] == "2.0.0" {
            ok(sd.stage().args(["rollback", "svc"]));
        }
    }
    assert!(points > 3, "the upgrade passed only {points} fault points");
}

#[test]
#[ignore = "a measurement: cargo test -p e2e --test services systemd_boot_time -- --ignored --nocapture"]
fn systemd_boot_time() {
    for _ in 0..5 {
        let d = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let sd = util::systemd::Systemd::boot(&d.path().join("root"));
        let up = t.elapsed();
        drop(sd);
        println!("boot {:?}, boot and stop {:?}", up, t.elapsed());
    }
}

#[test]
fn an_unprivileged_installer_on_a_scratch_root_owns_what_it_stages() {
    use std::os::unix::process::CommandExt;
    assert!(is_root(), "this test switches to the user nobody: run it as root (CI does)");
    let s = Scratch::new();
    let root = s.path("nobody-root");
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
    let nobody = |args: &[&str]| {
        let mut c = std::process::Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(&root).args(args).env("HOME", &root).uid(65534).gid(65534);
        c
    };
    ok(&mut nobody(&["init"]));
    ok(nobody(&["trust", "add"]).arg(s.pub_key()));
    let dir = stage_dir(
        s.dir.path(),
        "app",
        "1.0.0",
        "files:\n  - path: bin/app\n    target: /opt/app\n",
        &[("bin/app", "x")],
    );
    let export = s.build_export(&dir);
    fs::set_permissions(&export, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    ok(nobody(&["deploy"]).arg(&export));
    let out = run(&mut nobody(&["verify"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
