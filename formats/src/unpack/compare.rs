//! Comparing a tree on disk with its signed manifest: every path is looked at (kind, mode,
//! size, link text, content), nothing missing, nothing extra.
//!
//! It is the last step of every unpack and all of `verify`: a stat per path, and a read of
//! every file whose digest is not known. The directories are shared out to a thread per
//! core ([`fsx::share`]); each is opened beneath the one that listed it, never through a
//! link.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{AtFlags, FileType, OFlags};

use super::{CHUNK, Mismatch, UnpackError, io_error, kind_name, list_dir};
use crate::digest::{Digest, sha256_reader};
use crate::manifest::{EntryKind, StageConfig};

/// What the walk found at an entry's path.
const UNSEEN: u8 = 0;
const SEEN: u8 = 1;
/// Present with another kind: its children are not looked for.
const PRUNED: u8 = 2;

/// A directory still to compare: its name in the directory that listed it.
struct Dir {
    parent: Arc<OwnedFd>,
    name: CString,
    path: String,
}

struct Shared<'w> {
    config: &'w StageConfig,
    root_path: &'w Path,
    known: &'w BTreeMap<String, (Digest, u64)>,
    /// By entry index: UNSEEN, SEEN or PRUNED.
    visits: Vec<AtomicU8>,
}

