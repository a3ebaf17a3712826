//! Reading small files with limits, and creating new files atomically without clobbering.

use std::fs::{self, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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
        .map(|(path, contents, mode)| {
            fsx::TempFile::write(path, contents, *mode).map_err(|e| KeyError::io("write", path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut created: Vec<&Path> = Vec::new();
    for (temp, (path, _, _)) in temps.into_iter().zip(files) {
        if let Err(e) = temp.link_new(path) {
            for p in created {
                let _ = fs::remove_file(p);
            }
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_path_buf() },
                _ => KeyError::io("create", path, e),
            });
        }
        created.push(path);
    }
    if let Some((path, _, _)) = files.first() {
        let dir = fsx::parent_dir(path);
        fsx::sync_dir(dir).map_err(|e| KeyError::io("sync", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
