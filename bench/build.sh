#!/usr/bin/env bash
# Benchmark of `op-dbus-image build` against the plain `tar | zstd` baseline.
# Not a test: it prints a table and exits 0 unless something could not run.
#
# usage: bench/build.sh                    run the benchmark (from anywhere)
#        bench/build.sh --corpus-only DIR  only generate the corpora into DIR
#
# environment:
#   OP_DBUS_IMAGE      builder binary (default target/release/op-dbus-image,
#                      built with `cargo build --release -p builder` if missing)
#   BENCH_GIB          size of the mixed corpus in GiB (default 1; e.g. 0.05)
#   BENCH_SMALL_FILES  number of files in the small-files corpus (default 40000)
#   BENCH_RUNS         timed runs per command, the median is reported (default 3)
#   BENCH_FORMAT       passed as `build --format` (auto|tar|btrfs; default: none)
#   BENCH_TMPDIR       parent of the temporary directory (default /var/tmp)
#
# The CPU columns are the whole machine's CPU time during each command; the floor is the
# builder's spread over every core against the baseline's wall time, the ratio no overlap
# of threads can beat on the machine (see bench/cpu.sh).
#
# Both corpora are deterministic: the same settings give byte-identical files
# (AES-256-CTR keystream from openssl with fixed keys, text from a fixed LCG).
set -euo pipefail
shopt -s inherit_errexit

readonly MIB=$((1024 * 1024))
readonly GIB=$((1024 * MIB))
readonly SEGMENT=$((4 * MIB))
# tr SET2 mapping the 256 byte values onto 16 hex digits.
HEX256=$(printf '0-9a-f%.0s' {1..16})
readonly HEX256

BENCH_GIB=${BENCH_GIB:-1}
BENCH_SMALL_FILES=${BENCH_SMALL_FILES:-40000}
BENCH_RUNS=${BENCH_RUNS:-3}
BENCH_FORMAT=${BENCH_FORMAT:-}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}

die() {
	echo "bench: $*" >&2
	exit 1
}

log() {
	echo "bench: $*" >&2
}

usage() {
	sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
}

# ---------------------------------------------------------------- generators

# A text stream of pseudo-random words (never ends; cut it with head -c).
# Integer arithmetic stays below 2^53, so mawk and gawk give the same bytes.
text_stream() { # SEED
	awk -v seed="$1" '
	BEGIN {
		nw = split("dbus stage plugin systemd login1 network bridge openflow privacy " \
			"router netmaker mcp server chat manifest version signature digest layer " \
			"payload snapshot rollback generation verify install deploy trust key image " \
			"registry blob index config service unit socket interface property method " \
			"signal object path bus name session system", W, " ")
		x = seed % 2147483646 + 1
		for (n = 0; ; n++) {
			line = sprintf("%08d", n)
			k = 6 + x % 7
			for (i = 0; i < k; i++) {
				x = (x * 16807) % 2147483647
				line = line " " W[1 + int(x / 7) % nw]
			}
			x = (x * 16807) % 2147483647
			print line " " x
		}
	}'
}

# An incompressible stream: the AES-256-CTR keystream for key SEED.
random_stream() { # SEED
	openssl enc -aes-256-ctr -nosalt -K "$(printf '%064x' "$1")" -iv "$(printf '%032x' 0)" \
		-in /dev/zero 2>/dev/null
}

# Writes exactly BYTES bytes of STREAM to stdout. The generator is killed by
# SIGPIPE when head has enough; that is expected, so its status is ignored.
take() { # BYTES STREAM SEED
	{ "$2" "$3" || true; } | head -c "$1"
}

# One large semi-compressible file: 4 MiB segments cycling through raw
# random (ratio 1), random hex digits (about 2) and two of text (about 3.3).
large_file() { # PATH BYTES SEED
	local path=$1 left=$2 seed=$3 seg=0 n
	while ((left > 0)); do
		n=$((left < SEGMENT ? left : SEGMENT))
		case $(((seed + seg) % 4)) in
		0) take "$n" random_stream $((seed * 1000 + seg)) ;;
		1) take "$n" random_stream $((seed * 1000 + seg)) | tr '\000-\377' "$HEX256" ;;
		*) take "$n" text_stream $((seed * 1000 + seg)) ;;
		esac
		left=$((left - n))
		seg=$((seg + 1))
	done >"$path"
}

