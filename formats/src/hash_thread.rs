//! sha256 of file contents on a thread of its own, so that a large file is hashed while the
//! thread that writes it goes on writing: on a deploy, the signed sha256 of every file is
//! the largest cost `zstd -d | tar -x` does not have, and a single thread doing both the
//! writes and the hashing was the slowest link of the pipeline.
//!
//! The writer fills buffers it takes from [`HashThread::buffer`] (at most [`BUFFERS`] exist;
//! the hashing thread hands each back once hashed), writes them, and passes them on with
//! [`HashThread::data`]; [`HashThread::end`] closes a file. The digests come back in the
//! order the files were closed ([`HashThread::next_digest`]). Small files go in batches
//! ([`HashThread::files`]): their contents back to back in one buffer, one hand-over for
//! many files.

use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use crate::digest::{Digest, Hasher};

/// Buffers in existence at a time: the memory this costs is `BUFFERS` × the buffer size
/// the writer asks for (8 MiB for the unpacker's 128 KiB). Enough that the writer does not
/// wait for the hashing thread within a scheduler slice when they share a core: with 16,
/// a tmpfs deploy of the 1 GiB corpus of `bench/build.sh --corpus-only` took 1.69 s, with
/// 64, 1.63 s (medians of 5).
pub(crate) const BUFFERS: usize = 64;

enum Job {
    /// A buffer and how many of its bytes belong to the file.
    Data(Vec<u8>, usize),
    End,
    /// Whole files back to back in a buffer, each this many bytes long.
    Files(Vec<u8>, Vec<usize>),
}

/// A hashing thread and the buffers it shares with the writer.
pub(crate) struct HashThread {
    jobs: Option<SyncSender<Job>>,
    digests: Receiver<Digest>,
    spare: Receiver<Vec<u8>>,
    made: usize,
    size: usize,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HashThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashThread").field("buffers", &self.made).field("size", &self.size).finish()
    }
}

impl HashThread {
    /// Starts the thread; buffers are `size` bytes long. `None` when no thread can be
    /// started (the caller hashes inline).
    pub(crate) fn start(size: usize) -> Option<HashThread> {
        let (jobs, job_rx) = sync_channel::<Job>(BUFFERS);
        let (digest_tx, digests) = channel();
        let (spare_tx, spare) = channel();
        let thread = std::thread::Builder::new()
            .name("hash".into())
            .spawn(move || hash_jobs(&job_rx, &digest_tx, &spare_tx))
            .ok()?;
        Some(HashThread { jobs: Some(jobs), digests, spare, made: 0, size, thread: Some(thread) })
    }

    /// A buffer of the size given at start (its contents are whatever was last in it).
    /// Waits for the hashing thread to give one back when [`BUFFERS`] are in use.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        if let Ok(b) = self.spare.try_recv() {
            return b;
        }
        if self.made < BUFFERS {
            self.made += 1;
            return vec![0; self.size];
        }
        // The thread gives every buffer back; it only stops when `jobs` is dropped.
        self.spare.recv().unwrap_or_else(|_| vec![0; self.size])
    }

    /// Hashes `buf[..len]` as the next bytes of the open file. `false` when the hashing
    /// thread is gone (it never stops on its own while `self` lives).
    pub(crate) fn data(&mut self, buf: Vec<u8>, len: usize) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(Job::Data(buf, len)).is_ok())
    }

    /// Closes the open file: its digest is the next [`HashThread::next_digest`] gives
    /// after those of the files closed before it.
    pub(crate) fn end(&mut self) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(Job::End).is_ok())
    }

    /// Hashes whole files, `lens` bytes each, back to back from the start of `buf` (a
    /// buffer from [`HashThread::buffer`]); none may be open. Their digests come in order.
    pub(crate) fn files(&mut self, buf: Vec<u8>, lens: Vec<usize>) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(Job::Files(buf, lens)).is_ok())
    }

    /// The digest of the earliest closed file not yet asked for; `None` when the thread is
    /// gone.
    pub(crate) fn next_digest(&mut self) -> Option<Digest> {
        self.digests.recv().ok()
    }
}

impl Drop for HashThread {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hash_jobs(jobs: &Receiver<Job>, digests: &Sender<Digest>, spare: &Sender<Vec<u8>>) {
    let mut hasher = Hasher::new();
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Data(buf, len) => {
                hasher.update(&buf[..len.min(buf.len())]);
                // The writer may be gone: the buffer is then dropped.
                let _ = spare.send(buf);
            }
            Job::End => {
                if digests.send(std::mem::take(&mut hasher).finish()).is_err() {
                    return;
                }
            }
            Job::Files(buf, lens) => {
                let mut at = 0;
                for len in lens {
                    let end = (at + len).min(buf.len());
                    if digests.send(Digest::of(&buf[at..end])).is_err() {
                        return;
                    }
                    at = end;
                }
                let _ = spare.send(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_come_back_in_order_and_buffers_are_reused() {
        let mut h = HashThread::start(4).expect("a thread");
        let files: Vec<Vec<u8>> = (0..40u8).map(|i| (0..(i as usize * 7)).map(|k| k as u8 ^ i).collect()).collect();
        for f in &files {
            for piece in f.chunks(4) {
                let mut b = h.buffer();
                b[..piece.len()].copy_from_slice(piece);
                assert!(h.data(b, piece.len()));
            }
            assert!(h.end());
        }
        for f in &files {
            assert_eq!(h.next_digest(), Some(Digest::of(f)));
        }
        assert!(h.made <= BUFFERS, "{} buffers made", h.made);
    }

    #[test]
    fn batches_of_whole_files_and_files_in_pieces_keep_their_order() {
        let mut h = HashThread::start(16).expect("a thread");
        let mut b = h.buffer();
        b[..9].copy_from_slice(b"abcdefghi");
        assert!(h.files(b, vec![3, 0, 6]));
        let mut b = h.buffer();
        b[..4].copy_from_slice(b"long");
        assert!(h.data(b, 4));
        assert!(h.end());
        let mut b = h.buffer();
        b[..1].copy_from_slice(b"z");
        assert!(h.files(b, vec![1]));
        for want in [&b"abc"[..], b"", b"defghi", b"long", b"z"] {
            assert_eq!(h.next_digest(), Some(Digest::of(want)));
        }
    }

    #[test]
    fn dropping_it_with_a_file_open_stops_the_thread() {
        let mut h = HashThread::start(8).expect("a thread");
        let b = h.buffer();
        assert!(h.data(b, 8));
        drop(h);
    }
}
