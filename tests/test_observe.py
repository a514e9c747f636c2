"""Each shard observes its own requests (sdg_job.observe): cut answers, failed requests by cause, quota pacing. A real
ModelFacade with a stand-in client (no server), its requests made as Data Designer makes them: on its engine's event
loop and in its worker threads. And on a Data Designer the hook cannot work with, the job refuses to start."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from sdg_job import cli, dd_hotpath, observe
from sdg_job.errors import EngineMismatch


class StandIn:
    """The client a ModelFacade sends its requests to: answers `text`, cut at max_tokens if it ends with "…", or
    raises the ProviderError `fail` makes. Records the requests."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.requests = fail, []

    def _answer(self, request):
        from data_designer.engine.models.clients.errors import ProviderError, ProviderErrorKind
        from data_designer.engine.models.clients.types import (
            AssistantMessage,
            ChatCompletionChoice,
            ChatCompletionResponse,
            Usage,
        )

        self.requests.append(request)
        if self.fail:
            raise ProviderError(ProviderErrorKind(self.fail), "Too Many Requests", status_code=429)
        text = request.messages[-1]["content"][0]["text"]
        message = AssistantMessage(content=f" {text} ")
        choice = ChatCompletionChoice(message=message, finish_reason="length" if text.endswith("…") else "stop")
        return ChatCompletionResponse(message=message, usage=Usage(input_tokens=10, output_tokens=5, total_tokens=15),
                                      choices=[choice])  # fmt: skip

    def completion(self, request):
        return self._answer(request)

    async def acompletion(self, request):
        return self._answer(request)


def facade(provider: str = "sim", fail: str | None = None):
    import data_designer.config as dd
    from data_designer.engine.model_provider import ModelProviderRegistry
    from data_designer.engine.models.facade import ModelFacade

    config = dd.ModelConfig(alias="text", model="m", provider=provider, skip_health_check=True,
                            inference_parameters=dd.ChatCompletionInferenceParams(max_tokens=32))  # fmt: skip
    providers = ModelProviderRegistry(providers=[dd.ModelProvider(name=provider, endpoint="http://127.0.0.1:1/v1")])
    return ModelFacade(config, providers, client=StandIn(fail))


def ask(text: str):
    from data_designer.engine.models.utils import ChatMessage

    return [ChatMessage.as_user(text)]


@pytest.fixture(scope="module", autouse=True)
def hooked() -> None:
    observe.install()


def on_engine_loop(coro):
    """As Data Designer runs a create(): its scheduler on its persistent event loop thread."""
    from data_designer.engine.dataset_builders.utils.async_concurrency import ensure_async_engine_loop

    return asyncio.run_coroutine_threadsafe(coro, ensure_async_engine_loop()).result(timeout=30)


def test_this_data_designer_is_one_the_hook_works_with() -> None:
    assert observe.problems() == []
    observe.check()


def test_cut_answers_are_noted_by_the_shard_that_asked_on_the_engine_loop() -> None:
    model = facade()
    first, second = observe.RequestObserver(), observe.RequestObserver()

    async def both(texts: list[str]) -> None:
        await asyncio.gather(*(model.acompletion(ask(t)) for t in texts))

    with first.watching():
        on_engine_loop(both(["whole", "cut off…"]))
    with second.watching():
        on_engine_loop(both(["also cut…"]))
    assert first.cut_answers == {"cut off…"} and second.cut_answers == {"also cut…"}  # stripped, as stored
    assert first.errors == {} and second.errors == {}


