#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds the binaries the end-to-end tests
# drive, runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_all
cargo build --workspace --bins --locked
# The crash tests drive an installer that aborts at chosen points (a test-only feature).
cargo build -p installer --features fault-injection --target-dir target/fault-injection --locked
cargo test --workspace --locked
