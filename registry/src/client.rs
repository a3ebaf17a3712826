//! The HTTP side: one blocking `ureq` agent per registry, authentication from the
//! registry's challenges, bounded retries with backoff, streaming blob transfers.
//!
//! ```text
//! GET  /v2/                               (ping; learns the auth challenge)
//! HEAD /v2/<repo>/blobs/<digest>          200: present, 404: upload it
//! POST /v2/<repo>/blobs/uploads/          202 + Location
//! PUT  <Location>&digest=<digest>         201 (monolithic upload)
//! PUT  /v2/<repo>/manifests/<tag>         201, Content-Type: application/vnd.oci.image.manifest.v1+json
//! GET  /v2/<repo>/manifests/<tag>         Accept: the OCI manifest type
//! GET  /v2/<repo>/blobs/<digest>          Range: bytes=N- to resume (206), else restart (200)
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ureq::ResponseExt as _;
use ureq::http::{self, Method, Response, Uri};
use ureq::tls::{PemItem, RootCerts, TlsConfig};

use formats::Digest;
use formats::layout::Layout;
use formats::oci::{Descriptor, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES};

use crate::auth::{Challenge, Credentials, parse_challenge};
use crate::error::RegistryError;
use crate::reference::is_loopback;

const USER_AGENT: &str = concat!("op-dbus-registry/", env!("CARGO_PKG_VERSION"));
const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// How transient failures (connection errors, 5xx, 429, a cut download) are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// The first pause; doubled after each failure up to `max_delay`.
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// No new attempt starts after this long.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(4),
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, failures: u32) -> Duration {
        let d = self.initial_delay.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        d.min(self.max_delay)
    }

    fn may_retry(&self, attempts: u32, start: Instant, pause: Duration) -> bool {
        attempts < self.attempts && start.elapsed() + pause < self.max_elapsed
    }
}

/// How many `WWW-Authenticate` challenges one request answers before giving up: the first,
/// and a second for a token of another scope or a renewed one, with one to spare. A registry
/// that keeps asking (alternating two challenges, say) is refused after this many.
pub const MAX_AUTH_ROUNDS: u32 = 3;

/// The environment variable that sets [`Limits::request_timeout`] (whole seconds).
pub const TIMEOUT_ENV: &str = "OP_DBUS_REGISTRY_TIMEOUT";
/// The environment variable that sets [`Limits::min_rate`] (bytes per second).
pub const MIN_RATE_ENV: &str = "OP_DBUS_REGISTRY_MIN_RATE";

/// How long a registry may take: every request has a total deadline (connection,
/// headers and body), checked by the HTTP client while it waits, so a server that
/// trickles bytes cannot hold a command (and the host's lock) for longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The deadline of each small request (the API check, manifests, tokens, HEAD, the
    /// start of an upload): 60 s by default, `$OP_DBUS_REGISTRY_TIMEOUT`.
    pub request_timeout: Duration,
    /// Blob downloads and uploads get `request_timeout` plus their size at this many
    /// bytes per second: 16 KiB/s by default, `$OP_DBUS_REGISTRY_MIN_RATE`.
    pub min_rate: u64,
    /// How long a response may send nothing before the request is abandoned (each read
    /// waits at most this long): 60 s by default; the installer's `--stall-timeout`.
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { request_timeout: Duration::from_secs(60), min_rate: 16 * 1024, stall: Duration::from_secs(60) }
    }
}

impl Limits {
    /// These limits with `$OP_DBUS_REGISTRY_TIMEOUT` and `$OP_DBUS_REGISTRY_MIN_RATE` applied.
    pub fn with_env(self) -> Result<Limits, RegistryError> {
        let mut out = self;
        if let Some(secs) = env_number(TIMEOUT_ENV, "a number of seconds from 1 to 86400", 1..=86_400)? {
            out.request_timeout = Duration::from_secs(secs);
        }
        if let Some(rate) =
            env_number(MIN_RATE_ENV, "a number of bytes per second from 1 to 1000000000", 1..=1_000_000_000)?
        {
            out.min_rate = rate;
        }
        Ok(out)
    }

    /// The deadline of a transfer of `bytes` bytes of a blob.
    pub fn blob_deadline(&self, bytes: u64) -> Duration {
        self.request_timeout.saturating_add(Duration::from_secs(bytes / self.min_rate.max(1)))
    }
}

