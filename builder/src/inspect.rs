//! Reading images back from the store: `inspect` and `list`.

use anyhow::{Context, Result};
use serde::Serialize;

use formats::layout::Layout;
use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};
use formats::oci::{self, Descriptor, ImageManifest, MAX_MANIFEST_BYTES};
use formats::{Digest, Reference};
use keys::simple_signing::SimpleSigning;

/// An image of the store with its embedded stage manifest, every blob checked against its digest.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub reference: Reference,
    pub digest: Digest,
    pub manifest: ImageManifest,
    pub config: StageConfig,
}

/// One signature layer of an image.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureInfo {
    /// The signer's key id as the layer names it (checked by the installer, not here).
    pub key_id: Option<String>,
    pub payload_digest: Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl StoredImage {
    pub fn load(layout: &Layout, reference: &Reference) -> Result<StoredImage> {
        let desc = layout.resolve(&reference.to_string())?.ok_or_else(|| {
            cli_support::exit::NotFound(format!(
                "no image {reference} in the store {}; build it first, or pass the right --store (see `op-dbus-image list`)",
                layout.root().display()
            ))
        })?;
        let bytes = layout.read_blob(&desc.digest, MAX_MANIFEST_BYTES)?;
        let manifest = ImageManifest::stage_from_bytes(&bytes).with_context(|| format!("image {reference}"))?;
        let config_bytes = layout.read_blob(&manifest.config.digest, MAX_CONFIG_BYTES)?;
        let config = StageConfig::from_bytes(&config_bytes).with_context(|| format!("image {reference}"))?;
        if config.name != reference.name || config.version != reference.version {
            anyhow::bail!(
                "the store tags {} as {reference}, but its stage manifest says {}:{}",
                desc.digest,
                config.name,
                config.version
            );
        }
        Ok(StoredImage { reference: reference.clone(), digest: desc.digest, manifest, config })
    }

    /// The tag and digest, all that finding its signatures takes.
    pub fn tagged(&self) -> Tagged {
        Tagged { reference: self.reference.clone(), digest: self.digest }
    }

    /// The tag of this image's cosign signature manifest.
    pub fn signature_tag(&self) -> String {
        self.tagged().signature_tag()
    }

    /// The signature manifest, if the image is signed.
    pub fn signature_manifest(&self, layout: &Layout) -> Result<Option<ImageManifest>> {
        self.tagged().signature_manifest(layout)
    }

    pub fn signatures(&self, layout: &Layout) -> Result<Vec<SignatureInfo>> {
        let Some(m) = self.signature_manifest(layout)? else { return Ok(Vec::new()) };
        m.layers
            .iter()
            .filter(|l| l.media_type == oci::SIMPLE_SIGNING_MEDIA_TYPE)
            .map(|l| {
                let payload = SimpleSigning::parse(&layout.read_blob(&l.digest, 64 * 1024)?)?;
                Ok(SignatureInfo {
                    key_id: l.annotation(oci::ANNOTATION_KEY_ID).map(str::to_owned),
                    payload_digest: l.digest,
                    expires: payload.expires()?.map(|e| e.to_string()),
                })
            })
            .collect()
    }

    /// The image's descriptor as tagged in the index.
    pub fn descriptor(&self, layout: &Layout) -> Result<Descriptor> {
        self.tagged().descriptor(layout)
    }
}

/// An image of the store by its tag and manifest digest, its blobs not read: what signing
/// an image takes (the builder signs what it has just stored without reading it back).
#[derive(Debug, Clone)]
pub struct Tagged {
    pub reference: Reference,
    pub digest: Digest,
}

impl Tagged {
    /// The tag of this image's cosign signature manifest.
    pub fn signature_tag(&self) -> String {
        format!("{}:{}", self.reference.name, self.digest.signature_tag())
    }

    /// The signature manifest, if the image is signed.
    pub fn signature_manifest(&self, layout: &Layout) -> Result<Option<ImageManifest>> {
        let Some(desc) = layout.resolve(&self.signature_tag())? else { return Ok(None) };
        let bytes = layout.read_blob(&desc.digest, MAX_MANIFEST_BYTES)?;
        Ok(Some(ImageManifest::from_bytes(&bytes).with_context(|| format!("signatures of {}", self.reference))?))
    }

    /// The image's descriptor as the store's index tags it; it must still be `digest`.
    pub fn descriptor(&self, layout: &Layout) -> Result<Descriptor> {
        let desc = layout.resolve(&self.reference.to_string())?.context("the image's tag disappeared")?;
        anyhow::ensure!(
            desc.digest == self.digest,
            "{} was tagged again while this command ran ({} is now {}); run it again",
            self.reference,
            self.digest,
            desc.digest
        );
        Ok(desc)
    }
}

/// What `inspect` prints.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub reference: String,
    pub digest: Digest,
    pub created: Option<String>,
    pub layers: Vec<Descriptor>,
    pub signatures: Vec<SignatureInfo>,
    pub manifest: StageConfig,
}

pub fn inspect(layout: &Layout, reference: &Reference) -> Result<Inspection> {
    let image = StoredImage::load(layout, reference)?;
    let signatures = image.signatures(layout)?;
    Ok(Inspection {
        reference: reference.to_string(),
        digest: image.digest,
        created: image.manifest.annotation(oci::ANNOTATION_CREATED).map(str::to_owned),
        layers: image.manifest.layers.clone(),
        signatures,
        manifest: image.config,
    })
}

/// One line of `list`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub reference: String,
    pub name: String,
    pub version: String,
    pub digest: Digest,
    pub size: u64,
    pub signatures: usize,
}

/// Every image tag of the store (signature tags aside), by name then version.
pub fn list(layout: &Layout) -> Result<Vec<Listed>> {
    let index = layout.index()?;
    let mut out = Vec::new();
    for d in &index.manifests {
        let Some(tag) = d.annotation(oci::ANNOTATION_REF_NAME) else { continue };
        let Ok(reference) = tag.parse::<Reference>() else { continue };
        let image = StoredImage::load(layout, &reference)?;
        let size = image.manifest.layers.iter().map(|l| l.size).sum::<u64>() + image.manifest.config.size;
        out.push(Listed {
            reference: reference.to_string(),
            name: reference.name.to_string(),
            version: reference.version.to_string(),
            digest: image.digest,
            size,
            signatures: image.signatures(layout)?.len(),
        });
    }
    out.sort_by(|a, b| {
        (a.name.as_str(), a.version.parse::<formats::Version>().ok()).cmp(&(b.name.as_str(), b.version.parse().ok()))
    });
    Ok(out)
}
