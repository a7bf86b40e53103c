"""A backbone with NaN weights is refused by every step that reads one, before it writes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ladder_siam.cli import main as cli
from ladder_siam.prep.demo_data import make_demo_data
from ladder_siam.prep.prepare_shards import prepare_shards
from ladder_siam.pretrain.model import LadderSiam

# The first non-finite tensor in state-dict order, and a later one the message must not name.
FIRST_BAD = "layer2.0.bn1.running_var"
LATER_BAD = "layer4.1.conv2.weight"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny shards of the three layouts, and a resnet18 that diverged in two tensors."""
    root = tmp_path_factory.mktemp("backbone_check")
    make_demo_data(str(root / "raw"), images=12, size=32, val_fraction=0.5)
    for layout in ("imagefolder", "coco", "voc"):
        prepare_shards(str(root / "raw" / layout), str(root / layout), layout=layout)
    state = LadderSiam(
        "resnet18", "---G", hidden_dim=16, projection_dim=8, small_input=True
    ).backbone_state_dict()
    state[FIRST_BAD][3] = float("nan")
    state[LATER_BAD][0, 0] = float("inf")
    (root / "run").mkdir()
    torch.save(state, root / "run" / "backbone.pt")
    return {layout: str(root / layout) for layout in ("imagefolder", "coco", "voc")} | {
        "run": str(root / "run"),
        "backbone": str(root / "run" / "backbone.pt"),
    }


def _argv(step: str, inputs: dict[str, str], out: Path) -> list[str]:
    data = {"detection": "coco", "segmentation": "voc"}.get(step, "imagefolder")
    if step == "report":
        return ["report", "--runs", inputs["run"], "--out", str(out),
                "--analysis-images", inputs["imagefolder"]]  # fmt: skip
    command = {
        "probe-fast": ["linear-probe", "--protocol", "fast"],
        "probe-standard": ["linear-probe", "--protocol", "standard"],
        "detection": ["finetune-detection"],
        "segmentation": ["finetune-segmentation"],
    }[step]
    return [*command, "--preset", "tiny", "--backbone", inputs["backbone"],
            "--train", inputs[data], "--val", inputs[data], "--out", str(out)]  # fmt: skip


@pytest.mark.parametrize(
    "step", ["probe-fast", "probe-standard", "detection", "segmentation", "report"]
)
def test_a_nan_backbone_fails_the_step_in_one_line_before_it_writes(
    step: str, inputs: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert cli(_argv(step, inputs, out)) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in line
    assert f"{inputs['backbone']}: tensor {FIRST_BAD} holds 1 NaN and 0 infinite" in line
    assert LATER_BAD not in line
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))
