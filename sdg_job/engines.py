"""The kinds of server the job stands up, one class each: what a `serve:` section's `engine` names.

An engine owns what differs between servers: its command line for a spec and a port, the env var its API key goes
in (never argv), how many sequences it runs at once, the GPUs it needs, how it counts a record's tokens, and what
must hold before it starts. Everything else (start, health gate, restart, stop) is `serve.Server`'s, the same for
all of them. Callers ask `engine_of(spec)`, never compare engine names.

The product's engines are `PRODUCT`. Others register themselves (`register`): the capacity simulator
(sdg_job.simulator), which benchmarks and tests run, is one, and is not part of the product's recipe schema.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from sdg_job.errors import RecipeError
from sdg_job.installers import embedded_model_path, llama_server_binary

if TYPE_CHECKING:
    from sdg_job.config import ServeSpec

# Modules (comma-separated) whose engines a process also accepts: each registers its engines on import. An
# environment variable, not an entry point: it is off unless a test or a benchmark sets it, so an installed job
# never offers the simulator, and every process those start (the CLI, Ray workers, Slurm steps) inherits it.
EXTRA_ENGINES_ENV = "SDG_JOB_TEST_ENGINES"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as vLLM takes a model
OFFLINE = ("1", "true", "yes", "on")


class Engine:
    """One kind of server, for one `serve:` spec."""

    name: ClassVar[str]
    key_env: ClassVar[str]  # the env var the server reads its API key from
    counts_tokens: ClassVar[bool] = False  # whether it tokenizes with the model's chat template (`count_tokens`)
    serves_embeddings: ClassVar[bool] = True  # whether it can serve an embedding model beside the chat models
    embedding_args: ClassVar[tuple[str, ...]] = ()  # what it needs on its command line to serve embeddings too
    first_start_hint: ClassVar[str] = ""  # said when a first start times out

    def __init__(self, spec: ServeSpec):
        self.spec = spec

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """Concurrent sequences one server can run: what the client should keep in flight."""
        return self.spec.parallel

    @property
    def gpus(self) -> int:
        """GPUs one server needs on its node."""
        return 0

    def model_problem(self) -> str | None:
        """What is wrong with `serve.model` for this engine, found before any node starts it; None if nothing."""
        return None

    def check_before_start(self, key: str = "serve.model") -> None:
        """Raises RecipeError if what the server needs from outside is missing (`key`: where the model is named)."""

    def count_tokens(self, client: httpx.Client, content: Any, tools: list | None) -> int:
        """The tokens of `content` (a prompt, or messages rendered with the chat template) at the running server."""
        raise NotImplementedError(f"{self.name} counts no tokens")


class LlamaCpp(Engine):
    """llama.cpp's llama-server, on CPU: a .gguf file or the embedded model."""

    name = "llama_cpp"
    key_env = "LLAMA_API_KEY"
    counts_tokens = True
    embedding_args = ("--embeddings", "--pooling", "mean")  # its chat completions go on as before

    def command(self, port: int, binary: str | None = None) -> list[str]:
        spec = self.spec
        binary = binary or spec.llama_server or llama_server_binary()
        model = embedded_model_path() if spec.model == "embedded" else Path(spec.model)
        cmd = [binary, "-m", str(model), "--host", spec.host, "--port", str(port), "--alias", spec.served_model_name]
        cmd += ["-np", str(spec.parallel), "-c", str(spec.ctx_size), "--no-webui"]
        # Its HTTP server gives each open connection a thread, and Data Designer keeps up to 16 idle ones per worker:
        # with the default (cores - 1) threads, /health, and so the hang watchdog, would queue behind generations.
        cmd += ["--threads-http", str(max(64, 8 * spec.parallel))]
        if spec.threads:
            cmd += ["-t", str(spec.threads)]
        return cmd + list(spec.extra_args)

    def model_problem(self) -> str | None:  # a Hugging Face id fails only at start, on every node
        model = self.spec.model
        if HUB_ID.fullmatch(model) and not os.path.exists(model):
            return (f"llama_cpp serves a .gguf file or `embedded`, not the Hugging Face id {model!r} (an id "
                    "is for engine vllm; a layer that names a model per server, such as layer=judge, is for GPU "
                    "nodes)")  # fmt: skip
        return None

    def count_tokens(self, client: httpx.Client, content: Any, tools: list | None) -> int:
        if not isinstance(content, str):  # messages: rendered by the model's chat template first
            body = {"messages": content, **({"tools": tools} if tools else {})}
            content = post_json(client, "/apply-template", body)["prompt"]
        body = {"content": content, "add_special": False, "parse_special": True}
        return len(post_json(client, "/tokenize", body)["tokens"])


