"""Sample construction: which images or patches are positives and negatives of an anchor.

This is the first of the three choices of contrastive learning in low-level vision, kept apart
from the embedding network and from the loss math:

- CR (AECR-Net): the anchor is the restored image, the positive its clear image, the negative
  its own hazy input (1:1). Table 4 of the paper also uses r negatives and r positives taken
  from the other images of the batch; C2PNet adds the outputs of other dehazers as negatives.
- PatchNCE (CUT): the anchor is an output patch, the positive the input patch at the same place,
  the negatives the other sampled patches of the same image (or of the whole minibatch).

In data-parallel training (:mod:`lowcon.distributed`) "the batch" is every process's share of it:
:class:`CRSampler` and :func:`negative_groups` pick from the whole batch.

All CR helpers return stacks shaped (B, N, C, H, W): N samples for each anchor of the batch.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from .. import distributed

__all__ = [
    "own_sample",
    "batch_samples",
    "stack_samples",
    "CRSampler",
    "group_patches",
    "negative_groups",
]


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected (B, C, H, W) images, got {shape}")


def own_sample(images: Tensor) -> Tensor:
    """Each anchor's own image as its single sample: (B, C, H, W) -> (B, 1, C, H, W)."""
    _check_images("images", images)
    return images.unsqueeze(1)


def batch_samples(
    images: Tensor, r: int, include_own: bool = True, mode: Literal["others", "flip"] = "others"
) -> Tensor:
    """r samples per anchor taken from the images of the batch.

    Args:
        images: (B, C, H, W) batch (e.g. the hazy inputs, for negatives).
        r: samples per anchor.
        include_own: with mode "others", slot 0 is the anchor's own image and the other r-1
            slots are the next images of the batch (i+1, i+2, ... modulo B); without it, all r
            are other images.
        mode: "others" as above; "flip" takes ``flip(images, 0)[:r]`` for every anchor, as the
            authors' MindSpore port of AECR-Net does (the same r images for all anchors).

    Returns:
        (B, r, C, H, W).
    """
    _check_images("images", images)
    b = images.shape[0]
    if r < 1:
        raise ValueError(f"r: must be >= 1, got {r}")
    if mode == "flip":
        if r > b:
            raise ValueError(f"r: {r} samples from a batch of {b} (mode 'flip' needs r <= batch size)")
        chosen = torch.flip(images, dims=[0])[:r]
        return chosen.unsqueeze(0).expand(b, *chosen.shape)
    if mode != "others":
        raise ValueError(f"mode: expected 'others' or 'flip', got {mode!r}")
    first = 0 if include_own else 1
    needed = r if include_own else r + 1
    if needed > b:
        raise ValueError(
            f"r: {r} samples per anchor need a batch of at least {needed} images, got {b}"
        )
    offsets = torch.arange(first, first + r, device=images.device)
    index = (torch.arange(b, device=images.device)[:, None] + offsets[None, :]) % b  # (B, r)
    return images[index]


def stack_samples(*groups: Tensor) -> Tensor:
    """Concatenate sample stacks (B, N_i, C, H, W) along the sample axis (e.g. own hazy + DCP output)."""
    for i, g in enumerate(groups):
        if g.dim() == 4:
            raise ValueError(f"groups[{i}]: a (B, C, H, W) batch; wrap it with own_sample() first")
        if g.dim() != 5:
            raise ValueError(f"groups[{i}]: expected (B, N, C, H, W), got {tuple(g.shape)}")
    return torch.cat(groups, dim=1)


class CRSampler:
    """Positives and negatives of contrastive regularization, as the paper's Table 4 names them.

    Args:
        num_positives: 1 = the anchor's clear image; r > 1 = its clear image and r-1 clear
            images of other samples of the batch (r:1 and r:r rows).
        num_negatives: 1 = the anchor's own hazy input; r > 1 = own hazy plus r-1 other hazy
            images of the batch (the 1:r row, r = 10 in the paper).
        mode: how other batch images are chosen, see :func:`batch_samples`. In data-parallel
            training (:mod:`lowcon.distributed`) they come from every process's share
            of the batch, as from one process holding the whole batch.

    Call with ``(hazy, clear, extra_negatives=None)``; returns ``(positives, negatives)``,
    each (B, N, C, H, W). `extra_negatives` (B, K, C, H, W), e.g. the outputs of other
    dehazers as in C2PNet, are appended after the hazy ones.
    """

    def __init__(self, num_positives: int = 1, num_negatives: int = 1, mode: Literal["others", "flip"] = "others"):
        if num_positives < 1 or num_negatives < 0:
            raise ValueError(
                f"num_positives/num_negatives: need >= 1 / >= 0, got {num_positives}/{num_negatives}"
            )
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        self.mode = mode

    def __call__(
        self, hazy: Tensor, clear: Tensor, extra_negatives: Optional[Tensor] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        _check_images("hazy", hazy)
        _check_images("clear", clear)
        if hazy.shape != clear.shape:
            raise ValueError(f"hazy/clear: shapes differ, {tuple(hazy.shape)} vs {tuple(clear.shape)}")
        positives = self._pick(clear, self.num_positives)
        groups = [self._pick(hazy, self.num_negatives)] if self.num_negatives else []
        if extra_negatives is not None:
            groups.append(extra_negatives)
        negatives = stack_samples(*groups) if groups else None
        return positives, negatives

    def _pick(self, images: Tensor, r: int) -> Tensor:
        if r == 1:
            return own_sample(images)
        # In data-parallel training the batch is every process's share of it: the samples are
        # picked from the whole batch, and this process keeps the rows of its own anchors.
        whole, start = distributed.gather_rows(images)
        return batch_samples(whole, r, include_own=True, mode=self.mode)[start:start + images.shape[0]]


def group_patches(
    q: Tensor, k: Tensor, negatives: Literal["image", "batch"] = "image"
) -> tuple[Tensor, Tensor]:
    """Arrange (B, P, C) patch features into groups whose members are each other's negatives.

    "image": one group per image (B, P, C), the official CUT default; "batch": one group of all
    B*P patches (1, B*P, C), CUT's ``--nce_includes_all_negatives_from_minibatch``.
    """
    if negatives == "image":
        return q, k
    if negatives == "batch":
        return q.reshape(1, -1, q.shape[-1]), k.reshape(1, -1, k.shape[-1])
    raise ValueError(f"negatives: expected 'image' or 'batch', got {negatives!r}")


def negative_groups(
    q: Tensor, k: Tensor, negatives: Literal["image", "batch"] = "image"
) -> tuple[Tensor, Tensor, int]:
    """:func:`group_patches`, with "batch" meaning the whole minibatch in data-parallel training
    too (:mod:`lowcon.distributed`): the keys of every process, in rank order.

    Returns:
        (G, M, C) queries, (G, K, C) keys and the key index of the first query's own key: each
        query m's own key (its positive, among the negatives) is key ``start + m``. K = M and
        start = 0 but for "batch" over several processes (K = processes x M).
    """
    q_groups, k_groups = group_patches(q, k, negatives)
    if negatives != "batch":
        return q_groups, k_groups, 0
    keys, start = distributed.gather_rows(k_groups[0])
    return q_groups, keys.unsqueeze(0), start
