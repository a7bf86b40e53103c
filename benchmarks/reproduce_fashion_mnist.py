"""BYOL against Ladder-BYOL on real data: Fashion-MNIST, per-stage linear probe and kNN.

The paper's claims, checked on a dataset this machine has (Debian's ``dataset-fashion-mnist``):
Ladder-BYOL's extra losses on res2..res4 should make the intermediate stages' features
better (Table 7: linear probe per stage) without hurting the top stage (Table 1), and pull
the two views of an image closer at every stage (Fig. 3). One command runs the whole flow:

1. ``import-fashion-mnist``: the 60k training and 10k test images as an imagefolder dataset
   (test = our ``val`` split); with ``--train-limit N`` a class-balanced subset of N training
   images (the first N/10 of each class by IDX index, hard-linked) and all 10k test images;
2. ``prepare-shards``: one shard dataset, ``train`` (pretraining and probe training) and
   ``val`` (the 10k test images, evaluation only), shared by every arm;
3. one *arm* per method and seed (``--methods`` x ``--seeds``): ``pretrain`` with the same
   preset and schedule, then ``linear-probe --protocol fast``: linear classifiers and kNN
   (k 20, T 0.07) on the pooled features of res2..res5, trained on ``train``, scored on the
   10k. ``--parallel`` arms run at once (one GPU holds several ResNet-18 runs), each with
   ``--workers`` loader workers and its share of the CPU threads; plus the control row, a
   backbone after one step (nearly its random initialisation);
4. ``report`` comparing the first seed's arms, BYOL first as the baseline, with the
   view-distance violins (Fig. 3) and gradient maps (Fig. 4) computed on test images;
5. ``OUT/summary.json``: ``arms`` (method, seed, run, metrics per stage) and ``comparisons``
   (the paired Ladder - BYOL difference per stage with its 95 % t-interval over the seeds and
   a verdict; :mod:`ladder_siam.report.comparisons`, as in a pipeline report), with the
   settings, machine, versions, date and wall times; ``OUT/results.md`` has the tables.

Every step is the ``ladder-siam`` command run in a subprocess, exactly as a user would run it.
Pretraining resumes from its newest checkpoint and the import is skipped when present, so a
rerun after an interruption continues rather than starting over.

The GPU run (issue 20; ``benchmarks/gpu_suite.sh fmnist``): 60k images, preset
``fashion_mnist_r18`` (batch 512, bf16), BYOL and Ladder-BYOL x seeds 0, 1, 2 =
six arms at once on one GPU, eager. Estimated, not measured: the H100's ResNet-50 step (1,230
pairs/s eager bf16, BENCHMARKS.md) scaled by FLOPs (4.1 vs 0.56 GFLOPs per 32 px small-input
ResNet-18 image) gives about 8k pairs/s for the GPU as a whole, so six arms of 30 epochs (10.8M
pairs) would take ~22 minutes: more than a lease's command. Epochs are cut, never seeds:
8 epochs (2.9M pairs, ~6 minutes, 15k pairs/s of JPEG decoding on the lent machine's cores)::

    python benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist-gpu --workers 2 \\
        --seeds 0,1,2 --parallel 7 --epochs 8 --pretrain-arg=--compile --pretrain-arg=false

The CPU preparation of that command (the same arms and seeds; a few minutes on 2 cores)::

    python benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist-smoke --train-limit 600 \\
        --epochs 1 --seeds 0,1,2 --parallel 7 --workers 0 --probe-epochs 2

Reduced run on a CPU (preset ``fashion_mnist_r18_cpu``, fp32, picked when no GPU
is present). 3,000 training images, 6 epochs of batch 64 (276 steps): about 19 image pairs/s
on one core, so ~16 minutes per arm, pinned to one core::

    taskset -c 1 python benchmarks/reproduce_fashion_mnist.py --out /tmp/fmnist \\
        --train-limit 3000 --epochs 6 --batch-size 64 --workers 0

Run B in BENCHMARKS.md is the same with ``--train-limit 10000 --epochs 9`` on both cores
(1,404 steps per method, ~100 minutes). The probe and kNN always score all 10k test images. A
reduced run is a check of the direction of the effect, not a reproduction of its size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision

import ladder_siam
from ladder_siam.kube.arms import arm_name
from ladder_siam.nets.archs import STAGES
from ladder_siam.prep.fashion_mnist import CLASS_NAMES
from ladder_siam.pretrain.config import load_preset, resolve_preset
from ladder_siam.pretrain.levels import METHODS
from ladder_siam.report.comparisons import (
    STAGE_METRICS,
    Arm,
    OneSeedIntervals,
    compare_arms,
    format_difference,
    format_mean,
    method_means,
)
from ladder_siam.runtime.run_folder import RunFolder
from ladder_siam.runtime.train_log import read_train_log

REPO = Path(__file__).resolve().parents[1]
# Presets shipped with the package (ladder_siam/pretrain/presets/).
GPU_PRESET = "fashion_mnist_r18"
CPU_PRESET = "fashion_mnist_r18_cpu"
# The control row: a backbone after one BYOL step, i.e. nearly its random initialisation.
# Random features are strong on Fashion-MNIST; a trained run must beat them to mean anything.
CONTROL = "init-1step"
# The arms live as those of one pipeline run: a report reads them as one comparison.
RUN = "fashion-mnist"
LABELS = {
    "byol": "BYOL",
    "ladder-byol": "Ladder-BYOL",
    "dense-byol": "DenseBYOL",
    "ladder-dense-byol": "Ladder-DenseBYOL",
    CONTROL: "1 step (≈ init)",
}


def cli(*args: str | int | float, log: Path | None = None, threads: int | None = None) -> float:
    """Runs one ``ladder-siam`` step in a subprocess; returns its wall time in seconds.

    Args:
        args: The subcommand and its flags.
        log: Where its output goes (arms running at once would interleave on the terminal).
        threads: Its CPU threads (``OMP_NUM_THREADS``), so that concurrent arms share the
            cores instead of each claiming all of them.
    """
    command = [sys.executable, "-m", "ladder_siam.cli", *map(str, args)]
    print("+ ladder-siam " + " ".join(map(str, args)), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    start = time.perf_counter()
    if log is None:
        subprocess.run(command, check=True, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as stream:
            result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            raise SystemExit(f"ladder-siam {args[0]} failed (exit {result.returncode}); see {log}")
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
    run: Path, shards: Path, preset: dict[str, Any], args: argparse.Namespace, **how: Any
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
        "--workers", args.workers, "--seed", 0, **how,
    )  # fmt: skip


def run_arm(
    name: str, method: str, seed: int, shards: Path, preset: dict[str, Any],
    args: argparse.Namespace, max_steps: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """One arm: pretraining, then the probe of its backbone; returns both wall times.

    The probe's seed is fixed: the arms differ only in their pretraining (method and seed).
    """
    run = arm_folder(args, name)
    how = {"log": args.out / "logs" / f"{name}.log", "threads": args.threads}
    limit = ["--max-steps", max_steps] if max_steps else []
    pretrain = cli(
        "pretrain", "--config", args.config, "--method", method, "--shards", shards,
        "--out", run, "--epochs", args.epochs, "--batch-size", args.batch_size, *limit,
        "--workers", args.workers, "--seed", seed, *args.pretrain_arg, **how,
    )  # fmt: skip
    seconds = {
        "pretrain_seconds": pretrain,
        "probe_seconds": probe(run, shards, preset, args, **how),
    }
    print(f"arm {name} done: pretrain {pretrain:.0f} s, probe {seconds['probe_seconds']:.0f} s",
          flush=True)  # fmt: skip
    return seconds


def arm_folder(args: argparse.Namespace, name: str) -> Path:
    """An arm's folder, laid out as a pipeline run's (``runs/<run>/arms/<arm>``).

    The control is a run of its own beside it: it is no arm of the comparison.
    """
    if name == CONTROL:
        return Path(RunFolder.of(str(args.out), f"{RUN}-{CONTROL}").uri)
    return Path(RunFolder.of(str(args.out), RUN).arm(name).uri)


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


def collect(
    name: str, method: str, seed: int, run: Path, distances: dict[str, Any], extra: dict[str, Any]
) -> Arm:
    """One arm's results: probe and kNN top-1 per stage, view distances, end of pretraining."""
    stages = read_json(Path(RunFolder(str(run)).eval_metrics("linear_probe")))["stages"]
    log = read_train_log(str(run))
    # The last line with losses; the final line of a run may hold only a summary.
    last = next((entry for entry in reversed(log) if "loss_res5" in entry), {})
    metrics = {f"probe_top1_{s}": stages[s]["top1"] for s in STAGES}
    metrics |= {f"knn_top1_{s}": stages[s]["knn_top1"] for s in STAGES}
    details = {
        "probe_top5": {s: stages[s]["top5"] for s in STAGES},
        "view_distance_median": {
            s: v["median"] for s, v in distances.get(f"{LABELS[method]} s{seed}", {}).items()
        },
        "steps": log[-1].get("step") if log else None,
        "final_loss": {s: last.get(f"loss_{s}") for s in STAGES},
        "final_std": {s: last.get(f"std_{s}") for s in STAGES},
        "images_per_second": last.get("images_per_second"),
        # Concurrent arms share the cores: an arm starved of loader workers waits for data.
        "data_wait_fraction": mean_logged(log, "data_wait_fraction"),
        # The online monitor's last readings (None where it did not run or measure).
        "online_probe_top1": {s: last_logged(log, f"online_probe_top1_{s}") for s in STAGES},
        "rankme": {s: last_logged(log, f"rankme_{s}") for s in STAGES},
        "projector_rankme": {s: last_logged(log, f"rankme_projector_{s}") for s in STAGES},
    }
    return Arm(method, seed, str(run), metrics, {"name": name, **extra, **details})


