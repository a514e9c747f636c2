"""Data Designer configs as a Data Designer user writes them: `build_config(model_alias)` with
DataDesignerConfigBuilder, exported with `write_config` (the form a notebook hands the job). Model aliases are Data
Designer's built-in defaults (`openai-text`), which the builder's file leaves undefined."""

from __future__ import annotations

from pathlib import Path

import data_designer.config as dd


def code_with_validation(model_alias: str = "openai-text") -> dd.DataDesignerConfigBuilder:
    """Python tasks and their code, the code checked by Data Designer's ruff validator (llm-code + validation)."""
    b = dd.DataDesignerConfigBuilder()
    b.add_column(
        dd.SamplerColumnConfig(
            name="area",
            sampler_type=dd.SamplerType.CATEGORY,
            params=dd.CategorySamplerParams(values=["strings", "lists", "dicts"]),
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="level",
            sampler_type=dd.SamplerType.CATEGORY,
            params=dd.CategorySamplerParams(values=["beginner", "intermediate"]),
        )
    )
    b.add_column(
        dd.LLMTextColumnConfig(
            name="task",
            model_alias=model_alias,
            prompt="Write one short Python exercise about {{ area }} for a {{ level }} programmer. Only the task.",
        )
    )
    b.add_column(
        dd.LLMCodeColumnConfig(
            name="solution",
            model_alias=model_alias,
            code_lang=dd.CodeLang.PYTHON,
            prompt="Write a short Python function that solves this task:\n{{ task }}",
        )
    )
    b.add_column(
        dd.ValidationColumnConfig(
            name="solution_check",
            target_columns=["solution"],
            validator_type=dd.ValidatorType.CODE,
            validator_params=dd.CodeValidatorParams(code_lang=dd.CodeLang.PYTHON),
        )
    )
    return b


def qa_with_judge(model_alias: str = "openai-text") -> dd.DataDesignerConfigBuilder:
    """A product and a question about it as structured output, an answer, and a judge's scores."""
    b = dd.DataDesignerConfigBuilder()
    b.add_column(
        dd.SamplerColumnConfig(
            name="category",
            sampler_type=dd.SamplerType.CATEGORY,
            params=dd.CategorySamplerParams(values=["kettle", "lamp", "backpack"]),
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="price",
            sampler_type=dd.SamplerType.UNIFORM,
            params=dd.UniformSamplerParams(low=5, high=200, decimal_places=2),
        )
    )
    b.add_column(
        dd.LLMStructuredColumnConfig(
            name="product",
            model_alias=model_alias,
            prompt="Invent a {{ category }} that costs {{ price }} dollars: a short name and one feature.",
            output_format={
                "type": "object",
                "properties": {"name": {"type": "string"}, "feature": {"type": "string"}},
                "required": ["name", "feature"],
            },
        )
    )
    b.add_column(dd.ExpressionColumnConfig(name="product_name", expr="{{ product.name }}"))
    b.add_column(
        dd.LLMTextColumnConfig(
            name="question",
            model_alias=model_alias,
            prompt="Ask one short question a shopper has about {{ product_name }}, which has {{ product.feature }}.",
        )
    )
    b.add_column(
        dd.LLMTextColumnConfig(
            name="answer",
            model_alias=model_alias,
            prompt="Answer in one sentence. Product: {{ product_name }} ({{ product.feature }}, ${{ price }}).\n"
            "Question: {{ question }}",
        )
    )
    b.add_column(
        dd.LLMJudgeColumnConfig(
            name="answer_quality",
            model_alias=model_alias,
            prompt="Question: {{ question }}\nAnswer: {{ answer }}\nRate the answer.",
            scores=[
                dd.Score(
                    name="helpful",
                    description="Does the answer help the shopper?",
                    options={"1": "not at all", "2": "somewhat", "3": "fully"},
                )
            ],
        )
    )
    return b


