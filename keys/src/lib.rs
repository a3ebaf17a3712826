//! Keys, key ids and signatures of op-dbus stage images.
//!
//! Everything here is ed25519, one key type used three ways:
//!
//! - [`PrivateKey`] / [`PublicKey`]: the key files. The private key is an unencrypted PKCS#8
//!   PEM file of mode 0600 (a key readable by group or others is refused); the public key is
//!   an SPKI PEM file `KEY.pub`, byte-identical to what `openssl pkey -in KEY -pubout`
//!   prints. [`KeyId`] names a key: the first 8 bytes of sha256 of the raw public key.
//! - [`simple_signing`]: the cosign "simple signing" payload whose exact bytes are signed
//!   for an image (docs/formats.md).
//! - [`policy`]: the installer's trust and target policy, `/etc/op-dbus/stage.toml`: key
//!   scopes, revoked keys, signature thresholds, allowed target prefixes, host features.
//! - [`trust`]: whether an image's signatures satisfy the trust store and the policy.
//! - [`minisign`]: a detached `.minisig` over an exported `.oci.tar`, which stock
//!   `minisign -Vm FILE -p KEY.minisign.pub` verifies.
//!
//! ```text
//! KEY        -----BEGIN PRIVATE KEY-----      PKCS#8 v1, mode 0600, never leaves the builder
//! KEY.pub    -----BEGIN PUBLIC KEY-----       SPKI, mode 0644, goes to trusted-keys/ on hosts
//! key id     3f9a0c41d2e87b65                 hex(sha256(raw public key)[..8])
//! ```
//!
//! Nothing here prints or reads configuration files (the policy is parsed from text the
//! caller read); errors ([`KeyError`], [`PolicyError`], [`TrustError`]) name the file, key
//! or stage concerned and say what the operator can do.
//!
//! ```
//! use keys::{PrivateKey, simple_signing::SimpleSigning};
//!
//! let key = PrivateKey::generate()?;
//! let payload = SimpleSigning::new(
//!     "registry.example/op-dbus/stage-1-core-dbus",
//!     formats::Digest::of(b"the image manifest"),
//!     &"stage-1-core-dbus".parse().unwrap(),
//!     &"1.0.0".parse().unwrap(),
//!     None,
//! )
//! .to_bytes();
//! let signature = key.sign(&payload);
//! key.public().verify(&payload, &signature)?;
//! assert_eq!(SimpleSigning::parse(&payload)?.name()?.as_str(), "stage-1-core-dbus");
//! # Ok::<(), keys::KeyError>(())
//! ```
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod error;
mod files;
pub mod key_id;
pub mod minisign;
pub mod policy;
pub mod private_key;
pub mod public_key;
pub mod secret;
pub mod simple_signing;
#[cfg(test)]
mod testutil;
pub mod trust;

pub use error::{KeyError, Result};
pub use files::MAX_KEY_FILE;
pub use key_id::KeyId;
pub use policy::{Policy, PolicyError};
pub use private_key::PrivateKey;
pub use public_key::PublicKey;
pub use trust::TrustError;
