"""Shared helpers: run the real CLI in a subprocess, with outputs under a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdg_job import bench
from sdg_job.engines import EXTRA_ENGINES_ENV
from sdg_job.summary import ShardSummary
from sdg_job.supervise import start_time

REPO = Path(__file__).resolve().parent.parent


# `make test` runs two pytest-xdist workers. Each module is one unit of work, so its module-scoped cluster is started
# once, and the modules that share the session's Docker engine and image are one unit together.
SHARED_UNITS = {"test_docker": "image", "test_pyxis": "image"}
# Longest first (minutes on a full run here), so that the two workers finish together; the rest follow in file order.
LONGEST_FIRST = ["image", "test_slurm", "test_vllm", "test_trl", "test_e2e", "test_scale_out", "test_lifecycle",
                 "test_bench", "test_ssh_tunnel", "test_step_shape", "test_card"]  # fmt: skip


# The capacity simulator is an engine of the tests, not of the product: every process a test starts (the CLI, Ray
# workers, Slurm jobs) inherits this and so accepts serve.engine=simulator.
os.environ.setdefault(EXTRA_ENGINES_ENV, "sdg_job.simulator")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: each llama-server a test starts takes one thread (llama.cpp's own env var; a
    # recipe's serve.threads still wins). Two servers of two threads each on two cores spin in each other's way.
    os.environ.setdefault("LLAMA_ARG_THREADS", "1")

# tiny with its question asked by a second served model (alias asker): two servers on every node, the same GGUF.
TWO_SERVERS = tuple(bench.TWO_SERVERS)


def unit_of(nodeid: str) -> str:
    module = Path(nodeid.split("::")[0]).stem
    return SHARED_UNITS.get(module, module)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable: file order within and after


class ByUnit:
    """xdist's loadscope with our units (its loadgroup marks do not reach the node ids under pytest 9)."""

    @staticmethod
    def pytest_xdist_make_scheduler(config: pytest.Config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return unit_of(nodeid)

        return Scheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.has_plugin("xdist"):  # its hook exists only with xdist (`-p no:xdist` runs in one process)
        config.pluginmanager.register(ByUnit())


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


def shard_summary(shard: str = "shard-00000", **fields) -> ShardSummary:
    """A shard's summary as a worker reports it, with zeros for what a test does not look at."""
    zeros = {"requested": 0, "generated": 0, "valid": 0, "dropped": {}, "input_tokens": 0, "output_tokens": 0,
             "seconds": 0.0, "retries": 0, "random_seed": 0, "endpoint": "http://127.0.0.1:8000/v1",
             "worker": "host:1", "error": None}  # fmt: skip
    return ShardSummary(**{"shard": shard, **zeros, **fields})


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed once if it is not there, as every component a test needs."""
    script = REPO / "scripts" / "install-debian-packages.sh"
    subprocess.run(
        [str(script), "chromium", "chromium"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )
    return CHROMIUM


def open_in_browser(chromium: str, page_path: Path) -> tuple[list[dict], list[str]]:
    """The page opened in a real headless Chromium (Playwright): each image's alt text and rendered size, and the
    console's errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "[...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight,"
                " complete: i.complete}))"
            )
        finally:
            browser.close()
    return images, errors


def all_files(root: Path) -> list[Path]:
    """Every file under root; what a live run removes during the walk (a shard's scratch dir) is passed over."""
    return [Path(d, f) for d, _, files in os.walk(root) for f in files if os.path.isfile(os.path.join(d, f))]


def mtimes(root: Path) -> dict[Path, int]:
    """Each file under root and its modification time, as all_files finds them."""
    found = {}
    for path in all_files(root):
        try:
            found[path] = path.stat().st_mtime_ns
        except FileNotFoundError:
            pass
    return found


def text_of(path: Path) -> str:
    """A file's text, or "" once it is gone (another process's scratch file)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    """Poll `predicate` until it returns something true, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


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


# ---------------------------------------------------------------- the project's image on a real Docker engine
# One engine and one build per test session, shared by the Docker tests (tests/test_docker.py) and the pyxis tests
# (tests/test_pyxis.py, which import the image into enroot): the build is the slow part (~70 s, mostly pip).
DOCKER_SECRET = "sk-SENTINEL-docker-0123456789abcdef"
PROJECT_IMAGE = "sdg-job"


def docker(env: dict[str, str], *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def host_network() -> tuple[str, list[str]]:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text(), sorted(os.listdir("/sys/class/net"))


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory) -> dict[str, str]:
    """A Docker engine of the session's own (scripts/docker-engine.sh); the environment its clients need
    (DOCKER_HOST). The sentinel key is in it from the start, so every build and run could leak it."""
    state = tmp_path_factory.mktemp("docker") / "engine"
    network_before = host_network()
    engine = REPO / "scripts" / "docker-engine.sh"
    up = subprocess.run(["bash", str(engine), "up", str(state)], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, f"the Docker engine did not start (installing it needs root):\n{up.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDG_", "OPENAI_", "NEMO"))}
    try:
        yield env | {"DOCKER_HOST": f"unix://{state}/docker.sock", "OPENAI_API_KEY": DOCKER_SECRET}
    finally:
        pid = int((state / "dockerd.pid").read_text()) if (state / "dockerd.pid").is_file() else None
        subprocess.run(["bash", str(engine), "down", str(state)], timeout=120)
    assert host_network() == network_before, "the engine changed the host's network (ip_forward or interfaces)"
    assert pid is None or start_time(pid) is None, f"dockerd {pid} outlived `docker-engine.sh down`"
    assert str(state) not in Path("/proc/self/mounts").read_text(), "mounts left under the engine's state dir"


@pytest.fixture(scope="session")
def project_image(docker_engine) -> dict[str, str | float]:
    """The stand-in base (scripts/vllm-standin-image.sh), then the project's image built FROM it as the README says."""
    standin = REPO / "scripts" / "vllm-standin-image.sh"
    built = subprocess.run(["bash", str(standin)], env=docker_engine, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"the stand-in vLLM image was not built:\n{built.stderr[-3000:]}"
    base = built.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    build = docker(docker_engine, "build", "--network", "host", "--build-arg", f"VLLM_IMAGE={base}", "-t",
                   PROJECT_IMAGE, str(REPO), timeout=900)  # fmt: skip
    return {"base": base, "log": build.stdout + build.stderr, "seconds": time.monotonic() - started}
