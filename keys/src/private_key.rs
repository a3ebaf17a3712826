//! [`PrivateKey`]: the signing key file (PKCS#8 PEM, mode 0600).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::{Signer, SigningKey};

use crate::files::{self, MAX_KEY_FILE};
use crate::{KeyError, KeyId, PublicKey, Result};

/// An ed25519 signing key. Its secret is wiped from memory when dropped.
///
/// On disk it is an unencrypted PKCS#8 v1 PEM file (`-----BEGIN PRIVATE KEY-----`), the form
/// `openssl genpkey -algorithm ed25519` writes, of mode 0600.
#[derive(Clone)]
pub struct PrivateKey {
    key: SigningKey,
}

impl PrivateKey {
    /// A new key from 32 random bytes of the operating system.
    pub fn generate() -> Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(KeyError::Random)?;
        Ok(PrivateKey { key: SigningKey::from_bytes(&seed) })
    }

    /// Parses an unencrypted PKCS#8 PEM ed25519 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        Self::parse(pem, None)
    }

    fn parse(pem: &str, path: Option<&Path>) -> Result<Self> {
        let malformed = |reason: String| KeyError::MalformedPrivateKey { path: path.map(Path::to_owned), reason };
        let text = pem.trim_start();
        if text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(malformed(
                "the key is encrypted; decrypt it with `openssl pkey -in KEY -out KEY.plain`".into(),
            ));
        }
        if text.starts_with("-----BEGIN PUBLIC KEY-----") {
            return Err(malformed("this is a public key, not a private key".into()));
        }
        SigningKey::from_pkcs8_pem(text).map(|key| PrivateKey { key }).map_err(|e| malformed(e.to_string()))
    }

    /// The key as PKCS#8 v1 PEM, as `openssl genpkey` writes it (without the public key).
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        let bytes = KeypairBytes { secret_key: self.key.to_bytes(), public_key: None };
        bytes.to_pkcs8_pem(LineEnding::LF).expect("a 32-byte ed25519 key always encodes")
    }

    /// Reads the key file `path`.
    ///
    /// Refuses a file that group or others may read (mode & 0o077), anything but a regular
    /// file (symlinks are followed), and files over 64 KiB.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = files::read_bounded(path, MAX_KEY_FILE, |meta| {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyError::InsecureMode { path: path.to_owned(), mode });
            }
            Ok(())
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::MalformedPrivateKey {
            path: Some(path.to_owned()),
            reason: "the file is not text".into(),
        })?;
        Self::parse(text, Some(path))
    }

    /// Writes the key to the new file `path` (mode 0600) and its public key to `path.pub`
    /// (mode 0644), refusing to replace either if it exists. Each file is written to a
    /// temporary file, fsynced and linked into place, so neither is ever seen half-written.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let pem = self.to_pkcs8_pem();
        let public = self.public().to_spki_pem();
        let pub_path = pub_path(path);
        files::create_new_all(&[(path, pem.as_bytes(), 0o600), (&pub_path, public.as_bytes(), 0o644)])
    }

    pub fn public(&self) -> PublicKey {
        PublicKey::from(self.key.verifying_key())
    }

    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }

    /// The ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// `PATH.pub`, where [`PrivateKey::write_new`] puts the public key of `PATH`.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::Command;

    use super::*;
    use crate::testutil::{require_tool, run_ok};

    #[test]
    fn pem_round_trip_and_signature() {
        let key = PrivateKey::generate().unwrap();
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"));
        let back = PrivateKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        let sig = key.sign(b"hello");
        back.public().verify(b"hello", &sig).unwrap();
        assert!(!format!("{key:?}").contains(&pem[30..60]), "Debug must not show the secret");
        assert_ne!(PrivateKey::generate().unwrap().key_id(), key.key_id());
    }

    #[test]
    fn write_new_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let key = PrivateKey::generate().unwrap();
        key.write_new(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        let pub_file = dir.path().join("signing.key.pub");
        assert_eq!(fs::metadata(&pub_file).unwrap().permissions().mode() & 0o7777, 0o644);
        assert_eq!(PrivateKey::read(&path).unwrap().key_id(), key.key_id());
        assert_eq!(PublicKey::read(&pub_file).unwrap(), key.public());

        let err = PrivateKey::generate().unwrap().write_new(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(PrivateKey::read(&path).unwrap().key_id(), key.key_id(), "key unchanged");
    }

    #[test]
    fn write_new_refuses_existing_pub_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(dir.path().join("k.pub"), "someone's key").unwrap();
        let err = PrivateKey::generate().unwrap().write_new(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { ref path } if path.ends_with("k.pub")), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn read_refuses_group_or_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        PrivateKey::generate().unwrap().write_new(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o601] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = PrivateKey::read(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, KeyError::InsecureMode { mode: m, .. } if m == mode), "{msg}");
            assert!(msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        PrivateKey::read(&path).unwrap();
    }

    #[test]
    fn read_refuses_odd_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = PrivateKey::read(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::NotRegularFile { .. }), "{err}");

        let big = dir.path().join("big");
        fs::write(&big, vec![b'A'; 64 * 1024 + 1]).unwrap();
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(PrivateKey::read(&big), Err(KeyError::TooLarge { .. })));

        let public = dir.path().join("pub");
        let key = PrivateKey::generate().unwrap();
        fs::write(&public, key.public().to_spki_pem()).unwrap();
        fs::set_permissions(&public, fs::Permissions::from_mode(0o600)).unwrap();
        let err = PrivateKey::read(&public).unwrap_err();
        assert!(err.to_string().contains("this is a public key"), "{err}");
        assert!(err.to_string().contains(&public.display().to_string()), "{err}");
    }

    #[test]
    fn openssl_derives_the_same_public_key_file() {
        let openssl = require_tool("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        PrivateKey::generate().unwrap().write_new(&path).unwrap();
        let out = run_ok(Command::new(&openssl).arg("pkey").arg("-in").arg(&path).arg("-pubout"));
        assert_eq!(String::from_utf8(out).unwrap(), fs::read_to_string(pub_path(&path)).unwrap());
    }

    #[test]
    fn reads_an_openssl_generated_key() {
        let openssl = require_tool("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openssl.key");
        run_ok(Command::new(&openssl).args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&path));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let key = PrivateKey::read(&path).unwrap();
        assert_eq!(key.to_pkcs8_pem().as_str(), fs::read_to_string(&path).unwrap(), "same encoding");

        let out = run_ok(Command::new(&openssl).arg("pkey").arg("-in").arg(&path).arg("-pubout"));
        let openssl_pub = String::from_utf8(out).unwrap();
        assert_eq!(PublicKey::from_spki_pem(&openssl_pub).unwrap(), key.public());

        // And openssl verifies our signature (the form cosign annotations carry).
        let msg = dir.path().join("msg");
        let sig = dir.path().join("sig");
        let public = dir.path().join("openssl.pub");
        fs::write(&msg, b"simple signing payload").unwrap();
        fs::write(&sig, key.sign(b"simple signing payload")).unwrap();
        fs::write(&public, openssl_pub).unwrap();
        run_ok(
            Command::new(&openssl)
                .args(["pkeyutl", "-verify", "-rawin", "-pubin", "-inkey"])
                .arg(&public)
                .arg("-in")
                .arg(&msg)
                .arg("-sigfile")
                .arg(&sig),
        );
    }
}
