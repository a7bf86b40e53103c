"""Training-step throughput: the four methods x (fp32, bf16 + channels_last, compiled).

Measures the full step of ``ladder_siam.pretrain.training_step`` on synthetic uint8 views
already on the device: the batched photometric augmentation, forward and backward of the
online network, the target's forward, LARS and the EMA update. Reports images/s (an image
is one pair of views), peak memory, and the ratios the project tracks: Ladder-BYOL vs BYOL
and Ladder-DenseBYOL vs Ladder-BYOL. Results are appended as JSON lines to ``--out``, so a
run stopped early keeps what it measured.

GPU (the issue's setting): ``python benchmarks/bench_step.py --arch resnet50 --batch-size 256``
CPU smoke: ``python benchmarks/bench_step.py --arch resnet18 --small-input --image-size 32
--batch-size 8 --steps 2 --warmup 1 --variants fp32``

``--monitor`` measures the online monitor's cost (``pretrain/monitor.py``: per-stage probes
every step, RankMe every ``--rank-every`` steps): two identical trainers, one with the
monitor, step in alternation so that a busy machine slows both alike. It reports the time
inside the monitor as a fraction of a step without it (amortised: the timed steps hold one
RankMe per ``--rank-every``) and the ratio of the two trainers' step times.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from timing import device_name, sync, time_steps  # this folder is on sys.path

from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.monitor import OnlineMonitor
from ladder_siam.pretrain.train import Trainer, build_model, build_optimizer, training_step
from ladder_siam.pretrain.views import build_augment
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.metrics import TrainingMetrics
from ladder_siam.runtime.schedules import ema_tau, warmup_cosine
from ladder_siam.runtime.train_log import TrainLog

VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False, "compile": False},
    "bf16-cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16-cl-compiled": {"precision": "bf16", "channels_last": True, "compile": True},
}
METHODS = ("byol", "ladder-byol", "dense-byol", "ladder-dense-byol")


def make_trainer(
    method: str, variant: str, args: argparse.Namespace, device: torch.device, monitor: bool
) -> Trainer:
    """A trainer on synthetic data; with ``monitor``, the online monitor over ``--classes``."""
    config = PretrainConfig(
        shards="synthetic", out="unused", method=method, arch=args.arch,
        small_input=args.small_input, image_size=args.image_size, batch_size=args.batch_size,
        hidden_dim=args.hidden_dim, projection_dim=args.projection_dim, **VARIANTS[variant],
    )  # fmt: skip
    torch.manual_seed(0)
    env = DistributedEnv(0, 0, 1, device)
    model = build_model(config, env)
    total = args.warmup + args.steps
    watcher = None
    if monitor:
        watcher = OnlineMonitor(
            model.online.backbone.channels, list(model.supervised), config.projection_dim,
            args.classes, config.online_probe_lr, args.rank_every, config.batch_size, device,
        )  # fmt: skip
    return Trainer(
        config=config, env=env, model=model, ddp_model=model,
        step_model=torch.compile(model) if config.compile else model,
        optimizer=build_optimizer(model, config),
        lr=warmup_cosine(1.0, total, 1), tau=ema_tau(0.99, total),
        augment=build_augment(config, device), steps_per_epoch=total, total_steps=total,
        metrics=TrainingMetrics(method=method, arch=args.arch),
        train_log=TrainLog("unused", None, enabled=False), monitor=watcher,
    )  # fmt: skip


def synthetic_batch(args: argparse.Namespace, device: torch.device, labels: bool) -> list:
    """One micro-batch of uint8 views on the device (with CPU labels for the monitor)."""
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = (torch.randint(0, 256, shape, dtype=torch.uint8, device=device),) * 2
    return [(views, torch.randint(0, args.classes, (args.batch_size,)))] if labels else [views]


def bench(method: str, variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    trainer = make_trainer(method, variant, args, device, monitor=False)
    views = synthetic_batch(args, device, labels=False)
    timing = time_steps(lambda: training_step(trainer, views), args.steps, args.warmup, device)
    seconds = timing["seconds_per_iteration"]
    return {
        "method": method, "variant": variant, "images_per_second": args.batch_size / seconds,
        "step_ms": 1000 * seconds, "peak_memory_gib": timing["peak_memory_gib"],
        "warmup_seconds": timing["warmup_seconds"],
    }  # fmt: skip


def bench_monitor(
    method: str, variant: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """The step with and without the online monitor, stepped in alternation."""
    trainers = {on: make_trainer(method, variant, args, device, monitor=on) for on in (0, 1)}
    batches = {on: synthetic_batch(args, device, labels=bool(on)) for on in (0, 1)}
    monitor = trainers[1].monitor
    assert monitor is not None
    inside: list[float] = []
    update = monitor.update

    def timed_update(*update_args: object) -> None:
        sync(device)
        start = time.perf_counter()
        update(*update_args)  # type: ignore[arg-type]
        sync(device)
        inside.append(time.perf_counter() - start)

    monitor.update = timed_update  # type: ignore[method-assign]
    computed: list[int] = []
    rank = monitor.ring.rankme

    def counted_rankme() -> dict[str, torch.Tensor]:
        computed.append(1)
        return rank()

    monitor.ring.rankme = counted_rankme  # type: ignore[method-assign]
    for _ in range(args.warmup):
        for on in (0, 1):
            training_step(trainers[on], batches[on])
    inside.clear()
    computed.clear()
    seconds = {0: 0.0, 1: 0.0}
    for index in range(args.steps):
        for on in (0, 1) if index % 2 == 0 else (1, 0):
            sync(device)
            start = time.perf_counter()
            training_step(trainers[on], batches[on])
            sync(device)
            seconds[on] += time.perf_counter() - start
    return {
        "method": method, "variant": variant, "monitor": True,
        "step_ms": 1000 * seconds[0] / args.steps,
        "monitor_step_ms": 1000 * seconds[1] / args.steps,
        "monitor_ms": 1000 * sum(inside) / args.steps,
        "monitor_fraction": sum(inside) / seconds[0],
        "step_ratio": seconds[1] / seconds[0],
        "rankme_computations": len(computed),
    }  # fmt: skip


def summarize_monitor(results: list[dict]) -> str:
    """The monitor's cost per method and variant, from :func:`bench_monitor`'s records."""
    lines = [
        "| method | variant | step ms | with monitor | inside the monitor | fraction | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['variant']} | {r['step_ms']:.1f} | {r['monitor_step_ms']:.1f} "
        f"| {r['monitor_ms']:.2f} ms | {100 * r['monitor_fraction']:.2f} % "
        f"| {r['step_ratio']:.3f} |"
        for r in results
    ]
    return "\n".join(lines)


def summarize(results: list[dict]) -> str:
    """The Markdown table plus the ratios, from the JSON records."""
    by_key = {(r["method"], r["variant"]): r for r in results}
    lines = ["| method | variant | images/s | step ms | peak GiB |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['variant']} | {r['images_per_second']:.0f} | {r['step_ms']:.1f} "
        f"| {r['peak_memory_gib']:.1f} |"
        for r in results
    ]
    for variant in VARIANTS:
        ladder, byol = by_key.get(("ladder-byol", variant)), by_key.get(("byol", variant))
        dense = by_key.get(("ladder-dense-byol", variant))
        if ladder and byol:
            ratio = ladder["step_ms"] / byol["step_ms"]
            lines.append(f"\n{variant}: Ladder-BYOL time / BYOL time = {ratio:.3f}")
        if ladder and dense:
            ratio = dense["step_ms"] / ladder["step_ms"]
            memory = dense["peak_memory_gib"] / max(ladder["peak_memory_gib"], 1e-9)
            lines.append(
                f"{variant}: Ladder-DenseBYOL / Ladder-BYOL time = {ratio:.3f}, "
                f"peak memory = {memory:.3f}"
            )
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch options, shared with bench_e2e.py so both measure the same step."""
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="per GPU")
    parser.add_argument("--hidden-dim", type=int, default=4096)
    parser.add_argument("--projection-dim", type=int, default=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps (compilation, cuDNN autotuning)"
    )
    parser.add_argument(
        "--monitor", action="store_true", help="measure the online monitor's cost instead"
    )
    parser.add_argument(
        "--rank-every", type=int, default=20, help="RankMe interval (--monitor); --steps should "
        "be a multiple, so that the timed steps hold their share of RankMe computations",
    )  # fmt: skip
    parser.add_argument(
        "--classes", type=int, default=1000, help="classes of the synthetic labels (--monitor)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="bench_step.jsonl", help="JSON lines, appended per result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = device_name(device)
    print(
        f"device {name}; torch {torch.__version__}; {args.arch} {args.image_size} px, "
        f"batch {args.batch_size}",
        flush=True,
    )
    results = []
    for variant in args.variants.split(","):
        for method in args.methods.split(","):
            run = bench_monitor if args.monitor else bench
            result = run(method, variant, args, device)
            results.append(result)
            print(json.dumps(result), flush=True)
            with Path(args.out).open("a") as stream:
                stream.write(
                    json.dumps({**result, "device": name, "torch": torch.__version__}) + "\n"
                )
    print(summarize_monitor(results) if args.monitor else summarize(results), flush=True)


if __name__ == "__main__":
    main()
