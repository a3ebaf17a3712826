//! The host as the installer sees it: everything under `--root`, resolved inside the root
//! like a chroot (openat2 `RESOLVE_IN_ROOT`), absolute symlinks included.
//!
//! ```text
//! ROOT/var/lib/op-dbus/staging/
//!   <stage>                 symlink -> .generations/<stage>/<gen>   (the active generation)
//!   .generations/<stage>/<gen>/   staged tree + manifest.json (immutable)
//!   snapshots/<name>.json   named restore points
//!   state.json              what is deployed (atomic write)
//!   journal/tx.json         the transaction in progress, if any
//!   backups/<id>            what was at a target before we placed something there
//!   lock                    held by the command that changes anything
//!   .tmp/                   the installer's temporary area (receiving, unpacking)
//! ROOT/var/lib/op-dbus/deployment/images/   OCI layout store
//! ROOT/etc/op-dbus/trusted-keys/*.pub, ROOT/etc/op-dbus/stage.toml
//! ```

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use formats::digest::{Digest, sha256_reader};
use formats::path::{RelPath, TargetPath};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// Where the installer keeps its state, relative to the root.
pub const STAGING: &str = "var/lib/op-dbus/staging";
pub const STORE: &str = "var/lib/op-dbus/deployment/images";
pub const ETC: &str = "etc/op-dbus";
/// What target link texts start with, as seen from inside the root.
pub const STAGING_ABS: &str = "/var/lib/op-dbus/staging";

/// What is at a target path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    Missing,
    Symlink(String),
    File,
    Dir,
    Other,
}

impl std::fmt::Display for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetState::Missing => f.write_str("nothing"),
            TargetState::Symlink(t) => write!(f, "a link to {t}"),
            TargetState::File => f.write_str("a file"),
            TargetState::Dir => f.write_str("a directory"),
            TargetState::Other => f.write_str("a special file"),
        }
    }
}

/// A link the installer will not follow while writing a target: a user other than root
/// owns it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is a symlink owned by uid {uid}, not by root: the installer does not follow it while writing a target \
     (a user's link must not steer root's writes); replace it with a directory or a link owned by root"
)]
pub struct UnsafeLink {
    pub path: String,
    pub uid: u32,
}

/// A path component that does not exist; holds the path resolved so far plus the rest.
#[derive(Debug, thiserror::Error)]
#[error("{} does not exist", .0.join("/"))]
struct Missing(Vec<String>);

/// A directory reached by [`Host::walk`] and the path it resolved to (relative to the root).
#[derive(Debug)]
struct Walked {
    fd: OwnedFd,
    path: String,
}

/// The host under a root.
#[derive(Debug)]
pub struct Host {
    pub root: PathBuf,
    root_fd: OwnedFd,
}

