//! btrfs subvolumes for the builder and the installer, through the kernel's ioctls.
//!
//! Why ioctls and not libbtrfsutil: the `libbtrfsutil` crate 0.8 does not build against
//! Debian 12's headers, 0.7.1 needs libclang at build time and the C library at run time,
//! and neither offers send. The four ioctls needed here are small fixed-layout structs,
//! kept in one `sys` module with a `SAFETY` note per call; everything else is safe.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::path::Path;
//! let fs = Path::new("/mnt/btrfs");
//! if subvol::is_btrfs(fs)? {
//!     subvol::create(fs, "work")?;
//!     subvol::snapshot(&fs.join("work"), fs, "work.ro", true)?;
//!     assert!(subvol::is_readonly(&fs.join("work.ro"))?);
//!     subvol::delete(fs, "work")?;
//! }
//! # Ok(()) }
//! ```

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

mod sys;

/// `statfs` magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// The inode number of every subvolume's root directory.
const FIRST_FREE_OBJECTID: u64 = 256;

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= sys::SUBVOL_NAME_MAX
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == 0);
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a subvolume name (one path component)"),
        ))
    }
}

/// Whether `path` lies on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(path)?;
    Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root directory of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::lstat(path)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        && st.st_ino == FIRST_FREE_OBJECTID
        && is_btrfs(path)?)
}

/// Creates the subvolume `parent/name`.
pub fn create(parent: &Path, name: &str) -> io::Result<()> {
    check_name(name)?;
    let dir = open_dir(parent)?;
    sys::subvol_create(&dir, name).map_err(|e| annotate(e, "creating subvolume", &parent.join(name)))
}

/// Snapshots the subvolume `source` as `parent/name`, read-only when asked.
pub fn snapshot(source: &Path, parent: &Path, name: &str, readonly: bool) -> io::Result<()> {
    check_name(name)?;
    let src = open_dir(source)?;
    let dir = open_dir(parent)?;
    sys::snap_create(&dir, &src, name, readonly).map_err(|e| annotate(e, "snapshotting into", &parent.join(name)))
}

/// Deletes the subvolume `parent/name` (read-only ones too).
pub fn delete(parent: &Path, name: &str) -> io::Result<()> {
    check_name(name)?;
    let dir = open_dir(parent)?;
    sys::snap_destroy(&dir, name).map_err(|e| annotate(e, "deleting subvolume", &parent.join(name)))
}

/// Whether the subvolume at `path` is read-only.
pub fn is_readonly(path: &Path) -> io::Result<bool> {
    let fd = open_dir(path)?;
    Ok(sys::get_flags(&fd)? & sys::SUBVOL_RDONLY != 0)
}

/// Makes the subvolume at `path` read-only or writable.
pub fn set_readonly(path: &Path, readonly: bool) -> io::Result<()> {
    let fd = open_dir(path)?;
    let flags = sys::get_flags(&fd)?;
    let new = if readonly { flags | sys::SUBVOL_RDONLY } else { flags & !sys::SUBVOL_RDONLY };
    if new != flags {
        sys::set_flags(&fd, new).map_err(|e| annotate(e, "setting the read-only flag of", path))?;
    }
    Ok(())
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
