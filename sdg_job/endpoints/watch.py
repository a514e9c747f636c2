"""An endpoint failing at run time: the causes of failed requests, and the watch that stops a job whose endpoint
fails for good."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sdg_job.config import Recipe
from sdg_job.config.secrets import without_userinfo

if TYPE_CHECKING:
    from sdg_job.summary import ShardSummary

# Data Designer's classification of a failed request (ProviderErrorKind) → the cause the job reports.
CAUSES = {"authentication": "auth", "permission_denied": "auth", "not_found": "not_found",
          "api_connection": "connection", "timeout": "timeout", "request_admission_timeout": "timeout",
          "rate_limit": "rate_limited", "quota_exceeded": "rate_limited", "internal_server": "server_error",
          "api_error": "server_error", "context_window_exceeded": "context_window"}  # fmt: skip
# The kinds counted as bad_request: the request itself was refused. A kind in neither is a Data Designer this job
# does not know (observe.problems refuses it rather than miscount it).
OTHER_KINDS = {"bad_request", "client_error", "unsupported_params", "unprocessable_entity", "unsupported_capability"}
REQUEST_CAUSES = {*CAUSES.values(), "bad_request"}  # dropped reasons that are failed requests, not failed records


def request_cause(kind: str) -> str:
    return CAUSES.get(kind, "bad_request")  # bad_request, unsupported_params, unprocessable_entity, …


# Causes of failed requests that no retry cures, and how long every shard must fail with one before the job stops:
# a refused key or an unknown model at once, refused connections once they outlast a restart.
INCURABLE_AFTER_S = {"auth": 0.0, "not_found": 0.0, "connection": 30.0}


class EndpointFailing(Exception):
    def __init__(self, cause: str, said: str | None, shard: str, for_s: float, provider: str):
        self.cause, self.said, self.shard, self.for_s, self.provider = cause, said, shard, for_s, provider


class EndpointWatch:
    """Stops a job whose shards fail whole, every request with one cause that retrying cannot cure: without it
    each shard would be retried and topped up until the budget ran out, minutes or hours later, for nothing."""

    def __init__(self) -> None:
        self.failing_since: dict[str, float] = {}

    def saw(self, summary: ShardSummary) -> None:
        """Called with each committed shard's summary; raises EndpointFailing to stop the job."""
        errors = summary.request_errors
        cause = next(iter(errors)) if len(errors) == 1 else None
        if summary.generated or cause not in INCURABLE_AFTER_S:
            self.failing_since.clear()  # a shard that gave anything, or failed otherwise: the endpoint works
            return
        since = self.failing_since.setdefault(cause, time.monotonic())
        if time.monotonic() - since >= INCURABLE_AFTER_S[cause]:
            # Which provider failed (a recipe may use several); a shard from before it was noted: the recipe's.
            provider = summary.request_error_provider or "?"
            raise EndpointFailing(cause, summary.request_error, summary.shard, time.monotonic() - since, provider)


def failing_message(recipe: Recipe, e: EndpointFailing) -> str:
    own = e.provider.partition(":")[0] == "local"  # local, or local:NAME for one of several servers per node
    name = e.provider if own or e.provider in recipe.providers else recipe.provider
    kind, _, server = name.partition(":")
    if kind == "local":
        where = f"the job's own server {server}" if server else "the job's own server"
        fix = "see its log under the run dir's logs/"
    else:
        provider = recipe.providers[name]
        where = f"provider {name} ({without_userinfo(provider.endpoint)})"
        fix = {
            "auth": f"check the key in ${provider.api_key_env}" if provider.api_key_env else "it wants a key",
            "not_found": "check the models' names against what it serves",
            "connection": f"it has refused connections for {e.for_s:.0f} s",
        }[e.cause]
    said = f": {e.said.rstrip('.')}" if e.said else ""
    return (f"every request of {e.shard} to {where} failed with {e.cause}{said}; {fix}. Committed shards are kept: "
            "run the same command to resume once it is fixed.")  # fmt: skip
