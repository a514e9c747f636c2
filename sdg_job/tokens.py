"""How many tokens each record is for a trainer: the record rendered with the served model's chat template and
tokenized by the serving engine itself (llama.cpp's /apply-template + /tokenize, vLLM's /tokenize with messages),
while the shard's server is up. The card reports their spread so a user sets `max_length` knowing what is cut.

Counted only where the job serves the model (a remote provider exposes no tokenizer).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx

from sdg_job.config import Projection, ServeSpec
from sdg_job.endpoints import Endpoint
from sdg_job.engines import engine_of
from sdg_job.errors import ServerUnavailable
from sdg_job.project import wire_form

log = logging.getLogger("sdg_job.tokens")


def tokenizer_name(serve: ServeSpec | None) -> str | None:
    """What counts the tokens, as the card names it; None where nothing does."""
    if serve is None or not engine_of(serve).counts_tokens:
        return None
    return f"{serve.served_model_name} ({serve.engine}), with its chat template"


def conversations(projection: Projection, record: dict) -> list[tuple[Any, list | None]]:
    """What a trainer tokenizes for one record: (messages or plain text, tools). DPO: prompt + each answer. Tool
    calls go to the server in the OpenAI wire form it parses (arguments as a JSON string)."""
    if projection.type == "dpo_preference":
        return [(record["prompt"] + record[answer], None) for answer in ("chosen", "rejected")]
    return [(wire_form(record["messages"]), record.get("tools"))]


def record_tokens(
    serve: ServeSpec | None, endpoint: Endpoint, projection: Projection, records: list[dict]
) -> list[int] | None:
    """Each record's token count (the longer of a DPO pair's two), or None if this server cannot say. Raises
    ServerUnavailable if the server stopped answering."""
    if tokenizer_name(serve) is None:
        return None
    if not records:  # a shard whose records were all dropped counts too: none missing, so the output's are known
        return []
    assert serve is not None
    base = endpoint.url.removesuffix("/v1")
    key = os.environ.get(endpoint.api_key_env or "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            engine = engine_of(serve)
            return [max(engine.count_tokens(client, content, tools) for content, tools in conversations(projection, r))
                    for r in records]  # fmt: skip
    except httpx.TransportError as e:  # the server went away: the shard is retried, as when it dies mid-shard
        raise ServerUnavailable(f"{base} stopped answering while counting tokens: {e}") from None
    except (httpx.HTTPStatusError, KeyError, ValueError) as e:  # it cannot render or count these: no counts
        log.warning("could not count tokens at %s: %s", base, e)
        return None
