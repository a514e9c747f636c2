"""Ray: one server actor per node, shard tasks pinned to the node whose server they use.

A node takes part when it offers the custom resource `sdg_node` (`ray start --resources='{"sdg_node": 1}'`);
each server actor claims the whole unit, so there is exactly one per node. The server binds to the node's
loopback, so a shard task must run on its server's node: NodeAffinitySchedulingStrategy does that.
Without RAY_ADDRESS the driver starts a local one-node cluster; with it, it joins. Same code path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sdg_job.config import Recipe, ServeSpec
from sdg_job.endpoints import Endpoint, Routes, route_models
from sdg_job.errors import JobError, RecipeError
from sdg_job.plan import Shard
from sdg_job.serve import API_KEY_ENV, Server, answers_health, describe
from sdg_job.shard import run_shard
from sdg_job.store import RunStore

NODE_RESOURCE = "sdg_node"
log = logging.getLogger("sdg_job")


def connect(run_dir: Path) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one sized to this machine with one node slot."""
    env_vars = {
        "NEMO_TELEMETRY_ENABLED": "false",
        "DATA_DESIGNER_HOME": str(run_dir / "dd_home"),
        "TIKTOKEN_CACHE_DIR": str(run_dir / "dd_home" / "tiktoken"),
    }
    common: dict[str, Any] = dict(runtime_env={"env_vars": env_vars}, log_to_driver=False, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
    else:
        # address="local": a new cluster even if another one runs on this machine (Ray would join that one).
        # Ray says on every start that it chose token auth, its default; a newcomer's first screen needs not.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled")
        )
        ray.init(address="local", num_cpus=os.cpu_count(), resources={NODE_RESOURCE: 1}, include_dashboard=False,
                 **common)  # fmt: skip


def node_slots() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(NODE_RESOURCE, 0) >= 1)


def wait_for_node_slots(expected: int, timeout_s: float) -> int:
    """On a fresh multi-node cluster the workers join a little after the head: wait for all of them, within a bound.
    A node that never joins is left out with a warning (the job goes on with the others, as after losing one)."""
    deadline = time.monotonic() + timeout_s
    while (count := node_slots()) < expected and time.monotonic() < deadline:
        time.sleep(1)
    if count == 0:
        raise JobError(f"no Ray node offers the {NODE_RESOURCE!r} resource after {timeout_s:.0f}s (SDG_WAIT_S); "
                       "each node needs `ray start --resources='{\"sdg_node\": 1}'`")  # fmt: skip
    if count < expected:
        log.warning("only %d of %d node slots joined after %.0fs (SDG_WAIT_S); going on with them", count, expected,
                    timeout_s)  # fmt: skip
    return count


def check_gpus(spec: ServeSpec) -> None:
    """Ray would wait forever to place a server actor that asks for more GPUs than its node has: say so instead."""
    needed = spec.gpus
    if not needed:
        return
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get(NODE_RESOURCE, 0) >= 1 and resources.get("GPU", 0) < needed:
            raise RecipeError(
                "serve",
                "tensor_parallel_size × data_parallel_size",
                f"{spec.tensor_parallel_size} × {spec.data_parallel_size} = {needed} GPUs per server, but node "
                f"{node.get('NodeManagerHostname')} ({node['NodeID'][:8]}) offers {resources.get('GPU', 0):g}; Ray "
                f"resources seen there: {dict(sorted(resources.items()))}. To try the recipe on this machine's CPU "
                "with the embedded model, add layer=cpu",
            )


@ray.remote(num_cpus=0, resources={NODE_RESOURCE: 1}, max_restarts=0)
class NodeServer:
    """Owns the one LLM server of its node: start, health, restart after a crash, stop."""

    def __init__(self, spec: ServeSpec, logs_dir: str):
        self.node_id = ray.get_runtime_context().get_node_id()
        log_path = Path(logs_dir) / f"server-{socket.gethostname()}-{self.node_id[:8]}.log"
        self.server = Server(spec, log_path)

    def start(self) -> dict:
        self.server.start()
        return self.info()

    def info(self) -> dict:
        # On Slurm, the node the server runs on by Slurm's name (hosts can carry several Slurm nodes).
        slurm_node = os.environ.get("SLURMD_NODENAME")
        return {
            "node_id": self.node_id,
            "host": socket.gethostname(),
            "slurm_node": slurm_node,
            **describe(self.server),
        }

    def api_key(self) -> str:
        return self.server.api_key

    def ensure_alive(self) -> int:
        """Restart the server if its process has died or hung; returns how often it has been restarted."""
        if not self.server.alive() or self.server.hung():
            self.server.restart()
        return self.server.restarts

    def stop(self) -> dict:
        self.server.stop()
        return self.info()


