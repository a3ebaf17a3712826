//! Path safety: every path taken from a manifest, an archive or a payload goes through here.
//!
//! A [`RelPath`] is a normalised relative path (`bin/op-dbus`): `/`-separated, no empty,
//! `.` or `..` components, no NUL, bounded length. A [`TargetPath`] is a normalised
//! absolute path on the host (`/usr/local/bin/op-dbus`) with the same rules after the
//! leading `/`. Link texts are checked with [`confine_link`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted path, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest accepted path component, in bytes.
pub const MAX_COMPONENT: usize = 255;
/// Deepest accepted nesting.
pub const MAX_DEPTH: usize = 64;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    #[error("path {0:?} is empty")]
    Empty(String),
    #[error("path {0:?} is absolute; expected a path relative to the stage")]
    Absolute(String),
    #[error("path {0:?} is not absolute; expected a path such as /usr/local/bin/NAME")]
    NotAbsolute(String),
    #[error("path {0:?} has a '..' component")]
    DotDot(String),
    #[error("path {0:?} is not normalised (empty or '.' component, or trailing '/')")]
    NotNormal(String),
    #[error("path {0:?} has a NUL byte or a backslash")]
    BadByte(String),
    #[error("path {0:?} is too long (at most {MAX_PATH} bytes, {MAX_COMPONENT} per component, {MAX_DEPTH} levels)")]
    TooLong(String),
    #[error("link {path:?} -> {target:?} points outside the stage")]
    LinkEscapes { path: String, target: String },
}

fn check_components(whole: &str, rel: &str) -> Result<usize, UnsafePath> {
    if whole.len() > MAX_PATH {
        return Err(UnsafePath::TooLong(whole.to_owned()));
    }
    if whole.bytes().any(|b| b == 0 || b == b'\\') {
        return Err(UnsafePath::BadByte(whole.to_owned()));
    }
    let mut depth = 0;
    for c in rel.split('/') {
        match c {
            ".." => return Err(UnsafePath::DotDot(whole.to_owned())),
            "" | "." => return Err(UnsafePath::NotNormal(whole.to_owned())),
            c if c.len() > MAX_COMPONENT => return Err(UnsafePath::TooLong(whole.to_owned())),
            _ => depth += 1,
        }
    }
    if depth > MAX_DEPTH {
        return Err(UnsafePath::TooLong(whole.to_owned()));
    }
    Ok(depth)
}

/// A normalised relative path inside a stage (`bin/op-dbus`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct RelPath(String);

/// Written as its text, without a copy of it.
impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl RelPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The containing directory, `None` at the top.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_owned()))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, n)| n)
    }

    /// `self/name`, with `name` checked as one component.
    pub fn join(&self, name: &str) -> Result<RelPath, UnsafePath> {
        RelPath::parse(&format!("{}/{}", self.0, name))
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// Every proper ancestor, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0.match_indices('/').map(|(i, _)| RelPath(self.0[..i].to_owned()))
    }

    pub fn parse(s: &str) -> Result<RelPath, UnsafePath> {
        if s.is_empty() {
            return Err(UnsafePath::Empty(s.to_owned()));
        }
        if s.starts_with('/') {
            return Err(UnsafePath::Absolute(s.to_owned()));
        }
        check_components(s, s)?;
        Ok(RelPath(s.to_owned()))
    }
}

impl FromStr for RelPath {
    type Err = UnsafePath;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RelPath::parse(s)
    }
}

impl TryFrom<String> for RelPath {
    type Error = UnsafePath;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RelPath::parse(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A normalised absolute host path (`/usr/local/bin/op-dbus`); `/` itself is refused.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TargetPath(String);

/// Written as its text, without a copy of it.
impl Serialize for TargetPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl TargetPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path without its leading `/`, for resolving under a root.
    pub fn relative(&self) -> RelPath {
        RelPath(self.0[1..].to_owned())
    }

    /// Whether this path is `prefix` or lies below it.
    pub fn is_under(&self, prefix: &TargetPath) -> bool {
        self.relative().starts_with(&prefix.relative())
    }

    pub fn parse(s: &str) -> Result<TargetPath, UnsafePath> {
        let Some(rel) = s.strip_prefix('/') else {
            return Err(UnsafePath::NotAbsolute(s.to_owned()));
        };
        if rel.is_empty() {
            return Err(UnsafePath::NotNormal(s.to_owned()));
        }
        check_components(s, rel)?;
        Ok(TargetPath(s.to_owned()))
    }
}

impl FromStr for TargetPath {
    type Err = UnsafePath;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetPath::parse(s)
    }
}

impl TryFrom<String> for TargetPath {
    type Error = UnsafePath;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TargetPath::parse(&s)
    }
}

