"""Decoding on the training device: same views as the CPU loader, exact resume.

The device path runs here on the CPU (``decode_jpeg`` with libjpeg instead of nvjpeg), which
exercises the same code: its float resize against the CPU loader's uint8 kernel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ladder_siam.data.crops import TwoViewCrop
from ladder_siam.data.gpu_decode import JpegBatch, JpegTwoViews, collate_jpegs, decode_views
from ladder_siam.data.manifest import load_split
from ladder_siam.data.shards import ShardDataset, make_loader
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.prep.scenes import render_scene

# torchvision 0.29 deprecates its image codecs for TorchCodec's; decode_jpeg still works.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

CPU = torch.device("cpu")
SIZE = 32
IMAGES = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Demo scenes (sharp shape edges over photos) of assorted sizes, as real JPEGs."""
    root = tmp_path_factory.mktemp("gpu_decode")
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        width, height = (int(side) for side in rng.integers(40, 100, size=2))
        scene = render_scene(0, index, 100).image[:height, :width]
        path = root / "source" / "train" / "all" / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene).save(path, quality=90)
    prepare_shards(str(root / "source"), str(root / "shards"), shard_size=5)
    return str(root / "shards")


def _dataset(shards: str, on_device: bool, seed: int = 3) -> ShardDataset:
    crop = TwoViewCrop(SIZE)
    if on_device:
        transform, collate = JpegTwoViews(crop), collate_jpegs
        return ShardDataset(
            load_split(shards), 4, transform, 0, 1, seed, collate=collate, decode=False
        )
    return ShardDataset(load_split(shards), 4, crop.from_jpeg, 0, 1, seed, decode=False)


def _device_views(batches: list[JpegBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [decode_views(batch, SIZE, CPU) for batch in batches]


def test_device_views_match_the_cpu_loaders(shards: str) -> None:
    cpu = list(make_loader(_dataset(shards, on_device=False), num_workers=2))
    device = _device_views(list(make_loader(_dataset(shards, on_device=True), num_workers=2)))
    assert len(cpu) == len(device) == IMAGES // 4
    differences = []
    for cpu_views, device_views in zip(cpu, device, strict=True):
        for ours, theirs in zip(cpu_views, device_views, strict=True):
            assert ours.shape == theirs.shape == (4, 3, SIZE, SIZE)
            assert ours.dtype == theirs.dtype == torch.uint8
            differences.append((ours.int() - theirs.int()).abs())
    difference = torch.stack(differences)
    # Same decoder, same filter: only the float vs fixed-point rounding differs.
    assert difference.max() <= 1
    assert difference.float().mean() < 0.05


def test_batches_hold_the_bytes_and_the_crops(shards: str) -> None:
    batch = next(iter(make_loader(_dataset(shards, on_device=True), num_workers=0)))
    assert isinstance(batch, JpegBatch)
    assert batch.data.dtype == torch.uint8 and batch.lengths.sum() == batch.data.numel()
    starts = torch.cumsum(batch.lengths, 0) - batch.lengths
    assert all(bytes(batch.data[s : s + 2].tolist()) == b"\xff\xd8" for s in starts.tolist())
    assert batch.views.shape == (4, 2, 5)
    assert bool((batch.views[..., 2:4] > 0).all())
    assert set(batch.views[..., 4].flatten().tolist()) <= {0, 1}


@pytest.mark.parametrize("start", [1, 4])
def test_resume_yields_the_same_device_batches(shards: str, start: int) -> None:
    def run(start_batch: int) -> list[JpegBatch]:
        dataset = _dataset(shards, on_device=True, seed=9)
        dataset.set_epoch(1, start_batch=start_batch)
        return list(make_loader(dataset, num_workers=2, prefetch_factor=2))

    full, resumed = run(0), run(start)
    assert len(resumed) == len(full) - start
    for ours, theirs in zip(full[start:], resumed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    for ours, theirs in zip(_device_views(full[start:]), _device_views(resumed), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_flipped_views_are_mirror_images(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    jpeg = (tmp_path / "a.jpg").read_bytes()
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    box = [4, 6, 30, 40]
    views = torch.tensor([[[*box, 0], [*box, 1]]])
    batch = JpegBatch(data, torch.tensor([len(jpeg)]), views)
    view_a, view_b = decode_views(batch, 16, CPU, mode="bilinear")
    assert view_a.shape == (1, 3, 16, 16)
    assert torch.equal(view_a.flip(-1), view_b)