class Vllm(Engine):
    """vLLM's OpenAI server, on GPU nodes (or its CPU build, `device: cpu`)."""

    name = "vllm"
    key_env = "VLLM_API_KEY"
    counts_tokens = True
    serves_embeddings = False  # vLLM runs a model either to generate or to embed, never both on one server
    first_start_hint = " (a first start that downloads the weights can take longer: stage them in HF_HOME, see README)"

    def command(self, port: int) -> list[str]:
        """`vllm serve …` (`serve.vllm_command`: vLLM's own environment, which is not the job's: vLLM 0.33 and Data
        Designer 0.9.7 need different mcp majors); the API key comes from VLLM_API_KEY in the environment."""
        spec = self.spec
        # --model, not the positional tag: `python -m vllm.entrypoints.openai.api_server` (how vLLM builds whose
        # console script is broken start) ignores the tag and serves its default model.
        cmd = [*spec.vllm_command, "--model", spec.model, "--host", spec.host, "--port", str(port)]
        cmd += ["--served-model-name", spec.served_model_name]
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
        cmd += ["--data-parallel-size", str(spec.data_parallel_size)]
        cmd += ["--max-num-seqs", str(spec.max_num_seqs)]
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        if spec.max_model_len:
            cmd += ["--max-model-len", str(spec.max_model_len)]
        if spec.kv_cache_dtype:
            cmd += ["--kv-cache-dtype", spec.kv_cache_dtype]
        return cmd + list(spec.extra_args)

    @property
    def capacity(self) -> int:
        return self.spec.max_num_seqs * self.spec.data_parallel_size

    @property
    def gpus(self) -> int:
        spec = self.spec
        return spec.tensor_parallel_size * spec.data_parallel_size if spec.device == "gpu" else 0

    def check_before_start(self, key: str = "serve.model") -> None:
        """Offline (HF_HUB_OFFLINE=1), vLLM can only load weights already staged in the hub cache: name the model
        and the cache before any server starts, instead of a start-up failure per node deep in each server's log."""
        spec = self.spec
        env = {**os.environ, **spec.env}
        if env.get("HF_HUB_OFFLINE", "").lower() not in OFFLINE:
            return
        try:
            local = Path(spec.model).expanduser() if spec.model.startswith(("/", ".", "~")) else None
            cache = hub_cache(env)
        except RuntimeError as e:  # ~nosuchuser
            raise RecipeError("environment", "HF_HUB_OFFLINE=1", f"{key} / HF_HOME: {e}") from None
        if local is not None:
            if not local.is_dir():
                raise RecipeError("environment", "HF_HUB_OFFLINE=1", f"{key} {spec.model} is not a directory")
            return
        if not any((cache / f"models--{spec.model.replace('/', '--')}" / "snapshots").glob("*/config.json")):
            stage = f"stage it once on shared storage: HF_HOME={cache.parent} hf download {spec.model}"
            message = f"{key} {spec.model} is not staged in {cache}; {stage}"
            raise RecipeError("environment", "HF_HUB_OFFLINE=1", message)

    def count_tokens(self, client: httpx.Client, content: Any, tools: list | None) -> int:
        body: dict[str, Any] = {"model": self.spec.served_model_name, "add_special_tokens": False}
        if isinstance(content, str):
            body["prompt"] = content
        else:  # messages: vLLM renders them with the chat template itself
            body |= {"messages": content, "add_generation_prompt": False, **({"tools": tools} if tools else {})}
        return int(post_json(client, "/tokenize", body)["count"])


PRODUCT: dict[str, type[Engine]] = {LlamaCpp.name: LlamaCpp, Vllm.name: Vllm}
_registered: dict[str, type[Engine]] = {}


def register(engine: type[Engine]) -> type[Engine]:
    """Adds an engine that is not the product's (a class decorator); a product engine's name is refused."""
    if engine.name in PRODUCT:
        raise ValueError(f"engine {engine.name!r} is the product's")
    _registered[engine.name] = engine
    return engine


def engines() -> dict[str, type[Engine]]:
    """Every engine this process accepts, by name: the product's, then those registered (importing the modules
    named in SDG_JOB_TEST_ENGINES registers theirs)."""
    for module in os.environ.get(EXTRA_ENGINES_ENV, "").split(","):
        if module.strip():
            importlib.import_module(module.strip())
    return {**PRODUCT, **_registered}


def engine_of(spec: ServeSpec) -> Engine:
    """The engine that runs `spec` (its `engine` was checked against `engines()` when the recipe was read)."""
    return engines()[spec.engine](spec)


def hub_cache(env: dict[str, str]) -> Path:
    """Where Hugging Face libraries (vLLM among them) look for downloaded models, by their own rules."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    return Path(env.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def post_json(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    response.raise_for_status()
    return response.json()