/// Walks the tree under `root` and compares it with `config`; `ignore` names at the top
/// are passed over. Files whose digest is in `known` with the size found on disk are not
/// read again. The differences come sorted by path.
pub(super) fn compare_tree(
    root: &OwnedFd,
    root_path: &Path,
    config: &StageConfig,
    ignore: &[&str],
    known: &BTreeMap<String, (Digest, u64)>,
) -> Result<Vec<Mismatch>, UnpackError> {
    let shared =
        Shared { config, root_path, known, visits: config.entries.iter().map(|_| AtomicU8::new(UNSEEN)).collect() };
    let root = Arc::new(root.try_clone().map_err(|e| io_error(root_path.to_owned(), e))?);
    let mut top = Walker { shared: &shared, out: Vec::new(), next: 0 };
    let mut dirs = Vec::new();
    top.dir(&root, None, ignore, &mut dirs)?;
    let walkers = fsx::share::share_out(
        dirs,
        || Walker { shared: &shared, out: Vec::new(), next: 0 },
        |walker, d: Dir, dirs| {
            let fd = walker.open(&d)?;
            walker.dir(&Arc::new(fd), Some(&d.path), &[], dirs)
        },
    )?;
    let mut out = top.out;
    for mut w in walkers {
        out.append(&mut w.out);
    }
    let visit = |i: usize| shared.visits[i].load(Ordering::Relaxed);
    for (i, e) in config.entries.iter().enumerate() {
        if visit(i) != UNSEEN {
            continue;
        }
        let parent_seen = match e.path.as_str().rsplit_once('/') {
            None => true,
            Some((p, _)) => config.entries.binary_search_by(|x| x.path.as_str().cmp(p)).is_ok_and(|j| visit(j) == SEEN),
        };
        if parent_seen {
            out.push(Mismatch { path: e.path.to_string(), problem: format!("{} is missing", kind_name(e.kind)) });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// One thread's share of the comparison.
struct Walker<'s, 'w> {
    shared: &'s Shared<'w>,
    out: Vec<Mismatch>,
    /// The entry after the one found last: the names of a directory come sorted, and
    /// mostly meet the entries in their order.
    next: usize,
}

impl Walker<'_, '_> {
    fn open(&self, d: &Dir) -> Result<OwnedFd, UnpackError> {
        rustix::fs::openat(
            &*d.parent,
            &d.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| io_error(self.shared.root_path.join(&d.path), e))
    }

    /// Compares what the directory `dir` (at `prefix`; the top with `None`, where `ignore`
    /// names are passed over) holds; its subdirectories go to `dirs`.
    fn dir(
        &mut self,
        dir: &Arc<OwnedFd>,
        prefix: Option<&str>,
        ignore: &[&str],
        dirs: &mut Vec<Dir>,
    ) -> Result<(), UnpackError> {
        let root_path = self.shared.root_path;
        let here = || prefix.map_or_else(|| root_path.to_owned(), |p| root_path.join(p));
        let names = list_dir(&**dir).map_err(|e| io_error(here(), e))?;
        for name in names {
            let Ok(n) = name.to_str() else {
                let lossy = name.to_string_lossy();
                let path = prefix.map_or_else(|| lossy.to_string(), |p| format!("{p}/{lossy}"));
                self.out.push(Mismatch { path, problem: "not in the signed manifest (name is not UTF-8)".into() });
                continue;
            };
            if prefix.is_none() && ignore.contains(&n) {
                continue;
            }
            let path = prefix.map_or_else(|| n.to_owned(), |p| format!("{p}/{n}"));
            let full = || root_path.join(&path);
            let st = rustix::fs::statat(&**dir, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_error(full(), e))?;
            let ft = FileType::from_raw_mode(st.st_mode);
            let Some(i) = self.shared.config.index_in_order(&path, &mut self.next) else {
                self.out.push(Mismatch { path, problem: "not in the signed manifest".into() });
                continue;
            };
            let e = &self.shared.config.entries[i];
            let kind = match ft {
                FileType::RegularFile => Some(EntryKind::File),
                FileType::Directory => Some(EntryKind::Dir),
                FileType::Symlink => Some(EntryKind::Symlink),
                _ => None,
            };
            if kind != Some(e.kind) {
                let what = kind.map_or_else(|| format!("{ft:?}"), |k| kind_name(k).to_owned());
                self.shared.visits[i].store(PRUNED, Ordering::Relaxed);
                self.out.push(Mismatch { path, problem: format!("is a {what}, expected a {}", kind_name(e.kind)) });
                continue;
            }
            self.shared.visits[i].store(SEEN, Ordering::Relaxed);
            let mode = st.st_mode & 0o7777;
            if e.kind != EntryKind::Symlink && mode != e.mode.bits() {
                self.out
                    .push(Mismatch { path: path.clone(), problem: format!("mode is {mode:04o}, expected {}", e.mode) });
            }
            match e.kind {
                EntryKind::Dir => dirs.push(Dir { parent: Arc::clone(dir), name, path }),
                EntryKind::Symlink => {
                    let text = rustix::fs::readlinkat(&**dir, &name, Vec::new()).map_err(|e| io_error(full(), e))?;
                    if Some(text.as_bytes()) != e.link.as_deref().map(str::as_bytes) {
                        self.out.push(Mismatch {
                            path,
                            problem: format!(
                                "links to {:?}, expected {:?}",
                                text.to_string_lossy(),
                                e.link.as_deref().unwrap_or_default()
                            ),
                        });
                    }
                }
                EntryKind::File => {
                    let size = st.st_size as u64;
                    if Some(size) != e.size {
                        self.out.push(Mismatch {
                            path,
                            problem: format!("is {size} bytes, expected {}", e.size.unwrap_or_default()),
                        });
                        continue;
                    }
                    let digest = match self.shared.known.get(&path) {
                        Some(&(d, s)) if s == size => d,
                        _ => {
                            let fd = rustix::fs::openat(
                                &**dir,
                                &name,
                                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                                rustix::fs::Mode::empty(),
                            )
                            .map_err(|e| io_error(full(), e))?;
                            sha256_reader(BufReader::with_capacity(CHUNK, File::from(fd)))
                                .map_err(|e| io_error(full(), e))?
                                .0
                        }
                    };
                    if Some(digest) != e.sha256 {
                        self.out.push(Mismatch {
                            path,
                            problem: format!(
                                "content hashes to {digest}, expected {}",
                                e.sha256.map_or_else(String::new, |d| d.to_string())
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
