"""The two ways a job fails, mapped to the CLI's exit codes."""

from __future__ import annotations


class RecipeError(Exception):
    """Bad input (recipe, seed file, override). Exit 2; nothing has been written."""

    exit_code = 2

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class JobError(Exception):
    """Runtime failure (server died, budget exhausted, ...). Exit 1; finished shards are kept for resume."""

    exit_code = 1


class ServerUnavailable(RuntimeError):
    """A node's server died during a shard: the shard's results are not trusted and the shard is retried."""
