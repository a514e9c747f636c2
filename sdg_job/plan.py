"""num_records → shards. Pure and deterministic: the same recipe always gives the same plan.

Records are numbered 0, 1, 2, …; shard i covers records [i·S, i·S + size). Record r takes seed row
`order[r mod n]`: for `ordered` the file order, for `shuffle` a permutation seeded by the recipe's random seed
(a fresh one per pass over the file). So no seed row repeats until every row has been used once, except with
`with_replacement`, where each record draws a row at random (seeded by the recipe's random seed and its number).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["shuffle", "ordered", "with_replacement"]


@dataclass(frozen=True)
class Shard:
    index: int
    size: int
    random_seed: int
    first_record: int  # records [first_record, first_record + size)
    n_seed_rows: int = 0
    strategy: Strategy = "shuffle"
    base_seed: int = 0

    @property
    def id(self) -> str:
        return shard_id(self.index)

    @property
    def seed_rows(self) -> tuple[int, ...]:
        """Indices into the seed file, one per record. Computed when asked, not held by the plan: a plan of
        millions of records stays a few bytes per shard, and only the shard being submitted pays for its rows."""
        if not self.n_seed_rows:
            return ()
        records = range(self.first_record, self.first_record + self.size)
        return tuple(_seed_row(r, self.n_seed_rows, self.strategy, self.base_seed) for r in records)


def shard_id(index: int) -> str:
    return f"shard-{index:05d}"


def shard_index(shard_id: str) -> int:
    return int(shard_id.removeprefix("shard-"))


def _seed_for(base: int, *parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, (base, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _seed_row(record: int, n_rows: int, strategy: Strategy, base_seed: int) -> int:
    if strategy == "with_replacement":
        return random.Random(_seed_for(base_seed, "seed-draw", record)).randrange(n_rows)
    epoch, pos = divmod(record, n_rows)
    if strategy == "ordered":
        return pos
    return _pass_order(n_rows, base_seed, epoch)[pos]


@functools.lru_cache(maxsize=2)  # a shard is in one pass or spans two: shuffle each pass once
def _pass_order(n_rows: int, base_seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_rows))
    random.Random(_seed_for(base_seed, "seed-order", epoch)).shuffle(order)
    return tuple(order)


def make_shard(index: int, size: int, shard_size: int, n_seed_rows: int, strategy: Strategy, base_seed: int) -> Shard:
    random_seed = _seed_for(base_seed, "shard", index)
    return Shard(index, size, random_seed, index * shard_size, n_seed_rows, strategy, base_seed)


def plan_shards(
    num_records: int,
    shard_size: int,
    n_seed_rows: int = 0,
    strategy: Strategy = "shuffle",
    base_seed: int = 0,
    stagger: tuple[int, int] = (1, 1),
) -> list[Shard]:
    """`stagger` = (workers per node, nodes), for nodes with several servers: the first wave, one shard per worker,
    is sized 1/W, 2/W, … of a shard on each node, so the workers' shards end at staggered times and from then on
    are in different columns at once. The rows of shards that start together reach each column, and so its server,
    at about the same time, and leave it idle while they are at the next one. Shard i still covers records from
    i·S (a short one leaves a gap in the numbers, as a top-up does)."""
    workers, nodes = stagger
    wave = [shard_size * (k + 1) // workers for _ in range(nodes) for k in range(workers)] if workers > 1 else []
    shards: list[Shard] = []
    left = num_records
    while left > 0:
        i = len(shards)
        size = min(max(1, wave[i]) if i < len(wave) else shard_size, left)
        shards.append(make_shard(i, size, shard_size, n_seed_rows, strategy, base_seed))
        left -= size
    return shards


def top_up_sizes(
    missing: int, valid: int, requested: int, shard_size: int, workers: int, budget_left: int
) -> list[int]:
    """Sizes of the next top-up shards: enough records to cover `missing` at the yield seen so far, at most a full
    shard per worker and within the budget, split evenly over up to `workers` so no node idles during a top-up."""
    yield_so_far = valid / requested if requested else 1.0
    total = max(1, min(shard_size * workers, budget_left, math.ceil(missing / max(yield_so_far, 0.2))))
    pieces = min(workers, total)
    return [total // pieces + (i < total % pieces) for i in range(pieces)]
