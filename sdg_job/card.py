"""The Hugging Face dataset card (README.md) written beside the output: the Hub and `datasets.load_dataset(dir)` read
its YAML (files, split size, features), and a reader learns from its body how the data was made and what was dropped.

Features follow what `datasets` (5.x) infers from JSON Lines, so the card never contradicts the data: objects whose
keys differ between records (tool parameter schemas, messages with and without `tool_calls`), values of mixed kinds
and empty objects are `json`; ints mixed with floats are `float64`. ISO-8601 strings stay `string` (datasets would
guess `timestamp[s]`; its reader rewrites them either way). The types are found over every record, not a sample (a
type guessed from a few could be wrong for the rest, and then the dataset would not load at all): each shard worker
types its own records (`column_types`, kept in the shard's summary) and the driver merges the shards' types. A run
dir with shards from before that leaves features out, and `datasets` infers them. The body shows a few samples.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeAlias

import yaml
from typing_extensions import TypeAliasType

from sdg_job.config.secrets import mask_secrets

SHOWN = 3  # sample records in the body
CUT = 500  # characters of a long string a sample keeps
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
         (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]  # fmt: skip
TAGS = {"openai_messages": "sft", "dpo_preference": "dpo", "structured_messages": "tool-calling"}

# A dtype name, a struct (field → type) or a list ([element type]). Named with TypeAliasType: pydantic builds no schema
# for a recursive plain alias, and a shard's summary (sdg_job.summary) carries these.
Type = TypeAliasType("Type", "str | dict[str, Type] | list[Type]")
Columns: TypeAlias = dict[str, Type]


def dataset_card(manifest: dict, samples: list[dict], data_files: list[str], columns: Columns | None) -> str:
    """README.md for the output: YAML front matter (configs, features, size, tags, our marker) and the body."""
    front = yaml.safe_dump(_metadata(manifest, data_files, columns), sort_keys=False, allow_unicode=True)
    return mask_secrets(f"---\n{front}---\n\n{_body(manifest, samples[:SHOWN])}")


def is_card_of(text: str, output_name: str) -> bool:
    """Whether a README.md is the card this job wrote for this output (else it is someone else's: leave it)."""
    if not text.startswith("---\n"):
        return False
    try:
        front = yaml.safe_load(text.split("---\n", 2)[1])
    except (yaml.YAMLError, IndexError):
        return False
    return isinstance(front, dict) and (front.get("sdg_job") or {}).get("output") == output_name


def card_places(out: Path) -> tuple[Path, Path]:
    """Where the card of output `out` goes: README.md beside it (what the Hub reads), or `<name>.README.md` when a
    README.md there is not this output's card (a user's, or another recipe's in a shared output dir)."""
    return out.with_name("README.md"), out.with_name(f"{out.stem}.README.md")


def holds_card_of(path: Path, out: Path) -> bool:
    """Whether `path` is this output's card: a regular file of the job's (a link or a directory is someone else's)."""
    if path.is_symlink() or not path.is_file():
        return False
    return is_card_of(path.read_text(errors="replace"), out.name)


def _metadata(manifest: dict, data_files: list[str], columns: Columns | None) -> dict[str, Any]:
    # datasets checks num_examples only when num_bytes is given (JSONL bytes here; its own count is Arrow's)
    split = {"name": "train", "num_examples": manifest["records"], "num_bytes": manifest["output_bytes"]}
    info: dict[str, Any] = {"features": features(columns)} if columns is not None else {}
    projection = manifest["resolved_recipe"]["output_projection"]["type"]
    return {
        "pretty_name": manifest["recipe"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": list(data_files)}]}],
        "dataset_info": {**info, "splits": [split]},
        "size_categories": [size_category(manifest["records"])],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "sdg-job", TAGS.get(projection, projection)],
        "sdg_job": {
            "output": Path(manifest["output_path"]).name,
            "recipe": manifest["recipe"],
            "recipe_sha256": manifest["recipe_sha256"],
            "started_at": manifest.get("started_at"),
        },
    }


def size_category(n: int) -> str:
    return next((name for bound, name in SIZES if n < bound), "n>1T")


# ---------------------------------------------------------------- features


def column_types(records: list[dict]) -> Columns:
    """Each column's type over these records (JSON-serializable, so a shard's summary can carry it)."""
    columns: Columns = {}
    for record in records:
        columns = merge_columns(columns, {key: _infer(value) for key, value in record.items()})
    return columns


def merge_columns(a: Columns, b: Columns) -> Columns:
    """The types of two sets of records together; a column missing from one set is null there."""
    return {key: _merge(a.get(key, "null"), b.get(key, "null")) for key in {**a, **b}}


def features(columns: Columns) -> list[dict]:
    """Column types in the card's YAML form (`dtype: string`, `struct: [...]`, `list: string | [...]`)."""
    return [{"name": name, **_yaml(t)} for name, t in columns.items()]


def _infer(value: Any) -> Type:
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return {bool: "bool", int: "int64", float: "float64", str: "string"}[type(value)]
    if isinstance(value, list):
        element: Type = "null"
        for item in value:
            element = _merge(element, _infer(item))
        return [element]
    if isinstance(value, dict) and value:
        return {k: _infer(v) for k, v in value.items()}
    return "json"  # {} (datasets: an object with no keys) or anything else


def _merge(a: Type, b: Type) -> Type:
    if a == "null" or a == b:
        return b
    if b == "null":
        return a
    if (a, b) in (("int64", "float64"), ("float64", "int64")):
        return "float64"
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _merge(a[k], b[k]) for k in a}
    if isinstance(a, list) and isinstance(b, list):
        return [_merge(a[0], b[0])]
    return "json"  # different keys, or different kinds of value


