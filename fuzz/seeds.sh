#!/usr/bin/env bash
# Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (small valid inputs):
#   manifest      the users' seed manifests, every images/*/manifest.yaml, the embedded
#                 stage manifest (config blob) of an export of images/stage-2-plugins
#   oci_archive   that export (.oci.tar)
#   tar_payload   its payload layer (as tar, and as the zstd blob), and tars that match
#                 the target's fixed manifest (one layer, two layers)
#   btrfs_stream, btrfs_apply
#                 a hand-made minimal send stream, and real `btrfs send --proto 2` streams
#                 (full and incremental) when run as root with btrfs-progs and loop devices
# Needs the workspace's binaries: `cargo build --bins` at the repository root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
corpus=$here/corpus
image=$repo/target/debug/op-dbus-image
[ -x "$image" ] || (cd "$repo" && cargo build -q --bins)
mkdir -p "$corpus"/{manifest,oci_archive,tar_payload,btrfs_stream,btrfs_apply}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# manifest.yaml texts.
for f in "$repo"/tests/fixtures/seed-manifests/*.yaml "$repo"/images/*/manifest.yaml; do
    [ -f "$f" ] || continue
    install -m 644 "$f" "$corpus/manifest/$(basename "$(dirname "$f")")-$(basename "$f")"
done

# An export of images/stage-2-plugins, signed by a throwaway key.
"$image" key generate --out "$work/key" >/dev/null
cp -r "$repo/images/stage-2-plugins" "$work/stage-2-plugins"
SOURCE_DATE_EPOCH=1700000000 "$image" --store "$work/store" --key "$work/key" -q build --format tar "$work/stage-2-plugins"
"$image" --store "$work/store" --key "$work/key" -q export stage-2-plugins:1.0.0 --out "$corpus/oci_archive/stage-2-plugins.oci.tar"
rm -f "$corpus/oci_archive/stage-2-plugins.oci.tar.minisig"

python3 - "$corpus" "$work/store" <<'PY'
import hashlib, io, json, os, sys, tarfile, zlib
corpus, store = sys.argv[1], sys.argv[2]
def blob(d):
    return open(os.path.join(store, "blobs/sha256", d.split(":")[1]), "rb").read()
index = json.load(open(os.path.join(store, "index.json")))
tag = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "stage-2-plugins:1.0.0")
manifest = json.loads(blob(tag["digest"]))
open(os.path.join(corpus, "manifest", "stage-2-plugins.config.json"), "wb").write(blob(manifest["config"]["digest"]))
layer = blob(manifest["layers"][0]["digest"])
open(os.path.join(corpus, "tar_payload", "stage-2-plugins.zst"), "wb").write(b"\x01" + layer)

def tar(entries, pad_to=0):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, mode, data in entries:
            i = tarfile.TarInfo(name)
            i.mode, i.mtime, i.uid, i.gid = mode, 0, 0, 0
            if kind == "dir":
                i.type = tarfile.DIRTYPE
                t.addfile(i)
            elif kind == "link":
                i.type, i.linkname = tarfile.SYMTYPE, data
                t.addfile(i)
            else:
                i.size = len(data)
                t.addfile(i, io.BytesIO(data))
    b = out.getvalue()
    return b + b"\0" * max(0, pad_to - len(b))

good = [("d/", "dir", 0o755, b""), ("d/f", "file", 0o644, b"abc"), ("l", "link", 0o777, "d/f"),
        ("x/", "dir", 0o755, b""), ("x/big", "file", 0o644, b"x" * 300)]
open(os.path.join(corpus, "tar_payload", "fixed.tar"), "wb").write(b"\x00" + tar(good))
# Two layers of equal length (so that byte 1 = 128 splits them): an old tree, then the
# changes and a whiteout.
lower = tar([("d/", "dir", 0o755, b""), ("d/f", "file", 0o644, b"old"), ("d/gone", "file", 0o644, b"g"),
             ("x/", "dir", 0o755, b""), ("x/big", "file", 0o644, b"x" * 300)])
upper = tar([("d/f", "file", 0o644, b"abc"), ("d/.wh.gone", "file", 0o644, b""), ("l", "link", 0o777, "d/f")])
n = max(len(lower), len(upper))
lower, upper = lower + b"\0" * (n - len(lower)), upper + b"\0" * (n - len(upper))
open(os.path.join(corpus, "tar_payload", "two-layers.tar"), "wb").write(b"\x02\x80" + lower + upper)
# The stage-2-plugins layer decompressed, if zstd is at hand.
try:
    import subprocess
    raw = subprocess.run(["zstd", "-dc"], input=layer, capture_output=True, check=True).stdout
    open(os.path.join(corpus, "tar_payload", "stage-2-plugins.tar"), "wb").write(b"\x00" + raw)
except Exception as e:
    print("no zstd binary; the decompressed stage-2-plugins layer is left out:", e, file=sys.stderr)

# A minimal btrfs send stream, version 2: SUBVOL, MKDIR, MKFILE, WRITE, RENAME, SYMLINK,
# CHMOD, END, each with its CRC-32C (seed 0, no final inversion).
def crc32c(data, crc=0):
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc
def tlv(t, v):
    return t.to_bytes(2, "little") + len(v).to_bytes(2, "little") + v
def u64(n):
    return n.to_bytes(8, "little")
