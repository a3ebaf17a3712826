//! Validating a send stream while handing it on: each command goes to the writer (the
//! stdin of `btrfs receive`, or the compressor of a layer being built) as soon as the
//! checker passed it, and not a byte before. One read of the stream, no validating pass
//! of its own.
//!
//! ```text
//! reader ─► StreamReader ─► Checker ─► watch (budget) ─► writer
//!           (framing, CRC)  (model)                      header, then each checked
//!                                                        command as read; END held back
//! ```
//!
//! [`forward_stream_hashing`] also hashes each file's content from the WRITE commands as
//! they pass ([`Forwarded::files`]), so that the receiver's result is checked against the
//! signed per-file digests without reading back what the stream wrote in order.
//!
//! END is not written: [`Forwarded::write_end`] hands it on once the caller has checked
//! what it still has to (the blob's digest), so a receiver never completes a stream that
//! was not checked to its last byte. A receiver that saw commands of a stream that then
//! failed holds a partial subvolume: the caller stops it and deletes what it made.

use std::io::{Read, Write};

use super::StreamError;
use super::stream::{At, Command, StreamReader, Uuid};
use super::validate::{Checker, Expect, FileDigests, ParentTree, StreamSummary};

/// What a stream has made the receiver store and create so far (see
/// [`StreamSummary::bytes_stored`] and [`StreamSummary::entries_created`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes_stored: u64,
    pub entries_created: u64,
}

/// A stream checked to its END and handed on, END excepted.
#[derive(Debug)]
pub struct Forwarded {
    pub summary: StreamSummary,
    /// With [`forward_stream_hashing`]: the sha256 and length of each file of the final
    /// tree that the stream created and wrote in order, by path. Every other file (cloned
    /// into, written with gaps or out of order, truncated, or a parent's) is missing and
    /// must be read from the result to be checked. Empty with [`forward_stream`].
    pub files: FileDigests,
    end: Vec<u8>,
}

impl Forwarded {
    /// Writes the stream's END command (checked like every other) to `out`.
    pub fn write_end<W: Write>(&self, out: &mut W) -> std::io::Result<()> {
        out.write_all(&self.end)
    }
}

/// Reads the send stream `r`, checks every command as [`validate_stream`](super::validate_stream)
/// does, and writes the stream header and each command to `out` once it is checked and
/// `watch` accepted what the stream stores and creates so far; END is kept for
/// [`Forwarded::write_end`].
///
/// `declared_parent` and `parent_tree` choose what the stream must be: neither, a full
/// stream; a UUID, an incremental stream against that parent (checked exactly through
/// the parent's tree when it is given); only a tree, an incremental stream against
/// whatever parent the caller holds (as [`validate_stream_onto`](super::validate_stream_onto)).
///
/// `watch` refusing (`Err(reason)`) refuses the stream at that command. A failure to write
/// to `out` is [`StreamError::Forward`].
pub fn forward_stream<R: Read, W: Write>(
    r: R,
    declared_parent: Option<Uuid>,
    parent_tree: Option<&ParentTree>,
    out: &mut W,
    watch: impl FnMut(Progress) -> Result<(), String>,
) -> Result<Forwarded, StreamError> {
    forward(r, checker(declared_parent, parent_tree), out, watch)
}

/// [`forward_stream`], and the content of each file the stream creates hashed as its
/// writes pass ([`Forwarded::files`]).
pub fn forward_stream_hashing<R: Read, W: Write>(
    r: R,
    declared_parent: Option<Uuid>,
    parent_tree: Option<&ParentTree>,
    out: &mut W,
    watch: impl FnMut(Progress) -> Result<(), String>,
) -> Result<Forwarded, StreamError> {
    forward(r, checker(declared_parent, parent_tree).hashing(), out, watch)
}

fn checker(declared_parent: Option<Uuid>, parent_tree: Option<&ParentTree>) -> Checker {
    let expect = match (declared_parent, parent_tree) {
        (Some(u), _) => Expect::Parent(u),
        (None, Some(_)) => Expect::AnyParent,
        (None, None) => Expect::Full,
    };
    Checker::new(expect, parent_tree.cloned())
}

fn forward<R: Read, W: Write>(
    r: R,
    mut checker: Checker,
    out: &mut W,
    mut watch: impl FnMut(Progress) -> Result<(), String>,
) -> Result<Forwarded, StreamError> {
    let mut reader = StreamReader::new(r)?;
    let forward = |source| StreamError::Forward { source };
    out.write_all(reader.raw_stream_header()).map_err(forward)?;
    loop {
        let offset = reader.position();
        let Some(cmd) = reader.next_command()? else { break };
        let at = At { index: reader.commands(), offset };
        checker.check_watched(at, &cmd, &mut watch)?;
        let [header, body] = reader.raw_command();
        if cmd == Command::End {
            let summary = checker.finish(reader.version(), reader.position())?;
            return Ok(Forwarded { summary, files: checker.file_digests(), end: [header, body].concat() });
        }
        write_command(out, header, body).map_err(forward)?;
    }
    // next_command returns None only after END, which returned above, or after an error.
    Err(checker
        .finish(reader.version(), reader.position())
        .err()
        .unwrap_or(StreamError::MissingEnd { offset: reader.position(), commands: reader.commands() }))
}

