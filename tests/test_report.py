"""The run report: sections, "not run" cells, deltas, correlations, analyses, a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from system_tools import require_tool

from ladder_siam.cli import main as cli
from ladder_siam.nets.backbones import ResNetStages
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.report.analysis import (
    augment_views,
    gradient_maps,
    ladder_for_analysis,
    sample_views,
    view_distances,
)
from ladder_siam.report.build import ReportConfig, build_report, make_report, write_kfp_outputs
from ladder_siam.report.comparison_section import compare
from ladder_siam.report.inputs import expand_runs, load_runs
from ladder_siam.report.task_correlation import correlate
from ladder_siam.runtime import checkpoint
from ladder_siam.runtime.per_image import PerImage, write_per_image

HEADINGS = (
    "1. Is the difference real?",
    "2. Summary (Tables 1 and 2)",
    "3. Per-stage linear probe (Table 7)",
    "4. Training curves",
    "5. View distances (Fig. 3)",
    "6. Gradient maps (Fig. 4)",
    "7. Task correlations (Fig. 5)",
)
STAGES = ("res2", "res3", "res4", "res5")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny convolutions: a second OpenMP thread only spins against the other processes on a
    # shared 2-core machine (20x slower forward passes measured under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model() -> LadderSiam:
    torch.manual_seed(0)
    return LadderSiam("resnet18", "GGGG", small_input=True, hidden_dim=16, projection_dim=8)


@pytest.fixture(scope="module")
def backbone_state() -> dict[str, torch.Tensor]:
    return tiny_model().backbone_state_dict()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("report_images")
    make_demo_data(str(root / "raw"), images=12, size=32, val_fraction=0.5)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "shards"), shard_size=6)
    return str(root / "shards")


def write_run(
    root: Path,
    method: str,
    probe: dict[str, float] | None = None,
    box_ap: float | None = None,
    miou: float | None = None,
    backbone: dict[str, torch.Tensor] | None = None,
    mask_ap: float | None = None,
) -> str:
    """A run folder as pretraining and the evaluations write it; None leaves a file out."""
    root.mkdir(parents=True)
    log = [
        {"step": step, "epoch": 0, "lr": 0.1 * step, "tau": 0.99 + step / 1000,
         "loss": 4.0 / step, **{f"loss_{s}": 1.0 / step for s in STAGES},
         **{f"std_{s}": 0.05 for s in STAGES}, "images_per_second": 100.0 + step,
         "data_wait_fraction": 0.1, "time": 1e9 + step,
         **{f"online_probe_top1_{s}": 20.0 + 5 * step for s in STAGES}}
        for step in (1, 2, 3, 4)
    ]  # fmt: skip
    for record in log[1::2]:  # RankMe is computed every few steps only
        record.update({f"rankme_{s}": 10.0 * record["step"] for s in STAGES})
        record["rankme_projector_res5"] = 3.0 * record["step"]
    (root / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if backbone is not None:
        torch.save(backbone, root / "backbone.pt")
        description = {"arch": "resnet18", "small_input": True, "method": method,
                       "levels": "GGGG", "step": 4}  # fmt: skip
        (root / "backbone.json").write_text(json.dumps(description))
    evaluations = {}
    if probe is not None:
        evaluations["linear_probe"] = {
            "protocol": "test",
            "stages": {s: {"top1": v, "top5": v + 10, "knn_top1": v - 5} for s, v in probe.items()},
            "scalars": {},
            "classes": 6,
        }
    if box_ap is not None:
        evaluations["detection"] = {
            "bbox": {"AP": box_ap, "AP50": box_ap + 20, "AP75": box_ap - 5},
            "segm": {"AP": mask_ap if mask_ap is not None else box_ap - 3},
            "scalars": {},
        }
    if miou is not None:
        evaluations["segmentation"] = {
            "mIoU": miou, "per_class_iou": {}, "pixel_accuracy": 90.0, "scalars": {}
        }  # fmt: skip
    for name, metrics in evaluations.items():
        (root / "eval" / name).mkdir(parents=True)
        (root / "eval" / name / "metrics.json").write_text(json.dumps(metrics))
    return str(root)


PROBE_A = {"res2": 20.0, "res3": 30.0, "res4": 40.0, "res5": 60.0}
PROBE_B = {"res2": 25.0, "res3": 33.0, "res4": 45.0, "res5": 62.5}


def comparison_of(uris: list[str], metric: str) -> dict[str, Any]:
    """The report's comparison on ``metric`` of the runs, without drawing the report."""
    _, comparisons = compare(load_runs(expand_runs(uris)))
    [entry] = [entry for entry in comparisons if entry["metric"] == metric]
    return entry


