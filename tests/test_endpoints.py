"""A remote provider's key, model and endpoint are checked before any work starts (sdg_job/endpoints/preflight.py).

The endpoint with a key is real: llama-server with the embedded model, started with `--api-key`, which answers 401 to
any other key. The model a provider does not serve needs a server that checks model names: the SIMULATED one
(sdg_job.simulator --serves), as vLLM answers. A closed port is a port nobody listens on.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from sdg_job.config import load_recipe, recipe_hash
from sdg_job.endpoints import EndpointFailing, EndpointWatch, Pace
from sdg_job.endpoints.preflight import preflight
from sdg_job.engines import LlamaCpp
from sdg_job.errors import RecipeError
from sdg_job.serve import Server, free_port
from sdg_job.simulator import simulator_spec
from tests.conftest import REPO, read_jsonl, run_cli, shard_summary, start_cli, wait_for

KEY = "sk-SENTINEL-endpoint-key-0123456789"
WRONG = "sk-SENTINEL-wrong-key-9876543210"
TINY_REMOTE = ("run", "recipe=tiny", "provider=openai", "num_records=4")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> str:
    """A real endpoint that wants a key: llama-server with the embedded model and `--api-key`."""
    spec = load_recipe("tiny").serve
    assert spec is not None
    with Server(spec, tmp_path_factory.mktemp("llama") / "server.log", api_key=KEY) as server:
        yield server.endpoint


def refused_at_once(out_dir: Path, env: dict[str, str], *extra: str) -> str:
    """Exit 2 within 15 s, nothing written; the error line."""
    started = time.monotonic()
    result = run_cli(*TINY_REMOTE, *extra, out_dir=out_dir, env=env, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert took < 15, f"{took:.1f}s"
    assert list(out_dir.iterdir()) == []
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert KEY not in result.stderr and WRONG not in result.stderr
    return line


def test_a_wrong_key_stops_the_job_at_once_naming_the_variable_and_the_401(keyed, out_dir: Path) -> None:
    line = refused_at_once(out_dir, {"OPENAI_BASE_URL": keyed, "OPENAI_API_KEY": WRONG})
    assert "providers.openai" in line and keyed in line, line
    assert "HTTP 401" in line and "the key in $OPENAI_API_KEY was refused" in line, line
    assert "Invalid API Key" in line, line  # the provider's own words


def test_an_unset_key_variable_is_named(keyed, out_dir: Path) -> None:
    line = refused_at_once(out_dir, {"OPENAI_BASE_URL": keyed, "OPENAI_API_KEY": ""})
    assert "HTTP 401" in line and "$OPENAI_API_KEY is not set" in line, line


def test_a_closed_port_is_refused_at_once_with_the_cause(out_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = refused_at_once(out_dir, {"OPENAI_BASE_URL": url, "OPENAI_API_KEY": KEY})
    assert url in line and "cannot reach it" in line and "Connection refused" in line, line


def test_the_hosted_providers_unset_key_is_refused_before_any_request(out_dir: Path) -> None:
    """provider nvidia is a hosted endpoint: no key is never right, with the preflight off too (no request made)."""
    result = run_cli("run", "recipe=tiny", "provider=nvidia", "providers.nvidia.preflight=false", out_dir=out_dir,
                     env={"NVIDIA_API_KEY": ""}, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "NVIDIA_API_KEY: is not set; provider nvidia needs an API key in $NVIDIA_API_KEY" in result.stderr
    assert list(out_dir.iterdir()) == []


@pytest.fixture
def quick_preflight(monkeypatch) -> None:
    monkeypatch.setattr("sdg_job.endpoints.preflight.PREFLIGHT_TIMEOUT", httpx.Timeout(2.0))


def preflight_to(endpoint: str) -> str:
    recipe = load_recipe("tiny", ["provider=openai", f"providers.openai.endpoint={endpoint}"])
    with pytest.raises(RecipeError) as refused:
        preflight(recipe, "tiny")
    return str(refused.value)


def test_an_endpoint_that_accepts_but_never_answers_is_refused_after_the_timeout(quick_preflight) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; nobody ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        line = preflight_to(url)
    assert url in line and "no answer within 2 s" in line, line


def test_a_name_that_does_not_resolve_and_a_tls_mismatch_are_named(quick_preflight, tmp_path: Path) -> None:
    # RFC 6761: .invalid never resolves
    assert "cannot reach it (ConnectError:" in preflight_to("http://sdg-job-test.invalid/v1")
    with Server(simulator_spec(), tmp_path / "sim.log") as plain:  # https:// to a server that speaks plain HTTP
        tls = preflight_to(plain.endpoint.replace("http://", "https://"))
    assert "cannot reach it (ConnectError:" in tls and "SSL" in tls, tls


def test_preview_runs_the_preflight_too(out_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = refused_at_once(out_dir, {"OPENAI_BASE_URL": url}, "--preview")
    assert "cannot reach it" in line, line


def test_a_model_the_endpoint_does_not_serve_is_named_with_what_it_serves(out_dir: Path, tmp_path: Path) -> None:
    spec = simulator_spec(extra_args=["--serves", "meta/llama-3.1-8b-instruct,openai/gpt-oss-20b"])
    with Server(spec, tmp_path / "sim.log") as sim:
        line = refused_at_once(out_dir, {"OPENAI_BASE_URL": sim.endpoint}, "models.text.model=no/such-model")
    assert "HTTP 404" in line and "'no/such-model' is not served there" in line, line
    assert "it serves: meta/llama-3.1-8b-instruct, openai/gpt-oss-20b" in line, line


def test_the_preflight_is_off_per_provider_or_per_model(tmp_path: Path) -> None:
    """`providers.<name>.preflight: false`, or the step's `skip_health_check: true` on every model: no request."""
    closed = f"http://127.0.0.1:{free_port()}/v1"
    base = ["provider=openai", f"providers.openai.endpoint={closed}"]
    with pytest.raises(RecipeError, match="cannot reach it"):
        preflight(load_recipe("tiny", base), "tiny")
    preflight(load_recipe("tiny", [*base, "providers.openai.preflight=false"]), "tiny")
    preflight(load_recipe("tiny", [*base, "models.text.skip_health_check=true"]), "tiny")
    preflight(load_recipe("tiny"), "tiny")  # provider local: the job health-gates its own servers
    step = load_recipe(str(REPO / "tests" / "step_shape" / "sft.yaml"))  # the step's own key reaches the recipe
    assert step.models["nvidia-text"].skip_health_check is True


