//! The oci-archive reader (formats::archive::import) into a temporary layout. Beyond "no
//! panic": whatever happens, the layout holds only its own files, every blob in it hashes
//! to its name, and nothing is created beside the layout.
#![no_main]

use std::fs;
use std::path::Path;

use formats::Digest;
use formats::layout::Layout;
use libfuzzer_sys::fuzz_target;

#[path = "fixup.rs"]
mod fixup;

fn check_blobs(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let d = Digest::from_hex(&name).expect("blob names are digests");
        let meta = fs::symlink_metadata(e.path()).unwrap();
        assert!(meta.is_file(), "blob {name} is not a regular file");
        assert_eq!(Digest::of(&fs::read(e.path()).unwrap()), d, "blob {name} does not hash to its name");
    }
}

fuzz_target!(|input: &[u8]| {
    // Odd length: fix up header checksums and name blobs by their digests, so that
    // mutations get past them.
    let mut owned = input.to_vec();
    if owned.len() % 2 == 1 {
        fixup::fix_tar(&mut owned, true);
    }
    let data = &owned[..];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("layout");
    let layout = Layout::open_or_create(&root).unwrap();
    let result = formats::archive::import(data, &layout);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("oci_archive: {:?}", result.map(|i| i.manifests.len()));
    }
    let top: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, ["layout"], "the import created something beside the layout");
    for e in fs::read_dir(&root).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            ["oci-layout", "index.json", "blobs", ".tmp", ".lock"].contains(&name.as_str()),
            "unexpected {name} in the layout"
        );
    }
    let blobs: Vec<_> = fs::read_dir(root.join("blobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(blobs, ["sha256"]);
    check_blobs(&root.join("blobs/sha256"));
});
