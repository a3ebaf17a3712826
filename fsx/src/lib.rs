//! The one directory-handle layer of the workspace: opening beneath a root one component
//! at a time (or inside it, like a chroot, with openat2), writing a file atomically,
//! syncing a directory and replacing a link atomically.
//!
//! Every durable change follows one recipe (composefs `replace_symlinkat`, bootc): write a
//! temporary entry beside the name, fsync it, rename (or link) it over the name, fsync the
//! directory. Paths beneath a root are never joined as strings and resolved by the kernel
//! from `/`: each component is opened from the directory handle of the one before.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let root = fsx::open_root(std::path::Path::new("/srv/tree"))?;
//! let etc = fsx::open_beneath(&root, ["etc", "op-dbus"]).map_err(std::io::Error::from)?;
//! fsx::replace_symlink_at(&etc, "current", "generations/7", ".current.tmp")?;
//! fsx::write_atomic(std::path::Path::new("/srv/tree/state.json"), b"{}")?;
//! # Ok(())
//! # }
//! ```

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

pub mod share;

/// Opens a directory for reading its entries, never through a symlink.
pub const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Opens a root directory given by the caller (symlinks in its own path are the caller's).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Why [`open_beneath`] stopped; `at` is the path beneath the root opened so far,
/// including the component that failed.
#[derive(Debug)]
pub enum BeneathError {
    /// A component does not exist.
    Missing { at: String },
    /// A component is a symlink or not a directory: nothing is resolved through it.
    NotADirectory { at: String },
    /// Any other failure of the system call.
    Io { at: String, source: io::Error },
}

impl fmt::Display for BeneathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BeneathError::Missing { at } => write!(f, "{at} is not present"),
            BeneathError::NotADirectory { at } => {
                write!(f, "{at} is not a directory (a symlink or a file): nothing is resolved through it")
            }
            BeneathError::Io { at, source } => write!(f, "opening {at}: {source}"),
        }
    }
}

