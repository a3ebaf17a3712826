#!/usr/bin/env bash
# Benchmark of `op-dbus-stage deploy` against `zstd -d | tar -x` of the same payload, and of
# switching generations of a 40,000-file stage against a 10-file stage.
# Not a test: it prints a table and exits 0 unless something could not run.
#
# environment:
#   OP_DBUS_BIN        folder of op-dbus-image and op-dbus-stage (default target/release,
#                      built with `cargo build --release --bins` if missing)
#   BENCH_FILES        files in the large stage (default 40000)
#   BENCH_RUNS         timed runs per command, the median is reported (default 3)
#   BENCH_TMPDIR       parent of the temporary directory (default /var/tmp; a tmpfs such
#                      as /dev/shm measures the CPU side alone)
#   BENCH_STAGE        a stage folder to deploy instead of the generated BENCH_FILES-file
#                      stage, e.g. the 1 GiB corpus of `bench/build.sh --corpus-only DIR`
#                      (DIR/bench-mixed); the switch rows are then left out
#   BENCH_SWITCH       0: leave out the switch rows (default 1)
# The peak RSS of each deploy comes from /usr/bin/time -v (package `time`). The CPU
# columns are the whole machine's CPU time during each command, and the floor the ratio
# no scheduling could beat on this machine's cores (see bench/cpu.sh).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/bench/cpu.sh"
bin=${OP_DBUS_BIN:-$repo/target/release}
files=${BENCH_FILES:-40000}
runs=${BENCH_RUNS:-3}
if [[ ! -x $bin/op-dbus-stage || ! -x $bin/op-dbus-image ]]; then
	(cd "$repo" && cargo build --release --bins --locked)
fi
image=$bin/op-dbus-image
stage=$bin/op-dbus-stage
[[ -x /usr/bin/time ]] || { echo "bench: /usr/bin/time is missing: apt-get install -y time" >&2; exit 1; }
switch=${BENCH_SWITCH:-1}
[[ -z ${BENCH_STAGE:-} ]] || switch=0
work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/op-dbus-deploy-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=1700000000 OP_DBUS_STORE=$work/store

