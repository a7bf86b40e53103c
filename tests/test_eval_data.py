"""Exactly-once evaluation reading and backbone loading checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ladder_siam.data.manifest import ManifestError, load_split
from ladder_siam.data.shards import DecodedSample
from ladder_siam.data.splits import SplitReader, make_eval_loader
from ladder_siam.nets.backbone_file import describe, load_backbone
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("eval")
    make_demo_data(str(root / "raw"), images=53, size=32, val_fraction=0.0)
    prepare_shards(str(root / "raw" / "imagefolder"), str(root / "shards"), shard_size=10)
    return str(root / "shards")


def key_of(sample: DecodedSample) -> int:
    return int(sample.key)


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 2), (3, 1), (4, 2)])
def test_every_sample_is_read_exactly_once(shards: str, world_size: int, workers: int) -> None:
    manifest = load_split(shards)
    keys: list[int] = []
    for rank in range(world_size):
        reader = SplitReader(manifest, 4, key_of, rank=rank, world_size=world_size)
        keys += [k for batch in make_eval_loader(reader, workers) for k in batch.tolist()]
    assert sorted(keys) == list(range(manifest.num_samples)) and len(keys) == 53


def test_layout_is_checked_before_work(shards: str) -> None:
    with pytest.raises(ManifestError, match="needs coco shards"):
        load_split(shards).require_layout("coco")


def test_backbone_arch_is_read_off_the_weights(tmp_path: Path) -> None:
    for arch, small in (("resnet18", True), ("resnet50", False)):
        state = LadderSiam(
            arch, "---G", hidden_dim=8, projection_dim=8, small_input=small
        ).backbone_state_dict()
        torch.save(state, tmp_path / f"{arch}.pt")
        model, info = load_backbone(str(tmp_path / f"{arch}.pt"))
        assert (info.arch, info.small_input) == (arch, small)
        assert torch.equal(model.conv1.weight, state["conv1.weight"])
    with pytest.raises(ValueError, match="is a resnet18, but resnet50 was requested"):
        load_backbone(str(tmp_path / "resnet18.pt"), arch="resnet50")
    with pytest.raises(ValueError, match="not a supported ResNet"):
        describe({"weight": torch.zeros(1)}, "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: not a loadable state_dict"):
        load_backbone(str(tmp_path / "junk.pt"))
