//! Block-level patches: a file of a delta layer carried as a patch against the parent's
//! version of the same file (`application/vnd.op-dbus.stage.payload.v1.tar-patch+zstd`
//! layers; see `docs/formats.md`).
//!
//! The new file is cut into windows of [`WINDOW`] bytes; each is one zstd frame
//! compressed with the parent's bytes around the same offset (the window widened by
//! [`MARGIN`] on each side) as a reference prefix and long-distance matching: zstd's
//! `--patch-from`, in pieces. Memory stays bounded whatever the size of the file: making
//! or applying a patch holds one reference range (at most `WINDOW + 2 x MARGIN`), one
//! window of the new file and one frame, about 16 MiB, never the whole file.
//!
//! ```text
//! patch    "OPDBUSP1"  u64 LE old size  u64 LE new size  frame*
//! frame    u32 LE length, then one zstd frame whose content is the next window
//!          (WINDOW bytes, the last one shorter), made against the parent's bytes
//!          [i x WINDOW - MARGIN, (i+1) x WINDOW + MARGIN) clipped to the old size
//! ```
//!
//! The applier refuses a reference whose size is not the old size the patch names (the
//! parent's file is not the one the patch was made against), a frame longer than
//! `compress_bound(WINDOW)`, a frame that does not decode to exactly its window, and
//! bytes after the last frame. What it writes is hashed; the caller compares that with
//! the signed sha256 like any file's.
//!
//! ```
//! use formats::patch::{apply, make};
//! let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
//! let mut new = old.clone();
//! new[1000..1100].fill(7);
//! let mut patch = Vec::new();
//! make(&mut std::io::Cursor::new(&old), old.len() as u64, &new[..], new.len() as u64, &mut patch).unwrap();
//! assert!(patch.len() < 1000);
//! let mut out = Vec::new();
//! let (digest, n) =
//!     apply(&mut &patch[..], patch.len() as u64, &mut std::io::Cursor::new(&old), new.len() as u64, &mut out).unwrap();
//! assert_eq!((out, n), (new.clone(), new.len() as u64));
//! assert_eq!(digest, formats::Digest::of(&new));
//! ```

use std::io::{self, Read, Seek, SeekFrom, Write};

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

use crate::digest::{Digest, Hasher};

/// Bytes of the new file per frame.
pub const WINDOW: u64 = 4 << 20;
/// Bytes of the parent's file either side of a window's own range in its reference.
pub const MARGIN: u64 = 2 << 20;
/// The pax record marking a file entry whose data is a patch, and its value.
pub const PAX_KEY: &str = "OPDBUS.patch";
pub const PAX_VALUE: &str = "zstd-windows-1";
/// zstd level of the frames.
pub const LEVEL: i32 = 3;

const MAGIC: &[u8; 8] = b"OPDBUSP1";
/// Bytes of the patch header.
pub const HEADER: u64 = 24;

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch itself is malformed (exit 7).
    #[error("malformed patch: {0}")]
    Malformed(String),
    /// The parent's file is not the one the patch was made against (exit 7).
    #[error(
        "the parent's file is {have} bytes, the patch was made against {want} bytes: it is not the parent's version"
    )]
    Reference { have: u64, want: u64 },
    /// Reading the patch or the parent's file, or writing the result, failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The byte range of the parent's file that window `i` is made against.
pub fn reference_range(i: u64, old_size: u64) -> (u64, u64) {
    let start = (i * WINDOW).saturating_sub(MARGIN).min(old_size);
    let end = (i + 1).saturating_mul(WINDOW).saturating_add(MARGIN).min(old_size);
    (start, end)
}

/// Most bytes a patch of a `new_size`-byte file may have.
pub fn max_patch_len(new_size: u64) -> u64 {
    let frames = new_size.div_ceil(WINDOW);
    HEADER + frames.saturating_mul(4 + zstd_safe::compress_bound(WINDOW as usize) as u64)
}

/// The patch header of a patch: the old and new sizes it names.
pub fn parse_header(h: &[u8; HEADER as usize]) -> Result<(u64, u64), PatchError> {
    if &h[..8] != MAGIC {
        return Err(PatchError::Malformed("it does not start with OPDBUSP1".into()));
    }
    let old = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let new = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    Ok((old, new))
}

fn read_range<R: Read + Seek>(r: &mut R, (start, end): (u64, u64), buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    r.seek(SeekFrom::Start(start))?;
    r.take(end - start).read_to_end(buf)?;
    if buf.len() as u64 != end - start {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the reference file is shorter than it was"));
    }
    Ok(())
}

