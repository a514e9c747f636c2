"""Bad input never ends in a traceback: whole classes of malformed recipes, overrides, seed files, step-shape
sections and cluster profiles end in a RecipeError (exit 2, naming the file and the key), never in any other
exception. The bulk runs in-process with hypothesis; a few subprocess runs check the CLI end to end."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.run import load_profile
from sdg_job.config import RECIPES_DIR, load_recipe, recipe_dict, resolve_recipe_path
from sdg_job.errors import RecipeError
from sdg_job.seeds import file_sha256, load_seeds, read_seed_rows
from tests.conftest import REPO, all_files, run_cli

# SDG_FUZZ_SCALE=20 for a longer hunt than the test suite's, on new random examples each time. At the default the
# suite draws the same examples in every run, so CI fails only on a change, never on a draw (hunts find the rest).
SCALE = float(os.environ.get("SDG_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        derandomize=SCALE == 1,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


RECIPES = ("tiny", "default", "rl_pref", "customer_support_tools")

# ---------------------------------------------------------------- strategies

# Keys of both shapes, so random documents reach past "unknown key" into the checks behind it.
KEYS = sorted({
    "defaults", "name", "description", "output_dir", "output_path", "num_records", "provider", "providers", "serve",
    "seed_dataset", "models", "columns", "output_projection", "generation", "path", "strategy", "fields",
    "with_replacement", "sampler_with_replacement", "engine", "model", "served_model_name", "endpoint",
    "api_key_env", "api_key", "provider_type", "alias", "inference_parameters", "max_tokens", "temperature",
    "max_parallel_requests", "skip_health_check", "reasoning", "type", "sampler_type", "params", "values", "weights",
    "drop", "model_alias", "prompt", "system_prompt", "expr", "output_format", "properties", "enum", "scores",
    "options", "messages", "role", "column", "content", "tool_call", "tools", "function", "source", "judge", "score",
    "metadata_fields", "user_field", "system_field", "assistant_field", "prompt_field", "response_a_field",
    "response_b_field", "judge_field", "winner_field", "source_field", "messages_field", "tools_field", "shard_size",
    "budget", "random_seed", "slurm", "docker", "local", "account", "partition", "nodes", "job_dir", "container",
    "container_image", "tunnel", "ssh", "host", "user", "secrets", "num_gpus", "volumes",
})  # fmt: skip
WORDS = [
    "local", "openai", "nvidia", "llama_cpp", "vllm", "simulator", "embedded", "category", "uniform", "person",
    "sampler", "llm_text", "llm_structured", "llm_judge", "expression", "openai_messages", "dpo_preference",
    "structured_messages", "user", "assistant", "system", "shuffle", "ordered", "object", "text", "A", "B", "pyxis",
    "none", "ssh", "{{ topic }}", "{{ ghost }}", "{{ unclosed", "${oc.env:SURELY_UNSET_VAR_42}", "${name}", "${",
    "${oc.env:HOME}", "~nosuchuser/x", "/proc/nope", "/dev/null", "", " ", "nvapi-0123456789", "a\x00b", "\ufeff",
]  # fmt: skip
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS), TEXT,
)  # fmt: skip
KEY = st.one_of(st.sampled_from(KEYS), TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEY, inner, max_size=4)),
    max_leaves=12,
)
JSON_VALUES = st.recursive(  # what a JSON line can hold (no NaN: it equals nothing, so rows would not compare)
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
YAML_PUNCTUATION = list("\n :-[]{},&*!|>'\"#%@`$?\t\\") + ["\n  ", "\n- ", "${", "}}", "{{", "---", "<<: "]
YAML_ISH = st.lists(st.one_of(st.sampled_from(YAML_PUNCTUATION), st.sampled_from(KEYS), TEXT), max_size=40).map("".join)


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _absolute(doc: Any) -> Any:
    """A recipe's relative seed paths and ${oc.env:PWD}, fixed to the repo: a copy elsewhere reaches the same files."""
    text = json.dumps(doc).replace("${oc.env:PWD}", str(REPO)).replace("../seeds/", f"{REPO}/seeds/")
    return json.loads(text)


