"""The online monitor: does every stage learn? A linear probe and RankMe per stage, live.

The paper's claim (Table 7) is that Ladder training improves every intermediate stage; the
probe step after pretraining says so days later. The monitor says it while the run trains:

* **Online linear probe** per stage res2..res5: ``BatchNorm1d`` without affine parameters
  plus a linear layer on the stage's globally pooled online features of the first view, as
  the forward pass already computed them (:class:`~ladder_siam.pretrain.model.LadderOutput`),
  detached. It trains on every step's batch with its own SGD and learning rate
  (``--online-probe-lr``); its top-1 on each batch *before* that batch's update is averaged
  over the logging interval, so every sample it is scored on is one it has not trained on.
* **RankMe** (``pretrain/rankme.py``) of every stage's pooled features and of each supervised
  level's projector output, every ``--rank-every`` steps over the last samples (at least as
  many as the widest embedding has dimensions), gathered across ranks.

It cannot change training: the heads are outside the pretraining optimiser and its DDP
wrapper, their inputs are detached, their initialisation draws from the monitor's own
``torch.Generator`` and nothing here touches torch's global random state, so a run ends with
bitwise the same backbone with the monitor on or off. Under DDP the probes' gradients (with
the batch's correct counts) are averaged across ranks in one all-reduce per step, so every
rank holds the same heads. The heads, their optimiser, the RankMe ring and the interval's
counts go into every checkpoint, so resuming is exact for the monitor too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ladder_siam.data.labeled import has_labels
from ladder_siam.data.manifest import SplitManifest
from ladder_siam.pretrain.config import PretrainConfig
from ladder_siam.pretrain.model import LadderSiam
from ladder_siam.pretrain.rankme import FeatureRing
from ladder_siam.runtime.distributed import DistributedEnv

logger = logging.getLogger(__name__)

PROJECTOR = "projector_"
# SGD with Nesterov momentum, as linear probes are trained; the stream id keeps the
# monitor's generator apart from anything else seeded with the run's seed.
MOMENTUM = 0.9
GENERATOR_STREAM = 14


@dataclass
class MonitorReading:
    """What the monitor measured over one logging interval.

    Attributes:
        probe_top1: Stage -> online probe top-1 (%) over the interval's batches.
        rankme: Stage -> RankMe of its pooled features, if computed during the interval.
        projector_rankme: Supervised level -> RankMe of its projector output, likewise.
    """

    probe_top1: dict[str, float] = field(default_factory=dict)
    rankme: dict[str, float] = field(default_factory=dict)
    projector_rankme: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, float]:
        """The ``train_log.jsonl`` fields of the reading.

        They are ``online_probe_top1_<stage>``, ``rankme_<stage>`` and
        ``rankme_projector_<level>``; a RankMe not computed in the interval is left out.
        """
        fields = {f"online_probe_top1_{stage}": v for stage, v in self.probe_top1.items()}
        fields.update({f"rankme_{stage}": v for stage, v in self.rankme.items()})
        fields.update({f"rankme_{PROJECTOR}{lv}": v for lv, v in self.projector_rankme.items()})
        return fields


def _probe_head(channels: int, classes: int, generator: torch.Generator) -> nn.Sequential:
    linear = nn.utils.skip_init(nn.Linear, channels, classes)
    bound = channels**-0.5  # nn.Linear's default range, drawn from the monitor's generator
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    return nn.Sequential(nn.BatchNorm1d(channels, affine=False), linear)


class OnlineMonitor:
    """Per-stage online linear probes and RankMe; see the module docstring.

    Args:
        channels: Stage -> channels of its pooled features.
        projector_levels: The supervised levels, whose projector outputs get a RankMe too.
        projection_dim: Width of the projector outputs.
        classes: Number of classes of the shards' labels.
        lr: The probes' learning rate.
        rank_every: Steps between RankMe computations.
        global_batch: Samples per step over all ranks.
        device: The training device.
        seed: Seed of the probes' initialisation (the monitor's own generator).
        world_size: Ranks; above 1, gradients are averaged and features gathered across them.
    """

    def __init__(
        self,
        channels: dict[str, int],
        projector_levels: list[str],
        projection_dim: int,
        classes: int,
        lr: float,
        rank_every: int,
        global_batch: int,
        device: torch.device,
        seed: int = 0,
        world_size: int = 1,
    ) -> None:
        state = np.random.SeedSequence([seed, GENERATOR_STREAM]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        self.heads = nn.ModuleDict(
            {stage: _probe_head(c, classes, generator) for stage, c in channels.items()}
        ).to(device)
        self.optimizer = torch.optim.SGD(
            self.heads.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True
        )
        dims = {**channels, **{f"{PROJECTOR}{lv}": projection_dim for lv in projector_levels}}
        self.ring = FeatureRing(
            dims, max(dims.values()), rank_every, global_batch, device, world_size
        )
        self.world_size = world_size
        # Correct predictions per stage, then samples: summed on the device, read per interval.
        self.counts = torch.zeros(len(channels) + 1, device=device)
        self.latest_rankme: dict[str, torch.Tensor] = {}

    def update(
        self,
        step: int,
        features: dict[str, torch.Tensor],
        projections: dict[str, torch.Tensor],
        labels: torch.Tensor,
    ) -> None:
        """Scores and trains the probes on a step's batch; feeds and reads RankMe's ring.

        Args:
            step: The step just completed (1-based).
            features: Stage -> this rank's pooled features ``[B, C]``, detached.
            projections: Supervised level -> this rank's projector outputs ``[B, D]``.
            labels: This rank's labels ``[B]``, on the training device.
        """
        self._train_probes(features, labels)
        if self.ring.wants(step):
            named = {f"{PROJECTOR}{lv}": value for lv, value in projections.items()}
            self.ring.add({**features, **named})
        if self.ring.due(step):
            self.latest_rankme = self.ring.rankme()

    def _train_probes(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        correct = []
        with torch.enable_grad():
            loss = torch.zeros((), device=labels.device)
            for stage, head in self.heads.items():
                logits = head(features[stage].detach().float())
                loss = loss + F.cross_entropy(logits, labels)
                correct.append((logits.argmax(dim=1) == labels).sum())
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
        counts = torch.stack([*correct, labels.new_full((), len(labels))]).float()
        if self.world_size > 1:
            counts = self._all_reduce(counts)
        self.optimizer.step()
        self.counts += counts

    def _all_reduce(self, counts: torch.Tensor) -> torch.Tensor:
        """Averages the probes' gradients across ranks; returns the counts summed."""
        grads = [p.grad for p in self.heads.parameters() if p.grad is not None]
        flat = torch.cat([*(g.flatten() for g in grads), counts])
        dist.all_reduce(flat)
        *parts, summed = flat.split([*(g.numel() for g in grads), len(counts)])
        for grad, part in zip(grads, parts, strict=True):
            grad.copy_(part.view_as(grad) / self.world_size)
        return summed

    def reading(self) -> MonitorReading:
        """The interval's measurements; the next interval starts from zero."""
        counts = self.counts.tolist()
        self.counts.zero_()
        reading = MonitorReading()
        if counts[-1] > 0:
            reading.probe_top1 = {
                stage: 100.0 * correct / counts[-1]
                for stage, correct in zip(self.heads, counts[:-1], strict=True)
            }
        for name, value in self.latest_rankme.items():
            target = reading.projector_rankme if name.startswith(PROJECTOR) else reading.rankme
            target[name.removeprefix(PROJECTOR)] = float(value)
        self.latest_rankme = {}
        return reading

    def state_dict(self) -> dict[str, Any]:
        """The heads, their optimiser, the RankMe ring and the open interval, for checkpoints."""
        return {
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ring": self.ring.state_dict(),
            "counts": self.counts,
            "latest_rankme": dict(self.latest_rankme),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ring.load_state_dict(state["ring"])
        self.counts.copy_(state["counts"])
        self.latest_rankme = dict(state["latest_rankme"])


def build_monitor(
    config: PretrainConfig, model: LadderSiam, manifest: SplitManifest, env: DistributedEnv
) -> OnlineMonitor | None:
    """The run's monitor, or None when ``--online-monitor false`` or the shards lack labels."""
    if not config.online_monitor:
        return None
    if not has_labels(manifest):
        if env.is_main:
            logger.info("%s: the shards carry no labels (.cls): online monitor off", config.shards)
        return None
    if config.batch_size // env.world_size < 2:
        # BatchNorm needs two samples; a rank's batch of one cannot train a probe.
        if env.is_main:
            logger.info("one image per rank and step: online monitor off")
        return None
    return OnlineMonitor(
        channels=model.online.backbone.channels,
        projector_levels=list(model.supervised),
        projection_dim=config.projection_dim,
        classes=len(manifest.classes),
        lr=config.online_probe_lr,
        rank_every=config.rank_every,
        global_batch=config.batch_size,
        device=env.device,
        seed=config.seed,
        world_size=env.world_size,
    )
