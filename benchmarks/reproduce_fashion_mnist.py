"""BYOL against Ladder-BYOL on real data: Fashion-MNIST, per-stage linear probe and kNN.

The paper's claims, checked on a dataset this machine has (Debian's ``dataset-fashion-mnist``):
Ladder-BYOL's extra losses on res2..res4 should make the intermediate stages' features
better (Table 7: linear probe per stage) without hurting the top stage (Table 1), and pull
the two views of an image closer at every stage (Fig. 3). One command runs the whole flow:

1. ``import-fashion-mnist``: the 60k training and 10k test images as an imagefolder dataset
   (test = our ``val`` split); with ``--train-limit N`` a class-balanced subset of N training
   images (the first N/10 of each class by IDX index, hard-linked) and all 10k test images;
2. ``prepare-shards``: one shard dataset, ``train`` (pretraining and probe training) and
   ``val`` (the 10k test images, evaluation only);
3. ``pretrain`` of each method (BYOL, Ladder-BYOL, optionally Ladder-DenseBYOL) with the same
   preset, seed and schedule; ResNet-18 with the small-input stem on 32 px crops;
4. ``linear-probe --protocol fast`` of each backbone: linear classifiers and kNN (k 20,
   T 0.07) on the pooled features of res2..res5, trained on ``train``, scored on the 10k;
5. ``report`` comparing them, BYOL first as the baseline, with the view-distance violins
   (Fig. 3) and gradient maps (Fig. 4) computed on test images;
6. a Markdown table (Table 7 and Table 1 analogues) on stdout and in ``OUT/results.md``, and
   ``OUT/summary.json`` with the numbers, the settings, machine, versions, date and wall times.

Every step is the ``ladder-siam`` command run in a subprocess, exactly as a user would run it.
Pretraining resumes from its newest checkpoint and the import is skipped when present, so a
rerun after an interruption continues rather than starting over.

Full run, one GPU (preset ``configs/fashion_mnist_r18.yaml``: 60k images, 30 epochs, batch
512, bf16, compiled). Estimated, not yet measured: 1.8M image pairs per method at roughly
10k pairs/s on an H100 is about 3 minutes each plus compilation and a ~1 minute probe, so
about 10 minutes for BYOL and Ladder-BYOL, 15 with Ladder-DenseBYOL::

    python benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist-gpu --workers 12 \\
        --methods byol,ladder-byol,ladder-dense-byol

Reduced run on a CPU (preset ``configs/fashion_mnist_r18_cpu.yaml``, fp32, picked when no GPU
is present). 3,000 training images, 6 epochs of batch 64 (276 steps): about 19 image pairs/s
on one core, so ~16 minutes per method and ~40 minutes in all, pinned to one core::

    taskset -c 1 python benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist \\
        --train-limit 3000 --epochs 6 --batch-size 64 --workers 0

Run B in BENCHMARKS.md is the same with ``--train-limit 10000 --epochs 9`` on both cores
(1,404 steps per method, ~100 minutes): the smallest reduced run here whose BYOL beats the
random-init control. The probe and kNN always score all 10k test images. A reduced run is a
check of the direction of the effect, not a reproduction of its size: see the notes it prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

import ladder_siam
from ladder_siam.prep.fashion_mnist import CLASS_NAMES
from ladder_siam.runtime.run_folder import RunFolder
from ladder_siam.runtime.train_log import read_train_log

REPO = Path(__file__).resolve().parents[1]
GPU_PRESET = REPO / "configs" / "fashion_mnist_r18.yaml"
CPU_PRESET = REPO / "configs" / "fashion_mnist_r18_cpu.yaml"
STAGES = ("res2", "res3", "res4", "res5")
# The control row: a backbone after one BYOL step, i.e. nearly its random initialisation.
# Random features are strong on Fashion-MNIST; a trained run must beat them to mean anything.
CONTROL = "init-1step"
METHODS = ("byol", "ladder-byol", "dense-byol", "ladder-dense-byol")
LABELS = {
    "byol": "BYOL",
    "ladder-byol": "Ladder-BYOL",
    "dense-byol": "DenseBYOL",
    "ladder-dense-byol": "Ladder-DenseBYOL",
    CONTROL: "1 step (≈ init)",
}


def cli(*args: str | int | float) -> float:
    """Runs one ``ladder-siam`` step in a subprocess; returns its wall time in seconds."""
    command = [sys.executable, "-m", "ladder_siam.cli", *map(str, args)]
    print("+ ladder-siam " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def balanced_subset(raw: Path, dest: Path, limit: int) -> Path:
    """Hard-links the first ``limit // 10`` training images of each class and every test image.

    Fashion-MNIST has 6,000 training images per class in no particular order, so the lowest
    IDX indices per class are a deterministic, class-balanced sample. ``import-fashion-mnist
    --limit`` would take the first N of each split instead: unbalanced, and it cuts the test
    set too. Links cost no copy; a filesystem without them gets copies.
    """
    per_class = limit // len(CLASS_NAMES)
    if per_class < 1:
        raise SystemExit(f"--train-limit {limit}: at least {len(CLASS_NAMES)} (one per class)")
    done = dest / ".complete"
    if done.exists() and done.read_text() == str(per_class):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for split, count in (("train", per_class), ("val", None)):
        for name in CLASS_NAMES:
            target = dest / split / name
            target.mkdir(parents=True)
            for image in sorted((raw / split / name).glob("*.png"))[:count]:
                try:
                    os.link(image, target / image.name)
                except OSError:
                    shutil.copy2(image, target / image.name)
    done.write_text(str(per_class))
    return dest


def probe(
    run: Path, shards: Path, preset: dict[str, Any], args: argparse.Namespace, workers: int
) -> float:
    """The per-stage fast linear probe and kNN of a run's backbone; returns its seconds."""
    # crop-fraction 1: the 28 px garment fills its frame, so the whole image is upscaled to
    # 32 px rather than its border cut off (pretraining's largest crops see it whole).
    return cli(
        "linear-probe", "--backbone", RunFolder(str(run)).backbone, "--train", shards / "train",
        "--val", shards / "val", "--out", RunFolder(str(run)).eval("linear_probe"),
        "--protocol", "fast", "--stages", ",".join(STAGES), "--arch", preset["arch"],
        "--image-size", preset["image_size"], "--crop-fraction", 1.0,
        "--epochs", args.probe_epochs, "--batch-size", 256, "--extract-batch-size", 256,
        "--workers", workers, "--seed", args.seed,
    )  # fmt: skip


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def environment() -> dict[str, Any]:
    """Machine, versions and date, for the record."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores_used": len(os.sched_getaffinity(0)),
        "cpu_cores_total": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ladder_siam": ladder_siam.__version__,
        "git_commit": commit,
    }


def collect(runs: dict[str, Path], report: Path) -> dict[str, dict[str, Any]]:
    """Per method: probe and kNN top-1 per stage, view distances, the end of pretraining."""
    distances = read_json(report / "summary.json")["analysis"].get("view_distance") or {}
    results = {}
    for method, run in runs.items():
        stages = read_json(Path(RunFolder(str(run)).eval_metrics("linear_probe")))["stages"]
        log = read_train_log(str(run))
        # The last line with losses; the final line of a run may hold only a summary.
        last = next((entry for entry in reversed(log) if "loss_res5" in entry), {})
        results[method] = {
            "probe_top1": {s: stages[s]["top1"] for s in STAGES},
            "knn_top1": {s: stages[s]["knn_top1"] for s in STAGES},
            "probe_top5": {s: stages[s]["top5"] for s in STAGES},
            "view_distance_median": {
                s: v["median"] for s, v in distances.get(LABELS[method], {}).items()
            },
            "steps": log[-1].get("step") if log else None,
            "final_loss": {s: last.get(f"loss_{s}") for s in STAGES},
            "final_std": {s: last.get(f"std_{s}") for s in STAGES},
            "images_per_second": last.get("images_per_second"),
            # The online monitor's last readings (None where it did not run or measure).
            "online_probe_top1": {s: last_logged(log, f"online_probe_top1_{s}") for s in STAGES},
            "rankme": {s: last_logged(log, f"rankme_{s}") for s in STAGES},
            "projector_rankme": {s: last_logged(log, f"rankme_projector_{s}") for s in STAGES},
        }
    return results


def last_logged(log: list[dict[str, Any]], key: str) -> float | None:
    """The last value of ``key`` in a train log, if it was ever logged."""
    return next((entry[key] for entry in reversed(log) if entry.get(key) is not None), None)


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """The Table 7 analogue (per stage), the Table 1 analogue (res5) and the deltas."""
    base = next(iter(results))
    head = "| method | " + " | ".join(f"probe {s}" for s in STAGES)
    head += " | " + " | ".join(f"kNN {s}" for s in STAGES) + " |"
    lines = [
        f"Per-stage top-1 (%) on the {settings['test_images']} Fashion-MNIST test images "
        f"(Table 7 analogue; linear probe and kNN trained on {settings['train_images']} "
        "training images):",
        "",
        head,
        "|---" * (1 + 2 * len(STAGES)) + "|",
    ]
    for method, r in results.items():
        cells = [fmt(r["probe_top1"][s]) for s in STAGES] + [fmt(r["knn_top1"][s]) for s in STAGES]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        if method != base:
            b = results[base]
            deltas = [fmt(r["probe_top1"][s] - b["probe_top1"][s], True) for s in STAGES]
            deltas += [fmt(r["knn_top1"][s] - b["knn_top1"][s], True) for s in STAGES]
            lines.append(f"| Δ vs {LABELS.get(base, base)} | " + " | ".join(deltas) + " |")
    lines += [
        "",
        "Headline (Table 1 analogue; res5):",
        "",
        "| method | linear top-1 | Δ | kNN top-1 | Δ | mean probe res2–res4 | Δ | pretrain s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        b = results[base]
        # The intermediate stages' mean: the stages Ladder's extra losses act on.
        mid = sum(r["probe_top1"][s] for s in STAGES[:3]) / 3
        base_mid = sum(b["probe_top1"][s] for s in STAGES[:3]) / 3
        first = method == base
        lines.append(
            f"| {LABELS.get(method, method)} | {fmt(r['probe_top1']['res5'])} | "
            f"{'–' if first else fmt(r['probe_top1']['res5'] - b['probe_top1']['res5'], True)} | "
            f"{fmt(r['knn_top1']['res5'])} | "
            f"{'–' if first else fmt(r['knn_top1']['res5'] - b['knn_top1']['res5'], True)} | "
            f"{fmt(mid)} | {'–' if first else fmt(mid - base_mid, True)} | "
            f"{settings['pretrain_seconds'][method]:.0f} |"
        )
    lines += [
        "",
        "Online monitor at the end of pretraining (top-1 % of the online probe on augmented "
        "training views over the last log interval; RankMe of the pooled features / of the "
        "projector output):",
        "",
        "| method | "
        + " | ".join(f"online {s}" for s in STAGES)
        + " | "
        + " | ".join(f"RankMe {s}" for s in STAGES)
        + " | "
        + " | ".join(f"proj. RankMe {s}" for s in STAGES)
        + " |",
        "|---" * (1 + 3 * len(STAGES)) + "|",
    ]
    for method, r in results.items():
        cells = [fmt(r["online_probe_top1"][s]) for s in STAGES]
        cells += [fmt(r["rankme"][s]) for s in STAGES]
        cells += [fmt(r["projector_rankme"][s]) for s in STAGES]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    # One test set of n images: an accuracy p has a binomial standard error of
    # sqrt(p (1 - p) / n); seed-to-seed variation of a pretraining run comes on top of it.
    p = results[base]["probe_top1"]["res5"] / 100
    se = 100 * math.sqrt(p * (1 - p) / settings["test_images"])
    lines += [
        "",
        f"Test-set sampling error alone at {100 * p:.1f} %: ±{se:.2f} points (1 s.e.); "
        "one seed per method, so differences of this size or a little above are not "
        "evidence either way.",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fashion_mnist_output"))
    parser.add_argument(
        "--train-limit", type=int, default=None,
        help="class-balanced subset of the 60k training images (reduced CPU run)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--methods", default="byol,ladder-byol",
        help="comma-separated, the baseline first; add ladder-dense-byol for DenseBYOL",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="loader workers per step")
    parser.add_argument(
        "--config", type=Path, default=None,
        help=f"pretraining preset (default: {GPU_PRESET.name} with a GPU, else "
        f"{CPU_PRESET.name})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the same for every method")
    parser.add_argument(
        "--fashion-mnist-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
        help="the four gzipped IDX files (default: where Debian's package puts them)",
    )  # fmt: skip
    parser.add_argument(
        "--pretrain-arg", action="append", default=[],
        help="extra pretrain flag, repeatable (e.g. --pretrain-arg=--compile --pretrain-arg=false)",
    )  # fmt: skip
    parser.add_argument("--probe-epochs", type=int, default=100, help="the paper's: 100")
    parser.add_argument("--analysis-count", type=int, default=256, help="images for Fig. 3")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: expected some of {', '.join(METHODS)}")
    if args.config is None:
        args.config = GPU_PRESET if torch.cuda.is_available() else CPU_PRESET
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    out = args.out.resolve()
    timings: dict[str, float] = {}
    preset = yaml.safe_load(args.config.read_text())
    epochs = args.epochs or preset["epochs"]
    batch_size = args.batch_size or preset["batch_size"]
    workers = preset["workers"] if args.workers is None else args.workers

    # 1. The dataset. README.md is written last by the import, so it marks a complete one.
    raw = out / "data" / "fashion-mnist"
    timings["import"] = 0.0
    if not (raw / "README.md").exists():
        timings["import"] = cli(
            "import-fashion-mnist", "--dest", raw, "--source-dir", args.fashion_mnist_dir
        )
    source = raw
    if args.train_limit is not None and args.train_limit < 60_000:
        source = balanced_subset(
            raw, out / "data" / f"fashion-mnist-{args.train_limit}", args.train_limit
        )
    shards = out / "data" / f"shards-{source.name}"
    timings["prepare_shards"] = cli(
        "prepare-shards", "--source", source, "--dest", shards, "--layout", "imagefolder",
        "--shard-size", 1000, "--workers", max(1, min(workers, 8)), "--seed", args.seed,
    )  # fmt: skip
    train_images = read_json(shards / "train" / "manifest.json")["num_samples"]
    test_images = read_json(shards / "val" / "manifest.json")["num_samples"]

    # 2-3. Pretraining and the probe per method. Only --method differs between the runs.
    runs = {method: out / "runs" / method for method in args.methods}
    pretrain_seconds, probe_seconds = {}, {}
    for method, run in runs.items():
        pretrain_seconds[method] = cli(
            "pretrain", "--config", args.config, "--method", method, "--shards", shards,
            "--out", run, "--epochs", epochs, "--batch-size", batch_size,
            "--workers", workers, "--seed", args.seed, *args.pretrain_arg,
        )  # fmt: skip
        probe_seconds[method] = probe(run, shards, preset, args, workers)
    control = out / "runs" / CONTROL
    pretrain_seconds[CONTROL] = cli(
        "pretrain", "--config", args.config, "--method", "byol", "--shards", shards,
        "--out", control, "--epochs", epochs, "--batch-size", batch_size, "--max-steps", 1,
        "--workers", workers, "--seed", args.seed, *args.pretrain_arg,
    )  # fmt: skip
    probe_seconds[CONTROL] = probe(control, shards, preset, args, workers)

    # 4. The report; the analyses use test images at the training crop size.
    report = out / "report"
    timings["report"] = cli(
        "report", "--runs", *runs.values(), "--names", *(LABELS[m] for m in runs),
        "--out", report,
        "--analysis-images", shards / "val", "--analysis-count", args.analysis_count,
        "--analysis-image-size", preset["image_size"], "--seed", args.seed,
    )  # fmt: skip

    # 5. The tables and the record.
    wall = time.perf_counter() - start
    settings = {
        "preset": str(args.config),
        "train_images": train_images,
        "test_images": test_images,
        "train_limit": args.train_limit,
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": preset["image_size"],
        "arch": preset["arch"],
        "small_input": preset["small_input"],
        "precision": preset["precision"],
        "seed": args.seed,
        "workers": workers,
        "probe": {"protocol": "fast", "epochs": args.probe_epochs, "batch_size": 256,
                  "crop_fraction": 1.0, "knn_k": 20, "knn_temperature": 0.07},
        "pretrain_seconds": pretrain_seconds,
        "probe_seconds": probe_seconds,
        "step_seconds": timings,
        "wall_seconds": wall,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    results = collect({**runs, CONTROL: control}, report)
    table = markdown(results, settings)
    summary = {"environment": environment(), "settings": settings, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table)
    print()
    print(table)
    print(f"wall time {wall / 60:.1f} min; report: {report / 'index.html'}; numbers: "
          f"{out / 'summary.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
