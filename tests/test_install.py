"""`make install`'s stages (scripts/stage.sh): one line each, the build's progress, and on failure the log's end and
its path, instead of pages of pip and cmake."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO

STAGE = REPO / "scripts" / "stage.sh"


def stage(what: str, log: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STAGE), what, str(log), "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_a_stage_is_one_line_and_its_output_goes_to_the_log(tmp_path: Path) -> None:
    result = stage("installing things", tmp_path / "logs" / "pip.log", "echo 'WARNING: noise'; echo done-marker")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("==> installing things: done in ") and result.stdout.count("\n") == 1
    assert "noise" not in result.stdout + result.stderr
    assert "done-marker" in (tmp_path / "logs" / "pip.log").read_text()


def test_a_build_shows_its_progress_a_line_a_quarter(tmp_path: Path) -> None:
    steps = " ".join(f"echo '[ {p}%] Building CXX object ggml.o'; sleep 0.7;" for p in (3, 30, 31, 52, 77, 100))
    result = stage("building llama-server", tmp_path / "build.log", steps)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("==> building llama-server: done in ")
    progress = [line for line in lines if "… build" in line]
    assert 2 <= len(progress) <= 5 and all(line.startswith("==> building llama-server … build ") for line in progress)


def test_a_failed_stage_exits_with_its_code_and_shows_the_end_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "pip.log"
    result = stage("installing things", log, "seq 1 100; echo 'ERROR: no matching distribution' >&2; exit 3")
    assert result.returncode == 3
    assert "==> installing things: FAILED (exit 3) after" in result.stderr and str(log) in result.stderr
    assert "ERROR: no matching distribution" in result.stderr and "\n50\n" not in result.stderr  # its end, not all


def test_make_install_runs_every_step_as_a_stage() -> None:
    """Every command of the install target runs through stage.sh (`make -n` lists them without running them)."""
    argv = ["make", "--no-print-directory", "-n", "-B", "VENV=/tmp/sdg-nonexistent-venv", "install"]
    listed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    commands = listed.stdout.replace("\\\n", " ").splitlines()  # a command continued over lines is one
    steps = [c for c in commands if c.strip() and not c.startswith("touch ")]
    assert len(steps) == 4 and all(c.startswith("scripts/stage.sh ") for c in steps), commands
