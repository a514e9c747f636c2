"""Bad input → exit 2, a message naming the file and the key, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, all_files, run_cli

GOOD_SEED = '{"domain": "Math", "topic": "primes"}\n'
CASES = {
    # name: (args, files to create in tmp, text the error must contain)
    "unknown_top_level_key": (["colour=blue"], {}, "colour"),
    "unknown_column_key": (["columns.user_message.promt=hi"], {}, "columns.user_message.promt"),
    "template_names_unknown_field": (["columns.user_message.prompt=Ask about {{ planet }}"], {}, "planet"),
    "template_names_later_column": (
        ["columns.user_message.prompt={{ assistant_message }}"],
        {},
        "columns.user_message.prompt",
    ),
    "jinja_syntax_error": (["columns.user_message.prompt=Ask {{ topic"], {}, "columns.user_message.prompt"),
    "unknown_model_alias": (["columns.user_message.model_alias=ghost"], {}, "columns.user_message.model_alias"),
    "projection_names_missing_column": (
        ["output_projection.messages.0.column=ghost"],
        {},
        "output_projection.messages.0.column",
    ),
    "seed_file_missing": (["seed_dataset.path=/nonexistent/seeds.jsonl"], {}, "/nonexistent/seeds.jsonl"),
    "seed_line_not_json": (
        ["seed_dataset.path={tmp}/seeds.jsonl"],
        {"seeds.jsonl": GOOD_SEED + "{not json\n"},
        "line 2",
    ),
    "seed_line_missing_field": (
        ["seed_dataset.path={tmp}/seeds.jsonl"],
        {"seeds.jsonl": GOOD_SEED * 3 + '{"domain": "Art"}\n'},
        "line 4",
    ),
    "seed_without_field_a_prompt_uses": (
        ["seed_dataset.path={tmp}/seeds.jsonl"],
        {"seeds.jsonl": '{"domain": "Math"}\n'},
        "topic",
    ),
    "pasted_api_key": (["providers.nvidia.api_key_env=nvapi-abcdef123456"], {}, "providers.nvidia.api_key_env"),
    "secret_value_interpolated": (["description=${oc.env:MY_SERVICE_TOKEN}"], {}, "MY_SERVICE_TOKEN"),
    "zero_records": (["num_records=0"], {}, "num_records"),
    "bad_seed_strategy": (["seed_dataset.strategy=random"], {}, "seed_dataset.strategy"),
    "bad_sampler_params": (["columns.persona.params.values=[]"], {}, "columns.persona.params"),
    "sampler_that_downloads": (["columns.persona.sampler_type=person"], {}, "columns.persona.sampler_type"),
    "local_provider_without_serve": (["serve=null"], {}, "serve"),
    "server_of_an_unknown_alias": (["serve.servers.a.aliases=[ghost]"], {}, "serve.servers.a.aliases: unknown"),
    "local_model_no_server_serves": (
        ["models.asker.model=x", "columns.user_message.model_alias=asker", "serve.servers.a.aliases=[text]"],
        {},
        "models.asker: provider local, but no server serves it",
    ),
    "alias_on_two_servers": (
        ["serve.servers.a.aliases=[text]", "serve.servers.b.aliases=[text]"],
        {},
        "serve.servers.b.aliases: text is served by a already",
    ),
    "server_name_not_a_name": (
        ["recipe={tmp}/two.yaml"],
        {"two.yaml": "defaults: [tiny]\nserve:\n  servers:\n    '../x': {aliases: [text]}\n"},
        "server name '../x'",
    ),
    "server_key_of_another_kind": (
        ["serve.servers.a.aliases=[text]", "serve.servers.a.extra_args={k: 1}"],
        {},
        "serve.servers.a.extra_args",
    ),
    "hub_id_for_llama_cpp": (["recipe=rl_pref", "layer=judge", "layer=cpu"], {}, "serve.servers.judge.model"),
    "server_key_out_of_range": (
        ["serve.servers.a.aliases=[text]", "serve.servers.a.tensor_parallel_size=0"],
        {},
        "serve.servers.a.tensor_parallel_size",
    ),
    "unknown_provider": (["provider=azure"], {}, "provider"),
    "missing_env_interpolation": (["output_dir=${oc.env:SURELY_UNSET_VAR_42}"], {}, "output_dir"),
    "override_without_equals": (["justaword"], {}, "justaword"),
    "recipe_not_found": (["recipe=no_such_recipe"], {}, "no_such_recipe"),
    "malformed_yaml": (["recipe={tmp}/broken.yaml"], {"broken.yaml": "name: [unclosed\n"}, "broken.yaml"),
    "inheritance_cycle": (["recipe={tmp}/a.yaml"], {"a.yaml": "defaults: [b]\n", "b.yaml": "defaults: [a]\n"}, "cycle"),
    "judge_options_not_a_b": (
        ["recipe=rl_pref", "columns.preference.scores.0.options={X: x, Y: y}"],
        {},
        "output_projection.score",
    ),
    "tool_call_column_not_structured": (
        ["recipe=customer_support_tools", "output_projection.messages.2.tool_call=customer_message"],
        {},
        "output_projection.messages.2.tool_call",
    ),
    "recipe_is_a_list": (["recipe={tmp}/list.yaml"], {"list.yaml": "- tiny\n"}, "a recipe must be a mapping"),
    # Each of these ended in a traceback (sampler=1: in an error without its key) until issue 12; most were found by
    # tests/test_fuzz.py.
    "recipe_not_utf8": (["recipe={tmp}/latin1.yaml"], {"latin1.yaml": b"defaults: [tiny]\nname: caf\xe9\n"}, "UTF-8"),
    "override_indexes_a_list_by_name": (["output_projection.messages.user=x"], {}, "output_projection.messages.user"),
    "output_dir_of_unknown_user": (["output_dir=~nosuchuser/out"], {}, "output_dir"),
    "unknown_key_named_like_a_column_type": (["sampler=1"], {}, "tiny.yaml: sampler: Extra inputs"),
    "step_shape_params_not_a_mapping": (
        ["recipe={tmp}/step.yaml"],
        {"step.yaml": "defaults: [tiny]\ncolumns:\n  - {name: tone, type: category, params: 3}\n"},
        "columns.0.params",
    ),
    "step_shape_model_provider_not_a_name": (
        ["recipe={tmp}/step.yaml"],
        {"step.yaml": "defaults: [tiny]\nmodels:\n  - {alias: text, model: m, provider: [local]}\n"},
        "models.text.provider",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(case: str, tmp_path: Path, out_dir: Path) -> None:
    args, files, must_mention = CASES[case]
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("recipe=") for a in args):
        args = ["recipe=tiny", *args]
    env = {"MY_SERVICE_TOKEN": "s3cr3t-value-that-must-not-leak"}
    result = run_cli("run", *args, out_dir=out_dir, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert must_mention in result.stderr
    assert "s3cr3t-value" not in result.stderr + result.stdout
    # the message names the recipe file (or the seed file / command line it came from)
    assert any(s in result.stderr for s in (".yaml", ".jsonl", "command line", "environment")), result.stderr
    assert all_files(out_dir) == []
    assert not (REPO / "output").exists() or case != "zero_records"


def test_nvidia_provider_without_key_exits_2_before_writing(out_dir: Path) -> None:
    result = run_cli("run", "recipe=tiny", "provider=nvidia", out_dir=out_dir, env={"NVIDIA_API_KEY": ""})
    assert result.returncode == 2 and "NVIDIA_API_KEY" in result.stderr
    assert all_files(out_dir) == []


def test_offline_vllm_without_staged_weights_exits_2_before_writing(out_dir: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("run", "recipe=default", out_dir=out_dir, env=env)
    assert result.returncode == 2, result.stderr
    assert f"NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 is not staged in {tmp_path}/hf/hub" in result.stderr
    assert all_files(out_dir) == []


def test_validate_prints_resolved_recipe_with_secrets_masked(out_dir: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-live-1234567890"}
    result = run_cli("validate", "recipe=customer_support_tools", out_dir=out_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert "api_key_env: OPENAI_API_KEY" in result.stdout
    assert "sk-live" not in result.stdout
    assert f"output_path: {out_dir}/customer_support_tools.jsonl" in result.stdout
    assert all_files(out_dir) == []


def test_validate_checks_the_output_path_and_leaves_nothing(tmp_path: Path, out_dir: Path) -> None:
    """A new output dir is tried for real (made, written, removed again); a path under a regular file is refused."""
    fresh = tmp_path / "new" / "deeper"
    result = run_cli("validate", "recipe=tiny", f"output_dir={fresh}", out_dir=out_dir)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "new").exists()
    result = run_cli("validate", "recipe=tiny", "output_path=/etc/passwd/x.jsonl", out_dir=out_dir)
    assert result.returncode == 2 and "output_path: cannot create /etc/passwd" in result.stderr, result.stderr


STEP_SHAPE_WITH_PROBLEMS_AT_EVERY_STAGE = """\
output_dir: ${oc.env:SDG_OUTPUT_DIR}
output_path: ${output_dir}/broken.jsonl
seed_dataset: {path: {seeds}, fields: [domain, topic]}
num_records: -5
providers:
  - {name: p, endpoint: "http://127.0.0.1:9/v1", provider_type: anthropic}
