#!/usr/bin/env bash
# Benchmark of delta sizes for a 1% change of real shared libraries, every method on the
# same change in the same run, and of deploying that change against applying the same
# patches with `zstd -d --patch-from` alone. Needs root (a loop-mounted btrfs).
# Not a test: it prints tables and exits 0 unless something could not run.
#
#   corpus   BENCH_MIB MiB (default 256) of the system's shared libraries, as 8 files
#            (each a concatenation of whole libraries); the 1% change overwrites 16
#            chunks of each file with bytes of other libraries (code, not noise)
#   floor    the changed bytes alone, `zstd -3`
#   rows     zstd -3 --patch-from OLD NEW per file (summed); ostree static-delta
#            generate --inline; btrfs send -p as the builder makes it (its incremental
#            layer); this project's tar delta (`build --format tar --parent`: its layer)
#   deploy   op-dbus-stage deploy of the thin update onto a root holding the parent, on
#            the loop btrfs and on a directory root (BENCH_TMPDIR), against
#            `zstd -d --patch-from` of the 8 patches into new files (+ sync), interleaved,
#            median of BENCH_RUNS; peak RSS of build and deploy from /usr/bin/time -v.
#            Before each timed command 1 GiB is written to BENCH_TMPDIR and removed: on
#            a virtual machine, memory the guest never touched is slow to fill the first
#            time (256 MiB into a new file: 0.49 s, then 0.07 s), and only the command
#            that needed fresh pages paid for it (the deploy, whose old generation stays)
#
# environment: OP_DBUS_BIN (default target/release, built if missing), BENCH_MIB,
#              BENCH_RUNS (default 3), BENCH_TMPDIR (default /var/tmp)
set -euo pipefail
shopt -s inherit_errexit
repo=$(cd "$(dirname "$0")/.." && pwd)
mib=${BENCH_MIB:-256}
runs=${BENCH_RUNS:-3}
log() { echo "bench: $*" >&2; }
[[ $(id -u) == 0 ]] || { log "bench/delta.sh mounts a loop btrfs: run it as root"; exit 1; }
source "$repo/scripts/lib.sh"
need_packages zstd:zstd ostree:ostree btrfs-progs:mkfs.btrfs time:/usr/bin/time python3:python3
bin=${OP_DBUS_BIN:-$repo/target/release}
[[ -x $bin/op-dbus-image && -x $bin/op-dbus-stage ]] || (cd "$repo" && cargo build --release --bins --locked) >&2
image=$bin/op-dbus-image
stage=$bin/op-dbus-stage
work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/op-dbus-delta-bench.XXXXXX")
mnt=$work/mnt
cleanup() { umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
truncate -s $((mib * 10 + 1024))M "$work/fs.img"
mkfs.btrfs -q "$work/fs.img" >/dev/null
mkdir "$mnt"
mount -o loop "$work/fs.img" "$mnt"
export SOURCE_DATE_EPOCH=1700000000 OP_DBUS_STORE=$mnt/store
now_ns() { date +%s%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
# peak_rss_mib LOGFILE: the "Maximum resident set size" of a /usr/bin/time -v log, in MiB.
peak_rss_mib() { awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$1"; }
# drop_tree DIR: removes DIR and the btrfs subvolumes in it (read-only ones too).
drop_tree() {
	[[ -e $1 ]] || return 0
	find "$1" -depth -type d -inum 256 | while read -r s; do
		btrfs subvolume delete -c "$s" >/dev/null 2>&1 || true
	done
	rm -rf "$1"
}
# warm: every timed command starts with freed page-cache pages to reuse (see above).
warm() {
	dd if=/dev/zero of="$work/warm" bs=4M count=256 status=none
	rm -f "$work/warm"
	sync
}
layer_size() { "$image" --json inspect "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][-1]["size"])'; }

log "generating a $mib MiB corpus of shared libraries and its 1% change"
v1=$mnt/src1/app v2=$mnt/src2/app
mkdir -p "$v1/lib" "$v2/lib"
python3 - "$v1/lib" "$v2/lib" "$mib" "$work/changed.bin" <<'PY'
import os, random, sys
out1, out2, mib, changed_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
libs = []
for d in ("/usr/lib", "/usr/lib64", "/usr/libexec"):
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            if ".so" in n and os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 256 << 10:
                libs.append(p)
libs.sort()
per = (mib << 20) // 8
rng = random.Random(7)
files = [bytearray() for _ in range(8)]
i = 0
for p in libs * 4:
    f = min(range(8), key=lambda k: len(files[k]))
    if len(files[f]) >= per:
        break
    files[f] += open(p, "rb").read()
pool = b"".join(open(p, "rb").read() for p in libs[-20:])
changed = bytearray()
for k, data in enumerate(files):
    data = data[:per]
    open(os.path.join(out1, f"lib{k}.so"), "wb").write(data)
    new = bytearray(data)
    chunk = per // 100 // 16
    for c in range(16):
        at = c * (per // 16) + rng.randrange(per // 16 - chunk)
        src = rng.randrange(len(pool) - chunk)
        new[at:at + chunk] = pool[src:src + chunk]
        changed += pool[src:src + chunk]
    open(os.path.join(out2, f"lib{k}.so"), "wb").write(new)
open(changed_path, "wb").write(changed)
PY
for v in 1 2; do
	printf 'name: app\nversion: 1.%s.0\nfiles:\n  - path: lib\n    target: /opt/app/lib\n' $((v - 1)) >"$mnt/src$v/app/manifest.yaml"
done
"$image" key generate --out "$mnt/key" >/dev/null
export OP_DBUS_SIGNING_KEY=$mnt/key
sync

log "sizes"
floor=$(zstd -3 -c -q "$work/changed.bin" | wc -c)
patches=$work/patches
mkdir -p "$patches"
zsum=0
for f in "$v1"/lib/*.so; do
	n=$(basename "$f")
	zstd -3 -q -f --patch-from="$f" "$v2/lib/$n" -o "$patches/$n.zst"
	zsum=$((zsum + $(stat -c %s "$patches/$n.zst")))
done
ostree --repo="$mnt/ostree" init --mode=archive
c1=$(ostree --repo="$mnt/ostree" commit -b app --tree=dir="$v1" --no-xattrs -s v1)
c2=$(ostree --repo="$mnt/ostree" commit -b app --tree=dir="$v2" --no-xattrs -s v2)
ostree --repo="$mnt/ostree" static-delta generate --inline --from="$c1" --to="$c2" --filename="$work/ostree.delta" >/dev/null
ostree_size=$(stat -c %s "$work/ostree.delta")
rm -rf "$mnt/ostree"
# The btrfs images in a store of their own (the tar ones below are timed).
OP_DBUS_STORE=$mnt/store-btrfs "$image" -q build --format btrfs "$v1" >/dev/null
# (From another folder: the builder receives the parent's layers from the store.)
OP_DBUS_STORE=$mnt/store-btrfs "$image" -q build --format btrfs --parent app:1.0.0 "$v2" >/dev/null
btrfs_size=$(OP_DBUS_STORE=$mnt/store-btrfs layer_size app:1.1.0)
rm -rf "$mnt/store-btrfs"
drop_tree "$mnt/src1/.op-dbus-build"
drop_tree "$mnt/src2/.op-dbus-build"
/usr/bin/time -v "$image" -q build --format tar "$v1" >/dev/null 2>"$work/build1.time"
/usr/bin/time -v "$image" -q build --format tar --parent app:1.0.0 "$v2" >/dev/null 2>"$work/build2.time"
ours=$(layer_size app:1.1.0)
"$image" -q export app:1.0.0 --out "$mnt/v1.oci.tar" >/dev/null
"$image" -q export app:1.1.0 --since app:1.0.0 --out "$mnt/v2-thin.oci.tar" >/dev/null
changed_bytes=$(stat -c %s "$work/changed.bin")

log "deploy of the 1% change, interleaved, $runs runs"
dir_base=$work/dirroot
deploy_on() { # ROOT: a root holding app:1.0.0; prints the time of deploying the thin update
	local root=$1 t0 t1
	drop_tree "$root"
	mkdir -p "$root"
	"$stage" --root "$root" -q init >/dev/null
	"$stage" --root "$root" -q trust add "$mnt/key.pub" >/dev/null
	"$stage" --root "$root" -q deploy "$mnt/v1.oci.tar" >/dev/null
	sync
	warm
	t0=$(now_ns)
	/usr/bin/time -v "$stage" --root "$root" -q deploy "$mnt/v2-thin.oci.tar" >/dev/null 2>"$work/deploy.time"
	t1=$(now_ns)
	seconds "$t0" "$t1"
	drop_tree "$root"
}
base=() ours_btrfs=() ours_dir=()
for ((r = 1; r <= runs; r++)); do
	rm -rf "$work/applied"
	mkdir -p "$work/applied"
	sync
	warm
	t0=$(now_ns)
	for f in "$v1"/lib/*.so; do
		n=$(basename "$f")
		zstd -d -q --patch-from="$f" "$patches/$n.zst" -o "$work/applied/$n"
	done
	sync -f "$work/applied"
	t1=$(now_ns)
	base+=("$(seconds "$t0" "$t1")")
	ours_btrfs+=("$(deploy_on "$mnt/root")")
	rss_btrfs=$(peak_rss_mib "$work/deploy.time")
	ours_dir+=("$(deploy_on "$dir_base")")
	rss_dir=$(peak_rss_mib "$work/deploy.time")
	log "run $r: zstd --patch-from ${base[-1]} s; deploy on btrfs ${ours_btrfs[-1]} s, on a directory root ${ours_dir[-1]} s"
done

mb() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e6 }'; }
x() { awk -v a="$floor" -v b="$1" 'BEGIN { printf "%.2f", b / a }'; }
echo "delta of a 1% change of $mib MiB of shared libraries (8 files, 16 changed chunks each; $changed_bytes bytes changed)"
printf '%-48s %12s %8s\n' method MB x_floor
printf '%-48s %12s %8s\n' "changed bytes alone, zstd -3 (the floor)" "$(mb "$floor")" 1.00
printf '%-48s %12s %8s\n' "zstd -3 --patch-from OLD, per file" "$(mb "$zsum")" "$(x "$zsum")"
printf '%-48s %12s %8s\n' "ostree static-delta generate --inline" "$(mb "$ostree_size")" "$(x "$ostree_size")"
printf '%-48s %12s %8s\n' "btrfs send -p (the builder's incremental layer)" "$(mb "$btrfs_size")" "$(x "$btrfs_size")"
printf '%-48s %12s %8s\n' "op-dbus tar patch delta (build --parent)" "$(mb "$ours")" "$(x "$ours")"
echo
b=$(median "${base[@]}") ob=$(median "${ours_btrfs[@]}") od=$(median "${ours_dir[@]}")
echo "deploying the change (median of $runs; the CPU may be shared: ratios are noisy)"
printf '%-48s %10s %7s\n' measure seconds ratio
printf '%-48s %10s %7s\n' "zstd -d --patch-from, 8 files (+ sync)" "$b" 1.00
printf '%-48s %10s %7s\n' "op-dbus-stage deploy thin update, btrfs root" "$ob" "$(ratio "$b" "$ob")"
printf '%-48s %10s %7s\n' "op-dbus-stage deploy thin update, directory root" "$od" "$(ratio "$b" "$od")"
echo
echo "peak RSS (MiB): build full $(peak_rss_mib "$work/build1.time"), build delta $(peak_rss_mib "$work/build2.time"), deploy delta btrfs $rss_btrfs, directory $rss_dir"
