"""End to end on the real embedded server: llama.cpp + SmolLM2-135M, real Data Designer, Ray, OmegaConf.

The tiny model's answers are fluent but often wrong: these tests assert structure and counts, never content.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from sdg_job.config import load_recipe
from sdg_job.report import CHARTS
from sdg_job.serve import Server
from tests.conftest import REPO, all_files, open_in_browser, read_jsonl, run_cli

pytestmark = pytest.mark.e2e
SENTINEL = "nvapi-SENTINEL-must-never-be-written-0001"


def cpu_recipe(tmp_path: Path, base: str, extra: str = "") -> str:
    """A recipe of the user's own: a shipped recipe served on the embedded CPU model."""
    path = tmp_path / f"{base}_cpu.yaml"
    path.write_text(f"defaults: [{base}, layers/cpu]\n{extra}")
    return str(path)


def manifest_of(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / f"{name}.manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny")
    result = run_cli("run", "recipe=tiny", out_dir=out_dir, env={"NVIDIA_API_KEY": SENTINEL})
    return out_dir, result


def test_tiny_recipe_writes_10_chat_records(tiny_run) -> None:
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 10 records to {out_dir / 'tiny.jsonl'}" in result.stdout
    # The progress line as a Slurm log keeps it (not a terminal): whole, not cut to 80 columns.
    last = [line for line in result.stderr.splitlines() if line.startswith("records 10/10 · shards ")][-1]
    assert " · dropped " in last and " tok/s · " in last and "…" not in last, last
    records = read_jsonl(out_dir / "tiny.jsonl")
    assert len(records) == 10
    assert len({json.dumps(r, sort_keys=True) for r in records}) == 10
    for record in records:
        assert list(record) == ["messages"]
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in record["messages"])


def test_tiny_manifest_has_provenance_and_counts(tiny_run) -> None:
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = manifest_of(out_dir, "tiny")
    assert manifest["status"] == "complete" and manifest["records"] == manifest["num_records"] == 10
    assert len(manifest["recipe_sha256"]) == 64
    assert manifest["seed"]["sha256"] == hashlib.sha256((REPO / "seeds/sft_topics.jsonl").read_bytes()).hexdigest()
    assert manifest["resolved_recipe"]["name"] == "tiny"
    assert manifest["models"]["text"]["model"] == "smollm2-135m"
    assert manifest["versions"]["data-designer"] == "0.9.7"
    (server,) = manifest["servers"]
    assert server["engine"] == "llama_cpp" and "--alias" in server["argv"]
    assert manifest["tokens"]["output"] > 0 and manifest["wall_time_s"] > 0
    # Every attempted record is valid or dropped by reason (a top-up may make a few more valid than needed).
    assert manifest["attempted"] - sum(manifest["dropped"].values()) >= 10
    assert sum(s["valid"] for s in manifest["shards"]) >= 10
    lengths = manifest["record_tokens"]  # counted by the serving llama-server with the model's chat template
    assert lengths["tokenizer"] == "smollm2-135m (llama_cpp), with its chat template" and lengths["records"] == 10
    assert 10 < lengths["min"] <= lengths["p50"] <= lengths["p95"] <= lengths["max"] < 1024
    cpu = manifest["client_cpu"]  # each worker loads Data Designer once; the per-record cost leaves that out
    assert cpu["seconds"]["worker_engine_load"] > 0 and cpu["seconds"]["shards"] > 0
    assert 0 < cpu["steady_ms_per_record"] < cpu["ms_per_record"]
    # Data Designer stayed offline and at home in the run dir; server logs are in the run dir.
    run_dir = out_dir / ".tiny.run"
    assert list((run_dir / "logs").glob("server-*.log"))


def test_no_secret_in_any_written_file(tiny_run) -> None:
    out_dir, _ = tiny_run
    for path in all_files(out_dir):
        assert SENTINEL not in path.read_text(errors="replace"), path


