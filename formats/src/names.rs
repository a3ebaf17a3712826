//! Stage names, versions and `NAME:VERSION` references.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A stage name: 1 to 128 of `[A-Za-z0-9._-]`, starting with a letter or digit.
///
/// Upper case and `_` are allowed because the users' own names have them
/// (`PROXMOX-DBUS_STAGE`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StageName(String);

/// A name that is not a valid stage name.
#[derive(Debug, thiserror::Error)]
pub enum InvalidName {
    #[error("invalid stage name {0:?}: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    Syntax(String),
    #[error(
        "invalid stage name {0:?}: the installer keeps a file of that name beside the stages' links \
         (reserved: {reserved}, and names ending in .json, .lock or .tmp)",
        reserved = RESERVED_NAMES.join(", ")
    )]
    Reserved(String),
}

/// Names of the installer's own entries in its staging directory, where every stage also
/// has its link (`staging/<stage>`): no stage may take one of them (compared ignoring
/// case, so that a case-insensitive copy of the staging area cannot collide either). The
/// installer's future entries start with `.`, which no stage name does.
pub const RESERVED_NAMES: &[&str] = &["state.json", "lock", "journal", "snapshots", "backups", "generations", "tmp"];

/// Endings reserved for the installer's files beside the stage links.
const RESERVED_SUFFIXES: &[&str] = &[".json", ".lock", ".tmp"];

fn is_reserved(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    RESERVED_NAMES.contains(&lower.as_str()) || RESERVED_SUFFIXES.iter().any(|x| lower.ends_with(x))
}

impl StageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for StageName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !ok {
            return Err(InvalidName::Syntax(s.to_owned()));
        }
        if is_reserved(s) {
            return Err(InvalidName::Reserved(s.to_owned()));
        }
        Ok(StageName(s.to_owned()))
    }
}

impl TryFrom<String> for StageName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StageName> for String {
    fn from(n: StageName) -> String {
        n.0
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A semantic version (`1.0.0`, `2.1.0-rc.1`); images of one name are ordered by it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version(semver::Version);

/// A version that is not semver.
#[derive(Debug, thiserror::Error)]
#[error("invalid version {0:?}: expected a semantic version such as 1.0.0")]
pub struct InvalidVersion(pub String);

impl Version {
    pub fn semver(&self) -> &semver::Version {
        &self.0
    }
}

impl FromStr for Version {
    type Err = InvalidVersion;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Build metadata (`+...`) would make two different strings compare equal.
        if s.len() > 64 || s.contains('+') {
            return Err(InvalidVersion(s.to_owned()));
        }
        semver::Version::parse(s).map(Version).map_err(|_| InvalidVersion(s.to_owned()))
    }
}

impl TryFrom<String> for Version {
    type Error = InvalidVersion;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.0.to_string()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.0)
    }
}

/// `NAME:VERSION`, the tag of an image in a store.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference {
    pub name: StageName,
    pub version: Version,
}

/// A reference that is not `NAME:VERSION`.
#[derive(Debug, thiserror::Error)]
pub enum InvalidReference {
    #[error("invalid image reference {0:?}: expected NAME:VERSION, for example stage-1-core-dbus:1.0.0")]
    Shape(String),
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error(transparent)]
    Version(#[from] InvalidVersion),
}

impl Reference {
    pub fn new(name: StageName, version: Version) -> Self {
        Reference { name, version }
    }
}

impl FromStr for Reference {
    type Err = InvalidReference;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, v) = s.split_once(':').ok_or_else(|| InvalidReference::Shape(s.to_owned()))?;
        Ok(Reference { name: n.parse()?, version: v.parse()? })
    }
}

impl TryFrom<String> for Reference {
    type Error = InvalidReference;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Reference> for String {
    fn from(r: Reference) -> String {
        r.to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["stage-1-core-dbus", "PROXMOX-DBUS_STAGE", "a", "chat.module"] {
            ok.parse::<StageName>().unwrap();
        }
        for bad in ["", "-x", ".hidden", "a/b", "a:b", "..", "a b", &"x".repeat(129)] {
            assert!(bad.parse::<StageName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_installers_own_entries_are_not_stage_names() {
        for bad in
            ["state.json", "lock", "journal", "snapshots", "backups", "Backups", "LOCK", "x.json", "a.tmp", "b.lock"]
        {
            let e = bad.parse::<StageName>().unwrap_err();
            assert!(matches!(e, InvalidName::Reserved(_)), "{bad}: {e}");
            assert!(e.to_string().contains("reserved"), "{e}");
        }
        // Close to a reserved name is fine.
        for ok in ["locker", "journal-2", "state", "snapshots.d", "json"] {
            ok.parse::<StageName>().unwrap();
        }
        // A state file naming such a stage does not load either.
        assert!(serde_json::from_str::<StageName>("\"state.json\"").is_err());
    }

    #[test]
    fn versions_order() {
        let a: Version = "1.0.0".parse().unwrap();
        let b: Version = "1.10.0".parse().unwrap();
        let c: Version = "1.10.0-rc.1".parse().unwrap();
        assert!(a < c && c < b);
        assert!("1.0".parse::<Version>().is_err());
        assert!("1.0.0+build".parse::<Version>().is_err());
    }

    #[test]
    fn references() {
        let r: Reference = "stage-1-core-dbus:1.2.3".parse().unwrap();
        assert_eq!(r.to_string(), "stage-1-core-dbus:1.2.3");
        assert!("noversion".parse::<Reference>().is_err());
        assert!("a:b:c".parse::<Reference>().is_err());
    }
}
