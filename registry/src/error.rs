//! What can go wrong talking to a registry: each error names the registry, the repository
//! or blob, and what the operator can check.

use formats::Digest;
use formats::layout::LayoutError;
use formats::oci::EnvelopeError;

use crate::auth::AuthFileError;
use crate::reference::InvalidReference;

/// A failure of a registry operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] InvalidReference),
    #[error(
        "cannot reach the registry {host} ({url}): {detail}; tried {attempts} time(s) over {secs:.1}s. Check the host \
         and port, that the registry is running and listening there, the network and any firewall, and whether it \
         speaks HTTPS (plain HTTP is used only for loopback hosts or with --insecure)"
    )]
    Unreachable { host: String, url: String, detail: String, attempts: u32, secs: f64 },
    #[error("TLS setup for {host}: {detail}")]
    Tls { host: String, detail: String },
    #[error(
        "the registry {host} asks for credentials ({what}): pass --username USER --password-stdin, or log in so that \
         $REGISTRY_AUTH_FILE or ~/.docker/config.json has an `auths` entry for {host}"
    )]
    CredentialsNeeded { host: String, what: String },
    #[error(
        "the registry {host} refused the credentials of user {user:?} from {source_name} ({what}: 401 Unauthorized): \
         check the user name and password"
    )]
    Unauthorized { host: String, user: String, source_name: String, what: String },
    #[error("the registry {host} denied access ({what}: 403 Forbidden): the user may not {action} {repository}")]
    Denied { host: String, repository: String, action: &'static str, what: String },
    #[error("{reference}: no such tag in the registry {host} (manifest unknown); check the tag and the repository")]
    TagNotFound { host: String, reference: String },
    #[error("{host}/{repository}: blob {digest} is not in the registry (blob unknown), though a manifest names it")]
    BlobNotFound { host: String, repository: String, digest: Digest },
    #[error("the registry {host} answered {what} with HTTP {status}{retries}{detail}")]
    Status { host: String, what: String, status: u16, retries: String, detail: String },
    #[error("{what} from {host}: {reason}")]
    Malformed { host: String, what: String, reason: String },
    #[error("{what} from {host}: {source}")]
    Envelope { host: String, what: String, source: EnvelopeError },
    #[error("{what} from {host} is corrupt: its content hashes to {actual}, not {expected}")]
    DigestMismatch { host: String, what: String, expected: Digest, actual: Digest },
    #[error(
        "downloading {what} from {host} was interrupted at byte {written} of {size} and could not be resumed \
         after {attempts} attempt(s): {detail}"
    )]
    Interrupted { host: String, what: String, written: u64, size: u64, attempts: u32, detail: String },
    #[error("{what}")]
    Layout { what: String, source: LayoutError },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
    #[error("{what} from {host}: {detail}")]
    Deadline { host: String, what: String, detail: String },
    #[error(
        "the registry {host} kept asking for authentication ({what}): gave up after {rounds} authentication rounds \
         (a registry asks once, and again at most for a token of another scope)"
    )]
    AuthRounds { host: String, what: String, rounds: u32 },
    #[error(
        "{what}: {other}, which is not the registry {host}, asks for credentials (401); credentials are only for the \
         registry itself, so none were sent"
    )]
    ForeignChallenge { host: String, what: String, other: String },
    #[error(
        "the registry {host} names a token service on plain HTTP ({realm}) ({what}); credentials go over plain HTTP \
         only to loopback hosts or with --insecure, so none were sent"
    )]
    CleartextRealm { host: String, what: String, realm: String },
    #[error("${name}={value:?} is not {want}")]
    Setting { name: &'static str, value: String, want: String },
}

impl RegistryError {
    /// Whether the registry served bytes that are malformed or do not match their digest
    /// (exit 7), as opposed to a registry that could not be used (exit 1).
    pub fn is_malformed(&self) -> bool {
        match self {
            RegistryError::Malformed { .. } | RegistryError::Envelope { .. } | RegistryError::DigestMismatch { .. } => {
                true
            }
            RegistryError::Layout { source, .. } => {
                matches!(source, LayoutError::DigestMismatch { .. } | LayoutError::TooLarge { .. })
            }
            _ => false,
        }
    }

    /// Whether the reference or the flags were wrong (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, RegistryError::Reference(_) | RegistryError::Setting { .. })
    }
}
