//! Exit codes (docs/exit-codes.md) and the errors of stage input.

use std::path::PathBuf;

use formats::archive::ArchiveError;
use formats::layout::LayoutError;
use formats::manifest::{ConfigError, ManifestError};
use formats::oci::EnvelopeError;
use formats::path::UnsafePath;

pub const OK: i32 = 0;
pub const OTHER: i32 = 1;
pub const USAGE: i32 = 2;
pub const TRUST: i32 = 3;
pub const MALFORMED: i32 = 7;

/// A stage folder or listed file that cannot become an image (exit 7).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{file}: field `{field}`: {reason}")]
    Field { file: PathBuf, field: String, reason: String },
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
}

/// The exit code for an error: the first cause in the chain that has one decides.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<InputError>()
            || cause.is::<ManifestError>()
            || cause.is::<UnsafePath>()
            || cause.is::<ConfigError>()
            || cause.is::<EnvelopeError>()
        {
            return MALFORMED;
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
                ArchiveError::Io(_) => OTHER,
                ArchiveError::Layout(l) => match l {
                    LayoutError::DigestMismatch { .. } => MALFORMED,
                    _ => OTHER,
                },
                _ => MALFORMED,
            };
        }
        if let Some(e) = cause.downcast_ref::<keys::KeyError>() {
            return match e {
                _ if e.is_rejected() => TRUST,
                keys::KeyError::MalformedPrivateKey { .. }
                | keys::KeyError::MalformedPublicKey { .. }
                | keys::KeyError::MalformedPayload { .. }
                | keys::KeyError::MalformedSignature { .. }
                | keys::KeyError::MalformedMinisig { .. } => MALFORMED,
                _ => OTHER,
            };
        }
    }
    OTHER
}
