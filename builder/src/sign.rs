//! Signatures in cosign's layout: a manifest tagged `NAME:sha256-<hex>.sig` whose `subject`
//! is the image and whose layers are simple-signing payloads, each signed by one key.
//!
//! The signed `docker-reference` is the repository the image is known by. In the local
//! store that is the bare stage name (`sign`, `build`); `push` signs again for the
//! destination `HOST[:PORT]/REPO`, as `cosign sign HOST/REPO` would, because an installer
//! deploying from a registry counts only signatures that name the repository it pulled
//! from (or, for an image copied as is, the bare stage name when REPO ends with it).

use anyhow::Result;
use base64::Engine as _;
use serde::Serialize;

use formats::layout::Layout;
use formats::oci::{self, Descriptor, ImageManifest};
use formats::{Digest, Reference};
use keys::PrivateKey;
use keys::simple_signing::{Expires, SimpleSigning};

use crate::inspect::{StoredImage, Tagged};

/// What `sign` prints.
#[derive(Debug, Serialize)]
pub struct Signed {
    pub reference: String,
    pub digest: Digest,
    pub key_id: String,
    pub signature_tag: String,
    pub signatures: usize,
}

/// A signature planned by [`plan`]: everything computed, nothing written yet.
#[derive(Debug)]
pub struct Planned {
    pub reference: Reference,
    pub digest: Digest,
    pub key_id: String,
    pub signature_tag: String,
    signature: SignatureManifest,
}

/// Plans adding (or, for a key that already signed, replacing) `key`'s signature of
/// `reference`: reads the store, signs, and changes nothing (what `sign --dry-run` reports).
pub fn plan(layout: &Layout, reference: &Reference, key: &PrivateKey, expires: Option<&Expires>) -> Result<Planned> {
    // Loaded whole: its stage manifest must name what the tag does.
    let image = StoredImage::load(layout, reference)?;
    plan_tagged(layout, &image.tagged(), key, expires)
}

fn plan_tagged(layout: &Layout, image: &Tagged, key: &PrivateKey, expires: Option<&Expires>) -> Result<Planned> {
    let signature = signature_manifest(layout, image, key, expires, image.reference.name.as_str())?;
    Ok(Planned {
        reference: image.reference.clone(),
        digest: image.digest,
        key_id: key.key_id().to_string(),
        signature_tag: image.signature_tag(),
        signature,
    })
}

/// Applies a [`plan`]: writes the signature's blobs, then tags its manifest.
pub fn apply(layout: &Layout, planned: &Planned) -> Result<Signed> {
    let manifest = planned.signature.write(layout)?;
    layout.update_index(|i| i.set(&planned.signature_tag, manifest))?;
    Ok(Signed {
        reference: planned.reference.to_string(),
        digest: planned.digest,
        key_id: planned.key_id.clone(),
        signature_tag: planned.signature_tag.clone(),
        signatures: planned.signature.count,
    })
}

/// Adds (or, for a key that already signed, replaces) `key`'s signature of `reference`.
pub fn sign(layout: &Layout, reference: &Reference, key: &PrivateKey, expires: Option<&Expires>) -> Result<Signed> {
    apply(layout, &plan(layout, reference, key, expires)?)
}

/// Signs the image the builder has just stored and tagged as `image.reference`, without
/// reading its manifests back (the builder wrote and checked them).
pub fn sign_built(layout: &Layout, image: &Tagged, key: &PrivateKey, expires: Option<&Expires>) -> Result<Signed> {
    apply(layout, &plan_tagged(layout, image, key, expires)?)
}

/// The signature manifest to push to `repository` (`HOST[:PORT]/REPO`): the store's
/// signatures by other keys as they are, and `key`'s signature for `repository` in place
/// of its own (keeping the expiry `key`'s stored signature had). Its blobs are written to
/// the store, untagged: the store's own signature manifest does not change.
pub fn signatures_for_push(
    layout: &Layout,
    image: &StoredImage,
    key: &PrivateKey,
    repository: &str,
) -> Result<Descriptor> {
    let key_id = key.key_id().to_string();
    let mut expires = None;
    for l in image.signature_manifest(layout)?.map(|m| m.layers).unwrap_or_default() {
        if l.annotation(oci::ANNOTATION_KEY_ID) == Some(key_id.as_str()) {
            let payload =
                SimpleSigning::parse(&layout.read_blob(&l.digest, keys::simple_signing::MAX_PAYLOAD as u64)?)?;
            expires = payload.expires()?;
        }
    }
    signature_manifest(layout, &image.tagged(), key, expires.as_ref(), repository)?.write(layout)
}

/// Whether a signature of `image` in the store names `repository`, or a bare stage name an
/// installer accepts for it (`keys::trust::Identity::matches`).
pub fn signed_for(layout: &Layout, image: &StoredImage, repository: &str) -> Result<bool> {
    let identity = keys::trust::Identity::Repository(repository);
    for l in image.signature_manifest(layout)?.map(|m| m.layers).unwrap_or_default() {
        let payload = SimpleSigning::parse(&layout.read_blob(&l.digest, keys::simple_signing::MAX_PAYLOAD as u64)?)?;
        if identity.matches(&payload.critical.identity.docker_reference, &image.reference.name) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A signature manifest and the blobs it needs, not written yet.
#[derive(Debug)]
struct SignatureManifest {
    /// The simple-signing payload of the new signature.
    payload: Vec<u8>,
    bytes: Vec<u8>,
    /// Its number of signatures.
    count: usize,
}

impl SignatureManifest {
    /// Writes the blobs, the manifest last; returns its descriptor.
    fn write(&self, layout: &Layout) -> Result<Descriptor> {
        layout.write_blob(&self.payload)?;
        layout.write_blob(oci::EMPTY_BLOB)?;
        layout.write_blob(&self.bytes)?;
        Ok(Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &self.bytes))
    }
}

/// `key`'s signature of `image` for `docker_reference` and a signature manifest holding
/// it and the store's signatures by other keys (read from the store; nothing written).
fn signature_manifest(
    layout: &Layout,
    image: &Tagged,
    key: &PrivateKey,
    expires: Option<&Expires>,
    docker_reference: &str,
) -> Result<SignatureManifest> {
    let reference = &image.reference;
    let payload =
        SimpleSigning::new(docker_reference, image.digest, &reference.name, &reference.version, expires).to_bytes();
    let signature = key.sign(&payload);
    let key_id = key.key_id().to_string();
    let mut layer = Descriptor::of(oci::SIMPLE_SIGNING_MEDIA_TYPE, &payload);
    layer.annotations.insert(
        oci::ANNOTATION_COSIGN_SIGNATURE.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(signature),
    );
    layer.annotations.insert(oci::ANNOTATION_KEY_ID.to_owned(), key_id.clone());

    let mut layers = image.signature_manifest(layout)?.map(|m| m.layers).unwrap_or_default();
    layers.retain(|l| l.annotation(oci::ANNOTATION_KEY_ID) != Some(key_id.as_str()));
    layers.push(layer);
    let count = layers.len();
    let mut subject = image.descriptor(layout)?;
    subject.annotations.remove(oci::ANNOTATION_REF_NAME);
    let manifest = ImageManifest::signatures(subject, layers);
    Ok(SignatureManifest { payload, bytes: manifest.to_bytes(), count })
}