def test_the_right_key_passes(keyed, monkeypatch, caplog) -> None:
    """The whole job against this endpoint runs in tests/test_docker.py (`docker run … provider=openai`)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with caplog.at_level("INFO", logger="sdg_job.endpoints"):
        preflight(load_recipe("tiny", ["provider=openai", f"providers.openai.endpoint={keyed}"]), "tiny")
    assert f"preflight: {keyed} answers for" in caplog.text


@pytest.mark.e2e
def test_an_embedding_model_is_checked_with_an_embedding(keyed, monkeypatch, tmp_path: Path) -> None:
    """llama-server answers /v1/embeddings only when started for it: the same model passes as a chat model and is
    refused as an embedding model, and passes as one where the server embeds."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    embed = "models.embed={model: smollm2-135m, inference_parameters: {generation_type: embedding}}"
    with pytest.raises(RecipeError, match="HTTP 501: POST /embeddings for model 'smollm2-135m' is not implemented"):
        preflight(load_recipe("tiny", ["provider=openai", f"providers.openai.endpoint={keyed}", embed]), "tiny")
    spec = load_recipe("tiny").serve
    assert spec is not None
    spec = spec.model_copy(update={"extra_args": list(LlamaCpp.embedding_args)})
    with Server(spec, tmp_path / "server.log", api_key=KEY) as server:
        preflight(load_recipe("tiny", ["provider=openai", f"providers.openai.endpoint={server.endpoint}", embed]),
                  "tiny")  # fmt: skip


