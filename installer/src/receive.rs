//! Receiving images: from an `.oci.tar` (a file or stdin, read in one pass), an OCI layout
//! directory, a registry (`HOST[:PORT]/REPO:TAG`), or the local store; verified before
//! anything reaches the store.
//!
//! From a registry, the manifest, the embedded stage manifest and the `sha256-<hex>.sig`
//! signature manifest with its payloads arrive first and are verified like an archive's;
//! only then are the payload layers the local store lacks fetched (hashed as they stream,
//! an interrupted download resumed with a ranged GET).
//!
//! ```text
//! SOURCE ──► store/.tmp/recv-*/ (a temporary OCI layout; every blob hashed as it arrives)
//!              │  signatures checked as soon as an image's small blobs are in, before payloads
//!              ▼
//!            every image: manifest, config, signatures, trust policy, every blob present
//!              ▼
//!            blobs renamed into the store, tags set     (nothing outside .tmp changed before)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

use formats::archive::BlobEvent;
use formats::layout::Layout;
use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};
use formats::oci::{self, Descriptor, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES};
use formats::path::RelPath;
use formats::{Digest, Reference, StageName, Version};
use keys::policy::Policy;
use keys::trust::{Identity, SignatureLayer, TrustedKey};

#[cfg(feature = "registry")]
use registry::transfer::LayerEvent;
#[cfg(feature = "registry")]
use registry::{Access, ClientOptions, Credentials, RegistryError, RegistryRef};

use crate::error::{Malformed, Refused, Untrusted, Usage};
use crate::host::Host;
use crate::stream::{self, Streamed, Streamer};

/// Where images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Archive(PathBuf),
    Stdin,
    Layout(PathBuf),
    Store(StageName, Option<Version>),
    /// `HOST[:PORT]/REPO:TAG` (or `REPO@sha256:...`) in an OCI registry.
    #[cfg(feature = "registry")]
    Registry {
        reference: RegistryRef,
        options: Box<ClientOptions>,
    },
}

/// How to reach a registry SOURCE (flags of `deploy` and `receive`, accepted anywhere).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryOpts {
    /// Registry SOURCE: plain HTTP to a host that is not on loopback. Loopback hosts
    /// (127.0.0.0/8, ::1, localhost) use plain HTTP anyway unless --ca is given.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Registry SOURCE: verify its HTTPS certificate against the CA certificates in FILE
    /// (PEM) instead of the system's roots.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Registry SOURCE: user name; the password comes from stdin (--password-stdin).
    /// Without it, credentials come from $REGISTRY_AUTH_FILE or ~/.docker/config.json.
    #[arg(long, global = true, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password (or token) for --username from stdin (one line).
    #[arg(long, global = true, requires = "username")]
    pub password_stdin: bool,
}

impl Source {
    /// Parses a SOURCE argument, with the registry flags for a registry source.
    pub fn parse_with(s: &str, opts: &RegistryOpts) -> Result<Source> {
        #[cfg_attr(not(feature = "registry"), allow(unused_mut))]
        let mut source = Source::parse(s)?;
        #[cfg(feature = "registry")]
        if let Source::Registry { reference, options } = &mut source {
            if let Some(u) = &opts.username {
                let mut text = String::new();
                io::stdin()
                    .lock()
                    .take(64 * 1024)
                    .read_to_string(&mut text)
                    .context("reading the registry password from stdin")?;
                let password = text.lines().next().unwrap_or("").to_owned();
                if password.is_empty() {
                    return Err(Usage("--password-stdin: stdin holds no password".into()).into());
                }
                options.credentials = Some(Credentials { username: u.clone(), password });
                options.credentials_source = Some("--username/--password-stdin".to_owned());
            }
            options.insecure = opts.insecure;
            options.ca_file = opts.ca.clone();
            **options = (**options).clone().with_auth_file_for(&reference.host).map_err(|e| registry_error(e, s))?;
            return Ok(source);
        }
        if opts.password_stdin && source == Source::Stdin {
            return Err(Usage("--password-stdin and SOURCE `-` both want stdin; use one of them".into()).into());
        }
        Ok(source)
    }

    /// Parses a SOURCE argument. One reading per argument, decided by its text first:
    ///
    /// - `-`: an `.oci.tar` on stdin;
    /// - a path: starts with `/`, `./` or `../`, or ends with `.tar` or `/`: an `.oci.tar`
    ///   file or an OCI layout directory (it must exist);
    /// - `NAME` or `NAME:VERSION` (no `/`): an image in the local store;
    /// - `HOST[:PORT]/REPO:TAG` or `HOST[:PORT]/REPO@sha256:...`: a registry.
    ///
    /// Any other text is taken as a path when it exists. A store or registry reference that
    /// also names an existing file or directory is refused with both readings, so that a
    /// file in the current directory never stands in for an image (write `./NAME` for it).
    pub fn parse(s: &str) -> Result<Source> {
        if s == "-" {
            return Ok(Source::Stdin);
        }
        let p = Path::new(s);
        let looks_like_path = s.starts_with('/')
            || s.starts_with("./")
            || s.starts_with("../")
            || s.ends_with(".tar")
            || s.ends_with('/');
        if looks_like_path || s == "." || s == ".." {
            return path_source(p).ok_or_else(|| Usage(format!("{s}: no such file or directory")).into());
        }
        let store = s.split_once(':').map_or_else(
            || s.parse::<StageName>().ok().map(|n| Source::Store(n, None)),
            |(name, version)| match (name.parse::<StageName>(), version.parse::<Version>()) {
                (Ok(n), Ok(v)) if !name.contains('/') => Some(Source::Store(n, Some(v))),
                _ => None,
            },
        );
        let registry = if store.is_none() { registry_reading(s) } else { None };
        let on_disk = path_source(p);
        let ambiguous = |reading: &str| {
            Err(Usage(format!(
                "{s} is ambiguous: it is {reading}, and also a {} in the current directory; \
                 write ./{s} for the {}, or run the command from another directory for the other reading",
                if p.is_dir() { "directory" } else { "file" },
                if p.is_dir() { "directory" } else { "file" },
            ))
            .into())
        };
        match (store, registry, on_disk) {
            (Some(_), _, Some(_)) => ambiguous("an image reference of the local store (NAME or NAME:VERSION)"),
            (Some(store), _, None) => Ok(store),
            (None, Some(_), Some(_)) => ambiguous("a registry reference (HOST/REPO:TAG)"),
            (None, Some(reference), None) => registry_source(s, reference),
            (None, None, Some(source)) => Ok(source),
            (None, None, None) => Err(Usage(format!(
                "{s}: no such file or directory, not NAME or NAME:VERSION of an image in the local store, \
                 and not a registry reference HOST[:PORT]/REPO:TAG"
            ))
            .into()),
        }
    }
}

