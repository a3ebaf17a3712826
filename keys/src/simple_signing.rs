//! The cosign "simple signing" payload: what an image signature signs.
//!
//! The signature (ed25519, base64) is over the exact bytes of this JSON, which travel as a
//! layer of media type [`MEDIA_TYPE`] in the image's `.sig` manifest (docs/formats.md):
//!
//! ```text
//! {"critical":{"identity":{"docker-reference":"registry.example/op-dbus/stage-1-core-dbus"},
//!              "image":{"docker-manifest-digest":"sha256:<hex>"},
//!              "type":"cosign container image signature"},
//!  "optional":{"op-dbus.stage/expires":"2027-01-31T00:00:00Z",      (only when set)
//!              "op-dbus.stage/name":"stage-1-core-dbus",
//!              "op-dbus.stage/version":"1.0.0"}}
//! ```
//!
//! [`SimpleSigning::to_bytes`] writes it compact, keys in this order (`optional` sorted), so
//! the same inputs always give the same bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use formats::{Digest, StageName, Version};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{KeyError, Result};

/// Media type of the layer holding the payload.
pub const MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The value of `critical.type`.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// `optional` key of the stage name.
pub const NAME: &str = "op-dbus.stage/name";
/// `optional` key of the stage version.
pub const VERSION: &str = "op-dbus.stage/version";
/// `optional` key of the time after which the signature is no longer valid (RFC 3339).
pub const EXPIRES: &str = "op-dbus.stage/expires";
/// The largest payload [`SimpleSigning::parse`] reads.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The simple-signing payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleSigning {
    pub critical: Critical,
    /// Free annotations; cosign writes `null` when there are none.
    #[serde(default, deserialize_with = "optional_map")]
    pub optional: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub type_: SignatureType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The repository the image is known by (`registry/repo`), as cosign records it.
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// The digest of the signed image manifest.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: Digest,
}

/// `critical.type`: always [`SIGNATURE_TYPE`]; anything else does not parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignatureType;

impl Serialize for SignatureType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(SIGNATURE_TYPE)
    }
}

impl<'de> Deserialize<'de> for SignatureType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == SIGNATURE_TYPE {
            Ok(SignatureType)
        } else {
            Err(de::Error::custom(format_args!("type is {s:?}, expected {SIGNATURE_TYPE:?}")))
        }
    }
}

/// `optional`: a map of strings, or `null`; a key given twice is refused rather than
/// silently taking one of the values.
fn optional_map<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of strings or null")
        }
        fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format_args!("duplicate optional key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

impl SimpleSigning {
    /// The payload signing `manifest_digest` as stage `name` `version`, known in registries
    /// as `docker_reference`, valid until `expires` if given.
    pub fn new(
        docker_reference: impl Into<String>,
        manifest_digest: Digest,
        name: &StageName,
        version: &Version,
        expires: Option<&Expires>,
    ) -> Self {
        let mut optional = BTreeMap::new();
        optional.insert(NAME.to_owned(), name.to_string());
        optional.insert(VERSION.to_owned(), version.to_string());
        if let Some(expires) = expires {
            optional.insert(EXPIRES.to_owned(), expires.to_string());
        }
        SimpleSigning {
            critical: Critical {
                identity: Identity { docker_reference: docker_reference.into() },
                image: Image { docker_manifest_digest: manifest_digest },
                type_: SignatureType,
            },
            optional,
        }
    }

    /// The compact, deterministic JSON bytes to sign.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings and maps of strings always serialize")
    }

    /// Parses a payload strictly: at most [`MAX_PAYLOAD`] bytes, no unknown fields in
    /// `critical`, the cosign type, a valid digest. Check the signature over `bytes` first.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let malformed = |reason: String| KeyError::MalformedPayload { reason };
        if bytes.len() > MAX_PAYLOAD {
            return Err(malformed(format!("{} bytes, more than the limit of {MAX_PAYLOAD}", bytes.len())));
        }
        let payload: SimpleSigning = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if payload.critical.identity.docker_reference.is_empty() {
            return Err(malformed("critical.identity.docker-reference is empty".into()));
        }
        Ok(payload)
    }

    pub fn manifest_digest(&self) -> Digest {
        self.critical.image.docker_manifest_digest
    }

    /// The stage name (`optional."op-dbus.stage/name"`).
    pub fn name(&self) -> Result<StageName> {
        self.required(NAME)?.parse().map_err(|e| self.invalid(NAME, e))
    }

    /// The stage version (`optional."op-dbus.stage/version"`).
    pub fn version(&self) -> Result<Version> {
        self.required(VERSION)?.parse().map_err(|e| self.invalid(VERSION, e))
    }

    /// The expiry time (`optional."op-dbus.stage/expires"`), if there is one.
    pub fn expires(&self) -> Result<Option<Expires>> {
        self.optional.get(EXPIRES).map(|s| s.parse().map_err(|e| self.invalid(EXPIRES, e))).transpose()
    }

    fn required(&self, key: &str) -> Result<&str> {
        self.optional
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| KeyError::MalformedPayload { reason: format!("optional.{key:?} is missing") })
    }

    fn invalid(&self, key: &str, e: impl fmt::Display) -> KeyError {
        KeyError::MalformedPayload { reason: format!("optional.{key:?}: {e}") }
    }
}

