#!/usr/bin/env bash
# Benchmark of btrfs images against btrfs send and btrfs receive alone, in the same run,
# on a loop-mounted btrfs (needs root). Not a test: prints a table, exits 0 unless
# something could not run.
#
#   builder:   op-dbus-image build --format btrfs DIR
#              vs  cp -a DIR into a new subvolume; snapshot -r; btrfs send --proto 2 | zstd -T0 -3 > FILE
#   installer: op-dbus-stage deploy FILE (each command validated, then received; every
#              file checked) vs  zstd -d < LAYER | btrfs receive DIR, each on a new loop
#              btrfs and followed by sync -f
#   incremental: the layer size for a 1% change against the full one
#   and the builder's peak RSS (GNU time; apt-get install time)
#   the CPU of each row: the whole machine's CPU time during each command, and the floor,
#   the ratio no scheduling could beat on this machine's cores (see bench/cpu.sh)
#
# environment: OP_DBUS_BIN (default target/release), BENCH_MIB (corpus size, default 512),
#              BENCH_STAGE (a stage folder to use instead of the generated corpus, e.g. the
#              1 GiB corpus of `bench/build.sh --corpus-only DIR`, DIR/bench-mixed; the
#              incremental row is then left out),
#              BENCH_RUNS (default 3), BENCH_TMPDIR (where the loop image lives, default
#              /var/tmp; a tmpfs such as /dev/shm takes the disk's writeback noise out)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/bench/cpu.sh"
bin=${OP_DBUS_BIN:-$repo/target/release}
mib=${BENCH_MIB:-512}
runs=${BENCH_RUNS:-3}
[[ -z ${BENCH_STAGE:-} ]] || mib=$(du -sm "$BENCH_STAGE" | cut -f1)
[[ $(id -u) == 0 ]] || { echo "bench/btrfs.sh mounts a loop btrfs: run it as root" >&2; exit 1; }
[[ -x $bin/op-dbus-image && -x $bin/op-dbus-stage ]] || (cd "$repo" && cargo build --release --bins --locked)
work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/op-dbus-btrfs-bench.XXXXXX")
mnt=$work/mnt
cleanup() { umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export SOURCE_DATE_EPOCH=1700000000 OP_DBUS_STORE=$mnt/store
image=$bin/op-dbus-image
stage=$bin/op-dbus-stage
now_ns() { date +%s%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# The corpus waits outside the loop filesystems; each timed build gets a new one.
corpus=$work/corpus/app
if [[ -n ${BENCH_STAGE:-} ]]; then
	echo "bench: copying $BENCH_STAGE" >&2
	mkdir -p "$work/corpus"
	cp -a "$BENCH_STAGE" "$corpus"
else
	mkdir -p "$corpus/data"
	printf 'name: app\nversion: 1.0.0\nfiles:\n  - path: data\n    target: /opt/app/data\n' >"$corpus/manifest.yaml"
	echo "bench: generating a $mib MiB corpus" >&2
	# (The generators die of SIGPIPE when head has enough: not an error here.)
	for i in $(seq 1 8); do
		{ openssl enc -aes-256-ctr -nosalt -pass "pass:seed$i" -in /dev/zero 2>/dev/null || true; } |
			head -c $((mib * 1024 * 1024 / 16)) >"$corpus/data/random$i.bin"
		{ seq 1 100000000 || true; } | head -c $((mib * 1024 * 1024 / 16)) >"$corpus/data/text$i.txt"
	done
fi
"$image" key generate --out "$work/key" >/dev/null
export OP_DBUS_SIGNING_KEY=$work/key
mkdir "$mnt"
src=$mnt/src/app
# new_fs IMAGE MNT MIB: a new loop btrfs of MIB MiB (sparse) mounted at MNT, replacing
# what was there. A filesystem reused across runs would time the cleaner's work on the
# previous run's subvolumes and snapshots, not the command.
new_fs() {
	umount "$2" 2>/dev/null || true
	rm -f "$1"
	truncate -s "$3M" "$1"
	mkfs.btrfs -q "$1" >/dev/null
	mount -o loop "$1" "$2"
}
# build_fs: a new loop btrfs at $mnt holding a copy of the corpus at $src (not timed).
build_fs() {
	new_fs "$work/fs.img" "$mnt" $((mib * 16 + 2048))
	mkdir -p "$mnt/src"
	cp -a "$corpus" "$src"
	sync
}

build_base=() build_ours=() build_base_cpu=() build_ours_cpu=() recv_base=() recv_ours=() recv_base_cpu=()
recv_ours_cpu=() build_peak=0
for ((r = 1; r <= runs; r++)); do
	# Baseline: the same tree into a subvolume, read-only snapshot, send | zstd.
	build_fs
	btrfs subvolume create "$mnt/base" >/dev/null
	sync
	c0=$(busy_ticks) t0=$(now_ns)
	cp -a "$src/." "$mnt/base/"
	btrfs subvolume snapshot -r "$mnt/base" "$mnt/base.ro" >/dev/null
	btrfs send -q --proto 2 "$mnt/base.ro" | zstd -T0 -3 -q >"$mnt/base.stream.zst"
	sync -f "$mnt/base.stream.zst"
	t1=$(now_ns) c1=$(busy_ticks)
	build_base+=("$(seconds "$t0" "$t1")")
	build_base_cpu+=("$(cpu_seconds "$c0" "$c1")")
	build_fs
	c0=$(busy_ticks) t0=$(now_ns)
	/usr/bin/time -f %M -o "$work/rss" "$image" --json build --format btrfs "$src" >"$work/build.json"
	t1=$(now_ns) c1=$(busy_ticks)
	build_ours+=("$(seconds "$t0" "$t1")")
	build_ours_cpu+=("$(cpu_seconds "$c0" "$c1")")
	rss=$(tail -n 1 "$work/rss")
	if ((rss > build_peak)); then build_peak=$rss; fi
	echo "bench: run $r: build ${build_base[-1]} vs ${build_ours[-1]}" >&2
done

# Incremental: change 1% of one file in place and build against the parent.
if [[ -z ${BENCH_STAGE:-} ]]; then
	f=$src/data/random1.bin
	size=$(stat -c %s "$f")
	dd if=/dev/urandom of="$f" bs=1M count=$((mib / 100 + 1)) seek=1 conv=notrunc status=none
	sed -i 's/version: 1.0.0/version: 1.0.1/' "$src/manifest.yaml"
	"$image" -q build --format btrfs --parent app:1.0.0 "$src" >/dev/null
	sizes=$("$image" --json inspect app:1.0.1 | python3 -c 'import json,sys; print(" ".join(str(l["size"]) for l in json.load(sys.stdin)["layers"]))')
	read -r full incr <<<"$sizes"
fi

# Receive: the baseline `zstd -d | btrfs receive` of the image's layer against a full
# deploy of its archive, each onto a new loop btrfs of its own (the same size, made the
# same way) with the layer or archive read from outside it, each followed by `sync -f`:
# a filesystem reused across runs times the cleaner's work on the previous run's
# subvolumes, not the receive.
ref=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["reference"])' "$work/build.json")
layer=$("$image" --json inspect "$ref" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"].split(":")[1])')
"$image" -q export "$ref" --out "$work/app.oci.tar" >/dev/null
cp "$OP_DBUS_STORE/blobs/sha256/$layer" "$work/layer.zst"
# The build's filesystem is not needed any more: its memory (on a tmpfs) is given back.
umount "$mnt"
rm -f "$work/fs.img"
rmnt=$work/rmnt
mkdir "$rmnt"
fresh_fs() { new_fs "$work/recv.img" "$rmnt" $((mib * 4 + 2048)); }
cleanup() { umount "$rmnt" 2>/dev/null || true; umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
for ((r = 1; r <= runs; r++)); do
	fresh_fs
	mkdir "$rmnt/recv"
	sync
	c0=$(busy_ticks) t0=$(now_ns)
	zstd -dc -q "$work/layer.zst" | btrfs receive -q -e "$rmnt/recv" >/dev/null
	sync -f "$rmnt/recv"
	t1=$(now_ns) c1=$(busy_ticks)
	recv_base+=("$(seconds "$t0" "$t1")")
	recv_base_cpu+=("$(cpu_seconds "$c0" "$c1")")
	fresh_fs
	root=$rmnt/root
	mkdir -p "$root"
	"$stage" --root "$root" -q init >/dev/null
	"$stage" --root "$root" -q trust add "$work/key.pub" >/dev/null
	sync
	c0=$(busy_ticks) t0=$(now_ns)
	"$stage" --root "$root" -q deploy "$work/app.oci.tar" >/dev/null
	sync -f "$root"
	t1=$(now_ns) c1=$(busy_ticks)
	recv_ours+=("$(seconds "$t0" "$t1")")
	recv_ours_cpu+=("$(cpu_seconds "$c0" "$c1")")
	echo "bench: run $r: receive ${recv_base[-1]} vs ${recv_ours[-1]}" >&2
done
umount "$rmnt"
rm -f "$work/recv.img"

bb=$(median "${build_base[@]}") bo=$(median "${build_ours[@]}")
rb=$(median "${recv_base[@]}") ro=$(median "${recv_ours[@]}")
rbc=$(median "${recv_base_cpu[@]}") roc=$(median "${recv_ours_cpu[@]}")
bbc=$(median "${build_base_cpu[@]}") boc=$(median "${build_ours_cpu[@]}")
echo "btrfs images vs btrfs send / receive alone ($mib MiB corpus, median of $runs runs)"
printf '%-40s %10s %10s %7s\n' measure baseline_s ours_s ratio
printf '%-40s %10s %10s %7s\n' "build (cp+snapshot+send|zstd)" "$bb" "$bo" "$(awk -v a="$bb" -v b="$bo" 'BEGIN { printf "%.2f", b / a }')"
echo "build CPU (the machine's, $cores cores): baseline ${bbc}s, ours ${boc}s; floor $(floor_ratio "$boc" "$bb")"
echo "builder peak RSS: $((build_peak / 1024)) MiB"
printf '%-40s %10s %10s %7s\n' "deploy (zstd -d | btrfs receive)" "$rb" "$ro" "$(awk -v a="$rb" -v b="$ro" 'BEGIN { printf "%.2f", b / a }')"
echo "deploy CPU (the machine's, $cores cores): baseline ${rbc}s, ours ${roc}s; floor $(floor_ratio "$roc" "$rb")"
if [[ -z ${BENCH_STAGE:-} ]]; then
	echo "incremental layer for a 1% change: $incr bytes of $full ($(awk -v a="$full" -v b="$incr" 'BEGIN { printf "%.1f%%", 100 * b / a }')); file size $size"
fi
