"""Projector and predictor heads, global (MLP) and dense (1x1 convolutions)."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """BYOL's projector / predictor: Linear -> BatchNorm -> ReLU -> Linear.

    Args:
        in_dim: Input features (a stage's channels for a projector).
        hidden_dim: Hidden width (4096 in BYOL and the paper).
        out_dim: Output features (256).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class ConvHead(nn.Sequential):
    """The dense projector / predictor of Eq. 7: the MLP head as 1x1 convolutions.

    Applied at every position of a feature map, so no pooling is needed. BatchNorm is kept
    (as in the MLP head): BYOL-style training depends on it in its heads.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_dim, hidden_dim, 1),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )
