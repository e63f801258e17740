#!/usr/bin/env bash
# Install everything Procurator's demo and tests need on Debian, as root. Idempotent: a second run
# changes nothing and prints nothing but its final line.
#   - nix-bin, configured for offline single-user use (no substituters, no build users, flakes on)
#   - qemu-system-x86, busybox-static, cpio, nftables, e2fsprogs, iproute2 and friends
#   - a Debian kernel unpacked into a cache directory (never installed into /boot)
#   - a virtualenv (.venv) with Procurator and its dev dependencies
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROCURATOR_HOST_CACHE:-/var/cache/procurator}
kernel_pkg=${PROCURATOR_KERNEL_PACKAGE:-linux-image-cloud-amd64}
venv=${VENV:-$here/.venv}
python=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, /nix and network namespaces need it): sudo make setup"
command -v apt-get >/dev/null || die "this script installs with apt-get; on another system install the packages listed in scripts/setup.sh by hand"

# --- Debian packages -------------------------------------------------------------------------------
packages=(nix-bin qemu-system-x86 busybox-static cpio gzip xz-utils zstd nftables iproute2 e2fsprogs
          procps psmisc util-linux curl socat jq ca-certificates
          openssh-client openssh-server  # ssh for `procurator deploy`; sshd for its tests' fake hosts
          chromium)  # headless, for the worker status page's browser tests
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # The tests start their own sshd inside network namespaces; the package's service must not start
  # on the host's interfaces: forbid service starts during the install (policy-rc.d), as containers do.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f "$policy"; trap - EXIT
  else
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- Nix, offline and single-user -----------------------------------------------------------------
mkdir -p /etc/nix
nixconf=/etc/nix/nix.conf
want_conf='# Written by procurator scripts/setup.sh: offline, single-user (root), no sandbox.
build-users-group =
substituters =
sandbox = false
experimental-features = nix-command flakes
warn-dirty = false'
if [ "$(cat "$nixconf" 2>/dev/null)" != "$want_conf" ]; then
  say "writing $nixconf"
  printf '%s\n' "$want_conf" > "$nixconf"
fi
mkdir -p /nix/store /nix/var/nix
nix --version >/dev/null || die "nix is installed but does not run"

# --- Debian kernel, unpacked into the cache (not installed) ----------------------------------------
kdir=$cache/kernel
if [ ! -f "$kdir/vmlinuz" ] || [ ! -d "$kdir/modules" ]; then
  say "unpacking $kernel_pkg into $kdir"
  export DEBIAN_FRONTEND=noninteractive
  real_pkg=$(apt-cache depends "$kernel_pkg" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$real_pkg" ]; then apt-get update -qq >/dev/null
    real_pkg=$(apt-cache depends "$kernel_pkg" | awk '/Depends: linux-image-/{print $2; exit}'); fi
  [ -n "$real_pkg" ] || die "cannot resolve $kernel_pkg to a kernel package; set PROCURATOR_KERNEL_PACKAGE"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq "$real_pkg" >/dev/null)
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  version=${real_pkg#linux-image-}
  rm -rf "$kdir.new" && mkdir -p "$kdir.new"
  cp "$tmp/root/boot/vmlinuz-$version" "$kdir.new/vmlinuz"
  cp "$tmp/root/boot/config-$version" "$kdir.new/config"
  mv "$tmp/root/lib/modules/$version" "$kdir.new/modules"
  echo "$version" > "$kdir.new/version"
  rm -rf "$kdir" && mv "$kdir.new" "$kdir"
  rm -rf "$tmp"; trap - EXIT
fi
[ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"

# --- Python virtualenv ---------------------------------------------------------------------------
stamp=$venv/.procurator-stamp
# compat: the checkout on sys.path through a plain .pth line, as an installed package is found; the default
# editable mode imports a finder module at every interpreter start (~10 ms of each `procurator` command)
editable=(-e "$here[dev]" --config-settings editable_mode=compat)
want_stamp=$( (cat "$here/pyproject.toml"; echo "${editable[*]}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  say "creating the virtualenv $venv"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || {
    apt-get install -y -qq python3-venv >/dev/null; "$python" -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "${editable[@]}"
  echo "$want_stamp" > "$stamp"
fi
# Bytecode for every module, as an installed package has it (Nix compiles it when it builds the package):
# with PYTHONDONTWRITEBYTECODE set, as on this machine, each `procurator`, keeper or worker started would
# otherwise compile again whatever has no .pyc. Quick when nothing changed (compileall checks mtimes).
"$venv/bin/python" -m compileall -q "$here/procurator" >/dev/null
echo "setup: ready (nix $(nix --version | awk '{print $NF}'), kernel $(cat "$kdir/version"), venv $venv)" >&2
