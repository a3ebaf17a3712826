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
use keys::trust::{SignatureLayer, TrustedKey};

#[cfg(feature = "registry")]
use registry::{Access, ClientOptions, Credentials, RegistryError, RegistryRef};

use crate::error::{Malformed, Refused, Untrusted, Usage};
use crate::host::Host;

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

    /// Parses a SOURCE argument (docs/commands.md).
    pub fn parse(s: &str) -> Result<Source> {
        if s == "-" {
            return Ok(Source::Stdin);
        }
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(Source::Layout(p.to_owned()));
        }
        if p.is_file() {
            return Ok(Source::Archive(p.to_owned()));
        }
        if let Some((name, version)) = s.split_once(':')
            && !name.contains('/')
            && let (Ok(n), Ok(v)) = (name.parse::<StageName>(), version.parse::<Version>())
        {
            return Ok(Source::Store(n, Some(v)));
        }
        if let Ok(n) = s.parse::<StageName>() {
            return Ok(Source::Store(n, None));
        }
        #[cfg(not(feature = "registry"))]
        if !s.starts_with('/') && !s.starts_with('.') && s.contains('/') {
            return Err(Usage(format!(
                "{s}: no such file or directory; registry sources HOST[:PORT]/REPO:TAG need an op-dbus-stage \
                 built with the `registry` feature (this one is not): deploy an .oci.tar export instead"
            ))
            .into());
        }
        #[cfg(feature = "registry")]
        if !s.starts_with('/')
            && !s.starts_with('.')
            && let Ok(reference) = s.parse::<RegistryRef>()
        {
            if reference.tag.is_none() && reference.digest.is_none() {
                return Err(Usage(format!(
                    "{s}: no such file or directory; as a registry reference it needs a tag: {s}:TAG"
                ))
                .into());
            }
            return Ok(Source::Registry { reference, options: Box::default() });
        }
        Err(Usage(format!(
            "{s}: no such file or directory, not NAME or NAME:VERSION of an image in the local store, \
             and not a registry reference HOST[:PORT]/REPO:TAG"
        ))
        .into())
    }
}

/// The trust store and policy of the host.
#[derive(Debug)]
pub struct Trust {
    pub keys: Vec<TrustedKey>,
    pub policy: Policy,
}

impl Trust {
    pub fn load(host: &Host) -> Result<Trust> {
        let etc = host.root.join(crate::host::ETC);
        let policy = match host.resolve(&format!("{}/stage.toml", crate::host::ETC)) {
            Ok(p) => {
                let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                Policy::parse(&text, &p).map_err(|e| Malformed(format!("{e:#}")))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Policy::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}/stage.toml", etc.display())),
        };
        let mut keys = Vec::new();
        if let Ok(dir) = host.resolve(&format!("{}/trusted-keys", crate::host::ETC)) {
            let mut files: Vec<PathBuf> = fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            files.sort();
            for f in files {
                let key =
                    keys::PublicKey::read(&f).with_context(|| format!("loading the trusted key {}", f.display()))?;
                keys.push(TrustedKey { key, source: f });
            }
        }
        Ok(Trust { keys, policy })
    }
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
    pub signers: Vec<String>,
    #[serde(skip)]
    pub candidate: Option<Candidate>,
}

impl Verified {
    pub fn candidate(&self) -> &Candidate {
        self.candidate.as_ref().expect("set when verified")
    }
}

fn read_small(layout: &Layout, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>> {
    if !layout.has_blob(digest) {
        return Ok(None);
    }
    Ok(Some(layout.read_blob(digest, max)?))
}

/// Reads the image tagged `tag` from `layout`; `None` while some small blob is missing.
pub fn candidate(layout: &Layout, index: &ImageIndex, tag: &str) -> Result<Option<Candidate>> {
    let reference: Reference = tag.parse().map_err(|e| Malformed(format!("tag {tag:?}: {e}")))?;
    let desc = index.find(tag).expect("tag from this index").clone();
    let Some(bytes) = read_small(layout, &desc.digest, MAX_MANIFEST_BYTES)? else { return Ok(None) };
    let manifest = ImageManifest::stage_from_bytes(&bytes).with_context(|| format!("image {tag}"))?;
    // The index is not signed: what it says of the manifest must be what the manifest is.
    if desc.media_type != oci::MANIFEST_MEDIA_TYPE
        || desc.size != bytes.len() as u64
        || desc.artifact_type.as_ref().is_some_and(|t| Some(t) != manifest.artifact_type.as_ref())
    {
        return Err(Malformed(format!("the index's descriptor of {tag} does not describe its manifest")).into());
    }
    let Some(config_bytes) = read_small(layout, &manifest.config.digest, MAX_CONFIG_BYTES)? else { return Ok(None) };
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
        let Some(sig_bytes) = read_small(layout, &sd.digest, MAX_MANIFEST_BYTES)? else { return Ok(None) };
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
            let Some(payload) = read_small(layout, &l.digest, 64 * 1024)? else { return Ok(None) };
            signatures.push(SignatureLayer {
                payload,
                signature_b64: l.annotation(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap_or_default().to_owned(),
                key_id_hint: l.annotation(oci::ANNOTATION_KEY_ID).map(str::to_owned),
            });
        }
        signature_tag = Some((sig_tag, sd.clone()));
    }
    Ok(Some(Candidate {
        reference,
        digest: desc.digest,
        descriptor: desc,
        manifest,
        config,
        signature_tag,
        signatures,
    }))
}

