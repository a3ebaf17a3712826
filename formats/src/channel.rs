//! Channel documents: which stage versions a registry channel (`REGISTRY/PREFIX:CHANNEL`)
//! offers, and to what share of the hosts (docs/formats.md).
//!
//! The builder (`op-dbus-image channel set`) writes one as the only layer of an OCI
//! manifest tagged `CHANNEL` in the repository `PREFIX`, signed with its key over the exact
//! bytes of the document; installers (`op-dbus-stage update`) verify that signature against
//! their trust store, then deploy what the document names that is newer than what runs.
//!
//! ```text
//! REGISTRY/PREFIX:CHANNEL ─► manifest (artifactType CHANNEL_ARTIFACT_TYPE)
//!                              config: {} (application/vnd.oci.empty.v1+json)
//!                              layers[0]: the channel document (CHANNEL_MEDIA_TYPE),
//!                                annotations: signature (base64 ed25519), key id
//! REGISTRY/PREFIX/NAME@DIGEST ─► each stage image the document names
//! ```
//!
//! Which hosts a rollout of N percent reaches is fixed by each host's machine id and the
//! channel's name ([`rollout_bucket`]): the same hosts every time, and raising N only adds
//! hosts.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Digest, StageName, Version};

/// The `artifactType` of a channel manifest.
pub const CHANNEL_ARTIFACT_TYPE: &str = "application/vnd.op-dbus.channel.v1";
/// The media type of the channel document (the manifest's one layer).
pub const CHANNEL_MEDIA_TYPE: &str = "application/vnd.op-dbus.channel.v1+json";
/// Largest channel document accepted.
pub const MAX_CHANNEL_BYTES: u64 = 64 * 1024;
/// Most stages one channel names.
pub const MAX_CHANNEL_STAGES: usize = 256;
/// The only `schema_version` this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A channel document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub schema_version: u32,
    /// `REGISTRY/PREFIX` the channel was published to; an installer refuses a document
    /// that names another repository than the one it asked.
    pub repository: String,
    /// The channel's name (the tag); an installer refuses a document of another channel.
    pub channel: String,
    /// When the builder wrote it (RFC 3339, UTC); for people, not checked.
    pub created: String,
    /// The share of hosts, 0 to 100, that take this channel's versions.
    pub rollout: u8,
    /// The stages, each once, by name.
    pub stages: Vec<ChannelStage>,
}

/// One stage a channel offers: the image `REGISTRY/PREFIX/<name lowercased>@digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelStage {
    pub name: StageName,
    pub version: Version,
    /// The image manifest's digest.
    pub digest: Digest,
}

/// A channel document that is not one.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the channel document is larger than {MAX_CHANNEL_BYTES} bytes")]
    TooLarge,
    #[error("the channel document is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the channel document is invalid: {0}")]
    Invalid(String),
}

impl Channel {
    /// Parses a document strictly: known fields only, bounded, each stage once, rollout at
    /// most 100.
    pub fn from_bytes(bytes: &[u8]) -> Result<Channel, ChannelError> {
        if bytes.len() as u64 > MAX_CHANNEL_BYTES {
            return Err(ChannelError::TooLarge);
        }
        let c: Channel = serde_json::from_slice(bytes)?;
        c.check()?;
        Ok(c)
    }

    /// The document's bytes, as signed and pushed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("a channel serializes");
        b.push(b'\n');
        b
    }

    /// Checks what the JSON shape alone does not.
    pub fn check(&self) -> Result<(), ChannelError> {
        let invalid = |s: String| Err(ChannelError::Invalid(s));
        if self.schema_version != SCHEMA_VERSION {
            return invalid(format!("schema_version {} (this installer reads {SCHEMA_VERSION})", self.schema_version));
        }
        if self.rollout > 100 {
            return invalid(format!("rollout {} (a percentage, 0 to 100)", self.rollout));
        }
        if !is_tag(&self.channel) {
            return invalid(format!("channel {:?} is not a registry tag", self.channel));
        }
        if self.repository.is_empty() || self.repository.len() > 512 || self.repository.chars().any(char::is_control) {
            return invalid("repository is empty, too long or holds control characters".to_owned());
        }
        if self.created.len() > 64 || self.created.chars().any(char::is_control) {
            return invalid("created is longer than 64 characters or holds control characters".to_owned());
        }
        if self.stages.len() > MAX_CHANNEL_STAGES {
            return invalid(format!("{} stages (at most {MAX_CHANNEL_STAGES})", self.stages.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.stages {
            if !seen.insert(s.name.as_str().to_ascii_lowercase()) {
                return invalid(format!("stage {} is named twice", s.name));
            }
        }
        Ok(())
    }

    /// Whether a host in `bucket` (see [`rollout_bucket`]) takes this channel's versions.
    pub fn reaches(&self, bucket: u8) -> bool {
        bucket < self.rollout
    }
}

/// Whether `s` is an OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A machine id (`/etc/machine-id`, machine-id(5)): 32 lowercase hex digits and a newline.
pub fn parse_machine_id(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let id = text.strip_suffix('\n').unwrap_or(text);
    (id.len() == 32 && id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))).then(|| id.to_owned())
}

