//! Deciding whether an image's signatures satisfy the trust store and the [`Policy`].
//!
//! An image carries zero or more signature layers (docs/formats.md): each is a simple-signing
//! payload and the base64 ed25519 signature over its exact bytes, optionally with the id of
//! the key that made it. [`evaluate`] counts the signatures that hold:
//!
//! ```text
//! for each signature layer
//!   base64 → 64 bytes                      else: corrupt (malformed input)
//!   verifies over the payload bytes with   hinted trusted key first, then every trusted key
//!     a trusted key                        else: untrusted, or altered if the hint names a trusted key
//!   key not revoked                        policy `revoked`
//!   payload parses                         else: malformed (malformed input)
//!   names this digest, name and version    else: tampering
//!   stage name inside the key's scope      policy `[scopes]`
//!   not expired at `now`                   unless --allow-expired
//!   → counts once for its key
//! distinct counting keys ≥ policy.threshold(name)   else: the most telling reason
//! ```
//!
//! Where the stage may then place files is the admission check's to decide, with
//! [`Verdict::may_place`]: a key's `[scope_prefixes]` narrow the targets it vouches for.
//!
//! A signature that does not count does not spoil the others: an image signed by a
//! trusted key and also by an unknown one (or carrying a corrupt extra layer) passes.
//! Verification needs no network; the clock is only read for `expires`, through `now`.
//!
//! The `docker-reference` a payload names is not checked: an image is identified by its
//! manifest digest, stage name and version, whatever registry it travelled through.
//!
//! ```
//! use std::time::SystemTime;
//! use base64::prelude::{BASE64_STANDARD, Engine as _};
//! use keys::{PrivateKey, policy::Policy, simple_signing::SimpleSigning};
//! use keys::trust::{self, SignatureLayer, TrustedKey};
//!
//! let key = PrivateKey::generate()?;
//! let (digest, name, version) =
//!     (formats::Digest::of(b"manifest"), "stage-1-core-dbus".parse()?, "1.0.0".parse()?);
//! let payload = SimpleSigning::new("registry.example/op-dbus", digest, &name, &version, None).to_bytes();
//! let layer = SignatureLayer {
//!     signature_b64: BASE64_STANDARD.encode(key.sign(&payload)),
//!     payload,
//!     key_id_hint: Some(key.key_id().to_string()),
//! };
//! let trusted = [TrustedKey { key: key.public(), source: "/etc/op-dbus/trusted-keys/ci.pub".into() }];
//! let subject = trust::Subject { digest: &digest, name: &name, version: &version, signatures: &[layer] };
//! let verdict = trust::evaluate(&trusted, &Policy::default(), subject, trust::Options::at(SystemTime::now()))?;
//! assert_eq!(verdict.signers, [key.key_id()]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use formats::path::TargetPath;
use formats::{Digest, Reference, StageName, Version};
use serde::Serialize;

use crate::policy::Policy;
use crate::simple_signing::{Expires, MAX_PAYLOAD, SimpleSigning};
use crate::{KeyError, KeyId, PublicKey};

/// A key of the trust store, with the `.pub` file it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub source: PathBuf,
}

/// One signature layer of an image's `.sig` manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The simple-signing payload: the layer's bytes, exactly as signed.
    pub payload: Vec<u8>,
    /// The annotation `dev.cosignproject.cosign/signature`: standard base64 of 64 bytes.
    pub signature_b64: String,
    /// The key id the signer claims, if any; only decides which key is tried first.
    pub key_id_hint: Option<String>,
}

/// A positive verdict: the keys whose signatures counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Distinct keys whose valid signatures counted, in the order of the signature layers.
    pub signers: Vec<KeyId>,
}

impl Verdict {
    /// Whether the keys that counted may place a file at `target` of stage `name`: as many
    /// of them as the stage's threshold must each allow it by their scope
    /// ([`Policy::key_may_place`]). So a stage signed only by keys whose scope narrows the
    /// prefixes places files only under those, and a threshold of two needs two keys that
    /// vouch for each target. The host's [`Policy::target_allowed`] is checked apart.
    pub fn may_place(&self, policy: &Policy, name: &StageName, target: &TargetPath) -> bool {
        let vouching = self.signers.iter().filter(|k| policy.key_may_place(k, target)).count();
        u32::try_from(vouching).unwrap_or(u32::MAX) >= policy.threshold(name)
    }
}

/// What a signed payload names that differs from the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedField {
    Digest,
    Name,
    Version,
    /// `critical.identity.docker-reference`: the repository the signer published to.
    Repository,
}

impl fmt::Display for SignedField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignedField::Digest => "manifest digest",
            SignedField::Name => "stage name",
            SignedField::Version => "version",
            SignedField::Repository => "repository (docker-reference)",
        })
    }
}

