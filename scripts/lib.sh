# Shared by the README's commands: install what is missing, on Debian, as root.

# need_packages PKG:CMD... installs each Debian package whose command is missing.
need_packages() {
	local missing=() spec pkg cmd
	for spec in "$@"; do
		pkg=${spec%%:*}
		cmd=${spec#*:}
		command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
		echo "missing: ${missing[*]}; install them (apt-get install ${missing[*]}) and run again" >&2
		exit 1
	fi
	echo "==> installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The packages the tools and the tests use.
need_all() {
	need_packages zstd:zstd openssl:openssl skopeo:skopeo minisign:minisign tar:tar coreutils:sha256sum btrfs-progs:mkfs.btrfs \
		docker-registry:docker-registry apache2-utils:htpasswd
	command -v cargo >/dev/null || {
		echo "cargo is missing: install a Rust toolchain (rustup) and run again" >&2
		exit 1
	}
}
