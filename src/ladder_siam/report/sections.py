"""The report's sections built from the runs' metrics and logs (summary, probe, curves, Fig. 5).

Each builder returns a :class:`~ladder_siam.report.html.Section`; anything a run lacks is a
"not run" cell or note, never an error. Values are shown as the evaluations wrote them.
"""

from __future__ import annotations

from typing import Any

from ladder_siam.nets.archs import STAGES
from ladder_siam.report import figures as report_figures
from ladder_siam.report import paper_reference
from ladder_siam.report.html import NOT_RUN, Block, Figure, Paragraph, Section, Table
from ladder_siam.report.inputs import HEADLINE, HEADLINE_LABELS, RunResults
from ladder_siam.report.online_monitor import last_values, online_monitor_blocks
from ladder_siam.report.task_correlation import MIN_RUNS, Correlation, correlate, correlation_matrix
from ladder_siam.runtime.run_folder import EVALUATIONS

# train_log.jsonl fields charted, with their titles; per-level ones are expanded per stage.
CURVES = {
    "loss": "total loss (Eq. 4)",
    "loss_{stage}": "{stage} loss",
    "lr": "learning rate",
    "tau": "target EMA rate τ",
    "images_per_second": "throughput (images/s)",
    "data_wait_fraction": "fraction of step time waiting for data",
    "std_{stage}": "{stage} collapse signal (output std; 0 = collapsed)",
}
PROBE_KINDS = {"top1": "linear probe top-1", "knn_top1": "kNN top-1"}


def fmt(value: float | None) -> str:
    """A metric for a table cell: :data:`NOT_RUN` when missing."""
    return NOT_RUN if value is None else f"{value:.4g}"


def run_summaries(runs: list[RunResults]) -> list[dict[str, Any]]:
    """Per run: identity, headline metrics, their deltas against the first run, stages."""
    first = runs[0]
    summaries = []
    for run in runs:
        metrics = {key: run.metric(key) for key in HEADLINE}
        deltas = {
            key: None if value is None or first.metric(key) is None else value - first.metric(key)
            for key, value in metrics.items()
        }
        probe = run.evaluations.get("linear_probe") or {}
        info = run.backbone_info or {}
        summaries.append(
            {
                "name": run.name,
                "uri": run.uri,
                **{k: info.get(k) for k in ("arch", "small_input", "method", "levels", "step")},
                "evaluations": {e: run.evaluations.get(e) is not None for e in EVALUATIONS},
                "metrics": metrics,
                "deltas": deltas,
                "stages": probe.get("stages", {}),
                "online_monitor": last_values(run),
            }
        )
    return summaries


def _delta(summary: dict[str, Any], key: str, baseline: bool) -> str:
    if baseline:
        return "baseline"
    delta = summary["deltas"][key]
    return "n/a" if delta is None else f"{delta:+.3g}"


def summary_section(runs: list[RunResults], summaries: list[dict[str, Any]]) -> Section:
    """The Table 1/2 analogue, the runs, and the paper's published numbers."""
    header = ["run"]
    for key in HEADLINE:
        header += [HEADLINE_LABELS[key], f"Δ {HEADLINE_LABELS[key]}"]
    rows = []
    for index, summary in enumerate(summaries):
        row = [summary["name"]]
        for key in HEADLINE:
            row += [fmt(summary["metrics"][key]), _delta(summary, key, index == 0)]
        rows.append(row)
    identity = [
        [
            s["name"],
            r.uri,
            str(s["arch"] or "?"),
            str(s["method"] or "?"),
            str(s["levels"] or "?"),
            str(s["step"] if s["step"] is not None else "?"),
            str(len(r.train_log)),
            ", ".join(e for e, ran in s["evaluations"].items() if ran) or "none",
        ]
        for r, s in zip(runs, summaries, strict=True)
    ]
    table_1 = [
        [
            f"{row.epochs} ep",
            row.metric,
            f"{row.byol}",
            f"{row.ladder_byol}",
            f"{row.ladder_byol - row.byol:+.1f}",
        ]
        for row in paper_reference.TABLE_1
    ]
    table_2 = [
        [row.method]
        + [
            "–" if v is None else f"{v}"
            for v in (row.in_acc, row.box_map, row.mask_map, row.voc_miou, row.cityscapes_miou)
        ]
        for row in paper_reference.TABLE_2
    ]
    return Section(
        "2. Summary (Tables 1 and 2)",
        [
            Paragraph(
                f"Headline metrics of each run and their difference from the first run "
                f"({summaries[0]['name']}), as in the paper's Table 1. A missing "
                "evaluation is marked 'not run'."
            ),
            Table(header, rows, "Downstream results"),
            Table(
                ["run", "folder", "arch", "method", "levels", "step", "log records", "evaluations"],
                identity,
                "Runs",
            ),
            Paragraph(
                "For context, the paper's published numbers (ResNet-50, ImageNet-1k "
                "pretraining, full-size downstream benchmarks). Runs on other data or "
                "schedules are comparable in the direction of differences, not in value.",
                note=True,
            ),
            Table(
                ["schedule", "metric", "BYOL", "Ladder-BYOL", "Δ"],
                table_1,
                "Paper, Table 1: BYOL vs Ladder-BYOL",
            ),
            Table(
                ["method", "IN linear acc.", "box mAP", "mask mAP", "VOC mIoU", "Cityscapes mIoU"],
                table_2,
                "Paper, Table 2 (200 epochs), the paper's rows",
            ),
        ],
    )


