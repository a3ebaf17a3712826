#!/usr/bin/env bash
# Mutation testing of the security-relevant files: would the tests notice a check being
# weakened? Runs cargo-mutants (https://mutants.rs, `cargo install cargo-mutants`) on each
# FILE in turn, against its own crate's unit tests (`cargo test -p CRATE --lib`; for
# installer/src/plan.rs that is the installer's lib tests, which include the planner's unit
# tests and proptest), and prints a table: file, caught / viable, percent. A mutant that
# makes the tests time out counts as caught; unviable ones (that do not build) are not
# counted. The mutants left alive are listed under the table.
#
#   scripts/mutants.sh [FILE...]
#
# With no FILE: formats/src/{path,manifest,digest,unpack}.rs, keys/src/{trust,policy}.rs,
# installer/src/plan.rs. Slow (each mutant rebuilds its crate), so not part of CI: run it
# before resolving an issue that touches one of these files, and keep each at 95% or more
# (or judge every survivor equivalent).
#
# Each file is mutated in a copy of the tree (the sources are never edited), one mutant at
# a time, built in a target directory of its own, target/mutants/ (dependencies are built
# there once): cargo names a workspace crate's artifacts alike whatever the checkout's path,
# so builds of the copy in target/debug would overwrite, and be overwritten by, the
# checkout's own builds running meanwhile. Results land in
# target/mutants/out/<file>/mutants.out. Knobs (environment):
#   MUTANTS_TARGET_DIR     the target directory (default target/mutants)
#   MUTANTS_OUT            where results go (default target/mutants/out)
#   MUTANTS_JOBS           parallel mutants (default 1)
#   MUTANTS_TIMEOUT        seconds before a test run counts as hung (default 60)
#   MUTANTS_BUILD_TIMEOUT  seconds before a build is abandoned (default 900)
#   MUTANTS_SINCE          a git revision: only the mutants on lines changed since it
#                          (cargo mutants --in-diff), to re-check what a change touched
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

command -v cargo >/dev/null || {
	echo "cargo is missing: install a Rust toolchain (rustup) and run again" >&2
	exit 1
}
cargo mutants --version >/dev/null 2>&1 || {
	echo "cargo-mutants is missing: cargo install --locked cargo-mutants, and run again" >&2
	exit 1
}

export CARGO_TARGET_DIR=${MUTANTS_TARGET_DIR:-$root/target/mutants}
out_root=${MUTANTS_OUT:-$root/target/mutants/out}
jobs=${MUTANTS_JOBS:-1}
timeout=${MUTANTS_TIMEOUT:-60}
build_timeout=${MUTANTS_BUILD_TIMEOUT:-900}
since=${MUTANTS_SINCE:-}

files=("$@")
if ((${#files[@]} == 0)); then
	files=(
		formats/src/path.rs
		formats/src/manifest.rs
		formats/src/digest.rs
		keys/src/trust.rs
		keys/src/policy.rs
		formats/src/unpack.rs
		installer/src/plan.rs
	)
fi

# package_of FILE prints the name of the workspace package whose directory holds FILE.
package_of() {
	local dir
	dir=$(dirname "$1")
	while [[ $dir != . && $dir != / ]]; do
		if [[ -f $dir/Cargo.toml ]]; then
			sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$dir/Cargo.toml" | head -n 1
			return 0
		fi
		dir=$(dirname "$dir")
	done
	return 1
}

# count FILE prints the number of lines of FILE (0 when it does not exist).
count() {
	if [[ -f $1 ]]; then
		grep -c . "$1" || true
	else
		echo 0
	fi
}

rows=()
survivors=()
status=0
for file in "${files[@]}"; do
	file=${file#./}
	if [[ ! -f $file ]]; then
		echo "$file: no such file" >&2
		exit 2
	fi
	pkg=$(package_of "$file") || {
		echo "$file: not inside a workspace package" >&2
		exit 2
	}
	out=$out_root/${file//\//_}
	mkdir -p "$out"
	echo "==> $file (package $pkg, tests: cargo test -p $pkg --lib)" >&2
	# cargo-mutants exits 2 when mutants are missed and 3 on timeouts: those are results,
	# reported in the table; anything else (a failing baseline, say) stops here.
	diff_args=()
	if [[ -n $since ]]; then
		git diff "$since" -- "$file" >"$out/changed.diff"
		if [[ ! -s $out/changed.diff ]]; then
			echo "$file: unchanged since $since" >&2
			continue
		fi
		diff_args=(--in-diff "$out/changed.diff")
	fi
	rc=0
	cargo mutants --file "$file" --package "$pkg" --test-package "$pkg" \
		--cargo-test-arg=--lib --jobs "$jobs" --timeout "$timeout" \
		--build-timeout "$build_timeout" --output "$out" "${diff_args[@]}" >&2 || rc=$?
	if ((rc != 0 && rc != 2 && rc != 3)); then
		echo "$file: cargo mutants failed (exit $rc); see $out/mutants.out" >&2
		exit "$rc"
	fi
	res=$out/mutants.out
	caught=$(($(count "$res/caught.txt") + $(count "$res/timeout.txt")))
	missed=$(count "$res/missed.txt")
	viable=$((caught + missed))
	if ((viable > 0)); then
		pct=$((caught * 100 / viable))
	else
		pct=100
	fi
	((pct >= 95)) || status=1
	rows+=("$(printf '| %s | %d / %d (%d%%) |' "$file" "$caught" "$viable" "$pct")")
	while IFS= read -r line; do
		[[ -n $line ]] && survivors+=("$line")
	done < <(cat "$res/missed.txt" 2>/dev/null || true)
done

echo
[[ -n $since ]] && echo "(mutants on the lines changed since $since only)"
echo "| file | caught / viable |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
if ((${#survivors[@]} > 0)); then
	echo
	echo "missed:"
	printf '  %s\n' "${survivors[@]}"
fi
exit "$status"
