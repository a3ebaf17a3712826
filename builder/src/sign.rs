//! Signatures in cosign's layout: a manifest tagged `NAME:sha256-<hex>.sig` whose `subject`
//! is the image and whose layers are simple-signing payloads, each signed by one key.

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
pub fn sign(layout: &Layout, reference: &Reference, key: &PrivateKey, expires: Option<&Expires>) -> Result<Signed> {
    let image = StoredImage::load(layout, reference)?;
    let payload =
        SimpleSigning::new(reference.name.to_string(), image.digest, &reference.name, &reference.version, expires)
            .to_bytes();
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
    let tag = image.signature_tag();
    layout.update_index(|i| i.set(&tag, Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &bytes)))?;
    Ok(Signed { reference: reference.to_string(), digest: image.digest, key_id, signature_tag: tag, signatures: count })
}