/// SOURCE read as a registry reference, if it is one.
#[cfg(feature = "registry")]
fn registry_reading(s: &str) -> Option<RegistryRef> {
    s.parse::<RegistryRef>().ok()
}

/// Without the registry client, anything shaped like `HOST/REPO...` is still recognised,
/// to say what is missing.
#[cfg(not(feature = "registry"))]
fn registry_reading(s: &str) -> Option<()> {
    (!s.starts_with('/') && !s.starts_with('.') && s.contains('/')).then_some(())
}

#[cfg(feature = "registry")]
fn registry_source(s: &str, reference: RegistryRef) -> Result<Source> {
    if reference.tag.is_none() && reference.digest.is_none() {
        return Err(
            Usage(format!("{s}: no such file or directory; as a registry reference it needs a tag: {s}:TAG")).into()
        );
    }
    Ok(Source::Registry { reference, options: Box::default() })
}

#[cfg(not(feature = "registry"))]
fn registry_source(s: &str, _: ()) -> Result<Source> {
    Err(Usage(format!(
        "{s}: no such file or directory; registry sources HOST[:PORT]/REPO:TAG need an op-dbus-stage built with the \
         `registry` feature (this one is not): deploy an .oci.tar export instead"
    ))
    .into())
}

/// The file or directory SOURCE at `p`, if there is one.
fn path_source(p: &Path) -> Option<Source> {
    if p.is_dir() {
        Some(Source::Layout(p.to_owned()))
    } else if p.exists() {
        Some(Source::Archive(p.to_owned()))
    } else {
        None
    }
}

/// The trust store and policy of the host.
#[derive(Debug)]
pub struct Trust {
    pub keys: Vec<TrustedKey>,
    pub policy: Policy,
}

impl Trust {
    /// Reads `stage.toml` and `trusted-keys/*.pub`, each opened inside the root (an
    /// absolute symlink means the root's own path), each a regular file of bounded size.
    pub fn load(host: &Host) -> Result<Trust> {
        let policy_rel = format!("{}/stage.toml", crate::host::ETC);
        let policy = match read_in_root(host, &policy_rel, keys::policy::MAX_POLICY_BYTES)? {
            Some(bytes) => {
                let p = host.root.join(&policy_rel);
                let text =
                    String::from_utf8(bytes).map_err(|_| Malformed(format!("{}: not UTF-8 text", p.display())))?;
                Policy::parse(&text, &p).map_err(|e| Malformed(format!("{e:#}")))?
            }
            None => Policy::default(),
        };
        let mut keys = Vec::new();
        let keys_rel = format!("{}/trusted-keys", crate::host::ETC);
        if let Ok(dir) = host.resolve(&keys_rel) {
            let mut names: Vec<String> = fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
                .filter(|n| n.ends_with(".pub") && !n.starts_with('.'))
                .collect();
            names.sort();
            for name in names {
                let f = dir.join(&name);
                let loading = || format!("loading the trusted key {}", f.display());
                let bytes = read_in_root(host, &format!("{keys_rel}/{name}"), keys::MAX_KEY_FILE)
                    .with_context(loading)?
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file inside the root"))
                    .with_context(loading)?;
                let key = keys::PublicKey::from_file_bytes(&bytes, &f).with_context(loading)?;
                keys.push(TrustedKey { key, source: f });
            }
        }
        Ok(Trust { keys, policy })
    }
}

/// Reads the file `rel` of the root: opened inside the root (`RESOLVE_IN_ROOT`: absolute
/// symlinks and `..` stay in it), only if it is a regular file, at most `limit` bytes.
/// `None` when it does not exist. A FIFO or device there is refused, never opened for
/// reading in a way that could wait.
pub(crate) fn read_in_root(host: &Host, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
    use rustix::fs::OFlags;
    let shown = host.root.join(rel);
    let root = fsx::open_root(&host.root).with_context(|| format!("opening the root {}", host.root.display()))?;
    let check = |fd: &std::os::fd::OwnedFd| -> Result<rustix::fs::Stat> {
        let st = rustix::fs::fstat(fd).with_context(|| format!("reading {}", shown.display()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(Malformed(format!("{} is not a regular file", shown.display())).into());
        }
        if st.st_size as u64 > limit {
            return Err(Malformed(format!("{} is larger than {limit} bytes", shown.display())).into());
        }
        Ok(st)
    };
    // Looked at through an O_PATH descriptor first: opening a FIFO or a device for
    // reading could wait or have effects.
    let path_fd = match fsx::open_in_root(&root, rel, OFlags::PATH) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", shown.display())),
    };
    let first = check(&path_fd)?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = fsx::open_in_root(&root, rel, flags).with_context(|| format!("opening {}", shown.display()))?;
    let st = check(&fd)?;
    if (st.st_dev, st.st_ino) != (first.st_dev, first.st_ino) {
        return Err(Malformed(format!("{} changed while it was read", shown.display())).into());
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(fs::File::from(fd), limit + 1), &mut bytes)
        .with_context(|| format!("reading {}", shown.display()))?;
    if bytes.len() as u64 > limit {
        return Err(Malformed(format!("{} is larger than {limit} bytes", shown.display())).into());
    }
    Ok(Some(bytes))
}

/// An image of a layout, read and checked against its digests.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub reference: Reference,
    pub digest: Digest,
    pub descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub config: StageConfig,
    pub signature_tag: Option<(String, Descriptor)>,
    pub signatures: Vec<SignatureLayer>,
}

