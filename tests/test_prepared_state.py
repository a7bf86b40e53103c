"""What a prepared dataset folder holds after a rerun: all of the source, intact, and no more.

A folder that cannot be listed fails the step instead of vanishing from the dataset; a rerun
hashes again every shard written since its receipt and rewrites one damaged in place, and a
reader that finds one names the command that does so; a split that left the source leaves
the destination too, and a stale copy of one is refused rather than read.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import ManifestError, load_split
from ladder_siam.data.shards import (
    DecodedSample,
    ShardDataset,
    ShardIntegrityError,
    read_shard,
)
from ladder_siam.data.splits import SplitReader
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), images=24, size=32)
    return root / "imagefolder"


@pytest.fixture
def source(demo: Path, tmp_path: Path) -> Path:
    """A copy of the demo imagefolder the test may change, in a folder with a space."""
    copy = tmp_path / "raw data" / "imagefolder"
    shutil.copytree(demo, copy)
    return copy


def key(sample: DecodedSample) -> str:
    """A transform that keeps only the sample's key."""
    return sample.key


@contextmanager
def unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Makes ``folder`` unlistable: chmod 000, or for root (whom modes do not stop) a denial."""
    if os.geteuid() != 0:
        folder.chmod(0)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    scandir = os.scandir

    def denying(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == str(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", denying)
        yield


def test_a_class_folder_that_cannot_be_listed_fails_the_step_naming_it(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "shards"
    denied = source / "train" / "ring"
    argv = ["prepare-shards", "--source", str(source), "--dest", str(dest), "--shard-size", "5"]
    with unreadable(denied, monkeypatch):
        assert cli(argv) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"{denied}: cannot list: Permission denied" in errors[0]
    assert not (dest / "manifest.json").exists(), "nothing committed"

    caplog.clear()
    assert cli(argv) == 0
    assert "ring" in load_split(str(dest), "train").classes
    total = sum(load_split(str(dest), split).num_samples for split in ("train", "val"))
    assert total == 24, "every image, the once-unreadable folder's included"


def test_a_rerun_writes_again_a_shard_damaged_at_the_same_size(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "shards"
    prepare_shards(str(source), str(dest), shard_size=5)
    split = load_split(str(dest / "train"))
    damaged, intact = (dest / "train" / shard.uri for shard in split.shards[:2])
    original = damaged.read_bytes()
    intact_written = intact.stat().st_mtime_ns
    data = bytearray(original)
    data[700] ^= 0xFF  # inside the first image's JPEG bytes: same size, the tar still parses
    damaged.write_bytes(bytes(data))

    prepare_shards(str(source), str(dest), shard_size=5)
    assert damaged.read_bytes() == original
    assert intact.stat().st_mtime_ns == intact_written, "an intact shard is kept"
    [warning] = [r.getMessage() for r in caplog.records if "altered" in r.getMessage()]
    assert str(damaged) in warning
    assert hashlib.sha256(data).hexdigest() in warning and split.shards[0].sha256 in warning
    split = load_split(str(dest / "train"))
    for uri, shard in zip(split.shard_uris(), split.shards, strict=True):
        assert sum(1 for _ in read_shard(uri, shard.sha256)) == shard.num_samples


def test_a_split_gone_from_the_source_is_removed_from_dest_and_a_stale_copy_refused(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(source / "val", source / "test")
    dest = tmp_path / "shards"
    prepare_shards(str(source), str(dest), shard_size=5)
    unrecorded = dest / "notes" / "readme.txt"
    unrecorded.parent.mkdir()
    unrecorded.write_text("not written by prepare-shards")
    saved = tmp_path / "saved" / "test"
    shutil.copytree(dest / "test", saved)

    shutil.rmtree(source / "test")
    prepare_shards(str(source), str(dest), shard_size=5)
    assert not (dest / "test").exists()
    assert unrecorded.exists() and (dest / "train" / "manifest.json").exists()
    assert any("removed split 'test'" in r.getMessage() for r in caplog.records)
    with pytest.raises(ManifestError, match="has no split 'test'"):
        load_split(str(dest), "test")

    # A copy of the old split put back beside the re-prepared dataset is refused, also where
    # an evaluation names the split's folder; on its own, away from any dataset, it still loads.
    shutil.copytree(saved, dest / "test")
    with pytest.raises(ManifestError, match=rf"stale split: the dataset prepared at {dest} no "):
        load_split(str(dest / "test"), "val")
    with pytest.raises(ManifestError, match="stale split"):
        load_split(str(dest / "test" / "manifest.json"))
    assert load_split(str(saved)).num_samples == load_split(str(dest), "val").num_samples


def test_a_damaged_shard_names_the_command_that_repairs_it(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    options = ["--shard-size", "5", "--seed", "3", "--max-side", "24"]
    assert cli(["prepare-shards", "--source", str(source), "--dest", str(dest), *options]) == 0
    split = load_split(str(dest / "train"))
    shard = dest / "train" / split.shards[0].uri
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))

    command = split.repair_command()
    assert command is not None
    epoch = ShardDataset(split, batch_size=split.num_samples, transform=key, shuffle=False)
    with pytest.raises(ShardIntegrityError) as error:
        list(epoch)
    assert f"`{command}`" in str(error.value)
    with pytest.raises(ShardIntegrityError) as error:
        list(SplitReader(split, batch_size=4, transform=key, collate=list))
    assert f"`{command}`" in str(error.value) and str(shard) in str(error.value)

    program, *argv = shlex.split(command)
    assert program == "ladder-siam" and argv[argv.index("--source") + 1] == str(source)
    assert cli(argv) == 0
    split = load_split(str(dest / "train"))
    keys = [
        k for batch in SplitReader(split, batch_size=4, transform=key, collate=list) for k in batch
    ]
    assert len(keys) == split.num_samples
