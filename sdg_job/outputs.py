"""The files a run writes beside its output, and whose they are.

A run writes its output file(s) (or `<output>.partial`), the manifest, the dataset card and the run dir, all beside
the output. It writes each only where nothing is, or where its own earlier run of this output left it: the run dir
says so (`run.json`, and `outputs.json`, the files its merges wrote), the manifest does (the files it names), or a
card carries the job's marker for this output. Anything else at one of those paths is someone else's: the run stops
before any work (exit 2), or, with `output.overwrite=true`, moves it aside to `<name>.replaced-<UTC time>`; the job
deletes nothing it did not write. No output is one of the run's inputs, by any name (symlink, `..`, hard link), and
no input lies inside the run dir (`--fresh` empties it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from sdg_job.card import card_places, holds_card_of
from sdg_job.config import Recipe
from sdg_job.errors import JobError, RecipeError, all_problems
from sdg_job.lease import LEASE_FILE
from sdg_job.report import places as report_places
from sdg_job.store import IDENTITY_FILE, WRITTEN_FILE, atomic_write

log = logging.getLogger("sdg_job")


def places(recipe: Recipe) -> list[tuple[str, Path]]:
    """(what, path) of everything the run may write outside its run dir, and the run dir."""
    out = recipe.output_path
    found = [("output", path) for path in recipe.output_files]
    found += [("partial output", out.with_name(out.name + ".partial")), ("manifest", recipe.manifest_path)]
    found += [("dataset card", card) for card in card_places(out)]
    found += [("report", path) for path in report_places(out)]
    return [*found, ("run dir", recipe.run_dir)]


def inputs(recipe: Recipe, source: str) -> list[tuple[str, Path]]:
    """(key, path) of every file the run reads: the recipe itself, its seed file, model files it serves."""
    found = [("recipe", Path(source))]
    if recipe.seed_dataset is not None:
        found.append(("seed_dataset.path", recipe.seed_dataset.path))
    found += [(f"quality.decontaminate.{i}", path) for i, path in enumerate(recipe.quality.decontaminate)]
    for name, spec in recipe.servers.items():
        for field in ("model", "llama_server"):
            value = getattr(spec, field)
            if value and os.path.exists(os.path.expanduser(value)):
                found.append((f"{recipe.serve_key(name)}.{field}", Path(value).expanduser()))
    return found


def _same(a: Path, b: Path) -> bool:
    """One file under two names: the same path once symlinks and `..` are resolved, or a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _inside(path: Path, directory: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


def inputs_written(recipe: Recipe, source: str) -> dict[Path, str]:
    """Each place of the run that is (or, for the run dir, holds) one of its inputs → why that cannot be."""
    found = {}
    for key, path in inputs(recipe, source):
        for what, place in places(recipe):
            same = _same(place, path)
            if same or (what == "run dir" and _inside(path, place)):
                where = "is" if same else "is inside"
                found[place] = (
                    f"the run's {what} {place} {where} an input of the run ({key}: {path}); choose another output_path"
                )
    return found


def _run_dir_is_ours(run_dir: Path) -> bool:
    if run_dir.is_symlink() or not run_dir.is_dir():
        return False
    names = {p.name for p in run_dir.iterdir()}
    return not names or IDENTITY_FILE in names or LEASE_FILE in names


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recorded(run_dir: Path) -> dict | None:
    """The run dir's record of the files its merges wrote ({name: stat, or None while being written}), if any."""
    held = _json(run_dir / WRITTEN_FILE)
    files = held.get("files") if isinstance(held, dict) else None
    return files if isinstance(files, dict) else None


def stat_of(path: Path) -> dict[str, int]:
    """What the job remembers of a file it wrote: a file edited or replaced since then is no longer the job's."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(path: Path, recorded: object) -> bool:
    """Whether `path` is still the file the job wrote: None (about to be written when the run stopped) claims the
    name; a recorded size and modification time must match."""
    if recorded is None:
        return True
    return isinstance(recorded, dict) and path.is_file() and not path.is_symlink() and stat_of(path) == recorded


def _claimed(out: Path, files: object) -> set[Path]:
    """The paths of a {name: stat or None} record that still hold what the job wrote."""
    if not isinstance(files, dict):
        return set()
    paths = {name: out.with_name(name) for name in files if isinstance(name, str) and "/" not in name}
    return {path for name, path in paths.items() if _unchanged(path, files[name])}


def owned(recipe: Recipe) -> set[Path]:
    """The paths that hold what the job's own earlier runs of this output wrote, as the run dir or the manifest
    says (a manifest or run dir of a version that kept no record: the names it used), and this output's cards."""
    out, run_dir = recipe.output_path, recipe.run_dir
    found: set[Path] = set()
    if _run_dir_is_ours(run_dir):
        found.add(run_dir)
        written = _recorded(run_dir)
        if written is not None:
            found |= _claimed(out, written)
        elif (run_dir / IDENTITY_FILE).exists():
            found |= {out, out.with_name(out.name + ".partial"), recipe.manifest_path}
    manifest = _json(recipe.manifest_path)
    if isinstance(manifest, dict) and "recipe_sha256" in manifest and "output_files" in manifest:
        found.add(recipe.manifest_path)
        stats = manifest.get("output_file_stats")
        names = manifest["output_files"] if isinstance(manifest["output_files"], list) else []
        found |= _claimed(out, stats if isinstance(stats, dict) else dict.fromkeys(names))
    found |= {card for card in card_places(out) if holds_card_of(card, out)}
    return {path for path in found if not path.is_symlink()}


def conflicts(recipe: Recipe) -> list[tuple[str, Path]]:
    """(what, path) of each place the run would write that holds something not the job's own."""
    ours = owned(recipe)
    readme, own_card = card_places(recipe.output_path)
    found = []
    for what, path in places(recipe):
        if path == readme:  # never written unless it is this output's card: the card then goes to `own_card`
            continue
        if path == own_card and (not os.path.lexists(readme) or readme in ours):
            continue
        if os.path.lexists(path) and path not in ours:
            found.append((what, path))
    return found


def move_aside(path: Path) -> Path:
    """Rename `path` to a free `<name>.replaced-<UTC time>[-k]` beside it; nothing is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    k = 1
    while os.path.lexists(target):
        target, k = path.with_name(f"{path.name}.replaced-{stamp}-{k}"), k + 1
    os.rename(path, target)
    return target


def check_output_path(recipe: Recipe, source: str, create: bool = True) -> None:
    """Refuse, before the lease, Ray or a server, an output that would overwrite an input or a file not the job's
    own, and one whose directory cannot be made and written to. With `create` (run), makes the empty run dir and
    moves aside what `output.overwrite` allows; without it (validate), leaves the disk as it found it."""
    out = recipe.output_path
    if out.is_dir():
        raise RecipeError(source, "output_path", f"{out} is a directory; name the output file")
    clashes = inputs_written(recipe, source)
    found = [(source, "output_path", message) for message in clashes.values()]
    taken = [(what, path) for what, path in conflicts(recipe) if path not in clashes]  # each place told once
    if taken and not recipe.output.overwrite:
        found += [(source, "output_path", f"{path} exists and is not this job's {what} (no manifest or run dir of "
                                          "this output vouches for it as it is now); choose another output_path, or "
                                          "set output.overwrite=true to move it aside (renamed, never deleted)")
                  for what, path in taken]  # fmt: skip
    if found:
        raise all_problems(source, found)
    for what, path in taken:  # output.overwrite is set
        if create:
            log.warning("output.overwrite: moved the %s %s aside to %s", what, path, move_aside(path).name)
        else:
            log.warning("output.overwrite: run will move the %s %s aside (renamed, not deleted)", what, path)
    _try_run_dir(recipe, source, create)


def _try_run_dir(recipe: Recipe, source: str, create: bool) -> None:
    """The run dir can be made and written to; a new one gets the (empty) list of files its merges write. Without
    `create`, the directories it made are removed again: "validate passed" means exactly "run gets past this"."""
    run_dir = recipe.run_dir
    key = "output_dir" if recipe.output_path.parent.is_relative_to(recipe.output_dir) else "output_path"
    missing = [p for p in (run_dir, *run_dir.parents) if not os.path.lexists(p)]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):  # unnamed, gone on close: a read-only dir fails here
            pass
        if create and not (run_dir / WRITTEN_FILE).exists():
            atomic_write(run_dir / WRITTEN_FILE, json.dumps({"files": {}}) + "\n")
    except OSError as e:
        raise RecipeError(source, key, f"cannot create {e.filename or run_dir}: {e.strerror or e}") from None
    finally:
        if not create:
            for made in missing:  # deepest first
                with contextlib.suppress(OSError):
                    made.rmdir()


def note_written(recipe: Recipe, paths: list[Path]) -> None:
    """Before a merge writes `paths`: first, nothing else has appeared at the run's places while it ran (exit 1,
    committed shards kept); then the run dir claims them (no stat yet: a crash mid-merge leaves them the job's)."""
    taken = conflicts(recipe)
    if taken:
        raise JobError("; ".join(f"{path} appeared while the job ran and is not its {what}" for what, path in taken)
                       + ": move it away and run the same command to write the output")  # fmt: skip
    _record(recipe, dict.fromkeys(path.name for path in paths))


def note_stats(recipe: Recipe, paths: list[Path]) -> dict[str, dict[str, int]]:
    """After writing `paths`: the run dir records what they are now; returns that record."""
    stats = {path.name: stat_of(path) for path in paths}
    _record(recipe, stats)
    return stats


def _record(recipe: Recipe, files: Mapping[str, dict[str, int] | None]) -> None:
    merged = {**(_recorded(recipe.run_dir) or {}), **files}
    out = recipe.output_path  # a file the job wrote and since removed is no longer its to claim
    merged = {name: stat for name, stat in merged.items() if stat is None or os.path.lexists(out.with_name(name))}
    atomic_write(recipe.run_dir / WRITTEN_FILE, json.dumps({"files": dict(sorted(merged.items()))}, indent=1) + "\n")


def written_before(recipe: Recipe) -> list[Path]:
    """The files beside the output that the run dir lists as written by its merges and that still hold it."""
    return sorted(_claimed(recipe.output_path, _recorded(recipe.run_dir)))
