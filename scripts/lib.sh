# Shared by the scripts: install what a script needs, on Debian, as root, quietly, and never
# leave a service of those packages enabled or running.

# need_packages PKG:CMD... installs each Debian package whose command is missing. apt's
# output goes to a log that is shown only when the install fails.
need_packages() {
	local missing=() spec pkg cmd
	for spec in "$@"; do
		pkg=${spec%%:*}
		cmd=${spec#*:}
		command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || [[ -x /sbin/$cmd ]] || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
		echo "missing: ${missing[*]}; install them (apt-get install ${missing[*]}) and run again" >&2
		exit 1
	fi
	echo "==> installing ${missing[*]}" >&2
	local log
	log=$(mktemp /tmp/op-dbus-apt.XXXXXX.log)
	# In the background so that `set -e` holds inside (it does not in a tested command).
	(apt_install_no_services "${missing[@]}") >"$log" 2>&1 &
	if ! wait $!; then
		cat "$log" >&2
		echo "installing ${missing[*]} failed (the output above is kept in $log)" >&2
		exit 1
	fi
	rm -f "$log"
}

# apt_install_no_services PKG... (run in a subshell): installs the packages with every
# service start forbidden (a policy-rc.d that says no, as Debian's container images ship),
# then disables and stops every systemd unit and init script they brought: Debian's
# docker-registry, for one, enables a registry on port 5000. The tests start their own.
apt_install_no_services() {
	set -euo pipefail
	local policy=/usr/sbin/policy-rc.d
	if [[ ! -e $policy ]]; then
		trap 'rm -f "$policy"' EXIT
		printf '#!/bin/sh\n# written by op-dbus scripts/lib.sh during an install\nexit 101\n' >"$policy"
		chmod 755 "$policy"
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "$@"
	local pkg unit
	for pkg in "$@"; do
		while read -r unit; do
			if [[ -d /run/systemd/system ]]; then
				systemctl disable --now "$unit"
			else
				systemctl disable "$unit" || true
			fi
		done < <(dpkg -L "$pkg" | sed -nE 's#^/(usr/)?lib/systemd/system/([^/@]+\.(service|socket|timer))$#\2#p')
		while read -r unit; do
			command -v update-rc.d >/dev/null && update-rc.d "$unit" disable || true
			[[ -d /run/systemd/system ]] || "/etc/init.d/$unit" stop || true
		done < <(dpkg -L "$pkg" | sed -nE 's#^/etc/init\.d/([^/]+)$#\1#p')
	done
}

# need_cargo: a Rust toolchain, or a word on how to get one.
need_cargo() {
	command -v cargo >/dev/null || {
		echo "cargo is missing: install a Rust toolchain (https://rustup.rs) and run again" >&2
		exit 1
	}
}

# The packages of the test suite: the end-to-end tests drive these tools (skopeo and
# minisign read the exports, openssl and zstd cross-check keys and payloads, btrfs-progs
# makes loop-mounted btrfs, docker-registry and htpasswd serve the registry tests, time
# measures peak memory, script gives the progress test a terminal, systemd runs as PID 1 of
# a namespace for the service tests and creates users (systemd-sysusers), util-linux's
# unshare and nsenter make and enter it, openssh-server and iproute2 make the SSH fleet,
# curl alters a channel in the registry, systemd-analyze checks the shipped units, age
# decrypts and encrypts secrets as the stock tool does, and decrypts an encrypted backup).
need_test_tools() {
	need_packages zstd:zstd openssl:openssl skopeo:skopeo minisign:minisign tar:tar coreutils:sha256sum \
		btrfs-progs:mkfs.btrfs docker-registry:docker-registry apache2-utils:htpasswd time:/usr/bin/time \
		openssh-server:sshd openssh-client:ssh iproute2:ip bsdutils:script systemd:systemd-sysusers \
		util-linux:nsenter curl:curl systemd:systemd-analyze age:age
	need_cargo
}
