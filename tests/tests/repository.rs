//! The repository stands on its own: nothing in it points at files outside it (a design
//! document or fixtures beside the checkout), the fixtures the tests use are inside it,
//! and the policy file `init` writes refers to nothing the host does not have.
//! `.ci/run` checks the same by running the whole suite in a fresh clone.

mod util;

use std::fs;
use std::path::{Path, PathBuf};

use util::*;

/// What a reference to something outside the repository looks like (split so that this
/// file does not match itself).
fn outside_references() -> Vec<String> {
    vec![
        ["..", "/shared"].concat(),
        ["shared", "/fixtures"].concat(),
        ["shared", "/DESIGN"].concat(),
        ["DESIGN", ".md"].concat(),
        ["STYLE", ".md"].concat(),
        ["/work", "/shared"].concat(),
    ]
}

/// Every file of the repository, without build output, VCS data and fuzzing corpora.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let path = e.path();
        let rel = path.strip_prefix(repo()).unwrap().to_string_lossy().into_owned();
        if name == ".git" || name == "target" || ["fuzz/corpus", "fuzz/artifacts", "fuzz/coverage"].contains(&&*rel) {
            continue;
        }
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            files(&path, out);
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

#[test]
fn nothing_points_outside_the_repository() {
    let mut all = Vec::new();
    files(&repo(), &mut all);
    assert!(all.len() > 50, "only {} files under {}", all.len(), repo().display());
    let needles = outside_references();
    let mut found = Vec::new();
    for path in &all {
        let Ok(text) = fs::read_to_string(path) else { continue };
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle)) {
                found.push(format!("{}:{}: {}", path.strip_prefix(repo()).unwrap().display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "these lines point outside the repository (the reference is docs/, fixtures go in tests/fixtures/):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_seed_manifests_are_in_the_repository() {
    let dir = repo().join("tests/fixtures/seed-manifests");
    let n = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert!(n >= 4, "{} holds {n} seed manifests", dir.display());
}

#[test]
fn the_policy_file_init_writes_refers_to_nothing_outside() {
    let d = tempfile::tempdir().unwrap();
    ok(std::process::Command::new(bin("op-dbus-stage")).arg("--root").arg(d.path()).args(["-q", "init"]));
    let text = fs::read_to_string(d.path().join("etc/op-dbus/stage.toml")).unwrap();
    for needle in outside_references() {
        assert!(!text.contains(&needle), "stage.toml mentions {needle}:\n{text}");
    }
}

#[test]
fn the_docs_the_readme_names_exist() {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("docs/README.md"), "the README does not point at docs/");
    let index = fs::read_to_string(repo().join("docs/README.md")).unwrap();
    for page in ["formats.md", "host-layout.md", "stage-toml.md", "commands.md", "exit-codes.md", "building.md"] {
        assert!(index.contains(page), "docs/README.md does not list {page}");
        assert!(repo().join("docs").join(page).is_file(), "docs/{page} is missing");
    }
}
