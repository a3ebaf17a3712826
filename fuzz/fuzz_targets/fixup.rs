//! Fix-ups that let mutated inputs past checksums the fuzzer cannot guess, so that it
//! explores what lies behind them: tar header checksums (and, for oci-archives, blob names
//! that are their content's digest), btrfs send-stream command CRCs.
#![allow(dead_code)]

/// Recomputes the checksum of every tar header along the chain of `data`; when `rename`
/// is set, names each `blobs/sha256/...` entry by its content's digest first.
pub fn fix_tar(data: &mut [u8], rename: bool) {
    let mut off = 0usize;
    while off + 512 <= data.len() {
        if data[off..off + 512].iter().all(|&b| b == 0) {
            return;
        }
        let size_field = &data[off + 124..off + 136];
        let text: String = size_field.iter().take_while(|&&b| b != 0 && b != b' ').map(|&b| b as char).collect();
        let size = usize::from_str_radix(text.trim(), 8).unwrap_or(0);
        let start = off + 512;
        if rename && data[off..off + 13] == *b"blobs/sha256/" && start + size <= data.len() {
            let hex = formats::Digest::of(&data[start..start + size]).hex();
            let name = format!("blobs/sha256/{hex}");
            data[off..off + 100].fill(0);
            data[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        data[off + 148..off + 156].fill(b' ');
        let sum: u32 = data[off..off + 512].iter().map(|&b| u32::from(b)).sum();
        let ck = format!("{sum:06o}\0 ");
        data[off + 148..off + 156].copy_from_slice(ck.as_bytes());
        off = start.saturating_add(size.div_ceil(512).saturating_mul(512));
    }
}

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = 0u32;
    for &b in data {
        crc = t[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Recomputes the CRC-32C (seed 0, no inversion) of every command of a send stream.
pub fn fix_stream(data: &mut [u8]) {
    let mut off = 17usize;
    while off + 10 <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        let end = match (off + 10).checked_add(len) {
            Some(e) if e <= data.len() => e,
            _ => return,
        };
        data[off + 6..off + 10].fill(0);
        let crc = crc32c(&data[off..end]);
        data[off + 6..off + 10].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
}
