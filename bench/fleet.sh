#!/usr/bin/env bash
# Benchmark of `op-dbus-image deploy` to a fleet against the way operators deploy without it:
# a sequential shell loop of `ssh HOST op-dbus-stage deploy - < FILE`, in the same run, on
# the same hosts (real sshd, each host in a network namespace of its own, joined by a bridge
# in another; the build machine is one more namespace). The update is an image whose new
# layer is BENCH_MIB MiB of random data (it does not compress away), built on a small base
# every host already runs; FILE is its thin export (`export --since` the base), the bytes
# the loop sends to each host, and what `op-dbus-image deploy` sends too (it asks each host
# what it has). Each host has two installer roots, one per method, both on the base.
# Not a test: it prints the two wall times and their ratio; it exits 0 unless something
# could not run. Everything it makes (namespaces, sshd processes, files) goes at exit.
#
# Run as root. environment:
#   OP_DBUS_BIN     folder of op-dbus-image and op-dbus-stage (default target/release,
#                   built with `cargo build --release --bins` if missing)
#   BENCH_HOSTS     hosts (default 10, at most 200)
#   BENCH_MIB       size of the update's new data in MiB (default 100)
#   BENCH_TMPDIR    parent of the temporary directory (default /var/tmp); it holds the
#                   update twice per host (store and unpacked) per method
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/lib.sh"
[[ $(id -u) == 0 ]] || {
	echo "bench/fleet.sh makes network namespaces: run it as root" >&2
	exit 1
}
need_packages openssh-server:sshd openssh-client:ssh iproute2:ip python3:python3
bin=${OP_DBUS_BIN:-$repo/target/release}
hosts=${BENCH_HOSTS:-10}
mib=${BENCH_MIB:-100}
((hosts >= 1 && hosts <= 200)) || {
	echo "BENCH_HOSTS must be 1 to 200" >&2
	exit 1
}
if [[ ! -x $bin/op-dbus-stage || ! -x $bin/op-dbus-image ]]; then
	(cd "$repo" && cargo build --release --bins --locked)
fi
bin=$(cd "$bin" && pwd)
image=$bin/op-dbus-image
stage=$bin/op-dbus-stage
sshd=$(command -v sshd || echo /usr/sbin/sshd)

