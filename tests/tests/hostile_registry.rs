//! The registry client against registries and storage hosts under an attacker's control:
//! small HTTP servers written here (std `TcpListener` on 127.0.0.1, one request per
//! connection), serving a real image of a local store with hostile twists. Only loopback
//! addresses are ever contacted.
//!
//! - credentials go only to the registry's own host (and a token realm it names over
//!   HTTPS or on loopback): not to a storage host a blob redirects to, not to a plain-HTTP
//!   realm elsewhere, not to the host of an upload `Location`;
//! - authentication rounds are bounded, every request has a deadline (or, for blobs, a
//!   minimum rate), and the message says which bound was hit.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use util::*;

/// One HTTP request as a test server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

type Handler = dyn Fn(&Req, &mut TcpStream, u16) + Send + Sync;

/// A test HTTP server on 127.0.0.1: each connection serves one request through `handler`.
struct Server {
    port: u16,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn start(handler: impl Fn(&Req, &mut TcpStream, u16) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let l = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (h, l) = (handler.clone(), l.clone());
                std::thread::spawn(move || {
                    if let Some(req) = read_request(&mut conn) {
                        l.lock().unwrap().push(req.clone());
                        h(&req, &mut conn, port);
                    }
                });
            }
        });
        Server { port, log }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

fn read_request(conn: &mut TcpStream) -> Option<Req> {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: u64 = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    std::io::copy(&mut conn.take(len), &mut std::io::sink()).ok()?;
    Some(Req { method, path, headers })
}

fn respond(conn: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

/// Headers then `body` one byte every `pause`, for as long as the client reads.
fn trickle(conn: &mut TcpStream, content_type: &str, body: &[u8], pause: Duration) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    for b in body {
        if conn.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
}

/// A 200 response announcing all of `body`, and the first half of it.
fn send_half(conn: &mut TcpStream, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&body[..body.len() / 2]);
    let _ = conn.flush();
}

/// The manifests (by tag) and blobs (by digest) of a local OCI layout.
#[derive(Clone)]
struct Content {
    manifests: BTreeMap<String, Vec<u8>>,
    blobs: BTreeMap<String, Vec<u8>>,
}

impl Content {
    fn of(store: &Path) -> Content {
        let index = json(&fs::read_to_string(store.join("index.json")).unwrap());
        let mut blobs = BTreeMap::new();
        for e in fs::read_dir(store.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            blobs.insert(format!("sha256:{}", e.file_name().to_string_lossy()), fs::read(e.path()).unwrap());
        }
        let mut manifests = BTreeMap::new();
        for m in index["manifests"].as_array().unwrap() {
            let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap();
            let tag = name.rsplit_once(':').unwrap().1.to_owned();
            let digest = m["digest"].as_str().unwrap();
            manifests.insert(tag, blobs[digest].clone());
            manifests.insert(digest.to_owned(), blobs[digest].clone());
        }
        Content { manifests, blobs }
    }

    /// Serves `GET /v2/`, manifests and blobs; `false` when the path is none of these.
    fn serve(&self, req: &Req, conn: &mut TcpStream) -> bool {
        if req.path == "/v2/" {
            respond(conn, 200, &[], b"{}");
            return true;
        }
        if let Some((_, r)) = req.path.split_once("/manifests/") {
            match self.manifests.get(r) {
                Some(m) => respond(
                    conn,
                    200,
                    &[("Content-Type", "application/vnd.oci.image.manifest.v1+json".to_owned())],
                    if req.method == "HEAD" { b"" } else { m },
                ),
                None => respond(conn, 404, &[], b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\"}]}"),
            }
            return true;
        }
        if let Some((_, d)) = req.path.split_once("/blobs/") {
            match self.blobs.get(d) {
                Some(b) => respond(conn, 200, &[], b),
                None => respond(conn, 404, &[], b""),
            }
            return true;
        }
        false
    }
}

