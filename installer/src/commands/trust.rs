//! `trust add`, `trust revoke` (planned as a `TrustEdit`, then applied; `--dry-run`
//! reports the plan) and `trust list`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::commands::init::DEFAULT_POLICY;
use crate::error::Malformed;
use crate::ops::Ctx;
use crate::receive::Trust;

/// What `trust add` did or would do.
#[derive(Debug, Serialize)]
pub struct TrustAdded {
    pub key_id: keys::KeyId,
    /// The key's file in the trust store.
    pub file: PathBuf,
    /// The stage globs the key may sign after the command (empty: any stage).
    pub scopes: Vec<String>,
    pub dry_run: bool,
}

/// A change to the trust store, planned before anything is written: the policy's new text
/// (when it changes) and the key to write. Applied policy first, so that a crash in between
/// never leaves a key trusted for every stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrustEdit {
    /// `stage.toml` after the command, when it differs from now.
    pub policy: Option<String>,
    /// A key to write to `trusted-keys/<id>.pub` (its PEM).
    pub key: Option<(keys::KeyId, String)>,
}

/// The text of `stage.toml` (read inside the root), or the default policy if there is none.
pub(crate) fn policy_text(ctx: &Ctx) -> Result<String> {
    let rel = format!("{}/stage.toml", crate::host::ETC);
    match crate::receive::read_in_root(&ctx.host, &rel, keys::policy::MAX_POLICY_BYTES)? {
        Some(bytes) => Ok(String::from_utf8(bytes)
            .map_err(|_| Malformed(format!("{}: not UTF-8 text", policy_path(ctx).display())))?),
        None => Ok(DEFAULT_POLICY.to_owned()),
    }
}

fn policy_path(ctx: &Ctx) -> PathBuf {
    ctx.host.root.join(crate::host::ETC).join("stage.toml")
}

/// Plans an edit of the policy's text by `f`.
pub(crate) fn plan_policy(ctx: &Ctx, f: impl FnOnce(&str, &Path) -> Result<String>) -> Result<TrustEdit> {
    let text = policy_text(ctx)?;
    let new = f(&text, &policy_path(ctx)).map_err(|e| Malformed(format!("{e:#}")))?;
    Ok(TrustEdit { policy: (new != text).then_some(new), key: None })
}

/// Applies `edit`; returns the key's file, if one was written.
pub(crate) fn apply(ctx: &Ctx, edit: &TrustEdit) -> Result<Option<PathBuf>> {
    if let Some(text) = &edit.policy {
        let path = ctx.host.ensure_dir(crate::host::ETC)?.join("stage.toml");
        formats::layout::write_atomic(&path, text.as_bytes())?;
    }
    match &edit.key {
        Some((id, pem)) => {
            let dest = ctx.host.ensure_dir("etc/op-dbus/trusted-keys")?.join(format!("{id}.pub"));
            formats::layout::write_atomic(&dest, pem.as_bytes())?;
            Ok(Some(dest))
        }
        None => Ok(None),
    }
}

/// `trust add FILE.pub [--scope GLOB]... [--replace]`: `--scope` adds to the key's
/// scopes; with `--replace` the given globs become its scopes.
#[tracing::instrument(name = "trust-add", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn trust_add(ctx: &Ctx, file: &Path, scopes: &[String], replace: bool) -> Result<TrustAdded> {
    let key = keys::PublicKey::read(file)?;
    let id = key.key_id();
    let text = policy_text(ctx)?;
    let current = keys::policy::Policy::parse(&text, &policy_path(ctx))
        .map_err(|e| Malformed(format!("{e:#}")))?
        .scope(&id)
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let mut wanted = if replace || scopes.is_empty() { Vec::new() } else { current.clone() };
    for g in scopes {
        if !wanted.contains(g) {
            wanted.push(g.clone());
        }
    }
    let after = if scopes.is_empty() { current } else { wanted };
    let mut edit = if scopes.is_empty() {
        TrustEdit { policy: None, key: None }
    } else {
        plan_policy(ctx, |text, path| keys::policy::set_scope(text, path, &id, &after).map_err(Into::into))?
    };
    edit.key = Some((id, key.to_spki_pem()));
    let planned = ctx.host.root.join(format!("etc/op-dbus/trusted-keys/{id}.pub"));
    if ctx.opts.dry_run {
        return Ok(TrustAdded { key_id: id, file: planned, scopes: after, dry_run: true });
    }
    let dest = apply(ctx, &edit)?.unwrap_or(planned);
    Ok(TrustAdded { key_id: id, file: dest, scopes: after, dry_run: false })
}

/// What `trust revoke` did or would do.
#[derive(Debug, Serialize)]
pub struct TrustRevoked {
    pub revoked: keys::KeyId,
    pub dry_run: bool,
}

/// `trust revoke KEYID`: the policy edit is planned (and checked) in a dry run too.
#[tracing::instrument(name = "trust-revoke", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn trust_revoke(ctx: &Ctx, id: &keys::KeyId) -> Result<TrustRevoked> {
    let edit = plan_policy(ctx, |text, path| keys::policy::add_revoked(text, path, id).map_err(Into::into))?;
    if !ctx.opts.dry_run {
        apply(ctx, &edit)?;
    }
    Ok(TrustRevoked { revoked: *id, dry_run: ctx.opts.dry_run })
}

/// `trust list`.
#[derive(Debug, Serialize)]
pub struct TrustedInfo {
    pub key_id: String,
    pub file: PathBuf,
    pub scopes: Vec<String>,
    /// `[scope_prefixes]`: empty when the key's scope does not narrow the prefixes.
    pub prefixes: Vec<String>,
    pub revoked: bool,
}

pub fn trust_list(ctx: &Ctx) -> Result<Vec<TrustedInfo>> {
    let trust = Trust::load(&ctx.host)?;
    Ok(trust
        .keys
        .iter()
        .map(|k| {
            let id = k.key.key_id();
            TrustedInfo {
                key_id: id.to_string(),
                file: k.source.clone(),
                scopes: trust.policy.scope(&id).map(|s| s.to_vec()).unwrap_or_default(),
                prefixes: trust.policy.scope_prefixes(&id).unwrap_or_default().iter().map(|p| p.to_string()).collect(),
                revoked: trust.policy.is_revoked(&id),
            }
        })
        .collect())
}
