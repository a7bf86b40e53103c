"""``ladder-siam report``: one HTML/Markdown report comparing pretraining runs.

It answers first whether each method beats the baseline (the first run's method) on each
stage and task, with a 95 % interval and a verdict (:mod:`~ladder_siam.report.comparisons`),
then reproduces the paper's analyses on our runs: the headline table (Tables 1 and 2), per-stage
probes (Table 7), training curves, view distances (Fig. 3), gradient maps (Fig. 4) and the
correlation between tasks (Fig. 5). Whatever a run lacks is shown as "not run".

Under ``--out`` it writes ``index.html`` (self-contained), ``report.md`` with the PNGs beside
it, and ``summary.json`` (the numbers: ``arms``, ``comparisons``, and a flat ``scalars`` dict
for KFP Metrics).
:func:`write_kfp_outputs` writes the same to a KFP component's output artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from ladder_siam.data.manifest import load_split
from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.nets.archs import STAGES
from ladder_siam.report.analysis_section import AnalysisSettings, analysis_sections
from ladder_siam.report.comparison_section import compare, comparison_section
from ladder_siam.report.html import Section, figure_data_uri, figures, render_html, render_markdown
from ladder_siam.report.inputs import HEADLINE, expand_runs, load_runs
from ladder_siam.report.sections import (
    correlation_section,
    curves_section,
    probe_section,
    run_summaries,
    summary_section,
)
from ladder_siam.runtime.metrics import push_job_metrics
from ladder_siam.runtime.run_folder import run_of

logger = logging.getLogger(__name__)

TITLE = "Ladder Siamese Network: run report"


@dataclass
class ReportConfig:
    """What to report on and where; see :func:`get_args_parser` for each field's meaning."""

    runs: list[str]
    out: str
    names: list[str] | None = None
    analysis_images: str | None = None
    analysis_count: int = 64
    analysis_image_size: int | None = None
    gradient_images: int = 4
    seed: int = 0

    def validate(self) -> None:
        """Checks the settings before any work.

        Raises:
            ValueError: A setting is out of range.
        """
        if not self.runs:
            raise UsageError("--runs: give at least one run folder")
        if not self.out:
            raise UsageError("--out: required")
        if self.analysis_count < 2:
            raise UsageError(f"--analysis-count {self.analysis_count}: need at least 2 images")
        if self.analysis_image_size is not None and self.analysis_image_size < 16:
            raise UsageError(f"--analysis-image-size {self.analysis_image_size}: at least 16 px")
        if not 1 <= self.gradient_images <= self.analysis_count:
            raise UsageError(f"--gradient-images {self.gradient_images}: 1..--analysis-count")