fn env_number(
    name: &'static str,
    want: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, RegistryError> {
    match std::env::var_os(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => {
            let text = v.to_string_lossy();
            match text.trim().parse::<u64>() {
                Ok(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(RegistryError::Setting {
                    name,
                    value: text.chars().take(40).collect::<String>().escape_debug().to_string(),
                    want: want.to_owned(),
                }),
            }
        }
    }
}

/// Which bound a request hit.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// The deadline of a small request.
    Request(Duration),
    /// The deadline of a blob transfer of so many bytes.
    Blob { bytes: u64, deadline: Duration },
}

impl Bound {
    fn deadline(self) -> Duration {
        match self {
            Bound::Request(d) | Bound::Blob { deadline: d, .. } => d,
        }
    }
}

/// `scheme://host:port` of a URL, lowercase, with the scheme's default port.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, host, port))
}

/// Whether an I/O error of a response body is a read that waited longer than
/// [`Limits::stall`] for a byte: the registry stalled. Not retried: a source that stalls
/// is abandoned.
fn is_stall(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<ureq::Error>())
        .is_some_and(|u| matches!(u, ureq::Error::Timeout(ureq::Timeout::PerRead)))
}

/// Whether an I/O error of a response body is the request's deadline running out.
fn is_deadline(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<ureq::Error>())
        .is_some_and(|u| matches!(u, ureq::Error::Timeout(ureq::Timeout::Global)))
}

/// How to reach a registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// Plain HTTP to a registry that is not on loopback.
    pub insecure: bool,
    /// Trust only the certificates of this PEM file (and use HTTPS even on loopback).
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Where the credentials came from, for messages (`--username`, the auth file's path).
    pub credentials_source: Option<String>,
    pub retry: RetryPolicy,
    /// Deadlines; `Client::new` applies `$OP_DBUS_REGISTRY_TIMEOUT` and
    /// `$OP_DBUS_REGISTRY_MIN_RATE` on top.
    pub limits: Limits,
}

impl ClientOptions {
    /// Fills in credentials from `$REGISTRY_AUTH_FILE` / `~/.docker/config.json` when none
    /// were given on the command line.
    pub fn with_auth_file_for(mut self, host: &str) -> Result<Self, RegistryError> {
        if self.credentials.is_none()
            && let Some((c, path)) = crate::auth::from_auth_file(host)?
        {
            self.credentials = Some(c);
            self.credentials_source = Some(format!("the auth file {}", path.display()));
        }
        Ok(self)
    }
}

/// What kind of access a client asks bearer tokens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

#[derive(Debug, Default)]
struct AuthState {
    header: Option<String>,
    /// Bearer tokens by scope.
    tokens: BTreeMap<String, String>,
}

/// A blocking client of one registry (OCI Distribution API).
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    host: String,
    base: String,
    opts: ClientOptions,
    access: Access,
    auth: Mutex<AuthState>,
}

/// The body of a request; a file is reopened for each attempt.
enum ReqBody<'a> {
    Empty,
    Bytes(&'a [u8]),
    File { open: &'a dyn Fn() -> io::Result<File>, len: u64 },
}

/// A manifest as the registry served it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
}

/// What one blob download took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobFetch {
    pub bytes: u64,
    /// Ranged requests that continued an interrupted download.
    pub resumed: u32,
    /// Downloads started again from byte 0 (the registry ignored the range).
    pub restarted: u32,
}

fn status_is_transient(s: u16) -> bool {
    s == 429 || (500..=599).contains(&s)
}

fn error_is_transient(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_))
}

fn header<'r>(resp: &'r Response<ureq::Body>, name: &str) -> Option<&'r str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The registry's JSON error text (`{"errors":[{"code","message"}]}`), shortened.
fn error_detail(resp: Response<ureq::Body>) -> String {
    let mut buf = Vec::new();
    let _ = resp.into_body().into_reader().take(4096).read_to_end(&mut buf);
    let text = match serde_json::from_slice::<serde_json::Value>(&buf) {
        Ok(v) => v["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["code"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&buf).chars().take(300).collect(),
    };
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!(": {text}") }
}

