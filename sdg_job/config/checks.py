"""Cross-checks: everything that can be checked before a server starts or a record is generated."""

from __future__ import annotations

import jinja2
import jinja2.meta
import jsonschema
from pydantic import ValidationError

from sdg_job.config.dd_shape import dd_problems
from sdg_job.config.schema import (
    LLM_COLUMNS,
    OFFLINE_SAMPLERS,
    DatasetProjection,
    DPOPreferenceProjection,
    ExpressionColumn,
    LLMJudgeColumn,
    LLMStructuredColumn,
    Recipe,
    SamplerColumn,
    ServeGroup,
    StructuredMessagesProjection,
)
from sdg_job.engines import engine_of
from sdg_job.errors import RecipeError, all_problems
from sdg_job.seeds import read_seed_rows, seed_fields

_JINJA = jinja2.Environment()
SERVE_REFUSED = "<serve>"  # in `broken`: the schema refused the serve section (no name of a column or model)


def template_names(template: str, source: str, key: str) -> set[str]:
    try:
        return jinja2.meta.find_undeclared_variables(_JINJA.parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(source, key, f"Jinja syntax error: {e.message}") from None


def check_recipe(recipe: Recipe, source: str) -> None:
    """Everything that can be checked before a server starts or a record is generated; every problem at once."""
    if problems := recipe_problems(recipe, source):
        raise all_problems(source, problems)


def recipe_problems(recipe: Recipe, source: str, broken: frozenset[str] = frozenset()) -> list[tuple[str, str, str]]:
    """The cross-checks' problems as (source, key, message). `broken`: names of columns and models the schema
    refused (left out of `recipe`), which references to are not reported again."""
    found: list[tuple[str, str, str]] = []

    def report(key: str, message: str, where: str = source) -> None:
        found.append((where, key, message))

    if recipe.provider != "local" and recipe.provider not in recipe.providers:
        report("provider", f"no providers.{recipe.provider} entry (endpoint, api_key_env)")
    for alias, model in recipe.models.items():
        if model.provider not in (None, "local") and model.provider not in recipe.providers:
            report(f"models.{alias}.provider", f"no providers.{model.provider} entry (endpoint, api_key_env)")
    local = [a for a in recipe.models if recipe.provider_of(a) == "local"]
    if local and recipe.serve is None and SERVE_REFUSED not in broken:
        report("serve", f"provider local ({', '.join(local)}) needs a serve section (or use provider=openai|nvidia)")
    found += [(source, key, message) for key, message in _serving_problems(recipe, local, broken)]

    fields: list[str] = []
    seed_known = True  # whether the seed's fields are known (else references cannot be checked)
    if recipe.seed_dataset is not None:
        try:
            fields = seed_fields(read_seed_rows(recipe.seed_dataset.path), recipe.seed_dataset.fields)
        except RecipeError as e:
            report(e.key, e.message, e.source)
            fields, seed_known = list(recipe.seed_dataset.fields or []), bool(recipe.seed_dataset.fields)
    available = set(fields) | broken
    _check_columns(recipe, available, broken, seed_known, source, report)
    if recipe.data_designer is not None:
        problems, carried = dd_problems(recipe.data_designer, set(recipe.models) | broken, fields)
        found += [(source, key, message) for key, message in problems]
        available |= carried
    if recipe.seed_dataset is not None and seed_known and recipe.data_designer is None:
        try:  # fields used anywhere must be in every seed row (the error names the line)
            read_seed_rows(recipe.seed_dataset.path, required_fields=set(fields))
        except RecipeError as e:
            report(e.key, e.message, e.source)
    if seed_known:
        _check_projection(recipe, available, report)
    _check_filters(recipe, available, seed_known, report)
    for i, path in enumerate(recipe.quality.decontaminate):
        if not path.is_file():
            report(f"quality.decontaminate.{i}", f"{path}: no such file (an evaluation set: .jsonl, .parquet or text)")
    return found


def _check_columns(recipe: Recipe, available: set[str], broken: frozenset[str], seed_known: bool, source: str,
                   report) -> None:  # fmt: skip
    """The recipe shape's columns in order: names, model aliases, samplers, and the names each template uses (each
    column's own name joins `available` for the columns after it)."""
    for name, col in recipe.columns.items():
        key = f"columns.{name}"
        if name in available - broken:
            report(key, "name clashes with a seed field or an earlier column")
        templates: dict[str, str] = {}
        if isinstance(col, LLM_COLUMNS):
            if col.model_alias not in recipe.models and col.model_alias not in broken:
                report(f"{key}.model_alias", f"unknown model alias {col.model_alias!r}")
            templates["prompt"] = col.prompt
            if col.system_prompt:
                templates["system_prompt"] = col.system_prompt
        elif isinstance(col, ExpressionColumn):
            templates["expr"] = col.expr
        elif isinstance(col, SamplerColumn):
            _check_sampler(col, key, report)
        for field, template in templates.items():
            try:
                unknown = template_names(template, source, f"{key}.{field}") - available
            except RecipeError as e:
                report(e.key, e.message)
                continue
            if unknown and seed_known:
                report(
                    f"{key}.{field}",
                    f"refers to {sorted(unknown)}, which is neither a seed field nor an earlier column",
                )
        available.add(name)


def _check_filters(recipe: Recipe, available: set[str], seed_known: bool, report) -> None:
    for i, f in enumerate(recipe.filters):
        column = recipe.columns.get(f.column)
        if f.column not in available and seed_known:
            report(f"filters.{i}.column", f"{f.column!r} is not a column or seed field")
        elif isinstance(column, LLMJudgeColumn) and f.score not in {s.name for s in column.scores}:
            names = sorted(s.name for s in column.scores)
            report(f"filters.{i}.score", f"judge column {f.column!r} has scores {names}")


def _check_sampler(col: SamplerColumn, key: str, report) -> None:
    if col.sampler_type not in OFFLINE_SAMPLERS:
        report(f"{key}.sampler_type", f"must be one of {sorted(OFFLINE_SAMPLERS)}")
        return
    from data_designer.config.column_configs import SamplerColumnConfig  # config layer only, no engine

    try:
        SamplerColumnConfig(name="x", sampler_type=col.sampler_type, params=col.params)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][2:] if isinstance(p, str))
        report(f"{key}.params{'.' + loc if loc else ''}", err["msg"])


