//! The wire format of btrfs send streams, parsed strictly.
//!
//! ```text
//! stream   = header command* END            nothing may follow END
//! header   = "btrfs-stream\0" le32 version  version 1 or 2
//! command  = le32 len  le16 cmd  le32 crc   len: bytes after this 10-byte header
//!            attribute*                     crc: CRC-32C (seed 0, no inversion) of the
//!                                           header with crc = 0, then the attributes
//! attribute= le16 type  le16 len  data      v2: type DATA (19) has no len; its data
//!                                           runs to the end of the command
//! ```
//!
//! Bounds, checked before anything is allocated: a whole command is at most
//! [`MAX_COMMAND_V1`] bytes in a version 1 stream (the kernel's `BTRFS_SEND_BUF_SIZE_V1`)
//! and at most [`MAX_COMMAND_V2`] in a version 2 stream (the kernel sends at most
//! 16 KiB + 128 KiB per command today, page-aligned; the format sets no limit, this
//! reader does). Other attributes are bounded by their 16-bit length.
//!
//! Every command must carry exactly the attributes the kernel sends for it (some are
//! optional: OTIME in UTIMES, COMPRESSION and ENCRYPTION in ENCODED_WRITE), each once:
//! btrfs receive reads the *last* of duplicated attributes, so a duplicate could show
//! this reader one path and the kernel another. Paths are [`RelPath`]s (relative, no
//! `..`, `.` or empty components, no NUL or backslash, UTF-8); the subvolume's root
//! directory is the empty path, accepted only where the kernel uses it (chmod, chown,
//! utimes, xattrs, fileattr) as [`StreamPath::Root`].

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::Serialize;

use super::StreamError;
use super::crc::crc32c_raw;
use crate::path::RelPath;

/// The stream header's magic bytes.
pub const MAGIC: &[u8; 13] = b"btrfs-stream\0";
/// Length of a command header: le32 len, le16 cmd, le32 crc.
pub const COMMAND_HEADER: usize = 10;
/// Largest whole command (header included) of a version 1 stream.
pub const MAX_COMMAND_V1: usize = 64 << 10;
/// Largest whole command (header included) accepted in a version 2 stream.
pub const MAX_COMMAND_V2: usize = (16 << 20) + (64 << 10);

// Command numbers (linux fs/btrfs/send.h).
const C_SUBVOL: u16 = 1;
const C_SNAPSHOT: u16 = 2;
const C_MKFILE: u16 = 3;
const C_MKDIR: u16 = 4;
const C_MKNOD: u16 = 5;
const C_MKFIFO: u16 = 6;
const C_MKSOCK: u16 = 7;
const C_SYMLINK: u16 = 8;
const C_RENAME: u16 = 9;
const C_LINK: u16 = 10;
const C_UNLINK: u16 = 11;
const C_RMDIR: u16 = 12;
const C_SET_XATTR: u16 = 13;
const C_REMOVE_XATTR: u16 = 14;
const C_WRITE: u16 = 15;
const C_CLONE: u16 = 16;
const C_TRUNCATE: u16 = 17;
const C_CHMOD: u16 = 18;
const C_CHOWN: u16 = 19;
const C_UTIMES: u16 = 20;
const C_END: u16 = 21;
const C_UPDATE_EXTENT: u16 = 22;
const C_FALLOCATE: u16 = 23;
const C_FILEATTR: u16 = 24;
const C_ENCODED_WRITE: u16 = 25;
const C_ENABLE_VERITY: u16 = 26;

// Attribute types.
const A_UUID: u16 = 1;
const A_CTRANSID: u16 = 2;
const A_INO: u16 = 3;
const A_SIZE: u16 = 4;
const A_MODE: u16 = 5;
const A_UID: u16 = 6;
const A_GID: u16 = 7;
const A_RDEV: u16 = 8;
const A_CTIME: u16 = 9;
const A_MTIME: u16 = 10;
const A_ATIME: u16 = 11;
const A_OTIME: u16 = 12;
const A_XATTR_NAME: u16 = 13;
const A_XATTR_DATA: u16 = 14;
const A_PATH: u16 = 15;
const A_PATH_TO: u16 = 16;
const A_PATH_LINK: u16 = 17;
const A_FILE_OFFSET: u16 = 18;
const A_DATA: u16 = 19;
const A_CLONE_UUID: u16 = 20;
const A_CLONE_CTRANSID: u16 = 21;
const A_CLONE_PATH: u16 = 22;
const A_CLONE_OFFSET: u16 = 23;
const A_CLONE_LEN: u16 = 24;
const A_FALLOCATE_MODE: u16 = 25;
const A_FILEATTR: u16 = 26;
const A_UNENCODED_FILE_LEN: u16 = 27;
const A_UNENCODED_LEN: u16 = 28;
const A_UNENCODED_OFFSET: u16 = 29;
const A_COMPRESSION: u16 = 30;
const A_ENCRYPTION: u16 = 31;
const A_MAX_V1: u16 = 24;
const A_MAX_V2: u16 = 31;

/// A btrfs subvolume UUID (the 16 bytes of the stream), shown as
/// `d43865a6-e1a8-c644-b9d2-4edceef6e84a` like `btrfs subvolume show` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl From<[u8; 16]> for Uuid {
    fn from(b: [u8; 16]) -> Self {
        Uuid(b)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

/// A string that is not a UUID.
#[derive(Debug, thiserror::Error)]
#[error("invalid UUID {0:?}: expected 32 hex digits, optionally hyphenated as 8-4-4-4-12")]
pub struct InvalidUuid(pub String);

impl FromStr for Uuid {
    type Err = InvalidUuid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidUuid(s.to_owned());
        let hex: Vec<u8> = if s.len() == 36 {
            if [8, 13, 18, 23].iter().any(|&i| s.as_bytes()[i] != b'-') {
                return Err(bad());
            }
            s.bytes().filter(|&b| b != b'-').collect()
        } else {
            s.bytes().collect()
        };
        if hex.len() != 32 {
            return Err(bad());
        }
        let val = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            out[i] = (val(pair[0]).ok_or_else(bad)? << 4) | val(pair[1]).ok_or_else(bad)?;
        }
        Ok(Uuid(out))
    }
}

impl Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A time as the stream carries it: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// The path a metadata command applies to: the subvolume's root directory (the empty
/// path in the stream), or a path beneath it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamPath {
    Root,
    Rel(RelPath),
}

impl StreamPath {
    pub fn rel(&self) -> Option<&RelPath> {
        match self {
            StreamPath::Root => None,
            StreamPath::Rel(p) => Some(p),
        }
    }
}

