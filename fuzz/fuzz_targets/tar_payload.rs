//! The tar+zstd payload reader (formats::unpack::Unpacker) on a temporary directory with a
//! fixed small signed manifest: `d/` (0755), `d/f` = "abc" (0644), `l` -> `d/f`, `x/` (0755),
//! `x/big` (0644, 300 bytes of 'x').
//!
//! Input: byte 0 selects the mode (bit 0: the rest is the compressed blob as is, else it
//! is compressed here first; bit 1: two layers, split at byte 1 * len / 256; bit 2: tar
//! header checksums fixed up before compressing). Beyond
//! "no panic": nothing appears beside the unpack directory, and when the unpack succeeds
//! the tree is exactly the signed one.
#![no_main]

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use formats::Digest;
use formats::manifest::{StageConfig, StageDefinition};
use formats::oci::{Descriptor, TAR_ZSTD_MEDIA_TYPE};
use formats::unpack::{Unpacker, check_tree};
use libfuzzer_sys::fuzz_target;

#[path = "fixup.rs"]
mod fixup;

fn config() -> &'static StageConfig {
    static C: OnceLock<StageConfig> = OnceLock::new();
    C.get_or_init(|| {
        let big = vec![b'x'; 300];
        let json = format!(
            concat!(
                r#"{{"schema_version":1,"name":"fuzz","version":"1.0.0","#,
                r#""files":[{{"path":"d/f","target":"/usr/local/bin/f"}}],"entries":["#,
                r#"{{"path":"d","type":"dir","mode":"0755"}},"#,
                r#"{{"path":"d/f","type":"file","mode":"0644","size":3,"sha256":"{}"}},"#,
                r#"{{"path":"l","type":"symlink","mode":"0777","link":"d/f"}},"#,
                r#"{{"path":"x","type":"dir","mode":"0755"}},"#,
                r#"{{"path":"x/big","type":"file","mode":"0644","size":300,"sha256":"{}"}}]}}"#
            ),
            Digest::of(b"abc"),
            Digest::of(&big)
        );
        let _ = StageDefinition::parse("version: 1.0.0\n", Path::new("x"));
        StageConfig::from_bytes(json.as_bytes()).expect("the fixed config is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (first, second) = if mode & 2 != 0 && !rest.is_empty() {
        let cut = usize::from(rest[0]) * rest.len() / 256;
        let (a, b) = rest[1..].split_at(cut.min(rest.len() - 1));
        (a, Some(b))
    } else {
        (rest, None)
    };
    // Bit 2: fix up the tar header checksums before compressing.
    let blob = |b: &[u8]| {
        if mode & 1 != 0 {
            return b.to_vec();
        }
        let mut b = b.to_vec();
        if mode & 4 != 0 {
            fixup::fix_tar(&mut b, false);
        }
        zstd::encode_all(&b[..], 1).unwrap()
    };
    let blobs: Vec<Vec<u8>> = std::iter::once(first).chain(second).map(blob).collect();
    let layers: Vec<Descriptor> =
        blobs.iter().map(|b| Descriptor::new(TAR_ZSTD_MEDIA_TYPE, Digest::of(b), b.len() as u64)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let dest = base.join("dest");
    fs::create_dir_all(&dest).unwrap();
    let cfg = config();
    let result = (|| {
        let mut u = Unpacker::new(cfg, &dest, &layers)?;
        for b in &blobs {
            u.apply_next(&b[..])?;
        }
        u.finish()
    })();
    let beside: Vec<_> = fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, ["dest"], "the unpack created something beside its directory");
    let top: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, ["base"]);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("tar_payload: {result:?}");
    }
    if result.is_ok() {
        assert_eq!(check_tree(&dest, cfg).unwrap(), [], "unpacked, but not the signed tree");
    }
    remove(tmp);
});

/// Removes the temp dir even where the input left directories without write permission.
fn remove(tmp: tempfile::TempDir) {
    let path = tmp.keep();
    if fs::remove_dir_all(&path).is_err() {
        let _ = std::process::Command::new("chmod").args(["-R", "u+rwx"]).arg(&path).status();
        let _ = fs::remove_dir_all(&path);
    }
}