impl Host {
    /// Opens the root (it must exist).
    pub fn open(root: &Path) -> io::Result<Host> {
        let root = fs::canonicalize(root)
            .map_err(|e| io::Error::new(e.kind(), format!("the root {}: {e}", root.display())))?;
        let root_fd = rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Host { root, root_fd })
    }

    pub fn is_real_root(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The host path of `rel` resolved inside the root (it must exist).
    pub fn resolve(&self, rel: &str) -> io::Result<PathBuf> {
        let fd = fsx::open_in_root(&self.root_fd, rel, OFlags::PATH)?;
        let p = rustix::fs::readlinkat(rustix::fs::CWD, format!("/proc/self/fd/{}", fd_num(&fd)), Vec::new())?;
        Ok(PathBuf::from(p.to_string_lossy().into_owned()))
    }

    /// Creates `rel` and its parents inside the root; returns its host path.
    pub fn ensure_dir(&self, rel: &str) -> io::Result<PathBuf> {
        let mut so_far = String::new();
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(c);
            match self.dir_fd(&so_far) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let (parent, name) = split(&so_far);
                    let pfd = self.dir_fd(parent)?;
                    match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.resolve(rel)
    }

    /// The staging directory (created if missing).
    pub fn staging(&self) -> io::Result<PathBuf> {
        if let Some(p) = self.staging_if_exists()? {
            return Ok(p);
        }
        // On btrfs the staging area is a subvolume, so that snapshots of it are cheap.
        let parent = self.ensure_dir(STAGING.rsplit_once('/').expect("nested").0)?;
        if subvol::is_btrfs(&parent)? {
            subvol::create(&parent, "staging")?;
        }
        self.ensure_dir(STAGING)
    }

    /// The staging directory if it exists.
    pub fn staging_if_exists(&self) -> io::Result<Option<PathBuf>> {
        match self.resolve(STAGING) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn dir_fd(&self, rel: &str) -> io::Result<OwnedFd> {
        fsx::open_in_root(&self.root_fd, rel, OFlags::PATH | OFlags::DIRECTORY)
    }

    /// The parent directory of `target` (resolved in the root, see [`Host::walk`]) and the
    /// last component.
    fn parent(&self, target: &TargetPath) -> io::Result<(OwnedFd, String)> {
        let rel = target.relative();
        let fd = match rel.parent() {
            Some(p) => self.walk(p.components())?.fd,
            None => self.dir_fd("")?,
        };
        Ok((fd, rel.file_name().to_owned()))
    }

    /// Walks `components` from the root to a directory the way the installer may write
    /// through it: a symlink on the way is followed (inside the root, absolute ones from the
    /// root) only when root owns it, as the kernel's `protected_symlinks` and
    /// systemd-tmpfiles' "unsafe path transition" rules have it, so that a user who owns a
    /// directory under an allowed prefix cannot point the installer elsewhere with a link of
    /// theirs. Returns the directory and the path it resolved to. A missing component is
    /// `NotFound`, with [`Walked::missing`] telling where.
    fn walk<'a>(&self, components: impl Iterator<Item = &'a str>) -> io::Result<Walked> {
        /// As many links as Linux follows in one path walk.
        const MAX_HOPS: usize = 40;
        let mut todo: std::collections::VecDeque<String> = components.map(str::to_owned).collect();
        let mut dirs: Vec<(OwnedFd, String)> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "" | "." => continue,
                // Like the root of a chroot, the root's parent is the root.
                ".." => {
                    dirs.pop();
                    continue;
                }
                _ => {}
            }
            let here = dirs.last().map_or(&self.root_fd, |(fd, _)| fd);
            // O_PATH|O_NOFOLLOW opens the entry itself: what is checked below is what is
            // used, whatever happens to the name meanwhile.
            let fd = match rustix::fs::openat(
                here,
                c.as_str(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => {
                    let mut missing: Vec<String> = dirs.iter().map(|(_, n)| n.clone()).collect();
                    missing.push(c);
                    missing.extend(todo);
                    return Err(io::Error::new(io::ErrorKind::NotFound, Missing(missing)));
                }
                Err(e) => return Err(e.into()),
            };
            let st = rustix::fs::fstat(&fd)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => dirs.push((fd, c)),
                FileType::Symlink => {
                    let at: Vec<&str> = dirs.iter().map(|(_, n)| n.as_str()).collect();
                    let path = format!("/{}", at.iter().copied().chain([c.as_str()]).collect::<Vec<_>>().join("/"));
                    if st.st_uid != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            UnsafeLink { path, uid: st.st_uid },
                        ));
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(io::Error::other(format!("{path}: too many levels of symbolic links")));
                    }
                    let text = rustix::fs::readlinkat(&fd, "", Vec::new())?;
                    let text = text.to_string_lossy().into_owned();
                    if text.starts_with('/') {
                        dirs.clear();
                    }
                    for part in text.split('/').rev() {
                        todo.push_front(part.to_owned());
                    }
                }
                _ => return Err(io::Error::from_raw_os_error(20)),
            }
        }
        let path = dirs.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join("/");
        let fd = match dirs.pop() {
            Some((fd, _)) => fd,
            None => self.dir_fd("")?,
        };
        Ok(Walked { fd, path })
    }

    /// Where `target` lies once the links on the way are followed as `Host::walk` does;
    /// directories not made yet are taken as named. An error when a link on the way is
    /// one the installer must not follow.
    pub fn resolve_target(&self, target: &TargetPath) -> io::Result<TargetPath> {
        let rel = target.relative();
        let dir = match rel.parent() {
            None => String::new(),
            Some(p) => match self.walk(p.components()) {
                Ok(w) => w.path,
                Err(e) => match e.get_ref().and_then(|x| x.downcast_ref::<Missing>()) {
                    Some(Missing(parts)) => parts.join("/"),
                    None => return Err(e),
                },
            },
        };
        let whole =
            if dir.is_empty() { format!("/{}", rel.file_name()) } else { format!("/{dir}/{}", rel.file_name()) };
        TargetPath::parse(&whole).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// What is at `target` now (the last component is not followed).
    pub fn state(&self, target: &TargetPath) -> io::Result<TargetState> {
        let (fd, name) = match self.parent(target) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
                return Ok(TargetState::Missing);
            }
            Err(e) => return Err(e),
        };
        let st = match rustix::fs::statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(TargetState::Missing),
            Err(e) => return Err(e.into()),
        };
        Ok(match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let text = rustix::fs::readlinkat(&fd, name.as_str(), Vec::new())?;
                TargetState::Symlink(text.to_string_lossy().into_owned())
            }
            FileType::RegularFile => TargetState::File,
            FileType::Directory => TargetState::Dir,
            _ => TargetState::Other,
        })
    }

    /// What is at `target` (the last component not followed) with its metadata, and the
    /// directory that holds it, reached as `Host::walk` does: for reading what is there
    /// without following a link out of the root. `None` when nothing is there.
    pub fn lstat(&self, target: &TargetPath) -> io::Result<Option<(OwnedFd, String, rustix::fs::Stat)>> {
        let (fd, name) = match self.parent(target) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some((fd, name, st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the directory or file at `target` (not followed) an owner, a group and a mode.
    pub fn set_owner_mode(&self, target: &TargetPath, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
        let (fd, name) = self.parent(target)?;
        let f =
            rustix::fs::openat(&fd, name.as_str(), OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        // The owner before the mode: a chown clears setuid and setgid bits.
        rustix::fs::fchown(&f, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// The sha256 of the regular file at `target`, if there is one.
    pub fn file_digest(&self, target: &TargetPath) -> io::Result<Option<Digest>> {
        if self.state(target)? != TargetState::File {
            return Ok(None);
        }
        let (fd, name) = self.parent(target)?;
        let f =
            rustix::fs::openat(&fd, name.as_str(), OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Some(sha256_reader(fs::File::from(f))?.0))
    }

    /// The bytes of the regular file at `target`, if there is one and it holds at most
    /// `limit` bytes (`Some(None)` when it holds more).
    pub fn read_file(&self, target: &TargetPath, limit: u64) -> io::Result<Option<Option<Vec<u8>>>> {
        use io::Read;
        if self.state(target)? != TargetState::File {
            return Ok(None);
        }
        let (fd, name) = self.parent(target)?;
        let f =
            rustix::fs::openat(&fd, name.as_str(), OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        let mut buf = Vec::new();
        fs::File::from(f).take(limit + 1).read_to_end(&mut buf)?;
        Ok(Some((buf.len() as u64 <= limit).then_some(buf)))
    }

    /// Whether the directory `dir` exists (resolved in the root, see `Host::walk`).
    pub fn dir_exists(&self, dir: &TargetPath) -> io::Result<bool> {
        match self.walk(dir.relative().components()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates the directory `dir` (its parent must exist); no error if it exists.
    pub fn mkdir(&self, dir: &TargetPath) -> io::Result<()> {
        let (fd, name) = self.parent(dir)?;
        match rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the directory `dir` if it exists and is empty.
    pub fn rmdir_if_empty(&self, dir: &TargetPath) -> io::Result<()> {
        let (fd, name) = match self.parent(dir) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&fd, name.as_str(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTEMPTY) => Ok(()),
            Err(rustix::io::Errno::NOTDIR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `target` a symlink with `text`, atomically replacing whatever symlink or
    /// file is there (a temp link renamed over it); nothing when it is already right.
    pub fn replace_symlink(&self, target: &TargetPath, text: &str) -> io::Result<()> {
        if self.state(target)? == TargetState::Symlink(text.to_owned()) {
            return Ok(());
        }
        let (fd, name) = self.parent(target)?;
        fsx::replace_symlink_at(&fd, &name, text, &temp_name(&name, "tmp"))
    }

    /// Removes the temp file or link a killed `copy_in` or `replace_symlink` may have left
    /// beside `target`.
    pub fn remove_temp(&self, target: &TargetPath) -> io::Result<()> {
        let (fd, name) = match self.parent(target) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => return Ok(()),
            Err(e) => return Err(e),
        };
        // `.NAME.op-dbus-tmp` is what versions before the fixed-length names left.
        let legacy = format!(".{name}.op-dbus-tmp");
        let names = [Some(temp_name(&name, "tmp")), (legacy.len() <= 255).then_some(legacy)];
        for n in names.iter().flatten() {
            match rustix::fs::unlinkat(&fd, n.as_str(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes the symlink or file at `target`; nothing if it is missing.
    pub fn remove(&self, target: &TargetPath) -> io::Result<()> {
        let (fd, name) = match self.parent(target) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&fd, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => fsync_dir(&fd),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves what is at `target` to the host path `to` (a directory entry of ours, such
    /// as `backups/<id>`). Both must be on one filesystem.
    pub fn move_out(&self, target: &TargetPath, to: &Path) -> io::Result<()> {
        let (fd, name) = self.parent(target)?;
        let (to_dir, to_name) = host_parent(to)?;
        move_between(&fd, &name, &to_dir, &to_name).map_err(|e| cross_device(e, target, to))?;
        fsync_dir(&fd)?;
        fsync_dir(&to_dir)
    }

    /// Moves the host path `from` (ours) to `target`, which must be free.
    pub fn move_in(&self, from: &Path, target: &TargetPath) -> io::Result<()> {
        let (fd, name) = self.parent(target)?;
        let (from_dir, from_name) = host_parent(from)?;
        move_between(&from_dir, &from_name, &fd, &name).map_err(|e| cross_device(e, target, from))?;
        fsync_dir(&fd)?;
        fsync_dir(&from_dir)
    }

    /// Copies the host file `from` (a staged file) to `target` with `mode` and `from`'s
    /// owner (a generation's files have their declared owners), through a temp file
    /// renamed into place.
    pub fn copy_in(&self, from: &Path, target: &TargetPath, mode: u32) -> io::Result<()> {
        let src = fs::File::open(from)?;
        let st = rustix::fs::fstat(&src)?;
        self.write_from(&mut &src, target, mode, Some(owner(&st)))
    }

    /// Writes `bytes` (a decrypted secret) to `target` with `mode` and the owner of the host
    /// file `like` (the staged ciphertext, which has the declared owner), through a temp
    /// file of mode 0600 renamed into place.
    pub fn write_owned_like(&self, like: &Path, bytes: &[u8], target: &TargetPath, mode: u32) -> io::Result<()> {
        let st = rustix::fs::stat(like)?;
        self.write_from(&mut &bytes[..], target, mode, Some(owner(&st)))
    }

    /// Writes `bytes` to `target` with `mode` (owned by the installer's user), through a
    /// temp file renamed into place.
    pub fn write_new(&self, target: &TargetPath, bytes: &[u8], mode: u32) -> io::Result<()> {
        self.write_from(&mut &bytes[..], target, mode, None)
    }

    fn write_from(
        &self,
        from: &mut dyn io::Read,
        target: &TargetPath,
        mode: u32,
        owned_by: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
    ) -> io::Result<()> {
        let (fd, name) = self.parent(target)?;
        let tmp = temp_name(&name, "tmp");
        let _ = rustix::fs::unlinkat(&fd, tmp.as_str(), AtFlags::empty());
        let out = rustix::fs::openat(
            &fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut out = fs::File::from(out);
        io::copy(from, &mut out)?;
        // The owner before the mode: a chown clears setuid and setgid bits.
        if let Some((uid, gid)) = owned_by {
            rustix::fs::fchown(&out, Some(uid), Some(gid))?;
        }
        rustix::fs::fchmod(&out, Mode::from_raw_mode(mode))?;
        out.sync_all()?;
        rustix::fs::renameat(&fd, tmp.as_str(), &fd, name.as_str())?;
        fsync_dir(&fd)
    }
}

fn cross_device(e: io::Error, target: &TargetPath, other: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("moving {target} <-> {}: {e}", other.display()))
}

/// Renames `from_dir/from` to `to_dir/to` (which must not exist). Across filesystems or
/// btrfs subvolumes (EXDEV) it copies to a temp name beside `to`, renames that into
/// place, then removes the source: a crash leaves the source intact.
fn move_between(from_dir: &OwnedFd, from: &str, to_dir: &OwnedFd, to: &str) -> io::Result<()> {
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::XDEV) => {
            let tmp = temp_name(to, "xdev");
            remove_at(to_dir, &tmp)?;
            copy_at(from_dir, from, to_dir, &tmp, 0)?;
            rustix::fs::renameat_with(to_dir, tmp.as_str(), to_dir, to, rustix::fs::RenameFlags::NOREPLACE)?;
            fsync_dir(to_dir)?;
            remove_at(from_dir, from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Copies the entry `name` of `src` (file, symlink or directory tree) to `dst/to`, keeping
/// what a rename would: owner, group, mode, access and modification times (to the
/// nanosecond) and extended attributes, of every entry. The times are read before the
/// contents, so reading does not move the access time that is kept.
fn copy_at(src: &OwnedFd, name: &str, dst: &OwnedFd, to: &str, depth: u32) -> io::Result<()> {
    if depth > 256 {
        return Err(io::Error::other("directory tree too deep to copy"));
    }
    let st = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            let r = rustix::fs::openat(src, name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
            let w = rustix::fs::openat(
                dst,
                to,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut w = fs::File::from(w);
            let r = fs::File::from(r);
            io::copy(&mut &r, &mut w)?;
            keep_metadata(&r, &w, &st, mode).map_err(|e| kept(e, name))?;
            w.sync_all()
        }
        FileType::Symlink => {
            let text = rustix::fs::readlinkat(src, name, Vec::new())?;
            rustix::fs::symlinkat(text.as_c_str(), dst, to)?;
            let (uid, gid) = owner(&st);
            rustix::fs::chownat(dst, to, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| kept(e.into(), name))?;
            // Through the directories' descriptors; the links themselves are not followed.
            let (from, into) =
                (format!("/proc/self/fd/{}/{name}", fd_num(src)), format!("/proc/self/fd/{}/{to}", fd_num(dst)));
            copy_xattrs(XattrFile::Link(&from), XattrFile::Link(&into)).map_err(|e| kept(e, name))?;
            rustix::fs::utimensat(dst, to, &times(&st), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| kept(e.into(), name))?;
            Ok(())
        }
        FileType::Directory => {
            rustix::fs::mkdirat(dst, to, Mode::from_raw_mode(0o700))?;
            let s = rustix::fs::openat(
                src,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let d = rustix::fs::openat(
                dst,
                to,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for e in rustix::fs::Dir::read_from(&s)? {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n == "." || n == ".." {
                    continue;
                }
                copy_at(&s, &n, &d, &n, depth + 1)?;
            }
            // Last, once its entries no longer change its times.
            keep_metadata(&s, &d, &st, mode).map_err(|e| kept(e, name))?;
            rustix::fs::fsync(&d)?;
            Ok(())
        }
        _ => {
            Err(io::Error::other(format!("{name} is a device, fifo or socket: it cannot be moved across filesystems")))
        }
    }
}

/// Gives the copy `to` of `from` the owner, group, `mode`, extended attributes and times of
/// `st` (the stat of `from` before it was read). The owner goes first, since a chown clears
/// setuid bits and file capabilities; the times go last.
fn keep_metadata(from: impl AsFd, to: impl AsFd, st: &rustix::fs::Stat, mode: Mode) -> io::Result<()> {
    let (uid, gid) = owner(st);
    rustix::fs::fchown(&to, Some(uid), Some(gid))?;
    rustix::fs::fchmod(&to, mode)?;
    copy_xattrs(XattrFile::Fd(from.as_fd()), XattrFile::Fd(to.as_fd()))?;
    rustix::fs::futimens(&to, &times(st))?;
    Ok(())
}

fn owner(st: &rustix::fs::Stat) -> (rustix::fs::Uid, rustix::fs::Gid) {
    (rustix::fs::Uid::from_raw(st.st_uid), rustix::fs::Gid::from_raw(st.st_gid))
}

fn times(st: &rustix::fs::Stat) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: st.st_atime, tv_nsec: st.st_atime_nsec as _ },
        last_modification: rustix::fs::Timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec as _ },
    }
}

fn kept(e: io::Error, name: &str) -> io::Error {
    io::Error::new(e.kind(), format!("keeping the owner, mode, times and extended attributes of {name}: {e}"))
}

/// A file whose extended attributes are copied: an open descriptor, or the path of a
/// symlink (which has no descriptor of its own for the f*xattr calls; never followed).
enum XattrFile<'a> {
    Fd(std::os::fd::BorrowedFd<'a>),
    Link(&'a str),
}

impl XattrFile<'_> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match (self, buf.is_empty()) {
            (XattrFile::Fd(fd), true) => rustix::fs::flistxattr_query(fd),
            (XattrFile::Fd(fd), false) => rustix::fs::flistxattr(fd, buf),
            (XattrFile::Link(p), true) => rustix::fs::llistxattr_query(*p),
            (XattrFile::Link(p), false) => rustix::fs::llistxattr(*p, buf),
        }
    }

    fn get(&self, name: &std::ffi::CStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match (self, buf.is_empty()) {
            (XattrFile::Fd(fd), true) => rustix::fs::fgetxattr_query(fd, name),
            (XattrFile::Fd(fd), false) => rustix::fs::fgetxattr(fd, name, buf),
            (XattrFile::Link(p), true) => rustix::fs::lgetxattr_query(*p, name),
            (XattrFile::Link(p), false) => rustix::fs::lgetxattr(*p, name, buf),
        }
    }

    fn set(&self, name: &std::ffi::CStr, value: &[u8]) -> rustix::io::Result<()> {
        let flags = rustix::fs::XattrFlags::empty();
        match self {
            XattrFile::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, flags),
            XattrFile::Link(p) => rustix::fs::lsetxattr(*p, name, value, flags),
        }
    }
}

/// Copies every extended attribute of `from` to `to`. A source filesystem without extended
/// attributes has none to copy; a destination that cannot keep them is an error, not a
/// silent loss.
fn copy_xattrs(from: XattrFile<'_>, to: XattrFile<'_>) -> io::Result<()> {
    let names = match read_sized(|buf| from.list(buf)) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let value = match read_sized(|buf| from.get(&name, buf)) {
            Ok(v) => v,
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODATA.raw_os_error()) => continue,
            Err(e) => return Err(e),
        };
        to.set(&name, &value).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("extended attribute {}: {e}", name.to_string_lossy()))
        })?;
    }
    Ok(())
}

/// Reads an extended attribute list or value: its size (`f` with an empty buffer), then the
/// bytes (again if it grew in between). The kernel bounds both at 64 KiB.
fn read_sized(f: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = f(&mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match f(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("extended attributes kept changing while being copied"))
}

/// Removes the entry `name` of `dir` (a directory tree too); nothing if it is missing.
fn remove_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let d = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let names: Vec<String> = rustix::fs::Dir::read_from(&d)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n != "." && n != "..")
            .collect();
        for n in names {
            remove_at(&d, &n)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// The name of the temp entry beside `name` (a file or link made there, then renamed over
/// `name`): fixed-length, so that it fits wherever `name` does (a name of 255 bytes has no
/// room for a prefix and a suffix), and the same every time for one name, so that what a
/// killed command left is found again.
pub fn temp_name(name: &str, kind: &str) -> String {
    format!(".op-dbus-{kind}-{}", &Digest::of(name.as_bytes()).hex()[..16])
}

fn host_parent(p: &Path) -> io::Result<(OwnedFd, String)> {
    let parent = p.parent().ok_or_else(|| io::Error::other(format!("{} has no parent", p.display())))?;
    let name =
        p.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other(format!("bad name {}", p.display())))?;
    let fd = rustix::fs::open(parent, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    Ok((fd, name.to_owned()))
}

fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

fn fd_num(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

use fsx::fsync_dir;

/// The staging backend in use for the staging directory `dir`.
pub fn backend(dir: &Path) -> &'static str {
    if subvol::is_btrfs(dir).unwrap_or(false) { "btrfs" } else { "directory" }
}

/// The link text of a staged path of a stage, as seen from inside the root.
pub fn link_text(stage: &str, path: &RelPath) -> String {
    format!("{STAGING_ABS}/{stage}/{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_links_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("usr/local")).unwrap();
        fs::create_dir_all(d.path().join("outside")).unwrap();
        // /usr/local/bin -> /outside: inside the root that is ROOT/outside, not the host's.
        std::os::unix::fs::symlink("/outside", root.join("usr/local/bin")).unwrap();
        let h = Host::open(&root).unwrap();
        h.ensure_dir("outside").unwrap();
        let t = TargetPath::parse("/usr/local/bin/tool").unwrap();
        h.replace_symlink(&t, "/var/lib/op-dbus/staging/s/bin/tool").unwrap();
        assert!(fs::symlink_metadata(root.join("outside/tool")).is_ok());
        assert!(fs::symlink_metadata(d.path().join("outside/tool")).is_err());
        assert_eq!(h.state(&t).unwrap(), TargetState::Symlink("/var/lib/op-dbus/staging/s/bin/tool".into()));
        let staging = h.staging().unwrap();
        assert!(staging.starts_with(fs::canonicalize(&root).unwrap()));
    }

    /// openat2 with RESOLVE_IN_ROOT refuses (EAGAIN) a lookup that crossed a `..` while
    /// any rename or mount happened anywhere on the system; a busy host (package managers,
    /// builds, other deploys) must not make the installer fail. The operator's /var/lib here
    /// climbs with `..`, as `/usr/local` does in the hostile test
    /// `targets_resolve_inside_the_root_through_operator_symlinks`, which failed now and then
    /// while targets were still opened this way.
    #[test]
    fn lookups_through_dotdot_links_survive_renames_elsewhere() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("data/lib/op-dbus/staging")).unwrap();
        fs::create_dir_all(root.join("var")).unwrap();
        std::os::unix::fs::symlink("../../../../../data/lib", root.join("var/lib")).unwrap();
        let h = Host::open(&root).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renamer = {
            let (stop, dir) = (stop.clone(), d.path().join("busy"));
            std::thread::spawn(move || {
                fs::create_dir_all(&dir).unwrap();
                let (a, b) = (dir.join("a"), dir.join("b"));
                fs::write(&a, b"x").unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    fs::rename(&a, &b).unwrap();
                    fs::rename(&b, &a).unwrap();
                }
            })
        };
        let want = fs::canonicalize(root.join("data/lib/op-dbus/staging")).unwrap();
        while !d.path().join("busy/b").exists() && !d.path().join("busy/a").exists() {
            std::thread::yield_now();
        }
        let results: Vec<_> = (0..20_000).map(|_| h.resolve(STAGING)).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        renamer.join().unwrap();
        for r in results {
            assert_eq!(r.unwrap(), want);
        }
    }
}
