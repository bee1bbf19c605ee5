"""Small statistics shared by training and evaluation."""

from __future__ import annotations

import torch

__all__ = ["roc_auc"]


def roc_auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be larger on ``positives``: the probability that
    a random positive scores above a random negative, ties counting one half (Mann-Whitney U / (n m)).
    """
    neg, pos = negatives.detach().double().flatten().cpu(), positives.detach().double().flatten().cpu()
    if neg.numel() == 0 or pos.numel() == 0:
        raise ValueError("roc_auc needs at least one negative and one positive score")
    scores = torch.cat([neg, pos])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype)
    # tied scores share the mean of their ranks
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros_like(values).index_add_(0, inverse, ranks)
    ranks = (rank_sums / counts)[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
