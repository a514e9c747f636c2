"""The run dir's index of committed shards and the streaming merge: exactly the first copy of each record, in plan
order, cut at N; split into Hugging Face-style parts that `datasets` loads; a committed shard never changes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.errors import JobError
from sdg_job.plan import plan_shards
from sdg_job.shard import run_shard
from sdg_job.store import RunStore
from tests.conftest import read_jsonl


def record(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "run")
    store.open("a" * 64, False, "recipe")
    return store


def commit(store: RunStore, shard_id: str, numbers: list[int]) -> None:
    store.commit(shard_id, [record(i) for i in numbers], {"shard": shard_id, "requested": len(numbers)})
    store.note_committed(shard_id, json.loads(store.summary_path(shard_id).read_text()))


def test_selection_keeps_first_copies_in_plan_order_and_counts_dupes_before_the_cut(store: RunStore) -> None:
    commit(store, "shard-00000", [0, 1, 1, 2])  # a duplicate inside a shard
    commit(store, "shard-00001", [2, 3, 4, 5])  # and one across shards
    assert store.unique_count(["shard-00000", "shard-00001"], limit=100) == (6, 2)
    assert store.unique_count(["shard-00000", "shard-00001"], limit=3) == (3, 1)  # the later dupe is past the cut
    keep, dupes = store.selection(["shard-00001", "shard-00000"], limit=100)  # other order: other first copies
    assert keep.tolist() == [True, True, True, True, True, True, False, False] and dupes == 2


def test_token_counts_are_those_of_exactly_the_selected_records(store: RunStore) -> None:
    """Each record's count (sdg_job.tokens, committed beside the records) follows the selection: duplicates and
    records past the cut are left out. Without counts from every shard there are none (the card says so)."""
    for shard_id, numbers in [("shard-00000", [0, 1, 1, 2]), ("shard-00001", [2, 3, 4])]:
        store.commit(shard_id, [record(i) for i in numbers], {"shard": shard_id}, tokens=[10 + i for i in numbers])
        store.note_committed(shard_id, json.loads(store.summary_path(shard_id).read_text()))
    assert store.record_tokens(["shard-00000", "shard-00001"], limit=4).tolist() == [10, 11, 12, 13]
    commit(store, "shard-00002", [5])  # a shard whose server could not count
    assert store.record_tokens(["shard-00000", "shard-00001", "shard-00002"], limit=100) is None
    assert store.sweep() == 0  # the counts are files a committed shard names


def test_merge_streams_the_selection_into_parts_of_at_most_k_records(store: RunStore, tmp_path: Path) -> None:
    commit(store, "shard-00000", [0, 1, 1, 2, 3])
    commit(store, "shard-00001", [4, 5, 6, 7, 8])
    commit(store, "shard-00002", [9])  # past the cut: not a shard the output uses
    parts = [tmp_path / f"out-0000{i}-of-00003.jsonl" for i in range(3)]
    (tmp_path / ".out-00000-of-00003.jsonl.tmp1").write_text("left by a merge that crashed")
    assert store.merge(["shard-00000", "shard-00001", "shard-00002"], 7, parts, per_file=3) == (
        7, ["shard-00000", "shard-00001"])  # fmt: skip
    assert [len(read_jsonl(p)) for p in parts] == [3, 3, 1]
    assert [r for p in parts for r in read_jsonl(p)] == [record(i) for i in range(7)]
    assert not list(tmp_path.glob(".out*"))  # no temp file left


def test_a_shard_file_that_disagrees_with_its_digests_stops_the_merge(store: RunStore, tmp_path: Path) -> None:
    commit(store, "shard-00000", [0, 1, 2])
    with store.records_path(store.summaries["shard-00000"]).open("a") as f:
        f.write(json.dumps(record(9)) + "\n")
    with pytest.raises(JobError, match=r"\.jsonl has 4 records and 3 digests"):
        store.merge(["shard-00000"], 5, [tmp_path / "out.jsonl"], per_file=5)
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_a_committed_shard_never_changes_whatever_attempt_lands_later(store: RunStore, tmp_path: Path) -> None:
    """A retry runs while the first attempt, thought lost, still runs: whichever commits first stays; the other
    gets that summary back and removes its own files; a retry that starts after the commit does no work."""
    first = store.commit("shard-00000", [record(i) for i in (0, 1, 2)], {"shard": "shard-00000", "requested": 3})
    late = store.commit("shard-00000", [record(i) for i in (0, 0, 5)], {"shard": "shard-00000", "requested": 3})
    assert late == first
    assert sorted(p.name for p in store.shards_dir.iterdir()) == sorted(
        [f"{first['files']}.jsonl", f"{first['files']}.digests", "shard-00000.json"])  # fmt: skip
    resumed = RunStore(store.run_dir)
    assert resumed.load_committed()["shard-00000"] == first
    assert resumed.merge(["shard-00000"], 5, [tmp_path / "out.jsonl"], per_file=5) == (3, ["shard-00000"])
    recipe = load_recipe("tiny")
    (shard,) = plan_shards(3, 3)
    assert run_shard(recipe, shard, [], None, store) == first  # type: ignore[arg-type]  # no server needed


def test_sweep_removes_what_no_committed_shard_names(store: RunStore) -> None:
    commit(store, "shard-00000", [0, 1])
    (store.shards_dir / "shard-00001.deadbeef.jsonl").write_text("{}\n")  # an attempt that died before its summary
    (store.shards_dir / "shard-00001.deadbeef.digests").write_bytes(b"x" * 16)
    (store.shards_dir / ".shard-00002.json.tmp4242").write_text("{")
    assert store.sweep() == 3
    assert sorted(p.suffix for p in store.shards_dir.iterdir()) == [".digests", ".json", ".jsonl"]


def test_output_parts_are_named_as_hugging_face_names_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SDG_OUTPUT_DIR", str(tmp_path))
    recipe = load_recipe("tiny", ["num_records=10", "output_records_per_file=4"])
    assert [p.name for p in recipe.output_files] == [f"tiny-0000{i}-of-00003.jsonl" for i in range(3)]
    assert load_recipe("tiny", ["num_records=10"]).output_files == [tmp_path / "tiny.jsonl"]


def test_every_output_layout_loads_with_datasets(hf, store: RunStore, tmp_path: Path) -> None:
    commit(store, "shard-00000", list(range(25)))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    store.merge(["shard-00000"], 25, [whole / "train.jsonl"], per_file=25)
    store.merge(["shard-00000"], 25, [parts / f"train-0000{i}-of-00003.jsonl" for i in range(3)], per_file=10)
    for files in (str(whole / "train.jsonl"), sorted(str(p) for p in parts.iterdir())):
        loaded = hf.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
        assert loaded.num_rows == 25 and loaded[24] == record(24)


def test_a_shard_carries_its_seed_rows_lazily_whatever_its_size() -> None:
    """The plan holds a few numbers per shard, not one per record, and a shard sent to a worker is as small."""
    (shard,) = plan_shards(50_000, 50_000, n_seed_rows=5_000, strategy="shuffle", base_seed=3)
    assert len(pickle.dumps(shard)) < 300
    assert len(shard.seed_rows) == 50_000 and sorted(shard.seed_rows[:5_000]) == list(range(5_000))