now_ns() { date +%s%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# make_stage DIR NAME VERSION FILES: FILES small text files under DIR/data, linked as one folder.
make_stage() {
	local dir=$1 name=$2 version=$3 n=$4
	rm -rf "$dir"
	mkdir -p "$dir"
	printf 'name: %s\nversion: %s\nfiles:\n  - path: data\n    target: /opt/%s/data\n' "$name" "$version" "$name" >"$dir/manifest.yaml"
	python3 - "$dir/data" "$n" "$version" <<'PY'
import os, random, sys
root, n, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(42)
words = "dbus stage plugin systemd network openflow privacy mcp chat manifest".split()
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03d}", f"s{(i // 50) % 20:02d}")
    os.makedirs(d, exist_ok=True)
    size = rng.randint(512, 8192)
    text = " ".join(rng.choice(words) for _ in range(size // 6))[:size]
    if i == 0:
        text = version + "\n" + text
    with open(os.path.join(d, f"f{i:05d}.txt"), "w") as f:
        f.write(text)
PY
}

"$image" key generate --out "$work/key" >/dev/null
export OP_DBUS_SIGNING_KEY=$work/key

if [[ -n ${BENCH_STAGE:-} ]]; then
	echo "bench: building $BENCH_STAGE" >&2
	ref=$("$image" --json build "$BENCH_STAGE" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["reference"])')
	"$image" -q export "$ref" --out "$work/big-1.0.0.oci.tar"
	what="deploy $(basename "$BENCH_STAGE")"
else
	echo "bench: generating a $files-file stage (two versions) and a 10-file stage" >&2
	make_stage "$work/big1" big 1.0.0 "$files"
	make_stage "$work/big2" big 1.0.1 "$files"
	make_stage "$work/small1" small 1.0.0 10
	make_stage "$work/small2" small 1.0.1 10
	for s in big1 big2 small1 small2; do
		"$image" -q build "$work/$s" >/dev/null
	done
	for ref in big:1.0.0 big:1.0.1 small:1.0.0 small:1.0.1; do
		"$image" -q export "$ref" --out "$work/${ref/:/-}.oci.tar"
	done
	ref=big:1.0.0
	what="deploy $files files"
fi
layer=$("$image" --json inspect "$ref" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"].split(":")[1])')

new_root() { # -> path of an initialised root trusting the key
	local r
	r=$(mktemp -d "$work/root.XXXXXX")
	"$stage" --root "$r" -q init >/dev/null
	"$stage" --root "$r" -q trust add "$work/key.pub" >/dev/null
	echo "$r"
}

base_times=() deploy_times=() base_cpu=() deploy_cpu=() rss=()
for ((i = 1; i <= runs; i++)); do
	out=$(mktemp -d "$work/x.XXXXXX")
	sync # start both from a clean page cache: no other dirty data in the timed syncs
	c0=$(busy_ticks) t0=$(now_ns)
	zstd -dc -q "$OP_DBUS_STORE/blobs/sha256/$layer" | tar -x -C "$out"
	sync -f "$out"
	t1=$(now_ns) c1=$(busy_ticks)
	base_times+=("$(seconds "$t0" "$t1")")
	base_cpu+=("$(cpu_seconds "$c0" "$c1")")
	rm -rf "$out"
	r=$(new_root)
	sync
	c0=$(busy_ticks) t0=$(now_ns)
	/usr/bin/time -v -o "$work/time.log" "$stage" --root "$r" -q deploy "$work/big-1.0.0.oci.tar" >/dev/null
	t1=$(now_ns) c1=$(busy_ticks)
	deploy_times+=("$(seconds "$t0" "$t1")")
	deploy_cpu+=("$(cpu_seconds "$c0" "$c1")")
	rss+=("$(awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$work/time.log")")
	echo "bench: deploy run $i: baseline ${base_times[-1]}s (CPU ${base_cpu[-1]}s), op-dbus-stage ${deploy_times[-1]}s (CPU ${deploy_cpu[-1]}s), peak RSS ${rss[-1]} MiB" >&2
	rm -rf "$r"
done

# Switching: a root per stage with both versions deployed; restore flips between the
# post- snapshots of the two deploys (one rename of the stage link each way).
switch_time() { # NAME
	local r t0 t1 times=() a b
	r=$(new_root)
	"$stage" --root "$r" -q deploy "$work/$1-1.0.0.oci.tar" >/dev/null
	"$stage" --root "$r" -q deploy "$work/$1-1.0.1.oci.tar" >/dev/null
	mapfile -t posts < <("$stage" --root "$r" --json snapshots |
		python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)["snapshots"] if s["name"].startswith("post-")]')
	a=${posts[0]} b=${posts[1]}
	# Each restore takes a pre-restore snapshot: without the mark, retention ([snapshots]
	# keep) would prune the two being switched between after a few runs.
	"$stage" --root "$r" -q snapshots keep "$a" "$b" >/dev/null
	for ((i = 1; i <= runs; i++)); do
		t0=$(now_ns)
		"$stage" --root "$r" -q restore "$a" >/dev/null
		"$stage" --root "$r" -q restore "$b" >/dev/null
		t1=$(now_ns)
		times+=("$(awk -v s="$(seconds "$t0" "$t1")" 'BEGIN { printf "%.3f", s / 2 }')")
	done
	rm -rf "$r"
	median "${times[@]}"
}
if ((switch)); then
	big_switch=$(switch_time big)
	small_switch=$(switch_time small)
fi

b=$(median "${base_times[@]}")
d=$(median "${deploy_times[@]}")
bc=$(median "${base_cpu[@]}")
dc=$(median "${deploy_cpu[@]}")
echo "op-dbus-stage deploy vs zstd -d | tar -x; sync -f (median of $runs runs; CPU: the machine's, $cores cores)"
printf '%-28s %10s %10s %7s %11s %11s %7s\n' measure baseline_s ours_s ratio base_cpu_s ours_cpu_s floor
printf '%-28s %10s %10s %7s %11s %11s %7s\n' "$what" "$b" "$d" "$(awk -v a="$b" -v c="$d" 'BEGIN { printf "%.2f", c / a }')" \
	"$bc" "$dc" "$(floor_ratio "$dc" "$b")"
if ((switch)); then
	printf '%-28s %10s %10s %7s\n' "switch: 10-file vs $files" "$small_switch" "$big_switch" "$(awk -v a="$small_switch" -v c="$big_switch" 'BEGIN { printf "%.2f", c / a }')"
fi
echo "deploy peak RSS (MiB, max of $runs runs): $(printf '%s\n' "${rss[@]}" | sort -g | tail -1)"
