//! Unpacking tar+zstd payloads into a generation directory, as a sandbox, and checking a
//! staged tree against the signed manifest.
//!
//! `tar::Entry::unpack_in` is not a sandbox (it skips `..` silently, strips a leading `/`
//! and creates links that point out), so the tar crate is used here only to split the
//! stream into headers and data. Every entry is checked against the rules below and the
//! signed [`StageConfig`] before anything is written, and everything is created through
//! directory handles beneath `dest`, never by joining strings:
//!
//! ```text
//! layer blob ─► sha256 + size ─► zstd (streaming) ─► tar headers ─► checks ─► dest/
//!               of the compressed                    (raw: long names and pax
//!               bytes, checked at the                 records read here, bounded)
//!               end of the layer
//!
//! every entry, before a byte of it is written:
//!   path       raw header bytes (pax path > GNU long name > header), no NUL, UTF-8,
//!              one trailing '/' stripped for directories, then a RelPath: relative,
//!              no '..', '.' or empty components, bounded length and depth
//!   type       regular file, directory or symlink; hard links, devices, FIFOs, sparse
//!              files, volume labels, ... are refused
//!   duplicate  a path may appear once per layer
//!   manifest   last layer: the path is in config.entries with the same kind and mode,
//!              a file's header size equals the signed size, a link's text the signed
//!              text; earlier layers may hold paths the final tree lacks (a later layer
//!              must white them out: the final comparison sees to it)
//!   mode       no setuid/setgid/sticky bits unless a `files:` entry declares exactly
//!              that mode for exactly that path
//!   size       checked at the header, before any data is read: no file larger than the
//!              largest file of the signed manifest (in a lower layer, which may hold
//!              larger old versions: nor than LOWER_LAYER_RATIO x its compressed blob);
//!              the layer's and the image's content bytes within their budgets
//!              (declared bytes + SLACK_BYTES per layer, x layers for the image)
//!   count      entries (whiteouts included) within their budgets (declared entries +
//!              SLACK_ENTRIES per layer, x layers for the image)
//!   link       confined to the stage (confine_link): relative, never out
//!   whiteout   `.wh.NAME`: an empty regular file naming a present path that this layer
//!              has not written yet; removes NAME, a file or a whole directory tree
//!
//! on disk:
//!   parents    opened from dest one component at a time, O_DIRECTORY|O_NOFOLLOW: a
//!              write through a symlink fails by construction
//!   files      openat O_CREAT|O_EXCL|O_NOFOLLOW (what was there is removed first),
//!              exactly `size` bytes hashed as written (a file larger than one read by
//!              a hash thread, checked at the end of the layer), fchmod
//!   dirs       mkdirat 0700, exact modes applied at the end (deepest first); one syncfs
//!   links      symlinkat
//!
//! end of a layer:    its compressed sha256 and size equal the descriptor's
//! end of all layers: the tree equals config.entries exactly (kind, mode, size, sha256,
//!                    link text, nothing missing, nothing extra)
//! ```
//!
//! On error `dest` holds a partial tree: the caller discards the generation.
//!
//! ```no_run
//! use std::path::Path;
//! use formats::layout::Layout;
//! use formats::manifest::{MAX_CONFIG_BYTES, StageConfig};
//! use formats::oci::{ImageManifest, MAX_MANIFEST_BYTES};
//! use formats::unpack::{check_tree, unpack_layers};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layout = Layout::open(Path::new("/var/lib/op-dbus/deployment/images"))?;
//! let image = layout.resolve("stage-1-core-dbus:1.0.0")?.expect("tagged");
//! let manifest = ImageManifest::stage_from_bytes(&layout.read_blob(&image.digest, MAX_MANIFEST_BYTES)?)?;
//! let config = StageConfig::from_bytes(&layout.read_blob(&manifest.config.digest, MAX_CONFIG_BYTES)?)?;
//! let dest = Path::new("/var/lib/op-dbus/staging/.generations/stage-1-core-dbus/3");
//! std::fs::create_dir(dest)?;
//! match unpack_layers(&layout, &manifest.layers, &config, dest) {
//!     Ok(stats) => println!("{} files, {} bytes", stats.files, stats.bytes),
//!     Err(e) if e.is_malformed() => { /* refuse the image: exit 7 */ }
//!     Err(e) => return Err(e.into()),
//! }
//! // Later, `op-dbus-stage verify`:
//! for m in check_tree(dest, &config)? {
//!     println!("{m}");
//! }
//! # Ok(())
//! # }
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, OFlags};
use serde::Serialize;

use crate::digest::{Digest, Hasher};
use crate::hash_thread::HashThread;
use crate::layout::{Layout, LayoutError};
use crate::manifest::{ConfigError, EntryKind, Mode, StageConfig};
use crate::oci::{Descriptor, TAR_PATCH_MEDIA_TYPE, TAR_ZSTD_MEDIA_TYPE};
use crate::path::{MAX_DEPTH, MAX_PATH, RelPath, confine_link};
use crate::payload::WHITEOUT_PREFIX;

pub mod check;
mod compare;

use compare::compare_tree;

/// Largest accepted pax extension header (local or global).
const MAX_PAX: u64 = 64 << 10;
/// Most decompressed bytes accepted after the end-of-archive marker (tar padding).
const MAX_TRAILING: u64 = 1 << 20;
const CHUNK: usize = 128 << 10;
/// A file of a layer below the last may be this many times larger than the layer's
/// compressed size (or as large as the largest file of the manifest). Such a layer holds
/// older versions of files, which may be larger than any file of this version, so the
/// manifest's sizes cannot bound it; this bound still refuses a header claiming a huge
/// file in a small blob, whose content would be little more than zeros.
pub const LOWER_LAYER_RATIO: u64 = 1024;
/// Content bytes a layer may write beyond the sum of the file sizes the signed manifest
/// declares. Each layer may write at most `declared + SLACK_BYTES`, and the image in all
/// its layers `declared x layers + SLACK_BYTES`: a lower layer holds an older version of
/// the tree, which the manifest of this version cannot describe, but which is rarely much
/// larger; a rogue signer's 4 GiB of zeros behind a 3-byte manifest stops after 64 MiB. A
/// delta on a parent more than 64 MiB larger than the new version is refused: build it
/// without `--parent`.
pub const SLACK_BYTES: u64 = 64 << 20;
/// Entries (files, directories, symlinks, whiteouts) a layer may apply beyond the number
/// the signed manifest declares; the image in all its layers at most
/// `declared x layers + SLACK_ENTRIES`, and never more than [`crate::manifest::MAX_ENTRIES`]
/// per layer: every entry costs a system call or more and a little memory, so millions of
/// empty files in a lower layer are refused after a few thousand.
pub const SLACK_ENTRIES: u64 = 4096;

/// What an unpack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UnpackStats {
    /// Regular files written (a file replaced by a later layer counts twice).
    pub files: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Payload entries applied: files, directories, symlinks and whiteouts.
    pub entries: u64,
}

/// One difference between a staged tree and its signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The stage path (`bin/op-dbus`).
    pub path: String,
    pub problem: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// Why a payload was not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Hostile or malformed content (exit 7).
    #[error("layer {layer}: entry {entry:?}: {reason}; the image was refused")]
    Unsafe { layer: Digest, entry: String, reason: String },
    /// The layer is not a readable tar+zstd stream (exit 7).
    #[error("layer {layer} is corrupt: {reason}")]
    Corrupt { layer: Digest, reason: String },
    /// The layer's bytes are not the ones its descriptor names (exit 7).
    #[error(
        "layer {layer} does not match its descriptor: read {actual_size} bytes hashing to {actual}, expected {expected_size} bytes; the blob is corrupt or was tampered with"
    )]
    LayerDigest { layer: Digest, expected_size: u64, actual: Digest, actual_size: u64 },
    /// The staged content differs from the signed manifest (exit 7).
    #[error("{path}: {reason}; the staged content differs from the signed manifest")]
    Mismatch { path: String, reason: String },
    /// The embedded stage manifest is not valid (exit 7).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "layer {layer} has media type {media_type:?}; only {TAR_ZSTD_MEDIA_TYPE} and {TAR_PATCH_MEDIA_TYPE} payloads are unpacked here"
    )]
    UnsupportedLayer { layer: Digest, media_type: String },
    #[error("{path} is not an empty directory; unpack into a new generation directory")]
    NotEmpty { path: PathBuf },
    #[error(
        "{path}: the filesystem is full (or a disk quota is exhausted) while writing it; free space there and retry"
    )]
    NoSpace { path: PathBuf },
    #[error("reading layer {layer}: {source}")]
    Read { layer: Digest, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl UnpackError {
    /// Whether the input was refused as malformed, hostile or corrupt (exit 7), rather
    /// than the unpack failing for a local reason (disk full, I/O error, missing blob).
    pub fn is_malformed(&self) -> bool {
        match self {
            UnpackError::Unsafe { .. }
            | UnpackError::Corrupt { .. }
            | UnpackError::LayerDigest { .. }
            | UnpackError::Mismatch { .. }
            | UnpackError::Config(_) => true,
            UnpackError::Layout(e) => matches!(e, LayoutError::DigestMismatch { .. }),
            UnpackError::UnsupportedLayer { .. }
            | UnpackError::NotEmpty { .. }
            | UnpackError::NoSpace { .. }
            | UnpackError::Read { .. }
            | UnpackError::Io { .. } => false,
        }
    }
}

fn io_error(path: PathBuf, e: impl Into<io::Error>) -> UnpackError {
    let e = e.into();
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => UnpackError::NoSpace { path },
        _ => UnpackError::Io { path, source: e },
    }
}

/// Unpacks `layers` (tar+zstd, in order) from `layout` into `dest`, an existing empty
/// directory, and checks that the result is exactly `config`'s tree.
pub fn unpack_layers(
    layout: &Layout,
    layers: &[Descriptor],
    config: &StageConfig,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    let mut unpacker = Unpacker::new(config, dest, layers)?;
    for layer in layers {
        let blob = layout.open_blob(&layer.digest)?;
        unpacker.apply_next(blob)?;
    }
    unpacker.finish()
}

/// Compares the tree at `dest` with `config`: every file is re-hashed; kinds, modes,
/// sizes, link texts, missing and extra paths are reported. An empty list means the tree
/// is what the signature promises. Owners and times are not compared.
pub fn check_tree(dest: &Path, config: &StageConfig) -> Result<Vec<Mismatch>, UnpackError> {
    check_tree_ignoring(dest, config, &[])
}

/// Like [`check_tree`], skipping the top-level names in `ignore` (such as a
/// `manifest.json` kept beside the staged files).
pub fn check_tree_ignoring(dest: &Path, config: &StageConfig, ignore: &[&str]) -> Result<Vec<Mismatch>, UnpackError> {
    check_tree_known(dest, config, ignore, &BTreeMap::new())
}

/// Like [`check_tree_ignoring`], taking the digest of each file in `known` (path →
/// sha256 and length, hashed as it was written) instead of reading it, when the file on
/// disk has that length. Every other file is read and hashed.
pub fn check_tree_known(
    dest: &Path,
    config: &StageConfig,
    ignore: &[&str],
    known: &BTreeMap<String, (Digest, u64)>,
) -> Result<Vec<Mismatch>, UnpackError> {
    let root = open_root(dest)?;
    compare_tree(&root, dest, config, ignore, known)
}

fn open_root(dest: &Path) -> Result<OwnedFd, UnpackError> {
    rustix::fs::open(dest, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, rustix::fs::Mode::empty())
        .map_err(|e| io_error(dest.to_owned(), e))
}

/// A streaming unpacker: layers are fed in order as readers of their compressed bytes
/// (a blob file, or an archive being read), then [`Unpacker::finish`] checks the tree.
///
/// After an error, drop the unpacker and discard `dest`.
pub struct Unpacker<'a> {
    config: &'a StageConfig,
    layers: Vec<Descriptor>,
    next: usize,
    dest: OwnedFd,
    dest_path: PathBuf,
    max_file_size: u64,
    /// Bounds of content bytes and entries, per layer and for the whole image.
    budget: Budget,
    /// Files written in this run: the digest and size of what was written.
    written: BTreeMap<String, (Digest, u64)>,
    /// Every directory present, with the mode its last entry gave it.
    dirs: BTreeMap<String, Mode>,
    stats: UnpackStats,
    /// The directory the last entry went into: entries come sorted, so most share it.
    /// Dropped whenever a directory is removed.
    parent_cache: RefCell<Option<(String, Rc<OwnedFd>)>>,
    /// `dest` started as the tree below the first layer (see [`Unpacker::over`]).
    over: bool,
    /// The tree `dest` was copied from, leaving out files the layers replace (see
    /// [`Unpacker::over_base`]): patches of those apply to its files.
    base: Option<OwnedFd>,
    /// Hashes files while they are written (started at the first): a file larger than one
    /// read piece by piece, smaller ones in batches.
    hash_thread: Option<HashThread>,
    /// Small files written and not yet handed to the hash thread.
    batch: Option<Batch>,
    /// Files whose digest the hash thread has yet to give, in the order they were written.
    pending: VecDeque<Pending>,
}

/// Small files for the hash thread: their contents back to back in one of its buffers.
struct Batch {
    buf: Vec<u8>,
    used: usize,
    lens: Vec<usize>,
}

/// A file written whose digest is still being computed by the hash thread.
#[derive(Debug)]
struct Pending {
    path: String,
    size: u64,
    /// The signed sha256 it must have (`Some` in the last layer: `Some(None)` when the
    /// manifest gives none).
    expected: Option<Option<Digest>>,
}

impl fmt::Debug for Unpacker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unpacker")
            .field("stage", &self.config.name)
            .field("dest", &self.dest_path)
            .field("layer", &self.next)
            .field("of", &self.layers.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// What the signed manifest lets an unpack write ([`SLACK_BYTES`], [`SLACK_ENTRIES`]):
/// tar payloads here, btrfs send streams in the installer.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub layer_bytes: u64,
    pub image_bytes: u64,
    pub layer_entries: u64,
    pub image_entries: u64,
}

