"""Linear probe and kNN: classifier training, kNN, feature extraction, both protocols end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from backbones import reexport

from ladder_siam import cli
from ladder_siam.data.manifest import load_split
from ladder_siam.evals.probe import standard
from ladder_siam.evals.probe.config import PRESETS, ProbeConfig
from ladder_siam.evals.probe.features import EvalTransform, PooledStages, extract_features
from ladder_siam.evals.probe.heads import (
    evaluate_heads,
    stage_losses,
    topk_accuracy,
    train_heads,
)
from ladder_siam.evals.probe.knn import knn_correct, knn_scores
from ladder_siam.evals.probe.linear_probe import linear_probe
from ladder_siam.nets.backbone_file import load_backbone
from ladder_siam.nets.backbones import torchvision_resnet
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.runtime import checkpoint
from ladder_siam.runtime.health import NonFiniteLossError
from ladder_siam.runtime.per_image import read_per_image
from ladder_siam.runtime.resume import ResumeError
from ladder_siam.runtime.train_log import TrainLog, read_train_log

STAGES = ["res2", "res3", "res4", "res5"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a loaded 2-core machine a second one stalls the heads' tiny steps
    at OpenMP barriers (seconds instead of milliseconds) and gains the backbone little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo shards (imagefolder: 3 train shards, 1 val shard; coco; 40 px), a tiny backbone."""
    root = tmp_path_factory.mktemp("probe")
    make_demo_data(str(root / "raw"), images=96, size=40, val_fraction=0.25)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "shards"), shard_size=24)
    prepare_shards(str(root / "raw" / "coco"), str(root / "coco"), layout="coco", shard_size=40)
    torch.manual_seed(0)
    model = LadderSiam("resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True)
    torch.save(model.backbone_state_dict(), root / "backbone.pt")
    return root


def tiny_config(data: Path, out: Path, **changes: object) -> ProbeConfig:
    # 24 px keeps the backbone passes of these CPU tests cheap.
    values = {**PRESETS["tiny"], "image_size": 24, **changes}
    return ProbeConfig(
        backbone=str(data / "backbone.pt"), train=str(data / "shards"),
        val=str(data / "shards"), out=str(out), **values,
    )  # fmt: skip


def test_heads_separate_linearly_separable_features_at_every_stage() -> None:
    torch.manual_seed(0)
    classes, per_class = 10, 60
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = {}
    for stage, width, scale in (("res2", 64, 50.0), ("res3", 128, 0.02), ("res5", 512, 1.0)):
        # Separable by construction: a class centre plus noise far smaller than the centres'
        # distances; the scales differ by orders of magnitude, as real stages' features do.
        centres = torch.randn(classes, width) * 3
        features[stage] = scale * (centres[labels] + 0.3 * torch.randn(len(labels), width))
    train_idx, test_idx = torch.arange(len(labels)) % 4 != 0, torch.arange(len(labels)) % 4 == 0
    heads = train_heads(
        {s: f[train_idx] for s, f in features.items()}, labels[train_idx], classes,
        epochs=15, batch_size=64, lr=0.1, report=False,
    )  # fmt: skip
    results = evaluate_heads(heads, {s: f[test_idx] for s, f in features.items()}, labels[test_idx])
    assert set(results) == {"res2", "res3", "res5"}
    for result in results.values():
        assert result["top1"] > 95.0 and result["top5"] >= result["top1"]
        # Rows are true classes: they count each class's test images; the diagonal, the hits.
        confusion = torch.tensor(result["confusion"])
        assert (
            confusion.sum(dim=1).tolist()
            == torch.bincount(labels[test_idx], minlength=classes).tolist()
        )
        assert 100.0 * confusion.trace().item() / confusion.sum().item() == pytest.approx(
            result["top1"]
        )
    # The same heads score at chance on shuffled labels: the accuracy comes from the features.
    shuffled = labels[test_idx][torch.randperm(int(test_idx.sum()))]
    scrambled = evaluate_heads(heads, {s: f[test_idx] for s, f in features.items()}, shuffled)
    assert all(result["top1"] < 40.0 for result in scrambled.values())


def test_a_non_finite_stage_stops_the_heads_at_the_epochs_check(tmp_path: Path) -> None:
    labels = torch.arange(4).repeat(8)
    features = {"res2": torch.randn(32, 8), "res3": torch.randn(32, 8)}
    features["res3"][5] = math.inf  # the batch that holds it makes res3's loss NaN
    log = TrainLog(str(tmp_path), None)
    with pytest.raises(
        NonFiniteLossError,
        match=r"^linear probe heads: non-finite loss in step \d: loss_res3 = nan$",
    ) as error:
        train_heads(features, labels, 4, epochs=3, batch_size=8, lr=0.1, report=False,
                    train_log=log)  # fmt: skip
    # Checked once per epoch, named by its first bad step; no record of the failed epoch.
    assert 1 <= error.value.step <= 4 and list(error.value.values) == ["loss_res3"]
    assert log.lines == []


def test_a_non_finite_loss_stops_the_standard_probe_within_one_interval(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def nan_at_step_3(logits: dict, labels: torch.Tensor) -> dict:
        calls.append(1)
        losses = stage_losses(logits, labels)
        if len(calls) == 3:
            losses["loss_res5"] = losses["loss_res5"] * math.nan
            losses["loss"] = losses["loss"] + losses["loss_res5"]
        return losses

    monkeypatch.setattr(standard, "stage_losses", nan_at_step_3)
    config = tiny_config(data, tmp_path / "out", protocol="standard", max_steps=6,
                         batch_size=16, log_every=2, checkpoint_every=2)  # fmt: skip
    with pytest.raises(
        NonFiniteLossError,
        match=r"^standard linear probe: non-finite loss in step 3: loss_res5 = nan$",
    ):
        linear_probe(config)
    # Stopped at step 4's check, before its checkpoint: the run resumes from step 2.
    assert [step for step, _ in checkpoint.list_checkpoints(config.out)] == [2]
    assert [record["step"] for record in read_train_log(config.out)] == [2]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_topk_accuracy_counts_hits_and_saturates_below_k_classes() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 2, 2])
    assert topk_accuracy(logits, labels, ks=(1, 2)) == {"top1": 50.0, "top2": 75.0}
    assert topk_accuracy(logits, labels)["top5"] == 100.0