/// An image whose signatures satisfy the trust policy.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub reference: String,
    pub digest: Digest,
    pub signers: Vec<keys::KeyId>,
    #[serde(skip)]
    pub candidate: Option<Candidate>,
}

impl Verified {
    pub fn candidate(&self) -> &Candidate {
        self.candidate.as_ref().expect("set when verified")
    }
}

/// Reads a small blob; `Err(digest)` when it has not arrived.
fn read_small(layout: &Layout, digest: &Digest, max: u64) -> Result<std::result::Result<Vec<u8>, Digest>> {
    if !layout.has_blob(digest) {
        return Ok(Err(*digest));
    }
    Ok(Ok(layout.read_blob(digest, max)?))
}

/// Reads the image tagged `tag` from `layout`; `None` while some small blob is missing.
pub fn candidate(layout: &Layout, index: &ImageIndex, tag: &str) -> Result<Option<Candidate>> {
    Ok(candidate_or_missing(layout, index, tag)?.ok())
}

/// Like [`candidate`]; while a small blob is missing, `Err` names it.
fn candidate_or_missing(
    layout: &Layout,
    index: &ImageIndex,
    tag: &str,
) -> Result<std::result::Result<Candidate, Digest>> {
    let reference: Reference = tag.parse().map_err(|e| Malformed(format!("tag {tag:?}: {e}")))?;
    let desc = index.find(tag).ok_or_else(|| Malformed(format!("the index has no tag {tag}")))?.clone();
    let bytes = match read_small(layout, &desc.digest, MAX_MANIFEST_BYTES)? {
        Ok(b) => b,
        Err(d) => return Ok(Err(d)),
    };
    let manifest = ImageManifest::stage_from_bytes(&bytes).with_context(|| format!("image {tag}"))?;
    // The index is not signed: what it says of the manifest must be what the manifest is.
    if desc.media_type != oci::MANIFEST_MEDIA_TYPE
        || desc.size != bytes.len() as u64
        || desc.artifact_type.as_ref().is_some_and(|t| Some(t) != manifest.artifact_type.as_ref())
    {
        return Err(Malformed(format!("the index's descriptor of {tag} does not describe its manifest")).into());
    }
    let config_bytes = match read_small(layout, &manifest.config.digest, MAX_CONFIG_BYTES)? {
        Ok(b) => b,
        Err(d) => return Ok(Err(d)),
    };
    if config_bytes.len() as u64 != manifest.config.size {
        return Err(Malformed(format!("image {tag}: the config's size differs from its descriptor")).into());
    }
    let config = StageConfig::from_bytes(&config_bytes).with_context(|| format!("image {tag}"))?;
    if config.name != reference.name || config.version != reference.version {
        return Err(Malformed(format!(
            "image tagged {tag} carries the stage manifest of {}:{}",
            config.name, config.version
        ))
        .into());
    }
    if config.entry(&RelPath::parse("manifest.json").expect("valid")).is_some() {
        return Err(
            Malformed(format!("image {tag} stages a top-level manifest.json, a name the installer reserves")).into()
        );
    }
    let sig_tag = format!("{}:{}", reference.name, desc.digest.signature_tag());
    let mut signatures = Vec::new();
    let mut signature_tag = None;
    if let Some(sd) = index.find(&sig_tag) {
        let sig_bytes = match read_small(layout, &sd.digest, MAX_MANIFEST_BYTES)? {
            Ok(b) => b,
            Err(d) => return Ok(Err(d)),
        };
        if sd.media_type != oci::MANIFEST_MEDIA_TYPE || sd.size != sig_bytes.len() as u64 {
            return Err(Malformed(format!("the index's descriptor of {sig_tag} does not describe its manifest")).into());
        }
        let sm = ImageManifest::from_bytes(&sig_bytes).with_context(|| format!("signatures of {tag}"))?;
        if sm.subject.as_ref().map(|s| s.digest) != Some(desc.digest) {
            return Err(Untrusted(format!(
                "the signature manifest {sig_tag} does not name {} as its subject",
                desc.digest
            ))
            .into());
        }
        for l in sm.layers.iter().filter(|l| l.media_type == oci::SIMPLE_SIGNING_MEDIA_TYPE) {
            let payload = match read_small(layout, &l.digest, keys::simple_signing::MAX_PAYLOAD as u64)? {
                Ok(b) => b,
                Err(d) => return Ok(Err(d)),
            };
            signatures.push(SignatureLayer {
                payload,
                signature_b64: l.annotation(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap_or_default().to_owned(),
                key_id_hint: l.annotation(oci::ANNOTATION_KEY_ID).map(str::to_owned),
            });
        }
        signature_tag = Some((sig_tag, sd.clone()));
    }
    Ok(Ok(Candidate { reference, digest: desc.digest, descriptor: desc, manifest, config, signature_tag, signatures }))
}

/// Checks a candidate's signatures against the trust store and policy.
pub fn verify(c: Candidate, trust: &Trust, allow_expired: bool) -> Result<Verified> {
    verify_as(c, trust, allow_expired, Identity::Any)
}

/// Like [`verify`]; a signature counts only when its signed docker-reference names
/// `identity` (the registry repository the image came from).
#[tracing::instrument(name = "verify", skip_all, fields(image = %c.reference, digest = %c.digest))]
fn verify_as(c: Candidate, trust: &Trust, allow_expired: bool, identity: Identity<'_>) -> Result<Verified> {
    tracing::debug!(
        signatures = c.signatures.len(),
        trusted_keys = trust.keys.len(),
        ?identity,
        allow_expired,
        "checking the signatures against the trust store and policy"
    );
    let subject = keys::trust::Subject {
        digest: &c.digest,
        name: &c.reference.name,
        version: &c.reference.version,
        signatures: &c.signatures,
    };
    let options = keys::trust::Options { now: SystemTime::now(), allow_expired };
    let verdict = keys::trust::evaluate_as(&trust.keys, &trust.policy, subject, identity, options)
        .with_context(|| format!("verifying the signatures of {} ({})", c.reference, c.digest))?;
    tracing::info!(signers = ?verdict.signers, "verified");
    crate::progress::step("verify", Some(&c.reference.to_string()), "signatures verified");
    Ok(Verified { reference: c.reference.to_string(), digest: c.digest, signers: verdict.signers, candidate: Some(c) })
}

fn image_tags(index: &ImageIndex) -> Vec<String> {
    index
        .manifests
        .iter()
        .filter_map(|d| d.annotation(oci::ANNOTATION_REF_NAME))
        .filter(|t| !t.ends_with(".sig"))
        .map(str::to_owned)
        .collect()
}

/// A temporary layout under the installer's temp area, removed when dropped.
#[derive(Debug)]
pub struct TempLayout {
    pub layout: Layout,
    _dir: tempfile::TempDir,
}

impl TempLayout {
    pub fn new(tmp: &Path) -> Result<TempLayout> {
        fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("recv-")
            .tempdir_in(tmp)
            .with_context(|| format!("creating a directory in {}", tmp.display()))?;
        let layout = Layout::open_or_create(&dir.path().join("layout"))?;
        Ok(TempLayout { layout, _dir: dir })
    }
}

/// What was received: verified images in a temporary layout, ready to be stored.
#[derive(Debug)]
pub struct Received {
    pub images: Vec<Verified>,
    pub temp: Option<TempLayout>,
    pub index: ImageIndex,
    /// Images unpacked while they arrived (see [`crate::stream`]).
    pub streamed: Vec<Streamed>,
}

impl Received {
    /// The tree of image `digest` unpacked while it arrived (or why it was refused), once.
    pub fn take_streamed(&self, digest: &Digest) -> Option<Result<PathBuf>> {
        self.streamed.iter().find(|s| s.image == *digest)?.take()
    }
}

/// Receives `source` into a temporary layout (or reads it from `store`) and verifies
/// every image in it. Blobs a thin export leaves out are taken from `store`. With
/// `unpack`, the image of an archive, a layout directory or a registry is unpacked into
/// its staging area while its layers are received (see [`crate::stream`]).
#[tracing::instrument(name = "receive", skip_all, fields(source = ?source))]
pub fn receive(
    source: &Source,
    tmp: &Path,
    store: &Layout,
    trust: &Trust,
    (allow_expired, stall): (bool, std::time::Duration),
    unpack: Option<&stream::Target>,
) -> Result<Received> {
    tracing::info!("receiving");
    match source {
        Source::Store(name, version) => {
            let index = store.index()?;
            let tag = match version {
                Some(v) => Reference::new(name.clone(), v.clone()).to_string(),
                None => highest_tag(&index, name).ok_or_else(|| {
                    Usage(format!("no image of {name} in the local store {}", store.root().display()))
                })?,
            };
            if index.find(&tag).is_none() {
                return Err(Usage(format!("no image {tag} in the local store {}", store.root().display())).into());
            }
            let c = candidate(store, &index, &tag)?
                .ok_or_else(|| Malformed(format!("image {tag} of the local store misses blobs")))?;
            check_blobs(&[store], &c)?;
            let v = verify(c, trust, allow_expired)?;
            Ok(Received { images: vec![v], temp: None, index, streamed: Vec::new() })
        }
        Source::Archive(_) | Source::Stdin => {
            let temp = TempLayout::new(tmp)?;
            // Read straight from the descriptor (stdin's own buffer would hide data from
            // the stall check), giving up when nothing arrives for `stall`.
            let file = match source {
                Source::Archive(p) => fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
                _ => fs::File::from(rustix::io::fcntl_dupfd_cloexec(io::stdin(), 3).context("duplicating stdin")?),
            };
            let started = std::time::Instant::now();
            let stall_reader = fsx::StallReader::new(file, stall);
            let stalled = stall_reader.progress();
            let reader = io::BufReader::with_capacity(1 << 20, crate::progress::Counting::new(stall_reader));
            let what = match source {
                Source::Archive(p) => p.display().to_string(),
                _ => "stdin".to_owned(),
            };
            let mut gate = Gate::new(trust, allow_expired, unpack, store);
            let index =
                formats::archive::import_with(reader, &temp.layout, |event, index, layout: &Layout| match event {
                    BlobEvent::Header { digest, size } => {
                        gate.header(&digest, size, index, layout)?;
                        // The first image that expects this layer next gets it.
                        Ok(gate.streamers.iter_mut().find_map(|s| s.tee(&digest, size)))
                    }
                    BlobEvent::Stored { digest } => {
                        for s in &mut gate.streamers {
                            s.stored(&digest);
                        }
                        gate.stored(&digest, index, layout).map(|()| None)
                    }
                })
                .map_err(|e| {
                    if stalled.stalled.load(std::sync::atomic::Ordering::Relaxed) {
                        // A stream that stopped (a link gone on the way): what arrived whole
                        // of verified images stays for a sender that resumes. An archive
                        // refused for what it holds, or cut short, leaves nothing.
                        keep_arrived_layers(&temp.layout, &gate.verified, store);
                        anyhow::Error::new(Stalled { what: what.clone(), secs: stall.as_secs() })
                    } else {
                        e
                    }
                })
                .with_context(|| format!("reading the oci-archive {what}"))?;
            crate::progress::bytes(started, stalled.bytes.load(std::sync::atomic::Ordering::Relaxed), true);
            let streamed = std::mem::take(&mut gate.streamers).into_iter().filter_map(Streamer::finish).collect();
            finish(temp, index, gate.verified, store, trust, allow_expired, streamed)
        }
        #[cfg(feature = "registry")]
        Source::Registry { reference, options } => {
            let mut options = options.clone();
            options.limits.stall = stall;
            receive_registry(reference, &options, tmp, store, trust, allow_expired, unpack)
        }
        Source::Layout(dir) => {
            let src = Layout::open(dir).with_context(|| format!("{} is not an OCI layout", dir.display()))?;
            let index = src.index()?;
            check_index_size(&index)?;
            let temp = TempLayout::new(tmp)?;
            // Copy in the order a reader of an archive would see: small blobs first, each
            // read no further than its cap, hashed; payload layers only once the image's
            // signatures are verified, and no further than their signed size.
            let mut copied = BTreeSet::new();
            let mut copy = |d: &Digest, max: u64, tee: formats::archive::Tee| -> Result<()> {
                if !copied.insert(*d) || !src.has_blob(d) {
                    return Ok(());
                }
                let mut w = temp.layout.blob_writer()?;
                let mut from = src.open_blob(d)?.take(max.saturating_add(1));
                let n = match tee {
                    Some(tee) => formats::archive::copy_chunked(
                        &mut from,
                        &mut formats::archive::TeeWriter { first: &mut w, second: Some(tee) },
                    ),
                    None => io::copy(&mut from, &mut w),
                }
                .with_context(|| format!("copying blob {d} from {}", dir.display()))?;
                if n > max {
                    return Err(Malformed(format!(
                        "{}: blob {d} is larger than the {max} bytes allowed for it before its signature is checked",
                        dir.display()
                    ))
                    .into());
                }
                w.finish_expecting(d)?;
                Ok(())
            };
            let mut verified = BTreeMap::new();
            let mut streamed = Vec::new();
            for tag in image_tags(&index) {
                let d = index.find(&tag).ok_or_else(|| Malformed(format!("the index has no tag {tag}")))?.clone();
                copy(&d.digest, MAX_MANIFEST_BYTES, None)?;
                let sig_tag = tag.split_once(':').map(|(n, _)| format!("{n}:{}", d.digest.signature_tag()));
                if let Some(sd) = sig_tag.and_then(|t| index.find(&t).cloned()) {
                    copy(&sd.digest, MAX_MANIFEST_BYTES, None)?;
                    if temp.layout.has_blob(&sd.digest)
                        && let Ok(sm) =
                            ImageManifest::from_bytes(&temp.layout.read_blob(&sd.digest, MAX_MANIFEST_BYTES)?)
                    {
                        for l in &sm.layers {
                            copy(&l.digest, keys::simple_signing::MAX_PAYLOAD as u64, None)?;
                        }
                        copy(&sm.config.digest, keys::simple_signing::MAX_PAYLOAD as u64, None)?;
                    }
                }
                if temp.layout.has_blob(&d.digest)
                    && let Ok(m) =
                        ImageManifest::stage_from_bytes(&temp.layout.read_blob(&d.digest, MAX_MANIFEST_BYTES)?)
                {
                    copy(&m.config.digest, MAX_CONFIG_BYTES, None)?;
                }
                let c = match candidate_or_missing(&temp.layout, &index, &tag)? {
                    Ok(c) => c,
                    Err(missing) => {
                        return Err(Malformed(format!(
                            "{}: image {tag}: blob {missing} (its manifest, config or a signature) is missing",
                            dir.display()
                        ))
                        .into());
                    }
                };
                let v = verify(c, trust, allow_expired)?;
                // Each image's layers are copied together, so one unpacks at a time.
                let mut streamer = unpack.and_then(|t| Streamer::start(t, &v, store));
                for l in &v.candidate().manifest.layers {
                    let tee = streamer.as_mut().and_then(|s| s.tee(&l.digest, l.size));
                    copy(&l.digest, l.size, tee)?;
                    if let Some(s) = streamer.as_mut() {
                        s.stored(&l.digest);
                    }
                }
                streamed.extend(streamer.and_then(Streamer::finish));
                verified.insert(tag.clone(), v);
            }
            finish(temp, index, verified, store, trust, allow_expired, streamed)
        }
    }
}

/// A source that sent nothing for `--stall-timeout`: abandoned, nothing activated, no
/// image stored (the signed layers that arrived whole are kept for a retry) (exit 1).
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} stalled: nothing arrived for {secs} s (--stall-timeout); the source was abandoned and nothing was \
     activated or stored as an image (signed layers that arrived whole are kept for a retry)"
)]
pub struct Stalled {
    pub what: String,
    pub secs: u64,
}

