//! Registry references: `HOST[:PORT]/REPO[:TAG]` or `HOST[:PORT]/REPO@sha256:<hex>`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use formats::Digest;

/// A reference to a manifest in a registry.
///
/// ```
/// let r: registry::RegistryRef = "127.0.0.1:5000/op-dbus/core:1.0.0".parse().unwrap();
/// assert_eq!(r.host, "127.0.0.1:5000");
/// assert_eq!(r.repository, "op-dbus/core");
/// assert_eq!(r.tag.as_deref(), Some("1.0.0"));
/// assert!(r.is_loopback());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub host: String,
    /// The repository path (`a/b/c`, lowercase).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// A string that is not `HOST[:PORT]/REPO[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a registry reference HOST[:PORT]/REPO[:TAG]: {reason}")]
pub struct InvalidReference {
    pub input: String,
    pub reason: String,
}

impl RegistryRef {
    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn manifest_reference(&self) -> Option<String> {
        self.digest.map(|d| d.to_string()).or_else(|| self.tag.clone())
    }

    /// The same repository with another tag.
    pub fn with_tag(&self, tag: &str) -> RegistryRef {
        RegistryRef { tag: Some(tag.to_owned()), digest: None, ..self.clone() }
    }

    /// The host without its port (brackets of an IPv6 address removed).
    pub fn hostname(&self) -> &str {
        hostname(&self.host)
    }

    /// Whether the host is on this machine: `localhost`, 127.0.0.0/8 or ::1.
    pub fn is_loopback(&self) -> bool {
        is_loopback(&self.host)
    }

    /// `HOST/REPO`, without tag or digest.
    pub fn repository_url(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }
}

/// The host of `host[:port]` without the port.
pub fn hostname(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.split(':').next().unwrap_or(host)
}

/// Whether `host[:port]` names this machine: `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(host: &str) -> bool {
    let h = hostname(host);
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn valid_host(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("an IPv6 address needs its closing ]")?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        (None, after.strip_prefix(':').map(Some).unwrap_or_else(|| (!after.is_empty()).then_some(after)))
    } else {
        match host.split_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(n) = name {
        let ok = !n.is_empty()
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("{n:?} is not a host name"));
        }
    }
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("{p:?} is not a port"));
    }
    Ok(())
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
        })
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
}

impl FromStr for RegistryRef {
    type Err = InvalidReference;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| InvalidReference { input: s.to_owned(), reason: reason.to_owned() };
        let (host, rest) = s.split_once('/').ok_or_else(|| bad("no / between the host and the repository"))?;
        valid_host(host).map_err(|r| bad(&r))?;
        let (path, digest) = match rest.split_once('@') {
            Some((p, d)) => (p, Some(d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?)),
            None => (rest, None),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (path, None),
        };
        if !valid_repository(repository) {
            return Err(bad(&format!(
                "{repository:?} is not a repository name (lowercase letters, digits, '.', '_', '-', components separated by '/')"
            )));
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(bad(&format!("{t:?} is not a tag (letters, digits, '.', '_', '-'; at most 128)")));
        }
        Ok(RegistryRef {
            host: host.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r: RegistryRef = "registry.example.com:5000/a/b-c:v1.0.0".parse().unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("registry.example.com:5000", "a/b-c", Some("v1.0.0"))
        );
        assert!(!r.is_loopback());
        let r: RegistryRef = "localhost/x".parse().unwrap();
        assert_eq!(r.tag, None);
        assert!(r.is_loopback());
        let r: RegistryRef = "[::1]:5000/x:sha256-ab.sig".parse().unwrap();
        assert!(r.is_loopback());
        assert_eq!(r.hostname(), "::1");
        assert!("127.9.0.1:1/x:1".parse::<RegistryRef>().unwrap().is_loopback());
        let d = Digest::of(b"x");
        let r: RegistryRef = format!("h.io/x@{d}").parse().unwrap();
        assert_eq!(r.manifest_reference(), Some(d.to_string()));
        assert_eq!(r.to_string(), format!("h.io/x@{d}"));
        for bad in [
            "noslash",
            "/x:1",
            "h:0/x",
            "h:99999/x",
            "h/UPPER:1",
            "h/x:bad/tag",
            "h/x:",
            "h//x",
            "-h/x",
            "h/x@sha256:zz",
        ] {
            assert!(bad.parse::<RegistryRef>().is_err(), "{bad}");
        }
    }
}