BASES = [_absolute(yaml.safe_load(p.read_text())) for p in sorted((REPO / "recipes").glob("*.yaml"))]
STEP_SHAPE_BASES = [
    _absolute(yaml.safe_load(p.read_text())) for p in sorted((REPO / "tests/step_shape").glob("*.yaml"))
]


def _paths(doc: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, bases: list[Any]) -> Any:
    """A real recipe with a few random edits: a value replaced, a key or item dropped, a key or item added."""
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last, action = path[-1], draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(KEY)] = draw(VALUES)
        elif isinstance(parent[last], list):
            parent[last].append(draw(VALUES))
    return doc


def _flat_keys(data: Any, prefix: str = "") -> list[str]:
    keys = [prefix] if prefix else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        keys += _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def _outputs_in_tmp(work: Path):
    old = os.environ.get("SDG_OUTPUT_DIR")
    os.environ["SDG_OUTPUT_DIR"] = str(work / "out")
    yield
    if old is None:
        os.environ.pop("SDG_OUTPUT_DIR", None)
    else:
        os.environ["SDG_OUTPUT_DIR"] = old


def bad_input_or_ok(call, *args, **kwargs) -> RecipeError | None:
    """Run a loader: it returns, or raises RecipeError with a message that names where; anything else fails."""
    try:
        call(*args, **kwargs)
    except RecipeError as e:
        assert e.source and str(e).startswith(e.source) and e.message, repr(e)
        return e
    return None


# ---------------------------------------------------------------- recipe files


@fuzz(150)
@given(doc=st.dictionaries(KEY, VALUES, max_size=8), inherit=st.booleans())
def test_random_recipe_documents(work: Path, doc: dict, inherit: bool) -> None:
    path = work / "random.yaml"
    path.write_text(dump({"defaults": ["tiny"], **doc} if inherit and "defaults" not in doc else doc))
    bad_input_or_ok(load_recipe, str(path))


@fuzz(150)
@given(text=YAML_ISH, inherit=st.booleans())
def test_random_yaml_ish_text(work: Path, text: str, inherit: bool) -> None:
    path = work / "yamlish.yaml"
    path.write_text(("defaults: [tiny]\n" if inherit else "") + text)
    bad_input_or_ok(load_recipe, str(path))


@fuzz(150)
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"defaults: [tiny]\n", b"\xff\xfe"]))
def test_random_bytes_as_a_recipe(work: Path, data: bytes, prefix: bytes) -> None:
    path = work / "bytes.yaml"
    path.write_bytes(prefix + data)
    error = bad_input_or_ok(load_recipe, str(path))
    assert error is None or error.source == str(path) or error.source.startswith(str(RECIPES_DIR)), error


@fuzz(200)
@given(doc=mutated(BASES))
def test_real_recipes_with_random_edits(work: Path, doc: Any) -> None:
    load_written(work / "mutated.yaml", doc)


def load_written(path: Path, doc: Any) -> None:
    """Write a fuzzed document as a recipe file and load it: it loads, or is bad input naming where."""
    path.write_text(dump(doc))
    bad_input_or_ok(load_recipe, str(path))


# ---------------------------------------------------------------- overrides

OVERRIDE_KEYS = {name: _flat_keys(recipe_dict(load_recipe(name, check=False))) for name in RECIPES}
SEGMENTS = st.one_of(st.sampled_from(["0", "1", "-1", "99", "x", "type", "name", "path", "1" * 25, ""]), TEXT)


@st.composite
def overrides(draw) -> tuple[str, list[str]]:
    recipe = draw(st.sampled_from(RECIPES))
    real = st.sampled_from(OVERRIDE_KEYS[recipe])
    key = st.one_of(real, st.tuples(real, SEGMENTS).map(".".join), TEXT, st.sampled_from(KEYS))
    value = st.one_of(VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)), YAML_ISH, st.sampled_from(WORDS))
    items = draw(st.lists(st.tuples(key, value).map("=".join), min_size=1, max_size=4))
    return recipe, items + draw(st.lists(st.sampled_from(["justaword", "=x", "a..b=1", "x=&a [*a]"]), max_size=1))


