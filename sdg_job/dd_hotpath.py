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

They apply only to the Data Designer version they were measured and tested on. On any other version they are
skipped with a warning, so an upgrade never runs patched code nobody checked against it; skipping them costs
time, not results (but see 2). (What the job must observe of each request, which results do depend on, is
`sdg_job.observe`'s, which works on any version that has what it hooks into, or refuses to start.)
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import version
from typing import Any

log = logging.getLogger("sdg_job.dd_hotpath")

TESTED_VERSION = "0.9.7"  # the Data Designer version these fixes, and sdg_job.observe's hook, were tested on
# Per process, and only about speed: whether the fixes are in, and why tiktoken could not load (fix 5).
_applied: bool | None = None  # None: not tried yet
tokenizer_error: str | None = None


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
