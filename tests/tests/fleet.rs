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
