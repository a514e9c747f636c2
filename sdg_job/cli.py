"""`python -m sdg_job run|validate recipe=NAME|PATH [key=value …] [--preview] [--fresh]`.

Exit codes: 0 ok; 2 bad input (recipe, seed file, override), the run dir held by another driver, or a Data Designer
whose requests the job cannot observe (sdg_job.observe), with nothing written; 1 runtime failure; 143 stopped by
SIGTERM (Slurm's time limit, preemption, scancel), 130 by Ctrl-C, 129 by SIGHUP, with the manifest saying
`interrupted`. After 1 and 128+N, finished shards are kept so the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from sdg_job import observe
from sdg_job.config import check_recipe, load_recipe, recipe_dict, resolve_recipe_path
from sdg_job.errors import EngineMismatch, Interrupted, JobError, RecipeError
from sdg_job.generate import offline_environment
from sdg_job.outputs import check_output_path

log = logging.getLogger("sdg_job")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdg_job", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "generate the dataset"), ("validate", "check a recipe and print it resolved")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("args", nargs="*", metavar="recipe=NAME|PATH key=value", help="recipe and overrides")
        if name == "run":
            p.add_argument("--preview", action="store_true", help="generate and print 3 records; write nothing")
            p.add_argument("--fresh", action="store_true", help="discard finished shards of an earlier run")
    p = sub.add_parser("status", help="where a run stands, read from its run dir (while it runs or after)")
    p.add_argument("place", type=Path, metavar="RUN_DIR_OR_OUTPUT", help="the run dir, or the output file")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser.parse_args(argv)


def _status(place: Path, as_json: bool) -> int:
    from sdg_job import status

    try:
        found = status.read(place)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(found, indent=2) if as_json else status.render(found))
    return 0


def recipe_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    recipes = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    overrides = [a for a in args if not a.startswith("recipe=")]
    if len(recipes) != 1 or not recipes[0]:
        raise RecipeError("command line", "recipe", "give exactly one recipe=NAME or recipe=PATH")
    return recipes[0], overrides


def _load_secrets_file() -> None:
    """Docker via NeMo-Run cannot pass env vars by name: it mounts the user's KEY=VALUE file instead."""
    path = os.environ.get("SDG_SECRETS_FILE")
    if not path or not Path(path).is_file():
        return
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(path, "SDG_SECRETS_FILE", f"cannot read it as UTF-8 text: {e}") from None
    for line in text.splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key and not key.startswith("#"):
            os.environ.setdefault(key.strip(), value.strip().strip("'\""))


def main(argv: list[str] | None = None) -> int:
    ns = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if ns.command == "status":
        return _status(ns.place, ns.json)
    try:
        _load_secrets_file()
        ref, overrides = recipe_and_overrides(ns.args)
        recipe = load_recipe(ref, overrides, check=False)
        source = str(resolve_recipe_path(ref))
        # Before anything imports Data Designer. A preview writes nothing next to the output.
        preview_home = Path(tempfile.gettempdir()) / "sdg-job-preview"
        offline_environment(preview_home if getattr(ns, "preview", False) else recipe.run_dir / "dd_home")
        check_recipe(recipe, source)
        # Before any server or worker starts: a Data Designer whose requests the job cannot observe would keep cut
        # answers and lose the causes of failed requests and the quota pacing, silently. Exit 2.
        observe.check()
        if ns.command == "validate":  # run's checks this machine can answer (the nodes' GPUs it cannot)
            check_output_path(recipe, source, create=False)
            print(yaml.safe_dump(recipe_dict(recipe), sort_keys=False, allow_unicode=True), end="")
            print(f"# ok: {source}", file=sys.stderr)
            return 0
        if ns.preview:
            from sdg_job.preview import preview  # heavy imports only when generating

            with _quiet_preview():
                records, dropped = preview(recipe, source)
            for record in records:
                print(json.dumps(record, ensure_ascii=False, indent=2))
            print(f"# preview: {len(records)} valid, dropped {dropped or 'none'}; nothing written", file=sys.stderr)
            return 0
        from sdg_job import job

        manifest = job.run(recipe, source, fresh=ns.fresh)
        files = recipe.output_files
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files: {files[0]} … {files[-1].name}"
        print(
            f"wrote {manifest['records']} records to {where}\n"
            f"manifest: {recipe.manifest_path}\n"
            f"dropped: {manifest['dropped'] or 'none'}; {manifest['wall_time_s']} s"
        )
        return 0
    except (RecipeError, EngineMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except JobError as e:
        print(f"failed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command to resume", file=sys.stderr)
        return 130


class _quiet_preview:
    def __enter__(self) -> None:
        for name in ("data_designer", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
