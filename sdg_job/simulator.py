"""A SIMULATED OpenAI-compatible LLM server, for benchmarks and fault injection only. It generates no language.

It behaves like a continuous-batching engine with `slots` concurrent sequences: a request holds a slot for
`max_tokens × seconds_per_token` (+ a fixed prefill cost) and queues when all slots are busy, so its capacity is
known exactly: slots / service_time requests per second. Answers are unique filler text, or, when the request
carries `response_format: json_schema`, a minimal instance of that schema. Like a reasoning model behind vLLM's
reasoning parser, it thinks unless the request says `chat_template_kwargs: {enable_thinking: false}`, and returns
the trace as `reasoning` (as vLLM 0.16 and later do), apart from the answer.

Faults and limits, as a test or a benchmark sets them:
- HTTP 500, 429 and 400 at set rates; after `die_after` requests the process exits (a dying server);
- `startup_s` delays listening, like an engine loading its weights;
- `cut_rate` reports that share of text answers as cut at max_tokens (finish_reason: length);
- `serves` names the only models it serves: a request for another gets vLLM's 404;
- `key_file` holds the one key it accepts, read on every request: rewrite the file to revoke or rotate the key
  mid-run (OpenAI's 401 for any other);
- `quota` requests and `token_quota` tokens (the prompt's, counted as it reports them, and max_tokens) per
  `quota_window_s`, a provider's rate limits: beyond either, 429 with the Retry-After that frees room.
`record` appends each request body to a JSONL file (what a test checks the client sent).

    python -m sdg_job.simulator --port 8000 --slots 64 --seconds-per-token 0.001 --fail-500 0.05

The job starts it as an engine (`serve.engine=simulator`) only where this module is registered, never as the
product: see `SimulatorEngine`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sdg_job.engines import Engine, register

if TYPE_CHECKING:
    from sdg_job.config import ServeSpec

PROMPT_TOKENS = 10  # what every answer reports for its prompt, and what the token quota counts for it


def schema_instance(schema: dict[str, Any], defs: dict[str, Any], rng: random.Random, n: int) -> Any:
    """A small value valid against `schema` (the subset Data Designer and our recipes produce)."""
    if "$ref" in schema:
        return schema_instance(defs[schema["$ref"].split("/")[-1]], defs, rng, n)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return schema_instance(schema[key][0], defs, rng, n)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: schema_instance(v, defs, rng, n) for k, v in props.items()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), defs, rng, n)]
    if kind in ("integer", "number"):
        return n
    if kind == "boolean":
        return True
    return f"value {n}"


class Simulator:
    def __init__(self, slots: int, seconds_per_token: float, prefill_s: float, faults: dict[str, float],
                 die_after: int | None, seed: int, record: str | None = None, cut_rate: float = 0.0,
                 serves: list[str] | None = None, key_file: str | None = None, quota: int | None = None,
                 quota_window_s: float = 60.0, token_quota: int | None = None):  # fmt: skip
        self.serves, self.key_file = serves, key_file
        self.quota, self.quota_window_s, self.token_quota = quota, quota_window_s, token_quota
        # (when, tokens) of each request admitted in the window
        self.admitted: collections.deque[tuple[float, int]] = collections.deque()
        self.cut_rate = cut_rate  # text answers reported as cut at max_tokens (finish_reason: length)
        self.record = open(record, "a", buffering=1) if record else None  # noqa: SIM115 (lives as long as the server)
        self.slots = asyncio.Semaphore(slots)
        self.seconds_per_token, self.prefill_s = seconds_per_token, prefill_s
        self.faults, self.die_after = faults, die_after
        self.rng = random.Random(seed)
        self.counter = itertools.count(1)
        self.nonce = f"{os.getpid()}-{random.getrandbits(32):08x}"  # answers unique across simulated servers
        self.stats: dict[str, Any] = {"requests": 0, "ok": 0, "errors": {}, "busy": 0, "max_busy": 0,
                                      "output_tokens": 0, "first_request_at": None,
                                      "last_response_at": None, "completions": []}  # fmt: skip

    async def chat(self, request: web.Request) -> web.Response:
        n = next(self.counter)
        self.stats["requests"] += 1
        if self.stats["first_request_at"] is None:
            self.stats["first_request_at"] = time.time()
        if self.die_after is not None and n > self.die_after:
            os._exit(17)  # a server that dies mid-run
        key = Path(self.key_file).read_text().strip() if self.key_file else None
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            self.stats["errors"]["401"] = self.stats["errors"].get("401", 0) + 1
            error = {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
            return web.json_response({"error": error}, status=401)
        body = await request.json()
        if self.record:
            self.record.write(json.dumps(body) + "\n")
        if self.serves and body.get("model") not in self.serves:
            said = f"The model `{body.get('model')}` does not exist."
            return web.json_response({"object": "error", "message": said, "type": "NotFoundError", "code": 404},
                                     status=404)  # fmt: skip
        max_tokens = int(body.get("max_tokens") or 64)
        if self.quota is not None or self.token_quota is not None:
            now, tokens = time.monotonic(), PROMPT_TOKENS + max_tokens
            while self.admitted and self.admitted[0][0] <= now - self.quota_window_s:
                self.admitted.popleft()
            over_requests = self.quota is not None and len(self.admitted) >= self.quota
            in_window = sum(t for _, t in self.admitted)
            over_tokens = self.token_quota is not None and in_window + tokens > self.token_quota
            if over_requests or over_tokens:
                self.stats["errors"]["429"] = self.stats["errors"].get("429", 0) + 1
                wait = (self.admitted[0][0] + self.quota_window_s - now) if self.admitted else self.quota_window_s
                error = {
                    "message": f"Rate limit reached for {'requests' if over_requests else 'tokens'}",
                    "type": "requests" if over_requests else "tokens",
                    "code": "rate_limit_exceeded",
                }
                return web.json_response({"error": error}, status=429, headers={"Retry-After": f"{wait:.3f}"})
            self.admitted.append((now, tokens))
        roll = self.rng.random()
        for status, rate in self.faults.items():
            if roll < rate:
                self.stats["errors"][status] = self.stats["errors"].get(status, 0) + 1
                return web.json_response({"error": {"message": f"simulated HTTP {status}"}}, status=int(status))
            roll -= rate
        async with self.slots:
            self.stats["busy"] += 1
            self.stats["max_busy"] = max(self.stats["max_busy"], self.stats["busy"])
            try:
                await asyncio.sleep(self.prefill_s + max_tokens * self.seconds_per_token)
            finally:
                self.stats["busy"] -= 1
        fmt = (body.get("response_format") or {}).get("json_schema")
        if fmt:
            schema = fmt.get("schema", {})
            content = json.dumps(schema_instance(schema, schema.get("$defs", {}), self.rng, n))
        else:
            content = f"Simulated answer {self.nonce}-{n}. " + " ".join(["lorem"] * max(0, min(max_tokens, 64) - 5))
        message = {"role": "assistant", "content": content}
        finish = "length" if not fmt and self.rng.random() < self.cut_rate else "stop"
        if (body.get("chat_template_kwargs") or {}).get("enable_thinking", True):
            message["reasoning"] = f"Simulated thinking {self.nonce}-{n}."
        self.stats["ok"] += 1
        self.stats["output_tokens"] += max_tokens
        self.stats["last_response_at"] = time.time()
        self.stats["completions"].append(round(self.stats["last_response_at"], 4))
        return web.json_response({
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "simulated"),
            "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": max_tokens,
                      "total_tokens": PROMPT_TOKENS + max_tokens},
        })  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        ids = self.serves or ["simulated"]
        return web.json_response({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})

    async def get_stats(self, request: web.Request) -> web.Response:  # completion times: benchmarks' steady state
        return web.json_response(self.stats)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdg_job.simulator", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=64, help="concurrent sequences (the engine's max_num_seqs)")
    p.add_argument("--seconds-per-token", type=float, default=0.001)
    p.add_argument("--prefill-s", type=float, default=0.0)
    p.add_argument("--fail-500", type=float, default=0.0)
    p.add_argument("--fail-429", type=float, default=0.0)
    p.add_argument("--fail-400", type=float, default=0.0)
    p.add_argument("--die-after", type=int, default=None, help="exit after this many requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-s", type=float, default=0.0, help="wait this long before listening (loading weights)")
    p.add_argument("--record", default=None, help="append each request body to this JSONL file")
    p.add_argument("--cut-rate", type=float, default=0.0, help="text answers reported cut at max_tokens (length)")
    p.add_argument("--serves", default=None, help="comma-separated model names; others get HTTP 404")
    p.add_argument("--key-file", default=None, help="the one key accepted (read per request); others get HTTP 401")
    p.add_argument("--quota", type=int, default=None, help="requests per --quota-window-s; beyond it HTTP 429")
    p.add_argument("--quota-window-s", type=float, default=60.0)
    p.add_argument("--token-quota", type=int, default=None, help="tokens per --quota-window-s; beyond it HTTP 429")
    # A recipe's llama.cpp layer passes its sampling flags (--repeat-penalty …): the simulator models none of them.
    a, _ = p.parse_known_args(argv)
    faults = {"500": a.fail_500, "429": a.fail_429, "400": a.fail_400}

    async def serve() -> None:
        await asyncio.sleep(a.startup_s)
        serves = a.serves.split(",") if a.serves else None
        sim = Simulator(a.slots, a.seconds_per_token, a.prefill_s, faults, a.die_after, a.seed, a.record, a.cut_rate,
                        serves, a.key_file, a.quota, a.quota_window_s, a.token_quota)  # fmt: skip
        runner = web.AppRunner(sim.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.host, a.port, backlog=4096).start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        print(json.dumps({"final_stats": sim.stats}), flush=True)  # benchmarks read this from the server log
        await runner.cleanup()

    asyncio.run(serve())


@register
class SimulatorEngine(Engine):
    """This server as an engine of the job, for benchmarks and tests. Registered when this module is imported:
    by `simulator_spec`, or in any process whose SDG_JOB_TEST_ENGINES names sdg_job.simulator (tests/conftest.py
    and sdg_job.bench set it, so the CLI, Ray workers and Slurm steps they start accept serve.engine=simulator)."""

    name = "simulator"
    key_env = "SIMULATOR_API_KEY"

    def command(self, port: int) -> list[str]:
        spec = self.spec
        cmd = [sys.executable, "-m", "sdg_job.simulator", "--host", spec.host, "--port", str(port)]
        return cmd + ["--slots", str(spec.parallel), "--seconds-per-token", str(spec.seconds_per_token),
                      *spec.extra_args]  # fmt: skip


def simulator_spec(slots: int = 64, seconds_per_token: float = 0.001, extra_args: Sequence[str] = ()) -> ServeSpec:
    """A standalone simulated server for benchmarks and fault tests (e.g. extra_args=["--fail-500", "0.1"])."""
    from sdg_job.config import ServeSpec  # not at import: the server process itself needs no recipe schema

    return ServeSpec(engine="simulator", model="simulated", served_model_name="simulated", parallel=slots,
                     seconds_per_token=seconds_per_token, extra_args=list(extra_args))  # fmt: skip


if __name__ == "__main__":
    main()
