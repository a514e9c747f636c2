"""The image for real: the project's Dockerfile built and run on a real Docker engine, against a real llama.cpp server
on this machine.

The engine is the test's own (scripts/docker-engine.sh: Debian's docker.io, installed with apt if missing, which needs
root; all its state in a temp dir; the host's network left alone, so builds and runs use `--network host`), stopped at
the end. No image registry is reachable here, so the base is a local stand-in for the official vLLM image
(scripts/vllm-standin-image.sh: Debian from debootstrap, the debootstrap tarball cached in ~/.cache/sdg-job/), whose
own environment needs mcp 2 as vLLM 0.33 does: the conflict with Data Designer's mcp<2 that one environment could not
hold. The commands are the README's (its Docker section), with `--build-arg VLLM_IMAGE=<the stand-in>`; these tests
run as root, so the containers run as an explicit non-root uid where the README has `--user "$(id -u):$(id -g)"`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdg_job.config import load_recipe
from sdg_job.serve import Server
from tests.conftest import DOCKER_SECRET, PROJECT_IMAGE, REPO, all_files, docker, read_jsonl
from tests.test_launch import everything_written

pytestmark = pytest.mark.e2e
IMAGE = PROJECT_IMAGE
SECRET = DOCKER_SECRET
UID = GID = 1234  # a user of this machine who is not root (and has no entry in the image's /etc/passwd)
USER = f"{UID}:{GID}"
RECIPES = ("default", "tiny", "rl_pref", "customer_support_tools")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """llama-server with the embedded model on this machine's loopback, guarded by the sentinel as its API key."""
    spec = load_recipe("tiny").serve
    assert spec is not None
    with Server(spec, tmp_path_factory.mktemp("llama") / "server.log", api_key=SECRET) as server:
        yield server.endpoint


def owned_out_dir(tmp_path: Path) -> Path:
    """The user's own output dir (made before `docker run`, which would otherwise make it as root)."""
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, UID, GID)
    return out


