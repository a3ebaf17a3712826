//! Hostile btrfs send streams in properly signed images (a loop-mounted btrfs; needs root).
//!
//! `btrfs receive` trusts its input (docs/formats.md, "Payloads"): a stream with `..`
//! or an absolute path writes outside the received subvolume, and CLONE may name any
//! subvolume of the filesystem. So the installer must refuse such a stream itself, before a
//! byte reaches the kernel, even when the image is signed by a key it trusts.
//!
//! ```text
//! loop btrfs: src subvolume ─► snapshot -r ─► btrfs send --proto 2 ─► a real stream
//!   ─► walk its command framing, mutate one attribute (equal length) or cut it,
//!      recompute the command's CRC-32C ─► zstd ─► a signed image (hostile_util::Forge)
//!   ─► op-dbus-stage deploy, on a root on the loop btrfs (btrfs receive) and on a root
//!      in a plain directory on /tmp (applied in userspace)
//!   ─► exit 7 naming the problem; the root, the canary beside it and the root's parent
//!      exactly as before; no subvolume left behind
//! ```
//!
//! The unmodified stream, forged the same way with a config that matches the snapshot's
//! tree, deploys on both roots (the positive control).

mod hostile_util;
mod util;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use formats::Digest;
use formats::oci::{BTRFS_ZSTD_MEDIA_TYPE, Descriptor};
use formats::path::RelPath;
use hostile_util::{Forge, config, e_dir, e_file, e_link};
use keys::PrivateKey;
use serde_json::{Value, json};
use util::*;

// ---------------------------------------------------------------------------------------
// The send-stream framing, read independently of formats::btrfs

const MAGIC: &[u8; 13] = b"btrfs-stream\0";
const HEADER: usize = MAGIC.len() + 4;
const CMD_HEADER: usize = 10;

const C_SUBVOL: u16 = 1;
const C_MKFILE: u16 = 3;
const C_RENAME: u16 = 9;
const C_WRITE: u16 = 15;
const C_CLONE: u16 = 16;
const C_END: u16 = 21;

const A_UUID: u16 = 1;
const A_PATH: u16 = 15;
const A_PATH_TO: u16 = 16;
const A_FILE_OFFSET: u16 = 18;
const A_DATA: u16 = 19;
const A_CLONE_UUID: u16 = 20;
const A_CLONE_PATH: u16 = 22;
const A_CLONE_OFFSET: u16 = 23;
const A_CLONE_LEN: u16 = 24;

/// One attribute: its type and where its data lies in the stream.
#[derive(Debug, Clone)]
struct Attr {
    ty: u16,
    off: usize,
    len: usize,
}

/// One command: where it starts, its payload length, its number and attributes.
#[derive(Debug, Clone)]
struct Cmd {
    off: usize,
    len: usize,
    kind: u16,
    crc: u32,
    attrs: Vec<Attr>,
}

impl Cmd {
    fn end(&self) -> usize {
        self.off + CMD_HEADER + self.len
    }

    fn attr(&self, ty: u16) -> &Attr {
        self.attrs.iter().find(|a| a.ty == ty).unwrap_or_else(|| panic!("command {} has no attribute {ty}", self.kind))
    }
}

/// Where the END command starts.
fn end_off(cmds: &[Cmd]) -> usize {
    cmds.last().unwrap().off
}

fn le16(s: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([s[at], s[at + 1]])
}

fn le32(s: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]])
}

/// Splits a protocol 2 stream into commands (the DATA attribute has no length in v2 and
/// runs to the end of its command).
fn commands(s: &[u8]) -> Vec<Cmd> {
    assert_eq!(&s[..MAGIC.len()], MAGIC, "not a btrfs send stream");
    let version = le32(s, MAGIC.len());
    assert_eq!(version, 2, "`btrfs send --proto 2` produced a version {version} stream");
    let mut out = Vec::new();
    let mut off = HEADER;
    while off < s.len() {
        let len = le32(s, off) as usize;
        let kind = le16(s, off + 4);
        let crc = le32(s, off + 6);
        let end = off + CMD_HEADER + len;
        assert!(end <= s.len(), "command at byte {off} runs past the end of the stream");
        let mut attrs = Vec::new();
        let mut p = off + CMD_HEADER;
        while p < end {
            let ty = le16(s, p);
            if ty == A_DATA {
                attrs.push(Attr { ty, off: p + 2, len: end - (p + 2) });
                p = end;
            } else {
                let alen = le16(s, p + 2) as usize;
                attrs.push(Attr { ty, off: p + 4, len: alen });
                p += 4 + alen;
            }
        }
        assert_eq!(p, end, "attributes of the command at byte {off} do not fill it");
        out.push(Cmd { off, len, kind, crc, attrs });
        off = end;
    }
    out
}

