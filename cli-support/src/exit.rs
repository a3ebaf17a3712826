//! The one exit-code map of both binaries (docs/exit-codes.md).
//!
//! The libraries keep their typed errors; this module is the one place that says which
//! exit code each of them means. The first cause in an error's chain that has a code
//! decides. Errors the binaries raise themselves use the small types below.

use std::error::Error as StdError;
use std::io;

use serde::Serialize;

use formats::archive::ArchiveError;
use formats::layout::LayoutError;
use formats::manifest::{ConfigError, ManifestError};
use formats::oci::EnvelopeError;
use formats::path::UnsafePath;

/// An exit code and its stable name (the `code` of a JSON error document).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitCode {
    /// 0: done.
    Ok,
    /// 1: any other error (I/O, a full disk, a registry that cannot be reached).
    Other,
    /// 2: a usage error, including anything the command line names that does not exist.
    Usage,
    /// 3: a signature or trust failure.
    Trust,
    /// 4: refused by policy, a dependency or a conflict.
    Policy,
    /// 5: a verify command failed and the change was rolled back.
    VerifyFailed,
    /// 6: another operation holds the lock.
    Locked,
    /// 7: malformed or corrupt input.
    Malformed,
}

impl ExitCode {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            ExitCode::Ok => 0,
            ExitCode::Other => 1,
            ExitCode::Usage => 2,
            ExitCode::Trust => 3,
            ExitCode::Policy => 4,
            ExitCode::VerifyFailed => 5,
            ExitCode::Locked => 6,
            ExitCode::Malformed => 7,
        }
    }

    /// The code whose process exit status is `code` (another binary's, read back).
    pub fn from_code(code: i32) -> Option<ExitCode> {
        [
            ExitCode::Ok,
            ExitCode::Other,
            ExitCode::Usage,
            ExitCode::Trust,
            ExitCode::Policy,
            ExitCode::VerifyFailed,
            ExitCode::Locked,
            ExitCode::Malformed,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// The stable name: `ok`, `other`, `usage`, `trust`, `policy`, `verify-failed`,
    /// `locked`, `malformed`.
    pub fn name(self) -> &'static str {
        match self {
            ExitCode::Ok => "ok",
            ExitCode::Other => "other",
            ExitCode::Usage => "usage",
            ExitCode::Trust => "trust",
            ExitCode::Policy => "policy",
            ExitCode::VerifyFailed => "verify-failed",
            ExitCode::Locked => "locked",
            ExitCode::Malformed => "malformed",
        }
    }
}

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

/// Something the command line names (an image, a stage, a snapshot, a file, an
/// initialised root) is not there (exit 2, like every usage error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// The operator declined a confirmation; nothing changed (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Cancelled(pub String);

/// Standard output went away (a closed pipe, `| head`): the command ends cleanly.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed(#[source] pub io::Error);

/// The exit code of an error: the first cause in its chain that has one decides; 1 when none.
pub fn classify(err: &anyhow::Error) -> ExitCode {
    classify_with(err, &|_| None)
}

