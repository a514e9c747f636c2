"""Where a shard's requests go: each model alias's endpoint, the node's own server or the model's remote provider.

The key never leaves the environment: an endpoint carries the NAME of the variable that holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sdg_job.config import Recipe
from sdg_job.endpoints.pacing import shared_pace
from sdg_job.endpoints.sizing import worker_share
from sdg_job.serve import API_KEY_ENV


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


def remote_endpoints(recipe: Recipe, parallel: int, paced: bool = True) -> dict[str, Endpoint]:
    """An endpoint for each remote provider the models use; `paced` (a job on Ray, not a preview): one Pace actor for
    each with a request or token quota."""
    return {
        name: remote_endpoint(recipe, name, parallel, shared_pace(recipe, name) if paced else None)
        for name in recipe.remote_providers
    }


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
