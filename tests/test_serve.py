"""Server launch commands: exact flags, node-local bind, API key by environment only."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.engines import EXTRA_ENGINES_ENV, PRODUCT, LlamaCpp, Vllm, engine_of, engines
from sdg_job.errors import JobError, RecipeError
from sdg_job.installers import embedded_model_path
from sdg_job.serve import Server, server_command, split_gpus
from sdg_job.simulator import SimulatorEngine, simulator_spec
from tests.conftest import run_cli


def test_vllm_command_from_default_recipe() -> None:
    serve = load_recipe("default").serve
    assert serve is not None
    assert Vllm(serve).command(8123) == [
        "vllm", "serve", "--model", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
        "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "nvidia/nemotron-3-nano-30b-a3b",
        "--tensor-parallel-size", "1", "--data-parallel-size", "8",
        "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9", "--max-model-len", "16384",
        "--trust-remote-code", "--reasoning-parser", "nemotron_v3",
        "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice", "--enable-expert-parallel",
    ]  # fmt: skip


def test_api_key_travels_by_environment_not_argv() -> None:
    serve = load_recipe("default").serve
    assert serve is not None
    argv, key_env = server_command(serve, 8000)
    assert key_env == "VLLM_API_KEY"
    assert not any("api-key" in a or "api_key" in a for a in argv)


def test_llama_server_command_serves_the_embedded_model_on_loopback() -> None:
    serve = load_recipe("tiny").serve
    assert serve is not None
    argv = LlamaCpp(serve).command(9000, binary="llama-server")
    assert argv[:3] == ["llama-server", "-m", str(embedded_model_path())]
    assert embedded_model_path().is_file()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("-np") + 1] == "4" and argv[argv.index("--alias") + 1] == "smollm2-135m"
    # A thread per open connection: enough for every worker's idle keep-alive connections plus /health.
    assert int(argv[argv.index("--threads-http") + 1]) >= 64


def test_each_engine_is_a_class_the_registry_names() -> None:
    """Callers ask the registry for a spec's engine; what differs between servers is the engine's."""
    default, tiny = load_recipe("default").serve, load_recipe("tiny").serve
    assert default is not None and tiny is not None
    assert isinstance(engine_of(default), Vllm) and isinstance(engine_of(tiny), LlamaCpp)
    assert (default.capacity, default.gpus) == (256 * 8, 8) and (tiny.capacity, tiny.gpus) == (4, 0)
    assert engine_of(default.model_copy(update={"device": "cpu"})).gpus == 0
    sim = simulator_spec(slots=7)
    assert isinstance(engine_of(sim), SimulatorEngine) and (sim.capacity, sim.gpus) == (7, 0)
    assert server_command(sim, 8000)[1] == "SIMULATOR_API_KEY" and not engine_of(sim).counts_tokens


def test_the_simulator_is_an_engine_of_the_tests_not_of_the_product(out_dir: Path) -> None:
    """The product's recipes take llama_cpp or vllm; serve.engine=simulator only where the tests register it."""
    assert set(PRODUCT) == {"llama_cpp", "vllm"} and "simulator" in engines()
    product = run_cli("validate", "recipe=tiny", "serve.engine=simulator", out_dir=out_dir, env={EXTRA_ENGINES_ENV: ""})
    assert product.returncode == 2, product.stderr
    assert "serve.engine: Input should be 'llama_cpp' or 'vllm'" in product.stderr
    tests = run_cli("validate", "recipe=tiny", "serve.engine=simulator", out_dir=out_dir)
    assert tests.returncode == 0, tests.stderr


@pytest.mark.e2e
def test_a_stopped_server_is_hung_only_after_its_timeout_and_restarts_on_the_same_port(tmp_path) -> None:
    """The SIMULATED server (sdg_job.simulator), frozen with SIGSTOP: alive, but answering nothing."""
    spec = simulator_spec().model_copy(update={"hang_timeout_s": 8.0})
    with Server(spec, tmp_path / "sim.log") as server:
        port = server.port
        assert server.alive() and not server.hung()
        os.kill(server.process.pid, signal.SIGSTOP)
        assert not server.hung()  # one 5 s health probe unanswered: slow, not yet hung
        assert server.hung()  # a second one: 10 s without an answer
        assert server.alive()
        started = time.monotonic()
        server.restart()  # SIGTERM + SIGCONT: the frozen process exits at once, no 20 s wait for SIGKILL
        assert time.monotonic() - started < 15
        assert server.port == port and server.healthy() and not server.hung() and server.restarts == 1


def test_fp8_layer_serves_the_fp8_checkpoint_with_an_fp8_kv_cache(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults: [default, layers/fp8]\n")
    serve = load_recipe(str(mine)).serve
    assert serve is not None
    argv = Vllm(serve).command(8000)
    assert argv[argv.index("--model") + 1] == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8"
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
    assert "--enable-expert-parallel" in argv and "--reasoning-parser" in argv  # the rest as in the default


@pytest.mark.e2e
def test_a_first_start_that_outlasts_its_timeout_names_the_setting(tmp_path: Path) -> None:
    """A server still loading (here the SIMULATED one, slow to listen, like vLLM fetching ~60 GB) is stopped and
    the error names the key to raise; a restart is bounded by the other key."""
    spec = simulator_spec(extra_args=["--startup-s", "60"])
    spec = spec.model_copy(update={"first_start_timeout_s": 2.0, "startup_timeout_s": 3.0})
    server = Server(spec, tmp_path / "server.log")
    with pytest.raises(JobError, match=r"not healthy after 2s \(serve\.first_start_timeout_s\)"):
        server.start()
    assert server.process is None
    server.restarts = 1
    with pytest.raises(JobError, match=r"not healthy after 3s \(serve\.startup_timeout_s\)"):
        server.start()


def test_offline_weights_must_be_staged_before_any_server_starts(tmp_path: Path, monkeypatch) -> None:
    serve = load_recipe("default").serve
    assert serve is not None
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    engine_of(serve).check_before_start()  # online: vLLM may download (bounded by serve.first_start_timeout_s)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 is not staged in .*/hf/hub"):
        engine_of(serve).check_before_start()
    snapshot = tmp_path / "hf/hub/models--nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16/snapshots/0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    engine_of(serve).check_before_start()


def test_each_server_of_a_node_gets_its_own_gpus_in_order() -> None:
    """What the node's actor hands each server of `serve.servers` from the GPUs Ray reserved for it (in the order
    Ray lists them, which is not numeric): neighbours for tensor parallel, none for a server that needs none."""
    servers = {**load_recipe("rl_pref", ["layer=judge"]).servers, "cpu": simulator_spec()}
    shares = split_gpus(servers, ["7", "2", "0", "3", "1", "6", "5", "4"])
    assert {name: spec.env["CUDA_VISIBLE_DEVICES"] for name, spec in shares.items()} == {
        "generator": "0,1,2,3", "judge": "4,5,6,7", "cpu": ""
    }  # fmt: skip
    pinned = {**servers, "judge": servers["judge"].model_copy(update={"env": {"CUDA_VISIBLE_DEVICES": "9,8,7,6"}})}
    assert split_gpus(pinned, [str(i) for i in range(8)])["judge"].env["CUDA_VISIBLE_DEVICES"] == "9,8,7,6"
    with pytest.raises(JobError, match="need 8 GPUs, this node offers 4"):
        split_gpus(servers, ["0", "1", "2", "3"])