/// A registry error as the installer reports it: corrupt or malformed bytes exit 7, a
/// bad reference 2, anything else (unreachable, unknown tag, refused credentials) 1.
#[cfg(feature = "registry")]
pub(crate) fn registry_error(e: RegistryError, what: &str) -> anyhow::Error {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    if e.is_malformed() {
        Malformed(format!("{what}: {text}; nothing was stored or activated")).into()
    } else if e.is_usage() {
        Usage(text).into()
    } else {
        anyhow::Error::new(e).context(format!("receiving {what} (nothing on this host was changed)"))
    }
}

/// A registry source: the small part into a temp layout, signatures verified, then the
/// payload layers the store lacks.
#[cfg(feature = "registry")]
fn receive_registry(
    reference: &RegistryRef,
    options: &ClientOptions,
    tmp: &Path,
    store: &Layout,
    trust: &Trust,
    allow_expired: bool,
    unpack: Option<&stream::Target>,
) -> Result<Received> {
    let what = reference.to_string();
    let client =
        registry::Client::new(&reference.host, options.clone(), Access::Pull).map_err(|e| registry_error(e, &what))?;
    let temp = TempLayout::new(tmp)?;
    let head =
        registry::transfer::fetch_head(&client, reference, &temp.layout).map_err(|e| registry_error(e, &what))?;
    let name = &head.config.name;
    let tag = Reference::new(name.clone(), head.config.version.clone()).to_string();
    let mut index = ImageIndex::default();
    index.set(&tag, head.descriptor.clone());
    if let Some(sd) = &head.signatures {
        index.set(&format!("{name}:{}", head.digest().signature_tag()), sd.clone());
    }
    let c = candidate(&temp.layout, &index, &tag)?
        .ok_or_else(|| Malformed(format!("{what}: its manifest, config or signatures did not arrive")))?;
    // Before any payload byte: the signatures must satisfy the trust policy, and name the
    // repository asked for (cosign's docker-reference), so that a registry cannot hand over
    // another signed stage under this name.
    let repository = format!("{}/{}", reference.host, reference.repository);
    let v = verify_as(c, trust, allow_expired, Identity::Repository(&repository))
        .with_context(|| format!("{what} (as {tag})"))?;
    check_tag(reference, &head.config.name, &head.config.version)?;
    // Unpacked while its layers arrive, as from an archive (see `stream`).
    let mut streamer = unpack.and_then(|t| Streamer::start(t, &v, store));
    let stats = registry::transfer::fetch_layers_teed(
        &client,
        reference,
        &head.manifest.layers,
        &temp.layout,
        |d| store.has_blob(d),
        |event| match (event, streamer.as_mut()) {
            (LayerEvent::Fetching(l), Some(s)) => s.tee(&l.digest, l.size),
            (LayerEvent::Stored(d), Some(s)) => {
                s.stored(d);
                None
            }
            (_, None) => None,
        },
    )
    .map_err(|e| registry_error(e, &what))?;
    let streamed = streamer.and_then(Streamer::finish).into_iter().collect();
    tracing::info!(
        "{what}: fetched {} blob(s), {} bytes; {} layer(s) already in the store; {} resumed",
        stats.blobs_fetched + head.stats.blobs_fetched,
        stats.bytes_fetched + head.stats.bytes_fetched,
        stats.blobs_present,
        stats.resumed
    );
    finish(temp, index, BTreeMap::from([(tag, v)]), store, trust, allow_expired, streamed)
}

