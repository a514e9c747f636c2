"""The job's description: recipe files (two shapes) → one validated `Recipe`. Nothing here starts a server or
imports Data Designer's engine.

    schema      the pydantic model, the one source of truth, and a recipe's identity (hash)
    load        YAML files, `defaults:` inheritance, overrides → Recipe
    step_shape  the Nemotron sdg/data_designer step's shape, read into the project's own
    dd_shape    a Data Designer config file, read into a recipe; every recipe's columns as Data Designer's configs
    checks      cross-checks across fields, seed file included
    secrets     refuse key values in recipes, mask them in what the job writes
"""

from sdg_job.config.checks import check_recipe, template_names
from sdg_job.config.load import RECIPES_DIR, apply_overrides, load_recipe, parse_overrides, resolve_recipe_path
from sdg_job.config.schema import (
    LLM_COLUMNS,
    OFFLINE_SAMPLERS,
    OPERATIONAL_SERVE_KEYS,
    Column,
    DPOPreferenceProjection,
    ExpressionColumn,
    Filter,
    Generation,
    InferenceParameters,
    JudgeScore,
    LLMJudgeColumn,
    LLMStructuredColumn,
    LLMTextColumn,
    MessageSpec,
    ModelSpec,
    OpenAIMessagesProjection,
    Projection,
    ProviderSpec,
    Recipe,
    SamplerColumn,
    SeedDataset,
    ServeGroup,
    ServeSpec,
    StructuredMessagesProjection,
    ToolDataChecks,
    recipe_dict,
    recipe_hash,
)
from sdg_job.config.secrets import mask_secrets

__all__ = [
    "LLM_COLUMNS", "OFFLINE_SAMPLERS", "OPERATIONAL_SERVE_KEYS", "RECIPES_DIR", "Column", "DPOPreferenceProjection",
    "ExpressionColumn", "Filter", "Generation", "InferenceParameters", "JudgeScore", "LLMJudgeColumn",
    "LLMStructuredColumn", "LLMTextColumn", "MessageSpec", "ModelSpec", "OpenAIMessagesProjection", "Projection",
    "ProviderSpec", "Recipe", "SamplerColumn", "SeedDataset", "ServeGroup", "ServeSpec", "StructuredMessagesProjection",
    "ToolDataChecks", "apply_overrides", "check_recipe", "load_recipe", "mask_secrets",
    "parse_overrides", "recipe_dict", "recipe_hash", "resolve_recipe_path", "template_names",
]  # fmt: skip
