"""Recipe loading: inheritance, interpolation, overrides, provider switch, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdg_job.config import (
    DPOPreferenceProjection,
    LLMJudgeColumn,
    LLMStructuredColumn,
    StructuredMessagesProjection,
    load_recipe,
    mask_secrets,
    recipe_hash,
)
from sdg_job.errors import RecipeError
from tests.conftest import TWO_SERVERS

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["default", "tiny", "rl_pref", "customer_support_tools"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.seed_dataset is not None and recipe.seed_dataset.path.is_file()


def test_tiny_inherits_default_and_overrides_size_and_server() -> None:
    default, tiny = load_recipe("default"), load_recipe("tiny")
    assert list(tiny.columns) == list(default.columns)
    assert tiny.columns["user_message"] == default.columns["user_message"]
    assert tiny.num_records == 10 and default.num_records == 1000
    assert tiny.serve is not None and tiny.serve.engine == "llama_cpp" and tiny.serve.model == "embedded"
    assert default.serve is not None and default.serve.engine == "vllm"
    assert tiny.models["text"].inference_parameters.max_tokens == 256
    tiny_params, default_params = tiny.models["text"].inference_parameters, default.models["text"].inference_parameters
    assert tiny_params.temperature == default_params.temperature


def test_child_can_remove_and_retype_inherited_entries() -> None:
    pref = load_recipe("rl_pref")
    assert "user_message" not in pref.columns and "text" not in pref.models
    assert isinstance(pref.output_projection, DPOPreferenceProjection)
    assert isinstance(pref.columns["preference"], LLMJudgeColumn)
    tools = load_recipe("customer_support_tools")
    assert isinstance(tools.output_projection, StructuredMessagesProjection)
    assert isinstance(tools.columns["tool_call"], LLMStructuredColumn)


def test_output_dir_follows_sdg_output_dir_then_nemo_run_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SDG_OUTPUT_DIR", raising=False)
    monkeypatch.setenv("NEMO_RUN_DIR", str(tmp_path / "run"))
    assert load_recipe("tiny").output_path == tmp_path / "run" / "sdg" / "tiny.jsonl"
    monkeypatch.setenv("SDG_OUTPUT_DIR", str(tmp_path / "explicit"))
    assert load_recipe("tiny").output_path == tmp_path / "explicit" / "tiny.jsonl"


def test_overrides_are_nested_and_typed() -> None:
    recipe = load_recipe(
        "tiny",
        [
            "num_records=7",
            "models.text.inference_parameters.temperature=0.25",
            "generation.guided_decoding=false",
            "columns.persona.params.values=[a pirate, a chef]",
            "seed_dataset.strategy=ordered",
        ],
    )
    assert recipe.num_records == 7
    assert recipe.models["text"].inference_parameters.temperature == 0.25
    assert recipe.generation.guided_decoding is False
    assert recipe.columns["persona"].params["values"] == ["a pirate", "a chef"]  # type: ignore[union-attr]
    assert recipe.seed_dataset is not None and recipe.seed_dataset.strategy == "ordered"


def test_provider_is_a_one_word_switch(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-box:8000/v1")
    assert load_recipe("default", ["provider=openai"]).providers["openai"].endpoint == "http://gpu-box:8000/v1"
    assert load_recipe("rl_pref", ["provider=nvidia"]).provider == "nvidia"


def test_each_model_may_name_its_own_provider(tmp_path: Path) -> None:
    """A generator served on the nodes beside a judge at a hosted provider. `provider=` on the command line moves
    every model the files place (what `docker run … provider=openai` relies on); a model's own override stays."""
    own = tmp_path / "mixed.yaml"
    own.write_text("defaults: [rl_pref, layers/cpu]\nmodels:\n  judge: {provider: nvidia}\n")
    mixed = load_recipe(str(own))
    assert [mixed.provider_of(a) for a in ("precise", "creative", "judge")] == ["local", "local", "nvidia"]
    assert mixed.serves_locally and mixed.remote_providers == ["nvidia"]
    assert {load_recipe(str(own), ["provider=openai"]).provider_of(a) for a in mixed.models} == {"openai"}
    kept = load_recipe(str(own), ["provider=openai", "models.creative.provider=nvidia"])
    assert [kept.provider_of(a) for a in ("precise", "creative", "judge")] == ["openai", "nvidia", "openai"]
    with pytest.raises(RecipeError, match="no providers.azure entry") as e:
        load_recipe("rl_pref", ["models.judge.provider=azure"])
    assert e.value.key == "models.judge.provider"
    with pytest.raises(RecipeError, match=r"provider local \(judge\) needs a serve section") as e:
        load_recipe("rl_pref", ["provider=nvidia", "serve=null", "models.judge.provider=local"])
    assert e.value.key == "serve"


