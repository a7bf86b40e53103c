"""The streaming loader: equal batch counts per rank, determinism, exact resume, S3."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from storage_trees import upload_tree
from system_tools import free_port, require_tool

from ladder_siam.data.manifest import load_split
from ladder_siam.data.shards import CenterCropResize, DecodedSample, ShardDataset, make_loader
from ladder_siam.prep.prepare_shards import prepare_shards

IMAGES = 45  # 7 shards of up to 7: an odd count, and the last one short


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        path = root / "source" / "train" / f"class{index % 3}" / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(40, 90, size=2)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    prepare_shards(str(root / "source"), str(root / "shards"), shard_size=7)
    return str(root / "shards")


class KeyAndNoise:
    """A transform with randomness, to check that random state is resumed exactly."""

    def __call__(self, sample: DecodedSample) -> tuple[int, torch.Tensor]:
        return int(sample.key), torch.rand(2)


def _batches(dataset: ShardDataset, workers: int) -> list[tuple[list[int], torch.Tensor]]:
    loader = make_loader(dataset, num_workers=workers, prefetch_factor=2)
    return [(keys.tolist(), noise) for keys, noise in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches(shards: str, workers: int) -> None:
    manifest = load_split(shards)
    assert len(manifest.shards) == 7
    counts = []
    for rank in range(2):
        dataset = ShardDataset(manifest, 4, KeyAndNoise(), rank=rank, world_size=2, seed=1)
        batches = _batches(dataset, workers)
        assert all(len(keys) == 4 for keys, _ in batches)
        counts.append(len(batches))
    assert counts == [IMAGES // (2 * 4)] * 2


def test_one_rank_epoch_covers_every_sample_once(shards: str) -> None:
    dataset = ShardDataset(load_split(shards), 1, KeyAndNoise(), rank=0, world_size=1, seed=3)
    keys = [key for batch, _ in _batches(dataset, 0) for key in batch]
    assert sorted(keys) == list(range(IMAGES))


def test_epochs_are_deterministic_and_differ(shards: str) -> None:
    def epoch(number: int, seed: int = 5) -> list[list[int]]:
        dataset = ShardDataset(load_split(shards), 4, KeyAndNoise(), 0, 1, seed=seed, buffer_size=8)
        dataset.set_epoch(number)
        return [keys for keys, _ in _batches(dataset, 2)]

    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)
    assert epoch(0) != epoch(0, seed=6)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("start", [1, 4, 7])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(shards: str, start: int) -> None:
    def run(start_batch: int) -> list[tuple[list[int], torch.Tensor]]:
        dataset = ShardDataset(load_split(shards), 4, KeyAndNoise(), 0, 1, seed=9, buffer_size=10)
        dataset.set_epoch(2, start_batch=start_batch)
        return _batches(dataset, 3)

    full, resumed = run(0), run(start)
    assert len(resumed) == len(full) - start
    for (keys, noise), (resumed_keys, resumed_noise) in zip(full[start:], resumed, strict=True):
        assert keys == resumed_keys
        assert torch.equal(noise, resumed_noise)


def test_center_crop_resize_and_reduced_decoding(shards: str) -> None:
    manifest = load_split(shards)
    dataset = ShardDataset(manifest, 5, CenterCropResize(32), 0, 1, decode_size=32)
    images, labels = next(iter(make_loader(dataset, num_workers=0)))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [label % 3 for label in labels.tolist()]


def test_too_small_a_split_fails_clearly(shards: str) -> None:
    with pytest.raises(
        ValueError, match=r"45 samples are fewer than one global batch \(2 ranks x 32\)"
    ):
        ShardDataset(load_split(shards), 32, KeyAndNoise(), rank=0, world_size=2)


@pytest.mark.integration
def test_streams_from_s3(shards: str, s3_bucket: str) -> None:
    upload_tree(Path(shards), f"{s3_bucket}/ds")
    local = ShardDataset(load_split(shards), 4, KeyAndNoise(), 0, 1, seed=2)
    remote = ShardDataset(load_split(f"{s3_bucket}/ds"), 4, KeyAndNoise(), 0, 1, seed=2)
    assert [k for k, _ in _batches(local, 2)] == [k for k, _ in _batches(remote, 2)]


@pytest.mark.integration
@pytest.mark.slow
def test_two_torchrun_ranks_with_uneven_shards_never_hang(shards: str, tmp_path: Path) -> None:
    """Each batch is followed by an all-reduce, as in DDP: unequal counts would hang."""
    torchrun = require_tool(str(Path(sys.executable).parent / "torchrun"))
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch, torch.distributed as dist
            from ladder_siam.data.shards import CenterCropResize, ShardDataset, make_loader
            from ladder_siam.data.manifest import load_split
            dist.init_process_group("gloo")
            dataset = ShardDataset(load_split({shards!r}), 3, CenterCropResize(16), seed=4)
            steps = 0
            for images, labels in make_loader(dataset, num_workers=2):
                total = torch.tensor([float(images.shape[0])])
                dist.all_reduce(total)
                steps += 1
            print(f"rank {{dist.get_rank()}} steps {{steps}}", flush=True)
            dist.destroy_process_group()
            """
        )
    )
    result = subprocess.run(
        [torchrun, "--nproc-per-node=2", f"--master-port={free_port()}", str(script)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    expected = str(IMAGES // (2 * 3))
    # The two ranks share stdout, so their lines may interleave.
    assert sorted(re.findall(r"rank (\d) steps (\d+)", result.stdout)) == [
        ("0", expected),
        ("1", expected),
    ]
