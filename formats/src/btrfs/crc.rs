//! CRC-32C (Castagnoli), as a btrfs send stream uses it.
//!
//! The kernel computes each command's checksum with `crc32c(0, buf, len)`: the reflected
//! Castagnoli polynomial with initial value 0 and no final inversion (not the "standard"
//! CRC-32C, which starts from and ends with `!0`). Computed by the `crc32c` crate (the
//! SSE 4.2 / ARMv8 CRC instructions where the CPU has them: every byte of every stream
//! passes here, and the table-driven loop cost as much as decompressing it).

/// Continues the raw CRC-32C `crc` (no pre- or post-inversion) over `data`.
pub fn crc32c_raw(crc: u32, data: &[u8]) -> u32 {
    // The crate's CRC inverts before and after: undo both.
    !crc32c::crc32c_append(!crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLY: u32 = 0x82F6_3B78;

    fn bitwise(mut crc: u32, data: &[u8]) -> u32 {
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        crc
    }

    #[test]
    fn standard_check_value() {
        // The standard CRC-32C of "123456789" is 0xE3069283 (RFC 3720 test vector family).
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn matches_bitwise() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 999, 1000, 4096, 5000] {
            assert_eq!(crc32c_raw(0, &data[..len]), bitwise(0, &data[..len]), "len {len}");
            assert_eq!(crc32c_raw(7, &data[1..len.max(1)]), bitwise(7, &data[1..len.max(1)]), "len {len}, unaligned");
        }
        // Incremental use gives the same result as one call.
        assert_eq!(crc32c_raw(crc32c_raw(0, &data[..333]), &data[333..]), crc32c_raw(0, &data));
    }
}
