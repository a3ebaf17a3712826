//! Secrets: files encrypted with [age](https://age-encryption.org/v1) to the X25519
//! recipients of the hosts that may read them.
//!
//! The builder encrypts a secret's plaintext to a stage's [`Recipient`]s ([`encrypt`]) and
//! the image carries only that ciphertext, a plain binary age file (what `age -r` writes).
//! A host has one [`HostIdentity`], kept in an age identity file (the format `age-keygen`
//! writes, which `age -d -i FILE` reads) and decrypts with it ([`HostIdentity::decrypt`]).
//!
//! ```text
//! identity file   # public key: age1...            comment lines start with '#'
//!                 AGE-SECRET-KEY-1...               one X25519 identity, mode 0600
//! recipient       age1... (62 characters)           what `op-dbus-stage identity` prints
//! ciphertext      age-encryption.org/v1             binary age format, no armor
//!                 -> X25519 <share>                 one stanza per recipient
//!                 --- <mac>
//!                 <payload>
//! ```
//!
//! ```
//! use keys::secret::{HostIdentity, encrypt};
//!
//! let host = HostIdentity::generate();
//! let ciphertext = encrypt(&[host.recipient()], b"token")?;
//! assert_eq!(keys::secret::check_ciphertext(&ciphertext)?.x25519, 1);
//! assert_eq!(&host.decrypt(&ciphertext)?[..], b"token");
//! # Ok::<(), keys::secret::SecretError>(())
//! ```

use std::fmt;
use std::io::Write;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
/// Bytes wiped when dropped (plaintexts and identities are held in these).
pub use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;

/// The largest secret, ciphertext or plaintext, that is encrypted or decrypted.
pub const MAX_SECRET: u64 = 4 << 20;
/// The largest identity file read.
pub const MAX_IDENTITY_FILE: u64 = 64 * 1024;

/// The header line every age v1 file starts with.
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// What went wrong with a secret or an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Decryption ran, and this identity is not one of the file's recipients.
    #[error("it is not encrypted to this host's recipient {recipient}")]
    NotARecipient { recipient: String },
    #[error("not an age file ({reason}); encrypt it with `op-dbus-image secret add` or `age -r RECIPIENT`")]
    NotAgeFile { reason: String },
    #[error(
        "it is encrypted with a passphrase or to a key type a host cannot use ({kind}); encrypt it to the hosts' \
         X25519 recipients (age1...)"
    )]
    NotForHosts { kind: String },
    #[error("it does not decrypt: {reason} (the file was changed or cut)")]
    Corrupt { reason: String },
    #[error("larger than {MAX_SECRET} bytes")]
    TooLarge,
    #[error("{text:?} is not an age X25519 recipient (age1... as `op-dbus-stage identity` prints): {reason}")]
    BadRecipient { text: String, reason: String },
    #[error("not an age identity file: {reason}; expected one line AGE-SECRET-KEY-1... (`age-keygen` writes one)")]
    BadIdentity { reason: String },
    #[error("no recipients to encrypt to: list the hosts' recipients in the stage's `recipients:`")]
    NoRecipients,
}

impl SecretError {
    /// Whether decryption ran and said no (this host is not a recipient).
    pub fn is_rejected(&self) -> bool {
        matches!(self, SecretError::NotARecipient { .. })
    }
}

/// A host's public identity: an age X25519 recipient (`age1...`).
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient(String, age::x25519::Recipient);

impl Recipient {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Recipient {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            |reason: &str| SecretError::BadRecipient { text: s.chars().take(80).collect(), reason: reason.to_owned() };
        if s.len() != 62 || !s.starts_with("age1") {
            return Err(bad("62 characters starting with age1 expected"));
        }
        let r: age::x25519::Recipient = s.parse().map_err(|e: &str| bad(e))?;
        Ok(Recipient(s.to_owned(), r))
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.0)
    }
}

/// A host's age identity: the X25519 secret key that decrypts its secrets.
#[derive(Clone)]
pub struct HostIdentity(age::x25519::Identity);

impl fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostIdentity({})", self.recipient())
    }
}

impl HostIdentity {
    /// A fresh identity from the operating system's random numbers.
    pub fn generate() -> HostIdentity {
        HostIdentity(age::x25519::Identity::generate())
    }