impl From<TargetPath> for String {
    fn from(p: TargetPath) -> String {
        p.0
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks that a symlink at `path` with text `target` stays inside the stage, and returns
/// the stage path it resolves to (lexically). Absolute link texts are refused: as seen from
/// a host they would point anywhere.
pub fn confine_link(path: &RelPath, target: &str) -> Result<RelPath, UnsafePath> {
    let escapes = || UnsafePath::LinkEscapes { path: path.0.clone(), target: target.to_owned() };
    if target.is_empty() || target.len() > MAX_PATH || target.bytes().any(|b| b == 0) {
        return Err(escapes());
    }
    if target.starts_with('/') {
        return Err(escapes());
    }
    let mut parts: Vec<&str> = path.components().collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or_else(escapes)?;
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(escapes());
    }
    RelPath::parse(&parts.join("/")).map_err(|_| escapes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in ["bin/op-dbus", "a", "web/index.html", "a/.hidden", "a/..b/c..", "x y"] {
            assert_eq!(RelPath::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a/..", "a//b", "./a", "a/.", "a/", "a\0b", "a\\..\\b"] {
            assert!(RelPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RelPath::parse("a/".repeat(65).trim_end_matches('/')).is_err());
        assert!(RelPath::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn target_paths() {
        for ok in ["/usr/local/bin/op-dbus", "/etc/op-dbus"] {
            TargetPath::parse(ok).unwrap();
        }
        for bad in ["usr/local", "/", "//etc", "/etc/../shadow", "/etc/", "/usr/./bin"] {
            assert!(TargetPath::parse(bad).is_err(), "{bad:?}");
        }
        let t = TargetPath::parse("/usr/local/bin/x").unwrap();
        assert!(t.is_under(&TargetPath::parse("/usr/local").unwrap()));
        assert!(!t.is_under(&TargetPath::parse("/usr/loc").unwrap()));
    }

    #[test]
    fn links() {
        let p = RelPath::parse("bin/tool").unwrap();
        assert_eq!(confine_link(&p, "../lib/tool").unwrap().as_str(), "lib/tool");
        assert_eq!(confine_link(&p, "other").unwrap().as_str(), "bin/other");
        assert!(confine_link(&p, "../../etc/passwd").is_err());
        assert!(confine_link(&p, "/etc/passwd").is_err());
        assert!(confine_link(&p, "..").is_err());
        assert!(confine_link(&p, "").is_err());
    }

    #[test]
    fn helpers() {
        let p = RelPath::parse("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.file_name(), "c");
        let anc: Vec<_> = p.ancestors().map(|a| a.0).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert!(p.starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(!p.starts_with(&RelPath::parse("a/bc").unwrap()));
    }

    #[test]
    fn link_texts_with_a_nul_or_too_long_are_refused() {
        let p = RelPath::parse("bin/tool").unwrap();
        // Lexically `x\0/../y` stays inside; the NUL alone refuses it.
        assert!(confine_link(&p, "x\0/../y").is_err());
        assert!(confine_link(&p, "x/../y").is_ok());
        let long = "a/".repeat(MAX_PATH / 2) + "b";
        assert!(long.len() > MAX_PATH);
        assert!(matches!(confine_link(&p, &long), Err(UnsafePath::LinkEscapes { .. })));
        let fits = format!("{}b", "a/".repeat(20));
        assert!(confine_link(&p, &fits).is_ok());
        // Exactly at the limit is fine, one byte over is not.
        let at = "zz/../".repeat(682) + "abcd";
        assert_eq!(at.len(), MAX_PATH);
        assert_eq!(confine_link(&p, &at).unwrap().as_str(), "bin/abcd");
        assert!(confine_link(&p, &(at + "e")).is_err());
    }

    #[test]
    fn path_limits_are_exact() {
        // A component of 255 bytes, not 256.
        assert!(RelPath::parse(&"c".repeat(MAX_COMPONENT)).is_ok());
        assert!(matches!(RelPath::parse(&"c".repeat(MAX_COMPONENT + 1)), Err(UnsafePath::TooLong(_))));
        // 64 levels, not 65.
        assert!(RelPath::parse(&vec!["d"; MAX_DEPTH].join("/")).is_ok());
        assert!(matches!(RelPath::parse(&vec!["d"; MAX_DEPTH + 1].join("/")), Err(UnsafePath::TooLong(_))));
        // The whole path: 4096 bytes, not 4097, with every component and the depth fine.
        let whole = |n: usize| {
            let mut parts = vec!["p".repeat(250); 16];
            let used: usize = parts.iter().map(|x| x.len() + 1).sum();
            parts.push("q".repeat(n - used));
            parts.join("/")
        };
        assert_eq!(whole(MAX_PATH).len(), MAX_PATH);
        assert!(RelPath::parse(&whole(MAX_PATH)).is_ok());
        assert!(matches!(RelPath::parse(&whole(MAX_PATH + 1)), Err(UnsafePath::TooLong(_))));
        assert!(TargetPath::parse(&format!("/{}", whole(MAX_PATH - 1))).is_ok());
        assert!(TargetPath::parse(&format!("/{}", whole(MAX_PATH))).is_err());
        // NUL and backslash anywhere.
        for bad in ["a\0b", "a\\b", "\0"] {
            assert!(matches!(RelPath::parse(bad), Err(UnsafePath::BadByte(_))), "{bad:?}");
            assert!(TargetPath::parse(&format!("/usr/{bad}")).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn is_under_is_by_component() {
        let t = |s: &str| TargetPath::parse(s).unwrap();
        assert!(t("/usr/local/bin").is_under(&t("/usr/local")));
        assert!(t("/usr/local").is_under(&t("/usr/local")));
        assert!(!t("/usr/localx/bin").is_under(&t("/usr/local")));
        assert!(!t("/usr").is_under(&t("/usr/local")));
    }

    #[test]
    fn paths_show_as_written() {
        // Messages name paths by Display; debug output quotes them.
        let r = RelPath::parse("bin/op-dbus").unwrap();
        assert_eq!(format!("{r} {r:?}"), "bin/op-dbus \"bin/op-dbus\"");
        let t = TargetPath::parse("/usr/local/bin/op-dbus").unwrap();
        assert_eq!(t.as_str(), "/usr/local/bin/op-dbus");
        assert_eq!(format!("{t} {t:?}"), "/usr/local/bin/op-dbus \"/usr/local/bin/op-dbus\"");
        assert_eq!(String::from(t.clone()), t.as_str());
        assert_eq!(t.relative().as_str(), "usr/local/bin/op-dbus");
    }
}
