"""One OpenAI-compatible server per node: vLLM on GPU nodes, llama.cpp's llama-server on CPU.

The server binds to the node only, is guarded by a fresh per-job API key passed through the environment (never
argv, so it stays out of `ps` and logs), is health-gated with a timeout that also notices the process dying,
and is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sdg_job.config import ServeSpec
from sdg_job.errors import JobError, RecipeError
from sdg_job.installers import embedded_model_path, llama_server_binary

API_KEY_ENV = "SDG_SERVER_API_KEY"  # Data Designer reads the key from this env-var NAME


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def llama_server_command(spec: ServeSpec, port: int, binary: str = "llama-server") -> list[str]:
    model = embedded_model_path() if spec.model == "embedded" else Path(spec.model)
    cmd = [binary, "-m", str(model), "--host", spec.host, "--port", str(port), "--alias", spec.served_model_name]
    cmd += ["-np", str(spec.parallel), "-c", str(spec.ctx_size), "--no-webui"]
    # Its HTTP server gives each open connection a thread, and Data Designer keeps up to 16 idle ones per worker:
    # with the default (cores - 1) threads, /health, and so the hang watchdog, would queue behind generations.
    cmd += ["--threads-http", str(max(64, 8 * spec.parallel))]
    if spec.threads:
        cmd += ["-t", str(spec.threads)]
    return cmd + list(spec.extra_args)


def vllm_command(spec: ServeSpec, port: int) -> list[str]:
    """`vllm serve …` (`serve.vllm_command`: vLLM's own environment, which is not the job's: vLLM 0.33 and Data
    Designer 0.9.7 need different mcp majors); the API key comes from VLLM_API_KEY in the environment, not argv."""
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


def hub_cache(env: dict[str, str]) -> Path:
    """Where Hugging Face libraries (vLLM among them) look for downloaded models, by their own rules."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    return Path(env.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def split_gpus(servers: dict[str, ServeSpec], ids: list[str]) -> dict[str, ServeSpec]:
    """Each server's share of a node's GPUs `ids`, in its CUDA_VISIBLE_DEVICES: the next `spec.gpus` of them in
    order (neighbours, for tensor parallel), none for a server that needs none (a CUDA build of llama-server would
    take memory on vLLM's GPUs). A server whose own `env` names its GPUs keeps them."""
    ids = sorted(ids, key=lambda i: (len(i), i))  # "2" before "10"
    if (needed := sum(spec.gpus for spec in servers.values())) > len(ids):
        raise JobError(f"the servers need {needed} GPUs, this node offers {len(ids)}")
    shares = {}
    for name, spec in servers.items():
        share, ids = ids[: spec.gpus], ids[spec.gpus :]
        if "CUDA_VISIBLE_DEVICES" not in spec.env:
            spec = spec.model_copy(update={"env": {**spec.env, "CUDA_VISIBLE_DEVICES": ",".join(share)}})
        shares[name] = spec
    return shares


def check_weights_staged(spec: ServeSpec, key: str = "serve.model") -> None:
    """Offline (HF_HUB_OFFLINE=1), vLLM can only load weights already staged in the hub cache: name the model and
    the cache before any server starts, instead of a start-up failure per node deep in each server's log."""
    env = {**os.environ, **spec.env}
    if spec.engine != "vllm" or env.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
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


def simulator_command(spec: ServeSpec, port: int) -> list[str]:
    """The capacity-limited SIMULATED server (benchmarks and tests only; it generates no language)."""
    cmd = [sys.executable, "-m", "sdg_job.simulator", "--host", spec.host, "--port", str(port)]
    return cmd + ["--slots", str(spec.parallel), "--seconds-per-token", str(spec.seconds_per_token), *spec.extra_args]


def simulator_spec(slots: int = 64, seconds_per_token: float = 0.001, extra_args: Sequence[str] = ()) -> ServeSpec:
    """A standalone simulated server for benchmarks and fault tests (e.g. extra_args=["--fail-500", "0.1"])."""
    return ServeSpec(engine="simulator", model="simulated", served_model_name="simulated", parallel=slots,
                     seconds_per_token=seconds_per_token, extra_args=list(extra_args))  # fmt: skip


def server_command(spec: ServeSpec, port: int) -> tuple[list[str], str]:
    """argv, and the env var the engine reads its API key from (so the key never appears in argv)."""
    if spec.engine == "vllm":
        return vllm_command(spec, port), "VLLM_API_KEY"
    if spec.engine == "simulator":
        return simulator_command(spec, port), "SIMULATOR_API_KEY"
    return llama_server_command(spec, port, spec.llama_server or llama_server_binary()), "LLAMA_API_KEY"


def _die_with_parent() -> None:
    """Linux: the server gets SIGKILL when its owner dies (a killed driver or actor leaves no orphan GPU server)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def answers_health(base_url: str, timeout_s: float = 5) -> bool:
    """Does the server at `base_url` (no /v1) answer GET /health with 200 within `timeout_s`?"""
    try:
        return httpx.get(f"{base_url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Server:
    """A running server process; `endpoint` is what Data Designer talks to."""

    spec: ServeSpec
    log_path: Path
    port: int = 0
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    argv: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    restarts: int = 0
    unanswered_since: float | None = None  # monotonic start of the current run of failed /health probes

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> Server:
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it to be healthy. From the thread that owns the server: the
        kernel ends the process when the thread that started it exits (PR_SET_PDEATHSIG), not only its process."""
        self.port = self.port or free_port(self.spec.host)
        self.argv, key_env = server_command(self.spec, self.port)
        env = {**os.environ, **self.spec.env, key_env: self.api_key}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def wait_healthy(self) -> None:
        # The first start may download weights and compile kernels; a restart loads what is already local.
        key = "startup_timeout_s" if self.restarts else "first_start_timeout_s"
        timeout = getattr(self.spec, key)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise JobError(
                    f"{self.spec.engine} server exited with code {code} during start-up; see {self.log_path}"
                )
            if self.healthy(timeout_s=2):
                return
            time.sleep(0.2)
        self.stop()
        hint = ""
        if self.spec.engine == "vllm" and not self.restarts:
            hint = " (a first start that downloads the weights can take longer: stage them in HF_HOME, see README)"
        raise JobError(
            f"{self.spec.engine} server not healthy after {timeout:.0f}s (serve.{key}){hint}; see {self.log_path}"
        )

    def healthy(self, timeout_s: float = 5) -> bool:
        started = time.monotonic()
        ok = answers_health(self.url, timeout_s)
        self.unanswered_since = None if ok else (self.unanswered_since or started)
        return ok

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def hung(self) -> bool:
        """Running, but its /health probes have failed for `hang_timeout_s` in a row (a deadlocked engine, a
        stopped process). A busy server still answers within that time, so in-flight work is not thrown away."""
        limit = self.spec.hang_timeout_s
        if not limit or self.healthy():
            return False
        return self.unanswered_since is not None and time.monotonic() - self.unanswered_since >= limit

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is not None:
            # The server died (killed, crashed): what it started may not have. vLLM's engine core and workers are
            # processes of its session, holding the port's memory and the KV cache: end them with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(server: Server) -> dict:
    """What the manifest records: argv and endpoint, never the key."""
    out = {"engine": server.spec.engine, "argv": server.argv, "endpoint": server.endpoint, "restarts": server.restarts}
    if (gpus := server.spec.env.get("CUDA_VISIBLE_DEVICES")) is not None:  # its share of the node's GPUs
        out["gpus"] = [g for g in gpus.split(",") if g]
    return out