impl Budget {
    pub fn of(config: &StageConfig, layers: usize) -> Budget {
        let declared_bytes = config.entries.iter().filter_map(|e| e.size).fold(0u64, u64::saturating_add);
        let declared_entries = config.entries.len() as u64;
        let layers = layers.max(1) as u64;
        let max_entries = crate::manifest::MAX_ENTRIES as u64;
        Budget {
            layer_bytes: declared_bytes.saturating_add(SLACK_BYTES),
            image_bytes: declared_bytes.saturating_mul(layers).saturating_add(SLACK_BYTES),
            layer_entries: declared_entries.saturating_add(SLACK_ENTRIES).min(max_entries),
            image_entries: declared_entries.saturating_mul(layers).saturating_add(SLACK_ENTRIES),
        }
    }
}

/// How processing a layer failed, to decide which error to report.
enum Fail {
    /// Reading the decompressed stream failed: the blob could not be read, or is corrupt.
    Read(io::Error),
    /// The content was refused: report a digest mismatch instead, if there is one.
    Content(UnpackError),
    /// Writing to `dest` failed: reported as is.
    Disk(UnpackError),
}

/// Why a directory beneath `dest` could not be opened.
enum DirFail {
    /// Missing, or not a directory: the entry that needs it is refused.
    Refused(String),
    Disk(UnpackError),
}

/// Extension headers seen before the entry they describe.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    /// The entry's data is a patch against the file below it ([`crate::patch`]).
    patch: bool,
    pending: bool,
}

/// The state of the layer being applied.
struct LayerState {
    digest: Digest,
    last: bool,
    /// The first layer: nothing lies below it, so nothing needs clearing.
    first: bool,
    /// The largest file this layer may hold.
    max_file_size: u64,
    /// Paths written by this layer.
    seen: BTreeSet<String>,
    /// A `tar-patch+zstd` layer: its files may be patches.
    patches: bool,
    buf: Vec<u8>,
    /// Content bytes and entries this layer wrote.
    bytes: u64,
    entries: u64,
    /// Where the next entry of the signed manifest is (`StageConfig::index_in_order`).
    signed_next: usize,
}

/// The compressed bytes of a layer, hashed as they pass (unless the reader checks the
/// digest itself, `hash` false: then counted); remembers a read failure.
struct Source<R> {
    inner: io::Take<R>,
    hasher: Hasher,
    hash: bool,
    count: u64,
    error: Option<io::Error>,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    if self.hash {
                        self.hasher.update(&buf[..n]);
                    }
                    self.count += n as u64;
                    return Ok(n);
                }
                // A signal, not a fault of the layer: the decoder above would pass it on as
                // a corrupt stream, so it is retried here.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(io::Error::new(e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
    }
}

/// One read of an entry's content into `buf`, retrying signals.
fn read_chunk(entry: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match entry.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// `Ok` unless `expected` holds a signed sha256 (or its absence) other than `digest`.
fn check_digest(path: &str, digest: Digest, expected: Option<Option<Digest>>) -> Result<(), Fail> {
    match expected {
        Some(expected) if expected != Some(digest) => Err(Fail::Content(UnpackError::Mismatch {
            path: path.to_owned(),
            reason: format!(
                "its content hashes to {digest}, the signed manifest says {}",
                expected.map_or_else(|| "nothing".into(), |d| d.to_string())
            ),
        })),
        _ => Ok(()),
    }
}

fn read_up_to<R: Read>(mut r: R, max: u64) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    (&mut r).take(max).read_to_end(&mut v)?;
    Ok(v)
}

/// Removes `path` and everything below it from `map`.
fn forget<V>(map: &mut BTreeMap<String, V>, path: &str) {
    map.remove(path);
    let mut below = map.split_off(&format!("{path}/"));
    // '0' follows '/': every key after `path0` is not below `path`.
    let mut after = below.split_off(&format!("{path}0"));
    map.append(&mut after);
}

/// Whether `set` holds `path` or something below it.
fn holds_under(set: &BTreeSet<String>, path: &str) -> bool {
    let prefix = format!("{path}/");
    set.contains(path) || set.range(prefix.clone()..).next().is_some_and(|k| k.starts_with(&prefix))
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "regular file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
    }
}

fn cstr(name: &str) -> CString {
    CString::new(name).expect("RelPath components have no NUL")
}

impl<'a> Unpacker<'a> {
    /// Prepares to unpack `layers` into `dest`, an existing empty directory. Checks the
    /// config and the layers' media types before anything is read.
    pub fn new(config: &'a StageConfig, dest: &Path, layers: &[Descriptor]) -> Result<Self, UnpackError> {
        let root = open_root(dest)?;
        if !list_dir(&root).map_err(|e| io_error(dest.to_owned(), e))?.is_empty() {
            return Err(UnpackError::NotEmpty { path: dest.to_owned() });
        }
        Self::start(config, dest, root, layers, false)
    }

    /// Prepares to unpack `layers`, the top layers of an image, into `dest`, which holds
    /// the tree of the image below them (a copy of the host's generation of that image):
    /// what they replace, white out or patch is what `dest` holds. [`Unpacker::finish`]
    /// checks the whole tree, so whatever `dest` held that the signed manifest does not
    /// promise is refused.
    pub fn over(config: &'a StageConfig, dest: &Path, layers: &[Descriptor]) -> Result<Self, UnpackError> {
        let root = open_root(dest)?;
        Self::start(config, dest, root, layers, true)
    }

    /// Like [`Unpacker::over`], where `dest` is a copy of the tree `base` without the files
    /// the layers replace, and `known` the digest and size of each file copied (hashed as
    /// it was copied, so not read again): a patch to a file `dest` lacks applies to
    /// `base`'s file, and a whiteout of a file only `base` holds removes nothing. The
    /// result is checked as for [`Unpacker::over`].
    pub fn over_base(
        config: &'a StageConfig,
        dest: &Path,
        layers: &[Descriptor],
        base: &Path,
        known: BTreeMap<String, (Digest, u64)>,
    ) -> Result<Self, UnpackError> {
        let root = open_root(dest)?;
        let mut unpacker = Self::start(config, dest, root, layers, true)?;
        unpacker.base = Some(open_root(base)?);
        unpacker.written = known;
        Ok(unpacker)
    }

    fn start(
        config: &'a StageConfig,
        dest: &Path,
        root: OwnedFd,
        layers: &[Descriptor],
        over: bool,
    ) -> Result<Self, UnpackError> {
        config.validate()?;
        for l in layers {
            if l.media_type != TAR_ZSTD_MEDIA_TYPE && l.media_type != TAR_PATCH_MEDIA_TYPE {
                return Err(UnpackError::UnsupportedLayer { layer: l.digest, media_type: l.media_type.clone() });
            }
        }
        let max_file_size = config.entries.iter().filter_map(|e| e.size).max().unwrap_or(0);
        let budget = Budget::of(config, layers.len());
        Ok(Unpacker {
            config,
            layers: layers.to_vec(),
            next: 0,
            dest: root,
            dest_path: dest.to_owned(),
            max_file_size,
            budget,
            written: BTreeMap::new(),
            dirs: BTreeMap::new(),
            stats: UnpackStats::default(),
            parent_cache: RefCell::new(None),
            over,
            base: None,
            hash_thread: None,
            batch: None,
            pending: VecDeque::new(),
        })
    }

    /// Applies the next layer from `compressed`, its blob's bytes: read to the end, hashed,
    /// and checked against the descriptor's digest and size. When the content is refused,
    /// the rest of the blob is still read (not unpacked), so that a corrupt or tampered
    /// blob is reported as [`UnpackError::LayerDigest`] rather than by its symptom.
    pub fn apply_next<R: Read + Send>(&mut self, compressed: R) -> Result<(), UnpackError> {
        self.apply(compressed, true)
    }

    /// Like [`Unpacker::apply_next`], from a reader that itself checks the blob's digest:
    /// one that reaches its end only once the bytes it gave hashed to the descriptor's
    /// digest, and fails otherwise (a layer teed from an archive as it is stored, whose
    /// end is signalled only after the stored blob matched). The bytes are not hashed a
    /// second time here; their count is still checked against the descriptor's size.
    pub fn apply_next_digest_checked<R: Read + Send>(&mut self, compressed: R) -> Result<(), UnpackError> {
        self.apply(compressed, false)
    }

    fn apply<R: Read + Send>(&mut self, compressed: R, hash: bool) -> Result<(), UnpackError> {
        let Some(layer) = self.layers.get(self.next).cloned() else {
            return Err(UnpackError::Io {
                path: self.dest_path.clone(),
                source: io::Error::other("apply_next called after the last layer"),
            });
        };
        self.next += 1;
        let source = Source {
            inner: compressed.take(layer.size.saturating_add(1)),
            hasher: Hasher::new(),
            hash,
            count: 0,
            error: None,
        };
        let last = self.next == self.layers.len();
        let max_file_size = if last {
            self.max_file_size
        } else {
            self.max_file_size.max(layer.size.saturating_mul(LOWER_LAYER_RATIO))
        };
        let mut state = LayerState {
            digest: layer.digest,
            last,
            first: self.next == 1 && !self.over,
            max_file_size,
            seen: BTreeSet::new(),
            patches: layer.media_type == TAR_PATCH_MEDIA_TYPE,
            buf: vec![0; CHUNK],
            bytes: 0,
            entries: 0,
            signed_next: 0,
        };
        // Decompressed by a second thread while the entries before are hashed and written.
        let (result, mut rest) = crate::decode::decompressed(source, |decoder| {
            let mut archive = tar::Archive::new(Forward::new(decoder));
            let result = self.read_entries(&mut archive, &mut state);
            let decoder = archive.into_inner().into_inner();
            match result {
                // Tar padding after the end-of-archive marker, and the zstd checksum.
                Ok(()) => match io::copy(&mut decoder.take(MAX_TRAILING + 1), &mut io::sink()) {
                    Ok(n) if n > MAX_TRAILING => Err(Fail::Content(UnpackError::Corrupt {
                        layer: layer.digest,
                        reason: format!("more than {MAX_TRAILING} bytes follow the end of the tar archive"),
                    })),
                    Ok(_) => Ok(()),
                    Err(e) => Err(Fail::Read(e)),
                },
                failed => failed,
            }
        })
        .map_err(|e| UnpackError::Read { layer: layer.digest, source: e })?;
        if let Err(Fail::Disk(e)) = result {
            return Err(e);
        }
        // Read the blob to its end: its digest decides whether it is what was signed.
        let drained = io::copy(&mut rest, &mut io::sink());
        let source = rest.into_inner();
        if let Some(e) = source.error {
            return Err(UnpackError::Read { layer: layer.digest, source: e });
        }
        if let Err(e) = drained {
            return Err(UnpackError::Read { layer: layer.digest, source: e });
        }
        let actual_size = source.count;
        let actual = if hash { source.hasher.finish() } else { layer.digest };
        if actual != layer.digest || actual_size != layer.size {
            return Err(UnpackError::LayerDigest {
                layer: layer.digest,
                expected_size: layer.size,
                actual,
                actual_size,
            });
        }
        match result {
            Ok(()) => Ok(()),
            Err(Fail::Read(e)) => Err(UnpackError::Corrupt {
                layer: layer.digest,
                reason: format!("not a readable tar+zstd stream: {e}"),
            }),
            Err(Fail::Content(e) | Fail::Disk(e)) => Err(e),
        }
    }

