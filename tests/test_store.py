"""The run dir's index of committed shards and the streaming merge: exactly the first copy of each record, in plan
order, cut at N; split into Hugging Face-style parts that `datasets` loads; a committed shard never changes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.endpoints import Endpoint
from sdg_job.errors import JobError
from sdg_job.plan import plan_shards
from sdg_job.shard import run_shard
from sdg_job.store import RunStore, record_digest
from sdg_job.summary import SUMMARY_VERSION, ShardSummary
from sdg_job.tokens import record_tokens
from tests.conftest import read_jsonl, shard_summary


def record(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "run")
    store.open("a" * 64, False, "recipe")
    return store


def commit(store: RunStore, shard_id: str, numbers: list[int]) -> None:
    store.commit(shard_id, [record(i) for i in numbers], shard_summary(shard_id, requested=len(numbers)))
    store.note_committed(shard_id, store.committed(shard_id))  # as the driver reads it: from disk


def test_selection_keeps_first_copies_in_plan_order_and_counts_dupes_before_the_cut(store: RunStore) -> None:
    commit(store, "shard-00000", [0, 1, 1, 2])  # a duplicate inside a shard
    commit(store, "shard-00001", [2, 3, 4, 5])  # and one across shards
    assert store.unique_count(["shard-00000", "shard-00001"], limit=100) == (6, {"duplicate": 2})
    # the later dupe is past the cut
    assert store.unique_count(["shard-00000", "shard-00001"], limit=3) == (3, {"duplicate": 1})
    keep, dupes = store.selection(["shard-00001", "shard-00000"], limit=100)  # other order: other first copies
    assert keep.tolist() == [True, True, True, True, True, True, False, False] and dupes == {"duplicate": 2}


def test_token_counts_are_those_of_exactly_the_selected_records(store: RunStore) -> None:
    """Each record's count (sdg_job.tokens, committed beside the records) follows the selection: duplicates and
    records past the cut are left out. Without counts from every shard there are none (the card says so)."""
    for shard_id, numbers in [("shard-00000", [0, 1, 1, 2]), ("shard-00001", [2, 3, 4])]:
        store.commit(shard_id, [record(i) for i in numbers], shard_summary(shard_id), tokens=[10 + i for i in numbers])
        store.note_committed(shard_id, store.committed(shard_id))  # as the driver reads it: from disk
    assert store.record_tokens(["shard-00000", "shard-00001"], limit=4).tolist() == [10, 11, 12, 13]
    # A shard whose records were all dropped counted none, and none is missing: the output's counts are known
    empty = record_tokens(load_recipe("tiny").serve, Endpoint(url="http://127.0.0.1:9/v1", api_key_env=None),
                          load_recipe("tiny").output_projection, [])  # fmt: skip
    store.commit("shard-00003", [], shard_summary("shard-00003"), tokens=empty)
    store.note_committed("shard-00003", store.committed("shard-00003"))
    ids = ["shard-00000", "shard-00003", "shard-00001"]
    assert empty == [] and store.record_tokens(ids, limit=4).tolist() == [10, 11, 12, 13]
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
    first = store.commit("shard-00000", [record(i) for i in (0, 1, 2)], shard_summary(requested=3))
    late = store.commit("shard-00000", [record(i) for i in (0, 0, 5)], shard_summary(requested=3))
    assert late == first
    assert sorted(p.name for p in store.shards_dir.iterdir()) == sorted(
        [f"{first.files}.jsonl", f"{first.files}.digests", "shard-00000.json"])  # fmt: skip
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


# A shard file as the version before ShardSummary wrote it: an untyped dict, no `version`.
UNTYPED = {"shard": "shard-00000", "requested": 3, "generated": 3, "valid": 2, "dropped": {"invalid_json": 1},
           "input_tokens": 30, "output_tokens": 60,
           "usage": {"text": {"requests": 3, "input_tokens": 30, "output_tokens": 60}}, "seconds": 1.5, "cpu_s": 0.4,
           "engine_load_cpu_s": 2.1, "retries": 1, "random_seed": 2**63 + 5, "endpoint": "http://127.0.0.1:8080/v1",
           "endpoints": {"text": "http://127.0.0.1:8080/v1"}, "worker": "node1:4242", "node_id": "ab12",
           "error": None, "request_errors": {"timeout": 1}, "request_error": "took too long",
           "request_error_provider": "local", "columns": {"messages": [{"content": "string", "role": "string"}]},
           "files": "shard-00000.0badc0de"}  # fmt: skip
# And as the first versions wrote it: before usage, CPU, per-alias endpoints, request errors and column types.
FIRST = {k: UNTYPED[k] for k in ("shard", "requested", "generated", "valid", "dropped", "input_tokens",
                                 "output_tokens", "seconds", "retries", "random_seed", "endpoint", "worker", "error",
                                 "files")}  # fmt: skip


def write_old_shard(store: RunStore, summary: dict, records: list[dict]) -> None:
    """A shard committed by an earlier version, as it left the run dir."""
    files = summary["files"]
    (store.shards_dir / f"{files}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (store.shards_dir / f"{files}.digests").write_bytes(b"".join(record_digest(r) for r in records))
    store.summary_path(summary["shard"]).write_text(json.dumps(summary, indent=1) + "\n")


@pytest.mark.parametrize("old", [UNTYPED, FIRST], ids=["untyped", "first"])
def test_a_run_dir_of_an_earlier_version_resumes(store: RunStore, tmp_path: Path, old: dict) -> None:
    """Its shard files have no `version` (read as 0) and may lack what was added since (defaults); the manifest lists
    each as its file recorded it, as before."""
    write_old_shard(store, old, [record(0), record(1)])
    resumed = RunStore(store.run_dir)
    (summary,) = resumed.load_committed().values()
    assert summary.version == 0 and summary.valid == 2 and summary.dropped == {"invalid_json": 1}
    assert summary.manifest_entry() == {k: v for k, v in old.items() if k != "columns"}
    assert summary.columns == old.get("columns") and summary.usage == old.get("usage", {})
    assert resumed.totals == {"requested": 3, "valid": 2, "output_tokens": 60}
    assert resumed.merge(["shard-00000"], 5, [tmp_path / "out.jsonl"], per_file=5) == (2, ["shard-00000"])


def test_a_shard_file_keeps_the_keys_an_earlier_version_reads(store: RunStore) -> None:
    """What this version commits, an earlier one resumes: the same keys, and besides them `version` and what was
    added since (a reader of a dict ignores keys it does not know)."""
    fields = {k: v for k, v in UNTYPED.items() if k not in ("shard", "files")}
    committed = store.commit("shard-00000", [record(0), record(1)], shard_summary(**fields))
    on_disk = json.loads(store.summary_path("shard-00000").read_text())
    added = {"sampled", "contaminated"}
    assert set(on_disk) == set(UNTYPED) | {"version"} | added and on_disk["version"] == SUMMARY_VERSION
    kept = {k: v for k, v in on_disk.items() if k not in ("version", "files", *added)}
    assert kept == fields | {"shard": "shard-00000"}
    assert store.committed("shard-00000") == committed == ShardSummary.from_json(json.dumps(on_disk))
    assert committed.manifest_entry() == {k: v for k, v in on_disk.items() if k not in ("version", "columns", *added)}
