"""The dataset card: its YAML is what the real `datasets` library reads (files, split size, features it would infer
itself), for records exactly as each projection emits them; its body tells how the data was made, without secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdg_job.card import column_types, dataset_card, features, is_card_of, merge_columns, size_category
from sdg_job.config import DPOPreferenceProjection, OpenAIMessagesProjection, StructuredMessagesProjection
from sdg_job.project import project_rows

N = 20
SYSTEM = "You are a support agent for an online shop. Reply in plain text."
TOOLS = [
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Look up an order's shipping status.",
        "parameters": {"type": "object", "required": ["order_id"],
                       "properties": {"order_id": {"type": "string", "description": "such as ORD-10231"}}}}},
    {"type": "function", "function": {
        "name": "search_products", "description": "Search the catalogue.",
        "parameters": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1},
            "in_stock": {"type": "boolean"}}}}},
]  # fmt: skip


def sft_records(reasoning: bool = False) -> list[dict]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "column": "q"},
        {"role": "assistant", "column": "a"},
    ]
    spec = OpenAIMessagesProjection(type="openai_messages", metadata_fields=["category"], messages=messages)
    rows = [{"q": f"Where is order ORD-{i}? ünïcode", "a": f"Order ORD-{i} ships tomorrow." + " more" * i,
             "category": ["shipping", "billing"][i % 2],
             "a__reasoning_content": f"The user asks about ORD-{i}." if reasoning and i % 3 else None}
            for i in range(N)]  # fmt: skip
    return _project(spec, rows)


def dpo_records() -> list[dict]:
    spec = DPOPreferenceProjection(type="dpo_preference", prompt="p", response_a="x", response_b="y",
                                   judge="judge", score="winner")  # fmt: skip
    rows = [{"p": f"Explain refund rule {i}.", "x": f"Refunds take {i} days.", "y": "I don't know.",
             "judge": {"winner": {"score": "AB"[i % 2], "reasoning": "more specific"}}} for i in range(N)]  # fmt: skip
    return _project(spec, rows)


def tool_records() -> list[dict]:
    spec = StructuredMessagesProjection(type="structured_messages", tools=TOOLS, metadata_fields=["tier"], messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "column": "user"},
        {"role": "assistant", "tool_call": "call"}, {"role": "tool", "column": "result"},
        {"role": "assistant", "column": "final"}])  # fmt: skip
    calls = [
        {"name": "get_order_status", "arguments": {"order_id": "ORD-1"}},
        {"name": "search_products", "arguments": {"query": "red shoes", "max_results": 3, "in_stock": True}},
    ]
    rows = [{"user": f"Question {i}", "call": calls[i % 2], "result": {"status": "ok", "n": i},
             "final": f"Answer {i}.", "tier": i} for i in range(N)]  # fmt: skip
    return _project(spec, rows)


def _project(spec: Any, rows: list[dict]) -> list[dict]:
    records, dropped = project_rows(spec, rows)
    assert not dropped and len(records) == N
    return records


SHAPES = {"sft": sft_records, "sft_reasoning": lambda: sft_records(reasoning=True), "dpo": dpo_records,
          "tools": tool_records}  # fmt: skip
PROJECTION = {"sft": "openai_messages", "sft_reasoning": "openai_messages", "dpo": "dpo_preference",
              "tools": "structured_messages"}  # fmt: skip


def manifest(records: int, projection: str = "openai_messages") -> dict[str, Any]:
    return {
        "status": "complete", "recipe": "support", "recipe_file": "recipes/support.yaml", "recipe_sha256": "ab" * 32,
        "resolved_recipe": {"description": "Support chats.", "num_records": records, "columns": {},
                            "output_projection": {"type": projection}, "filters": [], "generation": {}},
        "provider": "local", "versions": {"python": "3.11.9", "sdg-job": "0.1.0", "data-designer": "0.9.7"},
        "models": {"text": {"model": "nemotron-nano", "provider": None, "reasoning": "off",
                            "inference_parameters": {"temperature": 0.7, "max_tokens": 512, "extra_body": None}}},
        "seed": {"path": "/data/seeds/cases.jsonl", "sha256": "cd" * 32, "rows": 40, "strategy": "shuffle"},
        "num_records": records, "records": records, "attempted": records + 9, "generated": records + 8,
        "dropped": {"duplicate": 1, "filter:helpfulness": 2, "tool_arguments_invalid": 1, "truncated": 3},
        "tokens": {"input": 1234, "output": 5678}, "started_at": "2025-01-02T03:04:05+00:00", "wall_time_s": 12.5,
        "output_path": "/data/out/support.jsonl", "output_bytes": 0,
    }  # fmt: skip


def write_output(out: Path, records: list[dict], files: int, columns: Any, projection: str) -> list[str]:
    """The records as JSONL in `files` parts, with the card as README.md; returns the data file names. `columns`:
    the records' types as the job finds them, one shard at a time (or None, as for shards from before types)."""
    names = ["train.jsonl"] if files == 1 else [f"train-{i:05d}-of-{files:05d}.jsonl" for i in range(files)]
    out.mkdir()
    for i, name in enumerate(names):
        part = records[i * len(records) // files : (i + 1) * len(records) // files]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    m = manifest(len(records), projection) | {"output_bytes": sum((out / n).stat().st_size for n in names)}
    if columns == "by shard":
        columns = merge_columns(column_types(records[:7]), column_types(records[7:]))
    (out / "README.md").write_text(dataset_card(m, records, names, columns))
    return names


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.mark.parametrize("files", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_card_loads_with_datasets(hf, tmp_path: Path, shape: str, files: int) -> None:
    records = SHAPES[shape]()
    names = write_output(tmp_path / "out", records, files, "by shard", PROJECTION[shape])
    meta = front_matter((tmp_path / "out" / "README.md").read_text())
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": names}]}]
    size = sum((tmp_path / "out" / n).stat().st_size for n in names)
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_examples": N, "num_bytes": size}]
    assert meta["size_categories"] == ["n<1K"] and meta["sdg_job"]["recipe"] == "support"
    assert is_card_of((tmp_path / "out" / "README.md").read_text(), "support.jsonl")

    cache = str(tmp_path / "cache")
    from_card = hf.load_dataset(str(tmp_path / "out"), split="train", cache_dir=cache)
    assert from_card.features == hf.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert from_card.to_list() == records  # every record round-trips, nested tool schemas included
    inferred = hf.load_dataset("json", data_files=[str(tmp_path / "out" / n) for n in names], split="train",
                               cache_dir=cache)  # fmt: skip
    assert inferred.num_rows == N
    assert inferred.features == from_card.features  # the card says what datasets infers by itself


def test_tool_features_encode_irregular_schemas_as_json() -> None:
    """Parameter schemas differ per tool and messages differ per role: datasets 5.x stores those as JSON."""
    by_name = {f["name"]: f for f in features(column_types(tool_records()))}
    assert by_name["messages"] == {"name": "messages", "list": "json"}
    function = by_name["tools"]["list"][1]["struct"]
    parameters = next(f for f in function if f["name"] == "parameters")["struct"]
    assert {"name": "properties", "dtype": "json"} in parameters
    assert {"name": "required", "list": "string"} in parameters
    assert by_name["tier"] == {"name": "tier", "dtype": "int64"}


def test_without_types_features_are_left_to_datasets(hf, tmp_path: Path) -> None:
    """Shards committed before types were kept cannot say them: the card leaves features to datasets (guessing from
    a few records could be wrong for the rest, and then the dataset would not load)."""
    records = sft_records(reasoning=True)
    write_output(tmp_path / "out", records, 1, None, "openai_messages")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "features" not in front_matter(card)["dataset_info"]
    assert card.count("```json") == 3
    ds = hf.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == records


EDGE_ROWS = [
    {"i_f": 1, "i_s": 1, "b_i": True, "empty": {}, "none": None, "nested": [[1], []], "obj": {"a": 1}, "l": []},
    {"i_f": 2.5, "i_s": "x", "b_i": 1, "empty": {}, "none": None, "nested": [[2]], "obj": {"b": 1}, "l": [],
     "late": "only here"},
]  # fmt: skip


def test_edge_features_match_datasets_inference(hf, tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EDGE_ROWS))
    ds = hf.load_dataset("json", data_files=[str(tmp_path / "t.jsonl")], split="train", cache_dir=str(tmp_path / "c"))
    assert hf.Features._from_yaml_list(features(column_types(EDGE_ROWS))) == ds.features
    by_row = merge_columns(column_types(EDGE_ROWS[:1]), column_types(EDGE_ROWS[1:]))
    assert features(by_row) == features(column_types(EDGE_ROWS))


def test_timestamp_like_strings_stay_strings(hf, tmp_path: Path) -> None:
    records = [{"created": f"2025-01-0{i + 1}T00:00:00", "text": "x"} for i in range(3)]
    write_output(tmp_path / "out", records, 1, column_types(records), "openai_messages")
    ds = hf.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features["created"] == hf.Value("string")  # datasets alone would say timestamp[s]
    assert ds[0] == {"created": "2025-01-01 00:00:00", "text": "x"}  # pyarrow's JSON reader reformats it anyway


def test_body_reports_provenance_drops_and_samples_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "nvapi-THIS-IS-A-TEST-KEY-0123456789"
    monkeypatch.setenv("NVIDIA_API_KEY", secret)
    m = manifest(N)
    m["models"]["text"]["inference_parameters"]["extra_body"] = {"note": f"leaked {secret}"}  # masking missed it
    records = sft_records()
    records[0]["messages"][2]["content"] = "y" * 2000 + secret
    records[1]["category"] = "```markdown``` inside"
    card = dataset_card(m, records, ["train.jsonl"], column_types(records))
    body = card.split("---\n", 2)[2]

    assert secret not in card and "***" in card
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert rows == ["| `truncated` | truncated | 3 |", "| `filter:helpfulness` | filter | 2 |",
                    "| `duplicate` | duplicate | 1 |", "| `tool_arguments_invalid` | quality gate | 1 |"]  # fmt: skip
    assert "7 dropped" in body and "Dropped by kind: truncated 3, filter 2, duplicate 1, quality gate 1." in body
    for text in ("# support", "Support chats.", "`recipes/support.yaml`", "ab" * 32, "`nemotron-nano`",
                 '"temperature": 0.7', "cases.jsonl", "cd" * 32, "40 rows", "shuffle", "sdg-job 0.1.0",
                 "data-designer 0.9.7", "1234 in, 5678 out"):  # fmt: skip
        assert text in body
    assert "/data/seeds" not in body  # the seed's local path stays out, its name and hash are enough
    assert body.count("```json") == 3 and "Where is order ORD-2?" in body and "ORD-3?" not in body
    assert "y" * 500 + "…" in body and "y" * 501 not in body
    assert "````json" in body  # a longer fence around a record that quotes one
    assert "Tokens per record: not counted" in body  # a remote provider: no tokenizer
    m["record_tokens"] = {"tokenizer": "smollm2-135m (llama_cpp), with its chat template", "records": N, "min": 40,
                          "p50": 120, "p95": 600, "max": 900}  # fmt: skip
    body = dataset_card(m, records, ["train.jsonl"], None).split("---\n", 2)[2]
    assert "(counted by smollm2-135m (llama_cpp), with its chat template; a DPO pair: its longer side): min 40, " \
           "p50 120, p95 600, max 900." in body  # fmt: skip


def test_a_readme_of_someone_else_is_not_our_card() -> None:
    ours = dataset_card(manifest(N), sft_records(), ["support.jsonl"], None)
    assert is_card_of(ours, "support.jsonl") and not is_card_of(ours, "other.jsonl")
    assert not is_card_of("# My project\n", "support.jsonl") and not is_card_of("---\n: [\n---\n", "support.jsonl")


def test_size_categories() -> None:
    sizes = [size_category(n) for n in (0, 999, 1000, 54_321, 10**6, 10**13)]
    assert sizes == ["n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M", "n>1T"]
