"""Five fixes to Data Designer's per-request hot path, applied in every process that generates shards.

py-spy on Data Designer 0.9.7 alone (one core, default recipe shape, against the simulator) put its client cost at
about 5 ms of CPU per record with 64 requests in flight and 7-8 ms with 256; with these fixes it is about 3 ms at
both (`python -m sdg_job.bench` measures it side by side). Each fix is small enough to send upstream and keeps
results the same (except that a pathologically nested Markdown answer no longer fails its row, see 2):

1. Jinja: `safe_render` compiles the prompt template again for every cell (`from_string` has no cache), about a
   fifth of the cost. The compiled template is memoised per environment (one environment per column).
2. Text columns: the answer goes through Markdown → HTML → XML parsing, and then the raw answer is returned
   unchanged (`TextResponseRecipe` hands back `.response`). It is now returned directly. (The parse could only
   fail the row: a RecursionError on thousands of nested `>` quotes.)
3. httpx builds a new SSL context (reading the whole CA bundle) for each pool shard of every model client, in
   every `create()`, even for http:// endpoints. A context is shareable, so one is built per setting.
4. Connection pools: httpcore checks every connection of a pool on each request, and Data Designer splits its
   pool into at most 16 shards, so at 256 in flight each request checked ~32 connections (a fifth of the cost).
   Beyond 64 in flight there are more shards instead (up to 64), each as small as at 64.
5. Token counting (reasoning tokens of each response, the profile after each create()) loads tiktoken's
   cl100k_base, downloading it on first use. Offline, as GPU nodes often are, every call tried the download
   again (an lru_cache keeps no failures), each a network round trip, or a connect timeout where a firewall
   drops packets. One attempt per process; after a failure counting is skipped, which Data Designer handles.

Beside them, one observation the job needs and Data Designer 0.9.7 does not keep: which answers were cut at
`max_tokens` (`finish_reason: length`). A text cell is only the answer's text, so a cut answer looks complete;
`cut_answers` collects their texts, and `generate` flags the rows that carry one (they are dropped as `truncated`).
And a second: why requests failed. Data Designer drops a row whose request failed and says only that rows failed;
`request_errors` counts each failed request by cause (Data Designer's own classification of the provider's answer:
auth, not_found, connection, rate_limited, …), with the provider's words for each in `request_error_said` and its
name in `request_error_provider`. The same wrapper (one around each request) paces requests to a provider with a
quota (`paces`: a turn of `providers.<name>.max_requests_per_minute`, and with `max_tokens_per_minute` as many
tokens as the prompt and max_tokens may take, settled with the usage the answer reports); Data Designer's adaptive
concurrency and its handling of Retry-After act only after a 429.

They apply only to the Data Designer version they were measured and tested on. On any other version they are
skipped with a warning, so an upgrade never runs patched code nobody checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from importlib.metadata import version
from typing import Any

log = logging.getLogger("sdg_job.dd_hotpath")

TESTED_VERSION = "0.9.7"
_applied: bool | None = None  # None: not tried yet
tokenizer_error: str | None = None  # why cl100k_base could not be loaded in this process
cut_answers: set[str] = set()  # stripped texts of answers cut at max_tokens in this process (generate clears it)
request_errors: Counter[str] = Counter()  # failed requests in this process by cause (generate clears it)
request_error_said: dict[str, str] = {}  # the provider's message, one per cause
request_error_provider: dict[str, str] = {}  # which provider (Data Designer's provider name) failed so, one per cause
# provider name → (the job's endpoints.Pace actor, whether it counts tokens), for providers with a quota
paces: dict[str, tuple[Any, bool]] = {}


def apply() -> bool:
    """Install the fixes once per process. Returns whether they are active."""
    global _applied
    if _applied is None:
        found = version("data-designer-engine")
        _applied = found == TESTED_VERSION
        if _applied:
            _cache_compiled_templates()
            _pass_text_answers_through()
            _share_ssl_contexts()
            _smaller_connection_pools()
            _one_tokenizer_download_attempt()
            _observe_requests()
        else:
            log.warning("Data Designer %s: hot-path fixes skipped (tested on %s)", found, TESTED_VERSION)
    return _applied


def _cache_compiled_templates() -> None:
    from data_designer.engine.processing.ginja import environment as ginja

    for cls in (ginja.UserTemplateSandboxEnvironment, ginja.NativeJinjaSandboxEnvironment):
        compile_template = cls.from_string

        def from_string(self, source, globals=None, template_class=None, _compile=compile_template):  # noqa: A002
            # Same arguments as jinja2.Environment.from_string; only the plain (source-only) call is cached.
            if globals is not None or template_class is not None or not isinstance(source, str):
                return _compile(self, source, globals, template_class)
            compiled: dict[str, Any] = self.__dict__.setdefault("_sdg_compiled_templates", {})
            if source not in compiled:
                compiled[source] = _compile(self, source)
            return compiled[source]

        cls.from_string = from_string


def _pass_text_answers_through() -> None:
    from data_designer.engine.models.recipes.response_recipes import TextResponseRecipe

    TextResponseRecipe._build_parser_fn = lambda self: str  # type: ignore[method-assign,assignment]


def _share_ssl_contexts() -> None:
    import httpx._transports.default as transports

    build = transports.create_ssl_context
    built: dict[tuple, Any] = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True, **other):
        if not isinstance(verify, bool) or cert is not None or other:  # a custom CA, client cert, ...: not shared
            return build(verify=verify, cert=cert, trust_env=trust_env, **other)
        # trust_env makes httpx read these two variables, so they are part of the setting.
        key = (verify, trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    transports.create_ssl_context = create_ssl_context  # type: ignore[assignment]


def _smaller_connection_pools() -> None:
    from data_designer.engine.models.clients.adapters.http_model_client import HttpModelClient

    init = HttpModelClient.__init__

    def __init__(self, **kwargs):  # its arguments are keyword-only
        init(self, **kwargs)
        # Data Designer's own sizing up to 64 in flight (16 shards, ~4 requests each, room for 8); beyond it,
        # more shards rather than bigger ones, so each keeps ~4 in flight and 8 connections at most.
        self._shard_count = max(self._shard_count, min(64, kwargs.get("max_parallel_requests", 32) // 4))

    HttpModelClient.__init__ = __init__  # type: ignore[method-assign]


def _one_tokenizer_download_attempt() -> None:
    from data_designer.engine.utils import token_counting

    load = token_counting.get_cl100k_base_tokenizer

    def get_cl100k_base_tokenizer():
        global tokenizer_error
        if tokenizer_error is None:
            try:
                return load()
            except Exception as e:  # noqa: BLE001  (whatever tiktoken or requests raised)
                tokenizer_error = f"{type(e).__name__}: {e}"
        raise RuntimeError(f"tiktoken cl100k_base unavailable in this process ({tokenizer_error})")

    get_cl100k_base_tokenizer.__wrapped__ = load  # type: ignore[attr-defined]
    token_counting.get_cl100k_base_tokenizer = get_cl100k_base_tokenizer


def _observe_requests() -> None:
    """One wrapper around each model request: wait for the pace, call, note a cut answer or a failed request."""
    import ray
    from data_designer.engine.models.clients.errors import ProviderError
    from data_designer.engine.models.facade import ModelFacade
    from data_designer.engine.models.utils import GenerationTruncationReason, classify_generation_truncation_reason

    from sdg_job.endpoints import request_cause

    def note_cut(response: Any) -> Any:
        if classify_generation_truncation_reason(response) == GenerationTruncationReason.MAX_TOKENS:
            cut_answers.add((response.message.content or "").strip())  # as Data Designer stores the cell
        return response

    def note_error(facade: ModelFacade, e: ProviderError) -> None:
        cause = request_cause(getattr(e.kind, "value", str(e.kind)))
        request_errors[cause] += 1
        request_error_said.setdefault(cause, f"HTTP {e.status_code}: {e.message}" if e.status_code else e.message)
        request_error_provider.setdefault(cause, facade.model_provider_name)

    completion, acompletion = ModelFacade.completion, ModelFacade.acompletion

    def tokens_asked(facade: ModelFacade, args: tuple, kwargs: dict) -> int:
        """What a provider counts against a token quota before it answers: the prompt (~4 characters a token) and
        the answer's max_tokens."""
        messages = args[0] if args else kwargs.get("messages") or []
        chars = sum(len(json.dumps(m.to_dict() if hasattr(m, "to_dict") else m, default=str)) for m in messages)
        max_tokens = kwargs.get("max_tokens") or facade._model_config.inference_parameters.max_tokens or 0
        return chars // 4 + int(max_tokens)

    def settle(pace: Any, asked: int, response: Any) -> None:
        """Tells the pacer what the request really took (fire and forget: the next reservation sees it). Without a
        reported usage the estimate stands; a failed request took nothing (a 429 is not counted against the quota).
        Never raises: a pacer gone at shutdown must not replace the answer or the request's own error."""
        usage = getattr(response, "usage", None)
        used = (usage.total_tokens or (usage.input_tokens or 0) + (usage.output_tokens or 0)) if usage else 0
        if response is not None and not used:
            return
        with contextlib.suppress(Exception):
            pace.settle.remote(used - asked)

    def observed_completion(self, *args, **kwargs):
        pace, counts_tokens = paces.get(self.model_provider_name, (None, False))
        asked = tokens_asked(self, args, kwargs) if counts_tokens else 0
        if pace is not None and (wait := ray.get(pace.reserve.remote(asked))) > 0:
            time.sleep(wait)
        response = None
        try:
            response = note_cut(completion(self, *args, **kwargs))
            return response
        except ProviderError as e:
            note_error(self, e)
            raise
        finally:
            if counts_tokens:
                settle(pace, asked, response)

    async def observed_acompletion(self, *args, **kwargs):
        pace, counts_tokens = paces.get(self.model_provider_name, (None, False))
        asked = tokens_asked(self, args, kwargs) if counts_tokens else 0
        if pace is not None and (wait := await pace.reserve.remote(asked)) > 0:
            await asyncio.sleep(wait)
        response = None
        try:
            response = note_cut(await acompletion(self, *args, **kwargs))
            return response
        except ProviderError as e:
            note_error(self, e)
            raise
        finally:
            if counts_tokens:
                settle(pace, asked, response)

    ModelFacade.completion = observed_completion  # type: ignore[method-assign]
    ModelFacade.acompletion = observed_acompletion  # type: ignore[method-assign]
