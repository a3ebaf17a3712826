//! `update --from REGISTRY/PREFIX [--channel TAG]`: pull, for fleets past what one push
//! reaches. Reads the signed channel document `REGISTRY/PREFIX:TAG` (docs/formats.md),
//! verifies it against the trust store, decides from the host's machine id whether the
//! channel's rollout reaches this host, and deploys, as one transaction with `deploy`'s
//! verification and rollback, every stage the channel names in a newer version than the one
//! running (with the dependencies those need, from the channel or the store).
//!
//! ```text
//! GET REGISTRY/PREFIX:TAG ─► manifest (artifactType channel) ─► document (≤ 64 KiB, hashed)
//!   signature over the document's bytes by a trusted, unrevoked key whose scope covers
//!   every stage it names                                  else exit 3, nothing changed
//!   repository and channel are the ones asked             else exit 3
//!   not created before the last document taken (channels.json) else exit 3
//!   bucket(machine id, TAG) < rollout                     else nothing to do
//!   for each stage: running < offered                     → REGISTRY/PREFIX/NAME@DIGEST
//!   dependencies of those (heads only) from the channel
//! deploy (one batch, --with-deps) ─► verify, activate, verify commands, or roll back
//! ```

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use base64::prelude::{BASE64_STANDARD, Engine as _};
use serde::Serialize;

use formats::channel::{CHANNEL_ARTIFACT_TYPE, CHANNEL_MEDIA_TYPE, Channel, MAX_CHANNEL_BYTES};
use formats::oci::{self, ImageManifest};
use formats::{Digest, Reference, StageName, Version};
use registry::{Access, Client, RegistryRef};

use crate::commands::deploy::{self, Batch, DeployReport};
use crate::commands::with_deps;
use crate::error::{Malformed, Untrusted, Usage};
use crate::ops::Ctx;
use crate::receive::{self, Source, TempLayout, Trust};

/// Where the machine id is read, inside the root.
pub const MACHINE_ID: &str = "etc/machine-id";
/// Where the installer remembers, per channel, the newest document it took (inside the
/// root; under a target no stage may write).
pub const SEEN: &str = "var/lib/op-dbus/deployment/channels.json";
const MAX_SEEN_BYTES: u64 = 1 << 20;
/// Most channels remembered; past it, the one taken longest ago is forgotten.
const MAX_SEEN: usize = 1024;

/// `channels.json`: per `HOST/PREFIX:TAG`, the newest document taken.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Seen {
    channels: BTreeMap<String, SeenChannel>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SeenChannel {
    created: String,
    document_digest: Digest,
}

impl Seen {
    fn read(ctx: &Ctx) -> Result<Seen> {
        let shown = ctx.host.root.join(SEEN);
        match receive::read_in_root(&ctx.host, SEEN, MAX_SEEN_BYTES)? {
            None => Ok(Seen::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                Malformed(format!("{}: {e}; remove it to accept any signed channel document again", shown.display()))
                    .into()
            }),
        }
    }

    fn write(&self, ctx: &Ctx) -> Result<()> {
        let dir = ctx.host.ensure_dir(SEEN.rsplit_once('/').expect("nested").0)?;
        let path = dir.join("channels.json");
        let bytes = serde_json::to_vec_pretty(self).expect("serializes");
        fsx::write_atomic(&path, &bytes).with_context(|| format!("writing {}", path.display()))
    }
}

/// A document's `created`, as a time.
fn created(text: &str, what: &str) -> Result<jiff::Timestamp> {
    text.parse::<jiff::Timestamp>()
        .map_err(|e| Malformed(format!("{what}: created {text:?} is not an RFC 3339 time: {e}")).into())
}

