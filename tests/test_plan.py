"""The plan splits num_records into shards deterministically, each with its own slice of the seed data."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from sdg_job.card import column_types
from sdg_job.config import load_recipe
from sdg_job.job import Job
from sdg_job.manifest import build_manifest
from sdg_job.plan import plan_shards, shard_id, shard_index, top_up_sizes
from sdg_job.publish import merge, write_card
from tests.conftest import shard_summary


def test_shard_sizes_cover_exactly_num_records() -> None:
    shards = plan_shards(1003, 250, n_seed_rows=56)
    assert [s.size for s in shards] == [250, 250, 250, 250, 3]
    assert [s.id for s in shards] == [f"shard-0000{i}" for i in range(5)]
    assert all(len(s.seed_rows) == s.size for s in shards)


def test_several_servers_stagger_the_first_wave_of_each_node() -> None:
    """Three workers on each of two nodes: their first shards are a third, two thirds and a whole shard, so they
    end at different times (Data Designer runs a shard's columns in turn, and each column's server is another)."""
    shards = plan_shards(1000, 100, n_seed_rows=56, stagger=(3, 2))
    assert [s.size for s in shards[:7]] == [33, 66, 100, 33, 66, 100, 100] and sum(s.size for s in shards) == 1000
    assert [s.index for s in shards] == list(range(len(shards))) and shards[4].first_record == 400
    assert plan_shards(1000, 100, stagger=(3, 2)) == plan_shards(1000, 100, stagger=(3, 2))  # resume: the same
    assert [s.size for s in plan_shards(50, 100, stagger=(4, 1))] == [25, 25]  # a small job: the wave is all of it


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
    def sizes(missing: int, valid: int, workers: int = 1, budget_left: int = 10_000) -> list[int]:
        return top_up_sizes(missing, valid, requested=100, shard_size=100, workers=workers, budget_left=budget_left)

    assert sizes(5, valid=50) == [10]  # half the rows were valid: ask for twice the gap
    assert sizes(5, valid=0) == [25]  # nothing valid yet: assume a 20% yield, not an endless loop
    assert sizes(500, valid=90) == [100]  # at most a full shard per worker
    assert sizes(500, valid=90, workers=3) == [100, 100, 100]
    assert sizes(7, valid=100, workers=3) == [3, 2, 2]  # split so no node idles during a top-up
    assert sizes(2, valid=100, workers=3) == [1, 1]
    assert sizes(500, valid=90, workers=3, budget_left=31) == [11, 10, 10]  # never past the budget


@pytest.fixture
def tiny_job_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SDG_OUTPUT_DIR", str(tmp_path))
    return lambda: Job(load_recipe("tiny", ["num_records=20", "generation.shard_size=5"]), "tiny", fresh=False)


def commit(job: Job, index: int, records: int, requested: int) -> None:
    rows = [{"messages": [{"role": "user", "content": f"{index}-{i}"}]} for i in range(records)]
    summary = shard_summary(shard_id(index), requested=requested, generated=requested, valid=records, input_tokens=9,
                            output_tokens=9, columns=column_types(rows))  # fmt: skip
    job.store.commit(shard_id(index), rows, summary)


def test_resume_adopts_every_committed_top_up_even_after_a_gap(tiny_job_dir) -> None:
    """Top-ups run in parallel: the driver can die after top-up 5 commits but before 4 does. On resume, 5 is part
    of the plan (not regenerated under its id), the gap stays unused, and new top-ups are numbered after 5."""
    job = tiny_job_dir()
    for index in range(4):  # the planned shards: 4 × 5 records, one invalid record each
        commit(job, index, records=4, requested=5)
    commit(job, 5, records=3, requested=3)  # top-up 4 (in flight) never committed

    resumed = tiny_job_dir()
    assert [s.id for s in resumed.shards] == [f"shard-0000{i}" for i in (0, 1, 2, 3, 5)]
    assert resumed.skipped == 5 and resumed.attempted() == 23
    added = resumed.top_up(parallel=2)
    assert [shard_index(s.id) for s in added] == [6, 7]  # shard-00005 is kept, not overwritten
    assert [s.size for s in added] == [1, 1]  # 1 record missing at a 19/23 yield: 2 records, one per worker
    assert merge(resumed, partial=True) == 19


def test_a_readme_of_the_users_beside_the_output_is_never_overwritten(tiny_job_dir) -> None:
    job = tiny_job_dir()
    for index in range(4):
        commit(job, index, records=5, requested=5)
    job = tiny_job_dir()
    readme = job.recipe.output_path.with_name("README.md")
    readme.write_text("# my notes\n")
    assert merge(job, partial=False) == 20
    manifest = build_manifest(job, [], datetime.now(timezone.utc), 1.0, "complete", {})
    assert write_card(job, manifest).name == "tiny.README.md" and readme.read_text() == "# my notes\n"
    readme.unlink()
    assert write_card(job, manifest) == readme  # no README there: the card takes the name the Hub reads
    assert write_card(job, manifest) == readme  # and keeps it, being this output's card