/// The host's place, 0 to 99, in the rollouts of `channel`: the first 8 bytes of
/// sha256("op-dbus-rollout\0" MACHINE_ID "\0" CHANNEL), big-endian, modulo 100. A rollout of
/// N percent reaches the hosts whose place is below N.
pub fn rollout_bucket(machine_id: &str, channel: &str) -> u8 {
    let mut h = Sha256::new();
    h.update(b"op-dbus-rollout\0");
    h.update(machine_id.as_bytes());
    h.update(b"\0");
    h.update(channel.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (n % 100) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Channel {
        Channel {
            schema_version: 1,
            repository: "127.0.0.1:5000/op-dbus".into(),
            channel: "stable".into(),
            created: "2026-01-01T00:00:00Z".into(),
            rollout: 20,
            stages: vec![ChannelStage {
                name: "app".parse().unwrap(),
                version: "1.0.0".parse().unwrap(),
                digest: Digest::of(b"x"),
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_what_it_must() {
        let d = doc();
        assert_eq!(Channel::from_bytes(&d.to_bytes()).unwrap(), d);
        let text = String::from_utf8(d.to_bytes()).unwrap();
        for bad in [
            text.replace("\"rollout\": 20", "\"rollout\": 101"),
            text.replace("\"rollout\": 20", "\"rollout\": 300"),
            text.replace("\"schema_version\": 1", "\"schema_version\": 2"),
            text.replace("\"channel\": \"stable\"", "\"channel\": \"../x\""),
            text.replace("\"created\"", "\"extra\": 1, \"created\""),
            text.replace("\"version\": \"1.0.0\"", "\"version\": \"one\""),
            text.replace("sha256:", "md5:"),
            "[]".into(),
            String::new(),
        ] {
            assert!(Channel::from_bytes(bad.as_bytes()).is_err(), "{bad}");
        }
        let mut twice = doc();
        twice.stages.push(twice.stages[0].clone());
        assert!(Channel::from_bytes(&twice.to_bytes()).is_err());
        let big = vec![b' '; MAX_CHANNEL_BYTES as usize + 1];
        assert!(matches!(Channel::from_bytes(&big), Err(ChannelError::TooLarge)));
    }

    #[test]
    fn buckets_are_stable_spread_and_per_channel() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(rollout_bucket(id, "stable"), rollout_bucket(id, "stable"));
        // Pinned: a change of the mapping would move hosts between rollouts.
        assert_eq!(rollout_bucket(id, "stable"), rollout_bucket_reference(id, "stable"));
        let mut counts = [0u32; 100];
        for i in 0..10_000u32 {
            counts[rollout_bucket(&format!("{i:032x}"), "stable") as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (50..=150).contains(&c)), "{counts:?}");
        let differ = (0..100u32)
            .filter(|i| rollout_bucket(&format!("{i:032x}"), "a") != rollout_bucket(&format!("{i:032x}"), "b"))
            .count();
        assert!(differ > 80, "{differ}");
        let mut d = doc();
        d.rollout = 0;
        assert!(!d.reaches(0));
        d.rollout = 100;
        assert!(d.reaches(99));
    }

    fn rollout_bucket_reference(id: &str, channel: &str) -> u8 {
        let d = Digest::of(format!("op-dbus-rollout\0{id}\0{channel}").as_bytes());
        (u64::from_be_bytes(d.bytes()[..8].try_into().unwrap()) % 100) as u8
    }

    #[test]
    fn machine_ids_and_tags() {
        assert_eq!(parse_machine_id(b"0123456789abcdef0123456789abcdef\n").unwrap().len(), 32);
        assert!(parse_machine_id(b"0123456789ABCDEF0123456789abcdef\n").is_none());
        assert!(parse_machine_id(b"uninitialized\n").is_none());
        assert!(parse_machine_id(b"").is_none());
        assert!(is_tag("stable") && is_tag("v1.2_rc-1") && !is_tag("-x") && !is_tag("a/b") && !is_tag(""));
        assert!(!is_tag(&"a".repeat(129)));
    }
}
