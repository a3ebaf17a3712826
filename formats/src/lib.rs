//! Types and encodings of op-dbus stage images.
//!
//! Nothing here prints, reads configuration or knows about a terminal: functions return
//! values and errors that carry the path or image they concern; the binaries render them.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod archive;
pub mod btrfs;
pub mod channel;
pub mod decode;
pub mod digest;
mod hash_thread;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod oci;
pub mod owners;
pub mod patch;
pub mod path;
pub mod payload;
pub mod unpack;

pub use digest::Digest;
pub use names::{Reference, StageName, Version};

#[cfg(test)]
pub(crate) mod test_data {
    /// `len` bytes of xorshift noise from `seed` (zstd cannot shrink them).
    pub(crate) fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}
