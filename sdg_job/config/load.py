"""Recipe files + overrides → validated `Recipe`.

OmegaConf does the YAML work (`defaults:` inheritance, `${oc.env:…}` interpolation, `key=value` overrides);
the schema holds the strict model; `checks.check_recipe` runs the cross-checks that need more than one field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError

from sdg_job.config import dd_shape, step_shape
from sdg_job.config.checks import SERVE_REFUSED, recipe_problems
from sdg_job.config.schema import UNION_TAGS, Recipe
from sdg_job.config.secrets import secret_problems
from sdg_job.errors import RecipeError, all_problems

RECIPES_DIR = Path(os.environ.get("SDG_RECIPES_DIR", Path(__file__).resolve().parents[2] / "recipes"))


def resolve_recipe_path(ref: str) -> Path:
    """`tiny` → recipes/tiny.yaml; anything with a slash or .yaml suffix is a path."""
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        return _full_path(ref, "command line", "recipe")
    return RECIPES_DIR / f"{ref}.yaml"


def _full_path(path: str | Path, source: str, key: str, follow: bool = True) -> Path:
    """`~` expanded, absolute; a path that cannot be (`~nosuchuser/…`, a NUL byte) is bad input, not a crash.
    Without `follow`, a link at the last component stays a link: the job's file is written in its place (and found
    to be someone else's), never through it into whatever it points at."""
    try:
        full = Path(path).expanduser()
        return full.resolve() if follow else full.parent.resolve() / full.name
    except (RuntimeError, ValueError, OSError) as e:
        raise RecipeError(source, key, f"not a usable path {str(path)!r}: {e}") from None