def test_rerun_skips_finished_shards_and_keeps_the_output(tiny_run) -> None:
    out_dir, first = tiny_run
    assert first.returncode == 0
    before = (out_dir / "tiny.jsonl").read_text()
    again = run_cli("run", "recipe=tiny", out_dir=out_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = manifest_of(out_dir, "tiny")
    assert manifest["shards_skipped_on_resume"] == len(manifest["shards"]) >= 2
    assert (out_dir / "tiny.jsonl").read_text() == before


def test_rerun_can_split_the_same_records_into_parts_that_datasets_loads(hf, tiny_run, tmp_path: Path) -> None:
    """Splitting is how the merge lays records out, not what they are: a rerun with `output_records_per_file`
    regenerates nothing, writes the same records in Hugging Face-style parts and removes the whole file."""
    out_dir, first = tiny_run
    assert first.returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    again = run_cli("run", "recipe=tiny", "output_records_per_file=4", out_dir=copy)
    assert again.returncode == 0, again.stderr[-3000:]
    parts = [copy / f"tiny-0000{i}-of-00003.jsonl" for i in range(3)]
    assert [len(read_jsonl(p)) for p in parts] == [4, 4, 2] and not (copy / "tiny.jsonl").exists()
    assert [r for p in parts for r in read_jsonl(p)] == read_jsonl(out_dir / "tiny.jsonl")
    manifest = manifest_of(copy, "tiny")
    assert manifest["shards_skipped_on_resume"] == len(manifest["shards"])
    assert manifest["output_files"] == [p.name for p in parts]
    cache = str(tmp_path / "hf-cache")
    loaded = hf.load_dataset("json", data_files=[str(p) for p in parts], split="train", cache_dir=cache)
    assert loaded.to_list() == read_jsonl(out_dir / "tiny.jsonl")
    # The card moved with the layout: `load_dataset(dir)` reads its files and features from it.
    assert manifest["card"] == "README.md"
    assert hf.load_dataset(str(copy), split="train", cache_dir=cache).to_list() == loaded.to_list()


def test_dataset_card_beside_the_output_describes_it(hf, tiny_run, tmp_path: Path) -> None:
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    card = (out_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": ["tiny.jsonl"]}]
    assert front["dataset_info"]["splits"] == [
        {"name": "train", "num_examples": 10, "num_bytes": (out_dir / "tiny.jsonl").stat().st_size}
    ]
    message = [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]
    messages = {"name": "messages", "list": message}
    assert front["dataset_info"]["features"] == [messages] and front["size_categories"] == ["n<1K"]
    manifest = manifest_of(out_dir, "tiny")
    assert front["sdg_job"]["recipe_sha256"] == manifest["recipe_sha256"]
    assert "smollm2-135m" in card and json.dumps(read_jsonl(out_dir / "tiny.jsonl")[0]["messages"][0]["role"]) in card
    lengths = manifest["record_tokens"]
    assert f"min {lengths['min']}, p50 {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']}" in card
    assert hf.load_dataset(str(out_dir), split="train", cache_dir=str(tmp_path / "hf-cache")).num_rows == 10


def test_the_report_opens_in_a_real_browser_with_every_chart_and_the_card_shows_them(tiny_run, chromium) -> None:
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = manifest_of(out_dir, "tiny")
    page = out_dir / manifest["report"]
    assert page.name == "tiny.report.html"
    images, errors = open_in_browser(chromium, page)
    assert errors == []
    assert [i["alt"] for i in images] == list(CHARTS.values())
    assert all(i["complete"] and i["width"] == 800 and i["height"] == 360 for i in images), images
    assert "was not drawn" not in result.stderr  # every chart drew (a failing one would only warn)
    card = (out_dir / "README.md").read_text()
    for name, title in manifest["report_charts"].items():
        assert f"![{title}]({name})" in card and (out_dir / name).read_bytes().startswith(b"\x89PNG")
    # the records' own lengths are charted, not a "not counted" placeholder
    assert manifest["record_tokens"]["records"] == 10
    diversity = manifest["diversity"]  # each sampler over every row generated, distinct-n of the output's text
    assert set(diversity["samplers"]) == {"persona", "tone"}
    assert sum(diversity["samplers"]["tone"]["counts"].values()) == manifest["generated"]
    assert set(diversity["samplers"]["tone"]["counts"]) <= {"casual", "formal", "brief", "detailed"}
    text = diversity["generated_text"]
    assert text["records"] == 10 and 0 < text["distinct_1"] <= text["distinct_2"] <= 1
    assert f"distinct-1 {text['distinct_1']}" in card and "- sampler `tone`: " in card


def test_changed_recipe_refuses_the_old_run_dir_unless_fresh(tiny_run) -> None:
    out_dir, first = tiny_run
    assert first.returncode == 0
    changed = run_cli("run", "recipe=tiny", "columns.tone.params.values=[terse]", "columns.tone.params.weights=[1]",
                      out_dir=out_dir)  # fmt: skip
    assert changed.returncode == 2 and "--fresh" in changed.stderr


def test_preview_prints_records_and_writes_nothing(out_dir: Path) -> None:
    result = run_cli("run", "recipe=tiny", "--preview", out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"messages"' in result.stdout and "nothing written" in result.stderr
    assert all_files(out_dir) == []


def test_rl_pref_gives_exact_count_of_preference_pairs(tmp_path: Path, out_dir: Path) -> None:
    """The README's one-liner for any recipe on the CPU: `recipe=rl_pref layer=cpu` (short answers, to be quick),
    with its judge at a provider of its own, as a hosted judge beside a generator served on the nodes would be: a
    llama-server this test starts outside the job, which wants its own key."""
    serve = load_recipe("tiny").serve
    assert serve is not None
    short = [f"models.{alias}.inference_parameters.max_tokens=96" for alias in ("precise", "creative", "judge")]
    with Server(serve, tmp_path / "judge.log") as judge:
        env = {"OPENAI_BASE_URL": judge.endpoint, "OPENAI_API_KEY": judge.api_key}
        result = run_cli("run", "recipe=rl_pref", "layer=cpu", "num_records=4", "generation.keep_truncated=true",
                         *short, "models.judge.provider=openai", out_dir=out_dir, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "rl_pref.jsonl")
    assert len(records) == 4
    for r in records:  # TRL's conversational form: the trainer renders it with the model's chat template
        assert list(r) == ["prompt", "chosen", "rejected"] and r["chosen"] != r["rejected"]
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
        assert all(m["content"].strip() for m in r["prompt"] + r["chosen"] + r["rejected"])
    manifest = manifest_of(out_dir, "rl_pref")
    assert manifest["records"] == 4
    assert manifest["attempted"] - sum(manifest["dropped"].values()) >= 4  # a top-up may make a few more than needed
    # Counted by the generator's own server (a shard whose pairs were all dropped counts none, and misses none)
    assert manifest["record_tokens"]["records"] == 4 and manifest["record_tokens"]["min"] > 0, manifest
    assert {a: m["provider"] for a, m in manifest["models"].items()} == {"precise": "local", "creative": "local",
                                                                         "judge": "openai"}  # fmt: skip
    (own,) = [server["endpoint"] for server in manifest["servers"]]
    for shard in manifest["shards"]:
        assert shard["endpoints"] == {"precise": own, "creative": own, "judge": judge.endpoint}, shard
    usage = manifest["usage"]  # per alias: requests answered and their tokens
    assert set(usage) == {"precise", "creative", "judge"} and all(u["requests"] >= 4 for u in usage.values()), usage
    assert sum(u["output_tokens"] for u in usage.values()) == manifest["tokens"]["output"]
    judged = (tmp_path / "judge.log").read_text()
    assert judged.count("processing task") >= 5, judged[-2000:]  # the preflight's request and the judgements
    assert judge.api_key not in "".join(p.read_text(errors="replace") for p in all_files(out_dir))


def test_customer_support_tools_on_the_cpu_layer_gives_exactly_n_valid_tool_conversations(out_dir: Path) -> None:
    """What a user tries first on a laptop, as the README gives it: the layer's defaults alone (its budget, room to
    answer, every tool-data check on) end in exactly N conversations that pass those checks."""
    result = run_cli("run", "recipe=customer_support_tools", "layer=cpu", "num_records=6", out_dir=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out_dir / "customer_support_tools.jsonl")
    assert len(records) == 6
    for r in records:
        assert set(r) == {"messages", "tools"}
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
        (call,) = r["messages"][2]["tool_calls"]
        assert isinstance(call["function"]["arguments"], dict) and r["messages"][2]["content"] == ""  # HF form
        assert call["function"]["name"] in {t["function"]["name"] for t in r["tools"]}
        assert r["messages"][3]["tool_call_id"] == call["id"]
        assert set(json.loads(r["messages"][3]["content"])) == {"status", "details"}
    manifest = manifest_of(out_dir, "customer_support_tools")
    assert manifest["status"] == "complete" and manifest["records"] == 6
    assert manifest["attempted"] - sum(manifest["dropped"].values()) >= 6  # a top-up may make a few more than needed


def test_invalid_records_are_counted_and_the_budget_stops_the_run(tmp_path: Path, out_dir: Path) -> None:
    """Both answers from the same greedy model and prompt are identical: every pair is invalid (chosen == rejected).
    The run must count them, stop at its budget with exit 1, and keep what it has."""
    recipe = cpu_recipe(
        tmp_path,
        "rl_pref",
        "num_records: 3\ngeneration: {budget: 2, shard_size: 3, keep_truncated: true}\n"
        "models:\n  precise: {inference_parameters: {temperature: 0.0, top_p: 1.0, max_tokens: 24}}\n"
        "columns:\n  response_b: {model_alias: precise, system_prompt: "
        "'You are a helpful assistant. Answer accurately and concisely.'}\n",
    )
    result = run_cli("run", f"recipe={recipe}", out_dir=out_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "budget exhausted" in result.stderr
    manifest = manifest_of(out_dir, "rl_pref")
    assert manifest["status"] == "budget_exhausted" and manifest["attempted"] == 6
    assert manifest["dropped"].get("chosen_equals_rejected", 0) >= 1
    assert manifest["records"] + sum(manifest["dropped"].values()) == 6
    assert not (out_dir / "rl_pref.jsonl").exists()
    assert len(read_jsonl(out_dir / "rl_pref.jsonl.partial")) == manifest["records"]


def test_each_shard_worker_has_a_data_designer_home_of_its_own(tiny_run) -> None:
    """Data Designer writes its default model files into its home on first use (exists() then write, in place):
    workers sharing one could read a half-written file and fail a shard."""
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    workers = {s["worker"].rsplit(":", 1)[1] for s in manifest_of(out_dir, "tiny")["shards"]}
    homes = {p.parent.name for p in (out_dir / ".tiny.run" / "dd_home").glob("*/model_configs.yaml")}
    assert len(workers) >= 2 and workers <= homes
