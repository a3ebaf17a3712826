//! An image forger and a watched host for the hostile-input tests (`hostile.rs`).
//!
//! Every forged image is properly signed by a key the host trusts, so only the installer's
//! own checks stand between a hostile payload, manifest or archive and the host:
//!
//! ```text
//! raw tar entries (names, links, types, sizes written into the header bytes as given)
//!   ─► zstd ─► layer blob ┐
//! config JSON (any bytes) ─┼► image manifest ─► SimpleSigning payload signed like
//!                          │                   builder/src/sign.rs (cosign layout, .sig tag)
//!                          └► OCI layout ─► .oci.tar (ExportPlan, or raw entries to mangle)
//! ```
//!
//! The host is a temp dir holding `root/` (the installer's `--root`), `canary/` (an empty
//! directory hostile paths aim at), `outside/secret` (a file hard links aim at) and `work/`
//! (keys, forged layouts, archives). After a refused deploy the whole of `root/` must be
//! byte-identical, `canary/` empty, `outside/` untouched, and the temp dir must hold nothing
//! else.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use formats::Digest;
use formats::archive::ExportPlan;
use formats::layout::Layout;
use formats::oci::{self, Descriptor, ImageIndex, ImageManifest};
use keys::PrivateKey;
use keys::simple_signing::{Expires, SimpleSigning};
use serde_json::{Value, json};

use crate::util::{bin, ok, require_tool};

// ---------------------------------------------------------------------------------------
// Raw tar entries

/// One hand-made tar entry: name and link text go into the header bytes as given (a GNU
/// long name/link entry is put before it when they do not fit in 100 bytes).
#[derive(Debug, Clone)]
pub struct Raw {
    pub name: Vec<u8>,
    pub kind: tar::EntryType,
    pub mode: u32,
    /// The size the header claims (normally `data.len()`).
    pub size: u64,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    pub dev: (u32, u32),
    /// The uid and gid the header claims (the installer must never use them).
    pub owner: (u64, u64),
}

pub fn raw(name: impl AsRef<[u8]>, kind: tar::EntryType, mode: u32, data: &[u8]) -> Raw {
    Raw {
        name: name.as_ref().to_vec(),
        kind,
        mode,
        size: data.len() as u64,
        link: Vec::new(),
        data: data.to_vec(),
        dev: (0, 0),
        owner: (0, 0),
    }
}

pub fn file(name: impl AsRef<[u8]>, data: &[u8]) -> Raw {
    raw(name, tar::EntryType::Regular, 0o644, data)
}

pub fn file_mode(name: impl AsRef<[u8]>, mode: u32, data: &[u8]) -> Raw {
    raw(name, tar::EntryType::Regular, mode, data)
}

pub fn dir(name: impl AsRef<[u8]>) -> Raw {
    raw(name, tar::EntryType::Directory, 0o755, b"")
}

pub fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Raw {
    Raw { link: target.as_ref().to_vec(), ..raw(name, tar::EntryType::Symlink, 0o777, b"") }
}

pub fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Raw {
    Raw { link: target.as_ref().to_vec(), ..raw(name, tar::EntryType::Link, 0o644, b"") }
}

pub fn device(name: impl AsRef<[u8]>, kind: tar::EntryType, major: u32, minor: u32) -> Raw {
    Raw { dev: (major, minor), ..raw(name, kind, 0o666, b"") }
}

/// A pax extended header with `records` (describing the entry after it).
pub fn pax(records: &[(&str, &str)]) -> Raw {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    raw("PaxHeader/x", tar::EntryType::XHeader, 0o644, &data)
}

/// The header block(s) of `r` (with a GNU long name/link entry when needed), no data.
pub fn headers(r: &Raw) -> Vec<u8> {
    let mut out = Vec::new();
    for (long, kind) in [(&r.name, tar::EntryType::GNULongName), (&r.link, tar::EntryType::GNULongLink)] {
        if long.len() > 100 {
            let mut data = long.clone();
            data.push(0);
            let l = raw("././@LongLink", kind, 0o644, &data);
            out.extend_from_slice(&header_block(&l));
            out.extend_from_slice(&data);
            pad(&mut out);
        }
    }
    out.extend_from_slice(&header_block(r));
    out
}