def write_evidence(run: str, hits: int, images: int = 400, order: str = "val-a") -> None:
    """Per-image results: the first ``hits`` of ``images`` right at every stage, and masks."""
    correct = np.arange(images) < hits
    stages = {f"{kind}_{s}": correct for kind in ("probe_top1", "knn_top1") for s in STAGES}
    write_per_image(str(Path(run) / "eval" / "linear_probe"), PerImage(order, images, stages))
    intersection = np.full((images, 3), 10) + correct[:, None] * 5
    counts = {"miou": {"intersection": intersection, "union": np.full((images, 3), 20)}}
    write_per_image(
        str(Path(run) / "eval" / "segmentation"), PerImage(order, images, counts=counts)
    )


@pytest.mark.slow
def test_one_seed_gets_the_test_sets_own_interval_where_it_is_exact(tmp_path: Path) -> None:
    # The metrics the evaluations wrote, and the per-image results behind them.
    byol = write_run(tmp_path / "byol", "byol", dict.fromkeys(STAGES, 50.0), 30.0, 62.5, {})
    ladder = write_run(tmp_path / "ladder", "ladder-byol", dict.fromkeys(STAGES, 65.0), 31.0,
                       66.25, {})  # fmt: skip
    write_evidence(byol, hits=200)  # 50 % right; mIoU 62.5
    write_evidence(ladder, hits=260)  # 65 %: 60 more of 400 images right; mIoU 66.25
    summary = build_report(ReportConfig(runs=[byol, ladder], out=str(tmp_path / "r"))).summary
    assert [(a["method"], a["seed"]) for a in summary["arms"]] == [("byol", 0), ("ladder-byol", 0)]
    entries = {e["metric"]: e for e in summary["comparisons"]}
    # The accuracies: an exact paired interval on the 60 discordant images, all one way.
    probe = entries["probe_top1_res3"]
    assert probe["difference"] == 15.0 and "McNemar" in probe["interval"]
    low, high = probe["ci95"]
    assert 10 < low < 15 == high and probe["verdict"] == "better"
    # mIoU: a paired bootstrap over images; mAP: nothing exact, and the page says so.
    miou = entries["miou"]
    assert miou["difference"] == 3.75 and "bootstrap" in miou["interval"]
    assert miou["ci95"][0] < 3.75 < miou["ci95"][1]
    assert entries["box_ap"]["ci95"] is None
    assert entries["box_ap"]["verdict"] == "one seed: no interval"
    assert summary["scalars"]["ladder-byol_minus_byol_box_ap"] == 1.0

    # Per-image results that do not reproduce the metrics (stale), or were scored on other
    # images: nothing to pair, so no interval rather than a wrong one.
    write_evidence(ladder, hits=250)
    write_evidence(byol, hits=200, order="val-b")
    assert comparison_of([byol, ladder], "probe_top1_res3")["ci95"] is None
    write_evidence(byol, hits=200)
    assert comparison_of([byol, ladder], "probe_top1_res3")["ci95"] is None


