"""One live progress line for the whole job (on stderr), and nothing else while shards run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from sdg_job.job import Job


def console() -> Console:
    """stderr; in a log file (Slurm's, docker logs) rich would assume 80 columns and cut the line to fit."""
    term = Console(stderr=True)
    return term if term.is_terminal else Console(stderr=True, width=400)


class JobProgress:
    def __init__(self, num_records: int):
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("records {task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console(),
            transient=False,
        )
        self.task = self.progress.add_task("records", total=num_records, stats="")

    def update(self, job: Job) -> None:
        totals = job.store.totals  # kept by the store as shards commit: no pass over every shard on each turn
        valid, tokens = totals["valid"], totals["output_tokens"]
        dropped = totals["requested"] - valid
        why = ", ".join(f"{reason} {n}" for reason, n in job.store.dropped.most_common(3))
        elapsed = max(time.monotonic() - self.started, 1e-6)
        stats = (
            f"· shards {len(job.summaries)}/{len(job.shards)} · dropped {dropped}{f' ({why})' if why else ''} · "
            f"retries {len(job.failures)} · "
            f"{valid / elapsed:.1f} rec/s · {tokens / elapsed:.0f} tok/s ·"
        )
        self.progress.update(self.task, completed=min(valid, job.recipe.num_records), stats=stats)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
