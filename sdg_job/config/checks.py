"""Cross-checks: everything that can be checked before a server starts or a record is generated."""

from __future__ import annotations

import contextlib
import os
import tempfile

import jinja2
import jinja2.meta
import jsonschema
from pydantic import ValidationError

from sdg_job.config.schema import (
    LLM_COLUMNS,
    OFFLINE_SAMPLERS,
    DPOPreferenceProjection,
    ExpressionColumn,
    LLMJudgeColumn,
    LLMStructuredColumn,
    Recipe,
    SamplerColumn,
    StructuredMessagesProjection,
)
from sdg_job.errors import RecipeError
from sdg_job.seeds import read_seed_rows, seed_fields

_JINJA = jinja2.Environment()


def template_names(template: str, source: str, key: str) -> set[str]:
    try:
        return jinja2.meta.find_undeclared_variables(_JINJA.parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(source, key, f"Jinja syntax error: {e.message}") from None


def check_recipe(recipe: Recipe, source: str) -> None:
    """Everything that can be checked before a server starts or a record is generated."""
    if recipe.provider == "local":
        if recipe.serve is None:
            raise RecipeError(source, "serve", "provider: local needs a serve section (or use provider=openai|nvidia)")
    elif recipe.provider not in recipe.providers:
        raise RecipeError(source, "provider", f"no providers.{recipe.provider} entry (endpoint, api_key_env)")

    fields: list[str] = []
    if recipe.seed_dataset is not None:
        rows = read_seed_rows(recipe.seed_dataset.path)
        fields = seed_fields(rows, recipe.seed_dataset.fields)
    available = set(fields)
    for name, col in recipe.columns.items():
        key = f"columns.{name}"
        if name in available:
            raise RecipeError(source, key, "name clashes with a seed field or an earlier column")
        templates: dict[str, str] = {}
        if isinstance(col, LLM_COLUMNS):
            if col.model_alias not in recipe.models:
                raise RecipeError(source, f"{key}.model_alias", f"unknown model alias {col.model_alias!r}")
            templates["prompt"] = col.prompt
            if col.system_prompt:
                templates["system_prompt"] = col.system_prompt
        elif isinstance(col, ExpressionColumn):
            templates["expr"] = col.expr
        elif isinstance(col, SamplerColumn):
            _check_sampler(col, source, key)
        for field, template in templates.items():
            unknown = template_names(template, source, f"{key}.{field}") - available
            if unknown:
                raise RecipeError(
                    source,
                    f"{key}.{field}",
                    f"refers to {sorted(unknown)}, which is neither a seed field nor an earlier column",
                )
        available.add(name)
    if recipe.seed_dataset is not None:
        # Fields used anywhere must be in every seed row (the error names the line).
        read_seed_rows(recipe.seed_dataset.path, required_fields=set(fields))
    _check_projection(recipe, available, source)
    for i, f in enumerate(recipe.filters):
        column = recipe.columns.get(f.column)
        if f.column not in available:
            raise RecipeError(source, f"filters.{i}.column", f"{f.column!r} is not a column or seed field")
        if isinstance(column, LLMJudgeColumn) and f.score not in {s.name for s in column.scores}:
            names = sorted(s.name for s in column.scores)
            raise RecipeError(source, f"filters.{i}.score", f"judge column {f.column!r} has scores {names}")


def _check_sampler(col: SamplerColumn, source: str, key: str) -> None:
    if col.sampler_type not in OFFLINE_SAMPLERS:
        raise RecipeError(source, f"{key}.sampler_type", f"must be one of {sorted(OFFLINE_SAMPLERS)}")
    from data_designer.config.column_configs import SamplerColumnConfig  # config layer only, no engine

    try:
        SamplerColumnConfig(name="x", sampler_type=col.sampler_type, params=col.params)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][2:] if isinstance(p, str))
        raise RecipeError(source, f"{key}.params{'.' + loc if loc else ''}", err["msg"]) from None