    /// Applies the directory modes, syncs every directory, and compares the tree with the
    /// config.
    pub fn finish(self) -> Result<UnpackStats, UnpackError> {
        if self.next != self.layers.len() {
            return Err(UnpackError::Io {
                path: self.dest_path.clone(),
                source: io::Error::other(format!("{} of {} layers were applied", self.next, self.layers.len())),
            });
        }
        // Deepest first: a directory's mode may forbid what its children need.
        for (path, mode) in self.dirs.iter().rev() {
            let rel = RelPath::parse(path).expect("recorded paths are RelPaths");
            let fd = self.open_dir(&rel).map_err(|f| match f {
                DirFail::Refused(r) => io_error(self.dest_path.join(path), io::Error::other(r)),
                DirFail::Disk(e) => e,
            })?;
            rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(mode.bits()))
                .map_err(|e| io_error(self.dest_path.join(path), e))?;
        }
        // One syncfs for the whole tree: as durable as an fsync per file and directory,
        // without a journal commit per file.
        rustix::fs::syncfs(&self.dest).map_err(|e| io_error(self.dest_path.clone(), e))?;
        let mismatches = compare_tree(&self.dest, &self.dest_path, self.config, &[], &self.written)?;
        if let Some(first) = mismatches.first() {
            let more = match mismatches.len() {
                1 => String::new(),
                n => format!(" (and {} more differences)", n - 1),
            };
            return Err(UnpackError::Mismatch { path: first.path.clone(), reason: format!("{}{more}", first.problem) });
        }
        Ok(self.stats)
    }

    fn read_entries<R: Read>(
        &mut self,
        archive: &mut tar::Archive<Forward<R>>,
        state: &mut LayerState,
    ) -> Result<(), Fail> {
        read_entries(archive, state.digest, |entry, ext| self.apply_entry(entry, ext, state))?;
        self.settle()
    }

    /// Waits for the digests of the files still being hashed: records them as written and
    /// checks them against the signed ones. Called at the end of a layer and before a path
    /// is forgotten (so that a digest never lands after its file was removed).
    fn settle(&mut self) -> Result<(), Fail> {
        self.send_batch()?;
        while let Some(p) = self.pending.pop_front() {
            let digest = self.hash_thread.as_mut().and_then(HashThread::next_digest).ok_or_else(|| {
                Fail::Disk(io_error(self.dest_path.join(&p.path), io::Error::other("the hashing thread stopped")))
            })?;
            self.written.insert(p.path.clone(), (digest, p.size));
            check_digest(&p.path, digest, p.expected)?;
        }
        Ok(())
    }

    /// Hands the small files written since the last batch to the hash thread.
    fn send_batch(&mut self) -> Result<(), Fail> {
        let (Some(h), Some(b)) = (self.hash_thread.as_mut(), self.batch.take()) else { return Ok(()) };
        if b.lens.is_empty() || h.files(b.buf, b.lens) {
            return Ok(());
        }
        Err(Fail::Disk(io_error(self.dest_path.clone(), io::Error::other("the hashing thread stopped"))))
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        ext: Extensions,
        state: &mut LayerState,
    ) -> Result<(), Fail> {
        let rules = Rules {
            config: self.config,
            budget: self.budget,
            layers: self.layers.len(),
            entries: self.stats.entries,
            bytes: self.stats.bytes,
        };
        let Checked { path, shown, kind, mode, size, link, patch, signed } =
            match check_entry(&rules, entry, ext, state)? {
                Step::Whiteout { entry, target } => {
                    self.stats.entries += 1;
                    return self.whiteout(&entry, &target, state);
                }
                Step::Entry(c) => c,
            };
        let layer = state.digest;
        let refuse = |reason: String| Fail::Content(UnpackError::Unsafe { layer, entry: shown.clone(), reason });

        let parent = self.open_parent(&path).map_err(|f| match f {
            DirFail::Refused(r) => refuse(r),
            DirFail::Disk(e) => Fail::Disk(e),
        })?;
        let reference = match patch {
            Some(_) => Some(self.reference(&parent, &path, state)?),
            None => None,
        };
        let dir_kept = self.clear(&parent, &path, kind, state)?;
        let name = cstr(path.file_name());
        let disk = |e: rustix::io::Errno| Fail::Disk(io_error(self.dest_path.join(path.as_str()), e));
        self.stats.entries += 1;
        match kind {
            EntryKind::Dir => {
                if !dir_kept {
                    rustix::fs::mkdirat(&parent, &name, rustix::fs::Mode::from_raw_mode(0o700)).map_err(disk)?;
                    let fd = rustix::fs::openat(
                        &parent,
                        &name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        rustix::fs::Mode::empty(),
                    )
                    .map_err(disk)?;
                    // Whatever the umask: owner access until the final modes are applied.
                    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700)).map_err(disk)?;
                }
                self.dirs.insert(path.as_str().to_owned(), mode);
            }
            EntryKind::Symlink => {
                rustix::fs::symlinkat(link.as_deref().unwrap_or_default(), &parent, &name).map_err(disk)?;
            }
            EntryKind::File => {
                let digest = match (patch, reference) {
                    (Some((body, old_size)), Some(reference)) => Some(self.write_patched(
                        &parent,
                        &name,
                        &path,
                        mode,
                        size,
                        (body, old_size, reference),
                        entry,
                        state,
                    )?),
                    _ => self.write_file(&parent, &name, &path, mode, size, entry, state)?,
                };
                let expected = state.last.then(|| signed.and_then(|e| e.sha256));
                match digest {
                    Some(digest) => check_digest(path.as_str(), digest, expected)?,
                    None => self.pending.push_back(Pending { path: path.as_str().to_owned(), size, expected }),
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &CStr,
        path: &RelPath,
        mode: Mode,
        size: u64,
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState,
    ) -> Result<Option<Digest>, Fail> {
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.disk(path, e.into()))?;
        let mut file = File::from(fd);
        // Hashed by the hash thread (here only when it cannot start): one read's worth or
        // less in a batch with other small files, a larger file as it is written. Either
        // way its digest is settled with the others (see `settle`).
        if self.hash_thread.is_none() {
            self.hash_thread = HashThread::start(CHUNK);
        }
        let digest = if self.hash_thread.is_none() {
            Some(self.write_hashed(&mut file, path, size, entry, state)?)
        } else if size <= CHUNK as u64 {
            self.write_batched(&mut file, path, size as usize, entry, state)?;
            None
        } else {
            self.write_pieces(&mut file, path, size, entry, state)?;
            None
        };
        file.set_permissions(std::fs::Permissions::from_mode(mode.bits())).map_err(|e| self.disk(path, e))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        if let Some(d) = digest {
            self.written.insert(path.as_str().to_owned(), (d, size));
        }
        Ok(digest)
    }

    fn disk(&self, path: &RelPath, e: io::Error) -> Fail {
        Fail::Disk(io_error(self.dest_path.join(path.as_str()), e))
    }

    fn stopped(&self, path: &RelPath) -> Fail {
        self.disk(path, io::Error::other("the hashing thread stopped"))
    }

    /// Reads the next piece of `path`'s data (`done` of `size` bytes so far) into `buf`.
    fn read_piece(
        entry: &mut impl Read,
        buf: &mut [u8],
        path: &RelPath,
        done: u64,
        size: u64,
        state: &LayerState,
    ) -> Result<usize, Fail> {
        match read_chunk(entry, buf) {
            Ok(0) => Err(Fail::Content(UnpackError::Corrupt {
                layer: state.digest,
                reason: format!("the archive ends inside {path}: {done} of {size} bytes"),
            })),
            Ok(n) => Ok(n),
            Err(e) => Err(Fail::Read(e)),
        }
    }

    /// Writes a file of one read's worth or less into `file` from the batch of small files
    /// for the hash thread.
    fn write_batched(
        &mut self,
        file: &mut File,
        path: &RelPath,
        size: usize,
        entry: &mut impl Read,
        state: &LayerState,
    ) -> Result<(), Fail> {
        if self.batch.as_ref().is_some_and(|b| b.buf.len() - b.used < size) {
            self.send_batch()?;
        }
        let Some(h) = self.hash_thread.as_mut() else { return Err(self.stopped(path)) };
        let b = self.batch.get_or_insert_with(|| Batch { buf: h.buffer(), used: 0, lens: Vec::new() });
        let mut done = 0;
        while done < size {
            done += Self::read_piece(
                entry,
                &mut b.buf[b.used + done..b.used + size],
                path,
                done as u64,
                size as u64,
                state,
            )?;
        }
        let written = file.write_all(&b.buf[b.used..b.used + size]);
        b.used += size;
        b.lens.push(size);
        written.map_err(|e| self.disk(path, e))
    }

    /// Writes a larger file into `file` piece by piece, each handed to the hash thread as
    /// written (after the small files before it, in order).
    fn write_pieces(
        &mut self,
        file: &mut File,
        path: &RelPath,
        size: u64,
        entry: &mut impl Read,
        state: &LayerState,
    ) -> Result<(), Fail> {
        self.send_batch()?;
        let mut left = size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let Some(mut buf) = self.hash_thread.as_mut().map(HashThread::buffer) else {
                return Err(self.stopped(path));
            };
            // (After an error the unpacker is dropped: a buffer lost here is not missed.)
            let n = Self::read_piece(entry, &mut buf[..want], path, size - left, size, state)?;
            file.write_all(&buf[..n]).map_err(|e| self.disk(path, e))?;
            if !self.hash_thread.as_mut().is_some_and(|h| h.data(buf, n)) {
                return Err(self.stopped(path));
            }
            left -= n as u64;
        }
        let ended = self.hash_thread.as_mut().is_some_and(HashThread::end);
        if ended { Ok(()) } else { Err(self.stopped(path)) }
    }

    /// Writes `path` into `file` and hashes it here (when no hash thread could start).
    fn write_hashed(
        &mut self,
        file: &mut File,
        path: &RelPath,
        size: u64,
        entry: &mut impl Read,
        state: &mut LayerState,
    ) -> Result<Digest, Fail> {
        let mut hasher = Hasher::new();
        // (After an error the unpacker is dropped: the buffer is not put back then.)
        let mut buf = std::mem::take(&mut state.buf);
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = Self::read_piece(entry, &mut buf[..want], path, size - left, size, state)?;
            file.write_all(&buf[..n]).map_err(|e| self.disk(path, e))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        state.buf = buf;
        Ok(hasher.finish())
    }

    /// The file a patch at `path` applies to: the one the tree below holds there, a
    /// regular file (opened without following a symlink).
    fn reference(&self, parent: &OwnedFd, path: &RelPath, state: &LayerState) -> Result<File, Fail> {
        let name = cstr(path.file_name());
        let regular = |fd: OwnedFd| {
            let st = rustix::fs::fstat(&fd).map_err(|e| Fail::Disk(io_error(self.dest_path.join(path.as_str()), e)))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(self.unsafe_(state, path, "is a patch, but what the tree below holds there is not a file"));
            }
            Ok(File::from(fd))
        };
        match rustix::fs::openat(
            parent,
            &name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => regular(fd),
            Err(rustix::io::Errno::NOENT) if let Some(fd) = self.in_base(path) => regular(fd),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => Err(self.unsafe_(
                state,
                path,
                "is a patch against the parent's version of the file, but the tree below holds no file there",
            )),
            Err(e) => Err(Fail::Disk(io_error(self.dest_path.join(path.as_str()), e))),
        }
    }

    /// `path` in the base tree (see [`Unpacker::over_base`]), opened read-only without
    /// following a symlink in it or on the way.
    fn in_base(&self, path: &RelPath) -> Option<OwnedFd> {
        let base = self.base.as_ref()?;
        let dir = match path.parent() {
            Some(p) => fsx::open_beneath(base, p.components()).ok()?,
            None => base.try_clone().ok()?,
        };
        rustix::fs::openat(
            &dir,
            cstr(path.file_name()).as_c_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            rustix::fs::Mode::empty(),
        )
        .ok()
    }

    /// Writes the file a patch makes from `reference` (see [`crate::patch`]); hashed as written.
    #[allow(clippy::too_many_arguments)]
    fn write_patched<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &CStr,
        path: &RelPath,
        mode: Mode,
        size: u64,
        (body, old_size, mut reference): (u64, u64, File),
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState,
    ) -> Result<Digest, Fail> {
        let full = self.dest_path.join(path.as_str());
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Fail::Disk(io_error(full.clone(), e)))?;
        let mut out = io::BufWriter::with_capacity(CHUNK, File::from(fd));
        let applied = crate::patch::apply_body(entry, body, old_size, &mut reference, size, &mut out);
        let (digest, _) = applied.map_err(|e| match e {
            crate::patch::PatchError::Malformed(r) => self.unsafe_(state, path, &r),
            e @ crate::patch::PatchError::Reference { .. } => {
                Fail::Content(UnpackError::Mismatch { path: path.to_string(), reason: e.to_string() })
            }
            crate::patch::PatchError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => Fail::Read(e),
            crate::patch::PatchError::Io(e) => Fail::Disk(io_error(full.clone(), e)),
        })?;
        let file = out.into_inner().map_err(|e| Fail::Disk(io_error(full.clone(), e.into_error())))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode.bits()))
            .map_err(|e| Fail::Disk(io_error(full, e)))?;
        self.written.insert(path.as_str().to_owned(), (digest, size));
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(digest)
    }

    /// Removes what a lower layer left at `path` so that an entry of `kind` can take its
    /// place; an existing directory stays for a directory entry.
    /// Returns whether a directory was kept.
    fn clear(&mut self, parent: &OwnedFd, path: &RelPath, kind: EntryKind, state: &LayerState) -> Result<bool, Fail> {
        if state.first {
            // `dest` started empty and this layer writes each path once (duplicates are refused).
            return Ok(false);
        }
        let name = cstr(path.file_name());
        let full = self.dest_path.join(path.as_str());
        let st = match rustix::fs::statat(parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(Fail::Disk(io_error(full, e))),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if kind == EntryKind::Dir {
                return Ok(true);
            }
            let prefix = format!("{path}/");
            if state.seen.range(prefix.clone()..).next().is_some_and(|k| k.starts_with(&prefix)) {
                return Err(self.unsafe_(state, path, "replaces a directory whose contents this layer wrote"));
            }
            self.parent_cache.replace(None);
            remove_tree(parent.as_fd(), &name).map_err(|e| Fail::Disk(io_error(full, e)))?;
        } else {
            rustix::fs::unlinkat(parent, &name, AtFlags::empty()).map_err(|e| Fail::Disk(io_error(full, e)))?;
        }
        self.settle()?;
        forget(&mut self.written, path.as_str());
        forget(&mut self.dirs, path.as_str());
        Ok(false)
    }

    /// Applies the whiteout entry `wh` (`DIR/.wh.NAME`): removes `target`, `DIR/NAME`
    /// ([`whiteout_target`]).
    fn whiteout(&mut self, wh: &RelPath, target: &RelPath, state: &LayerState) -> Result<(), Fail> {
        let parent = self.open_parent(target).map_err(|f| match f {
            DirFail::Refused(_) => self.unsafe_(state, wh, &format!("whites out {target}, which is not present")),
            DirFail::Disk(e) => Fail::Disk(e),
        })?;
        let cname = cstr(target.file_name());
        let full = self.dest_path.join(target.as_str());
        let st = match rustix::fs::statat(&parent, &cname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // A file left out of the copy of the base: nothing to remove.
            Err(rustix::io::Errno::NOENT) if self.in_base(target).is_some() => return Ok(()),
            Err(rustix::io::Errno::NOENT) => {
                return Err(self.unsafe_(state, wh, &format!("whites out {target}, which is not present")));
            }
            Err(e) => return Err(Fail::Disk(io_error(full, e))),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            self.parent_cache.replace(None);
            remove_tree(parent.as_fd(), &cname).map_err(|e| Fail::Disk(io_error(full, e)))?;
        } else {
            rustix::fs::unlinkat(&parent, &cname, AtFlags::empty()).map_err(|e| Fail::Disk(io_error(full, e)))?;
        }
        self.settle()?;
        forget(&mut self.written, target.as_str());
        forget(&mut self.dirs, target.as_str());
        Ok(())
    }

    fn unsafe_(&self, state: &LayerState, entry: &RelPath, reason: &str) -> Fail {
        Fail::Content(UnpackError::Unsafe { layer: state.digest, entry: entry.to_string(), reason: reason.to_owned() })
    }

    /// Opens the directory holding `path` (or reuses the one the last entry went into).
    fn open_parent(&self, path: &RelPath) -> Result<Rc<OwnedFd>, DirFail> {
        let key = path.parent().map(|p| p.to_string()).unwrap_or_default();
        if let Some((k, fd)) = &*self.parent_cache.borrow()
            && *k == key
        {
            return Ok(fd.clone());
        }
        let fd = Rc::new(match path.parent() {
            Some(p) => self.open_dir(&p)?,
            None => self.dest.try_clone().map_err(|e| DirFail::Disk(io_error(self.dest_path.clone(), e)))?,
        });
        *self.parent_cache.borrow_mut() = Some((key, fd.clone()));
        Ok(fd)
    }

    /// Opens the directory `dir` beneath `dest` one component at a time, never following a
    /// symlink: whatever was created before, nothing outside `dest` can be reached.
    fn open_dir(&self, dir: &RelPath) -> Result<OwnedFd, DirFail> {
        fsx::open_beneath(&self.dest, dir.components()).map_err(|e| match e {
            fsx::BeneathError::Missing { at } => DirFail::Refused(format!("its directory {at} is not present")),
            fsx::BeneathError::NotADirectory { at } => DirFail::Refused(format!(
                "{at} is not a directory (a symlink or a file): nothing is written through it"
            )),
            fsx::BeneathError::Io { at, source } => DirFail::Disk(io_error(self.dest_path.join(at), source)),
        })
    }
}

