"""Configs in the Nemotron sdg/data_designer step's shape run unchanged (tests/step_shape/, written from the step's
context pack): lists of models, providers and columns, shorthand samplers, field-style projections.

End to end they run against the embedded CPU model behind a real llama-server, reached as the step reaches a local
vLLM: an OpenAI-compatible provider whose endpoint is OPENAI_BASE_URL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.plan import plan_shards
from sdg_job.project import InvalidRecord, structured_messages
from sdg_job.serve import Server
from tests.conftest import REPO, all_files, read_jsonl, run_cli

STEP = REPO / "tests" / "step_shape"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> dict[str, str]:
    serve = load_recipe("tiny").serve
    assert serve is not None
    with Server(serve, tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield {"OPENAI_BASE_URL": server.endpoint, "OPENAI_API_KEY": server.api_key, "PWD": str(REPO)}


def run_step(name: str, out_dir: Path, env: dict[str, str], *overrides: str) -> list[dict]:
    # Short answers for speed; the ones cut at max_tokens are kept (the gate is tested in test_quality_gates.py).
    result = run_cli("run", f"recipe={STEP / name}.yaml", "generation.keep_truncated=true", *overrides,
                     out_dir=out_dir, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(out_dir / f"{name}.jsonl")


@pytest.mark.e2e
def test_sft_with_a_category_sampler_and_metadata(endpoint, out_dir: Path) -> None:
    records = run_step(
        "sft", out_dir, endpoint, "num_records=3", "models.nvidia-text.inference_parameters.max_tokens=48"
    )
    assert len(records) == 3
    for r in records:
        assert set(r) == {"messages", "domain", "topic", "persona"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["persona"] in ("a curious high-school student", "a busy software engineer", "a retired teacher")
    manifest = json.loads((out_dir / "sft.manifest.json").read_text())
    assert manifest["resolved_recipe"]["provider"] == "local-vllm"
    assert manifest["resolved_recipe"]["providers"]["local-vllm"]["api_key_env"] == "OPENAI_API_KEY"
    assert endpoint["OPENAI_API_KEY"] not in "".join(p.read_text(errors="replace") for p in all_files(out_dir))


@pytest.mark.e2e
def test_the_smoke_child_inherits_the_sft_config(endpoint, out_dir: Path) -> None:
    records = run_step("tiny", out_dir, endpoint)
    assert len(records) == 6 and all(set(r) == {"messages", "domain", "topic", "persona"} for r in records)


@pytest.mark.e2e
def test_dpo_with_two_aliases_on_two_providers_and_a_judge_schema(endpoint, tmp_path: Path, out_dir: Path) -> None:
    """The step's DPO config as the step runs it with its aliases at two providers (each its own llama-server with
    its own key): every alias's requests go to its provider's endpoint."""
    serve = load_recipe("tiny").serve
    assert serve is not None
    two = tmp_path / "rl_pref.yaml"
    two.write_text(
        f"defaults: {STEP / 'rl_pref.yaml'}\nproviders:\n"
        "  - {name: local-vllm, endpoint: '${oc.env:OPENAI_BASE_URL}', api_key: OPENAI_API_KEY}\n"
        "  - {name: second-vllm, endpoint: '${oc.env:SECOND_BASE_URL}', api_key: SECOND_KEY}\n"
        "models:\n"
        "  - {alias: precise, model: m, provider: local-vllm, inference_parameters: {max_tokens: 64}}\n"
        "  - {alias: creative, model: m, provider: second-vllm, inference_parameters: {max_tokens: 64}}\n"
    )
    with Server(serve, tmp_path / "second.log") as second:
        env = endpoint | {"SECOND_BASE_URL": second.endpoint, "SECOND_KEY": second.api_key}
        result = run_cli("run", f"recipe={two}", "generation.keep_truncated=true", out_dir=out_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "rl_pref.jsonl")
    assert len(records) == 3
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in records)
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant" for r in records)
    manifest = json.loads((out_dir / "rl_pref.manifest.json").read_text())
    for shard in manifest["shards"]:
        assert shard["endpoints"] == {"precise": endpoint["OPENAI_BASE_URL"], "creative": second.endpoint}, shard
    assert manifest["usage"]["creative"]["requests"] >= 3 and manifest["usage"]["precise"]["requests"] >= 6
    written = "".join(p.read_text(errors="replace") for p in all_files(out_dir))
    assert endpoint["OPENAI_API_KEY"] not in written and second.api_key not in written


@pytest.mark.e2e
def test_tool_calling_from_one_json_conversation_column(endpoint, out_dir: Path) -> None:
    records = run_step("customer_support_tools", out_dir, endpoint)
    assert len(records) == 2
    for r in records:
        assert set(r) == {"messages", "tools", "order_id"}
        user, call, tool, answer = r["messages"]
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "tool", "assistant"]
        assert "tool_calls" not in user and "tool_calls" not in answer
        (tool_call,) = call["tool_calls"]
        assert isinstance(tool_call["function"]["arguments"], dict) and call["content"] == ""  # HF form
        assert tool["tool_call_id"] == tool_call["id"] and isinstance(tool["content"], str)


def test_nested_arguments_and_tool_results_become_json_strings() -> None:
    spec = load_recipe(str(STEP / "customer_support_tools.yaml")).output_projection
    call = {"function": {"name": "get_order_status", "arguments": {"order_id": "7"}}}
    conversation = {"messages": [
        {"role": "user", "content": "Where is order 7?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": {"status": "shipped"}},
        {"role": "assistant", "content": "It has shipped."},
    ]}  # fmt: skip
    record = structured_messages(spec, {"conversation": conversation, "order_id": "7"})  # type: ignore[arg-type]
    made = record["messages"][1]["tool_calls"][0]
    assert made["function"]["arguments"] == '{"order_id": "7"}'
    assert made["type"] == "function"
    assert record["messages"][2] == {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": made["id"]}
    call["function"]["name"] = "cancel_everything"
    with pytest.raises(InvalidRecord, match="unknown_tool"):
        structured_messages(spec, {"conversation": conversation, "order_id": "7"})  # type: ignore[arg-type]


def test_the_step_shape_reads_into_the_projects_own(monkeypatch) -> None:
    monkeypatch.setenv("PWD", str(REPO))
    recipe = load_recipe(str(STEP / "rl_pref.yaml"))
    assert recipe.name == "rl_pref" and recipe.provider == "local-vllm"
    assert list(recipe.models) == ["precise", "creative"]
    assert recipe.columns["judgement"].type == "llm_structured"  # a judge given as a schema
    projection = recipe.output_projection
    assert (projection.judge, projection.score) == ("judgement", "winner")  # type: ignore[union-attr]
    sft = load_recipe(str(STEP / "sft.yaml"))
    assert sft.columns["persona"].model_dump(exclude={"drop"}) == {
        "type": "sampler", "sampler_type": "category",
        "params": {"values": ["a curious high-school student", "a busy software engineer", "a retired teacher"]},
    }  # fmt: skip
    assert sft.seed_dataset is not None and sft.seed_dataset.fields == ["domain", "topic"]


def test_validate_prints_a_recipe_in_the_projects_form_that_validates_the_same(tmp_path: Path, out_dir: Path) -> None:
    env = {"PWD": str(REPO), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    first = run_cli("validate", f"recipe={STEP / 'tiny.yaml'}", out_dir=out_dir, env=env)
    assert first.returncode == 0, first.stderr
    migrated = tmp_path / "tiny_migrated.yaml"
    migrated.write_text(first.stdout)
    assert "models:\n  nvidia-text:\n" in first.stdout and "type: sampler" in first.stdout
    again = run_cli("validate", f"recipe={migrated}", out_dir=out_dir, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.replace(str(migrated), "X") == first.stdout.replace(str(STEP / "tiny.yaml"), "X")


def test_a_list_over_a_mapping_exits_2_naming_the_file_and_key(tmp_path: Path, out_dir: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [tiny]\nserve: [not, a, mapping]\n")
    result = run_cli("run", f"recipe={child}", out_dir=out_dir)
    assert result.returncode == 2, result.stderr
    assert f"{child}: serve: cannot merge over its parent: a list over a mapping" in result.stderr
    assert "Traceback" not in result.stderr and all_files(out_dir) == []


def test_every_problem_is_listed(out_dir: Path) -> None:
    result = run_cli("run", "recipe=tiny", "num_records=-1", "columns.persona.drop=maybe", "colour=1", out_dir=out_dir)
    assert result.returncode == 2
    for key in ("num_records", "columns.persona.drop", "colour"):
        assert f"\n  {key}: " in result.stderr, result.stderr
    assert "more)" not in result.stderr


def test_models_on_different_providers_each_go_to_their_own(tmp_path: Path, out_dir: Path) -> None:
    """The step's DPO shape names a provider per model: one answer from a model at one, the other (and the judge,
    which uses that alias too) at another, as the step runs them."""
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        f"defaults: {STEP / 'rl_pref.yaml'}\nmodels:\n"
        "  - {alias: precise, model: m, provider: local-vllm}\n  - {alias: creative, model: c, provider: nvidia}\n"
    )
    recipe = load_recipe(str(mixed))
    assert {a: recipe.provider_of(a) for a in recipe.models} == {"precise": "local-vllm", "creative": "nvidia"}
    assert recipe.remote_providers == ["local-vllm", "nvidia"] and not recipe.serves_locally
    everything = load_recipe(str(mixed), ["provider=nvidia"])  # the one-word switch still moves every model
    assert {everything.provider_of(a) for a in everything.models} == {"nvidia"}


def test_a_pasted_key_in_the_step_shape_is_refused_by_its_own_name(tmp_path: Path, out_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"defaults: {STEP / 'sft.yaml'}\nproviders:\n  - {{name: p, endpoint: http://x/v1, api_key: nvapi-123456789}}\n"
    )
    result = run_cli("validate", f"recipe={bad}", out_dir=out_dir, env={"PWD": str(REPO)})
    assert result.returncode == 2 and "providers.0.api_key" in result.stderr, result.stderr
    assert "nvapi-123456789" not in result.stderr


def test_seed_rows_drawn_with_replacement_repeat_and_are_reproducible() -> None:
    rows = plan_shards(40, 40, 5, "with_replacement", 7)[0].seed_rows
    assert rows == plan_shards(40, 40, 5, "with_replacement", 7)[0].seed_rows and set(rows) <= set(range(5))
    shuffled = plan_shards(40, 40, 5, "shuffle", 7)[0].seed_rows
    assert all(len(set(shuffled[i : i + 5])) == 5 for i in range(0, 40, 5))  # each pass uses every row once
    assert any(len(set(rows[i : i + 5])) < 5 for i in range(0, 40, 5))  # with replacement, rows repeat within one
