"""The hot-path fixes to Data Designer change its cost, never its results."""

from __future__ import annotations

import ssl

import httpx
import pytest

from sdg_job import dd_hotpath


@pytest.fixture(scope="module", autouse=True)
def fixes_applied() -> None:
    # Fails on purpose when the pinned Data Designer changes: the fixes must be re-checked against it.
    assert dd_hotpath.apply(), "hot-path fixes were skipped: is data-designer still pinned to the tested version?"


def test_templates_compile_once_and_render_each_record() -> None:
    from data_designer.engine.processing.ginja.environment import UserTemplateSandboxEnvironment
    from data_designer.engine.processing.ginja.exceptions import EmptyTemplateRenderError

    env = UserTemplateSandboxEnvironment(allowed_references=["topic", "tone"])
    template = "Write about {{ topic }} in a {{ tone }} tone."
    first = env.render_template(template, {"topic": "tides", "tone": "calm"}, skip_template_validation=True)
    second = env.render_template(template, {"topic": "bees", "tone": "dry"}, skip_template_validation=True)
    assert (first, second) == ("Write about tides in a calm tone.", "Write about bees in a dry tone.")
    assert env.from_string(template) is env.from_string(template)  # compiled once
    assert env.from_string("{{ topic }}!") is not env.from_string(template)
    # Other environments (another column, other allowed references) keep their own templates.
    assert UserTemplateSandboxEnvironment(allowed_references=["topic"]).from_string(template) is not env.from_string(
        template
    )
    with pytest.raises(EmptyTemplateRenderError):  # a missing field is still the row-level error it was
        env.render_template("{{ topic }}", {"topic": ""}, skip_template_validation=True)


@pytest.mark.parametrize(
    "answer",
    ["", "plain text", "hello **world**", "<think>hmm</think> answer", "```python\nprint(1)\n```\nafter",
     "a\n\n- b\n- c", "<<<>>> & <b unclosed", "  padded  \n"],
)  # fmt: skip
def test_text_answers_come_back_exactly_as_the_original_parser_returned_them(answer: str) -> None:
    from data_designer.engine.models.parsers.parser import LLMResponseParser
    from data_designer.engine.models.parsers.postprocessors import merge_text_blocks
    from data_designer.engine.models.recipes.response_recipes import TextResponseRecipe

    original = LLMResponseParser(postprocessors=[merge_text_blocks]).parse(answer).response
    assert TextResponseRecipe().parse(answer) == original == answer
    assert TextResponseRecipe()._parse_fn is str  # and no Markdown parse on the way


def test_transports_share_one_verifying_ssl_context(tmp_path) -> None:
    a, b = httpx.AsyncHTTPTransport(), httpx.AsyncHTTPTransport()
    context = a._pool._ssl_context
    assert context is b._pool._ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert httpx.AsyncHTTPTransport(verify=False)._pool._ssl_context.verify_mode == ssl.CERT_NONE
    custom = httpx.AsyncHTTPTransport(verify=ssl.create_default_context())  # a caller's own context is kept
    assert custom._pool._ssl_context is not context


@pytest.mark.parametrize(("in_flight", "shards"), [(4, 4), (64, 16), (128, 32), (256, 64)])
def test_connection_pools_stay_small_at_any_concurrency(in_flight: int, shards: int) -> None:
    from data_designer.engine.models.clients.adapters.http_model_client import ClientConcurrencyMode
    from data_designer.engine.models.clients.adapters.openai_compatible import OpenAICompatibleClient

    mode = ClientConcurrencyMode.ASYNC
    client = OpenAICompatibleClient(provider_name="sdg", endpoint="http://127.0.0.1:1", max_parallel_requests=in_flight,
                                    concurrency_mode=mode)  # fmt: skip
    client._get_async_client()
    pools = client._transport._async_transport.shard_limits  # the retry transport wraps the sharded one
    assert len(pools) == shards
    assert max(p.max_connections for p in pools) <= 8  # each request scans one small pool
    assert sum(p.max_connections for p in pools) >= 2 * in_flight  # room for twice the requests, as before


def test_an_offline_tokenizer_download_is_tried_once_per_process(monkeypatch, tmp_path) -> None:
    """The download itself is replaced by one that fails as it does offline (this test must not need a network)."""
    import tiktoken.load
    import tiktoken.registry
    from data_designer.engine.models.clients.parsing import fill_reasoning_token_count_from_content
    from data_designer.engine.models.clients.types import Usage
    from data_designer.engine.utils import token_counting
    from data_designer.engine.utils.token_counting import count_text_tokens

    attempts = []

    def offline(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # as if never loaded in this process
    token_counting.get_cl100k_base_tokenizer.__wrapped__.cache_clear()
    monkeypatch.setattr(dd_hotpath, "tokenizer_error", None)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="cl100k_base unavailable.*ConnectionError"):
            count_text_tokens("some answer")
    usage = Usage(input_tokens=5, output_tokens=7)
    assert fill_reasoning_token_count_from_content(usage, "thinking…") == usage  # per response: skipped, no error
    assert len(attempts) == 1
