//! Admission: whether the host's policy lets a stage be active, decided by pure functions
//! from what was gathered beforehand (the stage's manifest, its signers, the policy, where
//! each target resolves on this host, the deployed state). Nothing here reads the host.

use std::collections::BTreeMap;

use anyhow::Result;

use formats::manifest::StageConfig;
use formats::path::TargetPath;
use keys::policy::Policy;

use crate::error::{Malformed, Refused};
use crate::host::{Host, UnsafeLink};
use crate::plan::ReadError;
use crate::state::{Activation, State};

/// Where one target lies on this host once the links on the way are followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    At(TargetPath),
    /// Through a link the installer must not follow (the message says which).
    Unsafe(String),
    /// The host could not be read there.
    Failed(ReadError),
}

/// Where each target of a stage resolves, by its text.
pub type Resolutions = BTreeMap<TargetPath, Resolved>;

/// Resolves the targets of `config` that the policy allows by their text (the others are
/// refused before their resolution matters).
pub fn resolutions(host: &Host, policy: &Policy, config: &StageConfig) -> Resolutions {
    let mut out = Resolutions::new();
    for f in config.files.iter().filter(|f| policy.target_allowed(&f.target)) {
        let r = match host.resolve_target(&f.target) {
            Ok(t) => Resolved::At(t),
            Err(e) if e.get_ref().is_some_and(|x| x.is::<UnsafeLink>()) => Resolved::Unsafe(e.to_string()),
            Err(e) => Resolved::Failed(ReadError { kind: e.kind(), message: e.to_string() }),
        };
        out.insert(f.target.clone(), r);
    }
    out
}

/// What the host's policy asks of a stage before it may be active: every target under the
/// allowed prefixes, by its text and by where it resolves on this host (`resolved`, from
/// [`resolutions`]; links on the way that root does not own are never followed), inside
/// the prefixes its signers' scopes allow, and its required feature enabled. `what` names
/// the image in messages.
pub fn policy(policy: &Policy, config: &StageConfig, what: &str, signers: &[String], resolved: &Resolutions) -> Result<()> {
    let prefixes = || policy.allowed_prefixes().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    // The signers' scopes may narrow the prefixes further ([scope_prefixes]).
    let verdict = keys::trust::Verdict { signers: signers.iter().filter_map(|k| k.parse().ok()).collect() };
    let narrowed = |target: &TargetPath| -> Result<()> {
        if verdict.may_place(policy, &config.name, target) {
            return Ok(());
        }
        let scopes: Vec<String> = verdict
            .signers
            .iter()
            .map(|k| match policy.scope_prefixes(k) {
                Some(ps) => format!("key {k}: {}", ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")),
                None => format!("key {k}: any allowed prefix"),
            })
            .collect();
        Err(Refused::Policy(format!(
            "{what}: target {target} is outside the prefixes the scopes of its signers allow ({}; {} needed per target). \
             Widen the key's entry in [scope_prefixes] of /etc/op-dbus/stage.toml if this is intended",
            scopes.join("; "),
            policy.threshold(&config.name)
        ))
        .into())
    };
    for f in &config.files {
        if !policy.target_allowed(&f.target) {
            return Err(Refused::Policy(format!(
                "{what}: target {} is outside the allowed prefixes ({}); a trusted key is not a licence to write there. \
                 Allow the prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                f.target,
                prefixes()
            ))
            .into());
        }
        let resolved = match resolved.get(&f.target) {
            Some(Resolved::At(t)) => t,
            Some(Resolved::Unsafe(e)) => return Err(Refused::Policy(format!("{what}: target {}: {e}", f.target)).into()),
            Some(Resolved::Failed(e)) => {
                return Err(anyhow::Error::new(std::io::Error::new(e.kind, e.message.clone()))
                    .context(format!("{what}: resolving target {}", f.target)));
            }
            None => anyhow::bail!("{what}: target {} was not resolved before admission", f.target),
        };
        narrowed(&f.target)?;
        if *resolved != f.target {
            narrowed(resolved)?;
        }
        if !policy.target_allowed(resolved) {
            return Err(Refused::Policy(format!(
                "{what}: target {} resolves to {resolved} on this host (through symlinks), which is outside the allowed \
                 prefixes ({}); allow that prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                f.target,
                prefixes()
            ))
            .into());
        }
    }
    if let Some(feature) = &config.requires_feature
        && !policy.feature_enabled(feature)
    {
        return Err(Refused::Policy(format!(
            "{what} requires the feature {feature:?}, which this host does not enable: `op-dbus-stage feature enable {feature}` enables it"
        ))
        .into());
    }
    Ok(())
}

/// What the deployed `state` asks of a new version of a stage: its dependencies active in
/// matching versions, no downgrade unless allowed, and a bounded addition to the state.
pub fn against_state(state: &State, config: &StageConfig, what: &str, allow_downgrade: bool) -> Result<()> {
    let name = &config.name;
    for d in &config.dependencies {
        match state.stages.get(&d.stage) {
            Some(s) if d.matches(&s.active.version) => {}
            Some(s) => {
                return Err(Refused::Dependency(format!(
                    "{what} needs {d}, but {} {} is active; deploy a matching version of {} first",
                    d.stage, s.active.version, d.stage
                ))
                .into());
            }
            None => {
                return Err(Refused::Dependency(format!(
                    "{what} needs {d}, which is not deployed; deploy {} first",
                    d.stage
                ))
                .into());
            }
        }
    }
    if let Some(h) = state.highest.get(name)
        && *h > config.version
        && !allow_downgrade
    {
        return Err(Refused::Downgrade(format!(
            "{what} is older than {name} {h}, which was installed before; pass --allow-downgrade to install it anyway \
             (to go back to a kept generation, use `op-dbus-stage rollback {name}`)"
        ))
        .into());
    }
    // The state this generation adds is bounded, so that state.json stays readable.
    let activation = Activation::of(config);
    let activation_bytes = serde_json::to_vec_pretty(&activation).map_or(usize::MAX, |b| b.len());
    if activation_bytes > crate::state::MAX_STAGE_STATE {
        return Err(Malformed(format!(
            "{what}: its files:, services:, verify: and dependencies: make {activation_bytes} bytes of deployed state, \
             more than the {} one stage may add (state.json must stay readable); link a directory instead of \
             many files, or shorten the paths",
            crate::state::MAX_STAGE_STATE
        ))
        .into());
    }
    Ok(())
}
