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

/// The plugins of a (validated) stage manifest with their files. One pass over the files
/// and entries (a manifest may list thousands of plugins and a million entries).
pub fn of(config: &StageConfig) -> Vec<PluginReg> {
    // The plugin names a path `plugins/F` can belong to: F itself and each part of F
    // before a '.' (`plugins/a.b.json`: `a.b.json`, `a.b`, `a`); the first path wins.
    fn index<'a>(paths: impl Iterator<Item = (&'a str, String)>) -> BTreeMap<&'a str, String> {
        let mut out = BTreeMap::new();
        for (path, value) in paths {
            let Some(f) = path.strip_prefix("plugins/").filter(|f| !f.contains('/')) else { continue };
            out.entry(f).or_insert_with(|| value.clone());
            for (i, _) in f.match_indices('.').filter(|(i, _)| *i > 0) {
                out.entry(&f[..i]).or_insert_with(|| value.clone());
            }
        }
        out
    }
    if config.plugins.is_empty() {
        return Vec::new();
    }
    let linked = index(config.files.iter().map(|f| (f.path.as_str(), f.target.to_string())));
    // Only files below plugins/ can be one: the others' staged paths are not formatted.
    let staged = index(
        config
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.path.as_str().starts_with("plugins/"))
            .map(|e| (e.path.as_str(), format!("{STAGING_ABS}/{}/{}", config.name, e.path))),
    );
    config
        .plugins
        .iter()
        .map(|name| PluginReg {
            name: name.clone(),
            file: linked.get(name.as_str()).or_else(|| staged.get(name.as_str())).cloned(),
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
        // Dotted names; a file in a folder below plugins/ is no plugin's.
        let c = config("a.b, a, c", "", &["plugins/a.b.json", "plugins/c/c.json"]);
        let regs = of(&c);
        let files: Vec<Option<&str>> = regs.iter().map(|r| r.file.as_deref()).collect();
        let at = Some("/var/lib/op-dbus/staging/st/plugins/a.b.json");
        assert_eq!(files, [at, at, None]);
    }

    #[test]
    fn many_plugins_and_entries_are_matched_in_one_pass() {
        let names: Vec<String> = (0..4096).map(|i| format!("p{i}")).collect();
        let paths: Vec<String> = (0..50_000).map(|i| format!("plugins/f{i}.json")).collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let c = config(&names.join(", "), "", &refs);
        let t = std::time::Instant::now();
        assert!(of(&c).iter().all(|r| r.file.is_none()));
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
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
