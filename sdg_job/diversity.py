"""How varied a dataset is, for the manifest and the card: the spread of each sampler's values (counted where each
shard ran, over every row it generated) and distinct-n of the records' generated text (over the first
DISTINCT_SAMPLE records of the output, so the driver's memory stays bounded at any N)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from sdg_job.near_dupes import WORD, record_text

MAX_VALUES = 50  # distinct values kept per sampler and shard; the rest are counted as "(other)"
DISTINCT_SAMPLE = 10_000


def sampler_spread(rows: list[dict], samplers: list[str]) -> dict[str, dict[str, Any]]:
    """Per sampler column: counts of its values (text, flags), or min / max / sum / n (numbers)."""
    spread: dict[str, dict[str, Any]] = {}
    for name in samplers:
        values = [row[name] for row in rows if name in row]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            spread[name] = {"min": min(numbers), "max": max(numbers), "sum": sum(numbers), "n": len(numbers)}
        elif values:
            counts = Counter(v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in values)
            kept = dict(counts.most_common(MAX_VALUES))
            if other := sum(counts.values()) - sum(kept.values()):
                kept["(other)"] = other
            spread[name] = {"counts": kept}
    return spread


def merge_spreads(spreads: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for spread in spreads:
        for name, found in spread.items():
            into = merged.setdefault(name, {})
            if "counts" in found:
                into["counts"] = dict(Counter(into.get("counts", {})) + Counter(found["counts"]))
            else:
                into["min"] = min(into.get("min", found["min"]), found["min"])
                into["max"] = max(into.get("max", found["max"]), found["max"])
                into["sum"], into["n"] = into.get("sum", 0) + found["sum"], into.get("n", 0) + found["n"]
    for found in merged.values():
        if "n" in found:
            found["mean"] = round(found.pop("sum") / found["n"], 4)
        else:
            found["counts"] = dict(sorted(found["counts"].items(), key=lambda kv: -kv[1]))
    return merged


def distinct_n(paths: list[Path], limit: int = DISTINCT_SAMPLE) -> dict[str, Any]:
    """distinct-1 and distinct-2 (distinct word n-grams over all of them) of the records' generated text."""
    grams: dict[int, set[tuple[str, ...]]] = {1: set(), 2: set()}
    totals = Counter[int]()
    records = 0
    for path in paths:
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as f:
            for line in itertools.islice(f, limit - records):
                words = WORD.findall(record_text(json.loads(line)).lower())
                for n in grams:
                    found = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
                    grams[n].update(found)
                    totals[n] += len(found)
                records += 1
    result: dict[str, Any] = {"records": records}
    for n in grams:
        result[f"distinct_{n}"] = round(len(grams[n]) / totals[n], 4) if totals[n] else None
    return result
