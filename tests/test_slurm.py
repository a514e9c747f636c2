"""The Slurm path for real: a two-node Slurm cluster on this machine (scripts/slurm-test-cluster.sh: real slurmctld,
one real slurmd per node, pretend GPUs), real sbatch and srun steps, a real Ray head and worker, one real llama.cpp
server per Slurm node. Both entry points run with `container: none` (the project's own installation, as on clusters
without pyxis); the pyxis script is checked as rendered in tests/test_launch.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sdg_job.serve import free_port
from sdg_job.supervise import processes_with_env
from tests.conftest import REPO, TWO_SERVERS, all_files, read_jsonl, wait_for

pytestmark = pytest.mark.e2e
CLUSTER_SCRIPT = REPO / "scripts" / "slurm-test-cluster.sh"
SECRET = "nvapi-SENTINEL-slurm-0123456789"
N = 20
# Two llama-servers share this machine's two cores: one thread each (see tests/test_scale_out.py).
# Short answers keep it fast; the cut ones are kept (the truncation gate is not what these tests are about).
JOB = ("recipe=tiny", f"num_records={N}", "generation.shard_size=5", "serve.threads=1",
       "models.text.inference_parameters.max_tokens=48", "generation.keep_truncated=true")  # fmt: skip
# The test cluster as a launcher profile (launch/profiles/example.yaml's keys); each module adds its own.
CLUSTER = {"account": "test", "partition": "debug", "nodes": 2, "gpus_per_node": 2, "time": "00:30:00",
           "container": "none", "wait_s": 180, "secrets": ["NVIDIA_API_KEY"]}  # fmt: skip


def cluster_profile(**keys: object) -> str:
    """The test cluster's profile (YAML), with `keys` added or replaced."""
    # A Ray port of its own: another test cluster's job may run beside this one on the same host.
    keys = {"ray_port": free_port()} | keys
    return yaml.safe_dump({"slurm": CLUSTER | {k: str(v) if isinstance(v, Path) else v for k, v in keys.items()}})


def launch(env: dict[str, str], tmp_path: Path, profile: str, job: tuple[str, ...] = JOB) -> str:
    """`launch/run.py --executor slurm --profile profile.yaml …` with `profile` written there, from `tmp_path`
    (NeMo-Run's home under it); the job id."""
    (tmp_path / "profile.yaml").write_text(profile)
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "run.py"), "--executor", "slurm", "--profile", "profile.yaml", *job,
         "slurm.nodes=2"],
        cwd=tmp_path, env=env | {"NEMORUN_HOME": str(tmp_path / "nemorun")}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"Job id: (\d+)", result.stdout).group(1)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A fresh two-node cluster for this module, stopped (by pid) and wiped at the end."""
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(state), "2"], capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    assert up.returncode == 0, f"the test Slurm cluster did not start (installing it needs root):\n{up.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SDG_", "RAY_"))}
    yield env | {"SLURM_CONF": str(state / "slurm.conf"), "NVIDIA_API_KEY": SECRET}
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(state)], timeout=120)


def slurm_cmd(env: dict[str, str], *argv: str) -> str:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def job_state(env: dict[str, str], job_id: str) -> dict[str, str]:
    text = slurm_cmd(env, "scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", text))


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def wait_until_done(env: dict[str, str], job_id: str, timeout: float = 600) -> dict[str, str]:
    """The job's final state (squeue is no guide: it briefly lists no job while one is being requeued)."""
    return wait_for(lambda: (s := job_state(env, job_id))["JobState"] in ENDED and s, timeout, f"job {job_id} to end")


def slurm_logs(env: dict[str, str], job_id: str) -> str:
    """What Slurm itself says about a job, for a failure message."""
    state = Path(env["SLURM_CONF"]).parent
    lines = [line for log in sorted(state.glob("*.log")) for line in log.read_text(errors="replace").splitlines()
             if f"JobId={job_id}" in line or f"[{job_id}." in line or f"job {job_id}" in line]  # fmt: skip
    return slurm_cmd(env, "scontrol", "show", "job", "-o", job_id) + "\n".join(lines[-40:])


def committed(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "sdg" / ".tiny.run" / "shards").glob("shard-*.json"))