def test_recipe_by_path_with_relative_defaults(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("defaults: [rl_pref, layers/cpu]\nname: mine\nnum_records: 3\n")
    recipe = load_recipe(str(own))
    assert recipe.name == "mine" and recipe.serve is not None and recipe.serve.engine == "llama_cpp"
    assert recipe.seed_dataset is not None and recipe.seed_dataset.path == REPO / "seeds" / "pref_prompts.jsonl"


def test_defaults_that_cannot_be_resolved_are_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by tests/test_fuzz.py: an unset variable in `defaults:` ended in an OmegaConf traceback."""
    monkeypatch.delenv("SDG_SURELY_UNSET", raising=False)
    own = tmp_path / "mine.yaml"
    own.write_text("defaults: [tiny, '${oc.env:SDG_SURELY_UNSET}']\n")
    with pytest.raises(RecipeError, match="SDG_SURELY_UNSET") as e:
        load_recipe(str(own))
    assert (e.value.source, e.value.key) == (str(own), "defaults")
    monkeypatch.setenv("SDG_SURELY_UNSET", "layers/cpu")
    assert load_recipe(str(own)).serve.engine == "llama_cpp"  # type: ignore[union-attr]


def test_recipe_hash_ignores_size_but_not_content() -> None:
    base = recipe_hash(load_recipe("tiny"))
    assert recipe_hash(load_recipe("tiny", ["num_records=40"])) == base
    assert recipe_hash(load_recipe("tiny", ["columns.user_message.prompt=Ask about {{ topic }}"])) != base
    # Tuning how the server runs after a crash keeps the finished shards; changing the model does not.
    assert recipe_hash(load_recipe("tiny", ["serve.hang_timeout_s=60", "serve.threads=1"])) == base
    assert recipe_hash(load_recipe("tiny", ["serve.model=/models/other.gguf"])) != base
    assert recipe_hash(load_recipe("tiny", ["serve.parallel=2"])) != base  # llama.cpp: a slot's context size
    # Where and how the records are laid out is not what they are: a moved or re-split output keeps its shards.
    assert recipe_hash(load_recipe("tiny", ["output_path=/elsewhere/t.jsonl", "output_records_per_file=3"])) == base


def test_secret_values_are_refused_and_masked(monkeypatch) -> None:
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-sentinel-0123456789")
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny", ["description=${oc.env:NVIDIA_API_KEY}"])
    assert e.value.key == "description" and "NVIDIA_API_KEY" in str(e.value)
    assert "nvapi-sentinel" not in str(e.value)
    assert mask_secrets({"a": ["x nvapi-sentinel-0123456789 y"]}) == {"a": ["x *** y"]}


def test_a_layer_on_the_command_line_serves_any_recipe_on_the_cpu() -> None:
    """`layer=cpu` is `defaults: [recipe, layers/cpu]` without a file of one's own; overrides still come last."""
    for ref in ("rl_pref", "customer_support_tools", str(REPO / "tests" / "step_shape" / "sft.yaml")):
        recipe = load_recipe(ref, ["layer=cpu"])
        assert recipe.serve is not None and recipe.serve.engine == "llama_cpp" and recipe.serve.gpus == 0, ref
    assert load_recipe("rl_pref", ["layer=cpu", "serve.parallel=2"]).serve.parallel == 2
    assert load_recipe("rl_pref", ["serve.parallel=2", "layer=cpu"]).serve.parallel == 2  # overrides after layers
    with pytest.raises(RecipeError, match=r"layer: no layer 'gpu' \(the shipped ones: cpu, fp8, judge, vllm_cpu\)"):
        load_recipe("rl_pref", ["layer=gpu"])


def test_several_servers_inherit_the_keys_beside_them_and_each_serves_its_aliases() -> None:
    recipe = load_recipe("tiny", [*TWO_SERVERS, "serve.threads=1", "serve.servers.asker.parallel=2"])
    writer, asker = recipe.servers["writer"], recipe.servers["asker"]
    assert list(recipe.servers) == ["writer", "asker"]
    # layers/cpu's keys (under tiny) and the command line's reach both; a server's own keys win.
    assert writer.engine == asker.engine == "llama_cpp" and writer.model == asker.model == "embedded"
    assert writer.threads == asker.threads == 1 and (writer.parallel, asker.parallel) == (4, 2)
    assert (writer.served_model_name, asker.served_model_name) == ("smollm2-135m", "asker")
    assert (recipe.server_of("text"), recipe.server_of("asker")) == ("writer", "asker")
    # A single serve: section is one server for every local model, and its identity is what it was.
    single = load_recipe("tiny")
    assert list(single.servers) == ["server"] and single.servers["server"].aliases == ["text"]
    assert recipe_hash(load_recipe("tiny", ["serve.aliases=[]"])) == recipe_hash(single)
    # How a server runs is operational (resume keeps the shards); what it serves is not.
    assert recipe_hash(load_recipe("tiny", [*TWO_SERVERS, "serve.servers.asker.threads=2"])) == recipe_hash(
        load_recipe("tiny", TWO_SERVERS)
    )
    assert recipe_hash(load_recipe("tiny", [*TWO_SERVERS, "serve.servers.asker.served_model_name=other"])) != (
        recipe_hash(load_recipe("tiny", TWO_SERVERS))
    )
    undone = load_recipe("tiny", [*TWO_SERVERS, "serve.servers=null"])  # how a file undoes a layer's servers
    assert list(undone.servers) == ["server"] and undone.servers["server"].aliases == ["text", "asker"]
    # Models at a remote provider need no server: only the local ones are served.
    mixed = load_recipe("tiny", [*TWO_SERVERS[:2], "models.asker.provider=nvidia"])
    assert list(mixed.servers) == ["server"] and mixed.servers["server"].aliases == ["text"]


def test_the_judge_layer_splits_an_8_gpu_node_between_generator_and_judge() -> None:
    recipe = load_recipe("rl_pref", ["layer=judge"])
    generator, judge = recipe.servers["generator"], recipe.servers["judge"]
    assert generator.aliases == ["precise", "creative"] and judge.aliases == ["judge"]
    assert generator.gpus + judge.gpus == 8 and (judge.tensor_parallel_size, judge.data_parallel_size) == (2, 2)
    assert generator.model == load_recipe("rl_pref").servers["server"].model  # inherited: Nemotron-3-Nano
    assert "--enable-expert-parallel" in generator.extra_args and judge.extra_args == ["--trust-remote-code"]
    assert recipe.models["judge"].reasoning is None and recipe.columns["preference"].system_prompt == "/no_think"
    # A server whose models all go to a remote provider is not started; with every model remote, none is.
    assert list(load_recipe("rl_pref", ["layer=judge", "models.judge.provider=nvidia"]).servers) == ["generator"]
    assert load_recipe("rl_pref", ["layer=judge", "provider=openai"]).servers == {}
