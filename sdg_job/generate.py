"""One shard's records: recipe columns → Data Designer config → `create()` against each model's endpoint → raw rows.

This is the only module that drives Data Designer's engine (dd_hotpath and observe only patch it). It knows nothing
of YAML, Ray or merging.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdg_job.config import (
    LLMTextColumn,
    Recipe,
    StructuredMessagesProjection,
)
from sdg_job.config.dd_shape import columns_as_dd, dd_config
from sdg_job.endpoints import Routes

log = logging.getLogger("sdg_job.generate")


@dataclass
class GenerationResult:
    rows: list[dict[str, Any]]
    requested: int
    failed: int  # rows Data Designer dropped (failed LLM calls, unparsable output)
    input_tokens: int = 0
    output_tokens: int = 0
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # per model alias: requests answered, tokens
    error: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    request_errors: dict[str, int] = field(default_factory=dict)  # failed requests by cause (endpoints.CAUSES)
    request_error: str | None = None  # the provider's words for the most frequent cause
    request_error_provider: str | None = None  # and which provider said them


def dd_environment(home: Path) -> dict[str, str]:
    """What a process running Data Designer needs before importing it (it reads these at import): no telemetry,
    its home and tiktoken's cache in the run dir, and no ruff cache: its code validator runs ruff in the working
    directory, which may be read-only (the image's, for a user who is not root), and ruff then fails outright."""
    return {"NEMO_TELEMETRY_ENABLED": "false", "DATA_DESIGNER_HOME": str(home),
            "TIKTOKEN_CACHE_DIR": str(home / "tiktoken"), "RUFF_NO_CACHE": "true"}  # fmt: skip


def offline_environment(home: Path) -> None:
    """Call before Data Designer is imported: `dd_environment`, where the environment does not say otherwise."""
    for name, value in dd_environment(home).items():
        os.environ.setdefault(name, value)


def load_engine() -> float:
    """Import Data Designer, install the hot-path fixes and the request observer's hook; returns the CPU seconds it
    took (~0 once loaded). A worker pays this once, so the manifest reports it apart from the per-record cost."""
    from sdg_job import dd_hotpath, observe

    started = time.process_time()
    if "data_designer" not in sys.modules and os.environ.get("DATA_DESIGNER_HOME"):
        # One home per process: on first use Data Designer writes its default model files there, checking exists()
        # and then writing in place, so a worker could read another's half-written file (InvalidConfigError).
        os.environ["DATA_DESIGNER_HOME"] = str(Path(os.environ["DATA_DESIGNER_HOME"]) / str(os.getpid()))
    import data_designer.config  # noqa: F401
    from data_designer.interface import DataDesigner  # noqa: F401  (the package imports lazily, on access)

    dd_hotpath.apply()
    observe.install()
    return time.process_time() - started


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant per declared tool: its name, and arguments exactly as its parameters declare (nothing else). A
    column's own schema usually lets any tool take any argument, so a small model calls get_order_status with a
    `reason`; decoding against this one, it cannot."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        parameters = {"type": "object", "properties": {}, **(fn.get("parameters") or {}), "additionalProperties": False}
        variants.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
                         "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
    return {"anyOf": variants}


def guided_schema(recipe: Recipe, column) -> dict[str, Any]:
    """What the server decodes a structured or judge column (Data Designer's config) against: the declared tools
    for the projection's tool-call column, else the column's own schema."""
    projection = recipe.output_projection
    if isinstance(projection, StructuredMessagesProjection) and any(m.tool_call == column.name
                                                                    for m in projection.messages):  # fmt: skip
        return tool_call_schema(projection.tools)
    return dd_column_schema(column)


def guided_alias(alias: str, column: str) -> str:
    """The model alias of a structured or judge column whose schema goes to the server (`response_format`)."""
    return f"{alias}__{column}"


def build_config(recipe: Recipe, routes: Routes, seed_rows: list[dict] | None):
    """Data Designer config for one shard. Structured and judge columns get a model alias of their own whose
    `extra_body.response_format` carries the column's schema, so the server decodes valid JSON (guided decoding);
    without it a small model fails to parse and the row is lost."""
    import data_designer.config as dd
    import pandas as pd

    builder = dd.DataDesignerConfigBuilder(model_configs=[])
    # An empty list gets Data Designer's default models (aliases like nvidia-text, which a recipe may use too):
    # the recipe's models replace them.
    defaults = {mc.alias for mc in builder.model_configs}

    def add_model(alias: str, model_key: str, extra_body: dict | None = None) -> None:
        if alias in defaults:
            builder.delete_model_config(alias)
            defaults.discard(alias)
        spec, endpoint = recipe.models[model_key], routes[model_key]
        params = spec.inference_parameters
        body = {**(params.extra_body or {}), **(extra_body or {})}
        if spec.reasoning is not None and endpoint.takes_template_kwargs:
            # Per request, as the model cards say; a system-prompt switch like /no_think is not honoured by all.
            kwargs = {**body.get("chat_template_kwargs", {}), "enable_thinking": spec.reasoning == "on"}
            body["chat_template_kwargs"] = kwargs
        common = {"timeout": params.timeout, "max_parallel_requests": endpoint.max_parallel_requests,
                  "extra_body": body or None}  # fmt: skip
        if params.embeds:
            inference = dd.EmbeddingInferenceParams(dimensions=params.dimensions, **common)
        else:
            sampling = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens}
            inference = dd.ChatCompletionInferenceParams(**sampling, **common)
        builder.add_model_config(
            dd.ModelConfig(
                alias=alias,
                model=endpoint.served_model or spec.model,
                provider=endpoint.provider,
                skip_health_check=True,
                inference_parameters=inference,
            )
        )

    for alias in recipe.models:
        add_model(alias, alias)
    for alias in defaults:
        builder.delete_model_config(alias)

    if seed_rows:
        builder.with_seed_dataset(
            dd.DataFrameSeedSource(df=pd.DataFrame(seed_rows)), sampling_strategy=dd.SamplingStrategy.ORDERED
        )

    _add_dd_config(builder, recipe, add_model)
    return builder