/// Why one signature layer did not count. `index` is the layer's position from 0; messages
/// number layers from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// The signature is not base64 of 64 bytes, or the payload is oversized.
    Corrupt {
        index: usize,
        reason: String,
    },
    /// No trusted key verifies it; `hint` is the key id the layer claims, if it is one.
    Untrusted {
        index: usize,
        hint: Option<KeyId>,
    },
    /// The layer names a trusted key, which does not verify it (nor does any other).
    BadSignature {
        index: usize,
        key_id: KeyId,
        key_file: PathBuf,
    },
    Revoked {
        key_id: KeyId,
        key_file: PathBuf,
    },
    /// Verified, but the payload is not a valid simple-signing payload.
    MalformedPayload {
        key_id: KeyId,
        reason: String,
    },
    /// Verified, but for another image: `signed` is what the payload names.
    Tampered {
        key_id: KeyId,
        field: SignedField,
        signed: String,
        actual: String,
    },
    OutOfScope {
        key_id: KeyId,
        key_file: PathBuf,
        scopes: Vec<String>,
    },
    Expired {
        key_id: KeyId,
        expires: Expires,
    },
    /// Another signature by the same key already counted.
    Duplicate {
        key_id: KeyId,
    },
}

impl Finding {
    /// How telling this finding is when no signature counted; the highest is reported.
    fn rank(&self) -> u8 {
        match self {
            Finding::Tampered { .. } => 9,
            Finding::BadSignature { .. } => 8,
            Finding::Revoked { .. } => 7,
            Finding::OutOfScope { .. } => 6,
            Finding::Expired { .. } => 5,
            Finding::MalformedPayload { .. } => 4,
            Finding::Untrusted { .. } => 3,
            Finding::Corrupt { .. } => 2,
            Finding::Duplicate { .. } => 1,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Corrupt { index, reason } => write!(f, "signature {} is corrupt ({reason})", index + 1),
            Finding::Untrusted { index, hint: Some(id) } => {
                write!(f, "signature {} is by key {id}, not trusted", index + 1)
            }
            Finding::Untrusted { index, hint: None } => write!(f, "signature {} is by a key not trusted", index + 1),
            Finding::BadSignature { index, key_id, .. } => {
                write!(f, "signature {} names key {key_id} but does not verify with it", index + 1)
            }
            Finding::Revoked { key_id, .. } => write!(f, "key {key_id} is revoked"),
            Finding::MalformedPayload { key_id, reason } => {
                write!(f, "the payload signed by key {key_id} is malformed ({reason})")
            }
            Finding::Tampered { key_id, field, signed, .. } => {
                write!(f, "key {key_id} signed another {field} ({signed})")
            }
            Finding::OutOfScope { key_id, scopes, .. } => {
                write!(f, "key {key_id} may only sign {}", scopes.join(", "))
            }
            Finding::Expired { key_id, expires } => write!(f, "the signature by key {key_id} expired at {expires}"),
            Finding::Duplicate { key_id } => write!(f, "key {key_id} signed more than once, counted once"),
        }
    }
}

/// Why an image's signatures do not satisfy the trust store and policy.
///
/// [`TrustError::is_rejected`] is true when the signatures were checked and said no (exit 3);
/// [`TrustError::is_malformed`] when the signature data itself is broken (exit 7).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error(
        "{image} ({digest}) has no signatures: sign it on the build machine with \
         `op-dbus-image sign {image}` and deploy it again"
    )]
    NoSignatures { image: Reference, digest: Digest },

    #[error(
        "{image} is signed only by keys not in the trust store ({}): if you trust the signer, \
         add its public key with `op-dbus-stage trust add KEY.pub`; otherwise do not install it",
        describe_untrusted(key_ids, *unnamed)
    )]
    Untrusted { image: Reference, key_ids: Vec<KeyId>, unnamed: usize },

    #[error(
        "a signature of {image} names trusted key {key_id} ({}) but does not verify with it: \
         the signed payload or the signature was altered; do not install this image, fetch it again from its source",
        key_file.display()
    )]
    BadSignature { image: Reference, key_id: KeyId, key_file: PathBuf },

    #[error(
        "{image} is signed by key {key_id} ({}), which is revoked in the trust policy: \
         have the image signed with a current key",
        key_file.display()
    )]
    Revoked { image: Reference, key_id: KeyId, key_file: PathBuf },

    #[error(
        "key {key_id} ({}) may only sign stages matching {}, not {stage}: sign {image} with a key \
         allowed for it, or widen the key's scope with `op-dbus-stage trust add {} --scope GLOB`",
        key_file.display(), scopes.join(", "), key_file.display(), stage = image.name
    )]
    OutOfScope { image: Reference, key_id: KeyId, key_file: PathBuf, scopes: Vec<String> },

    #[error(
        "the signature by key {key_id} is for {field} {signed}, but {image} has {field} {actual}: \
         the image was altered or relabelled after signing (tampering); do not install it, and find \
         out where it came from"
    )]
    Tampered { image: Reference, key_id: KeyId, field: SignedField, signed: String, actual: String },

    #[error(
        "the signature of {image} by key {key_id} expired at {expires}: have the image signed \
         again, or pass `--allow-expired` to install it anyway"
    )]
    Expired { image: Reference, key_id: KeyId, expires: Expires },

    #[error(
        "{image} needs signatures by {need} distinct trusted keys and has {have}{}{}: have it \
         co-signed (`op-dbus-image sign {image}` with another trusted key)",
        by(signers),
        not_counted_list(not_counted)
    )]
    BelowThreshold { image: Reference, have: usize, need: u32, signers: Vec<KeyId>, not_counted: Vec<Finding> },

    #[error("signature {} of {image} is corrupt: {reason}; fetch the image again from its source", index + 1)]
    CorruptSignature { image: Reference, index: usize, reason: String },

    #[error(
        "the payload of {image} signed by key {key_id} is malformed: {reason}; \
         have the image signed again with `op-dbus-image sign`"
    )]
    MalformedPayload { image: Reference, key_id: KeyId, reason: String },
}

