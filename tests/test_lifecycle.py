"""How a run begins and ends: one driver per run dir (the lease), SIGTERM as a clean interruption that the same
command resumes, and no process of the job left behind after any end. End to end on the real CLI, the real
llama.cpp server and a local Ray (no RAY_ADDRESS: the case where Ray's agents outlived a killed driver)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sdg_job import lease as lease_mod
from sdg_job.errors import RecipeError
from sdg_job.lease import EXPIRY_S, LEASE_FILE, Lease, stale_reason
from sdg_job.status import STATUS_FILE
from sdg_job.supervise import processes_with_env
from tests.conftest import mtimes, read_jsonl, run_cli, shard_summary, start_cli, wait_for

# Long enough to signal mid-run: 8 shards of 3 records, two in flight at a time.
N = 24
# Short answers keep it fast; the cut ones are kept (the truncation gate is not what these tests are about).
ARGS = ("run", "recipe=tiny", f"num_records={N}", "generation.shard_size=3", "generation.workers_per_node=2",
        "models.text.inference_parameters.max_tokens=48", "generation.keep_truncated=true")  # fmt: skip
RUN_DIR = ".tiny.run"


def committed(out_dir: Path) -> list[Path]:
    return sorted((out_dir / RUN_DIR / "shards").glob("shard-*.json"))


def manifest_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "tiny.manifest.json").read_text())


def assert_exactly_n_unique(out_dir: Path) -> dict:
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == N
    assert len({json.dumps(r, sort_keys=True) for r in records}) == N
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "complete" and manifest["records"] == N
    return manifest


def job_processes(marker: str) -> dict[int, str]:
    return processes_with_env("SDG_TEST_RUN", marker)


def assert_nothing_left(marker: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while (left := job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    # Each with its state and parent: whether it escaped the supervisor's tree or outlived its signals.
    assert not left, (
        f"still running after {within:.0f}s: { ({pid: (cmd, proc_stat(pid)) for pid, cmd in left.items()}) }"
    )


def proc_stat(pid: int) -> str:
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return "gone"
    return f"state {state}, parent {parent}"


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- the lease, on its own


def write_lease(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": "elsewhere", "pid": 1, "token": "t", "heartbeat_at": time.time(), **fields}
    (run_dir / LEASE_FILE).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_lease_of_another_driver_refuses_the_run_dir_naming_host_and_pid(tmp_path: Path) -> None:
    write_lease(tmp_path, host="gpu-node-7", pid=4242)
    before = (tmp_path / LEASE_FILE).read_text()
    with pytest.raises(RecipeError) as refused:
        Lease(tmp_path).acquire()
    assert "gpu-node-7" in str(refused.value) and "4242" in str(refused.value)
    assert refused.value.exit_code == 2
    assert (tmp_path / LEASE_FILE).read_text() == before and os.listdir(tmp_path) == [LEASE_FILE]


def test_drivers_starting_at_the_same_moment_get_one_lease_between_them(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def take(_: int) -> Lease | None:
        try:
            return Lease(tmp_path).acquire()
        except RecipeError:
            return None

    for stale in (False, True):  # a free run dir, then one whose holder stopped beating long ago
        if stale:
            write_lease(tmp_path, heartbeat_at=time.time() - EXPIRY_S - 1)
        with ThreadPoolExecutor(8) as pool:
            won = [lease for lease in pool.map(take, range(8)) if lease is not None]
        assert len(won) == 1
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == won[0].token
        won[0].release()
        assert os.listdir(tmp_path) == []  # no temp file left either


def _take_at(args: tuple[str, float]) -> str | None:
    """A driver process: wait for the common start instant, then try to take the run dir's lease."""
    run_dir, start = args
    while time.time() < start:
        pass
    try:
        lease = Lease(Path(run_dir)).acquire(wait_releasing_s=0)
    except RecipeError:
        return None
    assert lease is not None
    lease._stop.set()  # no heartbeat thread racing the next round
    return lease.token


