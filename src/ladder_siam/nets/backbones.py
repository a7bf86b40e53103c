"""ResNet backbones that return every stage's output (res2..res5).

The wrapper keeps torchvision's module names (``conv1``, ``bn1``, ``layer1``...), so its
weights load straight into ``torchvision.models.<arch>()`` (see :meth:`torchvision_state_dict`).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ladder_siam.nets.archs import ARCHS, STAGES


class ResNetStages(nn.Module):
    """A torchvision ResNet without its classifier, returning the four stage outputs.

    Args:
        arch: One of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        small_input: For 32-64 px images: a 3x3 stride-1 stem and no max-pool (as for CIFAR),
            so res5 is still 4x4 at 32 px instead of 1x1.
    """

    def __init__(self, arch: str = "resnet50", small_input: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.small_input = small_input
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) if small_input else net.conv1
        self.bn1, self.relu = net.bn1, net.relu
        self.maxpool = nn.Identity() if small_input else net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.num_features = net.fc.in_features
        expansion = self.num_features // 512
        self.channels = {stage: 64 * 2**i * expansion for i, stage in enumerate(STAGES)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"res2": ..., "res5": ...}`` feature maps (strides 4..32, or 1..8 small)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = {}
        for stage, layer in zip(
            STAGES, (self.layer1, self.layer2, self.layer3, self.layer4), strict=True
        ):
            x = layer(x)
            outputs[stage] = x
        return outputs

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under torchvision's names, with a zero ``fc`` so strict loading works.

        The classifier was never trained; evaluations replace it.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        reference = next(iter(state.values()))
        like = {"dtype": reference.dtype, "device": reference.device}
        state["fc.weight"] = torch.zeros(1000, self.num_features, **like)
        state["fc.bias"] = torch.zeros(1000, **like)
        return state


def torchvision_resnet(arch: str, small_input: bool = False) -> nn.Module:
    """A torchvision ResNet shaped like :class:`ResNetStages` (to load exported weights)."""
    net = getattr(torchvision.models, arch)(weights=None)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net
