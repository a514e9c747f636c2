"""launch/run.py builds NeMo-Run executors: dry-runs are checked on what they write, the local one really runs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from sdg_job.serve import Server
from sdg_job.simulator import simulator_spec
from tests.conftest import REPO, all_files, read_jsonl, text_of

SECRET = "nvapi-SENTINEL-launch-0123456789"
HF_SECRET = "hf_SENTINEL_launch_abcdefghij"
PROFILE = """
slurm:
  account: acct
  partition: batch
  nodes: 2
  gpus_per_node: 8
  container_image: nvcr.io/me/sdg-job:0.1.0
  container_mounts: ["/lustre/hf:/root/.cache/huggingface"]
  job_dir: {tmp}/cluster
  secrets: [NVIDIA_API_KEY, HF_TOKEN]
docker:
  container_image: sdg-job:test
  num_gpus: -1
  volumes: ["{tmp}/out:/out"]
  job_dir: {tmp}/docker
local:
  job_dir: {tmp}/local
"""


def launch(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE.format(tmp=tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "SDG_OUTPUT_DIR"}
    env |= {"NEMORUN_HOME": str(tmp_path / "nemorun_home"), "NVIDIA_API_KEY": SECRET, "HF_TOKEN": HF_SECRET}
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "run.py"), "--profile", str(profile), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def everything_written(root: Path) -> str:
    """All text under root, with NeMo-Run's zlib+base64 blobs (_CONFIG, _TASKS) decoded too."""
    chunks = []
    for path in all_files(root):
        text = text_of(path)
        chunks.append(text)
        for blob in re.findall(r"eJ[A-Za-z0-9_\-]+=*", text):
            try:
                chunks.append(zlib.decompress(base64.urlsafe_b64decode(blob)).decode(errors="replace"))
            except (ValueError, zlib.error):
                pass
    return "\n".join(chunks)


def test_slurm_dryrun_writes_a_complete_two_node_sbatch_script_without_secrets(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "num_records=500",
                    "columns.persona.params.values=[a pirate, a chef]")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (script_path,) = (tmp_path / "cluster").rglob("*_sbatch.sh")
    script = script_path.read_text()
    assert script in result.stdout  # the dry run prints it
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --export=ALL"):  # fmt: skip
        assert line in script
    assert "--container-image=nvcr.io/me/sdg-job:0.1.0" in script
    assert "/lustre/hf:/root/.cache/huggingface" in script and ":/nemo_run" in script
    assert "export NEMO_RUN_DIR=/nemo_run" in script and "export SDG_CONTAINER=pyxis" in script
    assert re.search(r"ray start --head .*--resources=\"\$SLOT\"", script)
    assert re.search(r"ray start --block --address=\"\$RAY_ADDRESS\" --resources=\"\$SLOT\"", script)
    assert "SLOT='{\"sdg_node\": 1}'" in script
    command = "python3 -m sdg_job run recipe=default num_records=500 'columns.persona.params.values=[a pirate, a chef]'"
    assert command in script
    assert "--container-env=" in script and "NVIDIA_API_KEY" in script  # by name
    written = everything_written(tmp_path / "cluster") + everything_written(tmp_path / "nemorun_home")
    assert SECRET not in written and HF_SECRET not in written
    assert SECRET not in result.stdout + result.stderr


def srun_lines(script: str) -> list[str]:
    """Each srun command of a script, continuation lines joined."""
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("srun ")]


