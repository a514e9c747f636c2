"""The Nemotron `sdg/data_designer` step's config shape, read into the project's own (one schema, two readers).

The step writes `models:`, `providers:` and `columns:` as lists of items that carry their own name, samplers in
shorthand (`type: category` with `values:`), and projections by field (`user_field`, `prompt_field`, …). Each
file is translated on its own, before files merge, so a step-shape child can inherit a project-shape parent and
the other way round. A list in a child replaces the parent's whole section, as a YAML list does in the step.
Nothing downstream knows which shape a recipe was written in.
"""

from __future__ import annotations

from typing import Any

from sdg_job.config.schema import OFFLINE_SAMPLERS

# Where the step's providers point when a config names one without declaring it (as the step's own defaults do).
BUILTIN_PROVIDERS = {
    "nvidia": {"endpoint": "https://integrate.api.nvidia.com/v1", "api_key_env": "NVIDIA_API_KEY"},
    "openai": {"endpoint": "${oc.env:OPENAI_BASE_URL,http://localhost:8000/v1}", "api_key_env": "OPENAI_API_KEY"},
}
# The step's field-style projection options, by projection (metadata_fields is the project's own option too).
PROJECTION_FIELDS = {
    "openai_messages": {"system_field": "system", "user_field": "user", "assistant_field": "assistant"},
    "dpo_preference": {"prompt_field": "prompt", "response_a_field": "response_a", "response_b_field": "response_b",
                       "judge_field": "judge", "winner_field": "score"},
    "structured_messages": {"source_field": "source", "messages_field": "messages_key", "tools_field": "tools_key"},
}  # fmt: skip
STEP_OPTIONS = {option for options in PROJECTION_FIELDS.values() for option in options}
SAMPLER_TYPES = OFFLINE_SAMPLERS | {"person"}  # `person` is refused later with the project's own reason
COLUMN_KEYS = {"name", "type", "drop"}


def is_step_shape(cfg: dict[str, Any]) -> bool:
    """A file in the step's shape has at least one of its list sections or field-style projection options."""
    if any(isinstance(cfg.get(k), list) for k in ("models", "providers", "columns")):
        return True
    projection = cfg.get("output_projection")
    return isinstance(projection, dict) and bool(STEP_OPTIONS & set(projection))


def translate(cfg: dict[str, Any], source: str, found: list[tuple[str, str, str]]) -> tuple[dict[str, Any], set[str]]:
    """The file's content in the project's shape, and the sections it replaces outright in its parents. Problems of
    the step's shape go to `found` (source, key, message), the items they are in left out, so that the later
    stages still report theirs in the same run."""
    out = dict(cfg)
    replaced: set[str] = set()
    problems: list[tuple[str, str]] = []
    if isinstance(cfg.get("models"), list):
        out["models"] = _by_name(cfg["models"], "models", "alias", problems, _model)
        replaced.add("models")
    if isinstance(cfg.get("providers"), list):
        out["providers"] = _by_name(cfg["providers"], "providers", "name", problems, _provider)
        replaced.add("providers")
    if isinstance(cfg.get("columns"), list):
        out["columns"] = _by_name(cfg["columns"], "columns", "name", problems, _column)
        replaced.add("columns")
    seed = cfg.get("seed_dataset")
    if isinstance(seed, dict) and "sampler_with_replacement" in seed:
        out["seed_dataset"] = {**seed, "with_replacement": seed["sampler_with_replacement"]}
        del out["seed_dataset"]["sampler_with_replacement"]
    projection = cfg.get("output_projection")
    if isinstance(projection, dict):
        out["output_projection"] = _projection(projection, problems)
        if out["output_projection"] is not projection:
            replaced.add("output_projection")
    found += [(source, key, msg) for key, msg in problems]
    models = out["models"].values() if isinstance(out.get("models"), dict) else ()
    names = {str(m.get("provider")) for m in models if isinstance(m, dict)} | {str(out.get("provider"))}
    builtin = {n: p for n, p in BUILTIN_PROVIDERS.items() if n in names}
    if builtin and isinstance(out.get("providers", {}), dict):
        out["providers"] = {**builtin, **out.get("providers", {})}
    return out, replaced


def _by_name(items: list, section: str, key: str, problems: list, convert) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        where = f"{section}.{i}"
        if not isinstance(item, dict) or not isinstance(item.get(key), str) or not item[key]:
            problems.append((where, f"must be a mapping with a {key!r}"))
            continue
        if item[key] in out:
            problems.append((f"{where}.{key}", f"{item[key]!r} appears twice"))
            continue
        before = len(problems)
        converted = convert({k: v for k, v in item.items() if k != key}, where, problems)
        if len(problems) == before:  # an item with a problem is left out: the schema would only report it again
            out[item[key]] = converted
    return out


def _model(item: dict, where: str, problems: list) -> dict:
    item = dict(item)
    params = item.get("inference_parameters")
    if isinstance(params, dict):  # concurrency is the job's to size, from the server's capacity
        item["inference_parameters"] = {k: v for k, v in params.items() if k != "max_parallel_requests"}
    return item


def _provider(item: dict, where: str, problems: list) -> dict:
    item = dict(item)
    kind = item.pop("provider_type", "openai")
    if kind != "openai":
        problems.append((f"{where}.provider_type", f"{kind!r}: only openai-compatible endpoints are supported"))
    if "api_key" in item:
        item["api_key_env"] = item.pop("api_key")  # the step's api_key is an env-var NAME; a value is refused later
    return item


def _column(item: dict, where: str, problems: list) -> dict:
    kind = item.get("type")
    if isinstance(kind, str) and kind in SAMPLER_TYPES:  # shorthand: `type: category` with its params beside it
        params = {k: v for k, v in item.items() if k not in COLUMN_KEYS and k != "params"}
        if not isinstance(item.get("params") or {}, dict):
            problems.append((f"{where}.params", "must be a mapping"))
            return item
        params |= item.get("params") or {}
        return {"type": "sampler", "sampler_type": kind, "params": params,
                **({"drop": item["drop"]} if "drop" in item else {})}  # fmt: skip
    if kind == "llm_judge" and "output_format" in item and "scores" not in item:
        return {**item, "type": "llm_structured"}  # a judge given as a schema is a structured answer
    return item


def _projection(spec: dict, problems: list) -> dict:
    kind = spec.get("type")
    step_options = {k: v for k, v in spec.items() if k in STEP_OPTIONS}
    if not step_options:
        return spec
    known = PROJECTION_FIELDS.get(str(kind), {})
    for key in step_options.keys() - known.keys():
        problems.append((f"output_projection.{key}", f"not an option of a {kind} projection"))
    out = {k: v for k, v in spec.items() if k not in step_options}
    if kind == "openai_messages":  # one turn per role given, in chat order
        out["messages"] = [{"role": role, "column": step_options[f"{role}_field"]}
                           for role in ("system", "user", "assistant") if f"{role}_field" in step_options]  # fmt: skip
    else:
        out |= {known[k]: v for k, v in step_options.items() if k in known}
    return out