/// What the unpacker's rules need besides the layer: the signed manifest, its budget, and
/// what the layers before this one applied.
struct Rules<'c> {
    config: &'c StageConfig,
    budget: Budget,
    /// The image's layer count.
    layers: usize,
    /// Entries and content bytes the image's layers applied before this entry.
    entries: u64,
    bytes: u64,
}

/// A tar entry that passed the checks that need no tree: what to do with it.
enum Step<'c> {
    /// A whiteout `entry` removing `target`.
    Whiteout {
        entry: RelPath,
        target: RelPath,
    },
    Entry(Checked<'c>),
}

/// An entry that passed [`check_entry`].
struct Checked<'c> {
    path: RelPath,
    /// The name as the archive spells it, for messages.
    shown: String,
    kind: EntryKind,
    mode: Mode,
    /// The file's size (for a patch, the size of the file it makes).
    size: u64,
    link: Option<String>,
    /// A patch: its body's length and the size of the file it applies to; the patch
    /// header has been read from the entry.
    patch: Option<(u64, u64)>,
    /// The signed entry at this path.
    signed: Option<&'c crate::manifest::Entry>,
}

/// Every check of an entry that needs no tree (see the module's table): its name, type,
/// size, mode, link text, budgets, and, in the last layer, the signed manifest. Counts the
/// entry and its bytes in `state`. The unpacker and [`check::LayerCheck`] share it.
fn check_entry<'c, R: Read>(
    rules: &Rules<'c>,
    entry: &mut tar::Entry<'_, R>,
    ext: Extensions,
    state: &mut LayerState,
) -> Result<Step<'c>, Fail> {
    let header = entry.header().clone();
    let raw_path = match ext.pax_path.or(ext.long_name) {
        Some(p) => p,
        None => header.path_bytes().into_owned(),
    };
    let shown = String::from_utf8_lossy(&raw_path).into_owned();
    let layer = state.digest;
    let refuse = |reason: String| Fail::Content(UnpackError::Unsafe { layer, entry: shown.clone(), reason });

    let kind = match header.entry_type() {
        tar::EntryType::Regular => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        other => {
            let what = match other {
                tar::EntryType::Link => {
                    let target = header.link_name_bytes().unwrap_or_default();
                    format!("hard link to {:?}", String::from_utf8_lossy(&target))
                }
                tar::EntryType::Char => "character device".into(),
                tar::EntryType::Block => "block device".into(),
                tar::EntryType::Fifo => "FIFO".into(),
                tar::EntryType::GNUSparse => "GNU sparse file".into(),
                other => format!("entry of type {:?}", other.as_byte() as char),
            };
            return Err(refuse(format!("is a {what}; only regular files, directories and symlinks are staged")));
        }
    };
    let path = entry_path(&raw_path, kind == EntryKind::Dir).map_err(&refuse)?;
    let size = entry.size();
    if ext.pax_size.is_some_and(|s| s != size) {
        return Err(refuse(format!("its pax size differs from its header size ({size})")));
    }
    // A patch: the header's size is the patch's; the file's is in the patch header.
    let (size, patch) = if ext.patch {
        if kind != EntryKind::File || !state.patches {
            return Err(refuse(format!(
                "a patch is a regular file of a {TAR_PATCH_MEDIA_TYPE} layer, not a {} of a {} layer",
                kind_name(kind),
                if state.patches { TAR_PATCH_MEDIA_TYPE } else { TAR_ZSTD_MEDIA_TYPE }
            )));
        }
        if size < crate::patch::HEADER {
            return Err(refuse(format!("a patch of {size} bytes, shorter than its header")));
        }
        let mut h = [0u8; crate::patch::HEADER as usize];
        entry.read_exact(&mut h).map_err(Fail::Read)?;
        let (old_size, new_size) = crate::patch::parse_header(&h).map_err(|e| refuse(e.to_string()))?;
        if size > crate::patch::max_patch_len(new_size) {
            return Err(refuse(format!("a patch of {size} bytes for a file of {new_size} bytes")));
        }
        (new_size, Some((size - crate::patch::HEADER, old_size)))
    } else {
        (size, None)
    };
    state.entries += 1;
    if state.entries > rules.budget.layer_entries || rules.entries >= rules.budget.image_entries {
        return Err(refuse(format!(
            "more entries than the signed manifest allows: at most {} in a layer and {} across all {} \
             layers (the {} it declares, times the layers, plus {SLACK_ENTRIES})",
            rules.budget.layer_entries,
            rules.budget.image_entries,
            rules.layers,
            rules.config.entries.len()
        )));
    }
    let bits = header.mode().map_err(|e| refuse(format!("unreadable mode: {e}")))?;
    let mode = Mode::new(bits).ok_or_else(|| refuse(format!("mode {bits:o} has bits beyond 07777")))?;

    if path.file_name().starts_with(WHITEOUT_PREFIX) {
        if kind != EntryKind::File || size != 0 {
            return Err(refuse("a whiteout must be an empty regular file".into()));
        }
        state.seen.insert(path.as_str().to_owned());
        let target = whiteout_target(&path, state)?;
        return Ok(Step::Whiteout { entry: path, target });
    }

    if !state.seen.insert(path.as_str().to_owned()) {
        return Err(refuse("appears twice in this layer".into()));
    }
    let link = match kind {
        EntryKind::Symlink => {
            let raw = match ext.pax_link.or(ext.long_link) {
                Some(l) => l,
                None => header.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default(),
            };
            if raw.contains(&0) {
                return Err(refuse("its link text has a NUL byte".into()));
            }
            let text = String::from_utf8(raw).map_err(|_| refuse("its link text is not UTF-8".into()))?;
            confine_link(&path, &text).map_err(|e| refuse(e.to_string()))?;
            Some(text)
        }
        _ => None,
    };
    if kind != EntryKind::File && size != 0 {
        return Err(refuse(format!("a {} carrying {size} data bytes", kind_name(kind))));
    }
    if mode.is_special() && !rules.config.files.iter().any(|f| f.path == path && f.mode == Some(mode)) {
        return Err(refuse(format!("mode {mode} has setuid, setgid or sticky bits the manifest does not declare")));
    }
    if kind == EntryKind::File && size > state.max_file_size {
        return Err(refuse(if state.last {
            format!(
                "declares {size} bytes, more than the largest file of the signed manifest ({} bytes)",
                state.max_file_size
            )
        } else {
            format!(
                "declares {size} bytes, more than the largest file of the signed manifest and {LOWER_LAYER_RATIO} times its layer's size ({} bytes)",
                state.max_file_size
            )
        }));
    }
    if kind == EntryKind::File
        && (state.bytes.saturating_add(size) > rules.budget.layer_bytes
            || rules.bytes.saturating_add(size) > rules.budget.image_bytes)
    {
        return Err(refuse(format!(
            "more content bytes than the signed manifest allows: at most {} in a layer and {} across all \
             {} layers (the sum of the sizes it declares, times the layers, plus {SLACK_BYTES})",
            rules.budget.layer_bytes, rules.budget.image_bytes, rules.layers
        )));
    }
    state.bytes += size;
    let signed = rules.config.index_in_order(path.as_str(), &mut state.signed_next).map(|i| &rules.config.entries[i]);
    if state.last {
        let Some(e) = signed else {
            return Err(refuse("is not in the signed manifest".into()));
        };
        if e.kind != kind {
            return Err(refuse(format!(
                "is a {} but the signed manifest has a {}",
                kind_name(kind),
                kind_name(e.kind)
            )));
        }
        if e.mode != mode {
            return Err(refuse(format!("has mode {mode} but the signed manifest says {}", e.mode)));
        }
        if kind == EntryKind::File && e.size != Some(size) {
            return Err(refuse(format!(
                "declares {size} bytes but the signed manifest says {}",
                e.size.unwrap_or_default()
            )));
        }
        if kind == EntryKind::Symlink && e.link != link {
            return Err(refuse(format!(
                "links to {:?} but the signed manifest says {:?}",
                link.unwrap_or_default(),
                e.link.as_deref().unwrap_or_default()
            )));
        }
    }
    Ok(Step::Entry(Checked { path, shown, kind, mode, size, link, patch, signed }))
}

/// The path the whiteout `wh` (`DIR/.wh.NAME`) removes, `DIR/NAME`: never a nested or
/// opaque whiteout, never a path this layer wrote.
fn whiteout_target(wh: &RelPath, state: &LayerState) -> Result<RelPath, Fail> {
    let refuse =
        |reason: String| Fail::Content(UnpackError::Unsafe { layer: state.digest, entry: wh.to_string(), reason });
    let name = &wh.file_name()[WHITEOUT_PREFIX.len()..];
    if name.starts_with(WHITEOUT_PREFIX) {
        return Err(refuse("opaque and nested whiteouts are not used in op-dbus payloads".into()));
    }
    let target = match wh.parent() {
        Some(p) => p.join(name),
        None => RelPath::parse(name),
    }
    .map_err(|e| refuse(format!("bad whiteout name: {e}")))?;
    if holds_under(&state.seen, target.as_str()) {
        return Err(refuse(format!(
            "whites out {target}, which this layer wrote: a whiteout removes only what layers below hold"
        )));
    }
    Ok(target)
}

/// A tar stream as [`read_entries`] reads it. What an entry leaves unread (its padding,
/// data not opened) tar skips by seeking forward, which this does by reading into a
/// buffer kept for it: on a stream it cannot seek, tar's own skip zeroes a 32 KiB buffer
/// for every entry. Only forward seeks from the current position are possible.
pub(crate) struct Forward<R> {
    inner: R,
    /// Bytes read and skipped: the position tar keeps track of.
    pos: u64,
    scratch: Vec<u8>,
}

impl<R: Read> Forward<R> {
    pub(crate) fn new(inner: R) -> Self {
        Forward { inner, pos: 0, scratch: Vec::new() }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> io::Seek for Forward<R> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let backwards = || io::Error::new(io::ErrorKind::Unsupported, "a tar stream is only read forward");
        let io::SeekFrom::Current(by) = to else { return Err(backwards()) };
        let mut left = u64::try_from(by).map_err(|_| backwards())?;
        while left > 0 {
            if self.scratch.is_empty() {
                self.scratch = vec![0; 32 * 1024];
            }
            let want = left.min(self.scratch.len() as u64) as usize;
            match self.inner.read(&mut self.scratch[..want]) {
                Ok(0) => return Err(io::Error::other("unexpected EOF during skip")),
                Ok(n) => {
                    left -= n as u64;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.pos)
    }
}

/// Splits a layer's decompressed tar stream into entries: extension headers (GNU long
/// names and links, pax records) are read here, bounded, and handed to `apply` with the
/// entry they describe. The unpacker and [`check::LayerCheck`] share it.
fn read_entries<R: Read>(
    archive: &mut tar::Archive<Forward<R>>,
    layer: Digest,
    mut apply: impl FnMut(&mut tar::Entry<'_, Forward<R>>, Extensions) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let mut entries = archive.entries_with_seek().map_err(Fail::Read)?.raw(true);
    let mut ext = Extensions::default();
    let mut index = 0u64;
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(Fail::Read)?;
        index += 1;
        let kind = entry.header().entry_type();
        let refuse = |what: &str, reason: String| {
            Fail::Content(UnpackError::Unsafe { layer, entry: format!("#{index} ({what})"), reason })
        };
        let bounded = |entry: &mut tar::Entry<'_, Forward<R>>, what: &str, max: u64| -> Result<Vec<u8>, Fail> {
            let size = entry.size();
            if size > max {
                return Err(refuse(what, format!("header of {size} bytes (at most {max})")));
            }
            let data = read_up_to(entry, size).map_err(Fail::Read)?;
            if data.len() as u64 != size {
                return Err(refuse(what, "the archive ends inside it".into()));
            }
            Ok(data)
        };
        match kind {
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                let what = if kind == tar::EntryType::GNULongName { "GNU long name" } else { "GNU long link" };
                let mut data = bounded(&mut entry, what, MAX_PATH as u64 + 1)?;
                if data.last() == Some(&0) {
                    data.pop();
                }
                let slot = if kind == tar::EntryType::GNULongName { &mut ext.long_name } else { &mut ext.long_link };
                if slot.replace(data).is_some() {
                    return Err(refuse(what, "two such headers describe one entry".into()));
                }
                ext.pending = true;
            }
            tar::EntryType::XHeader => {
                let data = bounded(&mut entry, "pax header", MAX_PAX)?;
                if ext.pax_path.is_some() || ext.pax_link.is_some() || ext.pax_size.is_some() || ext.patch {
                    return Err(refuse("pax header", "two pax headers describe one entry".into()));
                }
                parse_pax(&data, &mut ext).map_err(|r| refuse("pax header", r))?;
                ext.pending = true;
            }
            tar::EntryType::XGlobalHeader => {
                // Global records (comments, defaults) change nothing checked here.
                bounded(&mut entry, "pax global header", MAX_PAX)?;
            }
            _ => {
                let ext = std::mem::take(&mut ext);
                apply(&mut entry, ext)?;
            }
        }
    }
    if ext.pending {
        return Err(Fail::Content(UnpackError::Unsafe {
            layer,
            entry: format!("#{index}"),
            reason: "extension header at the end of the archive, describing no entry".into(),
        }));
    }
    Ok(())
}