def test_processes_taking_over_one_stale_lease_at_once_leave_exactly_one_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight driver processes released at one instant onto a stale lease, 100 times, on a file system as slow as
    shared storage (each link, rename and replace takes up to 2 ms): each time exactly one holds the run dir, and
    the lease on disk is that one's."""
    from multiprocessing import get_context
    from random import SystemRandom

    def slow(call):
        return lambda *a, **k: (time.sleep(SystemRandom().uniform(0, 0.002)), call(*a, **k))[1]

    for name in ("link", "rename", "replace"):
        monkeypatch.setattr(os, name, slow(getattr(os, name)))
    with get_context("fork").Pool(8) as pool:
        for round_ in range(100):
            run_dir = tmp_path / str(round_)
            write_lease(run_dir, heartbeat_at=0)
            won = [t for t in pool.map(_take_at, [(str(run_dir), time.time() + 0.05)] * 8) if t]
            assert len(won) == 1, f"round {round_}: {len(won)} drivers hold the run dir"
            assert json.loads((run_dir / LEASE_FILE).read_text())["token"] == won[0]
            assert os.listdir(run_dir) == [LEASE_FILE]  # no claim or temp file left


def test_a_takeover_claim_left_by_a_driver_that_died_does_not_block_the_next(tmp_path: Path) -> None:
    write_lease(tmp_path, heartbeat_at=0)
    claim = tmp_path / f".{LEASE_FILE}.takeover.t.0"
    claim.write_text("a driver that died while taking over")
    os.utime(claim, (time.time() - lease_mod.TAKEOVER_STALL_S - 1,) * 2)
    lease = Lease(tmp_path).acquire(wait_releasing_s=0)
    assert lease is not None and json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.token
    lease.release()
    assert os.listdir(tmp_path) == []


def test_a_lease_without_heartbeat_for_the_expiry_is_stale_and_taken_over(tmp_path: Path) -> None:
    write_lease(tmp_path, heartbeat_at=time.time() - EXPIRY_S - 1)
    assert "no heartbeat" in (stale_reason(json.loads((tmp_path / LEASE_FILE).read_text())) or "")
    lease = Lease(tmp_path).acquire()
    assert lease is not None
    try:
        held = json.loads((tmp_path / LEASE_FILE).read_text())
        assert held["token"] == lease.token and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    finally:
        lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_lease_whose_pid_is_gone_from_this_host_is_stale_at_once(tmp_path: Path) -> None:
    pid = dead_pid()
    holder = {"host": socket.gethostname(), "pid": pid, "heartbeat_at": time.time(),
              "pid_namespace": os.readlink("/proc/self/ns/pid")}  # fmt: skip
    assert stale_reason(holder) == f"pid {pid} is gone"
    assert stale_reason({**holder, "pid": os.getpid()}) is None  # alive: live
    assert stale_reason({**holder, "host": "elsewhere"}) is None  # another host's pid says nothing here