def probe_section(runs: list[RunResults]) -> Section:
    """Linear probe and kNN accuracy on every stage (Table 7 analogue), per run."""
    header = ["run"] + [f"{stage} {kind}" for kind in PROBE_KINDS.values() for stage in STAGES]
    rows = [
        [run.name] + [fmt(run.stage_metric(s, kind)) for kind in PROBE_KINDS for s in STAGES]
        for run in runs
    ]
    reference = [
        [method] + [f"{scores[s]}" for s in STAGES]
        for method, scores in paper_reference.TABLE_7.items()
    ]
    blocks: list[Block] = [
        Paragraph(
            "Classification from each stage's pooled features of the frozen backbone. "
            "The paper finds Ladder training improves every intermediate stage."
        ),
        Table(header, rows, "Per-stage accuracy"),
    ]
    panels = {
        title: {run.name: {s: run.stage_metric(s, kind) for s in STAGES} for run in runs}
        for kind, title in PROBE_KINDS.items()
    }
    if any(v is not None for runs_ in panels.values() for r in runs_.values() for v in r.values()):
        png = report_figures.grouped_bars(panels, STAGES, "accuracy")
        blocks.append(Figure("probe_stages.png", png, "per-stage probe and kNN accuracy"))
    else:
        blocks.append(Paragraph(f"Linear probe: {NOT_RUN} for any run.", note=True))
    blocks.append(
        Table(["method", *STAGES], reference, "Paper, Table 7: ImageNet linear probe per stage")
    )
    blocks += online_monitor_blocks(runs)
    return Section("3. Per-stage linear probe (Table 7)", blocks)


def _curve_fields(runs: list[RunResults]) -> list[tuple[str, str]]:
    present = {key for run in runs for record in run.train_log for key in record}
    fields = []
    for key, title in CURVES.items():
        expanded = [(key.format(stage=s), title.format(stage=s)) for s in STAGES]
        fields += [(k, t) for k, t in dict.fromkeys(expanded) if k in present]
    return fields


def curves_section(runs: list[RunResults]) -> Section:
    """One chart per train_log quantity, all runs overlaid."""
    blocks: list[Block] = []
    missing = [run.name for run in runs if not run.train_log]
    if missing:
        blocks.append(Paragraph(f"Training log {NOT_RUN}: {', '.join(missing)}.", note=True))
    for key, title in _curve_fields(runs):
        series = {}
        for run in runs:
            points = [(r["step"], r[key]) for r in run.train_log if r.get(key) is not None]
            if points:
                series[run.name] = ([p[0] for p in points], [p[1] for p in points])
        log_y = key.startswith("loss") and all(min(y) > 0 for _, y in series.values())
        png = report_figures.line_chart(series, title, "step", key, log_y=log_y)
        blocks.append(Figure(f"curve_{key}.png", png, title))
    return Section("4. Training curves", blocks)


def correlation_metrics(runs: list[RunResults]) -> dict[str, list[float | None]]:
    """The metrics correlated in Fig. 5: headline metrics and the lower stages' probes."""
    metrics = {HEADLINE_LABELS[key]: [run.metric(key) for run in runs] for key in HEADLINE}
    for stage in STAGES[:-1]:  # res5's probe is the headline probe top-1
        metrics[f"probe {stage}"] = [run.stage_metric(stage, "top1") for run in runs]
    return metrics


def correlation_section(runs: list[RunResults]) -> tuple[Section, list[Correlation]]:
    """Pearson r between tasks over runs, Bonferroni-corrected (Fig. 5)."""
    title = "7. Task correlations (Fig. 5)"
    if len(runs) < MIN_RUNS:
        note = f"{NOT_RUN}: needs at least {MIN_RUNS} runs, {len(runs)} given."
        return Section(title, [Paragraph(note, note=True)]), []
    correlations = correlate(correlation_metrics(runs))
    intro = Paragraph(
        f"Pearson's r between each pair of metrics over the runs, with p-values multiplied by "
        f"the number of pairs tested ({len(correlations)}; Bonferroni, capped at 1), as the "
        f"paper's meta-analysis. A pair is tested where at least {MIN_RUNS} runs have both "
        "metrics and neither is constant. With few runs, even large |r| is rarely significant."
    )
    if not correlations:
        return Section(title, [intro, Paragraph(f"{NOT_RUN}: no testable pair.", note=True)]), []
    names = list(dict.fromkeys(name for c in correlations for name in (c.a, c.b)))
    png = report_figures.heatmap(names, correlation_matrix(names, correlations), "Pearson r")
    rows = [
        [c.a, c.b, str(c.n), f"{c.r:+.3f}", f"{c.p:.3g}", f"{c.p_bonferroni:.3g}"]
        for c in correlations
    ]
    table = Table(["metric", "metric", "runs", "r", "p", "p (Bonferroni)"], rows, "Pairs tested")
    figure = Figure("task_correlation.png", png, "Pearson r between metrics")
    return Section(title, [intro, figure, table]), correlations
