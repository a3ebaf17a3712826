//! [`PublicKey`]: the verifying key file (SPKI PEM) and its minisign form.

use std::fmt;
use std::path::Path;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{Signature, VerifyingKey};

use crate::files::{self, MAX_KEY_FILE};
use crate::{KeyError, KeyId, Result};

/// An ed25519 public key.
///
/// On disk it is SPKI PEM, byte-identical to `openssl pkey -in KEY -pubout`:
///
/// ```text
/// -----BEGIN PUBLIC KEY-----
/// MCowBQYDK2VwAyEA<43 base64 digits of the raw key>
/// -----END PUBLIC KEY-----
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> Self {
        PublicKey { key }
    }
}

impl PublicKey {
    /// The key of the raw 32 bytes; refuses bytes that are not a usable ed25519 key.
    pub fn from_raw(raw: &[u8; 32]) -> Result<Self> {
        Self::checked(VerifyingKey::from_bytes(raw).map_err(|e| e.to_string()), None)
    }

    /// Parses an SPKI PEM ed25519 public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_spki_pem(pem: &str) -> Result<Self> {
        Self::parse(pem, None)
    }

    fn parse(pem: &str, path: Option<&Path>) -> Result<Self> {
        Self::checked(VerifyingKey::from_public_key_pem(pem.trim_start()).map_err(|e| e.to_string()), path)
    }

    fn checked(key: std::result::Result<VerifyingKey, String>, path: Option<&Path>) -> Result<Self> {
        let malformed = |reason| KeyError::MalformedPublicKey { path: path.map(Path::to_owned), reason };
        let key = key.map_err(malformed)?;
        if key.is_weak() {
            return Err(malformed("the key is a weak (small-order) point that anyone can forge for".into()));
        }
        Ok(PublicKey { key })
    }

    /// The key as SPKI PEM with a final newline, as `openssl pkey -pubout` prints it.
    pub fn to_spki_pem(&self) -> String {
        self.key.to_public_key_pem(LineEnding::LF).expect("a 32-byte ed25519 key always encodes")
    }

    /// Reads a public key file (at most 64 KiB), saying so clearly when it is a minisign
    /// public key or a private key given by mistake.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = files::read_bounded(path, MAX_KEY_FILE, |_| Ok(()))?;
        Self::from_file_bytes(&bytes, path)
    }

    /// Parses the contents of a public key file read by the caller (at most
    /// [`MAX_KEY_FILE`] bytes); `path` names it in errors.
    pub fn from_file_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let malformed =
            |reason: &str| KeyError::MalformedPublicKey { path: Some(path.to_owned()), reason: reason.to_owned() };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("the file is not text"))?;
        let first_line = text.trim_start().lines().next().unwrap_or_default();
        let path = path.to_owned();
        if first_line.starts_with("untrusted comment:") {
            return Err(if first_line.contains("secret key") {
                KeyError::PrivateKeyGiven { path }
            } else {
                KeyError::MinisignPublicKeyGiven { path }
            });
        }
        if first_line.starts_with("-----BEGIN") && first_line.contains("PRIVATE KEY") {
            return Err(KeyError::PrivateKeyGiven { path });
        }
        Self::parse(text, Some(&path))
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(self.key.as_bytes())
    }

    /// The raw 32 bytes of the key.
    pub fn raw(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Checks the ed25519 signature `signature` (64 bytes) of `message`, strictly: no
    /// malleable or small-order encodings.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<()> {
        let key_id = self.key_id();
        let signature = Signature::from_slice(signature).map_err(|_| KeyError::MalformedSignature {
            key_id,
            reason: format!("an ed25519 signature is 64 bytes, not {}", signature.len()),
        })?;
        self.key.verify_strict(message, &signature).map_err(|_| KeyError::BadSignature { key_id })
    }

    /// The minisign public key file of this key:
    ///
    /// ```text
    /// untrusted comment: minisign public key <KEY ID IN UPPER CASE>
    /// base64("Ed" || keynum (8 bytes) || public key (32 bytes))
    /// ```
    ///
    /// The key number is [`KeyId::minisign_keynum`], so minisign shows the key id.
    pub fn to_minisign(&self) -> String {
        let mut blob = Vec::with_capacity(42);
        blob.extend_from_slice(b"Ed");
        blob.extend_from_slice(&self.key_id().minisign_keynum());
        blob.extend_from_slice(self.key.as_bytes());
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.key_id().to_string().to_uppercase(),
            BASE64_STANDARD.encode(blob)
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::PrivateKey;

    // RFC 8032 §7.1, test 1.
    const RFC8032_PK: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const RFC8032_SIG: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
                               5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn rfc8032_key() -> PublicKey {
        PublicKey::from_raw(&unhex(RFC8032_PK).try_into().unwrap()).unwrap()
    }

    #[test]
    fn rfc8032_vector() {
        let key = rfc8032_key();
        key.verify(b"", &unhex(RFC8032_SIG)).unwrap();
        let err = key.verify(b"x", &unhex(RFC8032_SIG)).unwrap_err();
        assert!(err.is_rejected(), "{err}");
        let err = key.verify(b"", &unhex(RFC8032_SIG)[..63]).unwrap_err();
        assert!(matches!(err, KeyError::MalformedSignature { .. }) && !err.is_rejected(), "{err}");
        assert_eq!(key.key_id().to_string(), formats::Digest::of(&key.raw()).hex()[..16]);
    }

    #[test]
    fn spki_pem_round_trip() {
        let key = rfc8032_key();
        let pem = key.to_spki_pem();
        assert_eq!(
            pem,
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n"
        );
        assert_eq!(PublicKey::from_spki_pem(&pem).unwrap(), key);
    }

    #[test]
    fn read_says_what_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate().unwrap();

        let minisign = dir.path().join("minisign.pub");
        fs::write(&minisign, key.public().to_minisign()).unwrap();
        let err = PublicKey::read(&minisign).unwrap_err();
        assert!(matches!(err, KeyError::MinisignPublicKeyGiven { .. }), "{err}");

        let private = dir.path().join("key");
        fs::write(&private, key.to_pkcs8_pem().as_bytes()).unwrap();
        let err = PublicKey::read(&private).unwrap_err();
        assert!(matches!(err, KeyError::PrivateKeyGiven { .. }), "{err}");
        fs::write(&private, "untrusted comment: minisign encrypted secret key\nRWQAAEIy\n").unwrap();
        let err = PublicKey::read(&private).unwrap_err();
        assert!(matches!(err, KeyError::PrivateKeyGiven { .. }), "{err}");

        let garbage = dir.path().join("garbage.pub");
        fs::write(&garbage, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
        let err = PublicKey::read(&garbage).unwrap_err();
        assert!(err.to_string().contains(&garbage.display().to_string()), "{err}");
        assert!(matches!(err, KeyError::MalformedPublicKey { .. }), "{err}");

        let big = dir.path().join("big.pub");
        fs::write(&big, vec![b' '; 64 * 1024 + 1]).unwrap();
        assert!(matches!(PublicKey::read(&big), Err(KeyError::TooLarge { .. })));
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point, of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(PublicKey::from_raw(&identity), Err(KeyError::MalformedPublicKey { .. })));
    }

    #[test]
    fn minisign_form() {
        let key = rfc8032_key();
        let text = key.to_minisign();
        let (comment, b64) = text.split_once('\n').unwrap();
        assert_eq!(
            comment,
            format!("untrusted comment: minisign public key {}", key.key_id().to_string().to_uppercase())
        );
        let blob = BASE64_STANDARD.decode(b64.strip_suffix('\n').unwrap()).unwrap();
        assert_eq!(&blob[..2], b"Ed");
        assert_eq!(blob[2..10], key.key_id().minisign_keynum());
        assert_eq!(blob[10..], key.raw());
    }
}
