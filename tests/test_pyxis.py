"""The cluster default for real: `slurm.container: pyxis` on a two-node test Slurm with real enroot and pyxis
(scripts/slurm-test-cluster.sh up DIR 2 pyxis: both built from ../shared/vendor, cached outside the clone), running the
project's image: the Dockerfile built on the local stand-in base (the Docker tests' build, shared through conftest),
imported with `enroot import dockerd://` into a .sqsh on the cluster's shared dir.

The embedded model is mounted, not baked in: the image is the production one (vLLM serves on GPU nodes), so the test
mounts this machine's llama-server build and the SmolLM2 GGUF (`container_mounts` / SDG_MOUNTS) and points the recipe
at them (`serve.llama_server`, `serve.model`), as a user would mount staged weights.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sdg_job.installers import embedded_model_path, llama_server_binary
from sdg_job.serve import free_port
from sdg_job.supervise import processes_with_env
from tests.conftest import DOCKER_SECRET, PROJECT_IMAGE, REPO, all_files, read_jsonl, wait_for
from tests.test_slurm import ENDED, cluster_profile, launch, sbatch_argv, slurm_cmd, slurm_logs, wait_until_done

pytestmark = pytest.mark.e2e
CLUSTER_SCRIPT = REPO / "scripts" / "slurm-test-cluster.sh"
SECRET = "nvapi-SENTINEL-pyxis-0123456789"
USER = "sdgtest"  # an unprivileged user of this machine, made for the test if missing
N = 20
# The embedded model as mounted into every container.
LLAMA_DIR, MODEL_DIR = "/opt/llama-server", "/opt/smollm2"
JOB = ("recipe=tiny", f"num_records={N}", "generation.shard_size=5", "serve.threads=1",
       "models.text.inference_parameters.max_tokens=48", "generation.keep_truncated=true",
       f"serve.llama_server={LLAMA_DIR}/llama-server",
       f"serve.model={MODEL_DIR}/{embedded_model_path().name}")  # fmt: skip


def unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def shared() -> Path:
    """The cluster's "shared storage": a dir every user can reach (pytest's own temp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="sdg-pyxis-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pyxis(shared: Path) -> dict[str, str]:
    """A fresh two-node cluster with pyxis loaded in each slurmd; stopped (by pid), unmounted and wiped at the end."""
    state = shared / "cluster"
    started = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(state), "2", "pyxis"], capture_output=True, text=True,
                        timeout=900)  # fmt: skip
    assert up.returncode == 0, f"the pyxis test cluster did not start (installing it needs root):\n{up.stderr}"
    print(f"pyxis cluster up in {time.monotonic() - started:.1f}s")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDG_", "RAY_", "ENROOT_"))}
    # enroot on the job's PATH, as on a pyxis cluster: the job removes its named container with it.
    env["PATH"] = f"{state}/enroot-bin:{env['PATH']}"
    yield env | {"SLURM_CONF": str(state / "slurm.conf"), "NVIDIA_API_KEY": SECRET}
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], timeout=300)
    assert str(state) not in Path("/proc/self/mounts").read_text(), "mounts left under the cluster's dir"
    assert not processes_with_env("SLURM_CONF", str(state / "slurm.conf"))


@pytest.fixture(scope="module")
def image(docker_engine, project_image, pyxis, shared: Path) -> Path:
    """The project's image as a squashfs file on the shared dir, made by enroot from the running Docker engine."""
    sqsh = shared / "sdg-job.sqsh"
    started = time.monotonic()
    env = pyxis | {"DOCKER_HOST": docker_engine["DOCKER_HOST"], "SLURMD_NODENAME": "n1"}
    result = subprocess.run(["enroot", "import", "--output", str(sqsh), f"dockerd://{PROJECT_IMAGE}"], env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"enroot import: {time.monotonic() - started:.1f}s, {sqsh.stat().st_size / 1e6:.0f} MB")
    sqsh.chmod(0o644)
    return sqsh