impl fmt::Display for StreamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamPath::Root => f.write_str("."),
            StreamPath::Rel(p) => f.write_str(p.as_str()),
        }
    }
}

impl fmt::Debug for StreamPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// One command of a send stream, with its attributes decoded and its paths checked.
///
/// Paths name the state of the subvolume being received after the commands before it:
/// new inodes appear under temporary names such as `o257-7-0` and are renamed into place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Starts a full stream: create subvolume `path` (one component).
    Subvol {
        path: RelPath,
        uuid: Uuid,
        ctransid: u64,
    },
    /// Starts an incremental stream: snapshot the subvolume `clone_uuid` as `path`.
    Snapshot {
        path: RelPath,
        uuid: Uuid,
        ctransid: u64,
        clone_uuid: Uuid,
        clone_ctransid: u64,
    },
    Mkfile {
        path: RelPath,
        ino: u64,
    },
    Mkdir {
        path: RelPath,
        ino: u64,
    },
    Mknod {
        path: RelPath,
        ino: u64,
        mode: u64,
        rdev: u64,
    },
    Mkfifo {
        path: RelPath,
        ino: u64,
    },
    Mksock {
        path: RelPath,
        ino: u64,
    },
    /// A symlink at `path` whose text is `target` (checked by the validator, not here).
    Symlink {
        path: RelPath,
        ino: u64,
        target: String,
    },
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// A hard link: `path` becomes another name of the existing `target`.
    Link {
        path: RelPath,
        target: RelPath,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    SetXattr {
        path: StreamPath,
        name: String,
        data: Vec<u8>,
    },
    RemoveXattr {
        path: StreamPath,
        name: String,
    },
    Write {
        path: RelPath,
        offset: u64,
        data: Vec<u8>,
    },
    /// Copy `len` bytes at `clone_offset` of `clone_path` in the subvolume `clone_uuid`
    /// to `offset` of `path`.
    Clone {
        path: RelPath,
        offset: u64,
        len: u64,
        clone_uuid: Uuid,
        clone_ctransid: u64,
        clone_path: RelPath,
        clone_offset: u64,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    Chmod {
        path: StreamPath,
        mode: u64,
    },
    Chown {
        path: StreamPath,
        uid: u64,
        gid: u64,
    },
    Utimes {
        path: StreamPath,
        atime: Timespec,
        mtime: Timespec,
        ctime: Timespec,
        otime: Option<Timespec>,
    },
    /// Only in streams sent with `--no-data`: the extent changed, its data is not sent.
    UpdateExtent {
        path: RelPath,
        offset: u64,
        len: u64,
    },
    /// Version 2: `fallocate(2)` with `mode` (FALLOC_FL_* bits).
    Fallocate {
        path: RelPath,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// Version 2: btrfs inode flags (BTRFS_INODE_*). btrfs receive ignores them.
    Fileattr {
        path: StreamPath,
        attr: u64,
    },
    /// Version 2, `--compressed-data` only: compressed extent data.
    EncodedWrite {
        path: RelPath,
        offset: u64,
        unencoded_file_len: u64,
        unencoded_len: u64,
        unencoded_offset: u64,
        compression: u32,
        encryption: u32,
        data: Vec<u8>,
    },
    End,
}

impl Command {
    /// The command's name, as `btrfs receive --dump` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Subvol { .. } => "subvol",
            Command::Snapshot { .. } => "snapshot",
            Command::Mkfile { .. } => "mkfile",
            Command::Mkdir { .. } => "mkdir",
            Command::Mknod { .. } => "mknod",
            Command::Mkfifo { .. } => "mkfifo",
            Command::Mksock { .. } => "mksock",
            Command::Symlink { .. } => "symlink",
            Command::Rename { .. } => "rename",
            Command::Link { .. } => "link",
            Command::Unlink { .. } => "unlink",
            Command::Rmdir { .. } => "rmdir",
            Command::SetXattr { .. } => "set_xattr",
            Command::RemoveXattr { .. } => "remove_xattr",
            Command::Write { .. } => "write",
            Command::Clone { .. } => "clone",
            Command::Truncate { .. } => "truncate",
            Command::Chmod { .. } => "chmod",
            Command::Chown { .. } => "chown",
            Command::Utimes { .. } => "utimes",
            Command::UpdateExtent { .. } => "update_extent",
            Command::Fallocate { .. } => "fallocate",
            Command::Fileattr { .. } => "fileattr",
            Command::EncodedWrite { .. } => "encoded_write",
            Command::End => "end",
        }
    }

    /// The path the command acts on, for messages (`.` for the subvolume root, empty for END).
    pub fn path_display(&self) -> String {
        match self {
            Command::Subvol { path, .. }
            | Command::Snapshot { path, .. }
            | Command::Mkfile { path, .. }
            | Command::Mkdir { path, .. }
            | Command::Mknod { path, .. }
            | Command::Mkfifo { path, .. }
            | Command::Mksock { path, .. }
            | Command::Symlink { path, .. }
            | Command::Link { path, .. }
            | Command::Unlink { path }
            | Command::Rmdir { path }
            | Command::Write { path, .. }
            | Command::Clone { path, .. }
            | Command::Truncate { path, .. }
            | Command::UpdateExtent { path, .. }
            | Command::Fallocate { path, .. }
            | Command::EncodedWrite { path, .. } => path.to_string(),
            Command::Rename { from, .. } => from.to_string(),
            Command::SetXattr { path, .. }
            | Command::RemoveXattr { path, .. }
            | Command::Chmod { path, .. }
            | Command::Chown { path, .. }
            | Command::Utimes { path, .. }
            | Command::Fileattr { path, .. } => path.to_string(),
            Command::End => String::new(),
        }
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        C_SUBVOL => "subvol",
        C_SNAPSHOT => "snapshot",
        C_MKFILE => "mkfile",
        C_MKDIR => "mkdir",
        C_MKNOD => "mknod",
        C_MKFIFO => "mkfifo",
        C_MKSOCK => "mksock",
        C_SYMLINK => "symlink",
        C_RENAME => "rename",
        C_LINK => "link",
        C_UNLINK => "unlink",
        C_RMDIR => "rmdir",
        C_SET_XATTR => "set_xattr",
        C_REMOVE_XATTR => "remove_xattr",
        C_WRITE => "write",
        C_CLONE => "clone",
        C_TRUNCATE => "truncate",
        C_CHMOD => "chmod",
        C_CHOWN => "chown",
        C_UTIMES => "utimes",
        C_END => "end",
        C_UPDATE_EXTENT => "update_extent",
        C_FALLOCATE => "fallocate",
        C_FILEATTR => "fileattr",
        C_ENCODED_WRITE => "encoded_write",
        C_ENABLE_VERITY => "enable_verity",
        _ => "unknown",
    }
}