    /// Parses an age identity file: `#` comments, blank lines and exactly one
    /// `AGE-SECRET-KEY-1...` line.
    pub fn parse(text: &[u8]) -> Result<HostIdentity, SecretError> {
        let bad = |reason: &str| SecretError::BadIdentity { reason: reason.to_owned() };
        if text.len() as u64 > MAX_IDENTITY_FILE {
            return Err(bad("the file is too large"));
        }
        let text = std::str::from_utf8(text).map_err(|_| bad("the file is not UTF-8 text"))?;
        let mut keys = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let key = keys.next().ok_or_else(|| bad("it holds no key"))?;
        if keys.next().is_some() {
            return Err(bad("it holds more than one line that is not a comment"));
        }
        if !key.starts_with("AGE-SECRET-KEY-1") {
            return Err(bad("its key line does not start with AGE-SECRET-KEY-1"));
        }
        key.parse::<age::x25519::Identity>().map(HostIdentity).map_err(bad)
    }

    /// The identity file's text: a comment with the recipient, then the key line.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let key = self.0.to_string();
        Zeroizing::new(format!(
            "# op-dbus host identity\n# public key: {}\n{}\n",
            self.recipient(),
            key.expose_secret()
        ))
    }

    /// The public recipient that secrets for this host are encrypted to.
    pub fn recipient(&self) -> Recipient {
        let r = self.0.to_public();
        Recipient(r.to_string(), r)
    }

    /// Decrypts the age file `ciphertext` (at most [`MAX_SECRET`] bytes of plaintext).
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        use std::io::Read;
        if ciphertext.len() as u64 > MAX_SECRET {
            return Err(SecretError::TooLarge);
        }
        check_ciphertext(ciphertext)?;
        let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|e| corrupt(&e))?;
        let mut reader = decryptor.decrypt(std::iter::once(&self.0 as &dyn age::Identity)).map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => SecretError::NotARecipient { recipient: self.recipient().to_string() },
            e => corrupt(&e),
        })?;
        let mut out = Zeroizing::new(Vec::new());
        (&mut reader)
            .take(MAX_SECRET + 1)
            .read_to_end(&mut out)
            .map_err(|e| SecretError::Corrupt { reason: e.to_string() })?;
        if out.len() as u64 > MAX_SECRET {
            return Err(SecretError::TooLarge);
        }
        Ok(out)
    }
}

fn corrupt(e: &age::DecryptError) -> SecretError {
    SecretError::Corrupt { reason: e.to_string() }
}

/// Encrypts `plaintext` to every one of `recipients` (binary age format).
pub fn encrypt(recipients: &[Recipient], plaintext: &[u8]) -> Result<Vec<u8>, SecretError> {
    if recipients.is_empty() {
        return Err(SecretError::NoRecipients);
    }
    if plaintext.len() as u64 > MAX_SECRET {
        return Err(SecretError::TooLarge);
    }
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| &r.1 as &dyn age::Recipient))
        .map_err(|e| SecretError::Corrupt { reason: e.to_string() })?;
    let mut out = Vec::with_capacity(plaintext.len() + 256);
    let io = |e: std::io::Error| SecretError::Corrupt { reason: e.to_string() };
    let mut w = encryptor.wrap_output(&mut out).map_err(io)?;
    w.write_all(plaintext).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(out)
}

/// What the header of an age file says about who can decrypt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CiphertextInfo {
    /// The X25519 recipient stanzas (one per recipient).
    pub x25519: usize,
}

