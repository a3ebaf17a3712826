//! Directory-handle operations shared by the applier, the parent scan and `copy_tree`:
//! every path beneath a root is opened one component at a time with `O_NOFOLLOW`, so
//! nothing outside the root is ever reached through a symlink.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode};

use super::StreamError;
use super::validate::Node;
use crate::path::{MAX_DEPTH, RelPath};

pub(crate) use fsx::DIR_FLAGS;

pub(crate) fn cstr(name: &str) -> CString {
    CString::new(name).expect("RelPath components have no NUL")
}

/// Opens a root directory given by the caller (symlinks in its own path are the caller's).
pub(crate) fn open_root(path: &Path) -> Result<OwnedFd, StreamError> {
    fsx::open_root(path).map_err(|e| StreamError::Io { path: path.to_owned(), source: e })
}

/// Opens directory `dir` beneath `root` (the root itself for `None`), never following a
/// symlink.
pub(crate) fn open_dir(root: &OwnedFd, dir: Option<&RelPath>) -> io::Result<OwnedFd> {
    Ok(fsx::open_beneath(root, dir.iter().flat_map(|d| d.components()))?)
}

/// The names in a directory, sorted, without `.` and `..`.
pub(crate) use fsx::list_dir;

/// A directory entry's name as a path component, or an error naming it.
pub(crate) fn component(name: &CStr, at: &Path) -> Result<String, StreamError> {
    let bad = || StreamError::Io {
        path: at.join(String::from_utf8_lossy(name.to_bytes()).as_ref()),
        source: io::Error::other("the name is not a valid stage path component (UTF-8, no backslash)"),
    };
    let s = name.to_str().map_err(|_| bad())?;
    RelPath::parse(s).map_err(|_| bad())?;
    Ok(s.to_owned())
}

/// Reads the tree under `root_path` into a model of complete directories.
pub(crate) fn scan_tree(root_path: &Path, entries: &mut usize, max: usize) -> Result<Node, StreamError> {
    let root = open_root(root_path)?;
    scan_dir(&root, root_path, 0, entries, max)
}

fn scan_dir(dir: &OwnedFd, path: &Path, depth: usize, entries: &mut usize, max: usize) -> Result<Node, StreamError> {
    let io_err = |p: &Path, e: io::Error| StreamError::Io { path: p.to_owned(), source: e };
    if depth > MAX_DEPTH {
        return Err(io_err(path, io::Error::other(format!("nested deeper than {MAX_DEPTH} directories"))));
    }
    let mut children = BTreeMap::new();
    for name in list_dir(dir).map_err(|e| io_err(path, e))? {
        let s = component(&name, path)?;
        let child_path = path.join(&s);
        *entries += 1;
        if *entries > max {
            return Err(io_err(path, io::Error::other(format!("more than {max} entries"))));
        }
        let st =
            rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_err(&child_path, e.into()))?;
        let node = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let fd = rustix::fs::openat(dir, &name, DIR_FLAGS, Mode::empty())
                    .map_err(|e| io_err(&child_path, e.into()))?;
                scan_dir(&fd, &child_path, depth + 1, entries, max)?
            }
            FileType::RegularFile => Node::File(0),
            FileType::Symlink => {
                let text = rustix::fs::readlinkat(dir, &name, Vec::new()).map_err(|e| io_err(&child_path, e.into()))?;
                let text = text
                    .into_string()
                    .map_err(|_| io_err(&child_path, io::Error::other("the link text is not UTF-8")))?;
                Node::Symlink(text)
            }
            _ => Node::Special,
        };
        children.insert(s, node);
    }
    Ok(Node::Dir { children, complete: true })
}

/// The path of `name` in the directory `dir` as seen through `/proc/self/fd`: lets
/// `l*xattr` act on a symlink itself by a path whose only symlink is the magic link to
/// an already opened directory.
pub(crate) fn proc_path(dir: &impl AsFd, name: &CStr) -> CString {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", dir.as_fd().as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).expect("no NUL in a CStr")
}