@pytest.fixture(scope="module")
def model_mounts(shared: Path) -> list[str]:
    """llama-server and the GGUF, copied where every user can read them (root's home is not), mounted read-only."""
    llama, model = shared / "llama-server", shared / "smollm2"
    llama.mkdir()
    model.mkdir()
    shutil.copy2(llama_server_binary(), llama / "llama-server")
    shutil.copy2(embedded_model_path(), model / embedded_model_path().name)
    for path in (llama, model, *llama.iterdir(), *model.iterdir()):
        path.chmod(0o755)
    return [f"{llama}:{LLAMA_DIR}:ro", f"{model}:{MODEL_DIR}:ro"]


def node_containers(env: dict[str, str]) -> dict[str, list[str]]:
    """Every user's enroot containers on each node (`enroot list` shows the caller's only)."""
    enroot = Path(env["SLURM_CONF"]).parent / "enroot"
    return {node: sorted(p.name for p in (enroot / node / "data").glob("user-*/*")) for node in ("n1", "n2")}


def assert_ran_in_the_image(job_dir: Path, job_id: str, env: dict[str, str], resumed: bool = False) -> dict:
    """Exactly N unique records; the driver and both nodes' servers ran inside containers of the image (paths that
    exist only there); nothing of the job left running or kept on either node."""
    records = read_jsonl(job_dir / "sdg" / "tiny.jsonl")
    assert len(records) == N and len({json.dumps(r, sort_keys=True) for r in records}) == N
    manifest = json.loads((job_dir / "sdg" / "tiny.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == N
    assert manifest["output_path"] == "/nemo_run/sdg/tiny.jsonl"  # the driver saw the job dir where the image mounts it
    assert sorted(s["slurm_node"] for s in manifest["servers"]) == ["n1", "n2"], manifest["servers"]
    for server in manifest["servers"]:  # started inside each node's container, from the mounted build
        assert server["argv"][0] == f"{LLAMA_DIR}/llama-server" and f"{MODEL_DIR}/" in " ".join(server["argv"])
    if not resumed:
        assert {s["node_id"] for s in manifest["shards"]} == {s["node_id"] for s in manifest["servers"]}
    # The driver joined the Ray head's running container (pyxis says so in the step's log) and reached Ray.
    driver_log = (job_dir / "logs" / "driver.log").read_text()
    assert "attaching to a running container" in driver_log, driver_log[-3000:]
    wait_for(lambda: not processes_with_env("SLURM_JOB_ID", job_id), 30, f"job {job_id}'s processes to end")
    assert node_containers(env) == {"n1": [], "n2": []}, "a container of the job is left on a node"
    return manifest


def sbatch(env: dict[str, str], job_dir: Path, image: Path, mounts: list[str], user: str | None = None) -> str:
    """slurm/sdg-job.sbatch as its header says, with pyxis: SDG_IMAGE, SDG_JOB_DIR, SDG_MOUNTS; as `user` if given."""
    run_env = env | {"SDG_CONTAINER": "pyxis", "SDG_IMAGE": str(image), "SDG_JOB_DIR": str(job_dir),
                     "SDG_MOUNTS": ",".join(mounts), "SDG_WAIT_S": "180", "SDG_RAY_PORT": str(free_port()),
                     "SDG_SECRET_ENV_NAMES": "NVIDIA_API_KEY"}  # fmt: skip
    argv = sbatch_argv(job_dir, JOB)
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return slurm_cmd(run_env, *argv).strip().split(";")[0]


def assert_no_secret(*roots: Path) -> None:
    for root in roots:
        for path in all_files(root):
            if path.suffix == ".sqsh" or "state" in path.relative_to(root).parts[:2]:
                continue  # the image: below, in bytes; slurmctld's state keeps each job's environment (Slurm's own)
            assert SECRET not in path.read_text(errors="replace"), path


def test_launcher_runs_the_job_in_pyxis_containers_on_two_nodes(pyxis, image, model_mounts, tmp_path: Path) -> None:
    profile = cluster_profile(container="pyxis", container_image=image, container_mounts=model_mounts,
                              job_dir=tmp_path / "cluster", ray_port=free_port())  # fmt: skip
    started = time.monotonic()
    job_id = launch(pyxis, tmp_path, profile, JOB)
    state = wait_until_done(pyxis, job_id)
    (job_dir,) = {p.parent.parent for p in (tmp_path / "cluster").rglob("sdg/tiny.jsonl")} or {tmp_path}
    sbatch_out = "\n".join(p.read_text() for p in (tmp_path / "cluster").rglob("sbatch_*.out"))
    assert state["JobState"] == "COMPLETED", sbatch_out[-3000:] + slurm_logs(pyxis, job_id)
    manifest = assert_ran_in_the_image(job_dir, job_id, pyxis)
    assert "driver exited with 0" in sbatch_out and "not up after" not in sbatch_out
    print(f"pyxis: sbatch to done {time.monotonic() - started:.1f}s; driver timings {manifest['timings_s']}")
    assert_no_secret(tmp_path)


def test_a_users_plain_sbatch_stops_on_sigterm_and_its_resubmission_resumes(pyxis, image, model_mounts, shared) -> None:
    """`sbatch slurm/sdg-job.sbatch` as an unprivileged user: the time-limit signal (`scancel --batch --signal=TERM`)
    stops it with an `interrupted` manifest; the same submission again resumes to exactly N; every file is theirs.
    (One test for both, to keep the module's time: each pyxis job here unpacks and removes a 1.2 GB head container.)"""
    user = unprivileged_user()
    job_dir = shared / "jobs-user" / "job"
    job_dir.parent.mkdir()
    os.chown(job_dir.parent, user.pw_uid, user.pw_gid)
    job_id = sbatch(pyxis, job_dir, image, model_mounts, user=USER)
    shards = job_dir / "sdg" / ".tiny.run" / "shards"
    try:  # ~95 s alone; vLLM in the other test worker may take both cores meanwhile
        wait_for(lambda: list(shards.glob("shard-*.json")), 600, "the first committed shard")
    except AssertionError as e:  # say why: the job's own output and Slurm's logs
        out = Path(f"{job_dir}.out")
        said = out.read_text()[-3000:] if out.exists() else ""
        raise AssertionError(f"{e}\n{said}{slurm_logs(pyxis, job_id)}") from None
    slurm_cmd(pyxis, "scancel", "--batch", "--signal=TERM", job_id)
    state = wait_until_done(pyxis, job_id, timeout=180)
    assert state["UserId"].startswith(f"{USER}(")
    manifest = json.loads((job_dir / "sdg" / "tiny.manifest.json").read_text())
    assert manifest["status"] == "interrupted", Path(f"{job_dir}.out").read_text()[-3000:]
    assert state["JobState"] in ENDED and not (job_dir / "sdg" / "tiny.jsonl").exists()
    assert "driver exited with 143" in Path(f"{job_dir}.out").read_text()
    kept = len(manifest["shards"])
    wait_for(lambda: not processes_with_env("SLURM_JOB_ID", job_id), 30, f"job {job_id}'s processes to end")
    assert node_containers(pyxis) == {"n1": [], "n2": []}
    job_id = sbatch(pyxis, job_dir, image, model_mounts, user=USER)
    state = wait_until_done(pyxis, job_id)
    assert state["JobState"] == "COMPLETED", Path(f"{job_dir}.out").read_text()[-3000:] + slurm_logs(pyxis, job_id)
    manifest = assert_ran_in_the_image(job_dir, job_id, pyxis, resumed=True)
    assert manifest["shards_skipped_on_resume"] >= kept >= 1
    for path in [job_dir, *job_dir.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (user.pw_uid, user.pw_gid), path
    assert_no_secret(job_dir.parent, shared / "cluster")


def test_the_squashfs_image_holds_no_secret(image: Path) -> None:
    """Every byte of the .sqsh the cluster runs (built while both sentinels were in the environment)."""
    tail = b""
    with image.open("rb") as f:
        while chunk := f.read(1 << 22):
            for secret in (SECRET.encode(), DOCKER_SECRET.encode()):
                assert secret not in tail + chunk
            tail = chunk[-64:]
