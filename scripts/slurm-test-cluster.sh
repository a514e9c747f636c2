#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one host, for the project's real-cluster tests (and for trying the
# Slurm path on a laptop). Debian's slurmd runs several nodes on one host (MULTIPLE_SLURMD), so n1..nN are
# real slurmd daemons behind a real slurmctld; jobs, steps, signals and requeues are Slurm's own.
#
#   scripts/slurm-test-cluster.sh up DIR [NODES [pyxis]]  install Slurm if missing (apt, needs root), start it, state
#                                                         in DIR; with `pyxis`, real pyxis + enroot as well (below)
#   scripts/slurm-test-cluster.sh down DIR                stop every daemon started in DIR (by pid) and what is left of
#                                                         its jobs and containers, unmount all under DIR, wipe DIR
#
# After `up`, point clients at it: export SLURM_CONF=DIR/slurm.conf (sinfo, sbatch, squeue, scancel).
# auth/none: no munged is needed; the daemons listen on loopback ports picked free at start.
#
# pyxis mode: real pyxis + enroot, for `srun --container-image=/abs/img.sqsh --container-workdir=/ …` (also
# --container-name, and --overlap to join a running named container). Both are built once by
# scripts/build-enroot-pyxis.sh into a cache outside the clone and used from a copy in DIR. The nodes share this host's
# disk, so each keeps its own enroot dirs (data, runtime, cache, temp; per user) under DIR/enroot/NODE.
# DIR/enroot-bin/enroot is enroot for this cluster: inside a job step it uses that node's dirs (SLURMD_NODENAME),
# elsewhere DIR/enroot/host, or a node's if SLURMD_NODENAME=nK is set. `up` then also prints
# `export PATH=DIR/enroot-bin:$PATH`: with it, `srun -w n2 enroot list` lists n2's containers. While a pyxis cluster is
# up, /dev/fuse is mode 666 (squashfuse for every user). A non-root user's jobs need DIR and the image readable by that
# user (every parent of DIR searchable).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
nodes="${3:-2}"
mode="${4:-}"
usage() { echo "usage: $0 up DIR [NODES [pyxis]] | down DIR" >&2; exit 2; }
[[ -n "$cmd" && -n "$dir" ]] || usage
[[ -z "$mode" || "$mode" == pyxis ]] || usage
fuse_users=/run/sdg-test-cluster-fuse  # which clusters opened /dev/fuse, and its mode before (see open_fuse)

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

# pyxis mode: enroot's per-node dirs, the enroot wrapper and pyxis' plugstack.conf in DIR.
pyxis_setup() {
  local prefix node kind
  prefix="$("$(dirname "$0")/build-enroot-pyxis.sh" | tail -n 1)"
  # Used from a copy in DIR: every user's srun loads the plugin and every user's job runs enroot, and the cache may be
  # in root's home (mode 700). enroot bakes its prefix into its script: rewrite it, as enroot's `make dist` does.
  cp -a "$prefix" "$dir/enroot-prefix"
  grep -rlIF "$prefix" "$dir/enroot-prefix" | xargs -r sed -i "s;$prefix;$dir/enroot-prefix;g"
  prefix="$dir/enroot-prefix"
  # Mode 1777 like /tmp: each user's enroot makes its own user-UID dir inside.
  for node in host $(seq -f 'n%g' 1 "$nodes"); do
    for kind in data runtime cache temp; do
      mkdir -p "$dir/enroot/$node/$kind"
      chmod 1777 "$dir/enroot/$node/$kind"
    done
  done
  # pyxis runs enroot with the job's environment minus ENROOT_*_PATH, and with slurmd's PATH: so the paths are set in
  # a wrapper, and the node comes from the PATH dir it was found in (DIR/enroot-bin/NODE, first on that slurmd's PATH;
  # SLURMD_NODENAME is missing when pyxis removes a step's container). A job's own `enroot` (DIR/enroot-bin first on
  # its PATH) goes by SLURMD_NODENAME.
  # ENROOT_SQUASH_OPTIONS for `enroot import`: enroot's default (lzo) took 94 s to squash a 1.4 GB venv on 2 cores,
  # zstd -1 14 s, no compression 4 s (2.5x the size), and squashfuse reads it about twice as fast as zstd.
  mkdir -p "$dir/enroot-bin"
  cat >"$dir/enroot-bin/enroot" <<EOF
#!/usr/bin/env bash
# enroot for the test cluster in $dir, with the enroot dirs of the node it runs on.
set -euo pipefail
case "\$0" in
  "$dir/enroot-bin/"*/enroot) node="\$(basename "\$(dirname "\$0")")" ;;
  *) node="\${SLURMD_NODENAME:-host}" ;;
