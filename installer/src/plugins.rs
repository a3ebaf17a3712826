//! Plugin registrations: every `plugins:` entry of an active stage is registered in
//! `/etc/op-dbus/plugins/NAME.toml`, written on activation and removed with the stage (as
//! transaction steps: [`crate::txn::Step::Register`], `Unregister`).
//!
//! ```toml
//! # Registered by op-dbus-stage for the stage stage-2-plugins; removed with it.
//! name = "lxc"
//! stage = "stage-2-plugins"
//! version = "1.0.0"
//! file = "/etc/op-dbus/plugins.d/lxc.json"
//! ```
//!
//! `file` is where the plugin's own file is reachable: the target of the `files:` entry
//! that links `plugins/NAME` or `plugins/NAME.*`, else that staged file through the stage
//! link; absent when the stage ships no such file (a plugin built into its binary).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use formats::manifest::{EntryKind, StageConfig};
use formats::path::TargetPath;
use formats::{Digest, StageName};

use crate::error::Refused;
use crate::host::{Host, STAGING_ABS, TargetState};
use crate::state::{Generation, StageState};
use crate::txn::Step;

/// Where registrations live.
pub const PLUGIN_DIR: &str = "/etc/op-dbus/plugins";

/// One plugin of a stage, as activation registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginReg {
    pub name: String,
    /// Where the plugin's file is reachable on the host, if the stage ships one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// The plugins of a (validated) stage manifest with their files.