def test_each_shard_in_its_own_thread_sees_only_its_own_requests() -> None:
    """Two shards at once in one process (threads), each with requests in Data Designer's worker threads."""
    from data_designer.engine.dataset_builders.utils.concurrency import ConcurrentThreadExecutor

    model = facade()
    observers = {name: observe.RequestObserver() for name in ("a", "b")}

    def shard(name: str) -> None:
        with observers[name].watching():
            with ConcurrentThreadExecutor(max_workers=4, column_name="text") as executor:
                for i in range(8):
                    executor.submit(model.completion, ask(f"{name}{i}…" if i % 2 else f"{name}{i}"))

    threads = [threading.Thread(target=shard, args=(name,)) for name in observers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert observers["a"].cut_answers == {"a1…", "a3…", "a5…", "a7…"}
    assert observers["b"].cut_answers == {"b1…", "b3…", "b5…", "b7…"}


def test_a_failed_request_is_counted_by_cause_with_the_providers_words() -> None:
    from data_designer.engine.models.clients.errors import ProviderError

    observer = observe.RequestObserver()
    model = facade("openai", fail="rate_limit")
    with observer.watching():
        for _ in range(2):
            with pytest.raises(ProviderError):
                model.completion(ask("hello"))
        with pytest.raises(ProviderError):
            on_engine_loop(model.acompletion(ask("hello")))
    assert observer.errors == {"rate_limited": 3}
    assert observer.said == {"rate_limited": "HTTP 429: Too Many Requests"}
    assert observer.provider == {"rate_limited": "openai"}


class Pace:
    """The job's pacer (endpoints.Pace, a Ray actor) as the async hook calls it: awaitable turns, settled tokens."""

    def __init__(self) -> None:
        self.reserved: list[int] = []
        self.settled: list[int] = []
        self.reserve = type("Remote", (), {"remote": self._reserve})()
        self.settle = type("Remote", (), {"remote": self.settled.append})()

    async def _reserve(self, tokens: int) -> float:
        self.reserved.append(tokens)
        return 0.0


def test_a_provider_with_a_token_quota_is_paced_and_settled_with_the_usage() -> None:
    pace, other = Pace(), Pace()
    observer = observe.RequestObserver({"openai": (pace, True), "elsewhere": (other, True)})
    with observer.watching():
        on_engine_loop(facade("openai").acompletion(ask("x" * 40)))
    (asked,) = pace.reserved
    assert asked == 32 + len(json.dumps(ask("x" * 40)[0].to_dict())) // 4  # max_tokens + the prompt (~4 chars a token)
    assert pace.settled == [15 - asked] and other.reserved == []  # the usage reported; another provider's untouched


def test_requests_outside_a_shard_are_not_observed_and_say_so() -> None:
    with pytest.warns(UserWarning, match="outside RequestObserver.watching"):
        facade().completion(ask("cut…"))


def test_observers_are_made_from_a_shards_routes() -> None:
    from sdg_job.endpoints import Endpoint, Routes

    paced = Endpoint(url="http://a/v1", api_key_env=None, pace="actor", paces_tokens=True, provider="openai")
    free = Endpoint(url="http://b/v1", api_key_env=None, provider="nvidia")
    observer = observe.RequestObserver.for_routes(Routes(own={}, by_alias={"a": paced, "b": free}))
    assert observer.paces == {"openai": ("actor", True)}


@pytest.fixture
def another_version(monkeypatch) -> str:
    monkeypatch.setattr(observe, "version", lambda name: "0.10.0")
    monkeypatch.setattr(dd_hotpath, "version", lambda name: "0.10.0")
    monkeypatch.setattr(dd_hotpath, "_applied", None)
    return "0.10.0"


def test_another_version_with_what_the_hook_needs_runs_without_the_speed_fixes(another_version, caplog) -> None:
    observe.check()  # the hook works: no refusal
    assert dd_hotpath.apply() is False
    assert "Data Designer 0.10.0: hot-path fixes skipped (tested on 0.9.7)" in caplog.text


def test_another_version_without_it_refuses_to_start_with_exit_2(another_version, monkeypatch, capsys,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from data_designer.engine.models.facade import ModelFacade

    monkeypatch.setattr(ModelFacade, "agenerate", lambda self, *a, **k: None)  # requests would bypass acompletion
    with pytest.raises(EngineMismatch, match="ModelFacade.agenerate does not call self.acompletion"):
        observe.check()
    monkeypatch.setenv("SDG_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "offline_environment", lambda home: None)  # this test process's environment stays
    assert cli.main(["run", "recipe=tiny"]) == 2
    error = capsys.readouterr().err
    assert "error: Data Designer 0.10.0 is installed; sdg-job was tested on 0.9.7" in error, error
    assert "Install data-designer==0.9.7" in error
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started
