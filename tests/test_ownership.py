"""The job writes only where nothing is, or where its own earlier run of the same output left its files as it left
them; it never writes over one of its inputs; a secret in any shape is refused, and appears in no file or output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdg_job.config import load_recipe, resolve_recipe_path
from sdg_job.errors import RecipeError
from sdg_job.job import Job
from sdg_job.outputs import check_output_path
from sdg_job.publish import finish
from tests.conftest import REPO, all_files, read_jsonl, run_cli

SENTINEL = "s3cr3t-SENTINEL-ownership-0123456789"
SEEDS = REPO / "seeds" / "sft_topics.jsonl"


def tree(root: Path) -> dict[str, object]:
    """Every entry under `root`, not following links: a file's SHA-256, a link's target, a directory."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of tiny (3 records, on the embedded model): the job's own files as a later run of the same output
    finds them."""
    out = tmp_path_factory.mktemp("earlier")
    result = run_cli("run", "recipe=tiny", "num_records=3", f"output_path={out}/data.jsonl", out_dir=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---------------------------------------------------------------- the three cases, through the CLI


def test_a_typo_in_output_path_does_not_replace_the_users_file(tmp_path: Path) -> None:
    precious = tmp_path / "precious.jsonl"
    precious.write_text("precious data\n")
    before = tree(tmp_path)
    for command in ("validate", "run"):
        result = run_cli(command, "recipe=tiny", "num_records=3", f"output_path={precious}", out_dir=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"output_path: {precious} exists and is not this job's output" in result.stderr
        assert "output.overwrite=true" in result.stderr
        assert tree(tmp_path) == before


@pytest.mark.parametrize("shape", ["same", "symlink", "hard_link", "dotdot", "inside_run_dir"])
def test_an_output_is_never_an_input(shape: str, tmp_path: Path) -> None:
    seed = tmp_path / "seeds.jsonl"
    shutil.copy(SEEDS, seed)
    (tmp_path / "sub").mkdir()
    output = {"same": seed, "symlink": tmp_path / "link.jsonl", "hard_link": tmp_path / "hard.jsonl",
              "dotdot": tmp_path / "sub" / ".." / "seeds.jsonl",
              "inside_run_dir": tmp_path / "x.jsonl"}[shape]  # fmt: skip
    if shape == "symlink":
        output.symlink_to(seed)
    elif shape == "hard_link":
        os.link(seed, output)
    elif shape == "inside_run_dir":  # --fresh empties the run dir: an input there would be lost
        (tmp_path / ".x.run").mkdir()
        seed = tmp_path / ".x.run" / "seeds.jsonl"
        shutil.copy(SEEDS, seed)
    before = tree(tmp_path)
    for command in ("validate", "run"):
        args = ["recipe=tiny", f"seed_dataset.path={seed}", f"output_path={output}", "output.overwrite=true"]
        result = run_cli(command, *args, out_dir=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "is an input of the run (seed_dataset.path" in result.stderr or "is inside" in result.stderr
        assert tree(tmp_path) == before


def test_the_recipe_file_itself_is_an_input(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"defaults: [tiny]\noutput_path: {recipe}\n")
    result = run_cli("run", f"recipe={recipe}", out_dir=tmp_path)
    assert result.returncode == 2 and "is an input of the run (recipe" in result.stderr, result.stderr
    assert recipe.read_text() == f"defaults: [tiny]\noutput_path: {recipe}\n"


def test_a_name_cannot_lead_outside_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    result = run_cli("run", "recipe=tiny", "name=../../x", out_dir=out)
    assert result.returncode == 2 and "name: " in result.stderr and "is not a file name" in result.stderr
    assert all_files(tmp_path) == []


@pytest.mark.e2e
def test_overwrite_moves_the_users_file_aside_and_a_rerun_resumes_over_its_own_output(tmp_path: Path) -> None:
    out = tmp_path / "data.jsonl"
    out.write_text("precious data\n")
    args = ["recipe=tiny", "num_records=3", f"output_path={out}", "output.overwrite=true"]
    result = run_cli("run", *args, out_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (aside,) = tmp_path.glob("data.jsonl.replaced-*")
    assert aside.read_text() == "precious data\n" and "moved the output" in result.stderr
    records = read_jsonl(out)
    assert len(records) == 3
    result = run_cli("run", *args[:-1], out_dir=tmp_path)  # the job's own output now: resumed, no refusal
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming: " in result.stderr and read_jsonl(out) == records
    assert aside.read_text() == "precious data\n" and len(list(tmp_path.glob("*.replaced-*"))) == 1
    with out.open("a") as f:  # the user edits the output in place: no longer what the job wrote
        f.write('{"messages": []}\n')
    edited = out.read_bytes()
    result = run_cli("run", *args[:-1], out_dir=tmp_path)
    assert result.returncode == 2 and f"{out} exists and is not this job's output" in result.stderr
    assert out.read_bytes() == edited


# ---------------------------------------------------------------- every shape of path, one property

NAMES = {"output": "data.jsonl", "part": "data-00000-of-00002.jsonl", "partial": "data.jsonl.partial",
         "manifest": "data.manifest.json", "readme": "README.md", "own_card": "data.README.md",
         "run_dir": ".data.run"}  # fmt: skip
OURS = ("output", "manifest", "readme", "run_dir")  # what the earlier run left (one file: num_records 3 in one)
STATES = ["absent", "user_file", "user_dir", "link_to_user_file", "ours"]
SHAPES = ["absolute", "relative", "dotdot", "trailing_slash", "through_a_linked_dir"]


def _lay_out(root: Path, earlier: Path, states: dict[str, str]) -> Path:
    """The output dir `root/d` with each place in its state; user files hold unique bytes; `root/elsewhere` holds
    what links point at."""
    d, elsewhere = root / "d", root / "elsewhere"
    d.mkdir()
    elsewhere.mkdir()
    (d / "sub").mkdir()
    (root / "linked").symlink_to(d)
    for place, state in states.items():
        path = d / NAMES[place]
        if state == "user_file":
            path.write_text(f"the user's own {place}\n")
        elif state == "user_dir":
            path.mkdir()
            (path / "notes.txt").write_text(f"the user's notes in {place}\n")
        elif state == "link_to_user_file":
            (elsewhere / place).write_text(f"the user's file behind a link at {place}\n")
            path.symlink_to(elsewhere / place)
        elif state == "ours":
            source = earlier / NAMES[place]
            if source.is_dir():
                shutil.copytree(source, path, symlinks=True)
            else:
                shutil.copy2(source, path)  # keeps the modification time the job recorded
    return d


def _output_path(shape: str, d: Path) -> str:
    return {"absolute": f"{d}/data.jsonl", "relative": "data.jsonl", "dotdot": f"{d}/sub/../data.jsonl",
            "trailing_slash": f"{d}/data.jsonl/",
            "through_a_linked_dir": f"{d.parent}/linked/data.jsonl"}[shape]  # fmt: skip


def _finish_like_a_run(recipe, source: str) -> None:
    """What a run writes once its shards are done (publish.finish: merge, card, manifest), over what the store holds."""
    job = Job(recipe, source, fresh=False)
    done = job.store.unique_count(job.committed_ids(), recipe.num_records)[0] == recipe.num_records
    now = datetime.now(timezone.utc)
    finish(job, "complete" if done else "budget_exhausted", None, [], now, time.monotonic(), time.process_time(), {})


def _users(states: dict[str, str]) -> list[str]:
    """The user's files of a layout (paths under the temp root): what no run may lose."""
    found = []
    for place, state in states.items():
        if state == "user_file":
            found.append(f"d/{NAMES[place]}")
        elif state == "user_dir":
            found.append(f"d/{NAMES[place]}/notes.txt")
        elif state == "link_to_user_file":
            found += [f"d/{NAMES[place]}", f"elsewhere/{place}"]  # the link itself, and the file behind it
    return found