#[cfg(feature = "registry")]
/// A tag that is a version must be the signed version (the signatures name the config's
/// version, which [`verify_as`] checked). Any other tag (`stable`, `latest`) names no version:
/// the image is taken for what its signed manifest says, and that is reported.
fn check_tag(reference: &RegistryRef, name: &StageName, version: &Version) -> Result<()> {
    let Some(tag) = &reference.tag else { return Ok(()) };
    match tag.parse::<Version>() {
        Ok(v) if v == *version => Ok(()),
        Ok(_) => Err(Untrusted(format!(
            "{reference} is signed as {name} {version}, not {tag}: the registry serves another version under              this tag (relabelled); nothing was stored or activated. Deploy {}/{}:{version} if that is the              version you want",
            reference.host, reference.repository
        ))
        .into()),
        Err(_) => {
            tracing::info!("{reference} is {name}:{version}");
            Ok(())
        }
    }
}

/// Most entries (image tags and signature tags) in the index of an archive or a layout
/// directory: an export of 1,024 images with their signatures. The index is unsigned; each
/// tag costs a lookup per arriving blob, so it is bounded before any blob is read.
pub const MAX_INDEX_ENTRIES: usize = 2048;
/// Most bytes of an archive stored at any time that no verified image names yet (a
/// signature, manifest or config waiting for the rest of its image): the largest config
/// ([`MAX_CONFIG_BYTES`]) and 32 MiB of manifests and signatures. An archive as
/// `op-dbus-image export` writes it verifies each image as soon as its config is in, so it
/// never holds more than one config unverified.
pub const MAX_UNAUTHENTICATED_BYTES: u64 = MAX_CONFIG_BYTES + (32 << 20);
/// Most blobs of an archive stored at any time that no verified image names yet.
pub const MAX_UNAUTHENTICATED_BLOBS: usize = 4096;

