"""Anti-aliased resampling layers: blur-pool ``Downsample`` and fixed-filter ``Upsample``.

CUT's generator and discriminator downsample with a stride-1 conv followed by a binomial blur
with stride 2 (Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019), and
upsample with a fixed ``[1, 3, 3, 1]`` transposed filter followed by a 3x3 conv.

Both layers keep their filter in a buffer named ``filt`` of shape ``(C, 1, k, k)``, the name and
shape the official CUT code uses, so official checkpoints load into lowcon's networks unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "zero": "constant"}


def binomial_filter(size: int) -> Tensor:
    """2D binomial blur filter, the outer product of a row of Pascal's triangle, summing to 1.

    Args:
        size: taps per side (3 gives ``[1, 2, 1]``, 4 gives ``[1, 3, 3, 1]``).

    Shape:
        Output: ``(size, size)``, float32.

    Example:
        >>> binomial_filter(3) * 16
        tensor([[1., 2., 1.],
                [2., 4., 2.],
                [1., 2., 1.]])
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


class Downsample(nn.Module):
    """Blur-pool: pad, blur each channel with a binomial filter, keep every ``stride``-th pixel.

    Args:
        channels: number of input (= output) channels.
        filter_size: binomial filter taps per side (3 = ``[1, 2, 1]``, as CUT).
        stride: subsampling factor.
        padding: ``"reflect"`` (CUT), ``"replicate"`` or ``"zero"``.

    Shape:
        Input: ``(B, channels, H, W)``; output: ``(B, channels, ceil(H / stride), ceil(W / stride))``
        for ``filter_size=3, stride=2``.

    Example:
        >>> Downsample(8)(torch.randn(1, 8, 31, 32)).shape
        torch.Size([1, 8, 16, 16])

    Reference:
        Zhang, ICML 2019; ``Downsample`` in the official CUT ``models/networks.py``.
    """

    def __init__(self, channels: int, *, filter_size: int = 3, stride: int = 2, padding: str = "reflect"):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if padding not in _PAD_MODES:
            raise ValueError(f"padding must be one of {sorted(_PAD_MODES)}, got {padding!r}")
        self.channels = channels
        self.stride = stride
        self.padding = padding
        # An even filter cannot be centred: the extra pixel of padding goes to the bottom/right.
        before, after = (filter_size - 1) // 2, filter_size // 2
        self.pad_sizes = (before, after, before, after)
        filt = binomial_filter(filter_size)
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        x = F.pad(x, self.pad_sizes, mode=_PAD_MODES[self.padding])
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)


class Upsample(nn.Module):
    """Fixed x2 upsampling with the ``[1, 3, 3, 1]`` filter, replicate-padded at the border.

    This is the official CUT layer: a depthwise transposed conv with the outer product of
    ``[1, 3, 3, 1] / 4``. Output pixel ``2i`` is ``(x[i-1] + 3 x[i]) / 4`` and ``2i + 1`` is
    ``(3 x[i] + x[i+1]) / 4`` along each axis with edge pixels repeated, which is exactly
    bilinear x2 interpolation with ``align_corners=False``: that is how it is computed here.

    Args:
        channels: number of input (= output) channels.

    Shape:
        Input: ``(B, channels, H, W)``; output: ``(B, channels, 2H, 2W)``.

    Example:
        >>> Upsample(8)(torch.randn(1, 8, 5, 7)).shape
        torch.Size([1, 8, 10, 14])

    Reference:
        ``Upsample`` (``filt_size=4, pad_type='repl'``) in the official CUT ``models/networks.py``.
    """

    def __init__(self, channels: int):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        # x stride**2: the transposed conv spreads each input pixel over 4 outputs, which keeps
        # a constant image constant.
        filt = binomial_filter(4) * 4
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        # The official layer pads by replication and runs a depthwise transposed conv with `filt`;
        # that is bilinear interpolation (tests: to 1e-12 in float64, against the [1, 3, 3, 1]
        # formula too), whose kernel takes half the time on a CPU. `filt` stays a buffer so that
        # official checkpoints load. On the CPU the gradient is `input_grad`'s.
        if x.requires_grad and x.device.type == "cpu":
            return _BilinearUp2x.apply(x, self)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def input_grad(self, grad: Tensor) -> Tensor:
        """The gradient of the input from `grad`, the output's: the adjoint of the upsampling, a
        blur-pool of `grad` replicate-padded by 1, with ``filt`` and stride 2. On a CPU 2.5-3x
        faster than bilinear interpolation's own backward (``benchmarks/bench_layer_ops.py``)."""
        grad = F.pad(grad, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(grad, self.filt.to(grad.dtype), stride=2, groups=self.channels)


class _BilinearUp2x(torch.autograd.Function):
    """Bilinear x2 upsampling whose backward is :meth:`Upsample.input_grad` (differentiable ops,
    so a gradient of the gradient works too)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: Upsample) -> Tensor:  # noqa: D401
        ctx.layer = layer
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.layer.input_grad(grad), None
