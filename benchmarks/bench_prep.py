"""prepare-shards throughput per worker process at a realistic image size, repeated.

Generates demo scenes at ``--size`` px (ImageNet's JPEGs are ~400x350 px on average), then
times ``ladder-siam prepare-shards`` with one worker pinned to one core, ``--repeats`` times,
on two copies of the scenes: as rendered, and with pixel noise added (rendered shapes compress
to ~27 kB at 400 px, a photo to ~110 kB; the noise brings the bytes, and so the entropy
decoding, near a photo's). Each copy is prepared twice: JPEGs kept as they are (decoded once
to validate them, as with ``--max-side 512`` on ImageNet, where most images are smaller) and
down-scaled with ``--max-side`` (decoded, resized and re-encoded). Source and shards live on
tmpfs when ``/dev/shm`` exists, so the figure is the CPU's, not the disk's. Prints the rates
(mean and spread), then the minutes ImageNet-1k and -21k take at the noisy pass-through rate
spread over pods, for BENCHMARKS.md. Example::

    python benchmarks/bench_prep.py --images 600 --size 400 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from ladder_siam.data.manifest import DatasetManifest
from ladder_siam.io import storage
from ladder_siam.prep.demo_data import make_demo_data

NOISE_SIGMA = 20
DATASETS = {"ImageNet-1k": 1_281_167, "ImageNet-21k": 14_197_122}
PODS = (1, 8, 32)
CORES_PER_POD = 16


def prepare_rate(source: str, dest: str, max_side: int | None) -> tuple[float, float]:
    """One pinned worker, run as users run it (the CLI in a fresh process).

    Returns:
        Images/s over the whole command, and over the writing alone as prepare-shards logs it
        (without interpreter start-up and listing, which a long run amortises).
    """
    command = [sys.executable, "-m", "ladder_siam.cli", "prepare-shards", "--source", source]
    command += ["--dest", dest, "--shard-size", "100", "--workers", "1", "--log-level", "info"]
    if max_side is not None:
        command += ["--max-side", str(max_side)]
    core = min(os.sched_getaffinity(0))
    start = time.perf_counter()
    done = subprocess.run(
        command, check=True, capture_output=True, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    manifest = DatasetManifest.from_json(storage.read_text(f"{dest}/manifest.json"), dest)
    whole = sum(split.num_samples for split in manifest.splits.values()) / seconds
    writing = float(re.search(r"done: .*; ([0-9.]+) img/s", done.stderr).group(1))
    return whole, writing


def add_noise(folder: Path, sigma: float) -> float:
    """Adds Gaussian noise to every JPEG under ``folder``, in place; returns their mean kB."""
    rng = np.random.default_rng(0)
    sizes = []
    for path in sorted(folder.rglob("*.jpg")):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        pixels += rng.normal(0, sigma, pixels.shape)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="demo scenes to generate")
    parser.add_argument("--size", type=int, default=400, help="demo scene side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    settings = {"kept as they are": None, f"down-scaled to {args.size // 2} px": args.size // 2}
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        make_demo_data(f"{tmp}/raw", images=args.images, size=args.size)
        plain = Path(tmp) / "raw" / "imagefolder"
        plain_kb = float(np.mean([p.stat().st_size for p in plain.rglob("*.jpg")])) / 1000
        noisy = Path(tmp) / "noisy"
        shutil.copytree(plain, noisy)
        noisy_kb = add_noise(noisy, NOISE_SIGMA)
        sources = {f"rendered, {plain_kb:.0f} kB": plain, f"noisy, {noisy_kb:.0f} kB": noisy}
        for run in range(args.repeats):
            for source_name, source in sources.items():
                for name, max_side in settings.items():
                    dest = f"{tmp}/shards-{run}-{source.name}-{max_side}"
                    rates.setdefault((source_name, name), []).append(
                        prepare_rate(str(source), dest, max_side)
                    )

    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} cores; Pillow {PIL.__version__}, "
        f"Python {platform.python_version()}; {args.images} demo scenes of {args.size} px, "
        f"{args.repeats} runs each, one worker pinned to one core, on {scratch or 'disk'}\n"
    )
    print("| source JPEGs | JPEGs | writing, img/s per worker: mean (min–max) | whole command |")
    print("|---|---|---|---|")
    for (source_name, name), runs in rates.items():
        cells = []
        for values in ([w for _, w in runs], [c for c, _ in runs]):
            cells.append(f"{statistics.mean(values):.0f} ({min(values):.0f}–{max(values):.0f})")
        print(f"| {source_name} | {name} | {cells[0]} | {cells[1]} |")
    noisy_name = next(iter(sources.keys() - {f"rendered, {plain_kb:.0f} kB"}))
    rate = statistics.mean(w for _, w in rates[(noisy_name, "kept as they are")])
    print(f"\nMinutes at {rate:.0f} img/s per core (noisy, kept), {CORES_PER_POD} workers a pod:\n")
    print("| dataset | images | " + " | ".join(f"{n} pod{'s' * (n > 1)}" for n in PODS) + " |")
    print("|---|---|" + "---|" * len(PODS))
    for dataset, images in DATASETS.items():
        minutes = [images / (rate * pods * CORES_PER_POD) / 60 for pods in PODS]
        print(f"| {dataset} | {images:,} | " + " | ".join(f"{m:.1f}" for m in minutes) + " |")


if __name__ == "__main__":
    main()
