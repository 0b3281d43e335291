"""InfoNCE for users who bring their own embeddings."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InfoNCE", "info_nce"]


def info_nce(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor,
    temperature: float = 0.07,
    normalize: bool = True,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """-log( exp(a.p / t) / (exp(a.p / t) + sum_n exp(a.n / t)) ).

    Args:
        anchor: (N, D) anchors.
        positive: (N, D) one positive per anchor.
        negatives: (N, K, D) negatives per anchor, or (K, D) shared by all anchors.
        temperature: t > 0.
        normalize: L2-normalise all embeddings first (cosine similarity).
        reduction: "mean", "sum" or "none" ((N,) losses).
    """
    if anchor.dim() != 2:
        raise ValueError(f"anchor: expected (N, D), got {tuple(anchor.shape)}")
    if positive.shape != anchor.shape:
        raise ValueError(f"positive: expected {tuple(anchor.shape)}, got {tuple(positive.shape)}")
    if negatives.dim() == 2:
        negatives = negatives.unsqueeze(0).expand(anchor.shape[0], *negatives.shape)
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"negatives: expected (N, K, D) or (K, D) with N={anchor.shape[0]}, D={anchor.shape[1]}, "
            f"got {tuple(negatives.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if normalize:
        anchor, positive, negatives = (F.normalize(t, dim=-1) for t in (anchor, positive, negatives))
    l_pos = (anchor * positive).sum(-1, keepdim=True)
    l_neg = torch.einsum("nd,nkd->nk", anchor, negatives)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target, reduction=reduction)


class InfoNCE(nn.Module):
    """Module form of :func:`info_nce` (van den Oord et al., 2018; SimCLR / MoCo's loss)."""

    def __init__(self, temperature: float = 0.07, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, anchor: Tensor, positive: Tensor, negatives: Tensor) -> Tensor:
        return info_nce(anchor, positive, negatives, self.temperature, self.normalize, self.reduction)
