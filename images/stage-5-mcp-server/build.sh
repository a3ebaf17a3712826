#!/bin/sh
# Build step of stage-5-mcp-server: render generated/mcp-tools.json from
# templates/mcp-tools.json.in and the tool descriptions in tools/*.tool.
# Deterministic: fixed sort order, no timestamps, output replaced atomically.
set -eu
LC_ALL=C
export LC_ALL
cd "$(dirname "$0")"

version=$(sed -n 's/^version:[[:space:]]*\([^[:space:]#]*\).*/\1/p' manifest.yaml)
[ -n "$version" ] || { echo "build.sh: no version in manifest.yaml" >&2; exit 1; }

rm -rf generated
mkdir generated
tmp=generated/.mcp-tools.json.tmp

{
	sep=
	for f in tools/*.tool; do
		name=$(basename "$f" .tool)
		desc=$(sed -n 's/^description:[[:space:]]*//p' "$f" | sed 's/["\\]/\\&/g')
		printf '%s    { "name": "%s", "description": "%s" }' "$sep" "$name" "$desc"
		sep=',
'
	done
	printf '\n'
} >generated/tools.fragment

sed -e "s/@VERSION@/$version/" \
	-e '/@TOOLS@/{
r generated/tools.fragment
d
}' templates/mcp-tools.json.in >"$tmp"
rm -f generated/tools.fragment
chmod 0644 "$tmp"
mv "$tmp" generated/mcp-tools.json
echo "build.sh: generated/mcp-tools.json ($(grep -c '"name"' generated/mcp-tools.json) tools, version $version)"