/// CRC-32C (Castagnoli, reflected 0x82F63B78), bit by bit, without pre- or post-inversion.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    crc
}

/// A command's checksum as the kernel computes it: seed 0 over the header with the crc
/// field zeroed, then the payload.
fn command_crc(s: &[u8], c: &Cmd) -> u32 {
    let mut h = s[c.off..c.off + CMD_HEADER].to_vec();
    h[6..10].fill(0);
    crc32c(crc32c(0, &h), &s[c.off + CMD_HEADER..c.end()])
}

fn fix_crc(s: &mut [u8], c: &Cmd) {
    let crc = command_crc(s, c);
    s[c.off + 6..c.off + 10].copy_from_slice(&crc.to_le_bytes());
}

/// `stream` with attribute `ty` of command `c` replaced by `new` (same length), CRC fixed.
fn replace_attr(stream: &[u8], c: &Cmd, ty: u16, new: &[u8]) -> Vec<u8> {
    let a = c.attr(ty);
    assert_eq!(
        a.len,
        new.len(),
        "replacement {:?} for {:?} must have the same length",
        String::from_utf8_lossy(new),
        String::from_utf8_lossy(&stream[a.off..a.off + a.len])
    );
    let mut s = stream.to_vec();
    s[a.off..a.off + a.len].copy_from_slice(new);
    fix_crc(&mut s, c);
    // The mutated command is still well framed and its checksum right.
    let again = commands(&s);
    let m = again.iter().find(|x| x.off == c.off).unwrap();
    assert_eq!(m.crc, command_crc(&s, m));
    s
}

/// Command `c` of `stream` made again with the attributes in `new` in place of its own
/// (any length), in its order, with its checksum: a protocol 2 command.
fn remade(stream: &[u8], c: &Cmd, new: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for a in &c.attrs {
        let data = new.iter().find(|(ty, _)| *ty == a.ty).map_or(&stream[a.off..a.off + a.len], |(_, d)| *d);
        body.extend_from_slice(&a.ty.to_le_bytes());
        if a.ty != A_DATA {
            body.extend_from_slice(&u16::try_from(data.len()).unwrap().to_le_bytes());
        }
        body.extend_from_slice(data);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&c.kind.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&body);
    let crc = crc32c(crc32c(0, &out[..CMD_HEADER]), &body);
    out[6..10].copy_from_slice(&crc.to_le_bytes());
    out
}

fn attr_str(s: &[u8], c: &Cmd, ty: u16) -> String {
    let a = c.attr(ty);
    String::from_utf8(s[a.off..a.off + a.len].to_vec()).unwrap()
}

/// The first RENAME whose destination is `to`.
fn rename_to<'c>(s: &[u8], cmds: &'c [Cmd], to: &str) -> &'c Cmd {
    cmds.iter()
        .find(|c| c.kind == C_RENAME && attr_str(s, c, A_PATH_TO) == to)
        .unwrap_or_else(|| panic!("the stream renames nothing to {to}"))
}

fn uuid_text(b: &[u8]) -> String {
    formats::btrfs::Uuid(b.try_into().unwrap()).to_string()
}

// ---------------------------------------------------------------------------------------
// Hosts

/// A root (initialised, trusting the key) with an empty canary directory beside it; the
/// directory holding both holds nothing else.
#[derive(Debug)]
struct Host {
    what: &'static str,
    dir: PathBuf,
}