fn header_block(r: &Raw) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    let n = r.name.len().min(100);
    h.as_old_mut().name[..n].copy_from_slice(&r.name[..n]);
    let l = r.link.len().min(100);
    h.as_old_mut().linkname[..l].copy_from_slice(&r.link[..l]);
    h.set_entry_type(r.kind);
    h.set_mode(r.mode);
    h.set_size(r.size);
    h.set_mtime(0);
    h.set_uid(r.owner.0);
    h.set_gid(r.owner.1);
    if r.dev != (0, 0) {
        h.set_device_major(r.dev.0).unwrap();
        h.set_device_minor(r.dev.1).unwrap();
    }
    h.set_cksum();
    *h.as_bytes()
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The tar stream of `entries`, with the end-of-archive blocks.
pub fn tar_bytes(entries: &[Raw]) -> Vec<u8> {
    let mut out = tar_entries(entries);
    out.extend_from_slice(&[0; 1024]);
    out
}

/// The tar stream of `entries`, without the end-of-archive blocks.
pub fn tar_entries(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in entries {
        out.extend_from_slice(&headers(r));
        out.extend_from_slice(&r.data);
        pad(&mut out);
    }
    out
}

pub fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// zstd frames that decompress to `mib` MiB of zeros, without ever holding them: one frame
/// of 1 MiB of zeros, repeated (a zstd stream is any sequence of frames).
pub fn zero_frames(mib: usize) -> Vec<u8> {
    let one = zstd::encode_all(&vec![0u8; 1 << 20][..], 3).unwrap();
    one.repeat(mib)
}

// ---------------------------------------------------------------------------------------
// Stage configs (the embedded stage manifest), as JSON values so that they can be invalid

pub fn e_dir(path: &str, mode: &str) -> Value {
    json!({"path": path, "type": "dir", "mode": mode})
}

pub fn e_file(path: &str, mode: &str, content: &[u8]) -> Value {
    json!({"path": path, "type": "file", "mode": mode, "size": content.len(), "sha256": Digest::of(content).to_string()})
}

pub fn e_link(path: &str, text: &str) -> Value {
    json!({"path": path, "type": "symlink", "mode": "0777", "link": text})
}

/// A stage config of `name` 1.0.0 with these `files` and `entries` (taken as given).
pub fn config(name: &str, files: Value, entries: Vec<Value>) -> Value {
    json!({
        "schema_version": 1,
        "name": name,
        "version": "1.0.0",
        "plugins": [],
        "dependencies": [],
        "host_requirements": [],
        "files": files,
        "services": [],
        "verify": [],
        "cleanup": [],
        "entries": entries,
    })
}

/// The stage every hostile image is a variation of: `d/`, `d/f` = "abc", `l` -> `d/f`,
/// with `d/f` linked at `/usr/local/bin/hostile-f`.
pub const NAME: &str = "app";
pub const CONTENT: &[u8] = b"abc";

pub fn base_files() -> Value {
    json!([{"path": "d/f", "target": "/usr/local/bin/hostile-f"}])
}

pub fn base_entries() -> Vec<Value> {
    vec![e_dir("d", "0755"), e_file("d/f", "0644", CONTENT), e_link("l", "d/f")]
}

pub fn base_config() -> Value {
    config(NAME, base_files(), base_entries())
}

pub fn base_raw() -> Vec<Raw> {
    vec![dir("d/"), file("d/f", CONTENT), symlink("l", "d/f")]
}

pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

// ---------------------------------------------------------------------------------------
// The forger

/// What to forge. Everything is signed by `keys` (over the manifest as written) unless a
/// field says to lie.
#[derive(Debug, Clone)]
pub struct Forge<'k> {
    pub name: String,
    pub version: String,
    /// The config blob's bytes.
    pub config: Vec<u8>,
    /// The config descriptor's media type and size, when they should lie.
    pub config_media_type: String,
    pub config_size: Option<u64>,
    /// The layer blobs.
    pub layers: Vec<Vec<u8>>,
    /// Replaces the layer descriptors (lies about digests, sizes, media types).
    pub layer_descs: Option<Vec<Descriptor>>,
    /// Replaces the image manifest's bytes altogether.
    pub manifest: Option<Vec<u8>>,
    pub keys: Vec<&'k PrivateKey>,
    /// What the signed payload names, when it should name something else.
    pub signed_digest: Option<Digest>,
    pub signed_name: Option<String>,
    pub signed_version: Option<String>,
    pub expires: Option<String>,
    /// The signature manifest's subject, when it should name something else.
    pub subject: Option<Descriptor>,
    /// Replaces the base64 signature of every layer.
    pub signature_b64: Option<String>,
    /// Signs these bytes instead of the payload (a valid signature over other bytes).
    pub sign_other_bytes: Option<Vec<u8>>,
    /// Leave out the signature manifest.
    pub unsigned: bool,
}