/// A point in time after which a signature is no longer valid, written in RFC 3339
/// (`2027-01-31T00:00:00Z`, `2027-01-31T02:00:00.5+02:00`).
///
/// Keeps its text as written, so a payload round-trips byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub struct Expires {
    text: String,
    unix: i64,
}

impl Expires {
    /// Seconds since 1970-01-01T00:00:00Z (fractions of a second dropped).
    pub fn unix_seconds(&self) -> i64 {
        self.unix
    }

    /// True when `now` is at or after this time.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        let now = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX) - 1,
        };
        now >= self.unix
    }
}

impl FromStr for Expires {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self> {
        parse_rfc3339(s)
            .map(|unix| Expires { text: s.to_owned(), unix })
            .ok_or_else(|| KeyError::InvalidExpires(s.to_owned()))
    }
}

impl fmt::Display for Expires {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Expires {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expires({})", self.text)
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to Unix seconds.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        d.iter().all(u8::is_ascii_digit).then(|| d.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |c: &u8| c.is_ascii_digit().then(|| i64::from(c - b'0'));
            let (h, m) = (digit(h1)? * 10 + digit(h2)?, digit(m1)? * 10 + digit(m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' { h * 3600 + m * 60 } else { -(h * 3600 + m * 60) }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[month as usize - 1] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // Days from 1970-01-01 to the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(expires: Option<&Expires>) -> SimpleSigning {
        SimpleSigning::new(
            "registry.example/op-dbus/stage-1-core-dbus",
            Digest::of(b"manifest"),
            &"stage-1-core-dbus".parse().unwrap(),
            &"1.0.0".parse().unwrap(),
            expires,
        )
    }

    #[test]
    fn exact_bytes() {
        let expires: Expires = "2027-01-31T00:00:00Z".parse().unwrap();
        let bytes = sample(Some(&expires)).to_bytes();
        let expected = format!(
            concat!(
                r#"{{"critical":{{"identity":{{"docker-reference":"registry.example/op-dbus/stage-1-core-dbus"}},"#,
                r#""image":{{"docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"#,
                r#""optional":{{"op-dbus.stage/expires":"2027-01-31T00:00:00Z","op-dbus.stage/name":"stage-1-core-dbus","#,
                r#""op-dbus.stage/version":"1.0.0"}}}}"#
            ),
            Digest::of(b"manifest")
        );
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), expected);

        let parsed = SimpleSigning::parse(&bytes).unwrap();
        assert_eq!(parsed.to_bytes(), bytes);
        assert_eq!(parsed.name().unwrap().as_str(), "stage-1-core-dbus");
        assert_eq!(parsed.version().unwrap().to_string(), "1.0.0");
        assert_eq!(parsed.expires().unwrap(), Some(expires));
        assert_eq!(parsed.manifest_digest(), Digest::of(b"manifest"));
        assert_eq!(SimpleSigning::parse(&sample(None).to_bytes()).unwrap().expires().unwrap(), None);
    }

