"""The manifest written beside every output: what the run vouches for (resolved recipe with secrets masked, hashes,
models, servers, versions, counts, drops by reason, tokens, timings, client CPU), built from the recipe and the
shards committed in the run dir."""

from __future__ import annotations

import platform
import resource
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdg_job.config import Recipe, ServeGroup, recipe_dict, recipe_hash
from sdg_job.decontaminate import file_info
from sdg_job.diversity import distinct_n, merge_spreads
from sdg_job.seeds import file_sha256
from sdg_job.store import RunStore
from sdg_job.summary import ShardSummary
from sdg_job.tokens import tokenizer_name

if TYPE_CHECKING:
    from sdg_job.job import Job

PACKAGES = ("sdg-job", "data-designer", "ray", "omegaconf", "pydantic", "httpx")
RSS_UNITS_PER_MB = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_manifest(
    job: Job, server_info: list[dict], started_at: datetime, wall: float, status: str, timings: dict[str, float]
) -> dict[str, Any]:
    """What a run vouches for, from the recipe and the shards committed in the run dir (none of it is kept in
    the driver's memory but the store's index)."""
    recipe, summaries, ids = job.recipe, job.summaries, job.committed_ids()
    records, passed = job.store.unique_count(ids, recipe.num_records)
    dropped: Counter[str] = Counter()
    for x in summaries.values():
        dropped.update(x.dropped)
    dropped.update(passed)  # duplicate, near_duplicate
    tokens_out = sum(x.output_tokens for x in summaries.values())
    request_errors: Counter[str] = Counter()
    for x in summaries.values():
        request_errors.update(x.request_errors)
    return {
        "status": status,
        "recipe": recipe.name,
        "recipe_file": job.source,
        "recipe_sha256": recipe_hash(recipe),
        "resolved_recipe": recipe_dict(recipe),
        "seed": seed_info(recipe, len(job.seed_rows)),
        "provider": recipe.provider,
        "models": {alias: model_entry(recipe, alias) for alias in recipe.models},
        "servers": server_info,
        "versions": versions(),
        "output_path": str(recipe.output_path),
        "output_files": [path.name for path in recipe.output_files] if status == "complete" else [],
        "output_bytes": sum(path.stat().st_size for path in recipe.output_files) if status == "complete" else 0,
        "num_records": recipe.num_records,
        "records": records,
        "attempted": job.attempted(),
        "generated": sum(x.generated for x in summaries.values()),
        "dropped": dict(sorted(dropped.items())),
        "request_errors": dict(sorted(request_errors.items())),  # failed requests by cause (a row may have several)
        "retries": len(job.failures),
        "failures": job.failures,
        "server_restarts": sum(s.get("restarts", 0) for s in server_info),
        "tokens": {"input": sum(x.input_tokens for x in summaries.values()), "output": tokens_out},
        "usage": usage_by_alias(summaries.values()),
        "record_tokens": record_tokens(recipe, job.store, ids),
        "decontamination": decontamination(recipe, [summaries[i] for i in ids]),
        "diversity": {
            "near_duplicates": passed["near_duplicate"],
            "samplers": merge_spreads([summaries[i].sampled for i in ids]),
            "generated_text": distinct_n(recipe.output_files if status == "complete" else [partial_path(recipe)]),
        },
        "shards": [summaries[i].manifest_entry() for i in ids],
        "shards_skipped_on_resume": job.skipped,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 2),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "records_per_s": round(records / wall, 3) if wall else None,
        "output_tokens_per_s": round(tokens_out / wall, 1) if wall else None,
        "client_cpu": client_cpu(timings, summaries.values(), records),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RSS_UNITS_PER_MB, 1),
    }


def record_tokens(recipe: Recipe, store: RunStore, ids: list[str]) -> dict[str, Any] | None:
    """The spread of the output's records in tokens, as a trainer sees them (sdg_job.tokens), if counted."""
    counts = store.record_tokens(ids, recipe.num_records)
    if counts is None or not len(counts):
        return None
    p50, p95 = np.percentile(counts, [50, 95], method="higher")
    server = recipe.counting_server
    return {"tokenizer": tokenizer_name(recipe.servers[server] if server else None), "records": len(counts),
            "min": int(counts.min()), "p50": int(p50), "p95": int(p95), "max": int(counts.max())}  # fmt: skip


def decontamination(recipe: Recipe, summaries: list) -> list[dict[str, Any]]:
    """Each evaluation file: its sha256 and how many records it removed."""
    removed: Counter[str] = Counter()
    for summary in summaries:
        removed.update(summary.contaminated)
    return [{**file_info(path), "records_removed": removed[str(path)]} for path in recipe.quality.decontaminate]


def partial_path(recipe: Recipe) -> Path:
    return recipe.output_path.with_name(recipe.output_path.name + ".partial")


def seed_info(recipe: Recipe, rows: int) -> dict | None:
    seed = recipe.seed_dataset
    if seed is None:
        return None
    return {"path": str(seed.path), "sha256": file_sha256(seed.path), "rows": rows,
            "strategy": seed.strategy}  # fmt: skip


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


def usage_by_alias(summaries: Iterable[ShardSummary]) -> dict[str, dict[str, int]]:
    """Requests answered and tokens per model alias, over every committed shard (a shard of an older version, which
    did not count them, adds nothing)."""
    total: dict[str, Counter[str]] = {}
    for x in summaries:
        for alias, usage in x.usage.items():
            total.setdefault(alias, Counter()).update(usage)
    return {alias: dict(usage) for alias, usage in sorted(total.items())}


def client_cpu(timings: dict[str, float], summaries: Iterable[ShardSummary], records: int) -> dict[str, Any]:
    """Client cost: CPU seconds of the driver and of every shard worker (all their threads). `steady_ms_per_record`
    leaves out what a job pays once whatever its size (driver start-up, each worker importing Data Designer)."""
    summaries = list(summaries)
    seconds = {
        "driver_startup": timings.get("driver_cpu_startup", 0.0),
        "driver_loop": timings.get("driver_cpu", 0.0) - timings.get("driver_cpu_startup", 0.0),
        "worker_engine_load": sum(x.engine_load_cpu_s for x in summaries),
        "shards": sum(x.cpu_s for x in summaries),
    }
    per_record = (lambda cpu: round(1000 * cpu / records, 3)) if records else (lambda cpu: None)
    return {
        "ms_per_record": per_record(sum(seconds.values())),
        "steady_ms_per_record": per_record(seconds["driver_loop"] + seconds["shards"]),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