impl<'k> Forge<'k> {
    /// The base stage with `layer` as its one layer, signed by `key`.
    pub fn new(key: &'k PrivateKey, config: &Value, layers: Vec<Vec<u8>>) -> Self {
        Forge {
            name: NAME.into(),
            version: "1.0.0".into(),
            config: to_bytes(config),
            config_media_type: formats::manifest::CONFIG_MEDIA_TYPE.into(),
            config_size: None,
            layers,
            layer_descs: None,
            manifest: None,
            keys: vec![key],
            signed_digest: None,
            signed_name: None,
            signed_version: None,
            expires: None,
            subject: None,
            signature_b64: None,
            sign_other_bytes: None,
            unsigned: false,
        }
    }

    /// `entries` as one tar+zstd layer of the base config.
    pub fn tar(key: &'k PrivateKey, entries: &[Raw]) -> Self {
        Self::new(key, &base_config(), vec![zst(&tar_bytes(entries))])
    }

    pub fn tag(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// Writes the image into a new OCI layout at `dir` and returns what was forged.
    pub fn write(&self, dir: &Path) -> Forged {
        let layout = Layout::open_or_create(dir).unwrap();
        let config_digest = layout.write_blob(&self.config).unwrap();
        let mut config_desc = Descriptor::new(
            &self.config_media_type,
            config_digest,
            self.config_size.unwrap_or(self.config.len() as u64),
        );
        config_desc.annotations.clear();
        let mut layer_descs = Vec::new();
        for l in &self.layers {
            let d = layout.write_blob(l).unwrap();
            layer_descs.push(Descriptor::new(oci::TAR_ZSTD_MEDIA_TYPE, d, l.len() as u64));
        }
        let layer_descs = self.layer_descs.clone().unwrap_or(layer_descs);
        let annotations = BTreeMap::from([
            (oci::ANNOTATION_TITLE.to_owned(), self.name.clone()),
            (oci::ANNOTATION_VERSION.to_owned(), self.version.clone()),
            (oci::ANNOTATION_CREATED.to_owned(), "2023-11-14T22:13:20Z".to_owned()),
        ]);
        let manifest_bytes = self
            .manifest
            .clone()
            .unwrap_or_else(|| ImageManifest::stage(config_desc, layer_descs, annotations).to_bytes());
        let image = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &manifest_bytes);
        layout.write_blob(&manifest_bytes).unwrap();
        let tag = self.tag();
        layout.update_index(|i| i.set(&tag, image.clone())).unwrap();

        let sig_tag = format!("{}:{}", self.name, image.digest.signature_tag());
        let mut sig = None;
        if !self.unsigned {
            let mut layers = Vec::new();
            for key in &self.keys {
                let payload = self.payload(image.digest);
                layout.write_blob(&payload).unwrap();
                let mut l = Descriptor::of(oci::SIMPLE_SIGNING_MEDIA_TYPE, &payload);
                let signed = self.sign_other_bytes.as_deref().unwrap_or(&payload);
                let b64 = self
                    .signature_b64
                    .clone()
                    .unwrap_or_else(|| base64::engine::general_purpose::STANDARD.encode(key.sign(signed)));
                l.annotations.insert(oci::ANNOTATION_COSIGN_SIGNATURE.to_owned(), b64);
                l.annotations.insert(oci::ANNOTATION_KEY_ID.to_owned(), key.key_id().to_string());
                layers.push(l);
            }
            let subject = self.subject.clone().unwrap_or_else(|| image.clone());
            let sm = ImageManifest::signatures(subject, layers).to_bytes();
            layout.write_blob(oci::EMPTY_BLOB).unwrap();
            layout.write_blob(&sm).unwrap();
            let sd = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &sm);
            layout.update_index(|i| i.set(&sig_tag, sd.clone())).unwrap();
            sig = Some(sd);
        }
        Forged { layout, tag, image, sig_tag, sig, forge_keys: self.keys.len() }
    }

    /// The simple-signing payload, naming what this forge says it names.
    fn payload(&self, digest: Digest) -> Vec<u8> {
        let name = self.signed_name.as_deref().unwrap_or(&self.name);
        let version = self.signed_version.as_deref().unwrap_or(&self.version);
        let expires: Option<Expires> = self.expires.as_deref().map(|e| e.parse().unwrap());
        // A name the stage-name type refuses is still signed: put in as text.
        const PLACEHOLDER: &str = "forge-placeholder-name";
        let parsed = name.parse().unwrap_or_else(|_| PLACEHOLDER.parse().unwrap());
        let bytes = SimpleSigning::new(
            self.name.clone(),
            self.signed_digest.unwrap_or(digest),
            &parsed,
            &version.parse().unwrap(),
            expires.as_ref(),
        )
        .to_bytes();
        if parsed.as_str() == name {
            return bytes;
        }
        String::from_utf8(bytes).unwrap().replace(&format!("\"{PLACEHOLDER}\""), &format!("{name:?}")).into_bytes()
    }
}

