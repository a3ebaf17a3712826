//! [`KeyError`]: what went wrong with a key, a signature or a signed payload.

use std::io;
use std::path::{Path, PathBuf};

use crate::KeyId;

/// `Result` with [`KeyError`].
pub type Result<T, E = KeyError> = std::result::Result<T, E>;

/// Errors of this crate. Each names the file or key concerned and what the operator can do.
///
/// A signature that was checked and did not verify ([`KeyError::is_rejected`]) is distinct
/// from input that could not be checked at all (malformed files, I/O errors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "refusing to use private key {p}: its mode {mode:04o} lets group or others read it; \
         run `chmod 600 {p}`, and replace the key if anyone else may have copied it",
        p = path.display()
    )]
    InsecureMode { path: PathBuf, mode: u32 },

    #[error("{} is a {kind}, not a regular file: give the path of the key file itself", path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },

    #[error(
        "{} is larger than {limit} bytes, too large for a key or signature file: check that it is the right file",
        path.display()
    )]
    TooLarge { path: PathBuf, limit: u64 },

    #[error("refusing to overwrite {}: it already exists; move it away or choose another path", path.display())]
    Exists { path: PathBuf },

    #[error(
        "malformed private key{}: {reason}; expected an unencrypted PKCS#8 PEM ed25519 key \
         (`op-dbus-image key generate`, or `openssl genpkey -algorithm ed25519`)",
        at(path)
    )]
    MalformedPrivateKey { path: Option<PathBuf>, reason: String },

    #[error(
        "malformed public key{}: {reason}; expected an SPKI PEM ed25519 key \
         (the KEY.pub of `op-dbus-image key generate`, or `openssl pkey -in KEY -pubout`)",
        at(path)
    )]
    MalformedPublicKey { path: Option<PathBuf>, reason: String },

    #[error(
        "{} is a minisign public key, which is only for checking exports by hand; \
         give the PEM KEY.pub written by `op-dbus-image key generate` instead",
        path.display()
    )]
    MinisignPublicKeyGiven { path: PathBuf },

    #[error(
        "{} holds a PRIVATE key where a public key was expected: give its KEY.pub \
         (`openssl pkey -in KEY -pubout` derives it) and keep the private key off target hosts",
        path.display()
    )]
    PrivateKeyGiven { path: PathBuf },

    #[error("could not get random bytes from the operating system to generate a key")]
    Random(#[source] getrandom::Error),

    #[error("invalid key id {0:?}: expected 16 hex digits as printed by `op-dbus-image key show`")]
    InvalidKeyId(String),

    #[error("signature does not verify with key {key_id}: the signed data was altered, or another key signed it")]
    BadSignature { key_id: KeyId },

    #[error("malformed signature for key {key_id}: {reason}")]
    MalformedSignature { key_id: KeyId, reason: String },

    #[error(
        "signature was made by key {found}, not by key {expected}: \
         verify with the public key of {found} if you trust it, or re-sign with {expected}"
    )]
    KeyIdMismatch { expected: KeyId, found: KeyId },

    #[error("malformed simple-signing payload: {reason}")]
    MalformedPayload { reason: String },

    #[error("invalid expiry time {0:?}: expected RFC 3339, for example 2027-01-31T00:00:00Z")]
    InvalidExpires(String),

    #[error("malformed minisign signature: {reason}")]
    MalformedMinisig { reason: String },

    #[error("invalid minisign trusted comment: {reason}")]
    InvalidTrustedComment { reason: String },

    #[error("could not read the data to sign or verify")]
    ReadData(#[source] io::Error),
}

impl KeyError {
    /// True when a signature was checked and said no (as opposed to input that could not be
    /// checked): the installer's "signature or trust failure".
    pub fn is_rejected(&self) -> bool {
        matches!(self, KeyError::BadSignature { .. } | KeyError::KeyIdMismatch { .. })
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        KeyError::Io { op, path: path.to_owned(), source }
    }
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}