def _strangers(states: dict[str, str], in_parts: bool) -> list[str]:
    """The places a run writes, as the README promises them, that hold what the job did not write: the output (or
    its parts), the partial output, the manifest, the run dir, and the card (README.md only if it is the job's,
    else data.README.md). An earlier output is the job's only while its manifest or run dir is there."""
    vouched = "ours" in (states["manifest"], states["run_dir"])
    writes = ["part" if in_parts else "output", "partial", "manifest", "run_dir"]
    if states["readme"] not in ("absent", "ours"):
        writes.append("own_card")
    return [p for p in writes if states[p] != "absent" and not (states[p] == "ours" and (p != "output" or vouched))]


def _layout(**states: str) -> dict[str, str]:
    return {place: states.get(place, "absent") for place in NAMES}


@pytest.mark.e2e  # its layouts hold a real run's files
@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.sampled_from(SHAPES),
    states=st.fixed_dictionaries({place: st.sampled_from(STATES if place in OURS else STATES[:-1]) for place in NAMES}),
    overwrite=st.booleans(),
    in_parts=st.booleans(),
)
# The user's file where the job's output was, with the job's manifest, or its run dir, still beside it.
@example(shape="absolute", states=_layout(output="user_file", manifest="ours"), overwrite=False, in_parts=False)
@example(shape="relative", states=_layout(output="user_file", run_dir="ours"), overwrite=True, in_parts=False)
def test_no_run_writes_over_what_it_did_not_write(
    earlier_run: Path, shape: str, states: dict[str, str], overwrite: bool, in_parts: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        d = _lay_out(root, earlier_run, states)
        os.chdir(d)  # where a relative output_path starts
        before = tree(root)
        overrides = [f"output_path={_output_path(shape, d)}", f"output_dir={d}", "num_records=3",
                     f"output.overwrite={str(overwrite).lower()}"]  # fmt: skip
        if in_parts:
            overrides.append("output_records_per_file=2")
        recipe = load_recipe("tiny", overrides)
        source = str(resolve_recipe_path("tiny"))
        strangers = _strangers(states, in_parts)
        directory_at_output = states["output"] == "user_dir"  # bad input, overwrite or not
        try:
            check_output_path(recipe, source, create=True)
        except RecipeError:
            assert directory_at_output or (strangers and not overwrite), (strangers, overwrite)
            assert tree(root) == before  # refused: nothing changed at all
            return
        assert not directory_at_output and (overwrite or not strangers), f"ran over {strangers}"
        _finish_like_a_run(recipe, source)
        after = tree(root)
        moved = {after[k] for k in after if ".replaced-" in k}
        for key in _users(states):  # every byte of the user's is still there: in place, or moved aside with overwrite
            if after.get(key) != before[key]:
                assert overwrite and key.startswith("d/"), f"{key} changed without output.overwrite"
                assert before[key] in moved, f"{key} is lost"


# ---------------------------------------------------------------- secrets in every shape


SHAPES_OF_A_SECRET = {
    "url_userinfo": [f"providers.openai.endpoint=http://user:{SENTINEL}@127.0.0.1:9/v1", "provider=openai"],
    "url_token_as_user": [f"providers.openai.endpoint=https://{SENTINEL}@example.invalid/v1", "provider=openai"],
    "extra_body_key": [f"models.text.inference_parameters.extra_body={{api_key: {SENTINEL}}}"],
    "extra_body_header": [
        f"models.text.inference_parameters.extra_body={{headers: {{Authorization: 'Bearer {SENTINEL}'}}}}"
    ],
    "extra_args_flag": [f"serve.extra_args=[--api-key,{SENTINEL}]"],
    "extra_args_flag_equals": [f"serve.extra_args=[--hf-token={SENTINEL}]"],
    "serve_env": [f"serve.env={{HF_TOKEN: {SENTINEL}}}"],
    "env_value_inlined": ["description=${oc.env:MY_SERVICE_TOKEN}"],
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(SHAPES_OF_A_SECRET))
def test_a_secret_in_any_shape_is_refused_and_never_shown(shape: str, tmp_path: Path) -> None:
    for command in ("validate", "run"):
        result = run_cli(command, "recipe=tiny", *SHAPES_OF_A_SECRET[shape], out_dir=tmp_path,
                         env={"MY_SERVICE_TOKEN": SENTINEL})  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert SENTINEL not in result.stdout + result.stderr
        assert "env" in result.stderr.lower() and "Traceback" not in result.stderr, result.stderr
        assert all_files(tmp_path) == []


def test_all_secrets_of_a_recipe_are_listed_in_one_run(tmp_path: Path) -> None:
    args = [arg for shape in ("url_userinfo", "extra_body_key", "serve_env") for arg in SHAPES_OF_A_SECRET[shape]]
    result = run_cli("validate", "recipe=tiny", *args, out_dir=tmp_path)
    assert result.returncode == 2 and "3 problems" in result.stderr, result.stderr
    for key in (
        "providers.openai.endpoint",
        "models.text.inference_parameters.extra_body.api_key",
        "serve.env.HF_TOKEN",
    ):
        assert key in result.stderr
    assert SENTINEL not in result.stderr
