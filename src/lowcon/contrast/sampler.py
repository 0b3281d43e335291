"""Patch sampling for PatchNCE: which spatial locations become queries, positives and negatives."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["PatchSampler", "sample_patches"]


def sample_patches(
    feat: Tensor,
    num_patches: int,
    ids: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Gather patch features at random (or given) locations of a feature map.

    Args:
        feat: (B, C, H, W) feature map.
        num_patches: locations to draw without replacement; 0 or more than H*W takes all of them.
        ids: (P,) flat locations to reuse (e.g. those drawn for the source image).
        generator: random generator for the draw.

    Returns:
        patches (B, P, C) and the flat ids (P,) used, the same for every image of the batch.
    """
    if feat.dim() != 4:
        raise ValueError(f"feat: expected (B, C, H, W), got shape {tuple(feat.shape)}")
    b, c, h, w = feat.shape
    flat = feat.flatten(2)  # (B, C, H*W)
    if ids is None:
        if num_patches <= 0 or num_patches >= h * w:
            ids = torch.arange(h * w, device=feat.device)
        else:
            ids = torch.randperm(h * w, generator=generator, device="cpu")[:num_patches].to(feat.device)
    elif ids.dim() != 1 or (ids.numel() and int(ids.max()) >= h * w):
        raise ValueError(f"ids: expected 1-D locations below {h * w}, got shape {tuple(ids.shape)}")
    # Gathered along the last axis of the (B, C, H*W) view, then transposed: the gradient comes
    # back in feat's own layout. Gathering from the transposed (B, H*W, C) view would return it
    # channels-last, and adding it to the network's own gradient (and making that contiguous for the
    # convolution below) costs several passes over the map (about 0.1 s per FastCUT step).
    return flat[:, :, ids].transpose(1, 2), ids


class PatchSampler:
    """Draw `num_patches` locations per layer, shared by the query and key feature maps.

    Example:
        >>> sampler = PatchSampler(num_patches=256)
        >>> k, ids = sampler(feats_src)          # draw  # doctest: +SKIP
        >>> q, _ = sampler(feats_out, ids=ids)   # the same locations in the output  # doctest: +SKIP
    """

    def __init__(self, num_patches: int = 256, generator: Optional[torch.Generator] = None) -> None:
        if num_patches < 0:
            raise ValueError(f"num_patches: must be >= 0 (0 = all locations), got {num_patches}")
        self.num_patches = num_patches
        self.generator = generator

    def __call__(
        self, feats: Sequence[Tensor], ids: Optional[Sequence[Tensor]] = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        if ids is not None and len(ids) != len(feats):
            raise ValueError(f"ids: expected {len(feats)} id tensors (one per layer), got {len(ids)}")
        out, used = [], []
        for i, f in enumerate(feats):
            patches, layer_ids = sample_patches(
                f, self.num_patches, None if ids is None else ids[i], self.generator
            )
            out.append(patches)
            used.append(layer_ids)
        return out, used
