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
    for t in targets(config).filter(|(t, _)| policy.target_allowed(t)).map(|(t, _)| t) {
        let r = match host.resolve_target(t) {
            Ok(t) => Resolved::At(t),
            Err(e) if e.get_ref().is_some_and(|x| x.is::<UnsafeLink>()) => Resolved::Unsafe(e.to_string()),
            Err(e) => Resolved::Failed(ReadError { kind: e.kind(), message: e.to_string() }),
        };
        out.insert(t.clone(), r);
    }
    out
}

/// The paths of a stage the policy judges: its `files:` targets, then its `data:` paths
/// (which a backup saves and a restore writes), each with the word messages name it by.
fn targets(config: &StageConfig) -> impl Iterator<Item = (&TargetPath, &'static str)> {
    config.files.iter().map(|f| (&f.target, "target")).chain(config.data.iter().map(|d| (d, "data path")))
}

/// What the host's policy asks of a stage before it may be active: every target under the
/// allowed prefixes, by its text and by where it resolves on this host (`resolved`, from
/// [`resolutions`]; links on the way that root does not own are never followed), inside
/// the prefixes its signers' scopes allow, and its required feature enabled. `what` names
/// the image in messages.
pub fn policy(
    policy: &Policy,
    config: &StageConfig,
    what: &str,
    signers: &[keys::KeyId],
    resolved: &Resolutions,
) -> Result<()> {
    let prefixes = || policy.allowed_prefixes().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    // The signers' scopes may narrow the prefixes further ([scope_prefixes]).
    let verdict = keys::trust::Verdict { signers: signers.to_vec() };
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
    for (target, noun) in targets(config) {
        if !policy.target_allowed(target) {
            return Err(Refused::Policy(format!(
                "{what}: {noun} {target} is outside the allowed prefixes ({}); a trusted key is not a licence to write \
                 there. Allow the prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is intended",
                prefixes()
            ))
            .into());
        }
        let resolved = match resolved.get(target) {
            Some(Resolved::At(t)) => t,
            Some(Resolved::Unsafe(e)) => {
                return Err(Refused::Policy(format!("{what}: {noun} {target}: {e}")).into());
            }
            Some(Resolved::Failed(e)) => {
                return Err(anyhow::Error::new(std::io::Error::new(e.kind, e.message.clone()))
                    .context(format!("{what}: resolving {noun} {target}")));
            }
            None => anyhow::bail!("{what}: {noun} {target} was not resolved before admission"),
        };
        narrowed(target)?;
        if resolved != target {
            narrowed(resolved)?;
        }
        if !policy.target_allowed(resolved) {
            return Err(Refused::Policy(format!(
                "{what}: {noun} {target} resolves to {resolved} on this host (through symlinks), which is outside the \
                 allowed prefixes ({}); allow that prefix in /etc/op-dbus/stage.toml (allowed_prefixes) if this is \
                 intended",
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::error::Refused;

    fn config(targets: &[&str], feature: Option<&str>) -> StageConfig {
        let files: Vec<serde_json::Value> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"path": format!("f{i}"), "target": t, "type": "symlink"}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "schema_version": 1, "name": "app", "version": "1.0.0", "files": files,
            "requires_feature": feature, "entries": [],
        }))
        .unwrap()
    }

    fn policy_of(text: &str) -> Policy {
        Policy::parse(text, Path::new("stage.toml")).unwrap()
    }

    fn at(pairs: &[(&str, &str)]) -> Resolutions {
        pairs.iter().map(|(t, r)| (t.parse().unwrap(), Resolved::At(r.parse().unwrap()))).collect()
    }

    /// One trusted signer whose scope narrows nothing.
    fn signer() -> Vec<keys::KeyId> {
        vec!["0123456789abcdef".parse().unwrap()]
    }

    fn refused(r: Result<()>) -> String {
        let e = r.unwrap_err();
        assert!(e.chain().any(|c| c.is::<Refused>()), "not a refusal: {e:#}");
        format!("{e:#}")
    }

    #[test]
    fn targets_are_judged_by_their_text_and_by_where_they_resolve() {
        let p = policy_of("allowed_prefixes = [\"/opt\"]\n");
        let c = config(&["/opt/app/tool"], None);
        policy(&p, &c, "app 1.0.0", &signer(), &at(&[("/opt/app/tool", "/opt/app/tool")])).unwrap();
        // Through a link on the way it lands outside the prefixes: refused.
        let e = refused(policy(&p, &c, "app 1.0.0", &signer(), &at(&[("/opt/app/tool", "/etc/shadow")])));
        assert!(e.contains("resolves to /etc/shadow"), "{e}");
        // By its text outside: refused before its resolution matters.
        let c = config(&["/etc/passwd"], None);
        let e = refused(policy(&p, &c, "app 1.0.0", &signer(), &Resolutions::new()));
        assert!(e.contains("outside the allowed prefixes"), "{e}");
    }

    #[test]
    fn data_paths_are_judged_like_targets() {
        let p = policy_of("allowed_prefixes = [\"/opt\", \"/var/lib/op-dbus\"]\n");
        let mut c = config(&["/opt/app/tool"], None);
        c.data = vec!["/var/lib/op-dbus/app".parse().unwrap()];
        let fine = at(&[("/opt/app/tool", "/opt/app/tool"), ("/var/lib/op-dbus/app", "/var/lib/op-dbus/app")]);
        policy(&p, &c, "app", &signer(), &fine).unwrap();
        // The installer's own areas are reserved: a backup must not carry them back.
        c.data = vec!["/var/lib/op-dbus/staging".parse().unwrap()];
        let e = refused(policy(&p, &c, "app", &signer(), &fine));
        assert!(e.contains("data path /var/lib/op-dbus/staging is outside"), "{e}");
        c.data = vec!["/var/lib/op-dbus/app".parse().unwrap()];
        let e = refused(policy(
            &p,
            &c,
            "app",
            &signer(),
            &at(&[("/opt/app/tool", "/opt/app/tool"), ("/var/lib/op-dbus/app", "/etc")]),
        ));
        assert!(e.contains("data path /var/lib/op-dbus/app resolves to /etc"), "{e}");
    }

    #[test]
    fn a_target_behind_a_users_link_is_a_refusal_and_an_unread_one_an_error() {
        let p = policy_of("allowed_prefixes = [\"/opt\"]\n");
        let c = config(&["/opt/app/tool"], None);
        let mut r = Resolutions::new();
        r.insert("/opt/app/tool".parse().unwrap(), Resolved::Unsafe("/opt/app is a symlink owned by uid 1000".into()));
        let e = refused(policy(&p, &c, "app", &[], &r));
        assert!(e.contains("uid 1000"), "{e}");
        let failed = ReadError { kind: std::io::ErrorKind::PermissionDenied, message: "denied".into() };
        r.insert("/opt/app/tool".parse().unwrap(), Resolved::Failed(failed));
        let e = policy(&p, &c, "app", &[], &r).unwrap_err();
        assert!(!e.chain().any(|c| c.is::<Refused>()) && format!("{e:#}").contains("denied"), "{e:#}");
        // Nothing gathered for a target: an error, not a panic or a pass.
        assert!(policy(&p, &c, "app", &[], &Resolutions::new()).is_err());
    }

    #[test]
    fn a_required_feature_must_be_enabled() {
        let c = config(&[], Some("openflow"));
        let e = refused(policy(&policy_of(""), &c, "app", &[], &Resolutions::new()));
        assert!(e.contains("feature enable openflow"), "{e}");
        policy(&policy_of("features = [\"openflow\"]\n"), &c, "app", &[], &Resolutions::new()).unwrap();
    }

    #[test]
    fn dependencies_and_downgrades_are_judged_against_the_state() {
        let mut c = config(&[], None);
        let mut state = State::new();
        against_state(&state, &c, "app", false).unwrap();
        state.highest.insert(c.name.clone(), "2.0.0".parse().unwrap());
        assert!(format!("{:#}", against_state(&state, &c, "app", false).unwrap_err()).contains("--allow-downgrade"));
        against_state(&state, &c, "app", true).unwrap();
        c.dependencies.push(formats::manifest::Dependency::parse("core >=1").unwrap());
        let e = against_state(&state, &c, "app", true).unwrap_err();
        assert!(format!("{e:#}").contains("not deployed"), "{e:#}");
    }
}
