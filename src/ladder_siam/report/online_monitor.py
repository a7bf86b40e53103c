"""The online monitor in the report: per-stage probe and RankMe curves beside the final probe.

Pretraining's online monitor (``pretrain/monitor.py``) logs, per stage, the top-1 of a linear
probe trained on the detached features as the run goes (``online_probe_top1_<stage>``) and
the RankMe of the pooled features (``rankme_<stage>``) and of each level's projector output
(``rankme_projector_<level>``). Here they become one panel per stage with every run overlaid,
and a table of their last values, in the per-stage probe section: the curves show *when* a
stage learned, the final probe how far it got.
"""

from __future__ import annotations

from typing import Any

from ladder_siam.nets.archs import STAGES
from ladder_siam.report import figures as report_figures
from ladder_siam.report.html import NOT_RUN, Block, Figure, Paragraph, Table
from ladder_siam.report.inputs import RunResults

# train_log.jsonl field prefix -> (summary key, chart title, y-axis label, figure file).
SERIES = {
    "online_probe_top1_": (
        "probe_top1", "online linear probe top-1 (%), before each batch's update", "top-1 %",
        "online_probe_stages.png",
    ),
    "rankme_": (
        "rankme", "RankMe of the pooled stage features (1 = collapsed)", "RankMe",
        "rankme_stages.png",
    ),
    "rankme_projector_": (
        "projector_rankme", "RankMe of each level's projector output", "RankMe",
        "rankme_projector_stages.png",
    ),
}  # fmt: skip


def _points(run: RunResults, key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in run.train_log if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def last_values(run: RunResults) -> dict[str, dict[str, float]]:
    """Per summary key (``probe_top1``, ``rankme``, ``projector_rankme``): stage -> last value."""
    values: dict[str, dict[str, float]] = {}
    for prefix, (name, *_) in SERIES.items():
        for stage in STAGES:
            _, ys = _points(run, f"{prefix}{stage}")
            if ys:
                values.setdefault(name, {})[stage] = ys[-1]
    return values


def online_monitor_blocks(runs: list[RunResults]) -> list[Block]:
    """The paragraph, the table of last values and the per-stage curves, all runs overlaid."""
    last = {run.name: last_values(run) for run in runs}
    if not any(last.values()):
        note = (
            f"Online monitor: {NOT_RUN} for any run (shards without labels, or "
            "--online-monitor false)."
        )
        return [Paragraph(note, note=True)]
    blocks: list[Block] = [
        Paragraph(
            "While pretraining ran, the online monitor trained a linear probe on each stage's "
            "detached pooled features, scoring it on every batch before learning from it, and "
            "computed RankMe (Garrido et al. 2023: the effective rank of the features over the "
            "last samples; 1 means collapsed) every --rank-every steps. The curves show when "
            "each stage learned; the table above, how well it did in the end."
        ),
        Table(
            ["run", *(f"{s} online top-1" for s in STAGES), *(f"{s} RankMe" for s in STAGES)],
            [
                [run.name]
                + [_cell(last[run.name].get("probe_top1", {}).get(s)) for s in STAGES]
                + [_cell(last[run.name].get("rankme", {}).get(s)) for s in STAGES]
                for run in runs
            ],
            "Online monitor, last logged values",
        ),
    ]
    for prefix, (_, title, ylabel, filename) in SERIES.items():
        panels: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            series = {run.name: _points(run, f"{prefix}{stage}") for run in runs}
            panels[stage] = {name: xy for name, xy in series.items() if xy[0]}
        if any(panels.values()):
            png = report_figures.stage_curves(panels, title, ylabel, [r.name for r in runs])
            blocks.append(Figure(filename, png, title))
    return blocks


def _cell(value: float | None) -> str:
    return NOT_RUN if value is None else f"{value:.4g}"
