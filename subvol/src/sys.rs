//! The btrfs ioctls, and the only unsafe code of the workspace. Layouts follow
//! `include/uapi/linux/btrfs.h`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;

use rustix::ioctl::{self, Getter, Setter, opcode};

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
/// `BTRFS_SUBVOL_NAME_MAX`.
pub const SUBVOL_NAME_MAX: usize = 4039;
/// `BTRFS_SUBVOL_RDONLY`.
pub const SUBVOL_RDONLY: u64 = 1 << 1;
/// `BTRFS_PATH_NAME_MAX`.
const PATH_NAME_MAX: usize = 4087;

/// `struct btrfs_ioctl_vol_args_v2` (4096 bytes).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args` (4096 bytes).
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);

const SNAP_CREATE_V2: ioctl::Opcode = opcode::write::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 23);
const SUBVOL_CREATE_V2: ioctl::Opcode = opcode::write::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 24);
const SNAP_DESTROY: ioctl::Opcode = opcode::write::<VolArgs>(BTRFS_IOCTL_MAGIC, 15);
const SUBVOL_GETFLAGS: ioctl::Opcode = opcode::read::<u64>(BTRFS_IOCTL_MAGIC, 25);
const SUBVOL_SETFLAGS: ioctl::Opcode = opcode::write::<u64>(BTRFS_IOCTL_MAGIC, 26);

fn v2(name: &str, fd: i64, flags: u64) -> VolArgsV2 {
    let mut a = VolArgsV2 { fd, transid: 0, flags, unused: [0; 4], name: [0; SUBVOL_NAME_MAX + 1] };
    // Callers checked: at most SUBVOL_NAME_MAX bytes, no NUL; the last byte stays 0.
    a.name[..name.len()].copy_from_slice(name.as_bytes());
    a
}

pub fn subvol_create(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let args = v2(name, 0, 0);
    // SAFETY: SUBVOL_CREATE_V2 reads a `btrfs_ioctl_vol_args_v2`, which `VolArgsV2` lays
    // out exactly (size asserted above); the name is NUL-terminated.
    unsafe { ioctl::ioctl(dir, Setter::<SUBVOL_CREATE_V2, VolArgsV2>::new(args)) }?;
    Ok(())
}

pub fn snap_create(dir: &OwnedFd, source: &OwnedFd, name: &str, readonly: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let args = v2(name, i64::from(source.as_raw_fd()), if readonly { SUBVOL_RDONLY } else { 0 });
    // SAFETY: SNAP_CREATE_V2 reads a `btrfs_ioctl_vol_args_v2` whose `fd` is the source
    // subvolume, open for the duration of the call; layout as above.
    unsafe { ioctl::ioctl(dir, Setter::<SNAP_CREATE_V2, VolArgsV2>::new(args)) }?;
    Ok(())
}

pub fn snap_destroy(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let mut args = VolArgs { fd: 0, name: [0; PATH_NAME_MAX + 1] };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SNAP_DESTROY reads a `btrfs_ioctl_vol_args` (size asserted), name NUL-terminated.
    unsafe { ioctl::ioctl(dir, Setter::<SNAP_DESTROY, VolArgs>::new(args)) }?;
    Ok(())
}

pub fn get_flags(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: SUBVOL_GETFLAGS writes one u64.
    Ok(unsafe { ioctl::ioctl(fd, Getter::<SUBVOL_GETFLAGS, u64>::new()) }?)
}

pub fn set_flags(fd: &OwnedFd, flags: u64) -> io::Result<()> {
    // SAFETY: SUBVOL_SETFLAGS reads one u64.
    unsafe { ioctl::ioctl(fd, Setter::<SUBVOL_SETFLAGS, u64>::new(flags)) }?;
    Ok(())
}
