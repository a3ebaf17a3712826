//! Whole images: push an image and its cosign signature manifest together; pull the small
//! part (manifest, embedded stage manifest, signatures) first, the payload layers after.
//!
//! ```text
//! registry REPO
//!   TAG                  ─► image manifest ─► config (stage manifest), payload layers
//!   sha256-<hex>.sig     ─► signature manifest (subject = the image) ─► {} , simple-signing layers
//! ```

use std::collections::BTreeSet;

use serde::Serialize;

use formats::Digest;
use formats::layout::Layout;
use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};
use formats::oci::{Descriptor, ImageManifest, MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES};

use crate::client::Client;
use crate::error::RegistryError;
use crate::reference::RegistryRef;

/// Largest accepted signature payload or signature-manifest config.
pub const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

/// What a push sent and what the registry already had.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PushStats {
    pub blobs_uploaded: usize,
    pub bytes_uploaded: u64,
    pub blobs_present: usize,
    pub bytes_present: u64,
}

/// What a pull fetched and what was already at hand.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FetchStats {
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    pub blobs_present: usize,
    pub bytes_present: u64,
    pub resumed: u32,
    pub restarted: u32,
}

impl FetchStats {
    pub fn add(&mut self, o: &FetchStats) {
        self.blobs_fetched += o.blobs_fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.blobs_present += o.blobs_present;
        self.bytes_present += o.bytes_present;
        self.resumed += o.resumed;
        self.restarted += o.restarted;
    }
}

fn layout_err(what: String) -> impl FnOnce(formats::layout::LayoutError) -> RegistryError {
    move |source| RegistryError::Layout { what, source }
}

/// Pushes the image `image` of `layout` (and its signature manifest `signatures`, if
/// any) to `dest` (`HOST/REPO:TAG`). Blobs the registry has are not sent again; the
/// signatures are tagged `sha256-<hex>.sig` beside the image.
pub fn push_image(
    client: &Client,
    layout: &Layout,
    dest: &RegistryRef,
    image: &Descriptor,
    signatures: Option<&Descriptor>,
) -> Result<PushStats, RegistryError> {
    let tag = dest.tag.as_deref().ok_or_else(|| {
        RegistryError::Reference(crate::reference::InvalidReference {
            input: dest.to_string(),
            reason: "a tag is needed to push".to_owned(),
        })
    })?;
    let repo = &dest.repository;
    let read =
        |d: &Digest| layout.read_blob(d, MAX_MANIFEST_BYTES).map_err(layout_err(format!("reading manifest {d}")));
    let image_bytes = read(&image.digest)?;
    let manifest = ImageManifest::from_bytes(&image_bytes).map_err(|source| RegistryError::Envelope {
        host: "the local store".to_owned(),
        what: format!("image {}", image.digest),
        source,
    })?;
    let mut blobs = vec![manifest.config.clone()];
    blobs.extend(manifest.layers.iter().cloned());
    let sig = match signatures {
        Some(sd) => {
            let bytes = read(&sd.digest)?;
            let sm = ImageManifest::from_bytes(&bytes).map_err(|source| RegistryError::Envelope {
                host: "the local store".to_owned(),
                what: format!("signature manifest {}", sd.digest),
                source,
            })?;
            blobs.push(sm.config.clone());
            blobs.extend(sm.layers.iter().cloned());
            Some(bytes)
        }
        None => None,
    };
    client.ping()?;
    let mut stats = PushStats::default();
    let mut seen = BTreeSet::new();
    for b in blobs.iter().filter(|b| seen.insert(b.digest)) {
        if client.blob_exists(repo, &b.digest)?.is_some() {
            stats.blobs_present += 1;
            stats.bytes_present += b.size;
            continue;
        }
        if !layout.has_blob(&b.digest) {
            return Err(RegistryError::Layout {
                what: format!("pushing {dest}"),
                source: formats::layout::LayoutError::MissingBlob { store: layout.root().to_owned(), digest: b.digest },
            });
        }
        let path = layout.blob_path(&b.digest);
        client.push_blob(repo, b, &|| std::fs::File::open(&path))?;
        stats.blobs_uploaded += 1;
        stats.bytes_uploaded += b.size;
    }
    let pushed = client.put_manifest(repo, tag, MANIFEST_MEDIA_TYPE, &image_bytes)?;
    if pushed != image.digest {
        return Err(RegistryError::DigestMismatch {
            host: client.host().to_owned(),
            what: format!("the pushed manifest {dest}"),
            expected: image.digest,
            actual: pushed,
        });
    }
    if let Some(bytes) = sig {
        client.put_manifest(repo, &image.digest.signature_tag(), MANIFEST_MEDIA_TYPE, &bytes)?;
    }
    Ok(stats)
}

/// The small part of an image, fetched and checked: everything a verifier needs before
/// any payload byte.
#[derive(Debug, Clone)]
pub struct Head {
    /// The image manifest's descriptor (media type, digest, size).
    pub descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub config: StageConfig,
    /// The signature manifest's descriptor, when the registry has a `sha256-<hex>.sig` tag.
    pub signatures: Option<Descriptor>,
    pub stats: FetchStats,
}

impl Head {
    pub fn digest(&self) -> Digest {
        self.descriptor.digest
    }
}

