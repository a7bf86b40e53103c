"""Data-plane throughput: prepare-shards images/s per worker and loader images/s per core.

Runs on demo scenes and on Debian's Fashion-MNIST, each side by side with a baseline in the
same run:

* prepare-shards with 1 and with N workers (the per-worker rate shows how it scales);
* the streaming shard loader on one core (reduced-size JPEG decoding) against the usual
  torchvision ``ImageFolder`` + PIL pipeline reading the same images as loose files.

Prints a Markdown table for BENCHMARKS.md. Example::

    python benchmarks/bench_shards.py --images 4000 --size 160 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from ladder_siam.data.manifest import DatasetManifest, load_split
from ladder_siam.data.shards import CenterCropResize, ShardDataset, make_loader
from ladder_siam.io import storage
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.fashion_mnist import import_fashion_mnist


def timed(function: Callable[[], int], one_core: bool = False) -> tuple[int, float]:
    """Runs ``function``; with ``one_core`` pinned to a single core (threads included)."""
    cores = os.sched_getaffinity(0)
    if one_core:
        os.sched_setaffinity(0, {min(cores)})
    try:
        start = time.perf_counter()
        count = function()
        return count, time.perf_counter() - start
    finally:
        os.sched_setaffinity(0, cores)


def bench_prepare(source: str, dest: str, workers: int) -> float:
    """prepare-shards run as users run it (a fresh process: spawned workers then import only
    what the CLI imports, not this script's torch); one worker is pinned to one core."""
    command = [sys.executable, "-m", "ladder_siam.cli", "prepare-shards", "--source", source]
    command += ["--dest", dest, "--shard-size", "250", "--workers", str(workers)]
    core = min(os.sched_getaffinity(0))
    pin = (lambda: os.sched_setaffinity(0, {core})) if workers == 1 else None
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, preexec_fn=pin)
    seconds = time.perf_counter() - start
    manifest = DatasetManifest.from_json(storage.read_text(f"{dest}/manifest.json"), dest)
    return sum(split.num_samples for split in manifest.splits.values()) / seconds


def bench_our_loader(shards: str, crop: int, batches: int) -> float:
    manifest = load_split(shards)
    dataset = ShardDataset(manifest, 64, CenterCropResize(crop), 0, 1, decode_size=crop)
    loader = iter(make_loader(dataset, num_workers=0))
    next(loader)  # the shuffle buffer fills before the first batch; measure the steady state

    def run() -> int:
        return sum(images.shape[0] for images, _ in (next(loader) for _ in range(batches)))

    count, seconds = timed(run, one_core=True)
    return count / seconds


def bench_imagefolder_loader(folder: str, crop: int, batches: int) -> float:
    transform = transforms.Compose(
        [transforms.Resize(crop), transforms.CenterCrop(crop), transforms.PILToTensor()]
    )
    dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True))

    def run() -> int:
        return sum(images.shape[0] for images, _ in (next(loader) for _ in range(batches)))

    count, seconds = timed(run, one_core=True)
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="demo scenes to generate")
    parser.add_argument("--size", type=int, default=160, help="demo scene side in pixels")
    parser.add_argument(
        "--fashion-limit", type=int, default=10000, help="Fashion-MNIST images per split"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--crop", type=int, default=64, help="loader output size")
    parser.add_argument("--batches", type=int, default=20, help="loader batches of 64 to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # loader figures are per core

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo, fashion = Path(tmp) / "demo", Path(tmp) / "fashion"
        _, seconds = timed(lambda: make_demo_data(str(Path(tmp) / "demo96"), 2000, 96), True)
        demo_rate = 2000 / seconds
        make_demo_data(str(demo), images=args.images, size=args.size)
        import_fashion_mnist(str(fashion), limit=args.fashion_limit)
        sources = {
            f"demo scenes {args.size} px": str(demo / "imagefolder"),
            "Fashion-MNIST 28 px": str(fashion),
        }
        for name, source in sources.items():
            one = bench_prepare(source, f"{tmp}/{name}-1", workers=1)
            many = bench_prepare(source, f"{tmp}/{name}-n", workers=args.workers)
            ours = bench_our_loader(f"{tmp}/{name}-1/train", args.crop, args.batches)
            baseline = bench_imagefolder_loader(f"{source}/train", args.crop, args.batches)
            rows.append((name, one, many, ours, baseline))

    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"demo-data generation: {demo_rate:.0f} images/s on one core (96 px)\n")
    print(
        f"| data | prepare-shards 1 worker, 1 core (img/s) "
        f"| {args.workers} workers (img/s per worker) "
        f"| loader, ours (img/s/core) | ImageFolder+PIL (img/s/core) | loader ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name, one, many, ours, baseline in rows:
        print(
            f"| {name} | {one:.0f} | {many:.0f} ({many / args.workers:.0f}) | {ours:.0f} "
            f"| {baseline:.0f} | {ours / baseline:.2f}x |"
        )


if __name__ == "__main__":
    main()
