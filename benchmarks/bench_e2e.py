"""End-to-end pretraining throughput from JPEG shards, next to the synthetic-step ceiling.

Two measurements in one run, on the same device and settings:

* **ceiling**: ``bench_step.py``'s full training step on synthetic uint8 views already on the
  device (augmentation, forward, backward, LARS, EMA), i.e. what the GPU alone can do;
* **end to end**: ``ladder-siam pretrain`` itself (a subprocess, exactly as users run it) on
  shards of ImageNet-sized JPEGs, through the real loader workers, host-to-device copies,
  augmentation and step. Its ``train_log.jsonl`` gives images/s and the data-wait fraction
  after the warm-up steps; ``nvidia-smi`` sampled meanwhile gives the GPU utilisation.

The ratio end-to-end / ceiling says how close the pipeline keeps the GPU to busy (the issue's
floor is 0.9 on one GPU with the machine's cores). Shards are rendered once (demo scenes at
``--size`` px, ~400 like ImageNet's mean) under ``--data`` and reused.

GPU: ``python benchmarks/bench_e2e.py --variant bf16-cl-compiled --workers 14``
CPU smoke: ``python benchmarks/bench_e2e.py --arch resnet18 --small-input --image-size 32
--batch-size 16 --hidden-dim 256 --projection-dim 64 --images 200 --size 96 --steps 4
--warmup 2 --log-every 2 --workers 1 --variant fp32``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_step import VARIANTS, add_model_arguments  # this folder is on sys.path

from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.runtime.train_log import read_train_log

HERE = Path(__file__).resolve().parent


def shards(data: Path, images: int, size: int) -> str:
    """Renders ``images`` demo scenes at ``size`` px and shards them, once."""
    dest = data / f"shards-{images}-{size}"
    if not (dest / "manifest.json").exists():
        make_demo_data(str(data / f"raw-{images}-{size}"), images=images, size=size)
        prepare_shards(
            str(data / f"raw-{images}-{size}" / "imagefolder"), str(dest), shard_size=500,
            workers=len(os.sched_getaffinity(0)),
        )  # fmt: skip
    return str(dest)


def ceiling(args: argparse.Namespace, out: Path) -> dict:
    """bench_step.py's synthetic step with the same settings (a fresh process)."""
    results = out / "bench_step.jsonl"
    command = [sys.executable, str(HERE / "bench_step.py"), "--out", str(results)]
    command += ["--methods", args.method, "--variants", args.variant]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += _model_flags(args, step_flags=True)
    subprocess.run(command, check=True)
    return json.loads(results.read_text().splitlines()[-1])


class GpuSampler:
    """``nvidia-smi`` utilisation samples with their wall-clock times, in a thread."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.samples: list[tuple[float, float]] = []
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        try:
            self.process: subprocess.Popen | None = subprocess.Popen(
                [*query, "-i", "0", "-lms", str(interval_ms)], stdout=subprocess.PIPE, text=True
            )
        except FileNotFoundError:
            self.process = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), float(line)))

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) between two wall-clock times, None without nvidia-smi."""
        window = [value for stamp, value in self.samples if start <= stamp <= end]
        return sum(window) / len(window) if window else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def end_to_end(args: argparse.Namespace, shards_uri: str) -> dict:
    """``ladder-siam pretrain`` on the shards; steady-state numbers after the warm-up."""
    # A fresh folder per measurement: a second part in the same --out (the compiled after the
    # eager one) must train from scratch, never resume the first one's checkpoint. It lives
    # beside the shards, not in --out, whose files come back from a lent GPU machine.
    run = Path(tempfile.mkdtemp(prefix=f"run-{args.variant}-", dir=args.data))
    total = args.warmup + args.steps
    command = [sys.executable, "-m", "ladder_siam.pretrain", "--shards", shards_uri]
    command += ["--out", str(run), "--method", args.method, "--workers", str(args.workers)]
    command += ["--max-steps", str(total), "--epochs", "1000", "--log-every", str(args.log_every)]
    command += ["--checkpoint-every", str(10 * total), "--metrics-port", "0"]
    command += _model_flags(args, step_flags=False) + args.pretrain_arg
    sampler = GpuSampler()
    try:
        subprocess.run(command, check=True)
    finally:
        sampler.stop()
    log = read_train_log(str(run))
    shutil.rmtree(run)
    # The first intervals hold compilation and the loader's start; the rest is steady.
    steady = [record for record in log if record["step"] > args.warmup]
    if not steady:
        raise SystemExit("no logged interval after the warm-up: raise --steps or lower --log-every")
    start = max(r["time"] for r in log if r["step"] <= args.warmup)
    # Equal-length intervals: the steady rate is the harmonic mean of theirs.
    return {
        "images_per_second": len(steady) / sum(1 / r["images_per_second"] for r in steady),
        "data_wait_fraction": sum(r["data_wait_fraction"] for r in steady) / len(steady),
        "gpu_utilization_percent": sampler.mean(start, steady[-1]["time"]),
        "steady_steps": args.log_every * len(steady),
    }


def _model_flags(args: argparse.Namespace, step_flags: bool) -> list[str]:
    flags = ["--arch", args.arch, "--image-size", str(args.image_size)]
    flags += ["--batch-size", str(args.batch_size), "--hidden-dim", str(args.hidden_dim)]
    flags += ["--projection-dim", str(args.projection_dim)]
    if step_flags:
        return flags + (["--small-input"] if args.small_input else [])
    variant = VARIANTS[args.variant]
    flags += ["--precision", variant["precision"]]
    flags += ["--channels-last", str(variant["channels_last"]).lower()]
    flags += ["--compile", str(variant["compile"]).lower()]
    return [*flags, "--small-input", "true" if args.small_input else "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ladder-byol")
    parser.add_argument("--variant", choices=list(VARIANTS), default="bf16-cl-compiled")
    add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=4000, help="JPEGs to render and shard")
    parser.add_argument("--size", type=int, default=400, help="their side in px (ImageNet ~400)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) - 2)
    parser.add_argument("--steps", type=int, default=60, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compile, start)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged interval")
    parser.add_argument("--data", default=tempfile.gettempdir(), help="where shards are kept")
    parser.add_argument("--out", default="e2e_results", help="results folder")
    parser.add_argument(
        "--pretrain-arg", action="append", default=[], help="extra pretrain flag (repeatable)"
    )
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    shards_uri = shards(Path(args.data), args.images, args.size)
    top = ceiling(args, out)
    e2e = end_to_end(args, shards_uri)
    result = {
        "method": args.method, "variant": args.variant, "arch": args.arch,
        "batch_size": args.batch_size, "workers": args.workers, "extra": args.pretrain_arg,
        "ceiling_images_per_second": top["images_per_second"], **e2e,
        "ratio": e2e["images_per_second"] / top["images_per_second"],
        "device": top.get("device"), "torch": torch.__version__, "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with (out / "bench_e2e.jsonl").open("a") as stream:
        stream.write(json.dumps(result) + "\n")
    utilisation = e2e["gpu_utilization_percent"]
    print(
        f"| {args.method} | {args.variant} | {top['images_per_second']:.0f} | "
        f"{e2e['images_per_second']:.0f} | {result['ratio']:.2f} | "
        f"{100 * e2e['data_wait_fraction']:.0f}% | "
        f"{'n/a' if utilisation is None else f'{utilisation:.0f}%'} |"
    )


if __name__ == "__main__":
    main()
