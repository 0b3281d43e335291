"""Dark Channel Prior dehazing (He et al.), the classic prior-based baseline.

Haze model: ``I = J * t + A * (1 - t)``. In most patches of a haze-free outdoor image some
colour channel is nearly zero (the dark channel prior), so the dark channel of ``I / A`` is about
``1 - t``. The steps:

1. dark channel: min over RGB, then min over a ``patch x patch`` window;
2. atmospheric light ``A``: from the input pixels at the top 0.1% of the dark channel;
3. transmission ``t = 1 - omega * dark(I / A)`` (omega < 1 keeps a little haze for depth);
4. refine ``t`` with a guided filter guided by the grey input (replaces soft matting);
5. ``J = (I - A) / max(t, t0) + A``, clamped to [0, 1].

All functions work on batches of torch tensors in [0, 1], on any device, without gradients
being needed (they are differentiable almost everywhere all the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "dark_channel",
    "estimate_atmospheric_light",
    "box_filter",
    "guided_filter",
    "estimate_transmission",
    "dehaze_dcp",
    "DarkChannelPrior",
]

# ITU-R BT.601 luma weights (MATLAB's rgb2gray), the grey guide of the reference implementation.
_GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _check_images(name: str, x: Tensor, channels: int | None = 3) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [0, 1], got {x.dtype}")


def dark_channel(img: Tensor, patch: int = 15) -> Tensor:
    """Dark channel: min over channels, then min over a ``patch x patch`` window.

    Windows are cut at the image border (only pixels inside the image count).

    Args:
        img: images in [0, 1].
        patch: odd window size.

    Shape:
        (B, C, H, W) -> (B, 1, H, W)

    Example:
        >>> dark_channel(torch.rand(1, 3, 32, 32), patch=15).shape
        torch.Size([1, 1, 32, 32])
    """
    _check_images("img", img, channels=None)
    if not isinstance(patch, int) or patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch: expected a positive odd int, got {patch!r}")
    darkest = img.amin(dim=1, keepdim=True)
    # max_pool2d pads with -inf, so a min filter through it ignores pixels outside the image.
    return -F.max_pool2d(-darkest, kernel_size=patch, stride=1, padding=patch // 2)


def estimate_atmospheric_light(
    img: Tensor, dark: Tensor, top: float = 0.001, method: str = "mean"
) -> Tensor:
    """Atmospheric light from the haziest pixels: the top ``top`` fraction of the dark channel.

    Args:
        img: hazy images in [0, 1].
        dark: their dark channel (see ``dark_channel``).
        top: fraction of pixels kept (at least one pixel).
        method: ``"mean"``: the mean colour of those pixels (robust to a single bright
            object); ``"brightest"``: the colour of the brightest of them (by channel sum), as
            in He et al.'s paper.

    Shape:
        img (B, C, H, W), dark (B, 1, H, W) -> (B, C, 1, 1)
    """
    _check_images("img", img, channels=None)
    batch, channels, height, width = img.shape
    if dark.shape != (batch, 1, height, width):
        raise ValueError(
            f"dark: expected shape {(batch, 1, height, width)}, got {tuple(dark.shape)}"
        )
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top: expected a fraction in (0, 1], got {top}")
    if method not in ("mean", "brightest"):
        raise ValueError(f"method: expected 'mean' or 'brightest', got {method!r}")
    n_top = max(1, int(height * width * top))
    indices = dark.flatten(1).topk(n_top, dim=1).indices  # (B, n_top)
    pixels = img.flatten(2).gather(2, indices.unsqueeze(1).expand(-1, channels, -1))
    if method == "mean":
        light = pixels.mean(dim=2)
    else:
        brightest = pixels.sum(dim=1).argmax(dim=1)  # (B,)
        light = pixels[torch.arange(batch, device=img.device), :, brightest]
    return light.view(batch, channels, 1, 1)


def box_filter(x: Tensor, radius: int) -> Tensor:
    """Mean over the ``(2 radius + 1)^2`` window around each pixel, cut at the image border.

    Cumulative sums along H then W: the cost per pixel does not depend on ``radius``. The sums
    are taken in float64 so that large images keep their precision.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """
    _check_images("x", x, channels=None)
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius: expected a non-negative int, got {radius!r}")
    out = x.double()
    counts = []
    for dim in (2, 3):
        size = out.shape[dim]
        cumsum = F.pad(out.cumsum(dim), (0, 0, 1, 0) if dim == 2 else (1, 0))
        index = torch.arange(size, device=x.device)
        lo = (index - radius).clamp_min(0)
        hi = (index + radius + 1).clamp_max(size)
        out = cumsum.index_select(dim, hi) - cumsum.index_select(dim, lo)
        counts.append((hi - lo).double())
    count = counts[0].view(-1, 1) * counts[1].view(1, -1)
    return (out / count).to(x.dtype)


def guided_filter(guide: Tensor, src: Tensor, radius: int, eps: float) -> Tensor:
    """He et al.'s guided filter: an edge-preserving smoothing of ``src`` that follows ``guide``.

    In each window the output is a linear function ``a * guide + b`` of the guide, fitted to
    ``src`` by ridge regression (``eps`` penalises ``a``); the coefficients of all windows that
    cover a pixel are averaged.

    Args:
        guide: guidance image, one channel or as many as ``src`` (channel-wise guidance).
        src: image to filter.
        radius: window radius (window side ``2 radius + 1``), cut at the image border.
        eps: regularisation; larger means smoother.

    Shape:
        guide (B, 1 or C, H, W), src (B, C, H, W) -> (B, C, H, W)

    Reference:
        He, Sun, Tang, Guided Image Filtering, TPAMI 2013, Algorithm 1.
    """
    _check_images("guide", guide, channels=None)
    _check_images("src", src, channels=None)
    if guide.shape[0] != src.shape[0] or guide.shape[2:] != src.shape[2:] or (
        guide.shape[1] not in (1, src.shape[1])
    ):
        raise ValueError(
            f"guide: expected (B, 1 or {src.shape[1]}, H, W) matching src {tuple(src.shape)}, "
            f"got {tuple(guide.shape)}"
        )
    if eps < 0:
        raise ValueError(f"eps: expected a non-negative value, got {eps}")
    mean_guide = box_filter(guide, radius)
    mean_src = box_filter(src, radius)
    cov = box_filter(guide * src, radius) - mean_guide * mean_src
    var = box_filter(guide * guide, radius) - mean_guide * mean_guide
    a = cov / (var + eps)
    b = mean_src - a * mean_guide
    return box_filter(a, radius) * guide + box_filter(b, radius)


def estimate_transmission(
    hazy: Tensor, light: Tensor, patch: int = 15, omega: float = 0.95
) -> Tensor:
    """Coarse transmission ``1 - omega * dark(hazy / light)``.

    Shape:
        hazy (B, 3, H, W), light (B, 3, 1, 1) -> (B, 1, H, W)
    """
    return 1.0 - omega * dark_channel(hazy / light.clamp_min(1e-6), patch)


def dehaze_dcp(
    hazy: Tensor,
    patch: int = 15,
    omega: float = 0.95,
    t0: float = 0.1,
    radius: int = 60,
    eps: float = 1e-4,
    top: float = 0.001,
    airlight: str = "mean",
) -> Tensor:
    """Dehaze with the dark channel prior and a guided-filter refined transmission.

    Args:
        hazy: hazy RGB images in [0, 1].
        patch: dark channel window (odd).
        omega: fraction of haze removed (keeps distant objects looking distant).
        t0: lower bound of the transmission (avoids amplifying noise in dense haze).
        radius: guided filter radius (the paper's 60 suits images of about 600 pixels).
        eps: guided filter regularisation.
        top: fraction of the darkest-channel-brightest pixels used for the atmospheric light.
        airlight: ``"mean"`` or ``"brightest"``, see ``estimate_atmospheric_light``.

    Shape:
        (B, 3, H, W) -> (B, 3, H, W) in [0, 1]

    Example:
        >>> dehaze_dcp(torch.rand(1, 3, 32, 32), radius=8).shape
        torch.Size([1, 3, 32, 32])

    Reference:
        He, Sun, Tang, Single Image Haze Removal Using Dark Channel Prior, CVPR 2009 / TPAMI 2011.
    """
    _check_images("hazy", hazy)
    if not 0.0 < omega <= 1.0:
        raise ValueError(f"omega: expected a value in (0, 1], got {omega}")
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"t0: expected a value in (0, 1], got {t0}")
    light = estimate_atmospheric_light(hazy, dark_channel(hazy, patch), top, airlight)
    coarse = estimate_transmission(hazy, light, patch, omega)
    weights = torch.tensor(_GREY_WEIGHTS, dtype=hazy.dtype, device=hazy.device).view(1, 3, 1, 1)
    grey = (hazy * weights).sum(dim=1, keepdim=True)
    transmission = guided_filter(grey, coarse, radius, eps).clamp_min(t0)
    return ((hazy - light) / transmission + light).clamp(0.0, 1.0)


class DarkChannelPrior(nn.Module):
    """``dehaze_dcp`` as a parameter-free module, usable wherever a dehazing network is.

    Args: as ``dehaze_dcp``.

    Shape:
        (B, 3, H, W) -> (B, 3, H, W) in [0, 1]; any H, W (``size_multiple`` = 1).

    Example:
        >>> dcp = DarkChannelPrior(radius=8)
        >>> dcp(torch.rand(2, 3, 30, 30)).shape
        torch.Size([2, 3, 30, 30])
    """

    size_multiple: int = 1

    def __init__(
        self,
        *,
        patch: int = 15,
        omega: float = 0.95,
        t0: float = 0.1,
        radius: int = 60,
        eps: float = 1e-4,
        top: float = 0.001,
        airlight: str = "mean",
    ) -> None:
        super().__init__()
        self.patch, self.omega, self.t0 = patch, omega, t0
        self.radius, self.eps, self.top, self.airlight = radius, eps, top, airlight

    def forward(self, hazy: Tensor) -> Tensor:
        return dehaze_dcp(hazy, patch=self.patch, omega=self.omega, t0=self.t0,
                          radius=self.radius, eps=self.eps, top=self.top, airlight=self.airlight)

    def extra_repr(self) -> str:
        return (f"patch={self.patch}, omega={self.omega}, t0={self.t0}, radius={self.radius}, "
                f"eps={self.eps}, top={self.top}, airlight={self.airlight!r}")
