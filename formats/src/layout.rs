//! An OCI image-layout directory: the builder's store, the installer's store, an exported
//! directory.
//!
//! ```text
//! STORE/
//!   oci-layout            {"imageLayoutVersion":"1.0.0"}
//!   index.json            tags: org.opencontainers.image.ref.name = NAME:VERSION,
//!                         and NAME:sha256-<hex>.sig for signatures
//!   blobs/sha256/<hex>    content-addressed; shared by every image that uses it
//!   .tmp/                 blobs being written (renamed into blobs/ once their digest is known)
//!   .lock                 held while index.json is rewritten
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, HashingWriter};
use crate::oci::{Descriptor, EnvelopeError, ImageIndex};

const OCI_LAYOUT: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}";

/// A failure of the layout store, naming the store and the blob or file.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not an OCI image layout (no oci-layout file); create it with `op-dbus-image` or pass another --store"
    )]
    NotALayout { path: PathBuf },
    #[error("{store}: blob {digest} is missing")]
    MissingBlob { store: PathBuf, digest: Digest },
    #[error("{store}: blob {expected} is corrupt: its content hashes to {actual}")]
    DigestMismatch { store: PathBuf, expected: Digest, actual: Digest },
    #[error("{store}: blob {digest} is larger than the {max} bytes allowed here")]
    TooLarge { store: PathBuf, digest: Digest, max: u64 },
    #[error("{store}: {source}")]
    Envelope { store: PathBuf, source: EnvelopeError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io { path: path.to_owned(), source }
}

/// An OCI image-layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Opens an existing layout.
    pub fn open(root: &Path) -> Result<Layout, LayoutError> {
        if !root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout { path: root.to_owned() });
        }
        Ok(Layout { root: root.to_owned() })
    }

    /// Opens a layout, creating an empty one when `root` does not exist or is empty.
    pub fn open_or_create(root: &Path) -> Result<Layout, LayoutError> {
        if root.join("oci-layout").is_file() {
            return Self::open(root);
        }
        fs::create_dir_all(root.join("blobs/sha256")).map_err(io_err(root))?;
        let empty = fs::read_dir(root).map_err(io_err(root))?.all(|e| e.is_ok_and(|e| e.file_name() == "blobs"));
        if !empty {
            return Err(LayoutError::NotALayout { path: root.to_owned() });
        }
        let layout = Layout { root: root.to_owned() };
        layout.write_index(&ImageIndex::default())?;
        write_atomic(&root.join("oci-layout"), OCI_LAYOUT)?;
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading; the caller hashes what it reads if it must trust it.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, LayoutError> {
        File::open(self.blob_path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::MissingBlob { store: self.root.clone(), digest: *digest },
            _ => LayoutError::Io { path: self.blob_path(digest), source: e },
        })
    }

    /// Reads a small blob whole, checking its size bound and its digest.
    pub fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, LayoutError> {
        let f = self.open_blob(digest)?;
        let mut buf = Vec::new();
        f.take(max + 1).read_to_end(&mut buf).map_err(io_err(&self.blob_path(digest)))?;
        if buf.len() as u64 > max {
            return Err(LayoutError::TooLarge { store: self.root.clone(), digest: *digest, max });
        }
        let actual = Digest::of(&buf);
        if actual != *digest {
            return Err(LayoutError::DigestMismatch { store: self.root.clone(), expected: *digest, actual });
        }
        Ok(buf)
    }

    /// Stores `bytes`, returning their digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, LayoutError> {
        let digest = Digest::of(bytes);
        if !self.has_blob(&digest) {
            // Hashed above: written as it is, not through a hashing BlobWriter.
            let mut file = self.temp_blob()?;
            file.write_all(bytes).map_err(io_err(&self.root))?;
            self.persist_blob(file, &digest)?;
        }
        Ok(digest)
    }

    /// A writer for a blob of not yet known digest, hashed as it is written.
    pub fn blob_writer(&self) -> Result<BlobWriter, LayoutError> {
        let file = self.temp_blob()?;
        Ok(BlobWriter { layout: self.clone(), inner: HashingWriter::new(io::BufWriter::with_capacity(1 << 20, file)) })
    }

    /// A new file in `.tmp`, for a blob being written.
    fn temp_blob(&self) -> Result<tempfile::NamedTempFile, LayoutError> {
        let tmp_dir = self.root.join(".tmp");
        fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        let file = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        file.as_file().set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(&tmp_dir))?;
        Ok(file)
    }

    /// Syncs `file`, a blob of digest `digest`, and moves it to `blobs/sha256/<hex>`.
    fn persist_blob(&self, file: tempfile::NamedTempFile, digest: &Digest) -> Result<(), LayoutError> {
        let tmp_dir = self.root.join(".tmp");
        let file = fsx::TempFile::from_written(file).map_err(io_err(&tmp_dir))?;
        let dest = self.root.join("blobs/sha256").join(digest.hex());
        file.replace(&dest).map_err(io_err(&dest))
    }

    /// Reads `index.json`.
    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.root.join("index.json");
        let f = File::open(&path).map_err(io_err(&path))?;
        let mut buf = Vec::new();
        f.take(crate::oci::MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf).map_err(io_err(&path))?;
        ImageIndex::from_bytes(&buf).map_err(|source| LayoutError::Envelope { store: self.root.clone(), source })
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        write_atomic(&self.root.join("index.json"), &index.to_bytes())
    }

    /// Changes `index.json` under the store's lock; `f`'s result is returned.
    pub fn update_index<T>(&self, f: impl FnOnce(&mut ImageIndex) -> T) -> Result<T, LayoutError> {
        let lock_path = self.root.join(".lock");
        let lock =
            File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let mut index = self.index()?;
        let out = f(&mut index);
        self.write_index(&index)?;
        Ok(out)
    }

    /// The descriptor tagged `name`.
    pub fn resolve(&self, name: &str) -> Result<Option<Descriptor>, LayoutError> {
        Ok(self.index()?.find(name).cloned())
    }
}