@dataclass
class Report:
    """A built report: its sections (with the PNGs) and the numbers behind them.

    Attributes:
        summary: What ``summary.json`` holds.
        sections: The rendered sections, in order.
    """

    summary: dict[str, Any]
    sections: list[Section]

    def html(self) -> str:
        """The self-contained HTML page."""
        return render_html(TITLE, self.sections)

    def markdown(self, inline_images: bool = False) -> str:
        """Markdown linking the PNGs by file name, or embedding them as data URIs."""
        return render_markdown(TITLE, self.sections, figure_data_uri if inline_images else None)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The flat ``name -> value`` metrics for KFP: what ran, per run, plus view distances.

    Per run: headline metrics and their deltas, the per-stage probe, and the online monitor's
    last values (``<run>_online_probe_top1_res2``, ``<run>_online_rankme_res2``...).
    """
    flat: dict[str, float] = {}
    for run in summary["runs"]:
        prefix = _slug(run["name"])
        for key in HEADLINE:
            if run["metrics"][key] is not None:
                flat[f"{prefix}_{key}"] = run["metrics"][key]
            if run["deltas"][key] is not None and run is not summary["runs"][0]:
                flat[f"{prefix}_delta_{key}"] = run["deltas"][key]
        for stage, values in run["stages"].items():
            for kind in ("top1", "knn_top1"):
                if isinstance(values, dict) and isinstance(values.get(kind), int | float):
                    flat[f"{prefix}_probe_{stage}_{kind}"] = float(values[kind])
        for kind, per_stage in run["online_monitor"].items():
            for stage, value in per_stage.items():
                flat[f"{prefix}_online_{kind}_{stage}"] = float(value)
    for entry in summary["comparisons"]:
        name = f"{_slug(entry['method'])}_minus_{_slug(entry['baseline'])}_{entry['metric']}"
        flat[name] = entry["difference"]
    for name, per_stage in (summary["analysis"]["view_distance"] or {}).items():
        for stage, stats in per_stage.items():
            flat[f"{_slug(name)}_view_distance_{stage}"] = stats["median"]
    return flat


def build_report(config: ReportConfig) -> Report:
    """Reads the runs, runs the analyses and builds every section.

    Raises:
        ValueError: A bad setting, an unreadable run or image split (before the analyses).
    """
    config.validate()
    runs = load_runs(expand_runs(config.runs, config.names), config.names)
    if config.analysis_images is not None:
        load_split(config.analysis_images, "val")  # a wrong URI fails before any work
    summaries = run_summaries(runs)
    settings = AnalysisSettings(
        config.analysis_images,
        config.analysis_count,
        config.analysis_image_size,
        config.gradient_images,
        config.seed,
    )
    analyses, analysis_summary = analysis_sections(runs, settings)
    correlation, correlations = correlation_section(runs)
    arms, comparisons = compare(runs)
    sections = [
        comparison_section(arms, comparisons),
        summary_section(runs, summaries),
        probe_section(runs),
        curves_section(runs),
        *analyses,
        correlation,
    ]
    summary: dict[str, Any] = {
        "title": TITLE,
        "stages": list(STAGES),
        "runs": summaries,
        "arms": [arm.as_dict() for arm in arms],
        "comparisons": comparisons,
        "analysis": analysis_summary,
        "correlations": [dataclasses.asdict(c) for c in correlations],
        "sections": [section.title for section in sections],
    }
    summary["scalars"] = scalars(summary)
    return Report(summary, sections)


def write_report(report: Report, out: str) -> None:
    """Writes ``index.html``, ``report.md``, the PNGs and ``summary.json`` under ``out``."""
    for figure in figures(report.sections):
        storage.write_bytes(storage.join(out, figure.filename), figure.png)
    storage.write_text(storage.join(out, "report.md"), report.markdown())
    storage.write_text(storage.join(out, "summary.json"), json.dumps(report.summary, indent=2))
    # Last: index.html appearing means the report is complete.
    storage.write_text(storage.join(out, "index.html"), report.html())


def write_kfp_outputs(
    report: Report, metrics_path: str, markdown_path: str, html_path: str
) -> None:
    """Writes a report into a KFP component's output artifacts.

    Args:
        report: The built report.
        metrics_path: The Metrics artifact: a JSON object of flat ``name -> number``.
        markdown_path: The Markdown artifact: one file, so the PNGs are embedded.
        html_path: The HTML artifact: the self-contained page.
    """
    storage.write_text(metrics_path, json.dumps(report.summary["scalars"], indent=2))
    storage.write_text(markdown_path, report.markdown(inline_images=True))
    storage.write_text(html_path, report.html())


def make_report(config: ReportConfig) -> Report:
    """Builds the report and writes it under ``config.out``; returns it."""
    report = build_report(config)
    write_report(report, config.out)
    push_job_metrics("report", {"report_runs": len(config.runs)}, run=run_of(config.out))
    logger.info("report on %d runs: %s", len(config.runs), storage.join(config.out, "index.html"))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    """Options of ``ladder-siam report``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="URI",
        help="Pretraining runs' output folders (backbone.pt, train_log.jsonl, eval/*), or "
        "pipeline runs' folders (each of their arms); the first run's method is the baseline "
        "the differences are computed against, and runs with the same seed are paired.",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="Folder to write the report to: a local path, file:// URI or s3://bucket/prefix.",
    )
    parser.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="A label per run, in --runs order (default: backbone.json's method, else the "
        "folder's name).",
    )
    parser.add_argument(
        "--analysis-images",
        metavar="URI",
        help="Shard dataset (its val split) or split for the view-distance and gradient-map "
        "analyses (Figs. 3 and 4); default: skip them.",
    )
    parser.add_argument(
        "--analysis-count",
        type=int,
        metavar="N",
        default=64,
        help="Images for the view distances (default: %(default)s, enough for a violin "
        "per stage; each costs two forward passes per run on CPU).",
    )
    parser.add_argument(
        "--analysis-image-size",
        type=int,
        metavar="PX",
        help="Crop side for the analyses (default: 64 px if every backbone has the "
        "small-input stem, else 224 px as in the paper).",
    )
    parser.add_argument(
        "--gradient-images",
        type=int,
        metavar="N",
        default=4,
        help="Images shown in the gradient maps, one row each (default: %(default)s).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        default=0,
        help="Seed of the analyses' crops and augmentations; every run sees the same views "
        "(default: %(default)s).",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    """Runs :func:`make_report` from parsed arguments."""
    make_report(
        ReportConfig(
            runs=args.runs,
            out=args.out,
            names=args.names,
            analysis_images=args.analysis_images,
            analysis_count=args.analysis_count,
            analysis_image_size=args.analysis_image_size,
            gradient_images=args.gradient_images,
            seed=args.seed,
        )
    )


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