impl Client {
    /// A client of the registry at `host` (`host[:port]`). Plain HTTP for loopback hosts
    /// or with `insecure`; otherwise HTTPS verified against the system's roots, or against
    /// `ca_file` only.
    pub fn new(host: &str, mut opts: ClientOptions, access: Access) -> Result<Client, RegistryError> {
        opts.limits = opts.limits.with_env()?;
        let plain = opts.ca_file.is_none() && (opts.insecure || is_loopback(host));
        let roots = match &opts.ca_file {
            Some(path) => {
                let tls_err = |detail: String| RegistryError::Tls { host: host.to_owned(), detail };
                let pem = std::fs::read(path).map_err(|e| tls_err(format!("reading --ca {}: {e}", path.display())))?;
                let mut certs = Vec::new();
                for item in ureq::tls::parse_pem(&pem) {
                    match item {
                        Ok(PemItem::Certificate(c)) => certs.push(c),
                        Ok(_) => {}
                        Err(e) => return Err(tls_err(format!("--ca {}: {e}", path.display()))),
                    }
                }
                if certs.is_empty() {
                    return Err(tls_err(format!("--ca {} holds no PEM certificate", path.display())));
                }
                RootCerts::Specific(Arc::new(certs))
            }
            None => RootCerts::PlatformVerifier,
        };
        let tls = TlsConfig::builder().root_certs(roots).build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(USER_AGENT)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(opts.limits.stall))
            .build();
        let scheme = if plain { "http" } else { "https" };
        Ok(Client {
            agent: config.into(),
            host: host.to_owned(),
            base: format!("{scheme}://{host}"),
            opts,
            access,
            auth: Mutex::new(AuthState::default()),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://HOST` or `https://HOST`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn auth_header(&self) -> Option<String> {
        self.auth.lock().expect("auth lock").header.clone()
    }

    /// Whether `url` is on the registry itself (same scheme, host and port): only such
    /// requests carry credentials or answer challenges.
    fn is_registry(&self, url: &str) -> bool {
        origin(url).is_some_and(|o| Some(o) == origin(&self.base))
    }

    /// Sends one request, which must complete (body included) within `deadline`.
    fn send_once(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        body: &ReqBody<'_>,
        with_auth: Option<&str>,
        deadline: Duration,
    ) -> Result<Response<ureq::Body>, ureq::Error> {
        let mut b = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        if let Some(a) = with_auth {
            b = b.header("Authorization", a);
        }
        let agent = &self.agent;
        match body {
            ReqBody::Empty => agent.run(agent.configure_request(b.body(())?).timeout_global(Some(deadline)).build()),
            ReqBody::Bytes(bytes) => {
                let req = b.header("Content-Length", bytes.len().to_string()).body(*bytes)?;
                agent.run(agent.configure_request(req).timeout_global(Some(deadline)).build())
            }
            ReqBody::File { open, len } => {
                let f = open()?;
                let body = ureq::SendBody::from_owned_reader(io::BufReader::with_capacity(1 << 20, f));
                let req = b.header("Content-Length", len.to_string()).body(body)?;
                agent.run(agent.configure_request(req).timeout_global(Some(deadline)).build())
            }
        }
    }

    /// The error for a request that ran out of its deadline.
    fn deadline_hit(&self, what: &str, bound: Bound) -> RegistryError {
        let secs = bound.deadline().as_secs();
        let detail = match bound {
            Bound::Request(_) => format!(
                "did not complete within the {secs} s deadline of a request (raise it with {TIMEOUT_ENV}=SECONDS)"
            ),
            Bound::Blob { bytes, .. } => format!(
                "was slower than the minimum rate of {} bytes/s: {bytes} bytes did not arrive within {secs} s \
                 ({} s plus the size at that rate; lower the rate with {MIN_RATE_ENV}=BYTES_PER_SECOND or raise \
                 {TIMEOUT_ENV})",
                self.opts.limits.min_rate,
                self.opts.limits.request_timeout.as_secs()
            ),
        };
        RegistryError::Deadline { host: self.host.clone(), what: what.to_owned(), detail }
    }

    fn small(&self) -> Bound {
        Bound::Request(self.opts.limits.request_timeout)
    }

    /// Sends a request: authenticates on 401 from the registry's challenge, retries
    /// transient failures with backoff. Any other status is the caller's to judge.
    ///
    /// Credentials go only with requests to the registry itself: not to the host of an
    /// upload `Location`, and not along a redirect (the HTTP client drops them there); a
    /// challenge from anywhere else is refused, not answered. At most
    /// [`MAX_AUTH_ROUNDS`] challenges are answered; each attempt has the deadline `bound`.
    fn execute(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: ReqBody<'_>,
        what: &str,
        bound: Bound,
    ) -> Result<Response<ureq::Body>, RegistryError> {
        let start = Instant::now();
        let policy = self.opts.retry;
        let ours = self.is_registry(url);
        let mut attempts = 0u32;
        let mut failures = 0u32;
        let mut rounds = 0u32;
        let mut answered: Option<String> = None;
        loop {
            attempts += 1;
            let auth = if ours { self.auth_header() } else { None };
            match self.send_once(&method, url, headers, &body, auth.as_deref(), bound.deadline()) {
                Ok(resp) if resp.status().as_u16() == 401 => {
                    let from = resp.get_uri().to_string();
                    if !ours || !self.is_registry(&from) {
                        return Err(RegistryError::ForeignChallenge {
                            host: self.host.clone(),
                            what: what.to_owned(),
                            other: origin(&from).map(|(s, h, p)| format!("{s}://{h}:{p}")).unwrap_or(from),
                        });
                    }
                    let challenge = header(&resp, "www-authenticate").unwrap_or("").to_owned();
                    if answered.as_deref() == Some(challenge.as_str()) || challenge.is_empty() {
                        return Err(self.unauthorized(what));
                    }
                    rounds += 1;
                    if rounds > MAX_AUTH_ROUNDS {
                        return Err(RegistryError::AuthRounds {
                            host: self.host.clone(),
                            what: what.to_owned(),
                            rounds: MAX_AUTH_ROUNDS,
                        });
                    }
                    self.authenticate(&challenge, what)?;
                    answered = Some(challenge);
                    attempts -= 1;
                }
                Ok(resp) if resp.status().as_u16() == 403 => {
                    return Err(RegistryError::Denied {
                        host: self.host.clone(),
                        repository: url.split("/v2/").nth(1).unwrap_or(url).split('/').next().unwrap_or("").to_owned(),
                        action: if method == Method::GET || method == Method::HEAD { "pull from" } else { "push to" },
                        what: what.to_owned(),
                    });
                }
                Ok(resp) if status_is_transient(resp.status().as_u16()) => {
                    failures += 1;
                    let retry_after = header(&resp, "retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(policy.max_delay));
                    let pause = retry_after.unwrap_or_else(|| policy.delay(failures));
                    if !policy.may_retry(attempts, start, pause) {
                        let status = resp.status().as_u16();
                        return Err(RegistryError::Status {
                            host: self.host.clone(),
                            what: what.to_owned(),
                            status,
                            retries: format!(" after {attempts} attempt(s)"),
                            detail: error_detail(resp),
                        });
                    }
                    tracing::info!("{what}: HTTP {}; retrying in {pause:?}", resp.status().as_u16());
                    drop(resp);
                    std::thread::sleep(pause);
                }
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Timeout(ureq::Timeout::Global)) => return Err(self.deadline_hit(what, bound)),
                Err(e) if error_is_transient(&e) => {
                    failures += 1;
                    let pause = policy.delay(failures);
                    if !policy.may_retry(attempts, start, pause) {
                        return Err(self.unreachable(url, &e, attempts, start));
                    }
                    tracing::info!("{what}: {e}; retrying in {pause:?}");
                    std::thread::sleep(pause);
                }
                Err(e) => return Err(self.unreachable(url, &e, attempts, start)),
            }
        }
    }

    fn unreachable(&self, url: &str, e: &ureq::Error, attempts: u32, start: Instant) -> RegistryError {
        let detail = match e {
            ureq::Error::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
                "connection refused (nothing listens on that port)".to_owned()
            }
            ureq::Error::HostNotFound => "the host name does not resolve".to_owned(),
            e => e.to_string(),
        };
        RegistryError::Unreachable {
            host: self.host.clone(),
            url: url.to_owned(),
            detail,
            attempts,
            secs: start.elapsed().as_secs_f64(),
        }
    }

