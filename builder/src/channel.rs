//! `channel set`: publish which versions a registry channel offers (a signed channel
//! document, docs/formats.md), for installers that pull with `op-dbus-stage update`.
// Doc comments on the clap types below are `--help` text, written for a terminal.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write as _;

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::{Args, Subcommand};
use serde::Serialize;

use formats::channel::{CHANNEL_ARTIFACT_TYPE, CHANNEL_MEDIA_TYPE, Channel, ChannelStage};
use formats::layout::Layout;
use formats::oci::{self, Descriptor, EMPTY_BLOB, EMPTY_MEDIA_TYPE, ImageManifest, MANIFEST_MEDIA_TYPE};
use formats::{Digest, Reference};
use registry::{Access, Client, RegistryError, RegistryRef};

use crate::inspect::StoredImage;
use crate::registry_cmd::RegistryOpts;

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Publish a signed channel document naming NAME:VERSION... (already pushed to
    /// REGISTRY/PREFIX/NAME) as REGISTRY/PREFIX:CHANNEL, for `op-dbus-stage update`.
    Set(SetOpts),
}

#[derive(Debug, Args)]
pub struct SetOpts {
    /// Where the images are: HOST[:PORT]/PREFIX (each image at HOST[:PORT]/PREFIX/NAME,
    /// NAME lowercased); the channel is the tag CHANNEL of HOST[:PORT]/PREFIX.
    #[arg(value_name = "REGISTRY/PREFIX")]
    pub repository: String,
    /// The channel (a registry tag).
    #[arg(long, default_value = "stable", value_name = "TAG")]
    pub channel: String,
    /// The images of the store the channel offers, each pushed before.
    #[arg(required = true, value_name = "NAME:VERSION")]
    pub images: Vec<Reference>,
    /// The share of hosts (0 to 100) that take these versions: those whose place, from
    /// their machine id and the channel's name, is below it (the same hosts every time).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100), value_name = "PERCENT")]
    pub rollout: u8,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

/// What `channel set` prints.
#[derive(Debug, Serialize)]
pub struct ChannelSet {
    /// `HOST[:PORT]/PREFIX:CHANNEL`.
    pub reference: String,
    /// The digest of the channel manifest pushed.
    pub digest: Digest,
    /// The digest of the signed channel document.
    pub document_digest: Digest,
    pub key_id: String,
    pub channel: Channel,
    pub dry_run: bool,
}

/// The repository `HOST[:PORT]/PREFIX`, without tag or digest.
fn parse_prefix(s: &str) -> Result<RegistryRef> {
    let r: RegistryRef = s.parse().map_err(RegistryError::from)?;
    if r.tag.is_some() || r.digest.is_some() {
        return Err(RegistryError::Reference(registry::reference::InvalidReference {
            input: s.to_owned(),
            reason: "name the repository HOST[:PORT]/PREFIX only; the channel is --channel".to_owned(),
        })
        .into());
    }
    Ok(r)
}

/// The repository of stage `name` under `prefix`: `PREFIX/<name lowercased>`.
pub fn image_repository(prefix: &str, name: &formats::StageName) -> String {
    format!("{prefix}/{}", name.as_str().to_ascii_lowercase())
}

/// `channel set`: builds the document from the store's images, checks each is in the
/// registry, signs the document with `key` and pushes it under the channel's tag.
#[tracing::instrument(name = "channel_set", skip_all, fields(repository = %o.repository, channel = %o.channel))]
pub fn set(layout: &Layout, o: &SetOpts, key: &keys::PrivateKey, dry_run: bool) -> Result<ChannelSet> {
    let prefix = parse_prefix(&o.repository)?;
    if !formats::channel::is_tag(&o.channel) {
        return Err(cli_support::exit::Usage(format!(
            "--channel {:?} is not a registry tag ([A-Za-z0-9_][A-Za-z0-9._-], at most 128)",
            o.channel
        ))
        .into());
    }
    let mut stages = Vec::new();
    for r in &o.images {
        let image = StoredImage::load(layout, r)?;
        stages.push(ChannelStage { name: r.name.clone(), version: r.version.clone(), digest: image.digest });
    }
    let channel = Channel {
        schema_version: formats::channel::SCHEMA_VERSION,
        repository: format!("{}/{}", prefix.host, prefix.repository),
        channel: o.channel.clone(),
        created: jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        rollout: o.rollout,
        stages,
    };
    channel.check().map_err(|e| cli_support::exit::Usage(e.to_string()))?;
    let document = channel.to_bytes();
    let signature = base64::prelude::BASE64_STANDARD.encode(key.sign(&document));
    let mut layer = Descriptor::of(CHANNEL_MEDIA_TYPE, &document);
    layer.annotations.insert(oci::ANNOTATION_COSIGN_SIGNATURE.to_owned(), signature);
    layer.annotations.insert(oci::ANNOTATION_KEY_ID.to_owned(), key.key_id().to_string());
    let config = Descriptor::of(EMPTY_MEDIA_TYPE, EMPTY_BLOB);
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.to_owned()),
        artifact_type: Some(CHANNEL_ARTIFACT_TYPE.to_owned()),
        config: config.clone(),
        layers: vec![layer.clone()],
        subject: None,
        annotations: Default::default(),
    };
    let manifest_bytes = manifest.to_bytes();
    let out = ChannelSet {
        reference: prefix.with_tag(&o.channel).to_string(),
        digest: Digest::of(&manifest_bytes),
        document_digest: layer.digest,
        key_id: key.key_id().to_string(),
        channel,
        dry_run,
    };
    let client = Client::new(&prefix.host, o.registry.client_options(&prefix.host)?, Access::Push)?;
    client.ping()?;
    // Every image must be where installers will look for it, by its digest.
    for s in &out.channel.stages {
        let repo = image_repository(&prefix.repository, &s.name);
        if client.get_manifest(&repo, &s.digest.to_string())?.is_none() {
            anyhow::bail!(
                "{}/{repo} has no image {} ({}:{}): push it first with `op-dbus-image push {}:{} {}/{repo}`",
                prefix.host,
                s.digest,
                s.name,
                s.version,
                s.name,
                s.version,
                prefix.host
            );
        }
    }
    if dry_run {
        return Ok(out);
    }
    for (desc, bytes) in [(&config, EMPTY_BLOB), (&layer, document.as_slice())] {
        if client.blob_exists(&prefix.repository, &desc.digest)?.is_some() {
            continue;
        }
        let mut file = tempfile::tempfile().context("creating a temporary file")?;
        file.write_all(bytes).context("writing a temporary file")?;
        let path_file = file;
        client.push_blob(&prefix.repository, desc, &|| {
            let mut f = path_file.try_clone()?;
            std::io::Seek::rewind(&mut f)?;
            Ok(f)
        })?;
    }
    let pushed = client.put_manifest(&prefix.repository, &o.channel, MANIFEST_MEDIA_TYPE, &manifest_bytes)?;
    anyhow::ensure!(pushed == out.digest, "the registry stored the channel manifest as {pushed}, not {}", out.digest);
    Ok(out)
}

/// The text `channel set` prints.
pub fn render(s: &ChannelSet) -> String {
    let mut t = format!(
        "{} {} ({}), signed by {}, rollout {}%\n",
        if s.dry_run { "would set" } else { "set" },
        s.reference,
        s.digest,
        s.key_id,
        s.channel.rollout
    );
    for st in &s.channel.stages {
        t += &format!("  {}:{} {}\n", st.name, st.version, st.digest);
    }
    t
}
