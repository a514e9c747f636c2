"""Near-duplicate records, across the whole dataset: MinHash over word n-grams (datasketch), LSH bands to find
candidates, the MinHash estimate of the Jaccard similarity to confirm them.

Each shard's worker signs its records (`signatures`, NUM_PERM × 4 bytes a record, on disk beside them); the driver
holds only their band hashes (`bands`, 8 bytes a band) and reads the signatures of candidate pairs back from disk.
A record is a near-duplicate when it shares a band with an earlier record in plan order whose estimated Jaccard
similarity reaches the threshold: the earlier one stays, so a resumed run keeps the same records.

A record's text is every string in it but its tools list, system messages, roles and ids: what a recipe holds the
same for every record would make them all alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import numpy as np

NUM_PERM = 128
SIGNATURE = np.dtype("<u4")  # one MinHash value (datasketch keeps them below 2^32)
BAND = np.dtype("<u8")
CONSTANT_KEYS = {"tools", "role", "type", "id", "tool_call_id"}
WORD = re.compile(r"\w+")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        if value.get("role") == "system":
            return
        for key, item in value.items():
            if key not in CONSTANT_KEYS:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def record_text(record: dict) -> str:
    return "\n".join(_strings(record))


def shingles(text: str, ngram: int) -> list[bytes]:
    """The record's word n-grams (lower case); a text shorter than `ngram` words is one shingle of all of them."""
    words = WORD.findall(text.lower())
    if len(words) <= ngram:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def signatures(records: list[dict], ngram: int) -> np.ndarray:
    """(records, NUM_PERM) MinHash signatures; the same record always gets the same one."""
    from datasketch import MinHash

    if not records:
        return np.zeros((0, NUM_PERM), dtype=SIGNATURE)
    hashes = MinHash.bulk([shingles(record_text(r), ngram) for r in records], num_perm=NUM_PERM, seed=1)
    return np.stack([h.hashvalues for h in hashes]).astype(SIGNATURE)


@cache
def band_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that balance missed and false candidates at `threshold` (datasketch's choice)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, NUM_PERM, 0.5, 0.5)


def bands(sigs: np.ndarray, threshold: float) -> np.ndarray:
    """(records, bands) hashes: records that share one are candidates."""
    b, r = band_shape(threshold)
    rows = sigs[:, : b * r].astype(BAND).reshape(len(sigs), b, r)
    weights = np.array([pow(1_000_003, k, 1 << 64) for k in range(r)], dtype=BAND)
    with np.errstate(over="ignore"):  # a polynomial hash, modulo 2^64 by design
        return (rows * weights).sum(axis=2, dtype=BAND)


def near_duplicates(
    band_hashes: np.ndarray,
    candidates: np.ndarray,
    signature_rows: Callable[[np.ndarray], np.ndarray],
    threshold: float,
) -> np.ndarray:
    """Which of the records (rows of `band_hashes`, in plan order) are near an earlier one; only rows where
    `candidates` is True are looked at (the first copies of exact duplicates) and compared."""
    n = len(band_hashes)
    order = np.arange(n)
    pairs: list[np.ndarray] = []
    for band in band_hashes.T:
        _, first, inverse = np.unique(band, return_index=True, return_inverse=True)
        earliest = first[inverse]
        later = np.flatnonzero(candidates & (earliest < order))
        pairs.append(np.stack([later, earliest[later]], axis=1))
    found = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)
    near = np.zeros(n, dtype=bool)
    if len(found):
        sigs = signature_rows(np.unique(found))
        index = {row: i for i, row in enumerate(np.unique(found))}
        a = sigs[[index[i] for i in found[:, 0]]]
        b = sigs[[index[i] for i in found[:, 1]]]
        similar = (a == b).mean(axis=1) >= threshold
        near[found[similar, 0]] = True
    return near
