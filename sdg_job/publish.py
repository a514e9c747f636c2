"""What a run leaves beside its output once its shards are done: the committed records merged into the output files
(or a partial output), the dataset card of a complete dataset, and the manifest, written last, which vouches for
both. Only at places sdg_job.outputs found the job's own."""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdg_job.card import SHOWN, Columns, card_places, dataset_card, holds_card_of, merge_columns
from sdg_job.manifest import build_manifest
from sdg_job.outputs import note_stats, note_written, written_before
from sdg_job.report import CHARTS, write_report
from sdg_job.report import places as report_places
from sdg_job.store import atomic_write, fsync_dir

if TYPE_CHECKING:
    from sdg_job.job import Job


def merge(job: Job, partial: bool) -> int:
    """Committed shards, in plan order, without duplicates, cut at num_records → the output files, atomically
    (a partial output is one file beside the output). Parts of an earlier layout of this output are removed."""
    out = job.recipe.output_path
    outputs = [out.with_name(out.name + ".partial")] if partial else job.recipe.output_files
    per_file = job.recipe.output_records_per_file if not partial else None
    n = job.recipe.num_records
    # The manifest, written last, vouches for the output, and the card describes it: neither while it is
    # replaced (several files cannot be renamed at once: a crash in between must not leave them over a mix).
    note_written(job.recipe, [*outputs, job.recipe.manifest_path])
    job.recipe.manifest_path.unlink(missing_ok=True)
    for card in card_places(out):
        if holds_card_of(card, out):
            card.unlink()
    fsync_dir(out.parent)
    count, job.output_shards = job.store.merge(job.committed_ids(), n, outputs, per_file or n)
    if not partial:
        for stale in set(written_before(job.recipe)) - {*outputs, job.recipe.manifest_path}:
            stale.unlink(missing_ok=True)  # parts of an earlier layout, or the .partial: the job's own
        job.store.sweep()  # the job is over: no attempt of it still runs
    job.output_stats = note_stats(job.recipe, outputs)
    return count


def finish(job: Job, status: str, error: Exception | None, server_info: list[dict], started_at: datetime,
           t0: float, cpu0: float, timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """What a run leaves beside its output once its shards are done: the merged output (or the partial one),
    the card of a complete dataset, and the manifest, written last, which vouches for both."""
    report = report_places(job.recipe.output_path)
    note_written(job.recipe, report)  # before a merge removes the manifest, which may vouch for an earlier output
    if status == "interrupted":
        # Shards abandoned in flight may have committed all the same: the manifest counts what is on disk.
        job.store.load_committed()
    else:
        merge_started = time.monotonic()
        merge(job, partial=status != "complete")
        timings["merge"] = time.monotonic() - merge_started
    timings["driver_cpu"] = time.process_time() - cpu0
    manifest = build_manifest(job, server_info, started_at, time.monotonic() - t0, status, timings)
    manifest["error"] = str(error) if error is not None and status != "interrupted" else None
    manifest["report"] = report[0].name
    manifest["report_charts"] = {path.name: title for path, title in zip(report[1:], CHARTS.values(), strict=True)}
    write_report(job, manifest)
    note_stats(job.recipe, report)
    if status == "complete":
        manifest["card"] = write_card(job, manifest).name
    manifest["output_file_stats"] = job.output_stats  # what the next run finds the job's own (sdg_job.outputs)
    atomic_write(job.recipe.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    note_stats(job.recipe, [job.recipe.manifest_path])
    job.status.update(job, job.nodes, status, manifest["error"])
    return manifest


def write_card(job: Job, manifest: dict[str, Any]) -> Path:
    """The Hugging Face dataset card, in the first of `card_places` that is free or holds this output's card."""
    out = job.recipe.output_path
    readme, own_name = card_places(out)
    path = readme if not readme.exists() or holds_card_of(readme, out) else own_name
    with job.recipe.output_files[0].open(encoding="utf-8") as f:
        samples = [json.loads(line) for line in itertools.islice(f, SHOWN)]
    # Types each shard worker found over its records, for the shards the output took records from; a shard
    # committed by a version that found none leaves the features to datasets.
    columns: Columns | None = {}
    for shard_id in job.output_shards:
        found = job.summaries[shard_id].columns
        columns = None if columns is None or found is None else merge_columns(columns, found)
    atomic_write(path, dataset_card(manifest, samples, manifest["output_files"], columns))
    return path