def _check_projection(recipe: Recipe, available: set[str], report) -> None:
    proj = recipe.output_projection
    key = "output_projection"
    if isinstance(proj, DatasetProjection):
        return

    def need(field_key: str, column: str, kind: type | tuple[type, ...] | None = None) -> bool:
        if column not in available:
            report(f"{key}.{field_key}", f"{column!r} is not a column or seed field")
            return False
        if kind is not None and column in recipe.columns and not isinstance(recipe.columns[column], kind):
            report(f"{key}.{field_key}", f"{column!r} must be a column of type {kind}")
            return False
        return True

    if isinstance(proj, DPOPreferenceProjection):
        for f in ("prompt", "response_a", "response_b"):
            need(f, getattr(proj, f))
        if not need("judge", proj.judge, (LLMJudgeColumn, LLMStructuredColumn)) or proj.judge not in recipe.columns:
            return
        _check_preference_score(recipe, proj, report)
        return
    for i, field in enumerate(proj.metadata_fields):
        need(f"metadata_fields.{i}", field)
        if field in ("messages", "tools"):
            report(f"{key}.metadata_fields.{i}", f"{field!r} would overwrite the record's own field")
    if isinstance(proj, StructuredMessagesProjection) and proj.source is not None:
        need("source", proj.source)
    for i, msg in enumerate(proj.messages):
        if msg.column is not None:
            need(f"messages.{i}.column", msg.column)
        if msg.tool_call is not None:
            need(f"messages.{i}.tool_call", msg.tool_call, LLMStructuredColumn)
    if isinstance(proj, StructuredMessagesProjection):
        _check_tools(proj.tools, report)
        if proj.source is None and sum(m.tool_call is not None for m in proj.messages) != 1:
            report(f"{key}.messages", "needs exactly one assistant message with tool_call")