@ray.remote(num_cpus=1, max_retries=0)
def shard_task(recipe: Recipe, shard: Shard, seed_rows: list[dict], routes: Routes, api_key: str | None,
               run_dir: str, attempt: int) -> dict:  # fmt: skip
    if api_key:
        os.environ[API_KEY_ENV] = api_key
    own = routes.own
    check = (lambda: answers_health(own.url.removesuffix("/v1"))) if own else None
    node_id = ray.get_runtime_context().get_node_id()
    store = RunStore(Path(run_dir))
    # Data Designer's log for this shard goes to the run dir, not to the driver's terminal.
    handler = logging.FileHandler(store.logs_dir / f"{shard.id}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    dd_log = logging.getLogger("data_designer")
    dd_log.addHandler(handler)
    dd_log.setLevel(logging.INFO)
    try:
        return run_shard(recipe, shard, seed_rows, routes, store, attempt=attempt, server_ok=check, node_id=node_id)
    finally:
        dd_log.removeHandler(handler)
        handler.close()


@dataclass
class Node:
    """One place shard tasks can run: a node with its own server, or (remote providers only) anywhere."""

    routes: Routes
    slots: int
    actor: Any = None
    node_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict)
    inflight: int = 0
    health_ref: Any = None
    last_check: float = 0.0
    lost: str | None = None  # why the node is out of service: it died, or its server would not restart
    recovering: bool = False  # a failed shard asked for a server check that is not back yet

    def accepts(self) -> bool:
        return self.lost is None and not self.recovering and self.inflight < self.slots

    def submit(self, recipe: Recipe, shard: Shard, seed_rows: list[dict], run_dir: Path, attempt: int):
        """Run `shard` (with its own `seed_rows`) on this node; returns the task's reference."""
        self.inflight += 1
        options: dict[str, Any] = {}
        if self.node_id:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
            # `slots` already bounds the shards on this node; a CPU reservation would only let Ray hold back a
            # worker its server needs on a node with fewer cores than workers (a worker is I/O-bound: a few ms
            # of CPU per record).
            options["num_cpus"] = 0
        return shard_task.options(**options).remote(
            recipe, shard, seed_rows, self.routes, self.api_key, str(run_dir), attempt
        )

    def recover(self, error: Exception) -> None:
        """After a failed shard: a node that died is taken out of service (the job goes on with the others, which
        retry its shards). Otherwise its server is checked, and restarted if dead or hung, without waiting: the
        node takes no new shard until `watch()` sees the check back, and the driver goes on with the other nodes
        meanwhile (a vLLM restart takes minutes). Only a node with its own server can be lost: shards for a
        remote provider run anywhere, and Ray places a retry on a live node."""
        if self.actor is None or self.lost is not None:
            return
        if isinstance(error, ray.exceptions.NodeDiedError | ray.exceptions.TaskUnschedulableError):
            self._out_of_service(error)
        else:
            # Replaces a pending watchdog check: the actor runs calls in order, so this one sees the failure.
            self.health_ref, self.recovering = self.actor.ensure_alive.remote(), True

    def _collect(self, health_ref: Any) -> None:
        """The result of an ensure_alive call. If the actor died or could not restart the server, the node is out
        of service. An actor that is only unreachable for now is asked again at the next check."""
        try:
            self.info["restarts"] = ray.get(health_ref)
            self.recovering = False
        except ray.exceptions.ActorUnavailableError:
            self.last_check = 0.0  # ask again at once
        except ray.exceptions.RayError as e:
            self._out_of_service(e.cause if isinstance(e, ray.exceptions.RayTaskError) else e)

    def _out_of_service(self, cause: BaseException) -> None:
        self.lost = self.info["lost"] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
        log.warning("node %s is out of service: %s", self.node_id, self.lost)

    def watch(self, interval: float = 5.0) -> None:
        """Non-blocking watchdog: every `interval` s, ask the node's actor to restart a dead or hung server. It
        comes back on the same port, so the shard in flight carries on: Data Designer defers requests that hit a
        closed port and retries them, and the shard commits only if the server is healthy at its end. Also
        collects the check that `recover()` asked for."""
        if self.actor is None or self.lost is not None:
            return
        if self.health_ref is not None:
            if not ray.wait([self.health_ref], timeout=0)[0]:
                return
            ref, self.health_ref = self.health_ref, None
            self._collect(ref)
            if self.lost is not None:
                return
        if time.monotonic() - self.last_check >= interval:
            self.last_check = time.monotonic()
            self.health_ref = self.actor.ensure_alive.remote()


def start_node_servers(
    recipe: Recipe, logs_dir: Path, workers_per_node: int, parallel: int, remote: dict[str, Endpoint]
) -> list[Node]:
    """One NodeServer per node slot in the cluster, all started in parallel and health-gated. Each node's shards
    send the models with provider local to its server, the others to their provider (`remote`)."""
    assert recipe.serve is not None
    count = wait_for_node_slots(
        int(os.environ.get("SDG_EXPECTED_NODES", "1")), float(os.environ.get("SDG_WAIT_S", 900))
    )
    spec = recipe.serve
    check_gpus(spec)
    # vLLM's GPUs are reserved for the actor, so Ray sets CUDA_VISIBLE_DEVICES for the server it starts.
    actors = [NodeServer.options(num_gpus=spec.gpus).remote(spec, str(logs_dir)) for _ in range(count)]  # type: ignore[attr-defined]
    t0 = time.monotonic()
    infos = ray.get([a.start.remote() for a in actors])
    log.info("%d %s server(s) healthy in %.1fs", count, recipe.serve.engine, time.monotonic() - t0)
    nodes = []
    for actor, info in zip(actors, infos, strict=True):
        own = Endpoint(info["endpoint"], API_KEY_ENV, recipe.serve.served_model_name, parallel)
        key = ray.get(actor.api_key.remote())
        nodes.append(Node(route_models(recipe, own, remote), workers_per_node, actor, info["node_id"], key, info))
    return nodes


def stop_node_servers(nodes: list[Node]) -> list[dict]:
    """Stop every node's server; returns what the manifest records of each. The actor's own count of restarts
    is the final one: a watchdog check still pending when the job ended may have restarted a server."""
    stopping = [(n, n.actor.stop.remote()) for n in nodes if n.actor is not None]
    for node, ref in stopping:
        try:
            node.info |= ray.get(ref, timeout=60)
        except Exception as e:  # a lost node: keep what the driver last heard from it
            log.warning("could not stop the server on node %s: %s", node.node_id, e)
    return [n.info for n in nodes if n.info]