esac
root="$dir/enroot/\$node"
[[ -d "\$root" ]] || { echo "enroot ($dir): no such node: \$node" >&2; exit 1; }
user="user-\$(id -u)"
export ENROOT_DATA_PATH="\$root/data/\$user" ENROOT_RUNTIME_PATH="\$root/runtime/\$user"
export ENROOT_CACHE_PATH="\$root/cache/\$user" ENROOT_TEMP_PATH="\$root/temp/\$user"
export ENROOT_SQUASH_OPTIONS="\${ENROOT_SQUASH_OPTIONS:--noI -noD -noF -noX -exit-on-error}"
export SDG_TEST_CLUSTER="$dir"  # marks this cluster's enroot processes for \`down\`
export PATH="$prefix/bin:\$PATH"  # enroot's helpers (enroot-nsenter, enroot-mount, …)
mkdir -m 700 "\$ENROOT_TEMP_PATH" 2>/dev/null || [[ -d "\$ENROOT_TEMP_PATH" ]]  # enroot makes the others
exec "$prefix/bin/enroot" "\$@"
EOF
  chmod 755 "$dir/enroot-bin/enroot"
  for node in $(seq -f 'n%g' 1 "$nodes"); do
    mkdir -p "$dir/enroot-bin/$node"
    ln -s ../enroot "$dir/enroot-bin/$node/enroot"
  done
  # container_scope=global (pyxis' default): `job` runs enroot from the epilog with a fixed PATH that does not reach
  # this wrapper, and the nodes drain. Named containers then outlive jobs: a fresh DIR starts without any.
  # use_squashfuse=1: a step without --container-name mounts the image instead of unpacking it: 4-7 s instead of
  # 50-90 s for a 1.4 GB image on two nodes (named containers are always unpacked). Needs /dev/fuse for every user.
  local squashfuse=0
  if [[ -c /dev/fuse ]] && command -v squashfuse >/dev/null; then
    squashfuse=1
    open_fuse
  fi
  echo "required $prefix/lib/slurm/spank_pyxis.so runtime_path=$dir/pyxis container_scope=global" \
    "use_squashfuse=$squashfuse" >"$dir/plugstack.conf"
}

# /dev/fuse is mode 600 here; unprivileged squashfuse (inside enroot's user namespace) needs it 666, as most
# distributions ship it. Opened while any pyxis test cluster is up: the last `down` restores the mode it had before.
open_fuse() {
  mkdir -p "$fuse_users/clusters"
  (
    flock 9
    [[ -e "$fuse_users/mode" ]] || stat -c %a /dev/fuse >"$fuse_users/mode"
    echo "$dir" >"$fuse_users/clusters/$(printf %s "$dir" | sha256sum | cut -c1-16)"
    chmod 666 /dev/fuse
  ) 9>"$fuse_users/lock"
}

restore_fuse() {
  local entry
  [[ -f "$fuse_users/mode" ]] || return 0
  (
    flock 9
    rm -f "$fuse_users/clusters/$(printf %s "$dir" | sha256sum | cut -c1-16)"
    for entry in "$fuse_users/clusters/"*; do  # forget clusters wiped without `down`
      [[ -f "$entry" && ! -d "$(cat "$entry")" ]] && rm -f "$entry"
    done
    if [[ -z "$(ls -A "$fuse_users/clusters")" ]]; then
      chmod "$(cat "$fuse_users/mode")" /dev/fuse
      rm -f "$fuse_users/mode"
    fi
  ) 9>"$fuse_users/lock"
}

