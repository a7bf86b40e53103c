"""Faults: a flaky or denying S3 server (a proxy in front of moto), hostile inputs, dead servers.

Each test plays a fault a user or a network inflicts and checks that nothing is lost silently:
an I/O error fails the step naming what failed, a rerun completes the work, a damaged file is
named, and a hostile name never writes outside the destination.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from fault_proxy import Fault, FaultProxy
from storage_trees import upload_tree
from system_tools import free_port

from ladder_siam.artifacts import pull
from ladder_siam.cli import main as cli
from ladder_siam.data.manifest import ManifestError, load_split
from ladder_siam.data.shards import ShardIntegrityError, read_shard
from ladder_siam.data.splits import SplitReader
from ladder_siam.io import storage
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.runtime import resume
from ladder_siam.runtime.metrics import TrainingMetrics, push_job_metrics


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), images=24, size=32)
    return root


@pytest.mark.integration
@pytest.mark.slow
def test_a_denied_read_fails_prepare_shards_and_the_rerun_completes(
    proxy: FaultProxy, s3_bucket: str, demo_tree: Path
) -> None:
    source, dest = f"{s3_bucket}/raw", f"{s3_bucket}/shards"
    upload_tree(demo_tree / "imagefolder", source)
    denied = next(
        uri for uri in (f.uri for f in storage.list_files(source)) if uri.endswith(".jpg")
    )
    key = denied.removeprefix(f"{s3_bucket}/")
    proxy.add(Fault("status", match=key, status=403, code="AccessDenied", times=-1))

    with pytest.raises(OSError, match=key):
        prepare_shards(source, dest, shard_size=6)
    assert not storage.exists(storage.join(dest, "manifest.json")), "nothing committed"

    # A throttled server (503 SlowDown) is retried; once storage answers, nothing is missing.
    proxy.clear()
    proxy.add(Fault("status", match=".jpg", status=503, code="SlowDown", times=3))
    dataset = prepare_shards(source, dest, shard_size=6)
    assert sum(split.num_samples for split in dataset.splits.values()) == 24
    assert all(split.num_skipped == 0 for split in dataset.splits.values())
    assert sum(1 for kind, _, _ in proxy.injected if kind == "status") == 1 + 3


@pytest.mark.integration
def test_a_shard_read_reset_mid_body_resumes_at_the_right_byte(
    proxy: FaultProxy, s3_bucket: str, demo_tree: Path, tmp_path: Path
) -> None:
    prepare_shards(str(demo_tree / "imagefolder"), str(tmp_path / "shards"), shard_size=100)
    upload_tree(tmp_path / "shards", f"{s3_bucket}/shards")
    split = load_split(f"{s3_bucket}/shards/train")
    [uri] = split.shard_uris()
    expected = [s["__key__"] for s in read_shard(str(tmp_path / "shards/train/shard-000000.tar"))]

    proxy.add(Fault("reset", match="shard-000000.tar", after_bytes=5000, times=2))
    keys = [s["__key__"] for s in read_shard(uri, split.shards[0].sha256)]
    assert keys == expected, "every sample once, in order, and the checksum holds"
    ranged = [path for method, path in proxy.requests if method == "GET" and "shard-" in path]
    assert len(ranged) == 3, "the first read and two resumed at their offsets"


@pytest.mark.integration
@pytest.mark.slow
def test_artifacts_pull_fails_on_a_server_error_and_the_rerun_fetches_the_rest(
    proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    run = f"{s3_bucket}/runs/r1"
    files = {"backbone.pt": os.urandom(2000), "backbone.json": b"{}", "report/index.html": b"<p>"}
    for path, data in files.items():
        storage.write_bytes(storage.join(run, path), data)
    proxy.add(Fault("status", match="backbone.pt", status=500, code="InternalError", times=-1))
    with pytest.raises(OSError, match=r"backbone\.pt"):
        pull(run, str(tmp_path / "out"))
    assert not (tmp_path / "out/backbone.pt").exists(), "no half-written file"
    proxy.clear()
    pull(run, str(tmp_path / "out"))
    for path, data in files.items():
        assert (tmp_path / "out" / path).read_bytes() == data


def test_a_shard_altered_at_the_same_size_is_named_with_both_checksums(
    demo_tree: Path, tmp_path: Path
) -> None:
    prepare_shards(str(demo_tree / "imagefolder"), str(tmp_path), shard_size=100)
    split = load_split(str(tmp_path / "train"))
    shard = tmp_path / "train" / split.shards[0].uri
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image's JPEG bytes: the tar still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError) as error:
        list(SplitReader(split, batch_size=8, transform=lambda sample: sample.key, collate=list))
    assert str(shard) in str(error.value) and split.shards[0].sha256 in str(error.value)
    # The rerun that writes the shard again (it hashes every shard it keeps) is named.
    command = f"ladder-siam prepare-shards --source {demo_tree / 'imagefolder'} --dest {tmp_path}"
    assert f"`{command} --layout imagefolder --shard-size 100 --seed 0`" in str(error.value)

    shard.write_bytes(bytes(data[:20000]))
    with pytest.raises(ValueError, match=rf"{shard}: .*truncated"):
        list(read_shard(str(shard)))


def test_a_manifest_cannot_point_a_reader_outside_its_dataset(
    demo_tree: Path, tmp_path: Path
) -> None:
    prepare_shards(str(demo_tree / "imagefolder"), str(tmp_path), shard_size=100)
    manifest = tmp_path / "train" / "manifest.json"
    for hostile in ("/etc/hostname", "../../outside.tar"):
        data = json.loads(manifest.read_text())
        data["shards"][0]["uri"] = hostile
        manifest.write_text(json.dumps(data))
        with pytest.raises(ManifestError, match="would leave the folder"):
            load_split(str(tmp_path / "train")).shard_uris()


def test_a_split_named_by_a_hostile_file_name_writes_nothing_outside_dest(
    tmp_path: Path,
) -> None:
    source = tmp_path / "coco"
    (source / "annotations").mkdir(parents=True)
    # "instances_...json" would make the split "..": shards one level above the destination.
    image = {"id": 1, "file_name": "a.jpg", "width": 32, "height": 32}
    (source / "annotations" / "instances_...json").write_text(
        json.dumps({"images": [image], "annotations": [], "categories": []})
    )
    with pytest.raises(ValueError, match=r"split '\.\.'"):
        prepare_shards(str(source), str(tmp_path / "out" / "shards"), layout="coco")
    assert not (tmp_path / "out").exists()


def test_an_unknown_scheme_is_refused_naming_the_supported_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    make_demo_data(str(tmp_path / "raw"), images=8, size=32)
    status = cli(["prepare-shards", "--source", "raw/imagefolder", "--dest", "gs://bucket/x"])
    assert status == 2
    assert "--dest gs://bucket/x: unsupported scheme gs://; use s3://" in caplog.text
    assert not (tmp_path / "gs:").exists()


def test_an_unreachable_pushgateway_never_fails_a_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert push_job_metrics("prepare-shards", {"x": 1.0}, run="r1", gateway=gateway) is False
    assert "not pushed" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["pretrain", "--config", "{preset}", "--shards", "s", "--out", "o"],
            "epochs: 'two' is not an integer",
        ),
        (
            ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--params", "{params}"],
            "not valid YAML",
        ),
        (
            ["pretrain", "--shards", "s", "--out", "o", "--metrics-port", "70000"],
            "--metrics-port 70000",
        ),
    ],
)
def test_bad_user_input_is_one_line_and_exit_2(
    argv: list[str],
    message: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    preset, params = tmp_path / "preset.yaml", tmp_path / "params.yaml"
    preset.write_text("epochs: two\n")
    params.write_text("data_source_uri: [unclosed\n")
    argv = [arg.format(preset=preset, params=params) for arg in argv]
    assert cli(argv) == 2
    assert message in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_a_killed_checkpoint_write_is_cleaned_up_and_local_writes_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = PretrainConfig(out=str(tmp_path))
    resume.save(config, 1, {})
    leftover = tmp_path / "checkpoints" / ".step-000002.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert resume.resume(str(tmp_path), config).step == 1
    assert not leftover.exists()

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    storage.write_text(str(tmp_path / "a" / "file.txt"), "durable")
    assert len(synced) == 2, "the file before the rename, its folder after"


def test_a_metrics_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--metrics-port {port}: cannot serve metrics"):
            TrainingMetrics(method="GGGG", arch="resnet18").serve(port, addr="127.0.0.1")
