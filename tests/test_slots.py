"""The (rank, worker) slots partition a split: disjoint shares that together cover it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ladder_siam.data.manifest import ShardEntry, SplitManifest
from ladder_siam.data.shards import DecodedSample, ShardDataset, make_loader
from ladder_siam.data.slots import slot_share
from ladder_siam.data.splits import SplitReader, make_eval_loader
from ladder_siam.data.tar_shards import Sample, ShardWriter


def write_split(folder: Path, sizes: list[int]) -> SplitManifest:
    """Shards of the given sizes whose samples are keyed 0, 1, 2... in manifest order."""
    pixels = io.BytesIO()
    Image.new("RGB", (2, 2)).save(pixels, format="JPEG")
    folder.mkdir()
    entries, key = [], 0
    for index, size in enumerate(sizes):
        name = f"shard-{index:03d}.tar"
        with (folder / name).open("wb") as stream:
            writer = ShardWriter(stream)
            for _ in range(size):
                writer.write({"__key__": f"{key:06d}", "jpg": pixels.getvalue()})
                key += 1
            writer.close()
        entries.append(ShardEntry(name, size, writer.bytes, writer.sha256))
    return SplitManifest("train", "imagefolder", [], sum(sizes), entries, location=str(folder))


def decoded_key(sample: DecodedSample) -> int:
    return int(sample.key)


def raw_key(sample: Sample) -> int:
    return int(sample["__key__"])


# (shard sizes, ranks, loader workers, training batch size). The training epoch covers the
# split only when every slot's share is a whole number of its batches: with uneven shares a
# slot runs into the next shuffle round instead (equal length beats exactly once there), so
# those cases check the evaluation reader only (batch size None).
CASES = [
    ([5] * 8, 2, 2, 5),  # shards dealt out whole, two per slot
    ([3] * 6, 3, 2, 3),  # as many shards as slots
    ([4, 4, 4], 2, 2, 3),  # fewer shards than slots: every 4th sample
    ([12], 3, 1, 2),  # one shard, three ranks
    ([7, 3, 6, 1, 9], 2, 1, None),  # uneven shards dealt out whole
    ([5, 0, 2], 4, 1, None),  # fewer shards than slots, one of them empty
    ([2, 9, 4, 4, 1, 8, 3], 3, 2, None),
]


@pytest.mark.parametrize(("sizes", "world_size", "workers", "batch_size"), CASES)
def test_the_ranks_read_disjoint_shares_that_cover_the_split(
    tmp_path: Path, sizes: list[int], world_size: int, workers: int, batch_size: int | None
) -> None:
    manifest = write_split(tmp_path / "split", sizes)
    every_key = list(range(sum(sizes)))
    evaluated = []
    for rank in range(world_size):
        reader = SplitReader(manifest, 2, decoded_key, rank=rank, world_size=world_size)
        evaluated.append([k for batch in make_eval_loader(reader, workers) for k in batch.tolist()])
    assert sorted(k for keys in evaluated for k in keys) == every_key
    if batch_size is None:
        return
    trained = []
    for rank in range(world_size):
        dataset = ShardDataset(
            manifest, batch_size, raw_key, rank, world_size, shuffle=False, decode=False
        )
        trained.append({k for batch in make_loader(dataset, workers) for k in batch.tolist()})
    assert sorted(k for keys in trained for k in keys) == every_key  # disjoint and complete
    # Both read through the same partition: each rank trains on the samples it evaluates.
    assert trained == [set(keys) for keys in evaluated]


def test_whole_shards_or_every_slots_th_sample_across_shard_boundaries() -> None:
    shards = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    whole = [list(slot_share(shards, slot, 2, iter)) for slot in range(2)]
    assert whole == [[0, 1, 2, 5, 6, 7, 8], [3, 4]]
    strided = [list(slot_share(shards, slot, 4, iter)) for slot in range(4)]
    assert strided == [[0, 4, 8], [1, 5], [2, 6], [3, 7]]
