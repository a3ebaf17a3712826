//! The `subvol` crate's ioctls on a real loop-mounted btrfs (needs root).

mod util;

use std::fs;

use util::*;

#[test]
fn btrfs_loop_root_subvolumes_snapshots_readonly_delete() {
    let b = LoopBtrfs::new(256);
    let m = &b.mnt;
    assert!(subvol::is_btrfs(m).unwrap());
    assert!(!subvol::is_btrfs(std::path::Path::new("/proc")).unwrap());
    subvol::create(m, "work").unwrap();
    assert!(subvol::is_subvolume(&m.join("work")).unwrap());
    fs::write(m.join("work/file"), "hello\n").unwrap();
    subvol::snapshot(&m.join("work"), m, "ro", true).unwrap();
    assert!(subvol::is_readonly(&m.join("ro")).unwrap());
    assert!(!subvol::is_readonly(&m.join("work")).unwrap());
    assert_eq!(fs::read_to_string(m.join("ro/file")).unwrap(), "hello\n");
    let err = fs::write(m.join("ro/other"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "a read-only snapshot must refuse writes: {err}");
    subvol::set_readonly(&m.join("work"), true).unwrap();
    assert!(fs::write(m.join("work/x"), "x").is_err());
    subvol::set_readonly(&m.join("work"), false).unwrap();
    fs::write(m.join("work/x"), "x").unwrap();
    subvol::delete(m, "ro").unwrap();
    subvol::delete(m, "work").unwrap();
    assert!(!m.join("ro").exists() && !m.join("work").exists());
    assert!(subvol::create(m, "../escape").is_err());
    fs::create_dir(m.join("plain")).unwrap();
    assert!(!subvol::is_subvolume(&m.join("plain")).unwrap());
}