models:
  - {alias: text, model: m, provider: local-vllm, inference_parameters: {temperature: hot}}
columns:
  - {type: category, values: [a, b]}
  - {name: persona, type: category, values: [a, b], colour: blue}
  - {name: question, type: llm_text, model_alias: text, prompt: "A question about {{ subject }}"}
  - {name: answer, type: llm_text, model_alias: writer, prompt: "{{ question }}"}
output_projection:
  type: openai_messages
  user_field: question
  assistant_field: reply
"""


def test_every_problem_of_a_config_is_listed_in_one_run(tmp_path: Path, out_dir: Path) -> None:
    """Problems of the step's shape, of the schema and of the cross-checks, all in one message, each with its key."""
    config = tmp_path / "broken.yaml"
    config.write_text(
        STEP_SHAPE_WITH_PROBLEMS_AT_EVERY_STAGE.replace("{seeds}", str(REPO / "seeds" / "sft_topics.jsonl"))
    )
    for command in ("validate", "run"):
        result = run_cli(command, f"recipe={config}", out_dir=out_dir, timeout=120)
        assert result.returncode == 2, result.stderr
        said = result.stderr
        assert "Traceback" not in said and f"error: {config}: " in said, said
        for key in ("columns.0: must be a mapping with a 'name'",  # the step's shape
                    "providers.0.provider_type: 'anthropic'",
                    "num_records: Input should be greater than or equal to 1",  # the schema
                    "models.text.inference_parameters.temperature",
                    "columns.persona.params.colour: Extra inputs are not permitted",
                    "columns.question.prompt: refers to ['subject']",  # the cross-checks
                    "columns.answer.model_alias: unknown model alias 'writer'",
                    "output_projection.messages.1.column: 'reply' is not a column"):  # fmt: skip
            assert key in said, f"{key!r} missing from:\n{said}"
        assert all_files(out_dir) == []
