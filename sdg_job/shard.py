"""One shard, where it runs: generate → project → commit. Below both the driver (job.py) and the Ray layer
(cluster.py), which only decide where and when a shard runs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from sdg_job import near_dupes
from sdg_job.card import column_types
from sdg_job.config import Recipe
from sdg_job.config.dd_shape import columns_as_dd
from sdg_job.config.secrets import without_userinfo
from sdg_job.decontaminate import split_clean
from sdg_job.diversity import sampler_spread
from sdg_job.endpoints import Routes, redact
from sdg_job.errors import ServerUnavailable
from sdg_job.generate import generate, load_engine
from sdg_job.plan import Shard
from sdg_job.project import project_rows, scaffolding_labels
from sdg_job.store import RunStore
from sdg_job.summary import ShardSummary
from sdg_job.tokens import record_tokens


def run_shard(
    recipe: Recipe,
    shard: Shard,
    seed_rows: list[dict],
    routes: Routes,
    store: RunStore,
    attempt: int = 0,
    server_ok: Callable[[], bool] | None = None,
    node_id: str | None = None,
) -> ShardSummary:
    """Generate, project and commit one shard; returns its summary. Commits nothing if the server died.
    `seed_rows` are this shard's own, one per record (`Shard.seed_rows` picks them)."""
    if (committed := store.committed(shard.id)) is not None:  # an attempt the driver thought lost committed it
        return committed
    engine_load_cpu = load_engine()
    started, cpu_started = time.monotonic(), time.process_time()
    work_dir = store.run_dir / "dd" / f"{shard.id}.{attempt}"
    result = generate(recipe, routes, shard.size, seed_rows or None, work_dir, shard.random_seed)
    if server_ok is not None and not server_ok():
        urls = ", ".join(e.url for e in routes.own.values()) or "the server"
        raise ServerUnavailable(f"{urls} stopped answering during {shard.id}")
    labels = scaffolding_labels(recipe)
    records, dropped = project_rows(recipe.output_projection, result.rows, recipe.filters, labels)
    dropped.update(result.reasons)
    quality = recipe.quality
    removed: dict[str, int] = {}
    if quality.decontaminate:
        records, removed = split_clean(records, quality.decontaminate, quality.decontaminate_ngram)
        if removed:
            dropped["contaminated"] += sum(removed.values())
    summary = ShardSummary(
        shard=shard.id,
        requested=shard.size,
        generated=len(result.rows),
        valid=len(records),
        dropped=dict(dropped),
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        usage=result.usage,
        seconds=round(time.monotonic() - started, 3),
        cpu_s=round(time.process_time() - cpu_started, 3),
        engine_load_cpu_s=round(engine_load_cpu, 3),
        retries=attempt,
        random_seed=shard.random_seed,
        endpoint=without_userinfo(routes.endpoints[0].url) if routes.endpoints else "",  # "": no model asked
        endpoints={alias: without_userinfo(e.url) for alias, e in routes.by_alias.items()},
        worker=f"{os.uname().nodename}:{os.getpid()}",
        node_id=node_id,
        error=result.error,
        request_errors=result.request_errors,
        request_error=redact_keys(result.request_error, routes),
        request_error_provider=result.request_error_provider,
        columns=column_types(records),  # for the dataset card's features, found here rather than by the driver
        sampled=sampler_spread(result.rows, samplers(recipe)),
        contaminated=removed,
    )
    # Counted by the job's own server, which knows the model's tokenizer (a remote provider exposes none).
    server = recipe.counting_server
    tokens = None
    if server is not None and server in routes.own:
        tokens = record_tokens(recipe.servers[server], routes.own[server], recipe.output_projection, records)
    sigs = near_dupes.signatures(records, quality.ngram) if quality.near_duplicates is not None else None
    committed = store.commit(shard.id, records, summary, tokens, sigs)
    shutil.rmtree(work_dir, ignore_errors=True)
    return committed


def samplers(recipe: Recipe) -> list[str]:
    return [c["name"] for c in columns_as_dd(recipe) if isinstance(c, dict) and c.get("column_type") == "sampler"]


def redact_keys(text: str | None, routes: Routes) -> str | None:
    for endpoint in routes.endpoints:
        text = redact(text, os.environ.get(endpoint.api_key_env or ""))
    return text