fn attr_name(a: u16) -> &'static str {
    match a {
        A_UUID => "UUID",
        A_CTRANSID => "CTRANSID",
        A_INO => "INO",
        A_SIZE => "SIZE",
        A_MODE => "MODE",
        A_UID => "UID",
        A_GID => "GID",
        A_RDEV => "RDEV",
        A_CTIME => "CTIME",
        A_MTIME => "MTIME",
        A_ATIME => "ATIME",
        A_OTIME => "OTIME",
        A_XATTR_NAME => "XATTR_NAME",
        A_XATTR_DATA => "XATTR_DATA",
        A_PATH => "PATH",
        A_PATH_TO => "PATH_TO",
        A_PATH_LINK => "PATH_LINK",
        A_FILE_OFFSET => "FILE_OFFSET",
        A_DATA => "DATA",
        A_CLONE_UUID => "CLONE_UUID",
        A_CLONE_CTRANSID => "CLONE_CTRANSID",
        A_CLONE_PATH => "CLONE_PATH",
        A_CLONE_OFFSET => "CLONE_OFFSET",
        A_CLONE_LEN => "CLONE_LEN",
        A_FALLOCATE_MODE => "FALLOCATE_MODE",
        A_FILEATTR => "FILEATTR",
        A_UNENCODED_FILE_LEN => "UNENCODED_FILE_LEN",
        A_UNENCODED_LEN => "UNENCODED_LEN",
        A_UNENCODED_OFFSET => "UNENCODED_OFFSET",
        A_COMPRESSION => "COMPRESSION",
        A_ENCRYPTION => "ENCRYPTION",
        _ => "unknown",
    }
}

/// What a command position reports in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At {
    /// 1-based index of the command in the stream.
    pub index: u64,
    /// Byte offset of the command's header in the stream.
    pub offset: u64,
}

/// The attributes of one command: where each one's data lies in the command buffer.
struct Attrs<'a> {
    buf: &'a [u8],
    slots: [Option<(usize, usize)>; A_MAX_V2 as usize + 1],
    used: u64,
    cmd: &'static str,
    at: At,
}

impl<'a> Attrs<'a> {
    fn malformed(&self, reason: String) -> StreamError {
        StreamError::Malformed { index: self.at.index, offset: self.at.offset, command: self.cmd, reason }
    }

    fn raw(&mut self, a: u16) -> Result<&'a [u8], StreamError> {
        match self.opt(a) {
            Some(d) => Ok(d),
            None => Err(self.malformed(format!("attribute {} is missing", attr_name(a)))),
        }
    }

    fn opt(&mut self, a: u16) -> Option<&'a [u8]> {
        let (start, len) = self.slots[a as usize]?;
        self.used |= 1 << a;
        let buf: &'a [u8] = self.buf;
        Some(&buf[start..start + len])
    }

    fn fixed<const N: usize>(&mut self, a: u16) -> Result<[u8; N], StreamError> {
        let d = self.raw(a)?;
        d.try_into()
            .map_err(|_| self.malformed(format!("attribute {} has {} bytes, expected {N}", attr_name(a), d.len())))
    }

    fn u64(&mut self, a: u16) -> Result<u64, StreamError> {
        Ok(u64::from_le_bytes(self.fixed(a)?))
    }

    fn u32(&mut self, a: u16) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.fixed(a)?))
    }

    fn opt_u32(&mut self, a: u16) -> Result<Option<u32>, StreamError> {
        if self.slots[a as usize].is_none() {
            return Ok(None);
        }
        self.u32(a).map(Some)
    }

    fn uuid(&mut self, a: u16) -> Result<Uuid, StreamError> {
        Ok(Uuid(self.fixed(a)?))
    }

    fn time(&mut self, a: u16) -> Result<Timespec, StreamError> {
        let d: [u8; 12] = self.fixed(a)?;
        let sec = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) as i64;
        let nsec = u32::from_le_bytes(d[8..].try_into().expect("4 bytes"));
        if nsec >= 1_000_000_000 {
            return Err(self.malformed(format!("attribute {} has {nsec} nanoseconds", attr_name(a))));
        }
        Ok(Timespec { sec, nsec })
    }

    fn opt_time(&mut self, a: u16) -> Result<Option<Timespec>, StreamError> {
        if self.slots[a as usize].is_none() {
            return Ok(None);
        }
        self.time(a).map(Some)
    }

    /// A string attribute: UTF-8 without NUL (btrfs receive would cut it at the NUL).
    fn string(&mut self, a: u16) -> Result<String, StreamError> {
        let d = self.raw(a)?;
        if d.contains(&0) {
            return Err(self.refused(&String::from_utf8_lossy(d), format!("attribute {} has a NUL byte", attr_name(a))));
        }
        String::from_utf8(d.to_vec())
            .map_err(|_| self.refused(&String::from_utf8_lossy(d), format!("attribute {} is not UTF-8", attr_name(a))))
    }

    fn refused(&self, path: &str, reason: String) -> StreamError {
        StreamError::Refused {
            index: self.at.index,
            offset: self.at.offset,
            command: self.cmd,
            path: path.to_owned(),
            reason,
        }
    }

    /// A path beneath the subvolume root.
    fn path(&mut self, a: u16) -> Result<RelPath, StreamError> {
        let s = self.string(a)?;
        RelPath::parse(&s).map_err(|e| self.refused(&s, e.to_string()))
    }

    /// A path that may be the subvolume root (empty).
    fn stream_path(&mut self, a: u16) -> Result<StreamPath, StreamError> {
        if self.slots[a as usize].is_some_and(|(_, len)| len == 0) {
            self.used |= 1 << a;
            return Ok(StreamPath::Root);
        }
        self.path(a).map(StreamPath::Rel)
    }

    fn data(&mut self, a: u16) -> Result<Vec<u8>, StreamError> {
        Ok(self.raw(a)?.to_vec())
    }

    /// Refuses attributes present but not read for this command.
    fn done(&self) -> Result<(), StreamError> {
        for (a, slot) in self.slots.iter().enumerate() {
            if slot.is_some() && self.used & (1 << a) == 0 {
                return Err(self.malformed(format!("unexpected attribute {} ({a})", attr_name(a as u16))));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Ended,
    Failed,
}

/// Reads a btrfs send stream command by command.
///
/// ```no_run
/// use formats::btrfs::{Command, StreamReader};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let file = std::io::BufReader::new(std::fs::File::open("full.stream")?);
/// let mut reader = StreamReader::new(file)?;
/// while let Some(cmd) = reader.next_command()? {
///     if let Command::Write { path, offset, data } = &cmd {
///         println!("{path}: {} bytes at {offset}", data.len());
///     }
/// }
/// # Ok(())
/// # }
/// ```
///
/// [`StreamReader::next_command`] returns `Ok(None)` only after END, once it has checked
/// that nothing follows it; a stream that ends anywhere else is an error. After an error
/// the reader yields nothing more.
pub struct StreamReader<R> {
    inner: R,
    version: u32,
    max_command: usize,
    /// Bytes consumed so far.
    offset: u64,
    /// Commands read so far.
    index: u64,
    buf: Vec<u8>,
    /// The stream header and the last command's header as read (checksum included).
    stream_header: [u8; 17],
    raw_header: [u8; COMMAND_HEADER],
    state: State,
}

impl<R> fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamReader")
            .field("version", &self.version)
            .field("offset", &self.offset)
            .field("commands", &self.index)
            .field("state", &self.state)
            .finish()
    }
}

