//! `oci-archive`: one tar holding an OCI layout, for air-gapped hosts.
//!
//! Entry order lets a reader that sees the archive once, as a stream, check signatures
//! before any payload byte arrives:
//!
//! ```text
//! oci-layout
//! index.json                 the exported tags: NAME:VERSION and NAME:sha256-<hex>.sig
//! blobs/  blobs/sha256/
//! blobs/sha256/<sig manifest>, its simple-signing payloads, its config
//! blobs/sha256/<image manifests>
//! blobs/sha256/<configs>     the embedded stage manifests, with every file's sha256
//! blobs/sha256/<layers>      payloads, largest part last
//! ```
//!
//! A thin export (`--since`) leaves out payload layers the receiver already has; manifests
//! and configs are always included.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};
use crate::oci::{Descriptor, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES};

/// Fixed modification time of archive entries (the archive is reproducible).
const ARCHIVE_MTIME: u64 = 0;

/// What a tar entry of an oci-archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchivePath {
    OciLayout,
    Index,
    Dir,
    Blob(Digest),
}

/// Why an oci-archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("reading the archive: {0}")]
    Io(#[from] io::Error),
    #[error("archive entry {0:?} is not part of an OCI layout (expected oci-layout, index.json or blobs/sha256/<hex>)")]
    UnexpectedEntry(String),
    #[error("archive entry {0:?} is not a regular file")]
    NotAFile(String),
    #[error("archive entry {0:?} appears twice")]
    Duplicate(String),
    #[error("archive entry {name:?} is {size} bytes, more than the {max} allowed")]
    TooLarge { name: String, size: u64, max: u64 },
    #[error("the archive has no {0}")]
    Missing(&'static str),
    #[error("the archive's oci-layout is not {{\"imageLayoutVersion\":\"1.0.0\"}}")]
    BadLayout,
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Envelope(#[from] crate::oci::EnvelopeError),
}

/// Classifies a tar entry name strictly.
pub fn classify(name: &str) -> Option<ArchivePath> {
    let name = name.strip_prefix("./").unwrap_or(name);
    match name {
        "oci-layout" => Some(ArchivePath::OciLayout),
        "index.json" => Some(ArchivePath::Index),
        "blobs" | "blobs/" | "blobs/sha256" | "blobs/sha256/" | "." | "./" => Some(ArchivePath::Dir),
        _ => name.strip_prefix("blobs/sha256/").and_then(|h| Digest::from_hex(h).ok()).map(ArchivePath::Blob),
    }
}

/// The tags and blobs of an export, in archive order.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub index: ImageIndex,
    pub blobs: Vec<Descriptor>,
    /// Payload layers left out because the receiver has them (`--since`).
    pub omitted: Vec<Descriptor>,
}

impl ExportPlan {
    /// Plans the export of `tags` (image tags, `NAME:VERSION`) from `layout`; their signature
    /// tags come along. Payload layers in `exclude` are left out.
    pub fn new(layout: &Layout, tags: &[String], exclude: &BTreeSet<Digest>) -> Result<ExportPlan, ArchiveError> {
        let store = layout.index()?;
        let mut index = ImageIndex::default();
        let (mut sigs, mut manifests, mut configs, mut layers, mut omitted) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for tag in tags {
            let desc = store.find(tag).ok_or_else(|| LayoutError::Io {
                path: layout.root().to_owned(),
                source: io::Error::new(io::ErrorKind::NotFound, format!("no image tagged {tag}")),
            })?;
            let manifest = ImageManifest::stage_from_bytes(&layout.read_blob(&desc.digest, MAX_MANIFEST_BYTES)?)?;
            index.set(tag, desc.clone());
            let name = tag.split_once(':').map_or(tag.as_str(), |(n, _)| n);
            let sig_tag = format!("{name}:{}", desc.digest.signature_tag());
            if let Some(sd) = store.find(&sig_tag) {
                let sm = ImageManifest::from_bytes(&layout.read_blob(&sd.digest, MAX_MANIFEST_BYTES)?)?;
                index.set(&sig_tag, sd.clone());
                sigs.push(strip(sd));
                sigs.extend(sm.layers.iter().cloned());
                sigs.push(sm.config.clone());
            }
            manifests.push(strip(desc));
            configs.push(manifest.config.clone());
            for l in manifest.layers {
                if exclude.contains(&l.digest) { omitted.push(l) } else { layers.push(l) }
            }
        }
        let mut seen = BTreeSet::new();
        let blobs =
            [sigs, manifests, configs, layers].into_iter().flatten().filter(|d| seen.insert(d.digest)).collect();
        Ok(ExportPlan { index, blobs, omitted })
    }

    /// Writes the archive to `out`, calling `progress` with the bytes of each blob written.
    pub fn write<W: Write>(&self, layout: &Layout, out: W, mut progress: impl FnMut(u64)) -> Result<W, ArchiveError> {
        let mut tar = tar::Builder::new(out);
        append(&mut tar, "oci-layout", OCI_LAYOUT)?;
        append(&mut tar, "index.json", &self.index.to_bytes())?;
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, dir, io::empty())?;
        }
        for d in &self.blobs {
            let f = layout.open_blob(&d.digest)?;
            let mut h = header(tar::EntryType::Regular, 0o644, d.size);
            let mut r = ProgressReader { inner: f.take(d.size), progress: &mut progress };
            tar.append_data(&mut h, format!("blobs/sha256/{}", d.digest.hex()), &mut r)?;
        }
        Ok(tar.into_inner()?)
    }
}

