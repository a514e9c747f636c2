"""The report's progress chart: records per node, output tokens per server (model alias on a node)."""

import os
from pathlib import Path
from types import SimpleNamespace

from matplotlib.figure import Figure

from sdg_job import report
from tests.conftest import shard_summary


def test_progress_plots_each_node_and_each_server_even_when_shards_landed_at_once(tmp_path: Path) -> None:
    usage = {"text": {"requests": 4, "output_tokens": 300}, "judge": {"requests": 4, "output_tokens": 40}}
    summaries = {f"shard-0000{i}": shard_summary(f"shard-0000{i}", valid=4, output_tokens=340, seconds=2.0,
                                                 node_id=node, usage=usage)
                 for i, node in enumerate(["node-a", "node-b", "node-a"])}  # fmt: skip
    for shard_id in summaries:  # the same second: a coarse file system, or shards committed together
        (tmp_path / shard_id).write_text("{}")
        os.utime(tmp_path / shard_id, (1_000_000, 1_000_000))
    job = SimpleNamespace(summaries=summaries, store=SimpleNamespace(summary_path=lambda shard_id: tmp_path / shard_id))
    fig = Figure()
    assert report._progress(fig, job) is None  # type: ignore[arg-type]
    records, tokens = fig.axes
    assert [line.get_label() for line in records.get_lines()] == ["node-a", "node-b"]
    assert [line.get_label() for line in tokens.get_lines()] == ["node-a judge", "node-a text", "node-b judge",
                                                                  "node-b text"]  # fmt: skip
    node_a_text = tokens.get_lines()[1]
    assert list(node_a_text.get_ydata()) == [300, 600]  # cumulative over node-a's two shards


def test_progress_says_why_it_is_empty() -> None:
    job = SimpleNamespace(summaries={}, store=None)
    assert report._progress(Figure(), job) == "no shard committed"  # type: ignore[arg-type]


def test_a_chart_that_fails_says_so_and_the_run_goes_on(caplog) -> None:
    def broken(fig: Figure) -> str | None:
        raise ValueError("no data of that shape")

    png = report._png(broken, "Records dropped, by reason")
    assert png.startswith(b"\x89PNG")
    assert "the chart 'Records dropped, by reason' was not drawn: ValueError: no data of that shape" in caplog.text