impl Host {
    fn new(what: &'static str, dir: PathBuf, key_pub: &Path, backend: &str) -> Host {
        let h = Host { what, dir };
        fs::create_dir_all(h.root()).unwrap();
        fs::create_dir_all(h.canary()).unwrap();
        ok(h.stage().arg("init"));
        ok(h.stage().args(["trust", "add"]).arg(key_pub));
        let status = json(&ok(h.stage().args(["--json", "status"])));
        assert_eq!(status["backend"], backend, "the {what} root's staging area: {status}");
        h
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn canary(&self) -> PathBuf {
        self.dir.join("canary")
    }

    fn staging(&self) -> PathBuf {
        self.root().join("var/lib/op-dbus/staging")
    }

    fn stage(&self) -> Command {
        let mut c = Command::new(bin("op-dbus-stage"));
        c.arg("--root").arg(self.root());
        c
    }

    /// What the root's parent holds (names only: `root` and `canary`).
    fn top(&self) -> BTreeSet<String> {
        fs::read_dir(&self.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }
}

/// Paths of every subvolume of the filesystem at `mnt`.
fn subvolumes(btrfs: &Path, mnt: &Path) -> BTreeSet<String> {
    ok(Command::new(btrfs).args(["subvolume", "list"]).arg(mnt))
        .lines()
        .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.trim().to_owned()))
        .collect()
}

/// Everything under `dir` that is not a directory, or is a subvolume.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else { return out };
    for e in rd {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if !m.is_dir() {
            out.push(format!("{} (not a directory)", p.display()));
        } else {
            if subvol::is_subvolume(&p).unwrap_or(false) {
                out.push(format!("{} (a subvolume)", p.display()));
            }
            out.extend(leftovers(&p));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The snapshot the stream is sent from

/// A deterministic byte pattern.
fn pattern(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn mode_str(path: &Path) -> String {
    format!("{:04o}", fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777)
}

/// The config entries of the tree under `dir` (modes, sizes, sha256, link texts), sorted.
fn entries_of(dir: &Path) -> Vec<Value> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(RelPath, Value)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let v = if m.file_type().is_symlink() {
                e_link(&rel, fs::read_link(&p).unwrap().to_str().unwrap())
            } else if m.is_dir() {
                walk(base, &p, out);
                e_dir(&rel, &mode_str(&p))
            } else {
                e_file(&rel, &mode_str(&p), &fs::read(&p).unwrap())
            };
            out.push((RelPath::parse(&rel).unwrap(), v));
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, v)| v).collect()
}

// ---------------------------------------------------------------------------------------
// Forging and deploying

fn forge(key: &PrivateKey, config: &Value, stream: &[u8], out: &Path) -> PathBuf {
    let blob = zstd::encode_all(stream, 3).unwrap();
    let mut f = Forge::new(key, config, vec![blob.clone()]);
    f.layer_descs = Some(vec![Descriptor::new(BTRFS_ZSTD_MEDIA_TYPE, Digest::of(&blob), blob.len() as u64)]);
    let forged = f.write(&out.with_extension("layout"));
    forged.export(&out.with_extension("oci.tar"))
}

/// One hostile stream and what the refusal must say (each of `says`, case-insensitive).
#[derive(Debug)]
struct Case {
    name: String,
    stream: Vec<u8>,
    says: Vec<String>,
}

fn case(name: &str, stream: Vec<u8>, says: &[&str]) -> Case {
    Case { name: name.into(), stream, says: says.iter().map(|s| s.to_string()).collect() }
}

/// Deploys `archive` on `host`; it must be refused with exit 7 saying `says`, leaving the
/// root, the canary, the root's parent and the filesystem's subvolumes as they were.
/// Returns the problems found (empty when the refusal was clean).
fn refuse(host: &Host, loopfs: (&Path, &Path), archive: &Path, says: &[String]) -> (Vec<String>, String) {
    let (btrfs, mnt) = loopfs;
    let before = tree(&host.root());
    let top = host.top();
    let subvols = subvolumes(btrfs, mnt);
    let out = run(host.stage().arg("deploy").arg(archive));
    let code = out.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut problems = Vec::new();
    if code != 7 {
        problems.push(format!("exit {code} (expected 7)"));
    }
    let lower = err.to_lowercase();
    for s in says {
        if !lower.contains(&s.to_lowercase()) {
            problems.push(format!("the error does not say {s:?}"));
        }
    }
    let after = tree(&host.root());
    if after != before {
        let mut d = Vec::new();
        for (k, v) in &before {
            match after.get(k) {
                None => d.push(format!("-{k}")),
                Some(w) if w != v => d.push(format!("~{k}")),
                _ => {}
            }
        }
        d.extend(after.keys().filter(|k| !before.contains_key(*k)).map(|k| format!("+{k}")));
        problems.push(format!("the root changed: {}", d.join(", ")));
    }
    let canary: Vec<_> = fs::read_dir(host.canary()).unwrap().map(|e| e.unwrap().path()).collect();
    if !canary.is_empty() {
        problems.push(format!("the canary beside the root was written to: {canary:?}"));
    }
    let expected_top: BTreeSet<String> = ["canary".to_owned(), "root".to_owned()].into();
    if host.top() != top || top != expected_top {
        problems.push(format!("the root's parent holds {:?} (expected {expected_top:?})", host.top()));
    }
    let left = leftovers(&host.staging().join(".tmp"));
    if !left.is_empty() {
        problems.push(format!("left in staging/.tmp: {left:?}"));
    }
    let now = subvolumes(btrfs, mnt);
    if now != subvols {
        problems.push(format!("the loop btrfs's subvolumes changed: {subvols:?} -> {now:?}"));
    }
    (problems, err)
}