impl TrustError {
    /// True when the signatures were checked and the verdict is no: the installer's
    /// "signature or trust failure" (exit 3).
    pub fn is_rejected(&self) -> bool {
        !self.is_malformed()
    }

    /// True when the signature data could not be checked because it is broken (corrupt
    /// base64, a payload that does not parse): "malformed or corrupt input" (exit 7).
    pub fn is_malformed(&self) -> bool {
        matches!(self, TrustError::CorruptSignature { .. } | TrustError::MalformedPayload { .. })
    }

    fn from_finding(image: Reference, finding: Finding, findings: &[Finding]) -> Self {
        match finding {
            Finding::Corrupt { index, reason } => TrustError::CorruptSignature { image, index, reason },
            Finding::Untrusted { .. } | Finding::Duplicate { .. } => {
                let hints = findings.iter().filter_map(|f| match f {
                    Finding::Untrusted { hint, .. } => Some(*hint),
                    _ => None,
                });
                let mut key_ids = Vec::new();
                let mut unnamed = 0;
                for hint in hints {
                    match hint {
                        Some(id) if !key_ids.contains(&id) => key_ids.push(id),
                        Some(_) => {}
                        None => unnamed += 1,
                    }
                }
                TrustError::Untrusted { image, key_ids, unnamed }
            }
            Finding::BadSignature { key_id, key_file, .. } => TrustError::BadSignature { image, key_id, key_file },
            Finding::Revoked { key_id, key_file } => TrustError::Revoked { image, key_id, key_file },
            Finding::MalformedPayload { key_id, reason } => TrustError::MalformedPayload { image, key_id, reason },
            Finding::Tampered { key_id, field, signed, actual } => {
                TrustError::Tampered { image, key_id, field, signed, actual }
            }
            Finding::OutOfScope { key_id, key_file, scopes } => {
                TrustError::OutOfScope { image, key_id, key_file, scopes }
            }
            Finding::Expired { key_id, expires } => TrustError::Expired { image, key_id, expires },
        }
    }
}

fn describe_untrusted(key_ids: &[KeyId], unnamed: usize) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !key_ids.is_empty() {
        let ids: Vec<String> = key_ids.iter().map(KeyId::to_string).collect();
        parts.push(format!("key id {}", ids.join(", ")));
    }
    match unnamed {
        0 => {}
        1 => parts.push("1 signature without a key id".into()),
        n => parts.push(format!("{n} signatures without a key id")),
    }
    parts.join("; ")
}

fn by(signers: &[KeyId]) -> String {
    if signers.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = signers.iter().map(KeyId::to_string).collect();
    format!(" (by {})", ids.join(", "))
}

fn not_counted_list(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return String::new();
    }
    let list: Vec<String> = findings.iter().map(Finding::to_string).collect();
    format!("; not counted: {}", list.join("; "))
}

/// What [`evaluate`] judges: an image (its manifest digest, signed name and version) and
/// the signatures found for it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub digest: &'a Digest,
    pub name: &'a StageName,
    pub version: &'a Version,
    pub signatures: &'a [SignatureLayer],
}

/// How [`evaluate`] judges: the time expiry is checked against, and whether a signature
/// that has expired still counts (`--allow-expired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub now: SystemTime,
    pub allow_expired: bool,
}

impl Options {
    /// Expiry checked at `now`, expired signatures not counted.
    pub fn at(now: SystemTime) -> Options {
        Options { now, allow_expired: false }
    }
}

/// What a signature's `critical.identity.docker-reference` must name.
///
/// cosign records there the repository the image was signed for (`HOST[:PORT]/REPO`), and
/// verifiers that pull from a registry check it against the repository they pulled from,
/// so that a registry cannot hand over an image signed for another repository (another
/// stage) under the name asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// No repository to compare with: an archive, a layout directory or the local store,
    /// whose tags (`NAME:VERSION`) are checked against the signed name and version.
    Any,
    /// The registry repository the image was pulled from, `HOST[:PORT]/REPO`.
    Repository(&'a str),
}

impl Identity<'_> {
    /// Whether `signed`, a docker-reference, names this identity for stage `stage`.
    ///
    /// The repository path (`op-dbus/core`) must be the one asked for; the registry host is
    /// not compared, because it is a transport detail (a mirror, a pull-through proxy, one
    /// registry reachable as `localhost:5000` and `10.0.0.5:5000`), while the path names the
    /// stage: a registry can still serve a copy of what was signed for that repository, and
    /// the tag and downgrade checks apply to it, but never another repository's image. A
    /// tag or digest on the signed reference is ignored (cosign writes none). Besides
    /// `[HOST/]REPO`, the builder's pre-push identity is accepted: a bare `NAME` (how
    /// `op-dbus-image build`/`sign` name an image of the local store) when `NAME` is the
    /// stage and the last component of REPO, so that an image copied as is (`skopeo copy`)
    /// into `HOST/.../NAME` deploys, and never under another repository name.
    pub fn matches(&self, signed: &str, stage: &StageName) -> bool {
        let Identity::Repository(repo) = self else { return true };
        let signed = signed.split_once('@').map_or(signed, |(r, _)| r);
        let last_slash = signed.rfind('/').map_or(0, |i| i + 1);
        let signed = match signed[last_slash..].find(':') {
            Some(i) => &signed[..last_slash + i],
            None => signed,
        };
        let wanted = repository_path(repo);
        if signed.contains('/') {
            return repository_path(signed) == wanted;
        }
        signed == stage.as_str() && wanted.rsplit('/').next() == Some(stage.as_str())
    }
}

