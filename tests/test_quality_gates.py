"""Quality gates, each counted by reason in the manifest: answers cut at max_tokens, and the recipe's filters.
(Tool-call arguments against the tool's JSON schema: tests/test_project.py.)

The server here is the SIMULATED one (sdg_job.simulator): `--cut-rate` reports a share of its text answers as cut
at max_tokens (finish_reason: length), which a real model does at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.project import failed_filter
from tests.conftest import read_jsonl, run_cli

SIMULATED = ["recipe=tiny", "num_records=20", "serve.engine=simulator", "serve.extra_args=[--cut-rate, '0.3']"]


def manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "tiny.manifest.json").read_text())


@pytest.mark.e2e
def test_answers_cut_at_max_tokens_are_dropped_and_counted(out_dir: Path) -> None:
    result = run_cli("run", *SIMULATED, out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_jsonl(out_dir / "tiny.jsonl")) == 20
    m = manifest(out_dir)
    assert m["dropped"].get("truncated", 0) >= 3, m["dropped"]  # 2 answers per record, 30% cut: ~10 of 20 rows
    assert m["attempted"] - sum(m["dropped"].values()) >= 20  # a top-up may make a few more than needed


@pytest.mark.e2e
def test_keep_truncated_keeps_them(out_dir: Path) -> None:
    result = run_cli("run", *SIMULATED, "generation.keep_truncated=true", out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(out_dir)
    assert "truncated" not in m["dropped"] and m["attempted"] == 20


@pytest.mark.e2e
def test_a_filter_keeps_only_records_that_pass(out_dir: Path) -> None:
    """A filter on a sampled column (2 of the 6 personas pass): every kept record passes, the rest are counted as
    filter:<name>, and the job still ends with exactly N."""
    kept = ["a retired teacher", "a busy software engineer"]
    result = run_cli("run", "recipe=tiny", "num_records=12", "serve.engine=simulator", "generation.budget=10",
                     f"filters=[{{column: persona, one_of: {json.dumps(kept)}, name: audience}}]",
                     "output_projection.metadata_fields=[persona]", out_dir=out_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 12 and all(r["persona"] in kept for r in records)
    m = manifest(out_dir)
    assert m["dropped"]["filter:audience"] > 0 and m["attempted"] - sum(m["dropped"].values()) >= 12


def test_filters_on_judge_scores_and_values() -> None:
    recipe = load_recipe("rl_pref", ["filters=[{column: preference, score: winner, one_of: [A]}]"])
    (f,) = recipe.filters
    assert f.name == "preference.winner"
    assert failed_filter(recipe.filters, {"preference": {"winner": {"score": "A", "reasoning": "clearer"}}}) is None
    assert failed_filter(recipe.filters, {"preference": {"winner": {"score": "B"}}}) == "preference.winner"
    helpful = load_recipe("tiny", ["filters=[{column: persona, equals: a retired teacher}]"]).filters
    assert failed_filter(helpful, {"persona": "a chef"}) == "persona"
    numeric = load_recipe("tiny", ["filters=[{column: persona, min: 4, max: 5}]"]).filters
    assert failed_filter(numeric, {"persona": "4.5"}) is None
    assert [failed_filter(numeric, {"persona": v}) for v in ("3", "6", "n/a", None)] == ["persona"] * 4
