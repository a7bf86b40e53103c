"""The fast linear probe against the re-extract-every-epoch baseline.

Both train one linear classifier per stage (res2..res5, BatchNorm1d + linear, SGD with
momentum and a cosine schedule, same batch and learning rate) on the same frozen backbone,
demo shards and evaluation transform:

* **fast** (``ladder_siam.evals.probe.linear_probe``'s protocol): the pooled features of
  both splits are extracted once, then every epoch runs the heads only;
* **baseline**: what a naive implementation does, every epoch streams the training images
  through the frozen backbone again (``ShardDataset``, shuffled) and steps the heads; the
  validation split is extracted once at the end.

The baseline is timed over ``--baseline-epochs`` epochs and extrapolated linearly to
``--epochs`` (each of its epochs is the same backbone pass); the fast probe runs all
``--epochs``. Top-1 is compared at equal epochs where both were measured. Prints a Markdown
table; ``--out`` also gets the numbers as JSON.

CPU (this machine): ``python benchmarks/bench_probe.py`` (defaults sized for under 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from ladder_siam.data.manifest import SplitManifest, load_split
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.evals.probe.features import (
    EvalTransform,
    PooledStages,
    extract_features,
    to_model_input,
)
from ladder_siam.evals.probe.heads import StageHeads, evaluate_heads, stage_losses, train_heads
from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.runtime.schedules import warmup_cosine

CPU = torch.device("cpu")


def baseline(
    model: PooledStages, train: SplitManifest, val: SplitManifest, args: argparse.Namespace
) -> tuple[float, float, dict]:
    """Trains the heads, re-running the backbone every epoch.

    Returns seconds per epoch, seconds of the final validation pass, and the results.
    """
    transform = EvalTransform(args.size, round(args.size / 0.875))
    dataset = ShardDataset(
        train, args.batch_size, transform, 0, 1, seed=0, decode_size=transform.resize
    )
    torch.manual_seed(0)
    heads = StageHeads(model.channels, len(train.classes), batch_norm=True)
    optimizer = torch.optim.SGD(heads.parameters(), lr=args.lr, momentum=0.9)
    schedule = warmup_cosine(args.lr, args.baseline_epochs * dataset.batches_per_epoch, 0)
    step, start = 0, time.perf_counter()
    for epoch in range(args.baseline_epochs):
        dataset.set_epoch(epoch)
        for images, labels in make_loader(dataset, args.workers):
            with torch.no_grad():
                features = model(to_model_input(images, CPU))
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step])
            loss = stage_losses(heads(features), labels)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    per_epoch = (time.perf_counter() - start) / args.baseline_epochs
    start = time.perf_counter()
    val_set = extract_features(model, val, transform, 128, args.workers, CPU, report=False)
    results = evaluate_heads(heads.eval(), val_set.features, val_set.labels)
    return per_epoch, time.perf_counter() - start, results


def fast(
    model: PooledStages, train: SplitManifest, val: SplitManifest, args: argparse.Namespace
) -> dict:
    """The fast protocol's steps, timed: extraction once, heads for each epoch count."""
    transform = EvalTransform(args.size, round(args.size / 0.875))
    start = time.perf_counter()
    train_set = extract_features(model, train, transform, 128, args.workers, CPU, report=False)
    val_set = extract_features(model, val, transform, 128, args.workers, CPU, report=False)
    extract = time.perf_counter() - start
    # One untimed epoch first: autograd's and the optimizer's one-off setup.
    train_heads(train_set.features, train_set.labels, len(train.classes), 1, args.batch_size,
                args.lr, report=False)  # fmt: skip
    runs = {}
    for epochs in sorted({args.baseline_epochs, args.epochs}):
        start = time.perf_counter()
        heads = train_heads(
            train_set.features, train_set.labels, len(train.classes), epochs=epochs,
            batch_size=args.batch_size, lr=args.lr, report=False,
        )  # fmt: skip
        results = evaluate_heads(heads, val_set.features, val_set.labels)
        runs[epochs] = {"heads_s": time.perf_counter() - start, "results": results}
    return {"extract_s": extract, "runs": runs}


def top1s(results: dict) -> str:
    return " / ".join(f"{results[stage]['top1']:.1f}" for stage in STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600, help="demo images (80%% train)")
    parser.add_argument("--size", type=int, default=64, help="image and crop size in pixels")
    parser.add_argument("--epochs", type=int, default=100, help="protocol epochs (the paper's)")
    parser.add_argument("--baseline-epochs", type=int, default=2, help="baseline epochs timed")
    parser.add_argument("--batch-size", type=int, default=64, help="classifier batch")
    parser.add_argument("--lr", type=float, default=0.3 * 64 / 256, help="peak learning rate")
    parser.add_argument("--workers", type=int, default=0, help="loader processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 on this shared 2-core machine, where a second thread "
        "stalls the heads' tiny steps at OpenMP barriers whenever another job holds a core",
    )
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(f"{tmp}/raw", images=args.images, size=args.size, val_fraction=0.2)
        prepare_shards(f"{tmp}/raw/imagefolder", f"{tmp}/shards", shard_size=100)
        train, val = load_split(f"{tmp}/shards", "train"), load_split(f"{tmp}/shards", "val")
        torch.manual_seed(0)
        model = PooledStages(torchvision_resnet("resnet18", small_input=True), STAGES)
        with torch.no_grad():  # one-off kernel setup, charged to neither side
            model(torch.zeros(8, 3, args.size, args.size))
        fast_numbers = fast(model, train, val, args)
        per_epoch, val_s, base_results = baseline(model, train, val, args)

    fast_full = fast_numbers["extract_s"] + fast_numbers["runs"][args.epochs]["heads_s"]
    fast_short = fast_numbers["extract_s"] + fast_numbers["runs"][args.baseline_epochs]["heads_s"]
    base_short = per_epoch * args.baseline_epochs + val_s
    base_full = per_epoch * args.epochs + val_s
    rows = [
        (f"{args.baseline_epochs} (measured)", fast_short, base_short,
         top1s(fast_numbers["runs"][args.baseline_epochs]["results"]), top1s(base_results)),
        (f"{args.epochs} (baseline extrapolated)", fast_full, base_full,
         top1s(fast_numbers["runs"][args.epochs]["results"]), "-"),
    ]  # fmt: skip
    print(
        f"\nresnet18 small_input, {train.num_samples} train / {val.num_samples} val demo images "
        f"at {args.size} px, batch {args.batch_size}, {torch.get_num_threads()} CPU thread(s) "
        f"({platform.processor() or platform.machine()}); 4 stages.\n"
        f"Fast: extraction {fast_numbers['extract_s']:.1f} s once. Baseline: "
        f"{per_epoch:.1f} s per epoch, val extraction {val_s:.1f} s.\n"
    )
    print(
        "| epochs | fast (s) | baseline (s) | speed-up | top-1 fast res2/3/4/5 | top-1 baseline |"
    )
    print("|---|---|---|---|---|---|")
    for epochs, fast_s, base_s, fast_top1, base_top1 in rows:
        ratio = f"{base_s / fast_s:.1f}x"
        print(f"| {epochs} | {fast_s:.1f} | {base_s:.1f} | {ratio} | {fast_top1} | {base_top1} |")
    if args.out:
        baseline_numbers = {"per_epoch_s": per_epoch, "val_s": val_s, "results": base_results}
        numbers = {"args": {**vars(args), "out": str(args.out)}, "fast": fast_numbers}
        args.out.write_text(json.dumps({**numbers, "baseline": baseline_numbers}, indent=2) + "\n")


if __name__ == "__main__":
    main()
