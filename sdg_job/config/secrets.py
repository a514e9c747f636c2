"""Secrets: refused in a recipe (keys are referenced by env-var NAME), masked in everything the job writes."""

from __future__ import annotations

import os
from typing import Any

from sdg_job.errors import RecipeError

# Prefixes of real API keys: a value like this in a recipe is a pasted secret, not an env-var name.
SECRET_PREFIXES = ("nvapi-", "sk-", "hf_", "ghp_", "xoxb-")
SECRET_ENV_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _secret_env_values() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if any(h in k.upper() for h in SECRET_ENV_HINTS) and len(v) >= 8 and not k.startswith("SDG_")
    }


def _walk(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, f"{prefix}.{i}")
    else:
        yield prefix, data


def refuse_secret_values(data: dict, source: str) -> None:
    secrets = _secret_env_values()
    for key, value in _walk(data):
        if not isinstance(value, str):
            continue
        for name, secret in secrets.items():
            if secret in value:
                raise RecipeError(source, key, f"contains the value of ${name}; reference keys by env-var NAME")
        if key.endswith(("api_key", "api_key_env")) and value.startswith(SECRET_PREFIXES):
            raise RecipeError(source, key, "looks like a pasted API key; set api_key_env to an env-var NAME")


def mask_secrets(data: Any) -> Any:
    """Defence in depth for everything the job writes: replace any secret env value with ***."""
    secrets = [v for v in _secret_env_values().values()]
    if isinstance(data, dict):
        return {k: mask_secrets(v) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    if isinstance(data, str):
        for s in secrets:
            data = data.replace(s, "***")
    return data
