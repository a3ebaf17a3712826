//! `formats::btrfs` against streams from the real `btrfs send` (needs root, loop devices,
//! the kernel's btrfs and btrfs-progs): a full and an incremental stream of a loop-mounted
//! btrfs are validated, applied to plain directories off btrfs and compared with the
//! snapshots they were sent from, and the validated full stream goes through the kernel's
//! `btrfs receive` as a sanity check.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use formats::Digest;
use formats::btrfs::{
    ParentTree, StreamError, Uuid, apply_to_dir, copy_tree, validate_stream, validate_stream_against,
};
use util::*;

/// A btrfs on a loop device of an image file; unmounted and detached on drop (lazily
/// when a plain unmount fails).
struct LoopMount {
    dev: String,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    fn new(mib: u64) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        ok(Command::new(require_tool("mkfs.btrfs", "btrfs-progs")).arg("-q").arg(&img));
        let dev = ok(Command::new(require_tool("losetup", "mount")).args(["--find", "--show"]).arg(&img));
        let dev = dev.trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let guard = LoopMount { dev, mnt, _dir: dir };
        let out = run(Command::new(require_tool("mount", "mount")).arg(&guard.dev).arg(&guard.mnt));
        assert!(
            out.status.success(),
            "mounting {} failed ({}): the kernel needs btrfs and loop devices",
            guard.dev,
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let clean = Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Fails, with what to do, unless this runs as root with the tools it needs.
fn require_root_and_tools() -> PathBuf {
    let uid = ok(Command::new(require_tool("id", "coreutils")).arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "this test makes a loop device and mounts a btrfs: run it as root (`sudo -E cargo test -p e2e --test btrfs_stream`); CI runs as root"
    );
    require_tool("mkfs.btrfs", "btrfs-progs");
    require_tool("losetup", "mount");
    require_tool("mount", "mount");
    require_tool("umount", "mount");
    require_tool("btrfs", "btrfs-progs")
}

/// The UUID `btrfs subvolume show` prints for a subvolume.
fn subvolume_uuid(btrfs: &Path, subvol: &Path) -> Uuid {
    let out = ok(Command::new(btrfs).args(["subvolume", "show"]).arg(subvol));
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("UUID:"))
        .unwrap_or_else(|| panic!("no UUID in `btrfs subvolume show`:\n{out}"));
    line["UUID:".len()..].trim().parse().unwrap()
}

/// Every entry under `dir` (the root as "."): kind, mode, size and sha256 of files, link
/// texts; and the groups of paths that are hard links of one file.
fn snapshot_of(dir: &Path) -> (BTreeMap<String, String>, BTreeSet<Vec<String>>) {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>, inodes: &mut BTreeMap<u64, Vec<String>>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let v = if m.file_type().is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(base, &p, out, inodes);
                format!("dir {mode:o}")
            } else if m.is_file() {
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
                format!("file {mode:o} {} bytes {}", m.len(), Digest::of(&fs::read(&p).unwrap()))
            } else {
                format!("special {:o}", m.mode())
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    let root = fs::metadata(dir).unwrap();
    out.insert(".".into(), format!("dir {:o}", root.permissions().mode() & 0o7777));
    walk(dir, dir, &mut out, &mut inodes);
    let links = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    (out, links)
}

fn assert_same_tree(got: &Path, want: &Path) {
    let (g, gl) = snapshot_of(got);
    let (w, wl) = snapshot_of(want);
    for (k, v) in &w {
        assert_eq!(g.get(k), Some(v), "{k} in {} differs from {}", got.display(), want.display());
    }
    let extra: Vec<_> = g.keys().filter(|k| !w.contains_key(*k)).collect();
    assert!(extra.is_empty(), "{} holds entries {} lacks: {extra:?}", got.display(), want.display());
    assert_eq!(gl, wl, "hard links of {} and {} differ", got.display(), want.display());
}

/// `btrfs send [-p PARENT] SNAP` with protocol `proto` when btrfs-progs has `--proto`
/// (else with its default, protocol 1); returns the protocol asked for.
fn send(btrfs: &Path, parent: Option<&Path>, snap: &Path, out: &Path, proto: u32) -> u32 {
    let help = run(Command::new(btrfs).args(["send", "--help"]));
    let text = format!("{}{}", String::from_utf8_lossy(&help.stdout), String::from_utf8_lossy(&help.stderr));
    let mut cmd = Command::new(btrfs);
    cmd.arg("send");
    let proto = if text.contains("--proto") {
        cmd.arg("--proto").arg(proto.to_string());
        proto
    } else {
        eprintln!("note: this btrfs-progs has no `btrfs send --proto`; sending with its default protocol (1)");
        1
    };
    if let Some(p) = parent {
        cmd.arg("-p").arg(p);
    }
    ok(cmd.arg("-f").arg(out).arg(snap));
    proto
}

fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut v).unwrap();
    v
}

