//! The sha256 of each file a send stream writes, hashed from the stream as its WRITE
//! commands pass, so that the receiver's result need not be read back to be compared
//! with the signed per-file digests.
//!
//! ```text
//! MKFILE          a new file, empty: its content is known (nothing yet)
//! WRITE at len    appended: hashed (the file being hashed; one at a time)
//! WRITE elsewhere a gap or an overwrite: the file is spoiled
//! TRUNCATE        to its length: nothing changes; to any other size: spoiled
//! CLONE, FALLOCATE, UPDATE_EXTENT into it: spoiled
//! a write to a file hashed earlier (after another file's): spoiled
//! ```
//!
//! A spoiled file, and every file the stream did not create (an incremental stream's
//! parent files, changed in place or not), has no digest here: the caller reads those
//! from the received tree. The kernel sends each new file's data in order, one inode
//! after another, so a full stream leaves nothing spoiled unless it clones or has holes.
//! Holes are not hashed as zeros: a stream could declare terabytes of them for a few
//! bytes.

use crate::digest::{Digest, Hasher};

/// Which file a model node is: files the stream creates are numbered from 1; 0 is a file
/// the stream did not create (the parent's), whose content is not known here.
pub(crate) type FileId = u32;

/// What is known of a created file's content.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Empty, or being hashed (the current file).
    Open,
    /// Hashed to its end: digest and length.
    Done(Digest, u64),
    /// Changed in a way the sequential hash cannot follow.
    Spoiled,
}

/// The content digests of the files a stream creates.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    /// State of file `id` at `id - 1`.
    files: Vec<State>,
    /// The file being hashed.
    current: Option<(FileId, Hasher)>,
}

impl Contents {
    /// File `id` was created, empty (ids come in order, from 1).
    pub(crate) fn created(&mut self, id: FileId) {
        debug_assert_eq!(id as usize, self.files.len() + 1);
        self.files.push(State::Open);
    }

    fn state(&mut self, id: FileId) -> Option<&mut State> {
        id.checked_sub(1).and_then(|i| self.files.get_mut(i as usize))
    }

    /// `data` was written to file `id` at `offset`.
    pub(crate) fn write(&mut self, id: FileId, offset: u64, data: &[u8]) {
        if let Some((cur, h)) = &mut self.current
            && *cur == id
        {
            if offset == h.len() {
                h.update(data);
            } else {
                self.spoil(id);
            }
            return;
        }
        match self.state(id) {
            Some(State::Open) if offset == 0 => {
                self.settle();
                let mut h = Hasher::new();
                h.update(data);
                self.current = Some((id, h));
            }
            Some(State::Done(_, len)) if offset == *len && data.is_empty() => {}
            Some(_) => self.spoil(id),
            None => {}
        }
    }

    /// File `id` was truncated (or extended) to `size`.
    pub(crate) fn truncate(&mut self, id: FileId, size: u64) {
        let len = match &self.current {
            Some((cur, h)) if *cur == id => Some(h.len()),
            _ => match self.state(id) {
                Some(State::Open) => Some(0),
                Some(State::Done(_, len)) => Some(*len),
                _ => None,
            },
        };
        if len != Some(size) {
            self.spoil(id);
        }
    }

    /// File `id` changed in a way that is not followed (clone, fallocate, ...).
    pub(crate) fn spoil(&mut self, id: FileId) {
        if self.current.as_ref().is_some_and(|(cur, _)| *cur == id) {
            self.current = None;
        }
        if let Some(s) = self.state(id) {
            *s = State::Spoiled;
        }
    }

    /// Ends the hash of the current file.
    fn settle(&mut self) {
        if let Some((id, h)) = self.current.take() {
            let len = h.len();
            if let Some(s) = self.state(id) {
                *s = State::Done(h.finish(), len);
            }
        }
    }

    /// Ends every hash: call once the stream's last write was seen.
    pub(crate) fn finish(&mut self) {
        self.settle();
    }

    /// The digest and length of file `id`, when its content is known (after `finish`).
    pub(crate) fn digest(&self, id: FileId) -> Option<(Digest, u64)> {
        match self.files.get(id.checked_sub(1)? as usize)? {
            State::Open => Some((Digest::of(b""), 0)),
            State::Done(d, len) => Some((*d, *len)),
            State::Spoiled => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(n: u32) -> Contents {
        let mut c = Contents::default();
        for id in 1..=n {
            c.created(id);
        }
        c
    }

    #[test]
    fn files_written_in_order_one_after_another_are_hashed() {
        let mut c = contents(3);
        c.write(1, 0, b"hello ");
        c.write(1, 6, b"world");
        c.truncate(1, 11);
        c.write(2, 0, b"x");
        c.finish();
        assert_eq!(c.digest(1), Some((Digest::of(b"hello world"), 11)));
        assert_eq!(c.digest(2), Some((Digest::of(b"x"), 1)));
        assert_eq!(c.digest(3), Some((Digest::of(b""), 0)), "created, never written");
        assert_eq!(c.digest(0), None, "a parent's file");
        assert_eq!(c.digest(4), None);
    }

    #[test]
    fn what_the_sequential_hash_cannot_follow_spoils_the_file() {
        let mut c = contents(8);
        c.write(1, 1, b"gap at the start");
        c.write(2, 0, b"abc");
        c.write(2, 1, b"overwrite");
        c.write(3, 0, b"abc");
        c.truncate(3, 2);
        c.write(4, 0, b"abc");
        c.truncate(4, 4096);
        c.write(5, 0, b"first");
        c.write(6, 0, b"another file between");
        c.write(5, 5, b"more of the first");
        c.write(7, 0, b"abc");
        c.spoil(7);
        c.write(7, 3, b"after a clone");
        c.write(8, 0, b"abc");
        c.write(8, 10, b"after a hole");
        c.finish();
        for id in [1, 2, 3, 4, 5, 7, 8] {
            assert_eq!(c.digest(id), None, "file {id}");
        }
        assert_eq!(c.digest(6), Some((Digest::of(b"another file between"), 20)));
    }
}
