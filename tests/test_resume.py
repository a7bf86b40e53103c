"""The one resume rule: the newest checkpoint that loads, settings and inputs checked together."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from ladder_siam.evals.detection.config import DetectionConfig
from ladder_siam.evals.probe.config import ProbeConfig
from ladder_siam.evals.segmentation.config import SegmentationConfig
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.runtime import checkpoint, resume
from ladder_siam.runtime.resume import MAY_CHANGE, ResumeError


def save(out: Path, step: int, config: object, inputs: dict[str, str] | None = None) -> None:
    checkpoint.save(str(out), step, {**resume.state(config, inputs), "weights": step}, keep=5)


def test_a_fresh_run_has_nothing_to_resume(tmp_path: Path) -> None:
    assert resume.resume(str(tmp_path), PretrainConfig(out=str(tmp_path))) is None


def test_operational_settings_may_change_and_every_other_difference_is_named(
    tmp_path: Path,
) -> None:
    config = PretrainConfig(shards="a", out=str(tmp_path), epochs=2, base_lr=0.45)
    save(tmp_path, 10, config)
    moved = dataclasses.replace(config, shards="b", workers=1, log_every=1, max_steps=5)
    assert resume.resume(str(tmp_path), moved).step == 10

    changed = dataclasses.replace(config, epochs=3, base_lr=0.9, method="byol")
    with pytest.raises(ResumeError) as error:
        resume.resume(str(tmp_path), changed)
    message = str(error.value)
    for difference in ("base_lr: 0.45 -> 0.9", "epochs: 2 -> 3", "method: 'ladder-byol'"):
        assert difference in message
    assert "use a new --out" in message and str(tmp_path) in message


def test_a_changed_input_is_refused_by_content_even_at_the_same_path(tmp_path: Path) -> None:
    backbone = tmp_path / "backbone.pt"
    torch.save({"w": torch.zeros(3)}, backbone)
    config = DetectionConfig(backbone=str(backbone), out=str(tmp_path / "eval"))
    inputs = {"backbone": resume.fingerprint(str(backbone))}
    save(tmp_path / "eval", 4, config, inputs)
    assert resume.resume(config.out, config, inputs).step == 4

    torch.save({"w": torch.ones(3)}, backbone)
    new_inputs = {"backbone": resume.fingerprint(str(backbone))}
    with pytest.raises(ResumeError, match="backbone changed since the checkpoint"):
        resume.resume(config.out, config, new_inputs)
    # Settings and inputs are named together, so one rerun fixes every difference.
    with pytest.raises(ResumeError, match=r"iterations: 90000 -> 7; backbone changed"):
        resume.resume(config.out, dataclasses.replace(config, iterations=7), new_inputs)


def test_a_checkpoint_that_does_not_load_falls_back_to_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = PretrainConfig(out=str(tmp_path))
    save(tmp_path, 1, config)
    save(tmp_path, 2, config)
    newest = Path(checkpoint.checkpoint_uri(str(tmp_path), 2))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    with caplog.at_level(logging.WARNING):
        resumed = resume.resume(str(tmp_path), config)
    assert resumed.step == 1 and resumed.state["weights"] == 1
    assert newest.name in caplog.text


def test_a_setting_added_after_the_checkpoint_counts_as_its_default(tmp_path: Path) -> None:
    config = PretrainConfig(out=str(tmp_path))
    state = resume.state(config)
    del state["config"]["sync_bn_scope"]
    checkpoint.save(str(tmp_path), 3, state, keep=1)
    assert resume.resume(str(tmp_path), config).step == 3
    with pytest.raises(ResumeError, match="sync_bn_scope: 'all' -> 'node'"):
        resume.resume(str(tmp_path), dataclasses.replace(config, sync_bn_scope="node"))


def test_every_setting_that_may_change_is_a_setting_of_some_loop() -> None:
    configs = (PretrainConfig, ProbeConfig, DetectionConfig, SegmentationConfig)
    names = {field.name for config in configs for field in dataclasses.fields(config)}
    assert names >= MAY_CHANGE