    #[test]
    fn accepts_cosign_null_optional() {
        let json = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r/x"}},"image":{{"docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
            Digest::of(b"m")
        );
        let p = SimpleSigning::parse(json.as_bytes()).unwrap();
        assert!(p.optional.is_empty());
        let err = p.name().unwrap_err();
        assert!(err.to_string().contains("op-dbus.stage/name"), "{err}");
    }

    #[test]
    fn parse_is_strict() {
        let good = String::from_utf8(sample(None).to_bytes()).unwrap();
        let digest = Digest::of(b"manifest").to_string();
        let cases = [
            good.replace("cosign container image signature", "something else"),
            good.replace(&digest, "sha256:1234"),
            good.replace(r#""type""#, r#""extra":1,"type""#),
            good.replace(r#""docker-reference":"#, r#""docker-reference":"x","docker-reference":"#),
            good.replace(r#""docker-manifest-digest""#, r#""docker-manifest-digest2""#),
            good.replace(r#""optional":{"#, r#""optional":{"op-dbus.stage/name":"a","#),
            good.replace(r#""1.0.0""#, "1"),
            good.replace("registry.example/op-dbus/stage-1-core-dbus", ""),
            format!("{good}x"),
            good.replace(r#"{"critical""#, r#"{"extra":1,"critical""#),
        ];
        for bad in cases {
            assert_ne!(bad, good);
            let err = SimpleSigning::parse(bad.as_bytes()).unwrap_err();
            assert!(matches!(err, KeyError::MalformedPayload { .. }), "{bad}: {err}");
        }
        let huge = format!("{}{}", " ".repeat(MAX_PAYLOAD), good);
        assert!(SimpleSigning::parse(huge.as_bytes()).is_err());

        let bad_name = good.replace(r#""stage-1-core-dbus""#, r#""../etc""#);
        let err = SimpleSigning::parse(bad_name.as_bytes()).unwrap().name().unwrap_err();
        assert!(err.to_string().contains("invalid stage name"), "{err}");
    }

    #[test]
    fn rfc3339() {
        for (text, unix) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2000-02-29T12:34:56Z", 951_827_696),
            ("2027-01-31T02:00:00.123+02:00", 1_801_353_600),
            ("1969-12-31T23:59:59Z", -1),
            ("2024-12-31T23:00:00-01:00", 1_735_689_600),
        ] {
            assert_eq!(text.parse::<Expires>().unwrap().unix_seconds(), unix, "{text}");
        }
        for bad in [
            "",
            "2027-01-31",
            "2027-01-31 00:00:00Z",
            "2027-01-31T00:00:00",
            "2027-02-29T00:00:00Z",
            "2027-13-01T00:00:00Z",
            "2027-01-31T24:00:00Z",
            "2027-01-31T00:00:60Z",
            "2027-01-31T00:00:00.Z",
            "2027-01-31T00:00:00+0200",
            "2027-01-31T00:00:00+24:00",
            "+027-01-31T00:00:00Z",
            "2027-01-31T00:00:00Zjunk",
            "2027-01-31T00:00:00z",
        ] {
            assert!(bad.parse::<Expires>().is_err(), "{bad}");
        }
        let e: Expires = "2027-01-31T00:00:00Z".parse().unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(e.unix_seconds() as u64);
        assert!(e.is_expired_at(at));
        assert!(!e.is_expired_at(at - Duration::from_secs(1)));
        assert!(!e.is_expired_at(UNIX_EPOCH - Duration::from_secs(5)));
    }
}
