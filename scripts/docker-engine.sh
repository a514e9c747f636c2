#!/usr/bin/env bash
# A Docker engine of the project's own on this host, for the container tests (and for trying the image on a machine
# without a running Docker): Debian's docker.io, started by hand with all of its state in DIR and the host's network
# left alone (no iptables/NAT rules, no ip_forward, no docker0 bridge). Builds and runs then use `--network host`.
#
#   scripts/docker-engine.sh up DIR     install docker.io if missing (apt, needs root), start dockerd, state in DIR
#   scripts/docker-engine.sh down DIR   stop the dockerd started in DIR (by pid), unmount what it left, wipe DIR
#
# After `up`, point clients at it: export DOCKER_HOST=unix://DIR/docker.sock (the line `up` prints).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 up|down DIR" >&2; exit 2; }

# Mounts dockerd leaves under DIR when it stops (exec-root/netns/default, a stray overlay), deepest first.
unmount_leftovers() {
  local mnt
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  done
}

up() {
  "$(dirname "$0")/install-debian-packages.sh" "dockerd docker" docker.io
  [[ -e "$dir/dockerd.pid" ]] && down
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  mkdir -p "$dir/data" "$dir/exec"
  # --iptables/--ip-forward/--ip-masq=false and --bridge=none: dockerd would otherwise turn on ip_forward, set
  # FORWARD to DROP and add NAT rules and a docker0 bridge, and leave them after it stops.
  dockerd \
    --host "unix://$dir/docker.sock" \
    --data-root "$dir/data" \
    --exec-root "$dir/exec" \
    --pidfile "$dir/dockerd.pid" \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    >"$dir/dockerd.log" 2>&1 &
  for _ in $(seq 1 300); do  # up to 30 s; it is up in under a second here
    if docker --host "unix://$dir/docker.sock" version >/dev/null 2>&1; then
      echo "export DOCKER_HOST=unix://$dir/docker.sock"
      return
    fi
    kill -0 $! 2>/dev/null || break
    sleep 0.1
  done
  echo "error: dockerd did not come up; see $dir/dockerd.log:" >&2
  tail -20 "$dir/dockerd.log" >&2 || true
  down
  exit 1
}

down() {
  local pid=""
  [[ -f "$dir/dockerd.pid" ]] && pid="$(cat "$dir/dockerd.pid")"
  if [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 300); do  # dockerd takes ~10 s to stop; SIGKILL after 30 s
      [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # Its containerd (and any shim) ran under DIR: stop whatever is left of them, by pid.
  for f in "$dir"/exec/containerd/containerd.pid; do
    [[ -f "$f" ]] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  unmount_leftovers
  rm -rf "$dir"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac
