//! Reading small files with limits, and creating new files atomically without clobbering.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;

use crate::{KeyError, Result};

/// The largest key or signature file we read.
pub const MAX_KEY_FILE: u64 = 64 * 1024;

/// Reads the regular file `path` (following symlinks), at most `limit` bytes.
///
/// `check` sees the metadata of the opened file, so what it checks is what is read.
pub(crate) fn read_bounded(
    path: &Path,
    limit: u64,
    check: impl FnOnce(&Metadata) -> Result<()>,
) -> Result<Zeroizing<Vec<u8>>> {
    // Looked at before opening: opening a FIFO would block.
    let meta = fs::metadata(path).map_err(|e| KeyError::io("read", path, e))?;
    regular(path, &meta)?;
    // Non-blocking: should a FIFO take the file's place after the look, opening it does
    // not wait for a writer, and the check of the opened file below refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(|e| KeyError::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| KeyError::io("stat", path, e))?;
    regular(path, &meta)?;
    check(&meta)?;
    let too_large = || KeyError::TooLarge { path: path.to_owned(), limit };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.take(limit + 1).read_to_end(&mut buf).map_err(|e| KeyError::io("read", path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

fn regular(path: &Path, meta: &Metadata) -> Result<()> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "named pipe"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    };
    Err(KeyError::NotRegularFile { path: path.to_owned(), kind })
}

/// Creates every `(path, contents, mode)` or none of them, refusing to replace anything.
///
/// Each file is written to a temporary file beside it (created with `O_EXCL`), fsynced, then
/// hard-linked to its name, which fails atomically if the name exists (a rename would
/// replace it); then the directory is fsynced. All paths must be in one directory.
pub(crate) fn create_new_all(files: &[(&Path, &[u8], u32)]) -> Result<()> {
    for (path, _, _) in files {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.to_path_buf() });
        }
    }
    let temps = files
        .iter()
        .map(|(path, contents, mode)| TempFile::write(path, contents, *mode))
        .collect::<Result<Vec<_>>>()?;
    let mut created: Vec<&Path> = Vec::new();
    for (temp, (path, _, _)) in temps.iter().zip(files) {
        if let Err(e) = temp.link_to(path) {
            for p in created {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        created.push(path);
    }
    if let Some((path, _, _)) = files.first() {
        let dir = parent(path);
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| KeyError::io("sync", dir, e))?;
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary file, removed when dropped.
#[derive(Debug)]
struct TempFile(PathBuf);

impl TempFile {
    fn write(beside: &Path, contents: &[u8], mode: u32) -> Result<Self> {
        let dir = parent(beside);
        let name = beside
            .file_name()
            .ok_or_else(|| KeyError::io("create", beside, std::io::Error::other("the path has no file name")))?;
        let nonce = getrandom::u64().map_err(KeyError::Random)?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{nonce:016x}.tmp"));
        let path = dir.join(tmp_name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| KeyError::io("create a temporary file in", dir, e))?;
        let temp = TempFile(path);
        // The umask may have taken bits away from `mode`; set exactly what was asked.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|()| file.write_all(contents))
            .and_then(|()| file.sync_all())
            .map_err(|e| KeyError::io("write", &temp.0, e))?;
        Ok(temp)
    }

    fn link_to(&self, path: &Path) -> Result<()> {
        fs::hard_link(&self.0, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_owned() },
            _ => KeyError::io("create", path, e),
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_new_all_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&b, "old").unwrap();
        let err = create_new_all(&[(&a, b"new a", 0o600), (&b, b"new b", 0o644)]).unwrap_err();
        assert!(matches!(err, KeyError::Exists { ref path } if path == &b), "{err}");
        assert_eq!(fs::read_to_string(&b).unwrap(), "old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["b"], "no temporary file or partial output is left behind");

        create_new_all(&[(&a, b"new a", 0o640)]).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"new a");
        assert_eq!(fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o640);
    }

    #[test]
    fn read_bounded_limits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, vec![b'x'; 11]).unwrap();
        assert_eq!(read_bounded(&f, 11, |_| Ok(())).unwrap().len(), 11);
        assert!(matches!(read_bounded(&f, 10, |_| Ok(())), Err(KeyError::TooLarge { .. })));
        let err = read_bounded(dir.path(), 10, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("is a directory, not a regular file"), "{err}");
        let err = read_bounded(&dir.path().join("missing"), 10, |_| Ok(())).unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }), "{err}");
    }
}