/// What `update` did (or, with `--dry-run`, would do).
#[derive(Debug, Serialize)]
pub struct UpdateReport {
    /// `REGISTRY/PREFIX:TAG`.
    pub channel: String,
    /// The digest of the signed channel document.
    pub document_digest: Digest,
    /// The key whose signature of the document counted.
    pub signer: keys::KeyId,
    pub created: String,
    pub rollout: u8,
    /// This host's place (0 to 99) in the channel's rollouts; `None` when the rollout is
    /// 0 or 100 and the machine id was not needed.
    pub bucket: Option<u8>,
    /// Whether the rollout reaches this host.
    pub in_rollout: bool,
    /// What became of each stage the channel names.
    pub stages: Vec<StagePlan>,
    /// The deploy, when there was something to deploy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployReport>,
    pub dry_run: bool,
}

/// One stage of the channel, and what `update` does with it.
#[derive(Debug, Serialize)]
pub struct StagePlan {
    pub name: StageName,
    pub offered: Version,
    pub digest: Digest,
    /// The version active on this host, if the stage is deployed.
    pub running: Option<Version>,
    pub action: Action,
}

/// What `update` does with a stage the channel names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The offered version is newer than the one running (or the stage is not deployed
    /// and --all was given): deployed.
    Update,
    /// Not deployed here, but an updated stage needs it: deployed with them.
    Dependency,
    /// The version running is the one offered.
    UpToDate,
    /// A newer version runs here: never downgraded.
    NewerRunning,
    /// Not deployed here (pass --all to install the channel's stages that are not).
    NotDeployed,
    /// The rollout does not reach this host.
    OutsideRollout,
}

