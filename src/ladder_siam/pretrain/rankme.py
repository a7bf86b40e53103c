"""RankMe, the effective rank of an embedding, over a ring buffer of recent training samples.

RankMe (Garrido et al., *RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank*, ICML 2023, Eq. 1) is the exponential of the
entropy of an embedding matrix's normalised singular values:

    RankMe(Z) = exp(-sum_k p_k log p_k),    p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps

with ``eps = 1e-7``. It ranges from 1 (every sample on one line: collapsed) to ``min(N, D)``
(the singular values all equal). It needs at least as many samples ``N`` as the embedding has
dimensions ``D``, or it measures the sample count rather than the embedding, so it is computed
on :class:`FeatureRing`, which keeps the last ``N`` training samples' features of every level
side by side, gathered across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

EPS = 1e-7


def rankme(embeddings: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """RankMe of ``[N, D]`` embeddings (Garrido et al. 2023, Eq. 1), a 0-dim float32 tensor.

    The singular values are computed in float32 whatever the input's precision.
    """
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum().clamp_min(torch.finfo(torch.float32).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


class FeatureRing:
    """The last ``capacity`` samples' features of several embeddings, identical on every rank.

    Each recorded step's features are gathered from all ranks (rank-major) and written over
    the oldest rows. Only the steps whose samples can still be in the ring at the next
    computation are recorded: with a global batch of ``B`` that is the last
    ``ceil(capacity / B)`` steps before every ``every``-th, so between computations the ring
    costs nothing.

    Args:
        dims: Name -> width of each embedding, in the order they are stored.
        capacity: Samples kept; at least the widest embedding's width.
        every: Steps between computations.
        global_batch: Samples per step over all ranks.
        device: Where the ring lives (the training device).
        world_size: Ranks that contribute samples.
    """

    def __init__(
        self,
        dims: dict[str, int],
        capacity: int,
        every: int,
        global_batch: int,
        device: torch.device,
        world_size: int = 1,
    ) -> None:
        if capacity < max(dims.values()):
            raise ValueError(f"RankMe over {capacity} samples: fewer than {max(dims.values())}")
        self.dims = dict(dims)
        self.capacity = capacity
        self.every = every
        self.window = math.ceil(capacity / global_batch)
        self.world_size = world_size
        self.rows = torch.zeros(capacity, sum(dims.values()), device=device)
        self.filled = 0
        self.position = 0

    def wants(self, step: int) -> bool:
        """Whether the features of (1-based) ``step`` can be in the ring at a computation."""
        return (-step) % self.every < self.window

    def due(self, step: int) -> bool:
        """Whether RankMe is computed after ``step``: an ``every``-th step with a full ring."""
        return step % self.every == 0 and self.filled >= self.capacity

    def add(self, features: dict[str, torch.Tensor]) -> None:
        """Writes this rank's ``[B, dim]`` features of every embedding, gathered, over the oldest.

        A collective under DDP: every rank calls it for the same steps.
        """
        local = torch.cat([features[name].float() for name in self.dims], dim=1)
        if self.world_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local)
            local = torch.cat(parts)
        local = local[-self.capacity :]
        rows = torch.arange(len(local), device=self.rows.device)
        self.rows.index_copy_(0, (self.position + rows) % self.capacity, local)
        self.position = (self.position + len(local)) % self.capacity
        self.filled = min(self.filled + len(local), self.capacity)

    def rankme(self) -> dict[str, torch.Tensor]:
        """RankMe of every embedding over the ring's samples."""
        values, start = {}, 0
        for name, dim in self.dims.items():
            values[name] = rankme(self.rows[:, start : start + dim])
            start += dim
        return values

    def state_dict(self) -> dict[str, object]:
        """The ring's rows and fill state, for checkpoints."""
        return {"rows": self.rows, "filled": self.filled, "position": self.position}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restores what :meth:`state_dict` returned."""
        rows = torch.as_tensor(state["rows"])
        if rows.shape != self.rows.shape:
            raise ValueError(
                f"RankMe ring of shape {tuple(rows.shape)}, expected {tuple(self.rows.shape)}"
            )
        self.rows.copy_(rows)
        self.filled = int(state["filled"])  # type: ignore[arg-type]
        self.position = int(state["position"])  # type: ignore[arg-type]
