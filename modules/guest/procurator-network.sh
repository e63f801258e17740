# procurator-network: give the guest's first virtio NIC the address the host chose (docs/bundle.md).
#
# The host appends to the kernel command line, at each start of the VM:
#   procurator.ip=<addr>/<prefix>   the address of the first interface (required for anything to happen)
#   procurator.gw=<addr>            the default gateway (optional)
#   procurator.dns=<addr>[,<addr>]  name servers (optional; may also be repeated)
# NixOS kernels have no ip= autoconfiguration, so this runs as a oneshot unit before network.target.
#
# Usage: procurator-network <dns-mode>, where dns-mode says who owns resolv.conf:
#   resolvconf (openresolv), resolved (systemd-resolved, through resolvectl) or none.
# PROCURATOR_CMDLINE and PROCURATOR_SYS_NET replace /proc/cmdline and /sys/class/net (for tests).
# Written for writeShellApplication (errexit, nounset, pipefail; no shebang of its own).

dns_mode=${1:-none}
cmdline_file=${PROCURATOR_CMDLINE:-/proc/cmdline}
net_dir=${PROCURATOR_SYS_NET:-/sys/class/net}
wait_tenths=300 # how long to wait for the NIC to appear, in tenths of a second (30 s)

say() { echo "procurator-network: $*"; }
fail() {
  echo "procurator-network: error: $*" >&2
  exit 1
}

address="" gateway=""
nameservers=()
read -r -a words <"$cmdline_file"
for word in "${words[@]}"; do
  case "$word" in
  procurator.ip=*) address=${word#*=} ;;
  procurator.gw=*) gateway=${word#*=} ;;
  procurator.dns=*)
    IFS=, read -r -a more <<<"${word#*=}"
    nameservers+=("${more[@]}")
    ;;
  esac
done

if [ -z "$address" ]; then
  say "no procurator.ip= on the kernel command line; leaving the network unconfigured"
  exit 0
fi
case "$address" in
*/*) ;;
*) fail "procurator.ip=$address lacks its /prefix (expected <addr>/<prefix>)" ;;
esac

# The first virtio NIC in PCI order: the virtio-net device whose sysfs path sorts first. Fixed-width
# hexadecimal PCI addresses sort as they are numbered.
first_virtio_nic() {
  local dev driver key best="" best_key=""
  for dev in "$net_dir"/*; do
    [ -e "$dev/device/driver" ] || continue
    driver=$(readlink -f "$dev/device/driver")
    [ "${driver##*/}" = virtio_net ] || continue
    key=$(readlink -f "$dev/device")
    if [ -z "$best" ] || [[ $key < $best_key ]]; then
      best=${dev##*/}
      best_key=$key
    fi
  done
  printf '%s' "$best"
}

nic=$(first_virtio_nic)
tries=0
while [ -z "$nic" ]; do
  if [ "$tries" -ge "$wait_tenths" ]; then
    fail "no virtio network interface appeared in $net_dir within $((wait_tenths / 10)) s; procurator.ip=$address not applied"
  fi
  sleep 0.1
  tries=$((tries + 1))
  nic=$(first_virtio_nic)
done

ip link set dev "$nic" up
ip address replace "$address" dev "$nic"
if [ -n "$gateway" ]; then
  ip route replace default via "$gateway" dev "$nic"
fi

if [ "${#nameservers[@]}" -gt 0 ]; then
  case "$dns_mode" in
  resolvconf) printf 'nameserver %s\n' "${nameservers[@]}" | resolvconf -a "$nic.procurator" ;;
  resolved) resolvectl dns "$nic" "${nameservers[@]}" ;;
  *) say "warning: neither resolvconf nor systemd-resolved manages resolv.conf; procurator.dns= ignored" ;;
  esac
fi

say "$nic: address $address, gateway ${gateway:-none}, name servers ${nameservers[*]:-none}"