/// Checks a candidate's signatures against the trust store and policy.
pub fn verify(c: Candidate, trust: &Trust, allow_expired: bool) -> Result<Verified> {
    let verdict = keys::trust::evaluate(
        &trust.keys,
        &trust.policy,
        &c.digest,
        &c.reference.name,
        &c.reference.version,
        &c.signatures,
        SystemTime::now(),
        allow_expired,
    )
    .with_context(|| format!("verifying the signatures of {} ({})", c.reference, c.digest))?;
    Ok(Verified {
        reference: c.reference.to_string(),
        digest: c.digest,
        signers: verdict.signers.iter().map(|k| k.to_string()).collect(),
        candidate: Some(c),
    })
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
}

/// Receives `source` into a temporary layout (or reads it from `store`) and verifies
/// every image in it. Blobs a thin export leaves out are taken from `store`.
pub fn receive(source: &Source, tmp: &Path, store: &Layout, trust: &Trust, allow_expired: bool) -> Result<Received> {
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
            Ok(Received { images: vec![v], temp: None, index })
        }
        Source::Archive(_) | Source::Stdin => {
            let temp = TempLayout::new(tmp)?;
            let mut verified: BTreeMap<String, Verified> = BTreeMap::new();
            let reader: Box<dyn Read> = match source {
                Source::Archive(p) => Box::new(io::BufReader::with_capacity(
                    1 << 20,
                    fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
                )),
                _ => Box::new(io::BufReader::with_capacity(1 << 20, io::stdin().lock())),
            };
            let what = match source {
                Source::Archive(p) => p.display().to_string(),
                _ => "stdin".to_owned(),
            };
            let index = formats::archive::import_with(reader, &temp.layout, |event, index, layout: &Layout| {
                match event {
                    BlobEvent::Header { digest, size } => gate_blob(&digest, size, index, &verified, layout),
                    BlobEvent::Stored { .. } => {
                        let Some(index) = index else { return Ok(()) };
                        // Verify each image as soon as its small blobs are in: before its payload.
                        for tag in image_tags(index) {
                            if verified.contains_key(&tag) {
                                continue;
                            }
                            if let Some(c) = candidate(layout, index, &tag)? {
                                verified.insert(tag, verify(c, trust, allow_expired)?);
                            }
                        }
                        Ok::<(), anyhow::Error>(())
                    }
                }
            })
            .with_context(|| format!("reading the oci-archive {what}"))?;
            finish(temp, index, verified, store, trust, allow_expired)
        }
        #[cfg(feature = "registry")]
        Source::Registry { reference, options } => {
            receive_registry(reference, options, tmp, store, trust, allow_expired)
        }
        Source::Layout(dir) => {
            let src = Layout::open(dir).with_context(|| format!("{} is not an OCI layout", dir.display()))?;
            let index = src.index()?;
            let temp = TempLayout::new(tmp)?;
            // Copy in the order a reader of an archive would see: small blobs first, hashing each.
            let mut copied = std::collections::BTreeSet::new();
            let mut copy = |d: &Digest| -> Result<()> {
                if !copied.insert(*d) || !src.has_blob(d) {
                    return Ok(());
                }
                let mut w = temp.layout.blob_writer()?;
                io::copy(&mut src.open_blob(d)?, &mut w)?;
                w.finish_expecting(d)?;
                Ok(())
            };
            let mut verified = BTreeMap::new();
            for tag in image_tags(&index) {
                let d = index.find(&tag).expect("tag of this index");
                copy(&d.digest)?;
                let sig_tag = tag.split_once(':').map(|(n, _)| format!("{n}:{}", d.digest.signature_tag()));
                if let Some(sd) = sig_tag.and_then(|t| index.find(&t).cloned()) {
                    copy(&sd.digest)?;
                    if let Ok(sm) = ImageManifest::from_bytes(&temp.layout.read_blob(&sd.digest, MAX_MANIFEST_BYTES)?) {
                        for l in &sm.layers {
                            copy(&l.digest)?;
                        }
                        copy(&sm.config.digest)?;
                    }
                }
                let m = ImageManifest::stage_from_bytes(&temp.layout.read_blob(&d.digest, MAX_MANIFEST_BYTES)?)?;
                copy(&m.config.digest)?;
                if let Some(c) = candidate(&temp.layout, &index, &tag)? {
                    verified.insert(tag.clone(), verify(c, trust, allow_expired)?);
                }
                for l in &m.layers {
                    copy(&l.digest)?;
                }
            }
            finish(temp, index, verified, store, trust, allow_expired)
        }
    }
}

