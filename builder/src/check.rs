//! The tar stream of a layer, handed from the thread that writes it to the thread that
//! checks it (`formats::unpack::check::LayerCheck`), piece by piece as it is compressed.
//!
//! At most [`PIECES`] pieces of the stream are in flight; their buffers go back to the
//! writer to be reused, so the check costs a copy of each piece and no allocation.

use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Pieces in flight (each at most the payload writer's 1 MiB buffer).
pub const PIECES: usize = 2;

/// The message a write gets when the checking side has stopped (it refused the layer).
const STOPPED: &str = "the check of the layer stopped";

/// A pipe between two threads: [`Writer`] for the payload writer, [`Reader`] for the check.
pub fn pipe() -> (Writer, Reader) {
    let (full_tx, full_rx) = sync_channel(PIECES);
    let (free_tx, free_rx) = sync_channel(PIECES + 1);
    (Writer { full: full_tx, free: free_rx }, Reader { full: full_rx, free: free_tx, piece: Vec::new(), at: 0 })
}

/// Whether `e` is a write to a check that had stopped: the check's error says why.
pub fn is_stopped(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
        || e.to_string().contains(STOPPED)
}

#[derive(Debug)]
pub struct Writer {
    full: SyncSender<Vec<u8>>,
    free: Receiver<Vec<u8>>,
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut piece = self.free.try_recv().unwrap_or_default();
        piece.clear();
        piece.extend_from_slice(buf);
        self.full.send(piece).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, STOPPED))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct Reader {
    full: Receiver<Vec<u8>>,
    free: SyncSender<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            let Ok(next) = self.full.recv() else { return Ok(0) };
            let used = std::mem::replace(&mut self.piece, next);
            self.at = 0;
            // The writer may have stopped; then the buffer is simply dropped.
            let _ = self.free.try_send(used);
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_gets_every_byte_in_order_then_the_end() {
        let (mut w, mut r) = pipe();
        let t = std::thread::spawn(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        let want: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for chunk in want.chunks(7_777) {
            w.write_all(chunk).unwrap();
        }
        drop(w);
        assert_eq!(t.join().unwrap(), want);
    }

    #[test]
    fn a_write_after_the_reader_stopped_fails() {
        let (mut w, r) = pipe();
        drop(r);
        let e = w.write(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
