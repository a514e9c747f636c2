"""Ray: one server actor per node (owning the node's servers), shard tasks pinned to the node whose servers they use.

A node takes part when it offers the custom resource `sdg_node` (`ray start --resources='{"sdg_node": 1}'`);
each server actor claims the whole unit, so there is exactly one per node. The servers bind to the node's
loopback, so a shard task must run on its servers' node: NodeAffinitySchedulingStrategy does that.
Without RAY_ADDRESS the driver starts a local one-node cluster; with it, it joins. Same code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sdg_job.config import Recipe, ServeSpec
from sdg_job.endpoints import Endpoint, Routes, expected_nodes, own_endpoint, route_models
from sdg_job.errors import JobError, RecipeError
from sdg_job.generate import dd_environment
from sdg_job.plan import Shard
from sdg_job.serve import API_KEY_ENV, Server, answers_health, describe, split_gpus
from sdg_job.shard import run_shard
from sdg_job.store import RunStore
from sdg_job.summary import ShardSummary

NODE_RESOURCE = "sdg_node"
log = logging.getLogger("sdg_job")


def connect(run_dir: Path) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one sized to this machine with one node slot."""
    env_vars = dd_environment(run_dir / "dd_home")
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


def check_gpus(servers: dict[str, ServeSpec]) -> None:
    """Ray would wait forever to place a node's server actor that asks for more GPUs than its node has: say so
    instead, with each server's share."""
    needed = sum(spec.gpus for spec in servers.values())
    if not needed:
        return
    several = len(servers) > 1
    shares = " + ".join(
        f"{name + ' ' if several else ''}{spec.tensor_parallel_size} × {spec.data_parallel_size}"
        for name, spec in servers.items()
        if spec.gpus
    )
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get(NODE_RESOURCE, 0) >= 1 and resources.get("GPU", 0) < needed:
            raise RecipeError(
                "serve.servers" if several else "serve",
                "tensor_parallel_size × data_parallel_size",
                f"{shares} = {needed} GPUs per node, but node {node.get('NodeManagerHostname')} "
                f"({node['NodeID'][:8]}) offers {resources.get('GPU', 0):g}; Ray resources seen there: "
                f"{dict(sorted(resources.items()))}. To try the recipe on this machine's CPU with the embedded model, "
                "add layer=cpu",
            )


@ray.remote(num_cpus=0, resources={NODE_RESOURCE: 1}, max_restarts=0)
class NodeServer:
    """Owns its node's LLM servers, one per entry of `recipe.servers`: start, health, restart after a crash, stop.
    They share the node's per-job API key; each runs on its own share of the GPUs Ray reserved for the actor."""

    def __init__(self, servers: dict[str, ServeSpec], logs_dir: str):
        self.node_id = ray.get_runtime_context().get_node_id()
        key = secrets.token_urlsafe(24)
        gpus = [str(g) for g in ray.get_gpu_ids()]  # what Ray reserved for this actor (its CUDA_VISIBLE_DEVICES)
        if gpus:
            servers = split_gpus(servers, gpus)
        self.servers: dict[str, Server] = {}
        for name, spec in servers.items():
            label = "" if len(servers) == 1 else f"{name}-"
            log_path = Path(logs_dir) / f"server-{label}{socket.gethostname()}-{self.node_id[:8]}.log"
            self.servers[name] = Server(spec, log_path, api_key=key)

    def start(self) -> list[dict]:
        """Every server at once (a vLLM start takes minutes), then each health-gated."""
        for server in self.servers.values():
            server.launch()
        for server in self.servers.values():
            server.wait_healthy()
        return self.info()

    def info(self) -> list[dict]:
        """One entry per server. On Slurm, the node it runs on by Slurm's name (hosts can carry several nodes)."""
        slurm_node = os.environ.get("SLURMD_NODENAME")
        return [
            {
                "node_id": self.node_id,
                "host": socket.gethostname(),
                "slurm_node": slurm_node,
                "name": name,
                "aliases": server.spec.aliases,
                **describe(server),
            }  # fmt: skip
            for name, server in self.servers.items()
        ]

    def api_key(self) -> str:
        return next(iter(self.servers.values())).api_key

    def ensure_alive(self) -> dict[str, int]:
        """Restart each server whose process has died or hung; returns how often each has been restarted."""
        for server in self.servers.values():
            if not server.alive() or server.hung():
                server.restart()
        return {name: server.restarts for name, server in self.servers.items()}

    def stop(self) -> list[dict]:
        for server in self.servers.values():
            server.stop()
        return self.info()


