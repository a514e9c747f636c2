"""What the job learns from each of Data Designer's model requests, and the pace it keeps to a provider's quota.

Data Designer 0.9.7 keeps neither of two things the job needs:
- which answers were cut at `max_tokens` (`finish_reason: length`). A text cell is only the answer's text, so a cut
  answer looks complete; `generate` flags the rows that carry one (they are dropped as `truncated`).
- why requests failed. It drops a row whose request failed and says only that rows failed; the job counts each
  failed request by cause (Data Designer's own classification of the provider's answer: auth, not_found,
  connection, rate_limited, …), with the provider's words and the provider's name for each.
And it acts on a quota only after a 429 (adaptive concurrency, Retry-After), so requests to a provider with a quota
(`providers.<name>.max_requests_per_minute`, `max_tokens_per_minute`) first wait for a turn of the job's pacer.

A `RequestObserver` holds all of it for one shard: `generate` makes one per call and runs Data Designer inside
`observer.watching()`. The hook itself wraps `ModelFacade.completion` and `acompletion` once per process (the
facades are Data Designer's, built inside `create()`), and finds the shard's observer through a ContextVar: Data
Designer's worker threads and its event loop's tasks copy the caller's context, as its own per-run ContextVars
need. Nothing about a shard is kept in this module.

`install` checks first that Data Designer still has what the hook relies on, on any version: if not, the job
refuses to start (`EngineMismatch`, exit 2), rather than running without truncation drops, error causes or pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from importlib.metadata import version
from typing import Any

from sdg_job.dd_hotpath import TESTED_VERSION
from sdg_job.endpoints import CAUSES, OTHER_KINDS, Routes, request_cause
from sdg_job.errors import EngineMismatch

_current: ContextVar[RequestObserver | None] = ContextVar("sdg_request_observer", default=None)


class RequestObserver:
    """One shard's requests: answers cut at max_tokens, failed requests by cause, and the pacers of providers with a
    quota (provider name → the job's endpoints.Pace actor, whether it counts tokens). Requests run in several
    threads, so noting takes a lock."""

    def __init__(self, paces: dict[str, tuple[Any, bool]] | None = None) -> None:
        self.paces = dict(paces or {})
        self.cut_answers: set[str] = set()  # stripped texts, as Data Designer stores the cell
        self.errors: Counter[str] = Counter()  # failed requests by cause
        self.said: dict[str, str] = {}  # the provider's words, the first for each cause
        self.provider: dict[str, str] = {}  # which provider (Data Designer's provider name) failed so, the first
        self._lock = threading.Lock()

    @classmethod
    def for_routes(cls, routes: Routes) -> RequestObserver:
        return cls({e.provider: (e.pace, e.paces_tokens) for e in routes.endpoints if e.pace is not None})

    @contextlib.contextmanager
    def watching(self) -> Iterator[RequestObserver]:
        """Requests made in this context (and the threads and tasks Data Designer starts from it) are observed."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def note_cut(self, text: str | None) -> None:
        with self._lock:
            self.cut_answers.add((text or "").strip())

    def note_error(self, provider: str, kind: str, status_code: int | None, message: str) -> None:
        cause = request_cause(kind)
        with self._lock:
            self.errors[cause] += 1
            self.said.setdefault(cause, f"HTTP {status_code}: {message}" if status_code else message)
            self.provider.setdefault(cause, provider)


def check() -> None:
    """Raises EngineMismatch (exit 2) naming the installed and tested versions if the hook cannot work here."""
    if found := problems():
        installed = version("data-designer-engine")
        raise EngineMismatch(
            f"Data Designer {installed} is installed; sdg-job was tested on {TESTED_VERSION} and cannot observe its "
            f"requests (answers cut at max_tokens, causes of failed requests, quota pacing): {'; '.join(found)}. "
            f"Install data-designer=={TESTED_VERSION}."
        )


def problems() -> list[str]:
    """What the hook relies on in Data Designer and this one lacks (empty: it works). Checked on every version."""
    try:
        from data_designer.config import ChatCompletionInferenceParams
        from data_designer.engine.models import utils
        from data_designer.engine.models.clients.errors import ProviderError, ProviderErrorKind
        from data_designer.engine.models.clients.types import AssistantMessage, ChatCompletionResponse, Usage
        from data_designer.engine.models.facade import ModelFacade
    except ImportError as e:
        return [f"no {e.name or e}"]
    found = []
    for name, is_async, caller in (("completion", False, "generate"), ("acompletion", True, "agenerate")):
        method = getattr(ModelFacade, name, None)
        if inspect.iscoroutinefunction(method) != is_async or _params(method)[:2] != ["self", "messages"]:
            found.append(f"no {'async ' * is_async}ModelFacade.{name}(self, messages, …)")
        if f"self.{name}(" not in _source(getattr(ModelFacade, caller, None)):  # else requests would bypass the hook
            found.append(f"ModelFacade.{caller} does not call self.{name}")
    if not isinstance(getattr(ModelFacade, "model_provider_name", None), property):
        found.append("no ModelFacade.model_provider_name")
    if "self._model_config = model_config" not in _source(ModelFacade.__init__):
        found.append("no ModelFacade._model_config")  # its max_tokens counts against a token quota
    if "max_tokens" not in ChatCompletionInferenceParams.model_fields:
        found.append("no ChatCompletionInferenceParams.max_tokens")
    if not {"kind", "message", "status_code"} <= set(_params(ProviderError.__init__)):
        found.append("no ProviderError(kind, message, status_code)")
    if unknown := sorted({k.value for k in ProviderErrorKind} - set(CAUSES) - OTHER_KINDS):
        found.append(f"unknown causes of failed requests {unknown}")
    if not hasattr(utils, "classify_generation_truncation_reason") or not hasattr(
        getattr(utils, "GenerationTruncationReason", None), "MAX_TOKENS"
    ):
        found.append("no classify_generation_truncation_reason, GenerationTruncationReason.MAX_TOKENS")
    for cls, fields in ((ChatCompletionResponse, {"message", "usage"}), (AssistantMessage, {"content"}),
                        (Usage, {"input_tokens", "output_tokens", "total_tokens"})):  # fmt: skip
        if not dataclasses.is_dataclass(cls) or not fields <= {f.name for f in dataclasses.fields(cls)}:
            found.append(f"no {cls.__name__}.{', '.join(sorted(fields))}")
    return found


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def install() -> None:
    """Wraps ModelFacade.completion and acompletion, once per process, after `check` (so it raises EngineMismatch
    rather than install a hook that would miss requests)."""
    from data_designer.engine.models.facade import ModelFacade

    if getattr(ModelFacade.completion, "_sdg_observed", False):
        return
    check()
    completion, acompletion = _observed(ModelFacade.completion, ModelFacade.acompletion)
    ModelFacade.completion = completion  # type: ignore[method-assign]
    ModelFacade.acompletion = acompletion  # type: ignore[method-assign]


def _observer() -> RequestObserver | None:
    observer = _current.get()
    if observer is None:  # Data Designer used outside a shard's generate() (or a context that was not copied)
        warnings.warn("a Data Designer request outside RequestObserver.watching(): not observed", stacklevel=3)
    return observer


def _observed(completion: Any, acompletion: Any) -> tuple[Any, Any]:
    """The two wrappers: wait for the pace, call, note a cut answer or a failed request, settle the tokens used."""
    import ray
    from data_designer.engine.models.clients.errors import ProviderError
    from data_designer.engine.models.utils import GenerationTruncationReason, classify_generation_truncation_reason

    def noted(observer: RequestObserver, response: Any) -> Any:
        if classify_generation_truncation_reason(response) == GenerationTruncationReason.MAX_TOKENS:
            observer.note_cut(response.message.content)
        return response

    def note_error(observer: RequestObserver, facade: Any, e: ProviderError) -> None:
        observer.note_error(facade.model_provider_name, getattr(e.kind, "value", str(e.kind)), e.status_code,
                            e.message)  # fmt: skip

    @functools.wraps(completion)  # its signature stays visible: `problems` reads it after install too
    def observed_completion(self, *args, **kwargs):
        if (observer := _observer()) is None:
            return completion(self, *args, **kwargs)
        pace, counts_tokens = observer.paces.get(self.model_provider_name, (None, False))
        asked = _tokens_asked(self, args, kwargs) if counts_tokens else 0
        if pace is not None and (wait := ray.get(pace.reserve.remote(asked))) > 0:
            time.sleep(wait)
        response = None
        try:
            response = noted(observer, completion(self, *args, **kwargs))
            return response
        except ProviderError as e:
            note_error(observer, self, e)
            raise
        finally:
            if counts_tokens:
                _settle(pace, asked, response)

    @functools.wraps(acompletion)
    async def observed_acompletion(self, *args, **kwargs):
        if (observer := _observer()) is None:
            return await acompletion(self, *args, **kwargs)
        pace, counts_tokens = observer.paces.get(self.model_provider_name, (None, False))
        asked = _tokens_asked(self, args, kwargs) if counts_tokens else 0
        if pace is not None and (wait := await pace.reserve.remote(asked)) > 0:
            await asyncio.sleep(wait)
        response = None
        try:
            response = noted(observer, await acompletion(self, *args, **kwargs))
            return response
        except ProviderError as e:
            note_error(observer, self, e)
            raise
        finally:
            if counts_tokens:
                _settle(pace, asked, response)

    observed_completion._sdg_observed = True  # type: ignore[attr-defined]
    return observed_completion, observed_acompletion


def _tokens_asked(facade: Any, args: tuple, kwargs: dict) -> int:
    """What a provider counts against a token quota before it answers: the prompt (~4 characters a token) and the
    answer's max_tokens."""
    messages = args[0] if args else kwargs.get("messages") or []
    chars = sum(len(json.dumps(m.to_dict() if hasattr(m, "to_dict") else m, default=str)) for m in messages)
    max_tokens = kwargs.get("max_tokens") or facade._model_config.inference_parameters.max_tokens or 0
    return chars // 4 + int(max_tokens)


def _settle(pace: Any, asked: int, response: Any) -> None:
    """Tells the pacer what the request really took (fire and forget: the next reservation sees it). Without a
    reported usage the estimate stands; a failed request took nothing (a 429 is not counted against the quota).
    Never raises: a pacer gone at shutdown must not replace the answer or the request's own error."""
    usage = getattr(response, "usage", None)
    used = (usage.total_tokens or (usage.input_tokens or 0) + (usage.output_tokens or 0)) if usage else 0
    if response is not None and not used:
        return
    with contextlib.suppress(Exception):
        pace.settle.remote(used - asked)
