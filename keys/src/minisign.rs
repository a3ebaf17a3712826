//! Detached minisign signatures, for the operator who checks an export by hand.
//!
//! [`sign_detached`] writes the prehashed form that stock `minisign -Vm FILE -p KEY.pub`
//! verifies, with the image signing key:
//!
//! ```text
//! untrusted comment: signature from op-dbus-image secret key
//! base64("ED" || keynum (8) || ed25519(BLAKE2b-512(FILE)) (64))
//! trusted comment: <one line, covered by the global signature>
//! base64(ed25519(signature (64) || trusted comment))
//! ```
//!
//! `keynum` is [`KeyId::minisign_keynum`](crate::KeyId::minisign_keynum); the public key
//! file that goes with it is [`PublicKey::to_minisign`].

use std::io::{ErrorKind, Read};

use base64::prelude::{BASE64_STANDARD, Engine as _};
use blake2::{Blake2b512, Digest as _};

use crate::{KeyError, KeyId, PrivateKey, PublicKey, Result};

const UNTRUSTED_COMMENT: &str = "untrusted comment: ";
const TRUSTED_COMMENT: &str = "trusted comment: ";
/// The largest trusted comment written or read (stock minisign reads lines up to 8 KiB).
pub const MAX_TRUSTED_COMMENT: usize = 4096;
/// The largest signature file [`verify_detached`] reads.
pub const MAX_SIGNATURE: usize = 16 * 1024;

/// The `.minisig` text of `data` (read in chunks, never whole) signed with `key`.
///
/// `trusted_comment` is one line of at most [`MAX_TRUSTED_COMMENT`] bytes.
pub fn sign_detached<R: Read>(key: &PrivateKey, data: R, trusted_comment: &str) -> Result<String> {
    sign_hash(key, &blake2b(data)?, trusted_comment)
}

/// Hashes bytes as they are written, for [`sign_written`]: the signature then covers
/// exactly what went through it, whatever happens to the file (or pipe) afterwards.
#[derive(Debug)]
pub struct Hashing<W> {
    inner: W,
    hasher: Blake2b512,
}

impl<W: std::io::Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing { inner, hasher: Blake2b512::new() }
    }

    /// The inner writer, for when no signature is wanted.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The `.minisig` text of everything written through `written`, and its inner writer.
pub fn sign_written<W>(key: &PrivateKey, written: Hashing<W>, trusted_comment: &str) -> Result<(String, W)> {
    let hash: [u8; 64] = written.hasher.finalize().into();
    Ok((sign_hash(key, &hash, trusted_comment)?, written.inner))
}

fn sign_hash(key: &PrivateKey, hash: &[u8; 64], trusted_comment: &str) -> Result<String> {
    let invalid = |reason: &str| KeyError::InvalidTrustedComment { reason: reason.to_owned() };
    if trusted_comment.len() > MAX_TRUSTED_COMMENT {
        return Err(invalid("longer than 4096 bytes"));
    }
    if trusted_comment.contains(['\n', '\r', '\0']) {
        return Err(invalid("it must be one line"));
    }
    let signature = key.sign(hash);
    let mut line2 = Vec::with_capacity(74);
    line2.extend_from_slice(b"ED");
    line2.extend_from_slice(&key.key_id().minisign_keynum());
    line2.extend_from_slice(&signature);
    let global = key.sign(&[&signature[..], trusted_comment.as_bytes()].concat());
    Ok(format!(
        "{UNTRUSTED_COMMENT}signature from op-dbus-image secret key\n{}\n{TRUSTED_COMMENT}{trusted_comment}\n{}\n",
        BASE64_STANDARD.encode(line2),
        BASE64_STANDARD.encode(global),
    ))
}

