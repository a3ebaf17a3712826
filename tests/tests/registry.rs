//! End-to-end tests of the artifact store: `op-dbus-image push`/`pull` and
//! `op-dbus-stage deploy HOST:PORT/REPO:TAG` against a real registry server (Debian's
//! `docker-registry`) on 127.0.0.1, started for each test and killed on drop. Only
//! loopback addresses are ever contacted. Also: `export --with-deps`, thin exports.

mod util;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::registry::{Registry, free_port};
use util::*;

/// What the proxy does to the response of one blob.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Flip one byte of the body.
    Corrupt,
    /// Send half of the body, then close (the first time only).
    CutOnce,
    /// [`Fault::CutOnce`], and the resume's range is dropped on the way to the registry:
    /// its answer is the whole blob again (200), as from a registry that ignores ranges.
    CutOnceIgnoreRange,
}

/// A tiny HTTP proxy on 127.0.0.1 in front of a registry: one request per connection,
/// every request line logged (with its Range header), one blob's response tampered with.
struct Proxy {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(upstream: u16, blob: Option<String>, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let cut_done = Arc::new(Mutex::new(false));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (log, blob, cut_done) = (l2.clone(), blob.clone(), cut_done.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(client, upstream, blob.as_deref(), fault, &log, &cut_done);
                });
            }
        });
        Proxy { port, log }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn serve_one(
    mut client: TcpStream,
    upstream: u16,
    blob: Option<&str>,
    fault: Fault,
    log: &Mutex<Vec<String>>,
    cut_done: &Mutex<bool>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while find(&head, b"\r\n\r\n").is_none() {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_owned();
    let mut headers: Vec<String> = lines
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .map(str::to_owned)
        .collect();
    let range = headers.iter().find(|h| h.to_ascii_lowercase().starts_with("range:")).cloned();
    if matches!(fault, Fault::CutOnceIgnoreRange) && blob.is_some_and(|b| request_line.contains(b)) {
        headers.retain(|h| !h.to_ascii_lowercase().starts_with("range:"));
    }
    log.lock()
        .unwrap()
        .push(format!("{request_line}{}", range.as_ref().map(|r| format!(" [{r}]")).unwrap_or_default()));
    let length: usize = headers
        .iter()
        .find_map(|h| h.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    headers.push("Connection: close".to_owned());
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(format!("{request_line}\r\n{}\r\n\r\n", headers.join("\r\n")).as_bytes())?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let is_target = request_line.starts_with("GET ")
        && blob.is_some_and(|b| request_line.contains(&format!("/blobs/sha256:{b}")))
        && response.starts_with(b"HTTP/1.1 200");
    let body_at = find(&response, b"\r\n\r\n").map(|i| i + 4).unwrap_or(response.len());
    match fault {
        Fault::Corrupt if is_target && response.len() > body_at => {
            let last = response.len() - 1;
            response[last] ^= 0x01;
        }
        Fault::CutOnce | Fault::CutOnceIgnoreRange if is_target && range.is_none() && !*cut_done.lock().unwrap() => {
            *cut_done.lock().unwrap() = true;
            let half = body_at + (response.len() - body_at) / 2;
            client.write_all(&response[..half])?;
            client.flush()?;
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        _ => {}
    }
    client.write_all(&response)?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// A build machine (store + key) and a scratch host root that trusts the key.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch { dir: tempfile::tempdir().unwrap() };
        fs::create_dir_all(s.root()).unwrap();
        keygen(s.dir.path(), "signing.key");
        ok(s.stage().arg("init"));
        ok(s.stage().args(["trust", "add"]).arg(s.dir.path().join("signing.key.pub")));
        s
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn root(&self) -> PathBuf {
        self.path("root")
    }
    fn store(&self) -> PathBuf {
        self.path("store")
    }
    fn image(&self) -> Command {
        let mut c = image(&self.store(), Some(&self.path("signing.key")));
        c.env_remove("REGISTRY_AUTH_FILE").env("HOME", self.dir.path());
        c
    }
    fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root()).env_remove("REGISTRY_AUTH_FILE").env("HOME", self.dir.path());
        c
    }
    fn build(&self, dir: &Path, extra: &[&str]) -> serde_json::Value {
        json(&ok(self.image().args(["--json", "-q", "build"]).arg(dir).args(extra)))
    }
    fn deployed(&self) -> Vec<String> {
        let list = json(&ok(self.stage().args(["--json", "list"])));
        list["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["status"] == "deployed")
            .map(|x| format!("{}:{}", x["name"].as_str().unwrap(), x["version"].as_str().unwrap()))
            .collect()
    }
}

/// A stage folder with one linked file whose content names the version.
fn stage_dir(parent: &Path, name: &str, version: &str, extra: &str, size: usize) -> PathBuf {
    let dir = parent.join(format!("src-{name}-{version}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("share")).unwrap();
    fs::write(
        dir.join("manifest.yaml"),
        format!(
            "name: {name}\nversion: {version}\n{extra}files:\n  - path: bin/{name}\n    target: /usr/local/bin/{name}\n"
        ),
    )
    .unwrap();
    let bin = dir.join("bin").join(name);
    fs::write(&bin, format!("#!/bin/sh\necho {name} {version}\n")).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    // Incompressible-ish bulk that stays the same across versions (a shared parent layer).
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bulk: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(dir.join("share/data.bin"), bulk).unwrap();
    dir
}

fn layer_digests(store: &Path, reference: &str) -> Vec<String> {
    let inspect = json(&ok(image(store, None).args(["--json", "inspect", reference])));
    inspect["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect()
}

fn hex(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap().to_owned()
}

#[test]
fn registry_push_pull_deploy_round_trip_and_no_second_upload() {
    let skopeo = require_tool("skopeo", "skopeo");
    let reg = Registry::start(None);
    let s = Scratch::new();
    let built = s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "", 200_000), &[]);
    let digest = built["digest"].as_str().unwrap().to_owned();
    let dest = format!("{}/op-dbus/app", reg.host());

    // Push: the tag defaults to the version; the signatures go along.
    let first = json(&ok(s.image().args(["--json", "push", "app:1.0.0", &dest])));
    assert_eq!(first["destination"], format!("{dest}:1.0.0"));
    assert_eq!(first["digest"], digest.as_str());
    assert!(first["blobs_uploaded"].as_u64().unwrap() >= 4, "{first}");
    assert!(first["bytes_uploaded"].as_u64().unwrap() > 200_000, "{first}");
    let sig_tag = format!("sha256-{}.sig", hex(&digest));
    assert_eq!(first["signature_tag"], sig_tag.as_str());
    // A second push uploads no blob bytes.
    let second = json(&ok(s.image().args(["--json", "push", "app:1.0.0", &dest])));
    assert_eq!(second["blobs_uploaded"], 0, "{second}");
    assert_eq!(second["bytes_uploaded"], 0, "{second}");
    assert_eq!(second["blobs_present"], first["blobs_uploaded"]);

    // skopeo reads what we pushed, byte for byte.
    let raw = ok(Command::new(&skopeo)
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{dest}:1.0.0")));
    let m = json(&raw);
    assert_eq!(m["artifactType"], "application/vnd.op-dbus.stage.v1");
    let sig = json(&ok(Command::new(&skopeo)
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{dest}:{sig_tag}"))));
    assert_eq!(sig["subject"]["digest"], digest.as_str());
    assert_eq!(sig["layers"][0]["mediaType"], "application/vnd.dev.cosign.simplesigning.v1+json");

    // Pull into another store: tagged NAME:VERSION from the embedded manifest, signed.
    let other = s.path("other-store");
    let pulled = json(&ok(image(&other, None).args(["--json", "pull", &format!("{dest}:1.0.0")])));
    assert_eq!(pulled["reference"], "app:1.0.0");
    assert_eq!(pulled["digest"], digest.as_str());
    assert_eq!(pulled["signed"], true);
    let inspect = json(&ok(image(&other, None).args(["--json", "inspect", "app:1.0.0"])));
    assert_eq!(inspect["digest"], digest.as_str());
    assert_eq!(inspect["signatures"].as_array().unwrap().len(), 1);
    // Pulling again fetches no payload.
    let again = json(&ok(image(&other, None).args(["--json", "pull", &format!("{dest}:1.0.0")])));
    assert_eq!(again["blobs_fetched"], 2, "only the two manifests travel again: {again}");
    assert!(again["blobs_present"].as_u64().unwrap() > layer_digests(&other, "app:1.0.0").len() as u64, "{again}");
    // What was pulled exports and deploys like what was built.
    let export = s.path("pulled.oci.tar");
    ok(image(&other, None).args(["-q", "export", "app:1.0.0", "--out"]).arg(&export));

    // Deploy straight from the registry.
    let out = json(&ok(s.stage().args(["--json", "deploy", &format!("{dest}:1.0.0")])));
    assert_eq!(out["received"][0]["digest"], digest.as_str(), "{out}");
    assert_eq!(s.deployed(), ["app:1.0.0"]);
    ok(s.stage().arg("verify"));
    assert!(s.root().join("usr/local/bin/app").is_symlink());
    let again = json(&ok(s.stage().args(["--json", "deploy", &format!("{dest}:1.0.0")])));
    assert_eq!(again["deployed"].as_array().unwrap().len(), 0, "{again}");
    // receive stores without activating; by digest works too.
    let s2 = Scratch::new();
    ok(s2.stage().args(["trust", "add"]).arg(s.path("signing.key.pub")));
    ok(s2.stage().args(["receive", &format!("{dest}@{digest}")]));
    let list = json(&ok(s2.stage().args(["--json", "list"])));
    assert_eq!(list["stages"][0]["status"], "available", "{list}");
    ok(s2.stage().arg("deploy").arg(&export));
    assert_eq!(s2.deployed(), ["app:1.0.0"]);
}

#[test]
fn registry_deploy_fetches_only_missing_blobs_and_resumes_a_cut_download() {
    let reg = Registry::start(None);
    let s = Scratch::new();
    let v1 = stage_dir(s.dir.path(), "app", "1.0.0", "", 300_000);
    s.build(&v1, &[]);
    let v2 = stage_dir(s.dir.path(), "app", "1.1.0", "", 300_000);
    s.build(&v2, &["--parent", "app:1.0.0"]);
    let dest = format!("{}/op-dbus/app", reg.host());
    ok(s.image().args(["push", "app:1.0.0", &dest]));
    ok(s.image().args(["push", "app:1.1.0", &dest]));
    let l1 = layer_digests(&s.store(), "app:1.0.0");
    let l2 = layer_digests(&s.store(), "app:1.1.0");
    assert_eq!(l2.len(), 2);
    assert_eq!(l2[0], l1[0], "the delta shares the parent's layer");

    // The first download of the base layer is cut in the middle: resumed with a range.
    let proxy = Proxy::start(reg.port, Some(hex(&l1[0])), Fault::CutOnce);
    ok(s.stage().args(["deploy", &format!("{}/op-dbus/app:1.0.0", proxy.host())]));
    let reqs = proxy.requests();
    let base_gets: Vec<&String> = reqs.iter().filter(|r| r.contains(&format!("/blobs/{}", l1[0]))).collect();
    assert_eq!(base_gets.len(), 2, "{reqs:#?}");
    assert!(
        base_gets[1].to_ascii_lowercase().contains("range: bytes="),
        "the second GET continues with a range: {reqs:#?}"
    );
    assert_eq!(s.deployed(), ["app:1.0.0"]);

    // 1.1.0 on a host that has 1.0.0: only the delta layer travels.
    let proxy = Proxy::start(reg.port, None, Fault::None);
    ok(s.stage().args(["deploy", &format!("{}/op-dbus/app:1.1.0", proxy.host())]));
    let reqs = proxy.requests();
    assert!(
        !reqs.iter().any(|r| r.contains(&format!("/blobs/{}", l1[0]))),
        "the parent layer was fetched again: {reqs:#?}"
    );
    assert!(reqs.iter().any(|r| r.contains(&format!("/blobs/{}", l2[1]))), "{reqs:#?}");
    assert_eq!(s.deployed(), ["app:1.1.0"]);
    ok(s.stage().arg("verify"));
}

/// A deploy unpacks a registry's layer while it arrives; when the registry answers a
/// resume with the whole blob again (it ignored the range), the bytes already unpacked
/// cannot be taken twice: that tree is dropped and the image is unpacked from the layer
/// once it is stored. Deployed, nothing left in the temp area.
#[test]
fn registry_deploy_of_a_layer_sent_again_from_its_start_unpacks_it_once_stored() {
    let reg = Registry::start(None);
    let s = Scratch::new();
    let v1 = stage_dir(s.dir.path(), "app", "1.0.0", "", 600_000);
    s.build(&v1, &[]);
    ok(s.image().args(["push", "app:1.0.0", &format!("{}/op-dbus/app", reg.host())]));
    let l1 = layer_digests(&s.store(), "app:1.0.0");
    let proxy = Proxy::start(reg.port, Some(hex(&l1[0])), Fault::CutOnceIgnoreRange);
    let out = run(s.stage().args(["-v", "deploy", &format!("{}/op-dbus/app:1.0.0", proxy.host())]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("the registry ignored the range; starting over"), "{log}");
    assert_eq!(s.deployed(), ["app:1.0.0"]);
    ok(s.stage().arg("verify"));
    let tmp = s.root().join("var/lib/op-dbus/staging/.tmp");
    assert_eq!(fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0), 0, "nothing left in the temp area");
}

#[test]
fn registry_deploys_an_image_skopeo_copied() {
    let skopeo = require_tool("skopeo", "skopeo");
    let reg = Registry::start(None);
    let s = Scratch::new();
    let built = s.build(&stage_dir(s.dir.path(), "tool", "2.0.0", "", 50_000), &[]);
    let digest = built["digest"].as_str().unwrap().to_owned();
    let sig_tag = format!("sha256-{}.sig", hex(&digest));
    let store = s.store().display().to_string();
    let dest = format!("docker://{}/copied/tool", reg.host());
    ok(Command::new(&skopeo)
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{store}:tool:2.0.0"))
        .arg(format!("{dest}:2.0.0")));
    ok(Command::new(&skopeo)
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{store}:tool:{sig_tag}"))
        .arg(format!("{dest}:{sig_tag}")));
    let out = json(&ok(s.stage().args(["--json", "deploy", &format!("{}/copied/tool:2.0.0", reg.host())])));
    assert_eq!(out["received"][0]["digest"], digest.as_str(), "{out}");
    assert_eq!(s.deployed(), ["tool:2.0.0"]);
    ok(s.stage().arg("verify"));
}

#[test]
fn registry_errors_unknown_tag_unreachable_wrong_password_change_nothing() {
    let reg = Registry::start(Some(("op", "s3cret")));
    let s = Scratch::new();
    s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "", 10_000), &[]);
    let dest = format!("{}/secure/app", reg.host());

    // Push with --username and --password-stdin.
    let push = |user: &str, pass: &str| {
        let mut child = s
            .image()
            .args(["--json", "push", "app:1.0.0", &dest, "--username", user, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{pass}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = push("op", "wrong");
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("refused the credentials") && err.contains("\"op\""), "{err}");
    let good = push("op", "s3cret");
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));

    let before = tree(&s.root());
    // No credentials at all.
    let (code, err) = fails(s.stage().args(["deploy", &format!("{dest}:1.0.0")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("asks for credentials") && err.contains("--password-stdin"), "{err}");
    assert_eq!(tree(&s.root()), before);
    // A wrong password from the auth file.
    let auth_file = s.path("auth.json");
    let write_auth = |pass: &str| {
        let b64 = ok(Command::new("sh").arg("-c").arg(format!("printf '%s' 'op:{pass}' | base64 -w0")));
        fs::write(&auth_file, format!("{{\"auths\": {{\"{}\": {{\"auth\": \"{b64}\"}}}}}}", reg.host())).unwrap();
    };
    write_auth("nope");
    let (code, err) = fails(s.stage().env("REGISTRY_AUTH_FILE", &auth_file).args(["deploy", &format!("{dest}:1.0.0")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused the credentials") && err.contains("auth.json"), "{err}");
    assert_eq!(tree(&s.root()), before);
    // An unknown tag, named in the message.
    write_auth("s3cret");
    let (code, err) =
        fails(s.stage().env("REGISTRY_AUTH_FILE", &auth_file).args(["deploy", &format!("{dest}:9.9.9-missing")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("9.9.9-missing") && err.contains("no such tag"), "{err}");
    assert_eq!(tree(&s.root()), before);
    // An unreachable registry: a closed port on 127.0.0.1.
    let closed = free_port();
    let t0 = Instant::now();
    let (code, err) = fails(s.stage().args(["deploy", &format!("127.0.0.1:{closed}/secure/app:1.0.0")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("127.0.0.1:{closed}")) && err.contains("cannot reach"), "{err}");
    assert!(err.contains("Check the host and port"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "retries are bounded in time");
    assert_eq!(tree(&s.root()), before);
    let (code, err) = fails(s.image().args(["pull", &format!("127.0.0.1:{closed}/secure/app:1.0.0")]));
    assert_eq!(code, 1, "{err}");
    // The right password from the auth file deploys.
    ok(s.stage().env("REGISTRY_AUTH_FILE", &auth_file).args(["deploy", &format!("{dest}:1.0.0")]));
    assert_eq!(s.deployed(), ["app:1.0.0"]);
    // --password-stdin and `-` both want stdin.
    let (code, _) = fails(s.stage().args(["deploy", "-", "--username", "op", "--password-stdin"]));
    assert_eq!(code, 2);
}

#[test]
fn registry_blob_that_does_not_match_its_digest_is_refused_with_exit_7() {
    let reg = Registry::start(None);
    let s = Scratch::new();
    s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "", 100_000), &[]);
    ok(s.image().args(["push", "app:1.0.0", &format!("{}/op-dbus/app", reg.host())]));
    let layer = layer_digests(&s.store(), "app:1.0.0").remove(0);
    let proxy = Proxy::start(reg.port, Some(hex(&layer)), Fault::Corrupt);
    let src = format!("{}/op-dbus/app:1.0.0", proxy.host());
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().args(["deploy", &src]));
    assert_eq!(code, 7, "{err}");
    assert!(err.contains(&layer) && err.contains("corrupt"), "{err}");
    assert_eq!(tree(&s.root()), before, "a corrupt blob changed the host");
    assert!(s.deployed().is_empty());
    assert!(proxy.requests().iter().any(|r| r.contains(&layer)), "the corrupt layer was requested");
    // The builder refuses it too, and keeps nothing of it.
    let other = s.path("other-store");
    let (code, err) = fails(image(&other, None).args(["pull", &src]));
    assert_eq!(code, 7, "{err}");
    assert!(!other.join("blobs/sha256").join(hex(&layer)).exists());
    let list = json(&ok(image(&other, None).args(["--json", "list"])));
    assert_eq!(list["images"].as_array().unwrap().len(), 0, "{list}");
}

#[test]
fn thin_export_is_smaller_and_deploys_where_the_parent_is() {
    let s = Scratch::new();
    s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "", 300_000), &[]);
    s.build(&stage_dir(s.dir.path(), "app", "1.1.0", "", 300_000), &["--parent", "app:1.0.0"]);
    let (base, full, thin) = (s.path("base.oci.tar"), s.path("full.oci.tar"), s.path("thin.oci.tar"));
    ok(s.image().args(["-q", "export", "app:1.0.0", "--out"]).arg(&base));
    ok(s.image().args(["-q", "export", "app:1.1.0", "--out"]).arg(&full));
    ok(s.image().args(["-q", "export", "app:1.1.0", "--since", "app:1.0.0", "--out"]).arg(&thin));
    let size = |p: &Path| fs::metadata(p).unwrap().len();
    assert!(size(&thin) * 2 < size(&full), "thin {} vs full {}", size(&thin), size(&full));
    // Where the parent is not, the thin export is refused (exit 4) and changes nothing.
    let before = tree(&s.root());
    let (code, err) = fails(s.stage().arg("deploy").arg(&thin));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("app:1.0.0"), "{err}");
    assert_eq!(tree(&s.root()), before);
    // Where it is, the thin export deploys.
    ok(s.stage().arg("deploy").arg(&base));
    ok(s.stage().arg("deploy").arg(&thin));
    assert_eq!(s.deployed(), ["app:1.1.0"]);
    ok(s.stage().arg("verify"));
    let link = s.root().join("var/lib/op-dbus/staging/app/bin/app");
    assert!(fs::read_to_string(link).unwrap().contains("1.1.0"));
}

#[test]
fn export_with_deps_carries_the_highest_matching_dependencies() {
    let s = Scratch::new();
    for v in ["1.0.0", "1.2.0", "2.0.0"] {
        s.build(&stage_dir(s.dir.path(), "base", v, "", 1000), &[]);
    }
    s.build(&stage_dir(s.dir.path(), "mid", "1.0.0", "dependencies:\n  - base ^1.0\n", 1000), &[]);
    s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "dependencies:\n  - mid >=1.0\n", 1000), &[]);
    let out = s.path("app.oci.tar");
    let e = json(&ok(s.image().args(["--json", "-q", "export", "app:1.0.0", "--with-deps", "--out"]).arg(&out)));
    let mut images: Vec<&str> = e["images"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    images.sort();
    assert_eq!(images, ["app:1.0.0", "base:1.2.0", "mid:1.0.0"], "{e}");
    let index = json(&ok(Command::new("tar").arg("-xOf").arg(&out).arg("index.json")));
    let tags: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap())
        .filter(|t| !t.ends_with(".sig"))
        .collect();
    assert_eq!(tags, ["app:1.0.0", "base:1.2.0", "mid:1.0.0"]);
    // One file deploys the whole chain, dependencies first.
    ok(s.stage().arg("deploy").arg(&out));
    let mut deployed = s.deployed();
    deployed.sort();
    assert_eq!(deployed, ["app:1.0.0", "base:1.2.0", "mid:1.0.0"]);
    // Without the dependency in the store: a clear error.
    let lonely = s.path("lonely-store");
    ok(Command::new("cp").arg("-a").arg(s.store()).arg(&lonely));
    let index_path = lonely.join("index.json");
    let mut idx = json(&fs::read_to_string(&index_path).unwrap());
    idx["manifests"]
        .as_array_mut()
        .unwrap()
        .retain(|m| !m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap().starts_with("base:1"));
    fs::write(&index_path, idx.to_string()).unwrap();
    let (code, err) =
        fails(image(&lonely, None).args(["export", "app:1.0.0", "--with-deps", "--out"]).arg(s.path("x")));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("base ^1.0") || err.contains("base"), "{err}");
}

/// Issue 9, point 8: a registry under an attacker's control serves an image that a trusted
/// key signed for another repository, or for another version, under the name asked for.
#[test]
fn registry_that_serves_another_signed_stage_under_the_name_asked_for_is_refused() {
    let skopeo = require_tool("skopeo", "skopeo");
    let reg = Registry::start(None);
    let s = Scratch::new();
    let host = reg.host();
    s.build(&stage_dir(s.dir.path(), "lab-debug", "1.0.0", "", 1000), &[]);
    s.build(&stage_dir(s.dir.path(), "app", "1.0.0", "", 1000), &[]);
    s.build(&stage_dir(s.dir.path(), "app", "1.1.0", "", 1000), &[]);
    // What the signer published, each where it belongs.
    ok(s.image().args(["push", "lab-debug:1.0.0", &format!("{host}/op-dbus/lab-debug")]));
    ok(s.image().args(["push", "app:1.1.0", &format!("{host}/op-dbus/app")]));
    let digest_of = |r: &str| {
        json(&ok(image(&s.store(), None).args(["--json", "inspect", r])))["digest"].as_str().unwrap().to_owned()
    };
    let lab = digest_of("lab-debug:1.0.0");
    let app11 = digest_of("app:1.1.0");
    let copy = |from: String, to: String| {
        ok(Command::new(&skopeo)
            .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .arg(from)
            .arg(to));
    };
    let sig = |d: &str| format!("sha256-{}.sig", hex(d));
    // The attacker relabels: lab-debug (signed for op-dbus/lab-debug) as op-dbus/core:1.0.0,
    copy(format!("docker://{host}/op-dbus/lab-debug:1.0.0"), format!("docker://{host}/op-dbus/core:1.0.0"));
    copy(
        format!("docker://{host}/op-dbus/lab-debug:{}", sig(&lab)),
        format!("docker://{host}/op-dbus/core:{}", sig(&lab)),
    );
    // the builder's own store image (signed as `lab-debug`) as op-dbus/core2:1.0.0,
    let store = s.store().display().to_string();
    copy(format!("oci:{store}:lab-debug:1.0.0"), format!("docker://{host}/op-dbus/core2:1.0.0"));
    copy(format!("oci:{store}:lab-debug:{}", sig(&lab)), format!("docker://{host}/op-dbus/core2:{}", sig(&lab)));
    // and app 1.1.0 as op-dbus/app:1.0.0 (another version under a version tag).
    copy(format!("docker://{host}/op-dbus/app:1.1.0"), format!("docker://{host}/op-dbus/app:1.0.0"));

    let before = tree(&s.root());
    for (src, needle) in [
        (format!("{host}/op-dbus/core:1.0.0"), "op-dbus/lab-debug"),
        (format!("{host}/op-dbus/core@{lab}"), "op-dbus/lab-debug"),
        (format!("{host}/op-dbus/core2:1.0.0"), "lab-debug"),
        (format!("{host}/op-dbus/app:1.0.0"), "1.1.0"),
    ] {
        for verb in ["deploy", "receive"] {
            let (code, err) = fails(s.stage().args([verb, &src]));
            assert!(code == 3 || code == 7, "{verb} {src}: exit {code}: {err}");
            assert!(err.contains(needle), "{verb} {src}: {err}");
            assert_eq!(tree(&s.root()), before, "{verb} {src} changed the host");
        }
    }
    assert!(s.deployed().is_empty());
    let list = json(&ok(s.stage().args(["--json", "list"])));
    assert_eq!(list["stages"].as_array().unwrap().len(), 0, "nothing was stored: {list}");

    // A tag that is not a version names no version to check: allowed, and the stage found is
    // reported. A push to a repository named otherwise than the stage signs for it.
    ok(s.image().args(["push", "app:1.0.0", &format!("{host}/op-dbus/app:stable")]));
    let out = json(&ok(s.stage().args(["--json", "deploy", &format!("{host}/op-dbus/app:stable")])));
    assert_eq!(out["received"][0]["reference"], "app:1.0.0", "{out}");
    ok(s.image().args(["push", "app:1.1.0", &format!("{host}/op-dbus/core")]));
    let out = json(&ok(s.stage().args(["--json", "deploy", &format!("{host}/op-dbus/core:1.1.0")])));
    assert_eq!(out["received"][0]["digest"], app11.as_str(), "{out}");
    assert_eq!(s.deployed(), ["app:1.1.0"]);
}
