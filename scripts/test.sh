#!/usr/bin/env bash
# The whole test suite (CI runs it from a fresh clone: .ci/run). Installs the tools the tests
# drive, runs the gates (rustfmt, clippy, rustdoc, all with warnings denied), builds the
# binaries the end-to-end tests run, then every test binary of the workspace, without
# stopping at the first that fails. The last line is the summary, "N passed, N failed",
# counted over every test binary (a gate that fails counts as one failure); the exit status
# is non-zero when anything failed. Needs root (loop devices, tmpfs, namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_test_tools

failures=()
gate() {
	local name=$1
	shift
	echo "==> $name: $*"
	if ! "$@"; then
		failures+=("$name")
	fi
}
gate rustfmt cargo fmt --all --check
gate clippy cargo clippy --workspace --all-targets --locked -- -D warnings
gate rustdoc env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# The installer without its default `registry` feature (the small build for air-gapped hosts).
gate installer-without-registry sh -c 'cargo clippy -p installer --no-default-features --all-targets --locked -- -D warnings &&
	cargo test -q -p installer --no-default-features --locked --lib receive'

gate build cargo build --workspace --bins --locked
# The crash tests drive an installer that aborts at chosen points (a test-only feature).
gate build-fault-injection cargo build -p installer --features fault-injection --target-dir target/fault-injection --locked

echo "==> test"
log=target/test.log
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One "test result: ok. 3 passed; 0 failed; 1 ignored; ..." line per test binary.
read -r passed failed ignored binaries < <(
	sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$log" |
		awk '{p += $1; f += $2; i += $3; n++} END {print p + 0, f + 0, i + 0, n + 0}'
)
if ((status != 0 && failed == 0)); then
	# A test binary that did not build, or crashed before its summary.
	failures+=("cargo test (exit $status; see $log)")
fi
echo "==> summary of $binaries test binaries"
((ignored == 0)) || echo "$ignored ignored"
((${#failures[@]} == 0)) || echo "failed: ${failures[*]}"
echo "$((passed)) passed, $((failed + ${#failures[@]})) failed"
((status == 0 && ${#failures[@]} == 0))
