"""The step configs' shared discipline: the same checks and wording in all four, and pretraining
presets that resolve by name from any folder (they ship as package data)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ladder_siam import IMAGE
from ladder_siam.errors import UsageError
from ladder_siam.evals.detection import config as detection
from ladder_siam.evals.probe import config as probe
from ladder_siam.evals.segmentation import config as segmentation
from ladder_siam.kube.inputs import PipelineInputs, validate
from ladder_siam.pretrain import config as pretrain
from ladder_siam.runtime.step_config import expected

REPO = Path(__file__).resolve().parents[1]
PATHS = {"backbone": "b.pt", "train": "t", "val": "v", "out": "o"}
# Each step's smallest valid config, which each check below breaks in one field.
VALID: dict[str, Callable[..., Any]] = {
    "pretrain": lambda **kw: pretrain.make_config("tiny_cpu", shards="s", out="o", **kw),
    "probe": lambda **kw: probe.make_config("tiny", **PATHS, **kw),
    "detection": lambda **kw: detection.make_config("tiny", **PATHS, **kw),
    "segmentation": lambda **kw: segmentation.make_config("tiny", **PATHS, **kw),
}
# The batch rule differs (pretraining accumulates; the probe's heads need two samples per
# rank and its fast protocol does not split the batch), its wording does not.
BATCH_0 = {
    "pretrain": "--batch-size 0: must be divisible by world size 1 x accumulation 1 and at least 1",
    "probe": "--batch-size 0: must be at least 2 (2 per rank)",
    "detection": "--batch-size 0: must be divisible by world size 1 and at least 1",
    "segmentation": "--batch-size 0: must be divisible by world size 1 and at least 1",
}


def refusal(step: str, world_size: int = 1, **overrides: Any) -> str:
    config = VALID[step](**overrides)
    with pytest.raises(UsageError) as error:
        config.validate(world_size)
    return str(error.value)


@pytest.mark.parametrize("step", VALID)
def test_every_step_refuses_the_same_mistakes_in_the_same_words(step: str) -> None:
    VALID[step]().validate()
    assert refusal(step, batch_size=0) == BATCH_0[step]
    assert refusal(step, workers=-1) == "--workers -1: must be at least 0"
    assert refusal(step, checkpoint_every=0) == "--checkpoint-every 0: must be at least 1"
    assert refusal(step, keep_checkpoints=0) == "--keep-checkpoints 0: must be at least 1"
    assert refusal(step, weight_decay=-1.0) == "--weight-decay -1.0: must be at least 0"
    assert refusal(step, arch="vgg16").startswith("--arch 'vgg16': expected one of resnet18, ")


def test_the_batch_rule_counts_ranks_and_accumulation() -> None:
    message = refusal("pretrain", world_size=3, batch_size=32, accumulation=2)
    assert (
        message
        == "--batch-size 32: must be divisible by world size 3 x accumulation 2 and at least 6"
    )
    VALID["pretrain"](batch_size=36, accumulation=2).validate(3)
    assert refusal("detection", world_size=4, batch_size=6) == (
        "--batch-size 6: must be divisible by world size 4 and at least 4"
    )
    assert (
        refusal("probe", world_size=4, batch_size=6)
        == "--batch-size 6: must be at least 8 (2 per rank)"
    )
    VALID["probe"](batch_size=9).validate(4)  # the fast protocol need not split it evenly
    with pytest.raises(UsageError, match="divisible by world size 4 and at least 8"):
        VALID["probe"](batch_size=9, protocol="standard").validate(4)
    # A bad accumulation is named, not a division by zero.
    assert refusal("pretrain", accumulation=0) == "--accumulation 0: must be at least 1"


@pytest.mark.parametrize("module", [probe, detection, segmentation])
def test_the_evaluations_have_a_default_preset_and_name_the_known_ones(module: Any) -> None:
    assert module.make_config() == module.make_config(next(iter(module.PRESETS)))
    with pytest.raises(UsageError) as error:
        module.make_config("huge")
    assert str(error.value) == expected("--preset", "huge", module.PRESETS)
    assert expected("--preset", "huge", segmentation.PRESETS) == (
        "--preset 'huge': expected one of voc, cityscapes, tiny, smoke"
    )
    assert expected("--preset", "huge", probe.PRESETS) == "--preset 'huge': expected paper or tiny"


@pytest.mark.parametrize("module", [probe, detection, segmentation])
def test_flags_override_the_preset_which_overrides_the_defaults(module: Any) -> None:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    config = module.config_from_args(parser.parse_args(["--preset", "tiny", "--workers", "3"]))
    assert config == module.make_config("tiny", workers=3)
    assert module.config_from_args(parser.parse_args([])) == module.make_config()


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder outside the repository, as a new user's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pretrain_flags(*flags: str) -> pretrain.PretrainConfig:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return pretrain.config_from_args(parser.parse_args(list(flags)))


def test_a_preset_resolves_by_name_from_any_folder(elsewhere: Path) -> None:
    tiny = pretrain_flags("--config", "tiny_cpu")
    assert (tiny.arch, tiny.image_size, tiny.batch_size) == ("resnet18", 24, 32)
    assert pretrain_flags("--config", "tiny_cpu.yaml") == tiny
    assert pretrain_flags("--config", "tiny_cpu", "--epochs", "5").epochs == 5
    # A packaged name wins over a file of that name; any other path is read from the folder.
    (elsewhere / "tiny_cpu.yaml").write_text("epochs: 99\n")
    assert pretrain_flags("--config", "tiny_cpu.yaml").epochs == tiny.epochs
    (elsewhere / "mine.yaml").write_text("epochs: 7\narch: resnet34\n")
    mine = pretrain_flags("--config", "mine.yaml")
    assert (mine.arch, mine.epochs) == ("resnet34", 7)
    assert pretrain_flags("--config", str(elsewhere / "mine.yaml")) == mine


def test_an_unknown_preset_lists_the_packaged_ones(elsewhere: Path) -> None:
    names = pretrain.preset_names()
    assert {"tiny_cpu", "ladder-byol_r50_in1k_200ep", "fashion_mnist_r18"} <= set(names)
    for wrong in ("tiny", "configs/tiny_cpu.yaml"):
        with pytest.raises(UsageError) as error:
            pretrain_flags("--config", wrong)
        assert str(error.value) == (
            f"--config {wrong!r}: expected one of {', '.join(names)}, or a YAML file's path"
        )


def test_the_command_resolves_a_preset_outside_the_repository(tmp_path: Path) -> None:
    def render(preset: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable, "-m", "ladder_siam.cli", "launch", "render", "--run-name", "r",
            "--image", IMAGE, "--nodes", "1", "--gpus-per-node", "1", "--shards", "s3://b/d",
            "--out", "s3://b/r", "--config", preset,
        ]  # fmt: skip
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    rendered = render("tiny_cpu")
    assert rendered.returncode == 0, rendered.stderr
    [job] = yaml.safe_load_all(rendered.stdout)
    [master] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    sent = json.loads(master["command"][master["command"].index("--config-json") + 1])
    assert (sent["arch"], sent["image_size"], sent["batch_size"]) == ("resnet18", 24, 32)
    refused = render("tiny")
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "--config 'tiny': expected one of " in line and "tiny_cpu" in line


def test_the_presets_ship_with_the_package_and_every_reference_names_one() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "ladder_siam.pretrain.presets" in setuptools["packages"]
    patterns = setuptools["package-data"]["ladder_siam.pretrain.presets"]
    folder = Path(str(pretrain.PRESET_FOLDER))
    shipped = {path.stem for pattern in patterns for path in folder.glob(pattern)}
    assert shipped == set(pretrain.preset_names())
    demo = yaml.safe_load((REPO / "configs" / "pipeline_demo.yaml").read_text())
    assert demo["pretrain_config"] in shipped
    assert PipelineInputs().pretrain_config in shipped


def test_the_pipeline_names_an_unknown_preset_among_its_problems() -> None:
    problems = validate(PipelineInputs(pretrain_config="paper"), "job")
    assert any(p.startswith("pretrain_config 'paper': expected one of ") for p in problems)
    assert (
        validate(PipelineInputs(pretrain_config="tiny_cpu.yaml", cluster_namespace="ml"), "j") == []
    )