def _yaml(t: Type) -> dict[str, Any]:
    if isinstance(t, str):
        return {"dtype": t}
    if isinstance(t, dict):
        return {"struct": [{"name": k, **_yaml(v)} for k, v in t.items()]}
    inner = _yaml(t[0])
    return {"list": inner["dtype"] if "dtype" in inner else inner.get("struct", inner)}


# ---------------------------------------------------------------- body


def _body(m: dict, samples: list[dict]) -> str:
    description = str(m["resolved_recipe"].get("description") or "").strip()
    parts = [f"# {m['recipe']}", description, _made(m), _counts(m), _charts(m), _samples(samples)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _charts(m: dict) -> str:
    """The report's charts, as PNG files beside the card (sdg_job.report)."""
    charts = m.get("report_charts") or {}
    if not charts:
        return ""
    lines = ["## Charts", f"The whole report: `{m.get('report')}` (one HTML page, readable offline).", ""]
    return "\n".join(lines + [f"![{title}]({name})" for name, title in charts.items()])


def _made(m: dict) -> str:
    v = m.get("versions", {})
    lines = [
        "## How it was made",
        f"Generated by sdg-job {v.get('sdg-job', '?')} with "
        f"data-designer {v.get('data-designer', '?')} (Python {v.get('python', '?')}), status `{m.get('status')}`, "
        f"started {m.get('started_at')}, wall time {m.get('wall_time_s')} s.",
        "",
        f"- recipe: `{m['recipe_file']}` (sha256 `{m['recipe_sha256']}`)",
        f"- provider: `{m['provider']}`",
    ]
    usage = m.get("usage") or {}
    for alias, model in m.get("models", {}).items():
        params = {k: x for k, x in (model.get("inference_parameters") or {}).items() if x is not None}
        extra = "".join(f", {k} {model[k]}" for k in ("provider", "server", "reasoning") if model.get(k))
        if used := usage.get(alias):
            extra += (f", {used.get('requests', 0)} requests ({used.get('input_tokens', 0)} tokens in, "
                      f"{used.get('output_tokens', 0)} out)")  # fmt: skip
        lines.append(f"- model `{alias}`: `{model['model']}`{extra}, inference parameters `{json.dumps(params)}`")
    if servers := _servers(m.get("servers") or []):
        lines.append(f"- servers: {servers}")
    if seed := m.get("seed"):
        name = str(seed["path"]).rsplit("/", 1)[-1]
        lines.append(f"- seed: `{name}` (sha256 `{seed['sha256']}`, {seed['rows']} rows, {seed['strategy']})")
    return "\n".join(lines)


def _servers(servers: list[dict]) -> str:
    """The job's own servers, as every node ran them: `2 node(s) × gen (vllm: precise, creative) + judge (…)`, or
    `2 node(s) × vllm` for the one server of a single `serve:` section."""
    per_node: dict[str, list[str]] = {}
    for s in servers:
        name, aliases = s.get("name", "server"), ", ".join(s.get("aliases") or [])
        what = s["engine"] if name == "server" else f"{name} ({s['engine']}: {aliases})"
        per_node.setdefault(s.get("node_id") or "", []).append(what)
    if not per_node:
        return ""
    layouts = sorted({" + ".join(names) for names in per_node.values()})
    return f"{len(per_node)} node(s) × " + "; ".join(layouts)


def _kind(reason: str) -> str:
    if reason.startswith("filter:"):
        return "filter"
    return reason if reason in ("truncated", "duplicate") else "quality gate"


def _counts(m: dict) -> str:
    dropped: dict[str, int] = m.get("dropped") or {}
    tokens = m.get("tokens") or {}
    lines = [
        "## Counts",
        f"{m['records']} records of {m['num_records']} asked for; {m.get('attempted')} rows attempted, "
        f"{m.get('generated')} generated, {sum(dropped.values())} dropped. "
        f"Tokens: {tokens.get('input')} in, {tokens.get('output')} out.",
    ]
    if lengths := m.get("record_tokens"):
        lines += ["", f"Tokens per record, as a trainer sees it (counted by {lengths['tokenizer']}; a DPO pair: its "
                  f"longer side): min {lengths['min']}, p50 {lengths['p50']}, p95 {lengths['p95']}, max "
                  f"{lengths['max']}. A `max_length` below a record's count cuts that record."]  # fmt: skip
    else:
        lines += ["", "Tokens per record: not counted (the job counts them only with a model it serves)."]
    if diversity := m.get("diversity"):
        text = diversity["generated_text"]
        lines += ["", f"Diversity: {diversity['near_duplicates']} near-duplicates passed over; distinct-1 "
                  f"{text['distinct_1']}, distinct-2 {text['distinct_2']} of the generated text (first "
                  f"{text['records']} records)."]  # fmt: skip
        for name, spread in diversity["samplers"].items():
            shown = (", ".join(f"{v} {n}" for v, n in list(spread["counts"].items())[:8]) if "counts" in spread
                     else f"min {spread['min']}, mean {spread['mean']}, max {spread['max']}")  # fmt: skip
            lines.append(f"- sampler `{name}`: {shown}")
    for found in m.get("decontamination") or []:
        name = str(found["path"]).rsplit("/", 1)[-1]
        lines.append(f"- decontaminated against `{name}` (sha256 `{found['sha256']}`): {found['records_removed']} "
                     "records removed")  # fmt: skip
    if dropped:
        kinds: dict[str, int] = {}
        for reason, n in dropped.items():
            kinds[_kind(reason)] = kinds.get(_kind(reason), 0) + n
        by_kind = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda x: (-x[1], x[0])))
        lines += ["", f"Dropped by kind: {by_kind}.", "", "| reason | kind | count |", "|---|---|---:|"]
        for reason, n in sorted(dropped.items(), key=lambda x: (-x[1], x[0])):
            lines.append(f"| `{reason}` | {_kind(reason)} | {n} |")
    return "\n".join(lines)


def _samples(samples: list[dict]) -> str:
    blocks = ["## Samples"] + [_fenced(json.dumps(_cut(s), indent=2, ensure_ascii=False)) for s in samples]
    return "\n\n".join(blocks) if samples else ""


def _fenced(text: str) -> str:
    """A ```json block whose fence is longer than any run of backticks inside (a record may quote markdown)."""
    fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", text)), default=0))
    return f"{fence}json\n{text}\n{fence}"


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CUT:
        return value[:CUT] + "…"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value
