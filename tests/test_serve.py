"""Server launch commands: exact flags, node-local bind, API key by environment only."""

from __future__ import annotations

from sdg_job.config import load_recipe
from sdg_job.serve import embedded_model_path, llama_server_command, server_command, vllm_command


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