/// Parses a local pax header into `ext`: `path`, `linkpath` and `size` are used, sparse
/// files refused, other records (times, owners, xattrs) ignored.
fn parse_pax(data: &[u8], ext: &mut Extensions) -> Result<(), String> {
    for rec in tar::PaxExtensions::new(data) {
        let rec = rec.map_err(|e| format!("malformed pax record: {e}"))?;
        let key = rec.key_bytes();
        match key {
            b"path" => ext.pax_path = Some(rec.value_bytes().to_vec()),
            b"linkpath" => ext.pax_link = Some(rec.value_bytes().to_vec()),
            b"size" => {
                let v = rec.value().ok().and_then(|v| v.parse::<u64>().ok());
                ext.pax_size = Some(v.ok_or("malformed pax size")?);
            }
            k if k == crate::patch::PAX_KEY.as_bytes() => {
                if rec.value_bytes() != crate::patch::PAX_VALUE.as_bytes() {
                    return Err(format!("unknown patch format {:?}", String::from_utf8_lossy(rec.value_bytes())));
                }
                ext.patch = true;
            }
            k if k.starts_with(b"GNU.sparse.") => return Err("describes a GNU sparse file".into()),
            _ => {}
        }
    }
    Ok(())
}

/// The stage path of an entry from its raw name bytes.
fn entry_path(raw: &[u8], is_dir: bool) -> Result<RelPath, String> {
    if raw.contains(&0) {
        return Err("its name has a NUL byte".into());
    }
    let s = std::str::from_utf8(raw).map_err(|_| "its name is not UTF-8".to_owned())?;
    let s = if is_dir { s.strip_suffix('/').unwrap_or(s) } else { s };
    RelPath::parse(s).map_err(|e| e.to_string())
}

pub(crate) use fsx::list_dir;

