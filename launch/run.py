"""Launch sdg-job with NeMo-Run on a workstation, in Docker, or on a Slurm cluster.

    python launch/run.py [--executor local|docker|slurm] [--dryrun] [--profile PATH] recipe=NAME|PATH [key=value …]

`key=value` arguments are recipe overrides passed through to `python -m sdg_job run` in the job, except those
starting with `slurm.`, `docker.` or `local.`, which override the cluster profile (launch/profiles/example.yaml).
This file only composes NeMo-Run executors around that command: it knows nothing of columns or shards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a plain checkout works too

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402

from sdg_job.cli import recipe_and_overrides  # noqa: E402
from sdg_job.config import apply_overrides, load_recipe  # noqa: E402
from sdg_job.config.load import read_yaml_mapping  # noqa: E402
from sdg_job.config.secrets import secret_problems  # noqa: E402
from sdg_job.errors import RecipeError, all_problems  # noqa: E402

if TYPE_CHECKING:
    from invoke.exceptions import UnexpectedExit

DEFAULT_PROFILE = REPO / "launch" / "profiles" / "example.yaml"
SLURM_TEMPLATE = REPO / "slurm" / "sdg-job.sbatch.j2"
EXECUTORS = ("local", "docker", "slurm")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SSH(Strict):
    """How this machine reaches the cluster's login node (NeMo-Run's SSHTunnel: paramiko for commands, rsync over the
    `ssh` on PATH for the experiment's files, so the login node's host key must be in your known_hosts)."""

    host: str
    user: str
    port: int | None = Field(default=None, ge=1, le=65535, description="default: 22, or your ~/.ssh/config's Port")
    identity: str | None = Field(default=None, description="private key on this machine (`~` is expanded here)")
    pre_command: str | None = Field(default=None, description="run on the login node before every command")


class SlurmProfile(Strict):
    account: str
    partition: str
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=0, description="0: a CPU partition (no --gpus-per-node)")
    time: str = "04:00:00"
    # pyxis: every step runs in container_image. none: every step runs the project's own installation on shared
    # storage (`venv`, default: the one this launcher runs from), for clusters without pyxis/enroot.
    container: Literal["pyxis", "none"] = "pyxis"
    container_image: str | None = None
    container_mounts: list[str] = []
    venv: str | None = None
    job_dir: str
    # vLLM with data parallelism runs an engine and an API process per rank: the whole node, not a default share.
    exclusive: bool = True
    mem: str | None = "0"
    ray_port: int = Field(default=6379, ge=1, le=65535)
    wait_s: int = Field(default=600, ge=1, description="bound on every start-up wait: Ray head, node slots")
    # Slurm sends SIGTERM this long before the time limit: the driver stops cleanly, keeping every committed shard.
    warn_before_limit_s: int = Field(default=300, ge=0)
    requeue: bool = Field(default=False, description="after that warning (or a preemption), requeue the job to resume")
    tunnel: Literal["local", "ssh"] = "local"
    ssh: SSH | None = None
    secrets: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> SlurmProfile:
        if self.tunnel == "ssh" and self.ssh is None:
            raise ValueError("tunnel: ssh needs slurm.ssh.host and slurm.ssh.user")
        if self.tunnel == "ssh" and not PurePosixPath(self.job_dir).is_absolute():
            # It lands in #SBATCH lines and paths on the cluster, where nothing expands `~` or a relative path.
            raise ValueError("tunnel: ssh needs an absolute slurm.job_dir: a path on the cluster's shared storage")
        if self.tunnel == "ssh" and self.container == "none" and not self.venv:
            raise ValueError("tunnel: ssh with container: none needs slurm.venv: the installation's path on the "
                             "cluster (the venv this launcher runs from is on this machine)")  # fmt: skip
        if self.container == "pyxis" and not self.container_image:
            raise ValueError("container: pyxis needs slurm.container_image (or container: none)")
        return self


class DockerProfile(Strict):
    container_image: str
    num_gpus: int = Field(default=-1, description="-1: all GPUs; 0: none (provider=openai|nvidia)")
    shm_size: str = "16g"
    volumes: list[str] = []
    job_dir: str = "./nemo_experiments"
    secrets_file: str | None = None
    # host: the job reaches an endpoint on this machine (OPENAI_BASE_URL=http://localhost:…) and Ray and vLLM find
    # each other as they do outside a container. NeMo-Run's own default is a bridge network of its own (`nemo_run`).
    network: str = "host"


class LocalProfile(Strict):
    job_dir: str = "./nemo_experiments"


class Profile(Strict):
    slurm: SlurmProfile | None = None
    docker: DockerProfile | None = None
    local: LocalProfile = LocalProfile()


def load_profile(path: Path, overrides: list[str], executor: str) -> Profile:
    """The cluster profile, with `slurm.…`-style overrides, checked to have the chosen executor's section."""
    if not path.is_file():
        raise RecipeError(str(path), "", "cluster profile not found (--profile or SDG_PROFILE)")
    cfg = read_yaml_mapping(path, "a cluster profile")
    apply_overrides(cfg, overrides, str(path))
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise RecipeError(str(path), str(key), f"cannot resolve: {str(e).splitlines()[0]}") from None
    assert isinstance(data, dict)
    secrets = secret_problems(data)  # NeMo-Run writes what a profile holds into its own files
    if secrets:
        raise all_problems(str(path), [(str(path), key, why) for key, why in secrets])
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(str(path), ".".join(map(str, err["loc"])), err["msg"]) from None
    if getattr(profile, executor) is None:
        raise RecipeError(str(path), executor, f"the profile has no {executor} section")
    return profile


