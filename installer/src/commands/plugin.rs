//! `deploy-plugin NAME [SOURCE] [--force]` and `update-plugin NAME [SOURCE]`: deploy or
//! update the stage that provides a plugin (its `plugins:` names it), taking the newest
//! image that provides it from SOURCE, or else from the local store. Deploying goes through
//! `deploy` (signatures, policy, dependencies, one transaction) like any other.

use anyhow::Result;
use serde::Serialize;

use formats::{Reference, StageName};

use crate::commands::deploy::{Batch, DeployReport, deploy};
use crate::error::{NotFound, Usage};
use crate::ops::Ctx;
use crate::receive::{self, Source};

/// What `deploy-plugin` or `update-plugin` did.
#[derive(Debug, Serialize)]
pub struct PluginReport {
    pub plugin: String,
    /// The stage that provides it (now, or after the change).
    pub stage: StageName,
    /// The image chosen, NAME:VERSION.
    pub reference: String,
    /// `deployed`, `updated`, `already-deployed` or `up-to-date`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployReport>,
}

/// `deploy-plugin` (`update = false`) or `update-plugin` (`update = true`).
pub fn deploy_plugin(
    ctx: &Ctx,
    plugin: &str,
    source: Option<&Source>,
    force: bool,
    update: bool,
) -> Result<PluginReport> {
    let state = ctx.state()?;
    let active = state
        .stages
        .iter()
        .find(|(_, s)| s.active.activation.plugins.iter().any(|p| p.name == plugin))
        .map(|(n, s)| (n.clone(), s.active.version.clone()));
    if update && active.is_none() {
        return Err(Usage(format!(
            "the plugin {plugin} is not deployed (no active stage provides it): `op-dbus-stage deploy-plugin {plugin}`"
        ))
        .into());
    }
    // The images to choose from: those of SOURCE (received into the store first), else the store's.
    let received = match source {
        Some(s) => Some(deploy(ctx, std::slice::from_ref(s), Batch::Whole, false, false)?),
        None => None,
    };
    let from_source: Option<Vec<Reference>> = received.as_ref().map(|r| {
        r.received
            .iter()
            .filter(|v| v.candidate().config.plugins.iter().any(|p| p == plugin))
            .map(|v| v.candidate().reference.clone())
            .collect()
    });
    let choices = match from_source {
        Some(refs) => refs,
        None => providers_in_store(ctx, plugin)?,
    };
    // The providing stage: the active one when there is one, else the newest image's.
    let chosen = choices
        .iter()
        .filter(|r| active.as_ref().is_none_or(|(n, _)| *n == r.name))
        .max_by(|a, b| a.version.cmp(&b.version))
        .cloned();
    let Some(chosen) = chosen else {
        let place = if source.is_some() { "SOURCE" } else { "the local store" };
        return Err(NotFound(format!(
            "no image in {place} provides the plugin {plugin}{}: receive the stage that provides it \
             (`op-dbus-stage receive FILE.oci.tar`) or name it as SOURCE",
            active.as_ref().map_or(String::new(), |(n, _)| format!(" for its stage {n}"))
        ))
        .into());
    };
    let report = |outcome, deploy| PluginReport {
        plugin: plugin.to_owned(),
        stage: chosen.name.clone(),
        reference: chosen.to_string(),
        outcome,
        deploy,
    };
    match (&active, update) {
        (Some((_, v)), false) if !force => {
            return Ok(PluginReport { reference: format!("{}:{v}", chosen.name), ..report("already-deployed", None) });
        }
        (Some((_, v)), true) if chosen.version <= *v => {
            return Ok(PluginReport { reference: format!("{}:{v}", chosen.name), ..report("up-to-date", None) });
        }
        _ => {}
    }
    let outcome = if active.is_some() { "updated" } else { "deployed" };
    // In a dry run nothing was stored: plan SOURCE itself.
    let deployed = match (source, ctx.opts.dry_run) {
        (Some(s), true) => deploy(ctx, std::slice::from_ref(s), Batch::Whole, false, true)?,
        _ => {
            deploy(ctx, &[Source::Store(chosen.name.clone(), Some(chosen.version.clone()))], Batch::Whole, false, true)?
        }
    };
    // The image chosen may be the active one already (--force): then nothing changed.
    let outcome = if deployed.deployed.is_empty() { "already-deployed" } else { outcome };
    Ok(report(outcome, Some(deployed)))
}

/// The images of the local store whose stage provides `plugin`.
fn providers_in_store(ctx: &Ctx, plugin: &str) -> Result<Vec<Reference>> {
    let store = ctx.store()?;
    let index = store.index()?;
    let mut out = Vec::new();
    for d in &index.manifests {
        let Some(tag) = d.annotation(formats::oci::ANNOTATION_REF_NAME) else { continue };
        let Ok(r) = tag.parse::<Reference>() else { continue };
        // An image that cannot be read is not a candidate; deploy would refuse it anyway.
        if let Ok(Some(c)) = receive::candidate(&store, &index, tag)
            && c.config.plugins.iter().any(|p| p == plugin)
        {
            out.push(r);
        }
    }
    Ok(out)
}
