//! [`KeyId`]: the short name of a public key.

use std::fmt;
use std::str::FromStr;

use formats::Digest;
use serde::{Deserialize, Serialize};

use crate::KeyError;

/// The first 8 bytes of sha256 of the raw 32-byte ed25519 public key, shown as 16 lowercase
/// hex digits (`3f9a0c41d2e87b65`).
///
/// Parsing also accepts upper case, as minisign prints key ids that way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId([u8; 8]);

impl KeyId {
    /// The id of the raw public key `public_key`.
    pub fn of(public_key: &[u8; 32]) -> Self {
        let mut id = [0u8; 8];
        id.copy_from_slice(&Digest::of(public_key).bytes()[..8]);
        KeyId(id)
    }

    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        KeyId(bytes)
    }

    pub fn bytes(&self) -> [u8; 8] {
        self.0
    }

    /// The minisign key number of this key: the id bytes reversed.
    ///
    /// minisign prints a key number as a little-endian u64 in `%016X`, so with the bytes
    /// reversed it prints this id (in upper case) and an operator sees one id everywhere.
    pub fn minisign_keynum(&self) -> [u8; 8] {
        let mut n = self.0;
        n.reverse();
        n
    }

    /// The inverse of [`KeyId::minisign_keynum`].
    pub fn from_minisign_keynum(mut keynum: [u8; 8]) -> Self {
        keynum.reverse();
        KeyId(keynum)
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Checked first: `from_str_radix` would also take a leading `+`.
        if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(KeyError::InvalidKeyId(s.to_owned()));
        }
        u64::from_str_radix(s, 16).map(|n| KeyId(n.to_be_bytes())).map_err(|_| KeyError::InvalidKeyId(s.to_owned()))
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.to_string()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&formats::digest::hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_sha256_prefix_and_round_trips() {
        let pk = [7u8; 32];
        let id = KeyId::of(&pk);
        assert_eq!(id.to_string(), Digest::of(&pk).hex()[..16]);
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert_eq!(id.to_string().to_uppercase().parse::<KeyId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }

    #[test]
    fn parse_is_strict() {
        for bad in ["", "0123456789abcde", "0123456789abcdef0", "+123456789abcdef", "0123456789abcdeg"] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<KeyId>("\"xyz\"").is_err());
    }

    #[test]
    fn minisign_keynum_is_reversed() {
        let id: KeyId = "0102030405060708".parse().unwrap();
        assert_eq!(id.minisign_keynum(), [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(format!("{:016X}", u64::from_le_bytes(id.minisign_keynum())), "0102030405060708");
        assert_eq!(KeyId::from_minisign_keynum(id.minisign_keynum()), id);
    }
}