@pytest.mark.e2e
def test_a_key_revoked_mid_run_stops_the_job_within_a_minute_and_the_rerun_completes(out_dir, tmp_path) -> None:
    """The SIMULATED server (--key-file, read on every request) stands in for a provider that revokes the key once
    the first shard is committed: the job stops with the cause, keeps its shards, and the same command resumes to
    exactly N once the key is good again."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    args = ("run", "recipe=tiny", "provider=openai", "num_records=40", "generation.shard_size=5")
    with Server(simulator_spec(seconds_per_token=0.004, extra_args=["--key-file", str(key_file)]),
                tmp_path / "sim.log") as sim:  # fmt: skip
        env = {"OPENAI_BASE_URL": sim.endpoint, "OPENAI_API_KEY": KEY}
        job = start_cli(*args, out_dir=out_dir, env=env)
        wait_for(lambda: list((out_dir / ".tiny.run" / "shards").glob("shard-*.json")), 120, "the first shard")
        key_file.write_text("sk-rotated")
        revoked = time.monotonic()
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 1, stderr[-3000:]
        stopped_after = time.monotonic() - revoked
        assert stopped_after < 60
        (line,) = [line for line in stderr.splitlines() if line.startswith("failed:")]
        print(f"stopped {stopped_after:.1f} s after the key was revoked: {line}")
        assert "failed with auth" in line and "Incorrect API key provided" in line, line
        assert "check the key in $OPENAI_API_KEY" in line and KEY not in stderr, line
        manifest = json.loads((out_dir / "tiny.manifest.json").read_text())
        assert manifest["status"] == "endpoint_failed" and manifest["error"] == line.removeprefix("failed: ")
        assert manifest["dropped"].get("auth", 0) >= 1 and manifest["request_errors"]["auth"] >= 1, manifest
        assert "generation_failed" not in manifest["dropped"], manifest["dropped"]
        kept = len(manifest["shards"])

        key_file.write_text(KEY)
        result = run_cli(*args, out_dir=out_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 40 and len({json.dumps(r, sort_keys=True) for r in records}) == 40
    manifest = json.loads((out_dir / "tiny.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["shards_skipped_on_resume"] >= kept >= 1
    assert manifest["error"] is None


@pytest.mark.e2e
def test_a_request_quota_costs_time_never_records(out_dir: Path, tmp_path: Path) -> None:
    """The SIMULATED server with a quota (5 requests/s, 429 + Retry-After beyond it), and no quota told to the job:
    Data Designer's backoff on 429s paces it; exactly N, nothing dropped. (`python -m sdg_job.bench` measures the
    rate with and without providers.<name>.max_requests_per_minute.)"""
    quota = ["--quota", "10", "--quota-window-s", "2"]
    with Server(simulator_spec(seconds_per_token=0.001, extra_args=quota), tmp_path / "sim.log") as sim:
        result = run_cli("run", "recipe=tiny", "provider=openai", "num_records=20", "generation.shard_size=5",
                         out_dir=out_dir, env={"OPENAI_BASE_URL": sim.endpoint})  # fmt: skip
        refused = httpx.get(sim.url + "/stats").json()["errors"].get("429", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 20 and len({json.dumps(r, sort_keys=True) for r in records}) == 20
    manifest = json.loads((out_dir / "tiny.manifest.json").read_text())
    assert manifest["dropped"] == {} and manifest["status"] == "complete"
    assert refused >= 1 and manifest["request_errors"].get("rate_limited", 0) == refused  # the quota did bite


@pytest.mark.e2e
def test_a_token_quota_told_to_the_job_is_kept_without_429s(out_dir: Path, tmp_path: Path) -> None:
    """The SIMULATED server with a token quota (prompt + max_tokens per request, 420 tokens per 2 s, 429 beyond it)
    and the job told 0.9 of it as providers.openai.max_tokens_per_minute: the shared pacer reserves each request's
    estimate (prompt ~4 characters a token, max_tokens) and settles with the usage it reports, so the job stays under
    the quota instead of bouncing off it; exactly N, nothing dropped."""
    quota = ["--token-quota", "420", "--quota-window-s", "2"]
    with Server(simulator_spec(seconds_per_token=0.001, extra_args=quota), tmp_path / "sim.log") as sim:
        result = run_cli("run", "recipe=tiny", "provider=openai", "num_records=10", "generation.shard_size=5",
                         "models.text.inference_parameters.max_tokens=32",
                         f"providers.openai.max_tokens_per_minute={0.9 * 420 * 30:g}",
                         out_dir=out_dir, env={"OPENAI_BASE_URL": sim.endpoint})  # fmt: skip
        stats = httpx.get(sim.url + "/stats").json()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_jsonl(out_dir / "tiny.jsonl")) == 10
    manifest = json.loads((out_dir / "tiny.manifest.json").read_text())
    assert manifest["dropped"] == {} and manifest["status"] == "complete"
    assert stats["errors"].get("429", 0) <= 1, stats["errors"]  # paced under it, not retried into it
    done = sorted(stats["completions"])
    rate = (stats["ok"] - 1) * (10 + 32) / (done[-1] - done[0])  # tokens per second over the run
    assert rate <= 420 / 2 * 1.05, rate


def test_a_token_refund_never_brings_requests_closer_than_the_request_quota(monkeypatch) -> None:
    """Both quotas at once (found in review): refunds of unused tokens move the token clock only."""
    now = [100.0]
    monkeypatch.setattr("sdg_job.endpoints.watch.time.monotonic", lambda: now[0])
    pace = Pace(per_s=1.0, tokens_per_s=100.0)  # 60 requests and 6,000 tokens a minute
    waits = []
    for _ in range(5):
        waits.append(pace.reserve(50))  # 0.5 s of the token quota each
        pace.settle(-40)  # each used only 10 of them
    assert waits == [0.0, 1.0, 2.0, 3.0, 4.0]  # one a second: the request quota holds
    tokens_only = Pace(per_s=None, tokens_per_s=100.0)
    assert [tokens_only.reserve(200) for _ in range(3)] == [0.0, 2.0, 4.0]  # 200 tokens take 2 s each


def test_quotas_and_the_preflight_are_not_part_of_what_a_run_generates() -> None:
    """Lowering a quota after a burst of 429s, or turning the preflight off, resumes the same run dir."""
    base = ["provider=openai", "providers.openai.endpoint=http://x/v1"]
    same = recipe_hash(load_recipe("tiny", base))
    for change in ("max_requests_per_minute=30", "max_tokens_per_minute=9000", "preflight=false"):
        assert recipe_hash(load_recipe("tiny", [*base, f"providers.openai.{change}"])) == same, change
    assert recipe_hash(load_recipe("tiny", [*base, "models.text.model=another"])) != same  # what it generates


def test_the_watch_stops_a_job_only_when_whole_shards_fail_with_one_incurable_cause() -> None:
    watch = EndpointWatch()
    watch.saw(shard_summary(generated=0, request_errors={"timeout": 5}))  # curable: retries may help
    watch.saw(shard_summary(generated=3, request_errors={"auth": 1}))  # the endpoint works for some requests
    with pytest.raises(EndpointFailing) as failing:
        watch.saw(shard_summary("shard-00007", generated=0, request_errors={"auth": 5}, request_error="bad key",
                                request_error_provider="openai"))  # fmt: skip
    e = failing.value
    assert (e.cause, e.said, e.shard, e.provider) == ("auth", "bad key", "shard-00007", "openai")
