//! Receiving a stored layer with `btrfs receive`: the installer's deploy and the builder's
//! rebuild of a parent snapshot from the store do the same.
//!
//! ```text
//! blob ─► sha256 ─► zstd ─► forward_stream[_hashing] ─► pipe (1 MiB) ─► btrfs receive -e
//!                           each command checked, then       │
//!                           handed on; END only once the     └─► INTO/<subvolume>
//!                           blob matched its digest
//! ```
//!
//! A refused stream, a blob that does not match its digest, or a failed receive stops the
//! receive; what it made of the subvolume is the caller's to delete.

use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::StreamError;
use super::forward::{Forwarded, Progress, forward_stream, forward_stream_hashing};
use super::stream::Uuid;
use super::validate::ParentTree;
use crate::digest::{Digest, Hasher};
use crate::layout::Layout;
use crate::oci::Descriptor;

/// The size asked for the pipe to `btrfs receive`: the default `fs.pipe-max-size`, deeper
/// than the 64 KiB default, so that the two processes stall less on each other (data
/// commands are 128 KiB).
const PIPE_SIZE: usize = 1 << 20;

/// Why receiving a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream was refused (or could not be read): see [`StreamError`].
    #[error("checking layer {digest}: {source}")]
    Stream { digest: Digest, source: StreamError },
    #[error("layer {digest} is corrupt: its {size} bytes hash to {actual} (expected {expected_size} bytes)")]
    Digest { digest: Digest, actual: Digest, size: u64, expected_size: u64 },
    #[error("btrfs receive of layer {digest} failed: {stderr}")]
    Receive { digest: Digest, stderr: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl ReceiveError {
    /// Whether the layer itself was refused (malformed, hostile or corrupt; exit 7),
    /// rather than receiving it failing for a local reason.
    pub fn is_malformed(&self) -> bool {
        match self {
            ReceiveError::Stream { source, .. } => source.is_malformed(),
            ReceiveError::Digest { .. } => true,
            ReceiveError::Receive { .. } | ReceiveError::Io { .. } => false,
        }
    }
}

/// Where and how a layer is received.
#[derive(Debug, Clone, Copy)]
pub struct Receiver<'a> {
    /// The `btrfs` program.
    pub btrfs: &'a Path,
    /// The directory the layer's subvolume is received into.
    pub into: &'a Path,
    /// For an incremental layer: the subvolume it is received against (its received UUID,
    /// which the stream names, and its path, whose tree the stream is checked through).
    pub parent: Option<(Uuid, &'a Path)>,
    /// Hash each file from the stream ([`Forwarded::files`]).
    pub hash_files: bool,
}

impl Receiver<'_> {
    /// Receives `layer` from `layout`: `watch` as in [`forward_stream`]. The subvolume is
    /// `into/<summary.name>` once this returns.
    pub fn receive(
        &self,
        layout: &Layout,
        layer: &Descriptor,
        watch: impl FnMut(Progress) -> Result<(), String>,
    ) -> Result<Forwarded, ReceiveError> {
        let blob = layout.open_blob(&layer.digest).map_err(|e| ReceiveError::Io {
            what: format!("opening layer {}", layer.digest),
            source: io::Error::other(e),
        })?;
        self.receive_blob(blob, layer, watch)
    }

    /// [`Receiver::receive`] of the compressed bytes `blob` reads (the layer's blob, or an
    /// archive's entry as it arrives): the whole of what `blob` yields is hashed and must
    /// be `layer`'s digest and size.
    pub fn receive_blob<R: Read + Send>(
        &self,
        blob: R,
        layer: &Descriptor,
        watch: impl FnMut(Progress) -> Result<(), String>,
    ) -> Result<Forwarded, ReceiveError> {
        self.receive_from(Blob { inner: blob, hasher: Some(Hasher::new()), count: 0 }, layer, watch)
    }

    /// [`Receiver::receive_blob`] from a reader that checks the blob's digest itself: it
    /// reaches its end only once the bytes it gave hashed to `layer`'s digest, and fails
    /// otherwise (a layer teed from an archive as it is stored). The bytes are not hashed
    /// a second time here; their count is still checked against the layer's size.
    pub fn receive_digest_checked<R: Read + Send>(
        &self,
        blob: R,
        layer: &Descriptor,
        watch: impl FnMut(Progress) -> Result<(), String>,
    ) -> Result<Forwarded, ReceiveError> {
        self.receive_from(Blob { inner: blob, hasher: None, count: 0 }, layer, watch)
    }

    fn receive_from<R: Read + Send>(
        &self,
        blob: Blob<R>,
        layer: &Descriptor,
        watch: impl FnMut(Progress) -> Result<(), String>,
    ) -> Result<Forwarded, ReceiveError> {
        let io_err = |what: String| move |source| ReceiveError::Io { what, source };
        let tree = self
            .parent
            .map(|(_, p)| ParentTree::scan(p))
            .transpose()
            .map_err(|source| ReceiveError::Stream { digest: layer.digest, source })?;
        let mut child = Command::new(self.btrfs)
            .args(["receive", "-e", "-q"])
            .arg(self.into)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("running {} receive", self.btrfs.display())))?;
        let stdin = child.stdin.take().expect("piped");
        // A refusal leaves the pipe as it is (only slower).
        let _ = rustix::pipe::fcntl_setpipe_size(&stdin, PIPE_SIZE);
        // Small commands are gathered; a data command (larger than the buffer) goes to the
        // pipe in one vectored write, without a copy here.
        let mut stdin = io::BufWriter::with_capacity(64 * 1024, stdin);
        // Each command is checked (against the parent's tree on disk) and passed by `watch`
        // before it is written to the receive; END only after the digest check.
        let parent_uuid = self.parent.map(|(u, _)| u);
        // The whole blob is hashed (a longer one fails the digest check at the end); it is
        // decompressed by a second thread while the commands before are checked and sent.
        let decoded = crate::decode::decompressed(blob, |dec| {
            if self.hash_files {
                forward_stream_hashing(dec, parent_uuid, tree.as_ref(), &mut stdin, watch)
            } else {
                forward_stream(dec, parent_uuid, tree.as_ref(), &mut stdin, watch)
            }
        });
        let (checked, digest) = match decoded {
            Ok((checked, rest)) => {
                let digest = match &checked {
                    Ok(_) => check_digest(rest, layer),
                    Err(_) => Ok(()),
                };
                (checked, digest)
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io_err(format!("decompressing layer {}", layer.digest))(e));
            }
        };
        let ended = match (&checked, &digest) {
            (Ok(c), Ok(())) => c.write_end(&mut stdin).and_then(|()| stdin.flush()).is_ok(),
            _ => false,
        };
        drop(stdin);
        if !ended {
            // What it received of a refused stream is the caller's to delete.
            let _ = child.kill();
        }
        let out = child.wait_with_output().map_err(io_err(format!("waiting for {} receive", self.btrfs.display())))?;
        let checked = checked.map_err(|source| ReceiveError::Stream { digest: layer.digest, source })?;
        digest?;
        if !out.status.success() {
            return Err(ReceiveError::Receive {
                digest: layer.digest,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(checked)
    }

    /// The path of the subvolume `checked` was received as.
    pub fn received(&self, checked: &Forwarded) -> PathBuf {
        self.into.join(&checked.summary.name)
    }
}

/// The compressed bytes of a layer: counted, and hashed unless the reader checks the
/// digest itself.
struct Blob<R> {
    inner: R,
    hasher: Option<Hasher>,
    count: u64,
}

impl<R: Read> Read for Blob<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads what the decoder left of the compressed blob and checks its digest and size.
fn check_digest<R: Read>(mut rest: BufReader<Blob<R>>, layer: &Descriptor) -> Result<(), ReceiveError> {
    io::copy(&mut rest, &mut io::sink())
        .map_err(|source| ReceiveError::Io { what: format!("reading layer {}", layer.digest), source })?;
    let blob = rest.into_inner();
    let size = blob.count;
    // Without a hasher, the reader ended only once the digest matched.
    let actual = blob.hasher.map_or(layer.digest, Hasher::finish);
    if actual != layer.digest || size != layer.size {
        return Err(ReceiveError::Digest { digest: layer.digest, actual, size, expected_size: layer.size });
    }
    Ok(())
}
