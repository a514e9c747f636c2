"""The ways a job ends early, mapped to the CLI's exit codes."""

from __future__ import annotations

import signal


class RecipeError(Exception):
    """Bad input (recipe, seed file, override). Exit 2; nothing has been written."""

    exit_code = 2

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


def all_problems(source: str, problems: list[tuple[str, str, str]]) -> RecipeError:
    """One error for every (source, key, message) found, whatever stage found it: one problem reads as ever
    (`file: key: message`); several are listed, one per line, naming their file where it is not `source`."""
    if len(problems) == 1:
        return RecipeError(*problems[0])
    lines = [f"  {key + ': ' if key else ''}{message}" + ("" if where == source else f" (in {where})")
             for where, key, message in problems]  # fmt: skip
    return RecipeError(source, "", f"{len(problems)} problems:\n" + "\n".join(lines))


class EngineMismatch(Exception):
    """The installed Data Designer lacks what the job hooks into to observe its requests (a version other than the
    tested one). Exit 2; nothing has been written."""

    exit_code = 2


class JobError(Exception):
    """Runtime failure (server died, budget exhausted, ...). Exit 1; finished shards are kept for resume."""

    exit_code = 1


class Interrupted(JobError):
    """Stopped by a signal: SIGTERM (Slurm's time limit, preemption, scancel) → exit 143, Ctrl-C → 130, SIGHUP →
    129. Committed shards are kept and the manifest says `interrupted`: the same command resumes."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name}: stopped cleanly; committed shards are kept, run the same command to resume"
        )


class ServerUnavailable(RuntimeError):
    """A node's server died during a shard: the shard's results are not trusted and the shard is retried."""
