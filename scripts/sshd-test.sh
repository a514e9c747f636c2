#!/usr/bin/env bash
# A real OpenSSH server on loopback, standing in for a cluster's login node: the project's tests submit through
# NeMo-Run's SSH tunnel to it, and you can try `slurm.tunnel: ssh` against this machine with it. Nothing of ~/.ssh is
# read or written: host key, client key pair, authorized_keys, known_hosts, sshd_config, pidfile and log live in DIR.
#
#   scripts/sshd-test.sh up DIR [NAME=VALUE …]   start sshd on a free 127.0.0.1 port (installs openssh-server and
#                                                rsync if missing: apt, needs root). NAME=VALUE are set in every
#                                                session (sshd's SetEnv), as a login node's site profile sets them
#   scripts/sshd-test.sh down DIR                stop it by pid, with its sessions, and wipe DIR
#
# `up` prints what a client needs, one KEY=VALUE a line: host, port, user, identity (the client's private key),
# known_hosts, and bin, a directory to put first on PATH: its `ssh` reads only DIR's ssh_config, which trusts this
# server's host key alone (StrictHostKeyChecking yes, DIR/known_hosts). NeMo-Run needs it: it copies the experiment
# with rsync, which runs `ssh` from PATH, while its own connection (paramiko, through fabric) accepts any host key and
# keeps it in memory only (fabric's AutoAddPolicy; no known_hosts is read or written).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 up DIR [NAME=VALUE …] | down DIR" >&2; exit 2; }
shift 2

sshd_bin() { command -v sshd || echo /usr/sbin/sshd; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pid and every process below it (sshd's per-connection processes and what runs in each session).
tree() {
  local pid="$1" child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do tree "$child"; done
}

alive() { [[ -d /proc/$1 && "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

up() {
  PATH="$PATH:/usr/sbin:/sbin" "$(dirname "$0")/install-debian-packages.sh" "sshd ssh ssh-keygen rsync" \
    openssh-server openssh-client rsync
  [[ -e "$dir/sshd.pid" ]] && down
  mkdir -p "$dir/bin"
  dir="$(cd "$dir" && pwd)"
  chmod 700 "$dir"
  local user port sshd
  user="$(id -un)"
  sshd="$(sshd_bin)"
  if [[ ! -d /run/sshd ]]; then  # sshd's privilege separation directory (Debian makes it only in its init scripts)
    mkdir -p /run/sshd 2>/dev/null && chmod 755 /run/sshd || { echo "error: /run/sshd is missing (needs root)" >&2; exit 1; }
  fi
  ssh-keygen -q -t ed25519 -N '' -C sdg-test-host -f "$dir/host_ed25519_key"
  ssh-keygen -q -t ed25519 -N '' -C sdg-test-client -f "$dir/key"
  # restrict: no forwarding of any kind, no pty, no ~/.ssh/rc; commands (NeMo-Run's) and rsync still run.
  echo "restrict $(cat "$dir/key.pub")" >"$dir/authorized_keys"
  chmod 600 "$dir/authorized_keys"

  for _ in 1 2 3 4 5; do  # a port picked free may be taken before sshd binds it: try another
    port="$(free_port)"
    {
      echo "Port $port"
      echo "ListenAddress 127.0.0.1"
      echo "HostKey $dir/host_ed25519_key"
      echo "PidFile $dir/sshd.pid"
      echo "AuthorizedKeysFile $dir/authorized_keys"
      echo "AllowUsers $user"
      echo "AuthenticationMethods publickey"
      echo "PubkeyAuthentication yes"
      echo "PasswordAuthentication no"
      echo "KbdInteractiveAuthentication no"
      echo "PermitRootLogin prohibit-password"
      echo "UsePAM no"
      # DIR lives under a world-writable /tmp, which sshd's ownership checks of the key file's parents refuse.
      echo "StrictModes no"
      echo "PermitUserEnvironment no"
      echo "AllowTcpForwarding no"
      echo "AllowAgentForwarding no"
      echo "X11Forwarding no"
      echo "PrintMotd no"
      echo "PrintLastLog no"
      echo "Subsystem sftp internal-sftp"
      echo "LogLevel VERBOSE"
      for kv in "$@"; do
        [[ "$kv" == *=* ]] || { echo "error: $kv is not NAME=VALUE" >&2; exit 2; }
        echo "SetEnv \"$kv\""
      done
    } >"$dir/sshd_config"
    "$sshd" -t -f "$dir/sshd_config"
    rm -f "$dir/sshd.pid"
    "$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log"  # daemonizes; the listener's pid lands in DIR/sshd.pid
    for _ in $(seq 1 50); do
      [[ -s "$dir/sshd.pid" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    [[ -s "$dir/sshd.pid" ]] && break
    echo "sshd did not start on port $port; trying another" >&2
  done
  [[ -s "$dir/sshd.pid" ]] || { echo "error: sshd did not start; see $dir/sshd.log" >&2; cat "$dir/sshd.log" >&2; exit 1; }

  # The client side: this server's host key as the only one known, and an `ssh` that reads nothing from ~/.ssh.
  local hostkey
  hostkey="$(cut -d' ' -f1-2 "$dir/host_ed25519_key.pub")"
  printf '[127.0.0.1]:%s %s\n[localhost]:%s %s\n' "$port" "$hostkey" "$port" "$hostkey" >"$dir/known_hosts"
  cat >"$dir/ssh_config" <<EOF
Host *
  UserKnownHostsFile $dir/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  CheckHostIP no
  HashKnownHosts no
  BatchMode yes
  IdentityFile $dir/key
  IdentitiesOnly yes
  IdentityAgent none
  ControlMaster no
  ControlPath none
  LogLevel ERROR
EOF
  cat >"$dir/bin/ssh" <<EOF
#!/bin/sh
# ssh trusting only the test sshd's host key ($dir/known_hosts); reads no ~/.ssh/config or known_hosts.
exec $(command -v ssh) -F $dir/ssh_config "\$@"
EOF
  chmod 755 "$dir/bin/ssh"
  # A real login and command, strict host key checking on: what NeMo-Run's rsync will do.
  if ! "$dir/bin/ssh" -p "$port" "$user@127.0.0.1" true; then
    echo "error: cannot log in to the test sshd; see $dir/sshd.log" >&2
    tail -20 "$dir/sshd.log" >&2
    down
    exit 1
  fi
  echo "host=127.0.0.1"
  echo "port=$port"
  echo "user=$user"
  echo "identity=$dir/key"
  echo "known_hosts=$dir/known_hosts"
  echo "bin=$dir/bin"
  echo "pid=$(cat "$dir/sshd.pid")"
}

down() {
  local pid pids=()
  if [[ -s "$dir/sshd.pid" ]]; then
    pid="$(cat "$dir/sshd.pid")"
    # Only if that pid is still our sshd (a stale pidfile's number may belong to someone else by now).
    if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/sshd_config"; then
      mapfile -t pids < <(tree "$pid")
    fi
  fi
  # The listener first (no new sessions), then the sessions: each lives on in its own process when the listener goes.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do  # up to 5 s, then SIGKILL
    local any=0
    for pid in "${pids[@]}"; do alive "$pid" && any=1; done
    ((any)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}

case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  *) echo "usage: $0 up DIR [NAME=VALUE …] | down DIR" >&2; exit 2 ;;
esac
