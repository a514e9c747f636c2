"""The records are for training: real outputs of the shipped recipes, made by the embedded model, go into TRL as the
README says (SFTTrainer for chat and tool calling, DPOTrainer for preference pairs), with the model's own chat
template and a tool-capable one.

`scripts/install-trl-cpu.sh` installs TRL, transformers and torch's CPU build into a venv of their own, and
converts the embedded GGUF into the Hugging Face form a trainer loads, once, cached outside the clone
(~/.cache/sdg-job/trl-1.16.0); the fixture runs it. tests/trl_check.py runs in that venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sdg_job.installers import embedded_model_path
from tests.conftest import REPO, read_jsonl, run_cli
from tests.test_e2e import cpu_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trl_home() -> tuple[str, str]:
    """(the TRL venv's python, the embedded model in Hugging Face form)."""
    env = {**os.environ, "GGUF": str(embedded_model_path())}
    out = subprocess.run(["bash", str(REPO / "scripts" / "install-trl-cpu.sh")], env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    python, model = out.stdout.split()
    return python, model


def make(tmp_path: Path, recipe: str, extra: str, name: str) -> Path:
    out_dir = tmp_path / name
    result = run_cli("run", f"recipe={cpu_recipe(tmp_path, recipe, extra)}", out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir / f"{recipe}.jsonl"


def test_every_projection_trains_in_trl_with_real_chat_templates(trl_home, tmp_path: Path) -> None:
    """Finite losses for the three trainers; the DPO prompt TRL tokenizes carries the model's turn markers (a
    plain-string prompt would be tokenized bare); each tool call renders once, with its arguments as an object,
    not a JSON string inside JSON."""
    python, model = trl_home
    sft = make(tmp_path, "tiny", "num_records: 4\n", "sft")
    short = "inference_parameters: {max_tokens: 96}"
    dpo = make(tmp_path, "rl_pref", f"num_records: 4\ngeneration: {{keep_truncated: true}}\nmodels:\n"
               f"  precise: {{{short}}}\n  creative: {{{short}}}\n  judge: {{{short}}}\n", "dpo")  # fmt: skip
    # The content gates are tested in test_e2e; the 135M model passes them rarely, and any well-formed
    # conversation shows how a trainer renders the calls.
    tools = make(tmp_path, "customer_support_tools", "num_records: 3\ngeneration: {budget: 10, keep_truncated: true}\n"
                 "models:\n  text: {inference_parameters: {max_tokens: 128}}\n"
                 "  structured: {inference_parameters: {max_tokens: 128}}\n"
                 "output_projection: {checks: {unrendered_template: false, placeholder_text: false, "
                 "prompt_scaffolding: false}}\n", "tools")  # fmt: skip
    check = subprocess.run([python, str(REPO / "tests" / "trl_check.py"), model, str(sft), str(dpo), str(tools)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    found = json.loads(check.stdout.strip().splitlines()[-1])
    assert found["finite"], found
    prompt = found["dpo_prompt_tokenized"]
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"), prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n"), prompt
    calls = [json.loads(c) for c in found["tool_calls_rendered"]]
    assert len(calls) == len(read_jsonl(tools)) == 3
    assert all(isinstance(c["arguments"], dict) and c["arguments"].get("order_id") for c in calls), calls
    assert all(n > 512 for n in found["tool_record_tokens"]), found["tool_record_tokens"]  # what max_length must fit
    # The card's counts, made by the serving llama-server, are the trainer's: within the 2 tokens that close the
    # last turn (`<|im_end|>\n`, which llama.cpp's /apply-template leaves open), and the few where llama.cpp's
    # pre-tokenizer merges whitespace that Hugging Face's splits (seen in CI: "\n\n1." is one "\n\n" token to
    # llama.cpp, two "\n" to the trainer; a 272-token record counted 275 by TRL).
    counted = json.loads((sft.parent / "tiny.manifest.json").read_text())["record_tokens"]
    trainer = sorted(found["sft_record_tokens"])
    assert counted["records"] == len(trainer) == 4

    def agree(trained: int, card: int) -> bool:
        return 0 <= trained - card <= 2 + card // 100

    assert agree(trainer[0], counted["min"]) and agree(trainer[-1], counted["max"]), (counted, trainer)
