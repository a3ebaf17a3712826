//! The userspace btrfs-stream applier (formats::btrfs::apply_to_dir) on a temporary
//! directory, for hosts whose staging area is not on btrfs. Beyond "no panic": nothing
//! appears beside the destination, whatever the stream says. Inputs of odd length get
//! their command CRCs fixed up first.
#![no_main]

use std::fs;

use formats::btrfs::apply_to_dir;
use libfuzzer_sys::fuzz_target;

#[path = "fixup.rs"]
mod fixup;

fuzz_target!(|input: &[u8]| {
    // Odd length: fix up the command CRCs, so that mutations get past them.
    let mut owned = input.to_vec();
    if owned.len() % 2 == 1 {
        fixup::fix_stream(&mut owned);
    }
    let data = &owned[..];
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let dest = base.join("dest");
    fs::create_dir_all(&dest).unwrap();
    let result = apply_to_dir(data, &dest, None);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("btrfs_apply: {result:?}");
    }
    let beside: Vec<_> = fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, ["dest"], "the stream created something beside its destination");
    let top: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, ["base"]);
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