def brute_force_knn(train, train_labels, queries, num_classes, k, temperature):
    """Plain loops: sort every training sample by cosine similarity, sum the top k's votes."""
    train = F.normalize(train, dim=1)
    votes = torch.zeros(len(queries), num_classes)
    for q, query in enumerate(F.normalize(queries, dim=1)):
        similarities = [float(query @ row) for row in train]
        for i in sorted(range(len(train)), key=lambda i: -similarities[i])[:k]:
            votes[q, int(train_labels[i])] += torch.exp(torch.tensor(similarities[i] / temperature))
    return votes


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_knn_matches_brute_force(chunk: int) -> None:
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(53, 12, generator=generator)
    train_labels = torch.randint(0, 5, (53,), generator=generator)
    queries = torch.randn(17, 12, generator=generator) * 4
    query_labels = torch.randint(0, 5, (17,), generator=generator)
    votes = brute_force_knn(train, train_labels, queries, 5, k=20, temperature=0.07)
    scores = knn_scores(train, train_labels, queries, 5, k=20, temperature=0.07, chunk=chunk)
    expected = votes.argmax(dim=1)
    assert torch.equal(scores.argmax(dim=1), expected)
    torch.testing.assert_close(scores, votes, rtol=1e-5, atol=0)
    accuracy = 100.0 * (expected == query_labels).float().mean().item()
    correct = knn_correct(train, train_labels, queries, query_labels, 5, chunk=chunk)
    assert 100.0 * correct.float().mean().item() == pytest.approx(accuracy)
    # k larger than the training set: every sample votes.
    everything = knn_scores(train[:5], train_labels[:5], queries, 5, k=20, chunk=chunk)
    torch.testing.assert_close(
        everything,
        brute_force_knn(train[:5], train_labels[:5], queries, 5, 5, 0.07),
        rtol=1e-5,
        atol=0,
    )


