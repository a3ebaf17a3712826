//! tar+zstd payloads (`application/vnd.op-dbus.stage.payload.v1.tar+zstd`).
//!
//! Entries are written in the order they are given (the builder sorts them), with fixed
//! times, uid/gid 0, no user or group names and the modes the stage manifest promises, so
//! the same tree always gives the same bytes. zstd always runs with at least one worker
//! thread: its multi-threaded output does not depend on the number of workers, while the
//! single-threaded mode would give other bytes.

use std::io::{self, Read, Write};

use crate::digest::{Digest, HashingReader, HashingWriter};
use crate::manifest::Mode;
use crate::path::RelPath;

/// zstd job size: bounds memory with two workers to a few MiB of buffers.
pub const JOB_SIZE: u32 = 2 << 20;

/// Prefix of an OCI whiteout entry's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// Streams tar entries through multi-threaded zstd into `W`, hashing the compressed bytes.
pub struct TarZstdWriter<W: Write> {
    /// The BufWriter gathers tar's writes (8 KiB pieces: tar copies through `dyn Read`
    /// and `dyn Write`, so no `io::copy` specialisation applies) and feeds zstd, and the
    /// copy, in 1 MiB pieces. A file is read 8 KiB at a time; reading it through a 1 MiB
    /// BufReader cost one more copy and saved nothing (measured on the 1 GiB corpus).
    tar: tar::Builder<io::BufWriter<Tee<zstd::stream::write::Encoder<'static, Output<W>>>>>,
    mtime: u64,
}

/// The compressed bytes' way out: hashed here, or as they are when `W` hashes them itself
/// (a store's blob writer), so that they are not hashed twice.
enum Output<W: Write> {
    Hashed(HashingWriter<W>),
    Plain(W),
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Hashed(w) => w.write(buf),
            Output::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Hashed(w) => w.flush(),
            Output::Plain(w) => w.flush(),
        }
    }
}

/// The tar stream's way out: into zstd, and each piece also to `copy` when there is one.
struct Tee<Z: Write> {
    zstd: Z,
    copy: Option<Box<dyn Write>>,
}

impl<Z: Write> Write for Tee<Z> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.zstd.write(buf)?;
        if let Some(c) = &mut self.copy {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.zstd.flush()?;
        match &mut self.copy {
            Some(c) => c.flush(),
            None => Ok(()),
        }
    }
}

impl<W: Write> std::fmt::Debug for TarZstdWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarZstdWriter").field("mtime", &self.mtime).finish()
    }
}

/// Compression settings.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    pub level: i32,
    /// zstd worker threads; 0 means one per available core.
    pub workers: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression { level: 3, workers: 0 }
    }
}

impl<W: Write> TarZstdWriter<W> {
    /// Starts a payload; every entry gets modification time `mtime`.
    pub fn new(out: W, mtime: u64, compression: Compression) -> io::Result<Self> {
        Self::start(Output::Hashed(HashingWriter::new(out)), mtime, compression, None)
    }

    /// Like [`TarZstdWriter::new`] for an `out` that hashes what it is given (a store's
    /// blob writer): the compressed bytes are not hashed here, and [`TarZstdWriter::finish_into`]
    /// ends the payload. With `copy`, the tar stream is also written there, uncompressed, as
    /// it is compressed (the builder checks it there); `copy` is dropped when the archive
    /// ends, before the zstd frame does.
    pub fn into_hashing(
        out: W,
        mtime: u64,
        compression: Compression,
        copy: Option<Box<dyn Write>>,
    ) -> io::Result<Self> {
        Self::start(Output::Plain(out), mtime, compression, copy)
    }

