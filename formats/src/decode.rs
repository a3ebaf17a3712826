//! zstd decompression in a thread of its own, so that a layer is decompressed while the
//! bytes before it are checked, hashed and written: `zstd -d | tar -x`, the yardstick, is
//! two processes, and so is this (bench/deploy.sh, bench/btrfs.sh measure both).

use std::io::{self, BufReader, Read};
use std::sync::mpsc;

/// Decompressed bytes handed over at a time.
const PIECE: usize = 256 << 10;
/// Pieces in flight: with [`PIECE`], the memory this costs (4 MiB). Decompressing is the
/// longest link of a deploy; with 1 MiB in flight it waited for the writer within each of
/// the scheduler's slices when the threads shared 2 cores (a tmpfs deploy of the 1 GiB
/// corpus of `bench/build.sh --corpus-only`, median of 5: 1.69 s with 1 MiB, 1.60 s with 4).
const IN_FLIGHT: usize = 16;

/// Runs `consume` on the zstd-decompressed bytes of `source`, decompressed by a second
/// thread as `consume` reads them. Once `consume` returns, the thread stops decompressing
/// and gives back what is left of `source` (its unread compressed bytes, as
/// [`zstd::stream::read::Decoder::finish`] does), for the caller to drain and check.
/// A decompression error reaches `consume` as a read error, as it would from the decoder.
pub fn decompressed<R, T>(source: R, consume: impl FnOnce(&mut dyn Read) -> T) -> io::Result<(T, BufReader<R>)>
where
    R: Read + Send,
{
    // The frame's XXH64 checksum is not computed: the compressed bytes are checked
    // against their signed sha256, and every file against its own, so it would only
    // repeat a weaker check (3% of a deploy's CPU).
    let mut context = zstd::zstd_safe::DCtx::create();
    context
        .set_parameter(zstd::zstd_safe::DParameter::ForceIgnoreChecksum(true))
        .map_err(|code| io::Error::other(zstd::zstd_safe::get_error_name(code)))?;
    let buffered = BufReader::with_capacity(zstd::zstd_safe::DCtx::in_size(), source);
    let mut decoder = zstd::stream::read::Decoder::with_context(buffered, &mut context);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT);
        // Pieces read go back to be filled again (no allocation, no page faults per piece).
        let (spare_tx, spare) = mpsc::channel::<Vec<u8>>();
        let worker = scope.spawn(move || {
            loop {
                let mut piece = spare.try_recv().unwrap_or_default();
                piece.resize(PIECE, 0);
                let (n, error) = read_some(&mut decoder, &mut piece);
                piece.truncate(n);
                let more = n > 0 && error.is_none();
                if (n > 0 || error.is_none()) && tx.send(Ok(piece)).is_err() {
                    break;
                }
                if let Some(e) = error {
                    let _ = tx.send(Err(e));
                }
                if !more {
                    break;
                }
            }
            decoder.finish()
        });
        let mut reader = Pieces { rx, spare: spare_tx, piece: Vec::new(), at: 0, end: None };
        let out = consume(&mut reader);
        // The worker's next hand-over fails: it stops and gives the source back.
        drop(reader);
        let rest = worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((out, rest))
    })
}

/// Reads until `buf` is full, the stream ends or fails (fewer, larger hand-overs),
/// retrying signals: how much was read, and the error that stopped it.
pub(crate) fn read_some(r: &mut impl Read, buf: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// The reading end: the pieces in order, then the end or the error that ended them.
struct Pieces {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    spare: mpsc::Sender<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
    /// Once ended: `None` inside for a clean end, else the error's kind and text (given
    /// again to every later read, as a decoder would).
    end: Option<Option<(io::ErrorKind, String)>>,
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.piece.len() {
                let n = buf.len().min(self.piece.len() - self.at);
                buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            match &self.end {
                Some(None) => return Ok(0),
                Some(Some((kind, text))) => return Err(io::Error::new(*kind, text.clone())),
                None => {}
            }
            match self.rx.recv() {
                Ok(Ok(piece)) if piece.is_empty() => self.end = Some(None),
                Ok(Ok(piece)) => {
                    let spent = std::mem::replace(&mut self.piece, piece);
                    if spent.len() == PIECE {
                        // The worker may have stopped: the piece is then dropped.
                        let _ = self.spare.send(spent);
                    }
                    self.at = 0;
                }
                Ok(Err(e)) => self.end = Some(Some((e.kind(), e.to_string()))),
                Err(mpsc::RecvError) => {
                    self.end = Some(Some((io::ErrorKind::Other, "the decompressing thread ended".into())))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed(data: &[u8]) -> Vec<u8> {
        zstd::encode_all(data, 3).unwrap()
    }

    #[test]
    fn gives_every_byte_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let blob = compressed(&data);
        let (out, mut rest) = decompressed(&blob[..], |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        })
        .unwrap();
        assert_eq!(out, data);
        let mut tail = Vec::new();
        rest.read_to_end(&mut tail).unwrap();
        assert!(tail.is_empty(), "the decoder read the whole frame");
    }

    #[test]
    fn stopping_early_still_gives_the_source_back_to_drain() {
        let data = vec![7u8; 5_000_000];
        let blob = compressed(&data);
        let (first, mut rest) = decompressed(&blob[..], |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b).unwrap();
            b
        })
        .unwrap();
        assert_eq!(first, [7u8; 10]);
        // What the decoder had not consumed is still there to be drained (and hashed).
        let mut tail = Vec::new();
        rest.read_to_end(&mut tail).unwrap();
        assert!(tail.len() < blob.len());
    }

    #[test]
    fn a_corrupt_stream_is_a_read_error_every_time() {
        let mut blob = compressed(&vec![1u8; 100_000]);
        let n = blob.len();
        blob[n / 2] ^= 0xff;
        blob[n - 3] ^= 0xff;
        let (errors, _) = decompressed(&blob[..], |r| {
            let mut v = Vec::new();
            let first = r.read_to_end(&mut v).is_err();
            let again = r.read(&mut [0u8; 4]).is_err();
            (first, again)
        })
        .unwrap();
        assert_eq!(errors, (true, true));
    }
}
