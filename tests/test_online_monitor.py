"""The online monitor: probes that learn every stage, RankMe, and a training left untouched."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from system_tools import require_tool

from ladder_siam.data.manifest import SplitManifest
from ladder_siam.nets.archs import STAGES
from ladder_siam.prep.fashion_mnist import DEFAULT_SOURCE_DIR, import_fashion_mnist
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain import train as pretrain_module
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.pretrain.monitor import OnlineMonitor, build_monitor
from ladder_siam.pretrain.rankme import FeatureRing, rankme
from ladder_siam.runtime.distributed import DistributedEnv
from ladder_siam.runtime.train_log import read_train_log

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """320 Fashion-MNIST training images: ten classes a probe separates within a few steps."""
    require_tool(f"{DEFAULT_SOURCE_DIR}/train-images-idx3-ubyte.gz")
    root = tmp_path_factory.mktemp("fashion")
    import_fashion_mnist(str(root / "raw"), limit=320)
    prepare_shards(str(root / "raw"), str(root / "shards"), shard_size=80)
    return str(root / "shards")


def tiny(shards: str, out: Path, **overrides: object) -> PretrainConfig:
    settings = {
        "shards": shards, "out": str(out), "method": "ladder-byol", "arch": "resnet18",
        "small_input": True, "image_size": 16, "epochs": 2, "batch_size": 32,
        "warmup_epochs": 0.5, "hidden_dim": 128, "projection_dim": 32, "precision": "fp32",
        "channels_last": False, "workers": 1, "buffer_size": 80, "log_every": 5,
        "checkpoint_every": 100, "metrics_port": None, "rank_every": 4,
    }  # fmt: skip
    settings.update(overrides)
    return PretrainConfig(**settings)


@pytest.mark.slow
def test_probes_learn_every_stage_without_changing_the_backbone(
    fashion_shards: str, tmp_path: Path
) -> None:
    watched = pretrain_module.pretrain(tiny(fashion_shards, tmp_path / "on"))
    log = read_train_log(str(tmp_path / "on"))
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    chance = 100 / 10
    for stage in STAGES:
        # Scored on batches before training on them; the second epoch's 320 images.
        second_epoch = [r[f"online_probe_top1_{stage}"] for r in log[2:]]
        assert min(second_epoch) > 1.5 * chance and np.mean(second_epoch) > 2 * chance, stage
        # The ring holds 512 samples (res5's width) after 16 steps; RankMe at steps 16 and 20.
        assert 1 < log[-1][f"rankme_{stage}"] <= 512, stage
        assert 1 < log[-1][f"rankme_projector_{stage}"] <= 32, stage
    assert not any(key.startswith("rankme") for key in log[1])

    unwatched = pretrain_module.pretrain(
        tiny(fashion_shards, tmp_path / "off", online_monitor=False)
    )
    assert not any(
        "online" in key or "rankme" in key
        for r in read_train_log(str(tmp_path / "off"))
        for key in r
    )
    on, off = (torch.load(uri, weights_only=True) for uri in (watched, unwatched))
    for name, tensor in on.items():
        assert torch.equal(tensor, off[name]), name


def test_rankme_is_the_exponential_of_the_singular_value_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    orthonormal, _ = torch.linalg.qr(torch.randn(64, 16, generator=generator))
    # Equal singular values: the effective rank is the width.
    assert float(rankme(orthonormal)) == pytest.approx(16, rel=1e-4)
    # One direction: collapsed.
    line = torch.randn(64, 1, generator=generator) * torch.randn(1, 16, generator=generator)
    assert float(rankme(line)) == pytest.approx(1, abs=1e-3)
    # Garrido et al. Eq. 1 with eps = 1e-7, computed independently in float64.
    embeddings = torch.randn(64, 16, generator=generator) * torch.linspace(0.1, 3, 16)
    sigma = np.linalg.svd(embeddings.double().numpy(), compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    assert float(rankme(embeddings.bfloat16())) == pytest.approx(
        np.exp(-(p * np.log(p)).sum()), rel=2e-2
    )
    assert float(rankme(embeddings)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)


def test_the_ring_keeps_the_newest_samples_and_records_only_the_steps_it_needs() -> None:
    ring = FeatureRing({"a": 2, "b": 3}, capacity=5, every=10, global_batch=2, device=CPU)
    # ceil(5 / 2) = 3 steps before each computation: 8, 9, 10, then 18, 19, 20...
    assert [step for step in range(1, 21) if ring.wants(step)] == [8, 9, 10, 18, 19, 20]
    for step in (8, 9):
        rows = torch.arange(2.0)[:, None] + 10 * step
        ring.add({"a": rows.expand(2, 2), "b": rows.expand(2, 3)})
    assert not ring.due(10), "4 of 5 samples"
    ring.add({"a": torch.full((2, 2), 100.0), "b": torch.full((2, 3), 100.0)})
    assert ring.due(10) and not ring.due(9)
    assert ring.rows[:, 0].tolist() == [100.0, 81.0, 90.0, 91.0, 100.0], "80 overwritten"
    assert set(ring.rankme()) == {"a", "b"}
    with pytest.raises(ValueError, match="fewer than 3"):
        FeatureRing({"a": 3}, capacity=2, every=1, global_batch=1, device=CPU)


def test_the_monitor_leaves_the_global_random_state_alone() -> None:
    monitor = OnlineMonitor(
        {"res2": 8, "res5": 16}, ["res5"], projection_dim=4, classes=3, lr=0.1, rank_every=1,
        global_batch=8, device=CPU,
    )  # fmt: skip
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for step in range(1, 4):
        features = {"res2": torch.randn(8, 8) + labels[:, None], "res5": torch.randn(8, 16)}
        projections = {"res5": torch.randn(8, 4)}
        before = torch.get_rng_state()
        monitor.update(step, features, projections, labels)
        assert torch.equal(torch.get_rng_state(), before)
    reading = monitor.reading()
    assert set(reading.probe_top1) == {"res2", "res5"} and set(reading.rankme) == {"res2", "res5"}
    assert set(reading.record()) == {
        "online_probe_top1_res2", "online_probe_top1_res5", "rankme_res2", "rankme_res5",
        "rankme_projector_res5",
    }  # fmt: skip
    assert monitor.reading().rankme == {}, "a RankMe is reported once"
    # Two monitors of one seed start from the same heads, whatever the global RNG did between.
    torch.manual_seed(123)
    again = OnlineMonitor({"res2": 8}, [], 4, 3, 0.1, 1, 8, CPU)
    torch.manual_seed(456)
    other = OnlineMonitor({"res2": 8}, [], 4, 3, 0.1, 1, 8, CPU)
    assert torch.equal(again.heads["res2"][1].weight, other.heads["res2"][1].weight)


def test_shards_without_labels_turn_the_monitor_off_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = LadderSiam("resnet18", "---G", small_input=True, hidden_dim=8, projection_dim=4)
    config = PretrainConfig(shards="s3://bucket/coco", out="unused")
    env = DistributedEnv(0, 0, 1, CPU)
    unlabelled = SplitManifest("train", "coco", [], 10, [], fields=["jpg", "json"])
    with caplog.at_level(logging.INFO):
        assert build_monitor(config, model, unlabelled, env) is None
    assert caplog.text.count("no labels (.cls): online monitor off") == 1
    labelled = SplitManifest("train", "imagefolder", ["a", "b"], 10, [], fields=["jpg", "cls"])
    assert isinstance(build_monitor(config, model, labelled, env), OnlineMonitor)
    off = PretrainConfig(shards="x", out="unused", online_monitor=False)
    assert build_monitor(off, model, labelled, env) is None