#[test]
fn btrfs_loop_root_send_streams_validate_apply_and_receive() {
    let btrfs = require_root_and_tools();
    let lo = LoopMount::new(256);
    let m = &lo.mnt;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // A subvolume with the kinds of entries a stage holds.
    let vol = m.join("vol");
    ok(Command::new(&btrfs).args(["subvolume", "create"]).arg(&vol));
    fs::create_dir_all(vol.join("bin")).unwrap();
    fs::create_dir_all(vol.join("etc/op-dbus/deep/er")).unwrap();
    fs::create_dir_all(vol.join("lib")).unwrap();
    fs::write(vol.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(vol.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::hard_link(vol.join("bin/tool"), vol.join("bin/tool-hard")).unwrap();
    symlink("tool", vol.join("bin/link")).unwrap();
    symlink("../bin/tool", vol.join("lib/tool")).unwrap();
    fs::write(vol.join("etc/op-dbus/state.json"), "{\"v\": 1}\n").unwrap();
    fs::write(vol.join("etc/op-dbus/deep/er/nested"), "nested\n").unwrap();
    fs::set_permissions(vol.join("etc/op-dbus/deep"), fs::Permissions::from_mode(0o750)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(vol.join("sparse")).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 3 << 20).unwrap();
        f.set_len(4 << 20).unwrap();
    }
    let big = random_bytes(5 << 20);
    fs::write(vol.join("big"), &big).unwrap();
    ok(Command::new("cp").arg("--reflink=always").arg(vol.join("big")).arg(vol.join("big-clone")));
    fs::write(vol.join("old.txt"), "to be deleted\n").unwrap();
    fs::write(vol.join("bin/rename-me"), "renamed later\n").unwrap();
    ok(&mut Command::new("sync"));

    let snap1 = m.join("snap1");
    ok(Command::new(&btrfs).args(["subvolume", "snapshot", "-r"]).arg(&vol).arg(&snap1));
    let full = w.join("full.stream");
    let proto = send(&btrfs, None, &snap1, &full, 2);

    // Change one file, delete one, add one, rename one; rewrite part of the big file.
    fs::write(vol.join("etc/op-dbus/state.json"), "{\"v\": 2, \"changed\": true}\n").unwrap();
    fs::remove_file(vol.join("old.txt")).unwrap();
    fs::write(vol.join("new.txt"), "added\n").unwrap();
    fs::rename(vol.join("bin/rename-me"), vol.join("bin/renamed")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        fs::OpenOptions::new().write(true).open(vol.join("big")).unwrap().write_all_at(&[0x5a; 100], 1 << 20).unwrap();
    }
    ok(&mut Command::new("sync"));
    let snap2 = m.join("snap2");
    ok(Command::new(&btrfs).args(["subvolume", "snapshot", "-r"]).arg(&vol).arg(&snap2));
    let incr = w.join("incr.stream");
    send(&btrfs, Some(&snap1), &snap2, &incr, 2);

    let uuid1 = subvolume_uuid(&btrfs, &snap1);
    let uuid2 = subvolume_uuid(&btrfs, &snap2);
    let open = |p: &Path| std::io::BufReader::new(fs::File::open(p).unwrap());

    // Both streams validate, with the right parent.
    let s1 = validate_stream(open(&full), None).unwrap();
    assert_eq!((s1.name.as_str(), s1.uuid, s1.parent_uuid, s1.version), ("snap1", uuid1, None, proto));
    assert!(s1.bytes_written >= 5 << 20, "{s1:?}");
    assert_eq!(s1.stream_bytes, fs::metadata(&full).unwrap().len());
    let s2 = validate_stream(open(&incr), Some(uuid1)).unwrap();
    eprintln!("full stream: {s1:?}\nincremental stream: {s2:?}");
    assert_eq!((s2.name.as_str(), s2.uuid, s2.parent_uuid), ("snap2", uuid2, Some(uuid1)));
    let parent_tree = ParentTree::scan(&snap1).unwrap();
    let s2_exact = validate_stream_against(open(&incr), uuid1, &parent_tree).unwrap();
    assert_eq!(s2_exact, s2);
    // ... and not against anything else.
    let err = validate_stream(open(&incr), None).unwrap_err();
    assert!(err.is_malformed() && err.to_string().contains("no parent was declared"), "{err}");
    let err = validate_stream(open(&incr), Some(uuid2)).unwrap_err();
    assert!(matches!(err, StreamError::Refused { index: 1, .. }), "{err}");
    let err = validate_stream(open(&full), Some(uuid1)).unwrap_err();
    assert!(err.to_string().contains("expected an incremental stream"), "{err}");

    // Applied without the kernel, off btrfs, the streams give the snapshots' trees.
    let plain1 = w.join("plain1");
    fs::create_dir(&plain1).unwrap();
    let st = apply_to_dir(open(&full), &plain1, None).unwrap();
    assert_eq!(st.commands, s1.commands);
    assert_same_tree(&plain1, &snap1);
    // The hole stays a hole.
    assert!(fs::metadata(plain1.join("sparse")).unwrap().blocks() < 1024, "the sparse file was filled");
    let plain2 = w.join("plain2");
    fs::create_dir(&plain2).unwrap();
    copy_tree(&plain1, &plain2).unwrap();
    assert_same_tree(&plain2, &snap1);
    apply_to_dir(open(&incr), &plain2, Some(&plain1)).unwrap();
    assert_same_tree(&plain2, &snap2);
    assert_same_tree(&plain1, &snap1);
    let mut want_big = big.clone();
    want_big[1 << 20..(1 << 20) + 100].fill(0x5a);
    assert_eq!(fs::read(plain2.join("big")).unwrap(), want_big);
    assert_eq!(fs::read(plain2.join("big-clone")).unwrap(), big);

    // Protocol 1 (64 KiB commands, DATA with a length) of the same snapshot gives the
    // same tree.
    let v1 = w.join("full-v1.stream");
    send(&btrfs, None, &snap1, &v1, 1);
    let s1v1 = validate_stream(open(&v1), None).unwrap();
    assert_eq!((s1v1.version, s1v1.uuid), (1, uuid1));
    let plain_v1 = w.join("plain-v1");
    fs::create_dir(&plain_v1).unwrap();
    apply_to_dir(open(&v1), &plain_v1, None).unwrap();
    assert_same_tree(&plain_v1, &snap1);

    // The kernel receives the validated streams (sanity: the format is what it reads).
    let recv = m.join("recv");
    fs::create_dir(&recv).unwrap();
    ok(Command::new(&btrfs).args(["receive", "-f"]).arg(&full).arg(&recv));
    assert_same_tree(&recv.join("snap1"), &snap1);
    ok(Command::new(&btrfs).args(["receive", "-f"]).arg(&incr).arg(&recv));
    assert_same_tree(&recv.join("snap2"), &snap2);
}