@fuzz(200)
@given(case=overrides())
def test_random_overrides_on_real_recipes(case: tuple[str, list[str]]) -> None:
    recipe, items = case
    error = bad_input_or_ok(load_recipe, recipe, items)
    if error is not None and error.source == str(resolve_recipe_path(recipe)):
        assert error.key or "problems" in error.message or "YAML" in error.message, error


# ---------------------------------------------------------------- seed files

SEED_OBJECTS = st.dictionaries(st.sampled_from(["domain", "topic", "prompt", "x"]) | TEXT, JSON_VALUES, max_size=4)
SEED_LINES = st.one_of(
    SEED_OBJECTS.map(lambda row: ("object", json.dumps(row, ensure_ascii=False))),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: ("other", json.dumps(v))),
    st.sampled_from(["", "  ", "\t", "{not json", "[", "{}", "null", '{"a": "\\ud800"}', "[" * 2000]).map(
        lambda t: ("object" if t in ("", "  ", "\t", "{}") else "other", t)
    ),
    TEXT.map(lambda t: ("other", t)),
)


@fuzz(150)
@given(
    lines=st.lists(SEED_LINES, max_size=8),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252"]),
)
def test_random_seed_files(work: Path, lines: list[tuple[str, str]], newline: str, encoding: str) -> None:
    path = work / "seeds.jsonl"
    path.write_bytes(newline.join(text for _, text in lines).encode(encoding, errors="replace"))
    try:
        rows = read_seed_rows(path)
    except RecipeError as e:
        assert e.source == str(path), e
        rows = None
    # UTF-8 (with or without the BOM) and only objects and blank lines: read exactly, whatever the line endings.
    objects = [json.loads(text) for kind, text in lines if kind == "object" and text.strip()]
    if encoding in ("utf-8", "utf-8-sig") and objects and all(kind == "object" for kind, _ in lines):
        assert rows == objects
    bad_input_or_ok(load_recipe, "tiny", [f"seed_dataset.path={path}"])


@fuzz(150)
@given(data=st.binary(max_size=300), bom=st.booleans())
def test_random_bytes_as_a_seed_file(work: Path, data: bytes, bom: bool) -> None:
    path = work / "bytes.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    error = bad_input_or_ok(read_seed_rows, path, ["domain"])
    assert error is None or error.source == str(path)


def test_bom_seed_file_reads_like_the_same_file_without_it(work: Path) -> None:
    plain, bom = work / "plain.jsonl", work / "bom.jsonl"
    text = '{"domain": "Math", "topic": "primes"}\r\n{"domain": "Art", "topic": "colour"}\r\n'
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert read_seed_rows(bom) == read_seed_rows(plain)
    assert file_sha256(bom) != file_sha256(plain)  # the identity of the file's bytes, as before
    with_bom, without = (load_recipe("tiny", [f"seed_dataset.path={p}"]).seed_dataset for p in (bom, plain))
    assert load_seeds(with_bom) == load_seeds(without)


# ---------------------------------------------------------------- the Nemotron step's shape

STEP_ITEM_KEYS = ["name", "alias", "type", "model", "provider", "endpoint", "api_key", "provider_type", "params",
                  "values", "drop", "prompt", "model_alias", "output_format", "scores", "inference_parameters",
                  "skip_health_check", "sampler_type", "expr"]  # fmt: skip
STEP_ITEMS = st.one_of(st.dictionaries(st.sampled_from(STEP_ITEM_KEYS) | TEXT, VALUES, max_size=6), VALUES)
PROJECTION_KEYS = ["type", "user_field", "system_field", "assistant_field", "prompt_field", "response_a_field",
                   "judge_field", "winner_field", "source_field", "messages_field", "tools_field", "metadata_fields",
                   "messages"]  # fmt: skip
STEP_PROJECTION = st.dictionaries(st.sampled_from(PROJECTION_KEYS), VALUES, max_size=5)


@fuzz(150)
@given(
    sections=st.dictionaries(
        st.sampled_from(["models", "columns", "providers"]), st.lists(STEP_ITEMS, max_size=4), min_size=1
    ),
    projection=st.none() | STEP_PROJECTION,
    extra=st.dictionaries(st.sampled_from(["provider", "seed_dataset", "num_records"]), VALUES, max_size=2),
    parent=st.sampled_from([None, "tiny", "rl_pref"]),
)
def test_random_step_shape_sections(work: Path, sections: dict, projection, extra: dict, parent) -> None:
    doc: dict[str, Any] = {"defaults": [parent]} if parent else {}
    doc |= sections | extra | ({"output_projection": projection} if projection is not None else {})
    load_written(work / "step.yaml", doc)