fn zstd_err(what: &str, code: usize) -> io::Error {
    io::Error::other(format!("{what}: {}", zstd_safe::get_error_name(code)))
}

/// Writes the patch that turns `old` (`old_size` bytes) into `new` (exactly `new_size`
/// bytes) to `out`; returns the new file's sha256 and the patch's length.
pub fn make<O: Read + Seek, N: Read, W: Write>(
    old: &mut O,
    old_size: u64,
    mut new: N,
    new_size: u64,
    out: &mut W,
) -> io::Result<(Digest, u64)> {
    out.write_all(MAGIC)?;
    out.write_all(&old_size.to_le_bytes())?;
    out.write_all(&new_size.to_le_bytes())?;
    let mut written = HEADER;
    let mut hasher = Hasher::new();
    let (mut reference, mut window, mut frame) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i * WINDOW < new_size {
        let len = (new_size - i * WINDOW).min(WINDOW);
        window.clear();
        (&mut new).take(len).read_to_end(&mut window)?;
        if window.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("expected {new_size} bytes; did the file change while building?"),
            ));
        }
        hasher.update(&window);
        read_range(old, reference_range(i, old_size), &mut reference)?;
        frame.clear();
        frame.reserve(zstd_safe::compress_bound(window.len()));
        {
            let mut cctx = CCtx::create();
            let span = (reference.len() + window.len()).max(1) as u64;
            let window_log = (64 - (span - 1).leading_zeros()).clamp(10, 27);
            for p in [
                CParameter::CompressionLevel(LEVEL),
                CParameter::WindowLog(window_log),
                CParameter::EnableLongDistanceMatching(true),
                CParameter::ContentSizeFlag(true),
                CParameter::ChecksumFlag(false),
            ] {
                cctx.set_parameter(p).map_err(|c| zstd_err("setting up zstd", c))?;
            }
            cctx.ref_prefix(&reference).map_err(|c| zstd_err("zstd reference", c))?;
            cctx.compress2(&mut frame, &window).map_err(|c| zstd_err("compressing a patch window", c))?;
        }
        out.write_all(&(frame.len() as u32).to_le_bytes())?;
        out.write_all(&frame)?;
        written += 4 + frame.len() as u64;
        i += 1;
    }
    let mut extra = [0u8; 1];
    if new.read(&mut extra)? != 0 {
        return Err(io::Error::other(format!("more than {new_size} bytes; did the file change while building?")));
    }
    Ok((hasher.finish(), written))
}

/// Applies the patch read from `patch` (exactly `patch_len` bytes) to `old`, writing the
/// new file to `out`; `new_size` is the size the patch must produce (the signed one).
/// Returns the sha256 and size of what was written.
pub fn apply<P: Read, O: Read + Seek, W: Write>(
    patch: &mut P,
    patch_len: u64,
    old: &mut O,
    new_size: u64,
    out: &mut W,
) -> Result<(Digest, u64), PatchError> {
    if patch_len < HEADER {
        return Err(PatchError::Malformed(format!("{patch_len} bytes, shorter than its header")));
    }
    let mut header = [0u8; HEADER as usize];
    patch.read_exact(&mut header)?;
    let (old_size, declared_new) = parse_header(&header)?;
    if declared_new != new_size {
        return Err(PatchError::Malformed(format!("it makes {declared_new} bytes, the file has {new_size}")));
    }
    apply_body(patch, patch_len - HEADER, old_size, old, new_size, out)
}

