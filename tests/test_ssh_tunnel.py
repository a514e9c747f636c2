"""Submitting from a laptop through NeMo-Run's SSH tunnel, for real. The "laptop" is this test's launcher process: its
environment knows neither the cluster (no SLURM_CONF) nor the secret. The "login node" is a real OpenSSH server on
loopback (scripts/sshd-test.sh) whose sessions alone know both: sshd sets SLURM_CONF in them (as a site profile would)
and `ssh.pre_command` exports the secret from a mode-600 KEY=VALUE file on that side. NeMo-Run connects with paramiko
(key auth), copies the experiment with rsync over `ssh` (strict host key checking against the test's known_hosts;
nothing of ~/.ssh is read or written), and runs sbatch in the SSH session, for the two-node test Slurm cluster
(scripts/slurm-test-cluster.sh) with `container: none`, as tests/test_slurm.py does without the tunnel."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sdg_job.supervise import processes_with_env, start_time
from tests.conftest import REPO, all_files, text_of, wait_for
from tests.test_launch import everything_written
from tests.test_slurm import (
    CLUSTER_SCRIPT,
    ENDED,
    JOB,
    assert_exactly_n_unique_from_both_nodes,
    cluster_profile,
    job_state,
    slurm_logs,
)

pytestmark = pytest.mark.e2e
SSHD_SCRIPT = REPO / "scripts" / "sshd-test.sh"
SECRET_NAME = "NVIDIA_API_KEY"
SECRET = "nvapi-SENTINEL-ssh-tunnel-0123456789"


def clean_env() -> dict[str, str]:
    """This process's environment without anything of a Slurm job, sdg-job, Ray, or the secret."""
    drop = ("SLURM_", "SDG_", "RAY_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != SECRET_NAME}


def environ(pid: int) -> tuple[dict[str, str], bool]:
    """The variables /proc/<pid>/environ shows, and whether that is still the whole environment the process
    started with: one that renames itself through setproctitle (Ray's agents: ray::DashboardAgent) writes its title
    over the start of that memory, and only a tail of the environment is left there."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}, False
    items = raw.split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item), b"=" in items[0]


def job_processes(job_id: str, slurm_conf: Path) -> dict[int, tuple[str, dict[str, str] | None]]:
    """The live processes (pid → cmdline, environment or None if no longer whole) of this cluster's job `job_id`.
    Job ids start at 1 on every test cluster, and another may run beside this one: the job's environment names its
    cluster's SLURM_CONF."""
    found = {pid: (cmdline, *environ(pid)) for pid, cmdline in processes_with_env("SLURM_JOB_ID", job_id).items()}
    return {
        pid: (cmd, penv if whole else None)
        for pid, (cmd, penv, whole) in found.items()
        if penv.get("SLURM_CONF") == str(slurm_conf)
    }


def descendants(pid: int) -> set[int]:
    """`pid` and every live process below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        children = {child for child, ppid in parents.items() if ppid == parent} - found
        found |= children
        todo += children
    return found


def ssh_dir_state() -> list[tuple[str, int, int]] | None:
    """What ~/.ssh holds (name, size, mtime), or None if there is none: the test must leave it as it was."""
    home = Path.home() / ".ssh"
    if not home.exists():
        return None
    return sorted((str(p.relative_to(home)), p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A fresh two-node Slurm cluster for this module (its slurm.conf), stopped (by pid) and wiped at the end."""
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(state), "2"], capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    assert up.returncode == 0, f"the test Slurm cluster did not start (installing it needs root):\n{up.stderr}"
    yield state / "slurm.conf"
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], timeout=120)