/// A registry error as the installer reports it: corrupt or malformed bytes exit 7, a
/// bad reference 2, anything else (unreachable, unknown tag, refused credentials) 1.
#[cfg(feature = "registry")]
fn registry_error(e: RegistryError, what: &str) -> anyhow::Error {
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
    // Before any payload byte: the signatures must satisfy the trust policy.
    let v = verify(c, trust, allow_expired).with_context(|| format!("{what} (as {tag})"))?;
    let stats = registry::transfer::fetch_layers(&client, reference, &head.manifest.layers, &temp.layout, |d| {
        store.has_blob(d)
    })
    .map_err(|e| registry_error(e, &what))?;
    tracing::info!(
        "{what}: fetched {} blob(s), {} bytes; {} layer(s) already in the store; {} resumed",
        stats.blobs_fetched + head.stats.blobs_fetched,
        stats.bytes_fetched + head.stats.bytes_fetched,
        stats.blobs_present,
        stats.resumed
    );
    finish(temp, index, BTreeMap::from([(tag, v)]), store, trust, allow_expired)
}

/// Decides from its header whether a blob of an archive read as a stream may be read at
/// all: unauthenticated bytes are never read to their end. Before every image's
/// signatures are checked only small blobs (manifests, configs, signatures: at most
/// `MAX_CONFIG_BYTES`) may come; after, only blobs the verified images name.
fn gate_blob(
    digest: &Digest,
    size: u64,
    index: Option<&ImageIndex>,
    verified: &BTreeMap<String, Verified>,
    layout: &Layout,
) -> Result<()> {
    let all_verified = index.is_some_and(|i| {
        let tags = image_tags(i);
        !tags.is_empty() && tags.iter().all(|t| verified.contains_key(t))
    });
    if !all_verified {
        if size > MAX_CONFIG_BYTES {
            return Err(Malformed(format!(
                "blob {digest} ({size} bytes) comes before the signatures of the images that would name it; \
                 an archive read as a stream must hold signatures, manifests and configs first (as \
                 `op-dbus-image export` writes them): unpack it and deploy the layout directory instead"
            ))
            .into());
        }
        return Ok(());
    }
    let named = verified.values().any(|v| {
        let c = v.candidate();
        c.manifest.layers.iter().any(|l| l.digest == *digest && l.size == size)
            || c.manifest.config.digest == *digest
            || c.digest == *digest
    });
    // Signature blobs were all read before the images could be verified.
    if !named && !layout.has_blob(digest) {
        return Err(Malformed(format!(
            "blob {digest} ({size} bytes) is not named by any image in the archive (or its size differs); refused unread"
        ))
        .into());
    }
    Ok(())
}

fn finish(
    temp: TempLayout,
    index: ImageIndex,
    mut verified: BTreeMap<String, Verified>,
    store: &Layout,
    trust: &Trust,
    allow_expired: bool,
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
    Ok(Received { images, temp: Some(temp), index })
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
pub fn store_received(received: &Received, images: &[&Verified], store: &Layout) -> Result<()> {
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
        crate::txn::sync_dir(&store.root().join("blobs/sha256"))?;
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

    #[test]
    #[cfg(not(feature = "registry"))]
    fn registry_sources_name_the_feature() {
        let err = Source::parse("127.0.0.1:5000/op-dbus/app:1.0.0").unwrap_err();
        assert!(err.is::<Usage>() && err.to_string().contains("`registry` feature"), "{err}");
        assert!(Source::parse("./missing/file.oci.tar").unwrap_err().is::<Usage>());
    }
}
