#!/usr/bin/env bash
# The main job, end to end: Nix builds two VMs, Procurator boots them, shows them reachable, then one VM's
# definition changes and only that VM is replaced by its new generation.
#
# Everything happens inside a private network namespace (procurator-demo) with its own bridge, and a
# temporary state directory; both are removed at the end, whatever happens. The host's own interfaces and
# routes are never touched. VMs boot with QEMU (TCG) because cloud-hypervisor is not packaged in Debian;
# on a worker host the default backend is cloud-hypervisor.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
pc=$repo/.venv/bin/procurator
ns=procurator-demo

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

work=$(mktemp -d /tmp/procurator-demo.XXXXXX)
export PROCURATOR_STATE_DIR=$work/state
export PROCURATOR_CONFIG=$work/worker.json
cat > "$PROCURATOR_CONFIG" <<JSON
{"hypervisor": {"backend": "qemu", "accel": "tcg"},
 "network": {"bridge": "pcdemo0", "subnet": "10.123.0.0/24", "netns": "$ns"}}
JSON

cleanup() {
  set +e
  "$pc" down --purge web api >/dev/null 2>&1
  ip netns del "$ns" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
ip netns del "$ns" 2>/dev/null || true
ip netns add "$ns"
ip -n "$ns" link set lo up

page() { # VM name -> its HTTP page, fetched from inside the namespace
  local ip
  ip=$("$pc" ps --json | jq -r --arg n "$1" '.[] | select(.name == $n) | .ip')
  ip netns exec "$ns" curl -fsS --max-time 5 "http://$ip/"
}
pid_of() { "$pc" ps --json | jq -r --arg n "$1" '.[] | select(.name == $n) | .pid'; }

bold "1. Nix builds two VM bundles and a deployment of both (they share kernel and initrd)"
run "$pc" build examples/minimal.nix#deployment

bold "2. Procurator applies the deployment: bridge, TAPs, leases, both VMs booted, health checks passed"
start=$(date +%s%N)
run "$pc" apply examples/minimal.nix#deployment --parallel 2
tenths=$(( ($(date +%s%N) - start) / 100000000 ))
echo "both healthy after $((tenths / 10)).$((tenths % 10)) s"
run "$pc" ps

bold "3. Each VM answers on its own leased address"
for vm in web api; do echo "-- $vm:"; page "$vm"; done

bold "4. Change web's definition (a new release): Nix gives it a new store path, api keeps its own"
cat > "$work/changed.nix" <<NIX
import $repo/examples/minimal.nix { overrides = { web = { cmdline = "procurator.release=2"; }; }; }
NIX
run "$pc" plan "$work/changed.nix#deployment"

bold "5. Apply it: only web is replaced (same lease, same volume), health-gated; api is not touched"
api_pid=$(pid_of api)
run "$pc" apply "$work/changed.nix#deployment"
run "$pc" ps
echo "-- web now reports its new bundle:"; page web
[ "$(pid_of api)" = "$api_pid" ] && echo "-- api was not touched (pid $api_pid unchanged)"
run "$pc" history

bold "6. The guest's boot log (serial), its interactive console (virtio console), then a graceful stop"
run "$pc" logs web -n 4
echo "$ echo 'uname -r; ls /mnt' | $pc console web"
echo 'uname -r; ls /mnt' | "$pc" console web
echo
run "$pc" down web api
echo
echo "demo done: everything it made (namespace, bridge, TAPs, state) is removed on exit."