def test_pooled_stages_equal_a_manual_torchvision_forward() -> None:
    torch.manual_seed(0)
    resnet = torchvision_resnet("resnet18", small_input=True).eval()
    for module in resnet.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(3, 3, 32, 32)
    pooled = PooledStages(resnet, ["res5", "res2", "res3", "res4"])
    with torch.no_grad():
        outputs = pooled(images)
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        for stage, layer in zip(
            STAGES, [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4], strict=True
        ):
            x = layer(x)
            torch.testing.assert_close(outputs[stage], x.mean(dim=(2, 3)))
        resnet.fc = torch.nn.Identity()
        torch.testing.assert_close(outputs["res5"], resnet(images))
    assert list(outputs) == STAGES
    assert pooled.channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}
    shallow = PooledStages(torchvision.models.resnet50(), ["res3"])
    assert len(shallow.layers) == 2 and shallow.channels == {"res3": 512}
    pooled.train()
    assert not pooled.training and not any(p.requires_grad for p in pooled.parameters())


def test_features_are_extracted_once_per_sample_over_two_ranks(data: Path) -> None:
    resnet, _ = load_backbone(str(data / "backbone.pt"))
    model = PooledStages(resnet, ["res2", "res5"])
    transform = EvalTransform(16, 18)
    cpu = torch.device("cpu")
    for split, shards in (("train", 3), ("val", 1)):  # dealt whole (2 + 1); split by sample
        manifest = load_split(str(data / "shards"), split)
        assert len(manifest.shards) == shards
        single = extract_features(model, manifest, transform, 16, 0, cpu, report=False)
        parts = [
            extract_features(model, manifest, transform, 16, 0, cpu, rank, 2, report=False)
            for rank in range(2)
        ]
        assert all(len(part) > 0 for part in parts)
        joined = torch.cat([part.features["res5"] for part in parts])
        joined_labels = torch.cat([part.labels for part in parts])
        assert len(single) == manifest.num_samples == joined.shape[0]
        # Each of the ranks' rows is exactly one of the single pass's rows: a permutation.
        match = torch.cdist(joined, single.features["res5"]).argmin(dim=1)
        assert sorted(match.tolist()) == list(range(manifest.num_samples))
        torch.testing.assert_close(joined, single.features["res5"][match])
        assert torch.equal(joined_labels, single.labels[match])


