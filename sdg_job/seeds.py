"""Seed JSONL: parsed once, strictly, with errors that name the line."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from sdg_job.errors import RecipeError

if TYPE_CHECKING:
    from sdg_job.config import SeedDataset
    from sdg_job.plan import Strategy


def read_seed_rows(path: Path, required_fields: Collection[str] = ()) -> list[dict]:
    """Every non-blank line must be a JSON object carrying all `required_fields`. UTF-8, with or without the
    byte-order mark spreadsheet exports write."""
    if not path.is_file():
        raise RecipeError(str(path), "", "seed file not found (seed_dataset.path)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(str(path), "", f"cannot read the seed file: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise RecipeError(
            str(path), f"line {lineno}", f"not UTF-8 text (byte 0x{data[e.start]:02x}): save the file as UTF-8"
        ) from None
    rows: list[dict] = []
    required = set(required_fields)
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):  # newlines as in text mode
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            json.dumps(row, ensure_ascii=False).encode()  # a lone surrogate (\ud800) could never be written out
        except json.JSONDecodeError as e:
            raise RecipeError(str(path), f"line {lineno}", f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise RecipeError(str(path), f"line {lineno}", "not valid JSON (nested too deeply)") from None
        except UnicodeEncodeError:
            raise RecipeError(str(path), f"line {lineno}", "has a lone UTF-16 surrogate escape (\\udXXX)") from None
        if not isinstance(row, dict):
            raise RecipeError(str(path), f"line {lineno}", "each line must be a JSON object")
        missing = required - row.keys()
        if missing:
            raise RecipeError(str(path), f"line {lineno}", f"missing seed field(s) {sorted(missing)}")
        rows.append(row)
    if not rows:
        raise RecipeError(str(path), "", "seed file has no records")
    return rows


def seed_fields(rows: list[dict], chosen: list[str] | None = None) -> list[str]:
    """The fields a recipe sees: `seed_dataset.fields` if given, else the first row's; every row must carry them
    (checked with `required_fields`)."""
    return list(chosen) if chosen else list(rows[0])


def load_seeds(spec: SeedDataset | None) -> tuple[list[dict], Strategy]:
    """The seed rows a job uses (only the chosen fields) and how records draw them (a plan strategy)."""
    if spec is None:
        return [], "ordered"
    rows = read_seed_rows(spec.path)
    fields = seed_fields(rows, spec.fields)
    rows = [{f: row[f] for f in fields} for row in read_seed_rows(spec.path, required_fields=fields)]
    return rows, "with_replacement" if spec.with_replacement else spec.strategy


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