# COUNT small text files of 512 to 8192 bytes under DIR, 40 per directory,
# 25 directories per top-level directory. Prints the total bytes written.
small_files() { # DIR COUNT SEED
	local dir=$1 count=$2 seed=$3
	mkdir -p "$dir"
	awk -v count="$count" 'BEGIN {
		for (d = 0; d * 40 < count; d++) printf "d%03d/s%02d\n", int(d / 25), d % 25
	}' | (cd "$dir" && xargs mkdir -p)
	awk -v dir="$dir" -v count="$count" -v seed="$seed" '
	BEGIN {
		nw = split("[Unit] Description= After= Requires= ExecStart= name: version: " \
			"target: mode: type: path: {\"name\": \"enabled\": true, false, dbus " \
			"stage plugin bridge port mtu interface org.freedesktop.DBus /usr/local " \
			"/etc/op-dbus 0644 0755 symlink copy verify", W, " ")
		split("txt conf json yaml md", EXT, " ")
		x = seed % 2147483646 + 1
		total = 0
		for (f = 0; f < count; f++) {
			x = (x * 16807) % 2147483647
			size = 512 + x % 7681
			d = int(f / 40)
			path = sprintf("%s/d%03d/s%02d/f%05d.%s", dir, int(d / 25), d % 25, f, EXT[1 + f % 5])
			body = sprintf("# file %d of %d, seed %d\n", f, count, seed)
			while (length(body) < size) {
				line = ""
				k = 3 + x % 9
				for (i = 0; i < k; i++) {
					x = (x * 16807) % 2147483647
					line = line W[1 + int(x / 7) % nw] " "
				}
				body = body line x "\n"
			}
			printf "%s\n", substr(body, 1, size - 1) > path
			close(path)
			total += size
		}
		printf "%d\n", total
	}'
}

write_manifest() { # STAGE_DIR NAME DESCRIPTION
	cat >"$1/manifest.yaml" <<EOF
name: $2
component: bench
version: 1.0.0
description: "$3"
files:
  - path: data
    target: /opt/op-dbus-bench/$2
    mode: 0755
    type: symlink
EOF
}

# The "mixed" corpus: BENCH_GIB GiB of 100-200 MiB files plus thousands of
# small text files.
gen_mixed() { # STAGE_DIR
	local dir=$1 total small_count small_bytes budget n base i size sum=0
	total=$(awk -v g="$BENCH_GIB" -v gib="$GIB" 'BEGIN { printf "%d", g * gib }')
	((total >= MIB)) || die "BENCH_GIB=$BENCH_GIB is below 1 MiB"
	small_count=$(awk -v g="$BENCH_GIB" 'BEGIN { n = int(5000 * g + 0.5); print (n < 100 ? 100 : n) }')
	mkdir -p "$dir/data/blobs"
	write_manifest "$dir" bench-mixed "Benchmark corpus: $BENCH_GIB GiB of large semi-compressible files and small text files"
	small_bytes=$(small_files "$dir/data/docs" "$small_count" 7)
	budget=$((total - small_bytes))
	((budget > 0)) || budget=$MIB
	n=$(((budget + 75 * MIB) / (150 * MIB)))
	((n >= 1)) || n=1
	base=$((budget / n))
	for ((i = 0; i < n; i++)); do
		if ((i == n - 1)); then
			size=$((budget - sum))
		elif ((i % 2 == 0)); then
			size=$((base + base * 3 / 10))
		else
			size=$((base - base * 3 / 10))
		fi
		large_file "$(printf '%s/data/blobs/large-%02d.bin' "$dir" "$i")" "$size" $((i + 1))
		sum=$((sum + size))
	done
	log "mixed corpus: $n large files ($((sum / MIB)) MiB), $small_count small files ($((small_bytes / 1024)) KiB) in $dir"
}

