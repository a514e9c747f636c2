"""A Data Designer config file as a recipe: what `DataDesignerConfigBuilder.write_config` writes (`data_designer:`
and `library_version:`, YAML or JSON), read unchanged on top of recipes/base.yaml (where the output lands, the
providers, the server each node runs).

- Its columns are keyed by name in the recipe, in their order: `data_designer.columns.NAME.prompt=…` overrides one.
- Its model aliases become the recipe's `models`: the file's own `model_configs`, and for an alias it uses without
  defining (the builder's defaults, `openai-text`, `nvidia-reasoning`, …) Data Designer's built-in setting for it.
  `layer=cpu` or `provider=local` route every alias to the job's own servers.
- A `seed_config` of a local JSON Lines file becomes the job's `seed_dataset` (sharded as every recipe's seeds).
- Everything else (constraints, processors, profilers, tool configs) goes to Data Designer as written.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from sdg_job.config.schema import (
    ExpressionColumn,
    LLMJudgeColumn,
    LLMStructuredColumn,
    Recipe,
    SamplerColumn,
)

DD_KEYS = {"data_designer", "library_version"}
Problems = list[tuple[str, str, str]]


def is_dd_config(cfg: dict[str, Any]) -> bool:
    """A file written by Data Designer: its two top-level keys, and nothing of the job's beside them."""
    return isinstance(cfg.get("data_designer"), dict) and "library_version" in cfg


def read_dd_config(path: Path) -> dict[str, Any] | None:
    """The file's content if Data Designer wrote it, else None (and the job's reader takes it, errors and all).
    Read as plain YAML: a prompt's `${{ price }}` is Data Designer's text, not an OmegaConf interpolation."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) and is_dd_config(data) else None


def escape_interpolation(data: Any) -> Any:
    """Strings kept literal by OmegaConf (`${` → `\\${`), so they reach Data Designer as written."""
    if isinstance(data, dict):
        return {k: escape_interpolation(v) for k, v in data.items()}
    if isinstance(data, list):
        return [escape_interpolation(v) for v in data]
    return data.replace("${", "\\${") if isinstance(data, str) else data


def installed_version() -> str | None:
    try:
        return version("data-designer")
    except PackageNotFoundError:
        return None


def translate(cfg: dict[str, Any], source: str, found: Problems) -> dict[str, Any]:
    """The file as a recipe of the job's shape; problems go to `found` (source, key, message)."""
    _check_version(cfg.get("library_version"), source, found)
    dd = dict(cfg["data_designer"])
    columns = _columns_by_name(dd.get("columns"), source, found)
    models = _models(dd.pop("model_configs", None) or [], columns, source, found)
    out: dict[str, Any] = {"defaults": ["base"], "name": Path(source).stem, "num_records": 10}
    out |= {k: v for k, v in cfg.items() if k not in DD_KEYS}  # the job's own keys may sit beside it
    out["models"] = models
    seed = dd.pop("seed_config", None)
    if seed:
        out["seed_dataset"] = _seed_dataset(seed, source, found)
    out["data_designer"] = {**dd, "columns": columns}
    return out


def _check_version(written: Any, source: str, found: Problems) -> None:
    installed = installed_version()
    if installed is None:
        return
    series = ".".join(installed.split(".")[:2])
    if not isinstance(written, str) or written.split(".")[:2] != installed.split(".")[:2]:
        found.append((source, "library_version", f"written by Data Designer {written}; this job runs Data Designer "
                                                 f"{installed} and takes configs of {series}.x: export it again with "
                                                 "that version"))  # fmt: skip


def _columns_by_name(columns: Any, source: str, found: Problems) -> dict[str, Any]:
    if not isinstance(columns, list) or not columns:
        found.append((source, "data_designer.columns", "must be a non-empty list of column configs"))
        return {}
    by_name: dict[str, Any] = {}
    for i, column in enumerate(columns):
        name = column.get("name") if isinstance(column, dict) else None
        if not isinstance(name, str) or not name:
            found.append((source, f"data_designer.columns.{i}", "must be a mapping with a 'name'"))
        elif name in by_name:
            found.append((source, f"data_designer.columns.{i}", f"a second column named {name!r}"))
        else:
            by_name[name] = {k: v for k, v in column.items() if k != "name"}
    return by_name


def used_aliases(columns: dict[str, Any]) -> list[str]:
    """The model aliases the columns name, in order, each once."""
    aliases = [c.get("model_alias") for c in columns.values() if isinstance(c, dict)]
    return list(dict.fromkeys(a for a in aliases if isinstance(a, str)))


