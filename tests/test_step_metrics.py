"""The short batch steps push their results to a real Pushgateway when one is configured."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.samples import Sample
from prometheus_servers import pushgateway_server, sample_value, scrape

from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import load_split
from ladder_siam.kube.steps import record_status
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.runtime.run_folder import PIPELINE_STATUS

COUNTS = ("shards", "shards_written", "samples", "samples_skipped")
# What a group of the Pushgateway may be told apart by: its namespace and run (a dataset's
# folder name for shards), a layout and a split; never a URI.
ALLOWED_LABELS = {"job", "instance", "namespace", "run", "layout", "split"}

pytestmark = pytest.mark.integration  # every test pushes to a real Pushgateway


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pushgateway_server(tmp_path_factory.mktemp("pushgateway")) as url:
        yield url


def _pushed(pushgateway: str, job: str) -> list[Sample]:
    samples = scrape(f"{pushgateway}/metrics")
    return [s for s in samples if s.name.startswith("ladder_siam_") and s.labels["job"] == job]


def _counts(samples: list[Sample], split: str) -> dict[str, float | None]:
    labels = {"job": "prepare-shards", "layout": "imagefolder", "split": split}
    return {name: sample_value(samples, f"ladder_siam_{name}", **labels) for name in COUNTS}


def test_prepare_shards_pushes_the_manifest_counts(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    raw, dest = tmp_path / "raw", tmp_path / "shards"
    make_demo_data(str(raw), images=10, size=32)
    (raw / "imagefolder" / "train" / "ring" / "broken.jpg").write_bytes(b"not an image")
    argv = ["prepare-shards", "--source", str(raw / "imagefolder"), "--dest", str(dest)]
    assert cli([*argv, "--shard-size", "3"]) == 0

    samples = _pushed(pushgateway, "prepare-shards")
    assert {name for s in samples for name in s.labels} <= ALLOWED_LABELS
    # Grouped by the dataset (its folder), which the runs that share it share.
    assert sample_value(samples, "ladder_siam_shards", run="shards", split="train") == 3
    for split in ("train", "val"):
        manifest = load_split(str(dest / split))
        assert _counts(samples, split) == {
            "shards": len(manifest.shards),
            "shards_written": len(manifest.shards),
            "samples": manifest.num_samples,
            "samples_skipped": len(manifest.skipped),
        }
        labels = {"job": "prepare-shards", "split": split}
        assert sample_value(samples, "ladder_siam_prepare_duration_seconds", **labels) > 0
        success = sample_value(samples, "ladder_siam_job_last_success_timestamp_seconds", **labels)
        assert success == pytest.approx(time.time(), abs=60)
    # The manifest agrees with what went in: 8 valid train images and the broken one.
    train = {"shards": 3, "shards_written": 3, "samples": 8, "samples_skipped": 1}
    assert _counts(samples, "train") == train

    # A rerun reuses every shard: the same dataset, nothing written.
    assert cli([*argv, "--shard-size", "3"]) == 0
    rerun = _counts(_pushed(pushgateway, "prepare-shards"), "train")
    assert rerun == {**train, "shards_written": 0}


@pytest.mark.slow
def test_report_pushes_the_number_of_runs(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        log = [{"step": step, "epoch": 0, "loss": 4.0 / step} for step in (1, 2)]
        (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        runs.append(str(run))
    assert cli(["report", "--runs", *runs, "--out", str(tmp_path / "report")]) == 0

    samples = _pushed(pushgateway, "report")
    assert sample_value(samples, "ladder_siam_report_runs", run="report") == 2
    assert {name for s in samples for name in s.labels} <= ALLOWED_LABELS


def test_the_exit_handler_records_the_outcome_and_keeps_the_last_success(
    pushgateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHGATEWAY_URL", pushgateway)
    record_status(str(tmp_path), "weekly", "kfp-run-1", "SUCCEEDED", "")
    succeeded_at = sample_value(
        _pushed(pushgateway, "pipeline"), "ladder_siam_job_last_success_timestamp_seconds"
    )
    status = record_status(str(tmp_path), "", "Weekly Run 2", "FAILED", "Task pretrain failed.")

    samples = _pushed(pushgateway, "pipeline")
    # One group per namespace, not per run: each run's outcome replaces the last, so the
    # failure alert clears on the next success of a scheduled pipeline.
    assert {s.labels.get("run") for s in samples} == {None}
    assert sample_value(samples, "ladder_siam_pipeline_succeeded") == 0
    # A failure adds its own timestamp and leaves the last success's for "stale" alerts.
    assert sample_value(samples, "ladder_siam_job_last_success_timestamp_seconds") == succeeded_at
    failed_at = sample_value(samples, "ladder_siam_job_last_failure_timestamp_seconds")
    assert failed_at is not None and failed_at >= succeeded_at
    written = json.loads((tmp_path / "runs" / "weekly-run-2" / PIPELINE_STATUS).read_text())
    assert written == status and written["error"] == "Task pretrain failed."
    assert json.loads((tmp_path / "runs" / "weekly" / PIPELINE_STATUS).read_text())["state"] == (
        "SUCCEEDED"
    )

    record_status(str(tmp_path), "weekly", "kfp-run-3", "SUCCEEDED", "")
    samples = _pushed(pushgateway, "pipeline")
    assert sample_value(samples, "ladder_siam_pipeline_succeeded") == 1
    assert sample_value(samples, "ladder_siam_job_last_failure_timestamp_seconds") is None