/// [`apply`] after the header was read: `body_len` bytes of frames remain in `patch`,
/// made against `old_size` bytes and making `new_size` bytes.
pub fn apply_body<P: Read, O: Read + Seek, W: Write>(
    patch: &mut P,
    body_len: u64,
    old_size: u64,
    old: &mut O,
    new_size: u64,
    out: &mut W,
) -> Result<(Digest, u64), PatchError> {
    let malformed = |s: String| PatchError::Malformed(s);
    if body_len.saturating_add(HEADER) > max_patch_len(new_size) {
        return Err(malformed(format!("{} bytes for a file of {new_size} bytes", body_len.saturating_add(HEADER))));
    }
    let have = old.seek(SeekFrom::End(0))?;
    if have != old_size {
        return Err(PatchError::Reference { have, want: old_size });
    }
    let mut left = body_len;
    let mut hasher = Hasher::new();
    let max_frame = zstd_safe::compress_bound(WINDOW as usize) as u64;
    let (mut reference, mut frame, mut window) = (Vec::new(), Vec::new(), Vec::with_capacity(WINDOW as usize));
    let mut i = 0;
    while i * WINDOW < new_size {
        let len = (new_size - i * WINDOW).min(WINDOW);
        if left < 4 {
            return Err(malformed(format!("it ends before window {i}")));
        }
        let mut n = [0u8; 4];
        patch.read_exact(&mut n)?;
        let flen = u32::from_le_bytes(n) as u64;
        left -= 4;
        if flen > max_frame || flen > left {
            return Err(malformed(format!("window {i} declares a frame of {flen} bytes")));
        }
        frame.clear();
        patch.take(flen).read_to_end(&mut frame)?;
        if frame.len() as u64 != flen {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the patch ends inside a frame").into());
        }
        left -= flen;
        read_range(old, reference_range(i, old_size), &mut reference)?;
        window.clear();
        {
            let mut dctx = DCtx::create();
            dctx.ref_prefix(&reference)
                .map_err(|c| malformed(format!("zstd reference: {}", zstd_safe::get_error_name(c))))?;
            let got = dctx
                .decompress(&mut window, &frame)
                .map_err(|c| malformed(format!("window {i} does not decode: {}", zstd_safe::get_error_name(c))))?;
            if got as u64 != len {
                return Err(malformed(format!("window {i} decodes to {got} bytes, not {len}")));
            }
        }
        hasher.update(&window);
        out.write_all(&window)?;
        i += 1;
    }
    if left != 0 {
        return Err(malformed(format!("{left} bytes follow the last window")));
    }
    Ok((hasher.finish(), new_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise as varied;
    use std::io::Cursor;

    fn roundtrip(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut patch = Vec::new();
        let (d, n) = make(&mut Cursor::new(old), old.len() as u64, new, new.len() as u64, &mut patch).unwrap();
        assert_eq!(n, patch.len() as u64);
        assert_eq!(d, Digest::of(new));
        let mut out = Vec::new();
        let (d2, _) = apply(&mut &patch[..], n, &mut Cursor::new(old), new.len() as u64, &mut out).unwrap();
        assert_eq!(out, new);
        assert_eq!(d2, d);
        patch
    }

    #[test]
    fn a_small_change_of_a_large_file_is_a_small_patch() {
        let old = varied(11 << 20, 1);
        let mut new = old.clone();
        for at in [5, 4 << 20, (9 << 20) + 77] {
            new[at..at + 4096].fill(9);
        }
        // Something inserted: later bytes move by 1000.
        new.splice(6 << 20..6 << 20, std::iter::repeat_n(3u8, 1000));
        let patch = roundtrip(&old, &new);
        assert!(patch.len() < 40_000, "{} bytes", patch.len());
    }

    #[test]
    fn empty_and_grown_files() {
        roundtrip(b"", b"");
        roundtrip(b"", &varied(5 << 20, 2));
        roundtrip(&varied(100, 3), b"");
    }

    #[test]
    fn another_reference_or_a_damaged_patch_is_refused() {
        let old = varied(1 << 20, 4);
        let mut new = old.clone();
        new[10..20].fill(0);
        let mut patch = Vec::new();
        make(&mut Cursor::new(&old), old.len() as u64, &new[..], new.len() as u64, &mut patch).unwrap();
        let n = patch.len() as u64;
        let apply_to = |p: &[u8], r: &[u8], size: u64| {
            apply(&mut &p[..], p.len() as u64, &mut Cursor::new(r), size, &mut Vec::new())
        };
        assert!(matches!(apply_to(&patch, &old[1..], 1 << 20), Err(PatchError::Reference { .. })));
        // Same size, other bytes: it decodes, to other content (the caller's sha256 check).
        let mut other = old.clone();
        other[500_000] ^= 1;
        let (d, _) = apply_to(&patch, &other, 1 << 20).unwrap();
        assert_ne!(d, Digest::of(&new));
        assert!(matches!(apply_to(&patch, &old, 5), Err(PatchError::Malformed(_))));
        let mut cut = patch.clone();
        cut.truncate(patch.len() - 3);
        assert!(apply_to(&cut, &old, 1 << 20).is_err());
        let mut long = patch.clone();
        long.push(0);
        assert!(matches!(apply_to(&long, &old, 1 << 20), Err(PatchError::Malformed(_))));
        let mut bad = patch.clone();
        bad[30] ^= 0xff;
        assert!(
            apply(&mut &bad[..], n, &mut Cursor::new(&old), 1 << 20, &mut Vec::new()).is_err() || {
                let mut out = Vec::new();
                apply(&mut &bad[..], n, &mut Cursor::new(&old), 1 << 20, &mut out).unwrap();
                out != new
            }
        );
    }
}
