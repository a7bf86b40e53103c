"""prepare-shards in parts: N part runs and a committing run give the one-go dataset's bytes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from ladder_siam.cli import main as cli_main
from ladder_siam.data.manifest import MANIFEST_NAME
from ladder_siam.io import storage
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import RECEIPTS, prepare_shards

# Layout -> its folder in the demo tree; flat reads the COCO image folder, unlabelled.
SOURCES = {"imagefolder": "imagefolder", "coco": "coco", "voc": "voc", "flat": "coco/images"}
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), images=30, size=32)
    return root


def _files(root: Path) -> dict[str, Any]:
    """Every file's bytes; a receipt's content without its version tag, which records when
    its shard was written (an mtime here), not what the shard holds."""
    files: dict[str, Any] = {}
    for path in (p for p in root.rglob("*") if p.is_file()):
        files[str(path.relative_to(root))] = path.read_bytes()
        if RECEIPTS in path.parts:
            receipt = json.loads(path.read_bytes())
            assert receipt.pop("version"), path
            files[str(path.relative_to(root))] = receipt
    return files


@pytest.mark.parametrize("layout", sorted(SOURCES))
def test_parts_then_a_plain_run_give_the_bytes_of_one_run(
    layout: str,
    demo_tree: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = str(demo_tree / SOURCES[layout])
    whole = prepare_shards(source, str(tmp_path / "whole"), layout, shard_size=SHARD_SIZE)
    shard_count = sum(summary.num_shards for summary in whole.splits.values())
    assert shard_count > 3, "each part must get several shards"

    parts = tmp_path / "parts"
    # Any order: a part's shards depend on the plan only, never on the parts run before it.
    for index in (3, 1, 2):
        assert (
            prepare_shards(source, str(parts), layout, shard_size=SHARD_SIZE, part=(index, 3))
            is None
        )
    assert not list(parts.rglob(MANIFEST_NAME)), "a part commits nothing"
    shards = sorted(parts.rglob("shard-*.tar"))
    assert len(shards) == shard_count
    written = {shard: shard.stat().st_mtime_ns for shard in shards}

    caplog.clear()
    # The committing run trusts the parts' shards by their version tags: it reads none of
    # them again, so its cost does not grow with the dataset's bytes.
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="ladder_siam"):
        patch.setattr(storage, "sha256", lambda uri: pytest.fail(f"{uri} was read again"))
        committed = prepare_shards(source, str(parts), layout, shard_size=SHARD_SIZE)
    assert f"resuming: {shard_count} of {shard_count} shards are already complete" in caplog.text
    assert {shard: shard.stat().st_mtime_ns for shard in shards} == written, "none written again"
    assert committed.splits == whole.splits
    assert _files(parts) == _files(tmp_path / "whole"), "every shard, receipt and manifest"


def test_parts_split_the_plan_evenly_and_a_plain_run_writes_what_a_part_left_undone(
    demo_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ladder_siam")
    source, dest = str(demo_tree / "imagefolder"), tmp_path / "out"
    arguments = ["prepare-shards", "--source", source, "--dest", str(dest)]
    arguments += ["--shard-size", str(SHARD_SIZE)]
    counts = []
    for index in (1, 2):
        before = set(dest.rglob("shard-*.tar"))
        assert cli_main([*arguments, "--part", f"{index}/3"]) == 0
        counts.append(len(set(dest.rglob("shard-*.tar")) - before))
    assert not list(dest.rglob(MANIFEST_NAME))
    assert max(counts) - min(counts) <= 1, "every N-th shard: balanced parts"
    assert "run prepare-shards without --part" in caplog.text

    caplog.clear()
    assert cli_main(arguments) == 0, "part 3 never ran: the plain run writes its shards"
    done = sum(counts)
    total = len(list(dest.rglob("shard-*.tar")))
    assert f"resuming: {done} of {total} shards are already complete" in caplog.text
    assert (dest / MANIFEST_NAME).exists()


@pytest.mark.parametrize("part", ["0/4", "5/4", "a/b", "3", "1/0", "-1/4", "1/4/2", ""])
def test_a_bad_part_fails_in_one_line(
    part: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arguments = ["prepare-shards", "--source", str(tmp_path), "--dest", str(tmp_path / "out")]
    assert cli_main([*arguments, f"--part={part}"]) == 2
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert f"--part {part}: expected I/N with 1 <= I <= N" in errors[0].getMessage()
    assert not (tmp_path / "out").exists()


def test_only_the_plain_run_removes_a_split_that_left_the_source(
    demo_tree: Path, tmp_path: Path
) -> None:
    source, dest = tmp_path / "source", tmp_path / "out"
    shutil.copytree(demo_tree / "imagefolder", source)
    prepare_shards(str(source), str(dest), shard_size=SHARD_SIZE)
    shutil.rmtree(source / "val")
    for index in (1, 2):
        prepare_shards(str(source), str(dest), shard_size=SHARD_SIZE, part=(index, 2))
    assert (dest / "val" / MANIFEST_NAME).exists(), "a part leaves the committed dataset alone"
    assert set(prepare_shards(str(source), str(dest), shard_size=SHARD_SIZE).splits) == {"train"}
    assert not (dest / "val").exists()