fn check_index_size(index: &ImageIndex) -> Result<()> {
    if index.manifests.len() > MAX_INDEX_ENTRIES {
        return Err(Malformed(format!(
            "the index names {} tags, more than the {MAX_INDEX_ENTRIES} an archive or layout may hold; \
             export fewer images per archive",
            index.manifests.len()
        ))
        .into());
    }
    Ok(())
}

/// Decides, for an archive read as a stream, which blobs may be read and when each image's
/// signatures are checked: unauthenticated bytes are never read to their end, bounded in
/// total, and every image is verified as soon as its small blobs are in (before payloads),
/// each retried only when a blob it waits for arrives (no work in tags x blobs).
struct Gate<'a> {
    trust: &'a Trust,
    allow_expired: bool,
    /// Where to unpack the image while it arrives, and the store its other layers are in.
    unpack: Option<&'a stream::Target>,
    store: &'a Layout,
    /// The images being unpacked while their layers arrive (at most
    /// [`stream::MAX_UNPACKING`] at a time).
    streamers: Vec<Streamer>,
    verified: BTreeMap<String, Verified>,
    /// Image tags not verified yet, by the digest of the blob each waits for; `None` until
    /// the index has arrived.
    waiting: Option<BTreeMap<Digest, Vec<String>>>,
    tags: usize,
    /// Blobs that verified images name (manifests, configs, layers, signatures).
    authenticated: BTreeSet<Digest>,
    /// Stored blobs no verified image names yet, with their sizes.
    unauthenticated: BTreeMap<Digest, u64>,
    unauthenticated_bytes: u64,
    /// The size of the blob being read (from its header).
    reading: Option<(Digest, u64)>,
}

impl<'a> Gate<'a> {
    fn new(trust: &'a Trust, allow_expired: bool, unpack: Option<&'a stream::Target>, store: &'a Layout) -> Self {
        Gate {
            trust,
            allow_expired,
            unpack,
            store,
            streamers: Vec::new(),
            verified: BTreeMap::new(),
            waiting: None,
            tags: 0,
            authenticated: BTreeSet::new(),
            unauthenticated: BTreeMap::new(),
            unauthenticated_bytes: 0,
            reading: None,
        }
    }