def _check_preference_score(recipe: Recipe, proj: DPOPreferenceProjection, report) -> None:
    """The judge's preference score has exactly the options A and B."""
    key = "output_projection"
    judge = recipe.columns[proj.judge]
    if isinstance(judge, LLMJudgeColumn):
        score = next((s for s in judge.scores if s.name == proj.score), None)
        options = set(score.options) if score else None
    else:  # a judge given as a schema (the Nemotron step's output_format): its winner property
        assert isinstance(judge, LLMStructuredColumn)
        props = judge.output_format.get("properties")
        prop = props.get(proj.score) if isinstance(props, dict) else None
        enum = prop.get("enum") if isinstance(prop, dict) else None
        strings = isinstance(enum, list) and all(isinstance(e, str) for e in enum)
        options = None if prop is None else set(enum) if strings else set()  # type: ignore[arg-type]
    if options is None:
        report(f"{key}.score", f"judge column {proj.judge!r} has no score {proj.score!r}")
    elif options != {"A", "B"}:
        report(f"{key}.score", "the preference score's options must be exactly A and B")


def _check_tools(tools: list[dict], report) -> None:
    """Each tool is an OpenAI function with a JSON schema for its parameters."""
    key = "output_projection"
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            report(f"{key}.tools.{i}", "must be {type: function, function: {name, parameters}}")
            continue
        parameters = fn.get("parameters") or {}
        if not isinstance(parameters, dict):
            report(f"{key}.tools.{i}.function.parameters", "must be a JSON schema (a mapping)")
            continue
        try:
            jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
                parameters
            )
        except jsonschema.SchemaError as e:
            report(f"{key}.tools.{i}.function.parameters", f"not a JSON schema: {e.message}")


def _serving_problems(recipe: Recipe, local: list[str], broken: frozenset[str]) -> list[tuple[str, str]]:
    """Each model with provider local is served by exactly one of the node's servers, and each server names what it
    serves. (A server whose models all went to a remote provider is fine: it is not started, see Recipe.servers.)"""
    if recipe.serve is None or not local:
        return []
    several = isinstance(recipe.serve, ServeGroup)
    servers = recipe.serve.servers if isinstance(recipe.serve, ServeGroup) else {"": recipe.serve}
    found: list[tuple[str, str]] = []
    served_by: dict[str, str] = {}
    for name, spec in servers.items():
        key = f"{recipe.serve_key(name)}.aliases"
        if several and not spec.aliases:
            found.append((key, f"name the model aliases this server serves (models with provider local: "
                               f"{', '.join(local)})"))  # fmt: skip
        for alias in spec.aliases:
            if alias in broken:
                continue
            if alias not in recipe.models:
                found.append((key, f"unknown model alias {alias!r}"))
            elif alias in served_by:
                found.append((key, f"{alias} is served by {served_by[alias] or 'serve'} already: one server each"))
            else:
                served_by[alias] = name
    for name, spec in servers.items():  # what would fail only at start, on every node
        if message := engine_of(spec).model_problem():
            found.append((f"{recipe.serve_key(name)}.model", message))
    for alias in local:  # vLLM runs a model either to generate or to embed, never both on one server
        serving = [engine_of(spec) for spec in servers.values() if alias in spec.aliases or not several]
        engine = serving[0] if serving else None
        embeds = recipe.models[alias].inference_parameters.embeds
        if alias not in broken and embeds and engine is not None and not engine.serves_embeddings:
            found.append(
                (
                    f"models.{alias}.inference_parameters.generation_type",
                    "an embedding model is served by "
                    "the job's llama_cpp servers, or by a provider (models.ALIAS.provider=NAME); not by vLLM",
                )
            )
    if not several and not servers[""].aliases:
        return found
    for alias in local:
        if alias not in served_by and alias not in broken:
            where = "serve.servers" if several else "serve.aliases"
            found.append((f"models.{alias}", f"provider local, but no server serves it: add it to the aliases of "
                                             f"one in {where}"))  # fmt: skip
    return found
