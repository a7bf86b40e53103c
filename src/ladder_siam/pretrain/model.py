"""The Ladder Siamese Network: BYOL with a loss at every ResNet stage.

Per stage ``i`` (res2..res5) and per its loss kind (``levels``, one letter per stage):

* ``G`` global: ``y = p_i(avgpool(z_i))``, the online prediction ``q_i(y_a)`` regresses onto
  the target's ``y_b`` (Eq. 5);
* ``D`` dense: the same with 1x1-conv heads at every position and argmax-cosine matching
  (Eq. 7), averaged with the global loss of that stage, as DenseCL does;
* ``-`` no loss.

The total is ``L = sum_i w_i L_i`` (Eq. 4) with ``w_top = 1`` and the weights of Eq. 6 by
default, each ``L_i`` symmetrised over the two views. The target network is an exponential
moving average of the online backbone and projectors; it gets no gradients and runs its
BatchNorm in training mode (batch statistics), as in BYOL.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbones import ResNetStages
from ladder_siam.pretrain.heads import ConvHead, MLPHead
from ladder_siam.pretrain.levels import ladder_weights, parse_levels
from ladder_siam.pretrain.losses import byol_loss, dense_byol_loss, output_std

# Checkpoints written before the online network was one module kept its parts at the top
# level; their keys are renamed on load (old prefix -> new), so those runs still resume.
LEGACY_PREFIXES = {
    "backbone.": "online.backbone.",
    "projectors.": "online.projectors.",
    "dense_projectors.": "online.dense_projectors.",
}


class StageOutput(NamedTuple):
    """An encoder's projections of one view at one supervised stage.

    Attributes:
        projection: ``y_i = p_i(avgpool(z_i))`` (Eq. 5), ``[B, projection_dim]``.
        dense: ``y = p_conv(z_i)`` (Eq. 7), ``[B, dense_dim, H, W]``, at a dense stage;
            None elsewhere.
    """

    projection: torch.Tensor
    dense: torch.Tensor | None


class Encoding(NamedTuple):
    """An encoder's output for one view.

    Attributes:
        stages: Supervised stage -> its :class:`StageOutput`.
        pooled: Every stage's globally pooled backbone features, detached.
    """

    stages: dict[str, StageOutput]
    pooled: dict[str, torch.Tensor]


class Encoder(nn.Module):
    """The backbone ``f`` with each supervised stage's projectors: one side of the Siamese net.

    The online network and the target are two encoders of the same structure. The
    predictors are not part of it: they sit on the online side only (BYOL's asymmetry, Eq. 3).

    Args:
        backbone: The ResNet split into stages.
        projectors: Supervised stage -> its global projector ``p_i``.
        dense_projectors: Dense stage -> its 1x1-conv projector ``p_conv``.
    """

    def __init__(
        self, backbone: ResNetStages, projectors: nn.ModuleDict, dense_projectors: nn.ModuleDict
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projectors = projectors
        self.dense_projectors = dense_projectors

    def forward(self, images: torch.Tensor) -> Encoding:
        """Projects a batch of views at every supervised stage."""
        features = self.backbone(images)
        pooled = {stage: feature.mean(dim=(2, 3)) for stage, feature in features.items()}
        stages = {
            stage: StageOutput(
                projector(pooled[stage]),
                self.dense_projectors[stage](features[stage])
                if stage in self.dense_projectors
                else None,
            )
            for stage, projector in self.projectors.items()
        }
        return Encoding(stages, {stage: mean.detach() for stage, mean in pooled.items()})


@dataclass
class LadderOutput:
    """What one forward pass computes.

    Attributes:
        loss: The weighted total, to back-propagate.
        per_level: Each supervised stage's (unweighted, symmetrised) loss.
        output_std: Each supervised stage's collapse signal (see ``losses.output_std``).
        features: Every stage's globally pooled online features of the first view, detached:
            what the online monitor probes, at no extra forward pass.
        projections: Each supervised stage's online projector output of the first view,
            detached.
    """

    loss: torch.Tensor
    per_level: dict[str, torch.Tensor]
    output_std: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    projections: dict[str, torch.Tensor] = field(default_factory=dict)


def upgrade_state_dict(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A :class:`LadderSiam` state dict with the keys of older checkpoints renamed.

    Keys already in the current layout pass unchanged (``target.*`` never moved).
    """
    if not any(key.startswith(tuple(LEGACY_PREFIXES)) for key in state):
        return state
    renamed = {}
    for key, value in state.items():
        old = next((prefix for prefix in LEGACY_PREFIXES if key.startswith(prefix)), None)
        renamed[LEGACY_PREFIXES[old] + key.removeprefix(old) if old else key] = value
    return renamed


class LadderSiam(nn.Module):
    """Online encoder, per-stage predictors and EMA target of the Ladder Siamese Network.

    Args:
        arch: torchvision ResNet name.
        levels: Loss kind per stage res2..res5 (``GGGG``) or a method name (``ladder-byol``).
        weights: Loss weight per stage res2..res5; default Eq. 6 with ``w = 1/2``.
        small_input: Use the 3x3-stem variant for 32-64 px images.
        hidden_dim: Hidden width of the global projectors and predictors (4096).
        projection_dim: Output width of the global heads (256).
        dense_dim: Output width of the dense heads (128, as DenseCL); their hidden width is
            the stage's channel count, which keeps 56x56 res2 maps affordable.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        levels: str = "GGGG",
        weights: list[float] | None = None,
        small_input: bool = False,
        hidden_dim: int = 4096,
        projection_dim: int = 256,
        dense_dim: int = 128,
    ) -> None:
        super().__init__()
        self.levels = parse_levels(levels)
        self.weights = list(weights) if weights is not None else ladder_weights(0.5, len(STAGES))
        if len(self.weights) != len(STAGES) or any(w < 0 for w in self.weights):
            raise ValueError(f"weights {self.weights}: expected four non-negative numbers")
        self.supervised = [s for s, kind in zip(STAGES, self.levels, strict=True) if kind != "-"]
        dense = [s for s, kind in zip(STAGES, self.levels, strict=True) if kind == "D"]
        # Built in this order, the modules draw the same initial weights from a seed as
        # before they were grouped into encoders.
        backbone = ResNetStages(arch, small_input)
        channels = backbone.channels
        projectors = nn.ModuleDict(
            {s: MLPHead(channels[s], hidden_dim, projection_dim) for s in self.supervised}
        )
        self.predictors = nn.ModuleDict(
            {s: MLPHead(projection_dim, hidden_dim, projection_dim) for s in self.supervised}
        )
        dense_projectors = nn.ModuleDict(
            {s: ConvHead(channels[s], channels[s], dense_dim) for s in dense}
        )
        self.dense_predictors = nn.ModuleDict(
            {s: ConvHead(dense_dim, channels[s], dense_dim) for s in dense}
        )
        self.online = Encoder(backbone, projectors, dense_projectors)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> LadderOutput:
        """Computes the Ladder loss (Eq. 4) for two augmented views of the same images."""
        online = self.online(view_a), self.online(view_b)
        with torch.no_grad():
            target = self.target(view_a), self.target(view_b)
        per_level, spread = {}, {}
        total = view_a.new_zeros((), dtype=torch.float32)
        for stage, weight in zip(STAGES, self.weights, strict=True):
            if stage not in self.supervised:
                continue
            mine = online[0].stages[stage], online[1].stages[stage]
            theirs = target[0].stages[stage], target[1].stages[stage]
            loss = self._global_loss(stage, mine, theirs)
            if stage in self.dense_predictors:
                loss = (loss + self._dense_loss(stage, mine, theirs)) / 2
            per_level[stage] = loss
            spread[stage] = output_std(mine[0].projection)
            total = total + weight * loss
        projections = {stage: out.projection.detach() for stage, out in online[0].stages.items()}
        return LadderOutput(total, per_level, spread, online[0].pooled, projections)

    def _global_loss(
        self,
        stage: str,
        online: tuple[StageOutput, StageOutput],
        target: tuple[StageOutput, StageOutput],
    ) -> torch.Tensor:
        """Eq. 5, symmetrised: ``q_i(y_a)`` regresses onto the target's ``y_b``, and back."""
        predictor = self.predictors[stage]
        (a, b), (t_a, t_b) = online, target
        return byol_loss(predictor(a.projection), t_b.projection) + byol_loss(
            predictor(b.projection), t_a.projection
        )

    def _dense_loss(
        self,
        stage: str,
        online: tuple[StageOutput, StageOutput],
        target: tuple[StageOutput, StageOutput],
    ) -> torch.Tensor:
        """Eq. 7, symmetrised: each online position regresses onto its best target match."""
        predictor = self.dense_predictors[stage]
        (a, b), (t_a, t_b) = online, target
        return dense_byol_loss(predictor(a.dense), a.dense, t_b.dense) + dense_byol_loss(
            predictor(b.dense), b.dense, t_a.dense
        )

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """BYOL's target update ``xi <- tau * xi + (1 - tau) * theta`` (Grill et al. 2020, 3.1).

        ``target`` is a deep copy of ``online``, so their parameters and buffers pair up one
        to one. Buffers (BatchNorm running statistics) are copied: the target normalises with
        batch statistics, so its running averages only matter for inspection.
        """
        target = list(self.target.parameters())
        online = list(self.online.parameters())
        # One fused kernel per tensor group instead of one per parameter.
        torch._foreach_lerp_(target, online, 1.0 - tau)
        for target_buffer, online_buffer in zip(
            self.target.buffers(), self.online.buffers(), strict=True
        ):
            target_buffer.copy_(online_buffer)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Loads a state dict of this layout or of an older checkpoint (:data:`LEGACY_PREFIXES`)."""
        return super().load_state_dict(upgrade_state_dict(state_dict), strict, assign)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The online backbone's weights, loadable into ``torchvision.models.<arch>()``."""
        return self.online.backbone.torchvision_state_dict()
