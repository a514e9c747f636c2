"""The benchmark command runs at smoke size and its numbers are coherent. Performance itself is judged on the
full-size run (README), not here: this machine is too small and noisy for timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sdg_job.config import load_recipe
from sdg_job.job import concurrency
from tests.conftest import REPO


def test_concurrency_fills_each_server_with_overlapping_shards() -> None:
    assert concurrency(load_recipe("tiny")) == (2, 4)  # 4 llama.cpp slots, shards of 5
    workers, per_worker = concurrency(load_recipe("default"))  # vLLM: 256 seqs x 8 data-parallel, shards of 250
    assert workers == 10 and per_worker * (workers - 1) >= 2048
    workers, per_worker = concurrency(load_recipe("default", ["generation.max_parallel_requests=64"]))
    assert (workers, per_worker) == (2, 64)


@pytest.mark.e2e
def test_bench_quick_prints_table_and_summary_ratios() -> None:
    result = subprocess.run([sys.executable, "-m", "sdg_job.bench", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: ")
    values = dict(re.findall(r"([a-zA-Z][\w =/-]*?) (\d+\.\d+)", summary.removeprefix("summary: ")))
    assert {"saturation C=64", "real server", "scale-out K=2", "client ms/record", "start-up s"} <= set(values)
    table = result.stdout
    plain = float(re.search(r"plain Data Designer defaults.*?│\s*[\d.]+\s*│\s*req/s\s*│\s*([\d.]+)", table).group(1))
    assert float(values["saturation C=64"]) > 5 * plain  # sdg-job keeps the server far fuller than DD's defaults
    assert all(float(v) > 0 for v in values.values())
