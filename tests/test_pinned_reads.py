"""Pinned reads: prepare-shards reads each source object at the version it listed.

An object overwritten between the listing and its read must not slip into a shard under the
old listing's name: the step fails naming it, commits nothing, and a rerun lists it afresh.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pytest
from fault_proxy import Fault, FaultProxy
from PIL import Image
from storage_trees import upload_tree

from ladder_siam.data.manifest import load_split
from ladder_siam.data.tar_shards import iter_samples
from ladder_siam.io import storage
from ladder_siam.io.storage import ObjectChangedError
from ladder_siam.prep import prepare_shards as prepare_module
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.listing import SourceListing
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.prep.sources import fingerprint_source


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), images=24, size=32)
    return root


def _new_jpeg() -> bytes:
    """A baseline RGB JPEG unlike any demo image; prepare-shards stores such bytes as they are."""
    pixels = np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _stored_jpegs(dest: str, splits: list[str]) -> list[bytes]:
    jpegs = []
    for split in splits:
        for uri in load_split(storage.join(dest, split)).shard_uris():
            with storage.open_read(uri) as stream:
                jpegs.extend(sample["jpg"] for sample in iter_samples(stream))
    return jpegs


@pytest.mark.integration
def test_an_s3_object_replaced_before_its_read_fails_the_step_and_a_rerun_lists_it_afresh(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str, demo_tree: Path
) -> None:
    source, dest = f"{s3_bucket}/raw", f"{s3_bucket}/shards"
    upload_tree(demo_tree / "imagefolder", source)
    listed_fingerprint = fingerprint_source(source)[0]
    replaced = next(f.uri for f in storage.list_files(source) if f.uri.endswith(".jpg"))
    bucket, key = storage.split_s3(replaced)
    new_bytes = _new_jpeg()
    # Straight to moto, not through the proxy, as another writer would.
    moto = boto3.client("s3", endpoint_url=s3_endpoint)

    def overwrite() -> None:
        moto.put_object(Bucket=bucket, Key=key, Body=new_bytes)

    proxy.add(Fault("before", match=key, action=overwrite))

    with pytest.raises(ObjectChangedError, match=f"{replaced}: changed since it was listed") as err:
        prepare_shards(source, dest, shard_size=6)
    # moto answers If-Match with 412, as S3 does; the message names both versions.
    assert "PreconditionFailed" in str(err.value.__cause__)
    current = moto.head_object(Bucket=bucket, Key=key)["ETag"]  # quoted, as in the message
    assert f"-> {current})" in str(err.value)
    assert proxy.injected == [("before", "GET", f"/{bucket}/{key}")], "replaced at its read"
    assert not storage.exists(storage.join(dest, "manifest.json")), "nothing committed"

    dataset = prepare_shards(source, dest, shard_size=6)
    assert sum(split.num_samples for split in dataset.splits.values()) == 24
    assert all(split.num_skipped == 0 for split in dataset.splits.values())
    assert new_bytes in _stored_jpegs(dest, list(dataset.splits)), "the rerun read the new version"
    assert fingerprint_source(source)[0] != listed_fingerprint


def _touch(path: Path, content: bytes | None = None) -> None:
    """Rewrites ``path`` (with ``content``, or as it is) and moves its mtime a second on."""
    before = path.stat().st_mtime_ns
    path.write_bytes(path.read_bytes() if content is None else content)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.mark.parametrize(
    ("layout", "relative", "content", "workers"),
    [
        ("imagefolder", None, _new_jpeg(), 2),  # the first image; across the process pool
        ("voc", "SegmentationClass", None, 1),  # a mask, touched only
    ],
)
def test_a_local_file_changed_after_the_listing_fails_the_step_and_a_rerun_completes(
    layout: str,
    relative: str | None,
    content: bytes | None,
    workers: int,
    demo_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for path in sorted((demo_tree / layout).rglob("*")):
        if path.is_file():
            copy = source / path.relative_to(demo_tree / layout)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    folder = source / relative if relative else source
    changed = next(p for p in sorted(folder.rglob("*")) if p.suffix in (".jpg", ".png"))
    dest = str(tmp_path / "shards")
    original: Callable[[str, str], SourceListing] = prepare_module.list_source

    def list_then_change(uri: str, listed_layout: str) -> SourceListing:
        listing = original(uri, listed_layout)
        _touch(changed, content)
        return listing

    monkeypatch.setattr(prepare_module, "list_source", list_then_change)
    with pytest.raises(ObjectChangedError, match=f"{changed}: changed since it was listed"):
        prepare_shards(str(source), dest, layout=layout, shard_size=6, workers=workers)
    assert not (tmp_path / "shards" / "manifest.json").exists(), "nothing committed"

    monkeypatch.setattr(prepare_module, "list_source", original)
    dataset = prepare_shards(str(source), dest, layout=layout, shard_size=6, workers=workers)
    assert sum(split.num_samples for split in dataset.splits.values()) == 24
    assert all(split.num_skipped == 0 for split in dataset.splits.values())
    if content is not None:
        assert content in _stored_jpegs(dest, list(dataset.splits)), (
            "the rerun read the new version"
        )


def test_shards_never_land_under_a_fingerprint_the_source_no_longer_has(
    demo_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline names the dataset folder after its first step's fingerprint: a file added
    while the shards are written (read by nobody, so no pinned read notices) stops the commit."""
    source = tmp_path / "source"
    for path in sorted((demo_tree / "imagefolder").rglob("*.jpg")):
        copy = source / path.relative_to(demo_tree / "imagefolder")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    planned = fingerprint_source(str(source))[0]
    late = next(source.rglob("*.jpg")).parent / "late.jpg"
    original: Callable[[str, str], SourceListing] = prepare_module.list_source

    def list_then_add(uri: str, layout: str) -> SourceListing:
        listing = original(uri, layout)
        late.write_bytes(_new_jpeg())
        return listing

    monkeypatch.setattr(prepare_module, "list_source", list_then_add)
    dest = tmp_path / f"shards-{planned[:12]}"
    with pytest.raises(ObjectChangedError, match="changed since the run fingerprinted it"):
        prepare_shards(str(source), str(dest), shard_size=6, fingerprint=planned)
    assert not (dest / "manifest.json").exists(), "nothing committed under the old name"
    # A retry of the same step refuses before any work; the rerun's new fingerprint completes.
    monkeypatch.setattr(prepare_module, "list_source", original)
    with pytest.raises(ObjectChangedError, match=f"{planned[:12]} -> "):
        prepare_shards(str(source), str(dest), shard_size=6, fingerprint=planned)
    now = fingerprint_source(str(source))[0]
    dataset = prepare_shards(str(source), str(tmp_path / "new"), shard_size=6, fingerprint=now)
    assert sum(split.num_samples for split in dataset.splits.values()) == 25