/// `update`: see the module documentation. `registry` are the flags for the registry.
#[tracing::instrument(name = "update", skip_all, fields(from = from, channel = channel, all))]
pub fn update(
    ctx: &Ctx,
    from: &str,
    channel: &str,
    all: bool,
    registry: &receive::RegistryOpts,
) -> Result<UpdateReport> {
    let prefix: RegistryRef = from
        .parse()
        .map_err(|e| Usage(format!("--from {from:?}: {e}; give the registry and prefix, HOST[:PORT]/PREFIX")))?;
    if prefix.tag.is_some() || prefix.digest.is_some() {
        return Err(Usage(format!("--from {from}: name HOST[:PORT]/PREFIX only; the channel is --channel")).into());
    }
    if !formats::channel::is_tag(channel) {
        return Err(Usage(format!("--channel {channel:?} is not a registry tag")).into());
    }
    let channel_ref = prefix.with_tag(channel);
    let shown = channel_ref.to_string();
    // The client options (credentials read once) from the same flags `deploy` takes.
    let Source::Registry { options, .. } = Source::parse_with(&shown, registry)? else {
        return Err(Usage(format!("{shown} is not a registry reference")).into());
    };
    let mut options = *options;
    options.limits.stall = ctx.opts.stall_timeout;

    let trust = Trust::load(&ctx.host)?;
    let store = ctx.store()?;
    let tmp = store.root().join(".tmp");
    let temp = TempLayout::new(&tmp)?;
    let client = Client::new(&prefix.host, options.clone(), Access::Pull).map_err(|e| registry_error(e, &shown))?;
    crate::progress::step("receive", Some(&shown), "fetching the channel document");
    let (document, document_digest) = fetch_document(&client, &channel_ref, &temp)?;
    let signer = verify_document(&document, &trust, &shown)?;
    let doc = Channel::from_bytes(&document.bytes).map_err(|e| Malformed(format!("{shown}: {e}")))?;
    let repository = format!("{}/{}", prefix.host, prefix.repository);
    if doc.repository != repository || doc.channel != channel {
        return Err(Untrusted(format!(
            "{shown} serves a channel document signed for {}:{}, not for {repository}:{channel}: the registry hands \
             over another channel under this name; nothing was changed",
            doc.repository, doc.channel
        ))
        .into());
    }
    // A document older than one taken before is a stale mirror or a replay: taking it
    // could undo a halted rollout.
    let mut seen = Seen::read(ctx)?;
    let this = created(&doc.created, &shown)?;
    if let Some(last) = seen.channels.get(&shown)
        && created(&last.created, &ctx.host.root.join(SEEN).display().to_string())? > this
    {
        return Err(Untrusted(format!(
            "{shown} serves a channel document created {}, older than the one this host took before (created {}, \
             {}): a stale mirror or a replayed document; nothing was changed",
            doc.created, last.created, last.document_digest
        ))
        .into());
    }
    crate::progress::step("verify", Some(&shown), "channel document verified");
    let remember = |seen: &mut Seen| -> Result<()> {
        if ctx.opts.dry_run {
            return Ok(());
        }
        seen.channels.insert(shown.clone(), SeenChannel { created: doc.created.clone(), document_digest });
        while seen.channels.len() > MAX_SEEN {
            let oldest = seen
                .channels
                .iter()
                .min_by_key(|(_, c)| c.created.parse::<jiff::Timestamp>().ok())
                .map(|(k, _)| k.clone())
                .expect("not empty");
            seen.channels.remove(&oldest);
        }
        seen.write(ctx)
    };

    let bucket = match doc.rollout {
        0 | 100 => None,
        _ => Some(formats::channel::rollout_bucket(&machine_id(ctx)?, channel)),
    };
    let in_rollout = doc.rollout == 100 || bucket.is_some_and(|b| doc.reaches(b));
    let state = ctx.state()?;
    let running = |n: &StageName| state.stages.get(n).map(|s| s.active.version.clone());
    let mut stages: Vec<StagePlan> = doc
        .stages
        .iter()
        .map(|s| {
            let running = running(&s.name);
            let action = match &running {
                _ if !in_rollout => Action::OutsideRollout,
                None if all => Action::Update,
                None => Action::NotDeployed,
                Some(v) if *v < s.version => Action::Update,
                Some(v) if *v == s.version => Action::UpToDate,
                Some(_) => Action::NewerRunning,
            };
            StagePlan { name: s.name.clone(), offered: s.version.clone(), digest: s.digest, running, action }
        })
        .collect();
    let mut report = UpdateReport {
        channel: shown.clone(),
        document_digest,
        signer,
        created: doc.created.clone(),
        rollout: doc.rollout,
        bucket,
        in_rollout,
        stages: Vec::new(),
        deploy: None,
        dry_run: ctx.opts.dry_run,
    };
    if !stages.iter().any(|s| s.action == Action::Update) {
        remember(&mut seen)?;
        report.stages = stages;
        return Ok(report);
    }

    // The heads (manifest, stage manifest) of what is deployed, for their dependencies:
    // the stages the channel offers that those need join the batch.
    let image_ref = |p: &StagePlan| RegistryRef {
        host: prefix.host.clone(),
        repository: format!("{}/{}", prefix.repository, p.name.as_str().to_ascii_lowercase()),
        tag: None,
        digest: Some(p.digest),
    };
    let deployed: BTreeMap<StageName, Version> =
        state.stages.iter().map(|(n, s)| (n.clone(), s.active.version.clone())).collect();
    let stored: Vec<Reference> = store
        .index()?
        .manifests
        .iter()
        .filter_map(|d| d.annotation(oci::ANNOTATION_REF_NAME))
        .filter_map(|t| t.parse().ok())
        .collect();
    let mut heads: BTreeMap<StageName, Vec<formats::manifest::Dependency>> = BTreeMap::new();
    loop {
        for p in stages.iter().filter(|p| matches!(p.action, Action::Update | Action::Dependency)) {
            if heads.contains_key(&p.name) {
                continue;
            }
            let r = image_ref(p);
            let head = registry::transfer::fetch_head(&client, &r, &temp.layout)
                .map_err(|e| registry_error(e, &r.to_string()))?;
            if head.config.name != p.name || head.config.version != p.offered {
                return Err(Untrusted(format!(
                    "{shown} offers {}:{} as {r}, which is {}:{}; nothing was changed",
                    p.name, p.offered, head.config.name, head.config.version
                ))
                .into());
            }
            heads.insert(p.name.clone(), head.config.dependencies.clone());
        }
        let members: Vec<with_deps::Member> = stages
            .iter()
            .filter(|p| matches!(p.action, Action::Update | Action::Dependency))
            .map(|p| (p.name.clone(), p.offered.clone(), heads[&p.name].clone()))
            .collect();
        let offered: Vec<Reference> = stages
            .iter()
            .filter(|p| !matches!(p.action, Action::Update | Action::Dependency))
            .map(|p| Reference::new(p.name.clone(), p.offered.clone()))
            .chain(stored.iter().cloned())
            .collect();
        let add = with_deps::missing(&members, &deployed, &offered)
            .with_context(|| format!("nor does the channel {shown} offer a matching version"))?;
        let mut added = false;
        for r in add {
            // From the channel when it offers that version; otherwise `deploy --with-deps`
            // takes it from the store.
            if let Some(p) = stages.iter_mut().find(|p| p.name == r.name && p.offered == r.version) {
                p.action = Action::Dependency;
                added = true;
            }
        }
        if !added {
            break;
        }
    }
    drop(temp);
    let sources: Vec<Source> = stages
        .iter()
        .filter(|p| matches!(p.action, Action::Update | Action::Dependency))
        .map(|p| Source::Registry { reference: image_ref(p), options: Box::new(options.clone()) })
        .collect();
    report.deploy = Some(deploy::deploy(ctx, &sources, Batch::Whole, true, true)?);
    remember(&mut seen)?;
    report.stages = std::mem::take(&mut stages);
    Ok(report)
}

