//! `push` and `pull`: images and their cosign signatures to and from an OCI registry,
//! through the `registry` crate (the same client the installer uses).
// Doc comments on the clap types below are `--help` text, written for a terminal:
// `HOST[:PORT]` there is command-line syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use formats::layout::Layout;
use formats::{Digest, Reference};
use registry::transfer::{self, FetchStats, PushStats};
use registry::{Access, Client, ClientOptions, Credentials, RegistryError, RegistryRef};

use crate::inspect::StoredImage;

/// How to reach the registry (shared by `push` and `pull`).
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryOpts {
    /// Plain HTTP to a registry that is not on loopback. Loopback hosts (127.0.0.0/8, ::1,
    /// localhost) use plain HTTP anyway unless --ca is given; every other host HTTPS.
    #[arg(long)]
    pub insecure: bool,
    /// Verify the registry's HTTPS certificate against the CA certificates in FILE (PEM)
    /// instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Registry user name; the password is read from stdin (--password-stdin). Without
    /// them, credentials come from $REGISTRY_AUTH_FILE or ~/.docker/config.json.
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password (or token) for --username from stdin (one line).
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

impl RegistryOpts {
    /// Client options for `host`: the flags, else the auth file's credentials.
    pub fn client_options(&self, host: &str) -> Result<ClientOptions> {
        let credentials = match &self.username {
            Some(u) => Some(Credentials { username: u.clone(), password: read_password_stdin()? }),
            None => None,
        };
        let opts = ClientOptions {
            insecure: self.insecure,
            ca_file: self.ca.clone(),
            credentials_source: credentials.as_ref().map(|_| "--username/--password-stdin".to_owned()),
            credentials,
            ..Default::default()
        };
        Ok(opts.with_auth_file_for(host)?)
    }
}

/// One line from stdin, without its line ending.
pub fn read_password_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().lock().take(64 * 1024).read_to_string(&mut s).context("reading the password from stdin")?;
    let p = s.lines().next().unwrap_or("").to_owned();
    anyhow::ensure!(!p.is_empty(), "--password-stdin: stdin holds no password");
    Ok(p)
}