def _models(model_configs: list, columns: dict[str, Any], source: str, found: Problems) -> dict[str, Any]:
    """The recipe's models: the aliases the columns use, as the file's model configs set them, else as Data
    Designer's built-in ones do. A builder writes every model of its user's Data Designer home into the file
    (`openrouter-text`, …): the ones no column asks for are not the run's, and their providers need not exist."""
    from data_designer.config.default_model_settings import get_builtin_model_configs

    used = used_aliases(columns)
    models: dict[str, Any] = {}
    for i, mc in enumerate(model_configs):
        if not isinstance(mc, dict) or not isinstance(mc.get("alias"), str):
            found.append((source, f"data_designer.model_configs.{i}", "must be a mapping with an 'alias'"))
        elif mc["alias"] in used:
            models[mc["alias"]] = _model(mc)
    builtin = {mc.alias: mc.model_dump(mode="json") for mc in get_builtin_model_configs()}
    for alias in used:
        if alias not in models and alias in builtin:
            models[alias] = _model(builtin[alias])
    return models


def _model(mc: dict[str, Any]) -> dict[str, Any]:
    """A Data Designer ModelConfig as the job's ModelSpec: the scalar inference parameters (a sampled temperature
    distribution keeps Data Designer's default)."""
    params = mc.get("inference_parameters") or {}
    scalars = ("temperature", "top_p", "max_tokens", "timeout")
    kept = {k: params[k] for k in scalars if isinstance(params.get(k), int | float)}
    if isinstance(params.get("extra_body"), dict):
        kept["extra_body"] = params["extra_body"]
    if params.get("generation_type") == "embedding":
        kept["generation_type"] = "embedding"
        kept.pop("max_tokens", None)
        if isinstance(params.get("dimensions"), int):
            kept["dimensions"] = params["dimensions"]
    model = {"model": mc.get("model"), "inference_parameters": kept}
    if mc.get("provider"):
        model["provider"] = mc["provider"]
    if mc.get("skip_health_check"):
        model["skip_health_check"] = True
    return model


def _seed_dataset(seed: Any, source: str, found: Problems) -> dict[str, Any] | None:
    """A local JSON Lines seed file as the job's seed_dataset; other seed sources are refused with the reason."""
    src = seed.get("source") if isinstance(seed, dict) else None
    path = src.get("path") if isinstance(src, dict) else None
    if not isinstance(path, str) or not path.endswith(".jsonl"):
        found.append((source, "data_designer.seed_config.source", "the job shards a local JSON Lines seed file "
                                                                   "(seed_type local with a .jsonl path); convert "
                                                                   "other seed sources to one"))  # fmt: skip
        return None
    strategy = str(seed.get("sampling_strategy") or "ordered").lower()  # Data Designer's SamplingStrategy
    return {"path": path, "strategy": strategy if strategy in ("ordered", "shuffle") else "ordered"}


# ---------------------------------------------------------------- checks (Data Designer's own, then the job's)

# What the job cannot run, by column type: it needs a network at run time, or code that a config file cannot carry.
REFUSED_COLUMNS = {
    "image": "image columns need an image-generation endpoint, which the job does not serve",
    "custom": "a custom column's Python function does not travel in a config file",
}
NETWORK_SAMPLERS = {"person": "the person sampler downloads its datasets; use person_from_faker (offline)"}