def test_a_pipeline_runs_folder_is_its_arms_in_its_order_and_runs_are_never_pooled(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    sweep = runs / "sweep"
    for method, seed, value in (("ladder-byol", 0, 31.0), ("byol", 0, 30.0), ("byol", 1, 32.0),
                                ("ladder-byol", 1, 34.0)):  # fmt: skip
        write_run(sweep / "arms" / f"{method}-s{seed}", method, {"res5": value}, backbone={})
        info = json.loads((sweep / "arms" / f"{method}-s{seed}" / "backbone.json").read_text())
        (sweep / "arms" / f"{method}-s{seed}" / "backbone.json").write_text(
            json.dumps({**info, "seed": seed})
        )
    # The run's own order (byol first), not the names' (ladder-byol-s0 would sort after).
    (sweep / "arms.json").write_text(json.dumps(["byol-s0", "byol-s1", "ladder-byol-s0",
                                                 "ladder-byol-s1"]))  # fmt: skip
    assert expand_runs([str(sweep)]) == [
        str(sweep / "arms" / name) for name in ("byol-s0", "byol-s1", "ladder-byol-s0",
                                                "ladder-byol-s1")
    ]  # fmt: skip
    entry = comparison_of([str(sweep)], "probe_top1_res5")
    assert (entry["method"], entry["baseline"], entry["seeds"]) == ("ladder-byol", "byol", [0, 1])
    assert entry["difference"] == 1.5  # (31 - 30 + 34 - 32) / 2, paired by seed

    # An earlier run's byol joins, labelled by its run: it is never pooled with this run's.
    write_run(runs / "old" / "arms" / "byol-s0", "byol", {"res5": 10.0}, backbone={})
    arms, comparisons = compare(load_runs(expand_runs([str(runs / "old"), str(sweep)])))
    methods = [(arm.method, arm.seed) for arm in arms]
    assert methods[0] == ("byol (old)", 0) and ("byol (sweep)", 1) in methods
    assert {entry["baseline"] for entry in comparisons} == {"byol (old)"}
    with pytest.raises(ValueError, match="is a pipeline run of 4 arms"):
        build_report(ReportConfig(runs=[str(sweep)], out=str(tmp_path / "r3"), names=["x"]))


@pytest.mark.slow
def test_report_of_two_runs_has_every_section_and_marks_what_did_not_run(
    tmp_path: Path, backbone_state: dict[str, torch.Tensor], shards: str
) -> None:
    first = write_run(tmp_path / "a", "byol", PROBE_A, 30.0, 50.0, backbone_state)
    second = write_run(tmp_path / "b", "ladder-byol", PROBE_B, backbone=backbone_state)
    out = tmp_path / "report"
    argv = ["report", "--runs", first, second, "--out", str(out), "--analysis-images", shards]
    argv += ["--analysis-count", "6", "--analysis-image-size", "32", "--gradient-images", "2"]
    assert cli(argv) == 0

    page = (out / "index.html").read_text()
    for heading in HEADINGS:
        assert f">{heading}</h2>" in page
    # Run b has no detection and segmentation: its box, mask and mIoU cells.
    assert page.count('<td class="not-run">not run</td>') == 3
    assert "needs at least 3 runs, 2 given" in page
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # per-method bars, probe bars, online probe / RankMe / projector RankMe per stage, 13
    # curves (loss, 4 levels, lr, tau, img/s, wait, 4 std), violins, 2 grids
    assert len(embedded) == 1 + 1 + 3 + 13 + 1 + 2
    assert "Online monitor, last logged values" in page
    assert Image.open(io.BytesIO(base64.b64decode(embedded[-1]))).format == "PNG"
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page makes no requests"
    assert "Trained heads: byol: none; ladder-byol: none." in page

    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == len(embedded) and "gradient_maps_1.png" in linked
    assert all((out / name).is_file() for name in linked)
    assert "*not run*" in markdown

    summary = json.loads((out / "summary.json").read_text())
    a, b = summary["runs"]
    assert (a["name"], b["name"]) == ("byol", "ladder-byol")
    assert b["metrics"] == {"probe_top1": 62.5, "box_ap": None, "mask_ap": None, "miou": None}
    assert b["deltas"]["probe_top1"] == pytest.approx(2.5)
    assert b["deltas"]["box_ap"] is None and a["deltas"]["miou"] == 0
    assert summary["scalars"]["ladder-byol_delta_probe_top1"] == pytest.approx(2.5)
    assert summary["scalars"]["byol_box_ap"] == 30.0
    assert b["online_monitor"]["probe_top1"] == {s: 40.0 for s in STAGES}
    assert b["online_monitor"]["projector_rankme"] == {"res5": 12.0}
    assert summary["scalars"]["ladder-byol_online_rankme_res3"] == 40.0
    assert "ladder-byol_box_ap" not in summary["scalars"]
    assert summary["correlations"] == []
    distances = summary["analysis"]["view_distance"]["byol"]
    assert set(distances) == set(STAGES)
    assert all(0 <= d["median"] <= 2 for d in distances.values())
    # Both runs have the same weights and see the same views: the same distances.
    assert summary["analysis"]["view_distance"]["ladder-byol"] == distances


@pytest.mark.slow
def test_three_runs_give_the_task_correlations_with_bonferroni_p(tmp_path: Path) -> None:
    # Probe res5 only, no segmentation: probe top-1, box and mask mAP make 3 pairs.
    runs = [
        write_run(tmp_path / f"r{i}", "ladder-byol", {"res5": 60.0 + i}, 30.0 + i, None,
                  mask_ap=mask)
        for i, mask in enumerate((20.0, 22.0, 21.0))
    ]  # fmt: skip
    report = build_report(ReportConfig(runs=runs, out=str(tmp_path / "out")))
    pairs = {(c["a"], c["b"]): c for c in report.summary["correlations"]}
    assert set(pairs) == {
        ("probe top-1 (res5)", "box mAP"),
        ("probe top-1 (res5)", "mask mAP"),
        ("box mAP", "mask mAP"),
    }
    perfect = pairs[("probe top-1 (res5)", "box mAP")]
    assert perfect["r"] == pytest.approx(1.0)
    assert perfect["p_bonferroni"] == pytest.approx(0, abs=1e-6)
    # r = 0.5 over 3 runs: t = 1/sqrt(3) with 1 dof (Cauchy), p = 1 - (2/pi) atan(t) = 2/3;
    # times 3 pairs = 2, capped at 1.
    half = pairs[("probe top-1 (res5)", "mask mAP")]
    assert half["r"] == pytest.approx(0.5) and half["p"] == pytest.approx(2 / 3)
    assert half["p_bonferroni"] == 1.0
    assert [r["name"] for r in report.summary["runs"]] == ["r0", "r1", "r2"], "folder names"
    page = report.html()
    assert "Pairs tested" in page and "task_correlation.png" in report.markdown()
    assert "not run: no --analysis-images given" in page


def test_bonferroni_counts_only_the_pairs_that_can_be_tested() -> None:
    constant, partial = [5.0, 5.0, 5.0], [1.0, None, 2.0]
    (only,) = correlate({"a": [0.0, 1.0, 2.0], "b": [0.0, 2.0, 1.0], "c": constant, "d": partial})
    assert (only.a, only.b, only.n) == ("a", "b", 3)
    assert only.p == pytest.approx(2 / 3) and only.p_bonferroni == pytest.approx(2 / 3)
    two = correlate({"a": [0.0, 1.0, 2.0, 3.0], "b": [0.0, 1.0, 3.0, 2.0], "c": [3.0, 2, 1, 0]})
    assert len(two) == 3
    assert all(c.p_bonferroni == pytest.approx(min(1.0, 3 * c.p)) for c in two)
    with pytest.raises(ValueError, match="different numbers of runs"):
        correlate({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0]})