/// A blob being written; [`BlobWriter::finish`] names it by its digest.
#[derive(Debug)]
pub struct BlobWriter {
    layout: Layout,
    inner: HashingWriter<io::BufWriter<tempfile::NamedTempFile>>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    /// Syncs the blob, moves it to `blobs/sha256/<hex>` and returns its digest and size.
    pub fn finish(self) -> Result<(Digest, u64), LayoutError> {
        self.persist(None)
    }

    /// Like [`BlobWriter::finish`], but refuses (and discards) a blob whose digest is not `expected`.
    pub fn finish_expecting(self, expected: &Digest) -> Result<u64, LayoutError> {
        self.persist(Some(expected)).map(|(_, size)| size)
    }

    fn persist(self, expected: Option<&Digest>) -> Result<(Digest, u64), LayoutError> {
        let sealed = self.seal()?;
        if let Some(expected) = expected.filter(|e| **e != sealed.digest) {
            return Err(LayoutError::DigestMismatch {
                store: sealed.layout.root.clone(),
                expected: *expected,
                actual: sealed.digest,
            });
        }
        let (digest, size) = (sealed.digest, sealed.size);
        sealed.persist()?;
        Ok((digest, size))
    }

    /// Ends the blob: its digest and size are known, it is not in the store yet (see
    /// [`SealedBlob::persist`]). Dropped instead, it is discarded.
    pub fn seal(self) -> Result<SealedBlob, LayoutError> {
        let (digest, size, buf) = self.inner.finish();
        let file = buf
            .into_inner()
            .map_err(|e| LayoutError::Io { path: self.layout.root.join(".tmp"), source: e.into_error() })?;
        Ok(SealedBlob { layout: self.layout, file, digest, size })
    }
}

/// A blob written whole and hashed, not yet in the store.
#[derive(Debug)]
pub struct SealedBlob {
    layout: Layout,
    file: tempfile::NamedTempFile,
    pub digest: Digest,
    pub size: u64,
}

impl SealedBlob {
    /// Syncs the blob and moves it to `blobs/sha256/<hex>`.
    pub fn persist(self) -> Result<(), LayoutError> {
        self.layout.persist_blob(self.file, &self.digest)
    }
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the
/// directory (see [`fsx::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    fsx::write_atomic(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::MANIFEST_MEDIA_TYPE;

    #[test]
    fn blobs_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let l = Layout::open_or_create(&store).unwrap();
        let d = l.write_blob(b"hello").unwrap();
        assert_eq!(l.read_blob(&d, 100).unwrap(), b"hello");
        assert!(matches!(l.read_blob(&d, 2), Err(LayoutError::TooLarge { .. })));
        let mut w = l.blob_writer().unwrap();
        w.write_all(b"hello").unwrap();
        assert!(matches!(w.finish_expecting(&Digest::of(b"other")), Err(LayoutError::DigestMismatch { .. })));
        l.update_index(|i| i.set("a:1.0.0", Descriptor::of(MANIFEST_MEDIA_TYPE, b"hello"))).unwrap();
        let again = Layout::open_or_create(&store).unwrap();
        assert_eq!(again.resolve("a:1.0.0").unwrap().unwrap().digest, d);
        fs::write(l.blob_path(&d), b"tampered").unwrap();
        assert!(matches!(l.read_blob(&d, 100), Err(LayoutError::DigestMismatch { .. })));
        assert!(matches!(Layout::open(dir.path()), Err(LayoutError::NotALayout { .. })));
        fs::write(dir.path().join("junk"), b"").unwrap();
        assert!(matches!(Layout::open_or_create(dir.path()), Err(LayoutError::NotALayout { .. })));
    }
}