def test_fast_probe_end_to_end(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(data, tmp_path / "fast", stages=["res5", "res3"], cache_features=True)
    metrics = linear_probe(config)
    written = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["protocol"] == "fast" and written["arch"] == "resnet18"
    assert list(written["stages"]) == ["res3", "res5"]
    assert (written["num_train"], written["num_val"]) == (72, 24)
    assert len(written["classes"]) == 6
    for stage, result in written["stages"].items():
        assert set(result) == {"top1", "top5", "knn_top1"}
        assert all(0.0 <= value <= 100.0 for value in result.values())
        assert result["top5"] >= result["top1"]
        assert written["scalars"][f"probe_top1_{stage}"] == result["top1"]
        assert written["scalars"][f"knn_top1_{stage}"] == result["knn_top1"]
    assert written["scalars"]["probe_top1"] == written["stages"]["res5"]["top1"]
    # Which val images each stage got right, for a paired test against another backbone: the
    # bits add up to the accuracies, and the labels' order identifies the images.
    evidence = read_per_image(str(tmp_path / "fast"))
    assert evidence is not None and evidence.images == 24
    assert set(evidence.correct) == {
        f"{k}_{s}" for k in ("probe_top1", "knn_top1") for s in ("res3", "res5")
    }
    for stage, result in written["stages"].items():
        assert 100 * evidence.correct[f"probe_top1_{stage}"].mean() == pytest.approx(result["top1"])
        assert 100 * evidence.correct[f"knn_top1_{stage}"].mean() == pytest.approx(
            result["knn_top1"]
        )
    # A rerun reads the cached features and reproduces the numbers.
    with caplog.at_level(logging.INFO, logger="ladder_siam.evals.probe.linear_probe"):
        assert linear_probe(config)["stages"] == metrics["stages"]
    assert sum("read from" in message for message in caplog.messages) == 2
    again = read_per_image(str(tmp_path / "fast"))
    assert again is not None and again.order == evidence.order


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train", "{coco}", "--val", "{coco}"], "needs imagefolder shards"),
        (["--stages", "res2,res6"], "unknown stage res6"),
        (["--backbone", "{missing}"], "missing.pt"),
    ],
)
def test_cli_rejects_bad_input_before_work(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, flags: list[str], message: str
) -> None:
    paths = {"coco": str(data / "coco"), "missing": str(tmp_path / "missing.pt")}
    base = {"--backbone": str(data / "backbone.pt"), "--train": str(data / "shards"),
            "--val": str(data / "shards")}  # fmt: skip
    base.update(zip(flags[::2], (flag.format(**paths) for flag in flags[1::2]), strict=True))
    argv = ["linear-probe", "--preset", "tiny", "--out", str(tmp_path / "out")]
    argv += [item for pair in base.items() for item in pair]
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv) == 2
    assert any(message in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_standard_protocol_resumes_exactly(data: Path, tmp_path: Path) -> None:
    straight = tiny_config(data, tmp_path / "straight", protocol="standard", max_steps=4,
                           batch_size=16, log_every=2, checkpoint_every=2)  # fmt: skip
    metrics = linear_probe(straight)
    assert list(metrics["stages"]) == ["res5"] and set(metrics["stages"]["res5"]) == {
        "top1",
        "top5",
    }
    assert 0.0 <= metrics["scalars"]["probe_top1"] <= 100.0
    assert (tmp_path / "straight" / "metrics.json").exists()

    halves = dataclasses.replace(straight, out=str(tmp_path / "halves"), max_steps=2)
    linear_probe(halves)
    assert [step for step, _ in checkpoint.list_checkpoints(halves.out)] == [2]
    linear_probe(dataclasses.replace(halves, max_steps=4))
    final = {out: checkpoint.load_latest(out) for out in (straight.out, halves.out)}
    assert all(loaded is not None and loaded.step == 4 for loaded in final.values())
    for name, tensor in final[straight.out].state["heads"].items():
        assert torch.equal(tensor, final[halves.out].state["heads"][name]), name
    # One record per log interval, the same in both runs.
    logs = [read_train_log(out) for out in (straight.out, halves.out)]
    assert [record["step"] for record in logs[0]] == [2, 4]
    for one, other in zip(*logs, strict=True):
        assert one["loss_res5"] == other["loss_res5"] and one["loss"] == one["loss_res5"]
    with pytest.raises(ResumeError, match=r"cannot resume from step 4.*base_lr"):
        linear_probe(dataclasses.replace(halves, base_lr=1.0))


def test_a_re_exported_backbone_does_not_resume_the_standard_probe(
    data: Path, tmp_path: Path
) -> None:
    backbone = tmp_path / "backbone.pt"
    shutil.copy(data / "backbone.pt", backbone)
    config = tiny_config(data, tmp_path / "probe", protocol="standard", max_steps=1, batch_size=16)
    config = dataclasses.replace(config, backbone=str(backbone))
    linear_probe(config)
    reexport(backbone)  # same path, new bytes: the heads were trained on the old features
    with pytest.raises(ResumeError, match="backbone changed since the checkpoint"):
        linear_probe(config)
