//! `create NAME --files SRC[:/TARGET]...`: where each listed source is staged and linked.
//!
//! ```text
//! src/state/plugins/lxc.rs            staged at src/state/plugins/lxc.rs, not linked
//! /home/me/lxc.rs                     staged at lxc.rs (absolute: by its name), not linked
//! ../x/lxc.rs                         staged at lxc.rs (leaves the folder: by its name)
//! bin/tool:/usr/local/bin/tool        staged at usr/local/bin/tool, linked there
//! --target-prefix /opt/proxmox        every SRC without a target is linked at PREFIX/STAGED
//! ```
//!
//! Two sources that would be staged at one path (or one inside the other) are refused,
//! naming both: nothing is silently collapsed.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use formats::path::{RelPath, TargetPath};

use crate::error::InputError;

/// One `--files` argument, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The argument as given.
    pub arg: String,
    pub src: PathBuf,
    /// Where it is staged in the image.
    pub at: RelPath,
    /// Where it is linked on the host; `None`: staged only.
    pub target: Option<TargetPath>,
}

/// Resolves every `--files` argument: its source, its staged path and its target
/// (`prefix`/staged path for those without one, when a prefix is given).
pub fn resolve(files: &[String], prefix: Option<&TargetPath>) -> Result<Vec<Listed>, InputError> {
    let mut out: Vec<Listed> = Vec::with_capacity(files.len());
    let mut staged: BTreeMap<RelPath, usize> = BTreeMap::new();
    for arg in files {
        let bad = |reason: String| InputError::Field { file: PathBuf::from("--files"), field: arg.clone(), reason };
        let (src, target) = match arg.split_once(":/") {
            Some((s, t)) => {
                (PathBuf::from(s), Some(TargetPath::parse(&format!("/{t}")).map_err(|e| bad(e.to_string()))?))
            }
            None => (PathBuf::from(arg), None),
        };
        if src.as_os_str().is_empty() {
            return Err(bad("the source is empty".into()));
        }
        let at = match &target {
            Some(t) => t.relative(),
            None => staged_path(&src).map_err(bad)?,
        };
        let target = match (target, prefix) {
            (Some(t), _) => Some(t),
            (None, Some(p)) => {
                Some(TargetPath::parse(&format!("{p}/{at}")).map_err(|e| bad(format!("with --target-prefix: {e}")))?)
            }
            (None, None) => None,
        };
        if let Some(&i) = clash(&staged, &at) {
            let other = &out[i];
            return Err(bad(format!(
                "{} and {} would both be staged at {}: give one of them a target (SRC:/TARGET), or list them by \
                 paths that differ",
                other.arg,
                arg,
                if other.at == at { at.to_string() } else { format!("{} and {at}, one inside the other", other.at) },
            )));
        }
        staged.insert(at.clone(), out.len());
        out.push(Listed { arg: arg.clone(), src, at, target });
    }
    Ok(out)
}

/// The listed source already staged at `at`, or at a path `at` lies in, or inside `at`.
fn clash<'a>(staged: &'a BTreeMap<RelPath, usize>, at: &RelPath) -> Option<&'a usize> {
    if let Some(i) = staged.get(at) {
        return Some(i);
    }
    if let Some(i) = at.ancestors().find_map(|a| staged.get(&a)) {
        return Some(i);
    }
    // Paths below `at` sort right after it ("a/…" before "a0"), so the next key tells.
    staged.range(at.clone()..).next().filter(|(p, _)| p.starts_with(at)).map(|(_, i)| i)
}

/// Where a source without a target is staged: its relative path as written (`.` parts
/// dropped); a source that is absolute or climbs out with `..` by its file name.
pub fn staged_path(src: &Path) -> Result<RelPath, String> {
    let mut parts: Vec<&str> = Vec::new();
    let mut by_name = false;
    for c in src.components() {
        match c {
            Component::Normal(n) => {
                parts.push(n.to_str().ok_or_else(|| format!("{} is not valid UTF-8", src.display()))?)
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => by_name = true,
        }
    }
    let rel = if by_name { parts.last().map(|n| n.to_string()).unwrap_or_default() } else { parts.join("/") };
    if rel.is_empty() {
        return Err(format!("{} names no file to stage", src.display()));
    }
    RelPath::parse(&rel).map_err(|e| e.to_string())
}

/// The note for sources staged without a target: they are in the image, linked nowhere.
pub fn unlinked_note(listed: &[Listed]) -> Option<String> {
    let unlinked: Vec<&str> = listed.iter().filter(|l| l.target.is_none()).map(|l| l.at.as_str()).collect();
    if unlinked.is_empty() {
        return None;
    }
    Some(format!(
        "note: {} will be staged but not linked anywhere on the host: {}; give each a target with SRC:/TARGET, or \
         all of them with --target-prefix DIR",
        if unlinked.len() == 1 { "1 file".to_owned() } else { format!("{} files", unlinked.len()) },
        unlinked.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn relative_paths_are_kept_and_absolute_ones_go_by_name() {
        let l = resolve(&args(&["src/state/plugins/lxc.rs", "./a/./b", "/x/y/z.conf", "../up/w"]), None).unwrap();
        let at: Vec<&str> = l.iter().map(|l| l.at.as_str()).collect();
        assert_eq!(at, ["src/state/plugins/lxc.rs", "a/b", "z.conf", "w"]);
        assert!(l.iter().all(|l| l.target.is_none()));
        let note = unlinked_note(&l).unwrap();
        assert!(note.contains("4 files") && note.contains("--target-prefix") && note.contains("a/b"), "{note}");
    }

    #[test]
    fn targets_and_prefix() {
        let prefix = TargetPath::parse("/opt/p").unwrap();
        let l = resolve(&args(&["bin/t:/usr/local/bin/t", "lib/x.rs"]), Some(&prefix)).unwrap();
        assert_eq!(l[0].at.as_str(), "usr/local/bin/t");
        assert_eq!(l[0].target.as_ref().unwrap().as_str(), "/usr/local/bin/t");
        assert_eq!(l[1].at.as_str(), "lib/x.rs");
        assert_eq!(l[1].target.as_ref().unwrap().as_str(), "/opt/p/lib/x.rs");
        assert_eq!(unlinked_note(&l), None);
    }

    #[test]
    fn collisions_name_both_sources() {
        for (a, b) in [
            ("/one/lxc.rs", "/two/lxc.rs"),
            ("a/x", "./a/x"),
            ("a", "a/x"),
            ("a/x", "a"),
            ("x:/opt/a", "/elsewhere/opt/a/b:/opt/a/b"),
        ] {
            let e = resolve(&args(&[a, b]), None).unwrap_err().to_string();
            assert!(e.contains(a) && e.contains(b) && e.contains("would both be staged"), "{a} {b}: {e}");
        }
        // Same base name, different relative folders: both kept.
        resolve(&args(&["a/lxc.rs", "b/lxc.rs", "a0"]), None).unwrap();
    }

    #[test]
    fn nothing_to_stage_is_refused() {
        for bad in ["/", ".", "..", ":/opt/x"] {
            assert!(resolve(&args(&[bad]), None).is_err(), "{bad}");
        }
        assert!(resolve(&args(&["x:/opt/../etc"]), None).is_err());
    }
}
