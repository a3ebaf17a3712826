#!/usr/bin/env bash
# Soak test of crash consistency: the crash test with thousands of random kills per
# operation (default 1000; OP_DBUS_CRASH_RANDOM to change). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_test_tools
export OP_DBUS_CRASH_RANDOM=${OP_DBUS_CRASH_RANDOM:-1000}
cargo build --workspace --bins --locked
cargo build -p installer --features fault-injection --target-dir target/fault-injection --locked
cargo test -p e2e --test crash --locked -- crash_at --nocapture