@pytest.fixture(scope="module")
def login_node(tmp_path_factory, cluster: Path) -> dict[str, str]:
    """A real sshd on a free loopback port, its sessions pointed at the cluster; the user's secrets file on its side.
    At the end: sshd and every session of it are gone, and ~/.ssh is as it was."""
    ssh_before = ssh_dir_state()
    sshd_dir = tmp_path_factory.mktemp("sshd") / "sshd"
    up = subprocess.run(["bash", str(SSHD_SCRIPT), "up", str(sshd_dir), f"SLURM_CONF={cluster}"], capture_output=True,
                        text=True, timeout=600)  # fmt: skip
    assert up.returncode == 0, f"the test sshd did not start (installing it needs root):\n{up.stderr}"
    info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    secrets = tmp_path_factory.mktemp("login") / "sdg_secrets.env"
    secrets.touch(mode=0o600)
    secrets.write_text(f"{SECRET_NAME}={SECRET}\n")
    yield info | {"dir": str(sshd_dir), "secrets": str(secrets)}
    pid = int(info["pid"])
    tree = descendants(pid)  # the listener and any session still open
    down = subprocess.run(["bash", str(SSHD_SCRIPT), "down", str(sshd_dir)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not [p for p in tree if start_time(p) is not None], f"sshd {pid} or a session of it outlived `down`"
    assert not sshd_dir.exists()
    assert ssh_dir_state() == ssh_before, "~/.ssh changed"


def laptop(tmp_path: Path, login_node: dict[str, str], bin_dir: str | None = None) -> tuple[Path, dict[str, str]]:
    """A home of its own with the client key in ~/.ssh (the profile names it `~/.ssh/id_ed25519`, as the example
    does), NeMo-Run's home in it, and rsync's `ssh` first on PATH (it trusts only the test sshd's host key; OpenSSH
    reads the passwd entry's home, not $HOME, so the real ~/.ssh stays out of it either way)."""
    home = tmp_path / "laptop"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    key = home / ".ssh" / "id_ed25519"
    key.touch(mode=0o600)
    key.write_bytes(Path(login_node["identity"]).read_bytes())
    env = clean_env() | {"HOME": str(home), "NEMORUN_HOME": str(home / "nemorun")}
    env["PATH"] = f"{bin_dir or login_node['bin']}:{env['PATH']}"
    return home, env


def launch_over_ssh(home: Path, env: dict[str, str], profile: str, *args: str) -> subprocess.CompletedProcess:
    """The launcher, in a session of its own: on a timeout it goes with everything it started (rsync, ssh)."""
    (home / "profile.yaml").write_text(profile)
    argv = [sys.executable, str(REPO / "launch" / "run.py"), "--executor", "slurm", "--profile", "profile.yaml"]
    with subprocess.Popen([*argv, *args], cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"the launcher took over 300 s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tunnel_profile(job_dir: Path, login_node: dict[str, str]) -> str:
    """The test cluster's profile, reached through the login node: the installation and the secret are on its side."""
    ssh = {
        "host": login_node["host"],
        "port": int(login_node["port"]),
        "user": login_node["user"],
        "identity": "~/.ssh/id_ed25519",
        "pre_command": f"set -a && . {login_node['secrets']} && set +a",
    }
    return cluster_profile(venv=sys.prefix, job_dir=job_dir, tunnel="ssh", ssh=ssh, secrets=[SECRET_NAME])


def test_a_laptop_submits_through_the_ssh_tunnel(cluster: Path, login_node: dict[str, str], tmp_path: Path) -> None:
    job_dir = tmp_path / "cluster"
    home, env = laptop(tmp_path, login_node)
    assert "SLURM_CONF" not in env and SECRET not in "".join(env.values())
    profile = tunnel_profile(job_dir, login_node)
    slurm = clean_env() | {"SLURM_CONF": str(cluster)}  # for this test's own look at the cluster

    started = time.monotonic()
    result = launch_over_ssh(home, env, profile, *JOB)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    job_id = re.search(r"Job id: (\d+)", result.stdout).group(1)
    submitted = time.monotonic() - started

    # The secret reached the job: every process of it seen while it runs carries the value, on both Slurm nodes,
    # the Ray workers that run the shards (where a hosted provider's key is used) included.
    # pid → (latest cmdline: a Ray worker names itself once started; its environment as first read intact).
    seen: dict[int, tuple[str, dict[str, str]]] = {}
    unread: dict[int, str] = {}  # renamed before this test could read its environment: judged by the others

    def watch_until_ended() -> dict[str, str] | None:
        for pid, (cmd, penv) in job_processes(job_id, cluster).items():
            if pid in seen:
                seen[pid] = (cmd, seen[pid][1])
            elif penv is not None:
                seen[pid] = (cmd, penv)
            else:
                unread[pid] = cmd
        state = job_state(slurm, job_id)
        return state if state["JobState"] in ENDED else None

    state = wait_for(watch_until_ended, 600, f"job {job_id} to end")
    without = {pid: cmd for pid, (cmd, penv) in seen.items() if penv.get(SECRET_NAME) != SECRET}
    assert not without, f"processes of the job without ${SECRET_NAME}: {without}"
    assert all(cmd.startswith("ray::") for cmd in unread.values()), unread
    ray_workers = {penv.get("SLURMD_NODENAME") for cmd, penv in seen.values() if cmd.startswith("ray::")}
    assert ray_workers == {"n1", "n2"}, seen
    assert any("sdg_job run" in cmd and penv.get("SLURMD_NODENAME") == "n1" for cmd, penv in seen.values()), seen
    (run_dir,) = {p.parent.parent for p in job_dir.rglob("sdg/tiny.jsonl")}
    driver_log = (run_dir / "logs" / "driver.log").read_text()
    assert state["JobState"] == "COMPLETED", driver_log[-3000:] + slurm_logs(slurm, job_id)
    manifest = assert_exactly_n_unique_from_both_nodes(run_dir)
    assert "driver exited with 0" in next(run_dir.glob("sbatch_*.out")).read_text()
    per_node = sorted(Counter(penv.get("SLURMD_NODENAME") for _, penv in seen.values()).items())
    print(f"launcher {submitted:.1f}s; sbatch to done {time.monotonic() - started:.1f}s; driver timings "
          f"{manifest['timings_s']}; job processes seen with ${SECRET_NAME} (per node): {per_node}")  # fmt: skip

    # The same layout on the cluster as without the tunnel: job_dir/experiments/<title>/<id>/<task>/. NeMo-Run's
    # experiment is on the laptop, under its home, and was copied there; the job's output only on the cluster side.
    assert run_dir.relative_to(job_dir).parts[:2] == ("experiments", "sdg-tiny") and run_dir.name == "sdg-tiny"
    (local_exp,) = (home / "nemorun" / "experiments" / "sdg-tiny").iterdir()
    assert local_exp.name == run_dir.parent.name
    assert (local_exp / "sdg-tiny_sbatch.sh").read_text() == (run_dir.parent / "sdg-tiny_sbatch.sh").read_text()
    assert not list(local_exp.rglob("tiny.jsonl"))
    assert f"job dir: {login_node['user']}@{login_node['host']}:{run_dir}" in result.stdout
    sshd_log = Path(login_node["dir"], "sshd.log").read_text()
    assert f"Accepted publickey for {login_node['user']} from 127.0.0.1" in sshd_log

    # The secret travelled by name: in no file on either side but its own: the laptop and the cluster's job dir
    # (NeMo-Run's encoded blobs decoded too), the cluster's logs and spool, the login node's sshd, Ray's session.
    # Slurm itself keeps a job's submit environment (--export=ALL) in slurmctld's StateSaveLocation until it purges
    # the job (MinJobAge): that copy, readable by SlurmUser only, is how the value reaches the nodes.
    assert SECRET not in everything_written(tmp_path)
    slurm_copy = set(cluster.parent.glob(f"state/hash.*/job.{job_id}/environment"))
    ray_sessions = [d for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= time.time() - 3600]
    assert ray_sessions, "no Ray session of the job found in /tmp/ray"
    for root in [tmp_path, cluster.parent, Path(login_node["dir"]), *ray_sessions]:
        leaks = [p for p in all_files(root) if SECRET in text_of(p) and p not in slurm_copy]
        assert not leaks, leaks
    # Nothing of the job is left: Slurm ended the Ray steps, and every server. The sentinel marks every process of the
    # job as well (this test's own environment lacks it), whatever else a process's environment lost.
    assert not job_processes(job_id, cluster) and not processes_with_env(SECRET_NAME, SECRET)


def test_an_unknown_login_node_host_key_stops_the_launch_cleanly(
    cluster: Path, login_node: dict[str, str], tmp_path: Path
) -> None:
    """rsync's ssh checks the host key strictly (paramiko does not): with the login node's key unknown, the launcher
    says so and what to do, without NeMo-Run's traceback, and submits nothing."""
    strict = tmp_path / "strict"
    (strict / "bin").mkdir(parents=True)
    (strict / "known_hosts").touch()  # knows no host
    config = Path(login_node["dir"], "ssh_config").read_text()
    (strict / "ssh_config").write_text(re.sub(r"UserKnownHostsFile .*", f"UserKnownHostsFile {strict}/known_hosts",
                                              config))  # fmt: skip
    (strict / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {strict}/ssh_config "$@"\n')
    (strict / "bin" / "ssh").chmod(0o755)
    home, env = laptop(tmp_path, login_node, bin_dir=str(strict / "bin"))
    profile = tunnel_profile(tmp_path / "cluster", login_node)
    result = launch_over_ssh(home, env, profile, *JOB)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Host key verification failed" in result.stderr and "known_hosts" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Job id" not in result.stdout
    assert not list((tmp_path / "cluster").rglob("*_sbatch.sh"))  # the experiment never reached the cluster


SSH_PROFILE = """
slurm:
  account: test
  partition: debug
  container: none
  venv: ~/sdg-job/.venv
  job_dir: {job_dir}
  tunnel: ssh
  ssh: {{host: login.example.com, port: 2222, user: me, identity: ~/.ssh/id_ed25519}}
"""


def offline_laptop(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "laptop"
    home.mkdir()
    return home, clean_env() | {"HOME": str(home), "NEMORUN_HOME": str(home / "nemorun")}


def test_ssh_dry_run_writes_cluster_paths_and_keeps_the_experiment_here(tmp_path: Path) -> None:
    home, env = offline_laptop(tmp_path)
    cluster_dir = tmp_path / "cluster-side"
    result = launch_over_ssh(home, env, SSH_PROFILE.format(job_dir=cluster_dir), "--dryrun", "recipe=tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    (script,) = (home / "nemorun" / "experiments" / "sdg-tiny").rglob("*_sbatch.sh")  # this machine's NeMo-Run home
    text = script.read_text()
    # On the cluster, the layout of the LocalTunnel: job_dir/experiments/<title>/<id>/<task>/.
    assert f"#SBATCH --output={cluster_dir}/experiments/sdg-tiny/{script.parent.name}/sdg-tiny/sbatch_" in text
    assert 'export PATH="$HOME/sdg-job/.venv/bin:$PATH"' in text  # the cluster's home, not this machine's
    assert not cluster_dir.exists()  # nothing of the cluster's side is made here


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("slurm.job_dir=relative/runs", "absolute slurm.job_dir"),
        ("slurm.job_dir=~/runs", "absolute slurm.job_dir"),
        ("slurm.venv=null", "needs slurm.venv"),
        ("slurm.ssh.port=0", "slurm.ssh.port"),
    ],
)
def test_ssh_profile_mistakes_exit_2_before_anything_is_made(override: str, message: str, tmp_path: Path) -> None:
    home, env = offline_laptop(tmp_path)
    profile = SSH_PROFILE.format(job_dir=tmp_path / "cluster-side")
    result = launch_over_ssh(home, env, profile, "--dryrun", "recipe=tiny", override)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (home / "nemorun").exists()


def test_a_missing_identity_exits_2_before_anything_is_made(tmp_path: Path) -> None:
    home, env = offline_laptop(tmp_path)  # no ~/.ssh/id_ed25519 in it
    result = launch_over_ssh(home, env, SSH_PROFILE.format(job_dir=tmp_path / "cluster-side"), "recipe=tiny")
    assert result.returncode == 2 and "slurm.ssh.identity: ~/.ssh/id_ed25519: no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (home / "nemorun").exists()
