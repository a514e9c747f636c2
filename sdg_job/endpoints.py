"""Where a shard's requests go: each model alias's endpoint (the node's own server, or the model's remote provider),
how many requests it keeps in flight there, and, for each remote provider, a preflight that finds a wrong key, a model
the endpoint does not serve or an endpoint nobody answers at before any work starts, and says which; the pacing to its
quotas; and the watch that stops a job whose endpoint fails for good.

The key never leaves the environment: an endpoint carries the NAME of the variable that holds it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from sdg_job.config import ProviderSpec, Recipe
from sdg_job.config.secrets import without_userinfo
from sdg_job.errors import RecipeError
from sdg_job.serve import API_KEY_ENV, check_weights_staged

if TYPE_CHECKING:
    from sdg_job.summary import ShardSummary

log = logging.getLogger("sdg_job.endpoints")
REMOTE_CONCURRENCY = 64  # in-flight requests per worker against a remote endpoint of unknown capacity
# A 1-token completion answers in about a second at a hosted provider; a cold serverless model may take longer.
PREFLIGHT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


# Keywords only: eight fields, several of one type, that positions would silently swap.
@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where a shard sends its requests. The key travels as an env-var NAME, resolved by Data Designer."""

    url: str
    api_key_env: str | None
    served_model: str | None = None  # set for provider: local, where the server serves exactly one model
    max_parallel_requests: int = 4
    # Whether the server takes `chat_template_kwargs` (vLLM, llama.cpp, NVIDIA's API do; a strict OpenAI-compatible
    # service may refuse an unknown field with HTTP 400, which would lose every row).
    takes_template_kwargs: bool = True
    pace: Any = None  # a Pace actor every worker asks before each request, when the provider has a quota
    paces_tokens: bool = False  # whether that quota counts tokens (each request then settles its usage)
    provider: str = "local"  # the recipe's name for it: local (the job's own server) or a `providers` entry


@dataclass(frozen=True, kw_only=True)
class Routes:
    """Where each model alias of a shard sends its requests: the node's own servers (`own`, by server name) for the
    models with provider local, each to the server that serves it, their provider's endpoint for the others. A
    recipe may mix both: a generator served on the nodes beside a judge at a hosted provider."""

    by_alias: dict[str, Endpoint]
    own: dict[str, Endpoint] = field(default_factory=dict)

    def __getitem__(self, alias: str) -> Endpoint:
        return self.by_alias[alias]

    @property
    def endpoints(self) -> list[Endpoint]:
        """Each endpoint once: the node's own servers first."""
        return list(dict.fromkeys([*self.own.values(), *self.by_alias.values()]))


def route_models(recipe: Recipe, own: dict[str, Endpoint], remote: dict[str, Endpoint]) -> Routes:
    """Each alias to its endpoint: its server in `own` (the node's servers, by name) for provider local, else its
    provider's entry in `remote`."""

    def endpoint(alias: str) -> Endpoint:
        provider = recipe.provider_of(alias)
        return own[recipe.server_of(alias)] if provider == "local" else remote[provider]

    return Routes(by_alias={alias: endpoint(alias) for alias in recipe.models}, own=own)


def own_endpoint(recipe: Recipe, server: str, url: str, workers: int) -> Endpoint:
    """The endpoint of one of the job's own servers on a node: its served model, and each worker's share of the
    server's capacity (`concurrency`)."""
    spec = recipe.servers[server]
    capacity = recipe.generation.max_parallel_requests or spec.capacity
    if len(recipe.servers) == 1:
        return Endpoint(
            url=url,
            api_key_env=API_KEY_ENV,
            served_model=spec.served_model_name,
            max_parallel_requests=worker_share(capacity, workers),
        )
    # Several: a shard's rows are mostly at one server at a time, and which of the node's workers are at this one
    # changes as their shards move on, so any one of them may have to fill it (the server queues what is over).
    return Endpoint(
        url=url,
        api_key_env=API_KEY_ENV,
        served_model=spec.served_model_name,
        max_parallel_requests=capacity,
        provider=f"local:{server}",
    )


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