impl std::error::Error for BeneathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BeneathError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<BeneathError> for io::Error {
    fn from(e: BeneathError) -> io::Error {
        let kind = match &e {
            BeneathError::Missing { .. } => io::ErrorKind::NotFound,
            BeneathError::NotADirectory { .. } => io::ErrorKind::NotADirectory,
            BeneathError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Opens the directory reached from `root` through `components`, one at a time with
/// `O_NOFOLLOW`: whatever was created beneath `root` before, nothing outside it is reached.
/// No components opens `root` itself (a new handle).
pub fn open_beneath<'a>(
    root: impl AsFd,
    components: impl IntoIterator<Item = &'a str>,
) -> Result<OwnedFd, BeneathError> {
    let root = root.as_fd();
    let mut fd = root.try_clone_to_owned().map_err(|source| BeneathError::Io { at: ".".into(), source })?;
    let mut at = String::new();
    for c in components {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(c);
        fd = match rustix::fs::openat(&fd, c, DIR_FLAGS, Mode::empty()) {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => return Err(BeneathError::Missing { at }),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(BeneathError::NotADirectory { at });
            }
            Err(e) => return Err(BeneathError::Io { at, source: e.into() }),
        };
    }
    Ok(fd)
}

/// Opens `rel` inside the root `root` as if the root were `/` (openat2 `RESOLVE_IN_ROOT`,
/// no magic links): absolute symlinks and `..` stay inside it. `""` is the root itself.
///
/// With `RESOLVE_IN_ROOT` the kernel gives up (`EAGAIN`) on a lookup that crossed a `..`
/// while a rename or a mount happened anywhere on the system, and asks the caller to try
/// again; it is tried again up to [`IN_ROOT_TRIES`] times (each try takes microseconds, and
/// a rename elsewhere rarely hits the same one twice).
pub fn open_in_root(root: impl AsFd, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 1;
    loop {
        match rustix::fs::openat2(&root, rel, flags | OFlags::CLOEXEC, Mode::empty(), how) {
            Err(rustix::io::Errno::AGAIN) if tries < IN_ROOT_TRIES => tries += 1,
            other => return Ok(other?),
        }
    }
}

/// How often [`open_in_root`] tries a lookup the kernel could not finish for a race.
pub const IN_ROOT_TRIES: usize = 1000;

/// The names in a directory, sorted, without `.` and `..`.
pub fn list_dir(dir: impl AsFd) -> io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name();
        if n != c"." && n != c".." {
            names.push(n.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Removes the directory `name` in `parent` and everything in it, without following links;
/// at most `max_depth` directories deep.
pub fn remove_tree_at(parent: BorrowedFd<'_>, name: &CStr, max_depth: usize) -> io::Result<()> {
    if max_depth == 0 {
        return Err(io::Error::other("directory nesting deeper than any stage path"));
    }
    let fd = rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty())?;
    for child in list_dir(&fd)? {
        let st = rustix::fs::statat(&fd, &child, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            remove_tree_at(fd.as_fd(), &child, max_depth - 1)?;
        } else {
            rustix::fs::unlinkat(&fd, &child, AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

/// Syncs the directory `fd` (its entries: names made, renamed or removed). An `O_PATH`
/// handle cannot be fsynced: the directory itself is opened for it.
pub fn fsync_dir(fd: impl AsFd) -> io::Result<()> {
    let d = rustix::fs::openat(fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::fs::fsync(&d)?;
    Ok(())
}

/// Syncs the directory at `path`; the error names it.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("syncing {}: {e}", path.display())))
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A file written beside its final name, fsynced, not yet in place; removed if dropped.
#[derive(Debug)]
pub struct TempFile {
    file: tempfile::NamedTempFile,
}

impl TempFile {
    /// Writes `contents` with exactly `mode` (whatever the umask) to a new temporary file
    /// (`O_EXCL`) in the directory of `beside`, and fsyncs it.
    pub fn write(beside: &Path, contents: &[u8], mode: u32) -> io::Result<TempFile> {
        let dir = parent_dir(beside);
        let mut file = tempfile::Builder::new()
            .permissions(fs::Permissions::from_mode(mode))
            .tempfile_in(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating a temporary file in {}: {e}", dir.display())))?;
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("writing {}: {e}", beside.display()));
        file.as_file().set_permissions(fs::Permissions::from_mode(mode)).map_err(with_path)?;
        file.write_all(contents).map_err(with_path)?;
        file.as_file().sync_all().map_err(with_path)?;
        Ok(TempFile { file })
    }

    /// Wraps a temporary file the caller has written: it is fsynced here.
    pub fn from_written(file: tempfile::NamedTempFile) -> io::Result<TempFile> {
        file.as_file().sync_all()?;
        Ok(TempFile { file })
    }

    /// Renames the file over `path` (replacing what is there) and syncs the directory.
    pub fn replace(self, path: &Path) -> io::Result<()> {
        self.file.persist(path).map_err(|e| {
            io::Error::new(e.error.kind(), format!("moving into place {}: {}", path.display(), e.error))
        })?;
        sync_dir(parent_dir(path))
    }

    /// Links the file to `path`, which must not exist (`AlreadyExists` if it does; nothing
    /// is replaced). The directory is not synced: see [`sync_dir`].
    pub fn link_new(self, path: &Path) -> io::Result<()> {
        self.file.persist_noclobber(path).map(drop).map_err(|e| match e.error.kind() {
            io::ErrorKind::AlreadyExists => e.error,
            kind => io::Error::new(kind, format!("creating {}: {}", path.display(), e.error)),
        })
    }
}

/// Writes `bytes` to `path` atomically (mode 0644): a temp file beside it, fsync, rename,
/// fsync the directory. A reader sees the old contents or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the file mode `mode`.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    TempFile::write(path, bytes, mode)?.replace(path)
}

/// Makes `name` in `dir` a symlink with `text`, atomically replacing whatever link or
/// file is there: a link made at the temp name `tmp` is renamed over it, then the directory
/// is synced. A `tmp` left by a killed run is removed first; nothing else is done when the
/// link is already right.
pub fn replace_symlink_at(dir: impl AsFd, name: &str, text: &str, tmp: &str) -> io::Result<()> {
    let dir = dir.as_fd();
    match rustix::fs::unlinkat(dir, tmp, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    if rustix::fs::readlinkat(dir, name, Vec::new()).is_ok_and(|t| t.as_bytes() == text.as_bytes()) {
        return Ok(());
    }
    rustix::fs::symlinkat(text, dir, tmp)?;
    rustix::fs::renameat(dir, tmp, dir, name)?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn open_beneath_refuses_links_and_names_the_place() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        symlink("/", d.path().join("a/up")).unwrap();
        fs::write(d.path().join("a/f"), b"").unwrap();
        let root = open_root(d.path()).unwrap();
        open_beneath(&root, ["a", "b"]).unwrap();
        open_beneath(&root, []).unwrap();
        let e = open_beneath(&root, ["a", "up", "etc"]).unwrap_err();
        assert!(matches!(&e, BeneathError::NotADirectory { at } if at == "a/up"), "{e}");
        let e = open_beneath(&root, ["a", "f"]).unwrap_err();
        assert!(matches!(&e, BeneathError::NotADirectory { at } if at == "a/f"), "{e}");
        let e = open_beneath(&root, ["a", "missing", "x"]).unwrap_err();
        assert!(matches!(&e, BeneathError::Missing { at } if at == "a/missing"), "{e}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn open_in_root_keeps_absolute_links_inside() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("root/inside")).unwrap();
        fs::write(d.path().join("root/inside/f"), b"in").unwrap();
        symlink("/inside", d.path().join("root/abs")).unwrap();
        let root = open_root(&d.path().join("root")).unwrap();
        let fd = open_in_root(&root, "abs/f", OFlags::RDONLY).unwrap();
        assert_eq!(io::read_to_string(File::from(fd)).unwrap(), "in");
        open_in_root(&root, "", OFlags::PATH | OFlags::DIRECTORY).unwrap();
    }

    #[test]
    fn write_atomic_replaces_whole_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        write_atomic_mode(&p, b"three", 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
        let e = write_atomic(&d.path().join("missing/x"), b"").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn link_new_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        fs::write(&p, b"old").unwrap();
        let e = TempFile::write(&p, b"new", 0o600).unwrap().link_new(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["key"], "the temporary file is removed");
    }

    #[test]
    fn replace_symlink_at_swaps_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let dir = open_root(d.path()).unwrap();
        replace_symlink_at(&dir, "cur", "gen/1", ".cur.tmp").unwrap();
        replace_symlink_at(&dir, "cur", "gen/2", ".cur.tmp").unwrap();
        symlink("stale", d.path().join(".cur.tmp")).unwrap();
        replace_symlink_at(&dir, "cur", "gen/2", ".cur.tmp").unwrap();
        assert_eq!(fs::read_link(d.path().join("cur")).unwrap(), Path::new("gen/2"));
        fs::write(d.path().join("file"), b"").unwrap();
        replace_symlink_at(&dir, "file", "gen/3", ".file.tmp").unwrap();
        assert_eq!(fs::read_link(d.path().join("file")).unwrap(), Path::new("gen/3"));
        assert!(fs::symlink_metadata(d.path().join(".cur.tmp")).is_err());
    }

    #[test]
    fn remove_tree_at_removes_without_following() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("t/a/b")).unwrap();
        fs::create_dir_all(d.path().join("keep")).unwrap();
        fs::write(d.path().join("keep/f"), b"").unwrap();
        symlink(d.path().join("keep"), d.path().join("t/a/link")).unwrap();
        let root = open_root(d.path()).unwrap();
        assert!(remove_tree_at(root.as_fd(), c"t", 2).is_err(), "deeper than allowed");
        remove_tree_at(root.as_fd(), c"t", 8).unwrap();
        assert!(!d.path().join("t").exists());
        assert!(d.path().join("keep/f").exists());
        fsync_dir(&root).unwrap();
        sync_dir(d.path()).unwrap();
    }
}

/// A reader of a file descriptor (a pipe, a socket, a file) that gives up when nothing
/// arrives for `timeout`: each read first waits (poll) at most that long for data, and
/// fails with [`io::ErrorKind::TimedOut`] when none came. It counts the bytes read, so
/// that a caller can show progress, and says whether it gave up ([`StallProgress::stalled`]),
/// so that a caller can tell a stall from whatever error a parser makes of it.
#[derive(Debug)]
pub struct StallReader<R> {
    inner: R,
    timeout: std::time::Duration,
    progress: std::sync::Arc<StallProgress>,
}

/// What a [`StallReader`] shares with its owner while a parser holds the reader.
#[derive(Debug, Default)]
pub struct StallProgress {
    /// Bytes read so far.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Set when a read gave up.
    pub stalled: std::sync::atomic::AtomicBool,
}

impl<R: io::Read + AsFd> StallReader<R> {
    pub fn new(inner: R, timeout: std::time::Duration) -> StallReader<R> {
        StallReader { inner, timeout, progress: Default::default() }
    }

    /// The byte count and stall flag, readable while the reader is in use elsewhere.
    pub fn progress(&self) -> std::sync::Arc<StallProgress> {
        self.progress.clone()
    }
}

impl<R: io::Read + AsFd> io::Read for StallReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let t = Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
            let mut fds = [PollFd::new(&self.inner, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&t)) {
                Ok(0) if left.is_zero() || std::time::Instant::now() >= deadline => {
                    self.progress.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing arrived for {} s", self.timeout.as_secs()),
                    ));
                }
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let n = self.inner.read(buf)?;
        self.progress.bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, Instant};

    #[test]
    fn a_silent_pipe_times_out_and_a_talking_one_does_not() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut w = File::from(w);
        w.write_all(b"hello").unwrap();
        let mut s = StallReader::new(File::from(r), Duration::from_millis(300));
        let p = s.progress();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 5);
        let t = Instant::now();
        let e = s.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3));
        assert!(p.stalled.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(p.bytes.load(std::sync::atomic::Ordering::Relaxed), 5);
        drop(w);
        assert_eq!(s.read(&mut buf).unwrap(), 0, "a closed pipe is the end, not a stall");
    }
}
