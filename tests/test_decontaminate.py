"""Evaluation sets kept out of the output (quality.decontaminate): a record sharing a 13-word run with any item of
an evaluation file (JSON Lines, Parquet or text) is dropped as contaminated and topped up; a seed row that carries
evaluation text is named before the run; the manifest lists each file with its sha256 and what it removed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import data_designer.config as dd
import pytest

from sdg_job.decontaminate import check_seeds, split_clean
from tests.conftest import read_jsonl, run_cli
from tests.test_near_dupes import STORIES

QUESTION = "the lighthouse keeper counted ships every night and wrote their names in a blue notebook by the window"


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me something."}, {"role": "assistant", "content": text}]}


@pytest.mark.parametrize("form", ["jsonl", "parquet", "txt"])
def test_a_record_sharing_a_13_word_run_with_an_eval_item_is_removed(form: str, tmp_path: Path) -> None:
    path = tmp_path / f"eval.{form}"
    items = [{"question": f"Q: {QUESTION}?", "answer": "42"}, {"question": "What is two plus two?", "answer": "4"}]
    if form == "jsonl":
        path.write_text("".join(json.dumps(i) + "\n" for i in items))
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(items), path)
    else:
        path.write_text("\n".join(i["question"] for i in items) + "\n")
    words = QUESTION.split()
    records = [
        chat(f"As the story goes, {' '.join(words[:13])}."),  # exactly 13 words of it: contaminated
        chat(f"As the story goes, {' '.join(words[:12])} and more."),  # 12: not
        chat(STORIES[1]),
    ]
    clean, removed = split_clean(records, [path], 13)
    assert clean == records[1:] and removed == {str(path): 1}
    assert check_seeds([{"topic": "ships"}, {"topic": QUESTION.upper()}], [path], 13, "seeds.jsonl") == [1]


@pytest.mark.e2e
def test_a_run_removes_records_of_a_contaminated_seed_and_tops_up(tmp_path: Path) -> None:
    """Seeds that are stories, one of them an evaluation item's text: its records are dropped (and named before
    the run), the output has exactly N from the others."""
    seeds = tmp_path / "stories.jsonl"
    seeds.write_text("".join(json.dumps({"story": s}) + "\n" for s in STORIES))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"question": f"Q: {STORIES[0]}?", "answer": "no"}) + "\n")
    b = dd.DataDesignerConfigBuilder(model_configs=[])
    b.with_seed_dataset(dd.LocalFileSeedSource(path=str(seeds)), sampling_strategy=dd.SamplingStrategy.ORDERED)
    b.add_column(dd.ExpressionColumnConfig(name="text", expr="Retold: {{ story }}"))
    config = tmp_path / "retold.yaml"
    b.write_config(config)
    out = tmp_path / "out"
    result = run_cli("run", f"recipe={config}", "num_records=4", "generation.shard_size=2",
                     f"quality.decontaminate=[{evals}]", out_dir=out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{seeds}: seed line 1 shares a 13-word run with {evals}" in result.stderr
    records = read_jsonl(out / "retold.jsonl")
    assert len(records) == 4 and all(r["story"] != STORIES[0] for r in records)
    manifest = json.loads((out / "retold.manifest.json").read_text())
    assert manifest["dropped"]["contaminated"] >= 1
    sha = hashlib.sha256(evals.read_bytes()).hexdigest()
    assert manifest["decontamination"] == [{"path": str(evals), "sha256": sha,
                                            "records_removed": manifest["dropped"]["contaminated"]}]  # fmt: skip
    assert f"decontaminated against `eval.jsonl` (sha256 `{sha}`)" in (out / "README.md").read_text()