pub fn of(config: &StageConfig) -> Vec<PluginReg> {
    let is_plugin_file = |path: &str, name: &str| {
        path.strip_prefix("plugins/")
            .is_some_and(|f| f == name || f.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
    };
    config
        .plugins
        .iter()
        .map(|name| {
            let linked =
                config.files.iter().find(|f| is_plugin_file(f.path.as_str(), name)).map(|f| f.target.to_string());
            let staged = || {
                config
                    .entries
                    .iter()
                    .find(|e| e.kind == EntryKind::File && is_plugin_file(e.path.as_str(), name))
                    .map(|e| format!("{STAGING_ABS}/{}/{}", config.name, e.path))
            };
            PluginReg { name: name.clone(), file: linked.or_else(staged) }
        })
        .collect()
}

/// The registration file of `plugin`.
pub fn target(plugin: &str) -> Result<TargetPath> {
    Ok(TargetPath::parse(&format!("{PLUGIN_DIR}/{plugin}.toml"))?)
}

fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The text of the registration of `reg` for `stage` at generation `g`.
pub fn text(stage: &StageName, g: &Generation, reg: &PluginReg) -> String {
    let mut s = format!(
        "# Registered by op-dbus-stage for the stage {stage}; removed with it.\nname = {}\nstage = {}\nversion = {}\n",
        quoted(&reg.name),
        quoted(stage.as_str()),
        quoted(&g.version.to_string())
    );
    if let Some(f) = &reg.file {
        s += &format!("file = {}\n", quoted(f));
    }
    s
}

/// Every registration `stages` want: plugin -> (stage, text). Two stages providing one
/// plugin are refused.
pub fn wanted(stages: &BTreeMap<StageName, StageState>) -> Result<BTreeMap<String, (StageName, String)>> {
    let mut out: BTreeMap<String, (StageName, String)> = BTreeMap::new();
    for (name, st) in stages {
        for reg in &st.active.activation.plugins {
            if let Some((other, _)) = out.get(&reg.name) {
                return Err(Refused::Conflict(format!(
                    "the plugin {} is provided by both {other} and {name}; remove one of them first",
                    reg.name
                ))
                .into());
            }
            out.insert(reg.name.clone(), (name.clone(), text(name, &st.active, reg)));
        }
    }
    Ok(out)
}

/// The steps that move the registrations from `before` to `desired`: unregistering (run
/// early) and registering (run late).
pub fn steps(
    before: &BTreeMap<StageName, StageState>,
    desired: &BTreeMap<StageName, StageState>,
) -> Result<(Vec<Step>, Vec<Step>)> {
    let (old, new) = (wanted(before).unwrap_or_default(), wanted(desired)?);
    let mut unregister = Vec::new();
    let mut register = Vec::new();
    for (plugin, (_, text)) in &old {
        if new.get(plugin).is_none_or(|(_, t)| t != text) {
            unregister.push(Step::Unregister { target: target(plugin)?, text: text.clone() });
        }
    }
    for (plugin, (_, text)) in &new {
        if old.get(plugin).is_none_or(|(_, t)| t != text) {
            register.push(Step::Register { target: target(plugin)?, text: text.clone() });
        }
    }
    Ok((unregister, register))
}

/// For `fix-symlinks STAGE`: the steps that write the stage's missing registrations again,
/// and notes about registrations someone changed (left alone).
pub fn repair(host: &Host, stage: &StageName, st: &StageState) -> Result<(Vec<Step>, Vec<String>)> {
    let (mut steps, mut notes) = (Vec::new(), Vec::new());
    for reg in &st.active.activation.plugins {
        let t = target(&reg.name)?;
        let text = text(stage, &st.active, reg);
        match host.state(&t)? {
            TargetState::Missing => steps.push(Step::Register { target: t, text }),
            _ if host.file_digest(&t)? == Some(Digest::of(text.as_bytes())) => {}
            _ => notes.push(format!(
                "{t} was changed by someone else; left as it is (move it away to have it written again)"
            )),
        }
    }
    Ok((steps, notes))
}

/// What `verify` finds wrong with the registrations of `stage`: a registration missing or
/// not the one activation wrote, a plugin file that does not resolve in the root.
pub fn problems(host: &Host, stage: &StageName, st: &StageState) -> Vec<String> {
    let mut out = Vec::new();
    for reg in &st.active.activation.plugins {
        let Ok(t) = target(&reg.name) else { continue };
        let want = Digest::of(text(stage, &st.active, reg).as_bytes());
        match host.file_digest(&t) {
            Ok(Some(d)) if d == want => {}
            Ok(Some(_)) => out.push(format!(
                "plugin {}: {t} was changed (move it away, then `op-dbus-stage fix-symlinks {stage}` writes it again)",
                reg.name
            )),
            Ok(None) => out.push(format!(
                "plugin {}: {t} is missing (`op-dbus-stage fix-symlinks {stage}` writes it again)",
                reg.name
            )),
            Err(e) => out.push(format!("plugin {}: {t}: {e}", reg.name)),
        }
        if let Some(f) = &reg.file {
            let resolves = host.resolve(f.trim_start_matches('/')).is_ok_and(|p| p.is_file());
            let linked = TargetPath::parse(f).ok().and_then(|p| host.state(&p).ok());
            if !resolves {
                out.push(format!(
                    "plugin {}: its file {f} does not resolve{}",
                    reg.name,
                    if matches!(linked, Some(TargetState::Missing)) { " (missing)" } else { "" }
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Activation, StageState};

    fn config(plugins: &str, files: &str, entries: &[&str]) -> StageConfig {
        let def = formats::manifest::StageDefinition::parse(
            &format!("name: st\nversion: 1.0.0\nplugins: [{plugins}]\n{files}"),
            std::path::Path::new("m"),
        )
        .unwrap();
        let mut all = BTreeMap::new();
        for p in entries {
            let p: formats::path::RelPath = p.parse().unwrap();
            for a in p.ancestors() {
                all.insert(a.clone(), (a, true));
            }
            all.insert(p.clone(), (p, false));
        }
        let entries = all
            .into_values()
            .map(|(path, dir)| formats::manifest::Entry {
                path,
                kind: if dir { EntryKind::Dir } else { EntryKind::File },
                mode: formats::manifest::Mode::new(0o644).unwrap(),
                size: (!dir).then_some(0),
                sha256: (!dir).then(|| Digest::of(b"")),
                link: None,
            })
            .collect();
        StageConfig::from_definition("st".parse().unwrap(), &def, entries)
    }

    #[test]
    fn a_plugins_file_is_its_link_its_staged_file_or_none() {
        let c = config(
            "lxc, pcidecl, net, lx",
            "files:\n  - path: plugins/lxc.json\n    target: /etc/op-dbus/plugins.d/lxc.json\n",
            &["plugins/lxc.json", "plugins/pcidecl.json", "plugins/lxcx.json"],
        );
        let regs = of(&c);
        assert_eq!(regs[0].file.as_deref(), Some("/etc/op-dbus/plugins.d/lxc.json"));
        assert_eq!(regs[1].file.as_deref(), Some("/var/lib/op-dbus/staging/st/plugins/pcidecl.json"));
        assert_eq!(regs[2].file, None);
        assert_eq!(regs[3].file, None, "lx is not lxc.json's nor lxcx.json's plugin");
    }

    fn stage(version: &str, plugins: &[&str]) -> StageState {
        StageState {
            active: Generation {
                generation: 1,
                digest: Digest::of(b""),
                version: version.parse().unwrap(),
                signers: Vec::new(),
                deployed_at: String::new(),
                activation: Activation {
                    plugins: plugins.iter().map(|p| PluginReg { name: p.to_string(), file: None }).collect(),
                    ..Activation::default()
                },
            },
            previous: Vec::new(),
        }
    }

    #[test]
    fn registrations_follow_the_stages_and_conflicts_are_refused() {
        let name = |s: &str| s.parse::<StageName>().unwrap();
        let mut before = BTreeMap::new();
        before.insert(name("a"), stage("1.0.0", &["lxc", "dns"]));
        let mut after = BTreeMap::new();
        after.insert(name("a"), stage("1.1.0", &["lxc"]));
        after.insert(name("b"), stage("1.0.0", &["pk"]));
        let (un, re) = steps(&before, &after).unwrap();
        let t = |s: &Step| match s {
            Step::Register { target, .. } | Step::Unregister { target, .. } => target.to_string(),
            _ => unreachable!(),
        };
        assert_eq!(
            un.iter().map(t).collect::<Vec<_>>(),
            ["/etc/op-dbus/plugins/dns.toml", "/etc/op-dbus/plugins/lxc.toml"]
        );
        assert_eq!(
            re.iter().map(t).collect::<Vec<_>>(),
            ["/etc/op-dbus/plugins/lxc.toml", "/etc/op-dbus/plugins/pk.toml"]
        );
        let (un, re) = steps(&after, &after).unwrap();
        assert!(un.is_empty() && re.is_empty());
        after.insert(name("c"), stage("1.0.0", &["pk"]));
        let e = steps(&before, &after).unwrap_err().to_string();
        assert!(e.contains("pk") && e.contains("both b and c"), "{e}");
        let text =
            text(&name("a"), &stage("1.0.0", &[]).active, &PluginReg { name: "x".into(), file: Some("/a\"b".into()) });
        assert!(text.contains("name = \"x\"\n") && text.contains("file = \"/a\\\"b\"\n"), "{text}");
    }
}
