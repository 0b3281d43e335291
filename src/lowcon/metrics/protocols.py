"""Named PSNR/SSIM evaluation protocols.

Dehazing numbers are only comparable under one protocol: the same network scores differently
when SSIM is taken with zero-padded borders, with valid windows, on the Y channel, or after
downsampling. Each protocol here is a frozen dataclass with a ``name``, a one-line
``description`` to print beside every number, and ``evaluate(pred, target)``.

- "ffa" (default): FFA-Net / AECR-Net / C2PNet / DEA-Net ``metrics.py``. Whole image, RGB, both
  images clamped to [0, 1], PSNR on RGB, SSIM with an 11x11 Gaussian window (sigma 1.5),
  zero "same" padding, averaged over the three channels.
- "skimage": scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` per channel, i.e. Wang et al.'s convention with
  valid windows only; PSNR on RGB.
- "y": PSNR and valid-window Gaussian SSIM on the Y channel of YCbCr (ITU-R BT.601 studio swing,
  MATLAB ``rgb2ycbcr``: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255), as in many
  super-resolution and deraining papers. No border is cropped and Y is not rounded to bytes.
- "dehazeformer": DehazeFormer ``test.py``. PSNR on the full-resolution RGB image; SSIM
  (pytorch_msssim: valid windows, 11x11, sigma 1.5) after ``adaptive_avg_pool2d`` to
  (int(H / r), int(W / r)) with r = max(1, round(min(H, W) / 256)), Python's round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lowcon.metrics.psnr import check_image_pair, psnr
from lowcon.metrics.ssim import ssim

__all__ = [
    "EvaluationProtocol",
    "PROTOCOLS",
    "DEFAULT_PROTOCOL",
    "get_protocol",
    "rgb_to_y",
    "dehazeformer_downsample_factor",
]

# ITU-R BT.601 for RGB in [0, 1], Y in [16, 235] / 255 (MATLAB rgb2ycbcr, BasicSR to_y_channel).
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0


def rgb_to_y(images: Tensor) -> Tensor:
    """Luma Y of YCbCr (BT.601 studio swing) of RGB images in [0, 1]: (B, 3, H, W) -> (B, 1, H, W)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: expected (B, 3, H, W) RGB images, got {shape}")
    weights = torch.tensor(_Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def dehazeformer_downsample_factor(height: int, width: int) -> int:
    """DehazeFormer's SSIM downsampling factor max(1, round(min(H, W) / 256)) (Python round)."""
    return max(1, round(min(height, width) / 256))


@dataclass(frozen=True)
class EvaluationProtocol:
    """One way of turning (restored, clear) image pairs into PSNR and SSIM.

    Args:
        name: key in :data:`PROTOCOLS`.
        description: one line naming the conventions, printed beside every number.
        color: "rgb" (all three channels) or "y" (the BT.601 luma only).
        ssim_padding: "same" (zero padding, FFA-Net) or "valid" (Wang et al.).
        ssim_downsample: apply DehazeFormer's average-pool downsampling before SSIM.
        clamp: clamp both images to [0, 1] first (restorations overshoot; the clear image is
            already in range, so clamping it changes nothing on real data).
        window_size, sigma: the Gaussian SSIM window.
    """

    name: str
    description: str
    color: Literal["rgb", "y"] = "rgb"
    ssim_padding: Literal["same", "valid"] = "same"
    ssim_downsample: bool = False
    clamp: bool = True
    window_size: int = 11
    sigma: float = 1.5

    def evaluate(self, pred: Tensor, target: Tensor) -> Dict[str, Tensor]:
        """PSNR (dB) and SSIM of each pair.

        Shape:
            pred, target: (B, C, H, W) in [0, 1] (C = 3 for the "y" protocol).
            Output: dict(psnr=(B,), ssim=(B,)), float64.

        Example:
            >>> scores = get_protocol("ffa").evaluate(restored, clear)  # doctest: +SKIP
            >>> print(f"{scores['psnr'].mean():.2f} dB  [{get_protocol('ffa').description}]")  # doctest: +SKIP
        """
        check_image_pair(pred, target)
        if self.clamp:
            pred = pred.clamp(0.0, 1.0)
            target = target.clamp(0.0, 1.0)
        if self.color == "y":
            pred, target = rgb_to_y(pred), rgb_to_y(target)
        psnr_values = psnr(pred, target, data_range=1.0)
        if self.ssim_downsample:
            height, width = pred.shape[-2:]
            factor = dehazeformer_downsample_factor(height, width)
            size = (int(height / factor), int(width / factor))
            pred = F.adaptive_avg_pool2d(pred, size)
            target = F.adaptive_avg_pool2d(target, size)
        ssim_values = ssim(
            pred,
            target,
            data_range=1.0,
            window_size=self.window_size,
            sigma=self.sigma,
            padding=self.ssim_padding,
        )
        return {"psnr": psnr_values, "ssim": ssim_values}


PROTOCOLS: Dict[str, EvaluationProtocol] = {
    "ffa": EvaluationProtocol(
        name="ffa",
        description=(
            "FFA-Net/AECR-Net protocol: whole image, RGB, clamped to [0,1], "
            "SSIM 11x11 Gaussian sigma 1.5 with zero 'same' padding"
        ),
        color="rgb",
        ssim_padding="same",
    ),
    "skimage": EvaluationProtocol(
        name="skimage",
        description=(
            "scikit-image protocol: whole image, RGB, clamped to [0,1], "
            "SSIM 11x11 Gaussian sigma 1.5, population covariance, valid windows only"
        ),
        color="rgb",
        ssim_padding="valid",
    ),
    "y": EvaluationProtocol(
        name="y",
        description=(
            "Y-channel protocol: whole image, BT.601 luma Y in [16,235]/255, clamped RGB, "
            "SSIM 11x11 Gaussian sigma 1.5 valid windows, no border crop"
        ),
        color="y",
        ssim_padding="valid",
    ),
    "dehazeformer": EvaluationProtocol(
        name="dehazeformer",
        description=(
            "DehazeFormer protocol: PSNR on full-size RGB clamped to [0,1]; SSIM 11x11 Gaussian "
            "valid windows after avg-pool by max(1, round(min(H,W)/256))"
        ),
        color="rgb",
        ssim_padding="valid",
        ssim_downsample=True,
    ),
}

DEFAULT_PROTOCOL = "ffa"


def get_protocol(name: str = DEFAULT_PROTOCOL) -> EvaluationProtocol:
    """The protocol called ``name``; a ValueError lists the valid names."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(PROTOCOLS))
        raise ValueError(f"name: unknown evaluation protocol {name!r}; valid names: {valid}") from None