@fuzz(200)
@given(doc=mutated(STEP_SHAPE_BASES))
def test_step_shape_recipes_with_random_edits(work: Path, doc: Any) -> None:
    load_written(work / "step_mutated.yaml", doc)


@pytest.mark.parametrize("enum", [None, 3, [["A"], "B"]])
def test_judge_enum_not_a_list(work: Path, enum: Any) -> None:
    doc = yaml.safe_load((REPO / "tests/step_shape/rl_pref.yaml").read_text())
    (judge,) = (c for c in doc["columns"] if c.get("type") == "llm_judge")
    judge["output_format"]["properties"]["winner"]["enum"] = enum
    path = work / "judge_enum.yaml"
    path.write_text(dump(_absolute(doc)))
    with pytest.raises(RecipeError, match="output_projection.score"):
        load_recipe(str(path))


# ---------------------------------------------------------------- cluster profiles (launch/run.py --profile)

PROFILE = {"slurm": {"account": "a", "partition": "b", "job_dir": "/x", "container_image": "img"},
           "docker": {"container_image": "img"}, "local": {"job_dir": "./j"}}  # fmt: skip
PROFILE_KEYS = st.sampled_from([*_flat_keys(PROFILE), "slurm.nodes.x", "local.0", "x"])


@fuzz(150)
@given(
    doc=st.one_of(mutated([PROFILE]), VALUES, YAML_ISH, st.binary(max_size=60)),
    items=st.lists(st.tuples(PROFILE_KEYS, YAML_ISH).map("=".join), max_size=2),
    executor=st.sampled_from(["local", "docker", "slurm"]),
)
def test_random_cluster_profiles(work: Path, doc: Any, items: list[str], executor: str) -> None:
    path = work / "profile.yaml"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else dump(doc))
    error = bad_input_or_ok(load_profile, path, items, executor)
    assert error is None or error.source == str(path)


# ---------------------------------------------------------------- the CLI end to end (subprocess)


def test_cli_seed_file_not_utf8_exits_2_naming_file_and_line(tmp_path: Path, out_dir: Path) -> None:
    seeds = tmp_path / "latin1.jsonl"
    seeds.write_bytes(b'{"domain": "Math", "topic": "primes"}\n{"domain": "Caf\xe9", "topic": "menus"}\n')
    result = run_cli("run", "recipe=tiny", f"seed_dataset.path={seeds}", out_dir=out_dir, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{seeds}: line 2: not UTF-8" in result.stderr
    assert all_files(out_dir) == []


def test_cli_seed_file_with_byte_order_mark_is_accepted(tmp_path: Path, out_dir: Path) -> None:
    seeds = tmp_path / "excel.jsonl"
    seeds.write_text('{"domain": "Math", "topic": "primes"}\r\n', encoding="utf-8-sig")
    result = run_cli("validate", "recipe=tiny", f"seed_dataset.path={seeds}", out_dir=out_dir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all_files(out_dir) == []


@pytest.mark.parametrize(
    "override, key, says",
    [
        ("output_dir={tmp}/a_file/sub", "output_dir", "Not a directory"),
        ("output_dir=/proc/nope", "output_dir", "cannot create /proc/nope"),
        ("output_path={tmp}/a_file/x.jsonl", "output_path", "Not a directory"),
        ("output_path={tmp}", "output_path", "is a directory"),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])  # validate refuses what run would
def test_cli_output_path_that_cannot_be_created_exits_2(
    command: str, override: str, key: str, says: str, tmp_path: Path, out_dir: Path
) -> None:
    (tmp_path / "a_file").write_text("a regular file\n")
    result = run_cli(command, "recipe=tiny", override.replace("{tmp}", str(tmp_path)), out_dir=out_dir, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"tiny.yaml: {key}: " in result.stderr and says in result.stderr, result.stderr
    assert all_files(out_dir) == [] and all_files(tmp_path) == [tmp_path / "a_file"]
