#!/usr/bin/env bash
# Install Debian packages unless the commands they provide are already on PATH: how the test scripts get a component
# (Slurm, Docker, debootstrap) on a fresh machine. Needs root only when something is missing.
#
#   scripts/install-debian-packages.sh "COMMAND …" PACKAGE …
set -euo pipefail
commands="$1"
shift
missing=0
for c in $commands; do command -v "$c" >/dev/null || missing=1; done
((missing)) || exit 0
if [[ $(id -u) != 0 ]]; then
  echo "error: $* not installed, and installing needs root: apt-get install -y --no-install-recommends $*" >&2
  exit 1
fi
echo "installing $* (apt)" >&2
export DEBIAN_FRONTEND=noninteractive
install=(apt-get install -y -o DPkg::Lock::Timeout=300 --no-install-recommends "$@")
"${install[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && "${install[@]}" >/dev/null; }