/// A forged image in its layout.
#[derive(Debug)]
pub struct Forged {
    pub layout: Layout,
    pub tag: String,
    /// The image manifest's descriptor.
    pub image: Descriptor,
    pub sig_tag: String,
    pub sig: Option<Descriptor>,
    forge_keys: usize,
}

impl Forged {
    /// Exports the image as the builder would (formats::archive::ExportPlan).
    pub fn export(&self, out: &Path) -> PathBuf {
        let plan = ExportPlan::new(&self.layout, std::slice::from_ref(&self.tag), &Default::default()).unwrap();
        let f = fs::File::create(out).unwrap();
        plan.write(&self.layout, f, |_| {}).unwrap();
        out.to_owned()
    }

    /// The archive's entries in export order, as raw tar entries to mangle before
    /// [`write_archive`].
    pub fn entries(&self) -> Vec<Raw> {
        let mut index = ImageIndex::default();
        index.set(&self.tag, self.image.clone());
        let mut blobs: Vec<Digest> = Vec::new();
        if let Some(sd) = &self.sig {
            index.set(&self.sig_tag, sd.clone());
            blobs.push(sd.digest);
            let sm = ImageManifest::from_bytes(&self.blob(&sd.digest)).unwrap();
            blobs.extend(sm.layers.iter().map(|l| l.digest));
            blobs.push(sm.config.digest);
        }
        blobs.push(self.image.digest);
        if let Ok(m) = ImageManifest::from_bytes(&self.blob(&self.image.digest)) {
            blobs.push(m.config.digest);
            blobs.extend(m.layers.iter().map(|l| l.digest));
        }
        let mut out = vec![
            file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            file("index.json", &index.to_bytes()),
            dir("blobs/"),
            dir("blobs/sha256/"),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for d in blobs {
            if seen.insert(d) && self.layout.has_blob(&d) {
                out.push(file(format!("blobs/sha256/{}", d.hex()), &self.blob(&d)));
            }
        }
        out
    }

    pub fn blob(&self, d: &Digest) -> Vec<u8> {
        fs::read(self.layout.blob_path(d)).unwrap()
    }
}

/// Writes raw tar `entries` as an archive file.
pub fn write_archive(entries: &[Raw], out: &Path) -> PathBuf {
    fs::write(out, tar_bytes(entries)).unwrap();
    out.to_owned()
}

// ---------------------------------------------------------------------------------------
// The watched host

/// A temp dir with `root/` (initialised), `canary/`, `outside/secret` and `work/`.
pub struct Host {
    pub tmp: tempfile::TempDir,
    n: Cell<usize>,
}

pub const SECRET: &[u8] = b"the operator's secret\n";

impl Host {
    pub fn new() -> Host {
        let h = Host { tmp: tempfile::tempdir().unwrap(), n: Cell::new(0) };
        for d in [h.root(), h.canary(), h.outside(), h.work()] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(h.outside().join("secret"), SECRET).unwrap();
        ok(h.stage().arg("init"));
        h
    }

    pub fn base(&self) -> &Path {
        self.tmp.path()
    }
    pub fn root(&self) -> PathBuf {
        self.base().join("root")
    }
    pub fn canary(&self) -> PathBuf {
        self.base().join("canary")
    }
    pub fn outside(&self) -> PathBuf {
        self.base().join("outside")
    }
    pub fn work(&self) -> PathBuf {
        self.base().join("work")
    }

    /// A relative path from the unpack directory (ROOT/var/lib/op-dbus/staging/.tmp/gen-N)
    /// and from a generation (ROOT/var/lib/op-dbus/staging/.generations/NAME/N) up to the
    /// temp dir, then `rest`: seven `..` and one more for luck lands on the same place
    /// (`..` of `/` is `/`), so is also tried with eight.
    pub fn up(rest: &str) -> String {
        format!("{}{rest}", "../".repeat(7))
    }

