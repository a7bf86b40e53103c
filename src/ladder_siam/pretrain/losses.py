"""The self-supervised losses of the Ladder Siamese Network.

* :func:`byol_loss`: BYOL's regression loss between an online prediction and a target
  projection (paper Eq. 3; Eq. 5 applies it at every stage with its own heads).
* :func:`dense_byol_loss`: DenseBYOL (Eq. 7), the same regression for every position of a
  feature map against the target position it matches best.

Each takes one direction (view a predicts view b); the model sums both directions, as BYOL's
symmetrised loss does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk's similarity matrix in dense matching: 2^27 fp32 values are 512 MiB,
# so res2 at 224 px (3136 x 3136 positions, 39 MiB per image) is matched 13 images at a time
# instead of materialising N x 3136 x 3136 for the whole batch.
DENSE_CHUNK_ELEMENTS = 2**27


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's loss, Eq. 3: ``||normalize(p) - normalize(t)||^2 = 2 - 2 cos(p, t)``, batch mean.

    Args:
        prediction: Online predictions ``q(y_a)``, shape ``[N, D]``.
        target: Target projections ``y_b``, shape ``[N, D]``; no gradient flows into it.

    Returns:
        A scalar: the mean over the batch.
    """
    prediction = F.normalize(prediction.float(), dim=1)
    target = F.normalize(target.detach().float(), dim=1)
    return (2 - 2 * (prediction * target).sum(dim=1)).mean()


@torch.no_grad()
def match_positions(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For every online position, the index of the most similar target position (Eq. 7).

    The similarity is the cosine between feature vectors. The matching is computed a few
    images at a time so that its memory stays bounded at any feature-map size.

    Args:
        online: Online projections, ``[N, C, H, W]``.
        target: Target projections, ``[N, C, H', W']``.

    Returns:
        ``[N, H*W]`` indices into the flattened ``H' x W'`` target positions.
    """
    online = F.normalize(online.flatten(2), dim=1)
    target = F.normalize(target.flatten(2), dim=1)
    per_image = online.shape[2] * target.shape[2]
    chunk = max(1, DENSE_CHUNK_ELEMENTS // per_image)
    indices = [
        torch.bmm(
            online[start : start + chunk].transpose(1, 2), target[start : start + chunk]
        ).argmax(dim=2)
        for start in range(0, online.shape[0], chunk)
    ]
    return torch.cat(indices)


def dense_byol_loss(
    prediction: torch.Tensor, online: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """DenseBYOL's loss, Eq. 7: each predicted position regresses onto its matched target.

    For every online position ``(i, j)`` the target position ``(u, v)`` with the highest
    cosine similarity between ``online[:, :, i, j]`` and ``target[:, :, u, v]`` is found; the
    loss is ``||normalize(prediction[i, j]) - normalize(target[u, v])||^2`` averaged over the
    batch and all positions. The matching is not differentiable and no gradient reaches
    ``target``.

    Args:
        prediction: Online predictions ``q_conv(y_a)``, ``[N, C, H, W]``.
        online: Online projections ``y_a`` (used only to find the matches), ``[N, C, H, W]``.
        target: Target projections ``y_b``, ``[N, C, H', W']``.

    Returns:
        A scalar.
    """
    target = target.detach()
    index = match_positions(online.detach(), target)
    flat_target = target.flatten(2)
    aligned = flat_target.gather(2, index.unsqueeze(1).expand(-1, flat_target.shape[1], -1))
    prediction = F.normalize(prediction.flatten(2).float(), dim=1)
    aligned = F.normalize(aligned.float(), dim=1)
    return (2 - 2 * (prediction * aligned).sum(dim=1)).mean()


def output_std(projection: torch.Tensor) -> torch.Tensor:
    """The collapse signal: mean per-dimension std of the normalised outputs over the batch.

    About ``1/sqrt(D)`` for well-spread outputs and 0 for a collapsed (constant) output;
    dense maps count every position as a sample. By Theorem 1 of the paper a collapsed
    lower stage implies a collapsed top, so watching every stage is cheap and telling.
    """
    with torch.no_grad():
        flat = projection.float()
        if flat.dim() == 4:
            flat = flat.permute(0, 2, 3, 1).flatten(0, 2)
        return F.normalize(flat, dim=1).std(dim=0).mean()