def _add_dd_config(builder, recipe: Recipe, add_model) -> None:
    """The recipe's Data Designer config (a Data Designer config's own, or the job's recipe shape read into one):
    its columns, each structured or judge column on a model alias of its own that carries the column's schema,
    and its constraints, processors and profilers."""
    config = dd_config(recipe.data_designer or {}, columns_as_dd(recipe))
    for column in config.columns:
        if column.column_type in ("llm-structured", "llm-judge") and recipe.generation.guided_decoding:
            alias = guided_alias(column.model_alias, column.name)
            schema = guided_schema(recipe, column)
            response_format = {"type": "json_schema", "json_schema": {"name": column.name, "schema": schema}}
            add_model(alias, column.model_alias, {"response_format": response_format})
            column = column.model_copy(update={"model_alias": alias})
        builder.add_column(column)
    for constraint in config.constraints or []:
        builder.add_constraint(constraint)
    for processor in config.processors or []:
        builder.add_processor(processor)
    for profiler in config.profilers or []:
        builder.add_profiler(profiler)


def dd_column_schema(column) -> dict[str, Any]:
    """The JSON schema of a Data Designer llm-structured or llm-judge column's answer."""
    if column.column_type == "llm-judge":
        from data_designer.engine.column_generators.utils.judge_score_factory import (
            create_judge_response_model,
            create_judge_structured_output_model,
        )

        model = create_judge_structured_output_model([create_judge_response_model(s) for s in column.scores])
        return model.model_json_schema()
    fmt = column.output_format
    return fmt if isinstance(fmt, dict) else fmt.model_json_schema()


def text_columns(recipe: Recipe) -> list[str]:
    """The free-text LLM columns whose answers reach the record (a cut one is dropped as truncated)."""
    if recipe.data_designer is not None:
        columns = recipe.data_designer.get("columns") or {}
        return [n for n, c in columns.items() if c.get("column_type") in ("llm-text", "llm-code") and not c.get("drop")]
    return [name for name, col in recipe.columns.items() if type(col) is LLMTextColumn and not col.drop]


def guided_aliases(recipe: Recipe) -> dict[str, str]:
    """Each structured or judge column's own alias → the recipe's model alias it stands for."""
    return {guided_alias(c["model_alias"], c["name"]): c["model_alias"] for c in columns_as_dd(recipe)
            if c.get("column_type") in ("llm-structured", "llm-judge")}  # fmt: skip


TRUNCATED = "__sdg_truncated"  # a row flag the projection reads: an answer in it was cut at max_tokens


def flag_cut_answers(recipe: Recipe, rows: list[dict[str, Any]], cut: set[str]) -> None:
    """Flag rows whose text answers (the columns that reach the record) were cut at max_tokens. An SFT set full of
    answers that stop mid-word teaches a model to stop mid-word."""
    texts = text_columns(recipe)
    for row in rows:
        if any(isinstance(row.get(name), str) and row[name].strip() in cut for name in texts):
            row[TRUNCATED] = True