/// The repository path of a reference `[HOST[:PORT]/]PATH`: the first component is a host
/// when it has a `.` or a `:` or is `localhost` (docker's rule).
fn repository_path(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => rest,
        _ => reference,
    }
}

/// What every signature is checked against.
struct Expected<'a> {
    trusted: &'a [TrustedKey],
    policy: &'a Policy,
    digest: &'a Digest,
    name: &'a StageName,
    version: &'a Version,
    identity: Identity<'a>,
    now: SystemTime,
    allow_expired: bool,
}

/// Decides whether the signatures of `subject` (the image with manifest digest `digest`,
/// stage `name` and `version`) satisfy the trust store `trusted` and `policy` at
/// `options.now`.
///
/// A signature counts when its base64 decodes to 64 bytes, it verifies strictly over the
/// exact payload bytes with a trusted key (the hinted key first, then every other), that
/// key is not revoked, the payload parses and names exactly `digest`, `name` and
/// `version`, `name` is inside the key's scope, and the payload has not expired at `now`
/// (unless `options.allow_expired`). Each key counts once; the number of counting keys must reach
/// [`Policy::threshold`]. On failure the error is the most telling reason: tampering
/// first, then a signature by a trusted key that does not verify, revocation, scope,
/// expiry, a malformed payload, untrusted keys, and corrupt signatures last.
pub fn evaluate(
    trusted: &[TrustedKey],
    policy: &Policy,
    subject: Subject<'_>,
    options: Options,
) -> Result<Verdict, TrustError> {
    evaluate_as(trusted, policy, subject, Identity::Any, options)
}

/// Like [`evaluate`], and a signature counts only when its signed docker-reference names
/// `identity` (see [`Identity::matches`]); one that names another repository is
/// [`SignedField::Repository`] tampering (exit 3).
pub fn evaluate_as(
    trusted: &[TrustedKey],
    policy: &Policy,
    subject: Subject<'_>,
    identity: Identity<'_>,
    options: Options,
) -> Result<Verdict, TrustError> {
    let Subject { digest: image_digest, name, version, signatures } = subject;
    let Options { now, allow_expired } = options;
    let image = Reference::new(name.clone(), version.clone());
    if signatures.is_empty() {
        return Err(TrustError::NoSignatures { image, digest: *image_digest });
    }
    let expected = Expected { trusted, policy, digest: image_digest, name, version, identity, now, allow_expired };
    let mut signers: Vec<KeyId> = Vec::new();
    let mut findings = Vec::new();
    for (index, layer) in signatures.iter().enumerate() {
        match check(&expected, index, layer) {
            Ok(key_id) if signers.contains(&key_id) => findings.push(Finding::Duplicate { key_id }),
            Ok(key_id) => signers.push(key_id),
            Err(finding) => findings.push(finding),
        }
    }
    let need = policy.threshold(name);
    if signers.len() >= need as usize {
        return Ok(Verdict { signers });
    }
    if signers.is_empty() {
        let top = findings.iter().max_by_key(|f| f.rank()).cloned().expect("every signature gave a finding");
        return Err(TrustError::from_finding(image, top, &findings));
    }
    Err(TrustError::BelowThreshold { image, have: signers.len(), need, signers, not_counted: findings })
}