/// Checks the `.minisig` text `signature` of `data` with `key`, and returns its trusted
/// comment, now known to be genuine.
///
/// Only the prehashed `ED` form is accepted, and only from `key` (else
/// [`KeyError::KeyIdMismatch`]).
pub fn verify_detached<R: Read>(key: &PublicKey, data: R, signature: &str) -> Result<String> {
    let malformed = |reason: String| KeyError::MalformedMinisig { reason };
    if signature.len() > MAX_SIGNATURE {
        return Err(malformed(format!("longer than {MAX_SIGNATURE} bytes")));
    }
    let lines: Vec<&str> = signature.strip_suffix('\n').unwrap_or(signature).split('\n').collect();
    let [untrusted, sig, trusted, global] = lines[..] else {
        return Err(malformed(format!("{} lines, expected 4", lines.len())));
    };
    if !untrusted.starts_with(UNTRUSTED_COMMENT) {
        return Err(malformed(format!("line 1 does not start with {UNTRUSTED_COMMENT:?}")));
    }
    let sig = BASE64_STANDARD.decode(sig).map_err(|e| malformed(format!("line 2: {e}")))?;
    let Some((alg, rest)) = sig.split_first_chunk::<2>() else {
        return Err(malformed("line 2 is too short".into()));
    };
    match alg {
        b"ED" => {}
        b"Ed" => {
            return Err(malformed("legacy (not prehashed) signature; sign with minisign 0.11 or later".into()));
        }
        _ => {
            return Err(malformed(format!("unknown signature algorithm {:?}", String::from_utf8_lossy(alg))));
        }
    }
    let Some((keynum, sig)) = rest.split_first_chunk::<8>() else {
        return Err(malformed("line 2 is too short".into()));
    };
    if sig.len() != 64 {
        return Err(malformed(format!("line 2 holds a {}-byte signature, expected 64", sig.len())));
    }
    let found = KeyId::from_minisign_keynum(*keynum);
    if found != key.key_id() {
        return Err(KeyError::KeyIdMismatch { expected: key.key_id(), found });
    }
    let comment = trusted
        .strip_prefix(TRUSTED_COMMENT)
        .ok_or_else(|| malformed(format!("line 3 does not start with {TRUSTED_COMMENT:?}")))?;
    let global = BASE64_STANDARD.decode(global).map_err(|e| malformed(format!("line 4: {e}")))?;
    key.verify(&[sig, comment.as_bytes()].concat(), &global)?;
    key.verify(&blake2b(data)?, sig)?;
    Ok(comment.to_owned())
}