/// A temp dir with a signing key, a store holding a signed `app:1.0.0`, and a host root.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch { dir: tempfile::tempdir().unwrap() };
        keygen(s.dir.path(), "signing.key");
        let src = s.path("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(
            src.join("manifest.yaml"),
            "name: app\nversion: 1.0.0\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n",
        )
        .unwrap();
        fs::write(src.join("bin/app"), "#!/bin/sh\necho app\n").unwrap();
        fs::set_permissions(src.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        ok(s.image().args(["-q", "build", "--format", "tar"]).arg(&src));
        fs::create_dir_all(s.path("root")).unwrap();
        ok(s.stage().arg("init"));
        ok(s.stage().args(["trust", "add"]).arg(s.path("signing.key.pub")));
        s
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn content(&self) -> Content {
        Content::of(&self.path("store"))
    }
    fn clean(&self, c: &mut Command) {
        c.env_remove("REGISTRY_AUTH_FILE")
            .env_remove("OP_DBUS_REGISTRY_TIMEOUT")
            .env_remove("OP_DBUS_REGISTRY_MIN_RATE")
            .env("HOME", self.dir.path());
    }
    fn image(&self) -> Command {
        let mut c = image(&self.path("store"), Some(&self.path("signing.key")));
        self.clean(&mut c);
        c
    }
    /// `op-dbus-image` on another, empty store (for pulls).
    fn puller(&self) -> Command {
        let mut c = image(&self.path("pulled"), None);
        self.clean(&mut c);
        c
    }
    fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.path("root"));
        self.clean(&mut c);
        c
    }
}

/// What a command did within `limit`: its exit code (`None` if it was still running and
/// was killed), stderr and how long it ran.
struct Ran {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

fn run_for(cmd: &mut Command, stdin: &str, limit: Duration) -> Ran {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.code().unwrap_or(-1));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    Ran { code, stderr: reader.join().unwrap(), took }
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

/// Whether a request carries the registry's Basic credentials.
fn has_auth(r: &Req) -> bool {
    r.header("authorization").is_some()
}

#[test]
fn credentials_never_go_to_a_storage_host_a_blob_redirects_to() {
    let s = Scratch::new();
    let content = s.content();
    // The storage host answers 401 with a bearer challenge naming itself, then serves the
    // blob to whoever got a token from it.
    let storage = Server::start({
        let content = content.clone();
        move |req, conn, port| {
            if req.path.starts_with("/token") {
                respond(conn, 200, &[], b"{\"token\":\"storage-token\"}");
            } else if req.header("authorization") != Some("Bearer storage-token") {
                let realm = format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"storage\"");
                respond(conn, 401, &[("WWW-Authenticate", realm)], b"");
            } else {
                let d = req.path.trim_start_matches("/blob/");
                respond(conn, 200, &[], content.blobs.get(d).map(Vec::as_slice).unwrap_or(b""));
            }
        }
    });
    let storage_host = storage.host();
    let registry = Server::start(move |req, conn, _| {
        if req.header("authorization") != Some(basic("user", "sekrit").as_str()) {
            respond(conn, 401, &[("WWW-Authenticate", "Basic realm=\"reg\"".to_owned())], b"");
        } else if let Some((_, d)) = req.path.split_once("/blobs/") {
            respond(conn, 307, &[("Location", format!("http://{storage_host}/blob/{d}"))], b"");
        } else {
            content.serve(req, conn);
        }
    });
    let ran = run_for(
        s.puller()
            .args(["pull", &format!("{}/op-dbus/app:1.0.0", registry.host()), "--username", "user"])
            .arg("--password-stdin"),
        "sekrit\n",
        Duration::from_secs(60),
    );
    let leaked: Vec<_> = storage.requests().into_iter().filter(has_auth).collect();
    assert!(leaked.is_empty(), "the storage host received credentials: {leaked:?}\n{}", ran.stderr);
    assert!(storage.requests().iter().any(|r| r.path.starts_with("/blob/")), "the redirect was followed");
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.stderr.contains("storage host") || ran.stderr.contains("not the registry"), "{}", ran.stderr);
}

#[test]
fn credentials_never_go_to_a_plain_http_token_realm_off_loopback() {
    let s = Scratch::new();
    let content = s.content();
    // `127.1` reaches this machine but is not a loopback name the client recognizes: to
    // the client it is any host on the network, reached over plain HTTP.
    let registry = Server::start(move |req, conn, port| {
        if req.path.starts_with("/token") {
            respond(conn, 200, &[], b"{\"token\":\"t\"}");
        } else if req.header("authorization") != Some("Bearer t") {
            let realm = format!("Bearer realm=\"http://127.1:{port}/token\",service=\"reg\"");
            respond(conn, 401, &[("WWW-Authenticate", realm)], b"");
        } else {
            content.serve(req, conn);
        }
    });
    let ran = run_for(
        s.puller()
            .args(["pull", &format!("{}/op-dbus/app:1.0.0", registry.host()), "--username", "user"])
            .arg("--password-stdin"),
        "sekrit\n",
        Duration::from_secs(60),
    );
    let leaked: Vec<_> =
        registry.requests().into_iter().filter(|r| r.path.starts_with("/token") && has_auth(r)).collect();
    assert!(leaked.is_empty(), "the plain-HTTP realm received credentials: {leaked:?}\n{}", ran.stderr);
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.stderr.contains("plain HTTP"), "{}", ran.stderr);
}