def test_view_distances_and_gradient_maps_of_a_tiny_model(shards: str) -> None:
    crops_a, crops_b = sample_views(shards, count=4, size=32, seed=1)
    assert crops_a.shape == crops_b.shape == (4, 3, 32, 32) and crops_a.dtype == torch.uint8
    assert torch.equal(sample_views(shards, count=4, size=32, seed=1)[0], crops_a)
    view_a, view_b = augment_views(crops_a, crops_b)
    model = tiny_model().eval()

    distances = view_distances(model.online.backbone, view_a, view_b, batch_size=3)
    assert set(distances) == set(STAGES)
    for d in distances.values():
        assert d.shape == (4,) and torch.isfinite(d).all() and (d >= -1e-6).all()
        assert (d <= 2).all() and d.max() > 1e-4
    same = view_distances(model.online.backbone, view_a, view_a)
    assert all(d.abs().max() < 1e-5 for d in same.values())

    maps = gradient_maps(model, view_a, view_b)
    assert set(maps) == set(STAGES)
    for level, m in maps.items():
        assert m.shape == (4, 32, 32), level
        assert torch.isfinite(m).all() and (m >= 0).all() and (m.flatten(1).amax(1) > 0).all()
    # res2's own loss pools z_res2 globally, so its gradient is the same at every position;
    # res5's reaches z_res2 through three stages of convolutions and is not.
    res2, res5 = maps["res2"].flatten(1), maps["res5"].flatten(1)
    assert (res2.std(1) / res2.mean(1)).max() < 1e-4
    assert (res5.std(1) / res5.mean(1)).min() > 1e-2


