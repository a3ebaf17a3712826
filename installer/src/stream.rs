//! One read of each payload on deploy: a tar+zstd or btrfs layer that arrives in an archive
//! (a file or stdin), a layout directory or from a registry is unpacked (or received by `btrfs receive`)
//! while it is written to the received layout, instead of being stored first and read
//! again.
//!
//! ```text
//! archive ─► blob header ─► signatures verified? layer of the image, next in order?
//!                │ yes: tee
//!                ├──────────► received layout (hashed, kept only when its digest matched)
//!                └──────────► channel (bounded) ─► unpack thread ─► staging .tmp/stream-<hex>-<n>/
//!                                                  (tar: Unpacker, every file hashed as
//!                                                   written; btrfs: crate::btrfs::stage,
//!                                                   each command checked, then received;
//!                                                   the whole tree checked)
//! ```
//!
//! Only an image whose signatures were verified is unpacked, only into the staging temp
//! area: nothing is activated, published or stored before the deploy decides, and the
//! deploy takes the tree (a rename) only when the unpacker accepted every layer, each
//! layer's digest and every file's signed sha256. A tree nobody took is removed. An image
//! whose layers do not arrive in order (one of its layers out of place or missing, a layer
//! it shares with an image that took it first, a layer that did not reach the unpacker
//! whole) is unpacked as before, from the received layout, once it is complete. The
//! images of an archive of several are unpacked side by side, up to [`MAX_UNPACKING`] at
//! a time; each blob goes to the first image that expects it next.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use formats::Digest;
use formats::StageName;
use formats::layout::Layout;
use formats::oci::{BTRFS_ZSTD_MEDIA_TYPE, Descriptor, TAR_ZSTD_MEDIA_TYPE};
use formats::unpack::Unpacker;

use crate::host_parent::HostGeneration;
use crate::receive::Verified;

/// Chunks in flight between the receiver and the unpack thread (at most 128 KiB each:
/// what one read of the archive's tar entry gives, 16 MiB in all). With the deeper queues
/// after it (`formats::decode`, the hash thread), the receiver runs ahead instead of
/// waiting: a tmpfs deploy of the 1 GiB corpus of `bench/build.sh --corpus-only` took
/// 1.69 s with 4 MiB here and the shallower queues after, 1.54 s with all three deeper, on
/// 2 cores (medians of 5; `bench/deploy.sh` on it: 1.30x the baseline before, 1.19x after).
const CHANNEL_CHUNKS: usize = 128;

/// Most images of one source unpacked at the same time while they arrive (each has a
/// thread and up to 28 MiB in flight: 16 MiB here, 4 MiB decompressed, 8 MiB being
/// hashed); the others are unpacked once received.
pub const MAX_UNPACKING: usize = 4;

/// Where a deploy wants the images it receives unpacked while they arrive.
#[derive(Debug, Clone)]
pub struct Target {
    /// The staging temp area (the trees are renamed from there into generations).
    pub tmp: PathBuf,
    pub on_btrfs: bool,
    /// Images not to unpack (already active on the host).
    pub skip: BTreeSet<Digest>,
    /// Each deployed stage's generations on the host, which an incremental btrfs image is
    /// received against (see `host_parent`).
    pub host: BTreeMap<StageName, Vec<HostGeneration>>,
}

/// The payload type of an image whose layers can be unpacked as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    TarZstd,
    Btrfs,
}

enum Msg {
    Data(Vec<u8>),
    /// The layer being sent is complete and its digest matched.
    End,
}

/// An image being unpacked while its layers arrive.
pub struct Streamer {
    image: Digest,
    /// The layers still to come from the source, in order, with their sizes.
    expect: VecDeque<(Digest, u64)>,
    /// The layer being teed, its size, and the bytes the tee has had so far.
    teeing: Option<(Digest, u64, Arc<AtomicU64>)>,
    /// The layers did not arrive as expected: the image is unpacked the ordinary way.
    broken: bool,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<()>>>,
    tree: PathBuf,
    /// The tree was handed over as a [`Streamed`].
    handed: bool,
}