/// The channel document as fetched, with what its manifest says of its signature.
struct Document {
    bytes: Vec<u8>,
    signature_b64: String,
    key_id_hint: Option<String>,
}

/// Fetches the manifest `channel_ref` and its one layer, the document (bounded, hashed).
fn fetch_document(client: &Client, channel_ref: &RegistryRef, temp: &TempLayout) -> Result<(Document, Digest)> {
    let shown = channel_ref.to_string();
    client.ping().map_err(|e| registry_error(e, &shown))?;
    let tag = channel_ref.tag.as_deref().unwrap_or_default();
    let fetched =
        client.get_manifest(&channel_ref.repository, tag).map_err(|e| registry_error(e, &shown))?.ok_or_else(|| {
            anyhow::anyhow!(
                "{shown}: no such channel in the registry (publish one with `op-dbus-image channel set`); nothing was \
                 changed"
            )
        })?;
    let m = ImageManifest::from_bytes(&fetched.bytes).map_err(|e| Malformed(format!("{shown}: {e}")))?;
    if m.artifact_type.as_deref() != Some(CHANNEL_ARTIFACT_TYPE) {
        return Err(Malformed(format!(
            "{shown} is not a channel (artifactType {:?}, expected {CHANNEL_ARTIFACT_TYPE})",
            m.artifact_type
        ))
        .into());
    }
    let [layer] = m.layers.as_slice() else {
        return Err(Malformed(format!("{shown}: a channel manifest has one layer, this one {}", m.layers.len())).into());
    };
    if layer.media_type != CHANNEL_MEDIA_TYPE || layer.size > MAX_CHANNEL_BYTES {
        return Err(Malformed(format!(
            "{shown}: the layer is {:?} of {} bytes, not a channel document of at most {MAX_CHANNEL_BYTES} bytes",
            layer.media_type, layer.size
        ))
        .into());
    }
    client
        .fetch_blob(&channel_ref.repository, layer, &temp.layout, MAX_CHANNEL_BYTES)
        .map_err(|e| registry_error(e, &shown))?;
    let bytes = temp.layout.read_blob(&layer.digest, MAX_CHANNEL_BYTES)?;
    let doc = Document {
        bytes,
        signature_b64: layer.annotation(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap_or_default().to_owned(),
        key_id_hint: layer.annotation(oci::ANNOTATION_KEY_ID).map(str::to_owned),
    };
    Ok((doc, layer.digest))
}

/// The key whose signature of the document counts: trusted, not revoked, and allowed by
/// its scope to sign every stage the document names. Refused (exit 3) otherwise.
fn verify_document(doc: &Document, trust: &Trust, shown: &str) -> Result<keys::KeyId> {
    let refuse = |why: String| -> anyhow::Error {
        Untrusted(format!("the channel document {shown} is refused: {why}; nothing was changed")).into()
    };
    let signature = BASE64_STANDARD
        .decode(doc.signature_b64.as_bytes())
        .ok()
        .filter(|s| s.len() == 64)
        .ok_or_else(|| refuse("it carries no signature (base64 of 64 bytes)".to_owned()))?;
    let mut keys: Vec<&keys::trust::TrustedKey> = trust.keys.iter().collect();
    // The key the signer names is tried first; any trusted key may verify.
    keys.sort_by_key(|k| Some(k.key.key_id().to_string()) != doc.key_id_hint);
    let Some(key) = keys.into_iter().find(|k| k.key.verify(&doc.bytes, &signature).is_ok()) else {
        let named = trust.keys.iter().find(|k| Some(k.key.key_id().to_string()) == doc.key_id_hint);
        return Err(match named {
            Some(k) => refuse(format!(
                "its signature names trusted key {} ({}) but does not verify with it: the document or the \
                 signature was altered",
                k.key.key_id(),
                k.source.display()
            )),
            None => refuse(format!(
                "it is signed by {}, not a key of the trust store (add the builder's key with `op-dbus-stage trust \
                 add KEY.pub`)",
                doc.key_id_hint.as_deref().map_or("an unnamed key".to_owned(), |h| format!("key {h:?}"))
            )),
        });
    };
    let id = key.key.key_id();
    if trust.policy.is_revoked(&id) {
        return Err(refuse(format!("it is signed by key {id}, which is revoked in the trust policy")));
    }
    // The scope is checked once the document parses; a key may sign only channels of
    // stages it may sign.
    if let Ok(c) = Channel::from_bytes(&doc.bytes)
        && let Some(out) = c.stages.iter().find(|s| !trust.policy.in_scope(&id, &s.name))
    {
        return Err(refuse(format!("key {id} may not sign {} (its scope in the trust policy)", out.name)));
    }
    Ok(id)
}

/// The host's machine id, `/etc/machine-id` under the root.
fn machine_id(ctx: &Ctx) -> Result<String> {
    let shown = ctx.host.root.join(MACHINE_ID);
    let bytes = receive::read_in_root(&ctx.host, MACHINE_ID, 4096)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} does not exist, and the channel's rollout places hosts by it: create it with \
             `systemd-machine-id-setup` (or `systemd-machine-id-setup --root ROOT`); nothing was changed",
            shown.display()
        )
    })?;
    formats::channel::parse_machine_id(&bytes).ok_or_else(|| {
        Malformed(format!("{} is not a machine id (32 lowercase hex digits); nothing was changed", shown.display()))
            .into()
    })
}

