#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, after writing the seed corpora if
# they are missing (seeds.sh). Crashes are saved under fuzz/artifacts/<target>/; reproduce
# one with `fuzz/run.sh --repro TARGET FILE`. Not part of CI.
#
#   fuzz/run.sh 120                 every target, 2 minutes each
#   fuzz/run.sh 600 tar_payload     one target
#   fuzz/run.sh --repro tar_payload fuzz/artifacts/tar_payload/crash-...
#
# cargo-fuzz needs a nightly compiler (for -Zsanitizer=address). With a nightly toolchain
# installed it is used; otherwise stable is told to accept nightly flags (RUSTC_BOOTSTRAP=1),
# which works for these targets.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
command -v cargo-fuzz >/dev/null || { echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz() { cargo +nightly fuzz "$@"; }
else
    fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }
fi
targets_all=(manifest oci_archive tar_payload btrfs_stream btrfs_apply)
if [ "${1:-}" = "--repro" ]; then
    fuzz run -O "$2" "$3"
    exit
fi
seconds=${1:-60}
shift || true
targets=("${@:-${targets_all[@]}}")
[ -d corpus ] || ./seeds.sh
fuzz build -O
mkdir -p logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: ${seconds}s (log: fuzz/logs/$t.log)"
    # -rss_limit_mb: a parser that balloons on a small input is a finding too.
    rc=0
    fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=20 \
        -max_len=65536 -print_final_stats=1 >"logs/$t.log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|Test unit written|thread .* panicked)' \
        "logs/$t.log" | tail -6 || true
    if [ "$rc" != 0 ]; then
        echo "!! $t stopped with status $rc: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