id=b$$
work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/op-dbus-fleet-bench.XXXXXX")
chmod 755 "$work"
namespaces=()
sshd_pids=()
cleanup() {
	local pid ns
	for pid in "${sshd_pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for ns in "${namespaces[@]}"; do
		# Whatever still runs inside (a session sshd forked, a confirmation waiter) goes too.
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -9 "$pid" 2>/dev/null || true
		done
		ip netns del "$ns" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

now_ns() { date +%s%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }

# The images: a small base, and an update on it with BENCH_MIB MiB of random data.
export SOURCE_DATE_EPOCH=1700000000 OP_DBUS_STORE=$work/store
"$image" -q key generate --out "$work/key" >/dev/null
export OP_DBUS_SIGNING_KEY=$work/key
make_stage() { # DIR VERSION
	mkdir -p "$1/bin" "$1/share"
	printf 'name: app\nversion: %s\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n    type: symlink\n' "$2" >"$1/manifest.yaml"
	printf '#!/bin/sh\necho %s\n' "$2" >"$1/bin/app"
	chmod 755 "$1/bin/app"
}
make_stage "$work/app1" 1.0.0
make_stage "$work/app2" 1.1.0
echo "bench: building the base and a ${mib} MiB update" >&2
head -c $((mib << 20)) /dev/urandom >"$work/app2/share/data"
"$image" -q build "$work/app1" >/dev/null
"$image" -q build --parent app:1.0.0 "$work/app2" >/dev/null
rm -rf "$work/app2"
"$image" -q export app:1.0.0 --out "$work/base.oci.tar"
"$image" -q export app:1.1.0 --since app:1.0.0 --out "$work/update.oci.tar"
update_bytes=$(stat -c %s "$work/update.oci.tar")

# The network: a bridge namespace, a client namespace, one namespace with sshd per host.
echo "bench: starting $hosts hosts with sshd" >&2
ssh-keygen -q -t ed25519 -N '' -C host -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -C client -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
printf '10.78.0.* %s\n' "$(cut -d' ' -f1,2 "$work/host_key.pub")" >"$work/known_hosts"
mkdir -p /run/sshd
bridge=opd${id}b client=opd${id}c
for ns in "$bridge" "$client"; do
	ip netns add "$ns"
	namespaces+=("$ns")
	ip -n "$ns" link set lo up
done
ip -n "$bridge" link add br0 type bridge
ip -n "$bridge" link set br0 up
ip link add eth0 netns "$client" type veth peer name "o${id}c" netns "$bridge"
ip -n "$client" addr add 10.78.0.254/24 dev eth0
ip -n "$client" link set eth0 up
ip -n "$bridge" link set "o${id}c" master br0 up
config=$work/ssh_config
inventory=$work/inventory.toml
printf '[defaults]\ninstaller = "%s"\n' "$stage" >"$inventory"
: >"$config"
for ((i = 0; i < hosts; i++)); do
	ns=opd${id}h$i addr=10.78.0.$((i + 1))
	ip netns add "$ns"
	namespaces+=("$ns")
	ip -n "$ns" link set lo up
	ip link add eth0 netns "$ns" type veth peer name "o${id}h$i" netns "$bridge"
	ip -n "$ns" addr add "$addr/24" dev eth0
	ip -n "$ns" link set eth0 up
	ip -n "$bridge" link set "o${id}h$i" master br0 up
	cat >"$work/sshd_config.$i" <<-EOF
		ListenAddress $addr
		Port 22
		HostKey $work/host_key
		AuthorizedKeysFile $work/authorized_keys
		PermitRootLogin prohibit-password
		PasswordAuthentication no
		KbdInteractiveAuthentication no
		UsePAM no
		StrictModes no
		PidFile none
		MaxStartups 100
		MaxSessions 100
	EOF
	ip netns exec "$ns" "$sshd" -D -e -f "$work/sshd_config.$i" 2>"$work/sshd.$i.log" &
	sshd_pids+=($!)
	printf 'Host h%d\n  HostName %s\n' "$i" "$addr" >>"$config"
	for method in tool loop; do
		root=$work/h$i-$method
		mkdir "$root"
		"$stage" --root "$root" -q init >/dev/null
		"$stage" --root "$root" -q trust add "$work/key.pub" >/dev/null
		"$stage" --root "$root" -q deploy "$work/base.oci.tar" >/dev/null
	done
	printf '\n[hosts.h%d]\naddress = "%s"\nroot = "%s"\ntags = ["all"]\n' "$i" "$addr" "$work/h$i-tool" >>"$inventory"
done
cat >>"$config" <<-EOF
	Host *
	  User root
	  IdentityFile $work/client_key
	  IdentitiesOnly yes
	  UserKnownHostsFile $work/known_hosts
	  StrictHostKeyChecking yes
	  BatchMode yes
	  ConnectTimeout 5
	  LogLevel ERROR
EOF
for ((i = 0; i < hosts; i++)); do
	for ((try = 0; ; try++)); do
		ip netns exec "$client" ssh -F "$config" "h$i" true 2>/dev/null && break
		((try < 100)) || {
			echo "sshd on h$i does not answer: $(cat "$work/sshd.$i.log")" >&2
			exit 1
		}
		sleep 0.1
	done
done

says() { # ROOT -> what its app prints
	local link
	link=$(readlink "$1/usr/local/bin/app")
	sed -n 's/^echo //p' "$1/${link#/}"
}

sync
echo "bench: sequential loop of ssh HOST op-dbus-stage deploy - < update.oci.tar" >&2
t0=$(now_ns)
ip netns exec "$client" bash -c '
	set -e
	for ((i = 0; i < '"$hosts"'; i++)); do
		ssh -F "$1" "h$i" "$2" --root "$3/h$i-loop" -q deploy - <"$3/update.oci.tar" >/dev/null
	done' loop "$config" "$stage" "$work"
t1=$(now_ns)
loop_s=$(seconds "$t0" "$t1")

sync
echo "bench: op-dbus-image deploy app:1.1.0 --on @all (default --limit 10, --confirm-timeout 30)" >&2
t0=$(now_ns)
ip netns exec "$client" "$image" --store "$OP_DBUS_STORE" --json deploy app:1.1.0 --on @all \
	--inventory "$inventory" --ssh-config "$config" >"$work/report.json"
t1=$(now_ns)
tool_s=$(seconds "$t0" "$t1")

for ((i = 0; i < hosts; i++)); do
	for method in tool loop; do
		[[ $(says "$work/h$i-$method") == 1.1.0 ]] || {
			echo "h$i ($method) does not run 1.1.0" >&2
			exit 1
		}
	done
done
sent=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(h["bytes_sent"] for h in r["hosts"]), sum(1 for h in r["hosts"] if h.get("confirmation") == "confirmed"))' "$work/report.json")

echo "fleet deploy: $hosts hosts, an update of $mib MiB random data ($update_bytes bytes thin export per host)"
printf '%-44s %10s\n' method wall_s
printf '%-44s %10s\n' "ssh HOST op-dbus-stage deploy - < FILE (loop)" "$loop_s"
printf '%-44s %10s\n' "op-dbus-image deploy --on @all" "$tool_s"
printf 'ratio loop/tool: %s (op-dbus-image sent %s bytes in all; %s hosts confirmed)\n' \
	"$(awk -v a="$loop_s" -v b="$tool_s" 'BEGIN { printf "%.2f", a / b }')" ${sent}
