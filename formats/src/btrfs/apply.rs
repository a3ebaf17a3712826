//! Applying a send stream to a plain directory, for hosts whose staging area is not on
//! btrfs (no kernel receive).
//!
//! Every command is first checked exactly as [`validate_stream`](super::validate_stream)
//! checks it (with the parent's tree, scanned from `parent`), then applied through
//! directory handles beneath `dest`: each directory is opened one component at a time
//! with `O_NOFOLLOW`, files are opened with `O_NOFOLLOW`, so a symlink is never followed
//! whatever the tree holds, even one planted behind the applier's back.
//!
//! ```text
//! subvol, snapshot    nothing: `dest` is the subvolume's root
//! mkfile, mkdir       openat O_CREAT|O_EXCL 0600, mkdirat 0700 (chmod follows)
//! symlink, link       symlinkat, linkat (a real hard link)
//! rename, unlink,     renameat, unlinkat: temporary names such as o257-7-0 are just
//! rmdir               paths
//! write, truncate     pwrite, ftruncate; holes stay holes
//! clone               a copy of the byte range, from `dest` (the stream's own subvolume)
//!                     or from `parent` (the parent's UUID)
//! fallocate           fallocate(2), or zeros / a length where the filesystem lacks it
//! chmod, utimes       fchmod, utimensat (never following); atime and mtime, not ctime
//! set/remove_xattr    fsetxattr / lsetxattr on the entry itself; removing an absent
//!                     attribute is not an error
//! chown, fileattr,    ignored: files belong to the user applying the stream (root, for
//! update_extent       the installer): the owners of the build host mean nothing on the
//!                     target; btrfs receive ignores fileattr too; update_extent carries
//!                     no data (`--no-data` streams)
//! ```
//!
//! The applier expects to run as root (as the installer does): a directory whose mode
//! lacks owner write permission is written into after its chmod, as btrfs receive does.
//! On error `dest` holds a partial tree: the caller discards it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use serde::Serialize;

use super::StreamError;
use super::fsops::{DIR_FLAGS, cstr, list_dir, open_dir, open_root, proc_path};
use super::stream::{At, Command, StreamPath, StreamReader, Timespec, Uuid};
use super::validate::{Checker, Expect, ParentTree};
use crate::path::{MAX_DEPTH, RelPath};

const CHUNK: usize = 1 << 20;
/// Largest xattr value and name list (Linux XATTR_SIZE_MAX, XATTR_LIST_MAX).
const XATTR_MAX: usize = 64 << 10;

/// What [`apply_to_dir`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStats {
    /// Commands applied, END included.
    pub commands: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub renames: u64,
    /// Entries removed by unlink and rmdir.
    pub removed: u64,
    pub bytes_written: u64,
    pub bytes_cloned: u64,
}

