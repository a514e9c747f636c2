"""The run directory on disk: shard files committed atomically, the recipe identity, the final merge.

A shard is complete when its `.json` summary exists; it is written (atomically) only after the shard's records
are on disk, so a crash at any moment leaves each shard complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sdg_job.errors import RecipeError


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file beside `path`, fsync it, rename over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


class RunStore:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.shards_dir = run_dir / "shards"
        self.logs_dir = run_dir / "logs"

    def open(self, recipe_hash: str, fresh: bool, source: str, keep: tuple[str, ...] = ()) -> None:
        """Claim the run dir for this recipe; refuse one made by a different recipe unless `fresh`, which wipes
        it all but `keep` (the lease this driver holds: wiping it would let a second driver in)."""
        identity = self.run_dir / "run.json"
        if identity.exists() and not fresh:
            old = json.loads(identity.read_text()).get("recipe_sha256")
            if old != recipe_hash:
                raise RecipeError(
                    source,
                    "",
                    f"{self.run_dir} holds shards of a different recipe (sha256 {old[:12]}…, now {recipe_hash[:12]}…). "
                    "Re-run with --fresh to discard them, or set a different output_path.",
                )
        if fresh and self.run_dir.exists():
            for path in self.run_dir.iterdir():
                if path.name in keep:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if not identity.exists():
            atomic_write(identity, json.dumps({"recipe_sha256": recipe_hash}) + "\n")

    def records_path(self, shard_id: str) -> Path:
        return self.shards_dir / f"{shard_id}.jsonl"

    def summary_path(self, shard_id: str) -> Path:
        return self.shards_dir / f"{shard_id}.json"

    def commit(self, shard_id: str, records: list[dict], summary: dict[str, Any]) -> None:
        atomic_write(self.records_path(shard_id), jsonl(records))
        atomic_write(self.summary_path(shard_id), json.dumps(summary, indent=1) + "\n")

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Every committed shard's summary by shard id, in id order (an incomplete shard has none)."""
        return {path.stem: json.loads(path.read_text()) for path in sorted(self.shards_dir.glob("shard-*.json"))}

    def records(self, shard_id: str) -> list[dict]:
        with self.records_path(shard_id).open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def unique_records(store: RunStore, shard_ids: list[str], limit: int | None = None) -> tuple[list[dict], int]:
    """Records of the given complete shards in plan order, without exact duplicates; and how many were dupes."""
    seen: set[str] = set()
    out: list[dict] = []
    dupes = 0
    for shard_id in shard_ids:
        for record in store.records(shard_id):
            key = json.dumps(record, sort_keys=True, ensure_ascii=False)
            if key in seen:
                dupes += 1
                continue
            seen.add(key)
            out.append(record)
            if limit is not None and len(out) == limit:
                return out, dupes
    return out, dupes
