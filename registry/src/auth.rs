//! Credentials and the registry's `WWW-Authenticate` challenges.
//!
//! Credentials come from the command line (`--username` + `--password-stdin`) or from a
//! containers auth file: `$REGISTRY_AUTH_FILE`, else `~/.docker/config.json`:
//!
//! ```text
//! {"auths": {"registry.example.com:5000": {"auth": base64("USER:PASSWORD")}}}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// An auth file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}; fix the file or pass --username and --password-stdin")]
pub struct AuthFileError {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The auth file to read: `$REGISTRY_AUTH_FILE`, else `$HOME/.docker/config.json`.
pub fn default_auth_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".docker/config.json"))
}

/// The key of an `auths` entry reduced to `host[:port]` (`https://h/v1/` → `h`).
fn auth_key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Looks `host` (`host[:port]`) up in the text of an auth file.
pub fn lookup(text: &[u8], path: &Path, host: &str) -> Result<Option<Credentials>, AuthFileError> {
    let bad = |reason: String| AuthFileError { path: path.to_owned(), reason };
    let file: AuthFile = serde_json::from_slice(text).map_err(|e| bad(format!("not a containers auth file: {e}")))?;
    let Some((key, entry)) = file.auths.iter().find(|(k, _)| auth_key_host(k) == host) else { return Ok(None) };
    if let Some(a) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| bad(format!("auths.{key:?}.auth is not base64: {e}")))?;
        let raw = String::from_utf8(raw).map_err(|_| bad(format!("auths.{key:?}.auth is not UTF-8")))?;
        let (u, p) = raw.split_once(':').ok_or_else(|| bad(format!("auths.{key:?}.auth is not USER:PASSWORD")))?;
        return Ok(Some(Credentials { username: u.to_owned(), password: p.to_owned() }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials { username: u.clone(), password: p.clone() })),
        _ => Ok(None),
    }
}

/// The credentials for `host` from the default auth file, if it exists and has an entry.
pub fn from_auth_file(host: &str) -> Result<Option<(Credentials, PathBuf)>, AuthFileError> {
    let Some(path) = default_auth_file() else { return Ok(None) };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuthFileError { path, reason: e.to_string() }),
    };
    Ok(lookup(&text, &path, host)?.map(|c| (c, path)))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses `Basic realm="..."` or `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k="v",k2=v2` (quoted values may hold commas and escaped quotes).
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        out.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"Registry Realm\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example/token\",service=\"registry.example\",scope=\"repository:a/b:pull,push\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn auth_file_lookup() {
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let text = format!(
            "{{\"auths\": {{\"https://reg.example:5000/v1/\": {{\"auth\": \"{auth}\"}}, \"other\": {{\"username\": \"u\", \"password\": \"p\"}}}}}}"
        );
        let p = Path::new("config.json");
        let c = lookup(text.as_bytes(), p, "reg.example:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pa:ss"));
        assert_eq!(lookup(text.as_bytes(), p, "other").unwrap().unwrap().username, "u");
        assert_eq!(lookup(text.as_bytes(), p, "reg.example").unwrap(), None);
        assert!(lookup(b"{\"auths\": {\"h\": {\"auth\": \"!!\"}}}", p, "h").is_err());
        assert!(!format!("{c:?}").contains("pa:ss"));
    }
}