fn registry_error(e: registry::RegistryError, what: &str) -> anyhow::Error {
    receive::registry_error(e, what)
}

/// The text `update` prints.
pub fn render(r: &UpdateReport) -> String {
    let mut s = format!(
        "channel {} ({}) signed by {}, rollout {}%{}\n",
        r.channel,
        r.created,
        r.signer,
        r.rollout,
        match (r.bucket, r.in_rollout) {
            (Some(b), true) => format!(": this host (place {b}) is in it"),
            (Some(b), false) => format!(": this host (place {b}) is not in it yet; nothing to do"),
            (None, true) => String::new(),
            (None, false) => ": nothing to do".to_owned(),
        }
    );
    for p in &r.stages {
        let running = p.running.as_ref().map_or("not deployed".to_owned(), |v| format!("running {v}"));
        let what = match p.action {
            Action::Update => {
                if r.dry_run {
                    "would update"
                } else {
                    "update"
                }
            }
            Action::Dependency => {
                if r.dry_run {
                    "would deploy (needed)"
                } else {
                    "deploy (needed)"
                }
            }
            Action::UpToDate => "up to date",
            Action::NewerRunning => "newer running, kept",
            Action::NotDeployed => "not deployed here (--all installs it)",
            Action::OutsideRollout => "outside the rollout",
        };
        s += &format!("  {} {} ({running}): {what}\n", p.name, p.offered);
    }
    if r.deploy.is_none() && r.in_rollout {
        s += "nothing to deploy\n";
    }
    s
}
