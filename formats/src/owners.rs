//! Who owns staged files, and the system users a stage needs.
//!
//! ```yaml
//! users:                       # systemd-sysusers semantics: created if missing,
//!   - name: op-dbus            #   never changed or removed when present
//!     description: op-dbus service
//!     home: /var/lib/op-dbus
//! files:
//!   - path: bin/op-dbus
//!     target: /usr/local/bin/op-dbus
//!     owner: op-dbus           # a user name or a number
//!     group: 0                 # a group name or a number (default: the owner's group)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest user or group name accepted (as `useradd` and systemd).
pub const MAX_NAME: usize = 31;

/// A user or group: a name (`op-dbus`) or a number (`1000`). YAML may write a number bare
/// or quoted; JSON keeps names as strings and numbers as numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl Principal {
    /// The id, for a number.
    pub fn id(&self) -> Option<u32> {
        match self {
            Principal::Id(n) => Some(*n),
            Principal::Name(_) => None,
        }
    }
}

/// Whether `s` is a user or group name systemd and the shadow tools both accept.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(c))
}

impl FromStr for Principal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.len() <= 10 && s.bytes().all(|c| c.is_ascii_digit()) {
            return Principal::from_number(s.parse::<u64>().map_err(|e| e.to_string())?);
        }
        if valid_name(s) {
            Ok(Principal::Name(s.to_owned()))
        } else {
            Err(format!(
                "{:?} is not a user or group: a number, or a name of at most {MAX_NAME} letters, digits, '_', '-' or \
                 '.' starting with a letter or '_'",
                crate::manifest::excerpt(s)
            ))
        }
    }
}

impl Principal {
    fn from_number(n: u64) -> Result<Principal, String> {
        // 4294967295 is (uid_t)-1, "no change" to chown: never an owner.
        match u32::try_from(n) {
            Ok(n) if n != u32::MAX => Ok(Principal::Id(n)),
            _ => Err(format!("{n} is not a user or group number (0 to 4294967294)")),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(n) => write!(f, "{n}"),
            Principal::Name(s) => f.write_str(s),
        }
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Principal::Id(n) => s.serialize_u32(*n),
            Principal::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Principal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user or group name, or a number")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Principal, E> {
                Principal::from_number(n).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Principal, E> {
                let n = u64::try_from(n).map_err(|_| E::custom(format!("{n} is not a user or group number")))?;
                Principal::from_number(n).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Principal, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One `users:` entry: a system user (and its group) the stage's files or services need,
/// created as `systemd-sysusers` would if missing, never changed or removed when present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    /// The UID wanted; taken when free, otherwise one is picked (as sysusers does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The primary group (created if missing); default: a group of the user's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Home directory (default `/`); not created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
}

impl UserSpec {
    /// Checks the entry; `Err((field, reason))` with the field relative to the entry.
    pub fn check(&self) -> Result<(), (String, String)> {
        if !valid_name(&self.name) {
            return Err(("name".into(), format!("{:?} is not a user name", crate::manifest::excerpt(&self.name))));
        }
        if let Some(g) = &self.group
            && !valid_name(g)
        {
            return Err(("group".into(), format!("{:?} is not a group name", crate::manifest::excerpt(g))));
        }
        if let Some(u) = self.uid
            && (u == 0 || u >= 60000)
        {
            return Err(("uid".into(), format!("{u}: a system user's uid is 1 to 59999")));
        }
        let plain = |s: &str| {
            !s.is_empty() && s.len() <= 256 && s.chars().all(|c| !c.is_control() && !matches!(c, '"' | '\\' | ':'))
        };
        if let Some(d) = &self.description
            && !plain(d)
        {
            return Err(("description".into(), "at most 256 characters, none of '\"', '\\', ':' or controls".into()));
        }
        if let Some(h) = &self.home
            && (crate::path::TargetPath::parse(h).is_err() || !plain(h) || h.contains(' '))
        {
            return Err((
                "home".into(),
                format!("{:?} is not a normalised absolute path", crate::manifest::excerpt(h)),
            ));
        }
        Ok(())
    }

    /// The `systemd-sysusers` lines that create it (`--inline`).
    pub fn sysusers_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let id = match (&self.group, self.uid) {
            (Some(g), uid) => {
                out.push(format!("g {g} -"));
                format!("{}:{g}", uid.map_or("-".to_owned(), |u| u.to_string()))
            }
            (None, Some(u)) => u.to_string(),
            (None, None) => "-".to_owned(),
        };
        let gecos = format!("\"{}\"", self.description.as_deref().unwrap_or(&self.name));
        out.push(format!("u {} {id} {gecos} {}", self.name, self.home.as_deref().unwrap_or("/")));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_names_or_numbers() {
        assert_eq!("op-dbus".parse::<Principal>().unwrap(), Principal::Name("op-dbus".into()));
        assert_eq!("1000".parse::<Principal>().unwrap(), Principal::Id(1000));
        assert_eq!("0".parse::<Principal>().unwrap(), Principal::Id(0));
        for bad in ["", "-x", "1x y", "a/b", "4294967295", "99999999999", &"a".repeat(32), "x:y", "ü"] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
        let j: Principal = serde_json::from_str("998").unwrap();
        assert_eq!(j, Principal::Id(998));
        assert_eq!(serde_json::to_string(&j).unwrap(), "998");
        assert_eq!(serde_json::to_string(&Principal::Name("n".into())).unwrap(), "\"n\"");
        assert!(serde_json::from_str::<Principal>("-1").is_err());
        assert!(serde_json::from_str::<Principal>("4294967295").is_err());
        assert!(serde_json::from_str::<Principal>("1.5").is_err());
    }

    #[test]
    fn users_are_checked_and_become_sysusers_lines() {
        let u = |y: &str| serde_json::from_str::<UserSpec>(y).unwrap();
        let plain = u(r#"{"name":"op-dbus"}"#);
        plain.check().unwrap();
        assert_eq!(plain.sysusers_lines(), ["u op-dbus - \"op-dbus\" /"]);
        let full = u(r#"{"name":"app","uid":990,"group":"apps","description":"the app","home":"/var/lib/app"}"#);
        full.check().unwrap();
        assert_eq!(full.sysusers_lines(), ["g apps -", "u app 990:apps \"the app\" /var/lib/app"]);
        assert_eq!(u(r#"{"name":"a","uid":5}"#).sysusers_lines(), ["u a 5 \"a\" /"]);
        for bad in [
            r#"{"name":"0day"}"#,
            r#"{"name":"a","uid":0}"#,
            r#"{"name":"a","uid":65534}"#,
            r#"{"name":"a","group":"b c"}"#,
            r#"{"name":"a","description":"x\"y"}"#,
            r#"{"name":"a","description":"x\ny"}"#,
            r#"{"name":"a","home":"rel"}"#,
            r#"{"name":"a","home":"/a b"}"#,
            r#"{"name":"a","home":"/a/../b"}"#,
        ] {
            assert!(u(bad).check().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<UserSpec>(r#"{"name":"a","shell":"/bin/sh"}"#).is_err());
    }
}