up() {
  "$(dirname "$0")/install-debian-packages.sh" "slurmctld slurmd sbatch" slurmctld slurmd slurm-client
  [[ -e "$dir/slurmctld.pid" ]] && down
  mkdir -p "$dir/state" "$dir/spool"
  dir="$(cd "$dir" && pwd -P)"
  local base last proctrack=linuxproc
  base="$(free_ports $((nodes + 1)))"
  last=$((base + nodes))
  if [[ "$mode" == pyxis ]]; then
    pyxis_setup
    # With linuxproc, a process backgrounded in a named container's step outlives the step. pgid costs ~3 s at the end
    # of each container step here: its wait sleeps 1 s, then 2 s, until the step's process group is empty, and the
    # container's processes linger there as zombies until this machine's PID 1 reaps them.
    proctrack=pgid
  fi
  cat >"$dir/slurm.conf" <<EOF
ClusterName=sdgtest
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/$proctrack
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
  if [[ "$mode" == pyxis ]]; then echo "PlugStackConfig=$dir/plugstack.conf" >>"$dir/slurm.conf"; fi
  # Two pretend GPUs per node (plain files: slurmd logs that they are no devices, and counts them): enough for Slurm
  # to apply --gpus-per-node and the steps' GPU flags for real.
  touch "$dir/gpu0" "$dir/gpu1"
  echo "NodeName=n[1-$nodes] Name=gpu File=$dir/gpu[0-1]" >"$dir/gres.conf"
  export SLURM_CONF="$dir/slurm.conf"
  # SDG_TEST_CLUSTER marks the daemons and the slurmstepds they start, for `down`. pyxis runs `enroot` from slurmd's
  # PATH: this cluster's wrapper for that node first.
  SDG_TEST_CLUSTER="$dir" slurmctld -i
  for i in $(seq 1 "$nodes"); do
    if [[ "$mode" == pyxis ]]; then
      SDG_TEST_CLUSTER="$dir" PATH="$dir/enroot-bin/n$i:$PATH" slurmd -N "n$i"
    else
      SDG_TEST_CLUSTER="$dir" slurmd -N "n$i"
    fi
  done
  for _ in $(seq 1 60); do
    if [[ "$(sinfo -h -o '%D %t' 2>/dev/null)" == "$nodes idle" ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      if [[ "$mode" == pyxis ]]; then echo "export PATH=$dir/enroot-bin:\$PATH"; fi
      return
    fi
    sleep 0.5
  done
  echo "error: the $nodes Slurm nodes did not come up in 30 s; see $dir/*.log" >&2
  sinfo >&2 || true
  down
  exit 1
}

# Kill what is left of this cluster's jobs and containers (slurmstepds and their tasks outlive slurmd; a process that
# left its step's process group outlives the step): processes marked SDG_TEST_CLUSTER=DIR (the wrapper's enroot and
# squashfuse), or whose cwd or root is under DIR (slurmstepd runs in DIR; its environ is overwritten by its title);
# srun and salloc clients of this cluster (SLURM_CONF=DIR/slurm.conf: they would wait for it forever); all their
# descendants; every process sharing a mount namespace with one of those (a container's processes, daemonized or not);
# any process in another mount namespace that mounts something under DIR. Never this script or its ancestors. TERM,
# then KILL after 2 s.
kill_leftovers() {
  python3 - "$dir" <<'EOF'
import os, signal, sys, time
d = sys.argv[1]
under = lambda p: p == d or p.startswith(d + "/")
CLIENTS = {"srun", "salloc", "sattach", "sbcast"}  # hang on when their cluster is gone
def read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""
def link(pid, name):
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return ""
def processes():  # pid -> parent pid, zombies left out
    table = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        stat = read(p, "stat").rsplit(b")", 1)[-1].split()
        if stat and stat[0] != b"Z":
            table[int(p)] = int(stat[1])
    return table
def leftovers():
    parent = processes()
    ours, pid = set(), os.getpid()
    while pid > 0 and pid not in ours:
        ours.add(pid)
        pid = parent.get(pid, 0)
    own_ns, marker = link("self", "ns/mnt"), f"SDG_TEST_CLUSTER={d}".encode()
    client = f"SLURM_CONF={d}/slurm.conf".encode()
    found = {p for p in parent if marker in read(p, "environ").split(b"\0")
             or under(link(p, "cwd")) or under(link(p, "root"))
             or (os.path.basename(link(p, "exe")) in CLIENTS and client in read(p, "environ").split(b"\0"))
             or (link(p, "ns/mnt") != own_ns and d.encode() + b"/" in read(p, "mountinfo"))}
    while True:
        namespaces = {link(p, "ns/mnt") for p in found} - {own_ns, ""}
        more = {p for p in parent if parent[p] in found or link(p, "ns/mnt") in namespaces} - found
        if not more:
            return found - ours
        found |= more
for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
    pids = leftovers()
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline and pids & set(processes()):
        time.sleep(0.1)
left = leftovers()
if left:
    sys.exit(f"error: still running after SIGKILL: {sorted(left)}")
EOF
}

down() {
  [[ -d "$dir" ]] || return 0
  dir="$(cd "$dir" && pwd -P)"  # physical, as /proc shows paths
  local pid pids=() failed=0
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
  kill_leftovers || failed=1
  # Unmount everything under DIR, deepest first (squashfuse mounts too); lazily if busy.
  local mnt mounts
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v d="$dir" '{ m = $5; gsub(/\\040/, " ", m) }
      m == d || index(m, d "/") == 1 { print gsub("/", "/", m) "\t" m }' /proc/self/mountinfo | sort -rn | cut -f2-)
    ((${#mounts[@]})) || break
    for mnt in "${mounts[@]}"; do umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; done
  done
  restore_fuse
  # --one-file-system: never delete into a mount that could not be removed.
  rm -rf --one-file-system "$dir" || failed=1
  if ((failed)); then echo "error: $dir not fully stopped, unmounted and removed" >&2; return 1; fi
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