fn no_space(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

fn open_flags(write: bool) -> OFlags {
    let access = if write { OFlags::WRONLY } else { OFlags::RDONLY };
    access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC
}

struct Applier {
    dest: OwnedFd,
    dest_path: PathBuf,
    parent: Option<(OwnedFd, PathBuf)>,
    /// The file the last write went to: the kernel sends a file's data in many commands.
    open_file: Option<(RelPath, File)>,
    stats: ApplyStats,
    buf: Vec<u8>,
}

impl Applier {
    fn fail(&self, at: At, cmd: &Command, path: PathBuf, e: io::Error) -> StreamError {
        if no_space(&e) {
            return StreamError::NoSpace { path };
        }
        StreamError::Apply { index: at.index, command: cmd.name(), path, source: e }
    }

    /// The directory holding `path`, and its name in it.
    fn parent_of(&self, root: &OwnedFd, path: &RelPath) -> io::Result<(OwnedFd, std::ffi::CString)> {
        let dir = open_dir(root, path.parent().as_ref())?;
        Ok((dir, cstr(path.file_name())))
    }

    /// Opens a regular file beneath `root` without following symlinks.
    fn open_file_in(&self, root: &OwnedFd, path: &RelPath, write: bool) -> io::Result<File> {
        let (dir, name) = self.parent_of(root, path)?;
        let fd = rustix::fs::openat(&dir, &name, open_flags(write), Mode::empty()).map_err(|e| match e {
            rustix::io::Errno::LOOP => io::Error::other("is a symlink: it is not followed"),
            e => e.into(),
        })?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::other("is not a regular file"));
        }
        Ok(File::from(fd))
    }

    fn writable(&mut self, path: &RelPath) -> io::Result<&File> {
        if self.open_file.as_ref().is_none_or(|(p, _)| p != path) {
            self.open_file = None;
            let f = self.open_file_in(&self.dest, path, true)?;
            self.open_file = Some((path.clone(), f));
        }
        Ok(&self.open_file.as_ref().expect("opened above").1)
    }

    /// Opens the entry `path` (or `dest` itself) for metadata changes, not following a
    /// symlink: `None` when it is one.
    fn open_entry(&self, path: &StreamPath) -> io::Result<Option<OwnedFd>> {
        let StreamPath::Rel(rel) = path else {
            return Ok(Some(self.dest.try_clone()?));
        };
        let (dir, name) = self.parent_of(&self.dest, rel)?;
        match rustix::fs::openat(&dir, &name, open_flags(false), Mode::empty()) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::LOOP) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn apply(&mut self, at: At, cmd: &Command, own: Option<Uuid>) -> Result<(), StreamError> {
        let path_of = self.dest_path.join(cmd.path_display());
        if !matches!(cmd, Command::Write { .. }) {
            self.open_file = None;
        }
        let result: io::Result<()> = (|| {
            match cmd {
                Command::Subvol { .. } | Command::Snapshot { .. } | Command::End => {}
                Command::Mkfile { path, .. } => {
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::openat(
                        &dir,
                        &name,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )?;
                    self.stats.files += 1;
                }
                Command::Mkdir { path, .. } => {
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o700))?;
                    self.stats.dirs += 1;
                }
                Command::Symlink { path, target, .. } => {
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::symlinkat(target.as_str(), &dir, &name)?;
                    self.stats.symlinks += 1;
                }
                Command::Rename { from, to } => {
                    let (fdir, fname) = self.parent_of(&self.dest, from)?;
                    let (tdir, tname) = self.parent_of(&self.dest, to)?;
                    rustix::fs::renameat(&fdir, &fname, &tdir, &tname)?;
                    self.stats.renames += 1;
                }
                Command::Link { path, target } => {
                    let (tdir, tname) = self.parent_of(&self.dest, target)?;
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::linkat(&tdir, &tname, &dir, &name, AtFlags::empty())?;
                    self.stats.hard_links += 1;
                }
                Command::Unlink { path } => {
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::unlinkat(&dir, &name, AtFlags::empty())?;
                    self.stats.removed += 1;
                }
                Command::Rmdir { path } => {
                    let (dir, name) = self.parent_of(&self.dest, path)?;
                    rustix::fs::unlinkat(&dir, &name, AtFlags::REMOVEDIR)?;
                    self.stats.removed += 1;
                }
                Command::SetXattr { path, name, data } => self.xattr(path, name, Some(data))?,
                Command::RemoveXattr { path, name } => self.xattr(path, name, None)?,
                Command::Write { path, offset, data } => {
                    self.writable(path)?.write_all_at(data, *offset)?;
                    self.stats.bytes_written += data.len() as u64;
                }
                Command::Clone { path, offset, len, clone_uuid, clone_path, clone_offset, .. } => {
                    let src = if Some(*clone_uuid) == own {
                        self.open_file_in(&self.dest, clone_path, false)
                    } else {
                        let (parent, _) = self.parent.as_ref().ok_or_else(|| io::Error::other("no parent"))?;
                        self.open_file_in(parent, clone_path, false)
                    }
                    .map_err(|e| io::Error::new(e.kind(), format!("clone source {clone_path}: {e}")))?;
                    let dst = self.open_file_in(&self.dest, path, true)?;
                    let n = copy_range(&src, *clone_offset, &dst, *offset, *len, &mut self.buf)?;
                    self.stats.bytes_cloned += n;
                }
                Command::Truncate { path, size } => {
                    self.writable(path)?.set_len(*size)?;
                }
                Command::Chmod { path, mode } => {
                    let fd = self.open_entry(path)?.ok_or_else(|| io::Error::other("is a symlink: not followed"))?;
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(*mode as u32))?;
                }
                Command::Utimes { path, atime, mtime, .. } => {
                    let ts = Timestamps { last_access: ts(atime), last_modification: ts(mtime) };
                    match path {
                        StreamPath::Root => rustix::fs::futimens(&self.dest, &ts)?,
                        StreamPath::Rel(rel) => {
                            let (dir, name) = self.parent_of(&self.dest, rel)?;
                            rustix::fs::utimensat(&dir, &name, &ts, AtFlags::SYMLINK_NOFOLLOW)?;
                        }
                    }
                }
                Command::Fallocate { path, mode, offset, len } => {
                    let f = self.writable(path)?;
                    fallocate(f, *mode, *offset, *len)?;
                }
                Command::Chown { .. } | Command::Fileattr { .. } | Command::UpdateExtent { .. } => {}
                Command::Mknod { .. }
                | Command::Mkfifo { .. }
                | Command::Mksock { .. }
                | Command::EncodedWrite { .. } => {
                    return Err(io::Error::other("refused by the checker"));
                }
            }
            Ok(())
        })();
        result.map_err(|e| self.fail(at, cmd, path_of, e))?;
        self.stats.commands += 1;
        Ok(())
    }

    fn xattr(&self, path: &StreamPath, name: &str, data: Option<&[u8]>) -> io::Result<()> {
        let result = match self.open_entry(path)? {
            Some(fd) => match data {
                Some(d) => rustix::fs::fsetxattr(&fd, name, d, XattrFlags::empty()),
                None => rustix::fs::fremovexattr(&fd, name),
            },
            None => {
                // A symlink: act on the link itself, by a path that resolves to its
                // directory through the handle already opened without following.
                let rel = path.rel().expect("the root is a directory");
                let (dir, cname) = self.parent_of(&self.dest, rel)?;
                let p = proc_path(&dir, &cname);
                match data {
                    Some(d) => rustix::fs::lsetxattr(p.as_c_str(), name, d, XattrFlags::empty()),
                    None => rustix::fs::lremovexattr(p.as_c_str(), name),
                }
            }
        };
        match result {
            Err(rustix::io::Errno::NODATA) if data.is_none() => Ok(()),
            r => r.map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("xattr {name}: {e}"))),
        }
    }
}

