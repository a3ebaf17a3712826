//! The btrfs send-stream validator (formats::btrfs::validate_stream): a full stream, and
//! an incremental one against a declared parent UUID (the first 16 bytes of the input
//! when byte 0 is odd; bit 1 of byte 0 fixes up the command CRCs). Beyond "no panic": what
//! validates parses command by command too.
#![no_main]

use formats::btrfs::{StreamReader, Uuid, validate_stream};
use libfuzzer_sys::fuzz_target;

#[path = "fixup.rs"]
mod fixup;

fuzz_target!(|input: &[u8]| {
    // Byte 0, bit 1: fix up the command CRCs of what follows, so that mutations get past them.
    let mut owned = input.to_vec();
    if let Some((&mut m, rest)) = owned.split_first_mut()
        && m & 2 != 0
    {
        let skip = if m & 1 == 1 && rest.len() >= 16 { 16 } else { 0 };
        fixup::fix_stream(&mut rest[skip..]);
    }
    let data = &owned[..];
    let (parent, stream) = match data.split_first() {
        Some((&m, rest)) if m & 1 == 1 && rest.len() >= 16 => (Some(Uuid(rest[..16].try_into().unwrap())), &rest[16..]),
        Some((_, rest)) => (None, rest),
        None => return,
    };
    let result = validate_stream(stream, parent);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("btrfs_stream: {result:?}");
    }
    if result.is_ok() {
        // A stream that validates also reads command by command to its end.
        let reader = StreamReader::new(stream).expect("a validated stream has a valid header");
        for c in reader {
            c.expect("a validated stream parses");
        }
    }
    // The raw stream too, whatever byte 0 says.
    let _ = validate_stream(data, None);
});