/// Reads until `buf` is full or the input ends; returns the number of bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    match crate::decode::read_some(r, buf) {
        (n, None) => Ok(n),
        (_, Some(e)) => Err(e),
    }
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header: the magic and a version of 1 or 2.
    pub fn new(mut inner: R) -> Result<Self, StreamError> {
        let mut header = [0u8; 17];
        let n = read_full(&mut inner, &mut header).map_err(|e| StreamError::Read { offset: 0, source: e })?;
        if n < header.len() {
            return Err(StreamError::NotAStream {
                reason: format!("it is {n} bytes long, shorter than a stream header"),
            });
        }
        if &header[..13] != MAGIC {
            return Err(StreamError::NotAStream {
                reason: format!("it starts with {:?}, not \"btrfs-stream\\0\"", String::from_utf8_lossy(&header[..13])),
            });
        }
        let version = u32::from_le_bytes(header[13..].try_into().expect("4 bytes"));
        let max_command = match version {
            1 => MAX_COMMAND_V1,
            2 => MAX_COMMAND_V2,
            _ => return Err(StreamError::UnsupportedVersion { version }),
        };
        Ok(StreamReader {
            inner,
            version,
            max_command,
            offset: header.len() as u64,
            index: 0,
            buf: Vec::new(),
            stream_header: header,
            raw_header: [0; COMMAND_HEADER],
            state: State::Reading,
        })
    }

    /// The protocol version from the header (1 or 2).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Commands read so far.
    pub fn commands(&self) -> u64 {
        self.index
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The stream header's 17 bytes, as read.
    pub fn raw_stream_header(&self) -> &[u8] {
        &self.stream_header
    }

    /// The bytes of the command [`next_command`](Self::next_command) last returned, exactly
    /// as they were read: its header (checksum included) and its body. What a forwarder
    /// hands on once the command was checked.
    pub fn raw_command(&self) -> [&[u8]; 2] {
        [&self.raw_header, &self.buf]
    }

    /// The next command; `Ok(None)` after END once the end of the input was seen.
    pub fn next_command(&mut self) -> Result<Option<Command>, StreamError> {
        match self.state {
            State::Ended | State::Failed => return Ok(None),
            State::Reading => {}
        }
        let result = self.read_command();
        match &result {
            Err(_) => self.state = State::Failed,
            Ok(Command::End) => self.state = State::Ended,
            Ok(_) => {}
        }
        result.map(Some)
    }

    fn read_command(&mut self) -> Result<Command, StreamError> {
        let at = At { index: self.index + 1, offset: self.offset };
        let mut header = [0u8; COMMAND_HEADER];
        let n =
            read_full(&mut self.inner, &mut header).map_err(|e| StreamError::Read { offset: at.offset, source: e })?;
        if n == 0 {
            return Err(StreamError::MissingEnd { offset: at.offset, commands: self.index });
        }
        if n < COMMAND_HEADER {
            return Err(StreamError::Truncated {
                index: at.index,
                offset: at.offset,
                reason: format!("{n} of the {COMMAND_HEADER} header bytes"),
            });
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let cmd = u16::from_le_bytes(header[4..6].try_into().expect("2 bytes"));
        let stored = u32::from_le_bytes(header[6..].try_into().expect("4 bytes"));
        self.raw_header = header;
        let name = command_name(cmd);
        if len.saturating_add(COMMAND_HEADER) > self.max_command {
            return Err(StreamError::Malformed {
                index: at.index,
                offset: at.offset,
                command: name,
                reason: format!(
                    "declares {} bytes, more than the {} a version {} stream allows",
                    len as u64 + COMMAND_HEADER as u64,
                    self.max_command,
                    self.version
                ),
            });
        }
        // Only what grows is zeroed: read_full overwrites the rest or fails.
        if self.buf.len() > len {
            self.buf.truncate(len);
        } else {
            self.buf.resize(len, 0);
        }
        let got = read_full(&mut self.inner, &mut self.buf)
            .map_err(|e| StreamError::Read { offset: at.offset + COMMAND_HEADER as u64, source: e })?;
        if got < len {
            return Err(StreamError::Truncated {
                index: at.index,
                offset: at.offset,
                reason: format!("{got} of its {len} bytes"),
            });
        }
        header[6..].fill(0);
        let computed = crc32c_raw(crc32c_raw(0, &header), &self.buf);
        if computed != stored {
            return Err(StreamError::Checksum { index: at.index, offset: at.offset, stored, computed });
        }
        self.index += 1;
        self.offset += (COMMAND_HEADER + len) as u64;

        let command = self.decode(cmd, name, at)?;
        if command == Command::End {
            let mut one = [0u8; 1];
            let n = read_full(&mut self.inner, &mut one)
                .map_err(|e| StreamError::Read { offset: self.offset, source: e })?;
            if n != 0 {
                return Err(StreamError::TrailingData { offset: self.offset });
            }
        }
        Ok(command)
    }

    fn decode(&self, cmd: u16, name: &'static str, at: At) -> Result<Command, StreamError> {
        let malformed =
            |reason: String| StreamError::Malformed { index: at.index, offset: at.offset, command: name, reason };
        let max_cmd = if self.version == 1 { C_UPDATE_EXTENT } else { C_ENCODED_WRITE };
        if cmd == C_ENABLE_VERITY {
            return Err(StreamError::Refused {
                index: at.index,
                offset: at.offset,
                command: name,
                path: String::new(),
                reason: "fs-verity (send protocol 3) is not supported".into(),
            });
        }
        if cmd == 0 || cmd > max_cmd {
            return Err(malformed(format!("unknown command {cmd} in a version {} stream", self.version)));
        }
        let max_attr = if self.version == 1 { A_MAX_V1 } else { A_MAX_V2 };
        let mut attrs = Attrs { buf: &self.buf, slots: [None; A_MAX_V2 as usize + 1], used: 0, cmd: name, at };
        let buf = &self.buf;
        let mut pos = 0;
        while pos < buf.len() {
            if buf.len() - pos < 2 {
                return Err(malformed(format!("an attribute header is cut at byte {pos} of {}", buf.len())));
            }
            let a = u16::from_le_bytes([buf[pos], buf[pos + 1]]);
            pos += 2;
            if a == 0 || a > max_attr {
                return Err(malformed(format!("unknown attribute {a} in a version {} stream", self.version)));
            }
            let alen = if self.version >= 2 && a == A_DATA {
                buf.len() - pos
            } else {
                if buf.len() - pos < 2 {
                    return Err(malformed(format!("attribute {} is cut in its header", attr_name(a))));
                }
                let l = u16::from_le_bytes([buf[pos], buf[pos + 1]]) as usize;
                pos += 2;
                l
            };
            if buf.len() - pos < alen {
                return Err(malformed(format!(
                    "attribute {} declares {alen} bytes, {} remain in the command",
                    attr_name(a),
                    buf.len() - pos
                )));
            }
            if attrs.slots[a as usize].replace((pos, alen)).is_some() {
                return Err(malformed(format!("attribute {} appears twice", attr_name(a))));
            }
            pos += alen;
        }

        let a = &mut attrs;
        let command = match cmd {
            C_SUBVOL => Command::Subvol { path: a.path(A_PATH)?, uuid: a.uuid(A_UUID)?, ctransid: a.u64(A_CTRANSID)? },
            C_SNAPSHOT => Command::Snapshot {
                path: a.path(A_PATH)?,
                uuid: a.uuid(A_UUID)?,
                ctransid: a.u64(A_CTRANSID)?,
                clone_uuid: a.uuid(A_CLONE_UUID)?,
                clone_ctransid: a.u64(A_CLONE_CTRANSID)?,
            },
            C_MKFILE => Command::Mkfile { path: a.path(A_PATH)?, ino: a.u64(A_INO)? },
            C_MKDIR => Command::Mkdir { path: a.path(A_PATH)?, ino: a.u64(A_INO)? },
            C_MKNOD => {
                Command::Mknod { path: a.path(A_PATH)?, ino: a.u64(A_INO)?, mode: a.u64(A_MODE)?, rdev: a.u64(A_RDEV)? }
            }
            C_MKFIFO => Command::Mkfifo { path: a.path(A_PATH)?, ino: a.u64(A_INO)? },
            C_MKSOCK => Command::Mksock { path: a.path(A_PATH)?, ino: a.u64(A_INO)? },
            C_SYMLINK => Command::Symlink { path: a.path(A_PATH)?, ino: a.u64(A_INO)?, target: a.string(A_PATH_LINK)? },
            C_RENAME => Command::Rename { from: a.path(A_PATH)?, to: a.path(A_PATH_TO)? },
            C_LINK => Command::Link { path: a.path(A_PATH)?, target: a.path(A_PATH_LINK)? },
            C_UNLINK => Command::Unlink { path: a.path(A_PATH)? },
            C_RMDIR => Command::Rmdir { path: a.path(A_PATH)? },
            C_SET_XATTR => Command::SetXattr {
                path: a.stream_path(A_PATH)?,
                name: a.string(A_XATTR_NAME)?,
                data: a.data(A_XATTR_DATA)?,
            },
            C_REMOVE_XATTR => Command::RemoveXattr { path: a.stream_path(A_PATH)?, name: a.string(A_XATTR_NAME)? },
            C_WRITE => Command::Write { path: a.path(A_PATH)?, offset: a.u64(A_FILE_OFFSET)?, data: a.data(A_DATA)? },
            C_CLONE => Command::Clone {
                path: a.path(A_PATH)?,
                offset: a.u64(A_FILE_OFFSET)?,
                len: a.u64(A_CLONE_LEN)?,
                clone_uuid: a.uuid(A_CLONE_UUID)?,
                clone_ctransid: a.u64(A_CLONE_CTRANSID)?,
                clone_path: a.path(A_CLONE_PATH)?,
                clone_offset: a.u64(A_CLONE_OFFSET)?,
            },
            C_TRUNCATE => Command::Truncate { path: a.path(A_PATH)?, size: a.u64(A_SIZE)? },
            C_CHMOD => Command::Chmod { path: a.stream_path(A_PATH)?, mode: a.u64(A_MODE)? },
            C_CHOWN => Command::Chown { path: a.stream_path(A_PATH)?, uid: a.u64(A_UID)?, gid: a.u64(A_GID)? },
            C_UTIMES => Command::Utimes {
                path: a.stream_path(A_PATH)?,
                atime: a.time(A_ATIME)?,
                mtime: a.time(A_MTIME)?,
                ctime: a.time(A_CTIME)?,
                otime: a.opt_time(A_OTIME)?,
            },
            C_END => Command::End,
            C_UPDATE_EXTENT => {
                Command::UpdateExtent { path: a.path(A_PATH)?, offset: a.u64(A_FILE_OFFSET)?, len: a.u64(A_SIZE)? }
            }
            C_FALLOCATE => Command::Fallocate {
                path: a.path(A_PATH)?,
                mode: a.u32(A_FALLOCATE_MODE)?,
                offset: a.u64(A_FILE_OFFSET)?,
                len: a.u64(A_SIZE)?,
            },
            C_FILEATTR => Command::Fileattr { path: a.stream_path(A_PATH)?, attr: a.u64(A_FILEATTR)? },
            C_ENCODED_WRITE => Command::EncodedWrite {
                path: a.path(A_PATH)?,
                offset: a.u64(A_FILE_OFFSET)?,
                unencoded_file_len: a.u64(A_UNENCODED_FILE_LEN)?,
                unencoded_len: a.u64(A_UNENCODED_LEN)?,
                unencoded_offset: a.u64(A_UNENCODED_OFFSET)?,
                compression: a.opt_u32(A_COMPRESSION)?.unwrap_or(0),
                encryption: a.opt_u32(A_ENCRYPTION)?.unwrap_or(0),
                data: a.data(A_DATA)?,
            },
            _ => unreachable!("command numbers were checked above"),
        };
        attrs.done()?;
        Ok(command)
    }
}

impl<R: Read> Iterator for StreamReader<R> {
    type Item = Result<Command, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_command().transpose()
    }
}