#[derive(Debug, Args)]
pub struct PushOpts {
    /// The image of the store (NAME:VERSION).
    pub reference: Reference,
    /// Where to: HOST[:PORT]/REPO[:TAG]; TAG defaults to VERSION.
    pub destination: String,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

#[derive(Debug, Args)]
pub struct PullOpts {
    /// HOST[:PORT]/REPO:TAG (or REPO@sha256:...); stored as NAME:VERSION of its stage manifest.
    pub source: String,
    #[command(flatten)]
    pub registry: RegistryOpts,
}

/// What `push` prints.
#[derive(Debug, Serialize)]
pub struct Pushed {
    pub reference: String,
    pub destination: String,
    pub digest: Digest,
    /// The tag of the signature manifest in the registry, when the image is signed.
    pub signature_tag: Option<String>,
    #[serde(flatten)]
    pub stats: PushStats,
    pub dry_run: bool,
}

/// What `pull` prints.
#[derive(Debug, Serialize)]
pub struct Pulled {
    pub source: String,
    pub reference: String,
    pub digest: Digest,
    pub signed: bool,
    /// The digest NAME:VERSION had before, when the pull replaced another image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<Digest>,
    #[serde(flatten)]
    pub stats: FetchStats,
    pub dry_run: bool,
}

fn parse_ref(s: &str) -> Result<RegistryRef> {
    Ok(s.parse::<RegistryRef>().map_err(RegistryError::from)?)
}

/// `push NAME:VERSION HOST[:PORT]/REPO[:TAG]`.
///
/// With a signing `key` the image is signed for `HOST[:PORT]/REPO` as it is pushed (the
/// pushed signature manifest carries that signature in place of the key's store one, and
/// the other keys' signatures as they are): installers deploying from a registry count
/// only signatures naming the repository they pull from. Without a key, a signed image is
/// pushed only when one of its signatures already names the destination.
#[tracing::instrument(name = "push", skip_all, fields(destination = %o.destination, dry_run))]
pub fn push(layout: &Layout, o: &PushOpts, key: Option<&keys::PrivateKey>, dry_run: bool) -> Result<Pushed> {
    tracing::info!(signs_here = key.is_some(), "pushing");
    let mut dest = parse_ref(&o.destination)?;
    if dest.digest.is_some() {
        return Err(RegistryError::Reference(registry::reference::InvalidReference {
            input: o.destination.clone(),
            reason: "push to a tag (REPO:TAG), not a digest".to_owned(),
        })
        .into());
    }
    if dest.tag.is_none() {
        dest.tag = Some(o.reference.version.to_string());
    }
    let image = StoredImage::load(layout, &o.reference)?;
    let desc = image.descriptor(layout)?;
    let repository = format!("{}/{}", dest.host, dest.repository);
    let mut sig = layout.resolve(&image.signature_tag())?;
    match key {
        Some(key) if !dry_run => sig = Some(crate::sign::signatures_for_push(layout, &image, key, &repository)?),
        Some(_) => {}
        None if sig.is_some() && !crate::sign::signed_for(layout, &image, &repository)? => anyhow::bail!(
            "the signatures of {} name another repository than {repository}, and installers deploying from              {repository} count only signatures naming it: push with the signing key (--key or              OP_DBUS_SIGNING_KEY) to sign it for {repository}",
            o.reference
        ),
        None => {}
    }
    let signature_tag = sig.as_ref().map(|_| image.digest.signature_tag());
    let mut out = Pushed {
        reference: o.reference.to_string(),
        destination: dest.to_string(),
        digest: image.digest,
        signature_tag,
        stats: PushStats::default(),
        dry_run,
    };
    if dry_run {
        return Ok(out);
    }
    let client = Client::new(&dest.host, o.registry.client_options(&dest.host)?, Access::Push)?;
    out.stats = transfer::push_image(&client, layout, &dest, &desc, sig.as_ref())
        .with_context(|| format!("pushing {} to {dest}", o.reference))?;
    Ok(out)
}

/// `pull HOST[:PORT]/REPO:TAG`: into the store as NAME:VERSION, with its signatures.
#[tracing::instrument(name = "pull", skip_all, fields(source = %o.source, dry_run))]
pub fn pull(store: &std::path::Path, o: &PullOpts, dry_run: bool) -> Result<Pulled> {
    tracing::info!(store = %store.display(), "pulling");
    let src = parse_ref(&o.source)?;
    let client = Client::new(&src.host, o.registry.client_options(&src.host)?, Access::Pull)?;
    let existing = Layout::open(store).ok();
    // A dry run fetches the small part into a temporary layout, to say what a pull would do.
    let temp = if dry_run { Some(tempfile::tempdir().context("creating a temporary directory")?) } else { None };
    let layout = match &temp {
        Some(t) => Layout::open_or_create(&t.path().join("layout"))?,
        None => {
            Layout::open_or_create(store).with_context(|| format!("opening the image store {}", store.display()))?
        }
    };
    let head = transfer::fetch_head(&client, &src, &layout).with_context(|| format!("pulling {src}"))?;
    let reference = Reference::new(head.config.name.clone(), head.config.version.clone());
    let tag = reference.to_string();
    let mut stats = head.stats.clone();
    let replaced = existing
        .as_ref()
        .and_then(|l| l.resolve(&tag).ok().flatten())
        .map(|d| d.digest)
        .filter(|d| *d != head.digest());
    if dry_run {
        for l in &head.manifest.layers {
            if existing.as_ref().is_some_and(|s| s.has_blob(&l.digest)) {
                stats.blobs_present += 1;
                stats.bytes_present += l.size;
            } else {
                stats.blobs_fetched += 1;
                stats.bytes_fetched += l.size;
            }
        }
    } else {
        let layers = transfer::fetch_layers(&client, &src, &head.manifest.layers, &layout, |_| false)
            .with_context(|| format!("pulling the payload of {src}"))?;
        stats.add(&layers);
        let sig_tag = format!("{}:{}", reference.name, head.digest().signature_tag());
        layout.update_index(|i| {
            i.set(&tag, head.descriptor.clone());
            match &head.signatures {
                Some(sd) => i.set(&sig_tag, sd.clone()),
                None => {
                    i.remove(&sig_tag);
                }
            }
        })?;
    }
    Ok(Pulled {
        source: src.to_string(),
        reference: tag,
        digest: head.digest(),
        signed: head.signatures.is_some(),
        replaced,
        stats,
        dry_run,
    })
}

/// The exit code of a registry failure, when the error is one: 7 for bytes that are
/// malformed or do not match their digest, 2 for a bad reference; `None` otherwise.
pub fn exit_code(err: &anyhow::Error) -> Option<i32> {
    err.chain().find_map(|c| c.downcast_ref::<RegistryError>()).and_then(|e| {
        if e.is_malformed() {
            Some(crate::error::MALFORMED)
        } else if e.is_usage() {
            Some(crate::error::USAGE)
        } else {
            None
        }
    })
}