def every_offline_column_type(
    seed_file: Path, model_alias: str = "openai-text", embedding_alias: str = "openai-embedding"
) -> dd.DataDesignerConfigBuilder:
    """Every column type that runs without a network, a sampler constraint and a processor, over a seed file."""
    b = dd.DataDesignerConfigBuilder()
    b.with_seed_dataset(dd.LocalFileSeedSource(path=str(seed_file)), sampling_strategy=dd.SamplingStrategy.SHUFFLE)
    b.add_column(
        dd.SamplerColumnConfig(
            name="tone",
            sampler_type=dd.SamplerType.CATEGORY,
            params=dd.CategorySamplerParams(values=["brief", "friendly"]),
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="style",
            sampler_type=dd.SamplerType.SUBCATEGORY,
            params=dd.SubcategorySamplerParams(
                category="tone", values={"brief": ["one line"], "friendly": ["warm", "chatty"]}
            ),
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="difficulty",
            sampler_type=dd.SamplerType.GAUSSIAN,
            params=dd.GaussianSamplerParams(mean=5, stddev=2, decimal_places=1),
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="when",
            sampler_type=dd.SamplerType.DATETIME,
            params=dd.DatetimeSamplerParams(start="2024-01-01", end="2024-12-31"),
        )
    )
    b.add_column(dd.SamplerColumnConfig(name="ticket", sampler_type=dd.SamplerType.UUID, params=dd.UUIDSamplerParams()))
    b.add_column(
        dd.SamplerColumnConfig(
            name="asker", sampler_type=dd.SamplerType.PERSON_FROM_FAKER, params=dd.PersonFromFakerSamplerParams()
        )
    )
    b.add_constraint(dd.ScalarInequalityConstraint(target_column="difficulty", operator="ge", rhs=1))
    b.add_column(
        dd.LLMTextColumnConfig(
            name="question",
            model_alias=model_alias,
            prompt="In a {{ tone }}, {{ style }} way, ask one question about {{ topic }} ({{ domain }}).",
        )
    )
    b.add_column(
        dd.LLMCodeColumnConfig(
            name="snippet",
            model_alias=model_alias,
            code_lang=dd.CodeLang.PYTHON,
            prompt="Write a two-line Python example about {{ topic }}.",
        )
    )
    b.add_column(
        dd.ValidationColumnConfig(
            name="snippet_check",
            target_columns=["snippet"],
            validator_type=dd.ValidatorType.CODE,
            validator_params=dd.CodeValidatorParams(code_lang=dd.CodeLang.PYTHON),
        )
    )
    b.add_column(
        dd.LLMStructuredColumnConfig(
            name="labels",
            model_alias=model_alias,
            prompt="Give a short title for: {{ question }}",
            output_format={"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
        )
    )
    b.add_column(
        dd.LLMJudgeColumnConfig(
            name="clarity",
            model_alias=model_alias,
            prompt="Is this question clear? {{ question }}",
            scores=[dd.Score(name="clear", description="Is it clear?", options={"0": "no", "1": "yes"})],
        )
    )
    b.add_column(dd.EmbeddingColumnConfig(name="question_embedding", target_column="question",
                                          model_alias=embedding_alias))  # fmt: skip
    b.add_column(dd.ExpressionColumnConfig(name="summary", expr="{{ asker.first_name }} asks: {{ question }}"))
    b.add_column(dd.ExpressionColumnConfig(name="scratch", expr="{{ ticket }}-{{ tone }}"))
    b.add_processor(dd.DropColumnsProcessorConfig(name="drop_scratch", column_names=["scratch"]))
    return b


def samplers_only() -> dd.DataDesignerConfigBuilder:
    """No model column: samplers and an expression (the builder's file then names no model at all)."""
    b = dd.DataDesignerConfigBuilder(model_configs=[])
    b.add_column(
        dd.SamplerColumnConfig(
            name="code", sampler_type=dd.SamplerType.CATEGORY, params=dd.CategorySamplerParams(values=["a", "b", "c"])
        )
    )
    b.add_column(
        dd.SamplerColumnConfig(
            name="size", sampler_type=dd.SamplerType.UNIFORM, params=dd.UniformSamplerParams(low=1, high=9)
        )
    )
    b.add_column(dd.ExpressionColumnConfig(name="label", expr="{{ code }}-{{ size }}"))
    return b


def planted_near_duplicates(seed_file: Path) -> dd.DataDesignerConfigBuilder:
    """No model column: record r is seed row r (in file order, round and round) with a fresh ticket id, so two
    records of the same story are near-duplicates, and only as many are near-unique as the file has stories."""
    b = dd.DataDesignerConfigBuilder(model_configs=[])
    b.with_seed_dataset(dd.LocalFileSeedSource(path=str(seed_file)), sampling_strategy=dd.SamplingStrategy.ORDERED)
    ticket = dd.UniformSamplerParams(low=1000, high=9999, decimal_places=0)
    b.add_column(dd.SamplerColumnConfig(name="ticket", sampler_type=dd.SamplerType.UNIFORM, params=ticket))
    b.add_column(dd.ExpressionColumnConfig(name="text", expr="Ticket {{ ticket }}: {{ story }}"))
    return b


def export(builder: dd.DataDesignerConfigBuilder, path: Path) -> Path:
    builder.write_config(path)
    return path