/// Writes send streams: the test helper that builds hostile and well-formed streams.
#[cfg(test)]
pub(crate) mod writer {
    use super::*;

    /// One attribute value.
    pub enum Val<'a> {
        Bytes(&'a [u8]),
        U64(u64),
        U32(u32),
        Uuid([u8; 16]),
        Time(i64, u32),
    }

    /// Emits commands with correct lengths and checksums (or, on request, wrong ones).
    pub struct StreamWriter {
        pub out: Vec<u8>,
        pub version: u32,
    }

    impl StreamWriter {
        pub fn new(version: u32) -> Self {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&version.to_le_bytes());
            StreamWriter { out, version }
        }

        /// Appends a command; attributes in the order given.
        pub fn cmd(&mut self, cmd: u16, attrs: &[(u16, Val<'_>)]) -> &mut Self {
            let mut body = Vec::new();
            for (a, v) in attrs {
                let data: Vec<u8> = match v {
                    Val::Bytes(b) => b.to_vec(),
                    Val::U64(x) => x.to_le_bytes().to_vec(),
                    Val::U32(x) => x.to_le_bytes().to_vec(),
                    Val::Uuid(u) => u.to_vec(),
                    Val::Time(s, n) => {
                        let mut t = s.to_le_bytes().to_vec();
                        t.extend_from_slice(&n.to_le_bytes());
                        t
                    }
                };
                body.extend_from_slice(&a.to_le_bytes());
                if !(self.version >= 2 && *a == A_DATA) {
                    body.extend_from_slice(&(data.len() as u16).to_le_bytes());
                }
                body.extend_from_slice(&data);
            }
            self.raw_cmd(cmd, &body)
        }

        /// Appends a command with the given attribute bytes.
        pub fn raw_cmd(&mut self, cmd: u16, body: &[u8]) -> &mut Self {
            let mut header = Vec::with_capacity(COMMAND_HEADER);
            header.extend_from_slice(&(body.len() as u32).to_le_bytes());
            header.extend_from_slice(&cmd.to_le_bytes());
            header.extend_from_slice(&[0; 4]);
            let crc = crc32c_raw(crc32c_raw(0, &header), body);
            header[6..].copy_from_slice(&crc.to_le_bytes());
            self.out.extend_from_slice(&header);
            self.out.extend_from_slice(body);
            self
        }

        pub fn subvol(&mut self, name: &str, uuid: [u8; 16]) -> &mut Self {
            self.cmd(
                C_SUBVOL,
                &[(A_PATH, Val::Bytes(name.as_bytes())), (A_UUID, Val::Uuid(uuid)), (A_CTRANSID, Val::U64(7))],
            )
        }

        pub fn snapshot(&mut self, name: &str, uuid: [u8; 16], parent: [u8; 16]) -> &mut Self {
            self.cmd(
                C_SNAPSHOT,
                &[
                    (A_PATH, Val::Bytes(name.as_bytes())),
                    (A_UUID, Val::Uuid(uuid)),
                    (A_CTRANSID, Val::U64(8)),
                    (A_CLONE_UUID, Val::Uuid(parent)),
                    (A_CLONE_CTRANSID, Val::U64(7)),
                ],
            )
        }

        pub fn mkfile(&mut self, path: &str) -> &mut Self {
            self.cmd(C_MKFILE, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_INO, Val::U64(257))])
        }

