//! Listing a folder tree on several threads.
//!
//! The walk of the stage folder is the builder's serial start: a directory listing per
//! directory and a stat per file, before the payload can be written. On a folder of
//! many small files that is a tenth of a build, so its directories are shared out to a
//! thread per core ([`fsx::share`]). The nodes come back sorted by path, whatever thread
//! found them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use formats::manifest::MAX_ENTRIES;
use formats::path::RelPath;

use crate::assemble::{Node, check_reserved, node_of};
use crate::error::InputError;

/// A directory still to list: where it is, where it is staged.
struct Dir {
    fs_path: PathBuf,
    at: RelPath,
}

/// Every path below the directory `root`, staged below `at` (at the top with `None`,
/// where names for which `skip_top` holds are left out), with its node, sorted by path.
/// Each directory comes before what it holds. When several paths are refused, which
/// one the error names may vary from run to run.
pub fn walk(
    root: &Path,
    at: Option<&RelPath>,
    skip_top: &dyn Fn(&str) -> bool,
) -> Result<Vec<(RelPath, Node)>, InputError> {
    // Paths found so far, by every thread: a folder of more than MAX_ENTRIES paths is
    // refused before it is all listed.
    let found = AtomicUsize::new(0);
    let mut nodes = Vec::new();
    let mut todo = Vec::new();
    list(&found, root, at, Some(skip_top), &mut nodes, &mut todo)?;
    let listed = fsx::share::share_out(todo, Vec::new, |nodes, dir: Dir, todo| {
        list(&found, &dir.fs_path, Some(&dir.at), None, nodes, todo)
    })?;
    nodes.extend(listed.into_iter().flatten());
    // Parents sort before their children: "a" < "a/b".
    nodes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(nodes)
}

/// Lists the directory `dir` (staged at `at`): its entries go to `nodes`, its
/// subdirectories also to `dirs`, to be listed in turn. A directory is known from its
/// listing; anything else is looked at relative to its directory (fstatat), not by its
/// whole path. The depth is bounded by [`RelPath`]'s.
fn list(
    found: &AtomicUsize,
    dir: &Path,
    at: Option<&RelPath>,
    skip: Option<&dyn Fn(&str) -> bool>,
    nodes: &mut Vec<(RelPath, Node)>,
    dirs: &mut Vec<Dir>,
) -> Result<(), InputError> {
    let failed = |path: &Path, e: std::io::Error| InputError::Path { path: path.to_owned(), reason: e.to_string() };
    for e in fs::read_dir(dir).map_err(|e| failed(dir, e))? {
        let e = e.map_err(|e| failed(dir, e))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            return Err(InputError::Path { path: e.path(), reason: "the name is not valid UTF-8".into() });
        };
        if skip.is_some_and(|skip| skip(name)) {
            continue;
        }
        let path = match at {
            None => RelPath::parse(name),
            Some(at) => RelPath::parse(&format!("{at}/{name}")),
        }
        .map_err(|err| InputError::Path { path: e.path(), reason: err.to_string() })?;
        if found.fetch_add(1, Ordering::Relaxed) >= MAX_ENTRIES {
            return Err(InputError::Path { path: dir.to_owned(), reason: format!("more than {MAX_ENTRIES} entries") });
        }
        let fs_path = e.path();
        check_reserved(&path, &fs_path)?;
        if e.file_type().map_err(|e| failed(&fs_path, e))?.is_dir() {
            dirs.push(Dir { fs_path, at: path.clone() });
            nodes.push((path, Node::DIR));
        } else {
            let meta = e.metadata().map_err(|e| failed(&fs_path, e))?;
            let node = node_of(&fs_path, &path, &meta)?;
            nodes.push((path, node));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_listed_by_several_threads_comes_back_sorted_with_each_directory_first() {
        let d = tempfile::tempdir().unwrap();
        let mut want = Vec::new();
        for i in 0..30 {
            let top = format!("d{i:02}");
            fs::create_dir(d.path().join(&top)).unwrap();
            want.push(top.clone());
            for j in 0..5 {
                let sub = format!("{top}/s{j}");
                fs::create_dir(d.path().join(&sub)).unwrap();
                want.push(sub.clone());
                fs::write(d.path().join(format!("{sub}/f")), "x").unwrap();
                want.push(format!("{sub}/f"));
            }
            // "-" sorts before "/": a name beside a directory, between it and its contents.
            fs::write(d.path().join(format!("{top}-x")), "x").unwrap();
            want.push(format!("{top}-x"));
        }
        fs::write(d.path().join("skipped"), "x").unwrap();
        want.sort();
        for _ in 0..5 {
            let got = walk(d.path(), None, &|n| n == "skipped").unwrap();
            let got: Vec<_> = got.iter().map(|(p, _)| p.to_string()).collect();
            assert_eq!(got, want);
        }
        let at: RelPath = "share".parse().unwrap();
        let got = walk(&d.path().join("d03"), Some(&at), &|_| false).unwrap();
        assert_eq!(got.first().map(|(p, _)| p.as_str()), Some("share/s0"));
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn a_refusal_deep_in_the_tree_stops_the_walk_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..20 {
            fs::create_dir_all(d.path().join(format!("d{i}/deep"))).unwrap();
        }
        fs::write(d.path().join("d7/deep/.wh.x"), "").unwrap();
        for _ in 0..5 {
            let e = walk(d.path(), None, &|_| false).unwrap_err().to_string();
            assert!(e.contains("d7/deep/.wh.x") && e.contains("reserved"), "{e}");
        }
        let e = walk(&d.path().join("nope"), None, &|_| false).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
