"""One OpenAI-compatible server per node: vLLM on GPU nodes, llama.cpp's llama-server on CPU (each an engine of
sdg_job.engines, which owns its command line; this module runs any of them the same way).

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sdg_job.config import ServeSpec
from sdg_job.engines import engine_of
from sdg_job.errors import JobError

API_KEY_ENV = "SDG_SERVER_API_KEY"  # Data Designer reads the key from this env-var NAME


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def server_command(spec: ServeSpec, port: int) -> tuple[list[str], str]:
    """argv, and the env var the engine reads its API key from (so the key never appears in argv)."""
    engine = engine_of(spec)
    return engine.command(port), engine.key_env


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
        hint = "" if self.restarts else engine_of(self.spec).first_start_hint
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
