"""A Data Designer config, as DataDesignerConfigBuilder.write_config writes it, is a recipe: validated by Data Designer
and the job together, run unchanged on the embedded model with every column Data Designer keeps, exactly N rows;
and refused (exit 2, every problem in one run, naming file and key) where Data Designer or the job cannot run it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from sdg_job.config import load_recipe
from sdg_job.engines import LlamaCpp
from tests import dd_configs
from tests.conftest import REPO, all_files, read_jsonl, run_cli

SEEDS = REPO / "seeds" / "sft_topics.jsonl"
N = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dd_configs")
    return {
        "code": dd_configs.export(dd_configs.code_with_validation(), d / "code.yaml"),
        "qa": dd_configs.export(dd_configs.qa_with_judge(), d / "qa.json"),  # JSON: write_config's other form
        "all": dd_configs.export(dd_configs.every_offline_column_type(SEEDS), d / "all_types.yaml"),
        "samplers": dd_configs.export(dd_configs.samplers_only(), d / "samplers.yaml"),
    }


def _edited(path: Path, tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(path.read_text())
    edit(data)
    out = tmp_path / path.name.replace(".json", ".yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _column(data: dict, name: str) -> dict:
    return next(c for c in data["data_designer"]["columns"] if c["name"] == name)


# ---------------------------------------------------------------- validate, overrides, refusals (no server)


def test_a_config_validates_unchanged_and_a_column_is_overridden_by_name(exported, tmp_path: Path) -> None:
    before = exported["code"].read_bytes()
    prompt = "data_designer.columns.task.prompt=Write one Python task about {{ area }}."
    result = run_cli("validate", f"recipe={exported['code']}", "layer=cpu", prompt, out_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["data_designer"]["columns"]["task"]["prompt"] == "Write one Python task about {{ area }}."
    assert resolved["models"]["openai-text"]["model"] == "gpt-4.1"  # Data Designer's built-in alias, resolved
    assert resolved["provider"] == "local" and resolved["output_projection"] == {"type": "dataset"}
    assert exported["code"].read_bytes() == before and all_files(tmp_path) == []


def test_without_a_layer_the_builtin_alias_goes_to_its_provider(exported, tmp_path: Path) -> None:
    result = run_cli("validate", f"recipe={exported['qa']}", out_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["models"]["openai-text"]["provider"] == "openai"


def test_an_embedding_model_is_served_beside_the_chat_models_on_llama_cpp_and_refused_on_vllm(
    exported, tmp_path: Path
) -> None:
    recipe = load_recipe(str(exported["all"]), ["layer=cpu"])
    (server,) = recipe.servers.values()
    assert server.aliases == ["openai-text", "openai-embedding"] and server.extra_args[-3:] == list(
        LlamaCpp.embedding_args
    )
    assert "--embeddings" not in load_recipe(str(exported["code"]), ["layer=cpu"]).servers["server"].extra_args
    result = run_cli("validate", f"recipe={exported['all']}", "provider=local", out_dir=tmp_path)  # base: vLLM
    assert result.returncode == 2, result.stderr
    assert "models.openai-embedding.inference_parameters.generation_type: an embedding model is served" in (
        result.stderr
    )


def test_a_config_that_asks_no_model_validates(exported, tmp_path: Path) -> None:
    result = run_cli("validate", f"recipe={exported['samplers']}", out_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["models"] == {}


def test_models_of_a_data_designer_home_that_no_column_asks_for_are_not_the_runs(exported, tmp_path: Path) -> None:
    """A builder writes every model of its user's ~/.data-designer into the file, at providers the job does not
    know (openrouter): the ones no column names neither need a provider nor become the recipe's models."""
    home = [{"alias": "openrouter-text", "model": "nvidia/nemotron-3-nano-30b-a3b", "provider": "openrouter"},
            {"alias": "my-judge", "model": "judge", "provider": "my-gateway"}]  # fmt: skip
    config = _edited(exported["qa"], tmp_path, lambda d: d["data_designer"].update(model_configs=home))
    result = run_cli("validate", f"recipe={config}", out_dir=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert list(yaml.safe_load(result.stdout)["models"]) == ["openai-text"]  # what the columns use
    (tmp_path / "used").mkdir()
    used = _edited(config, tmp_path / "used", lambda d: _column(d, "answer").update(model_alias="my-judge"))
    refused = run_cli("validate", f"recipe={used}", out_dir=tmp_path / "out")
    assert refused.returncode == 2 and "models.my-judge.provider: no providers.my-gateway entry" in refused.stderr


BAD = {
    "unknown_column_type": (lambda d: _column(d, "task").update(column_type="llm-poem"),
                            "data_designer.columns.task"),
    "a_cycle": (lambda d: _column(d, "task").update(prompt="Rewrite {{ solution }}"),
                "data_designer.columns.task: a cycle of references: task -> solution -> task"),
    "missing_alias": (lambda d: _column(d, "solution").update(model_alias="ghost"),
                      "data_designer.columns.solution.model_alias: unknown model alias 'ghost'"),
    "wrong_library_version": (lambda d: d.update(library_version="0.1.0"),
                              "library_version: written by Data Designer 0.1.0"),
    "undefined_template_variable": (lambda d: _column(d, "task").update(prompt="About {{ planet }}"),
                                    "data_designer.columns.task"),
    "network_sampler": (lambda d: _column(d, "area").update(sampler_type="person", params={}),
                        "data_designer.columns.area.sampler_type: the person sampler downloads"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_config_data_designer_or_the_job_cannot_run_exits_2(case: str, exported, tmp_path: Path) -> None:
    edit, must_mention = BAD[case]
    config = _edited(exported["code"], tmp_path, edit)
    out = tmp_path / "out"
    for command in ("validate", "run"):
        result = run_cli(command, f"recipe={config}", "layer=cpu", out_dir=out)
        assert result.returncode == 2, result.stderr
        assert f"error: {config}" in result.stderr and must_mention in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists() or all_files(out) == []


def test_every_problem_of_a_config_is_listed_in_one_run(exported, tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        columns = data["data_designer"]["columns"]
        columns.append({"column_type": "llm-text", "prompt": "no name", "model_alias": "openai-text"})
        _column(data, "level").update(column_type="llm-poem")
        _column(data, "solution").update(model_alias="ghost")
        _column(data, "task").update(prompt="About {{ planet }}")

    config = _edited(exported["code"], tmp_path, edit)
    result = run_cli("validate", f"recipe={config}", "layer=cpu", "filters=[{column: nowhere, equals: 1}]",
                     out_dir=tmp_path / "out")  # fmt: skip
    assert result.returncode == 2, result.stderr
    for said in ("data_designer.columns.5: must be a mapping with a 'name'", "data_designer.columns.level",
                 "data_designer.columns.solution.model_alias: unknown model alias 'ghost'",
                 "filters.0.column: 'nowhere' is not a column"):  # fmt: skip
        assert said in result.stderr, result.stderr


# ---------------------------------------------------------------- runs on the embedded model


def _run(config: Path, out: Path, *extra: str, n: int = N) -> tuple[list[dict], dict]:
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    result = run_cli("run", f"recipe={config}", "layer=cpu", f"num_records={n}", *extra, out_dir=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashlib.sha256(config.read_bytes()).hexdigest() == digest  # the config is read, never changed
    name = config.stem
    manifest = json.loads((out / f"{name}.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == n
    records = read_jsonl(out / f"{name}.jsonl")
    assert len(records) == n
    return records, manifest


@pytest.mark.e2e
def test_code_and_its_validation_run_with_every_column(exported, tmp_path: Path) -> None:
    records, _ = _run(exported["code"], tmp_path)
    for record in records:
        assert list(record) == ["area", "level", "task", "solution", "solution_check"]
        assert isinstance(record["solution"], str)  # the code Data Designer extracted (the tiny model may give none)
        assert isinstance(record["solution_check"], dict) and isinstance(record["solution_check"]["is_valid"], bool)


@pytest.mark.e2e
def test_structured_output_and_a_judge_keep_their_json_types(exported, tmp_path: Path) -> None:
    records, manifest = _run(exported["qa"], tmp_path)
    for record in records:
        assert set(record) == {"category", "price", "product", "product_name", "question", "answer", "answer_quality"}
        assert set(record["product"]) == {"name", "feature"} and record["product_name"] == record["product"]["name"]
        assert isinstance(record["price"], float)
        assert record["answer_quality"]["helpful"]["score"] in ("1", "2", "3", 1, 2, 3)
    assert set(manifest["usage"]) == {"openai-text"}  # the structured and judge columns' own aliases count as theirs


@pytest.mark.e2e
def test_every_offline_column_type_a_constraint_and_a_processor(exported, tmp_path: Path) -> None:
    records, _ = _run(
        exported["all"],
        tmp_path,
        "models.openai-text.inference_parameters.max_tokens=128",
        "generation.keep_truncated=true",
    )  # short answers: seven model columns a row on two cores
    seeds = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    for record in records:
        assert "scratch" not in record  # dropped by the drop_columns processor
        for column in ("tone", "style", "difficulty", "when", "ticket", "asker", "question", "snippet",
                       "snippet_check", "labels", "clarity", "question_embedding", "summary", "domain",
                       "topic"):  # fmt: skip
            assert column in record, column
        assert record["difficulty"] >= 1  # the scalar constraint
        assert {"domain": record["domain"], "topic": record["topic"]} in [
            {"domain": s["domain"], "topic": s["topic"]} for s in seeds
        ]
        assert record["summary"].startswith(f"{record['asker']['first_name']} asks: ")
        assert isinstance(record["labels"]["title"], str) and isinstance(record["snippet_check"]["is_valid"], bool)
        # the embedded model's embedding of the question, from the same server as the chat columns (576 wide)
        (vector,) = record["question_embedding"]["embeddings"]
        assert len(vector) == 576 and all(isinstance(x, float) for x in vector)


@pytest.mark.e2e
def test_a_config_that_asks_no_model_runs_without_a_server_and_draws_by_its_random_seed(
    exported, tmp_path: Path
) -> None:
    """The samplers of each shard draw from the shard's seed (of generation.random_seed): the same recipe gives the
    same records, another random_seed others."""
    records, manifest = _run(exported["samplers"], tmp_path / "a", "generation.shard_size=3", n=7)
    assert [list(r) for r in records] == [["code", "size", "label"]] * 7
    for r in records:
        assert r["code"] in ("a", "b", "c") and 1 <= r["size"] <= 9 and r["label"].startswith(f"{r['code']}-")
    assert manifest["usage"] == {}
    again, _ = _run(exported["samplers"], tmp_path / "b", "generation.shard_size=3", n=7)
    other, _ = _run(exported["samplers"], tmp_path / "c", "generation.shard_size=3", "generation.random_seed=1", n=7)
    assert again == records and other != records
