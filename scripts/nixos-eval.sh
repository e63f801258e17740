#!/usr/bin/env bash
# The NixOS modules evaluated with nixpkgs' lib: the tests marked nixpkgs_lib (tests/nixos/eval.nix).
#   PROCURATOR_NIXPKGS_LIB=/path/to/nixpkgs/lib bash scripts/nixos-eval.sh [pytest args]
# Without the variable, the lib of the nixpkgs that flake.lock pins: `nix flake archive` puts the
# flake's inputs in the store (fetching them when they are not there yet).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}

die() { printf 'nixos-eval: error: %s\n' "$*" >&2; exit 1; }

lib=${PROCURATOR_NIXPKGS_LIB:-}
if [ -z "$lib" ]; then
  err=$(mktemp)
  trap 'rm -f "$err"' EXIT
  archive=$(cd "$here" && nix --extra-experimental-features 'nix-command flakes' flake archive --json 2>"$err") \
    || die "cannot get the pinned nixpkgs (no network?): $(grep -m1 'error' "$err" || tail -n 1 "$err"); set PROCURATOR_NIXPKGS_LIB to a nixpkgs lib directory"
  nixpkgs=$(printf '%s' "$archive" | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["inputs"]["nixpkgs"]["path"])')
  lib=$nixpkgs/lib
fi
[ -f "$lib/default.nix" ] || die "$lib is not nixpkgs' lib directory (no default.nix)"
printf 'nixos-eval: nixpkgs lib %s\n' "$lib" >&2
cd "$here"
PROCURATOR_NIXPKGS_LIB=$lib exec "$venv/bin/pytest" -m nixpkgs_lib "$@"
