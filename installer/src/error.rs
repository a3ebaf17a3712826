//! Exit codes (docs/exit-codes.md) and the errors that decide them.

use formats::archive::ArchiveError;
use formats::layout::LayoutError;
use formats::manifest::ConfigError;
use formats::oci::EnvelopeError;
use formats::path::UnsafePath;

pub const OK: i32 = 0;
pub const OTHER: i32 = 1;
pub const USAGE: i32 = 2;
pub const TRUST: i32 = 3;
pub const POLICY: i32 = 4;
pub const VERIFY_FAILED: i32 = 5;
pub const LOCKED: i32 = 6;
pub const MALFORMED: i32 = 7;

/// Refused by policy, a dependency or a conflict (exit 4).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Dependency(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Downgrade(String),
}

/// Signature or trust failure (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Untrusted(pub String);

/// Malformed or corrupt input (exit 7).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// A verify command failed and the change was rolled back (exit 5).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyFailed(pub String);

/// Another operation holds the lock (exit 6).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Locked(pub String);

/// A usage error found after parsing (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code of an error: the first cause in the chain that has one decides.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<Refused>() {
            return POLICY;
        }
        if cause.is::<Untrusted>() {
            return TRUST;
        }
        if cause.is::<VerifyFailed>() {
            return VERIFY_FAILED;
        }
        if cause.is::<Locked>() {
            return LOCKED;
        }
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<Malformed>()
            || cause.is::<UnsafePath>()
            || cause.is::<ConfigError>()
            || cause.is::<EnvelopeError>()
        {
            return MALFORMED;
        }
        if let Some(e) = cause.downcast_ref::<formats::unpack::UnpackError>() {
            return if e.is_malformed() { MALFORMED } else { OTHER };
        }
        if let Some(e) = cause.downcast_ref::<formats::btrfs::StreamError>() {
            return if e.is_malformed() { MALFORMED } else { OTHER };
        }
        if let Some(e) = cause.downcast_ref::<keys::trust::TrustError>() {
            return if e.is_rejected() { TRUST } else { MALFORMED };
        }
        if let Some(e) = cause.downcast_ref::<keys::KeyError>() {
            return if e.is_rejected() { TRUST } else { MALFORMED };
        }
        if let Some(e) = cause.downcast_ref::<LayoutError>() {
            return match e {
                LayoutError::DigestMismatch { .. } | LayoutError::TooLarge { .. } | LayoutError::Envelope { .. } => {
                    MALFORMED
                }
                _ => OTHER,
            };
        }
        if let Some(e) = cause.downcast_ref::<ArchiveError>() {
            return match e {
                // An error of the operating system is ours; anything else the tar reader
                // says (a cut archive, a bad header) is about the input.
                ArchiveError::Io(io) if io.raw_os_error().is_some() => OTHER,
                ArchiveError::Layout(LayoutError::Io { .. }) => OTHER,
                _ => MALFORMED,
            };
        }
    }
    OTHER
}
