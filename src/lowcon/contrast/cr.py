"""Contrastive regularization (CR) of AECR-Net.

For each embedding layer i with weight w_i:

    w_i * D(f_i(out), f_i(positive)) / (D(f_i(out), f_i(negative)) + eps)

with D the mean absolute difference, summed over layers. The output is pulled towards the clear
image and pushed away from the hazy input in the embedding space.
"""
from __future__ import annotations

from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import distributed

__all__ = ["ContrastiveRegularization", "contrastive_regularization", "AECR_LAYER_WEIGHTS"]

AECR_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


class _MeanAbsDiff(torch.autograd.Function):
    """Per-sample mean |anchor - sample| with gradient to the anchor only.

    Autograd's ``(a - s).abs().mean()`` keeps the whole float difference for backward; only its
    sign is needed, so this keeps the sign as int8 (a quarter of the memory, for every layer,
    positive and negative of every CR step).
    """

    @staticmethod
    def forward(ctx, anchor: Tensor, sample: Tensor) -> Tensor:  # noqa: D401
        diff = anchor - sample
        ctx.save_for_backward(torch.sign(diff).to(torch.int8))
        ctx.dtype = anchor.dtype
        return diff.abs_().flatten(1).mean(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sign,) = ctx.saved_tensors
        scale = grad.to(ctx.dtype) / sign[0].numel()
        return sign.to(ctx.dtype) * scale.view(-1, *([1] * (sign.dim() - 1))), None


def _l1_per_sample(anchor: Tensor, samples: Tensor) -> Tensor:
    """(B, C, H, W) anchor vs (B, N, C, H, W) samples -> (B, N) mean absolute differences."""
    # A loop over N keeps the peak memory at one (B, C, H, W) difference per layer.
    return torch.stack(
        [_MeanAbsDiff.apply(anchor, samples[:, n].detach().to(anchor.dtype)) for n in range(samples.shape[1])],
        dim=1,
    )