/// [`classify`], with `local` asked first about each cause (for a binary's own error types).
pub fn classify_with(err: &anyhow::Error, local: &dyn Fn(&(dyn StdError + 'static)) -> Option<ExitCode>) -> ExitCode {
    err.chain().find_map(|c| local(c).or_else(|| code_of(c))).unwrap_or(ExitCode::Other)
}

/// The code of one cause, when its type decides one.
fn code_of(cause: &(dyn StdError + 'static)) -> Option<ExitCode> {
    if cause.is::<StdoutClosed>() {
        return Some(ExitCode::Ok);
    }
    if cause.is::<Refused>() {
        return Some(ExitCode::Policy);
    }
    if cause.is::<Untrusted>() {
        return Some(ExitCode::Trust);
    }
    if cause.is::<self::VerifyFailed>() {
        return Some(ExitCode::VerifyFailed);
    }
    if cause.is::<self::Locked>() {
        return Some(ExitCode::Locked);
    }
    if cause.is::<self::Usage>() || cause.is::<NotFound>() {
        return Some(ExitCode::Usage);
    }
    if cause.is::<Cancelled>() {
        return Some(ExitCode::Other);
    }
    if cause.is::<self::Malformed>()
        || cause.is::<UnsafePath>()
        || cause.is::<ConfigError>()
        || cause.is::<ManifestError>()
        || cause.is::<EnvelopeError>()
    {
        return Some(ExitCode::Malformed);
    }
    if let Some(e) = cause.downcast_ref::<formats::unpack::UnpackError>() {
        return Some(if e.is_malformed() { ExitCode::Malformed } else { ExitCode::Other });
    }
    if let Some(e) = cause.downcast_ref::<formats::btrfs::StreamError>() {
        return Some(if e.is_malformed() { ExitCode::Malformed } else { ExitCode::Other });
    }
    if let Some(e) = cause.downcast_ref::<keys::trust::TrustError>() {
        return Some(if e.is_rejected() { ExitCode::Trust } else { ExitCode::Malformed });
    }
    if let Some(e) = cause.downcast_ref::<keys::KeyError>() {
        return Some(key_error(e));
    }
    if let Some(e) = cause.downcast_ref::<registry::RegistryError>() {
        if e.is_malformed() {
            return Some(ExitCode::Malformed);
        }
        if e.is_usage() {
            return Some(ExitCode::Usage);
        }
        return None;
    }
    if let Some(e) = cause.downcast_ref::<LayoutError>() {
        return Some(match e {
            LayoutError::DigestMismatch { .. } | LayoutError::TooLarge { .. } | LayoutError::Envelope { .. } => {
                ExitCode::Malformed
            }
            LayoutError::NotALayout { .. } => ExitCode::Usage,
            _ => ExitCode::Other,
        });
    }
    if let Some(e) = cause.downcast_ref::<ArchiveError>() {
        return Some(match e {
            // An error of the operating system is ours; anything else the tar reader says
            // (a cut archive, a bad header) is about the input.
            ArchiveError::Io(io) if io.raw_os_error().is_some() => ExitCode::Other,
            ArchiveError::Layout(LayoutError::Io { .. }) => ExitCode::Other,
            _ => ExitCode::Malformed,
        });
    }
    None
}

fn key_error(e: &keys::KeyError) -> ExitCode {
    use keys::KeyError as K;
    if e.is_rejected() {
        return ExitCode::Trust;
    }
    match e {
        K::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => ExitCode::Usage,
        K::Io { .. } | K::Random(_) | K::Exists { .. } | K::InsecureMode { .. } => ExitCode::Other,
        K::NotRegularFile { .. } | K::InvalidKeyId(_) | K::InvalidExpires(_) => ExitCode::Usage,
        K::MinisignPublicKeyGiven { .. } | K::PrivateKeyGiven { .. } => ExitCode::Usage,
        _ => ExitCode::Malformed,
    }
}

/// Whether an error comes from a full filesystem or an exhausted quota, by error kind.
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| matches!(io.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
            || c.downcast_ref::<formats::unpack::UnpackError>()
                .is_some_and(|u| matches!(u, formats::unpack::UnpackError::NoSpace { .. }))
    })
}

/// Whether the error is standard output going away.
pub fn is_stdout_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.is::<StdoutClosed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_cause_with_a_code_decides() {
        let e = anyhow::Error::new(Refused::Conflict("x".into())).context("outer");
        assert_eq!(classify(&e), ExitCode::Policy);
        assert_eq!(classify(&anyhow::anyhow!("plain")), ExitCode::Other);
        let missing =
            keys::KeyError::Io { op: "read", path: "/k".into(), source: io::Error::from(io::ErrorKind::NotFound) };
        assert_eq!(classify(&missing.into()), ExitCode::Usage);
        let full = anyhow::Error::new(io::Error::from(io::ErrorKind::StorageFull)).context("writing");
        assert!(is_disk_full(&full));
        assert!(!is_disk_full(&anyhow::anyhow!("No space left on device")), "by kind, not by text");
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(serde_json::to_string(&ExitCode::VerifyFailed).unwrap(), "\"verify-failed\"");
        assert_eq!(ExitCode::VerifyFailed.name(), "verify-failed");
        assert_eq!(ExitCode::Malformed.code(), 7);
    }
}
