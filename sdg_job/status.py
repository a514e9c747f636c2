"""Where a run stands, from its run dir alone: no Ray, no attach, from any machine that sees the shared storage.

The driver keeps `status.json` in the run dir (at most every EVERY_S while shards commit, and once when it ends):
records done of N, its rate since it started, drop reasons, every node's servers and their restarts, the last
error. `python -m sdg_job status RUN_DIR_OR_OUTPUT` reads it beside the lease (is the driver still alive?) and the
manifest (how the run ended), so it answers while the job runs and after it ended in any way, a SIGKILL included.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdg_job.errors import RecipeError
from sdg_job.lease import LEASE_FILE, stale_reason
from sdg_job.store import RunStore, atomic_write

if TYPE_CHECKING:
    from sdg_job.job import Job

STATUS_FILE = "status.json"
EVERY_S = 2.0  # a write is a few KB; often enough for a person, rare enough for shared storage


class StatusFile:
    """The driver's side: what `status` reads, kept up to date as shards commit."""

    def __init__(self, job: Job):
        self.path = job.store.run_dir / STATUS_FILE
        self.started_s = time.time()
        self.started_at = datetime.fromtimestamp(self.started_s, timezone.utc).isoformat(timespec="seconds")
        # A resumed run's rate counts only its own records.
        self.valid_at_start = min(job.store.totals["valid"], job.recipe.num_records)
        self.written = 0.0

    def update(self, job: Job, nodes: list, state: str = "running", error: str | None = None) -> None:
        now = time.monotonic()
        if state == "running" and now - self.written < EVERY_S:
            return
        self.written = now
        n, valid = job.recipe.num_records, min(job.store.totals["valid"], job.recipe.num_records)
        rate, eta = _pace(n, valid, self.valid_at_start, time.time() - self.started_s)
        status = {
            "state": state,
            "output": str(job.recipe.output_path),
            "num_records": n,
            "records": valid,
            "attempted": job.store.totals["requested"],
            "dropped": dict(job.store.dropped.most_common()),
            "shards": {"committed": len(job.summaries), "planned": len(job.shards)},
            "retries": len(job.failures),
            "records_per_s": rate,
            "eta_s": eta if state == "running" else None,
            "started_at": self.started_at,
            "started_s": self.started_s,
            "records_at_start": self.valid_at_start,
            "updated_at": time.time(),
            "nodes": [{"node_id": node.node_id, "lost": node.lost, "servers": node.info} for node in nodes],
            "last_failure": job.failures[-1] if job.failures else None,
            "error": error,
        }
        atomic_write(self.path, json.dumps(status, indent=2, default=str) + "\n")


def _pace(n: int, done: int, at_start: int, elapsed_s: float) -> tuple[float, int | None]:
    """Records per second since the driver started (a resumed run counts only its own), and the seconds left at
    that rate (None before the first record)."""
    rate = (done - at_start) / max(elapsed_s, 1e-6)
    return round(rate, 3), round((n - done) / rate) if rate > 0 else None


def run_dir_of(place: Path) -> Path:
    """The run dir `place` names: the run dir itself, an output file (its `.<stem>.run` beside it), or a directory
    holding exactly one run dir (NEMO_RUN_DIR/sdg)."""
    if (place / STATUS_FILE).is_file() or (place / "run.json").is_file():
        return place
    if place.suffix and (beside := place.parent / f".{place.stem}.run").is_dir():
        return beside
    if place.is_dir() and len(found := sorted(place.glob(".*.run"))) == 1:
        return found[0]
    raise RecipeError(str(place), "", "no run dir here: give a run dir (.NAME.run), an output file or the directory "
                                      "holding one run")  # fmt: skip


def read(place: Path) -> dict[str, Any]:
    """The run's status, with `driver`: running (a live lease), or why no driver runs it now."""
    run_dir = run_dir_of(place)
    path = run_dir / STATUS_FILE
    if not path.is_file():
        raise RecipeError(str(run_dir), STATUS_FILE, "not written yet: the driver has not started its shards")
    status = json.loads(path.read_text())
    status["run_dir"] = str(run_dir)
    # The committed shards are the truth: status.json may be up to EVERY_S behind them, and a killed driver's is.
    store = RunStore(run_dir)
    store.load_committed()
    status["records"] = min(store.totals["valid"], status["num_records"])
    status["attempted"], status["dropped"] = store.totals["requested"], dict(store.dropped.most_common())
    status["shards"]["committed"] = len(store.summaries)
    if status["state"] == "running" and "started_s" in status:
        elapsed = time.time() - status["started_s"]
        pace = _pace(status["num_records"], status["records"], status["records_at_start"], elapsed)
        status["records_per_s"], status["eta_s"] = pace
    lease_path = run_dir / LEASE_FILE
    holder = json.loads(lease_path.read_text()) if lease_path.is_file() else None
    stale = stale_reason(holder) if holder is not None else None
    if holder is not None and stale is None:
        status["driver"] = f"running (host {holder.get('host')}, pid {holder.get('pid')})"
    else:
        status["driver"] = "not running" + (f": {stale}" if holder is not None and stale else "")
        if status["state"] == "running":  # it ended without saying so: killed, or its node lost
            status["state"], status["eta_s"] = "stopped", None
    return status


def render(status: dict[str, Any]) -> str:
    """Plain lines for a terminal or a log."""
    n, done = status["num_records"], status["records"]
    lines = [
        f"run dir: {status['run_dir']}",
        f"state:   {status['state']} · driver {status['driver']}",
        f"records: {done}/{n} ({100 * done / n:.0f}%) · attempted {status['attempted']} · shards "
        f"{status['shards']['committed']}/{status['shards']['planned']} · retries {status['retries']}",
    ]
    if status["state"] == "running":
        eta = "unknown" if status["eta_s"] is None else _duration(status["eta_s"])
        lines.append(f"rate:    {status['records_per_s']:.2f} records/s · ETA {eta}")
    age = _duration(time.time() - status["updated_at"])
    lines.append(f"updated: {age} ago (started {status['started_at']})")
    dropped = ", ".join(f"{reason} {count}" for reason, count in status["dropped"].items()) or "none"
    lines.append(f"dropped: {dropped}")
    for node in status["nodes"]:
        for server in node["servers"]:
            where = server.get("slurm_node") or server.get("host")
            lost = f" · LOST: {node['lost']}" if node["lost"] else ""
            lines.append(f"server:  {where} {server.get('name')} {server.get('engine')} {server.get('endpoint')} · "
                         f"restarts {server.get('restarts', 0)}{lost}")  # fmt: skip
    if status["last_failure"]:
        f = status["last_failure"]
        lines.append(f"last failed shard: {f['shard']} attempt {f['attempt']} ({f['error']})")
    if status["error"]:
        lines.append(f"error:   {status['error']}")
    lines.append(f"output:  {status['output']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
