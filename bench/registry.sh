#!/usr/bin/env bash
# Benchmark of the artifact store: `op-dbus-image pull` and `op-dbus-stage deploy` of a
# 1 GiB corpus image from a local docker-registry (127.0.0.1 only), against `skopeo copy`
# of the same image to an OCI directory (+ `zstd -d | tar -x` of its layer for deploy),
# in the same run, median of BENCH_RUNS, warm page cache.
# Not a test: it prints a table and exits 0 unless something could not run.
#
# environment:
#   OP_DBUS_BIN   folder of op-dbus-image and op-dbus-stage (default: target/release,
#                 brought up to date with `cargo build --release --bins`)
#   BENCH_GIB     size of the corpus in GiB (default 1; e.g. 0.25 for a quick run)
#   BENCH_RUNS    timed runs per command, the median is reported (default 3)
#   BENCH_TMPDIR  parent of the temporary directory (default /var/tmp)
#
# Both sides end with the data on disk: ours fsyncs every blob and the staged tree, so
# each baseline step ends with `sync -f` of what it wrote.
set -euo pipefail
shopt -s inherit_errexit

repo=$(cd "$(dirname "$0")/.." && pwd)
gib=${BENCH_GIB:-1}
runs=${BENCH_RUNS:-3}
log() { echo "bench: $*" >&2; }
die() {
	log "$*"
	exit 1
}

source "$repo/scripts/lib.sh"
need_packages docker-registry:docker-registry skopeo:skopeo zstd:zstd openssl:openssl python3:python3
if [[ -n ${OP_DBUS_BIN:-} ]]; then
	bin=$OP_DBUS_BIN
else
	(cd "$repo" && cargo build --release --bins --locked) >&2
	bin=${CARGO_TARGET_DIR:-$repo/target}/release
fi
image=$bin/op-dbus-image
stage=$bin/op-dbus-stage
[[ -x $image && -x $stage ]] || die "$image or $stage is missing"

work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/op-dbus-registry-bench.XXXXXX")
registry_pid=
cleanup() {
	[[ -z $registry_pid ]] || kill "$registry_pid" 2>/dev/null || true
	[[ -z $registry_pid ]] || wait "$registry_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
export SOURCE_DATE_EPOCH=1700000000 OP_DBUS_STORE=$work/store

now_ns() { date +%s%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }

# The registry, on a free loopback port.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
	python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
	sleep 0.1
done
host=127.0.0.1:$port

log "generating a $gib GiB corpus (bench/build.sh --corpus-only)"
BENCH_GIB=$gib BENCH_SMALL_FILES=100 "$repo/bench/build.sh" --corpus-only "$work/corpus"
"$image" key generate --out "$work/key" >/dev/null
export OP_DBUS_SIGNING_KEY=$work/key
log "building and pushing bench-mixed:1.0.0"
"$image" -q build --format tar "$work/corpus/bench-mixed" >/dev/null
rm -rf "$work/corpus"
"$image" -q push bench-mixed:1.0.0 "$host/bench/mixed" >/dev/null
src=$host/bench/mixed:1.0.0
layer=$("$image" --json inspect bench-mixed:1.0.0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"].split(":")[1])')
size=$("$image" --json inspect bench-mixed:1.0.0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["size"])')
log "layer $layer: $size bytes"

pull_base=() pull_ours=() deploy_base=() deploy_ours=()
for ((i = 1; i <= runs; i++)); do
	# skopeo copy to an OCI directory, then extract the layer.
	oci=$work/oci-$i out=$work/out-$i
	sync
	t0=$(now_ns)
	skopeo copy -q --src-tls-verify=false "docker://$src" "oci:$oci:bench" >/dev/null
	sync -f "$oci"
	t1=$(now_ns)
	mkdir -p "$out"
	zstd -dc -q "$oci/blobs/sha256/$layer" | tar -x -C "$out"
	sync -f "$out"
	t2=$(now_ns)
	pull_base+=("$(seconds "$t0" "$t1")")
	deploy_base+=("$(seconds "$t0" "$t2")")
	rm -rf "$oci" "$out"

	# op-dbus-image pull into an empty store.
	sync
	t0=$(now_ns)
	"$image" --store "$work/pulled-$i" -q pull "$src" >/dev/null
	t1=$(now_ns)
	pull_ours+=("$(seconds "$t0" "$t1")")
	rm -rf "$work/pulled-$i"

	# op-dbus-stage deploy from the registry into a fresh root: fetch, verify, unpack, activate.
	root=$work/root-$i
	mkdir -p "$root"
	"$stage" --root "$root" -q init >/dev/null
	"$stage" --root "$root" -q trust add "$work/key.pub" >/dev/null
	sync
	t0=$(now_ns)
	"$stage" --root "$root" -q deploy "$src" >/dev/null
	t1=$(now_ns)
	deploy_ours+=("$(seconds "$t0" "$t1")")
	rm -rf "$root"
	log "run $i: pull ${pull_base[-1]}s (skopeo) vs ${pull_ours[-1]}s; deploy ${deploy_base[-1]}s (skopeo + zstd | tar) vs ${deploy_ours[-1]}s"
done

pb=$(median "${pull_base[@]}") po=$(median "${pull_ours[@]}")
dbase=$(median "${deploy_base[@]}") dours=$(median "${deploy_ours[@]}")
echo "artifact store, $gib GiB corpus image (layer $((size / 1024 / 1024)) MiB) from docker-registry on 127.0.0.1 (median of $runs runs)"
printf '%-58s %10s %10s %7s\n' measure baseline_s ours_s ratio
printf '%-58s %10s %10s %7s\n' "op-dbus-image pull vs skopeo copy docker:// oci:" "$pb" "$po" "$(ratio "$pb" "$po")"
printf '%-58s %10s %10s %7s\n' "op-dbus-stage deploy vs skopeo copy + zstd -d | tar -x" "$dbase" "$dours" "$(ratio "$dbase" "$dours")"