#[test]
fn push_sends_no_credentials_to_the_host_of_an_upload_location() {
    let s = Scratch::new();
    let uploads = Server::start(|req, conn, _| {
        respond(conn, if req.method == "PUT" { 201 } else { 404 }, &[], b"");
    });
    let upload_host = uploads.host();
    let n = Arc::new(AtomicUsize::new(0));
    let registry = Server::start(move |req, conn, _| {
        if req.header("authorization") != Some(basic("user", "sekrit").as_str()) {
            respond(conn, 401, &[("WWW-Authenticate", "Basic realm=\"reg\"".to_owned())], b"");
        } else if req.path == "/v2/" {
            respond(conn, 200, &[], b"{}");
        } else if req.method == "HEAD" {
            respond(conn, 404, &[], b"");
        } else if req.method == "POST" {
            let id = n.fetch_add(1, Ordering::SeqCst);
            respond(conn, 202, &[("Location", format!("http://{upload_host}/upload/{id}?state=x"))], b"");
        } else if req.method == "PUT" && req.path.contains("/manifests/") {
            respond(conn, 201, &[], b"");
        } else {
            respond(conn, 404, &[], b"");
        }
    });
    let ran = run_for(
        s.image()
            .args(["push", "app:1.0.0", &format!("{}/op-dbus/app", registry.host()), "--username", "user"])
            .arg("--password-stdin"),
        "sekrit\n",
        Duration::from_secs(60),
    );
    let puts = uploads.requests();
    assert!(puts.iter().any(|r| r.method == "PUT"), "the blobs went to the upload host: {puts:?}\n{}", ran.stderr);
    let leaked: Vec<_> = puts.iter().filter(|r| has_auth(r)).collect();
    assert!(leaked.is_empty(), "the upload host received credentials: {leaked:?}");
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
}

#[test]
fn alternating_challenges_end_after_a_few_rounds() {
    let s = Scratch::new();
    let n = Arc::new(AtomicUsize::new(0));
    let registry = Server::start(move |req, conn, port| {
        if req.path.starts_with("/token") {
            respond(conn, 200, &[], b"{\"token\":\"t\"}");
            return;
        }
        let i = n.fetch_add(1, Ordering::SeqCst) % 2;
        let realm = format!("Bearer realm=\"http://127.0.0.1:{port}/token{i}\",service=\"reg{i}\"");
        respond(conn, 401, &[("WWW-Authenticate", realm)], b"");
    });
    let ran = run_for(
        s.stage().args(["deploy", &format!("{}/op-dbus/app:1.0.0", registry.host())]),
        "",
        Duration::from_secs(30),
    );
    assert!(ran.code.is_some(), "deploy still ran after {:?} ({} requests)", ran.took, registry.requests().len());
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(registry.requests().len() < 20, "{} requests", registry.requests().len());
    assert!(ran.stderr.contains("authentication rounds"), "{}", ran.stderr);
}

#[test]
fn a_trickled_manifest_hits_the_request_deadline() {
    let s = Scratch::new();
    let content = s.content();
    let manifest = content.manifests["1.0.0"].clone();
    let registry = Server::start(move |req, conn, _| {
        if req.path.contains("/manifests/") {
            trickle(conn, "application/vnd.oci.image.manifest.v1+json", &manifest, Duration::from_millis(500));
        } else {
            content.serve(req, conn);
        }
    });
    let ran = run_for(
        s.stage()
            .args(["deploy", &format!("{}/op-dbus/app:1.0.0", registry.host())])
            .env("OP_DBUS_REGISTRY_TIMEOUT", "3"),
        "",
        Duration::from_secs(40),
    );
    assert!(ran.code.is_some(), "deploy still ran after {:?}", ran.took);
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.took < Duration::from_secs(15), "took {:?}: {}", ran.took, ran.stderr);
    assert!(ran.stderr.contains("OP_DBUS_REGISTRY_TIMEOUT"), "{}", ran.stderr);
}

#[test]
fn a_trickled_blob_hits_the_minimum_rate() {
    let s = Scratch::new();
    let content = s.content();
    let registry = Server::start(move |req, conn, _| match req.path.split_once("/blobs/") {
        Some((_, d)) if content.blobs.contains_key(d) => {
            trickle(conn, "application/octet-stream", &content.blobs[d], Duration::from_millis(500))
        }
        _ => {
            content.serve(req, conn);
        }
    });
    let ran = run_for(
        s.puller()
            .args(["pull", &format!("{}/op-dbus/app:1.0.0", registry.host())])
            .env("OP_DBUS_REGISTRY_TIMEOUT", "2")
            .env("OP_DBUS_REGISTRY_MIN_RATE", "1024"),
        "",
        Duration::from_secs(60),
    );
    assert!(ran.code.is_some(), "pull still ran after {:?}", ran.took);
    assert_ne!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.took < Duration::from_secs(20), "took {:?}: {}", ran.took, ran.stderr);
    assert!(ran.stderr.contains("OP_DBUS_REGISTRY_MIN_RATE"), "{}", ran.stderr);
}