fn ts(t: &Timespec) -> rustix::fs::Timespec {
    rustix::fs::Timespec { tv_sec: t.sec, tv_nsec: t.nsec as _ }
}

/// Copies `len` bytes (to the end of `src` when 0, as BTRFS_IOC_CLONE_RANGE does) from
/// `src` at `src_off` to `dst` at `dst_off`; returns the bytes copied.
fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<u64> {
    buf.resize(CHUNK, 0);
    let to_eof = len == 0;
    let mut done = 0u64;
    while to_eof || done < len {
        let want = if to_eof { CHUNK } else { (len - done).min(CHUNK as u64) as usize };
        let n = src.read_at(&mut buf[..want], src_off + done)?;
        if n == 0 {
            if to_eof {
                break;
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the clone source ends {} bytes short of the range", len - done),
            ));
        }
        dst.write_all_at(&buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(done)
}

/// fallocate(2) as btrfs receive calls it, with a fallback where the filesystem lacks it.
fn fallocate(f: &File, mode: u32, offset: u64, len: u64) -> io::Result<()> {
    let flags = FallocateFlags::from_bits_retain(mode);
    match rustix::fs::fallocate(f, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let size = f.metadata()?.len();
            if flags.contains(FallocateFlags::PUNCH_HOLE) {
                let end = offset.saturating_add(len).min(size);
                let zeros = vec![0u8; CHUNK];
                let mut at = offset;
                while at < end {
                    let n = (end - at).min(CHUNK as u64) as usize;
                    f.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            } else if !flags.contains(FallocateFlags::KEEP_SIZE) && offset + len > size {
                f.set_len(offset + len)
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies the send stream `r` to the directory `dest`, without the kernel.
///
/// A full stream goes into an empty `dest`. For an incremental stream, `parent` is the
/// parent's tree (the generation the stream was sent against) and `dest` must already be
/// a copy of it: the caller makes the copy, with [`copy_tree`] or otherwise (a reflink
/// copy, a snapshot). Clones from the parent read from `parent`, never from `dest`.
///
/// Every command is checked as [`validate_stream_against`](super::validate_stream_against)
/// checks it before it is applied; on error `dest` holds a partial tree.
pub fn apply_to_dir<R: Read>(r: R, dest: &Path, parent: Option<&Path>) -> Result<ApplyStats, StreamError> {
    apply_to_dir_watched(r, dest, parent, |_| Ok(()))
}

/// [`apply_to_dir`], with `watch` given what the commands checked so far store and create
/// before each is applied (as in [`forward_stream`](super::forward_stream)): refusing
/// (`Err(reason)`) refuses the stream at that command, before it is applied. One read of
/// the stream, bounded as it goes.
pub fn apply_to_dir_watched<R: Read>(
    r: R,
    dest: &Path,
    parent: Option<&Path>,
    mut watch: impl FnMut(super::Progress) -> Result<(), String>,
) -> Result<ApplyStats, StreamError> {
    let dest_fd = open_root(dest)?;
    let (expect, tree, parent_fd) = match parent {
        None => {
            let names = list_dir(&dest_fd).map_err(|e| StreamError::Io { path: dest.to_owned(), source: e })?;
            if !names.is_empty() {
                return Err(StreamError::NotEmpty { path: dest.to_owned() });
            }
            (Expect::Full, None, None)
        }
        Some(p) => (Expect::AnyParent, Some(ParentTree::scan(p)?), Some((open_root(p)?, p.to_owned()))),
    };
    let mut checker = Checker::new(expect, tree);
    let mut applier = Applier {
        dest: dest_fd,
        dest_path: dest.to_owned(),
        parent: parent_fd,
        open_file: None,
        stats: ApplyStats::default(),
        buf: Vec::new(),
    };
    let mut reader = StreamReader::new(r)?;
    loop {
        let offset = reader.position();
        let Some(cmd) = reader.next_command()? else { break };
        let at = At { index: reader.commands(), offset };
        checker.check_watched(at, &cmd, &mut watch)?;
        applier.apply(at, &cmd, checker.own_uuid())?;
    }
    checker.finish(reader.version(), reader.position())?;
    applier.open_file = None;
    rustix::fs::syncfs(&applier.dest).map_err(|e| StreamError::Io { path: dest.to_owned(), source: e.into() })?;
    Ok(applier.stats)
}

/// Copies the tree under `from` into `to`, an existing empty directory: directories,
/// regular files (contents, holes not kept), symlinks, hard links (as hard links),
/// modes, access and modification times, and extended attributes. Device nodes, FIFOs
/// and sockets are refused. Nothing is followed: both trees are walked through handles.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), StreamError> {
    let src = open_root(from)?;
    let dst = open_root(to)?;
    if !list_dir(&dst).map_err(|e| StreamError::Io { path: to.to_owned(), source: e })?.is_empty() {
        return Err(StreamError::NotEmpty { path: to.to_owned() });
    }
    let mut copier = Copier {
        links: HashMap::new(),
        to: to.to_owned(),
        dst_root: dst.try_clone().map_err(|e| StreamError::Io { path: to.to_owned(), source: e })?,
    };
    copier.dir(&src, &dst, from, None, 0)?;
    copy_meta(&src, &dst, None).map_err(|e| StreamError::Io { path: to.to_owned(), source: e })?;
    rustix::fs::syncfs(&dst).map_err(|e| StreamError::Io { path: to.to_owned(), source: e.into() })
}

struct Copier {
    /// (device, inode) of files with several links → their path in the copy.
    links: HashMap<(u64, u64), RelPath>,
    to: PathBuf,
    dst_root: OwnedFd,
}

impl Copier {
    fn dir(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        src_path: &Path,
        rel: Option<&RelPath>,
        depth: usize,
    ) -> Result<(), StreamError> {
        let io_err = |p: &Path, e: io::Error| StreamError::Io { path: p.to_owned(), source: e };
        if depth > MAX_DEPTH {
            return Err(io_err(src_path, io::Error::other(format!("nested deeper than {MAX_DEPTH} directories"))));
        }
        for name in list_dir(src).map_err(|e| io_err(src_path, e))? {
            let s = super::fsops::component(&name, src_path)?;
            let child_src = src_path.join(&s);
            let child_rel = match rel {
                Some(r) => r.join(&s),
                None => RelPath::parse(&s),
            }
            .map_err(|e| io_err(&child_src, io::Error::other(e.to_string())))?;
            let dst_path = self.to.join(child_rel.as_str());
            let err = |e: io::Error| {
                if no_space(&e) {
                    StreamError::NoSpace { path: dst_path.clone() }
                } else {
                    StreamError::Io { path: dst_path.clone(), source: e }
                }
            };
            let st =
                rustix::fs::statat(src, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_err(&child_src, e.into()))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    let s_fd = rustix::fs::openat(src, &name, DIR_FLAGS, Mode::empty())
                        .map_err(|e| io_err(&child_src, e.into()))?;
                    rustix::fs::mkdirat(dst, &name, Mode::from_raw_mode(0o700)).map_err(|e| err(e.into()))?;
                    let d_fd = rustix::fs::openat(dst, &name, DIR_FLAGS, Mode::empty()).map_err(|e| err(e.into()))?;
                    self.dir(&s_fd, &d_fd, &child_src, Some(&child_rel), depth + 1)?;
                    copy_meta(&s_fd, &d_fd, None).map_err(err)?;
                }
                FileType::RegularFile => {
                    let key = (st.st_dev, st.st_ino);
                    if st.st_nlink > 1 {
                        if let Some(first) = self.links.get(&key) {
                            let (fdir, fname) = (
                                open_dir(&self.dst_root, first.parent().as_ref()).map_err(err)?,
                                cstr(first.file_name()),
                            );
                            rustix::fs::linkat(&fdir, &fname, dst, &name, AtFlags::empty())
                                .map_err(|e| err(e.into()))?;
                            continue;
                        }
                        self.links.insert(key, child_rel.clone());
                    }
                    let s_fd = rustix::fs::openat(src, &name, open_flags(false), Mode::empty())
                        .map_err(|e| io_err(&child_src, e.into()))?;
                    let d_fd = rustix::fs::openat(
                        dst,
                        &name,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|e| err(e.into()))?;
                    let mut s_file = File::from(s_fd);
                    let mut d_file = File::from(d_fd);
                    // std's copy between files is copy_file_range: extents shared on
                    // btrfs and XFS, an in-kernel copy elsewhere.
                    io::copy(&mut s_file, &mut d_file).map_err(err)?;
                    copy_meta(&s_file, &d_file, None).map_err(err)?;
                }
                FileType::Symlink => {
                    let text =
                        rustix::fs::readlinkat(src, &name, Vec::new()).map_err(|e| io_err(&child_src, e.into()))?;
                    rustix::fs::symlinkat(text.as_c_str(), dst, &name).map_err(|e| err(e.into()))?;
                    copy_meta(src, dst, Some(&name)).map_err(err)?;
                }
                _ => {
                    return Err(io_err(&child_src, io::Error::other("is a device node, FIFO or socket; not copied")));
                }
            }
        }
        Ok(())
    }
}

/// Copies mode, times and xattrs from `src` to `dst` (open files or directories), or,
/// with `link`, of the symlink `link` in the directories `src` and `dst` (times and
/// xattrs; a symlink has no mode of its own).
fn copy_meta(src: &impl AsFd, dst: &impl AsFd, link: Option<&std::ffi::CStr>) -> io::Result<()> {
    let st = match link {
        None => rustix::fs::fstat(src)?,
        Some(name) => rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW)?,
    };
    let times = Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
        last_modification: rustix::fs::Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
    };
    // Xattrs first: setting some (ACLs) changes the mode.
    let mut list = vec![0u8; XATTR_MAX];
    let mut value = vec![0u8; XATTR_MAX];
    match link {
        None => {
            let n = rustix::fs::flistxattr(src, &mut list[..])?;
            for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let name = std::ffi::CString::new(name).expect("split at NUL");
                match rustix::fs::fgetxattr(src, name.as_c_str(), &mut value[..]) {
                    Ok(len) => rustix::fs::fsetxattr(dst, name.as_c_str(), &value[..len], XattrFlags::empty())?,
                    Err(rustix::io::Errno::NODATA) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            rustix::fs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
            rustix::fs::futimens(dst, &times)?;
        }
        Some(link_name) => {
            let sp = proc_path(src, link_name);
            let dp = proc_path(dst, link_name);
            let n = rustix::fs::llistxattr(sp.as_c_str(), &mut list[..])?;
            for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let name = std::ffi::CString::new(name).expect("split at NUL");
                match rustix::fs::lgetxattr(sp.as_c_str(), name.as_c_str(), &mut value[..]) {
                    Ok(len) => {
                        rustix::fs::lsetxattr(dp.as_c_str(), name.as_c_str(), &value[..len], XattrFlags::empty())?
                    }
                    Err(rustix::io::Errno::NODATA) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            rustix::fs::utimensat(dst, link_name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    use super::super::stream::writer::StreamWriter;
    use super::*;

    const OWN: [u8; 16] = [0x11; 16];
    const PARENT: [u8; 16] = [0x22; 16];

    /// Every path under `dir` with its kind, mode and content or link text.
    fn tree(dir: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in walk(dir) {
            let rel = e.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&e).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let v = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&e).unwrap().display())
            } else if m.is_dir() {
                format!("dir {mode:o}")
            } else {
                format!("file {mode:o} {:?}", String::from_utf8_lossy(&fs::read(&e).unwrap()))
            };
            out.insert(rel, v);
        }
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    fn kernel_like() -> StreamWriter {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", OWN)
            .chown("", 0, 0)
            .chmod("", 0o755)
            .mkdir("o257-7-0")
            .rename("o257-7-0", "bin")
            .chown("bin", 0, 0)
            .chmod("bin", 0o755)
            .mkfile("o258-7-0")
            .rename("o258-7-0", "bin/tool")
            .write("bin/tool", 0, b"#!/bin/sh\n")
            .chmod("bin/tool", 0o755)
            .mkfile("o259-7-0")
            .rename("o259-7-0", "bin/copy")
            .clone_range("bin/copy", 0, 10, OWN, "bin/tool", 0)
            .chmod("bin/copy", 0o644)
            .link("bin/hard", "bin/tool")
            .symlink("o260-7-0", "../bin/tool")
            .mkdir("o261-7-0")
            .rename("o261-7-0", "lib")
            .chmod("lib", 0o750)
            .rename("o260-7-0", "lib/tool")
            .set_xattr("bin/tool", "user.origin", b"build")
            .set_xattr("bin/copy", "user.gone", b"x")
            .remove_xattr("bin/copy", "user.gone")
            .fileattr("bin/tool", 0)
            .mkfile("sparse")
            .write("sparse", 1 << 20, b"tail")
            .chmod("sparse", 0o600)
            .utimes("lib/tool", 1_600_000_000)
            .utimes("bin/tool", 1_600_000_000)
            .utimes("", 1_700_000_000)
            .end();
        w
    }

    fn expected_full() -> BTreeMap<String, String> {
        let mut sparse = vec![0u8; 1 << 20];
        sparse.extend_from_slice(b"tail");
        [
            ("bin", "dir 755".to_owned()),
            ("bin/tool", "file 755 \"#!/bin/sh\\n\"".to_owned()),
            ("bin/hard", "file 755 \"#!/bin/sh\\n\"".to_owned()),
            ("bin/copy", "file 644 \"#!/bin/sh\\n\"".to_owned()),
            ("lib", "dir 750".to_owned()),
            ("lib/tool", "link ../bin/tool".to_owned()),
            ("sparse", format!("file 600 {:?}", String::from_utf8_lossy(&sparse))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn applies_a_full_stream() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("gen");
        fs::create_dir(&dest).unwrap();
        let stats = apply_to_dir(&kernel_like().bytes()[..], &dest, None).unwrap();
        assert_eq!(tree(&dest), expected_full());
        assert_eq!(stats.files, 3);
        assert_eq!(stats.dirs, 2);
        assert_eq!(stats.renames, 5);
        assert_eq!(stats.hard_links, 1);
        assert_eq!(stats.bytes_written, 14);
        assert_eq!(stats.bytes_cloned, 10);
        let tool = fs::metadata(dest.join("bin/tool")).unwrap();
        assert_eq!(tool.ino(), fs::metadata(dest.join("bin/hard")).unwrap().ino());
        assert_eq!(tool.mtime(), 1_600_000_000);
        assert_eq!(fs::symlink_metadata(dest.join("lib/tool")).unwrap().mtime(), 1_600_000_000);
        assert_eq!(fs::metadata(&dest).unwrap().mtime(), 1_700_000_000);
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o755);
        // The hole stays a hole.
        assert!(fs::metadata(dest.join("sparse")).unwrap().blocks() < 64);
        let mut v = [0u8; 16];
        let n = rustix::fs::getxattr(dest.join("bin/tool"), "user.origin", &mut v[..]).unwrap();
        assert_eq!(&v[..n], b"build");
        assert!(rustix::fs::getxattr(dest.join("bin/copy"), "user.gone", &mut v[..]).is_err());
    }

    #[test]
    fn applies_an_incremental_stream_onto_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent");
        fs::create_dir(&parent).unwrap();
        apply_to_dir(&kernel_like().bytes()[..], &parent, None).unwrap();
        let dest = dir.path().join("next");
        fs::create_dir(&dest).unwrap();
        copy_tree(&parent, &dest).unwrap();
        assert_eq!(tree(&dest), tree(&parent));
        // Hard links stay hard links in the copy: a write through one name shows in the other.
        let ino = |p: &str| fs::metadata(dest.join(p)).unwrap().ino();
        assert_eq!(ino("bin/tool"), ino("bin/hard"));
        let mut w = StreamWriter::new(2);
        w.snapshot("vol2", [0x44; 16], PARENT)
            .write("bin/tool", 0, b"#!/bin/bash\n")
            .unlink("bin/copy")
            .mkfile("o300-8-0")
            .rename("o300-8-0", "new")
            .clone_range("new", 0, 4, PARENT, "bin/tool", 2)
            .chmod("new", 0o640)
            .rename("lib", "lib2")
            .truncate("sparse", 3)
            .end();
        apply_to_dir(&w.bytes()[..], &dest, Some(&parent)).unwrap();
        let mut want = expected_full();
        want.insert("bin/tool".into(), "file 755 \"#!/bin/bash\\n\"".into());
        want.insert("bin/hard".into(), "file 755 \"#!/bin/bash\\n\"".into());
        want.remove("bin/copy");
        // Cloned from the parent's bytes, not from the file just rewritten.
        want.insert("new".into(), "file 640 \"/bin\"".into());
        let lib = want.remove("lib").unwrap();
        want.insert("lib2".into(), lib);
        let link = want.remove("lib/tool").unwrap();
        want.insert("lib2/tool".into(), link);
        want.insert("sparse".into(), "file 600 \"\\0\\0\\0\"".into());
        assert_eq!(tree(&dest), want);
        // The parent is untouched.
        assert_eq!(tree(&parent), expected_full());
    }

    #[test]
    fn never_follows_a_symlink_planted_in_dest() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, dest, outside) = (dir.path().join("p"), dir.path().join("d"), dir.path().join("outside"));
        for d in [&parent, &dest, &outside] {
            fs::create_dir(d).unwrap();
        }
        fs::create_dir(parent.join("d")).unwrap();
        fs::write(parent.join("d/f"), b"old").unwrap();
        fs::write(parent.join("f"), b"old").unwrap();
        // The copy differs from the parent the checker sees: `d` and `f` point out.
        symlink(&outside, dest.join("d")).unwrap();
        fs::write(outside.join("f"), b"outside").unwrap();
        symlink(outside.join("f"), dest.join("f")).unwrap();
        for w in [
            StreamWriter::new(2).snapshot("v", OWN, PARENT).write("d/f", 0, b"pwned").end().bytes(),
            StreamWriter::new(2).snapshot("v", OWN, PARENT).mkfile("d/new").end().bytes(),
            StreamWriter::new(2).snapshot("v", OWN, PARENT).write("f", 0, b"pwned").end().bytes(),
            StreamWriter::new(2).snapshot("v", OWN, PARENT).truncate("f", 0).end().bytes(),
            StreamWriter::new(2).snapshot("v", OWN, PARENT).chmod("f", 0o777).end().bytes(),
        ] {
            let err = apply_to_dir(&w[..], &dest, Some(&parent)).unwrap_err();
            assert!(matches!(err, StreamError::Apply { .. }) && !err.is_malformed(), "{err}");
        }
        assert_eq!(fs::read(outside.join("f")).unwrap(), b"outside");
        assert_eq!(fs::metadata(outside.join("f")).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn checks_before_applying() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("gen");
        fs::create_dir(&dest).unwrap();
        let mut w = StreamWriter::new(2);
        w.subvol("v", OWN).mkdir("d").mkfile("d/../../escape").end();
        let err = apply_to_dir(&w.bytes()[..], &dest, None).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("'..'"), "{err}");
        assert!(!dir.path().join("escape").exists());
        // Nothing after the refused command was applied; what came before was.
        assert!(dest.join("d").is_dir());
        // A full stream needs an empty directory; an incremental one a parent.
        let err = apply_to_dir(&kernel_like().bytes()[..], &dest, None).unwrap_err();
        assert!(matches!(err, StreamError::NotEmpty { .. }), "{err}");
        let err = apply_to_dir(&kernel_like().bytes()[..], &dest, Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("expected an incremental stream"), "{err}");
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let mut w = StreamWriter::new(2);
        w.snapshot("v", OWN, PARENT).end();
        let err = apply_to_dir(&w.bytes()[..], &empty, None).unwrap_err();
        assert!(err.to_string().contains("no parent was declared"), "{err}");
    }

    #[test]
    fn fallocate_and_ignored_commands() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("gen");
        fs::create_dir(&dest).unwrap();
        let mut w = StreamWriter::new(2);
        w.subvol("v", OWN)
            .mkfile("f")
            .write("f", 0, &[7u8; 8192])
            .fallocate("f", 3, 0, 4096)
            .fallocate("f", 0, 8192, 4096)
            .fallocate("f", 1, 12288, 4096)
            .chown("f", 1000, 1000)
            .update_extent("f", 0, 4096)
            .end();
        apply_to_dir(&w.bytes()[..], &dest, None).unwrap();
        let data = fs::read(dest.join("f")).unwrap();
        assert_eq!(data.len(), 12288);
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[4096..8192].iter().all(|&b| b == 7));
        // chown is not applied: the file belongs to whoever applied the stream.
        assert_eq!(fs::metadata(dest.join("f")).unwrap().uid(), fs::metadata(dir.path()).unwrap().uid());
    }

    #[test]
    fn copy_tree_refuses_special_files_and_full_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(b.join("x"), b"").unwrap();
        assert!(matches!(copy_tree(&a, &b).unwrap_err(), StreamError::NotEmpty { .. }));
        fs::remove_file(b.join("x")).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, a.join("fifo"), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let err = copy_tree(&a, &b).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }
}