        pub fn mkdir(&mut self, path: &str) -> &mut Self {
            self.cmd(C_MKDIR, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_INO, Val::U64(258))])
        }

        pub fn mknod(&mut self, path: &str) -> &mut Self {
            self.cmd(
                C_MKNOD,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_INO, Val::U64(259)),
                    (A_MODE, Val::U64(0o20644)),
                    (A_RDEV, Val::U64(0x0103)),
                ],
            )
        }

        pub fn mkfifo(&mut self, path: &str) -> &mut Self {
            self.cmd(C_MKFIFO, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_INO, Val::U64(260))])
        }

        pub fn mksock(&mut self, path: &str) -> &mut Self {
            self.cmd(C_MKSOCK, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_INO, Val::U64(261))])
        }

        pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.cmd(
                C_SYMLINK,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_INO, Val::U64(262)),
                    (A_PATH_LINK, Val::Bytes(target.as_bytes())),
                ],
            )
        }

        pub fn rename(&mut self, from: &str, to: &str) -> &mut Self {
            self.cmd(C_RENAME, &[(A_PATH, Val::Bytes(from.as_bytes())), (A_PATH_TO, Val::Bytes(to.as_bytes()))])
        }

        pub fn link(&mut self, path: &str, target: &str) -> &mut Self {
            self.cmd(C_LINK, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_PATH_LINK, Val::Bytes(target.as_bytes()))])
        }

        pub fn unlink(&mut self, path: &str) -> &mut Self {
            self.cmd(C_UNLINK, &[(A_PATH, Val::Bytes(path.as_bytes()))])
        }

        pub fn rmdir(&mut self, path: &str) -> &mut Self {
            self.cmd(C_RMDIR, &[(A_PATH, Val::Bytes(path.as_bytes()))])
        }

        pub fn set_xattr(&mut self, path: &str, name: &str, data: &[u8]) -> &mut Self {
            self.cmd(
                C_SET_XATTR,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_XATTR_NAME, Val::Bytes(name.as_bytes())),
                    (A_XATTR_DATA, Val::Bytes(data)),
                ],
            )
        }

        pub fn remove_xattr(&mut self, path: &str, name: &str) -> &mut Self {
            self.cmd(
                C_REMOVE_XATTR,
                &[(A_PATH, Val::Bytes(path.as_bytes())), (A_XATTR_NAME, Val::Bytes(name.as_bytes()))],
            )
        }

        pub fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> &mut Self {
            self.cmd(
                C_WRITE,
                &[(A_PATH, Val::Bytes(path.as_bytes())), (A_FILE_OFFSET, Val::U64(offset)), (A_DATA, Val::Bytes(data))],
            )
        }

        #[allow(clippy::too_many_arguments)]
        pub fn clone_range(
            &mut self,
            path: &str,
            offset: u64,
            len: u64,
            uuid: [u8; 16],
            clone_path: &str,
            clone_offset: u64,
        ) -> &mut Self {
            self.cmd(
                C_CLONE,
                &[
                    (A_FILE_OFFSET, Val::U64(offset)),
                    (A_CLONE_LEN, Val::U64(len)),
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_CLONE_UUID, Val::Uuid(uuid)),
                    (A_CLONE_CTRANSID, Val::U64(7)),
                    (A_CLONE_PATH, Val::Bytes(clone_path.as_bytes())),
                    (A_CLONE_OFFSET, Val::U64(clone_offset)),
                ],
            )
        }

        pub fn truncate(&mut self, path: &str, size: u64) -> &mut Self {
            self.cmd(C_TRUNCATE, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_SIZE, Val::U64(size))])
        }

        pub fn chmod(&mut self, path: &str, mode: u64) -> &mut Self {
            self.cmd(C_CHMOD, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_MODE, Val::U64(mode))])
        }

        pub fn chown(&mut self, path: &str, uid: u64, gid: u64) -> &mut Self {
            self.cmd(C_CHOWN, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_UID, Val::U64(uid)), (A_GID, Val::U64(gid))])
        }

        pub fn utimes(&mut self, path: &str, sec: i64) -> &mut Self {
            self.cmd(
                C_UTIMES,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_ATIME, Val::Time(sec, 5)),
                    (A_MTIME, Val::Time(sec, 6)),
                    (A_CTIME, Val::Time(sec, 7)),
                    (A_OTIME, Val::Time(sec, 8)),
                ],
            )
        }

        pub fn fallocate(&mut self, path: &str, mode: u32, offset: u64, len: u64) -> &mut Self {
            self.cmd(
                C_FALLOCATE,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_FALLOCATE_MODE, Val::U32(mode)),
                    (A_FILE_OFFSET, Val::U64(offset)),
                    (A_SIZE, Val::U64(len)),
                ],
            )
        }

        pub fn fileattr(&mut self, path: &str, attr: u64) -> &mut Self {
            self.cmd(C_FILEATTR, &[(A_PATH, Val::Bytes(path.as_bytes())), (A_FILEATTR, Val::U64(attr))])
        }

        pub fn encoded_write(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.cmd(
                C_ENCODED_WRITE,
                &[
                    (A_PATH, Val::Bytes(path.as_bytes())),
                    (A_FILE_OFFSET, Val::U64(0)),
                    (A_UNENCODED_FILE_LEN, Val::U64(4096)),
                    (A_UNENCODED_LEN, Val::U64(4096)),
                    (A_UNENCODED_OFFSET, Val::U64(0)),
                    (A_COMPRESSION, Val::U32(1)),
                    (A_DATA, Val::Bytes(data)),
                ],
            )
        }

        pub fn update_extent(&mut self, path: &str, offset: u64, len: u64) -> &mut Self {
            self.cmd(
                C_UPDATE_EXTENT,
                &[(A_PATH, Val::Bytes(path.as_bytes())), (A_FILE_OFFSET, Val::U64(offset)), (A_SIZE, Val::U64(len))],
            )
        }

        pub fn end(&mut self) -> &mut Self {
            self.cmd(C_END, &[])
        }

        pub fn bytes(&self) -> Vec<u8> {
            self.out.clone()
        }
    }

    pub const ENABLE_VERITY: u16 = C_ENABLE_VERITY;
    pub const MKFILE: u16 = C_MKFILE;
    pub const PATH: u16 = A_PATH;
    pub const INO: u16 = A_INO;
    pub const WRITE: u16 = C_WRITE;
    pub const DATA: u16 = A_DATA;
    pub const FILE_OFFSET: u16 = A_FILE_OFFSET;
    pub const MODE: u16 = A_MODE;
}