def remote_endpoints(recipe: Recipe, parallel: int, paced: bool = True) -> dict[str, Endpoint]:
    """An endpoint for each remote provider the models use; `paced` (a job on Ray, not a preview): one Pace actor for
    each with a request or token quota."""
    return {
        name: remote_endpoint(recipe, name, parallel, shared_pace(recipe, name) if paced else None)
        for name in recipe.remote_providers
    }


def shared_pace(recipe: Recipe, name: str) -> Any:
    """The job's Pace actor for a provider's `max_requests_per_minute` and `max_tokens_per_minute`, or None
    without a quota."""
    import ray

    provider = recipe.providers[name]
    requests, tokens = provider.max_requests_per_minute, provider.max_tokens_per_minute
    if not (requests or tokens):
        return None
    return ray.remote(num_cpus=0)(Pace).remote(requests / 60 if requests else None, tokens / 60 if tokens else None)


def remote_endpoint(recipe: Recipe, name: str, parallel: int, pace: Any = None) -> Endpoint:
    provider = recipe.providers[name]
    key_env = provider.api_key_env if provider.api_key_env and os.environ.get(provider.api_key_env) else None
    hosted_by_nvidia = name == "nvidia" or "api.nvidia.com" in provider.endpoint
    counts_tokens = pace is not None and provider.max_tokens_per_minute is not None
    return Endpoint(
        url=provider.endpoint,
        api_key_env=key_env,
        max_parallel_requests=parallel,
        takes_template_kwargs=hosted_by_nvidia,
        pace=pace,
        paces_tokens=counts_tokens,
        provider=name,
    )


def concurrency(recipe: Recipe) -> tuple[int, int]:
    """(shard workers per node, requests in flight per worker), sized so each server never idles.

    A record has one request in flight at a time (its columns depend on each other), so one shard keeps at
    most `shard_size` requests going, and fewer in its tail. Enough workers to fill the server's capacity,
    plus one whose shard overlaps another's tail; each may push a full share, the server queues the rest.

    Tried and measured (C=256): capping each worker at 64 in flight, with more workers, saves ~0.3 ms CPU per
    record (Data Designer scans its connection pool on every request) but lets the server drain at the end of
    the job: saturation 0.89-0.96 against 0.99. The server's time is what costs, so workers stay few and full.
    """
    gen = recipe.generation
    # With models served on the nodes, their servers set the pace (a remote judge beside them takes as many):
    # enough shards to fill all of a node's servers at once.
    each = gen.max_parallel_requests  # a server's capacity, when the recipe says better than serve: does
    capacity = sum(each or spec.capacity for spec in recipe.servers.values()) or each or REMOTE_CONCURRENCY
    workers = gen.workers_per_node or math.ceil(capacity / gen.shard_size) + 1
    return workers, worker_share(capacity, workers)


def expected_nodes() -> int:
    """How many nodes the job was given (SDG_EXPECTED_NODES, set by the Slurm scripts; 1 on a workstation)."""
    return int(os.environ.get("SDG_EXPECTED_NODES", "1"))


def worker_share(capacity: int, workers: int) -> int:
    """Requests in flight per worker at a server of `capacity`: one worker is in its shard's tail, the others fill
    it."""
    return max(1, math.ceil(capacity / max(workers - 1, 1)))


# ---------------------------------------------------------------- an endpoint failing at run time

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


# ---------------------------------------------------------------- preflight of a remote provider


def preflight(recipe: Recipe, source: str) -> None:
    """One 1-token chat completion (an embedding of one word, for an embedding model) per model the recipe sends to a
    remote provider, with the recipe's key, before
    Ray, a lease or a shard: a wrong key, a model the endpoint does not serve, or an endpoint that does not answer
    ends the job here (RecipeError, exit 2), in one line that names the provider, the endpoint and the cause.

    Off with `providers.<name>.preflight: false`, or per model with the Nemotron step's `skip_health_check: true`;
    an unset key of the hosted `nvidia` provider is refused all the same (an openai-compatible endpoint may
    legitimately run without one, like a local vLLM started without --api-key).
    A 429 or 5xx is not the recipe's fault: it is logged and the job goes on (the run paces and retries those)."""
    for name in recipe.remote_providers:
        models = {
            (m.model, m.inference_parameters.embeds)
            for a, m in recipe.models.items()
            if recipe.provider_of(a) == name and not m.skip_health_check
        }
        _preflight(name, recipe.providers[name], sorted(models), source)