fn fetch_small(
    client: &Client,
    repo: &str,
    d: &Descriptor,
    layout: &Layout,
    max: u64,
    stats: &mut FetchStats,
) -> Result<(), RegistryError> {
    if layout.has_blob(&d.digest) {
        stats.blobs_present += 1;
        stats.bytes_present += d.size;
        return Ok(());
    }
    let f = client.fetch_blob(repo, d, layout, max)?;
    stats.blobs_fetched += 1;
    stats.bytes_fetched += f.bytes;
    Ok(())
}

/// Fetches the image manifest of `src`, its embedded stage manifest and its signature
/// manifest with the signature payloads into `layout`, each checked against its digest.
pub fn fetch_head(client: &Client, src: &RegistryRef, layout: &Layout) -> Result<Head, RegistryError> {
    let reference = src.manifest_reference().ok_or_else(|| {
        RegistryError::Reference(crate::reference::InvalidReference {
            input: src.to_string(),
            reason: "a tag (REPO:TAG) or a digest (REPO@sha256:...) is needed".to_owned(),
        })
    })?;
    let repo = &src.repository;
    let host = client.host().to_owned();
    client.ping()?;
    let fetched = client
        .get_manifest(repo, &reference)?
        .ok_or_else(|| RegistryError::TagNotFound { host: host.clone(), reference: src.to_string() })?;
    let manifest = ImageManifest::stage_from_bytes(&fetched.bytes).map_err(|source| RegistryError::Envelope {
        host: host.clone(),
        what: format!("the manifest {src}"),
        source,
    })?;
    layout.write_blob(&fetched.bytes).map_err(layout_err(format!("storing the manifest {src}")))?;
    let descriptor = Descriptor::new(MANIFEST_MEDIA_TYPE, fetched.digest, fetched.bytes.len() as u64);
    let mut stats = FetchStats { blobs_fetched: 1, bytes_fetched: descriptor.size, ..Default::default() };

    fetch_small(client, repo, &manifest.config, layout, MAX_CONFIG_BYTES, &mut stats)?;
    let config_bytes = layout
        .read_blob(&manifest.config.digest, MAX_CONFIG_BYTES)
        .map_err(layout_err(format!("the stage manifest of {src}")))?;
    let config = StageConfig::from_bytes(&config_bytes).map_err(|e| RegistryError::Malformed {
        host: host.clone(),
        what: format!("the stage manifest of {src}"),
        reason: e.to_string(),
    })?;

    let sig_tag = fetched.digest.signature_tag();
    let signatures = match client.get_manifest(repo, &sig_tag)? {
        None => None,
        Some(sm) => {
            let parsed = ImageManifest::from_bytes(&sm.bytes).map_err(|source| RegistryError::Envelope {
                host: host.clone(),
                what: format!("the signature manifest {}/{repo}:{sig_tag}", client.host()),
                source,
            })?;
            layout.write_blob(&sm.bytes).map_err(layout_err(format!("storing the signatures of {src}")))?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += sm.bytes.len() as u64;
            fetch_small(client, repo, &parsed.config, layout, MAX_SIGNATURE_BYTES, &mut stats)?;
            for l in &parsed.layers {
                fetch_small(client, repo, l, layout, MAX_SIGNATURE_BYTES, &mut stats)?;
            }
            Some(Descriptor::new(MANIFEST_MEDIA_TYPE, sm.digest, sm.bytes.len() as u64))
        }
    };
    Ok(Head { descriptor, manifest, config, signatures, stats })
}

/// Fetches the payload `layers` of `src` into `layout`, skipping those `have` says are at hand.
pub fn fetch_layers(
    client: &Client,
    src: &RegistryRef,
    layers: &[Descriptor],
    layout: &Layout,
    have: impl Fn(&Digest) -> bool,
) -> Result<FetchStats, RegistryError> {
    fetch_layers_teed(client, src, layers, layout, have, |_| None)
}

/// What [`fetch_layers_teed`] tells its caller about each layer it fetches, in order.
#[derive(Debug, Clone, Copy)]
pub enum LayerEvent<'a> {
    /// The layer's bytes are about to be fetched: a second writer for them, or none.
    Fetching(&'a Descriptor),
    /// The layer was stored: its digest and size matched.
    Stored(&'a Digest),
}

/// [`fetch_layers`], each fetched layer's bytes also handed to the writer `on_layer`
/// returns for its [`LayerEvent::Fetching`] (see [`Client::fetch_blob_teed`]) as they
/// are stored; [`LayerEvent::Stored`] follows once the layer matched its digest.
pub fn fetch_layers_teed(
    client: &Client,
    src: &RegistryRef,
    layers: &[Descriptor],
    layout: &Layout,
    have: impl Fn(&Digest) -> bool,
    mut on_layer: impl FnMut(LayerEvent<'_>) -> formats::archive::Tee,
) -> Result<FetchStats, RegistryError> {
    let mut stats = FetchStats::default();
    let mut seen = BTreeSet::new();
    for l in layers.iter().filter(|l| seen.insert(l.digest)) {
        if have(&l.digest) || layout.has_blob(&l.digest) {
            stats.blobs_present += 1;
            stats.bytes_present += l.size;
            continue;
        }
        let tee = on_layer(LayerEvent::Fetching(l));
        let f = client.fetch_blob_teed(&src.repository, l, layout, u64::MAX, tee)?;
        on_layer(LayerEvent::Stored(&l.digest));
        stats.blobs_fetched += 1;
        stats.bytes_fetched += f.bytes;
        stats.resumed += f.resumed;
        stats.restarted += f.restarted;
    }
    Ok(stats)
}
