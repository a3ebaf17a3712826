//! `init`: plan the staging area, the store, the trust store and the default policy file
//! under the root, then create them; `--dry-run` reports the plan.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::host::{Host, STORE};
use crate::ops::{Ctx, Options};
use crate::state::State;

/// `init`: the staging area, the store, the trust store and a default policy file.
#[derive(Debug, Serialize)]
pub struct InitReport {
    pub root: PathBuf,
    pub staging: PathBuf,
    pub store: PathBuf,
    pub trusted_keys: PathBuf,
    pub policy: PathBuf,
    /// The host's age identity (`/etc/op-dbus/host.age`), made when missing.
    pub identity: PathBuf,
    /// Its public recipient (`age1...`); absent in a dry run that would create it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    pub backend: &'static str,
}

pub const DEFAULT_POLICY: &str = r#"# op-dbus-stage policy (see `op-dbus-stage --help` and docs/stage-toml.md).
# Where stages may place files:
# allowed_prefixes = ["/usr/local", "/opt", "/etc/op-dbus", "/etc/systemd/system", "/var/www", "/var/lib/op-dbus"]
# Features enabled on this host, for a stage's `requires_feature`:
# features = ["openflow"]
# Revoked key ids:
# revoked = []
# Snapshots kept: the newest N (the running set's pre-snapshot and marked ones besides):
# [snapshots]
# keep = 10
"#;

/// What `init` creates under `root` (and, for a dry run, all it reports): the paths, and
/// the backend the staging area gets, from the one check the real run makes
/// ([`crate::host::backend`] of the staging directory, or of the nearest folder above it
/// that exists, which a new one inherits).
fn plan(root: &Path) -> Result<InitReport> {
    let root = if root.is_dir() { fs::canonicalize(root)? } else { root.to_owned() };
    let staging = root.join(crate::host::STAGING);
    let backend = crate::host::backend(staging.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/")));
    Ok(InitReport {
        staging,
        store: root.join(STORE),
        trusted_keys: root.join("etc/op-dbus/trusted-keys"),
        policy: root.join("etc/op-dbus/stage.toml"),
        identity: root.join(crate::identity::IDENTITY),
        recipient: None,
        backend,
        root,
    })
}

#[tracing::instrument(name = "init", skip_all, fields(root = %opts.root.display(), dry_run = opts.dry_run))]
pub fn init(opts: &Options) -> Result<InitReport> {
    if opts.dry_run {
        return plan(&opts.root);
    }
    // A missing root folder is created, like `mkdir -p`.
    fs::create_dir_all(&opts.root).with_context(|| format!("creating the root {}", opts.root.display()))?;
    let ctx = Ctx::changing_host(Host::open(&opts.root)?, opts)?;
    let store = ctx.store()?;
    let keys_dir = ctx.host.ensure_dir("etc/op-dbus/trusted-keys")?;
    // Where activation registers plugins (see `plugins`).
    ctx.host.ensure_dir(crate::plugins::PLUGIN_DIR.trim_start_matches('/'))?;
    let etc = ctx.host.ensure_dir(crate::host::ETC)?;
    let policy = etc.join("stage.toml");
    if !policy.exists() {
        formats::layout::write_atomic(&policy, DEFAULT_POLICY.as_bytes())?;
    }
    if !ctx.staging.state_file().exists() {
        State::new().write(&ctx.staging.state_file())?;
    }
    let (identity, _) = crate::identity::create_if_missing(&ctx.host)?;
    let recipient = crate::identity::load(&ctx.host)?.recipient().to_string();
    // The paths as they resolved inside the root (links in the root are followed there).
    Ok(InitReport {
        root: ctx.host.root.clone(),
        staging: ctx.staging.dir.clone(),
        store: store.root().to_owned(),
        trusted_keys: keys_dir,
        policy,
        identity,
        recipient: Some(recipient),
        backend: crate::host::backend(&ctx.staging.dir),
    })
}
