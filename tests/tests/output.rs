//! Output an operator reads at a glance (issue 10, point 5): table headers, human sizes,
//! snapshots in time order, -q, gc's account, JSON error documents, a closed stdout.

mod util;

use std::fs;
use std::path::PathBuf;
use std::process::Stdio;

use util::*;

impl Scratch {
    /// Builds NAME VERSION (a file of `kib` KiB) and exports it.
    fn export_sized(&self, name: &str, version: &str, kib: usize) -> PathBuf {
        let dir = self.dir.path().join(format!("{name}-{version}"));
        fs::create_dir_all(dir.join("share")).unwrap();
        fs::write(dir.join("manifest.yaml"), format!("name: {name}\nversion: {version}\n")).unwrap();
        // Bytes zstd cannot shrink (xorshift), so that sizes are what they say.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ kib as u64;
        let body: Vec<u8> = (0..kib * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(dir.join("share/data"), body).unwrap();
        ok(self.image().args(["-q", "build"]).arg(&dir));
        let out = self.dir.path().join(format!("{name}-{version}.oci.tar"));
        ok(self.image().args(["-q", "export", &format!("{name}:{version}"), "--out"]).arg(&out));
        out
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[test]
fn tables_have_headers_and_human_sizes() {
    let s = Scratch::trusted();
    ok(s.stage().arg("deploy").arg(s.export_sized("app", "1.0.0", 40)));
    let list = ok(s.image().arg("list"));
    assert!(first_line(&list).starts_with("NAME") && first_line(&list).contains("SIZE"), "{list}");
    assert!(list.contains("KiB"), "sizes for people: {list}");
    let listed = json(&ok(s.image().args(["--json", "list"])));
    assert!(listed["images"][0]["size"].is_u64(), "exact bytes under --json: {listed}");
    let list = ok(s.stage().arg("list"));
    assert!(first_line(&list).starts_with("NAME") && first_line(&list).contains("STATUS"), "{list}");
    let status = ok(s.stage().arg("status"));
    assert!(status.lines().nth(1).unwrap_or_default().starts_with("NAME"), "{status}");
    let snaps = ok(s.stage().arg("snapshots"));
    assert!(first_line(&snaps).starts_with("NAME") && snaps.contains("KiB"), "{snaps}");
    let snaps = json(&ok(s.stage().args(["--json", "snapshots"])));
    assert!(snaps["snapshots"][0]["bytes"].is_u64() && snaps["snapshots"][0]["created"].is_string(), "{snaps}");
}

#[test]
fn snapshots_are_in_time_order() {
    let s = Scratch::trusted();
    ok(s.stage().arg("deploy").arg(s.export_sized("zeta", "1.0.0", 1)));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ok(s.stage().arg("deploy").arg(s.export_sized("alpha", "1.0.0", 1)));
    let snaps = json(&ok(s.stage().args(["--json", "snapshots"])));
    let names: Vec<&str> = snaps["snapshots"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    let kinds: Vec<String> = names.iter().map(|n| n.split('-').take(2).collect::<Vec<_>>().join("-")).collect();
    assert_eq!(kinds, ["pre-zeta", "post-zeta", "pre-alpha", "post-alpha"], "{names:?}");
}

#[test]
fn quiet_prints_nothing_but_errors() {
    let s = Scratch::trusted();
    let export = s.export_sized("app", "1.0.0", 1);
    let out = run(s.stage().args(["-q", "deploy"]).arg(&export));
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    let out = run(s.stage().args(["-q", "list"]));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    let out = run(s.stage().args(["-q", "remove", "nope"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(!out.stderr.is_empty(), "errors still show");
}

#[test]
fn gc_says_what_it_removed_and_kept() {
    let s = Scratch::trusted();
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        ok(s.stage().arg("deploy").arg(s.export_sized("app", v, 1)));
    }
    for snap in json(&ok(s.stage().args(["--json", "snapshots"])))["snapshots"].as_array().unwrap() {
        fs::remove_file(
            s.root().join("var/lib/op-dbus/staging/snapshots").join(format!("{}.json", snap["name"].as_str().unwrap())),
        )
        .unwrap();
    }
    let text = ok(s.stage().args(["gc", "--keep", "0"]));
    assert!(text.contains("removed app generation") && text.contains("kept app generation"), "{text}");
    let again = json(&ok(s.stage().args(["--json", "gc", "--keep", "0"])));
    assert_eq!(again["removed"].as_array().map_or(0, Vec::len), 0, "{again}");
    assert_eq!(again["kept"][0]["reason"], "active", "{again}");
}

#[test]
fn json_errors_are_documents_with_the_same_exit_code() {
    let s = Scratch::trusted();
    s.export_sized("app", "1.0.0", 0);
    for (mut cmd, code, name) in [
        (
            {
                let mut c = s.stage();
                c.args(["--json", "remove", "nope"]);
                c
            },
            2,
            "usage",
        ),
        (
            {
                let mut c = s.image();
                c.args(["--json", "inspect", "nope:1.0.0"]);
                c
            },
            2,
            "usage",
        ),
    ] {
        let out = run(&mut cmd);
        assert_eq!(out.status.code(), Some(code));
        let doc = json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(doc["error"]["exit_code"], code, "{doc}");
        assert_eq!(doc["error"]["code"], name, "{doc}");
        assert!(doc["error"]["message"].as_str().unwrap().contains("nope"), "{doc}");
    }
}

#[test]
fn a_closed_stdout_is_a_clean_end() {
    let s = Scratch::trusted();
    s.export_sized("app", "1.0.0", 0);
    for mut cmd in [s.image(), s.stage()] {
        // `| head` that has read enough: the reader is gone before the command writes.
        let mut child = cmd.arg("list").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
