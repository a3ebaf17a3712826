//! Listing a folder tree on several threads.
//!
//! The walk of the stage folder is the builder's serial start: a directory listing per
//! directory and a stat per file, before the payload can be written. On a folder of
//! many small files that is a tenth of a build, so its directories are shared out to a
//! worker per core. The nodes come back sorted by path, whatever thread found them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use formats::manifest::MAX_ENTRIES;
use formats::path::RelPath;

use crate::assemble::{Node, check_reserved, node_of};
use crate::error::InputError;

/// At most this many listing threads, the caller's included.
const MAX_WORKERS: usize = 4;

/// A directory still to list: where it is, where it is staged.
struct Dir {
    fs_path: PathBuf,
    at: RelPath,
}

/// The shared work: directories not yet taken, how many are being listed, whether a
/// worker has failed (the others then stop).
#[derive(Default)]
struct Work {
    todo: Vec<Dir>,
    busy: usize,
    failed: bool,
}

struct Shared {
    work: Mutex<Work>,
    ready: Condvar,
    /// Paths found so far, by every worker: a folder of more than [`MAX_ENTRIES`] paths
    /// is refused before it is all listed.
    found: AtomicUsize,
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
    let shared = Shared { work: Mutex::default(), ready: Condvar::new(), found: AtomicUsize::new(0) };
    let mut nodes = Vec::new();
    let mut todo = Vec::new();
    list(&shared, root, at, Some(skip_top), &mut nodes, &mut todo)?;
    if todo.is_empty() {
        return Ok(nodes);
    }
    shared.work.lock().expect("not poisoned").todo = todo;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WORKERS);
    let results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(|| work(&shared))).collect();
        let mut results = vec![work(&shared)];
        for h in helpers {
            results.push(h.join().unwrap_or_else(|_| {
                Err(InputError::Path { path: root.to_owned(), reason: "a listing thread panicked".into() })
            }));
        }
        results
    });
    let mut first_error: Option<InputError> = None;
    for r in results {
        match r {
            Ok(mut found) => nodes.append(&mut found),
            Err(e) => {
                // The same error whichever worker found it first, when only one is bad.
                if first_error.as_ref().is_none_or(|f| error_path(&e) < error_path(f)) {
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Parents sort before their children: "a" < "a/b".
    nodes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(nodes)
}

fn error_path(e: &InputError) -> Option<&Path> {
    match e {
        InputError::Path { path, .. } => Some(path),
        _ => None,
    }
}

/// Takes directories to list until there are none left and none being listed.
fn work(shared: &Shared) -> Result<Vec<(RelPath, Node)>, InputError> {
    let mut nodes = Vec::new();
    let mut found_dirs = Vec::new();
    loop {
        let dir = {
            let mut w = shared.work.lock().expect("not poisoned");
            loop {
                if w.failed {
                    return Ok(nodes);
                }
                if let Some(d) = w.todo.pop() {
                    w.busy += 1;
                    break d;
                }
                if w.busy == 0 {
                    shared.ready.notify_all();
                    return Ok(nodes);
                }
                w = shared.ready.wait(w).expect("not poisoned");
            }
        };
        let listed = list(shared, &dir.fs_path, Some(&dir.at), None, &mut nodes, &mut found_dirs);
        let mut w = shared.work.lock().expect("not poisoned");
        w.busy -= 1;
        if let Err(e) = listed {
            w.failed = true;
            shared.ready.notify_all();
            return Err(e);
        }
        if !found_dirs.is_empty() {
            w.todo.append(&mut found_dirs);
            shared.ready.notify_all();
        } else if w.busy == 0 && w.todo.is_empty() {
            shared.ready.notify_all();
        }
    }
}

/// Lists the directory `dir` (staged at `at`): its entries go to `nodes`, its
/// subdirectories also to `dirs`, to be listed in turn. A directory is known from its
/// listing; anything else is looked at relative to its directory (fstatat), not by its
/// whole path. The depth is bounded by [`RelPath`]'s.
fn list(
    shared: &Shared,
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
        if shared.found.fetch_add(1, Ordering::Relaxed) >= MAX_ENTRIES {
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
