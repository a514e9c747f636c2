"""The run's report, beside its output: one static HTML page, readable offline (its charts are inside it), and the
same charts as PNG files that the dataset card shows. Written by every run that ends with a manifest.

Charts (matplotlib): records per node and output tokens per server over the run; records dropped by reason; tokens
per record as a trainer sees them; the judges' score distributions; requests and tokens per model. A chart without
data this run says why instead of staying away, so the page and the card always have the same pieces.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdg_job.store import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sdg_job.job import Job

log = logging.getLogger("sdg_job")
CHARTS = {  # file name part → title
    "progress": "Records per node and output tokens per server over the run",
    "drops": "Records dropped, by reason",
    "tokens": "Tokens per record, as a trainer sees them",
    "judges": "Judge scores",
    "usage": "Requests and tokens per model",
}


def report_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.report.html")


def chart_paths(out: Path) -> dict[str, Path]:
    return {name: out.with_name(f"{out.stem}.report-{name}.png") for name in CHARTS}


def places(out: Path) -> list[Path]:
    """Every file the report writes beside the output `out`."""
    return [report_path(out), *chart_paths(out).values()]


def write_report(job: Job, manifest: dict[str, Any]) -> list[Path]:
    """The PNGs and the page, each written atomically; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    out = job.recipe.output_path
    drawers: dict[str, Callable[[Figure], str | None]] = {
        "progress": lambda fig: _progress(fig, job),
        "drops": lambda fig: _bars(fig, manifest.get("dropped") or {}, "records", "none dropped"),
        "tokens": lambda fig: _token_lengths(fig, job),
        "judges": lambda fig: _judges(fig, job),
        "usage": lambda fig: _usage(fig, manifest.get("usage") or {}),
    }
    pngs = {}
    for name, path in chart_paths(out).items():
        pngs[name] = _png(drawers[name], CHARTS[name])
        atomic_write(path, pngs[name])
    atomic_write(report_path(out), _page(manifest, pngs))
    return places(out)


def _png(draw: Callable[[Figure], str | None], title: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    try:
        empty = draw(fig)
    except Exception as e:  # a chart is not worth the run: its output and manifest are written all the same
        log.warning("report: the chart %r was not drawn: %s: %s", title, type(e).__name__, e)
        empty = f"not drawn: {type(e).__name__}"
    if empty is not None:
        fig.clear()
        fig.text(0.5, 0.5, empty, ha="center", va="center", fontsize=12, color="#555")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _progress(fig: Figure, job: Job) -> str | None:
    """Each committed shard at the time its summary landed: cumulative records per node, and output tokens per
    server (a model alias on a node: each alias has its own server)."""
    landed = {shard_id: job.store.summary_path(shard_id).stat().st_mtime for shard_id in job.summaries}
    shards = [(landed[shard_id], job.summaries[shard_id]) for shard_id in sorted(landed, key=landed.__getitem__)]
    if not shards:
        return "no shard committed"
    start = shards[0][0] - max(s.seconds for _, s in shards)
    records: dict[str, list[tuple[float, int]]] = defaultdict(list)
    tokens: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for when, summary in shards:
        node = (summary.node_id or summary.worker.split(":")[0])[:12]
        minutes = (when - start) / 60
        records[node].append((minutes, summary.valid))
        by_alias = {alias: used.get("output_tokens", 0) for alias, used in summary.usage.items()}
        for alias, count in (by_alias or {"all models": summary.output_tokens}).items():
            tokens[f"{node} {alias}"].append((minutes, count))
    left, right = fig.subplots(1, 2)
    for axis, lines in ((left, records), (right, tokens)):
        for label, found in sorted(lines.items()):
            axis.step([t for t, _ in found], _cumulative(v for _, v in found), where="post", label=label)
        axis.legend(fontsize=7)
    left.set(xlabel="minutes", ylabel="valid records (per node)")
    right.set(xlabel="minutes", ylabel="output tokens (per server)")
    return None


def _cumulative(values) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _bars(fig: Figure, counts: dict[str, int], unit: str, empty: str) -> str | None:
    if not counts:
        return empty
    ax = fig.subplots()
    names = sorted(counts, key=counts.__getitem__)
    ax.barh(names, [counts[n] for n in names], color="#4c72b0")
    ax.set_xlabel(unit)
    return None


def _token_lengths(fig: Figure, job: Job) -> str | None:
    counts = job.store.record_tokens(job.committed_ids(), job.recipe.num_records)
    if counts is None or not len(counts):
        return "not counted (the job counts them only with a model it serves)"
    ax = fig.subplots()
    ax.hist(counts, bins=min(40, max(5, len(counts) // 5)), color="#55a868")
    ax.set(xlabel="tokens", ylabel="records")
    return None


def _judges(fig: Figure, job: Job) -> str | None:
    """Scores of the judge columns kept in the output ({score name: {"score": …}} per record, Data Designer's form)."""
    scores: dict[str, Counter[str]] = defaultdict(Counter)
    for path in job.recipe.output_files:
        if not path.exists():
            return "no output written"
        with path.open(encoding="utf-8") as f:
            for line in f:
                for column, value in json.loads(line).items():
                    if isinstance(value, dict):
                        for score, found in value.items():
                            if isinstance(found, dict) and "score" in found:
                                scores[f"{column}.{score}"][str(found["score"])] += 1
    if not scores:
        return "no judge scores in the output (a projection keeps none)"
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (name, counts) in zip(axes, sorted(scores.items()), strict=True):
        options = sorted(counts)
        ax.bar(options, [counts[o] for o in options], color="#c44e52")
        ax.set(title=name, xlabel="score", ylabel="records")
    return None


def _usage(fig: Figure, usage: dict[str, dict[str, int]]) -> str | None:
    if not usage:
        return "no model was asked"
    requests, tokens = fig.subplots(1, 2)
    aliases = sorted(usage)
    requests.barh(aliases, [usage[a].get("requests", 0) for a in aliases], color="#8172b2")
    requests.set_xlabel("requests")
    tokens.barh(aliases, [usage[a].get("input_tokens", 0) for a in aliases], label="in", color="#64b5cd")
    tokens.barh(aliases, [usage[a].get("output_tokens", 0) for a in aliases],
                left=[usage[a].get("input_tokens", 0) for a in aliases], label="out", color="#ccb974")  # fmt: skip
    tokens.set_xlabel("tokens")
    tokens.legend(fontsize=8)
    return None


def _page(manifest: dict[str, Any], pngs: dict[str, bytes]) -> str:
    facts = {
        "status": manifest.get("status"),
        "records": f"{manifest.get('records')} of {manifest.get('num_records', manifest.get('records'))}",
        "attempted": manifest.get("attempted"),
        "wall time": f"{manifest.get('wall_time_s')} s",
        "recipe": manifest.get("recipe"),
        "recipe sha256": manifest.get("recipe_sha256"),
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    charts = "".join(
        f'<figure><img alt="{html.escape(CHARTS[name])}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(CHARTS[name])}</figcaption></figure>"
        for name, png in pngs.items()
    )
    title = html.escape(f"sdg-job report: {manifest.get('recipe')}")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:1em}"
             "img{max-width:100%}")  # fmt: skip
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title><style>{style}</style>"
            f"</head><body><h1>{title}</h1><table>{rows}</table>{charts}</body></html>\n")  # fmt: skip
