"""`run --preview`: a handful of records generated for real, in this process (no Ray), the job's own servers started
and stopped here; the output and the run dir are not touched."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sdg_job.config import Recipe
from sdg_job.endpoints import Routes, check_outside, concurrency, own_endpoint, remote_endpoints, route_models
from sdg_job.plan import plan_shards
from sdg_job.seeds import load_seeds
from sdg_job.serve import API_KEY_ENV, Server, split_gpus
from sdg_job.shard import run_shard
from sdg_job.store import RunStore


@contextlib.contextmanager
def _in_process_servers(recipe: Recipe, logs_dir: Path) -> Iterator[Routes]:
    """Preview path: the job's own servers (if any model is served locally) in this process, no Ray."""
    _, parallel = concurrency(recipe)
    remote = remote_endpoints(recipe, parallel, paced=False)
    key = secrets.token_urlsafe(24)
    specs = recipe.servers
    if len(specs) > 1 and any(spec.gpus for spec in specs.values()):  # each its own GPUs, as on a node of the job
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(sum(spec.gpus for spec in specs.values()))]
        specs = split_gpus(specs, ids)
    with contextlib.ExitStack() as stack:
        servers = {name: Server(spec, logs_dir / f"{name}.log", api_key=key) for name, spec in specs.items()}
        for server in servers.values():
            server.launch()
            stack.callback(server.stop)
        own = {}
        for name, server in servers.items():
            server.wait_healthy()
            own[name] = own_endpoint(recipe, name, server.endpoint, 1)  # one worker: the whole capacity
        os.environ[API_KEY_ENV] = key
        try:
            yield route_models(recipe, own, remote)
        finally:
            os.environ.pop(API_KEY_ENV, None)


def preview(recipe: Recipe, source: str, count: int = 3) -> tuple[list[dict], dict[str, int]]:
    """A handful of projected records, generated for real, without touching the output or the run dir."""
    check_outside(recipe, source)
    with tempfile.TemporaryDirectory(prefix="sdg-preview-") as tmp:
        store = RunStore(Path(tmp))
        store.open("preview", True, "preview")
        seed_rows, strategy = load_seeds(recipe.seed_dataset)
        size = min(count, recipe.num_records)
        shard = plan_shards(size, size, len(seed_rows), strategy, recipe.generation.random_seed)[0]
        with _in_process_servers(recipe, store.logs_dir) as shard_routes:
            summary = run_shard(recipe, shard, [seed_rows[i] for i in shard.seed_rows], shard_routes, store)
        return store.records(shard.id), summary.dropped