/// Checks that `bytes` is a binary age v1 file a host can decrypt: a well-formed header
/// with at least one X25519 recipient and no passphrase (scrypt) or SSH stanza. Nothing is
/// decrypted; a file that is not age (a plaintext put where a secret belongs) is refused.
pub fn check_ciphertext(bytes: &[u8]) -> Result<CiphertextInfo, SecretError> {
    if bytes.len() as u64 > MAX_SECRET {
        return Err(SecretError::TooLarge);
    }
    if !bytes.starts_with(AGE_MAGIC) {
        let reason = if bytes.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----") {
            "it is ASCII-armored; encrypt without --armor"
        } else {
            "it does not start with age-encryption.org/v1"
        };
        return Err(SecretError::NotAgeFile { reason: reason.into() });
    }
    age::Decryptor::new_buffered(bytes)
        .map_err(|e| SecretError::NotAgeFile { reason: format!("its header is not valid: {e}") })?;
    // The header was parsed above; its stanza lines are `-> TAG ARGS` up to `--- MAC`.
    let mut x25519 = 0;
    for line in bytes[AGE_MAGIC.len()..].split(|&b| b == b'\n') {
        if line.starts_with(b"--- ") {
            break;
        }
        let Some(stanza) = line.strip_prefix(b"-> ") else { continue };
        let tag = stanza.split(|&b| b == b' ').next().unwrap_or_default();
        match tag {
            b"X25519" => x25519 += 1,
            b"scrypt" | b"ssh-ed25519" | b"ssh-rsa" => {
                return Err(SecretError::NotForHosts { kind: String::from_utf8_lossy(tag).into_owned() });
            }
            // Grease and other stanzas a recipient may add: ignored by X25519 identities.
            _ => {}
        }
    }
    if x25519 == 0 {
        return Err(SecretError::NotForHosts { kind: "no X25519 recipient".into() });
    }
    Ok(CiphertextInfo { x25519 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_to_several_recipients_and_not_to_others() {
        let (a, b, c) = (HostIdentity::generate(), HostIdentity::generate(), HostIdentity::generate());
        let ct = encrypt(&[a.recipient(), b.recipient()], b"s3cret").unwrap();
        assert!(!ct.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(check_ciphertext(&ct).unwrap().x25519, 2);
        assert_eq!(&a.decrypt(&ct).unwrap()[..], b"s3cret");
        assert_eq!(&b.decrypt(&ct).unwrap()[..], b"s3cret");
        let e = c.decrypt(&ct).unwrap_err();
        assert!(e.is_rejected() && e.to_string().contains(c.recipient().as_str()), "{e}");
        assert!(matches!(encrypt(&[], b"x"), Err(SecretError::NoRecipients)));
    }

    #[test]
    fn identity_files_round_trip_and_are_strict() {
        let id = HostIdentity::generate();
        let text = id.to_file_text();
        let back = HostIdentity::parse(text.as_bytes()).unwrap();
        assert_eq!(back.recipient(), id.recipient());
        assert!(text.contains(id.recipient().as_str()));
        for bad in [&b""[..], b"# only a comment\n", b"AGE-SECRET-KEY-1XYZ\n", b"\xff\xfe", b"age1abc\n"] {
            assert!(HostIdentity::parse(bad).is_err(), "{bad:?}");
        }
        let twice = format!("{}{}", &*text, &*text);
        assert!(HostIdentity::parse(twice.as_bytes()).unwrap_err().to_string().contains("more than one"));
    }

    #[test]
    fn recipients_are_parsed_strictly() {
        let r = HostIdentity::generate().recipient();
        assert_eq!(r.as_str().parse::<Recipient>().unwrap(), r);
        for bad in ["", "age1", "AGE1xyz", &r.as_str().replace("age1", "agf1"), &format!("{}x", r.as_str())] {
            assert!(bad.parse::<Recipient>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plaintext_armor_and_damage_are_refused() {
        let id = HostIdentity::generate();
        assert!(matches!(check_ciphertext(b"API_TOKEN=abc\n"), Err(SecretError::NotAgeFile { .. })));
        let armored = b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n";
        assert!(check_ciphertext(armored).unwrap_err().to_string().contains("armored"));
        assert!(check_ciphertext(b"age-encryption.org/v1\n-> X25519\n").is_err());
        let mut ct = encrypt(&[id.recipient()], b"payload").unwrap();
        let last = ct.len() - 1;
        ct[last] ^= 1;
        assert!(matches!(id.decrypt(&ct), Err(SecretError::Corrupt { .. })));
        // A passphrase-encrypted file: a host has no passphrase.
        let scrypt = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from("pw".to_owned()));
        let mut out = Vec::new();
        let mut w = scrypt.wrap_output(&mut out).unwrap();
        w.write_all(b"x").unwrap();
        w.finish().unwrap();
        assert!(matches!(check_ciphertext(&out), Err(SecretError::NotForHosts { .. })));
        assert!(matches!(id.decrypt(&vec![0u8; MAX_SECRET as usize + 1]), Err(SecretError::TooLarge)));
    }
}
