"""Server launch commands: exact flags, node-local bind, API key by environment only."""

from __future__ import annotations

import os
import signal
import time

from sdg_job.config import load_recipe
from sdg_job.serve import (
    Server,
    embedded_model_path,
    llama_server_command,
    server_command,
    simulator_spec,
    vllm_command,
)


def test_vllm_command_from_default_recipe() -> None:
    serve = load_recipe("default").serve
    assert serve is not None
    assert vllm_command(serve, 8123) == [
        "vllm", "serve", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
        "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "nvidia/nemotron-3-nano-30b-a3b",
        "--tensor-parallel-size", "1", "--data-parallel-size", "8",
        "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9", "--max-model-len", "16384",
        "--trust-remote-code", "--reasoning-parser", "nemotron_v3",
        "--tool-call-parser", "qwen3_coder", "--enable-auto-tool-choice",
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
    argv = llama_server_command(serve, 9000, binary="llama-server")
    assert argv[:3] == ["llama-server", "-m", str(embedded_model_path())]
    assert embedded_model_path().is_file()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("-np") + 1] == "4" and argv[argv.index("--alias") + 1] == "smollm2-135m"
    # A thread per open connection: enough for every worker's idle keep-alive connections plus /health.
    assert int(argv[argv.index("--threads-http") + 1]) >= 64


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
