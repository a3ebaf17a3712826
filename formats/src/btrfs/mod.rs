//! btrfs send-stream payloads (`application/vnd.op-dbus.stage.payload.v1.btrfs-send+zstd`):
//! a strict parser, a validator that runs before anything reaches the kernel, and a
//! userspace applier for hosts whose staging area is not on btrfs.
//!
//! ```text
//! layer blob ─► zstd ─► StreamReader ─► Checker ──► (validate_stream: a StreamSummary;
//!                       framing, CRC,   paths,       then `btrfs receive` may run)
//!                       bounds, typed   kinds,    ─► apply_to_dir: the same checks,
//!                       commands        uuids        each command applied to a plain
//!                                                    directory through handles
//! ```
//!
//! * [`StreamReader`] reads protocol versions 1 and 2 command by command: magic,
//!   version, per-command CRC-32C, bounded lengths, exactly the attributes each command
//!   carries, paths parsed as [`RelPath`](crate::path::RelPath)s, END last and nothing
//!   after it. See [`stream`] for the wire format.
//! * [`validate_stream`] (and [`validate_stream_against`] with the parent's tree) checks
//!   what the stream would do: no path through a symlink, links that stay inside, no
//!   device nodes, FIFOs or sockets, clones only from the stream's own subvolume or its
//!   declared parent, no `btrfs.*` properties or file capabilities. See [`validate`].
//! * [`apply_to_dir`] applies a stream to a directory without the kernel's receive,
//!   running the same checks first for every command; [`copy_tree`] prepares the parent
//!   copy an incremental stream is applied onto. See [`apply`].
//! * [`forward_stream`] hands each command on as soon as it is checked (one read);
//!   [`Receiver`] receives a stored layer that way with `btrfs receive`, hashing each
//!   file from the stream when asked. See [`forward`] and [`receive`].
//!
//! Encoded (compressed) writes (`btrfs send --compressed-data`) and fs-verity (protocol 3)
//! are refused: op-dbus payloads are sent with `btrfs send --proto 2` alone.
//!
//! ```no_run
//! use formats::btrfs::{Uuid, apply_to_dir, validate_stream};
//! use std::{fs::File, io::BufReader, path::Path};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let parent: Uuid = "d43865a6-e1a8-c644-b9d2-4edceef6e84a".parse()?;
//! let summary = validate_stream(BufReader::new(File::open("incr.stream")?), Some(parent))?;
//! println!("{} ({} commands, {} bytes of data)", summary.name, summary.commands, summary.bytes_written);
//! // Without btrfs: apply onto a copy of the parent generation.
//! let dest = Path::new("/var/lib/op-dbus/staging/.generations/stage/4");
//! std::fs::create_dir(dest)?;
//! let parent_dir = Path::new("/var/lib/op-dbus/staging/.generations/stage/3");
//! formats::btrfs::copy_tree(parent_dir, dest)?;
//! apply_to_dir(BufReader::new(File::open("incr.stream")?), dest, Some(parent_dir))?;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::path::PathBuf;

pub mod apply;
mod contents;
mod crc;
pub mod forward;
mod fsops;
pub mod receive;
pub mod stream;
pub mod validate;

pub use apply::{ApplyStats, apply_to_dir, apply_to_dir_watched, copy_tree};
pub use forward::{Forwarded, Progress, forward_stream, forward_stream_hashing};
pub use receive::{ReceiveError, Receiver};
pub use stream::{Command, InvalidUuid, StreamPath, StreamReader, Timespec, Uuid};
pub use validate::{
    FileDigests, ParentTree, StreamSummary, validate_stream, validate_stream_against, validate_stream_onto,
};

/// Why a stream was refused or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the send stream at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },
    #[error("not a btrfs send stream: {reason}")]
    NotAStream { reason: String },
    #[error("btrfs send stream version {version} is not supported (versions 1 and 2 are)")]
    UnsupportedVersion { version: u32 },
    #[error("command #{index} ({command}) at byte {offset} is malformed: {reason}; the stream was refused")]
    Malformed { index: u64, offset: u64, command: &'static str, reason: String },
    #[error("command #{index} at byte {offset}: the stream ends inside it ({reason}); it is cut short")]
    Truncated { index: u64, offset: u64, reason: String },
    #[error(
        "command #{index} at byte {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the stream is corrupt"
    )]
    Checksum { index: u64, offset: u64, stored: u32, computed: u32 },
    #[error("command #{index} ({command}) at byte {offset}: {}; the stream was refused", refusal(.path, .reason))]
    Refused { index: u64, offset: u64, command: &'static str, path: String, reason: String },
    #[error("the stream ends at byte {offset} after {commands} commands without an END command; it is cut short")]
    MissingEnd { offset: u64, commands: u64 },
    #[error("bytes follow the END command at byte {offset}; one payload holds one stream")]
    TrailingData { offset: u64 },
    #[error("command #{index} ({command}): {path}: {source}")]
    Apply { index: u64, command: &'static str, path: PathBuf, source: io::Error },
    #[error("{path}: the filesystem is full (or a disk quota is exhausted); free space there and retry")]
    NoSpace { path: PathBuf },
    #[error("{path} is not an empty directory; apply a full stream into a new directory")]
    NotEmpty { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("handing the checked stream on: {source}")]
    Forward { source: io::Error },
}

fn refusal(path: &str, reason: &str) -> String {
    if path.is_empty() { reason.to_owned() } else { format!("{path:?}: {reason}") }
}

impl StreamError {
    /// Whether the stream itself was refused as malformed, hostile or unsupported (exit
    /// 7), rather than reading or applying it failing for a local reason.
    pub fn is_malformed(&self) -> bool {
        match self {
            StreamError::NotAStream { .. }
            | StreamError::UnsupportedVersion { .. }
            | StreamError::Malformed { .. }
            | StreamError::Truncated { .. }
            | StreamError::Checksum { .. }
            | StreamError::Refused { .. }
            | StreamError::MissingEnd { .. }
            | StreamError::TrailingData { .. } => true,
            StreamError::Read { .. }
            | StreamError::Apply { .. }
            | StreamError::NoSpace { .. }
            | StreamError::NotEmpty { .. }
            | StreamError::Io { .. }
            | StreamError::Forward { .. } => false,
        }
    }
}
