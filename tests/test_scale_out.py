"""Scale-out on a real Ray cluster: two raylets on this machine stand in for two GPU nodes, each offering one
`sdg_node` slot and so running its own real llama.cpp server. Faults are real too: SIGKILL of a worker, of the
driver, of a server. Only the HTTP-error test uses the (named) simulator, because no real server fails on cue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from sdg_job.serve import Server
from sdg_job.simulator import simulator_spec
from sdg_job.supervise import processes_with_env
from tests.conftest import TWO_SERVERS, read_jsonl, run_cli, start_cli, wait_for

pytestmark = pytest.mark.e2e
# Two servers share this machine's cores: one thread each, or llama.cpp's spinning threads starve each other.
# Short answers keep it fast; the cut ones are kept (the truncation gate is not what these tests are about).
# Four shards of 5: both nodes get work and a fault mid-run still finds shards in flight.
N = 20
ARGS = ("run", "recipe=tiny", f"num_records={N}", "generation.shard_size=5", "serve.threads=1",
        "models.text.inference_parameters.max_tokens=48", "generation.keep_truncated=true")  # fmt: skip


# Every process of this module's Ray clusters (raylets, workers, the servers they start) inherits this marker:
# `pids` finds this module's processes only, whatever another test runs beside it.
MARKER = ("SDG_TEST_SCALE_OUT", str(os.getpid()))


@pytest.fixture(scope="module", autouse=True)
def marked():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*MARKER)
        yield


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"sdg_node": 1}})
    cluster.add_node(num_cpus=1, resources={"sdg_node": 1})
    cluster.wait_for_nodes()
    yield {"RAY_ADDRESS": cluster.address}
    cluster.shutdown()


def committed(out_dir: Path) -> list[Path]:
    return sorted((out_dir / ".tiny.run" / "shards").glob("shard-*.json"))


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    ours = processes_with_env(*MARKER)
    return [int(p) for p in out.split() if int(p) in ours]


def assert_exactly_n_unique(out_dir: Path, n: int = N) -> dict:
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == n
    assert len({json.dumps(r, sort_keys=True) for r in records}) == n
    manifest = json.loads((out_dir / "tiny.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == n
    assert sum(s["valid"] for s in manifest["shards"]) >= n
    return manifest


def kill_mid_run(env: dict[str, str], out_dir: Path, victim_pattern: str, what: str,
                 sig: signal.Signals = signal.SIGKILL, after=committed, *extra: str) -> dict:  # fmt: skip
    """Once `after(out_dir)` (default: the first shard is committed), send `sig` to a process matching
    `victim_pattern`; the run must still end with exactly N unique records. Returns the manifest."""
    proc = start_cli(*ARGS, *extra, out_dir=out_dir, env=env)
    wait_for(lambda: after(out_dir), what=f"{after.__name__} before the fault")
    victim = wait_for(lambda: pids(victim_pattern), timeout=120, what=what)[0]
    os.kill(victim, sig)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return assert_exactly_n_unique(out_dir)


def test_shards_run_on_both_nodes_against_their_own_server_and_a_killed_worker_is_retried(two_nodes, out_dir) -> None:
    """Node-local routing on two nodes, each with its own server, in a run that also loses a shard worker (SIGKILL):
    its shard is retried, again on a node against that node's server, without loss or duplicates."""
    manifest = kill_mid_run(two_nodes, out_dir, "ray::shard_task", "a running shard worker")
    assert manifest["retries"] >= 1 and manifest["failures"][0]["shard"].startswith("shard-")
    servers = {s["endpoint"]: s["node_id"] for s in manifest["servers"]}
    assert len(servers) == 2 and len(set(servers.values())) == 2
    assert len(manifest["shards"]) >= 4
    for shard in manifest["shards"]:
        assert servers[shard["endpoint"]] == shard["node_id"], shard  # node-local routing
    assert {s["node_id"] for s in manifest["shards"]} == set(servers.values())  # both nodes did work
    logs = list((out_dir / ".tiny.run" / "logs").glob("server-*.log"))
    assert len(logs) == 2 and all("print_timing" in log.read_text() for log in logs)  # both servers answered


def test_killed_driver_resumes_and_skips_finished_shards(two_nodes, out_dir: Path) -> None:
    proc = start_cli(*ARGS, out_dir=out_dir, env=two_nodes)
    wait_for(lambda: committed(out_dir), what="the first committed shard")
    proc.kill()
    proc.communicate(timeout=60)
    finished = len(committed(out_dir))
    assert not (out_dir / "tiny.jsonl").exists()
    result = run_cli(*ARGS, out_dir=out_dir, env=two_nodes)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = assert_exactly_n_unique(out_dir)
    assert manifest["shards_skipped_on_resume"] >= finished >= 1


def answered(out_dir: Path) -> bool:
    return any("print_timing" in log.read_text(errors="replace") for log in (out_dir / ".tiny.run" / "logs").glob(
        "server-*.log"))  # fmt: skip


def test_killed_server_is_restarted_and_its_shards_retried(two_nodes, out_dir: Path) -> None:
    # Killed at the first answer, before any shard commits, so both nodes still have work: a server killed
    # after its node's last shard would rightly never be restarted.
    manifest = kill_mid_run(two_nodes, out_dir, "llama-server.*smollm2", "a llama-server", signal.SIGKILL, answered)
    assert manifest["server_restarts"] >= 1


def test_hung_server_is_restarted_and_the_run_completes(two_nodes, out_dir: Path) -> None:
    # SIGSTOP: the process lives on but answers nothing, like a deadlocked engine. Frozen at its first answer,
    # long before its node's shards are done, so the run cannot end without the watchdog restarting it.
    manifest = kill_mid_run(two_nodes, out_dir, "llama-server.*smollm2", "a llama-server", signal.SIGSTOP, answered,
                            "serve.hang_timeout_s=10")  # fmt: skip
    assert manifest["server_restarts"] >= 1