#[cfg(test)]
mod tests {
    use super::writer::*;
    use super::*;

    fn read_all(bytes: &[u8]) -> Result<Vec<Command>, StreamError> {
        StreamReader::new(bytes)?.collect()
    }

    const U1: [u8; 16] = [1; 16];

    #[test]
    fn uuid_text() {
        let u: Uuid = "d43865a6-e1a8-c644-b9d2-4edceef6e84a".parse().unwrap();
        assert_eq!(u.to_string(), "d43865a6-e1a8-c644-b9d2-4edceef6e84a");
        assert_eq!("d43865a6e1a8c644b9d24edceef6e84a".parse::<Uuid>().unwrap(), u);
        for bad in [
            "",
            "d43865a6-e1a8-c644-b9d2-4edceef6e84",
            "g43865a6-e1a8-c644-b9d2-4edceef6e84a",
            "d43865a6:e1a8-c644-b9d2-4edceef6e84a",
        ] {
            assert!(bad.parse::<Uuid>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&u).unwrap(), "\"d43865a6-e1a8-c644-b9d2-4edceef6e84a\"");
    }

    #[test]
    fn parses_both_versions() {
        for version in [1, 2] {
            let mut w = StreamWriter::new(version);
            w.subvol("vol", U1)
                .mkfile("o257-7-0")
                .write("o257-7-0", 3, b"hello")
                .chmod("", 0o755)
                .utimes("", 1_700_000_000)
                .end();
            let cmds = read_all(&w.bytes()).unwrap();
            assert_eq!(cmds.len(), 6);
            assert_eq!(
                cmds[2],
                Command::Write { path: "o257-7-0".parse().unwrap(), offset: 3, data: b"hello".to_vec() }
            );
            assert_eq!(cmds[3], Command::Chmod { path: StreamPath::Root, mode: 0o755 });
            assert!(matches!(cmds[4], Command::Utimes { otime: Some(Timespec { nsec: 8, .. }), .. }));
            assert_eq!(cmds[5], Command::End);
        }
    }

    #[test]
    fn v2_data_runs_to_the_end_and_may_exceed_64k() {
        let big = vec![0xab; 200 << 10];
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).mkfile("f").write("f", 0, &big).end();
        let cmds = read_all(&w.bytes()).unwrap();
        assert!(matches!(&cmds[2], Command::Write { data, .. } if *data == big));
        // In version 1 a command is at most 64 KiB: refused at its header.
        let mut w = StreamWriter::new(1);
        w.subvol("vol", U1).mkfile("f");
        let mut body = Vec::new();
        body.extend_from_slice(&PATH.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.push(b'f');
        body.extend_from_slice(&[0; 70_000]);
        w.raw_cmd(WRITE, &body).end();
        let err = read_all(&w.bytes()).unwrap_err();
        assert!(err.to_string().contains("more than the 65536"), "{err}");
        assert!(matches!(err, StreamError::Malformed { index: 3, .. }), "{err:?}");
    }