/// Removes the directory `name` in `parent` and everything in it, without following links.
fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    fsx::remove_tree_at(parent, name, MAX_DEPTH + 2)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::time::{Duration, Instant};

    use tempfile::TempDir;

    use super::*;
    use crate::manifest::{Entry, StageDefinition};
    use crate::oci::BTRFS_ZSTD_MEDIA_TYPE;
    use crate::payload::{Compression, TarZstdWriter};
    use crate::test_data::noise;

    fn rel(s: &str) -> RelPath {
        s.parse().unwrap()
    }

    #[test]
    fn a_forward_stream_skips_by_reading_and_only_forward() {
        use std::io::{Seek, SeekFrom};
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut f = Forward::new(&data[..]);
        let mut two = [0u8; 2];
        f.read_exact(&mut two).unwrap();
        assert_eq!(f.stream_position().unwrap(), 2);
        assert_eq!(f.seek(SeekFrom::Current(70_000)).unwrap(), 70_002, "skips more than its buffer");
        f.read_exact(&mut two).unwrap();
        assert_eq!(two, [(70_002u32 as u8), (70_003u32 as u8)]);
        for back in [SeekFrom::Current(-1), SeekFrom::Start(0), SeekFrom::End(0)] {
            assert_eq!(f.seek(back).unwrap_err().kind(), io::ErrorKind::Unsupported);
        }
        let e = f.seek(SeekFrom::Current(40_000)).unwrap_err();
        assert!(e.to_string().contains("unexpected EOF"), "{e}");
    }

    fn m(bits: u32) -> Mode {
        Mode::new(bits).unwrap()
    }

    fn dir(p: &str, mode: u32) -> Entry {
        Entry { path: rel(p), kind: EntryKind::Dir, mode: m(mode), size: None, sha256: None, link: None }
    }

    fn file(p: &str, mode: u32, content: &[u8]) -> Entry {
        Entry {
            path: rel(p),
            kind: EntryKind::File,
            mode: m(mode),
            size: Some(content.len() as u64),
            sha256: Some(Digest::of(content)),
            link: None,
        }
    }

    fn link(p: &str, text: &str) -> Entry {
        Entry {
            path: rel(p),
            kind: EntryKind::Symlink,
            mode: m(0o777),
            size: None,
            sha256: None,
            link: Some(text.into()),
        }
    }

    /// A validated config of `entries`; `files` is extra manifest YAML (a `files:` list).
    fn config(mut entries: Vec<Entry>, files: &str) -> StageConfig {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let def = StageDefinition::parse(&format!("version: 1.0.0\n{files}"), Path::new("manifest.yaml")).unwrap();
        let c = StageConfig::from_definition("test-stage".parse().unwrap(), &def, entries);
        c.validate().unwrap();
        c
    }

    enum Op<'a> {
        Dir(&'a str, u32),
        File(&'a str, u32, &'a [u8]),
        Link(&'a str, &'a str),
        Whiteout(&'a str),
    }

    /// A payload as the builder writes it.
    fn payload(ops: &[Op<'_>]) -> Vec<u8> {
        let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers: 1 }).unwrap();
        for op in ops {
            match *op {
                Op::Dir(p, mode) => w.add_dir(&rel(p), m(mode)).unwrap(),
                Op::File(p, mode, c) => {
                    w.add_file(&rel(p), m(mode), c.len() as u64, c).unwrap();
                }
                Op::Link(p, t) => w.add_symlink(&rel(p), t).unwrap(),
                Op::Whiteout(p) => w.add_whiteout(&rel(p)).unwrap(),
            }
        }
        w.finish().unwrap().2
    }

    /// One hand-made tar entry; the name and link go into the header bytes as given.
    struct Raw {
        name: Vec<u8>,
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        link: Vec<u8>,
        data: Vec<u8>,
    }

    fn raw(name: impl AsRef<[u8]>, kind: tar::EntryType, mode: u32, data: &[u8]) -> Raw {
        Raw { name: name.as_ref().to_vec(), kind, mode, size: data.len() as u64, link: Vec::new(), data: data.to_vec() }
    }

    fn raw_file(name: impl AsRef<[u8]>, data: &[u8]) -> Raw {
        raw(name, tar::EntryType::Regular, 0o644, data)
    }

    fn raw_dir(name: &str) -> Raw {
        raw(name, tar::EntryType::Directory, 0o755, b"")
    }

    fn raw_link(name: &str, kind: tar::EntryType, target: impl AsRef<[u8]>) -> Raw {
        Raw { link: target.as_ref().to_vec(), ..raw(name, kind, 0o777, b"") }
    }

    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    fn raw_tar(entries: &[Raw]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..r.name.len()].copy_from_slice(&r.name);
            h.as_old_mut().linkname[..r.link.len()].copy_from_slice(&r.link);
            h.set_entry_type(r.kind);
            h.set_mode(r.mode);
            h.set_size(r.size);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&r.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn zst(tar: &[u8]) -> Vec<u8> {
        zstd::encode_all(tar, 3).unwrap()
    }

    /// A store, and `base/dest`: after any refusal `base` must hold `dest` alone.
    struct Env {
        _tmp: TempDir,
        layout: Layout,
        base: PathBuf,
        dest: PathBuf,
    }

    fn new_env() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(&tmp.path().join("store")).unwrap();
        let base = tmp.path().join("base");
        let dest = base.join("dest");
        fs::create_dir_all(&dest).unwrap();
        Env { _tmp: tmp, layout, base, dest }
    }

    impl Env {
        fn layer(&self, blob: &[u8]) -> Descriptor {
            let d = self.layout.write_blob(blob).unwrap();
            Descriptor::new(TAR_ZSTD_MEDIA_TYPE, d, blob.len() as u64)
        }

        fn unpack(&self, blobs: &[&[u8]], config: &StageConfig) -> Result<UnpackStats, UnpackError> {
            let layers: Vec<_> = blobs.iter().map(|b| self.layer(b)).collect();
            unpack_layers(&self.layout, &layers, config, &self.dest)
        }

        fn assert_contained(&self) {
            let names: Vec<_> = fs::read_dir(&self.base).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["dest"], "something was created outside dest");
        }
    }

    /// The config most refusal cases use: `d/`, `d/f` = "abc", `l` -> `d/f`.
    fn small_config() -> StageConfig {
        config(vec![dir("d", 0o755), file("d/f", 0o644, b"abc"), link("l", "d/f")], "")
    }

    fn good_raw() -> Vec<Raw> {
        vec![raw_dir("d/"), raw_file("d/f", b"abc"), raw_link("l", tar::EntryType::Symlink, "d/f")]
    }

    /// Unpacks one raw layer and expects a malformed-input refusal mentioning `expect`.
    fn refuse(entries: Vec<Raw>, config: &StageConfig, expect: &str) -> UnpackError {
        let env = new_env();
        let blob = zst(&raw_tar(&entries));
        let err = env.unpack(&[&blob], config).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        assert!(err.to_string().contains(expect), "expected {expect:?} in: {err}");
        env.assert_contained();
        err
    }

    /// A layer holding `d/` and `d/f` as a patch of `old` into `new`.
    fn patch_layer(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut patch = Vec::new();
        crate::patch::make(&mut io::Cursor::new(old), old.len() as u64, new, new.len() as u64, &mut patch).unwrap();
        let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers: 1 }).unwrap();
        w.add_dir(&rel("d"), m(0o755)).unwrap();
        w.add_patch(&rel("d/f"), m(0o644), patch.len() as u64, &patch[..]).unwrap();
        w.finish().unwrap().2
    }

    #[test]
    fn a_patch_applies_to_the_file_below_and_only_in_a_patch_layer() {
        let old = noise(200_000, 9);
        let mut new = old.clone();
        new[5000..5100].fill(1);
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o644, &new)], "");
        let base = payload(&[Op::Dir("d", 0o755), Op::File("d/f", 0o644, &old)]);
        let top = patch_layer(&old, &new);
        let env = new_env();
        let lower = env.layer(&base);
        let upper = env.layout.write_blob(&top).unwrap();
        let patch = Descriptor::new(TAR_PATCH_MEDIA_TYPE, upper, top.len() as u64);
        unpack_layers(&env.layout, &[lower.clone(), patch.clone()], &cfg, &env.dest).unwrap();
        assert_eq!(fs::read(env.dest.join("d/f")).unwrap(), new);

        // The same entries in a plain tar+zstd layer: refused.
        let env = new_env();
        let err = env.unpack(&[&base, &top], &cfg).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("a patch is a regular file of a"), "{err}");
        // Nothing below it: refused.
        let env = new_env();
        let upper = env.layout.write_blob(&top).unwrap();
        let alone = Descriptor::new(TAR_PATCH_MEDIA_TYPE, upper, top.len() as u64);
        let err = unpack_layers(&env.layout, &[alone], &cfg, &env.dest).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("holds no file there"), "{err}");
        // Onto a tree whose file differs: the result's hash is refused.
        let env = new_env();
        fs::create_dir(env.dest.join("d")).unwrap();
        let mut other = old.clone();
        other[100_000] ^= 1;
        fs::write(env.dest.join("d/f"), &other).unwrap();
        env.layout.write_blob(&top).unwrap();
        let mut u = Unpacker::over(&cfg, &env.dest, std::slice::from_ref(&patch)).unwrap();
        let err = u.apply_next(env.layout.open_blob(&patch.digest).unwrap()).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("d/f"), "{err}");
    }

    /// Over a copy that left out the file a patch replaces: the patch reads the base's
    /// file, copied files known by their hash are not read again (a wrong known hash is
    /// refused though the file on disk is right, which shows it is not re-read), and a
    /// base file that differs is refused by the result's hash.
    #[test]
    fn a_patch_over_a_partial_copy_reads_the_base_and_known_files_are_not_reread() {
        let old = noise(80_000, 7);
        let mut new = old.clone();
        new[300..400].fill(3);
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o644, &new), file("d/g", 0o644, b"same")], "");
        let top = patch_layer(&old, &new);
        let setup = |base_f: &[u8], known_g: Digest| {
            let env = new_env();
            let base = env.base.join("gen");
            fs::create_dir_all(base.join("d")).unwrap();
            fs::write(base.join("d/f"), base_f).unwrap();
            fs::write(base.join("d/g"), b"same").unwrap();
            fs::create_dir(env.dest.join("d")).unwrap();
            fs::set_permissions(env.dest.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
            fs::write(env.dest.join("d/g"), b"same").unwrap();
            fs::set_permissions(env.dest.join("d/g"), fs::Permissions::from_mode(0o644)).unwrap();
            let d = env.layout.write_blob(&top).unwrap();
            let patch = Descriptor::new(TAR_PATCH_MEDIA_TYPE, d, top.len() as u64);
            let known = BTreeMap::from([("d/g".to_owned(), (known_g, 4))]);
            let mut u = Unpacker::over_base(&cfg, &env.dest, std::slice::from_ref(&patch), &base, known).unwrap();
            let r = u.apply_next(env.layout.open_blob(&patch.digest).unwrap()).and_then(|()| u.finish().map(|_| ()));
            (env, r)
        };
        let (env, r) = setup(&old, Digest::of(b"same"));
        r.unwrap();
        assert_eq!(fs::read(env.dest.join("d/f")).unwrap(), new);
        let (_, r) = setup(&old, Digest::of(b"other"));
        let err = r.unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("d/g"), "{err}");
        let mut tampered = old.clone();
        tampered[50_000] ^= 1;
        let (_, r) = setup(&tampered, Digest::of(b"same"));
        let err = r.unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("d/f"), "{err}");
    }

    #[test]
    fn a_patch_never_applies_through_a_link_below_and_is_bounded_at_its_header() {
        let old: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut new = old.clone();
        new[100..200].fill(7);
        let env = new_env();
        let patch_desc = |env: &Env, top: &[u8]| {
            let d = env.layout.write_blob(top).unwrap();
            Descriptor::new(TAR_PATCH_MEDIA_TYPE, d, top.len() as u64)
        };
        // Below, d/f is a link to d/g, which holds the old bytes: the patch must not read
        // through it (the link could lead anywhere a lower layer pointed it).
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o644, &new), file("d/g", 0o644, &old)], "");
        let base = payload(&[Op::Dir("d", 0o755), Op::Link("d/f", "g"), Op::File("d/g", 0o644, &old)]);
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &patch_layer(&old, &new)));
        let err = unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("holds no file there"), "{err}");

        // Without the link, it applies, and counts as one more file written.
        let env = new_env();
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o644, &new)], "");
        let base = payload(&[Op::Dir("d", 0o755), Op::File("d/f", 0o644, &old)]);
        let mut patch = Vec::new();
        crate::patch::make(&mut io::Cursor::new(&old), old.len() as u64, &new[..], new.len() as u64, &mut patch)
            .unwrap();
        let patch_of = |bytes: &[u8]| {
            let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers: 1 }).unwrap();
            w.add_dir(&rel("d"), m(0o755)).unwrap();
            w.add_patch(&rel("d/f"), m(0o644), bytes.len() as u64, bytes).unwrap();
            w.finish().unwrap().2
        };
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &patch_of(&patch)));
        let stats = unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap();
        assert_eq!((stats.files, stats.bytes), (2, (old.len() + new.len()) as u64));
        // A patch whose frames stop short (a consistent entry, a cut patch): the layer is
        // corrupt, not the disk.
        let env = new_env();
        let cut = &patch[..patch.len() - 10];
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &patch_of(cut)));
        let err = unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        // A layer cut inside the patch (its descriptor names the cut bytes): the stream ends
        // early, which is the layer's fault, not the disk's.
        let env = new_env();
        let whole = patch_of(&patch);
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &whole[..whole.len() * 3 / 5]));
        let err = unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap_err();
        assert!(err.is_malformed(), "{err}");

        // A patch to an empty file is its header alone, the least a patch may be.
        let env = new_env();
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o644, b"")], "");
        let mut header_only = Vec::new();
        crate::patch::make(&mut io::Cursor::new(&old), old.len() as u64, &b""[..], 0, &mut header_only).unwrap();
        assert_eq!(header_only.len() as u64, crate::patch::HEADER);
        let top = {
            let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers: 1 }).unwrap();
            w.add_dir(&rel("d"), m(0o755)).unwrap();
            w.add_patch(&rel("d/f"), m(0o644), header_only.len() as u64, &header_only[..]).unwrap();
            w.finish().unwrap().2
        };
        let base = payload(&[Op::Dir("d", 0o755), Op::File("d/f", 0o644, &old)]);
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &top));
        unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap();
        assert_eq!(fs::read(env.dest.join("d/f")).unwrap(), b"");

        // One byte short of a header: refused at the header, as such.
        let env = new_env();
        let top = {
            let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers: 1 }).unwrap();
            w.add_dir(&rel("d"), m(0o755)).unwrap();
            w.add_patch(&rel("d/f"), m(0o644), crate::patch::HEADER - 1, &header_only[1..]).unwrap();
            w.finish().unwrap().2
        };
        let (lower, upper) = (env.layer(&base), patch_desc(&env, &top));
        let err = unpack_layers(&env.layout, &[lower, upper], &cfg, &env.dest).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains("shorter than its header"), "{err}");
    }

    #[test]
    fn good_image_round_trip() {
        let env = new_env();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let long = format!("web/{}", "x".repeat(150));
        let cfg = config(
            vec![
                dir("bin", 0o755),
                file("bin/tool", 0o4755, &big),
                link("bin/alias", "tool"),
                dir("etc", 0o750),
                dir("etc/op-dbus", 0o700),
                file("etc/op-dbus/state.json", 0o600, b"{}\n"),
                file("etc/op-dbus/empty", 0o644, b""),
                dir("web", 0o555),
                file(&long, 0o444, b"long"),
            ],
            "files:\n  - path: bin/tool\n    target: /usr/local/bin/tool\n    mode: 04755\n",
        );
        let blob = payload(&[
            Op::Dir("bin", 0o755),
            Op::Link("bin/alias", "tool"),
            Op::File("bin/tool", 0o4755, &big),
            Op::Dir("etc", 0o750),
            Op::Dir("etc/op-dbus", 0o700),
            Op::File("etc/op-dbus/empty", 0o644, b""),
            Op::File("etc/op-dbus/state.json", 0o600, b"{}\n"),
            Op::Dir("web", 0o555),
            Op::File(&long, 0o444, b"long"),
        ]);
        let stats = env.unpack(&[&blob], &cfg).unwrap();
        assert_eq!(stats, UnpackStats { files: 4, bytes: big.len() as u64 + 3 + 4, entries: 9 });
        let d = &env.dest;
        assert_eq!(fs::read(d.join("bin/tool")).unwrap(), big);
        assert_eq!(fs::symlink_metadata(d.join("bin/tool")).unwrap().mode() & 0o7777, 0o4755);
        assert_eq!(fs::symlink_metadata(d.join("etc")).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(fs::symlink_metadata(d.join("web")).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(fs::read_link(d.join("bin/alias")).unwrap(), Path::new("tool"));
        assert_eq!(fs::read(d.join(&long)).unwrap(), b"long");
        assert_eq!(check_tree(d, &cfg).unwrap(), []);
        env.assert_contained();
    }

    #[test]
    fn files_hashed_by_the_hash_thread_are_checked_like_the_others() {
        // Larger than one read: hashed by the hash thread, checked at the end of the layer.
        let big = noise(3 * CHUNK + 17, 1);
        let other = noise(CHUNK + 1, 2);
        let blob = payload(&[Op::File("a", 0o644, &big), Op::File("b", 0o644, &other), Op::File("c", 0o644, b"c")]);
        let good = config(vec![file("a", 0o644, &big), file("b", 0o644, &other), file("c", 0o644, b"c")], "");
        let env = new_env();
        env.unpack(&[&blob], &good).unwrap();
        assert_eq!(fs::read(env.dest.join("a")).unwrap(), big);
        assert_eq!(check_tree(&env.dest, &good).unwrap(), []);

        // The second large file is not what was signed: named, whatever came after it.
        let mut forged = other.clone();
        forged[CHUNK] ^= 1;
        let cfg = config(vec![file("a", 0o644, &big), file("b", 0o644, &forged), file("c", 0o644, b"c")], "");
        let err = new_env().unpack(&[&blob], &cfg).unwrap_err();
        assert!(matches!(&err, UnpackError::Mismatch { path, .. } if path == "b"), "{err}");

        // A large file of a lower layer, replaced and whited out by the next one: the
        // digests still pending are settled before the paths are forgotten.
        let base = payload(&[Op::File("a", 0o644, &big), Op::File("b", 0o644, &other)]);
        let delta = payload(&[Op::Whiteout("b"), Op::File("a", 0o644, &other)]);
        let cfg = config(vec![file("a", 0o644, &other)], "");
        let env = new_env();
        env.unpack(&[&base, &delta], &cfg).unwrap();
        assert_eq!(fs::read(env.dest.join("a")).unwrap(), other);
        assert!(!env.dest.join("b").exists());
    }

    #[test]
    fn delta_layers_with_whiteouts() {
        let env = new_env();
        let base = payload(&[
            Op::Dir("bin", 0o755),
            Op::File("bin/a", 0o600, b"one"),
            Op::File("bin/old", 0o644, b"old"),
            Op::File("k", 0o644, b"a file, later a directory"),
            Op::Dir("share", 0o755),
            Op::Dir("share/x", 0o755),
            Op::Dir("share/x/deep", 0o755),
            Op::File("share/x/deep/y", 0o644, b"y"),
            Op::Link("share/x/l", "deep/y"),
        ]);
        let delta = payload(&[
            Op::Whiteout("bin/old"),
            Op::Whiteout("k"),
            Op::Whiteout("share/x"),
            Op::File("bin/a", 0o644, b"two"),
            Op::File("bin/b", 0o755, b"b"),
            Op::Dir("k", 0o755),
            Op::File("k/f", 0o644, b"f"),
        ]);
        let cfg = config(
            vec![
                dir("bin", 0o755),
                file("bin/a", 0o644, b"two"),
                file("bin/b", 0o755, b"b"),
                dir("k", 0o755),
                file("k/f", 0o644, b"f"),
                dir("share", 0o755),
            ],
            "",
        );
        let stats = env.unpack(&[&base, &delta], &cfg).unwrap();
        assert_eq!(stats.entries, 9 + 7);
        assert_eq!(fs::read(env.dest.join("bin/a")).unwrap(), b"two");
        assert!(!env.dest.join("share/x").exists());
        assert!(!env.dest.join("bin/old").exists());
        assert_eq!(check_tree(&env.dest, &cfg).unwrap(), []);

        // A lower-layer path that no later layer whites out is an extra path.
        let env = new_env();
        let delta = payload(&[Op::Whiteout("k"), Op::Whiteout("share/x"), Op::File("bin/a", 0o644, b"two")]);
        let base = payload(&[
            Op::Dir("bin", 0o755),
            Op::File("bin/a", 0o644, b"one"),
            Op::File("bin/old", 0o644, b"old"),
            Op::File("k", 0o644, b""),
            Op::Dir("share", 0o755),
            Op::Dir("share/x", 0o755),
        ]);
        let cfg = config(vec![dir("bin", 0o755), file("bin/a", 0o644, b"two"), dir("share", 0o755)], "");
        let err = env.unpack(&[&base, &delta], &cfg).unwrap_err();
        assert!(matches!(&err, UnpackError::Mismatch { path, .. } if path == "bin/old"), "{err}");
        assert!(err.is_malformed());
    }

    #[test]
    fn refuses_unsafe_paths() {
        let cfg = small_config();
        let env_for_names = new_env();
        let abs = env_for_names.base.join("escape");
        for (name, expect) in [
            (b"../escape".to_vec(), "'..'"),
            (b"d/../../escape".to_vec(), "'..'"),
            (abs.as_os_str().as_encoded_bytes().to_vec(), "absolute"),
            (b"./d/f".to_vec(), "normalised"),
            (b"d//f".to_vec(), "normalised"),
            (b"d/\xff".to_vec(), "UTF-8"),
            (b"d\\..\\..\\escape".to_vec(), "backslash"),
        ] {
            let mut entries = good_raw();
            entries.push(raw_file(&name, b"abc"));
            refuse(entries, &cfg, expect);
        }
        // A NUL inside a GNU long name, and '..' from a pax path, override a harmless header name.
        let mut entries = good_raw();
        entries.push(raw("././@LongLink", tar::EntryType::GNULongName, 0o644, b"d/a\0b\0"));
        entries.push(raw_file("d/harmless", b"abc"));
        refuse(entries, &cfg, "NUL");
        let mut entries = good_raw();
        entries.push(raw("PaxHeader", tar::EntryType::XHeader, 0o644, &pax_record("path", "../escape")));
        entries.push(raw_file("d/harmless", b"abc"));
        refuse(entries, &cfg, "'..'");
        // An oversized long name is refused at its header, not read into memory.
        let mut entries = good_raw();
        entries.push(Raw { size: 1 << 30, ..raw("././@LongLink", tar::EntryType::GNULongName, 0o644, &[b'a'; 4096]) });
        refuse(entries, &cfg, "at most");
    }

    #[test]
    fn refuses_writes_through_symlinks() {
        let cfg = small_config();
        let env_for_names = new_env();
        let base = env_for_names.base.to_str().unwrap().to_owned();
        // Link texts that leave the stage are refused at their header.
        for target in ["../../base", "..", base.as_str(), "/etc"] {
            let mut entries = good_raw();
            entries[2] = raw_link("l", tar::EntryType::Symlink, target);
            entries.push(raw_file("l/pwned", b"abc"));
            refuse(entries, &cfg, "outside the stage");
        }
        // A confined link followed by a file under it, in a layer that is not the last (so
        // the manifest does not stop it): refused when its parent is opened, O_NOFOLLOW.
        let env = new_env();
        let first = zst(&raw_tar(&[raw_dir("d/"), raw_link("l", tar::EntryType::Symlink, "d"), raw_file("l/x", b"x")]));
        let last = zst(&raw_tar(&good_raw()));
        let err = env.unpack(&[&first, &last], &cfg).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(!env.dest.join("d/x").exists());
        env.assert_contained();
        // Even a link planted in dest behind the unpacker's back is never followed: the
        // directory entry fails on it (O_EXCL semantics of mkdirat), a file below it is refused.
        for entries in [good_raw(), vec![raw_file("d/f", b"abc")]] {
            let env = new_env();
            let blob = zst(&raw_tar(&entries));
            let layers = [env.layer(&blob)];
            let mut u = Unpacker::new(&cfg, &env.dest, &layers).unwrap();
            symlink(&env.base, env.dest.join("d")).unwrap();
            let err = u.apply_next(&blob[..]).unwrap_err();
            assert!(err.to_string().contains("not a directory") || err.to_string().contains("exists"), "{err}");
            fs::remove_file(env.dest.join("d")).ok();
            env.assert_contained();
        }
    }

    #[test]
    fn refuses_other_entry_types() {
        let cfg = small_config();
        for (r, expect) in [
            (raw_link("h", tar::EntryType::Link, "../escape"), "hard link"),
            (raw_link("h", tar::EntryType::Link, "/etc/passwd"), "hard link"),
            (raw_link("d/h", tar::EntryType::Link, "d/f"), "hard link"),
            (raw("c", tar::EntryType::Char, 0o644, b""), "character device"),
            (raw("b", tar::EntryType::Block, 0o644, b""), "block device"),
            (raw("p", tar::EntryType::Fifo, 0o644, b""), "FIFO"),
            (raw("s", tar::EntryType::GNUSparse, 0o644, b""), "sparse"),
        ] {
            let mut entries = good_raw();
            entries.insert(1, r);
            refuse(entries, &cfg, expect);
        }
    }

    #[test]
    fn refuses_what_the_manifest_does_not_say() {
        let cfg = small_config();
        let with = |i: usize, r: Raw| {
            let mut e = good_raw();
            e[i] = r;
            e
        };
        refuse(with(1, raw("d/f", tar::EntryType::Regular, 0o4644, b"abc")), &cfg, "setuid");
        refuse(with(1, raw("d/f", tar::EntryType::Regular, 0o600, b"abc")), &cfg, "mode 0600");
        refuse(with(1, raw_dir("d/f/")), &cfg, "is a directory but");
        refuse(with(1, raw_file("d/f", b"ab")), &cfg, "declares 2 bytes but the signed manifest says 3");
        refuse(with(1, raw_file("d/f", b"abcd")), &cfg, "more than the largest file");
        refuse(with(2, raw_link("l", tar::EntryType::Symlink, "d")), &cfg, "links to");
        let mut dup = good_raw();
        dup.push(raw_file("d/f", b"abc"));
        refuse(dup, &cfg, "twice");
        let mut extra = good_raw();
        extra.push(raw_file("d/extra", b"abc"));
        refuse(extra, &cfg, "not in the signed manifest");
        // Missing from the payload: found by the final comparison.
        let err = refuse(good_raw()[..2].iter().map(clone_raw).collect(), &cfg, "missing");
        assert!(matches!(err, UnpackError::Mismatch { .. }));
        // Same size, other bytes.
        let err = refuse(with(1, raw_file("d/f", b"abd")), &cfg, "hashes to");
        assert!(matches!(&err, UnpackError::Mismatch { path, .. } if path == "d/f"), "{err}");
    }

    fn clone_raw(r: &Raw) -> Raw {
        Raw { name: r.name.clone(), link: r.link.clone(), data: r.data.clone(), ..*r }
    }

    #[test]
    fn setuid_only_when_declared() {
        let files = "files:\n  - path: d/f\n    target: /usr/local/bin/f\n    mode: 04755\n";
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o4755, b"abc")], files);
        let env = new_env();
        let blob = zst(&raw_tar(&[raw_dir("d/"), raw("d/f", tar::EntryType::Regular, 0o4755, b"abc")]));
        env.unpack(&[&blob], &cfg).unwrap();
        assert_eq!(fs::metadata(env.dest.join("d/f")).unwrap().mode() & 0o7777, 0o4755);
        // Declared for another mode: still refused.
        let cfg = config(vec![dir("d", 0o755), file("d/f", 0o2755, b"abc")], &files.replace("04755", "0755"));
        refuse(vec![raw_dir("d/"), raw("d/f", tar::EntryType::Regular, 0o2755, b"abc")], &cfg, "setuid");
        // A directory's sticky bit needs a declaration too.
        refuse(vec![raw("d/", tar::EntryType::Directory, 0o1755, b"")], &small_config(), "sticky");
    }

    #[test]
    fn huge_declared_size_is_refused_at_the_header() {
        let start = Instant::now();
        let mut entries = good_raw();
        // Claims 1 GiB, carries 4 KiB: the check must not read it.
        entries[1] = Raw { size: 1 << 30, ..raw_file("d/f", &[0; 4096]) };
        let err = refuse(entries, &small_config(), "more than the largest file");
        assert!(matches!(err, UnpackError::Unsafe { .. }));
        // In a lower layer, which may hold larger old versions, a claim far beyond what
        // its blob could hold is refused just the same.
        let env = new_env();
        let lower = zst(&raw_tar(&[Raw { size: 1 << 30, ..raw_file("old", &[0; 4096]) }]));
        let err = env.unpack(&[&lower, &zst(&raw_tar(&good_raw()))], &small_config()).unwrap_err();
        assert!(err.to_string().contains("times its layer's size"), "{err}");
        env.assert_contained();
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn refuses_bad_whiteouts() {
        let cfg = small_config();
        let two = |delta: Vec<Raw>, expect: &str| {
            let env = new_env();
            let base = zst(&raw_tar(&good_raw()));
            let delta = zst(&raw_tar(&delta));
            let err = env.unpack(&[&base, &delta], &cfg).unwrap_err();
            assert!(err.is_malformed() && err.to_string().contains(expect), "expected {expect:?} in: {err}");
            env.assert_contained();
        };
        two(vec![raw_file("d/.wh.nothing", b"")], "not present");
        two(vec![raw_file("nodir/.wh.f", b"")], "not present");
        two(vec![raw_file("d/.wh.f", b"data")], "empty regular file");
        two(vec![raw("d/.wh.f/", tar::EntryType::Directory, 0o755, b"")], "empty regular file");
        two(vec![raw_file("d/.wh..wh..opq", b"")], "opaque");
        two(vec![raw_file(".wh...", b"")], "bad whiteout name");
        // A whiteout removes what lower layers hold, not what this layer wrote.
        two(vec![raw_file("d/f", b"abc"), raw_file("d/.wh.f", b"")], "this layer wrote");
        two(vec![raw_dir("d/"), raw_file("d/f", b"abc"), raw_file(".wh.d", b"")], "this layer wrote");
        // In the first layer there is nothing to white out.
        refuse(vec![raw_file(".wh.d", b"")], &cfg, "not present");
    }

    #[test]
    fn refuses_corrupt_layers() {
        let cfg = small_config();
        // Not zstd: the digest matches (it is what was signed), the content is unreadable.
        let env = new_env();
        let err = env.unpack(&[&raw_tar(&good_raw())], &cfg).unwrap_err();
        assert!(matches!(err, UnpackError::Corrupt { .. }) && err.is_malformed(), "{err}");
        env.assert_contained();
        // zstd of something that is not a tar.
        let env = new_env();
        let err = env.unpack(&[&zst(&[0x55; 2048])], &cfg).unwrap_err();
        assert!(matches!(err, UnpackError::Corrupt { .. }), "{err}");
        // A blob whose bytes are not the ones its descriptor names: a valid payload, but
        // another compression of it, then hostile content in its place.
        let tar = raw_tar(&good_raw());
        for other in [zstd::encode_all(&tar[..], 19).unwrap(), zst(&raw_tar(&[raw_file("../escape", b"x")]))] {
            let env = new_env();
            let signed = zst(&tar);
            assert_ne!(signed, other);
            let layer = env.layer(&signed);
            fs::write(env.layout.blob_path(&layer.digest), &other).unwrap();
            let err = unpack_layers(&env.layout, &[layer], &cfg, &env.dest).unwrap_err();
            assert!(matches!(err, UnpackError::LayerDigest { .. }) && err.is_malformed(), "{err}");
            env.assert_contained();
        }
        // Trailing bytes beyond the descriptor's size.
        let env = new_env();
        let signed = zst(&tar);
        let layer = env.layer(&signed);
        let mut longer = signed.clone();
        longer.extend_from_slice(&signed);
        fs::write(env.layout.blob_path(&layer.digest), &longer).unwrap();
        let err = unpack_layers(&env.layout, &[layer], &cfg, &env.dest).unwrap_err();
        assert!(matches!(err, UnpackError::LayerDigest { .. }), "{err}");
    }

    #[test]
    fn refuses_before_reading_when_it_cannot_apply() {
        let cfg = small_config();
        let env = new_env();
        let blob = zst(&raw_tar(&good_raw()));
        let mut layer = env.layer(&blob);
        layer.media_type = BTRFS_ZSTD_MEDIA_TYPE.into();
        let err = unpack_layers(&env.layout, &[layer], &cfg, &env.dest).unwrap_err();
        assert!(matches!(err, UnpackError::UnsupportedLayer { .. }) && !err.is_malformed(), "{err}");
        fs::write(env.dest.join("leftover"), b"").unwrap();
        let err = env.unpack(&[&blob], &cfg).unwrap_err();
        assert!(matches!(err, UnpackError::NotEmpty { .. }), "{err}");
        let missing = Descriptor::new(TAR_ZSTD_MEDIA_TYPE, Digest::of(b"nowhere"), 7);
        fs::remove_file(env.dest.join("leftover")).unwrap();
        let err = unpack_layers(&env.layout, &[missing], &cfg, &env.dest).unwrap_err();
        assert!(matches!(err, UnpackError::Layout(LayoutError::MissingBlob { .. })), "{err}");
    }

    #[test]
    fn full_disk_is_named() {
        let e = io_error(PathBuf::from("/gen/bin/x"), rustix::io::Errno::NOSPC);
        assert!(matches!(e, UnpackError::NoSpace { .. }));
        assert!(e.to_string().contains("/gen/bin/x") && e.to_string().contains("full"), "{e}");
        assert!(matches!(io_error(PathBuf::new(), rustix::io::Errno::DQUOT), UnpackError::NoSpace { .. }));
        assert!(!e.is_malformed());
    }

    #[test]
    fn check_tree_finds_differences_deep_in_a_wide_tree_whichever_thread_looks() {
        let env = new_env();
        let mut entries = Vec::new();
        let mut ops = Vec::new();
        let names: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
        let subs: Vec<String> = names.iter().flat_map(|n| (0..3).map(move |j| format!("{n}/s{j}"))).collect();
        let files: Vec<String> = subs.iter().map(|s| format!("{s}/f")).collect();
        for n in &names {
            entries.push(dir(n, 0o755));
            ops.push(Op::Dir(n, 0o755));
        }
        for s in &subs {
            entries.push(dir(s, 0o755));
            ops.push(Op::Dir(s, 0o755));
        }
        for f in &files {
            entries.push(file(f, 0o644, b"x"));
            ops.push(Op::File(f, 0o644, b"x"));
        }
        let cfg = config(entries, "");
        ops.sort_by_key(|o| match o {
            Op::Dir(p, _) | Op::File(p, _, _) | Op::Link(p, _) => p.to_string(),
            _ => String::new(),
        });
        env.unpack(&[&payload(&ops)], &cfg).unwrap();
        let d = &env.dest;
        for _ in 0..3 {
            assert_eq!(check_tree(d, &cfg).unwrap(), []);
        }
        fs::write(d.join("d07/s1/f"), b"y").unwrap();
        fs::remove_file(d.join("d33/s2/f")).unwrap();
        fs::write(d.join("d21/s0/extra"), b"").unwrap();
        fs::remove_dir_all(d.join("d12/s1")).unwrap();
        for _ in 0..3 {
            let found = check_tree(d, &cfg).unwrap();
            let paths: Vec<_> = found.iter().map(|m| m.path.as_str()).collect();
            // A directory gone is reported once, not its contents.
            assert_eq!(paths, ["d07/s1/f", "d12/s1", "d21/s0/extra", "d33/s2/f"], "{found:?}");
        }
    }

    #[test]
    fn check_tree_reports_every_difference() {
        let env = new_env();
        let cfg = config(
            vec![
                dir("d", 0o755),
                file("d/a", 0o644, b"alpha"),
                file("d/b", 0o644, b"bravo"),
                file("d/c", 0o755, b"charlie"),
                link("l", "d/a"),
            ],
            "",
        );
        let blob = payload(&[
            Op::Dir("d", 0o755),
            Op::File("d/a", 0o644, b"alpha"),
            Op::File("d/b", 0o644, b"bravo"),
            Op::File("d/c", 0o755, b"charlie"),
            Op::Link("l", "d/a"),
        ]);
        env.unpack(&[&blob], &cfg).unwrap();
        assert_eq!(check_tree(&env.dest, &cfg).unwrap(), []);
        let d = &env.dest;
        fs::write(d.join("d/a"), b"alphA").unwrap();
        fs::remove_file(d.join("d/b")).unwrap();
        fs::set_permissions(d.join("d/c"), fs::Permissions::from_mode(0o775)).unwrap();
        fs::write(d.join("d/extra"), b"").unwrap();
        fs::write(d.join("manifest.json"), b"{}").unwrap();
        let found = check_tree(d, &cfg).unwrap();
        let paths: Vec<_> = found.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["d/a", "d/b", "d/c", "d/extra", "manifest.json"], "{found:?}");
        assert!(found[0].problem.contains("hashes to"), "{}", found[0]);
        assert!(found[1].problem.contains("missing"), "{}", found[1]);
        assert!(found[2].problem.contains("mode is 0775"), "{}", found[2]);
        assert!(found[3].problem.contains("not in the signed manifest"), "{}", found[3]);
        assert_eq!(check_tree_ignoring(d, &cfg, &["manifest.json"]).unwrap().len(), 4);
        // A link with other text, a directory turned into a file (its children not listed).
        fs::remove_file(d.join("l")).unwrap();
        symlink("d/b", d.join("l")).unwrap();
        fs::remove_dir_all(d.join("d")).unwrap();
        fs::write(d.join("d"), b"").unwrap();
        let found = check_tree_ignoring(d, &cfg, &["manifest.json"]).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].problem.contains("is a regular file, expected a directory"), "{}", found[0]);
        assert!(found[1].problem.contains("links to"), "{}", found[1]);
    }

    #[test]
    fn forget_removes_a_subtree_only() {
        let mut map: BTreeMap<String, ()> =
            ["a", "a-b", "a/b", "a/b/c", "a0", "ab", "b"].iter().map(|k| (k.to_string(), ())).collect();
        forget(&mut map, "a");
        let keys: Vec<_> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a-b", "a0", "ab", "b"]);
        let set: BTreeSet<String> = ["a-b", "ab/c"].iter().map(|k| k.to_string()).collect();
        assert!(!holds_under(&set, "a"));
        assert!(holds_under(&set, "ab"));
    }

    /// Hands out a layer a few bytes at a time, interrupted before every read (a signal)
    /// and, when `fail_after` is set, failing once that many bytes were given.
    struct Bumpy<'a> {
        data: &'a [u8],
        interrupt: bool,
        fail_after: Option<usize>,
        given: usize,
    }

    impl Read for Bumpy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.fail_after.is_some_and(|n| self.given >= n) {
                return Err(io::Error::other("the disk went away"));
            }
            let n = buf.len().min(7).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.given += n;
            Ok(n)
        }
    }

    #[test]
    fn interrupted_reads_are_retried_and_failed_reads_are_not_corruption() {
        let env = new_env();
        let cfg = small_config();
        let blob = zst(&raw_tar(&good_raw()));
        let layer = env.layer(&blob);
        let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&layer)).unwrap();
        u.apply_next(Bumpy { data: &blob, interrupt: false, fail_after: None, given: 0 }).unwrap();
        assert!(format!("{u:?}").starts_with("Unpacker { stage: "), "{u:?}");
        u.finish().unwrap();
        assert_eq!(fs::read(env.dest.join("d/f")).unwrap(), b"abc");

        // A read that fails is the reader's failure (a local I/O error), not a corrupt layer.
        let env = new_env();
        let layer = env.layer(&blob);
        let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&layer)).unwrap();
        let err = u.apply_next(Bumpy { data: &blob, interrupt: false, fail_after: Some(20), given: 0 }).unwrap_err();
        assert!(matches!(err, UnpackError::Read { .. }) && !err.is_malformed(), "{err}");
        assert!(err.to_string().contains("the disk went away"), "{err}");
    }

    #[test]
    fn mismatches_name_the_path_and_the_problem() {
        let m = Mismatch { path: "d/f".into(), problem: "mode is 0600, expected 0644".into() };
        assert_eq!(m.to_string(), "d/f: mode is 0600, expected 0644");
    }

    #[test]
    fn padding_after_the_archive_is_bounded() {
        let cfg = small_config();
        let with_padding = |extra: u64| {
            let mut tar = raw_tar(&good_raw());
            tar.resize(tar.len() + extra as usize, 0);
            zst(&tar)
        };
        // Some padding after the end-of-archive marker is normal (tar pads to its record size).
        // The reader stops at the first of the two zero blocks that end an archive: the
        // second one and `extra` follow it, at most MAX_TRAILING bytes in all.
        let env = new_env();
        env.unpack(&[&with_padding(MAX_TRAILING - 512)], &cfg).unwrap();
        refuse_blob(&with_padding(MAX_TRAILING - 511), &cfg, "follow the end of the tar archive");
        // Over MAX_TRAILING bytes of it is not: the stream is refused, not drained forever.
        refuse_blob(&with_padding(MAX_TRAILING + 1), &cfg, "follow the end of the tar archive");
    }

    #[test]
    fn a_layer_must_be_the_bytes_its_descriptor_names() {
        let cfg = small_config();
        let blob = zst(&raw_tar(&good_raw()));
        let right = Descriptor::new(TAR_ZSTD_MEDIA_TYPE, Digest::of(&blob), blob.len() as u64);
        for (what, d) in [
            (
                "another digest, the same size",
                Descriptor::new(TAR_ZSTD_MEDIA_TYPE, Digest::of(b"x"), blob.len() as u64),
            ),
            (
                "the same digest, another size",
                Descriptor::new(TAR_ZSTD_MEDIA_TYPE, right.digest, blob.len() as u64 + 1),
            ),
        ] {
            let env = new_env();
            let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&d)).unwrap();
            let err = u.apply_next(&blob[..]).unwrap_err();
            assert!(matches!(err, UnpackError::LayerDigest { .. }) && err.is_malformed(), "{what}: {err}");
        }
        let env = new_env();
        let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&right)).unwrap();
        u.apply_next(&blob[..]).unwrap();
        u.finish().unwrap();
        // From a reader that checks the digest itself: the size is still checked.
        let longer = Descriptor::new(TAR_ZSTD_MEDIA_TYPE, right.digest, blob.len() as u64 + 1);
        let env = new_env();
        let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&longer)).unwrap();
        let err = u.apply_next_digest_checked(&blob[..]).unwrap_err();
        assert!(matches!(err, UnpackError::LayerDigest { .. }), "{err}");
        let env = new_env();
        let mut u = Unpacker::new(&cfg, &env.dest, std::slice::from_ref(&right)).unwrap();
        u.apply_next_digest_checked(&blob[..]).unwrap();
        u.finish().unwrap();
    }

    #[test]
    fn extended_headers_as_tar_tools_write_them() {
        let cfg = small_config();
        // A pax global header (git archive writes one) changes nothing.
        let mut entries =
            vec![raw("pax_global_header", tar::EntryType::XGlobalHeader, 0o644, &pax_record("comment", "x"))];
        entries.extend(good_raw());
        let env = new_env();
        env.unpack(&[&zst(&raw_tar(&entries))], &cfg).unwrap();
        // One pax header per entry: a second one, after any of path, linkpath or size, is refused.
        for key in ["path", "linkpath", "size"] {
            let value = if key == "size" { "3" } else { "d/f" };
            let mut entries = good_raw();
            entries.push(raw("PaxHeader", tar::EntryType::XHeader, 0o644, &pax_record(key, value)));
            entries.push(raw("PaxHeader", tar::EntryType::XHeader, 0o644, &pax_record("comment", "x")));
            entries.push(raw_file("d/g", b"abc"));
            refuse(entries, &cfg, "two pax headers describe one entry");
        }
        // A pax size must agree with the header's.
        let with_pax_size = |n: &str| {
            let mut entries = vec![raw_dir("d/")];
            entries.push(raw("PaxHeader", tar::EntryType::XHeader, 0o644, &pax_record("size", n)));
            entries.extend([raw_file("d/f", b"abc"), raw_link("l", tar::EntryType::Symlink, "d/f")]);
            entries
        };
        new_env().unpack(&[&zst(&raw_tar(&with_pax_size("3")))], &cfg).unwrap();
        refuse(with_pax_size("4"), &cfg, "its pax size differs from its header size (3)");
        // Refusals name the entry by its place in the layer and what it is.
        let mut entries = good_raw();
        entries.push(raw("././@LongLink", tar::EntryType::GNULongLink, 0o644, b"d/f\0"));
        entries.push(raw("././@LongLink", tar::EntryType::GNULongLink, 0o644, b"d/f\0"));
        entries.push(raw_link("l2", tar::EntryType::Symlink, "x"));
        refuse(entries, &cfg, "#5 (GNU long link)");
        let mut entries = good_raw();
        entries.push(raw("././@LongLink", tar::EntryType::GNULongName, 0o644, b"d/g\0"));
        entries.push(raw("././@LongLink", tar::EntryType::GNULongName, 0o644, b"d/g\0"));
        entries.push(raw_file("x", b"abc"));
        refuse(entries, &cfg, "#5 (GNU long name)");
        // A GNU long name of MAX_PATH bytes and its NUL passes the header check (this one is
        // then refused for not being in the manifest).
        let mut long = vec!["p".repeat(250); 16].join("/");
        long = format!("{long}/{}", "q".repeat(MAX_PATH - long.len() - 1));
        assert_eq!(long.len(), MAX_PATH);
        let mut entries = good_raw();
        entries.push(raw("././@LongLink", tar::EntryType::GNULongName, 0o644, format!("{long}\0").as_bytes()));
        entries.push(raw_file("x", b"abc"));
        let err = refuse(entries, &cfg, "");
        assert!(!err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn entries_per_layer_are_bounded_by_the_manifest() {
        let cfg = small_config();
        // Two layers: at most 3 + SLACK_ENTRIES entries in one, 2 x 3 + SLACK_ENTRIES in all.
        let limit = 3 + SLACK_ENTRIES as usize;
        let lower = |n: usize| {
            let mut entries = good_raw();
            entries.push(raw_dir("x/"));
            let extra = n - entries.len();
            entries.extend((0..extra).map(|i| raw_file(format!("x/{i:05}"), b"")));
            zst(&raw_tar(&entries))
        };
        let upper = zst(&raw_tar(&[raw_file(".wh.x", b"")]));
        let env = new_env();
        env.unpack(&[&lower(limit), &upper], &cfg).unwrap();
        assert!(!env.dest.join("x").exists());
        let env = new_env();
        let err = env.unpack(&[&lower(limit + 1), &upper], &cfg).unwrap_err();
        assert!(
            err.is_malformed() && err.to_string().contains("more entries than the signed manifest allows"),
            "{err}"
        );
        env.assert_contained();
    }

    #[test]
    fn content_bytes_are_bounded_per_layer_and_per_image() {
        // The real bounds are the declared bytes plus SLACK_BYTES (64 MiB); the same checks,
        // with a budget small enough to reach in a unit test: 10 bytes in a layer, 15 in all.
        let cfg = small_config();
        let budget = Budget { layer_bytes: 10, image_bytes: 15, ..Budget::of(&cfg, 3) };
        // A lower layer: the good tree (3 content bytes) and `x/` holding files of `sizes`.
        let lower = |good: bool, sizes: &[usize]| {
            let mut entries = if good { good_raw() } else { Vec::new() };
            entries.push(raw_dir("x/"));
            let prefix = if good { "a" } else { "b" };
            entries.extend(sizes.iter().enumerate().map(|(i, &n)| raw_file(format!("x/{prefix}{i}"), &vec![b'y'; n])));
            zst(&raw_tar(&entries))
        };
        let upper = zst(&raw_tar(&[raw_file(".wh.x", b"")]));
        let unpack = |blobs: &[&[u8]]| {
            let env = new_env();
            let layers: Vec<_> = blobs.iter().map(|b| env.layer(b)).collect();
            let mut unpacker = Unpacker::new(&cfg, &env.dest, &layers).unwrap();
            unpacker.budget = budget;
            let result = layers.iter().try_for_each(|l| unpacker.apply_next(env.layout.open_blob(&l.digest).unwrap()));
            result.and_then(|()| unpacker.finish()).map(|stats| stats.bytes)
        };
        let too_many = |r: Result<u64, UnpackError>| match r {
            Err(e) => {
                assert!(e.is_malformed() && e.to_string().contains("more content bytes"), "{e}");
                true
            }
            Ok(_) => false,
        };
        // A layer of exactly 10 bytes, in two files: the sum counts, not each file.
        assert_eq!(unpack(&[&lower(true, &[4, 3]), &upper]).unwrap(), 10);
        assert!(too_many(unpack(&[&lower(true, &[4, 4]), &upper])));
        // Two layers within their own bound: 10 + 5 is the most the image may hold.
        assert_eq!(unpack(&[&lower(true, &[4, 3]), &lower(false, &[5]), &upper]).unwrap(), 15);
        assert!(too_many(unpack(&[&lower(true, &[4, 3]), &lower(false, &[6]), &upper])));
        assert!(too_many(unpack(&[&lower(true, &[4, 3]), &lower(false, &[3, 3]), &upper])));
    }

    #[test]
    fn pax_records_other_than_sparse_ones_are_ignored() {
        let cfg = small_config();
        let with_pax = |key: &str| {
            let mut entries = vec![raw_dir("d/")];
            entries.push(raw("PaxHeader", tar::EntryType::XHeader, 0o644, &pax_record(key, "1")));
            entries.extend([raw_file("d/f", b"abc"), raw_link("l", tar::EntryType::Symlink, "d/f")]);
            entries
        };
        new_env().unpack(&[&zst(&raw_tar(&with_pax("mtime")))], &cfg).unwrap();
        refuse(with_pax("GNU.sparse.major"), &cfg, "GNU sparse file");
    }

    #[test]
    fn an_upper_layer_replaces_a_directory_with_a_file_and_keeps_a_directory() {
        let cfg =
            config(vec![dir("d", 0o755), file("d/f", 0o644, b"abc"), link("l", "d/f"), file("x", 0o644, b"new")], "");
        let mut lower = good_raw();
        lower.extend([raw_dir("x/"), raw_file("x/y", b"")]);
        let upper = [raw_dir("d/"), raw_file("x", b"new")];
        let env = new_env();
        env.unpack(&[&zst(&raw_tar(&lower)), &zst(&raw_tar(&upper))], &cfg).unwrap();
        assert_eq!(fs::read(env.dest.join("x")).unwrap(), b"new");
        assert_eq!(fs::read(env.dest.join("d/f")).unwrap(), b"abc");
    }

    #[test]
    fn a_missing_directory_is_named() {
        let cfg = config(vec![dir("d", 0o755), dir("d/e", 0o755), file("d/e/f", 0o644, b"abc")], "");
        refuse(vec![raw_dir("d/"), raw_file("d/e/f", b"abc")], &cfg, "its directory d/e is not present");
    }

    #[test]
    fn a_link_text_other_than_the_signed_one_is_refused_at_its_header() {
        let mut entries = good_raw();
        entries[2] = raw_link("l", tar::EntryType::Symlink, "d");
        refuse(entries, &small_config(), "links to \"d\" but the signed manifest says \"d/f\"");
    }

    fn refuse_blob(blob: &[u8], config: &StageConfig, expect: &str) {
        let env = new_env();
        let err = env.unpack(&[blob], config).unwrap_err();
        assert!(err.is_malformed() && err.to_string().contains(expect), "expected {expect:?} in: {err}");
        env.assert_contained();
    }
}
