"""Loading an exported ``backbone.pt`` for evaluation, with errors that name the mismatch.

``backbone.pt`` is a torchvision ResNet state_dict (see ``LadderSiam.backbone_state_dict``).
Its architecture is read off the weights themselves (block type and count per stage, stem
shape), so a file from anywhere — ours or torchvision's — is checked before any training
starts, and ``backbone.json`` beside it is only informative. Its values are checked too: a
run that diverged can export NaN weights, and an evaluation of them would spend hours to
report chance accuracy (or fail deep inside a loss) instead of naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn

from ladder_siam.errors import UsageError
from ladder_siam.io import storage
from ladder_siam.nets.backbones import torchvision_resnet

# (bottleneck blocks?, blocks in layer1..layer4) -> arch
_ARCHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}
_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


@dataclass(frozen=True)
class BackboneInfo:
    """What an exported backbone is: its torchvision arch and whether it has the small stem."""

    arch: str
    small_input: bool


def describe(state: dict[str, torch.Tensor], uri: str) -> BackboneInfo:
    """Reads the architecture off a ResNet state_dict.

    Raises:
        UsageError: The weights are not a supported torchvision ResNet.
    """
    blocks = [0, 0, 0, 0]
    for key in state:
        if match := _BLOCK.match(key):
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    arch = _ARCHS.get((bottleneck, tuple(blocks)))
    if arch is None or "conv1.weight" not in state:
        raise UsageError(
            f"{uri}: not a supported ResNet state_dict (blocks per stage {blocks}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks)"
        )
    return BackboneInfo(arch=arch, small_input=state["conv1.weight"].shape[-1] == 3)


def check_finite(state: dict[str, torch.Tensor], uri: str) -> None:
    """Refuses weights with a NaN or infinite value, naming the first such tensor.

    Buffers count too: a NaN ``running_var`` poisons every BatchNorm output in eval mode.

    Raises:
        UsageError: A floating-point tensor holds a non-finite value.
    """
    for key, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue  # num_batches_tracked; a non-tensor fails the strict load later
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            inf = tensor.numel() - int(finite.sum()) - nan
            raise UsageError(
                f"{uri}: tensor {key} holds {nan} NaN and {inf} infinite values of "
                f"{tensor.numel()}: weights of a run that diverged"
            )


def load_backbone(uri: str, arch: str | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Builds the torchvision ResNet of an exported backbone, weights loaded strictly.

    Args:
        uri: The ``backbone.pt`` to load (``weights_only``: it cannot run code).
        arch: The architecture the caller expects, if any.

    Raises:
        UsageError: The file is not a supported ResNet, not the expected ``arch``, or holds
            NaN or infinite weights.
    """
    try:
        state = torch.load(
            io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True
        )
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # torch's unpickling errors run to several lines of advice; the first says what failed.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{uri}: not a loadable state_dict: {reason}") from error
    if not isinstance(state, dict):
        raise UsageError(f"{uri}: expected a state_dict, found {type(state).__name__}")
    info = describe(state, uri)
    if arch is not None and arch != info.arch:
        raise UsageError(f"{uri}: the backbone is a {info.arch}, but {arch} was requested")
    check_finite(state, uri)
    model = torchvision_resnet(info.arch, info.small_input)
    model.load_state_dict(state)
    return model, info
