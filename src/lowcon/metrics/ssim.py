"""Structural similarity (SSIM) with a Gaussian window, one value per image.

SSIM is computed on each channel with the local statistics of a normalised Gaussian window and the
map is averaged over pixels and channels (for RGB: the mean of the three channel SSIMs).

Two border conventions are in use and change the number at the third decimal:

- ``padding="same"``: zero padding of window_size // 2, the map keeps the image size. This is the
  FFA-Net / AECR-Net ``metrics.py`` (F.conv2d with padding = window_size // 2), so zeros enter the
  windows at the border.
- ``padding="valid"``: no padding, only windows fully inside the image count. This is Wang et al.'s
  reference code, scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` and pytorch_msssim (used by DehazeFormer).

Statistics are computed in float64: sigma^2 = E[x^2] - mu^2 loses digits in float32.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowcon.metrics.psnr import check_image_pair, reduce_per_image

__all__ = ["gaussian_window", "ssim", "SSIM"]


def gaussian_window(
    window_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Normalised 1-D Gaussian taps centred on window_size // 2: (window_size,)."""
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size: must be a positive odd integer, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma: must be > 0, got {sigma}")
    offsets = torch.arange(window_size, dtype=dtype) - window_size // 2
    taps = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _blur(x: Tensor, taps: Tensor, pad: int) -> Tensor:
    # The 2-D window is the outer product of the taps, so two 1-D passes give the same result
    # (zero padding included) at a fraction of the cost on large test images.
    channels = x.shape[1]
    size = taps.numel()
    rows = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    x = F.conv2d(x, rows, padding=(0, pad), groups=channels)
    return F.conv2d(x, cols, padding=(pad, 0), groups=channels)


def ssim(
    pred: Tensor,
    target: Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: Literal["same", "valid"] = "same",
    reduction: Literal["none", "mean"] = "none",
) -> Tensor:
    """SSIM of each image of a batch, averaged over its channels.

    Args:
        pred: restored images.
        target: reference (clear) images.
        data_range: peak-to-peak range of the data; C1 = (k1 * data_range)^2, C2 = (k2 * data_range)^2.
        window_size: side of the Gaussian window (odd).
        sigma: standard deviation of the Gaussian window, in pixels.
        k1, k2: stabilising constants of Wang et al.
        padding: "same" (zero padding, FFA-Net / AECR-Net) or "valid" (no padding, Wang et al.,
            scikit-image); see the module docstring.
        reduction: "none" gives one value per image, "mean" their average.

    Shape:
        pred, target: (B, C, H, W). Output: (B,) float64, or a scalar for "mean".

    Example:
        >>> clear = torch.rand(2, 3, 32, 32)
        >>> ssim(clear, clear)
        tensor([1., 1.], dtype=torch.float64)

    Reference:
        Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
        visibility to structural similarity", IEEE TIP 2004.
    """
    check_image_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range: must be > 0, got {data_range}")
    taps = gaussian_window(window_size, sigma).to(pred.device)
    if padding == "same":
        pad = window_size // 2
    elif padding == "valid":
        pad = 0
        height, width = pred.shape[-2:]
        if min(height, width) < window_size:
            raise ValueError(
                f"pred: images of {height}x{width} are smaller than the {window_size}x{window_size} "
                "window, so 'valid' padding leaves no window"
            )
    else:
        raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")

    x = pred.to(torch.float64)
    y = target.to(torch.float64)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x = _blur(x, taps, pad)
    mu_y = _blur(y, taps, pad)
    var_x = _blur(x * x, taps, pad) - mu_x**2
    var_y = _blur(y * y, taps, pad) - mu_y**2
    cov_xy = _blur(x * y, taps, pad) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return reduce_per_image(ssim_map.mean(dim=(1, 2, 3)), reduction)


class SSIM(nn.Module):
    """Module form of :func:`ssim`; see there for arguments and shapes."""

    def __init__(
        self,
        data_range: float = 1.0,
        window_size: int = 11,
        sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        padding: Literal["same", "valid"] = "same",
        reduction: Literal["none", "mean"] = "none",
    ) -> None:
        super().__init__()
        self.data_range = data_range
        self.window_size = window_size
        self.sigma = sigma
        self.k1 = k1
        self.k2 = k2
        self.padding = padding
        self.reduction = reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return ssim(
            pred,
            target,
            data_range=self.data_range,
            window_size=self.window_size,
            sigma=self.sigma,
            k1=self.k1,
            k2=self.k2,
            padding=self.padding,
            reduction=self.reduction,
        )
