"""Secrets: refused in a recipe in every shape they come in (keys are referenced by env-var NAME), masked in
everything the job writes or prints, and URLs shown without their user-info."""

from __future__ import annotations

import os
import re
from typing import Any

# Prefixes of real API keys: a value like this in a recipe is a pasted secret, not an env-var name.
SECRET_PREFIXES = ("nvapi-", "sk-", "hf_", "ghp_", "xoxb-")
SECRET_ENV_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# A pasted key anywhere in a value (a prompt may say "sk-learn": a key is long and unbroken).
PASTED_KEY = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, SECRET_PREFIXES)) + r")[A-Za-z0-9_\-]{16,}")
BEARER = re.compile(r"\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}")
# scheme://user[:password]@host: credentials in a URL travel wherever the URL is printed.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]*)@")
# Words that make a key (or a command-line flag) hold a credential: its value must come from the environment.
CREDENTIAL_WORDS = frozenset({"apikey", "secret", "password", "passwd", "authorization", "credential", "credentials",
                              "cookie", "bearer"})  # fmt: skip
KEY_KINDS = frozenset({"api", "access", "private", "auth", "client", "secret", "signing", "service"})  # not sort_key
NOT_A_CREDENTIAL = frozenset({"stop", "eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end",
                              "max", "min", "num", "count"})  # eos_token, max_tokens: tokens of a model  # fmt: skip


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


def _words(name: str) -> set[str]:
    """`HF_TOKEN`, `x-api-key`, `apiKey`, `--hf-token` → their lower-case words."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return {w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w}


def names_a_secret(name: str) -> bool:
    """Whether a key or flag names a credential (`api_key`, `Authorization`, `--hf-token`); `api_key_env` names
    the variable that holds one, and `max_tokens`, `eos_token`, `tokenizer` or `messages_key` are no credential."""
    words = _words(name)
    if "env" in words:
        return False
    if words & {"token", "auth"}:
        return not words & NOT_A_CREDENTIAL
    return bool(words & CREDENTIAL_WORDS) or ("key" in words and (words == {"key"} or bool(words & KEY_KINDS)))


def secret_problems(data: dict) -> list[tuple[str, str]]:
    """(key, why) for each value of a recipe that holds a secret, in any shape: an environment variable's secret
    value inlined, a pasted key, a Bearer header, credentials in a URL, a credential under a key of its own
    (`extra_body.api_key`, `serve.env.HF_TOKEN`) or after a flag (`extra_args: [--api-key, …]`). The value itself
    is never in the message."""
    secrets = _secret_env_values()
    found: list[tuple[str, str]] = []
    for key, value in _walk(data):
        if not isinstance(value, str) or not value:
            continue
        leaf = key.rpartition(".")[2]
        named = next((name for name, secret in secrets.items() if secret in value), None)
        if named:
            found.append((key, f"contains the value of ${named}; reference keys by env-var NAME"))
        elif PASTED_KEY.search(value) or (leaf.startswith("api_key") and value.startswith(SECRET_PREFIXES)):
            found.append((key, "looks like a pasted API key; set api_key_env to an env-var NAME"))
        elif BEARER.search(value):
            found.append((key, "holds a Bearer/Basic credential; set api_key_env to an env-var NAME"))
        elif any(m.group("userinfo") for m in URL_USERINFO.finditer(value)):
            found.append((key, "has credentials in the URL (user@ or user:password@); remove them and put the key in "
                               "an environment variable named by api_key_env"))  # fmt: skip
        elif names_a_secret(leaf) and not ENV_NAME.fullmatch(value):  # a NAME, as the step's `api_key` holds
            found.append((key, "holds a credential; pass it by environment variable (serve.env and extra_body are "
                               "written to the manifest)"))  # fmt: skip
    found += _flag_secrets(data)
    return found


def _flag_secrets(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """`[--api-key, VALUE]` or `[--hf-token=VALUE]` in a list of command-line arguments."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += _flag_secrets(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, arg in enumerate(data):
            if isinstance(arg, dict | list):
                found += _flag_secrets(arg, f"{prefix}.{i}")
            elif isinstance(arg, str) and arg.startswith("-") and names_a_secret(arg.partition("=")[0]):
                has_value = "=" in arg or (i + 1 < len(data) and not str(data[i + 1]).startswith("-"))
                if has_value:
                    found.append((f"{prefix}.{i}", f"{arg.partition('=')[0]} passes a credential on the command "
                                                   "line; the job gives its servers their keys itself"))  # fmt: skip
    return found


def without_userinfo(text: str) -> str:
    """URLs in `text` without their user-info: `http://user:pw@host/v1` → `http://host/v1`."""
    return URL_USERINFO.sub(lambda m: m.group("scheme"), text)


def mask_secrets(data: Any) -> Any:
    """Defence in depth for everything the job writes: replace any secret env value with ***, drop URLs' user-info."""
    secrets = [v for v in _secret_env_values().values()]
    if isinstance(data, dict):
        return {k: mask_secrets(v) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    if isinstance(data, str):
        for s in secrets:
            data = data.replace(s, "***")
        data = without_userinfo(data)
    return data