def _check_projection(recipe: Recipe, available: set[str], source: str) -> None:
    proj = recipe.output_projection
    key = "output_projection"

    def need(field_key: str, column: str, kind: type | tuple[type, ...] | None = None) -> None:
        if column not in available:
            raise RecipeError(source, f"{key}.{field_key}", f"{column!r} is not a column or seed field")
        if kind is not None and not isinstance(recipe.columns.get(column), kind):
            raise RecipeError(source, f"{key}.{field_key}", f"{column!r} must be a column of type {kind}")

    if isinstance(proj, DPOPreferenceProjection):
        for f in ("prompt", "response_a", "response_b"):
            need(f, getattr(proj, f))
        need("judge", proj.judge, (LLMJudgeColumn, LLMStructuredColumn))
        judge = recipe.columns[proj.judge]
        if isinstance(judge, LLMJudgeColumn):
            score = next((s for s in judge.scores if s.name == proj.score), None)
            options = set(score.options) if score else None
        else:  # a judge given as a schema (the Nemotron step's output_format): its winner property
            assert isinstance(judge, LLMStructuredColumn)
            prop = judge.output_format["properties"].get(proj.score)
            enum = prop.get("enum") if isinstance(prop, dict) else None
            strings = isinstance(enum, list) and all(isinstance(e, str) for e in enum)
            options = None if prop is None else set(enum) if strings else set()  # type: ignore[arg-type]
        if options is None:
            raise RecipeError(source, f"{key}.score", f"judge column {proj.judge!r} has no score {proj.score!r}")
        if options != {"A", "B"}:
            raise RecipeError(source, f"{key}.score", "the preference score's options must be exactly A and B")
        return
    for i, field in enumerate(proj.metadata_fields):
        need(f"metadata_fields.{i}", field)
        if field in ("messages", "tools"):
            raise RecipeError(source, f"{key}.metadata_fields.{i}", f"{field!r} would overwrite the record's own field")
    if isinstance(proj, StructuredMessagesProjection) and proj.source is not None:
        need("source", proj.source)
    for i, msg in enumerate(proj.messages):
        if msg.column is not None:
            need(f"messages.{i}.column", msg.column)
        if msg.tool_call is not None:
            need(f"messages.{i}.tool_call", msg.tool_call, LLMStructuredColumn)
    if isinstance(proj, StructuredMessagesProjection):
        for i, tool in enumerate(proj.tools):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise RecipeError(source, f"{key}.tools.{i}", "must be {type: function, function: {name, parameters}}")
            parameters = fn.get("parameters") or {}
            try:
                jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
                    parameters
                )
            except jsonschema.SchemaError as e:
                message = f"not a JSON schema: {e.message}"
                raise RecipeError(source, f"{key}.tools.{i}.function.parameters", message) from None
        if proj.source is None and sum(m.tool_call is not None for m in proj.messages) != 1:
            raise RecipeError(source, f"{key}.messages", "needs exactly one assistant message with tool_call")


def check_output_path(recipe: Recipe, source: str, create: bool = True) -> None:
    """The output's directory (and the run dir beside the output file) can be made and written to: a bad output
    path is bad input, refused before the lease, Ray or a server. Makes the (empty) run dir and writes no file;
    without `create` (`validate`), the directories it made are removed again, so that "validate passed" means
    exactly "run will get past this" and validate leaves nothing behind."""
    out = recipe.output_path
    key = "output_dir" if out.parent.is_relative_to(recipe.output_dir) else "output_path"
    if out.is_dir():
        raise RecipeError(source, "output_path", f"{out} is a directory; name the output file")
    missing = [p for p in (recipe.run_dir, *recipe.run_dir.parents) if not os.path.lexists(p)]
    try:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=recipe.run_dir):  # unnamed, gone on close: a read-only dir fails here
            pass
    except OSError as e:
        raise RecipeError(source, key, f"cannot create {e.filename or recipe.run_dir}: {e.strerror or e}") from None
    finally:
        if not create:
            for made in missing:  # deepest first
                with contextlib.suppress(OSError):
                    made.rmdir()