def job_args(recipe_ref: str, overrides: list[str]) -> list[str]:
    return ["run", f"recipe={recipe_ref}", *overrides]


def slurm_executor(p: SlurmProfile):
    import nemo_run as run

    # The same layout on the cluster either way: job_dir/experiments/<title>/<id>/<task>/ (NeMo-Run adds the rest).
    experiments = os.path.join(p.job_dir, "experiments")
    tunnel: run.SSHTunnel | run.LocalTunnel
    if p.ssh is not None and p.tunnel == "ssh":
        # paramiko opens the identity as given: expand `~` here, where the key is.
        identity = str(Path(p.ssh.identity).expanduser()) if p.ssh.identity else None
        tunnel = run.SSHTunnel(host=p.ssh.host, user=p.ssh.user, port=p.ssh.port, job_dir=experiments,
                               identity=identity, pre_command=p.ssh.pre_command)  # fmt: skip
    else:
        tunnel = run.LocalTunnel(job_dir=experiments)
    sbatch: dict[str, str | bool] = {"export": "ALL", "open_mode": "append"}  # secrets come from the environment
    if p.exclusive:
        sbatch["exclusive"] = True
    if p.mem is not None:
        sbatch["mem"] = p.mem
    if p.warn_before_limit_s:
        sbatch["signal"] = f"B:TERM@{p.warn_before_limit_s}"
    # Names and paths only: every value here is written into the sbatch script and NeMo-Run's files.
    env = {
        "SDG_CONTAINER": p.container,
        "SDG_RAY_PORT": str(p.ray_port),
        "SDG_WAIT_S": str(p.wait_s),
        "SDG_REQUEUE": "1" if p.requeue else "0",
        "SDG_SECRET_ENV_NAMES": ",".join(p.secrets),
    }
    if p.container == "pyxis":
        env["NEMO_RUN_DIR"] = "/nemo_run"  # NeMo-Run mounts the job dir there; with none, the script sets the path
    if p.tunnel == "ssh":  # a path on the cluster, read by the job's shell: there `~` is the job's $HOME
        venv = re.sub(r"^~(?=/|$)", "$HOME", p.venv or "")
    else:
        venv = str(Path(p.venv).expanduser() if p.venv else Path(sys.prefix))
    return run.SlurmExecutor(
        account=p.account,
        partition=p.partition,
        nodes=p.nodes,
        ntasks_per_node=1,
        gpus_per_node=p.gpus_per_node or None,
        time=p.time,
        container_image=p.container_image if p.container == "pyxis" else None,
        container_mounts=list(p.container_mounts),
        env_vars=env,
        setup_lines=f'export PATH="{venv}/bin:$PATH"' if p.container == "none" else None,
        container_env=list(p.secrets),
        additional_parameters=sbatch,
        ray_template=str(SLURM_TEMPLATE),
        job_name_prefix="sdg-",
        packager=run.Packager(),
        tunnel=tunnel,
    )


