"""Peak signal-to-noise ratio (PSNR), one value per image.

PSNR = 10 * log10(data_range^2 / MSE), with the MSE taken over all channels and pixels of one
image. The squared error is accumulated in float64, so a 620x460 image in float32 gives the same
number as scikit-image's float64 computation.

The result is +inf for identical images. FFA-Net and AECR-Net return 100 dB in that case; a
dataset average that meets an exact copy is therefore not comparable across the two codebases
(a case that does not arise on real restorations).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["psnr", "PSNR"]


def check_image_pair(pred: Tensor, target: Tensor) -> None:
    """Raise a one-line error unless pred and target are (B, C, H, W) tensors of one shape."""
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}"
        )


def reduce_per_image(values: Tensor, reduction: str) -> Tensor:
    """Apply a metric's ``reduction`` ("none" or "mean") to its (B,) per-image values."""
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction: expected 'none' or 'mean', got {reduction!r}")


def psnr(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    reduction: Literal["none", "mean"] = "none",
) -> Tensor:
    """PSNR in dB of each image of a batch.

    Args:
        pred: restored images.
        target: reference (clear) images.
        data_range: peak-to-peak range of the data (1.0 for images in [0, 1], 255 for bytes).
        reduction: "none" gives one value per image, "mean" their average.

    Shape:
        pred, target: (B, C, H, W). Output: (B,) float64, or a scalar for "mean".

    Example:
        >>> clear = torch.full((2, 3, 8, 8), 0.5)
        >>> psnr(clear + 0.1, clear)   # uniform error 0.1 -> MSE 0.01 -> 20 dB
        tensor([20.0000, 20.0000], dtype=torch.float64)

    Reference:
        The usual definition; scikit-image ``peak_signal_noise_ratio`` gives the same values.
    """
    check_image_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range: must be > 0, got {data_range}")
    error = pred.to(torch.float64) - target.to(torch.float64)
    mse = error.pow(2).mean(dim=(1, 2, 3))
    values = 10.0 * torch.log10(float(data_range) ** 2 / mse)
    return reduce_per_image(values, reduction)


class PSNR(nn.Module):
    """Module form of :func:`psnr`; see there for arguments and shapes."""

    def __init__(self, data_range: float = 1.0, reduction: Literal["none", "mean"] = "none") -> None:
        super().__init__()
        self.data_range = data_range
        self.reduction = reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return psnr(pred, target, data_range=self.data_range, reduction=self.reduction)