def test_slurm_script_on_the_pyxis_path_carries_the_review_fixes(tmp_path: Path) -> None:
    """Each defect found on paper in the pyxis script, asserted in the script NeMo-Run renders."""
    result = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.ray_port=6390")
    assert result.returncode == 0, result.stderr[-3000:]
    (script_path,) = (tmp_path / "cluster").rglob("*_sbatch.sh")
    script = script_path.read_text()
    head, worker, driver = srun_lines(script)
    # The driver runs inside the Ray head's container (enroot gives each container its own /tmp and Ray sockets).
    assert "ray start --head" in head and "--overlap" in driver and "sdg_job run" in driver
    assert "${head_container[@]}" in head and "${head_container[@]}" in driver
    assert "${head_container[@]}" not in worker
    # A name of the job's own (pyxis' global scope would reuse an older job's container), removed when it ends.
    assert 'head_name="sdg-ray-head-$SLURM_JOB_ID"' in script and 'enroot remove --force "pyxis_$head_name"' in script
    # No --gres on steps beside the job's --gpus-per-node; the driver takes no GPU.
    assert "#SBATCH --gpus-per-node=8" in script and "--gres" not in script
    assert '"${driver_gpus[@]}"' in driver and "driver_gpus=(--gpus=0)" in script
    # python3 only (the vLLM image has no `python`).
    assert not re.search(r"(^|[\s/])python\s", script) and "python3 -m sdg_job run" in driver
    # The whole node: exclusive, all its memory, all its CPUs for the Ray node steps.
    assert "#SBATCH --exclusive" in script and "#SBATCH --mem=0" in script
    assert '--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"' in script
    # Ray port from the profile; head address not from `hostname --ip-address`; bounded waits with clear errors.
    assert "export SDG_RAY_PORT=6390" in script and "--ip-address" not in script
    assert "getent ahostsv4" in script and "!~ /^127\\./" in script
    assert 'wait_for "the Ray head at $RAY_ADDRESS" port_open' in script and "not up after ${wait_s}s" in script
    # The time-limit warning reaches the batch shell, which passes it on to the driver.
    assert "#SBATCH --signal=B:TERM@300" in script and "trap on_stop TERM USR1" in script
    assert "--container-workdir=/nemo_run " in script  # the job dir; NeMo-Run's /nemo_run/code is never made here
    # Found on the real pyxis cluster: NeMo-Run mounts its (unmade) Ray dir into every step; the script makes it first.
    ray_dir = re.search(r"--container-mounts \S*?,(\S+/ray):\1", script).group(1)
    assert f'mkdir -p "{ray_dir}"' in script and "--container-writable" in script
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0


