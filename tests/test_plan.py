"""The plan splits num_records into shards deterministically, each with its own slice of the seed data."""

from __future__ import annotations

from sdg_job.plan import plan_shards, top_up_size


def test_shard_sizes_cover_exactly_num_records() -> None:
    shards = plan_shards(1003, 250, n_seed_rows=56)
    assert [s.size for s in shards] == [250, 250, 250, 250, 3]
    assert [s.id for s in shards] == [f"shard-0000{i}" for i in range(5)]
    assert all(len(s.seed_rows) == s.size for s in shards)


def test_same_inputs_give_the_same_plan_and_distinct_shard_seeds() -> None:
    a = plan_shards(40, 10, n_seed_rows=56, strategy="shuffle", base_seed=7)
    assert a == plan_shards(40, 10, n_seed_rows=56, strategy="shuffle", base_seed=7)
    assert a != plan_shards(40, 10, n_seed_rows=56, strategy="shuffle", base_seed=8)
    assert len({s.random_seed for s in a}) == len(a)


def test_ordered_gives_disjoint_ranges_while_rows_last() -> None:
    shards = plan_shards(40, 10, n_seed_rows=56, strategy="ordered")
    used = [r for s in shards for r in s.seed_rows]
    assert used == list(range(40))


def test_shuffle_uses_every_row_once_before_repeating() -> None:
    shards = plan_shards(112, 25, n_seed_rows=56, strategy="shuffle", base_seed=1)
    used = [r for s in shards for r in s.seed_rows]
    assert sorted(used[:56]) == list(range(56)) and sorted(used[56:]) == list(range(56))
    assert used[:56] != list(range(56))


def test_top_up_covers_the_gap_at_the_observed_yield() -> None:
    assert top_up_size(missing=5, valid=50, requested=100, shard_size=100) == 10
    assert top_up_size(missing=5, valid=0, requested=100, shard_size=100) == 25
    assert top_up_size(missing=500, valid=90, requested=100, shard_size=100) == 100
