"""How many requests a shard keeps in flight at an endpoint, and how many shard workers a node runs."""

from __future__ import annotations

import math
import os

from sdg_job.config import Recipe

REMOTE_CONCURRENCY = 64  # in-flight requests per worker against a remote endpoint of unknown capacity


def concurrency(recipe: Recipe) -> tuple[int, int]:
    """(shard workers per node, requests in flight per worker), sized so each server never idles.

    A record has one request in flight at a time (its columns depend on each other), so one shard keeps at
    most `shard_size` requests going, and fewer in its tail. Enough workers to fill the server's capacity,
    plus one whose shard overlaps another's tail; each may push a full share, the server queues the rest.

    Tried and measured (C=256): capping each worker at 64 in flight, with more workers, saves ~0.3 ms CPU per
    record (Data Designer scans its connection pool on every request) but lets the server drain at the end of
    the job: saturation 0.89-0.96 against 0.99. The server's time is what costs, so workers stay few and full.
    """
    gen = recipe.generation
    # With models served on the nodes, their servers set the pace (a remote judge beside them takes as many):
    # enough shards to fill all of a node's servers at once.
    each = gen.max_parallel_requests  # a server's capacity, when the recipe says better than serve: does
    capacity = sum(each or spec.capacity for spec in recipe.servers.values()) or each or REMOTE_CONCURRENCY
    workers = gen.workers_per_node or math.ceil(capacity / gen.shard_size) + 1
    return workers, worker_share(capacity, workers)


def expected_nodes() -> int:
    """How many nodes the job was given (SDG_EXPECTED_NODES, set by the Slurm scripts; 1 on a workstation)."""
    return int(os.environ.get("SDG_EXPECTED_NODES", "1"))


def worker_share(capacity: int, workers: int) -> int:
    """Requests in flight per worker at a server of `capacity`: one worker is in its shard's tail, the others fill
    it."""
    return max(1, math.ceil(capacity / max(workers - 1, 1)))