    fn start(out: Output<W>, mtime: u64, compression: Compression, copy: Option<Box<dyn Write>>) -> io::Result<Self> {
        let workers = match compression.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        let mut enc = zstd::stream::write::Encoder::new(out, compression.level)?;
        enc.multithread(workers.max(1))?;
        // Smaller jobs than zstd's default (4 windows, 8 MiB at level 3): the buffers of
        // the jobs in flight are most of the builder's memory. Fixed, so output stays the same.
        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(JOB_SIZE))?;
        enc.include_checksum(true)?;
        let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, Tee { zstd: enc, copy }));
        tar.mode(tar::HeaderMode::Deterministic);
        tar.follow_symlinks(false);
        Ok(TarZstdWriter { tar, mtime })
    }

    fn header(&self, kind: tar::EntryType, mode: Mode, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode.bits());
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn add_dir(&mut self, path: &RelPath, mode: Mode) -> io::Result<()> {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, format!("{path}/"), io::empty())
    }

    /// Appends a file of exactly `size` bytes read from `content`, returning its sha256.
    /// A reader that yields fewer bytes (a file that changed while building) is an error.
    pub fn add_file<R: Read>(&mut self, path: &RelPath, mode: Mode, size: u64, content: R) -> io::Result<Digest> {
        let mut h = self.header(tar::EntryType::Regular, mode, size);
        let mut reader = HashingReader::new(content.take(size));
        self.tar.append_data(&mut h, path.as_str(), &mut reader)?;
        let (digest, n, _) = reader.finish();
        if n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {size} bytes but read {n}; did the file change while building?"),
            ));
        }
        Ok(digest)
    }

    /// Appends a file of exactly `size` bytes read from `content`, without hashing it (for
    /// a caller that hashes the tar stream, such as the builder's check of it).
    pub fn add_file_data<R: Read>(&mut self, path: &RelPath, mode: Mode, size: u64, content: R) -> io::Result<()> {
        let mut h = self.header(tar::EntryType::Regular, mode, size);
        let mut reader = content.take(size);
        self.tar.append_data(&mut h, path.as_str(), &mut reader)?;
        if reader.limit() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{path}: expected {size} bytes but read {}; did the file change while building?",
                    size - reader.limit()
                ),
            ));
        }
        Ok(())
    }

    /// Appends a file carried as a patch against the parent's version of it
    /// ([`crate::patch`]): a pax record marks it, and its data is the `patch_len` bytes
    /// of `patch`. Only in a `tar-patch+zstd` layer.
    pub fn add_patch<R: Read>(&mut self, path: &RelPath, mode: Mode, patch_len: u64, patch: R) -> io::Result<()> {
        let body = format!("{}={}\n", crate::patch::PAX_KEY, crate::patch::PAX_VALUE);
        // A pax record is "LEN KEY=VALUE\n", LEN counting itself.
        let mut len = body.len() + 2;
        while format!("{len} {body}").len() != len {
            len += 1;
        }
        let record = format!("{len} {body}");
        let mut x = self.header(tar::EntryType::XHeader, Mode::new(0o644).expect("valid"), record.len() as u64);
        self.tar.append_data(&mut x, "././@PaxHeader", record.as_bytes())?;
        let mut h = self.header(tar::EntryType::Regular, mode, patch_len);
        let mut reader = patch.take(patch_len);
        self.tar.append_data(&mut h, path.as_str(), &mut reader)?;
        if reader.limit() != 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{path}: the patch is cut short")));
        }
        Ok(())
    }

    pub fn add_symlink(&mut self, path: &RelPath, link: &str) -> io::Result<()> {
        let mut h = self.header(tar::EntryType::Symlink, Mode::new(0o777).expect("valid"), 0);
        self.tar.append_link(&mut h, path.as_str(), link)
    }

    /// Appends an OCI whiteout removing `path` of the layers below.
    pub fn add_whiteout(&mut self, path: &RelPath) -> io::Result<()> {
        let name = format!("{WHITEOUT_PREFIX}{}", path.file_name());
        let wh = match path.parent() {
            Some(p) => format!("{p}/{name}"),
            None => name,
        };
        let mut h = self.header(tar::EntryType::Regular, Mode::new(0o644).expect("valid"), 0);
        self.tar.append_data(&mut h, wh, io::empty())
    }

    /// Ends the archive and the zstd frame; returns the compressed digest and size.
    pub fn finish(self) -> io::Result<(Digest, u64, W)> {
        match self.end()? {
            Output::Hashed(hashing) => Ok(hashing.finish()),
            Output::Plain(_) => Err(io::Error::other("this payload's output is not hashed here: use finish_into")),
        }
    }

    /// Ends the archive and the zstd frame of a payload started with
    /// [`TarZstdWriter::into_hashing`]; returns `out`, which hashed the compressed bytes.
    pub fn finish_into(self) -> io::Result<W> {
        match self.end()? {
            Output::Hashed(hashing) => Ok(hashing.finish().2),
            Output::Plain(out) => Ok(out),
        }
    }

    fn end(self) -> io::Result<Output<W>> {
        let mut tee = self.tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        if let Some(mut c) = tee.copy.take() {
            c.flush()?;
        }
        tee.zstd.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(workers: u32) -> (Digest, Vec<u8>) {
        let mut w = TarZstdWriter::new(Vec::new(), 1_700_000_000, Compression { level: 3, workers }).unwrap();
        let m = Mode::new(0o755).unwrap();
        w.add_dir(&"bin".parse().unwrap(), m).unwrap();
        let long = format!("bin/{}", "x".repeat(150));
        w.add_file(&long.parse().unwrap(), m, 3, &b"abc"[..]).unwrap();
        w.add_symlink(&"bin/link".parse().unwrap(), "x").unwrap();
        w.add_whiteout(&"bin/gone".parse().unwrap()).unwrap();
        let (d, n, out) = w.finish().unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(d, Digest::of(&out));
        (d, out)
    }

    #[test]
    fn deterministic_across_worker_counts() {
        let (a, out) = build(1);
        let (b, _) = build(2);
        assert_eq!(a, b);
        let tar = zstd::decode_all(&out[..]).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names[0], "bin/");
        assert!(names[1].len() > 150);
        assert_eq!(names[3], "bin/.wh.gone");
    }

    #[test]
    fn short_content_is_an_error() {
        let mut w = TarZstdWriter::new(Vec::new(), 0, Compression::default()).unwrap();
        let e = w.add_file(&"f".parse().unwrap(), Mode::new(0o644).unwrap(), 10, &b"abc"[..]).unwrap_err();
        assert!(e.to_string().contains("change while building") || e.kind() == io::ErrorKind::UnexpectedEof, "{e}");
    }
}