# The "small" corpus: BENCH_SMALL_FILES files of 0.5-8 KiB in nested dirs.
gen_small() { # STAGE_DIR
	local dir=$1 bytes
	mkdir -p "$dir/data"
	write_manifest "$dir" bench-small "Benchmark corpus: $BENCH_SMALL_FILES small text files"
	bytes=$(small_files "$dir/data/tree" "$BENCH_SMALL_FILES" 11)
	log "small corpus: $BENCH_SMALL_FILES files ($((bytes / MIB)) MiB) in $dir"
}

gen_corpora() { # DIR
	local dir=$1
	[[ ! -e $dir/bench-mixed && ! -e $dir/bench-small ]] ||
		die "$dir already holds bench-mixed or bench-small; remove them or choose another DIR"
	gen_mixed "$dir/bench-mixed"
	gen_small "$dir/bench-small"
}

# ------------------------------------------------------------------ tooling

need_tool() { # COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 && return
	log "$1 is missing: apt-get install -y $2"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 ||
		die "could not install $2; install it and run again"
}

need_time() {
	[[ -x /usr/bin/time ]] && return
	log "/usr/bin/time is missing: apt-get install -y time"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >&2 ||
		die "could not install the time package; install it and run again"
}

check_args() {
	[[ $BENCH_GIB =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BENCH_GIB must be a number, not '$BENCH_GIB'"
	[[ $BENCH_SMALL_FILES =~ ^[1-9][0-9]*$ ]] || die "BENCH_SMALL_FILES must be a positive integer"
	[[ $BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
}

# ------------------------------------------------------------------ timing

now_ns() {
	date +%s%N
}

seconds() { # START_NS END_NS
	awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}

median() { # VALUES...
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# Reads every file once so that all runs start from a warm page cache.
# (Through cat: GNU tar skips reading file data when it writes to /dev/null.)
warm_up() { # DIR
	tar -cf - -C "$1" . | cat >/dev/null
}

# The baseline writes its output to a file on the same disk and syncs it, as the
# builder does with its blob: both produce a durable compressed archive.
# Prints "SECONDS CPU_SECONDS".
baseline_once() { # DIR
	local t0 t1 c0 c1
	c0=$(busy_ticks)
	t0=$(now_ns)
	tar -cf - -C "$1" . | zstd -T0 -3 -q >"$WORK/baseline.tar.zst"
	sync "$WORK/baseline.tar.zst"
	t1=$(now_ns)
	c1=$(busy_ticks)
	rm -f "$WORK/baseline.tar.zst"
	echo "$(seconds "$t0" "$t1") $(cpu_seconds "$c0" "$c1")"
}

# Prints "SECONDS RSS_KIB CPU_SECONDS"; a fresh, empty store each time.
builder_once() { # DIR
	local dir=$1 store out rss t0 t1 c0 c1 rc=0
	local -a format_args=()
	store=$(mktemp -d "$WORK/store.XXXXXX")
	out=$WORK/build.out
	[[ -z $BENCH_FORMAT ]] || format_args=(--format "$BENCH_FORMAT")
	c0=$(busy_ticks)
	t0=$(now_ns)
	/usr/bin/time -f %M -o "$WORK/rss" \
		"$BUILDER" --store "$store" --key "$KEY" build "$dir" "${format_args[@]}" --json \
		>"$out" 2>"$WORK/build.err" || rc=$?
	t1=$(now_ns)
	c1=$(busy_ticks)
	if ((rc != 0)) || ! grep -q '"digest"' "$out"; then
		cat "$WORK/build.err" >&2
		die "builder failed on $dir (exit $rc)"
	fi
	rss=$(tail -n 1 "$WORK/rss")
	rm -rf "$store"
	echo "$(seconds "$t0" "$t1") $rss $(cpu_seconds "$c0" "$c1")"
}

bench_corpus() { # LABEL DIR
	local label=$1 dir=$2 r peak=0 b bt bc btc rss res files mib
	local -a base_times=() build_times=() base_cpu=() build_cpu=()
	files=$(find "$dir" -type f | wc -l)
	mib=$(du -sm --apparent-size "$dir" | cut -f1)
	log "$label: warm-up read of $files files, $mib MiB"
	warm_up "$dir"
	for ((r = 1; r <= BENCH_RUNS; r++)); do
		read -r b bc <<<"$(baseline_once "$dir")"
		res=$(builder_once "$dir")
		read -r bt rss btc <<<"$res"
		log "$label run $r/$BENCH_RUNS: baseline ${b}s (CPU ${bc}s), builder ${bt}s (CPU ${btc}s), builder peak RSS ${rss} KiB"
		base_times+=("$b")
		build_times+=("$bt")
		base_cpu+=("$bc")
		build_cpu+=("$btc")
		if ((rss > peak)); then peak=$rss; fi
	done
	b=$(median "${base_times[@]}")
	bt=$(median "${build_times[@]}")
	bc=$(median "${base_cpu[@]}")
	btc=$(median "${build_cpu[@]}")
	ROWS+=("$(awk -v l="$label" -v f="$files" -v m="$mib" -v b="$b" -v t="$bt" -v p="$peak" \
		-v bc="$bc" -v tc="$btc" -v fl="$(floor_ratio "$btc" "$b")" 'BEGIN {
		printf "%-14s %8d %8d %11.3f %11.3f %7.2f %14.1f %11.2f %11.2f %6.2f", l, f, m, b, t, (b > 0 ? t / b : 0), p / 1024, bc, tc, fl
	}')")
}

# ------------------------------------------------------------------ main

cleanup() {
	[[ -z ${WORK:-} ]] || rm -rf "$WORK"
}

main() {
	check_args
	case ${1:-} in
	-h | --help)
		usage
		return
		;;
	--corpus-only)
		[[ $# -eq 2 ]] || die "usage: $0 --corpus-only DIR"
		need_tool openssl openssl
		mkdir -p "$2"
		gen_corpora "$2"
		return
		;;
	"") ;;
	*) die "unknown argument '$1' (see $0 --help)" ;;
	esac

	local repo
	repo=$(cd "$(dirname "$0")/.." && pwd)
	. "$repo/bench/cpu.sh"
	BUILDER=${OP_DBUS_IMAGE:-${CARGO_TARGET_DIR:-$repo/target}/release/op-dbus-image}
	if [[ ! -x $BUILDER ]]; then
		[[ -z ${OP_DBUS_IMAGE:-} ]] || die "OP_DBUS_IMAGE=$OP_DBUS_IMAGE is not an executable"
		log "building $BUILDER: cargo build --release -p builder"
		(cd "$repo" && cargo build --release -p builder) >&2
		[[ -x $BUILDER ]] || die "cargo build did not produce $BUILDER"
	fi
	need_tool openssl openssl
	need_tool zstd zstd
	need_time

	WORK=$(mktemp -d "$BENCH_TMPDIR/op-dbus-bench.XXXXXX")
	trap cleanup EXIT
	trap 'exit 130' INT TERM

	local need_mib avail_mib
	need_mib=$(awk -v g="$BENCH_GIB" 'BEGIN { printf "%d", g * 1024 * 2.2 + 512 }')
	avail_mib=$(df -Pm "$WORK" | awk 'NR == 2 { print $4 }')
	((avail_mib >= need_mib)) || die "$BENCH_TMPDIR has $avail_mib MiB free, the benchmark needs about $need_mib MiB"

	log "generating corpora in $WORK"
	gen_corpora "$WORK"
	KEY=$WORK/bench.key
	"$BUILDER" key generate --out "$KEY" >/dev/null

	ROWS=()
	bench_corpus "${BENCH_GIB}GiB-mixed" "$WORK/bench-mixed"
	bench_corpus "${BENCH_SMALL_FILES}-small" "$WORK/bench-small"

	echo "op-dbus-image build vs tar | zstd -T0 -3 (median of $BENCH_RUNS runs, warm cache)"
	echo "builder: $BUILDER ($("$BUILDER" --version 2>/dev/null || echo 'version unknown'))"
	echo "host: $(nproc) CPUs, $BENCH_TMPDIR on $(stat -f -c %T "$WORK"), $(zstd --version | sed "s/^[* ]*//; s/[* ]*$//")"
	printf '%-14s %8s %8s %11s %11s %7s %14s %11s %11s %6s\n' corpus files MiB baseline_s builder_s ratio builder_rss_MiB \
		base_cpu_s build_cpu_s floor
	printf '%s\n' "${ROWS[@]}"
}

main "$@"
