"""Reasoning control (`models.<alias>.reasoning: off | on`), checked on what the server received.

The server here is the SIMULATED one (sdg_job.simulator, `--record` keeps every request body): it thinks unless a
request turns thinking off, and returns its trace apart from the answer, as vLLM's reasoning parser does. The real
vLLM path is in test_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.project import InvalidRecord, openai_messages
from sdg_job.serve import Server
from sdg_job.simulator import simulator_spec
from tests.conftest import read_jsonl, run_cli

SIMULATED = ["recipe=tiny", "num_records=6", "serve.engine=simulator"]


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_reasoning_off_asks_every_request_not_to_think(out_dir: Path, tmp_path: Path) -> None:
    bodies = tmp_path / "bodies.jsonl"
    result = run_cli("run", *SIMULATED, f"serve.extra_args=[--record, '{bodies}']", out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sent = recorded(bodies)
    assert len(sent) >= 12  # two LLM columns per record
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in sent), sent[0]
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 6
    assert all(set(m) == {"role", "content"} for r in records for m in r["messages"])


@pytest.mark.e2e
def test_reasoning_on_keeps_the_trace_beside_the_answer(out_dir: Path, tmp_path: Path) -> None:
    bodies = tmp_path / "bodies.jsonl"
    result = run_cli("run", *SIMULATED, "models.text.reasoning=on", f"serve.extra_args=[--record, '{bodies}']",
                     out_dir=out_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(b["chat_template_kwargs"] == {"enable_thinking": True} for b in recorded(bodies))
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 6
    for record in records:
        user, assistant = record["messages"]
        assert assistant["reasoning_content"].startswith("Simulated thinking")
        assert "thinking" not in assistant["content"] and "thinking" not in user["content"]
        assert user["reasoning_content"].startswith("Simulated thinking")  # an LLM column too, the user turn


@pytest.mark.e2e
def test_reasoning_on_with_the_trace_left_out(out_dir: Path) -> None:
    result = run_cli("run", *SIMULATED, "models.text.reasoning=on", "output_projection.reasoning_field=null",
                     out_dir=out_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 6 and all(set(m) == {"role", "content"} for r in records for m in r["messages"])


@pytest.mark.e2e
def test_provider_openai_is_never_sent_the_template_switch(out_dir: Path, tmp_path: Path) -> None:
    """A strict OpenAI-compatible service may refuse an unknown field (HTTP 400 for every row)."""
    bodies = tmp_path / "bodies.jsonl"
    with Server(simulator_spec(extra_args=["--record", str(bodies)]), tmp_path / "sim.log") as server:
        result = run_cli("run", "recipe=tiny", "num_records=4", "provider=openai", out_dir=out_dir,
                         env={"OPENAI_BASE_URL": server.endpoint, "OPENAI_API_KEY": "not-needed-here"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sent = recorded(bodies)
    assert sent and not any("chat_template_kwargs" in b for b in sent), sent[0]


def test_shipped_nemotron_recipes_turn_thinking_off() -> None:
    for name in ("default", "rl_pref", "customer_support_tools"):
        recipe = load_recipe(name)
        assert {alias: m.reasoning for alias, m in recipe.models.items()} == dict.fromkeys(recipe.models, "off"), name


def test_thinking_inside_an_answer_drops_the_record() -> None:
    spec = load_recipe("tiny").output_projection
    row = {"user_message": "Why is the sky blue?", "assistant_message": "<think>Rayleigh.</think> Scattering."}
    with pytest.raises(InvalidRecord, match="reasoning_in_content"):
        openai_messages(spec, row)  # type: ignore[arg-type]