/// Checks one signature layer; the key whose signature counts, or why it does not.
fn check(expected: &Expected<'_>, index: usize, layer: &SignatureLayer) -> Result<KeyId, Finding> {
    let corrupt = |reason: String| Finding::Corrupt { index, reason };
    let signature = BASE64_STANDARD
        .decode(&layer.signature_b64)
        .map_err(|e| corrupt(format!("the signature annotation is not base64: {e}")))?;
    if signature.len() != 64 {
        return Err(corrupt(format!("an ed25519 signature is 64 bytes, this one is {}", signature.len())));
    }
    if layer.payload.len() > MAX_PAYLOAD {
        return Err(corrupt(format!("the payload is {} bytes, more than {MAX_PAYLOAD}", layer.payload.len())));
    }

    let hint = layer.key_id_hint.as_deref().and_then(|h| h.trim().parse::<KeyId>().ok());
    let hinted = expected.trusted.iter().find(|t| Some(t.key.key_id()) == hint);
    let others = expected.trusted.iter().filter(|t| Some(t.key.key_id()) != hint);
    let signer =
        hinted.into_iter().chain(others).find(|t| t.key.verify(&layer.payload, &signature).is_ok()).ok_or_else(
            || match hinted {
                Some(t) => Finding::BadSignature { index, key_id: t.key.key_id(), key_file: t.source.clone() },
                None => Finding::Untrusted { index, hint },
            },
        )?;
    let key_id = signer.key.key_id();

    if expected.policy.is_revoked(&key_id) {
        return Err(Finding::Revoked { key_id, key_file: signer.source.clone() });
    }

    let malformed = |e: KeyError| Finding::MalformedPayload {
        key_id,
        reason: match e {
            KeyError::MalformedPayload { reason } => reason,
            e => e.to_string(),
        },
    };
    let payload = SimpleSigning::parse(&layer.payload).map_err(malformed)?;
    let (digest, name, version) =
        (payload.manifest_digest(), payload.name().map_err(malformed)?, payload.version().map_err(malformed)?);
    let expires = payload.expires().map_err(malformed)?;
    let tampered = |field, signed: &dyn fmt::Display, actual: &dyn fmt::Display| Finding::Tampered {
        key_id,
        field,
        signed: signed.to_string(),
        actual: actual.to_string(),
    };
    if digest != *expected.digest {
        return Err(tampered(SignedField::Digest, &digest, expected.digest));
    }
    if name != *expected.name {
        return Err(tampered(SignedField::Name, &name, expected.name));
    }
    if version != *expected.version {
        return Err(tampered(SignedField::Version, &version, expected.version));
    }
    let signed_repo = &payload.critical.identity.docker_reference;
    if let Identity::Repository(repo) = expected.identity
        && !expected.identity.matches(signed_repo, expected.name)
    {
        return Err(tampered(SignedField::Repository, signed_repo, &repo));
    }

    if !expected.policy.in_scope(&key_id, expected.name) {
        let scopes = expected.policy.scope(&key_id).unwrap_or_default().to_vec();
        return Err(Finding::OutOfScope { key_id, key_file: signer.source.clone(), scopes });
    }

    if let Some(expires) = expires
        && !expected.allow_expired
        && expires.is_expired_at(expected.now)
    {
        return Err(Finding::Expired { key_id, expires });
    }
    Ok(key_id)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::PrivateKey;

    const NAME: &str = "stage-1-core-dbus";
    const VERSION: &str = "1.0.0";

    struct Fixture {
        digest: Digest,
        name: StageName,
        version: Version,
        now: SystemTime,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                digest: Digest::of(b"the image manifest"),
                name: NAME.parse().unwrap(),
                version: VERSION.parse().unwrap(),
                now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            }
        }

        fn payload(&self) -> Vec<u8> {
            self.payload_for(self.digest, NAME, VERSION, None)
        }

        fn payload_for(&self, digest: Digest, name: &str, version: &str, expires: Option<&str>) -> Vec<u8> {
            let expires = expires.map(|e| e.parse::<Expires>().unwrap());
            SimpleSigning::new(
                "registry.example/op-dbus/stage-1-core-dbus",
                digest,
                &name.parse().unwrap(),
                &version.parse().unwrap(),
                expires.as_ref(),
            )
            .to_bytes()
        }

        fn evaluate(
            &self,
            trusted: &[TrustedKey],
            policy: &Policy,
            layers: &[SignatureLayer],
        ) -> Result<Verdict, TrustError> {
            let subject =
                Subject { digest: &self.digest, name: &self.name, version: &self.version, signatures: layers };
            evaluate(trusted, policy, subject, Options::at(self.now))
        }
    }

    fn sign(key: &PrivateKey, payload: Vec<u8>) -> SignatureLayer {
        SignatureLayer {
            signature_b64: BASE64_STANDARD.encode(key.sign(&payload)),
            payload,
            key_id_hint: Some(key.key_id().to_string()),
        }
    }

    fn trusted(keys: &[&PrivateKey]) -> Vec<TrustedKey> {
        keys.iter()
            .map(|k| TrustedKey {
                key: k.public(),
                source: format!("/etc/op-dbus/trusted-keys/{}.pub", k.key_id()).into(),
            })
            .collect()
    }

    fn parse_policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("/etc/op-dbus/stage.toml")).unwrap()
    }

    fn key() -> PrivateKey {
        PrivateKey::generate().unwrap()
    }

    #[track_caller]
    fn says(err: &TrustError, needles: &[&str]) {
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "{msg:?} should contain {n:?}");
        }
    }

    #[test]
    fn one_trusted_signature() {
        let f = Fixture::new();
        let a = key();
        let verdict = f.evaluate(&trusted(&[&a]), &Policy::default(), &[sign(&a, f.payload())]).unwrap();
        assert_eq!(verdict.signers, [a.key_id()]);
    }

    #[test]
    fn hint_is_only_a_hint() {
        let f = Fixture::new();
        let (a, b) = (key(), key());
        let store = trusted(&[&a, &b]);
        for hint in [None, Some("garbage".to_owned()), Some(a.key_id().to_string()), Some(key().key_id().to_string())] {
            let layer = SignatureLayer { key_id_hint: hint.clone(), ..sign(&b, f.payload()) };
            let verdict = f.evaluate(&store, &Policy::default(), &[layer]).unwrap();
            assert_eq!(verdict.signers, [b.key_id()], "{hint:?}");
        }
    }

    #[test]
    fn repository_identity_must_match_the_registry_repository() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        let stage: StageName = NAME.parse().unwrap();
        let repo = Identity::Repository("registry.example/op-dbus/stage-1-core-dbus");
        for ok in [
            "registry.example/op-dbus/stage-1-core-dbus",
            "registry.example/op-dbus/stage-1-core-dbus:1.0.0",
            "registry.example/op-dbus/stage-1-core-dbus@sha256:00",
            "mirror.example:5000/op-dbus/stage-1-core-dbus",
            "op-dbus/stage-1-core-dbus",
            NAME,
        ] {
            assert!(repo.matches(ok, &stage), "{ok}");
        }
        for bad in [
            "registry.example/op-dbus/core",
            "registry.example/other/stage-1-core-dbus",
            "registry.example/op-dbus",
            "registry.example/op-dbus/stage-1-core-dbus/x",
            "stage-2-plugins",
            "registry.example",
        ] {
            assert!(!repo.matches(bad, &stage), "{bad}");
        }
        // `localhost` is a registry host with or without a port, as docker has it.
        for ok in ["localhost/op-dbus/stage-1-core-dbus", "localhost:5000/op-dbus/stage-1-core-dbus:1.0.0"] {
            assert!(repo.matches(ok, &stage), "{ok}");
        }
        // Hostile references are refused, not a crash.
        for bad in ["/stage-1-core-dbus", "/", ":/stage-1-core-dbus", "host:/stage-1-core-dbus:1"] {
            assert!(!repo.matches(bad, &stage), "{bad}");
        }
        // A bare NAME only where REPO ends with NAME.
        assert!(!Identity::Repository("registry.example/op-dbus/core").matches(NAME, &stage));
        assert!(Identity::Any.matches("anything/at/all", &stage));

        let eval = |identity| {
            let signatures = [sign(&a, f.payload())];
            let subject = Subject { digest: &f.digest, name: &f.name, version: &f.version, signatures: &signatures };
            evaluate_as(&store, &Policy::default(), subject, identity, Options::at(f.now))
        };
        assert!(eval(repo).is_ok());
        assert!(eval(Identity::Any).is_ok());
        let err = eval(Identity::Repository("registry.example/op-dbus/core")).unwrap_err();
        assert!(
            matches!(err, TrustError::Tampered { field: SignedField::Repository, .. }) && err.is_rejected(),
            "{err}"
        );
        says(&err, &["registry.example/op-dbus/stage-1-core-dbus", "registry.example/op-dbus/core"]);
    }

    #[test]
    fn no_signatures() {
        let f = Fixture::new();
        let err = f.evaluate(&trusted(&[&key()]), &Policy::default(), &[]).unwrap_err();
        assert!(matches!(err, TrustError::NoSignatures { .. }) && err.is_rejected(), "{err}");
        says(&err, &["stage-1-core-dbus:1.0.0", "no signatures", "op-dbus-image sign stage-1-core-dbus:1.0.0"]);
    }

    #[test]
    fn untrusted_keys_are_listed() {
        let f = Fixture::new();
        let (a, stranger) = (key(), key());
        let mut unnamed = sign(&stranger, f.payload());
        unnamed.key_id_hint = None;
        let layers = [sign(&stranger, f.payload()), unnamed];
        let err = f.evaluate(&trusted(&[&a]), &Policy::default(), &layers).unwrap_err();
        assert!(
            matches!(err, TrustError::Untrusted { ref key_ids, unnamed: 1, .. } if key_ids == &[stranger.key_id()])
        );
        assert!(err.is_rejected() && !err.is_malformed());
        says(
            &err,
            &[&stranger.key_id().to_string(), "1 signature without a key id", "op-dbus-stage trust add KEY.pub"],
        );
        // The same stranger twice is named once.
        let twice = [sign(&stranger, f.payload()), sign(&stranger, f.payload())];
        let err = f.evaluate(&trusted(&[&a]), &Policy::default(), &twice).unwrap_err();
        assert!(
            matches!(err, TrustError::Untrusted { ref key_ids, unnamed: 0, .. } if key_ids == &[stranger.key_id()]),
            "{err}"
        );

        let err = f.evaluate(&[], &Policy::default(), &[sign(&a, f.payload())]).unwrap_err();
        assert!(matches!(err, TrustError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn co_signing_threshold_two() {
        let f = Fixture::new();
        let (a, b, c) = (key(), key(), key());
        let store = trusted(&[&a, &b]);
        let policy = parse_policy("[[threshold]]\nstages = \"stage-1-*\"\nsignatures = 2\n");

        let verdict = f.evaluate(&store, &policy, &[sign(&a, f.payload()), sign(&b, f.payload())]).unwrap();
        assert_eq!(verdict.signers, [a.key_id(), b.key_id()]);

        let err = f.evaluate(&store, &policy, &[sign(&a, f.payload()), sign(&c, f.payload())]).unwrap_err();
        assert!(
            matches!(err, TrustError::BelowThreshold { have: 1, need: 2, ref signers, ref not_counted, .. }
                if signers == &[a.key_id()] && not_counted.len() == 1),
            "{err}"
        );
        assert!(err.is_rejected());
        says(
            &err,
            &["needs signatures by 2 distinct trusted keys and has 1", &format!("(by {})", a.key_id()), "co-signed"],
        );
        says(&err, &[&format!("signature 2 is by key {}, not trusted", c.key_id())]);

        // Another stage needs only one.
        let other: StageName = "stage-2-plugins".parse().unwrap();
        let payload = f.payload_for(f.digest, "stage-2-plugins", VERSION, None);
        let subject =
            Subject { digest: &f.digest, name: &other, version: &f.version, signatures: &[sign(&a, payload)] };
        evaluate(&store, &policy, subject, Options::at(f.now)).unwrap();
    }

    #[test]
    fn duplicate_signatures_by_one_key_count_once() {
        let f = Fixture::new();
        let a = key();
        let policy = parse_policy("[[threshold]]\nstages = \"*\"\nsignatures = 2\n");
        let layers = [sign(&a, f.payload()), sign(&a, f.payload()), sign(&a, f.payload())];
        let err = f.evaluate(&trusted(&[&a]), &policy, &layers).unwrap_err();
        assert!(matches!(err, TrustError::BelowThreshold { have: 1, need: 2, .. }), "{err}");
        says(&err, &["signed more than once, counted once"]);

        let verdict = f.evaluate(&trusted(&[&a]), &Policy::default(), &layers).unwrap();
        assert_eq!(verdict.signers, [a.key_id()]);
    }

    #[test]
    fn revoked_key() {
        let f = Fixture::new();
        let (a, b) = (key(), key());
        let store = trusted(&[&a, &b]);
        let policy = parse_policy(&format!("revoked = [\"{}\"]\n", a.key_id()));
        let err = f.evaluate(&store, &policy, &[sign(&a, f.payload())]).unwrap_err();
        assert!(matches!(err, TrustError::Revoked { key_id, .. } if key_id == a.key_id()), "{err}");
        assert!(err.is_rejected());
        says(&err, &[&a.key_id().to_string(), "revoked", ".pub"]);

        // A revoked co-signer does not spoil a current one.
        let verdict = f.evaluate(&store, &policy, &[sign(&a, f.payload()), sign(&b, f.payload())]).unwrap();
        assert_eq!(verdict.signers, [b.key_id()]);
    }

    #[test]
    fn scope_mismatch() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        let policy = parse_policy(&format!("[scopes]\n\"{}\" = [\"stage-2-*\", \"lab-?\"]\n", a.key_id()));
        let err = f.evaluate(&store, &policy, &[sign(&a, f.payload())]).unwrap_err();
        assert!(matches!(err, TrustError::OutOfScope { ref scopes, .. } if scopes == &["stage-2-*", "lab-?"]), "{err}");
        assert!(err.is_rejected());
        says(&err, &[&a.key_id().to_string(), "stage-2-*, lab-?", "not stage-1-core-dbus", "--scope GLOB"]);

        let widened = parse_policy(&format!("[scopes]\n\"{}\" = [\"stage-1-*\"]\n", a.key_id()));
        f.evaluate(&store, &widened, &[sign(&a, f.payload())]).unwrap();
    }

    #[test]
    fn scope_prefixes_narrow_where_signers_may_place() {
        let f = Fixture::new();
        let (a, b) = (key(), key());
        let store = trusted(&[&a, &b]);
        let www: TargetPath = "/var/www/site/index.html".parse().unwrap();
        let bin: TargetPath = "/usr/local/bin/tool".parse().unwrap();
        let narrowed = format!("[scope_prefixes]\n\"{}\" = [\"/var/www\"]\n", a.key_id());
        let policy = parse_policy(&narrowed);
        let only_a = f.evaluate(&store, &policy, &[sign(&a, f.payload())]).unwrap();
        assert!(only_a.may_place(&policy, &f.name, &www));
        assert!(!only_a.may_place(&policy, &f.name, &bin));
        // A signer whose scope does not narrow them vouches for any target.
        let both = f.evaluate(&store, &policy, &[sign(&a, f.payload()), sign(&b, f.payload())]).unwrap();
        assert!(both.may_place(&policy, &f.name, &bin));
        // With a threshold of two, both must vouch for each target.
        let policy = parse_policy(&format!("{narrowed}[[threshold]]\nstages = \"*\"\nsignatures = 2\n"));
        let both = f.evaluate(&store, &policy, &[sign(&a, f.payload()), sign(&b, f.payload())]).unwrap();
        assert!(both.may_place(&policy, &f.name, &www));
        assert!(!both.may_place(&policy, &f.name, &bin));
    }

    #[test]
    fn payload_for_another_image_is_tampering() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        for (payload, field) in [
            (f.payload_for(Digest::of(b"another manifest"), NAME, VERSION, None), SignedField::Digest),
            (f.payload_for(f.digest, "stage-2-plugins", VERSION, None), SignedField::Name),
            (f.payload_for(f.digest, NAME, "1.0.1", None), SignedField::Version),
        ] {
            let err = f.evaluate(&store, &Policy::default(), &[sign(&a, payload)]).unwrap_err();
            assert!(matches!(err, TrustError::Tampered { field: got, .. } if got == field), "{err}");
            assert!(err.is_rejected());
            says(&err, &["tampering", &field.to_string()]);
            let words = match field {
                SignedField::Digest => "for manifest digest sha256:",
                SignedField::Name => "for stage name stage-2-plugins",
                SignedField::Version => "for version 1.0.1",
                SignedField::Repository => unreachable!("not in this list"),
            };
            says(&err, &[words]);
        }
        assert_eq!(SignedField::Repository.to_string(), "repository (docker-reference)");
        let err = f
            .evaluate(&store, &Policy::default(), &[sign(&a, f.payload_for(Digest::of(b"x"), NAME, VERSION, None))])
            .unwrap_err();
        says(&err, &[&Digest::of(b"x").to_string(), &f.digest.to_string()]);
    }

    #[test]
    fn altered_payload_with_a_trusted_hint() {
        let f = Fixture::new();
        let a = key();
        let mut layer = sign(&a, f.payload());
        layer.payload = f.payload_for(f.digest, NAME, "9.9.9", None);
        let err = f.evaluate(&trusted(&[&a]), &Policy::default(), &[layer.clone()]).unwrap_err();
        assert!(matches!(err, TrustError::BadSignature { key_id, .. } if key_id == a.key_id()), "{err}");
        assert!(err.is_rejected());
        says(&err, &["does not verify", "altered"]);

        layer.key_id_hint = None;
        let err = f.evaluate(&trusted(&[&a]), &Policy::default(), &[layer]).unwrap_err();
        assert!(matches!(err, TrustError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn expired_and_allow_expired() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        // f.now is 2027-01-15T08:00:00Z.
        let past = sign(&a, f.payload_for(f.digest, NAME, VERSION, Some("2027-01-01T00:00:00Z")));
        let err = f.evaluate(&store, &Policy::default(), std::slice::from_ref(&past)).unwrap_err();
        assert!(matches!(err, TrustError::Expired { .. }) && err.is_rejected(), "{err}");
        says(&err, &["expired at 2027-01-01T00:00:00Z", "--allow-expired"]);

        let subject = Subject { digest: &f.digest, name: &f.name, version: &f.version, signatures: &[past] };
        let options = Options { now: f.now, allow_expired: true };
        let verdict = evaluate(&store, &Policy::default(), subject, options).unwrap();
        assert_eq!(verdict.signers, [a.key_id()]);

        let future = sign(&a, f.payload_for(f.digest, NAME, VERSION, Some("2028-01-01T00:00:00Z")));
        f.evaluate(&store, &Policy::default(), &[future]).unwrap();
    }

    #[test]
    fn corrupted_signatures() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        let good = sign(&a, f.payload());
        let short = BASE64_STANDARD.encode(&a.sign(&f.payload())[..63]);
        for (b64, needle) in [("not base64!", "not base64"), (short.as_str(), "64 bytes"), ("", "64 bytes")] {
            let layer = SignatureLayer { signature_b64: b64.to_owned(), ..good.clone() };
            let err = f.evaluate(&store, &Policy::default(), std::slice::from_ref(&layer)).unwrap_err();
            assert!(matches!(err, TrustError::CorruptSignature { index: 0, .. }), "{err}");
            assert!(err.is_malformed() && !err.is_rejected(), "{err}");
            says(&err, &[needle, "corrupt"]);

            // A corrupt extra layer does not spoil a good signature.
            let verdict = f.evaluate(&store, &Policy::default(), &[layer, good.clone()]).unwrap();
            assert_eq!(verdict.signers, [a.key_id()]);
        }

        // A flipped bit in the signature: it decodes, but nothing verifies it.
        let mut sig = a.sign(&f.payload());
        sig[10] ^= 1;
        let layer = SignatureLayer { signature_b64: BASE64_STANDARD.encode(sig), ..good.clone() };
        let err = f.evaluate(&store, &Policy::default(), &[layer]).unwrap_err();
        assert!(matches!(err, TrustError::BadSignature { .. }), "{err}");

        let huge = SignatureLayer { payload: vec![b' '; MAX_PAYLOAD + 1], ..good };
        let err = f.evaluate(&store, &Policy::default(), &[huge]).unwrap_err();
        assert!(matches!(err, TrustError::CorruptSignature { .. }), "{err}");
    }

    #[test]
    fn malformed_payload_signed_by_a_trusted_key() {
        let f = Fixture::new();
        let a = key();
        let err = f.evaluate(&trusted(&[&a]), &Policy::default(), &[sign(&a, b"{}".to_vec())]).unwrap_err();
        assert!(matches!(err, TrustError::MalformedPayload { .. }) && err.is_malformed(), "{err}");
        says(&err, &[&a.key_id().to_string(), "malformed"]);
    }

    #[test]
    fn the_most_telling_reason_is_reported() {
        let f = Fixture::new();
        let (a, b, stranger) = (key(), key(), key());
        let store = trusted(&[&a, &b]);
        let policy = parse_policy(&format!("revoked = [\"{}\"]\n", b.key_id()));
        let corrupt = SignatureLayer { signature_b64: "!".into(), ..sign(&a, f.payload()) };
        let untrusted = sign(&stranger, f.payload());
        let revoked = sign(&b, f.payload());
        let tampered = sign(&a, f.payload_for(f.digest, NAME, "2.0.0", None));

        let err = f.evaluate(&store, &policy, &[corrupt.clone(), untrusted.clone()]).unwrap_err();
        assert!(matches!(err, TrustError::Untrusted { .. }), "{err}");
        let err = f.evaluate(&store, &policy, &[untrusted.clone(), revoked.clone()]).unwrap_err();
        assert!(matches!(err, TrustError::Revoked { .. }), "{err}");
        let err = f.evaluate(&store, &policy, &[revoked, tampered, untrusted, corrupt]).unwrap_err();
        assert!(matches!(err, TrustError::Tampered { .. }), "{err}");
    }

    #[test]
    fn a_payload_of_exactly_the_limit_counts_and_one_byte_more_is_corrupt() {
        let f = Fixture::new();
        let a = key();
        let store = trusted(&[&a]);
        // JSON may end in whitespace: pad a real payload to the limit.
        let padded = |len: usize| {
            let mut p = f.payload();
            p.resize(len, b' ');
            p
        };
        let verdict = f.evaluate(&store, &Policy::default(), &[sign(&a, padded(MAX_PAYLOAD))]).unwrap();
        assert_eq!(verdict.signers, [a.key_id()]);
        let err = f.evaluate(&store, &Policy::default(), &[sign(&a, padded(MAX_PAYLOAD + 1))]).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        says(&err, &["more than 65536"]);
    }
}
