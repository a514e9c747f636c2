"""The driver: plan → serve → generate shards on Ray → project → commit → top up to exactly N; then publish (merge,
card, manifest). Only drives: where a shard runs is cluster's, what a run leaves behind publish's."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sdg_job import decontaminate
from sdg_job.config import Recipe, recipe_hash
from sdg_job.endpoints import (
    REQUEST_CAUSES,
    EndpointFailing,
    EndpointWatch,
    check_outside,
    concurrency,
    expected_nodes,
    failing_message,
    remote_endpoints,
    route_models,
)
from sdg_job.errors import Interrupted, JobError
from sdg_job.lease import LEASE_FILE, Lease
from sdg_job.outputs import check_output_path
from sdg_job.plan import Shard, make_shard, plan_shards, shard_index, top_up_sizes
from sdg_job.progress import JobProgress
from sdg_job.publish import finish
from sdg_job.seeds import load_seeds
from sdg_job.status import StatusFile
from sdg_job.store import RunStore
from sdg_job.supervise import DRIVER_ENV, Signals, end_snapshot, snapshot

log = logging.getLogger("sdg_job")


class Job:
    """One run of a recipe into its run dir: the shard loop and everything the manifest reports."""

    def __init__(self, recipe: Recipe, source: str, fresh: bool):
        self.recipe, self.source = recipe, source
        self.store = RunStore(recipe.run_dir, recipe.quality.near_duplicates)
        self.store.open(recipe_hash(recipe), fresh, source, keep=(LEASE_FILE,))
        self.seed_rows, self.strategy = load_seeds(recipe.seed_dataset)
        gen = recipe.generation
        # Several servers per node: the workers' shards are staggered, so that each server has shards at it at once.
        stagger = (concurrency(recipe)[0], expected_nodes()) if len(recipe.servers) > 1 else (1, 1)
        self.shards = plan_shards(
            recipe.num_records, gen.shard_size, len(self.seed_rows), self.strategy, gen.random_seed, stagger
        )
        self.summaries = self.store.load_committed()  # the store's index: updated as shards commit
        # A previous run may have topped up: its committed extra shards belong to this plan too. Top-ups run in
        # parallel, so one in flight when the driver died leaves a gap in the ids; new top-ups go past the largest.
        planned = {s.id for s in self.shards}
        for shard_id, summary in self.summaries.items():
            if shard_id not in planned:
                self.shards.append(self._shard(shard_index(shard_id), summary.requested))
        self.skipped = len(self.summaries)
        self.failures: list[dict] = []  # crashed or server-lost shard attempts, retried
        self.output_shards: list[str] = []  # the committed shards the output took records from (set by merge)
        self.output_stats: dict[str, dict[str, int]] = {}  # the files merge wrote, as outputs.stat_of saw them
        self.inflight: dict[Any, tuple[Shard, Any]] = {}  # Ray ref → (shard, node)
        self.endpoint_watch = EndpointWatch()
        self.status = StatusFile(self)
        self.nodes: list = []  # where shards run, once the servers are up (status.json shows them)

    def _shard(self, index: int, size: int) -> Shard:
        gen = self.recipe.generation
        return make_shard(index, size, gen.shard_size, len(self.seed_rows), self.strategy, gen.random_seed)

    def attempted(self) -> int:
        return self.store.totals["requested"]

    def top_up(self, parallel: int) -> list[Shard]:
        """Shards that cover the gap to num_records (plan.top_up_sizes); empty when num_records are committed."""
        n, gen = self.recipe.num_records, self.recipe.generation
        unique, passed = self.store.unique_count(self.committed_ids(), limit=n)
        if unique >= n:
            return []
        requested = self.attempted()
        budget = int(gen.budget * n)
        if requested >= budget:
            raise BudgetExhausted(unique, requested, passed)
        valid = self.store.totals["valid"] - passed.total()
        sizes = top_up_sizes(n - unique, valid, requested, gen.shard_size, parallel, budget - requested)
        first = max(s.index for s in self.shards) + 1
        added = [self._shard(first + i, size) for i, size in enumerate(sizes)]
        self.shards += added
        log.info("topping up: %d of %d valid, adding %d shard(s) with %d records", unique, n, len(added),
                 sum(sizes))  # fmt: skip
        return added

    def committed_ids(self) -> list[str]:
        """The committed shards in plan order: the order the output takes its records in."""
        return [s.id for s in self.shards if s.id in self.summaries]

    def run(self, nodes: list, progress: JobProgress, check: Callable[[], None] = lambda: None) -> None:
        """Keep every node's workers busy until exactly num_records valid records are committed. `check` runs on
        every turn and may raise to stop the job."""
        import ray

        todo = deque(s for s in self.shards if s.id not in self.summaries)
        attempts: dict[str, int] = {}
        inflight = self.inflight
        max_retries = self.recipe.generation.max_shard_retries
        progress.update(self)
        while True:
            check()
            for node in nodes:
                while todo and node.accepts():
                    shard = todo.popleft()
                    rows = [self.seed_rows[i] for i in shard.seed_rows]  # its own rows, not the whole seed file
                    ref = node.submit(self.recipe, shard, rows, self.store.run_dir, attempts.get(shard.id, 0))
                    inflight[ref] = (shard, node)
            if not inflight and not todo:
                added = self.top_up(sum(node.slots for node in nodes if node.lost is None))
                if not added:
                    return
                todo.extend(added)
                continue
            for node in nodes:
                node.watch()
            if inflight:
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            else:  # the shards left wait for a node's server check to come back
                done = []
                time.sleep(0.5)
            for ref in done:
                shard, node = inflight.pop(ref)
                node.inflight -= 1
                try:
                    summary = ray.get(ref)
                except Exception as e:  # worker killed, node lost, server died: retry the shard
                    attempts[shard.id] = attempts.get(shard.id, 0) + 1
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                    reason = type(cause).__name__
                    self.failures.append({"shard": shard.id, "attempt": attempts[shard.id], "error": reason})
                    log.warning("%s failed (%s); retry %d of %d", shard.id, reason, attempts[shard.id], max_retries)
                    if attempts[shard.id] > max_retries:
                        raise JobError(f"{shard.id} failed {attempts[shard.id]} times; last error: {e}") from None
                    node.recover(e)
                    todo.appendleft(shard)
                else:
                    try:
                        self.store.note_committed(shard.id, summary)
                    except OSError as e:
                        raise JobError(f"{shard.id} committed where it ran, but this driver cannot read "
                                       f"{e.filename}: the run dir must be on storage every node and the driver "
                                       "share") from None  # fmt: skip
                    self.endpoint_watch.saw(summary)
            if all(node.lost for node in nodes):
                raise JobError("every node is out of service: " + "; ".join(str(node.lost) for node in nodes))
            progress.update(self)
            self.status.update(self, nodes)

    def abandon(self) -> None:
        """Cancel the shards in flight (each commits atomically or not at all, so nothing is half-written)."""
        import ray

        for ref in self.inflight:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        self.inflight.clear()


def budget_advice(dropped: Counter[str], passed: Counter[str]) -> str:
    """Raising the budget helps when records were made and then failed the recipe's checks, not when requests
    failed (the cause is the endpoint's, and more attempts only fail the same way), nor when the seeds and the
    sampling give too little variety for N near-unique records."""
    if passed["near_duplicate"] * 2 > sum(dropped.values()) + passed.total():
        return (f"{passed['near_duplicate']} were near-duplicates of earlier records (quality.near_duplicates): "
                "the seeds and sampling give too little variety for this many; add seeds, vary the prompts or "
                "raise the temperature, or raise the threshold")  # fmt: skip
    failed_requests = sum(n for reason, n in dropped.items() if reason in REQUEST_CAUSES)
    if failed_requests * 2 > sum(dropped.values()):
        causes = ", ".join(f"{r} {n}" for r, n in dropped.most_common() if r in REQUEST_CAUSES)
        return (f"most were lost to failed requests ({causes}; the manifest's request_errors), which a larger "
                "generation.budget would not cure: fix the endpoint")  # fmt: skip
    return "raise generation.budget or fix the recipe (the manifest's dropped says why records failed)"


class BudgetExhausted(Exception):
    def __init__(self, valid: int, attempted: int, passed: Counter[str]):
        self.valid, self.attempted, self.passed = valid, attempted, passed


def _log_to_run_dir(recipe: Recipe) -> None:
    """Data Designer's chatter goes to a file in the run dir; the terminal keeps the job's own lines."""
    logs = recipe.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "data_designer.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("data_designer", "httpx"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def run(recipe: Recipe, source: str, fresh: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the manifest. Raises RecipeError (exit 2) when another driver holds the run dir,
    Interrupted (exit 128 + signal) on SIGTERM, SIGINT or SIGHUP, JobError (exit 1) when it cannot finish."""
    check_outside(recipe, source)
    check_output_path(recipe, source)
    decontaminate.preflight(recipe, source)
    signals = Signals().install()
    try:
        # Before RunStore.open, which may wipe the run dir (--fresh): only the lease holder touches it.
        lease = Lease(recipe.run_dir, source).acquire(give_up=lambda: signals.received is not None)
        if lease is None:
            raise Interrupted(signals.received or signal.SIGINT)
        try:
            return _run(recipe, source, fresh, signals, lease)
        finally:
            lease.release()
    finally:
        signals.restore()


def _run(recipe: Recipe, source: str, fresh: bool, signals: Signals, lease: Lease) -> dict[str, Any]:
    import ray

    from sdg_job import cluster

    started_at, t0 = datetime.now(timezone.utc), time.monotonic()
    job = Job(recipe, source, fresh)
    _log_to_run_dir(recipe)
    if job.skipped:
        log.info("resuming: %d of %d planned shards already complete", job.skipped, len(job.shards))
    workers, parallel = concurrency(recipe)
    cpu0 = time.process_time()
    timings: dict[str, float] = {}
    nodes: list = []
    status, error = "complete", None

    def still_ours() -> None:
        if lease.lost is not None:
            raise JobError(f"this driver lost {recipe.run_dir}: {lease.lost}")

    try:
        with signals.interruptible():  # SIGTERM, SIGINT, SIGHUP raise here (Interrupt, a KeyboardInterrupt)
            with cluster.keeping_our_sigterm_handler():
                cluster.connect(recipe.run_dir)
            signals.install()
            timings["ray_ready"] = time.monotonic() - t0
            remote = remote_endpoints(recipe, parallel)
            if recipe.servers:
                nodes = cluster.start_node_servers(recipe, job.store.logs_dir, workers, remote)
            else:
                nodes = [cluster.Node(route_models(recipe, {}, remote), workers * max(1, cluster.node_slots()))]
            timings["servers_ready"] = time.monotonic() - t0
            timings["driver_cpu_startup"] = time.process_time() - cpu0
            job.nodes = nodes
            with JobProgress(recipe.num_records) as progress:
                job.run(nodes, progress, still_ours)
            timings["generation"] = time.monotonic() - t0 - timings["servers_ready"]
    except BudgetExhausted as e:
        status = "budget_exhausted"
        error = JobError(
            f"budget exhausted: {e.attempted} records attempted (generation.budget={recipe.generation.budget} × "
            f"{recipe.num_records}) gave only {e.valid} valid records. They are kept in "
            f"{recipe.output_path}.partial; {budget_advice(job.store.dropped, e.passed)}, then re-run to continue."
        )
    except EndpointFailing as e:
        status, error = "endpoint_failed", JobError(failing_message(recipe, e))
    except KeyboardInterrupt:  # from here on a signal is only noted: nothing cuts the clean-up short
        signum = signals.received or signal.SIGINT
        status, error = "interrupted", Interrupted(signum)
        log.warning("%s: stopping; committed shards are kept", signal.Signals(signum).name)
    finally:
        if signals.received is not None:  # a new driver on this run dir waits for our release instead of refusing
            lease.mark_releasing()
        # What Ray started below this driver, to end after ray.shutdown() whatever of it outlives that (its agents
        # do). Only in a supervised driver: everything below it is the job's.
        leftovers = snapshot() if os.environ.get(DRIVER_ENV) else {}
        job.abandon()
        server_info = cluster.stop_node_servers(nodes)
        ray.shutdown()
        if ended := end_snapshot(leftovers):
            log.info("ended %d process(es) left after ray.shutdown()", len(ended))
    manifest = finish(job, status, error, server_info, started_at, t0, cpu0, timings)
    if error is not None:
        raise error
    assert manifest["records"] == recipe.num_records
    return manifest
