"""Before any work starts: for each remote provider, a preflight that finds a wrong key, a model the endpoint does
not serve or an endpoint nobody answers at, and says which; and what the job's own servers need from outside.

The key never leaves the environment; a provider that echoes it has it redacted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx

from sdg_job.config import ProviderSpec, Recipe
from sdg_job.config.secrets import without_userinfo
from sdg_job.engines import engine_of
from sdg_job.errors import RecipeError

log = logging.getLogger("sdg_job.endpoints")  # the name the job's log (and its tests) have always used
# A 1-token completion answers in about a second at a hosted provider; a cold serverless model may take longer.
PREFLIGHT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


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
        engine_of(spec).check_before_start(f"{recipe.serve_key(name)}.model")
    preflight(recipe, source)
