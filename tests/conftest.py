"""Shared helpers: run the real CLI in a subprocess, with outputs under a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdg_job.supervise import start_time

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _cli(args: tuple[str, ...], out_dir: Path, env: dict[str, str] | None) -> tuple[list[str], dict]:
    full_env = {**os.environ, "SDG_OUTPUT_DIR": str(out_dir), **(env or {})}
    return [sys.executable, "-m", "sdg_job", *args], {"cwd": REPO, "env": full_env, "text": True}


def run_cli(*args: str, out_dir: Path, env: dict[str, str] | None = None, timeout: float = 900):
    """`python -m sdg_job …` with SDG_OUTPUT_DIR pointing at `out_dir`, to completion."""
    argv, options = _cli(args, out_dir, env)
    return subprocess.run(argv, capture_output=True, timeout=timeout, **options)


def start_cli(*args: str, out_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The same, in the background (to kill something mid-run)."""
    argv, options = _cli(args, out_dir, env)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    """Poll `predicate` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """Live processes (pid → cmdline) whose environment has name=value: every process a job starts inherits it,
    orphans too, and nobody else's process carries it. Zombies are gone already (PID 1 reaps them lazily here)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{name}={value}".encode() in environ.split(b"\0") and start_time(int(entry)) is not None:
            found[int(entry)] = cmdline.strip()
    return found


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory):
    """`datasets`, imported offline with its home in a temp dir (nothing touches ~/.cache or the network)."""
    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_HOME": home, "HF_DATASETS_CACHE": home / "datasets", "HF_HUB_OFFLINE": "1",
                            "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():  # fmt: skip
            mp.setenv(name, str(value))
        import datasets

        datasets.disable_progress_bars()
        yield datasets
