"""The driver: plan → serve → generate shards on Ray → project → commit → top up to exactly N → merge + manifest."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import resource
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from sdg_job.card import SHOWN, Columns, card_places, dataset_card, holds_card_of, merge_columns
from sdg_job.config import Recipe, ServeGroup, recipe_dict, recipe_hash
from sdg_job.endpoints import (
    REQUEST_CAUSES,
    EndpointFailing,
    EndpointWatch,
    Routes,
    concurrency,
    expected_nodes,
    failing_message,
    own_endpoint,
    preflight,
    remote_endpoints,
    route_models,
)
from sdg_job.errors import Interrupted, JobError
from sdg_job.lease import LEASE_FILE, Lease
from sdg_job.outputs import check_output_path, note_stats, note_written, written_before
from sdg_job.plan import Shard, make_shard, plan_shards, shard_index, top_up_sizes
from sdg_job.progress import JobProgress
from sdg_job.seeds import file_sha256, load_seeds
from sdg_job.serve import API_KEY_ENV, Server, check_weights_staged, split_gpus
from sdg_job.shard import run_shard
from sdg_job.store import RunStore, atomic_write, fsync_dir
from sdg_job.supervise import DRIVER_ENV, Signals, end_snapshot, snapshot
from sdg_job.tokens import tokenizer_name

log = logging.getLogger("sdg_job")
PACKAGES = ("sdg-job", "data-designer", "ray", "omegaconf", "pydantic", "httpx")
RSS_UNITS_PER_MB = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def check_outside(recipe: Recipe, source: str) -> None:
    """What the job needs from outside, before anything is written: offline, the staged weights of its own vLLM
    servers; for each remote provider, the key and an endpoint that answers for its models (endpoints.preflight)."""
    for name, spec in recipe.servers.items():
        check_weights_staged(spec, f"{recipe.serve_key(name)}.model")
    preflight(recipe, source)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


class Job:
    """One run of a recipe into its run dir: the shard loop and everything the manifest reports."""

    def __init__(self, recipe: Recipe, source: str, fresh: bool):
        self.recipe, self.source = recipe, source
        self.store = RunStore(recipe.run_dir)
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
                self.shards.append(self._shard(shard_index(shard_id), summary["requested"]))
        self.skipped = len(self.summaries)
        self.failures: list[dict] = []  # crashed or server-lost shard attempts, retried
        self.output_shards: list[str] = []  # the committed shards the output took records from (set by merge)
        self.output_stats: dict[str, dict[str, int]] = {}  # the files merge wrote, as outputs.stat_of saw them
        self.inflight: dict[Any, tuple[Shard, Any]] = {}  # Ray ref → (shard, node)
        self.endpoint_watch = EndpointWatch()

    def _shard(self, index: int, size: int) -> Shard:
        gen = self.recipe.generation
        return make_shard(index, size, gen.shard_size, len(self.seed_rows), self.strategy, gen.random_seed)

    def attempted(self) -> int:
        return self.store.totals["requested"]

    def top_up(self, parallel: int) -> list[Shard]:
        """Shards that cover the gap to num_records (plan.top_up_sizes); empty when num_records are committed."""
        n, gen = self.recipe.num_records, self.recipe.generation
        unique, dupes = self.store.unique_count(self.committed_ids(), limit=n)
        if unique >= n:
            return []
        requested = self.attempted()
        budget = int(gen.budget * n)
        if requested >= budget:
            raise BudgetExhausted(unique, requested)
        valid = self.store.totals["valid"] - dupes
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

    def abandon(self) -> None:
        """Cancel the shards in flight (each commits atomically or not at all, so nothing is half-written)."""
        import ray

        for ref in self.inflight:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        self.inflight.clear()

    def manifest(
        self, server_info: list[dict], started_at: datetime, wall: float, status: str, timings: dict[str, float]
    ) -> dict[str, Any]:
        recipe, summaries = self.recipe, self.summaries
        records, dupes = self.store.unique_count(self.committed_ids(), recipe.num_records)
        dropped: Counter[str] = Counter()
        for x in summaries.values():
            dropped.update(x["dropped"])
        if dupes:
            dropped["duplicate"] += dupes
        tokens_out = sum(x["output_tokens"] for x in summaries.values())
        request_errors: Counter[str] = Counter()
        for x in summaries.values():
            request_errors.update(x.get("request_errors") or {})
        return {
            "status": status,
            "recipe": recipe.name,
            "recipe_file": self.source,
            "recipe_sha256": recipe_hash(recipe),
            "resolved_recipe": recipe_dict(recipe),
            "seed": self._seed_info(),
            "provider": recipe.provider,
            "models": {alias: model_entry(recipe, alias) for alias in recipe.models},
            "servers": server_info,
            "versions": versions(),
            "output_path": str(recipe.output_path),
            "output_files": [path.name for path in recipe.output_files] if status == "complete" else [],
            "output_bytes": sum(path.stat().st_size for path in recipe.output_files) if status == "complete" else 0,
            "num_records": recipe.num_records,
            "records": records,
            "attempted": self.attempted(),
            "generated": sum(x["generated"] for x in summaries.values()),
            "dropped": dict(sorted(dropped.items())),
            "request_errors": dict(sorted(request_errors.items())),  # failed requests by cause (a row may have several)
            "retries": len(self.failures),
            "failures": self.failures,
            "server_restarts": sum(s.get("restarts", 0) for s in server_info),
            "tokens": {"input": sum(x["input_tokens"] for x in summaries.values()), "output": tokens_out},
            "usage": usage_by_alias(summaries.values()),
            "record_tokens": self.record_tokens(),
            "shards": [{k: v for k, v in summaries[i].items() if k != "columns"} for i in self.committed_ids()],
            "shards_skipped_on_resume": self.skipped,
            "started_at": started_at.isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 2),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "records_per_s": round(records / wall, 3) if wall else None,
            "output_tokens_per_s": round(tokens_out / wall, 1) if wall else None,
            "client_cpu": client_cpu(timings, summaries.values(), records),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RSS_UNITS_PER_MB, 1),
        }

    def record_tokens(self) -> dict[str, Any] | None:
        """The spread of the output's records in tokens, as a trainer sees them (sdg_job.tokens), if counted."""
        counts = self.store.record_tokens(self.committed_ids(), self.recipe.num_records)
        if counts is None or not len(counts):
            return None
        p50, p95 = np.percentile(counts, [50, 95], method="higher")
        server = self.recipe.counting_server
        return {"tokenizer": tokenizer_name(self.recipe.servers[server] if server else None), "records": len(counts),
                "min": int(counts.min()), "p50": int(p50), "p95": int(p95), "max": int(counts.max())}  # fmt: skip

    def _seed_info(self) -> dict | None:
        seed = self.recipe.seed_dataset
        if seed is None:
            return None
        return {"path": str(seed.path), "sha256": file_sha256(seed.path), "rows": len(self.seed_rows),
                "strategy": seed.strategy}  # fmt: skip

    def merge(self, partial: bool) -> int:
        """Committed shards, in plan order, without duplicates, cut at num_records → the output files, atomically
        (a partial output is one file beside the output). Parts of an earlier layout of this output are removed."""
        out = self.recipe.output_path
        outputs = [out.with_name(out.name + ".partial")] if partial else self.recipe.output_files
        per_file = self.recipe.output_records_per_file if not partial else None
        n = self.recipe.num_records
        # The manifest, written last, vouches for the output, and the card describes it: neither while it is
        # replaced (several files cannot be renamed at once: a crash in between must not leave them over a mix).
        note_written(self.recipe, [*outputs, self.recipe.manifest_path])
        self.recipe.manifest_path.unlink(missing_ok=True)
        for card in card_places(out):
            if holds_card_of(card, out):
                card.unlink()
        fsync_dir(out.parent)
        count, self.output_shards = self.store.merge(self.committed_ids(), n, outputs, per_file or n)
        if not partial:
            for stale in set(written_before(self.recipe)) - {*outputs, self.recipe.manifest_path}:
                stale.unlink(missing_ok=True)  # parts of an earlier layout, or the .partial: the job's own
            self.store.sweep()  # the job is over: no attempt of it still runs
        self.output_stats = note_stats(self.recipe, outputs)
        return count

    def finish(self, status: str, error: Exception | None, server_info: list[dict], started_at: datetime, t0: float,
               cpu0: float, timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
        """What a run leaves beside its output once its shards are done: the merged output (or the partial one),
        the card of a complete dataset, and the manifest, written last, which vouches for both."""
        if status == "interrupted":
            # Shards abandoned in flight may have committed all the same: the manifest counts what is on disk.
            self.store.load_committed()
        else:
            merge_started = time.monotonic()
            self.merge(partial=status != "complete")
            timings["merge"] = time.monotonic() - merge_started
        timings["driver_cpu"] = time.process_time() - cpu0
        manifest = self.manifest(server_info, started_at, time.monotonic() - t0, status, timings)
        manifest["error"] = str(error) if error is not None and status != "interrupted" else None
        if status == "complete":
            manifest["card"] = self.write_card(manifest).name
        manifest["output_file_stats"] = self.output_stats  # what the next run finds the job's own (sdg_job.outputs)
        atomic_write(self.recipe.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        note_stats(self.recipe, [self.recipe.manifest_path])
        return manifest

    def write_card(self, manifest: dict[str, Any]) -> Path:
        """The Hugging Face dataset card, in the first of `card_places` that is free or holds this output's card."""
        out = self.recipe.output_path
        readme, own_name = card_places(out)
        path = readme if not readme.exists() or holds_card_of(readme, out) else own_name
        with self.recipe.output_files[0].open(encoding="utf-8") as f:
            samples = [json.loads(line) for line in itertools.islice(f, SHOWN)]
        # Types each shard worker found over its records, for the shards the output took records from; a shard
        # committed by a version that found none leaves the features to datasets.
        columns: Columns | None = {}
        for shard_id in self.output_shards:
            found = self.summaries[shard_id].get("columns")
            columns = None if columns is None or found is None else merge_columns(columns, found)
        atomic_write(path, dataset_card(manifest, samples, manifest["output_files"], columns))
        return path


def model_entry(recipe: Recipe, alias: str) -> dict[str, Any]:
    """What the manifest says of a model: where its requests went; a served one by the name it was served under
    (and, with several servers per node, which of them)."""
    entry = {**recipe.models[alias].model_dump(mode="json"), "provider": recipe.provider_of(alias)}
    if entry["provider"] == "local":
        server = recipe.server_of(alias)
        entry["model"] = recipe.servers[server].served_model_name
        if isinstance(recipe.serve, ServeGroup):
            entry["server"] = server
    return entry


def usage_by_alias(summaries) -> dict[str, dict[str, int]]:
    """Requests answered and tokens per model alias, over every committed shard (a shard of an older version, which
    did not count them, adds nothing)."""
    total: dict[str, Counter[str]] = {}
    for x in summaries:
        for alias, usage in (x.get("usage") or {}).items():
            total.setdefault(alias, Counter()).update(usage)
    return {alias: dict(usage) for alias, usage in sorted(total.items())}


def client_cpu(timings: dict[str, float], summaries, records: int) -> dict[str, Any]:
    """Client cost: CPU seconds of the driver and of every shard worker (all their threads). `steady_ms_per_record`
    leaves out what a job pays once whatever its size (driver start-up, each worker importing Data Designer)."""
    summaries = list(summaries)
    seconds = {
        "driver_startup": timings.get("driver_cpu_startup", 0.0),
        "driver_loop": timings.get("driver_cpu", 0.0) - timings.get("driver_cpu_startup", 0.0),
        "worker_engine_load": sum(x.get("engine_load_cpu_s", 0.0) for x in summaries),
        "shards": sum(x.get("cpu_s", 0.0) for x in summaries),
    }
    per_record = (lambda cpu: round(1000 * cpu / records, 3)) if records else (lambda cpu: None)
    return {
        "ms_per_record": per_record(sum(seconds.values())),
        "steady_ms_per_record": per_record(seconds["driver_loop"] + seconds["shards"]),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def budget_advice(dropped: Counter[str]) -> str:
    """Raising the budget helps when records were made and then failed the recipe's checks, not when requests
    failed (the cause is the endpoint's, and more attempts only fail the same way)."""
    failed_requests = sum(n for reason, n in dropped.items() if reason in REQUEST_CAUSES)
    if failed_requests * 2 > sum(dropped.values()):
        causes = ", ".join(f"{r} {n}" for r, n in dropped.most_common() if r in REQUEST_CAUSES)
        return (f"most were lost to failed requests ({causes}; the manifest's request_errors), which a larger "
                "generation.budget would not cure: fix the endpoint")  # fmt: skip
    return "raise generation.budget or fix the recipe (the manifest's dropped says why records failed)"


class BudgetExhausted(Exception):
    def __init__(self, valid: int, attempted: int):
        self.valid, self.attempted = valid, attempted


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


@contextlib.contextmanager
def _keeping_our_sigterm_handler() -> Iterator[None]:
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


def run(recipe: Recipe, source: str, fresh: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the manifest. Raises RecipeError (exit 2) when another driver holds the run dir,
    Interrupted (exit 128 + signal) on SIGTERM, SIGINT or SIGHUP, JobError (exit 1) when it cannot finish."""
    check_outside(recipe, source)
    check_output_path(recipe, source)
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
            with _keeping_our_sigterm_handler():
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
            with JobProgress(recipe.num_records) as progress:
                job.run(nodes, progress, still_ours)
            timings["generation"] = time.monotonic() - t0 - timings["servers_ready"]
    except BudgetExhausted as e:
        status = "budget_exhausted"
        error = JobError(
            f"budget exhausted: {e.attempted} records attempted (generation.budget={recipe.generation.budget} × "
            f"{recipe.num_records}) gave only {e.valid} valid records. They are kept in "
            f"{recipe.output_path}.partial; {budget_advice(job.store.dropped)}, then re-run to continue."
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
    manifest = job.finish(status, error, server_info, started_at, t0, cpu0, timings)
    if error is not None:
        raise error
    assert manifest["records"] == recipe.num_records
    return manifest


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
        return store.records(shard.id), summary["dropped"]