def cmd(c, attrs):
    body = b"".join(attrs)
    head = len(body).to_bytes(4, "little") + c.to_bytes(2, "little") + b"\0\0\0\0"
    crc = crc32c(head + body)
    return len(body).to_bytes(4, "little") + c.to_bytes(2, "little") + crc.to_bytes(4, "little") + body
uuid = bytes(range(16))
s = b"btrfs-stream\0" + (2).to_bytes(4, "little")
s += cmd(1, [tlv(15, b"vol"), tlv(1, uuid), tlv(2, u64(7))])
s += cmd(4, [tlv(15, b"o257-7-0"), tlv(3, u64(257))])
s += cmd(9, [tlv(15, b"o257-7-0"), tlv(16, b"d")])
s += cmd(3, [tlv(15, b"o258-7-0"), tlv(3, u64(258))])
s += cmd(9, [tlv(15, b"o258-7-0"), tlv(16, b"d/f")])
s += cmd(15, [tlv(15, b"d/f"), tlv(18, u64(0)), (19).to_bytes(2, "little") + b"abc"])  # v2: DATA runs to the end
s += cmd(8, [tlv(15, b"l"), tlv(3, u64(259)), tlv(17, b"d/f")])
s += cmd(18, [tlv(15, b"d/f"), tlv(5, u64(0o644))])
s += cmd(21, [])
for t in ("btrfs_stream", "btrfs_apply"):
    open(os.path.join(corpus, t, "minimal.stream"), "wb").write(s)
open(os.path.join(corpus, "btrfs_stream", "minimal.mode0"), "wb").write(b"\x00" + s)
PY

# Real send streams from a loop-mounted btrfs, when possible.
if [ "$(id -u)" = 0 ] && command -v mkfs.btrfs >/dev/null && command -v btrfs >/dev/null; then
    img=$work/fs.img mnt=$work/mnt
    truncate -s 200M "$img" && mkfs.btrfs -q "$img" && mkdir "$mnt"
    if mount -o loop "$img" "$mnt" 2>/dev/null; then
        (
            set -e
            btrfs -q subvolume create "$mnt/vol"
            mkdir -p "$mnt/vol/bin" "$mnt/vol/etc/op-dbus"
            printf '#!/bin/sh\necho op-dbus\n' >"$mnt/vol/bin/op-dbus"
            chmod 755 "$mnt/vol/bin/op-dbus"
            echo '{}' >"$mnt/vol/etc/op-dbus/state.json"
            ln -s ../bin/op-dbus "$mnt/vol/etc/op-dbus/link"
            head -c 20000 /dev/urandom >"$mnt/vol/bin/blob"
            btrfs -q subvolume snapshot -r "$mnt/vol" "$mnt/snap1"
            echo changed >"$mnt/vol/etc/op-dbus/state.json"
            rm "$mnt/vol/bin/blob"
            mkdir "$mnt/vol/web" && echo hi >"$mnt/vol/web/index.html"
            btrfs -q subvolume snapshot -r "$mnt/vol" "$mnt/snap2"
            btrfs -q send --proto 2 -f "$work/full.stream" "$mnt/snap1"
            btrfs -q send --proto 2 -p "$mnt/snap1" -f "$work/incr.stream" "$mnt/snap2"
            btrfs -q send --proto 1 -f "$work/full-v1.stream" "$mnt/snap1"
            parent=$(btrfs subvolume show "$mnt/snap1" | awk '$1 == "UUID:" {print $2}' | tr -d -)
            for t in btrfs_stream btrfs_apply; do
                cp "$work/full.stream" "$corpus/$t/real-full.stream"
                cp "$work/full-v1.stream" "$corpus/$t/real-full-v1.stream"
                cp "$work/incr.stream" "$corpus/$t/real-incr.stream"
            done
            { printf '\001'; echo -n "$parent" | xxd -r -p; cat "$work/incr.stream"; } >"$corpus/btrfs_stream/real-incr.mode1"
        ) || echo "seeds.sh: making real btrfs send streams failed; only the hand-made one is seeded" >&2
        umount "$mnt"
    else
        echo "seeds.sh: cannot mount a loop btrfs; only the hand-made send stream is seeded" >&2
    fi
else
    echo "seeds.sh: not root or no btrfs-progs; only the hand-made send stream is seeded" >&2
fi
# The same inputs in the targets' fix-up modes (checksums recomputed after mutation).
python3 - "$corpus" <<'PY'
import os, sys
c = sys.argv[1]
def put(t, name, data):
    open(os.path.join(c, t, name), "wb").write(data)
tp = os.path.join(c, "tar_payload")
for name, mode in (("fixed.tar", 4), ("two-layers.tar", 6)):
    data = open(os.path.join(tp, name), "rb").read()
    put("tar_payload", name + ".fixup", bytes([mode]) + data[1:])
for name in os.listdir(os.path.join(c, "btrfs_stream")):
    data = open(os.path.join(c, "btrfs_stream", name), "rb").read()
    if name.endswith(".stream"):
        put("btrfs_stream", name + ".fixup", b"\x02" + data)
    elif name.endswith(".mode1"):
        put("btrfs_stream", name + ".fixup", b"\x03" + data[1:])
for name in os.listdir(os.path.join(c, "oci_archive")):
    data = open(os.path.join(c, "oci_archive", name), "rb").read()
    if len(data) % 2 == 0:
        put("oci_archive", name + ".odd", data + b"\0")  # odd length: tar fix-up mode
PY
for t in "$corpus"/*; do echo "$(basename "$t"): $(ls "$t" | wc -l) files"; done
