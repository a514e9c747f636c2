"""The benchmark command runs at smoke size and its numbers are coherent. Performance itself is judged on the
full-size run (README), not here: this machine is too small and noisy for timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sdg_job.config import load_recipe
from sdg_job.endpoints import concurrency
from sdg_job.manifest import client_cpu
from tests.conftest import REPO, shard_summary


def test_concurrency_fills_each_server_with_overlapping_shards() -> None:
    assert concurrency(load_recipe("tiny")) == (2, 4)  # 4 llama.cpp slots, shards of 5
    workers, per_worker = concurrency(load_recipe("default"))  # vLLM: 256 seqs x 8 data-parallel, shards of 250
    assert workers == 10 and per_worker * (workers - 1) >= 2048
    workers, per_worker = concurrency(load_recipe("default", ["generation.max_parallel_requests=64"]))
    assert (workers, per_worker) == (2, 64)


def test_client_cost_sets_apart_what_a_job_pays_once() -> None:
    timings = {"driver_cpu_startup": 1.0, "driver_cpu": 1.5}  # start-up, then 0.5 s in the loop
    shards = [shard_summary(cpu_s=2.0, engine_load_cpu_s=0.6), shard_summary(cpu_s=2.0, engine_load_cpu_s=0.0)]
    cpu = client_cpu(timings, shards, 1000)
    assert cpu["steady_ms_per_record"] == 4.5  # (0.5 + 2 + 2) s over 1000 records
    assert cpu["ms_per_record"] == 6.1  # and the 1.6 s paid once
    assert client_cpu(timings, [], 0)["ms_per_record"] is None


@pytest.mark.e2e
def test_bench_quick_prints_table_and_summary_ratios() -> None:
    result = subprocess.run([sys.executable, "-m", "sdg_job.bench", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: ")
    values = dict(re.findall(r"([a-zA-Z][\w =/-]*?) (\d+\.\d+)", summary.removeprefix("summary: ")))
    assert {"saturation C=64", "two servers C=64", "real server", "scale-out K=2", "client ms/record", "start-up s",
            "engine fixed/released", "driver RSS 5k/1k", "merge MB/s", "remote quota", "near-dup client on/off",
            "driver MB 100k near-dup"} <= set(values)  # fmt: skip
    assert float(values["driver MB 100k near-dup"]) < 1024  # the driver's index of signed records stays small
    table = result.stdout
    plain = float(re.search(r"plain Data Designer defaults.*?│\s*[\d.]+\s*│\s*req/s\s*│\s*([\d.]+)", table).group(1))
    assert float(values["saturation C=64"]) > 5 * plain  # sdg-job keeps the server far fuller than DD's defaults
    assert re.search(r"sdg-job, quota .*dropped none", table), table  # a quota costs time, never records
    # Two servers per node (one per column) are both kept busy: 0.86-0.99 measured alone, 0.63 beside another test
    # module on this 2-core machine; shards that ran in step keep each busy half the time at most (0.5).
    assert float(values["two servers C=64"]) > 0.55, table
    assert all(float(v) > 0 for v in values.values())
