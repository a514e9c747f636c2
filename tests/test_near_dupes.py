"""Near-duplicates across the whole dataset (quality.near_duplicates): a record near an earlier one in plan order
is passed over like an exact duplicate, whichever shard either is in, the same on every read of the same shards
(a resumed run keeps the same records); what every record shares (tools, system prompt) makes none alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdg_job import near_dupes
from sdg_job.store import RunStore
from tests import dd_configs
from tests.conftest import read_jsonl, run_cli, shard_summary

STORIES = [
    "the lighthouse keeper counted ships every night and wrote their names in a blue notebook by the window",
    "a baker in the old town folds cardamom into the dough before dawn while the river fog lifts slowly",
    "our robot vacuum mapped the flat twice then hid under the sofa whenever the doorbell rang at noon",
    "students measured the pond's temperature each week and found the frogs returned when it passed ten",
    "the night train to the coast stops at seven stations and the conductor knows every regular by name",
    "grandmother kept seeds in labelled envelopes sorted by the month they should go into the garden bed",
]


def chat(text: str) -> dict:
    return {"messages": [{"role": "system", "content": "You are a helpful assistant. " * 20},
                         {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": text}],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "x " * 200}}]}  # fmt: skip


def near(i: int) -> str:
    """STORIES[i] with one word changed: a near-duplicate (Jaccard of word 3-grams about 0.7-0.8)."""
    words = STORIES[i].split()
    words[-1] = "today"
    return " ".join(words)


def commit(store: RunStore, shard_id: str, texts: list[str]) -> None:
    records = [chat(t) for t in texts]
    store.commit(shard_id, records, shard_summary(shard_id, requested=len(records)),
                 signatures=near_dupes.signatures(records, 3))  # fmt: skip
    store.note_committed(shard_id, store.committed(shard_id))


def planted_config(tmp_path: Path) -> Path:
    """A Data Designer config over an ordered seed file of the six stories, the first one twice (rows 0 and 1)."""
    seeds = tmp_path / "stories.jsonl"
    seeds.write_text("".join(json.dumps({"story": s}) + "\n" for s in [STORIES[0], *STORIES]))
    return dd_configs.export(dd_configs.planted_near_duplicates(seeds), tmp_path / "stories.yaml")


def store_at(run_dir: Path, threshold: float | None) -> RunStore:
    store = RunStore(run_dir, threshold)
    store.open("a" * 64, False, "recipe")
    return store


def test_a_near_duplicate_in_another_shard_is_passed_over_and_the_earlier_one_kept(tmp_path: Path) -> None:
    store = store_at(tmp_path / "run", 0.6)
    commit(store, "shard-00000", [STORIES[0], STORIES[1], STORIES[1]])  # an exact duplicate, too
    commit(store, "shard-00001", [near(0), STORIES[2], near(1), STORIES[3]])
    ids = ["shard-00000", "shard-00001"]
    keep, passed = store.selection(ids, limit=100)
    assert keep.tolist() == [True, True, False, False, True, False, True]
    assert passed == {"duplicate": 1, "near_duplicate": 2}
    assert store.unique_count(ids, limit=3) == (3, {"duplicate": 1, "near_duplicate": 1})  # the cut: 3rd kept
    # Read again from disk (a resumed driver): the same choice
    again = store_at(tmp_path / "run", 0.6)
    again.load_committed()
    assert again.selection(ids, limit=100)[0].tolist() == keep.tolist()


def test_off_only_exact_duplicates_go_and_distinct_texts_never_collide(tmp_path: Path) -> None:
    store = store_at(tmp_path / "off", None)
    commit(store, "shard-00000", [STORIES[0], near(0), STORIES[0]])
    assert store.unique_count(["shard-00000"], limit=100) == (2, {"duplicate": 1})
    on = store_at(tmp_path / "on", 0.8)
    commit(on, "shard-00000", STORIES)  # the same tools and system prompt in each: still all distinct
    assert on.unique_count(["shard-00000"], limit=100) == (len(STORIES), {})


def test_the_text_compared_leaves_out_what_every_record_shares() -> None:
    text = near_dupes.record_text(chat("hello there"))
    assert text == "Tell me a story.\nhello there"
    sigs = near_dupes.signatures([chat(STORIES[0]), chat(STORIES[0])], 3)
    assert sigs.shape == (2, near_dupes.NUM_PERM) and np.array_equal(sigs[0], sigs[1])
    b, r = near_dupes.band_shape(0.8)
    assert b * r <= near_dupes.NUM_PERM and near_dupes.bands(sigs, 0.8).shape == (2, b)


@pytest.mark.e2e
def test_a_run_removes_planted_near_duplicates_tops_up_to_exactly_n_or_says_why_it_cannot(tmp_path: Path) -> None:
    """A Data Designer config with no model column (no server) over an ordered seed file whose first two rows
    are one story: record 1 is a near-duplicate of record 0, whatever the samplers draw. Six stories are
    near-unique: N=5 passes over record 1 and tops up to five distinct; N=8 ends at its budget naming
    near-duplicates."""
    config = planted_config(tmp_path)
    args = ("run", f"recipe={config}", "quality.near_duplicates=0.5", "generation.shard_size=3")
    result = run_cli(*args, "num_records=5", out_dir=tmp_path / "five")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(tmp_path / "five" / "stories.jsonl")
    assert len(records) == 5 and len({r["story"] for r in records}) == 5
    manifest = json.loads((tmp_path / "five" / "stories.manifest.json").read_text())
    assert manifest["records"] == 5 and manifest["dropped"]["near_duplicate"] >= 1
    assert manifest["attempted"] > 5  # topped up past the near-duplicates
    # record 1 passed over, the others kept in plan order (the fifth comes from a top-up shard)
    assert [r["story"] for r in records[:4]] == STORIES[:4]
    short = run_cli(*args, "num_records=8", out_dir=tmp_path / "eight")
    assert short.returncode == 1, short.stderr[-3000:]
    assert "budget exhausted" in short.stderr and "near-duplicates of earlier records" in short.stderr
    kept = read_jsonl(tmp_path / "eight" / "stories.jsonl.partial")
    assert len({r["story"] for r in kept}) == len(kept) <= len(STORIES)