@ray.remote(num_cpus=1, max_retries=0)
def shard_task(recipe: Recipe, shard: Shard, seed_rows: list[dict], routes: Routes, api_key: str | None,
               run_dir: str, attempt: int) -> ShardSummary:  # fmt: skip
    if api_key:
        os.environ[API_KEY_ENV] = api_key
    own = list(routes.own.values())
    check = (lambda: all(answers_health(e.url.removesuffix("/v1")) for e in own)) if own else None
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
    info: list[dict] = field(default_factory=list)  # what the manifest records of each of its servers
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
            restarts = ray.get(health_ref)
            for server in self.info:
                server["restarts"] = restarts[server["name"]]
            self.recovering = False
        except ray.exceptions.ActorUnavailableError:
            self.last_check = 0.0  # ask again at once
        except ray.exceptions.RayError as e:
            self._out_of_service(e.cause if isinstance(e, ray.exceptions.RayTaskError) else e)

    def _out_of_service(self, cause: BaseException) -> None:
        self.lost = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
        for server in self.info:
            server["lost"] = self.lost
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
    recipe: Recipe, logs_dir: Path, workers_per_node: int, remote: dict[str, Endpoint]
) -> list[Node]:
    """One NodeServer per node slot in the cluster, each starting every server of `recipe.servers`, all in parallel
    and health-gated. Each node's shards send the models with provider local to their server on that node, the
    others to their provider (`remote`)."""
    count = wait_for_node_slots(expected_nodes(), float(os.environ.get("SDG_WAIT_S", 900)))
    servers = recipe.servers
    check_gpus(servers)
    # vLLM's GPUs are reserved for the actor, which hands each server its share in CUDA_VISIBLE_DEVICES.
    gpus = sum(spec.gpus for spec in servers.values())
    actors = [NodeServer.options(num_gpus=gpus).remote(servers, str(logs_dir)) for _ in range(count)]  # type: ignore[attr-defined]
    t0 = time.monotonic()
    infos = ray.get([a.start.remote() for a in actors])
    engines = ", ".join(sorted({spec.engine for spec in servers.values()}))
    log.info("%d %s server(s) healthy in %.1fs", count * len(servers), engines, time.monotonic() - t0)
    nodes = []
    for actor, info in zip(actors, infos, strict=True):
        own = {s["name"]: own_endpoint(recipe, s["name"], s["endpoint"], workers_per_node) for s in info}
        key = ray.get(actor.api_key.remote())
        nodes.append(Node(route_models(recipe, own, remote), workers_per_node, actor, info[0]["node_id"], key, info))
    return nodes


def stop_node_servers(nodes: list[Node]) -> list[dict]:
    """Stop every node's servers; returns what the manifest records of each server. The actor's own count of
    restarts is the final one: a watchdog check still pending when the job ended may have restarted a server."""
    stopping = [(n, n.actor.stop.remote()) for n in nodes if n.actor is not None]
    for node, ref in stopping:
        try:
            stopped = ray.get(ref, timeout=60)
            node.info = [{**old, **new} for old, new in zip(node.info, stopped, strict=True)]
        except Exception as e:  # a lost node: keep what the driver last heard from it
            log.warning("could not stop the servers on node %s: %s", node.node_id, e)
    return [server for n in nodes for server in n.info]


@contextlib.contextmanager
def keeping_our_sigterm_handler() -> Iterator[None]:
    """ray.init installs a SIGTERM handler that kills the local Ray and exits from wherever the driver is (stack
    dump, exit 134, no manifest). Ours stays in place during ray.init, so a SIGTERM there interrupts it like any
    other blocking call; the caller reinstalls ours afterwards anyway, in case a Ray version sets it elsewhere."""
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
