"""Weighted k-nearest-neighbour classification of frozen features (InstDisc, DINO).

Each query's ``k`` most cosine-similar training samples vote for their class with weight
``exp(similarity / T)`` (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination"; Caron et al. 2021, DINO: ``k = 20``, ``T = 0.07``). It needs no
training, so it complements the linear probe as a check of the features themselves.

Similarities are computed block by block, ``chunk`` queries against ``chunk`` training
samples, keeping a running top-``k`` per query, so memory stays ``chunk x (chunk + k)``
however large the training set (ImageNet's 1.28 M samples included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 4096,
) -> torch.Tensor:
    """The weighted kNN vote of every class for every query.

    Args:
        train_features: ``[N, D]`` training features (normalised here).
        train_labels: ``[N]`` class indices.
        queries: ``[Q, D]`` features to classify (normalised here).
        num_classes: Number of classes ``C``.
        k: Neighbours per query (at most ``N`` are used).
        temperature: ``T`` of the vote weight ``exp(similarity / T)``.
        chunk: Rows per similarity block, for queries and training samples alike.

    Returns:
        ``[Q, C]`` summed vote weights; the prediction is the argmax.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for query in F.normalize(queries.float(), dim=1).split(chunk):
        best = torch.full((query.shape[0], 0), -2.0, device=query.device)
        best_index = torch.zeros((query.shape[0], 0), dtype=torch.long, device=query.device)
        for start in range(0, train.shape[0], chunk):
            block = query @ train[start : start + chunk].T
            candidates = torch.cat([best, block], dim=1)
            offsets = torch.arange(start, start + block.shape[1], device=query.device)
            indices = torch.cat([best_index, offsets.expand(query.shape[0], -1)], dim=1)
            best, position = candidates.topk(min(k, candidates.shape[1]), dim=1)
            best_index = indices.gather(1, position)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[best_index], (best / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_correct(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 4096,
) -> torch.Tensor:
    """Per query, whether the weighted kNN classifier's top-1 is right (a bool tensor)."""
    scores = knn_scores(train_features, train_labels, queries, num_classes, k, temperature, chunk)
    return scores.argmax(dim=1) == query_labels.to(scores.device)