class _TokenCounter:
    """Sums Data Designer's token-usage events (one per answered request) for the duration of one create(), in all
    and per model alias of the recipe (a structured column's own alias counts as its model's: `recipe_alias`)."""

    def __init__(self, recipe_alias: dict[str, str]) -> None:
        self.recipe_alias = recipe_alias
        self.input = self.output = 0
        self.by_alias: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        with self._lock:
            self.input += event.input_tokens
            self.output += event.output_tokens
            alias = self.recipe_alias.get(event.model_alias, event.model_alias)
            usage = self.by_alias.setdefault(alias, Counter())
            usage.update(requests=1, input_tokens=event.input_tokens, output_tokens=event.output_tokens)


def _dag_in_name_order(dag: Any) -> Any:
    """Data Designer's sampler Dag.to_networkx, with its nodes and edges added in sorted order, not a set's."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(sorted(dag.nodes))
    graph.add_edges_from(sorted(dag.edges))
    return graph


def seed_samplers(random_seed: int) -> None:
    """Data Designer's samplers, given no seed, draw from numpy's global generator, column by column in the order of
    a set of their names, which differs from process to process (string hashing is salted per process): seeded
    alone, each column would take another's draws. Ordered by name and seeded, a shard draws the same values in
    every worker."""
    import random

    import numpy as np
    from data_designer.engine.sampling_gen import schema

    schema.Dag.to_networkx = _dag_in_name_order  # type: ignore[method-assign]
    np.random.seed(random_seed % 2**32)
    random.seed(random_seed)


def _designer(routes: Routes, work_dir: Path, num_records: int):
    """Data Designer with the shard's endpoints as its providers, run the way the job counts rows."""
    import data_designer.config as dd
    from data_designer.interface import DataDesigner

    providers = [dd.ModelProvider(name=e.provider, endpoint=e.url, api_key=e.api_key_env or "none")
                 for e in routes.endpoints]  # fmt: skip
    if not providers:  # a config that asks no model; Data Designer wants a provider all the same, and calls none
        providers = [dd.ModelProvider(name="none", endpoint="http://127.0.0.1:9/v1", api_key="none")]
    designer = DataDesigner(artifact_path=work_dir, model_providers=providers, auto_configure_logging=False)
    # Early shutdown would throw away every good row of the shard when a small model misbehaves; the job
    # counts failures itself and tops up, so keep whatever succeeds.
    designer.set_run_config(
        dd.RunConfig(
            disable_early_shutdown=True,
            otel_metrics_port=None,
            buffer_size=max(num_records, 1),
            progress_interval=3600,
        )
    )
    return designer


def generate(
    recipe: Recipe,
    routes: Routes,
    num_records: int,
    seed_rows: list[dict] | None,
    work_dir: Path,
    random_seed: int | None = None,
) -> GenerationResult:
    """Run Data Designer for `num_records` rows. Never raises for bad rows: they are counted as failed.
    `random_seed` (the shard's): the samplers draw the same values each time, a retried shard's too."""
    from data_designer.engine.models.usage_events import subscribe_token_usage

    from sdg_job import observe

    observe.install()  # once per process; results depend on it (a no-op after load_engine)
    designer = _designer(routes, work_dir, num_records)
    builder = build_config(recipe, routes, seed_rows)
    observer = observe.RequestObserver.for_routes(routes)  # this call's own: cut answers, failed requests, paces
    counter = _TokenCounter(guided_aliases(recipe))
    unsubscribe = subscribe_token_usage(counter)
    if random_seed is not None:
        seed_samplers(random_seed)
    try:
        with observer.watching():
            result = designer.create(builder, num_records=num_records, dataset_name="shard")
        frame = result.load_dataset()
        rows = json.loads(frame.to_json(orient="records", force_ascii=False))
        error = None
    except Exception as e:  # Data Designer raises when every row of the shard failed
        log.warning("shard generation produced no rows: %s", str(e).splitlines()[0][:300])
        rows, error = [], f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    finally:
        unsubscribe()
    failed = max(num_records - len(rows), 0)
    if not recipe.generation.keep_truncated:
        flag_cut_answers(recipe, rows, observer.cut_answers)
    causes = observer.errors.most_common()
    # Rows lost with failed requests count under the cause of most of them; without any, the model's output failed
    # (unparsable structured output, Data Designer's own checks).
    reason = causes[0][0] if causes else "generation_failed"
    return GenerationResult(
        rows=rows,
        requested=num_records,
        failed=failed,
        input_tokens=counter.input,
        output_tokens=counter.output,
        usage={alias: dict(usage) for alias, usage in sorted(counter.by_alias.items())},
        error=error,
        reasons={reason: failed} if failed else {},
        request_errors=dict(causes),
        request_error=observer.said.get(causes[0][0]) if causes else None,
        request_error_provider=observer.provider.get(causes[0][0]) if causes else None,
    )