    /// A blob's header arrived: refuses it unread when it cannot be part of a verified image
    /// or would exceed the unauthenticated bounds.
    fn header(&mut self, digest: &Digest, size: u64, index: Option<&ImageIndex>, layout: &Layout) -> Result<()> {
        self.init(index, layout)?;
        self.reading = Some((*digest, size));
        let all_verified = self.waiting.is_some() && self.tags > 0 && self.verified.len() == self.tags;
        if self.authenticated.contains(digest) {
            let named = self.verified.values().any(|v| {
                let c = v.candidate();
                c.manifest.layers.iter().any(|l| l.digest == *digest && l.size == size)
                    || (c.manifest.config.digest == *digest && c.manifest.config.size == size)
                    || c.digest == *digest
            });
            if named || layout.has_blob(digest) {
                return Ok(());
            }
        }
        if all_verified && !layout.has_blob(digest) {
            return Err(Malformed(format!(
                "blob {digest} ({size} bytes) is not named by any image in the archive (or its size differs); refused unread"
            ))
            .into());
        }
        if size > MAX_CONFIG_BYTES {
            return Err(Malformed(format!(
                "blob {digest} ({size} bytes) comes before the signatures of the images that would name it; \
                 an archive read as a stream must hold signatures, manifests and configs first (as \
                 `op-dbus-image export` writes them): unpack it and deploy the layout directory instead"
            ))
            .into());
        }
        if self.unauthenticated_bytes.saturating_add(size) > MAX_UNAUTHENTICATED_BYTES
            || self.unauthenticated.len() >= MAX_UNAUTHENTICATED_BLOBS
        {
            return Err(Malformed(format!(
                "blob {digest} ({size} bytes) would make more than {MAX_UNAUTHENTICATED_BYTES} bytes or \
                 {MAX_UNAUTHENTICATED_BLOBS} blobs unauthenticated (stored, and named by no image whose \
                 signatures were checked yet): an image of the index whose signatures never come, or \
                 blobs no image needs; refused unread"
            ))
            .into());
        }
        Ok(())
    }

    /// A blob was stored (its digest checked): verifies the images that waited for it.
    fn stored(&mut self, digest: &Digest, index: Option<&ImageIndex>, layout: &Layout) -> Result<()> {
        if let Some((d, size)) = self.reading.take()
            && d == *digest
            && !self.authenticated.contains(digest)
            && self.unauthenticated.insert(d, size).is_none()
        {
            self.unauthenticated_bytes += size;
        }
        if self.init(index, layout)? {
            return Ok(());
        }
        let (Some(index), Some(waiting)) = (index, self.waiting.as_mut()) else { return Ok(()) };
        let retry = waiting.remove(digest).unwrap_or_default();
        for tag in retry {
            self.attempt(index, &tag, layout)?;
        }
        Ok(())
    }

    /// Once the index is in: bounds it and tries every image. Returns whether it did now.
    fn init(&mut self, index: Option<&ImageIndex>, layout: &Layout) -> Result<bool> {
        let Some(index) = index else { return Ok(false) };
        if self.waiting.is_some() {
            return Ok(false);
        }
        check_index_size(index)?;
        self.waiting = Some(BTreeMap::new());
        let tags = image_tags(index);
        self.tags = tags.len();
        for tag in tags {
            self.attempt(index, &tag, layout)?;
        }
        Ok(true)
    }

    fn attempt(&mut self, index: &ImageIndex, tag: &str, layout: &Layout) -> Result<()> {
        if self.verified.contains_key(tag) {
            return Ok(());
        }
        match candidate_or_missing(layout, index, tag)? {
            Err(missing) => {
                self.waiting.get_or_insert_default().entry(missing).or_default().push(tag.to_owned());
            }
            Ok(c) => {
                let v = verify(c, self.trust, self.allow_expired)?;
                let c = v.candidate();
                let mut named = vec![c.digest, c.manifest.config.digest];
                named.extend(c.manifest.layers.iter().map(|l| l.digest));
                if let Some((_, sd)) = &c.signature_tag {
                    named.push(sd.digest);
                    if let Ok(bytes) = layout.read_blob(&sd.digest, MAX_MANIFEST_BYTES)
                        && let Ok(sm) = ImageManifest::from_bytes(&bytes)
                    {
                        named.push(sm.config.digest);
                        named.extend(sm.layers.iter().map(|l| l.digest));
                    }
                }
                for d in named {
                    self.authenticated.insert(d);
                    if let Some(size) = self.unauthenticated.remove(&d) {
                        self.unauthenticated_bytes -= size;
                    }
                }
                // Its layers are unpacked as they arrive (a layer that comes out of order, or
                // that another image took, makes it unpacked once received instead).
                let unpacking = self.streamers.iter().filter(|s| s.is_unpacking()).count();
                if unpacking < stream::MAX_UNPACKING
                    && let Some(t) = self.unpack
                {
                    self.streamers.extend(Streamer::start(t, &v, self.store));
                }
                self.verified.insert(tag.to_owned(), v);
            }
        }
        Ok(())
    }
}

fn finish(
    temp: TempLayout,
    index: ImageIndex,
    mut verified: BTreeMap<String, Verified>,
    store: &Layout,
    trust: &Trust,
    allow_expired: bool,
    streamed: Vec<Streamed>,
) -> Result<Received> {
    let tags = image_tags(&index);
    if tags.is_empty() {
        return Err(Malformed("the archive holds no image tagged NAME:VERSION".into()).into());
    }
    let mut images = Vec::new();
    for tag in tags {
        let v = match verified.remove(&tag) {
            Some(v) => v,
            None => {
                let c = candidate(&temp.layout, &index, &tag)?.ok_or_else(|| {
                    Malformed(format!(
                        "image {tag}: its manifest, config or signatures are missing from the archive (cut short?)"
                    ))
                })?;
                verify(c, trust, allow_expired)?
            }
        };
        check_blobs(&[&temp.layout, store], v.candidate())?;
        link_from_store(&temp.layout, store, v.candidate())?;
        images.push(v);
    }
    Ok(Received { images, temp: Some(temp), index, streamed })
}

/// After an archive that stalled (its sender's link went away): the payload layers of
/// images whose signatures were verified, that arrived whole (a blob is renamed into the
/// layout only once its digest checked), are linked into the store, so that a sender that
/// asks `have` need not send them again. Nothing unverified is kept; the store's clean-up
/// takes them like any unreferenced blob after the next change.
fn keep_arrived_layers(temp: &Layout, verified: &BTreeMap<String, Verified>, store: &Layout) {
    for v in verified.values() {
        for l in &v.candidate().manifest.layers {
            if !temp.has_blob(&l.digest) || store.has_blob(&l.digest) {
                continue;
            }
            let (from, to) = (temp.blob_path(&l.digest), store.blob_path(&l.digest));
            // A link is atomic: the store never holds part of a blob under its digest.
            if let Err(e) = to.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| fs::hard_link(&from, &to)) {
                tracing::debug!("keeping {} for a resumed transfer: {e}", l.digest);
            }
        }
    }
}