    fn unauthorized(&self, what: &str) -> RegistryError {
        match &self.opts.credentials {
            Some(c) => RegistryError::Unauthorized {
                host: self.host.clone(),
                user: c.username.clone(),
                source_name: self.opts.credentials_source.clone().unwrap_or_else(|| "--username".to_owned()),
                what: what.to_owned(),
            },
            None => RegistryError::CredentialsNeeded { host: self.host.clone(), what: what.to_owned() },
        }
    }

    /// Answers a challenge: basic credentials, or a bearer token from the realm.
    fn authenticate(&self, challenge: &str, what: &str) -> Result<(), RegistryError> {
        let header = match parse_challenge(challenge) {
            Some(Challenge::Basic) => {
                let c = self.opts.credentials.as_ref().ok_or_else(|| self.unauthorized(what))?;
                c.basic()
            }
            Some(Challenge::Bearer { realm, service, scope }) => {
                let scope = scope.map(|s| self.widen_scope(&s));
                let key = scope.clone().unwrap_or_default();
                let cached = self.auth.lock().expect("auth lock").tokens.get(&key).cloned();
                let token = match cached {
                    Some(t) => t,
                    None => {
                        let t = self.fetch_token(&realm, service.as_deref(), scope.as_deref(), what)?;
                        self.auth.lock().expect("auth lock").tokens.insert(key, t.clone());
                        t
                    }
                };
                format!("Bearer {token}")
            }
            None => {
                return Err(RegistryError::Malformed {
                    host: self.host.clone(),
                    what: what.to_owned(),
                    reason: format!("unsupported authentication challenge {challenge:?}"),
                });
            }
        };
        self.auth.lock().expect("auth lock").header = Some(header);
        Ok(())
    }