@pytest.mark.slow
def test_kfp_outputs_and_bad_inputs(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a", "byol", PROBE_A, 30.0, 50.0)
    report = build_report(ReportConfig(runs=[run], out=str(tmp_path / "out")))
    paths = [tmp_path / "kfp" / name for name in ("metrics.json", "report.md", "report.html")]
    write_kfp_outputs(report, *(str(p) for p in paths))
    metrics = json.loads(paths[0].read_text())
    assert metrics["a_probe_top1"] == 60.0 and metrics["a_probe_res2_knn_top1"] == 15.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert "](data:image/png;base64," in paths[1].read_text()
    assert paths[2].read_text().startswith("<!DOCTYPE html>")

    (tmp_path / "empty").mkdir()
    assert cli(["report", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert [r.name for r in load_runs([run, run])] == ["a", "a-2"]
    with pytest.raises(ValueError, match="2 names for 1 runs"):
        build_report(ReportConfig(runs=[run], out=str(tmp_path / "x"), names=["p", "q"]))
    (Path(run) / "eval" / "detection" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"detection/metrics\.json: not valid JSON"):
        build_report(ReportConfig(runs=[run], out=str(tmp_path / "x")))


@pytest.mark.slow
@pytest.mark.integration
def test_chromium_renders_the_report(tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    runs = [
        write_run(tmp_path / "a", "byol", PROBE_A, 30.0, 50.0),
        write_run(tmp_path / "b", "ladder-byol", PROBE_B),
    ]
    make_report(ReportConfig(runs=runs, out=str(tmp_path / "report")))
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1200,3000",
         (tmp_path / "report" / "index.html").as_uri()],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1200)
    assert pixels.var() > 100, "the page shows tables and charts, not a blank"


def test_gradient_maps_use_the_trained_heads_of_the_newest_checkpoint(tmp_path: Path) -> None:
    trained = LadderSiam("resnet18", "-G-G", small_input=True, hidden_dim=16, projection_dim=8)
    state = {"model": trained.state_dict(), "config": {"hidden_dim": 16, "projection_dim": 8}}
    checkpoint.save(str(tmp_path), 7, state, keep=1)
    stages = ResNetStages("resnet18", small_input=True)
    model, levels = ladder_for_analysis(stages, str(tmp_path))
    assert levels == ["res3", "res5"]
    for level in levels:
        assert torch.equal(model.predictors[level][0].weight, trained.predictors[level][0].weight)
    _, none = ladder_for_analysis(stages, str(tmp_path / "no-checkpoints"))
    assert none == []
