#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one host, for the project's real-cluster tests (and for trying the
# Slurm path on a laptop). Debian's slurmd runs several nodes on one host (MULTIPLE_SLURMD), so n1..nN are
# real slurmd daemons behind a real slurmctld; jobs, steps, signals and requeues are Slurm's own.
#
#   scripts/slurm-test-cluster.sh up DIR [NODES]   install Slurm if missing (apt, needs root), start it, state in DIR
#   scripts/slurm-test-cluster.sh down DIR         stop every daemon started in DIR (by pid) and wipe DIR
#
# After `up`, point clients at it: export SLURM_CONF=DIR/slurm.conf (sinfo, sbatch, squeue, scancel).
# auth/none: no munged is needed; the daemons listen on loopback ports picked free at start.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
nodes="${3:-2}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 up|down DIR [NODES]" >&2; exit 2; }

# N+1 consecutive free TCP ports on loopback (slurmctld, then one per slurmd).
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
count = int(sys.argv[1])
for _ in range(200):
    base = random.randrange(20000, 60000 - count)
    socks = []
    try:
        for port in range(base, base + count):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            socks.append(s)
        print(base)
        break
    except OSError:
        pass
    finally:
        for s in socks:
            s.close()
else:
    sys.exit("no free port range found")
EOF
}

up() {
  "$(dirname "$0")/install-debian-packages.sh" "slurmctld slurmd sbatch" slurmctld slurmd slurm-client
  [[ -e "$dir/slurmctld.pid" ]] && down
  mkdir -p "$dir/state" "$dir/spool"
  dir="$(cd "$dir" && pwd)"
  local base last
  base="$(free_ports $((nodes + 1)))"
  last=$((base + nodes))
  cat >"$dir/slurm.conf" <<EOF
ClusterName=sdgtest
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
NodeName=n[1-$nodes] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((base + 1))-$last] CPUs=4 RealMemory=4000 Gres=gpu:2
PartitionName=debug Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP
EOF
  # Two pretend GPUs per node (plain files: slurmd logs that they are no devices, and counts them): enough for Slurm
  # to apply --gpus-per-node and the steps' GPU flags for real.
  touch "$dir/gpu0" "$dir/gpu1"
  echo "NodeName=n[1-$nodes] Name=gpu File=$dir/gpu[0-1]" >"$dir/gres.conf"
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -i
  for i in $(seq 1 "$nodes"); do slurmd -N "n$i"; done
  for _ in $(seq 1 60); do
    if [[ "$(sinfo -h -o '%D %t' 2>/dev/null)" == "$nodes idle" ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.5
  done
  echo "error: the $nodes Slurm nodes did not come up in 30 s; see $dir/*.log" >&2
  sinfo >&2 || true
  down
  exit 1
}

down() {
  local pid pids=()
  for f in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
    [[ -f "$f" ]] && pid="$(cat "$f")" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 1 100); do  # up to 10 s, then SIGKILL
    local alive=0
    for pid in "${pids[@]}"; do [[ -d /proc/$pid && "$(awk '{print $3}' /proc/$pid/stat)" != Z ]] && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down DIR [NODES]" >&2; exit 2 ;;
esac