    #[test]
    fn refuses_bad_headers() {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).end();
        let good = w.bytes();
        for version in [0u32, 3, 0xffff_ffff] {
            let mut b = good.clone();
            b[13..17].copy_from_slice(&version.to_le_bytes());
            let err = StreamReader::new(&b[..]).unwrap_err();
            assert!(matches!(err, StreamError::UnsupportedVersion { version: v } if v == version), "{err}");
        }
        let mut b = good.clone();
        b[0] = b'B';
        assert!(matches!(StreamReader::new(&b[..]).unwrap_err(), StreamError::NotAStream { .. }));
        assert!(matches!(StreamReader::new(&b[..5]).unwrap_err(), StreamError::NotAStream { .. }));
    }

    #[test]
    fn refuses_cut_and_corrupt_streams() {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).mkfile("f").write("f", 0, b"data").end();
        let good = w.bytes();
        assert!(read_all(&good).is_ok());
        // Cut inside a command's header and inside its attributes.
        let end_len = COMMAND_HEADER;
        for cut in [good.len() - end_len - 3, good.len() - end_len - 30, good.len() - 4] {
            let err = read_all(&good[..cut]).unwrap_err();
            assert!(matches!(err, StreamError::Truncated { .. }), "cut at {cut}: {err}");
        }
        // Cut at a command boundary: no END.
        let err = read_all(&good[..good.len() - end_len]).unwrap_err();
        assert!(matches!(err, StreamError::MissingEnd { commands: 3, .. }), "{err}");
        // A flipped data byte.
        let mut bad = good.clone();
        let at = good.len() - end_len - 2;
        bad[at] ^= 0x20;
        let err = read_all(&bad).unwrap_err();
        assert!(matches!(err, StreamError::Checksum { index: 3, .. }), "{err}");
        // Bytes after END.
        let mut more = good.clone();
        more.push(0);
        assert!(matches!(read_all(&more).unwrap_err(), StreamError::TrailingData { .. }));
        let mut twice = good.clone();
        twice.extend_from_slice(&good);
        assert!(matches!(read_all(&twice).unwrap_err(), StreamError::TrailingData { .. }));
    }

    #[test]
    fn refuses_malformed_attributes() {
        let expect = |w: &StreamWriter, what: &str| {
            let err = read_all(&w.bytes()).unwrap_err();
            assert!(err.to_string().contains(what), "expected {what:?} in: {err}");
        };
        // Duplicate PATH: btrfs receive would use the second one.
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1)
            .cmd(MKFILE, &[(PATH, Val::Bytes(b"ok")), (PATH, Val::Bytes(b"../escape")), (INO, Val::U64(1))])
            .end();
        expect(&w, "appears twice");
        // Missing, unexpected, wrongly sized and unknown attributes.
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).cmd(MKFILE, &[(PATH, Val::Bytes(b"f"))]).end();
        expect(&w, "INO is missing");
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).cmd(MKFILE, &[(PATH, Val::Bytes(b"f")), (INO, Val::U64(1)), (MODE, Val::U64(1))]).end();
        expect(&w, "unexpected attribute MODE");
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).cmd(MKFILE, &[(PATH, Val::Bytes(b"f")), (INO, Val::U32(1))]).end();
        expect(&w, "has 4 bytes, expected 8");
        let mut w = StreamWriter::new(1);
        w.subvol("vol", U1).cmd(MKFILE, &[(PATH, Val::Bytes(b"f")), (INO, Val::U64(1)), (27, Val::U64(1))]).end();
        expect(&w, "unknown attribute 27 in a version 1 stream");
        // An attribute longer than its command.
        let mut w = StreamWriter::new(2);
        let mut body = PATH.to_le_bytes().to_vec();
        body.extend_from_slice(&100u16.to_le_bytes());
        body.extend_from_slice(b"abc");
        w.subvol("vol", U1).raw_cmd(MKFILE, &body).end();
        expect(&w, "declares 100 bytes, 3 remain");
        // Unknown commands; v2 commands in a v1 stream; fs-verity.
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).raw_cmd(99, &[]).end();
        expect(&w, "unknown command 99");
        let mut w = StreamWriter::new(1);
        w.subvol("vol", U1).fallocate("f", 0, 0, 1).end();
        expect(&w, "unknown command 23 in a version 1 stream");
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1).raw_cmd(ENABLE_VERITY, &[]).end();
        expect(&w, "fs-verity");
        // Paths: absolute, '..', empty where the root is not allowed, NUL, not UTF-8.
        for (path, what) in [
            (&b"/etc/passwd"[..], "absolute"),
            (b"a/../../b", "'..'"),
            (b"", "empty"),
            (b"a\0b", "NUL"),
            (b"a/\xff", "not UTF-8"),
            (b"a//b", "not normalised"),
        ] {
            let mut w = StreamWriter::new(2);
            w.subvol("vol", U1).cmd(MKFILE, &[(PATH, Val::Bytes(path)), (INO, Val::U64(1))]).end();
            let err = read_all(&w.bytes()).unwrap_err();
            assert!(matches!(err, StreamError::Refused { index: 2, command: "mkfile", .. }), "{err:?}");
            assert!(err.to_string().contains(what), "expected {what:?} in: {err}");
        }
    }

    #[test]
    fn v1_data_has_a_length() {
        let mut w = StreamWriter::new(1);
        w.subvol("vol", U1).mkfile("f").write("f", 0, b"abc").end();
        let b = w.bytes();
        // The DATA header is type + length in v1: its length bytes precede "abc".
        let pos = b.windows(3).position(|x| x == b"abc").unwrap();
        assert_eq!(&b[pos - 4..pos], &[DATA as u8, 0, 3, 0]);
        assert!(read_all(&b).is_ok());
        let mut w = StreamWriter::new(2);
        w.subvol("vol", U1)
            .mkfile("f")
            .cmd(WRITE, &[(DATA, Val::Bytes(b"abc")), (PATH, Val::Bytes(b"f")), (FILE_OFFSET, Val::U64(0))])
            .end();
        // In v2 DATA swallows the rest of the command: the attributes after it are data.
        let err = read_all(&w.bytes()).unwrap_err();
        assert!(err.to_string().contains("PATH is missing"), "{err}");
    }
}