/// Puts back the root and canary after a case that changed them, so the next case starts
/// clean.
fn clean_up(host: &Host, pristine: &Path) {
    for e in fs::read_dir(host.canary()).unwrap() {
        let p = e.unwrap().path();
        let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
    }
    if tree(&host.root()) != tree(pristine) {
        for e in fs::read_dir(host.staging().join(".tmp")).into_iter().flatten() {
            let p = e.unwrap().path();
            let _ = Command::new("btrfs").args(["property", "set", "-ts"]).arg(&p).args(["ro", "false"]).status();
            let _ = Command::new("btrfs").args(["subvolume", "delete", "-q"]).arg(&p).status();
        }
        let _ = Command::new("rm").arg("-rf").arg(host.root()).status();
        copy_tree(pristine, &host.root());
    }
}

#[test]
fn btrfs_loop_root_hostile_send_streams_are_refused_on_btrfs_and_directory_roots() {
    let b = LoopBtrfs::new(1024);
    let btrfs = require_tool("btrfs", "btrfs-progs");
    require_tool("cp", "coreutils");
    let m = b.mnt.clone();
    let work = m.join("work");
    fs::create_dir_all(&work).unwrap();

    // A key the installer trusts; every image below is properly signed by it.
    let key = PrivateKey::generate().unwrap();
    key.write_new(&work.join("k")).unwrap();
    let key_pub = work.join("k.pub");

    // A root on the loop btrfs, and a root in a plain directory on /tmp.
    let plain = tempfile::tempdir().unwrap();
    assert!(
        !subvol::is_btrfs(plain.path()).unwrap(),
        "{} is on btrfs: the plain-directory root needs a temp dir on another filesystem (set TMPDIR)",
        plain.path().display()
    );
    let hosts = [
        Host::new("btrfs", m.join("host"), &key_pub, "btrfs"),
        Host::new("directory", plain.path().join("host"), &key_pub, "directory"),
    ];

    // The names the hostile replacements take the length of.
    // From the received subvolume (ROOT/var/lib/op-dbus/staging/.tmp/recv-gen-N-app/SUBVOL)
    // or the directory it is applied to (.../recv-gen-N-app/layer-0), eight `..` reach the
    // root's parent, where the canary is.
    let up_to_canary = format!("{}canary/pwned", "../".repeat(8));
    let abs_tail = "pwned-abs";
    let abs_len = hosts.iter().map(|h| h.canary().to_str().unwrap().len()).max().unwrap() + 1 + abs_tail.len();
    assert!(abs_len <= 255, "the temp dirs' paths are too long for a file name of their length");
    let rel_name = "C".repeat(up_to_canary.len());
    let abs_name = "B".repeat(abs_len);

    // The source subvolume: a directory with its own modes, small files, a 1 MiB file and
    // a reflinked copy of it (CLONE), a symlink, and the names to replace.
    let src = m.join("src");
    let snap = m.join("snap");
    ok(Command::new(&btrfs).args(["subvolume", "create"]).arg(&src));
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/x"), "hi\n").unwrap();
    fs::set_permissions(src.join("sub/x"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(src.join("AAAAAAAAAA"), "abc\n").unwrap();
    fs::write(src.join(&rel_name), "relative\n").unwrap();
    fs::write(src.join(&abs_name), "absolute\n").unwrap();
    fs::write(src.join("big"), pattern(1 << 20, 11)).unwrap();
    ok(Command::new("cp").arg("--reflink=always").arg(src.join("big")).arg(src.join("big2")));
    fs::set_permissions(src.join("big2"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("sub/x", src.join("lnk")).unwrap();
    ok(&mut Command::new("sync"));
    ok(Command::new(&btrfs).args(["subvolume", "snapshot", "-r"]).arg(&src).arg(&snap));
    let stream_path = work.join("snap.stream");
    ok(Command::new(&btrfs).args(["send", "--proto", "2", "-q", "-f"]).arg(&stream_path).arg(&snap));
    let stream = fs::read(&stream_path).unwrap();
    let cmds = commands(&stream);

    // Our reading of the framing matches the real stream: every stored CRC recomputes.
    for c in &cmds {
        assert_eq!(command_crc(&stream, c), c.crc, "CRC of command {} at byte {}", c.kind, c.off);
    }
    assert_eq!(cmds.first().unwrap().kind, C_SUBVOL);
    assert_eq!(cmds.last().unwrap().kind, C_END);
    let subvol_uuid = stream[cmds[0].attr(A_UUID).off..][..16].to_vec();
    let clone = cmds
        .iter()
        .find(|c| c.kind == C_CLONE)
        .expect("the stream has no CLONE: `cp --reflink=always` on the loop btrfs should make one");
    assert_eq!(attr_str(&stream, clone, A_CLONE_PATH), "big");
    let clone_uuid_attr = clone.attr(A_CLONE_UUID);
    assert_eq!(stream[clone_uuid_attr.off..][..16], subvol_uuid[..], "a full stream clones from itself");
    let writes: Vec<&Cmd> = cmds.iter().filter(|c| c.kind == C_WRITE).collect();
    assert!(writes.len() >= 4, "the 1 MiB file should take several WRITE commands");
    eprintln!(
        "real stream: {} bytes, {} commands ({} writes, a clone from {})",
        stream.len(),
        cmds.len(),
        writes.len(),
        uuid_text(&subvol_uuid)
    );

    // The signed config describing the snapshot exactly.
    let cfg = config("app", json!([]), entries_of(&snap));

    // 1. `..` in a MKFILE path: its temporary name (`o258-7-0`) becomes `../pwned`.
    let mkfile = cmds.iter().find(|c| c.kind == C_MKFILE).unwrap();
    let tmp_name = attr_str(&stream, mkfile, A_PATH);
    let dotdot =
        if tmp_name.len() == 8 { "../pwned".to_owned() } else { format!("../{}", "p".repeat(tmp_name.len() - 3)) };
    // 2. `..` in a RENAME destination.
    let ren_a = rename_to(&stream, &cmds, "AAAAAAAAAA");
    let ren_c = rename_to(&stream, &cmds, &rel_name);
    let ren_b = rename_to(&stream, &cmds, &abs_name);
    // 4. Cut mid-command: inside the data of the largest WRITE, and inside a command header.
    let w = writes.iter().max_by_key(|c| c.len).unwrap();
    let cut_at = w.off + CMD_HEADER + w.len / 2;
    assert!(w.attr(A_DATA).off < cut_at, "the cut falls inside the WRITE's data");
    let cut_data = stream[..cut_at].to_vec();
    let cut_header = stream[..clone.off + CMD_HEADER / 2].to_vec();
    // 5. Without END.
    let end = cmds.last().unwrap();
    let no_end = stream[..end.off].to_vec();
    // 6. A CLONE from a subvolume that is neither the stream's nor a parent.
    let mut random = [0u8; 16];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut random).unwrap();
    assert_ne!(random[..], subvol_uuid[..]);
    let other_clone = replace_attr(&stream, clone, A_CLONE_UUID, &random);
    // ... and one that exists on this filesystem (the source subvolume), which `btrfs
    // receive` would find and clone from.
    let src_show = ok(Command::new(&btrfs).args(["subvolume", "show"]).arg(&src));
    let src_uuid: formats::btrfs::Uuid =
        src_show.lines().find_map(|l| l.trim().strip_prefix("UUID:")).unwrap().trim().parse().unwrap();
    let clone_src = replace_attr(&stream, clone, A_CLONE_UUID, src_uuid.bytes());
    // 7. The same 1 MiB CLONE 80 times over: the tree it leaves matches the signed
    // manifest, but it makes the receiver store 80 MiB for a manifest of 2 MiB.
    let clone_bytes = &stream[clone.off..clone.off + CMD_HEADER + clone.len];
    let mut repeated_clones = stream[..end_off(&cmds)].to_vec();
    for _ in 0..80 {
        repeated_clones.extend_from_slice(clone_bytes);
    }
    repeated_clones.extend_from_slice(&stream[end_off(&cmds)..]);
    // 8. Content that differs from the signed sha256 of its file, which the installer
    // hashes from the stream as the WRITEs pass: one byte of the largest WRITE (of `big`).
    assert_eq!(attr_str(&stream, w, A_PATH), "big", "the largest WRITE is one of big's");
    let mut flipped = stream.clone();
    flipped[w.attr(A_DATA).off + w.attr(A_DATA).len / 2] ^= 0xff;
    fix_crc(&mut flipped, w);
    // 9. ... and content that a CLONE changes after the WRITEs made it as signed: 4 KiB of
    // `big` taken from another place of `big2` (a copy of `big`) before END. The hash of
    // `big` from its WRITEs matches the manifest; the installer must read the file back.
    let mut clone_over = stream[..end_off(&cmds)].to_vec();
    clone_over.extend(remade(
        &stream,
        clone,
        &[
            (A_FILE_OFFSET, &0u64.to_le_bytes()),
            (A_CLONE_LEN, &4096u64.to_le_bytes()),
            (A_PATH, b"big"),
            (A_CLONE_PATH, b"big2"),
            (A_CLONE_OFFSET, &8192u64.to_le_bytes()),
        ],
    ));
    clone_over.extend_from_slice(&stream[end_off(&cmds)..]);
    assert_eq!(commands(&clone_over).len(), cmds.len() + 1);

    let mut failures = Vec::new();
    let mut report = Vec::new();
    for host in &hosts {
        let abs = {
            let c = host.canary().to_str().unwrap().to_owned();
            format!("{c}{}{abs_tail}", "/".repeat(abs_len - c.len() - abs_tail.len()))
        };
        assert_eq!(abs.len(), abs_name.len());
        let random_text = uuid_text(&random);
        let src_text = src_uuid.to_string();
        let cases = vec![
            case(
                "`..` in a MKFILE path",
                replace_attr(&stream, mkfile, A_PATH, dotdot.as_bytes()),
                &["mkfile", &format!("{dotdot:?}"), "'..'"],
            ),
            case(
                "`..` in a RENAME destination",
                replace_attr(&stream, ren_a, A_PATH_TO, b"../../pwnd"),
                &["rename", "\"../../pwnd\"", "'..'"],
            ),
            case(
                "`..` in a RENAME destination, aimed at the canary",
                replace_attr(&stream, ren_c, A_PATH_TO, up_to_canary.as_bytes()),
                &["rename", &format!("{up_to_canary:?}"), "'..'"],
            ),
            case(
                "an absolute RENAME destination (the canary)",
                replace_attr(&stream, ren_b, A_PATH_TO, abs.as_bytes()),
                &["rename", &format!("{abs:?}"), "absolute"],
            ),
            case("a stream cut inside a WRITE's data", cut_data.clone(), &["cut short"]),
            case("a stream cut inside a command header", cut_header.clone(), &["cut short"]),
            case("a stream without END", no_end.clone(), &["without an END"]),
            case(
                "a CLONE from a random subvolume UUID",
                other_clone.clone(),
                &["clone", &random_text, "not this subvolume"],
            ),
            case(
                "a CLONE from the source subvolume on this filesystem",
                clone_src.clone(),
                &["clone", &src_text, "not this subvolume"],
            ),
            case(
                "80 MiB of CLONEs behind a 2 MiB manifest",
                repeated_clones.clone(),
                &["would store", "more than the signed manifest allows"],
            ),
            case(
                "a WRITE whose data differs from the signed sha256",
                flipped.clone(),
                &["differs from the signed manifest", "big: content hashes to"],
            ),
            case(
                "a CLONE over a file after its WRITEs",
                clone_over.clone(),
                &["differs from the signed manifest", "big: content hashes to"],
            ),
        ];
        let pristine_dir = tempfile::tempdir().unwrap();
        let pristine = pristine_dir.path().join("root");
        copy_tree(&host.root(), &pristine);
        for (i, c) in cases.iter().enumerate() {
            let archive = forge(&key, &cfg, &c.stream, &work.join(format!("{}-{i}", host.what)));
            let (problems, err) = refuse(host, (&btrfs, &m), &archive, &c.says);
            let first = err.lines().next().unwrap_or_default().trim_start_matches("op-dbus-stage: ").to_owned();
            let line =
                format!("{} root: {}: {}", host.what, c.name, if problems.is_empty() { "refused" } else { "FAILED" });
            if problems.is_empty() {
                eprintln!("ok   {line}: {first}");
            } else {
                eprintln!("FAIL {line}: {}: {first}", problems.join("; "));
                failures.push(format!("{line}: {}\n    stderr: {}", problems.join("; "), err.trim()));
                clean_up(host, &pristine);
            }
            report.push(line);
        }
    }

    // The positive control: the unmodified stream, same key, config of the snapshot's tree.
    for host in &hosts {
        let archive = forge(&key, &cfg, &stream, &work.join(format!("{}-good", host.what)));
        let top = host.top();
        let out = run(host.stage().arg("deploy").arg(&archive));
        let line = format!("{} root: the unmodified stream", host.what);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("FAIL {line}: exit {:?}: {}", out.status.code(), err.trim());
            failures.push(format!("{line}: not deployed, exit {:?}\n    stderr: {}", out.status.code(), err.trim()));
            continue;
        }
        let staged = host.staging().join("app");
        let mut problems = Vec::new();
        let got = tree(&staged);
        let mut want = tree(&snap);
        want.insert("manifest.json".into(), got.get("manifest.json").cloned().unwrap_or_default());
        if got != want {
            let d: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .chain(got.keys().filter(|k| !want.contains_key(*k)).cloned())
                .collect();
            problems.push(format!("the staged tree differs from the snapshot at {d:?}"));
        }
        if !got.contains_key("manifest.json") {
            problems.push("no manifest.json in the staged tree".into());
        }
        let v = run(host.stage().arg("verify"));
        if !v.status.success() {
            problems.push(format!("verify failed: {}", String::from_utf8_lossy(&v.stderr).trim()));
        }
        if host.what == "btrfs" {
            let active = fs::canonicalize(&staged).unwrap();
            if !(subvol::is_subvolume(&active).unwrap() && subvol::is_readonly(&active).unwrap()) {
                problems.push(format!("{} is not a read-only subvolume", active.display()));
            }
        }
        if fs::read_dir(host.canary()).unwrap().next().is_some() || host.top() != top {
            problems.push("the canary or the root's parent changed".into());
        }
        let left = leftovers(&host.staging().join(".tmp"));
        if !left.is_empty() {
            problems.push(format!("left in staging/.tmp: {left:?}"));
        }
        if problems.is_empty() {
            eprintln!("ok   {line}: deployed");
        } else {
            eprintln!("FAIL {line}: {}", problems.join("; "));
            failures.push(format!("{line}: {}", problems.join("; ")));
        }
        report.push(line);
    }
    // The crafted streams are real threats, not framing errors: the `..` MKFILE, fed to
    // the kernel's `btrfs receive` directly, creates a file outside the received subvolume
    // (in the directory received into). (A `..` RENAME out of the subvolume fails there
    // with EXDEV, as it crosses a subvolume boundary; into a directory it would not.)
    let recv = m.join("demo/recv");
    fs::create_dir_all(&recv).unwrap();
    let escaping = work.join("escaping.stream");
    fs::write(&escaping, replace_attr(&stream, mkfile, A_PATH, dotdot.as_bytes())).unwrap();
    let out = run(Command::new(&btrfs).args(["receive", "-q", "-f"]).arg(&escaping).arg(&recv));
    let outside = recv.join(dotdot.trim_start_matches("../"));
    eprintln!(
        "plain `btrfs receive` of the `..` MKFILE: exit {:?}, {}",
        out.status.code(),
        if outside.exists() { format!("created {}", outside.display()) } else { "stayed inside".into() }
    );
    assert!(
        outside.exists(),
        "expected the unchecked kernel receive to create {} (is the mutation effective?): {}",
        outside.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(failures.is_empty(), "{} of {} checks failed:\n{}", failures.len(), report.len(), failures.join("\n"));
}
