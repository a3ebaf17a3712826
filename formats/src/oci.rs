//! The OCI envelope: descriptors, image manifests and indexes, with the media types and
//! annotations of op-dbus stage images and cosign signatures.
//!
//! These are our own serde types rather than `oci-spec`'s: annotations are a `BTreeMap`
//! so that the same image always serializes to the same bytes (reproducible digests), and
//! parsing is bounded.
//!
//! ```text
//! index.json ─ ref "NAME:VERSION" ─────────► image manifest (artifactType stage.v1)
//!            │                                 ├─ config: stage manifest JSON
//!            │                                 └─ layers: payload (+ delta layers)
//!            └ ref "NAME:sha256-<hex>.sig" ─► signature manifest (subject = image manifest)
//!                                              ├─ config: {} (application/vnd.oci.empty.v1+json)
//!                                              └─ layers: simple-signing JSON, one per signature,
//!                                                 annotation dev.cosignproject.cosign/signature
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const STAGE_ARTIFACT_TYPE: &str = "application/vnd.op-dbus.stage.v1";
pub const TAR_ZSTD_MEDIA_TYPE: &str = "application/vnd.op-dbus.stage.payload.v1.tar+zstd";
/// A tar+zstd delta layer whose files may be patches against the parent's versions
/// (`formats::patch`).
pub const TAR_PATCH_MEDIA_TYPE: &str = "application/vnd.op-dbus.stage.payload.v1.tar-patch+zstd";
pub const BTRFS_ZSTD_MEDIA_TYPE: &str = "application/vnd.op-dbus.stage.payload.v1.btrfs-send+zstd";
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The bytes of the OCI empty descriptor's blob.
pub const EMPTY_BLOB: &[u8] = b"{}";

pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
pub const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_COSIGN_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// The key id of a signature layer's signer (a hint: verification tries every trusted key).
pub const ANNOTATION_KEY_ID: &str = "dev.op-dbus.stage/key-id";
/// On a delta layer: the reference and manifest digest of the image it applies on.
pub const ANNOTATION_PARENT: &str = "dev.op-dbus.stage/parent";
pub const ANNOTATION_PARENT_DIGEST: &str = "dev.op-dbus.stage/parent-digest";
/// On a btrfs layer: the UUID of the subvolume its stream creates.
pub const ANNOTATION_BTRFS_UUID: &str = "dev.op-dbus.stage/btrfs-uuid";
/// On an incremental btrfs layer: the UUID its stream names its parent by.
pub const ANNOTATION_BTRFS_PARENT_UUID: &str = "dev.op-dbus.stage/btrfs-parent-uuid";

/// Largest accepted manifest or index.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Most layers (payload or signatures) one manifest may have.
pub const MAX_LAYERS: usize = 256;

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The descriptor of `bytes`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// An OCI image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index (`index.json` of a layout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ImageIndex {
    fn default() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// A manifest or index that is malformed or not what an op-dbus image must be.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{what} is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge { what: &'static str },
    #[error("{what} is malformed: {source}")]
    Json { what: &'static str, source: serde_json::Error },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

fn parse_bounded<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, EnvelopeError> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(EnvelopeError::TooLarge { what });
    }
    serde_json::from_slice(bytes).map_err(|source| EnvelopeError::Json { what, source })
}

impl ImageManifest {
    /// A stage image manifest.
    pub fn stage(config: Descriptor, layers: Vec<Descriptor>, annotations: BTreeMap<String, String>) -> Self {
        ImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
            artifact_type: Some(STAGE_ARTIFACT_TYPE.to_owned()),
            config,
            layers,
            subject: None,
            annotations,
        }
    }

    /// A cosign signature manifest over `subject` with the given signature layers.
    pub fn signatures(subject: Descriptor, layers: Vec<Descriptor>) -> Self {
        ImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
            artifact_type: None,
            config: Descriptor::of(EMPTY_MEDIA_TYPE, EMPTY_BLOB),
            layers,
            subject: Some(subject),
            annotations: BTreeMap::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parses any OCI image manifest (bounded).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let m: ImageManifest = parse_bounded(bytes, "image manifest")?;
        let invalid = |reason: String| EnvelopeError::Invalid { what: "image manifest", reason };
        if m.schema_version != 2 {
            return Err(invalid(format!("schemaVersion {} (expected 2)", m.schema_version)));
        }
        if m.media_type.as_deref().is_some_and(|t| t != MANIFEST_MEDIA_TYPE) {
            return Err(invalid(format!("mediaType {:?} (expected {MANIFEST_MEDIA_TYPE})", m.media_type)));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(invalid(format!("{} layers (at most {MAX_LAYERS})", m.layers.len())));
        }
        Ok(m)
    }

    /// Parses a manifest and checks it is an op-dbus stage image.
    pub fn stage_from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let m = Self::from_bytes(bytes)?;
        let invalid = |reason: String| EnvelopeError::Invalid { what: "stage image manifest", reason };
        if m.artifact_type.as_deref() != Some(STAGE_ARTIFACT_TYPE) {
            return Err(invalid(format!("artifactType {:?} (expected {STAGE_ARTIFACT_TYPE})", m.artifact_type)));
        }
        if m.config.media_type != crate::manifest::CONFIG_MEDIA_TYPE {
            return Err(invalid(format!("config mediaType {:?}", m.config.media_type)));
        }
        if m.layers.is_empty() {
            return Err(invalid("no payload layer".into()));
        }
        for l in &m.layers {
            if ![TAR_ZSTD_MEDIA_TYPE, TAR_PATCH_MEDIA_TYPE, BTRFS_ZSTD_MEDIA_TYPE].contains(&l.media_type.as_str()) {
                return Err(invalid(format!("layer {} has unknown mediaType {:?}", l.digest, l.media_type)));
            }
        }
        Ok(m)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// The strict shape of an index read from an archive: no fields beyond the ones our