/// BLAKE2b-512 of everything `data` yields, in 64 KiB chunks.
fn blake2b<R: Read>(mut data: R) -> Result<[u8; 64]> {
    let mut hasher = Blake2b512::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(KeyError::ReadData(e)),
        }
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::Command;

    use super::*;

    #[test]
    fn signing_what_was_written_is_signing_the_bytes() {
        use std::io::Write as _;
        let key = PrivateKey::generate().unwrap();
        let mut w = Hashing::new(Vec::new());
        w.write_all(b"first part, ").unwrap();
        w.write_all(b"second part").unwrap();
        let (sig, bytes) = sign_written(&key, w, "file:x").unwrap();
        assert_eq!(bytes, b"first part, second part");
        assert_eq!(verify_detached(&key.public(), &bytes[..], &sig).unwrap(), "file:x");
        assert!(verify_detached(&key.public(), &b"first part, second par"[..], &sig).is_err());
    }
    use crate::testutil::{require_tool, run};

    fn data() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
    }

    #[test]
    fn sign_and_verify() {
        let key = PrivateKey::generate().unwrap();
        let data = data();
        let sig = sign_detached(&key, &data[..], "timestamp:1 file:x.oci.tar").unwrap();
        assert!(sig.starts_with("untrusted comment: signature from op-dbus-image secret key\n"));
        let lines: Vec<&str> = sig.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "trusted comment: timestamp:1 file:x.oci.tar");
        let tc = verify_detached(&key.public(), &data[..], &sig).unwrap();
        assert_eq!(tc, "timestamp:1 file:x.oci.tar");

        let mut altered = data.clone();
        altered[1_500_000] ^= 1;
        let err = verify_detached(&key.public(), &altered[..], &sig).unwrap_err();
        assert!(err.is_rejected(), "{err}");

        let forged = sig.replace("file:x.oci.tar", "file:y.oci.tar");
        let err = verify_detached(&key.public(), &data[..], &forged).unwrap_err();
        assert!(err.is_rejected(), "{err}");

        let other = PrivateKey::generate().unwrap();
        let err = verify_detached(&other.public(), &data[..], &sig).unwrap_err();
        assert!(
            matches!(err, KeyError::KeyIdMismatch { expected, found } if expected == other.key_id() && found == key.key_id()),
            "{err}"
        );
    }

    #[test]
    fn malformed_signatures() {
        let key = PrivateKey::generate().unwrap();
        let sig = sign_detached(&key, &b"x"[..], "c").unwrap();
        let lines: Vec<&str> = sig.lines().collect();
        let blob = BASE64_STANDARD.decode(lines[1]).unwrap();
        let legacy = BASE64_STANDARD.encode([&b"Ed"[..], &blob[2..]].concat());
        let short = BASE64_STANDARD.encode(&blob[..73]);
        for bad in [
            String::new(),
            lines[..3].join("\n"),
            format!("{sig}extra\n"),
            sig.replacen("untrusted comment: ", "comment: ", 1),
            sig.replace("trusted comment: c", "c"),
            sig.replace(lines[1], "!!"),
            sig.replace(lines[1], &legacy),
            sig.replace(lines[1], &short),
            sig.replace(lines[3], "AAAA"),
            sig.replace('\n', "\r\n"),
            format!("{}{sig}", " ".repeat(MAX_SIGNATURE)),
        ] {
            let err = verify_detached(&key.public(), &b"x"[..], &bad).unwrap_err();
            assert!(!err.is_rejected(), "{bad:?}: {err}");
        }
        assert!(sign_detached(&key, &b"x"[..], "two\nlines").is_err());
        assert!(sign_detached(&key, &b"x"[..], &"x".repeat(MAX_TRUSTED_COMMENT + 1)).is_err());
    }

    #[test]
    fn stock_minisign_verifies() {
        let minisign = require_tool("minisign", "minisign");
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate().unwrap();
        let file = dir.path().join("export.oci.tar");
        let sig = dir.path().join("export.oci.tar.minisig");
        let public = dir.path().join("key.minisign.pub");
        let mut data = data();
        fs::write(&file, &data).unwrap();
        fs::write(&public, key.public().to_minisign()).unwrap();
        let text = sign_detached(&key, fs::File::open(&file).unwrap(), "file:export.oci.tar").unwrap();
        fs::write(&sig, text).unwrap();

        let verify = || run(Command::new(&minisign).arg("-Vm").arg(&file).arg("-x").arg(&sig).arg("-p").arg(&public));
        let out = verify();
        assert!(out.status.success(), "minisign refused our signature: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Trusted comment: file:export.oci.tar"), "{out:?}");

        data[1234] ^= 0x80;
        fs::write(&file, &data).unwrap();
        let out = verify();
        assert!(!out.status.success(), "minisign accepted a changed file: {out:?}");
    }

    #[test]
    fn stock_minisign_shows_our_key_id() {
        // minisign names both key numbers when they differ: they must read as our key ids.
        let minisign = require_tool("minisign", "minisign");
        let dir = tempfile::tempdir().unwrap();
        let (signer, other) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
        let file = dir.path().join("f");
        let sig = dir.path().join("f.minisig");
        let public = dir.path().join("other.pub");
        fs::write(&file, b"data").unwrap();
        fs::write(&sig, sign_detached(&signer, &b"data"[..], "c").unwrap()).unwrap();
        fs::write(&public, other.public().to_minisign()).unwrap();
        let out = run(Command::new(&minisign).arg("-Vm").arg(&file).arg("-x").arg(&sig).arg("-p").arg(&public));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        for id in [signer.key_id(), other.key_id()] {
            // minisign prints the number without leading zeros.
            let shown = id.to_string().to_uppercase();
            assert!(stderr.contains(shown.trim_start_matches('0')), "{id} not in {stderr}");
        }
    }
}
