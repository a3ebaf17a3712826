#!/usr/bin/env bash
# The main job: build and sign the example stages of images/, export them as one file for
# an air-gapped host, show the export as skopeo and minisign see it, then install it into a
# scratch root with op-dbus-stage and show `list` and `verify`.
#
# Work goes to $OP_DBUS_DEMO (default /tmp/op-dbus-demo), made anew each run; the scratch
# root is $OP_DBUS_DEMO/root. Installs skopeo and minisign when missing (quietly); the
# first run builds the release binaries, which takes several minutes (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_packages skopeo:skopeo minisign:minisign
need_cargo
start=$SECONDS

demo=${OP_DBUS_DEMO:-/tmp/op-dbus-demo}
rm -rf "$demo"
mkdir -p "$demo"
if [[ -x target/release/op-dbus-image && -x target/release/op-dbus-stage ]]; then
	echo "==> cargo build --release (up to date unless the sources changed)"
else
	echo "==> cargo build --release: the first build takes several minutes (see the README)"
fi
cargo build --release --locked --bins
image=$PWD/target/release/op-dbus-image
installer=$PWD/target/release/op-dbus-stage
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

root=$demo/root
mkdir -p "$root"
echo "==> op-dbus-stage --root $root init; trust add; enable the openflow feature"
"$installer" --root "$root" -q init
"$installer" --root "$root" trust add "$demo/signing.key.pub"
echo 'features = ["openflow"]' >>"$root/etc/op-dbus/stage.toml"
echo "==> op-dbus-stage --root $root deploy - < $demo/stages.oci.tar"
"$installer" --root "$root" deploy - <"$demo/stages.oci.tar"
echo "==> op-dbus-stage --root $root list"
"$installer" --root "$root" list
echo "==> op-dbus-stage --root $root verify"
"$installer" --root "$root" verify

stages=$("$installer" --root "$root" --json list | grep -c '"status": *"deployed"' || true)
cat <<SUMMARY

==> done in $((SECONDS - start)) s
built      ${#refs[@]} images into $OP_DBUS_STORE, signed by key $("$image" key show "$demo/signing.key.pub"):
           ${refs[*]}
exported   $demo/stages.oci.tar ($(du -h "$demo/stages.oci.tar" | cut -f1)), with its .minisig
verified   skopeo read the export, minisign checked it, op-dbus-stage checked every
           signature and every staged file against its signed hash
deployed   $stages stages into the scratch root $root; their verify commands passed

Try next:
  export PATH=$PWD/target/release:\$PATH OP_DBUS_STORE=$OP_DBUS_STORE root=$root
  op-dbus-stage --root \$root status        # what is deployed, signed by whom
  op-dbus-stage --root \$root snapshots     # the restore points
  op-dbus-stage --root \$root --dry-run remove ${refs[-1]%%:*}   # what removing a stage would do
  ls -l \$root/usr/local/bin                # links into the staging area
  op-dbus-image inspect ${refs[0]}
  less docs/README.md                       # formats, host layout, commands, exit codes
SUMMARY