def last_logged(log: list[dict[str, Any]], key: str) -> float | None:
    """The last value of ``key`` in a train log, if it was ever logged."""
    return next((entry[key] for entry in reversed(log) if entry.get(key) is not None), None)


def mean_logged(log: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over a train log's intervals, if it was logged."""
    values = [entry[key] for entry in log if entry.get(key) is not None]
    return sum(values) / len(values) if values else None


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.0f} %"


def markdown(
    arms: list[Arm], control: Arm, comparisons: list[dict[str, Any]], settings: dict[str, Any]
) -> str:
    """Per-stage means over the seeds, the control row, the paired differences, the monitor."""
    means = method_means(arms, STAGE_METRICS)
    seeds = sorted({arm.seed for arm in arms})
    head = "| method | " + " | ".join(f"probe {s}" for s in STAGES)
    head += " | " + " | ".join(f"kNN {s}" for s in STAGES) + " |"
    lines = [
        f"Per-stage top-1 (%) on the {settings['test_images']} Fashion-MNIST test images "
        f"(Table 7 analogue; linear probe and kNN trained on {settings['train_images']} "
        f"training images); mean ± s.e. over seeds {', '.join(map(str, seeds))}:",
        "",
        head,
        "|---" * (1 + len(STAGE_METRICS)) + "|",
    ]
    for method, row in means.items():
        cells = [format_mean(row[metric]) for metric in STAGE_METRICS]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    cells = [fmt(control.metrics[metric]) for metric in STAGE_METRICS]
    lines.append(f"| {LABELS[CONTROL]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired difference from the baseline (the same seed pairs two arms), with its 95 % "
        "interval and verdict:",
        "",
        "| metric | method | vs | seeds | difference [95 % CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for entry in comparisons:
        lines.append(
            f"| {entry['metric']} | {LABELS.get(entry['method'], entry['method'])} | "
            f"{LABELS.get(entry['baseline'], entry['baseline'])} | "
            f"{','.join(map(str, entry['seeds']))} | {format_difference(entry)} | "
            f"{entry['verdict']} |"
        )
    lines += [
        "",
        "Online monitor at the end of pretraining (top-1 % of the online probe on augmented "
        "training views over the last log interval; RankMe of the pooled features):",
        "",
        "| arm | " + " | ".join(f"online {s}" for s in STAGES) + " | "
        + " | ".join(f"RankMe {s}" for s in STAGES) + " | pretrain s | data wait |",
        "|---" * (3 + 2 * len(STAGES)) + "|",
    ]  # fmt: skip
    for arm in arms:
        cells = [fmt(arm.extra["online_probe_top1"][s]) for s in STAGES]
        cells += [fmt(arm.extra["rankme"][s]) for s in STAGES]
        cells += [
            f"{arm.extra['pretrain_seconds']:.0f}",
            fmt_percent(arm.extra["data_wait_fraction"]),
        ]
        lines.append(f"| {arm.extra['name']} | " + " | ".join(cells) + " |")
    if len(seeds) < 2:
        lines += ["", "One seed: the differences above have no interval over seeds."]
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
    parser.add_argument(
        "--seeds", default="0",
        help="comma-separated pretraining seeds; each method runs once per seed, and the "
        "same seed pairs two methods (two or more give a t-interval over the seeds)",
    )  # fmt: skip
    parser.add_argument(
        "--parallel", type=int, default=1,
        help="arms (pretraining + probe) running at once; one GPU holds several ResNet-18 runs",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None,
        help="loader workers per arm (default: the preset's); with --parallel, the cores are "
        "shared: keep parallel x workers below the core count",
    )  # fmt: skip
    parser.add_argument(
        "--config", default=None,
        help=f"pretraining preset: a packaged preset's name or a YAML file (default: "
        f"{GPU_PRESET} with a GPU, else {CPU_PRESET})",
    )  # fmt: skip
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
    parser.add_argument(
        "--report", action=argparse.BooleanOptionalAction, default=True,
        help="write the HTML report with the view distances (needs matplotlib and scipy, "
        "which a bare GPU machine lacks; the summary's arms and comparisons do not)",
    )  # fmt: skip
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: expected some of {', '.join(METHODS)}")
    try:
        args.seeds = list(dict.fromkeys(int(seed) for seed in args.seeds.split(",")))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: comma-separated integers")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: at least 1")
    if args.config is None:
        args.config = GPU_PRESET if torch.cuda.is_available() else CPU_PRESET
    preset = load_preset(resolve_preset(args.config))
    args.epochs = args.epochs or preset["epochs"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.workers = preset["workers"] if args.workers is None else args.workers
    # Each concurrent arm gets its share of the cores for its own threads.
    args.threads = max(1, len(os.sched_getaffinity(0)) // args.parallel)
    args.out = args.out.resolve()
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    out = args.out
    timings: dict[str, float] = {}
    preset = load_preset(resolve_preset(args.config))

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
        "--shard-size", 1000, "--workers", max(1, min(len(os.sched_getaffinity(0)), 8)),
        "--seed", 0,
    )  # fmt: skip
    train_images = read_json(shards / "train" / "manifest.json")["num_samples"]
    test_images = read_json(shards / "val" / "manifest.json")["num_samples"]

    # 2-3. The arms (pretraining, then the probe) and the control row, --parallel at once.
    # Only --method and --seed differ between the arms.
    plan = {arm_name(m, seed): (m, seed) for seed in args.seeds for m in args.methods}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        control_job = pool.submit(
            run_arm, CONTROL, "byol", args.seeds[0], shards, preset, args, max_steps=1
        )
        jobs = {
            name: pool.submit(run_arm, name, method, seed, shards, preset, args)
            for name, (method, seed) in plan.items()
        }
        # .result() re-raises an arm's failure here, after the others have finished.
        seconds = {name: job.result() for name, job in jobs.items()}
        seconds[CONTROL] = control_job.result()

    # 4. The report on the first seed's arms; the analyses use test images at the crop size.
    report = out / "report"
    first = {name: m for name, (m, seed) in plan.items() if seed == args.seeds[0]}
    distances: dict[str, Any] = {}
    if args.report:
        timings["report"] = cli(
            "report", "--runs", *(arm_folder(args, name) for name in first),
            "--names", *(f"{LABELS[m]} s{args.seeds[0]}" for m in first.values()),
            "--out", report, "--analysis-images", shards / "val",
            "--analysis-count", args.analysis_count,
            "--analysis-image-size", preset["image_size"], "--seed", 0,
        )  # fmt: skip
        distances = read_json(report / "summary.json")["analysis"].get("view_distance") or {}

    # 5. The arms, the paired comparisons and the record.
    wall = time.perf_counter() - start
    common = {"train_images": train_images, "test_images": test_images}
    arms = [
        collect(name, m, seed, arm_folder(args, name), distances, {**common, **seconds[name]})
        for name, (m, seed) in plan.items()
    ]
    control = collect(
        CONTROL,
        "byol",
        args.seeds[0],
        arm_folder(args, CONTROL),
        {},
        {**common, **seconds[CONTROL]},
    )
    # With one seed, the probe's per-image results give the test set's exact interval.
    comparisons = compare_arms(arms, STAGE_METRICS, OneSeedIntervals())
    settings = {
        "preset": args.config, **common, "train_limit": args.train_limit,
        "epochs": args.epochs, "batch_size": args.batch_size, "image_size": preset["image_size"],
        "arch": preset["arch"], "small_input": preset["small_input"],
        "precision": preset["precision"], "methods": args.methods, "seeds": args.seeds,
        "parallel": args.parallel, "workers_per_arm": args.workers,
        "threads_per_arm": args.threads,
        "probe": {"protocol": "fast", "epochs": args.probe_epochs, "batch_size": 256,
                  "crop_fraction": 1.0, "knn_k": 20, "knn_temperature": 0.07},
        "step_seconds": timings, "wall_seconds": wall,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    table = markdown(arms, control, comparisons, settings)
    summary = {
        "environment": environment(),
        "settings": settings,
        "arms": [arm.as_dict() for arm in arms],
        "control": control.as_dict(),
        "comparisons": comparisons,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table)
    print()
    print(table)
    where = f"report: {report / 'index.html'}; " if args.report else ""
    print(f"wall time {wall / 60:.1f} min; {where}numbers: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