def dd_columns(recipe_dd: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's Data Designer columns in Data Designer's list form, in order."""
    columns = (recipe_dd.get("columns") or {}).items()
    return [{"name": name, **column} if isinstance(column, dict) else column for name, column in columns]


def dd_config(recipe_dd: dict[str, Any], columns: list[dict[str, Any]] | None = None):
    """Data Designer's own config object for the recipe's section, or for `columns` (raises ValidationError)."""
    from data_designer.config import DataDesignerConfig

    return DataDesignerConfig.model_validate({**recipe_dd, "columns": columns or dd_columns(recipe_dd)})


def columns_as_dd(recipe: Recipe) -> list[dict[str, Any]]:
    """Every column of the recipe as Data Designer's column configs, in order: a Data Designer config's own, or
    the job's recipe shape read into them (a column type is defined once, by Data Designer). `drop` stays the
    projection's: the column reaches it and leaves the record."""
    if recipe.data_designer is not None:
        return dd_columns(recipe.data_designer)
    found: list[dict[str, Any]] = []
    for name, col in recipe.columns.items():
        if isinstance(col, SamplerColumn):
            found.append({"name": name, "column_type": "sampler", "sampler_type": col.sampler_type,
                          "params": col.params})  # fmt: skip
        elif isinstance(col, ExpressionColumn):
            found.append({"name": name, "column_type": "expression", "expr": col.expr, "dtype": col.dtype})
        else:
            llm = {"name": name, "prompt": col.prompt, "system_prompt": col.system_prompt,
                   "model_alias": col.model_alias}  # fmt: skip
            if isinstance(col, LLMStructuredColumn):
                found.append({**llm, "column_type": "llm-structured", "output_format": col.output_format})
            elif isinstance(col, LLMJudgeColumn):
                scores = [score.model_dump() for score in col.scores]
                found.append({**llm, "column_type": "llm-judge", "scores": scores})
            else:  # with reasoning on, the trace comes back apart from the answer, in `<name>__reasoning_content`
                thinks = recipe.models[col.model_alias].reasoning == "on"
                found.append({**llm, "column_type": "llm-text", "extract_reasoning_content": thinks})
    return found


def dd_problems(recipe_dd: dict[str, Any], models: set[str], seed_fields: list[str]) -> tuple[list, set[str]]:
    """(key, message) for everything Data Designer and the job refuse in the section, and the names its rows carry
    (columns and their side-effect columns, seed fields)."""
    from pydantic import ValidationError

    columns = recipe_dd.get("columns") or {}
    names = list(columns)
    found: list[tuple[str, str]] = []
    for name, column in columns.items():
        key = f"data_designer.columns.{name}"
        if not isinstance(column, dict):
            continue  # Data Designer's validation below names it
        if column.get("column_type") in REFUSED_COLUMNS:
            found.append((f"{key}.column_type", REFUSED_COLUMNS[column["column_type"]]))
        if column.get("sampler_type") in NETWORK_SAMPLERS:
            found.append((f"{key}.sampler_type", NETWORK_SAMPLERS[column["sampler_type"]]))
        params = column.get("validator_params")
        if (
            column.get("validator_type") == "remote"
            or isinstance(params, dict)
            and params.get("validator_type") == "remote"
        ):
            found.append((f"{key}.validator_type", "a remote validator calls an endpoint the job does not check; "
                                                   "validate with code or local_callable"))  # fmt: skip
        alias = column.get("model_alias")
        if alias is not None and alias not in models:
            fix = "define it in model_configs (or use one of Data Designer's built-in aliases, such as openai-text)"
            found.append((f"{key}.model_alias", f"unknown model alias {alias!r}: {fix}"))
    if recipe_dd.get("tool_configs"):
        found.append(("data_designer.tool_configs", "MCP tool servers are not started by the job yet"))
    try:
        config = dd_config(recipe_dd)
    except ValidationError as e:
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            if loc[:1] == ["columns"] and len(loc) > 1 and loc[1].isdigit() and int(loc[1]) < len(names):
                loc = ["columns", names[int(loc[1])], *loc[3:]]  # columns.3.llm-text.prompt → columns.NAME.prompt
            found.append(("data_designer." + ".".join(loc), err["msg"]))
        return found, set(names) | set(seed_fields)
    carried = set(seed_fields)
    for column in config.columns:
        carried |= {column.name, *column.side_effect_columns}
    found += _cycles(columns)
    from data_designer.engine.validation import ViolationLevel, validate_data_designer_config  # checks only

    violations = validate_data_designer_config(config.columns, config.processors or [], sorted(carried))
    for v in violations:
        if v.level == ViolationLevel.ERROR:
            found.append((f"data_designer.columns.{v.column}" if v.column else "data_designer", v.message))
    return found, carried


def _references(column: dict[str, Any]) -> set[str]:
    """The names a column's templates and target columns refer to."""
    import jinja2
    import jinja2.meta

    names: set[str] = set(column.get("target_columns") or [])
    for field in ("prompt", "system_prompt", "expr"):
        template = column.get(field)
        if isinstance(template, str):
            try:
                names |= jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
            except jinja2.TemplateSyntaxError:
                pass  # Data Designer's own check names it
    return names


def _cycles(columns: dict[str, Any]) -> list[tuple[str, str]]:
    """Columns that depend on themselves through others: Data Designer could never order them."""
    refs = {name: _references(c) & set(columns) for name, c in columns.items() if isinstance(c, dict)}
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            found.append((f"data_designer.columns.{name}", f"a cycle of references: {' -> '.join(cycle)}"))
            return
        if name in done:
            return
        for ref in sorted(refs.get(name, ())):
            visit(ref, [*path, name])
        done.add(name)

    for name in refs:
        visit(name, [])
    return found