    /// A pushing client asks for `pull,push` at once, so one token serves every request.
    fn widen_scope(&self, scope: &str) -> String {
        match (self.access, scope.strip_prefix("repository:").and_then(|s| s.rsplit_once(':'))) {
            (Access::Push, Some((repo, _))) => format!("repository:{repo}:pull,push"),
            _ => scope.to_owned(),
        }
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        what: &str,
    ) -> Result<String, RegistryError> {
        let realm_origin =
            origin(realm).filter(|(s, _, _)| s == "http" || s == "https").ok_or_else(|| RegistryError::Malformed {
                host: self.host.clone(),
                what: what.to_owned(),
                reason: format!(
                    "the token realm {:?} is not an http(s) URL",
                    realm.chars().take(200).collect::<String>()
                ),
            })?;
        // Credentials go to a realm over HTTPS, or over plain HTTP only on loopback or with
        // --insecure; elsewhere a token is asked for without them, or not at all.
        let (scheme, realm_host, _) = &realm_origin;
        let cleartext_ok = scheme == "https" || self.opts.insecure || is_loopback(realm_host);
        let mut url = realm.to_owned();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", service), ("scope", scope)] {
            if let Some(v) = v {
                url.push_str(&format!("{sep}{k}={}", encode(v)));
                sep = '&';
            }
        }
        let basic = self.opts.credentials.as_ref().map(Credentials::basic);
        if basic.is_some() && !cleartext_ok {
            return Err(RegistryError::CleartextRealm {
                host: self.host.clone(),
                what: what.to_owned(),
                realm: format!("{scheme}://{realm_host}"),
            });
        }
        let start = Instant::now();
        let mut attempts = 0;
        let deadline = self.opts.limits.request_timeout;
        let resp = loop {
            attempts += 1;
            match self.send_once(&Method::GET, &url, &[], &ReqBody::Empty, basic.as_deref(), deadline) {
                Ok(r) => break r,
                Err(ureq::Error::Timeout(ureq::Timeout::Global)) => {
                    return Err(self.deadline_hit(&format!("the token request to {realm}"), self.small()));
                }
                Err(e) if error_is_transient(&e) && attempts < self.opts.retry.attempts => {
                    std::thread::sleep(self.opts.retry.delay(attempts));
                }
                Err(e) => return Err(self.unreachable(&url, &e, attempts, start)),
            }
        };
        match resp.status().as_u16() {
            200 => {}
            401 | 403 => return Err(self.unauthorized(what)),
            s => {
                return Err(RegistryError::Status {
                    host: self.host.clone(),
                    what: format!("the token request to {realm}"),
                    status: s,
                    retries: String::new(),
                    detail: error_detail(resp),
                });
            }
        }
        let mut buf = Vec::new();
        resp.into_body().into_reader().take(1 << 20).read_to_end(&mut buf).map_err(|e| {
            let what = format!("reading the token from {realm}");
            if is_deadline(&e) { self.deadline_hit(&what, self.small()) } else { RegistryError::Io { what, source: e } }
        })?;
        let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| RegistryError::Malformed {
            host: self.host.clone(),
            what: format!("the token from {realm}"),
            reason: e.to_string(),
        })?;
        v["token"].as_str().or(v["access_token"].as_str()).map(str::to_owned).ok_or_else(|| RegistryError::Malformed {
            host: self.host.clone(),
            what: format!("the token from {realm}"),
            reason: "no `token` field".to_owned(),
        })
    }

    fn unexpected(&self, what: &str, resp: Response<ureq::Body>) -> RegistryError {
        let status = resp.status().as_u16();
        RegistryError::Status {
            host: self.host.clone(),
            what: what.to_owned(),
            status,
            retries: String::new(),
            detail: error_detail(resp),
        }
    }

    /// `GET /v2/`: the registry answers and accepts our credentials (if it wants any).
    pub fn ping(&self) -> Result<(), RegistryError> {
        let url = format!("{}/v2/", self.base);
        let resp = self.execute(Method::GET, &url, &[], ReqBody::Empty, "the API check GET /v2/", self.small())?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            404 => Err(RegistryError::Malformed {
                host: self.host.clone(),
                what: "GET /v2/".to_owned(),
                reason: "404: this server does not speak the registry API (wrong port?)".to_owned(),
            }),
            _ => Err(self.unexpected("GET /v2/", resp)),
        }
    }

    /// The size of `digest` in `repo` if the registry has it.
    pub fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let what = format!("HEAD blob {digest}");
        let resp = self.execute(Method::HEAD, &url, &[], ReqBody::Empty, &what, self.small())?;
        match resp.status().as_u16() {
            200 => Ok(Some(header(&resp, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0))),
            404 => Ok(None),
            _ => Err(self.unexpected(&what, resp)),
        }
    }

    /// Uploads one blob (POST then a monolithic PUT); `open` is called for each attempt.
    pub fn push_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
        open: &dyn Fn() -> io::Result<File>,
    ) -> Result<(), RegistryError> {
        let what = format!("uploading blob {}", desc.digest);
        let start_url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let zero = [("Content-Length", "0".to_owned())];
        let resp = self.execute(Method::POST, &start_url, &zero, ReqBody::Empty, &what, self.small())?;
        if resp.status().as_u16() != 202 {
            return Err(self.unexpected(&what, resp));
        }
        let location = header(&resp, "location").map(str::to_owned).ok_or_else(|| RegistryError::Malformed {
            host: self.host.clone(),
            what: what.clone(),
            reason: "the upload was accepted without a Location".to_owned(),
        })?;
        drop(resp);
        let mut url = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!("{}/{location}", self.base)
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", encode(&desc.digest.to_string())));
        let headers = [("Content-Type", "application/octet-stream".to_owned())];
        let bound = Bound::Blob { bytes: desc.size, deadline: self.opts.limits.blob_deadline(desc.size) };
        let resp = self.execute(Method::PUT, &url, &headers, ReqBody::File { open, len: desc.size }, &what, bound)?;
        match resp.status().as_u16() {
            201 | 204 => Ok(()),
            _ => Err(self.unexpected(&what, resp)),
        }
    }

    /// Puts a manifest under `reference` (a tag); returns the digest the registry computed.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let what = format!("putting the manifest {repo}:{reference}");
        let headers = [("Content-Type", media_type.to_owned())];
        let resp = self.execute(Method::PUT, &url, &headers, ReqBody::Bytes(bytes), &what, self.small())?;
        if !matches!(resp.status().as_u16(), 200 | 201 | 204) {
            return Err(self.unexpected(&what, resp));
        }
        let ours = Digest::of(bytes);
        if let Some(theirs) = header(&resp, "docker-content-digest").and_then(|d| d.parse::<Digest>().ok())
            && theirs != ours
        {
            return Err(RegistryError::DigestMismatch {
                host: self.host.clone(),
                what,
                expected: ours,
                actual: theirs,
            });
        }
        Ok(ours)
    }

    /// Fetches a manifest by tag or digest, bounded to `MAX_MANIFEST_BYTES`; `None` on 404.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<Option<FetchedManifest>, RegistryError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let what = format!("the manifest {}/{repo}:{reference}", self.host);
        let accept = [(
            "Accept",
            format!(
                "{MANIFEST_MEDIA_TYPE}, {INDEX_MEDIA_TYPE};q=0.5, {DOCKER_MANIFEST_V2};q=0.4, {DOCKER_MANIFEST_LIST};q=0.3"
            ),
        )];
        let resp = self.execute(Method::GET, &url, &accept, ReqBody::Empty, &what, self.small())?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.unexpected(&what, resp)),
        }
        let media_type = header(&resp, "content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_owned();
        let served = header(&resp, "docker-content-digest").map(str::to_owned);
        let mut bytes = Vec::new();
        resp.into_body().into_reader().take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes).map_err(|e| {
            if is_deadline(&e) {
                self.deadline_hit(&what, self.small())
            } else {
                RegistryError::Io { what: format!("reading {what}"), source: e }
            }
        })?;
        let malformed =
            |reason: String| RegistryError::Malformed { host: self.host.clone(), what: what.clone(), reason };
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(malformed(format!("larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let digest = Digest::of(&bytes);
        let expected = match reference.parse::<Digest>() {
            Ok(d) => Some(d),
            Err(_) => served.as_deref().and_then(|s| s.parse::<Digest>().ok()),
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            return Err(RegistryError::DigestMismatch { host: self.host.clone(), what, expected, actual: digest });
        }
        if media_type == INDEX_MEDIA_TYPE || media_type == DOCKER_MANIFEST_LIST {
            return Err(malformed(format!("it is an image index ({media_type}), not an op-dbus stage image manifest")));
        }
        if media_type == DOCKER_MANIFEST_V2 {
            return Err(malformed("it is a Docker container image manifest, not an op-dbus stage image".to_owned()));
        }
        Ok(Some(FetchedManifest { bytes, digest, media_type }))
    }

    /// Downloads a blob into `layout`, hashing it as it streams; an interrupted download
    /// continues with `Range: bytes=N-` where the registry allows it (206), else starts
    /// over. More bytes than the descriptor says, or bytes of another digest, are refused.
    pub fn fetch_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
        layout: &Layout,
        max: u64,
    ) -> Result<BlobFetch, RegistryError> {
        self.fetch_blob_teed(repo, desc, layout, max, None)
    }

    /// [`Client::fetch_blob`], handing each chunk to `tee` as well, in order, as it is
    /// stored. A tee that fails, or a fetch that has to start over (a registry that ignored
    /// the range of a resume), stops the copy to the tee (it is dropped), not the fetch;
    /// a resume goes on from the byte it stopped at. Whether the bytes were the blob is
    /// decided when it is stored (its digest), after the last chunk went to the tee.
    pub fn fetch_blob_teed(
        &self,
        repo: &str,
        desc: &Descriptor,
        layout: &Layout,
        max: u64,
        mut tee: formats::archive::Tee,
    ) -> Result<BlobFetch, RegistryError> {
        let what = format!("blob {} of {}/{repo}", desc.digest, self.host);
        let layout_err = |source| RegistryError::Layout { what: what.clone(), source };
        if desc.size > max {
            return Err(RegistryError::Malformed {
                host: self.host.clone(),
                what,
                reason: format!("its descriptor says {} bytes, more than the {max} allowed here", desc.size),
            });
        }
        let url = format!("{}/v2/{repo}/blobs/{}", self.base, desc.digest);
        let policy = self.opts.retry;
        let start = Instant::now();
        let mut out = BlobFetch::default();
        let mut w = layout.blob_writer().map_err(layout_err)?;
        let mut written = 0u64;
        let mut attempts = 0u32;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            attempts += 1;
            let headers: Vec<(&str, String)> =
                if written > 0 { vec![("Range", format!("bytes={written}-"))] } else { Vec::new() };
            let left = desc.size - written;
            let bound = Bound::Blob { bytes: left, deadline: self.opts.limits.blob_deadline(left) };
            let resp = self.execute(Method::GET, &url, &headers, ReqBody::Empty, &what, bound)?;
            match resp.status().as_u16() {
                200 if written > 0 => {
                    tracing::info!("{what}: the registry ignored the range; starting over");
                    w = layout.blob_writer().map_err(layout_err)?;
                    written = 0;
                    out.restarted += 1;
                    // The tee has had the bytes before: it cannot take them again.
                    tee = None;
                }
                200 => {}
                206 if written > 0 => {
                    let from = header(&resp, "content-range")
                        .and_then(|r| r.strip_prefix("bytes "))
                        .and_then(|r| r.split('-').next())
                        .and_then(|n| n.trim().parse::<u64>().ok());
                    if from != Some(written) {
                        return Err(RegistryError::Malformed {
                            host: self.host.clone(),
                            what,
                            reason: format!("asked for bytes {written}-, the registry sent a range from {from:?}"),
                        });
                    }
                    out.resumed += 1;
                }
                404 => {
                    return Err(RegistryError::BlobNotFound {
                        host: self.host.clone(),
                        repository: repo.to_owned(),
                        digest: desc.digest,
                    });
                }
                _ => return Err(self.unexpected(&what, resp)),
            }
            let mut reader = resp.into_body().into_reader();
            let cut = loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_deadline(&e) => return Err(self.deadline_hit(&what, bound)),
                    Err(e) if is_stall(&e) => {
                        return Err(RegistryError::Deadline {
                            host: self.host.clone(),
                            what,
                            detail: format!(
                                "stalled at byte {written} of {}: nothing arrived for {} s; abandoned",
                                desc.size,
                                self.opts.limits.stall.as_secs()
                            ),
                        });
                    }
                    Err(e) => break Some(e.to_string()),
                };
                if written + n as u64 > desc.size {
                    return Err(RegistryError::Malformed {
                        host: self.host.clone(),
                        what,
                        reason: format!("more than the {} bytes its descriptor says", desc.size),
                    });
                }
                w.write_all(&buf[..n]).map_err(|e| RegistryError::Io {
                    what: format!("storing {what} in {}", layout.root().display()),
                    source: e,
                })?;
                if tee.as_mut().is_some_and(|t| t.write_all(&buf[..n]).is_err()) {
                    tee = None;
                }
                written += n as u64;
            };
            if written == desc.size {
                break;
            }
            let detail = cut.unwrap_or_else(|| "the connection closed early".to_owned());
            let pause = policy.delay(attempts);
            if !policy.may_retry(attempts, start, pause) {
                return Err(RegistryError::Interrupted {
                    host: self.host.clone(),
                    what,
                    written,
                    size: desc.size,
                    attempts,
                    detail,
                });
            }
            tracing::info!("{what}: interrupted at byte {written} of {} ({detail}); resuming", desc.size);
            std::thread::sleep(pause);
        }
        w.finish_expecting(&desc.digest).map_err(layout_err)?;
        out.bytes = written;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(250));
        assert_eq!(p.delay(2), Duration::from_millis(500));
        assert_eq!(p.delay(30), Duration::from_secs(4));
        let start = Instant::now();
        assert!(p.may_retry(1, start, p.delay(1)));
        assert!(!p.may_retry(5, start, p.delay(1)));
    }

    #[test]
    fn origins_and_deadlines() {
        let c = Client::new("127.0.0.1:5000", ClientOptions::default(), Access::Pull).unwrap();
        assert!(c.is_registry("http://127.0.0.1:5000/v2/x/blobs/uploads/1?state=a"));
        assert!(c.is_registry("HTTP://127.0.0.1:5000/v2/"));
        for other in
            ["http://127.0.0.1:5001/u", "https://127.0.0.1:5000/u", "http://127.1:5000/u", "http://evil/u", "/v2/"]
        {
            assert!(!c.is_registry(other), "{other}");
        }
        let c = Client::new("registry.example", ClientOptions::default(), Access::Pull).unwrap();
        assert!(c.is_registry("https://REGISTRY.example:443/v2/"));
        let l = Limits::default();
        assert_eq!(l.blob_deadline(0), Duration::from_secs(60));
        assert_eq!(l.blob_deadline(16 * 1024 * 100), Duration::from_secs(160));
        assert_eq!(Limits { min_rate: 0, ..l }.blob_deadline(10), Duration::from_secs(70));
    }

    #[test]
    fn scheme_follows_the_host() {
        let c = Client::new("127.0.0.1:5000", ClientOptions::default(), Access::Pull).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:5000");
        let c = Client::new("registry.example.com", ClientOptions::default(), Access::Pull).unwrap();
        assert_eq!(c.base_url(), "https://registry.example.com");
        let insecure = ClientOptions { insecure: true, ..Default::default() };
        assert_eq!(Client::new("r.example", insecure, Access::Pull).unwrap().base_url(), "http://r.example");
        assert_eq!(encode("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    }
}