    /// The absolute path of the canary dir joined with `rest`.
    pub fn abs_canary(&self, rest: &str) -> String {
        format!("{}/{rest}", self.canary().display())
    }

    /// A new key, written to `work/NAME` and `work/NAME.pub`.
    pub fn key(&self, name: &str) -> PrivateKey {
        let k = PrivateKey::generate().unwrap();
        k.write_new(&self.work().join(name)).unwrap();
        k
    }

    pub fn key_pub(&self, name: &str) -> PathBuf {
        self.work().join(format!("{name}.pub"))
    }

    /// Trusts `work/NAME.pub`.
    pub fn trust(&self, name: &str) {
        ok(self.stage().args(["trust", "add"]).arg(self.key_pub(name)));
    }

    pub fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root()).stdin(Stdio::null());
        c
    }

    /// A fresh path under `work/` for a forged layout or archive.
    pub fn fresh(&self, what: &str) -> PathBuf {
        let n = self.n.get() + 1;
        self.n.set(n);
        self.work().join(format!("{n:03}-{what}"))
    }

    /// Forges `f` and exports it with ExportPlan; returns the archive.
    pub fn export(&self, f: &Forge<'_>) -> PathBuf {
        let forged = f.write(&self.fresh("layout"));
        forged.export(&self.fresh("image.oci.tar"))
    }

    /// Forges `f`, lets `mangle` edit its archive entries, writes the archive.
    pub fn export_raw(&self, f: &Forge<'_>, mangle: impl FnOnce(&Forged, &mut Vec<Raw>)) -> PathBuf {
        let forged = f.write(&self.fresh("layout"));
        let mut entries = forged.entries();
        mangle(&forged, &mut entries);
        write_archive(&entries, &self.fresh("image.oci.tar"))
    }

    /// Everything an installer could have changed: the whole root (paths, types, modes,
    /// contents, link texts, link counts), the temp dir's top level, the canary, the
    /// outside secret, and the names and sizes under work/.
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        walk(&self.root(), &self.root(), "root/", true, &mut out);
        walk(&self.canary(), &self.canary(), "canary/", true, &mut out);
        walk(&self.outside(), &self.outside(), "outside/", true, &mut out);
        walk(&self.work(), &self.work(), "work/", false, &mut out);
        for e in fs::read_dir(self.base()).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            out.insert(format!("top:{n}"), String::new());
        }
        out
    }

    /// Runs `op-dbus-stage deploy ARCHIVE`, timing it and measuring its peak memory.
    pub fn deploy(&self, archive: &Path, extra: &[&str]) -> Run {
        let time = require_tool("time", "time");
        let rss_file = self.work().join(".rss");
        let start = Instant::now();
        let out = Command::new(time)
            .arg("-o")
            .arg(&rss_file)
            .args(["-f", "%M"])
            .arg(bin("op-dbus-stage"))
            .arg("--root")
            .arg(self.root())
            .args(extra)
            .arg("deploy")
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let elapsed = start.elapsed();
        let rss = fs::read_to_string(&rss_file).unwrap_or_default();
        let _ = fs::remove_file(&rss_file);
        let max_rss_kib = rss.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        Run { out, elapsed, max_rss_kib }
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

fn walk(base: &Path, dir: &Path, prefix: &str, content: bool, out: &mut BTreeMap<String, String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        let rel = format!("{prefix}{}", p.strip_prefix(base).unwrap().to_string_lossy());
        let m = fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        let ft = m.file_type();
        let v = if ft.is_symlink() {
            format!("link {}", fs::read_link(&p).unwrap().display())
        } else if ft.is_dir() {
            walk(base, &p, prefix, content, out);
            format!("dir {mode:o}")
        } else if ft.is_file() {
            if content {
                format!("file {mode:o} nlink {} {}", m.nlink(), Digest::of(&fs::read(&p).unwrap()))
            } else {
                format!("file {}", m.len())
            }
        } else if ft.is_fifo() {
            format!("fifo {mode:o}")
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("device {mode:o} {}", m.rdev())
        } else {
            format!("other {mode:o}")
        };
        out.insert(rel, v);
    }
}

