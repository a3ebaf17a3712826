#!/usr/bin/env bash
# The main job: build and sign the example stages of images/, export them as one file for
# an air-gapped host, and show the export as skopeo and minisign see it.
#
# Work goes to $OP_DBUS_DEMO (default /tmp/op-dbus-demo), made anew each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_all

demo=${OP_DBUS_DEMO:-/tmp/op-dbus-demo}
rm -rf "$demo"
mkdir -p "$demo"
cargo build --release --locked --bins
image=$PWD/target/release/op-dbus-image
export OP_DBUS_STORE=$demo/store
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

echo "==> signing key"
"$image" key generate --out "$demo/signing.key"
export OP_DBUS_SIGNING_KEY=$demo/signing.key

refs=()
for stage in images/*/; do
	echo "==> build $stage"
	ref=$("$image" --json build "$stage" | sed -n 's/^  "reference": "\(.*\)",$/\1/p')
	refs+=("$ref")
done

echo "==> the store"
"$image" list

echo "==> export ${refs[*]}"
"$image" export "${refs[@]}" --out "$demo/stages.oci.tar"
"$image" key export --minisign "$demo/signing.key.pub" >"$demo/signing.minisign.pub"

echo "==> skopeo inspect --raw oci-archive:$demo/stages.oci.tar:${refs[0]}"
skopeo inspect --raw "oci-archive:$demo/stages.oci.tar:${refs[0]}"
echo
echo "==> minisign -Vm $demo/stages.oci.tar -p $demo/signing.minisign.pub"
minisign -Vm "$demo/stages.oci.tar" -p "$demo/signing.minisign.pub"
echo "==> inspect ${refs[0]}"
"$image" inspect "${refs[0]}"
