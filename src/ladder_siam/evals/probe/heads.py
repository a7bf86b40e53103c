"""Linear classifiers on frozen stage features: one per stage, all trained together.

Each stage gets a :class:`LinearHead`: ``BatchNorm1d`` without affine parameters, then a
linear layer. The normalisation is MAE's linear-probing recipe (He et al. 2022, appendix
A.2): it standardises each feature, so one learning rate suits stages whose pooled features
differ in scale by orders of magnitude; in evaluation it is a fixed affine map, so the head
stays a linear classifier of the features. ``batch_norm=False`` gives mmselfsup's plain head.

The heads' parameters are disjoint, so the gradient of the summed loss is each head's own
gradient: one optimiser step on the sum trains every stage exactly as separate runs would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ladder_siam.errors import UsageError
from ladder_siam.runtime.health import FiniteCheck
from ladder_siam.runtime.loop import IntervalLog, set_lr
from ladder_siam.runtime.progress import Progress
from ladder_siam.runtime.schedules import warmup_cosine
from ladder_siam.runtime.train_log import TrainLog

# Confusion matrices only where a person can read them (and KFP's UI can draw them):
# Fashion-MNIST's 10 classes, not ImageNet's 1000.
CONFUSION_MAX_CLASSES = 100

logger = logging.getLogger(__name__)
LOOP = "linear probe heads"


class LinearHead(nn.Module):
    """``BatchNorm1d(affine=False)`` (optional) and a linear classifier.

    The weights start as mmselfsup's and MAE's linear heads do: normal with std 0.01, zero bias.

    Args:
        in_features: Feature width.
        num_classes: Number of classes.
        batch_norm: Standardise the features first (see the module docstring).
    """

    def __init__(self, in_features: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        # MAE's eps; the features are never near-constant enough for it to matter.
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6) if batch_norm else None
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, in_features]`` -> ``[B, num_classes]`` logits."""
        return self.linear(self.norm(features) if self.norm is not None else features)


class StageHeads(nn.Module):
    """One :class:`LinearHead` per stage, applied to a dict of pooled features.

    Args:
        channels: Feature width per stage.
        num_classes: Number of classes.
        batch_norm: Standardise the features first.
    """

    def __init__(self, channels: Mapping[str, int], num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {stage: LinearHead(width, num_classes, batch_norm) for stage, width in channels.items()}
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{stage: [B, C_stage]}`` -> ``{stage: [B, num_classes]}`` logits."""
        return {stage: head(features[stage]) for stage, head in self.heads.items()}


def stage_losses(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each stage's cross-entropy as ``loss_<stage>``, and their sum as ``loss``.

    The sum is what is back-propagated: each head gets its own gradient from it.
    """
    losses = {f"loss_{stage}": F.cross_entropy(out, labels) for stage, out in logits.items()}
    return {"loss": torch.stack(list(losses.values())).sum(), **losses}


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies in percent, ``{"top1": ..., "top5": ...}``.

    With fewer than ``k`` classes every label is within the top ``k``: 100 %.
    """
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels.to(logits.device).unsqueeze(1)
    total = max(labels.shape[0], 1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).sum().item() / total for k in ks}


def train_heads(
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_norm: bool = True,
    seed: int = 0,
    report: bool = True,
    train_log: TrainLog | None = None,
) -> StageHeads:
    """Trains one linear classifier per stage on cached features, all in one pass.

    Every epoch draws a fresh permutation of the samples and steps through it in batches of
    ``batch_size`` (the last, incomplete one is dropped, so batch normalisation never sees a
    single sample); each batch updates every stage's head. SGD with momentum, learning rate
    ``lr`` annealed to 0 with a cosine over all steps (the paper's protocol).

    Args:
        features: ``{stage: [N, C_stage]}``, all on one device.
        labels: ``[N]`` class indices on the same device.
        num_classes: Number of classes.
        epochs: Passes over the features.
        batch_size: Samples per step (capped at ``N``).
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_norm: Standardise the features in each head.
        seed: Seed of the initialisation and the sample order.
        report: Whether this process reports progress.
        train_log: Where each epoch's mean losses go, if anywhere.

    Returns:
        The trained heads, in eval mode, on the features' device.

    Raises:
        UsageError: Fewer than two training samples.
        NonFiniteLossError: A stage's loss became NaN or infinite (checked every epoch).
    """
    count = labels.shape[0]
    if count < 2:
        raise UsageError(f"{count} training samples: a linear probe needs at least 2")
    device = labels.device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = StageHeads(
        {stage: tensor.shape[1] for stage, tensor in features.items()}, num_classes, batch_norm
    ).to(device)
    optimizer = torch.optim.SGD(
        heads.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    batch = min(batch_size, count)
    steps_per_epoch = count // batch
    schedule = warmup_cosine(lr, epochs * steps_per_epoch, 0)
    finite = FiniteCheck(LOOP)
    interval = IntervalLog(LOOP, epochs * steps_per_epoch, train_log, report)
    step = 0
    with Progress(epochs, "linear probe", "epoch", logger, enabled=report) as progress:
        for _ in range(epochs):
            order = torch.randperm(count, generator=generator).to(device)
            for index in order[: steps_per_epoch * batch].view(steps_per_epoch, batch):
                set_lr(optimizer, float(schedule[step]))
                losses = stage_losses(
                    heads({stage: tensor[index] for stage, tensor in features.items()}),
                    labels[index],
                )
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                step += 1
                finite.submit(step, losses)
                interval.add(losses, batch)
            # One host read per epoch: the check and the epoch's record.
            finite.check()
            record = interval.write(step, float(schedule[step - 1]), progress)
            progress.update(1, loss=f"{record['loss']:.3f}")
    return heads.eval()


@torch.no_grad()
def evaluate_heads(
    heads: StageHeads,
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    chunk: int = 4096,
    confusion_max_classes: int = CONFUSION_MAX_CLASSES,
) -> dict[str, dict[str, Any]]:
    """Top-1 and top-5 accuracy in percent of every stage's head, ``{stage: {"top1", "top5"}}``.

    Each stage also gets ``"correct"``: a boolean tensor, per image, of the top-1 hits.

    With at most ``confusion_max_classes`` classes, each stage also gets ``"confusion"``: the
    confusion matrix as lists (rows: true class, columns: predicted), which KFP's UI draws.
    """
    was_training = heads.training
    heads.eval()
    logits: dict[str, list[torch.Tensor]] = {stage: [] for stage in heads.heads}
    for start in range(0, labels.shape[0], chunk):
        batch = {stage: tensor[start : start + chunk] for stage, tensor in features.items()}
        for stage, out in heads(batch).items():
            logits[stage].append(out)
    heads.train(was_training)
    results: dict[str, dict[str, Any]] = {}
    for stage, parts in logits.items():
        if not parts:
            continue
        stage_logits = torch.cat(parts)
        results[stage] = dict(topk_accuracy(stage_logits, labels))
        predicted, truth = stage_logits.argmax(dim=1), labels.to(stage_logits.device)
        # Per image, for a paired test between two backbones scored on the same images.
        results[stage]["correct"] = (predicted == truth).cpu()
        classes = stage_logits.shape[1]
        if classes <= confusion_max_classes:
            pairs = truth * classes + predicted
            counts = torch.bincount(pairs, minlength=classes * classes)
            results[stage]["confusion"] = counts.view(classes, classes).tolist()
    return results