impl Streamer {
    /// Starts unpacking `v` (verified) when `target` wants it, its layers are all tar+zstd
    /// or all btrfs streams, and some of them are not in `store` (those in it are read
    /// from it, the others from the source as they arrive).
    pub fn start(target: &Target, v: &Verified, store: &Layout) -> Option<Streamer> {
        let c = v.candidate();
        let layers: Vec<Descriptor> = c.manifest.layers.clone();
        let all = |media_type: &str| layers.iter().all(|l| l.media_type == media_type);
        let payload = if all(TAR_ZSTD_MEDIA_TYPE) {
            Payload::TarZstd
        } else if all(BTRFS_ZSTD_MEDIA_TYPE) {
            Payload::Btrfs
        } else {
            return None;
        };
        if target.skip.contains(&v.digest) || layers.is_empty() {
            return None;
        }
        let in_store: Vec<bool> = layers.iter().map(|l| store.has_blob(&l.digest)).collect();
        let expect: VecDeque<(Digest, u64)> =
            layers.iter().zip(&in_store).filter(|(_, s)| !**s).map(|(l, _)| (l.digest, l.size)).collect();
        if expect.is_empty() {
            return None;
        }
        // One tree per receive (two sources may hold the same image).
        static TREES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = TREES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tree = target.tmp.join(format!("stream-{}-{n}", &v.digest.hex()[..16]));
        let (tx, rx) = sync_channel(CHANNEL_CHUNKS);
        let (config, on_btrfs, dir) = (c.config.clone(), target.on_btrfs, tree.clone());
        let host = target.host.get(&config.name).cloned().unwrap_or_default();
        let mut readers = LayerReaders { store: store.clone(), layers: layers.clone(), in_store, rx, next: 0 };
        crate::progress::step("unpack", Some(&v.reference), "unpacking the layers while they arrive");
        let thread = std::thread::Builder::new()
            .name("unpack".into())
            .spawn(move || match payload {
                Payload::TarZstd => unpack_tar(&config, &layers, &dir, on_btrfs, &mut readers),
                Payload::Btrfs => receive_btrfs(&config, &layers, &dir, on_btrfs, &host, &mut readers),
            })
            .ok()?;
        Some(Streamer {
            image: v.digest,
            expect,
            teeing: None,
            broken: false,
            tx: Some(tx),
            thread: Some(thread),
            tree,
            handed: false,
        })
    }

    /// A blob's header arrived: a writer for its bytes when it is the next layer expected.
    /// A layer of the image that comes out of order gives up streaming the image.
    pub fn tee(&mut self, digest: &Digest, size: u64) -> formats::archive::Tee {
        if self.broken || self.teeing.is_some() {
            return None;
        }
        match self.expect.front() {
            Some(&(d, s)) if d == *digest && s == size => {
                self.expect.pop_front();
                let sent = Arc::new(AtomicU64::new(0));
                self.teeing = Some((d, s, sent.clone()));
                let tx = self.tx.clone()?;
                Some(Box::new(ChannelWriter { tx, sent }))
            }
            _ => {
                if self.expect.iter().any(|(d, _)| d == digest) {
                    tracing::debug!("layer {digest} arrived out of order: the image is unpacked once received");
                    self.stop();
                }
                None
            }
        }
    }

    /// A blob was stored, its digest checked: the unpacker may finish the layer.
    /// A tee that was dropped before the end (a source that sent the blob again from its
    /// start, a registry ignoring the range of a resume) has had fewer bytes than the
    /// blob: the image is then unpacked the ordinary way, from the stored blob.
    pub fn stored(&mut self, digest: &Digest) {
        match self.teeing.take() {
            Some((d, size, sent)) if d == *digest => {
                if sent.load(Ordering::SeqCst) != size {
                    tracing::debug!(
                        "layer {digest} did not reach the unpacker whole: the image is unpacked once received"
                    );
                    self.stop();
                } else if let Some(tx) = &self.tx {
                    // The unpacker may have stopped already (its error is kept).
                    let _ = tx.send(Msg::End);
                }
            }
            other => self.teeing = other,
        }
    }

    /// Whether its unpack thread is still at work (or waiting for layers).
    pub fn is_unpacking(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn stop(&mut self) {
        self.broken = true;
        self.tx = None;
    }

    /// The source was read to its end: waits for the unpacker. `None` when the image's
    /// layers did not all arrive in order (it is unpacked from the received layout).
    pub fn finish(mut self) -> Option<Streamed> {
        if !self.expect.is_empty() || self.teeing.is_some() {
            self.stop();
        }
        self.tx = None;
        let result = match self.thread.take()?.join() {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the unpack thread panicked")),
        };
        if self.broken {
            return None;
        }
        self.handed = true;
        Some(Streamed { image: self.image, tree: self.tree.clone(), result: Mutex::new(Some(result)) })
    }
}

impl std::fmt::Debug for Streamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamer")
            .field("image", &self.image)
            .field("expect", &self.expect)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // A tree handed over is removed by its Streamed when nobody takes it.
        if !self.handed {
            let _ = crate::txn::remove_tree(&self.tree);
        }
    }
}