def test_slurm_profile_settings_reach_the_script(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.exclusive=false",
                    "slurm.mem=null", "slurm.requeue=true", "slurm.warn_before_limit_s=120", "slurm.wait_s=90",
                    "slurm.container=none", "slurm.venv=/shared/sdg-job/.venv", "slurm.gpus_per_node=0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    assert "#SBATCH --exclusive" not in script and "#SBATCH --mem" not in script
    assert "#SBATCH --gpus-per-node" not in script
    assert "export SDG_REQUEUE=1" in script and "#SBATCH --signal=B:TERM@120" in script
    assert "export SDG_WAIT_S=90" in script and "export SDG_CONTAINER=none" in script
    assert 'export PATH="/shared/sdg-job/.venv/bin:$PATH"' in script
    assert "--container-image=" not in script and "export NEMO_RUN_DIR=/nemo_run" not in script
    no_image = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.container_image=null")
    assert no_image.returncode == 2 and "container: pyxis needs slurm.container_image" in no_image.stderr


def test_bad_recipe_is_rejected_before_anything_is_submitted(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "num_records=-5")
    assert result.returncode == 2 and "num_records" in result.stderr
    assert not (tmp_path / "cluster").exists()


def test_profile_keys_can_be_overridden_on_the_command_line(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.nodes=4",
                    "slurm.partition=interactive")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "#SBATCH --nodes=4" in result.stdout and "#SBATCH --partition=interactive" in result.stdout
    bad = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.gpus=3")
    assert bad.returncode == 2 and "slurm.gpus" in bad.stderr
    no_ssh = launch(tmp_path, "--executor", "slurm", "--dryrun", "recipe=default", "slurm.tunnel=ssh")
    assert no_ssh.returncode == 2 and "tunnel: ssh needs slurm.ssh.host" in no_ssh.stderr, no_ssh.stderr
    assert "Traceback" not in no_ssh.stderr


BAD_PROFILES = {
    # name: (profile file's content, text the error must contain)
    "malformed_yaml": ("slurm: [unclosed\n", "not valid YAML"),
    "unknown_key": ("local: {job_dir: ./j, colour: blue}\n", "local.colour: Extra inputs"),
    "wrong_type": ("slurm: {account: a, partition: b, job_dir: /x, container_image: i, nodes: many}\n", "slurm.nodes"),
    "a_list": ("- slurm\n- local\n", "a cluster profile must be a mapping"),
    "not_utf8": (b"local: {job_dir: caf\xe9}\n", "not UTF-8"),
    "unresolvable": ("local: {job_dir: '${oc.env:SURELY_UNSET_VAR_42}'}\n", "local.job_dir: cannot resolve"),
    "credentials_in_an_image_url": (
        "docker: {container_image: 'https://me:s3cr3t-pw-0123@registry.example/img'}\n",
        "docker.container_image: has credentials in the URL",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_exits_2_naming_the_file_and_key(case: str, tmp_path: Path) -> None:
    content, must_mention = BAD_PROFILES[case]
    profile = tmp_path / "bad profile.yaml"
    if isinstance(content, bytes):
        profile.write_bytes(content)
    else:
        profile.write_text(content)
    env = {k: v for k, v in os.environ.items() if k != "SDG_OUTPUT_DIR"} | {"NEMORUN_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "run.py"), "--profile", str(profile), "--dryrun", "recipe=tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"error: {profile}: " in result.stderr and must_mention in result.stderr, result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
    assert all_files(tmp_path) == [profile]


def test_docker_dryrun_shows_image_gpus_mounts_env_names_and_command(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "docker", "--dryrun", "recipe=default", "provider=openai")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "image: sdg-job:test" in out and "gpus: all" in out
    assert f"{tmp_path}/out:/out" in out
    assert "env (names): ['NEMO_RUN_DIR']" in out
    assert "command: python3 -m sdg_job run recipe=default provider=openai" in out
    assert SECRET not in everything_written(tmp_path / "docker") + out


@pytest.mark.e2e
def test_local_executor_runs_tiny_and_output_lands_under_nemo_run_dir(tmp_path: Path) -> None:
    result = launch(tmp_path, "--executor", "local", "recipe=tiny", "num_records=4")
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = (tmp_path / "local").rglob("sdg/tiny.jsonl")
    assert len(read_jsonl(output)) == 4
    assert f"output under: {output.parent}" in result.stdout
    manifest = json.loads(output.with_name("tiny.manifest.json").read_text())
    assert manifest["records"] == 4
    assert SECRET not in everything_written(tmp_path / "local")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_sbatch_is_the_same_template_rendered_and_passes_secrets_by_name() -> None:
    from launch.plain_sbatch import render

    script = (REPO / "slurm" / "sdg-job.sbatch").read_text()
    assert script == render(), "slurm/sdg-job.sbatch is stale: python launch/plain_sbatch.py > slurm/sdg-job.sbatch"
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "sdg-job.sbatch")]).returncode == 0
    assert "--container-env=" in script and "NVIDIA_API_KEY" in script and "#SBATCH --export=ALL" in script
    assert "ray start --head" in script and 'python3 -m sdg_job run "${@:-recipe=default}"' in script
    assert "#SBATCH --signal=B:TERM@300" in script and "#SBATCH --requeue" in script


@pytest.mark.e2e
def test_docker_entrypoint_command_runs_the_job(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + arguments as in the README's `docker run`, run here against the SIMULATED server
    (no Docker engine on this machine); the output lands in NEMO_RUN_DIR=/out's stand-in."""
    dockerfile = (REPO / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint == ["python3", "-m", "sdg_job", "run"]
    assert re.search(r"NEMO_RUN_DIR=/out", dockerfile)
    with Server(simulator_spec(), tmp_path / "sim.log") as sim:
        env = {k: v for k, v in os.environ.items() if k != "SDG_OUTPUT_DIR"}
        env |= {"NEMO_RUN_DIR": str(tmp_path / "out"), "OPENAI_BASE_URL": sim.endpoint}
        cmd = [sys.executable, *entrypoint[1:], "recipe=tiny", "provider=openai", "num_records=3"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(read_jsonl(tmp_path / "out" / "sdg" / "tiny.jsonl")) == 3
