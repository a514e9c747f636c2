"""Pacing to a remote provider's quotas: one Pace per provider and job, shared by every worker."""

from __future__ import annotations

import time
from typing import Any

from sdg_job.config import Recipe


class Pace:
    """Spaces requests so that a provider's quotas hold: `1 / per_s` apart for a request quota, and, for a token
    quota, as far apart as each request's tokens take at `tokens_per_s`. One per provider and job, as a Ray actor
    (`shared_pace`): every worker on every node asks it for a turn before each request, so the quota is shared by
    the workers that are busy, not split evenly among all that might be."""

    def __init__(self, per_s: float | None, tokens_per_s: float | None = None):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.tokens_per_s = tokens_per_s
        # One clock per quota: a token refund must not bring the next request closer than the request quota allows.
        self.request_at = self.tokens_at = 0.0

    def reserve(self, tokens: int = 0) -> float:
        """Takes the next free turn for a request of about `tokens`; returns how long to wait for it (a clock of
        this process: only the wait crosses to the worker)."""
        now = time.monotonic()
        at = max(now, self.request_at, self.tokens_at)
        self.request_at = at + self.interval
        if self.tokens_per_s:
            self.tokens_at = at + tokens / self.tokens_per_s
        return at - now

    def settle(self, tokens: int) -> None:
        """A request took `tokens` more than it reserved (fewer if negative): later turns of the token quota move by
        as much. What was reserved and not used comes back only as far as now: a quota saved up is not spent in a
        burst."""
        if self.tokens_per_s:
            self.tokens_at = max(self.tokens_at + tokens / self.tokens_per_s, time.monotonic())


def shared_pace(recipe: Recipe, name: str) -> Any:
    """The job's Pace actor for a provider's `max_requests_per_minute` and `max_tokens_per_minute`, or None
    without a quota."""
    import ray

    provider = recipe.providers[name]
    requests, tokens = provider.max_requests_per_minute, provider.max_tokens_per_minute
    if not (requests or tokens):
        return None
    return ray.remote(num_cpus=0)(Pace).remote(requests / 60 if requests else None, tokens / 60 if tokens else None)
