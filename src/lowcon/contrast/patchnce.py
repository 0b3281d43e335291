"""PatchNCE loss of CUT: each output patch is matched to the input patch at the same place."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .samples import negative_groups

__all__ = ["PatchNCELoss", "patch_nce_loss"]


def patch_nce_loss(
    q: Tensor,
    k: Tensor,
    temperature: float = 0.07,
    negatives: Literal["image", "batch"] = "image",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """PatchNCE with the official CUT semantics.

    Args:
        q: (B, P, C) L2-normalised query features (patches of the output).
        k: (B, P, C) L2-normalised key features (the same locations of the source); detached.
        temperature: tau, 0.07 in CUT.
        negatives: "image" = the other P-1 patches of the same image (default); "batch" = the
            other patches of the whole minibatch (in data-parallel training, every process's:
            :func:`lowcon.contrast.samples.negative_groups`).
        reduction: "mean" over all B*P patches, or "none" for the (B*P,) losses.

    The logits of a patch are [q.k, q.k_1, ..., q.k_M] / tau, where the entry of the positive
    itself among the negatives is filled with -10 (kept, as released), and the loss is the
    cross entropy with target 0.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q, k: expected (B, P, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q, k: shapes differ, {tuple(q.shape)} vs {tuple(k.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    k = k.detach()
    l_pos = (q * k).sum(-1).reshape(-1, 1)  # (B*P, 1)
    q_groups, k_groups, start = negative_groups(q, k, negatives)  # (G, M, C), (G, K, C)
    m = q_groups.shape[1]
    l_neg = torch.bmm(q_groups, k_groups.transpose(1, 2))  # (G, M, K)
    own = torch.zeros(l_neg.shape[1:], dtype=torch.bool, device=q.device)  # query m's own key: start + m
    own[:, start:start + m] = torch.eye(m, dtype=torch.bool, device=q.device)
    l_neg = l_neg.masked_fill(own[None], -10.0).reshape(-1, l_neg.shape[-1])
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    return loss.mean() if reduction == "mean" else loss


class PatchNCELoss(nn.Module):
    """Module form of :func:`patch_nce_loss`.

    Shape:
        q, k: (B, P, C) -> scalar (or (B*P,) with reduction="none").

    Example:
        >>> nce = PatchNCELoss(temperature=0.07)
        >>> q = F.normalize(torch.randn(1, 256, 256), dim=-1)
        >>> loss = nce(q, q.clone())

    Reference:
        Park et al., Contrastive Learning for Unpaired Image-to-Image Translation, ECCV 2020.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        negatives: Literal["image", "batch"] = "image",
        reduction: Literal["mean", "none"] = "mean",
    ) -> None:
        super().__init__()
        if negatives not in ("image", "batch"):
            raise ValueError(f"negatives: expected 'image' or 'batch', got {negatives!r}")
        self.temperature = temperature
        self.negatives = negatives
        self.reduction = reduction

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return patch_nce_loss(q, k, self.temperature, self.negatives, self.reduction)