def test_a_node_checking_its_server_takes_no_shards_and_does_not_hold_up_the_driver(two_nodes, tmp_path) -> None:
    """After a failed shard the driver asks that node's actor to check its server, then goes on at once: a restart
    can take minutes (vLLM loading weights) and the other nodes keep getting shards meanwhile. The SIMULATED
    server here, for its slow start-up (--startup-s)."""
    import ray

    from sdg_job.cluster import Node, NodeServer
    from sdg_job.endpoints import Endpoint, Routes

    ray.init(address=two_nodes["RAY_ADDRESS"])
    try:
        actor = NodeServer.remote({"sim": simulator_spec(extra_args=["--startup-s", "6"])}, str(tmp_path))
        (info,) = infos = ray.get(actor.start.remote())
        sim = Endpoint(url=info["endpoint"], api_key_env=None, served_model="simulated", max_parallel_requests=1)
        node = Node(Routes(by_alias={}, own={"sim": sim}), 1, actor, info["node_id"], info=infos)
        server = f"sdg_job.simulator .*--port {info['endpoint'].removesuffix('/v1').rsplit(':', 1)[1]} "
        os.kill(pids(server)[0], signal.SIGKILL)
        wait_for(lambda: not pids(server), timeout=30, what="the killed server to exit")  # kill() does not wait
        started = time.monotonic()
        node.recover(RuntimeError("a shard failed"))
        assert time.monotonic() - started < 1 and not node.accepts()
        wait_for(lambda: (node.watch(), node.accepts())[1], timeout=120, what="the restarted server")
        assert time.monotonic() - started >= 6 and info["restarts"] == 1
    finally:
        ray.shutdown()


def test_lost_node_is_taken_out_of_service_and_the_job_finishes_on_the_other(out_dir: Path) -> None:
    """A whole node dies mid-run (raylet, workers, server: SIGKILL), as when a GPU node fails. Its own cluster,
    so the other tests keep two nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"sdg_node": 1}})
    doomed = cluster.add_node(num_cpus=1, resources={"sdg_node": 1})
    cluster.wait_for_nodes()
    try:
        proc = start_cli(*ARGS, out_dir=out_dir, env={"RAY_ADDRESS": cluster.address, "SDG_EXPECTED_NODES": "2"})
        wait_for(lambda: answered(out_dir), what="the first answer")  # every shard in flight, none committed
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        manifest = assert_exactly_n_unique(out_dir)
    finally:
        cluster.shutdown()
    assert {s["node_id"] for s in manifest["servers"] if s.get("lost")} == {doomed.node_id}
    assert manifest["retries"] >= 1
    assert doomed.node_id not in {s["node_id"] for s in manifest["shards"]}  # its shards were retried elsewhere


def test_http_errors_are_counted_and_topped_up(out_dir: Path, tmp_path: Path) -> None:
    """SIMULATED server (sdg_job.simulator) failing 10% of requests each with HTTP 500, 429 and 400."""
    faults = ["--fail-500", "0.1", "--fail-429", "0.1", "--fail-400", "0.1"]
    with Server(simulator_spec(seconds_per_token=0.0002, extra_args=faults), tmp_path / "sim.log") as sim:
        # 40 records (80 requests): at 10% each, a run without a single 400 or 500 is a 1-in-4,000 draw.
        result = run_cli(*ARGS, "provider=openai", "num_records=40", out_dir=out_dir,
                         env={"OPENAI_BASE_URL": sim.endpoint})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = assert_exactly_n_unique(out_dir, 40)
        stats = httpx.get(sim.url + "/stats").json()
        assert stats["errors"].get("400", 0) >= 1 and stats["errors"].get("500", 0) >= 1
        # 400s are not retryable: those rows are dropped, counted by cause, and replaced by top-up shards
        assert manifest["dropped"]["bad_request"] >= 1 and manifest["request_errors"]["bad_request"] >= 1
        # every attempted row is valid or dropped by reason; a top-up may make a few more valid rows than needed
        assert manifest["attempted"] - sum(manifest["dropped"].values()) >= 40


@pytest.mark.parametrize(
    ("servers", "shares"),
    [
        (["serve.data_parallel_size=2"], "serve: tensor_parallel_size × data_parallel_size: 1 × 2 = 2 GPUs per node"),
        (
            # asker inherits data_parallel_size 8 from the default recipe's serve:, as a server does
            [*TWO_SERVERS, "serve.servers.writer.data_parallel_size=2", "serve.servers.asker.tensor_parallel_size=2"],
            "serve.servers: tensor_parallel_size × data_parallel_size: writer 1 × 2 + asker 2 × 8 = 18 GPUs per node",
        ),
    ],
    ids=["one_server", "two_servers"],
)
def test_a_node_with_too_few_gpus_for_its_servers_stops_the_job_with_both_numbers(
    two_nodes, out_dir: Path, servers: list[str], shares: str
) -> None:
    """Ray would wait forever to place a vLLM server actor asking for GPUs its node lacks (these nodes have none):
    the job says so before starting any server, with each server's share. No vLLM is needed: nothing is started."""
    result = run_cli("run", "recipe=tiny", "serve.engine=vllm", "serve.model=some/model", *servers,
                     out_dir=out_dir, env=two_nodes | {"SDG_EXPECTED_NODES": "2"}, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert shares in result.stderr and "offers 0" in result.stderr, result.stderr[-2000:]
    assert "sdg_node" in result.stderr and "Traceback" not in result.stderr  # the Ray resources seen are named
    assert not list(out_dir.glob("*.jsonl"))