def docker_executor(p: DockerProfile):
    import nemo_run as run

    volumes = list(p.volumes)
    env = {"NEMO_RUN_DIR": "/nemo_run"}
    if p.secrets_file:  # NeMo-Run's Docker path can only pass values; a mounted file of the user's keeps them out
        volumes.append(f"{Path(p.secrets_file).expanduser().resolve()}:/run/secrets/sdg.env:ro")
        env["SDG_SECRETS_FILE"] = "/run/secrets/sdg.env"
    return run.DockerExecutor(
        container_image=p.container_image,
        num_gpus=p.num_gpus,
        runtime="nvidia" if p.num_gpus else None,
        ipc_mode="host",
        shm_size=p.shm_size,
        volumes=volumes,
        env_vars=env,
        network=p.network,
        additional_kwargs={
            # The image's ENTRYPOINT is `python3 -m sdg_job run`; NeMo-Run passes a full `bash -c …` command.
            "entrypoint": ["/usr/bin/env"],
            # As you, not as the image's user: the job dir NeMo-Run made here is yours, and so is what lands in it.
            "user": f"{os.getuid()}:{os.getgid()}",
        },
        packager=run.Packager(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--dryrun", action="store_true", help="print what would be submitted; submit nothing")
    parser.add_argument("--profile", type=Path, default=Path(os.environ.get("SDG_PROFILE", DEFAULT_PROFILE)))
    parser.add_argument("--name", default=None, help="experiment name (default: sdg-<recipe name>)")
    parser.add_argument("args", nargs="*", metavar="recipe=… key=value")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        profile_overrides = [a for a in ns.args if a.split("=", 1)[0].split(".")[0] in EXECUTORS]
        ref, overrides = recipe_and_overrides([a for a in ns.args if a not in profile_overrides])
        recipe = load_recipe(ref, overrides)  # reject bad input here, before anything is submitted
        profile = load_profile(ns.profile, profile_overrides, ns.executor)
        if ns.executor == "slurm" and not ns.dryrun:
            check_ssh_identity(ns.profile, profile)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return launch(ns.executor, profile, job_args(ref, overrides), ns.name or f"sdg-{recipe.name}", ns.dryrun)


def check_ssh_identity(path: Path, profile: Profile) -> None:
    """paramiko fails on a missing key file with a traceback, after NeMo-Run has begun the experiment: say it first."""
    p = profile.slurm
    if p is not None and p.tunnel == "ssh" and p.ssh is not None and p.ssh.identity:
        if not Path(p.ssh.identity).expanduser().is_file():
            raise RecipeError(str(path), "slurm.ssh.identity", f"{p.ssh.identity}: no such file on this machine")


class Backend:
    """How the job runs on one executor: NeMo-Run's executor for the profile, where its experiments go, the
    command line's form, and what to fix in the task's executor before the run and to say after it."""

    python = "python3"  # the image's, or the cluster's venv on PATH
    metadata: dict = {}

    def executor(self, profile: Profile):
        raise NotImplementedError

    def base_dir(self, profile: Profile) -> str | None:
        raise NotImplementedError

    def args(self, args: list[str]) -> list[str]:
        return args

    def prepare(self, job_executor, name: str) -> None:
        """The task's own executor (NeMo-Run's copy of ours, assigned its experiment and job dirs)."""

    def report(self, job_executor) -> int:
        return 0


class LocalBackend(Backend):
    python = sys.executable

    def executor(self, profile: Profile):
        import nemo_run as run

        return run.LocalExecutor()

    def base_dir(self, profile: Profile) -> str | None:
        return str(Path(profile.local.job_dir).resolve())

    def prepare(self, job_executor, name: str) -> None:
        # The job dir on this machine; NeMo-Run does not set NEMO_RUN_DIR itself.
        job_executor.env_vars["NEMO_RUN_DIR"] = job_executor.job_dir

    def report(self, job_executor) -> int:
        print(f"output under: {job_executor.env_vars['NEMO_RUN_DIR']}/sdg")
        return 0


class DockerBackend(Backend):
    def executor(self, profile: Profile):
        assert profile.docker is not None
        return docker_executor(profile.docker)

    def base_dir(self, profile: Profile) -> str | None:
        assert profile.docker is not None
        return str(Path(profile.docker.job_dir).resolve())

    def report(self, job_executor) -> int:
        return docker_outcome(job_executor.job_dir)


class SlurmBackend(Backend):
    metadata = {"use_with_ray_cluster": True}

    def executor(self, profile: Profile):
        assert profile.slurm is not None
        return slurm_executor(profile.slurm)

    def base_dir(self, profile: Profile) -> str | None:
        # NeMo-Run writes the experiment to <base_dir>/experiments/…: with the LocalTunnel that is the job dir on shared
        # storage, where the tunnel's job_dir points. Over SSH it is NeMo-Run's home on this machine (NEMORUN_HOME,
        # ~/.nemo_run); NeMo-Run copies it (rsync) to the tunnel's job_dir on the cluster before submitting.
        assert profile.slurm is not None
        return None if profile.slurm.tunnel == "ssh" else profile.slurm.job_dir

    def args(self, args: list[str]) -> list[str]:
        return [shlex.quote(a) for a in args]  # the command lands in a shell line of the sbatch script

    def prepare(self, job_executor, name: str) -> None:
        # sbatch opens the job's output file before the script runs: put it in the task's job dir, which NeMo-Run has
        # made by then (its default, <job dir>/ray/logs, does not exist yet and the job dies unstarted). The path is
        # the cluster's (the tunnel's job_dir); over SSH NeMo-Run's rsync has put the dir there first.
        job_executor.job_details.folder = os.path.join(job_executor.tunnel.job_dir, Path(job_executor.job_dir).name)

    def report(self, job_executor) -> int:
        import nemo_run as run

        tunnel = job_executor.tunnel
        where = f"{tunnel.user}@{tunnel.host}:" if isinstance(tunnel, run.SSHTunnel) else ""
        print(f"job dir: {where}{job_executor.job_details.folder} (output under its sdg/)")
        return 0


BACKENDS: dict[str, Backend] = {"local": LocalBackend(), "docker": DockerBackend(), "slurm": SlurmBackend()}


def launch(executor_name: str, profile: Profile, args: list[str], name: str, dryrun: bool) -> int:
    import nemo_run as run
    from invoke.exceptions import UnexpectedExit  # NeMo-Run's tunnels run commands with invoke

    backend = BACKENDS[executor_name]
    args = backend.args(args)
    task = run.Script(path="sdg_job", args=args, entrypoint=backend.python, m=True, metadata=dict(backend.metadata))
    executor = backend.executor(profile)
    with run.Experiment(name, executor=executor, base_dir=backend.base_dir(profile), log_level="WARN") as exp:
        exp.add(task, name=name)
        job_executor = exp.jobs[-1].executor
        backend.prepare(job_executor, name)
        if dryrun:
            exp.dryrun(log=False, delete_exp_dir=False)
            print(describe(executor_name, job_executor.experiment_dir, name, executor, args))
            return 0
        try:
            exp.run(detach=executor_name == "slurm", tail_logs=False)
        except UnexpectedExit as e:  # a command for the cluster (mkdir, rsync, sbatch), locally or over SSH
            print(f"error: {cluster_command_failed(e)}", file=sys.stderr)
            return 1
        print(f"experiment: {job_executor.experiment_dir}")
    return backend.report(job_executor)  # after leaving the experiment, which waits for a Docker container


def cluster_command_failed(e: UnexpectedExit) -> str:
    """What failed, without NeMo-Run's traceback, and what to do about the usual SSH causes."""
    result = e.result
    stderr = (result.stderr or "").strip()
    message = f"`{result.command}` exited with {result.exited}" + (f":\n{stderr}" if stderr else "")
    if "Host key verification failed" in stderr:
        message += ("\nNeMo-Run copies the experiment with rsync over ssh, which checks the login node's host key: "
                    "log in once with `ssh` (-p PORT) to add it to your known_hosts")  # fmt: skip
    return message


def docker_outcome(job_dir: str) -> int:
    """The job's exit code (NeMo-Run's container writes it to status_<name>.out) and where its output is."""
    code = 1
    for status in Path(job_dir).glob("status_*.out"):
        code = int(json.loads(status.read_text())["exit_code"])
    if code == 0:
        print(f"output under: {job_dir}/sdg")
    else:
        logs = sorted(Path(job_dir).glob("log_*.out"))
        print(f"the job exited with {code}; see {logs[0] if logs else job_dir}", file=sys.stderr)
    return code


def describe(executor_name: str, exp_dir: str, name: str, executor, args: list[str]) -> str:
    """What a dry run shows: the sbatch script for Slurm, the container and command otherwise."""
    sbatch = Path(exp_dir) / f"{name}_sbatch.sh"
    if executor_name == "slurm" and sbatch.is_file():
        return f"# {sbatch}\n{sbatch.read_text()}"
    lines = [f"# experiment dir: {exp_dir}", f"executor: {executor_name}"]
    if executor_name == "docker":
        lines += [
            f"image: {executor.container_image}",
            f"gpus: {'all' if executor.num_gpus == -1 else executor.num_gpus}",
            f"network: {executor.network}",
            f"volumes: {executor.volumes}",
            f"env (names): {sorted(executor.env_vars)}",
        ]
    lines.append("command: " + shlex.join(["python3", "-m", "sdg_job", *args]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