/// An image unpacked while it arrived: its tree in the staging temp area, or why not.
#[derive(Debug)]
pub struct Streamed {
    pub image: Digest,
    tree: PathBuf,
    result: Mutex<Option<Result<()>>>,
}

impl Streamed {
    /// Takes the tree: its path, or the unpacker's error. `None` the second time.
    pub fn take(&self) -> Option<Result<PathBuf>> {
        let r = self.result.lock().ok()?.take()?;
        Some(r.map(|()| self.tree.clone()))
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        // Removed unless it was taken (and renamed away): a refused or unused tree.
        let _ = crate::txn::remove_tree(&self.tree);
    }
}

/// Unpacks tar+zstd `layers` into the new directory (a subvolume `on_btrfs`) `dir`.
fn unpack_tar(
    config: &formats::manifest::StageConfig,
    layers: &[Descriptor],
    dir: &std::path::Path,
    on_btrfs: bool,
    readers: &mut LayerReaders,
) -> Result<()> {
    let _ = crate::txn::remove_tree(dir);
    let parent = dir.parent().context("a temp tree has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    if on_btrfs {
        let name = dir.file_name().and_then(|n| n.to_str()).context("tree name")?;
        subvol::create(parent, name)?;
    } else {
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut unpacker = Unpacker::new(config, dir, layers)?;
    while let Some((_, reader, from_source)) = readers.next_layer()? {
        if from_source {
            // Its end comes only after the stored blob matched its digest.
            unpacker.apply_next_digest_checked(reader)?;
        } else {
            unpacker.apply_next(reader)?;
        }
    }
    unpacker.finish()?;
    Ok(())
}

/// Receives btrfs `layers` (incremental ones against the host's generation of their
/// parent, as a deploy from the store does) into `dir`, checked against the signed
/// manifest (see `crate::btrfs::stage`).
fn receive_btrfs(
    config: &formats::manifest::StageConfig,
    layers: &[Descriptor],
    dir: &std::path::Path,
    on_btrfs: bool,
    host: &[HostGeneration],
    readers: &mut LayerReaders,
) -> Result<()> {
    let _ = crate::txn::remove_tree(dir);
    let tmp = dir.parent().context("a temp tree has a parent")?;
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let name = dir.file_name().and_then(|n| n.to_str()).context("tree name")?;
    crate::btrfs::stage(crate::btrfs::Layers::Arriving(readers), layers, config, tmp, name, on_btrfs, host)?;
    Ok(())
}

/// A layer, a reader of its blob, and whether it comes from the source (see
/// [`LayerReaders::next_layer`]).
pub type NextLayer<'a> = (Descriptor, Box<dyn Read + Send + 'a>, bool);

/// The layers of an image in order, as an unpacker reads them: each from the store, or
/// from the source as it arrives (its end only once its blob's digest matched). What the
/// unpack thread of a payload type is given (tar+zstd today; a btrfs receiver reading
/// `impl Read` per layer can take the same).
pub struct LayerReaders {
    store: Layout,
    layers: Vec<Descriptor>,
    in_store: Vec<bool>,
    rx: Receiver<Msg>,
    next: usize,
}

impl std::fmt::Debug for LayerReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerReaders").field("layers", &self.layers.len()).field("next", &self.next).finish()
    }
}

impl LayerReaders {
    /// The next layer, a reader of its blob's bytes, and whether it comes from the source
    /// (then the reader ends only once the stored blob matched the layer's digest: a
    /// digest mismatch is an error of the reader); `None` after the last.
    pub fn next_layer(&mut self) -> Result<Option<NextLayer<'_>>> {
        let Some(layer) = self.layers.get(self.next).cloned() else { return Ok(None) };
        let in_store = self.in_store[self.next];
        self.next += 1;
        let reader: Box<dyn Read + Send + '_> = if in_store {
            Box::new(self.store.open_blob(&layer.digest)?)
        } else {
            Box::new(ChannelReader { rx: &mut self.rx, chunk: Vec::new(), pos: 0, ended: false })
        };
        Ok(Some((layer, reader, !in_store)))
    }
}

struct ChannelWriter {
    tx: SyncSender<Msg>,
    /// Bytes handed on (see [`Streamer::stored`]).
    sent: Arc<AtomicU64>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.send(Msg::Data(buf.to_vec())).map_err(|_| io::Error::other("the unpacker stopped"))?;
        self.sent.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One layer's bytes from the channel; its end only once the receiver stored the blob.
struct ChannelReader<'a> {
    rx: &'a mut Receiver<Msg>,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(d)) => (self.chunk, self.pos) = (d, 0),
                Ok(Msg::End) => self.ended = true,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the source stopped before this layer was received whole",
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