def _reduce(distances: Tensor, weights: Optional[Tensor], reduction: str) -> Tensor:
    # distances: (B, N). The batch is averaged first, as the official L1 (mean over the whole
    # batch tensor) does; then the N samples are summed or averaged. In data-parallel training
    # the batch is every process's rows.
    if weights is not None:
        distances = distances * weights
    per_sample = distributed.mean_over_batch(distances)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def contrastive_regularization(
    out_feats: Sequence[Tensor],
    positive_feats: Sequence[Tensor],
    negative_feats: Optional[Sequence[Tensor]] = None,
    layer_weights: Sequence[float] = AECR_LAYER_WEIGHTS,
    negative_weights: Optional[Tensor] = None,
    reduction: Literal["mean", "sum"] = "mean",
    eps: float = 1e-7,
) -> Tensor:
    """CR from features already computed.

    Args:
        out_feats: per layer (B, C, H, W) features of the restored image (the anchor).
        positive_feats: per layer (B, P, C, H, W) features of the positives (detached here).
        negative_feats: per layer (B, N, C, H, W) features of the negatives; ``None`` gives the
            ablation without negatives (a plain weighted perceptual L1, "CR*" in Table 2).
        layer_weights: w_i, one per layer.
        negative_weights: (N,) or (B, N) weights of the negatives (e.g. C2PNet's hardness).
        reduction: how the distances to several positives or negatives are combined: "mean"
            (as the PyTorch author describes 1:r) or "sum" (as the MindSpore port does).
        eps: added to the denominator, 1e-7 as released.

    Returns:
        scalar loss.
    """
    if len(out_feats) != len(layer_weights) or len(positive_feats) != len(out_feats):
        raise ValueError(
            f"layer_weights: {len(layer_weights)} weights for {len(out_feats)} anchor layers "
            f"and {len(positive_feats)} positive layers"
        )
    if negative_feats is not None and len(negative_feats) != len(out_feats):
        raise ValueError(f"negative_feats: {len(negative_feats)} layers, expected {len(out_feats)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    loss = out_feats[0].new_zeros(())
    for i, (w, anchor) in enumerate(zip(layer_weights, out_feats)):
        pos = positive_feats[i].detach()
        if pos.dim() != 5 or pos.shape[0] != anchor.shape[0] or pos.shape[2:] != anchor.shape[1:]:
            raise ValueError(
                f"positive_feats[{i}]: expected (B, P, {', '.join(map(str, anchor.shape[1:]))}) "
                f"with B={anchor.shape[0]}, got {tuple(pos.shape)}"
            )
        neg_distances = None
        if negative_feats is not None:
            neg = negative_feats[i].detach()
            if neg.dim() != 5 or neg.shape[0] != anchor.shape[0] or neg.shape[2:] != anchor.shape[1:]:
                raise ValueError(
                    f"negative_feats[{i}]: expected (B, N, {', '.join(map(str, anchor.shape[1:]))}) "
                    f"with B={anchor.shape[0]}, got {tuple(neg.shape)}"
                )
            neg_distances = _l1_per_sample(anchor, neg)
        term = _layer_term(_l1_per_sample(anchor, pos), neg_distances, negative_weights, reduction, eps)
        loss = loss + w * term
    return loss


def _layer_term(pos_distances: Tensor, neg_distances: Optional[Tensor], negative_weights: Optional[Tensor],
                reduction: str, eps: float) -> Tensor:
    """One layer's D(out, positives) / (D(out, negatives) + eps) from (B, P) and (B, N) distances
    (the numerator alone without negatives)."""
    term = _reduce(pos_distances, None, reduction)
    if neg_distances is None:
        return term
    b, n = neg_distances.shape
    weights = _check_negative_weights(negative_weights, b, n, neg_distances)
    return term / (_reduce(neg_distances, weights, reduction) + eps)


def _check_negative_weights(weights: Optional[Tensor], b: int, n: int, like: Tensor) -> Optional[Tensor]:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if weights.shape == (n,):
        return weights.expand(b, n)
    if weights.shape == (b, n):
        return weights
    raise ValueError(f"negative_weights: expected shape ({n},) or ({b}, {n}), got {tuple(weights.shape)}")


class ContrastiveRegularization(nn.Module):
    """AECR-Net's contrastive regularization around any feature network.

    Args:
        embedding: module mapping (B, 3, H, W) images to a list of feature maps, e.g.
            :class:`lowcon.VGG19Features`. It is kept frozen by the caller.
        layer_weights: one weight per feature map; default [1/32, 1/16, 1/8, 1/4, 1].
        use_negatives: ``False`` drops the denominator (Table 2's "CR w/o negatives").
        reduction: "mean" or "sum" over several positives / negatives (see
            :func:`contrastive_regularization`).
        eps: denominator offset.

    Shape:
        out: (B, C, H, W); positive: (B, C, H, W) or (B, P, C, H, W); negative: (B, C, H, W)
        or (B, N, C, H, W); negative_weights: (N,) or (B, N). Returns a scalar.

    Example:
        >>> cr = ContrastiveRegularization(VGG19Features(weights="imagenet"))  # doctest: +SKIP
        >>> loss = l1(out, clear) + 0.1 * cr(out, positive=clear, negative=hazy)  # doctest: +SKIP

    Reference:
        Wu et al., Contrastive Learning for Compact Single Image Dehazing, CVPR 2021.
    """

    def __init__(
        self,
        embedding: nn.Module,
        layer_weights: Sequence[float] = AECR_LAYER_WEIGHTS,
        use_negatives: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        self.embedding = embedding
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.use_negatives = use_negatives
        self.reduction = reduction
        self.eps = eps

    def forward(
        self,
        out: Tensor,
        positive: Tensor,
        negative: Optional[Tensor] = None,
        negative_weights: Optional[Tensor] = None,
    ) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ValueError(f"out: expected (B, C, H, W), got {_shape(out)}")
        positive = _as_samples("positive", positive, out)
        if self.use_negatives:
            if negative is None:
                raise ValueError("negative: required unless use_negatives=False")
            negative = _as_samples("negative", negative, out)
        else:
            negative = None
        out_feats = self.embedding(out)
        if len(out_feats) != len(self.layer_weights):
            raise ValueError(
                f"layer_weights: {len(self.layer_weights)} weights but the embedding returns "
                f"{len(out_feats)} feature maps"
            )
        samples = positive if negative is None else torch.cat([positive, negative], dim=1)
        # distances[i][n]: (B,) mean |f_i(out) - f_i(sample n)|, positives first. Each set of
        # samples goes through the embedding on its own, without gradient, and each of its
        # layers is dropped once its distance is taken (only an int8 sign stays, for backward):
        # on top of the anchor's graph, the step's peak memory, only one batch of B images and
        # one layer at a time is alive, not every layer of every sample.
        distances: list[list[Tensor]] = [[] for _ in out_feats]
        for n in range(samples.shape[1]):
            with torch.no_grad():
                feats = self._iter_features(samples[:, n])
            for i, anchor in enumerate(out_feats):
                with torch.no_grad():
                    feat = next(feats, None)
                if feat is None or feat.shape != anchor.shape:
                    raise ValueError(
                        f"embedding: layer {i} of the samples has shape {None if feat is None else tuple(feat.shape)}, "
                        f"out's has {tuple(anchor.shape)}"
                    )
                distances[i].append(_MeanAbsDiff.apply(anchor, feat.to(anchor.dtype)))
                del feat
        n_pos = positive.shape[1]
        loss = out_feats[0].new_zeros(())
        for w, per_sample in zip(self.layer_weights, distances):
            d = torch.stack(per_sample, dim=1)
            neg = d[:, n_pos:] if negative is not None else None
            loss = loss + w * _layer_term(d[:, :n_pos], neg, negative_weights, self.reduction, self.eps)
        return loss

    def _iter_features(self, x: Tensor) -> Iterator[Tensor]:
        if hasattr(self.embedding, "iter_features"):
            return self.embedding.iter_features(x)
        return iter(self.embedding(x))


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _as_samples(name: str, x: Tensor, out: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        raise ValueError(f"{name}: expected (B, C, H, W) or (B, N, C, H, W), got {_shape(x)}")
    if x.dim() == 4:
        x = x.unsqueeze(1)
    if x.shape[0] != out.shape[0] or x.shape[2:] != out.shape[1:]:
        raise ValueError(
            f"{name}: shape {tuple(x.shape)} does not match out {tuple(out.shape)} "
            f"(expected (B, N, {', '.join(map(str, out.shape[1:]))}) with B={out.shape[0]})"
        )
    return x
