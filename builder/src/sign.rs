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

use crate::inspect::StoredImage;

/// What `sign` prints.
#[derive(Debug, Serialize)]
pub struct Signed {
    pub reference: String,
    pub digest: Digest,
    pub key_id: String,
    pub signature_tag: String,
    pub signatures: usize,
}

/// Adds (or, for a key that already signed, replaces) `key`'s signature of `reference`.
#[tracing::instrument(name = "sign", skip_all, fields(image = %reference, key = %key.key_id()))]
pub fn sign(layout: &Layout, reference: &Reference, key: &PrivateKey, expires: Option<&Expires>) -> Result<Signed> {
    let image = StoredImage::load(layout, reference)?;
    tracing::info!(digest = %image.digest, expires = expires.is_some(), "signing");
    let (bytes, count) = signature_manifest(layout, &image, key, expires, reference.name.as_str())?;
    let tag = image.signature_tag();
    layout.update_index(|i| i.set(&tag, Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &bytes)))?;
    Ok(Signed {
        reference: reference.to_string(),
        digest: image.digest,
        key_id: key.key_id().to_string(),
        signature_tag: tag,
        signatures: count,
    })
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
    let (bytes, _) = signature_manifest(layout, image, key, expires.as_ref(), repository)?;
    Ok(Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &bytes))
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

/// Writes `key`'s signature of `image` for `docker_reference` and a signature manifest
/// holding it and the store's signatures by other keys; returns the manifest's bytes and
/// its number of signatures.
fn signature_manifest(
    layout: &Layout,
    image: &StoredImage,
    key: &PrivateKey,
    expires: Option<&Expires>,
    docker_reference: &str,
) -> Result<(Vec<u8>, usize)> {
    let reference = &image.reference;
    let payload =
        SimpleSigning::new(docker_reference, image.digest, &reference.name, &reference.version, expires).to_bytes();
    let signature = key.sign(&payload);
    let key_id = key.key_id().to_string();
    layout.write_blob(&payload)?;
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
    layout.write_blob(oci::EMPTY_BLOB)?;
    let bytes = manifest.to_bytes();
    layout.write_blob(&bytes)?;
    Ok((bytes, count))
}