def _probe(model: str, embeds: bool) -> tuple[str, dict[str, Any]]:
    """The smallest request that shows the model is served: its path and body."""
    if embeds:
        return "/embeddings", {"model": model, "input": "Hi"}
    return "/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def _preflight(name: str, provider: ProviderSpec, models: list[tuple[str, bool]], source: str) -> None:
    if name == "nvidia" and provider.api_key_env and not os.environ.get(provider.api_key_env):
        raise RecipeError(
            "environment",
            provider.api_key_env,
            f"is not set; provider nvidia needs an API key in ${provider.api_key_env}",
        )
    if not provider.preflight or not models:
        return
    key_env = provider.api_key_env
    key = (os.environ.get(key_env) or None) if key_env else None  # set but empty is unset
    where, url = f"providers.{name}", provider.endpoint.rstrip("/")

    def fail(cause: str) -> RecipeError:
        return RecipeError(source, where, f"{without_userinfo(url)}: {redact(cause, key)}")

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(headers=headers, timeout=PREFLIGHT_TIMEOUT) as client:
        for model, embeds in models:
            path, body = _probe(model, embeds)
            try:
                answer = client.post(f"{url}{path}", json=body)
            except httpx.TimeoutException:
                raise fail(f"no answer within {PREFLIGHT_TIMEOUT.read:.0f} s (POST {path} of one word)") from None
            except httpx.HTTPError as e:
                raise fail(f"cannot reach it ({transport_cause(e)})") from None
            status, said = answer.status_code, provider_message(answer)
            if status in (401, 403):
                if key is None:
                    held = f"${key_env} is not set" if key_env else f"{where}.api_key_env names no key variable"
                else:
                    held = f"the key in ${key_env} was refused"
                raise fail(f"HTTP {status}: {held} ({said})")
            if status == 404:
                served = served_models(client, url)
                listed = f"; it serves: {', '.join(served)}" if served else ""
                raise fail(f"HTTP 404: model {model!r} is not served there ({said}){listed}")
            if status == 501:  # the endpoint does not do what the model is for (embeddings, say)
                raise fail(f"HTTP 501: POST {path} for model {model!r} is not implemented there ({said})")
            if status >= 400:
                shown = without_userinfo(url)
                log.warning("preflight %s, model %s: HTTP %d (%s); going on", shown, model, status, said)
    log.info("preflight: %s answers for %s", without_userinfo(url), ", ".join(model for model, _ in models))


def provider_message(answer: httpx.Response, limit: int = 200) -> str:
    """The provider's own words for an error: OpenAI's error.message, vLLM's message, FastAPI's detail, or text."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:limit] or answer.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        for said in (error.get("message") if isinstance(error, dict) else error, body.get("message"),
                     body.get("detail")):  # fmt: skip
            if isinstance(said, str) and said:
                return said[:limit]
    return str(body)[:limit]


def served_models(client: httpx.Client, url: str) -> list[str]:
    """The ids `GET /models` lists, if the endpoint says (a few at most: hosted catalogues are long)."""
    try:
        data = client.get(f"{url}/models").json().get("data", [])
        ids = sorted(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    return ids[:20] + ([f"… {len(ids) - 20} more"] if len(ids) > 20 else [])


def transport_cause(e: httpx.HTTPError) -> str:
    """Connection refused, name not resolved, TLS: the innermost error's own words."""
    inner: BaseException = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner) or str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def redact(text: str | None, key: str | None) -> str | None:
    """A provider may echo the key it refused; it is never printed."""
    return text.replace(key, "***") if text and key else text


def check_outside(recipe: Recipe, source: str) -> None:
    """What the job needs from outside, before anything is written: offline, the staged weights of its own vLLM
    servers; for each remote provider, the key and an endpoint that answers for its models (endpoints.preflight)."""
    for name, spec in recipe.servers.items():
        check_weights_staged(spec, f"{recipe.serve_key(name)}.model")
    preflight(recipe, source)