/// exports write, so that a changed byte cannot hide in a field nobody reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StrictDescriptor {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StrictIndex {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<StrictDescriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// Parses an `index.json` strictly (archives): unknown fields, another media type,
    /// and descriptors that are not image manifests are refused.
    pub fn from_bytes_strict(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let i: StrictIndex = parse_bounded(bytes, "index.json")?;
        let invalid = |reason: String| EnvelopeError::Invalid { what: "index.json", reason };
        if i.schema_version != 2 {
            return Err(invalid(format!("schemaVersion {} (expected 2)", i.schema_version)));
        }
        if i.media_type.as_deref().is_some_and(|t| t != INDEX_MEDIA_TYPE) {
            return Err(invalid(format!("mediaType {:?}", i.media_type)));
        }
        let mut manifests = Vec::with_capacity(i.manifests.len());
        for d in i.manifests {
            if d.media_type != MANIFEST_MEDIA_TYPE {
                return Err(invalid(format!("descriptor {} has mediaType {:?}", d.digest, d.media_type)));
            }
            if d.artifact_type.as_deref().is_some_and(|t| t != STAGE_ARTIFACT_TYPE) {
                return Err(invalid(format!("descriptor {} has artifactType {:?}", d.digest, d.artifact_type)));
            }
            if d.annotations.keys().any(|k| k != ANNOTATION_REF_NAME) {
                return Err(invalid(format!("descriptor {} has annotations other than a ref.name", d.digest)));
            }
            manifests.push(Descriptor {
                media_type: d.media_type,
                digest: d.digest,
                size: d.size,
                artifact_type: d.artifact_type,
                annotations: d.annotations,
            });
        }
        Ok(ImageIndex { schema_version: 2, media_type: i.media_type, manifests, annotations: i.annotations })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let i: ImageIndex = parse_bounded(bytes, "index.json")?;
        if i.schema_version != 2 {
            return Err(EnvelopeError::Invalid {
                what: "index.json",
                reason: format!("schemaVersion {} (expected 2)", i.schema_version),
            });
        }
        Ok(i)
    }

    /// The descriptor tagged `name` (`org.opencontainers.image.ref.name`).
    pub fn find(&self, name: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| d.annotation(ANNOTATION_REF_NAME) == Some(name))
    }

    /// Tags `desc` as `name`, replacing an earlier tag of that name; entries stay sorted by name.
    pub fn set(&mut self, name: &str, mut desc: Descriptor) {
        desc.annotations.insert(ANNOTATION_REF_NAME.to_owned(), name.to_owned());
        self.remove(name);
        self.manifests.push(desc);
        self.manifests.sort_by(|a, b| a.annotation(ANNOTATION_REF_NAME).cmp(&b.annotation(ANNOTATION_REF_NAME)));
    }

    /// Removes the tag `name`; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.manifests.len();
        self.manifests.retain(|d| d.annotation(ANNOTATION_REF_NAME) != Some(name));
        self.manifests.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_tags_sorted_and_replaced() {
        let mut i = ImageIndex::default();
        i.set("b:1.0.0", Descriptor::of(MANIFEST_MEDIA_TYPE, b"1"));
        i.set("a:1.0.0", Descriptor::of(MANIFEST_MEDIA_TYPE, b"2"));
        i.set("b:1.0.0", Descriptor::of(MANIFEST_MEDIA_TYPE, b"3"));
        assert_eq!(i.manifests.len(), 2);
        assert_eq!(i.find("b:1.0.0").unwrap().digest, Digest::of(b"3"));
        assert_eq!(i.manifests[0].annotation(ANNOTATION_REF_NAME), Some("a:1.0.0"));
        let back = ImageIndex::from_bytes(&i.to_bytes()).unwrap();
        assert_eq!(back, i);
    }

    #[test]
    fn stage_manifest_checks() {
        let cfg = Descriptor::of(crate::manifest::CONFIG_MEDIA_TYPE, b"{}");
        let layer = Descriptor::of(TAR_ZSTD_MEDIA_TYPE, b"x");
        let m = ImageManifest::stage(cfg.clone(), vec![layer], BTreeMap::new());
        ImageManifest::stage_from_bytes(&m.to_bytes()).unwrap();
        let odd = ImageManifest::stage(cfg, vec![Descriptor::of("application/x-evil", b"x")], BTreeMap::new());
        assert!(ImageManifest::stage_from_bytes(&odd.to_bytes()).is_err());
        assert!(ImageManifest::from_bytes(b"{\"schemaVersion\":2,").is_err());
    }
}