def assert_exactly_n_unique_from_both_nodes(job_dir: Path, resumed: bool = False) -> dict:
    records = read_jsonl(job_dir / "sdg" / "tiny.jsonl")
    assert len(records) == N and len({json.dumps(r, sort_keys=True) for r in records}) == N
    manifest = json.loads((job_dir / "sdg" / "tiny.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == N
    servers = {s["node_id"]: s["slurm_node"] for s in manifest["servers"]}
    assert sorted(servers.values()) == ["n1", "n2"], manifest["servers"]  # one server on each Slurm node
    if not resumed:  # a resumed run may have too few shards left to give both nodes one
        assert {s["node_id"] for s in manifest["shards"]} == set(servers)  # both committed shards
    return manifest


def sbatch_argv(job_dir: Path, job: tuple[str, ...] = JOB) -> list[str]:
    """`sbatch slurm/sdg-job.sbatch …` on the test cluster as the script's header says, its log beside job_dir."""
    return ["sbatch", "--parsable", "--account=test", "--partition=debug", "--nodes=2", "--gpus-per-node=2",
            "--time=00:30:00", f"--output={job_dir}.out", str(REPO / "slurm" / "sdg-job.sbatch"), *job]  # fmt: skip


def sbatch(env: dict[str, str], job_dir: Path, *extra_env: str, job: tuple[str, ...] = JOB) -> str:
    """slurm/sdg-job.sbatch as its header says, without pyxis: the installation this test runs from."""
    run_env = env | {"SDG_CONTAINER": "none", "SDG_VENV": sys.prefix, "SDG_JOB_DIR": str(job_dir),
                     "SDG_RAY_PORT": str(free_port())}  # fmt: skip
    run_env |= dict(e.split("=", 1) for e in extra_env)
    return slurm_cmd(run_env | {"SDG_WAIT_S": "180"}, *sbatch_argv(job_dir, job)).strip().split(";")[0]


def test_launcher_runs_the_job_across_two_slurm_nodes(slurm, tmp_path: Path) -> None:
    started = time.monotonic()
    job_id = launch(slurm, tmp_path, cluster_profile(job_dir=tmp_path / "cluster"))
    state = wait_until_done(slurm, job_id)
    (job_dir,) = {p.parent.parent for p in (tmp_path / "cluster").rglob("sdg/tiny.jsonl")}
    driver_log = (job_dir / "logs" / "driver.log").read_text()
    assert state["JobState"] == "COMPLETED", driver_log[-3000:] + slurm_logs(slurm, job_id)
    manifest = assert_exactly_n_unique_from_both_nodes(job_dir)
    sbatch_out = next(job_dir.glob("sbatch_*.out")).read_text()
    assert "driver exited with 0" in sbatch_out
    print(f"sbatch to done {time.monotonic() - started:.1f}s; driver timings {manifest['timings_s']}")
    for path in all_files(tmp_path):  # the key travelled by name only
        assert SECRET not in path.read_text(errors="replace"), path
    assert not processes_with_env("SLURM_JOB_ID", job_id)  # Slurm ended the Ray steps, and every server


def test_two_servers_on_each_node_each_serve_their_own_alias(slurm, tmp_path: Path) -> None:
    """`serve.servers`: every Slurm node starts both llama-servers (one asks the question, one answers it: the same
    GGUF under two served names); each alias's requests go to its own server on the shard's node. Exactly N."""
    job_id = launch(slurm, tmp_path, cluster_profile(job_dir=tmp_path / "cluster"), job=(*JOB, *TWO_SERVERS))
    state = wait_until_done(slurm, job_id)
    (job_dir,) = {p.parent.parent for p in (tmp_path / "cluster").rglob("sdg/tiny.jsonl")}
    assert state["JobState"] == "COMPLETED", (job_dir / "logs" / "driver.log").read_text()[-3000:]
    manifest = assert_exactly_n_unique_from_both_nodes(job_dir)
    servers = manifest["servers"]
    assert len(servers) == 4 and len({s["endpoint"] for s in servers}) == 4, servers
    assert sorted((s["slurm_node"], s["name"], *s["aliases"]) for s in servers) == [
        ("n1", "asker", "asker"), ("n1", "writer", "text"), ("n2", "asker", "asker"), ("n2", "writer", "text")
    ]  # fmt: skip
    assert all(s["restarts"] == 0 for s in servers)
    # Every record's question came from asker and its answer from writer, each at its server on the shard's node.
    usage = manifest["usage"]
    assert usage["asker"]["requests"] >= N and usage["text"]["requests"] >= N, usage
    at = {(s["node_id"], s["name"]): s["endpoint"] for s in servers}
    for shard in manifest["shards"]:
        node = shard["node_id"]
        assert shard["endpoints"] == {"text": at[node, "writer"], "asker": at[node, "asker"]}, shard
    models = manifest["models"]
    assert (models["asker"]["server"], models["asker"]["model"]) == ("asker", "asker")
    assert (models["text"]["server"], models["text"]["model"]) == ("writer", "smollm2-135m")
    card = (job_dir / "sdg" / "README.md").read_text()
    assert "2 node(s) × writer (llama_cpp: text) + asker (llama_cpp: asker)" in card
    assert not processes_with_env("SLURM_JOB_ID", job_id)


def test_plain_sbatch_cancelled_mid_run_then_the_same_submission_resumes(slurm, tmp_path: Path) -> None:
    """`sbatch slurm/sdg-job.sbatch` as its header says; `scancel` once a shard is committed; the same submission
    again ends with exactly N from both nodes, nothing of either job left running."""
    job_dir = tmp_path / "job"
    job_id = sbatch(slurm, job_dir)
    wait_for(lambda: committed(job_dir), 300, "the first committed shard")
    assert (job_dir / "logs" / "ray-head.log").is_file() and (job_dir / "logs" / "ray-worker-n2.log").is_file()
    slurm_cmd(slurm, "scancel", job_id)
    assert wait_until_done(slurm, job_id, timeout=120)["JobState"] == "CANCELLED"
    finished = len(committed(job_dir))
    assert not (job_dir / "sdg" / "tiny.jsonl").exists()
    job_id = sbatch(slurm, job_dir)
    state = wait_until_done(slurm, job_id)
    assert state["JobState"] == "COMPLETED", Path(f"{job_dir}.out").read_text()[-3000:] + slurm_logs(slurm, job_id)
    manifest = assert_exactly_n_unique_from_both_nodes(job_dir, resumed=True)
    assert manifest["shards_skipped_on_resume"] >= finished >= 1
    assert not processes_with_env("SLURM_JOB_ID", job_id)


def test_time_limit_warning_stops_cleanly_and_the_requeued_job_finishes(slurm, tmp_path: Path) -> None:
    """`--signal=B:TERM@…` reaches the batch shell before the time limit; `scancel --batch --signal=TERM` sends the
    same signal now. The driver keeps what is committed, writes an `interrupted` manifest, and the job requeues
    itself (SDG_REQUEUE=1); the requeued run resumes and ends with exactly N."""
    job_dir = tmp_path / "job"
    job_id = sbatch(slurm, job_dir, "SDG_REQUEUE=1")
    wait_for(lambda: committed(job_dir), 300, "the first committed shard")
    slurm_cmd(slurm, "scancel", "--batch", "--signal=TERM", job_id)
    manifest_path = job_dir / "sdg" / "tiny.manifest.json"
    interrupted = wait_for(lambda: manifest_path.exists() and json.loads(manifest_path.read_text()), 120,
                           "the interrupted manifest")  # fmt: skip
    assert interrupted["status"] == "interrupted"
    kept = len(interrupted["shards"])
    # Slurm holds a requeued job back for ~2 min (BeginTime); cut that to 5 s. Not to 0: slurmd refuses a job
    # restarted within a second of its requeue ("Job credential revoked"), which is why Slurm delays it at all.
    requeued = wait_for(lambda: (s := job_state(slurm, job_id))["JobState"] == "PENDING" and s, 120, "the requeue")
    assert requeued["Restarts"] == "1"
    slurm_cmd(slurm, "scontrol", "update", f"JobId={job_id}", "StartTime=now+5")
    state = wait_until_done(slurm, job_id)
    log = Path(f"{job_dir}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:] + slurm_logs(slurm, job_id)
    assert "driver exited with 143" in log and "requeueing job" in log and "driver exited with 0" in log
    manifest = assert_exactly_n_unique_from_both_nodes(job_dir, resumed=True)
    assert manifest["shards_skipped_on_resume"] >= kept >= 1


def test_a_secret_in_any_shape_is_refused_on_the_cluster_and_written_nowhere(slurm, tmp_path: Path) -> None:
    """A sentinel in a URL's user-info, in extra_body, after a server flag, in serve.env and in an inlined
    environment variable: the driver on the cluster refuses the job (exit 2, every key named) and the value is in no
    file of the job, Slurm's log of it included."""
    sentinel = "s3cr3t-SENTINEL-slurm-shapes-0123456789"
    shapes = (f"providers.nvidia.endpoint=https://user:{sentinel}@integrate.invalid/v1",
              f"models.text.inference_parameters.extra_body={{api_key: {sentinel}}}",
              f"serve.extra_args=[--api-key,{sentinel}]", f"serve.env={{HF_TOKEN: {sentinel}}}",
              "description=${oc.env:MY_SERVICE_TOKEN}")  # fmt: skip
    job_dir = tmp_path / "job"
    job_id = sbatch(slurm, job_dir, f"MY_SERVICE_TOKEN={sentinel}", job=(*JOB, *shapes))
    state = wait_until_done(slurm, job_id)
    said = Path(f"{job_dir}.out").read_text()
    assert state["JobState"] == "FAILED" and "driver exited with 2" in said, said[-3000:]
    log = (job_dir / "logs" / "driver.log").read_text()
    for key in ("providers.nvidia.endpoint", "extra_body.api_key", "serve.extra_args.0", "serve.env.HF_TOKEN",
                "description: contains the value of $MY_SERVICE_TOKEN"):  # fmt: skip
        assert key in log, log[-3000:]
    for path in all_files(tmp_path):
        assert sentinel not in path.read_text(errors="replace"), path
    assert not (job_dir / "sdg" / "tiny.jsonl").exists()


def test_a_data_designer_config_runs_unchanged_across_both_nodes(slurm, tmp_path: Path) -> None:
    """A config written by DataDesignerConfigBuilder.write_config (llm-code and a validation column), exactly N rows
    with every column, served on both Slurm nodes."""
    from tests import dd_configs

    config = dd_configs.export(dd_configs.code_with_validation(), tmp_path / "code.yaml")
    job = (f"recipe={config}", "layer=cpu", "num_records=6", "generation.shard_size=2", "serve.threads=1",
           "models.openai-text.inference_parameters.max_tokens=96", "generation.keep_truncated=true")  # fmt: skip
    job_dir = tmp_path / "job"
    job_id = sbatch(slurm, job_dir, job=job)
    state = wait_until_done(slurm, job_id)
    assert state["JobState"] == "COMPLETED", Path(f"{job_dir}.out").read_text()[-3000:] + slurm_logs(slurm, job_id)
    records = read_jsonl(job_dir / "sdg" / "code.jsonl")
    assert len(records) == 6 and all(
        list(r) == ["area", "level", "task", "solution", "solution_check"] for r in records
    )
    manifest = json.loads((job_dir / "sdg" / "code.manifest.json").read_text())
    assert sorted(s["slurm_node"] for s in manifest["servers"]) == ["n1", "n2"], manifest["servers"]
    assert not processes_with_env("SLURM_JOB_ID", job_id)


def test_planted_near_duplicates_are_removed_across_the_cluster_to_exactly_n(slurm, tmp_path: Path) -> None:
    """quality.near_duplicates on the two-node cluster: shards from any node are compared with every other shard,
    and the output has exactly N near-unique records (no model column: the records are planted, records 0 and 1
    of one story in shard 0)."""
    from tests.test_near_dupes import planted_config

    config = planted_config(tmp_path)
    job = (f"recipe={config}", "num_records=5", "generation.shard_size=2", "quality.near_duplicates=0.5")
    job_dir = tmp_path / "job"
    job_id = sbatch(slurm, job_dir, job=job)
    state = wait_until_done(slurm, job_id)
    assert state["JobState"] == "COMPLETED", Path(f"{job_dir}.out").read_text()[-3000:] + slurm_logs(slurm, job_id)
    records = read_jsonl(job_dir / "sdg" / "stories.jsonl")
    assert len(records) == 5 and len({r["story"] for r in records}) == 5
    manifest = json.loads((job_dir / "sdg" / "stories.manifest.json").read_text())
    assert manifest["records"] == 5 and manifest["dropped"]["near_duplicate"] >= 1
    assert not processes_with_env("SLURM_JOB_ID", job_id)
