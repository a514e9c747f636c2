"""Seed JSONL: parsed once, strictly, with errors that name the line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

from sdg_job.errors import RecipeError


def read_seed_rows(path: Path, required_fields: Collection[str] = ()) -> list[dict]:
    """Every non-blank line must be a JSON object carrying all `required_fields`."""
    if not path.is_file():
        raise RecipeError(str(path), "", "seed file not found (seed_dataset.path)")
    rows: list[dict] = []
    required = set(required_fields)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(str(path), f"line {lineno}", f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RecipeError(str(path), f"line {lineno}", "each line must be a JSON object")
            missing = required - row.keys()
            if missing:
                raise RecipeError(str(path), f"line {lineno}", f"missing seed field(s) {sorted(missing)}")
            rows.append(row)
    if not rows:
        raise RecipeError(str(path), "", "seed file has no records")
    return rows


def seed_fields(rows: list[dict]) -> list[str]:
    """The first row's fields: every row must carry them (checked with `required_fields`)."""
    return list(rows[0])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