fn strip(d: &Descriptor) -> Descriptor {
    let mut d = d.clone();
    d.annotations.remove(crate::oci::ANNOTATION_REF_NAME);
    d
}

struct ProgressReader<'a, R, F> {
    inner: R,
    progress: &'a mut F,
}

impl<R: Read, F: FnMut(u64)> Read for ProgressReader<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(ARCHIVE_MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
}

/// Reads an oci-archive from `reader` in one pass into `layout`: every entry name is
/// checked, every blob hashed while it is written and refused on mismatch. Returns the
/// archive's index (its tags are not added to `layout`: the caller decides).
pub fn import<R: Read>(reader: R, layout: &Layout) -> Result<ImageIndex, ArchiveError> {
    import_with(reader, layout, |_, _, _| Ok(None))
}

/// Where a caller of [`import_with`] wants a blob's bytes to go as well, as they are read
/// and written to the layout (a layer unpacked while it is stored: one read of it). A
/// write error of the tee stops the copy to it, not the import; the blob's digest is
/// checked as for any blob ([`BlobEvent::Stored`] comes only after it matched).
pub type Tee = Option<Box<dyn Write>>;

/// What [`import_with`] tells its caller about a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobEvent {
    /// A blob's header arrived: nothing of it has been read yet.
    Header { digest: Digest, size: u64 },
    /// The blob was stored, its digest checked.
    Stored { digest: Digest },
}

/// Like [`import`], calling `on_blob` before and after every blob with the index (once
/// it has arrived) and the layout, so that a caller can check signatures as soon as their
/// blobs are in, and refuse a blob by its header before any byte of it is read. What
/// `on_blob` returns for a [`BlobEvent::Header`] is the blob's [`Tee`] (ignored for
/// [`BlobEvent::Stored`]).
pub fn import_with<R, E, F>(reader: R, layout: &Layout, mut on_blob: F) -> Result<ImageIndex, E>
where
    R: Read,
    E: From<ArchiveError>,
    F: FnMut(BlobEvent, Option<&ImageIndex>, &Layout) -> Result<Tee, E>,
{
    let mut ar = tar::Archive::new(reader);
    let mut index: Option<ImageIndex> = None;
    let mut seen = BTreeSet::new();
    let mut saw_layout = false;
    for entry in ar.entries().map_err(ArchiveError::from)? {
        let mut entry = entry.map_err(ArchiveError::from)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut tee = None;
        if let Some(ArchivePath::Blob(digest)) = classify(&name) {
            tee = on_blob(BlobEvent::Header { digest, size: entry.size() }, index.as_ref(), layout)?;
        }
        let (seen, saw_layout) = (&mut seen, &mut saw_layout);
        if let Some(digest) = import_entry(&mut entry, &name, layout, tee, (seen, &mut index, saw_layout))? {
            on_blob(BlobEvent::Stored { digest }, index.as_ref(), layout)?;
        }
    }
    if !saw_layout {
        return Err(ArchiveError::Missing("oci-layout").into());
    }
    Ok(index.ok_or(ArchiveError::Missing("index.json"))?)
}

/// Like [`io::copy`], in chunks of 128 KiB (a tee hands each chunk on whole).
pub fn copy_chunked<R: Read + ?Sized, W: Write + ?Sized>(r: &mut R, w: &mut W) -> io::Result<u64> {
    let mut buf = vec![0; 128 << 10];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Writes to `first`, and to `second` until it fails.
pub struct TeeWriter<'a, W> {
    pub first: &'a mut W,
    pub second: Tee,
}

impl<W> std::fmt::Debug for TeeWriter<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeWriter").field("second", &self.second.is_some()).finish_non_exhaustive()
    }
}

impl<W: Write> Write for TeeWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.first.write(buf)?;
        if let Some(second) = &mut self.second
            && second.write_all(&buf[..n]).is_err()
        {
            self.second = None;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.first.flush()
    }
}

/// The only `oci-layout` accepted.
const OCI_LAYOUT: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}";