def test_an_earlier_incarnation_of_a_requeued_slurm_job_is_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    holder = {"host": "elsewhere", "pid": 1, "heartbeat_at": time.time(), "slurm_job_id": "77",
              "slurm_restart_count": None}  # fmt: skip
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "requeued" in (stale_reason(holder) or "")
    assert stale_reason({**holder, "slurm_restart_count": "1"}) is None
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    assert stale_reason(holder) is None


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.1)
    lease = Lease(tmp_path).acquire()
    assert lease is not None
    first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat_at"]
    wait_for(lambda: json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat_at"] > first, 5, "a heartbeat")
    # A live usurper heartbeats too: a renewal of ours that read the file just before the usurper's first write
    # can replace it once (there is no compare-and-swap on NFS), and the usurper's next heartbeat is then noticed.
    wait_for(lambda: write_lease(tmp_path, host="usurper", pid=99) or lease.lost, 5, "the lost lease")
    assert "usurper" in (lease.lost or "")
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["host"] == "usurper"  # not ours: left alone


def test_fresh_wipes_the_run_dir_but_not_the_lease_of_the_driver_wiping_it(tmp_path: Path) -> None:
    from sdg_job.store import RunStore

    lease = Lease(tmp_path).acquire()
    assert lease is not None
    try:
        store = RunStore(tmp_path)
        store.open("a" * 64, False, "recipe")
        store.commit("shard-00000", [{"x": 1}], shard_summary())
        store.open("b" * 64, True, "recipe", keep=(LEASE_FILE,))
        assert store.load_committed() == {}
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.token
    finally:
        lease.release()


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_a_second_driver_on_the_same_run_dir_is_refused_and_the_first_finishes(out_dir: Path, marker: str) -> None:
    first = start_cli(*ARGS, out_dir=out_dir, env={"SDG_TEST_RUN": marker})
    run_dir = out_dir / RUN_DIR
    wait_for(lambda: committed(out_dir), what="the first driver's first shard")
    holder = json.loads((run_dir / LEASE_FILE).read_text())
    before = mtimes(run_dir)
    second = run_cli(*ARGS, out_dir=out_dir, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"host {holder['host']} pid {holder['pid']}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the holder is still at work
    # The refused driver wrote nothing: what changed meanwhile is the holder's shards, logs, heartbeat, status.
    changed = {p for p, mtime in mtimes(run_dir).items() if before.get(p) != mtime}
    holders = ("shards", "logs", "dd", LEASE_FILE, STATUS_FILE)
    assert all(p.relative_to(run_dir).parts[0] in holders for p in changed), changed
    assert sorted(out_dir.iterdir()) == [run_dir]
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert_exactly_n_unique(out_dir)
    assert not (run_dir / LEASE_FILE).exists()  # released at the end


@pytest.mark.e2e
def test_sigterm_stops_cleanly_keeps_committed_shards_and_the_rerun_resumes_to_exactly_n(
    out_dir: Path, marker: str
) -> None:
    env = {"SDG_TEST_RUN": marker}
    proc = start_cli(*ARGS, out_dir=out_dir, env=env)
    wait_for(lambda: committed(out_dir), what="the first committed shard")
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143, stderr[-3000:]
    assert time.monotonic() - sent < 60
    assert "Traceback" not in stderr and "SIGTERM" in stderr
    manifest = manifest_of(out_dir)
    assert manifest["status"] == "interrupted"
    assert not (out_dir / "tiny.jsonl").exists()
    finished = committed(out_dir)
    assert len(manifest["shards"]) == len(finished) >= 1
    assert not (out_dir / RUN_DIR / LEASE_FILE).exists()
    assert_nothing_left(marker)

    again = run_cli(*ARGS, out_dir=out_dir, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_exactly_n_unique(out_dir)
    assert manifest["shards_skipped_on_resume"] >= len(finished)
    assert_nothing_left(marker)  # after a run that ends done


@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["cli", "driver"])
def test_sigkill_leaves_no_process_of_the_job_and_the_rerun_completes(out_dir: Path, marker: str, victim: str) -> None:
    """SIGKILL of the process the user started (its driver then stops cleanly), or of the driver itself (the
    supervisor ends what it left, and its lease is stale at once: its pid is gone from this host)."""
    env = {"SDG_TEST_RUN": marker}
    proc = start_cli(*ARGS, out_dir=out_dir, env=env)
    wait_for(lambda: committed(out_dir), what="the first committed shard")
    assert any("ray::" in cmd or "raylet" in cmd for cmd in job_processes(marker).values())  # the marker works
    if victim == "cli":
        proc.kill()
    else:
        os.kill(json.loads((out_dir / RUN_DIR / LEASE_FILE).read_text())["pid"], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL if victim == "driver" else proc.returncode == -signal.SIGKILL
    assert_nothing_left(marker, within=15)
    # `status` tells how it ended: the driver stopped cleanly (interrupted), or it died saying nothing (stopped)
    status = json.loads(run_cli("status", str(out_dir), "--json", out_dir=out_dir).stdout)
    assert status["state"] == ("stopped" if victim == "driver" else "interrupted"), status
    assert status["driver"].startswith("not running") and 0 < status["records"] < N
    again = run_cli(*ARGS, out_dir=out_dir, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_n_unique(out_dir)


@pytest.mark.e2e
def test_status_tells_where_a_running_job_stands_and_how_it_ended(out_dir: Path, marker: str) -> None:
    """`python -m sdg_job status` reads the run dir alone (no Ray, no attach): while the job runs, and after."""
    proc = start_cli(*ARGS, out_dir=out_dir, env={"SDG_TEST_RUN": marker})

    def records_so_far() -> int:
        said = run_cli("status", str(out_dir), "--json", out_dir=out_dir)
        return json.loads(said.stdout)["records"] if said.returncode == 0 else 0

    wait_for(records_so_far, what="status to count the first committed shard (written every 2 s)")
    running = run_cli("status", str(out_dir / "tiny.jsonl"), out_dir=out_dir)  # the output file names its run
    assert running.returncode == 0, running.stderr
    said = running.stdout
    assert "state:   running · driver running (host" in said, said
    done_so_far = int(re.search(rf"records: (\d+)/{N} ", said)[1])  # type: ignore[index]
    assert 0 < done_so_far < N, said
    assert re.search(r"rate:    \d+\.\d\d records/s · ETA \d+m\d\ds", said), said
    assert re.search(r"server:  \S+ server llama_cpp http://127\.0\.0\.1:\d+/v1 · restarts 0", said), said
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    ended = json.loads(run_cli("status", str(out_dir / RUN_DIR), "--json", out_dir=out_dir).stdout)
    assert ended["state"] == "complete" and ended["records"] == N and ended["error"] is None
    assert ended["driver"] == "not running" and ended["eta_s"] is None
    nowhere = run_cli("status", str(out_dir / "nothing"), out_dir=out_dir)
    assert nowhere.returncode == 2 and "no run dir here" in nowhere.stderr


@pytest.mark.e2e
def test_sigterm_while_servers_start_exits_143_at_once(out_dir: Path, marker: str) -> None:
    """A vLLM server takes minutes to start: a SIGTERM then must not wait for it. The SIMULATED server here, for
    its slow start-up (--startup-s)."""
    env = {"SDG_TEST_RUN": marker}
    proc = start_cli(*ARGS, "serve.engine=simulator", "serve.extra_args=[--startup-s, '120']", out_dir=out_dir,
                     env=env)  # fmt: skip
    wait_for(lambda: any("sdg_job.simulator" in c for c in job_processes(marker).values()), what="the server start")
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143, stderr[-3000:]
    assert time.monotonic() - sent < 30
    assert manifest_of(out_dir)["status"] == "interrupted"
    assert_nothing_left(marker)


@pytest.mark.parametrize("end", ["exit 3", "SIGKILL"])
def test_the_supervisor_returns_the_drivers_exit_code_and_ends_what_it_left(tmp_path: Path, end: str) -> None:
    """The supervisor on its own, around a stand-in driver that orphans a sleeper (as a killed local Ray driver
    orphans Ray's agents): the sleeper is ended, and a driver killed by a signal gives 128 + signal."""
    orphan = tmp_path / "orphan"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, subprocess, sys\n"
        "pid = subprocess.Popen(['sleep', '300'], start_new_session=True).pid\n"
        f"open({str(orphan)!r}, 'w').write(str(pid))\n"
        "os.kill(os.getpid(), signal.SIGKILL) if sys.argv[1] == 'SIGKILL' else os._exit(3)\n"
    )
    supervisor = "import sys; from sdg_job.supervise import supervise; sys.exit(supervise(sys.argv[1:]))"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", supervisor, sys.executable, str(driver), end.split()[0]],
                            timeout=60)  # fmt: skip
    assert result.returncode == (3 if end == "exit 3" else 128 + signal.SIGKILL)
    pid = int(orphan.read_text())
    assert not Path(f"/proc/{pid}").exists() and time.monotonic() - started < 15
