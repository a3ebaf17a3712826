//! `feature enable|disable NAME`: planned as an edit of the policy, then applied.

use anyhow::Result;
use serde::Serialize;

use crate::commands::trust;
use crate::error::Malformed;
use crate::ops::Ctx;

/// What `feature enable|disable` did or would do.
#[derive(Debug, Serialize)]
pub struct FeatureChanged {
    pub feature: String,
    pub enabled: bool,
    /// Every feature the host enables after the command.
    pub features: Vec<String>,
    pub dry_run: bool,
}

/// `feature enable|disable NAME`: edits `features` of stage.toml, keeping the rest intact.
#[tracing::instrument(name = "feature", skip(ctx), fields(dry_run = ctx.opts.dry_run))]
pub fn set_feature(ctx: &Ctx, feature: &str, enabled: bool) -> Result<FeatureChanged> {
    let edit = trust::plan_policy(ctx, |text, path| {
        keys::policy::set_feature(text, path, feature, enabled).map_err(Into::into)
    })?;
    let new = match &edit.policy {
        Some(new) => new.clone(),
        None => trust::policy_text(ctx)?,
    };
    if !ctx.opts.dry_run {
        trust::apply(ctx, &edit)?;
    }
    let path = ctx.host.root.join(crate::host::ETC).join("stage.toml");
    let features = keys::policy::Policy::parse(&new, &path)
        .map_err(|e| Malformed(format!("{e:#}")))?
        .features()
        .map(str::to_owned)
        .collect();
    Ok(FeatureChanged { feature: feature.to_owned(), enabled, features, dry_run: ctx.opts.dry_run })
}