/// Checks and stores one archive entry; returns the digest of a blob it stored.
fn import_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
    layout: &Layout,
    tee: Tee,
    (seen, index, saw_layout): (&mut BTreeSet<String>, &mut Option<ImageIndex>, &mut bool),
) -> Result<Option<Digest>, ArchiveError> {
    let kind = classify(name).ok_or_else(|| ArchiveError::UnexpectedEntry(name.to_owned()))?;
    let et = entry.header().entry_type();
    if kind == ArchivePath::Dir {
        if !et.is_dir() {
            return Err(ArchiveError::NotAFile(name.to_owned()));
        }
        return Ok(None);
    }
    if !et.is_file() {
        return Err(ArchiveError::NotAFile(name.to_owned()));
    }
    if !seen.insert(name.to_owned()) {
        return Err(ArchiveError::Duplicate(name.to_owned()));
    }
    let size = entry.size();
    match kind {
        ArchivePath::OciLayout | ArchivePath::Index => {
            if size > MAX_MANIFEST_BYTES {
                return Err(ArchiveError::TooLarge { name: name.to_owned(), size, max: MAX_MANIFEST_BYTES });
            }
            let mut buf = Vec::new();
            entry.take(MAX_MANIFEST_BYTES).read_to_end(&mut buf)?;
            if buf.len() as u64 != size {
                return Err(ArchiveError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name} is cut short"),
                )));
            }
            if kind == ArchivePath::Index {
                *index = Some(ImageIndex::from_bytes_strict(&buf)?);
            } else {
                // Strict: an oci-layout that says anything else is not ours to read.
                let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|_| ArchiveError::BadLayout)?;
                if v != serde_json::json!({"imageLayoutVersion": "1.0.0"}) {
                    return Err(ArchiveError::BadLayout);
                }
                *saw_layout = true;
            }
            Ok(None)
        }
        ArchivePath::Blob(digest) => {
            let mut w = layout.blob_writer()?;
            let n = match tee {
                Some(tee) => copy_chunked(entry, &mut TeeWriter { first: &mut w, second: Some(tee) })?,
                None => copy_chunked(entry, &mut w)?,
            };
            if n != size {
                return Err(ArchiveError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name} is cut short"),
                )));
            }
            if layout.has_blob(&digest) {
                return Ok(Some(digest));
            }
            w.finish_expecting(&digest)?;
            Ok(Some(digest))
        }
        ArchivePath::Dir => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_is_strict() {
        assert_eq!(classify("oci-layout"), Some(ArchivePath::OciLayout));
        assert_eq!(classify("./index.json"), Some(ArchivePath::Index));
        let hex = Digest::of(b"x").hex();
        assert_eq!(classify(&format!("blobs/sha256/{hex}")), Some(ArchivePath::Blob(Digest::of(b"x"))));
        for bad in ["../oci-layout", "/index.json", "blobs/sha256/../../etc", "blobs/sha512/00", "x"] {
            assert_eq!(classify(bad), None, "{bad}");
        }
    }

    #[test]
    fn import_refuses_bad_blob_and_odd_entries() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(&dir.path().join("s")).unwrap();
        let mk = |name: &str, body: &[u8]| {
            let mut tar = tar::Builder::new(Vec::new());
            append(&mut tar, "oci-layout", OCI_LAYOUT).unwrap();
            append(&mut tar, "index.json", &ImageIndex::default().to_bytes()).unwrap();
            append(&mut tar, name, body).unwrap();
            tar.into_inner().unwrap()
        };
        let good = mk(&format!("blobs/sha256/{}", Digest::of(b"ok").hex()), b"ok");
        import(&good[..], &layout).unwrap();
        assert!(layout.has_blob(&Digest::of(b"ok")));
        let bad = mk(&format!("blobs/sha256/{}", Digest::of(b"ok2").hex()), b"evil");
        assert!(matches!(import(&bad[..], &layout), Err(ArchiveError::Layout(LayoutError::DigestMismatch { .. }))));
        assert!(!layout.has_blob(&Digest::of(b"evil")));
        let odd = mk("etc/passwd", b"x");
        // A tee gets the blob's bytes as they are stored; a blob that does not match its
        // digest is refused all the same, and its Stored event never comes.
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let teed = |archive: &[u8]| {
            let (sink, mut stored) = (Sink::default(), 0);
            let r = import_with(archive, &layout, |e, _, _| -> Result<Tee, ArchiveError> {
                match e {
                    BlobEvent::Header { .. } => Ok(Some(Box::new(sink.clone()))),
                    BlobEvent::Stored { .. } => {
                        stored += 1;
                        Ok(None)
                    }
                }
            });
            let bytes = sink.0.lock().unwrap().clone();
            (r.is_ok(), bytes, stored)
        };
        let tee_ok = mk(&format!("blobs/sha256/{}", Digest::of(b"tee me").hex()), b"tee me");
        assert_eq!(teed(&tee_ok), (true, b"tee me".to_vec(), 1));
        let tee_bad = mk(&format!("blobs/sha256/{}", Digest::of(b"tee me too").hex()), b"evil bytes");
        assert_eq!(teed(&tee_bad), (false, b"evil bytes".to_vec(), 0));
        assert!(matches!(import(&odd[..], &layout), Err(ArchiveError::UnexpectedEntry(_))));
    }
}
