"""``ladder-siam artifacts``: listing and pulling a run's outputs, from S3 and from a folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ladder_siam.artifacts import list_run, pull
from ladder_siam.cli import main as cli
from ladder_siam.io import storage

# A run's layout; sizes differ so that a wrongly paired file would not compare equal.
RUN_FILES = {
    "backbone.pt": os.urandom(3000),
    "backbone.json": b'{"arch": "resnet18", "method": "DDGG"}',
    "train_log.jsonl": b'{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.5}\n',
    "checkpoints/step-000002.pt": os.urandom(5000),
    "eval/linear_probe/metrics.json": b'{"scalars": {"top1": 41.5}}',
    "eval/detection/metrics.json": b'{"scalars": {"bbox_ap": 12.0}}',
    "eval/segmentation/metrics.json": b'{"scalars": {"miou": 30.25}}',
    "report/index.html": b"<html></html>",
}
WITHOUT_CHECKPOINTS = sorted(p for p in RUN_FILES if not p.startswith("checkpoints/"))
EVAL_METRICS = sorted(p for p in RUN_FILES if p.startswith("eval/"))


def _write_run(run_uri: str) -> None:
    for path, data in RUN_FILES.items():
        storage.write_bytes(storage.join(run_uri, path), data)


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def s3_run(s3_bucket: str) -> str:
    run = storage.join(s3_bucket, "runs", "ddgg")
    _write_run(run)
    # A sibling whose name extends the run's: a plain key-prefix listing would take it in.
    storage.write_bytes(storage.join(s3_bucket, "runs", "ddgg-2", "backbone.pt"), b"other run")
    return run


@pytest.mark.integration
def test_list_gives_relative_paths_and_sizes(
    s3_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = list_run(s3_run + "/")
    assert [(f.path, f.size) for f in files] == sorted((p, len(d)) for p, d in RUN_FILES.items())
    assert all(f.uri == storage.join(s3_run, f.path) for f in files)

    assert cli(["artifacts", "list", s3_run]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [[str(f.size), f.path] for f in files]


@pytest.mark.integration
def test_pull_fetches_everything_but_checkpoints(s3_run: str, tmp_path: Path) -> None:
    dest = tmp_path / "run"
    assert cli(["artifacts", "pull", s3_run, "--to", str(dest)]) == 0
    assert _local_files(dest) == {p: RUN_FILES[p] for p in WITHOUT_CHECKPOINTS}
    assert not list(dest.rglob("*.tmp")), "no temporary files are left behind"


@pytest.mark.integration
def test_pull_fetches_checkpoints_when_asked(s3_run: str, tmp_path: Path) -> None:
    fetched = pull(s3_run, str(tmp_path), checkpoints=True, threads=3)
    assert fetched == sorted(RUN_FILES)
    assert _local_files(tmp_path) == RUN_FILES


@pytest.mark.integration
@pytest.mark.parametrize(
    ("only", "expected"),
    [
        (["backbone.pt"], ["backbone.pt"]),
        (["eval/"], EVAL_METRICS),
        (["eval/*/metrics.json", "backbone.json"], ["backbone.json", *EVAL_METRICS]),
        (["report"], ["report/index.html"]),
        # A glob never reaches checkpoints without --checkpoints.
        (["*.pt"], ["backbone.pt"]),
    ],
)
def test_pull_only(s3_run: str, tmp_path: Path, only: list[str], expected: list[str]) -> None:
    argv = ["artifacts", "pull", s3_run, "--to", str(tmp_path)]
    assert cli(argv + [arg for pattern in only for arg in ("--only", pattern)]) == 0
    assert sorted(_local_files(tmp_path)) == expected


@pytest.mark.integration
def test_rerun_skips_complete_files_and_refetches_wrong_sizes(s3_run: str, tmp_path: Path) -> None:
    assert pull(s3_run, str(tmp_path)) == WITHOUT_CHECKPOINTS
    # An interrupted copy made by other means, and a stale file from an older state of the run.
    (tmp_path / "backbone.pt").write_bytes(RUN_FILES["backbone.pt"][:100])
    (tmp_path / "train_log.jsonl").write_bytes(b"{}\n")
    old = 1_000_000_000
    kept = tmp_path / "eval/detection/metrics.json"
    os.utime(kept, (old, old))

    assert pull(s3_run, str(tmp_path)) == ["backbone.pt", "train_log.jsonl"]
    assert _local_files(tmp_path) == {p: RUN_FILES[p] for p in WITHOUT_CHECKPOINTS}
    assert kept.stat().st_mtime == old, "a complete file is not written again"
    assert pull(s3_run, str(tmp_path)) == []


@pytest.mark.integration
def test_run_without_files_is_an_error(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = storage.join(s3_bucket, "runs", "missing")
    assert cli(["artifacts", "pull", missing, "--to", str(tmp_path)]) == 2
    assert f"no files under {missing}, is this a run folder?" in caplog.text
    assert cli(["artifacts", "list", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in caplog.text
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_only_matching_nothing_is_an_error(s3_run: str, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("--only 'backbone.ckpt': matches nothing")
    ) as error:
        pull(s3_run, str(tmp_path), only=["backbone.pt", "backbone.ckpt"])
    top_level = "backbone.json, backbone.pt, checkpoints/, eval/, report/, train_log.jsonl"
    assert top_level in str(error.value)
    with pytest.raises(ValueError, match="add --checkpoints"):
        pull(s3_run, str(tmp_path), only=["checkpoints/"])
    assert not list(tmp_path.iterdir()), "nothing is fetched when a pattern is wrong"


@pytest.mark.integration
def test_pull_needs_a_destination(s3_run: str, caplog: pytest.LogCaptureFixture) -> None:
    assert cli(["artifacts", "pull", s3_run]) == 2
    assert "--to DIR is required" in caplog.text


def test_pull_from_a_local_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "ddgg"
    _write_run(str(run))
    dest = tmp_path / "copy"
    argv = ["artifacts", "pull", f"file://{run}", "--to", str(dest), "--checkpoints"]
    assert cli([*argv, "--log-level", "WARNING"]) == 0, "common options may follow the action"
    assert _local_files(dest) == RUN_FILES


@pytest.mark.integration
def test_a_key_that_climbs_out_of_the_run_is_refused(s3_bucket: str, tmp_path: Path) -> None:
    run = storage.join(s3_bucket, "runs", "odd")
    storage.write_bytes(storage.join(run, "backbone.pt"), b"weights")
    bucket, key = storage.split_s3(storage.join(run, "../../escape.txt"))
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"outside")
    with pytest.raises(ValueError, match="unsafe relative path"):
        pull(run, str(tmp_path / "dest"))
    assert not (tmp_path / "escape.txt").exists()


def test_a_run_with_arms_is_pulled_without_any_arms_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "sweep"
    files = {
        "arms/byol-s0/backbone.pt": b"b" * 10,
        "arms/byol-s0/checkpoints/step-000004.pt": b"c" * 20,
        "arms/ladder-byol-s0/backbone.pt": b"l" * 30,
        "arms/ladder-byol-s0/checkpoints/step-000004.pt": b"d" * 40,
        "report/summary.json": b"{}",
    }
    for path, data in files.items():
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_bytes(data)
    assert pull(str(run), str(tmp_path / "all")) == [
        "arms/byol-s0/backbone.pt", "arms/ladder-byol-s0/backbone.pt", "report/summary.json",
    ]  # fmt: skip
    assert pull(str(run), str(tmp_path / "backbones"), only=["arms/*/backbone.pt"]) == [
        "arms/byol-s0/backbone.pt", "arms/ladder-byol-s0/backbone.pt",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="add --checkpoints"):
        pull(str(run), str(tmp_path / "none"), only=["arms/byol-s0/checkpoints/"])