#[test]
fn bad_deadline_settings_are_usage_errors() {
    let s = Scratch::new();
    let ran = run_for(
        s.puller().args(["pull", "127.0.0.1:9/op-dbus/app:1.0.0"]).env("OP_DBUS_REGISTRY_TIMEOUT", "soon"),
        "",
        Duration::from_secs(30),
    );
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("OP_DBUS_REGISTRY_TIMEOUT"), "{}", ran.stderr);
}

#[test]
fn a_registry_that_stops_mid_blob_is_abandoned_after_the_stall_timeout() {
    let s = Scratch::new();
    let content = s.content();
    let registry = Server::start(move |req, conn, _| match req.path.split_once("/blobs/") {
        // The payload layer: headers and half its bytes, then silence with the connection open.
        Some((_, d)) if content.blobs.get(d).is_some_and(|b| b.len() > 200) && req.method == "GET" => {
            let body = &content.blobs[d];
            send_half(conn, body);
            std::thread::sleep(Duration::from_secs(30));
        }
        _ => {
            content.serve(req, conn);
        }
    });
    let ran = run_for(
        s.stage().args(["--stall-timeout", "2", "deploy", &format!("{}/op-dbus/app:1.0.0", registry.host())]),
        "",
        Duration::from_secs(40),
    );
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(ran.took < Duration::from_secs(2 + 5), "took {:?}: {}", ran.took, ran.stderr);
    assert!(ran.stderr.contains("stall"), "{}", ran.stderr);
    let ran = run_for(s.stage().args(["--lock-timeout", "1", "-q", "gc"]), "", Duration::from_secs(20));
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
}

/// A deploy from a registry unpacks the payload layer while it arrives (one read of it:
/// before, the layer was stored whole, then read again to unpack it): with the second
/// half of the layer held back by the registry, the image's file is already being written
/// in the staging temp area; once the rest arrives the deploy succeeds and leaves nothing
/// in the temp area.
#[test]
fn a_registry_deploy_unpacks_the_layer_while_it_arrives() {
    let s = Scratch::new();
    // 1.0.1: a 2 MiB program, so that half its layer decompresses to more than one piece.
    let src = s.path("src");
    fs::write(src.join("bin/app"), util::varied(2 << 20, 11)).unwrap();
    let manifest = fs::read_to_string(src.join("manifest.yaml")).unwrap().replace("1.0.0", "1.0.1");
    fs::write(src.join("manifest.yaml"), manifest).unwrap();
    ok(s.image().args(["-q", "build", "--format", "tar"]).arg(&src));
    let content = s.content();
    let release = Arc::new(AtomicUsize::new(0));
    let held = release.clone();
    let registry = Server::start(move |req, conn, _| match req.path.split_once("/blobs/") {
        // The payload layer: headers and half its bytes, then the rest once released.
        Some((_, d)) if content.blobs.get(d).is_some_and(|b| b.len() > 1 << 20) && req.method == "GET" => {
            let body = &content.blobs[d];
            send_half(conn, body);
            let waited = Instant::now();
            while held.load(Ordering::SeqCst) == 0 && waited.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = conn.write_all(&body[body.len() / 2..]);
        }
        _ => {
            content.serve(req, conn);
        }
    });
    let mut child = s
        .stage()
        .args(["--stall-timeout", "60", "-q", "deploy", &format!("{}/op-dbus/app:1.0.1", registry.host())])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = s.path("root/var/lib/op-dbus/staging/.tmp");
    let started = Instant::now();
    loop {
        let found = fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("stream-"))
            .find_map(|e| fs::metadata(e.path().join("bin/app")).ok());
        if found.is_some_and(|m| m.len() > 0) {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the deploy ended ({st}) before the layer was whole");
        }
        if started.elapsed() > Duration::from_secs(20) {
            release.store(1, Ordering::SeqCst);
            let _ = child.kill();
            panic!("nothing of the layer was unpacked while it arrived");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "still waiting for the rest of the layer");
    release.store(1, Ordering::SeqCst);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let staged = s.path("root/var/lib/op-dbus/staging/app/bin/app");
    assert!(fs::read(&staged).unwrap() == util::varied(2 << 20, 11), "the staged program differs");
    ok(s.stage().args(["-q", "verify"]));
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "nothing left in the temp area");
}
