"""The spread of each sampler's values, counted per shard and merged, and distinct-n of the generated text."""

from __future__ import annotations

import json
from pathlib import Path

from sdg_job.diversity import MAX_VALUES, distinct_n, merge_spreads, sampler_spread


def test_sampler_values_are_counted_per_shard_and_merged() -> None:
    one = sampler_spread([{"tone": "casual", "n": 1}, {"tone": "formal", "n": 3}], ["tone", "n"])
    two = sampler_spread([{"tone": "casual", "n": 8}], ["tone", "n"])
    merged = merge_spreads([one, two])
    assert merged["tone"] == {"counts": {"casual": 2, "formal": 1}}
    assert merged["n"] == {"min": 1, "max": 8, "n": 3, "mean": 4.0}
    many = sampler_spread([{"id": str(i)} for i in range(MAX_VALUES + 7)], ["id"])
    assert many["id"]["counts"]["(other)"] == 7 and len(many["id"]["counts"]) == MAX_VALUES + 1


def test_distinct_n_reads_the_generated_text_of_the_first_records(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    rows = [{"messages": [{"role": "system", "content": "same for all"}, {"role": "user", "content": "a b a b"}]},
            {"messages": [{"role": "user", "content": "c d"}]}]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert distinct_n([out]) == {"records": 2, "distinct_1": 0.6667, "distinct_2": 0.75}
    assert distinct_n([out], limit=1)["records"] == 1
