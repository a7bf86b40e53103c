"""Pretraining loader throughput per CPU core against the usual torchvision/PIL BYOL pipeline.

Renders ImageNet-like JPEGs (demo scenes at 400 x 350, quality 90), writes them as loose
files and as shards, and runs each pipeline over the same images on one pinned core
(``num_workers=0``, one torch thread), side by side:

* **ours**: the pretraining loader as ``pretrain.build_dataset`` builds it: shard reading,
  shuffle buffer, JPEG decoding at the smallest scale the crops allow, both views' random
  resized crop and flip, uint8 batches (the photometric half runs on the GPU);
* **ours, shards unverified**: the same without the streaming sha256 check of each shard,
  the cost of that check side by side;
* **ours + CPU photometric**: the same, plus ``TwoViewPhotometric`` on the CPU, for reference;
* **ours, decode on GPU**: ``--decode gpu``'s loader, which yields JPEG bytes and crops only
  (the device's decode and resize cost is not on the CPU and not measured here);
* **baseline**: torchvision ``ImageFolder`` + PIL with BYOL's two-view transform as SSL
  libraries write it (RandomResizedCrop, flip, ColorJitter p=0.8, grayscale p=0.2, blur
  p=1.0/0.1, solarize p=0/0.2, ToTensor, Normalize), float views.

One image is one pair of views. Each measurement is an epoch over the same images, repeated
``--runs`` times; the median is reported. Prints a Markdown table and, with ``--json``, appends
one JSON line per pipeline. Example::

    python benchmarks/bench_loader.py --images 2000 --runs 3 --core 0 --json loader.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from ladder_siam.data.photometric import IMAGENET_MEAN, IMAGENET_STD
from ladder_siam.data.shards import make_loader
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.prep.scenes import CLASS_NAMES, render_scene
from ladder_siam.pretrain.augmentation import TwoViewPhotometric
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.views import build_dataset

BATCH = 64
WIDTH, HEIGHT = 400, 350  # about ImageNet's mean image size
JPEG_QUALITY = 90


def write_images(root: Path, count: int) -> None:
    """Demo scenes at WIDTH x HEIGHT as an imagefolder tree and as shards of 250."""
    for index in range(count):
        scene = render_scene(0, index, WIDTH)
        image = Image.fromarray(scene.image).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        path = root / "images" / "train" / CLASS_NAMES[scene.label - 1] / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=JPEG_QUALITY)
    prepare_shards(str(root / "images"), str(root / "shards"), shard_size=250)


def byol_view(blur: float, solarize: float, interpolation: str) -> transforms.Compose:
    """One view of BYOL's augmentation as solo-learn / lightly write it for the CPU."""
    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=mode),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur),
            transforms.RandomSolarize(128, p=solarize),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViews:
    """BYOL's asymmetric pair: view A always blurred, view B sometimes solarized."""

    def __init__(self, interpolation: str) -> None:
        self.view_a = byol_view(1.0, 0.0, interpolation)
        self.view_b = byol_view(0.1, 0.2, interpolation)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view_a(image), self.view_b(image)


def epoch_rate(batches: Callable[[], Iterable[Any]], count: Callable[[Any], int]) -> float:
    """Images per second over one pass of ``batches()``."""
    start = time.perf_counter()
    images = sum(count(batch) for batch in batches())
    return images / (time.perf_counter() - start)


def ours(
    shards: str, decode: str, photometric: bool = False, verify: bool = True
) -> Callable[[], float]:
    config = PretrainConfig(shards=shards, out="-", batch_size=BATCH, decode=decode)
    dataset = build_dataset(config, rank=0, world_size=1)
    if not verify:  # the loader as it was before shards' checksums were verified
        dataset.shard_sha256 = [None] * len(dataset.shard_sha256)
    augment = TwoViewPhotometric()

    def batches() -> Iterable[Any]:
        for batch in make_loader(dataset, num_workers=0):
            yield augment(*batch) if photometric else batch

    return lambda: epoch_rate(batches, lambda _: BATCH)


def baseline(folder: str, interpolation: str) -> Callable[[], float]:
    dataset = torchvision.datasets.ImageFolder(folder, transform=TwoViews(interpolation))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    return lambda: epoch_rate(lambda: loader, lambda batch: batch[0][0].shape[0])


def machine() -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to render")
    parser.add_argument("--runs", type=int, default=3, help="epochs per pipeline (median)")
    parser.add_argument("--core", type=int, default=0, help="the CPU core to pin to")
    parser.add_argument("--json", help="append one JSON line per pipeline to this file")
    parser.add_argument(
        "--skip-photometric", action="store_true", help="skip ours + CPU photometric"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {args.core})

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images)
        shards, folder = str(root / "shards" / "train"), str(root / "images" / "train")
        pipelines = {
            "ours: decode + crop + flip, uint8": ours(shards, "cpu"),
            "ours, shards unverified (no sha256 check)": ours(shards, "cpu", verify=False),
            "ours, decode on GPU: bytes + crops": ours(shards, "gpu"),
            "baseline: ImageFolder + PIL BYOL, bicubic": baseline(folder, "bicubic"),
            "baseline: ImageFolder + PIL BYOL, bilinear": baseline(folder, "bilinear"),
        }
        if not args.skip_photometric:
            pipelines["ours + photometric on the CPU"] = ours(shards, "cpu", photometric=True)
        # Interleaved rounds, so a change in the machine's load hits every pipeline alike.
        runs: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.runs):
            for name, run in pipelines.items():
                runs[name].append(run())

    info = machine()
    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    bicubic = medians["baseline: ImageFolder + PIL BYOL, bicubic"]
    bilinear = medians["baseline: ImageFolder + PIL BYOL, bilinear"]
    print(
        f"\n{info['date']}, {info['machine']}, pinned to core {args.core}; torch {info['torch']},"
        f" torchvision {info['torchvision']}, Pillow {info['pillow']}, Python {info['python']}"
    )
    print(
        f"{args.images} JPEGs {WIDTH}x{HEIGHT} q{JPEG_QUALITY}, batches of {BATCH}, "
        f"median of {args.runs} epochs\n"
    )
    print("| pipeline | two-view images/s per core | runs | vs baseline bicubic | vs bilinear |")
    print("|---|---|---|---|---|")
    for name, rates in runs.items():
        rate, listed = medians[name], ", ".join(f"{rate:.0f}" for rate in rates)
        print(
            f"| {name} | {rate:.0f} | {listed} | {rate / bicubic:.2f}x | {rate / bilinear:.2f}x |"
        )
    if args.json:
        with open(args.json, "a") as stream:
            for name, rates in runs.items():
                record = {**info, "benchmark": "bench_loader", "pipeline": name, "core": args.core,
                          "images": args.images, "size": [WIDTH, HEIGHT], "batch": BATCH,
                          "runs": rates, "images_per_second": medians[name],
                          "ratio_to_bicubic_baseline": medians[name] / bicubic,
                          "ratio_to_bilinear_baseline": medians[name] / bilinear}  # fmt: skip
                stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
