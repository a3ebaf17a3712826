//! End-to-end tests across a network: hosts with a real sshd, each in a network namespace
//! of its own (util::fleet), and the operator's way of deploying to them today: the export
//! piped into `ssh HOST op-dbus-stage deploy -`.

mod util;

use std::fs;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use util::fleet::Fleet;
use util::*;

const APP: &str = "files:\n  - path: bin/app\n    target: /usr/local/bin/app\n    type: symlink\n";

/// `op-dbus-stage --root ROOT ARGS...` on host `i`, over ssh.
fn remote(fleet: &Fleet, i: usize, args: &[&str]) -> std::process::Command {
    let stage = bin("op-dbus-stage");
    let root = fleet.root(i).to_str().unwrap().to_owned();
    let mut all = vec![stage.to_str().unwrap(), "--root", &root];
    all.extend_from_slice(args);
    fleet.ssh(i, &all)
}

fn deployed(fleet: &Fleet, i: usize) -> Vec<String> {
    deployed_names(&json(&ok(&mut remote(fleet, i, &["--json", "list"]))))
}

#[test]
fn an_export_piped_over_ssh_deploys_on_every_host_and_a_cut_link_changes_nothing() {
    let s = Scratch::trusted();
    let dir = stage_dir(s.dir.path(), "app", "1.0.0", APP, &[("bin/app", "#!/bin/sh\n"), ("share/data", "")]);
    // Incompressible content, so that the transfer takes long enough to be cut.
    let mut data = fs::File::create(dir.join("share/data")).unwrap();
    std::io::copy(&mut fs::File::open("/dev/urandom").unwrap().take(256 << 10), &mut data).unwrap();
    let r = s.build(&dir);
    let export = s.export(&[&r], "app.oci.tar");
    let fleet = Fleet::new(3);
    for i in 0..3 {
        ok(&mut remote(&fleet, i, &["init"]));
        ok(&mut remote(&fleet, i, &["trust", "add", s.pub_key().to_str().unwrap()]));
    }

    for i in 0..2 {
        let out = remote(&fleet, i, &["deploy", "-"]).stdin(fs::File::open(&export).unwrap()).output().unwrap();
        assert!(out.status.success(), "h{i}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(deployed(&fleet, i), ["app"]);
        let link = fs::read_link(fleet.root(i).join("usr/local/bin/app")).unwrap();
        assert!(link.to_str().unwrap().contains("/staging/app/"), "{link:?}");
    }

    // Host 2: the link is slowed so the archive takes seconds to arrive, then cut mid-way.
    // sshd notices the client is gone (ClientAliveInterval 5, count 2) and ends the
    // session: the installer sees a truncated archive and changes nothing.
    fleet.rate(2, Some("256kbit"));
    let before = tree(fleet.root(2));
    let mut child = remote(&fleet, 2, &["deploy", "-"])
        .stdin(fs::File::open(&export).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fleet.set_link(2, false);
    let cut = Instant::now();
    // The installer on the host ends by itself; the lock is free again.
    loop {
        let busy = std::process::Command::new("pgrep")
            .args(["-f", &format!("--root {} deploy", fleet.root(2).display())])
            .output()
            .unwrap();
        if !busy.status.success() {
            break;
        }
        assert!(cut.elapsed() < Duration::from_secs(30), "the installer still runs 30 s after the link was cut");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    fleet.set_link(2, true);
    fleet.rate(2, None);
    assert!(deployed(&fleet, 2).is_empty());
    let after = tree(fleet.root(2));
    let changed: Vec<_> =
        after.keys().filter(|k| before.get(*k) != after.get(*k) && !k.starts_with("var/lib/op-dbus")).collect();
    assert!(changed.is_empty(), "changed outside the installer's area: {changed:?}");
    let out = remote(&fleet, 2, &["deploy", "-"]).stdin(fs::File::open(&export).unwrap()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deployed(&fleet, 2), ["app"]);
}

/// What `/usr/local/bin/app` under `root` says (its link is absolute inside the root).
fn app_says(root: &std::path::Path) -> String {
    let link = fs::read_link(root.join("usr/local/bin/app")).unwrap();
    let text = fs::read_to_string(root.join(link.strip_prefix("/").unwrap())).unwrap();
    text.trim_end().rsplit(' ').next().unwrap().to_owned()
}

/// A stage folder `app-VERSION` with 256 KiB of random data and a small `bin/app` saying `tag`.
fn app(s: &Scratch, version: &str, tag: &str, data: &[u8]) -> std::path::PathBuf {
    let dir = stage_dir(
        s.dir.path(),
        "app",
        version,
        APP,
        &[("bin/app", &format!("#!/bin/sh\necho {tag}\n")), ("share/data", "")],
    );
    fs::write(dir.join("share/data"), data).unwrap();
    dir
}

#[test]
fn image_deploy_reaches_ten_hosts_sends_only_what_they_lack_retries_a_cut_link_and_stops_at_a_failed_canary() {
    let s = Scratch::trusted();
    let mut data = vec![0u8; 256 << 10];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut data).unwrap();
    s.build(&app(&s, "1.0.0", "one", &data));
    let fleet = Fleet::new(10);
    let mut inventory = format!("[defaults]\ninstaller = {:?}\n", bin("op-dbus-stage").display().to_string());
    for (i, h) in fleet.hosts.iter().enumerate() {
        ok(std::process::Command::new(bin("op-dbus-stage")).arg("--root").arg(&h.root).arg("init"));
        ok(std::process::Command::new(bin("op-dbus-stage"))
            .arg("--root")
            .arg(&h.root)
            .args(["trust", "add"])
            .arg(s.pub_key()));
        let tags = if i < 2 { r#"["web", "canary"]"# } else { r#"["web"]"# };
        inventory += &format!(
            "\n[hosts.{}]\naddress = {:?}\nroot = {:?}\ntags = {tags}\n",
            h.name,
            h.addr,
            h.root.display().to_string()
        );
    }
    let inv = s.path("inventory.toml");
    fs::write(&inv, inventory).unwrap();
    let deploy = |args: &[&str]| {
        let mut c = fleet.client(bin("op-dbus-image"));
        c.arg("--store").arg(s.store()).args(["--json", "deploy", "--inventory"]).arg(&inv);
        c.arg("--ssh-config").arg(&fleet.ssh_config).args(args);
        c
    };

    // Ten hosts in one command.
    let report = json(&ok(&mut deploy(&["app:1.0.0", "--on", "@web"])));
    assert_eq!(report["deployed"], 10, "{report:#}");
    for i in 0..10 {
        assert_eq!(
            deployed_names(&json(&ok(std::process::Command::new(bin("op-dbus-stage"))
                .arg("--root")
                .arg(fleet.root(i))
                .args(["--json", "list"])))),
            ["app"]
        );
    }
    let first = report["hosts"][0]["bytes_sent"].as_u64().unwrap();
    assert!(first > 256 << 10, "{report:#}");

    // An update built on 1.0.0: every host has the parent's layers, so only the change goes,
    // and host 3, cut off when the deploy starts, is retried until its link is back.
    ok(s.image().args(["-q", "build", "--parent", "app:1.0.0"]).arg(app(&s, "1.1.0", "two", &data)));
    fleet.set_link(3, false);
    let report = std::thread::scope(|scope| {
        let fleet = &fleet;
        let back = scope.spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            fleet.set_link(3, true);
        });
        let out = ok(&mut deploy(&["app:1.1.0", "--on", "@web", "--connect-timeout", "1", "--retries", "5"]));
        back.join().unwrap();
        json(&out)
    });
    assert_eq!(report["deployed"], 10, "{report:#}");
    for h in report["hosts"].as_array().unwrap() {
        let (sent, full) = (h["bytes_sent"].as_u64().unwrap(), h["bytes_full"].as_u64().unwrap());
        assert!(sent * 4 < full, "{}: sent {sent} of {full}", h["host"]);
        assert!(h["layers_skipped"].as_u64().unwrap() >= 1, "{h:#}");
    }
    assert!(report["hosts"][3]["attempts"].as_u64().unwrap() > 1, "{:#}", report["hosts"][3]);
    assert_eq!(app_says(fleet.root(3)), "two");

    // A canary that fails (host 9 no longer trusts the key) stops the rollout: nobody else
    // is touched, and the exit code is the canary's (3, trust).
    ok(
        std::process::Command::new(bin("op-dbus-stage"))
            .arg("--root")
            .arg(fleet.root(9))
            .args(["trust", "revoke"])
            .arg(
                json(&ok(std::process::Command::new(bin("op-dbus-image"))
                    .args(["--json", "key", "show"])
                    .arg(s.pub_key())))["key_id"]
                    .as_str()
                    .unwrap(),
            ),
    );
    ok(s.image().args(["-q", "build", "--parent", "app:1.1.0"]).arg(app(&s, "1.2.0", "three", &data)));
    let out = run(&mut deploy(&["app:1.2.0", "--on", "h9,@web", "--canary", "1"]));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((report["failed"].as_u64(), report["skipped"].as_u64()), (Some(1), Some(9)), "{report:#}");
    for i in 0..9 {
        assert_eq!(app_says(fleet.root(i)), "two");
    }
}

/// `op-dbus-stage --root ROOT ARGS...` run here, on host `i`'s root.
fn local(fleet: &Fleet, i: usize, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(bin("op-dbus-stage"));
    c.arg("--root").arg(fleet.root(i)).args(args);
    c
}

fn history_ops(fleet: &Fleet, i: usize) -> Vec<String> {
    json(&ok(&mut local(fleet, i, &["--json", "history"])))["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["operation"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits up to 30 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "still not so after 30 s: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_host_cut_off_after_activation_rolls_itself_back_a_confirmed_one_stays_and_a_restart_rolls_back_at_recover() {
    let s = Scratch::trusted();
    let mut data = vec![0u8; 64 << 10];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut data).unwrap();
    s.build(&app(&s, "1.0.0", "one", &data));
    ok(s.image().args(["-q", "build", "--parent", "app:1.0.0"]).arg(app(&s, "1.1.0", "two", &data)));
    let fleet = Fleet::new(3);
    // Host 2's installer is cut off by the network when the confirmation arrives: the
    // confirming connection takes its link down (as `set_link` does) and never answers.
    let wrapper = s.path("cut-at-confirm.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" confirm \"*) {}; exec sleep 20;; esac\nexec {} \"$@\"\n",
            fleet.link_down_command(2),
            bin("op-dbus-stage").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let mut inventory = format!("[defaults]\ninstaller = {:?}\n", bin("op-dbus-stage").display().to_string());
    for (i, h) in fleet.hosts.iter().enumerate() {
        ok(&mut local(&fleet, i, &["init"]));
        ok(local(&fleet, i, &["trust", "add"]).arg(s.pub_key()));
        inventory +=
            &format!("\n[hosts.{}]\naddress = {:?}\nroot = {:?}\n", h.name, h.addr, h.root.display().to_string());
        if i == 2 {
            inventory += &format!("installer = {:?}\n", wrapper.display().to_string());
        }
    }
    let inv = s.path("inventory.toml");
    fs::write(&inv, inventory).unwrap();
    let deploy = |args: &[&str]| {
        let mut c = fleet.client(bin("op-dbus-image"));
        c.arg("--store").arg(s.store()).args(["--json", "deploy", "--inventory"]).arg(&inv);
        c.arg("--ssh-config").arg(&fleet.ssh_config).args(args);
        c
    };
    let report = json(&ok(&mut deploy(&["app:1.0.0", "--on", "h0,h1,h2", "--confirm-timeout", "0"])));
    assert_eq!(report["deployed"], 3, "{report:#}");
    assert!(report["hosts"][0].get("confirmation").is_none(), "{report:#}");

    // h0 confirms over a new connection and keeps 1.1.0; h2 is cut off right after it
    // activated: no confirmation reaches it, and past the timeout it goes back by itself.
    let out = run(&mut deploy(&["app:1.1.0", "--on", "h0,h2", "--confirm-timeout", "8", "--connect-timeout", "1"]));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "{report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    let (h0, h2) = (&report["hosts"][0], &report["hosts"][1]);
    assert_eq!((h0["status"].as_str(), h0["confirmation"].as_str()), (Some("deployed"), Some("confirmed")), "{h0:#}");
    assert_eq!((h2["status"].as_str(), h2["confirmation"].as_str()), (Some("failed"), Some("unconfirmed")), "{h2:#}");
    assert!(h2["error"].as_str().unwrap().contains("rolls itself back"), "{h2:#}");
    assert!(h2["report"]["confirmation"]["token"].is_string(), "the host reported its pending confirmation: {h2:#}");
    eventually("h2 rolled back to 1.0.0", || app_says(fleet.root(2)) == "one");
    eventually("h2's confirm.json gone", || !fleet.root(2).join("var/lib/op-dbus/staging/confirm.json").exists());
    let ops = history_ops(&fleet, 2);
    assert!(
        ops.last().unwrap().starts_with("roll back unconfirmed `deploy app:1.1.0` (no confirmation within 8 s)"),
        "{ops:#?}"
    );
    let list = json(&ok(&mut local(&fleet, 2, &["--json", "list"])));
    let active: Vec<_> = list["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "deployed").collect();
    assert_eq!(active.len(), 1, "{list:#}");
    assert_eq!(active[0]["version"], "1.0.0", "{list:#}");
    // The confirmed host keeps the new version past the timeout.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(app_says(fleet.root(0)), "two");
    assert!(history_ops(&fleet, 0).iter().any(|o| o == "confirm deploy app:1.1.0"), "{:#?}", history_ops(&fleet, 0));
    assert!(!fleet.root(0).join("var/lib/op-dbus/staging/confirm.json").exists());
    fleet.set_link(2, true);

    // h1: deployed with a confirmation over ssh; the waiter outlives the ssh session, then
    // dies as in a restart before the confirmation came: `recover` rolls the host back.
    let export = s.export(&["app:1.1.0"], "app-1.1.0.oci.tar");
    let out = remote(&fleet, 1, &["--json", "deploy", "--confirm-timeout", "600", "-"])
        .stdin(fs::File::open(&export).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    let pid = doc["confirmation"]["waiter"].as_u64().expect("the waiter's pid");
    std::thread::sleep(Duration::from_millis(500));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the waiter outlives the ssh session");
    // Field 6 (after the command's parenthesis): the session; it leads its own.
    let session = stat.rsplit(')').next().unwrap().split_whitespace().nth(3).unwrap();
    assert_eq!(session, pid.to_string(), "{stat}");
    assert_eq!(app_says(fleet.root(1)), "two");
    let status = json(&ok(&mut remote(&fleet, 1, &["--json", "status"])));
    assert_eq!(status["awaiting_confirmation"]["waiter_running"], true, "{status:#}");
    assert_eq!(status["awaiting_confirmation"]["operation"], "deploy app:1.1.0", "{status:#}");
    // No other deploy while one awaits its confirmation.
    let again = remote(&fleet, 1, &["deploy", "-"]).stdin(fs::File::open(&export).unwrap()).output().unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(4), "{err}");
    assert!(err.contains("awaits its confirmation"), "{err}");
    ok(std::process::Command::new("kill").args(["-9", &pid.to_string()]));
    eventually("the waiter is gone", || !std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(app_says(fleet.root(1)), "two", "nothing rolls back without a recovery");
    let status = json(&ok(&mut remote(&fleet, 1, &["--json", "status"])));
    assert_eq!(status["awaiting_confirmation"]["waiter_running"], false, "{status:#}");
    let doc = json(&ok(&mut remote(&fleet, 1, &["--json", "recover"])));
    assert_eq!(doc["unconfirmed"], "deploy app:1.1.0", "{doc:#}");
    assert_eq!(app_says(fleet.root(1)), "one");
    assert!(history_ops(&fleet, 1).last().unwrap().starts_with("roll back unconfirmed `deploy app:1.1.0`"));
    // The token is spent.
    let token = json(&String::from_utf8_lossy(&out.stdout))["confirmation"]["token"].as_str().unwrap().to_owned();
    let (code, err) = fails(&mut remote(&fleet, 1, &["confirm", &token]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_transfer_cut_mid_way_resumes_with_what_arrived() {
    let s = Scratch::trusted();
    // Four layers of 192 KiB of random bytes each: 1.0.0 and three updates on it.
    for (i, version) in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"].iter().enumerate() {
        let files: Vec<(String, String)> = (0..=i).map(|j| (format!("share/d{j}"), String::new())).collect();
        let refs: Vec<(&str, &str)> = [("bin/app", "#!/bin/sh\n")]
            .into_iter()
            .chain(files.iter().map(|(a, b)| (a.as_str(), b.as_str())))
            .collect();
        let dir = stage_dir(s.dir.path(), "app", version, APP, &refs);
        for j in 0..=i {
            let mut data = vec![0u8; 192 << 10];
            // The same bytes for the same file in every version: only the new one changes.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ j as u64;
            for b in data.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            fs::write(dir.join(format!("share/d{j}")), data).unwrap();
        }
        let mut build = s.image();
        build.args(["-q", "build"]);
        if i > 0 {
            build.args(["--parent", &format!("app:{}", ["1.0.0", "1.1.0", "1.2.0"][i - 1])]);
        }
        ok(build.arg(&dir));
    }
    let fleet = Fleet::new(1);
    let root = fleet.root(0);
    ok(std::process::Command::new(bin("op-dbus-stage")).arg("--root").arg(root).arg("init"));
    ok(std::process::Command::new(bin("op-dbus-stage"))
        .arg("--root")
        .arg(root)
        .args(["trust", "add"])
        .arg(s.pub_key()));
    // About 8 s for the whole archive; the link goes down once the host has received some
    // 480 KB (two of the four layers and a part of the third), for 2 s.
    fleet.rate(0, Some("800kbit"));
    let mut c = fleet.client(bin("op-dbus-image"));
    c.arg("--store").arg(s.store()).args(["--json", "deploy", "app:1.3.0", "--on", "h0", "--ssh-config"]);
    c.arg(&fleet.ssh_config).args(["--stall-timeout", "2", "--connect-timeout", "2", "--retries", "6"]);
    c.args(["--confirm-timeout", "0"]);
    let inventory = s.path("inventory.toml");
    fs::write(
        &inventory,
        format!(
            "[hosts.h0]\naddress = {:?}\nroot = {:?}\ninstaller = {:?}\n",
            fleet.hosts[0].addr,
            root.display().to_string(),
            bin("op-dbus-stage").display().to_string()
        ),
    )
    .unwrap();
    c.arg("--inventory").arg(&inventory);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (before, _) = fleet.bytes(0);
    let waiting = std::time::Instant::now();
    while fleet.bytes(0).0 < before + 480_000 {
        assert!(waiting.elapsed() < Duration::from_secs(60), "the transfer does not progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    fleet.set_link(0, false);
    std::thread::sleep(Duration::from_secs(2));
    fleet.rate(0, None);
    fleet.set_link(0, true);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let h = &report["hosts"][0];
    assert_eq!(h["status"], "deployed", "{h:#}");
    assert!(h["attempts"].as_u64().unwrap() >= 2, "{h:#}");
    // The host had nothing before: what it skipped on the last attempt arrived on the first,
    // and the resumed transfer sent well under the whole archive.
    assert!(h["layers_skipped"].as_u64().unwrap() >= 2, "{h:#}");
    let (last, full) = (h["bytes_last_attempt"].as_u64().unwrap(), h["bytes_full"].as_u64().unwrap());
    assert!(last * 10 < full * 6, "the resumed transfer sent {last} bytes of an archive of {full}");
    let list =
        json(&ok(std::process::Command::new(bin("op-dbus-stage")).arg("--root").arg(root).args(["--json", "list"])));
    assert_eq!(list["stages"][0]["version"], "1.3.0", "{list}");
    let verify =
        json(&ok(std::process::Command::new(bin("op-dbus-stage")).arg("--root").arg(root).args(["--json", "verify"])));
    assert_eq!(verify["ok"], true, "{verify}");
}
