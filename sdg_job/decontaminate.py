"""Evaluation sets kept out of the training data (quality.decontaminate): a record that shares a run of `ngram`
words (13 by default, as NeMo-Skills and the GPT-3 paper count contamination) with any item of an evaluation file is
dropped as `contaminated` and topped up like any other drop.

An evaluation file is JSON Lines, Parquet or plain text; every string in it counts (a JSON record's every string
field, a text file's every line). Its n-grams are hashed to 8 bytes each and held as a sorted array, once per worker
process; a record is checked by hashing its own n-grams and searching them there. The seeds are checked the same
way before the run starts, so a seed row that carries benchmark text is named at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sdg_job.errors import RecipeError
from sdg_job.near_dupes import WORD, record_text

log = logging.getLogger("sdg_job")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_texts(path: Path) -> list[str]:
    """Every string of an evaluation file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [s for row in pq.read_table(path).to_pylist() for s in _strings(row)]
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError, ImportError) as e:
        raise RecipeError(str(path), "quality.decontaminate", f"cannot read it: {e}") from None
    if path.suffix in (".jsonl", ".json"):
        try:
            return [s for line in text.splitlines() if line.strip() for s in _strings(json.loads(line))]
        except json.JSONDecodeError as e:
            raise RecipeError(str(path), "quality.decontaminate", f"not JSON Lines: {e}") from None
    return text.splitlines()


def ngram_hashes(text: str, ngram: int) -> np.ndarray:
    """The 8-byte hashes of the text's runs of `ngram` words (lower case)."""
    words = WORD.findall(text.lower())
    grams = {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}
    digests = b"".join(hashlib.blake2b(g.encode(), digest_size=8).digest() for g in sorted(grams))
    return np.frombuffer(digests, dtype="<u8")


@cache
def eval_index(path: str, ngram: int) -> np.ndarray:
    """The sorted n-gram hashes of one evaluation file (once per process)."""
    found = [ngram_hashes(text, ngram) for text in eval_texts(Path(path))]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype="<u8")


def contaminating(text: str, paths: list[Path], ngram: int) -> str | None:
    """The first evaluation file `text` shares an n-gram with, or None."""
    mine = ngram_hashes(text, ngram)
    if not len(mine):
        return None
    for path in paths:
        index = eval_index(str(path), ngram)
        if len(index) and np.isin(mine, index, assume_unique=True).any():
            return str(path)
    return None


def split_clean(records: list[dict], paths: list[Path], ngram: int) -> tuple[list[dict], dict[str, int]]:
    """The records that share no n-gram with an evaluation file, and how many each file removed."""
    clean: list[dict] = []
    removed: dict[str, int] = {}
    for record in records:
        found = contaminating(record_text(record), paths, ngram)
        if found is None:
            clean.append(record)
        else:
            removed[found] = removed.get(found, 0) + 1
    return clean, removed


def file_info(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def preflight(recipe: Any, source: str) -> None:
    """Before the run: every evaluation file reads (exit 2 naming it if not), and the seed rows that carry
    evaluation text are named."""
    quality = recipe.quality
    for path in quality.decontaminate:
        eval_index(str(path), quality.decontaminate_ngram)
    if quality.decontaminate and recipe.seed_dataset is not None:
        from sdg_job.seeds import read_seed_rows

        rows = read_seed_rows(recipe.seed_dataset.path)
        check_seeds(rows, quality.decontaminate, quality.decontaminate_ngram, str(recipe.seed_dataset.path))


def check_seeds(rows: list[dict], paths: list[Path], ngram: int, source: str) -> list[int]:
    """The seed rows (0-based) that share an n-gram with an evaluation file; logged by line before the run."""
    found = []
    for i, row in enumerate(rows):
        if (hit := contaminating("\n".join(_strings(row)), paths, ngram)) is not None:
            found.append(i)
            if len(found) <= 10:
                log.warning("%s: seed line %d shares a %d-word run with %s; its records will be dropped as "
                            "contaminated", source, i + 1, ngram, hit)  # fmt: skip
    if len(found) > 10:
        log.warning("%s: %d seed lines in all share text with the evaluation sets", source, len(found))
    return found