/// The outcome of one deploy.
#[derive(Debug)]
pub struct Run {
    pub out: Output,
    pub elapsed: Duration,
    pub max_rss_kib: u64,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

/// One hostile case: an archive and the exit codes that are acceptable refusals.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub archive: PathBuf,
    pub codes: &'static [i32],
    /// Extra flags before `deploy`.
    pub flags: Vec<&'static str>,
    /// A deadline for the refusal (for bounded reads).
    pub within: Duration,
    /// A bound on the installer's peak resident memory.
    pub max_rss_mib: u64,
    /// The input differs from a good image only where it does not matter (unauthenticated
    /// metadata the OCI spec says to ignore): accepting it is fine too.
    pub may_succeed: bool,
}

pub const MALFORMED: &[i32] = &[7];
pub const POLICY: &[i32] = &[4];
pub const TRUST: &[i32] = &[3];
pub const TRUST_OR_MALFORMED: &[i32] = &[3, 7];

pub fn case(name: impl Into<String>, archive: PathBuf, codes: &'static [i32]) -> Case {
    Case {
        name: name.into(),
        archive,
        codes,
        flags: Vec::new(),
        within: Duration::from_secs(60),
        max_rss_mib: 512,
        may_succeed: false,
    }
}

/// Deploys every case on `host`; each must be refused with one of its codes and leave
/// everything as it was. Reports every case, then fails listing the cases that did not hold.
pub fn run_cases(host: &Host, cases: Vec<Case>) {
    let mut failures = Vec::new();
    // The root as it is now, to put back after a case that changed it.
    let pristine = host.work().join(".pristine-root");
    let _ = fs::remove_dir_all(&pristine);
    crate::util::copy_tree(&host.root(), &pristine);
    let restore = || {
        fs::remove_dir_all(host.root()).unwrap();
        crate::util::copy_tree(&pristine, &host.root());
    };
    for c in &cases {
        let before = host.snapshot();
        let run = host.deploy(&c.archive, &c.flags);
        let after = host.snapshot();
        let mut problems = Vec::new();
        let succeeded_harmlessly = c.may_succeed && run.code() == 0;
        if !c.codes.contains(&run.code()) && !succeeded_harmlessly {
            problems.push(format!("exit {} (expected {:?})", run.code(), c.codes));
        }
        if before != after && !succeeded_harmlessly {
            let d = diff(&before, &after);
            problems.push(format!(
                "changed: {}",
                if d.len() > 600 { format!("{}...", d.chars().take(600).collect::<String>()) } else { d }
            ));
        }
        if before != after {
            restore();
        }
        let canary: Vec<_> = fs::read_dir(host.canary()).unwrap().collect();
        if !canary.is_empty() {
            problems.push("something was written into the canary directory".into());
        }
        if fs::read(host.outside().join("secret")).unwrap() != SECRET {
            problems.push("the outside secret changed".into());
        }
        if run.elapsed > c.within {
            problems.push(format!("took {:?} (at most {:?})", run.elapsed, c.within));
        }
        if run.max_rss_kib > c.max_rss_mib << 10 {
            problems.push(format!("peak memory {} KiB (at most {} MiB)", run.max_rss_kib, c.max_rss_mib));
        }
        let first_line = run.stderr().lines().next().unwrap_or_default().to_owned();
        if problems.is_empty() {
            eprintln!(
                "ok   {:<48} exit {} in {:?} ({} KiB): {}",
                c.name,
                run.code(),
                run.elapsed,
                run.max_rss_kib,
                shorten(&first_line)
            );
        } else {
            eprintln!("FAIL {:<48} {}: {}", c.name, problems.join("; "), shorten(&first_line));
            failures.push(format!("{}: {}\n    stderr: {}", c.name, problems.join("; "), run.stderr().trim()));
            let _ = fs::remove_dir_all(host.canary());
            fs::create_dir_all(host.canary()).unwrap();
        }
    }
    let _ = fs::remove_dir_all(&pristine);
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases were not refused cleanly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn shorten(s: &str) -> String {
    let s = s.trim_start_matches("op-dbus-stage: error: ");
    if s.chars().count() > 220 { format!("{}...", s.chars().take(220).collect::<String>()) } else { s.to_owned() }
}

/// The entries that differ between two snapshots.
pub fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("-{k}")),
            Some(w) if w != v => out.push(format!("~{k} ({v} -> {w})")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("+{k}"));
        }
    }
    out.join(", ")
}

/// Writes `bytes` to a fresh file under work/.
pub fn write_work(host: &Host, what: &str, bytes: &[u8]) -> PathBuf {
    let p = host.fresh(what);
    let mut f = fs::File::create(&p).unwrap();
    f.write_all(bytes).unwrap();
    p
}