/// Writes a command's header and body as one vectored write where the writer can (a pipe
/// to `btrfs receive`: one syscall per data command, no copy into a buffer of ours).
fn write_command<W: Write>(out: &mut W, header: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut header, mut body) = (header, body);
    while !header.is_empty() {
        match out.write_vectored(&[std::io::IoSlice::new(header), std::io::IoSlice::new(body)]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) if n < header.len() => header = &header[n..],
            Ok(n) => {
                body = &body[n - header.len()..];
                header = &[];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.write_all(body)
}

#[cfg(test)]
mod tests {
    use super::super::stream::writer::StreamWriter;
    use super::*;

    const OWN: [u8; 16] = [0x11; 16];

    fn stream() -> Vec<u8> {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", OWN)
            .chmod("", 0o755)
            .mkfile("o257-7-0")
            .rename("o257-7-0", "tool")
            .write("tool", 0, b"#!/bin/sh\n")
            .end();
        w.bytes()
    }

    #[test]
    fn a_valid_stream_is_handed_on_whole_with_end_last() {
        let bytes = stream();
        let mut out = Vec::new();
        let done = forward_stream(&bytes[..], None, None, &mut out, |_| Ok(())).unwrap();
        assert_eq!(done.summary.bytes_written, 10);
        assert_eq!(&out[..], &bytes[..bytes.len() - 10], "everything but END");
        done.write_end(&mut out).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn nothing_after_a_refused_command_is_handed_on() {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", OWN).symlink("o257-7-0", "x").rename("o257-7-0", "l").mkfile("l/through").end();
        let bytes = w.bytes();
        let mut out = Vec::new();
        let err = forward_stream(&bytes[..], None, None, &mut out, |_| Ok(())).unwrap_err();
        assert!(err.is_malformed(), "{err}");
        let mut ok = StreamWriter::new(2);
        ok.subvol("vol", OWN).symlink("o257-7-0", "x").rename("o257-7-0", "l");
        assert_eq!(out, ok.bytes(), "the commands before the refused one, and nothing of it");
    }

    #[test]
    fn an_empty_or_cut_stream_is_refused() {
        let mut out = Vec::new();
        let err = forward_stream(&[][..], None, None, &mut out, |_| Ok(())).unwrap_err();
        assert!(matches!(err, StreamError::NotAStream { .. }), "{err}");
        assert!(out.is_empty());
        let bytes = stream();
        let err = forward_stream(&bytes[..bytes.len() - 10], None, None, &mut out, |_| Ok(())).unwrap_err();
        assert!(matches!(err, StreamError::MissingEnd { .. }), "{err}");
        let err = forward_stream(&bytes[..bytes.len() - 3], None, None, &mut Vec::new(), |_| Ok(())).unwrap_err();
        assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
    }

    #[test]
    fn files_written_in_order_are_hashed_from_the_stream() {
        use crate::Digest;
        let mut w = StreamWriter::new(2);
        w.subvol("vol", OWN)
            .mkdir("o256-7-0")
            .mkfile("o257-7-0")
            .write("o257-7-0", 0, b"#!/bin/sh\n")
            .write("o257-7-0", 10, b"exit 0\n")
            .truncate("o257-7-0", 17)
            // Renamed into a directory made later, and linked: both paths, one content.
            .rename("o256-7-0", "bin")
            .rename("o257-7-0", "bin/tool")
            .link("tool", "bin/tool")
            .mkfile("empty")
            // Cloned into: not followed.
            .mkfile("copy")
            .clone_range("copy", 0, 17, OWN, "tool", 0)
            // A hole before the data: not followed either.
            .mkfile("sparse")
            .write("sparse", 4096, b"x")
            // Written again after another file's data: neither.
            .mkfile("again")
            .write("again", 0, b"a")
            .mkfile("between")
            .write("between", 0, b"b")
            .write("again", 1, b"a")
            .end();
        let bytes = w.bytes();
        let mut out = Vec::new();
        let done = forward_stream_hashing(&bytes[..], None, None, &mut out, |_| Ok(())).unwrap();
        let tool = (Digest::of(b"#!/bin/sh\nexit 0\n"), 17);
        let want: FileDigests = [
            ("bin/tool".to_owned(), tool),
            ("tool".to_owned(), tool),
            ("empty".to_owned(), (Digest::of(b""), 0)),
            ("between".to_owned(), (Digest::of(b"b"), 1)),
        ]
        .into();
        assert_eq!(done.files, want);
        // The same stream is handed on byte for byte, and without hashing nothing is listed.
        let plain = forward_stream(&bytes[..], None, None, &mut Vec::new(), |_| Ok(())).unwrap();
        assert!(plain.files.is_empty());
        done.write_end(&mut out).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn an_incremental_stream_lists_only_the_files_it_creates_whole() {
        use crate::Digest;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old"), b"parent's").unwrap();
        std::fs::write(dir.path().join("kept"), b"parent's").unwrap();
        let tree = ParentTree::scan(dir.path()).unwrap();
        const PARENT: [u8; 16] = [0x22; 16];
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT)
            // A parent's file changed in place: its content is not known from the stream.
            .write("old", 0, b"new")
            // A new file renamed over a parent's: known.
            .mkfile("o300-8-0")
            .write("o300-8-0", 0, b"replaced")
            .rename("o300-8-0", "kept")
            .end();
        let done = forward_stream_hashing(&w.bytes()[..], Some(Uuid(PARENT)), Some(&tree), &mut Vec::new(), |_| Ok(()))
            .unwrap();
        assert_eq!(done.files, [("kept".to_owned(), (Digest::of(b"replaced"), 8))].into());
    }

    #[test]
    fn the_watch_refuses_at_the_command_that_goes_over() {
        let bytes = stream();
        let mut out = Vec::new();
        let err = forward_stream(&bytes[..], None, None, &mut out, |p| {
            if p.bytes_stored > 4 { Err(format!("{} bytes", p.bytes_stored)) } else { Ok(()) }
        })
        .unwrap_err();
        assert!(err.to_string().contains("10 bytes"), "{err}");
        assert!(err.is_malformed());
        assert!(!out.windows(10).any(|w| w == b"#!/bin/sh\n"), "the write was not handed on");
    }
}