/// Every payload layer must be in one of `layouts`; a thin export needs its parent's.
fn check_blobs(layouts: &[&Layout], c: &Candidate) -> Result<()> {
    for l in &c.manifest.layers {
        if layouts.iter().any(|s| s.has_blob(&l.digest)) {
            continue;
        }
        let parent = c.manifest.layers.iter().find_map(|x| x.annotation(oci::ANNOTATION_PARENT)).map(str::to_owned);
        return Err(match parent {
            Some(p) => Refused::Dependency(format!(
                "{} is a delta on {p}, and layer {} of {p} is not on this host: deploy or receive {p} first, \
                 or export without --since",
                c.reference, l.digest
            ))
            .into(),
            None => {
                Malformed(format!("image {}: layer {} is missing (was the archive cut short?)", c.reference, l.digest))
                    .into()
            }
        });
    }
    Ok(())
}

/// Links the layers a thin export (or a registry pull) left out because the store has
/// them into the received layout, so that every layer of an image is in one layout.
fn link_from_store(temp: &Layout, store: &Layout, c: &Candidate) -> Result<()> {
    for l in &c.manifest.layers {
        if temp.has_blob(&l.digest) || !store.has_blob(&l.digest) {
            continue;
        }
        let (from, to) = (store.blob_path(&l.digest), temp.blob_path(&l.digest));
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The highest version of `name` tagged in `index`.
pub fn highest_tag(index: &ImageIndex, name: &StageName) -> Option<String> {
    image_tags(index)
        .into_iter()
        .filter_map(|t| t.parse::<Reference>().ok())
        .filter(|r| &r.name == name)
        .max_by(|a, b| a.version.cmp(&b.version))
        .map(|r| r.to_string())
}

/// Moves the blobs of `images` from the received temp layout into `store` and tags the
/// images and their signatures.
#[tracing::instrument(skip_all, fields(store = %store.root().display()))]
pub fn store_received(received: &Received, images: &[&Verified], store: &Layout) -> Result<()> {
    tracing::info!(images = images.len(), "keeping the received images in the store");
    if let Some(temp) = &received.temp {
        let mut blobs = BTreeSet::new();
        for v in images {
            let c = v.candidate();
            blobs.insert(c.digest);
            blobs.insert(c.manifest.config.digest);
            blobs.extend(c.manifest.layers.iter().map(|l| l.digest));
            if let Some((_, sd)) = &c.signature_tag {
                blobs.insert(sd.digest);
                if let Ok(sm) = ImageManifest::from_bytes(&temp.layout.read_blob(&sd.digest, MAX_MANIFEST_BYTES)?) {
                    blobs.insert(sm.config.digest);
                    blobs.extend(sm.layers.iter().map(|l| l.digest));
                }
            }
        }
        for d in blobs {
            if !store.has_blob(&d) && temp.layout.has_blob(&d) {
                fs::rename(temp.layout.blob_path(&d), store.blob_path(&d))
                    .with_context(|| format!("storing blob {d}"))?;
            }
        }
        fsx::sync_dir(&store.root().join("blobs/sha256"))?;
    }
    store.update_index(|index| {
        for v in images {
            let c = v.candidate();
            index.set(&v.reference, strip_ref(&c.descriptor));
            if let Some((t, d)) = &c.signature_tag {
                index.set(t, strip_ref(d));
            }
        }
    })?;
    Ok(())
}

fn strip_ref(d: &Descriptor) -> Descriptor {
    let mut d = d.clone();
    d.annotations.remove(oci::ANNOTATION_REF_NAME);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "registry")]
    fn registry_sources_parse() {
        let s = Source::parse("127.0.0.1:5000/op-dbus/app:1.0.0").unwrap();
        let Source::Registry { reference, options } = s else { panic!("{s:?}") };
        assert_eq!((reference.host.as_str(), reference.repository.as_str()), ("127.0.0.1:5000", "op-dbus/app"));
        assert_eq!(reference.tag.as_deref(), Some("1.0.0"));
        assert_eq!(*options, ClientOptions::default());
        let err = Source::parse("registry.example.com/app").unwrap_err();
        assert!(err.is::<Usage>() && err.to_string().contains("needs a tag"), "{err}");
        assert!(Source::parse("./missing/file.oci.tar").unwrap_err().is::<Usage>());
        assert_eq!(
            Source::parse("app:1.0.0").unwrap(),
            Source::Store("app".parse().unwrap(), Some("1.0.0".parse().unwrap()))
        );
    }

    /// Signer ids are typed: state.json and `--json` keep the 16-hex-digit text, and a
    /// state file whose signer is not a key id is refused when read.
    #[test]
    fn signer_ids_are_key_ids_with_the_same_json() {
        let id: keys::KeyId = "3f9a0c41d2e87b65".parse().unwrap();
        let generation = crate::state::Generation {
            generation: 1,
            digest: Digest::of(b"x"),
            version: "1.0.0".parse().unwrap(),
            signers: vec![id],
            deployed_at: String::new(),
            activation: crate::state::Activation::default(),
        };
        let json = serde_json::to_value(&generation).unwrap();
        assert_eq!(json["signers"], serde_json::json!(["3f9a0c41d2e87b65"]));
        assert_eq!(serde_json::from_value::<crate::state::Generation>(json.clone()).unwrap(), generation);
        let mut bad = json;
        bad["signers"] = serde_json::json!(["not a key id"]);
        assert!(serde_json::from_value::<crate::state::Generation>(bad).is_err());
        let v =
            Verified { reference: "app:1.0.0".into(), digest: Digest::of(b"x"), signers: vec![id], candidate: None };
        assert_eq!(serde_json::to_value(&v).unwrap()["signers"], serde_json::json!(["3f9a0c41d2e87b65"]));
    }

    #[test]
    #[cfg(not(feature = "registry"))]
    fn registry_sources_name_the_feature() {
        let err = Source::parse("127.0.0.1:5000/op-dbus/app:1.0.0").unwrap_err();
        assert!(err.is::<Usage>() && err.to_string().contains("`registry` feature"), "{err}");
        assert!(Source::parse("./missing/file.oci.tar").unwrap_err().is::<Usage>());
    }
}
