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
from dataclasses import dataclass, field

import torch
from torch import nn

from ladder_siam.nets.archs import STAGES
from ladder_siam.nets.backbones import ResNetStages
from ladder_siam.pretrain.heads import ConvHead, MLPHead
from ladder_siam.pretrain.levels import ladder_weights, parse_levels
from ladder_siam.pretrain.losses import byol_loss, dense_byol_loss, output_std


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


class LadderSiam(nn.Module):
    """Online network, per-stage heads and EMA target of the Ladder Siamese Network.

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
        self.backbone = ResNetStages(arch, small_input)
        channels = self.backbone.channels
        self.projectors = nn.ModuleDict(
            {s: MLPHead(channels[s], hidden_dim, projection_dim) for s in self.supervised}
        )
        self.predictors = nn.ModuleDict(
            {s: MLPHead(projection_dim, hidden_dim, projection_dim) for s in self.supervised}
        )
        dense = [s for s, kind in zip(STAGES, self.levels, strict=True) if kind == "D"]
        self.dense_projectors = nn.ModuleDict(
            {s: ConvHead(channels[s], channels[s], dense_dim) for s in dense}
        )
        self.dense_predictors = nn.ModuleDict(
            {s: ConvHead(dense_dim, channels[s], dense_dim) for s in dense}
        )
        self.target = nn.ModuleDict(
            {
                "backbone": copy.deepcopy(self.backbone),
                "projectors": copy.deepcopy(self.projectors),
                "dense_projectors": copy.deepcopy(self.dense_projectors),
            }
        )
        self.target.requires_grad_(False)

    def online_modules(self) -> list[nn.Module]:
        """The online modules the target averages, in the target's order."""
        return [self.backbone, self.projectors, self.dense_projectors]

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> LadderOutput:
        """Computes the Ladder loss for a batch of two augmented views of the same images."""
        pooled: dict[str, torch.Tensor] = {}
        online = [
            self._project(self.backbone, self.projectors, self.dense_projectors, view_a, pooled),
            self._project(self.backbone, self.projectors, self.dense_projectors, view_b),
        ]
        with torch.no_grad():
            target = [
                self._project(
                    self.target["backbone"],
                    self.target["projectors"],
                    self.target["dense_projectors"],
                    v,
                )
                for v in (view_a, view_b)
            ]
        per_level, spread = {}, {}
        total = view_a.new_zeros((), dtype=torch.float32)
        for stage, weight in zip(STAGES, self.weights, strict=True):
            if stage not in self.supervised:
                continue
            loss = self._global_loss(stage, online, target)
            if stage in self.dense_projectors:
                loss = (loss + self._dense_loss(stage, online, target)) / 2
            per_level[stage] = loss
            spread[stage] = output_std(online[0][stage][0])
            total = total + weight * loss
        projections = {stage: online[0][stage][0].detach() for stage in self.supervised}
        return LadderOutput(total, per_level, spread, pooled, projections)

    @staticmethod
    def _project(
        backbone: nn.Module,
        projectors: nn.ModuleDict,
        dense_projectors: nn.ModuleDict,
        images: torch.Tensor,
        pooled: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per supervised stage: (global projection, dense projection or None).

        With ``pooled``, every stage's pooled features are also put there, detached.
        """
        features = backbone(images)
        means = {stage: features[stage].mean(dim=(2, 3)) for stage in projectors}
        if pooled is not None:
            for stage, feature in features.items():
                # The supervised stages' means are the projectors' inputs: pooled once.
                mean = means[stage] if stage in means else feature.detach().mean(dim=(2, 3))
                pooled[stage] = mean.detach()
        return {
            stage: (
                projector(means[stage]),
                dense_projectors[stage](features[stage]) if stage in dense_projectors else None,
            )
            for stage, projector in projectors.items()
        }

    def _global_loss(self, stage: str, online: list, target: list) -> torch.Tensor:
        predictor = self.predictors[stage]
        (y_a, _), (y_b, _) = online[0][stage], online[1][stage]
        (t_a, _), (t_b, _) = target[0][stage], target[1][stage]
        return byol_loss(predictor(y_a), t_b) + byol_loss(predictor(y_b), t_a)

    def _dense_loss(self, stage: str, online: list, target: list) -> torch.Tensor:
        predictor = self.dense_predictors[stage]
        (_, y_a), (_, y_b) = online[0][stage], online[1][stage]
        (_, t_a), (_, t_b) = target[0][stage], target[1][stage]
        return dense_byol_loss(predictor(y_a), y_a, t_b) + dense_byol_loss(predictor(y_b), y_b, t_a)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """EMA step: ``target <- tau * target + (1 - tau) * online`` for every parameter.

        Buffers (BatchNorm running statistics) are copied: the target normalises with batch
        statistics, so its running averages only matter for inspection.
        """
        target_params, online_params = [], []
        for target_module, online_module in zip(
            self.target.values(), self.online_modules(), strict=True
        ):
            target_params += list(target_module.parameters())
            online_params += list(online_module.parameters())
            for target_buffer, online_buffer in zip(
                target_module.buffers(), online_module.buffers(), strict=True
            ):
                target_buffer.copy_(online_buffer)
        # One fused kernel per tensor group instead of one per parameter.
        torch._foreach_lerp_(target_params, online_params, 1.0 - tau)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The online backbone's weights, loadable into ``torchvision.models.<arch>()``."""
        return self.backbone.torchvision_state_dict()