def run_image(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`docker run` as the README has it: on the host network, as a user who is not root."""
    return docker(env, "run", "--rm", "--network", "host", "--user", USER, *args, check=check)


def test_build_checks_both_environments_and_leaves_the_base_one_intact(docker_engine, project_image) -> None:
    log = str(project_image["log"])
    assert re.search(r"pip check, sdg-job's environment:\s+No broken requirements found", log), log[-3000:]
    assert re.search(r"pip check, the image's own environment \(/opt/venv/bin/python3\):\s+No broken requirements",
                     log), log[-3000:]  # fmt: skip
    versions = 'import importlib.metadata as m; print("sdg-job mcp", m.version("mcp"), m.version("data-designer"))'
    script = (
        "command -v python3 vllm; vllm --version; python3 -m pip check; /opt/venv/bin/python -m pip check; "
        f"python3 -c '{versions}'"
    )
    result = run_image(docker_engine, "--entrypoint", "bash", IMAGE, "-c", script)
    out = result.stdout
    # sdg-job's venv comes first on PATH; the `vllm` the job starts is the base image's, in its own environment.
    assert out.splitlines()[:2] == ["/opt/sdg-job/venv/bin/python3", "/opt/venv/bin/vllm"], out
    assert re.search(r"vllm stand-in 0\.33\.0\+standin: python=/opt/venv/bin/python3 mcp=2\.\d+\.\d+ ", out), out
    assert out.count("No broken requirements found.") == 2, out
    assert re.search(r"sdg-job mcp 1\.\d+\.\d+ 0\.9\.7", out), out


def test_docker_run_against_an_openai_endpoint_on_the_host(docker_engine, project_image, endpoint, tmp_path) -> None:
    out = owned_out_dir(tmp_path)
    env = docker_engine | {"OPENAI_BASE_URL": endpoint, "OPENAI_API_KEY": SECRET}
    result = run_image(env, "-e", "OPENAI_BASE_URL", "-e",
                       "OPENAI_API_KEY", "-v", f"{out}:/out", IMAGE, "recipe=tiny", "provider=openai")  # fmt: skip
    assert "wrote 10 records to /out/sdg/tiny.jsonl" in result.stdout, result.stderr[-3000:]
    records = read_jsonl(out / "sdg" / "tiny.jsonl")
    assert len(records) == 10 and len({json.dumps(r, sort_keys=True) for r in records}) == 10
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    manifest = json.loads((out / "sdg" / "tiny.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == 10
    assert manifest["resolved_recipe"]["providers"]["openai"]["endpoint"] == endpoint
    # Everything it wrote is the invoking user's, and nothing holds the key.
    for path in [out, *out.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (UID, GID), path
    for path in all_files(out):
        assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in result.stdout + result.stderr


def test_docker_runs_a_data_designer_config_unchanged(docker_engine, project_image, endpoint, tmp_path) -> None:
    """A config written by DataDesignerConfigBuilder.write_config, mounted read-only: its built-in alias
    (openai-text) goes to the endpoint, exactly N rows with every column come out."""
    from tests import dd_configs

    configs = tmp_path / "configs"
    configs.mkdir()
    dd_configs.export(dd_configs.code_with_validation(), configs / "code.yaml")
    out = owned_out_dir(tmp_path)
    env = docker_engine | {"OPENAI_BASE_URL": endpoint, "OPENAI_API_KEY": SECRET}
    job = ("recipe=/configs/code.yaml", "provider=openai", "num_records=3", "generation.keep_truncated=true",
           "models.openai-text.inference_parameters.max_tokens=128")  # fmt: skip
    mounts = ("-v", f"{configs}:/configs:ro", "-v", f"{out}:/out")
    result = run_image(env, "-e", "OPENAI_BASE_URL", "-e", "OPENAI_API_KEY", *mounts, IMAGE, *job)
    assert "wrote 3 records to /out/sdg/code.jsonl" in result.stdout, result.stderr[-3000:]
    records = read_jsonl(out / "sdg" / "code.jsonl")
    assert len(records) == 3 and all(
        list(r) == ["area", "level", "task", "solution", "solution_check"] for r in records
    )
    assert SECRET not in result.stdout + result.stderr


def test_docker_run_with_a_wrong_key_exits_2_at_once_with_the_cause(docker_engine, project_image, endpoint,
                                                                    tmp_path) -> None:  # fmt: skip
    out = owned_out_dir(tmp_path)
    wrong = "sk-SENTINEL-wrong-docker-key-42"
    env = docker_engine | {"OPENAI_BASE_URL": endpoint, "OPENAI_API_KEY": wrong}
    result = run_image(env, "-e", "OPENAI_BASE_URL", "-e", "OPENAI_API_KEY", "-v", f"{out}:/out", IMAGE,
                       "recipe=tiny", "provider=openai", check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "HTTP 401: the key in $OPENAI_API_KEY was refused" in result.stderr, result.stderr[-3000:]
    assert wrong not in result.stdout + result.stderr and SECRET not in result.stdout + result.stderr
    assert list(out.iterdir()) == []


def test_image_runs_as_a_user_with_hf_settings_and_holds_no_secret(docker_engine, project_image) -> None:
    (inspect,) = json.loads(docker(docker_engine, "image", "inspect", IMAGE).stdout)
    config = inspect["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["python3", "-m", "sdg_job", "run"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HOME"] == "/home/sdg/.cache/huggingface" and env["HF_HUB_OFFLINE"] == "0"
    assert env["NEMO_RUN_DIR"] == "/out" and env["PATH"].startswith("/opt/sdg-job/venv/bin:")
    history = docker(docker_engine, "history", "--no-trunc", IMAGE).stdout
    assert SECRET not in history and SECRET not in json.dumps(inspect)
    # Every byte of every layer.
    with subprocess.Popen(["docker", "save", IMAGE], env=docker_engine, stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        tail, size = b"", 0
        while chunk := save.stdout.read(1 << 20):
            assert SECRET.encode() not in tail + chunk
            tail, size = chunk[-len(SECRET) :], size + len(chunk)
    assert save.returncode == 0 and size > 100_000_000
    # Settable at run time, for staged weights on a node without internet.
    probe = "import os; print(os.getuid(), os.environ['HF_HOME'], os.environ['HF_HUB_OFFLINE'], os.environ['HOME'])"
    result = run_image(docker_engine, "-e", "HF_HOME=/models", "-e",
                       "HF_HUB_OFFLINE=1", "--entrypoint", "python3", IMAGE, "-c", probe)  # fmt: skip
    assert result.stdout.split() == [str(UID), "/models", "1", "/home/sdg"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_validate_each_recipe_in_the_image(docker_engine, project_image, recipe: str) -> None:
    result = run_image(docker_engine, "--entrypoint", "python3", IMAGE, "-m", "sdg_job", "validate", f"recipe={recipe}")
    assert f"# ok: /opt/sdg-job/recipes/{recipe}.yaml" in result.stderr
    assert f"name: {recipe}" in result.stdout


def test_a_bad_recipe_mounted_in_exits_2_naming_file_and_key(docker_engine, project_image, tmp_path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "mine.yaml").write_text("defaults: [tiny]\nname: mine\nnum_records: -5\n")
    out = owned_out_dir(tmp_path)
    result = run_image(docker_engine, "-v", f"{recipes}:/recipes:ro", "-v", f"{out}:/out", IMAGE,
                       "recipe=/recipes/mine.yaml", check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "/recipes/mine.yaml" in result.stderr and "num_records" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_the_job_in_the_image_starts_vllm_from_the_images_own_environment(
    docker_engine, project_image, tmp_path
) -> None:
    """provider=local with engine vllm: the server the job starts is the base image's `vllm`, with mcp 2 beside it
    and the key in its environment. (The stand-in has no engine: it says where it runs and exits 3. Ray is told of
    one pretend GPU, as the Slurm tests' nodes have pretend GPUs, so it places the server actor.)"""
    out = owned_out_dir(tmp_path)
    gpu = 'RAY_OVERRIDE_RESOURCES={"GPU": 1}'
    result = run_image(docker_engine, "-e", gpu, "-v", f"{out}:/out", IMAGE, "recipe=tiny", "serve.engine=vllm",
                       "serve.model=org/model", "serve.data_parallel_size=1", check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "vllm server exited with code 3 during start-up" in result.stderr, result.stderr[-3000:]
    (log,) = (out / "sdg" / ".tiny.run" / "logs").glob("server-*.log")
    text = log.read_text()
    assert re.search(r"vllm stand-in 0\.33\.0\+standin: python=/opt/venv/bin/python3 mcp=2\.\d+\.\d+ "
                     r"VLLM_API_KEY=set CUDA_VISIBLE_DEVICES=0 "
                     r"argv=\['serve', '--model', 'org/model', '--host', '127\.0\.0\.1'",
                     text), text  # fmt: skip


def test_launcher_docker_executor_runs_the_job_in_the_image(docker_engine, project_image, endpoint, tmp_path) -> None:
    """`python launch/run.py --executor docker` for real, with the README's arguments and the shipped profile (image
    sdg-job:latest, job dir ./nemo_experiments): NeMo-Run's DockerExecutor on the host network, the key in the user's
    secrets file (mounted, never written to NeMo-Run's files), the output in the job dir, owned by the user."""
    secrets = tmp_path / "sdg_secrets.env"
    secrets.write_text(f"OPENAI_API_KEY={SECRET}\n")
    env = docker_engine | {"NEMORUN_HOME": str(tmp_path / "nemorun_home")}
    cmd = [sys.executable, str(REPO / "launch" / "run.py"), "--executor", "docker", "recipe=tiny", "provider=openai",
           f"providers.openai.endpoint={endpoint}", "docker.num_gpus=0", f"docker.secrets_file={secrets}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (output,) = (tmp_path / "nemo_experiments").rglob("sdg/tiny.jsonl")
    assert len(read_jsonl(output)) == 10
    assert f"output under: {output.parent}" in result.stdout
    assert all(path.stat().st_uid == os.getuid() for path in output.parent.rglob("*"))
    written = everything_written(tmp_path / "nemo_experiments") + everything_written(tmp_path / "nemorun_home")
    assert SECRET not in written and SECRET not in result.stdout + result.stderr