def read_yaml_mapping(path: Path, what: str = "a recipe") -> DictConfig:
    """One YAML file that must hold a mapping; any way it cannot be read is bad input naming the file."""
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise RecipeError(str(path), "", f"not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), "", f"not UTF-8 text (byte 0x{e.object[e.start]:02x}): save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(str(path), "", f"cannot read it: {e.strerror}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(str(path), "", f"{what} must be a mapping")
    return cfg


def _load_yaml(path: Path, found: list[tuple[str, str, str]], chain: tuple[Path, ...] = ()) -> DictConfig:
    """Load one recipe file, merging the files its `defaults:` list names underneath it. Problems of the step's
    shape go to `found`; the others raise at once (the file cannot be read further)."""
    if path in chain:
        raise RecipeError(str(path), "defaults", f"inheritance cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        raise RecipeError(str(path), "", "recipe not found" + (f" (from {chain[-1]})" if chain else ""))
    replaced: set[str] = set()
    written = dd_shape.read_dd_config(path)
    if written is not None:  # Data Designer's own config file, read into ours (its text is never interpolated)
        cfg = OmegaConf.create(dd_shape.escape_interpolation(dd_shape.translate(written, str(path), found)))
        raw: dict[str, Any] = {}
    else:
        cfg = read_yaml_mapping(path)
        raw = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
    if step_shape.is_step_shape(raw):  # the Nemotron step's shape: read into ours, file by file
        found += [(str(path), key, why) for key, why in secret_problems(raw)]  # in the step's own key names
        translated, replaced = step_shape.translate(raw, str(path), found)
        cfg = OmegaConf.create(translated)
    seed = cfg.get("seed_dataset")
    if isinstance(seed, DictConfig) and "path" in seed and not OmegaConf.is_interpolation(seed, "path"):
        raw = seed.path
        if isinstance(raw, str) and not raw.startswith("~") and not Path(raw).is_absolute():
            seed.path = str(_full_path(path.parent / raw, str(path), "seed_dataset.path"))  # relative to this file
    try:  # resolved here, before files merge: `defaults: ${oc.env:UNSET}` is bad input, not a traceback
        parents = cfg.pop("defaults", [])
        if isinstance(parents, ListConfig):
            parents = OmegaConf.to_container(parents, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(str(path), "defaults", f"cannot be resolved: {str(e).splitlines()[0]}") from None
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise RecipeError(str(path), "defaults", "must be a list of recipe names or paths")
    merged: DictConfig = OmegaConf.create({})
    for parent in parents:
        # Next to the including file first, then the built-in recipes: `defaults: [default, layers/cpu]`.
        name = str(parent) if str(parent).endswith((".yaml", ".yml")) else f"{parent}.yaml"
        parent_path = path.parent / name
        if not parent_path.is_file() and (RECIPES_DIR / name).is_file():
            parent_path = RECIPES_DIR / name
        parent_path = _full_path(parent_path, str(path), "defaults")  # a NUL byte in a name: bad input
        merged = _merge(merged, _load_yaml(parent_path, found, (*chain, path)), parent_path)
    for section in replaced & set(merged.keys()):  # a list in the step's shape replaces the parent's section
        del merged[section]
    _drop_retyped(merged, cfg)
    return _merge(merged, cfg, path)


def _merge(base: DictConfig, child: DictConfig, path: Path) -> DictConfig:
    try:
        return OmegaConf.merge(base, child)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        clashes = list(_clashes(OmegaConf.to_container(base), OmegaConf.to_container(child))) or [("", str(e))]
        key = clashes[0][0] if len(clashes) == 1 else ""
        detail = clashes[0][1] if key else "; ".join(f"{k}: {what}" for k, what in clashes)
        hint = "write the section in the parent's form, or set it to null first to drop the parent's"
        raise RecipeError(str(path), key, f"cannot merge over its parent: {detail} ({hint})") from None


def _clashes(base: Any, child: Any, prefix: str = ""):
    """Keys where a child gives a list over a mapping (or the other way round): OmegaConf cannot merge those."""
    if isinstance(base, dict) and isinstance(child, dict):
        for key in child.keys() & base.keys():
            yield from _clashes(base[key], child[key], f"{prefix}.{key}" if prefix else str(key))
        return
    kinds: dict[type, str] = {dict: "a mapping", list: "a list"}
    old, new = kinds.get(type(base)), kinds.get(type(child))
    if (old or new) and old != new and base is not None and child is not None:
        yield prefix, f"{new or 'a value'} over {old or 'a value'}"


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
        except (OmegaConfBaseException, TypeError, ValueError, LookupError) as e:  # e.g. a name as a list's index
            raise RecipeError(source, key, f"cannot apply override: {e}") from None
        except RecursionError:
            raise RecipeError(source, key, "cannot apply override: the value refers to itself (a YAML alias)") from None


def layer_path(name: str) -> Path:
    """`layer=cpu` is recipes/layers/cpu.yaml; a name with a `/` or ending in .yaml is a file of the user's."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        path = _full_path(name, "command line", "layer")
    else:
        path = RECIPES_DIR / "layers" / f"{name}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in (RECIPES_DIR / "layers").glob("*.yaml")))
        raise RecipeError("command line", "layer", f"no layer {name!r} (the shipped ones: {shipped})")
    return path


def load_recipe(ref: str, overrides: list[str] = (), check: bool = True) -> Recipe:  # type: ignore[assignment]
    """The one entry point: file + layers + overrides → validated, cross-checked Recipe. `layer=NAME` among the
    overrides merges a layer over the recipe, as `defaults: [recipe, layers/NAME]` in a file of one's own would
    (`recipe=rl_pref layer=cpu`: rl_pref on the embedded CPU model); the other overrides apply after it."""
    path = resolve_recipe_path(ref)
    source = str(path)
    found: list[tuple[str, str, str]] = []  # (source, key, message): every stage's problems, reported together
    cfg = _load_yaml(path, found)
    moves_every_model = any(o.startswith("provider=") for o in overrides)  # `docker run … provider=openai`
    for layer in [o.split("=", 1)[1] for o in overrides if o.startswith("layer=")]:
        over = layer_path(layer)
        layered = _load_yaml(over, found)
        moves_every_model |= "provider" in layered  # layer=cpu: every model on the embedded one
        _drop_retyped(cfg, layered)
        cfg = _merge(cfg, layered, over)
    overrides = [o for o in overrides if not o.startswith("layer=")]
    if moves_every_model:
        models = cfg.get("models")
        for model in models.values() if isinstance(models, DictConfig) else ():
            if isinstance(model, DictConfig) and "provider" in model:
                model.provider = None
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
    _inherit_serve_keys(data)
    found += [(source, key, why) for key, why in secret_problems(data) if (source, key, why) not in found]
    if "provider" not in data:
        data["provider"] = _one_provider(data)
    recipe, broken = _validated(data, source, found)
    if recipe is None:
        raise all_problems(source, found)
    if not recipe.name:
        recipe = recipe.model_copy(update={"name": recipe.output_path.stem})
    recipe = _absolutize(recipe, path)
    if check or found:  # with problems already, the cross-checks' too: all of them in one run
        found += recipe_problems(recipe, source, broken)
    if found:
        raise all_problems(source, found)
    return recipe


def _inherit_serve_keys(data: dict) -> None:
    """`serve.servers`: the keys beside it are every server's unless the server sets its own (mappings such as
    `env` merged key by key), so a layer's `serve:` keys reach each server. `NAME: null` drops an inherited server;
    `servers: null` goes back to the single form."""
    serve = data.get("serve")
    if isinstance(serve, dict) and "servers" in serve and serve["servers"] is None:
        del serve["servers"]
    if not (isinstance(serve, dict) and isinstance(serve.get("servers"), dict)):
        return
    shared = {k: v for k, v in serve.items() if k != "servers"}
    servers = {name: _over(shared, own) for name, own in serve["servers"].items() if own is not None}
    data["serve"] = {"servers": servers}


def _over(base: Any, own: Any) -> Any:
    """`own` over `base`: mappings merge key by key, anything else is replaced (the schema judges what results)."""
    if isinstance(base, dict) and isinstance(own, dict):
        return {**base, **{k: _over(base.get(k), v) for k, v in own.items()}}
    return own


STAND_INS = {"num_records": 1}  # for a required value the schema refused, while the cross-checks run


def _validated(data: dict, source: str, found: list) -> tuple[Recipe | None, frozenset[str]]:
    """The Recipe, or, when the schema refuses parts of it, the schema's problems added to `found` and a Recipe
    without the refused columns, models and sections (their names returned), so the cross-checks can still report
    theirs in the same run; None when even that does not validate."""
    try:
        return Recipe.model_validate(data), frozenset()
    except ValidationError as e:
        found += [(source, key, message) for key, message in _problem_list(e)]
        errors = e.errors()
    data, broken = dict(data), set()
    for err in errors:
        loc = [str(p) for p in err["loc"]] or [""]
        if loc[0] == "models" and len(loc) > 1 and isinstance(data.get("models"), dict):
            data["models"] = {**data["models"], loc[1]: {"model": "refused"}}  # a recipe has at least one
            broken.add(loc[1])
        elif loc[0] in ("columns", "providers") and len(loc) > 1 and isinstance(data.get(loc[0]), dict):
            data[loc[0]] = {k: v for k, v in data[loc[0]].items() if k != loc[1]}
            broken.add(loc[1])
        elif loc[0] == "output_projection":
            data[loc[0]] = {"type": "openai_messages", "messages": []}  # stands in; its own problems are reported
        elif loc[0] == "serve":
            data.pop("serve", None)
            broken.add(SERVE_REFUSED)  # refused, not missing: the cross-checks say nothing more of it
        elif loc[0] in STAND_INS:
            data[loc[0]] = STAND_INS[loc[0]]
        else:
            data.pop(loc[0], None)  # a section with a default falls back to it; a required one fails below
    try:
        return Recipe.model_validate(data), frozenset(broken)
    except ValidationError:
        return None, frozenset()


def _problem_list(error: ValidationError) -> list[tuple[str, str]]:
    """(key, message) of each problem the schema found."""
    found = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        # The tag pydantic inserts after a union (columns.NAME.<tag>, output_projection.<tag>), not a key named so.
        at = {"columns": 2, "output_projection": 1, "serve": 1}.get(loc[0]) if loc else None
        if at is not None and len(loc) > at and loc[at] in UNION_TAGS:
            del loc[at]
        message = err["msg"]
        # A check across keys (a model validator) has no location: its message starts with the key it is about.
        if not loc and (keyed := re.match(r"Value error, ([\w.-]+): (.*)", message, re.S)):
            loc, message = [keyed[1]], keyed[2]
        found.append((".".join(loc), message))
    return found


def _one_provider(data: dict) -> str | None:
    """The step names a provider per model, and no recipe-wide one: the recipe's default is the one its models name
    (the first named, when they name several; each model keeps its own)."""
    models = data["models"] if isinstance(data.get("models"), dict) else {}
    named = [m.get("provider") for m in models.values() if isinstance(m, dict)]
    return next((p for p in named if p and isinstance(p, str)), None)  # others: the schema's to refuse


def _absolutize(recipe: Recipe, path: Path) -> Recipe:
    """Relative output paths (and interpolated seed paths) are relative to the working directory."""
    source = str(path)
    update: dict[str, Any] = {
        "output_dir": _full_path(recipe.output_dir, source, "output_dir"),
        "output_path": _full_path(recipe.output_path, source, "output_path", follow=False),
    }
    if recipe.seed_dataset is not None:
        seed_path = _full_path(recipe.seed_dataset.path, source, "seed_dataset.path")
        update["seed_dataset"] = recipe.seed_dataset.model_copy(update={"path": seed_path})
    if evals := recipe.quality.decontaminate:
        paths = [_full_path(p, source, f"quality.decontaminate.{i}") for i, p in enumerate(evals)]
        update["quality"] = recipe.quality.model_copy(update={"decontaminate": paths})
    return recipe.model_copy(update=update)
