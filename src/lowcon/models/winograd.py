"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3), forward and backward, in plain torch.

A 3x3, stride-1 convolution over 4x4 output tiles costs 36 multiplications per tile and channel
pair in the Winograd domain instead of 144 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016). The transforms are small matrix products (36x36, 36x9, 16x36); the work is
36 batched matrix products, one per Winograd point, which BLAS runs near peak on a CPU. On this
project's 2-core CPU a 256-channel 64x64 convolution goes from 30 to about 19 ms forward, and its
backward (input and weight gradients, both also in the Winograd domain) from about 80 to 50 ms;
see ``benchmarks/README.md``. It is the same function as ``F.conv2d`` with a relative error of
about 1e-5 instead of 2e-6 (the interpolation points 0, +-1, +-2 are the standard ones).

Scratch memory is bounded: large maps are transformed in bands of tile rows, into buffers reused
from call to call. Nothing is compiled: it runs wherever torch does. :func:`use_winograd` switches the eligible
``nn.Conv2d`` layers of a network to it in place (parameters and state-dict keys unchanged); each
layer falls back to ``F.conv2d`` at run time for inputs the fast path does not cover (not float32,
not on the CPU, under autocast).
"""
from __future__ import annotations

import math
import mmap
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# F(4, 3) with interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _kron(a: list, b: list) -> Tensor:
    return torch.kron(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).float()


# 2D transforms of a flattened tile: input 6x6 -> 36 points, filter 3x3 -> 36, product 36 -> output 4x4.
_INPUT = _kron(_BT, _BT)  # (36, 36)
_FILTER = _kron(_G, _G)  # (36, 9)
_FILTER_FLIPPED = _FILTER.flip(1)  # the same for a filter rotated by 180 degrees
_OUTPUT = _kron(_AT, _AT)  # (16, 36)
# Large maps are transformed in bands of tile rows, so that the scratch buffers stay this small
# (1600x1200 inference would otherwise need about 1 GB of them). Set by set_band_size: 4 MB bands
# lowered the peak of an AECR-Net + CR step by about 0.06 GB, but made it 5-10 % slower (smaller
# matrix products for the 512-channel layers); see benchmarks/README.md.
_BAND_BYTES = 16 * 2 ** 20
# Scratch larger than this (VGG-19's 512-channel transformed filters, a whole padded gradient map
# at 120x120) gets a memory map of its own for the one call instead of a kept buffer. Not lower:
# the page faults of mapping a 256-channel filter (9.4 MB) afresh at each call made a FastCUT step
# about 15 % slower.
_KEPT_BYTES = 16 * 2 ** 20
_MIN_TILES = 64
# Layers with fewer input or output channels stay direct: at 64 channels the transforms cost more
# than the products save (benchmarks/README.md).
WINOGRAD_MIN_CHANNELS = 128


class _Workspace(threading.local):
    """Scratch buffers for the transformed tiles, one per role, kept between calls (per thread).

    The transforms need several maps of 2-2.5x a layer's activation size at a time. Allocated
    afresh at every call they left holes in glibc's heap that raised a FastCUT step's peak RSS by
    0.2-0.3 GB (its live peak did not change). So each role has one buffer, in its own memory map
    outside the heap, reused by every call: at most ``_KEPT_BYTES`` each (the tiles come in bands
    of ``_BAND_BYTES``). Larger scratch gets a map of its own for one call, unmapped when it is
    dropped: kept buffers are resident at the step's peak, and with 16 MB bands and every size
    kept they were 170 MB of an AECR-Net + CR step. Release them with :func:`release_workspace`.
    """

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}
        self.views: dict[tuple, Tensor] = {}

    def get(self, role: str, *shape: int) -> Tensor:
        view = self.views.get((role, shape))
        if view is not None:
            return view
        size = math.prod(shape)
        if size * 4 > _KEPT_BYTES:
            return _mapped_empty(size).view(shape)
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < size:
            self.buffers.pop(role, None)
            self.views = {key: v for key, v in self.views.items() if key[0] != role}
            # Room to spare: a full convolution (the input gradient) has a few more tiles than the
            # forward one, and a buffer that grows leaves a hole where it was.
            buffer = self.buffers[role] = _mapped_empty(size + size // 4)
        view = self.views[(role, shape)] = buffer[:size].view(shape)
        return view


def _mapped_empty(numel: int) -> Tensor:
    """An uninitialised float32 tensor in its own anonymous memory map, outside the malloc heap."""
    return torch.frombuffer(mmap.mmap(-1, max(numel, 1) * 4), dtype=torch.float32)


_workspace = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are made again, as needed, by the next call)."""
    _workspace.buffers.clear()
    _workspace.views.clear()


def set_band_size(megabytes: float) -> None:
    """Transform maps in bands of at most this many MB of transformed tiles (default 16), in this
    process. Smaller bands keep less scratch memory and run smaller, slower matrix products."""
    global _BAND_BYTES
    if not megabytes > 0:
        raise ValueError(f"band size must be > 0 MB, got {megabytes!r}")
    _BAND_BYTES = int(megabytes * 2 ** 20)


def _tile_counts(out_h: int, out_w: int) -> tuple[int, int]:
    return -(-out_h // 4), -(-out_w // 4)


def _band_rows(b: int, channels: int, th: int, tw: int) -> int:
    """Tile rows per band, so that one band's transformed tiles take at most _BAND_BYTES."""
    return max(1, min(th, _BAND_BYTES // (36 * 4 * b * tw * channels)))


def _transform_input(xp: Tensor, rows: int, tw: int) -> Tensor:
    """(B, C, H, W) padded input rows -> (36, C, B * rows * tw): its 6x6 tiles (stride 4) in the
    Winograd domain. Where the tiles overhang `xp` at the bottom or right they read zeros."""
    b, c, h, w = xp.shape
    if h < 4 * rows + 2 or w < 4 * tw + 2:
        whole = _workspace.get("overhang", b, c, 4 * rows + 2, 4 * tw + 2).zero_()
        whole[:, :, :h, :w] = xp
        xp = whole
    tiles = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, rows, tw, 6, 6), a view
    count = b * rows * tw
    flat = _workspace.get("tiles", 6, 6, c, b, rows, tw).copy_(tiles.permute(4, 5, 1, 0, 2, 3))
    return torch.mm(_INPUT, flat.view(36, c * count), out=_workspace.get("input", 36, c * count)).view(36, c, count)


def _transform_filter(weight: Tensor, transposed: bool) -> Tensor:
    """(O, C, 3, 3) -> (36, O, C), or with `transposed` the filter of the input gradient's
    convolution, (36, C, O): rotated by 180 degrees, in and out channels swapped (a view)."""
    o, c = weight.shape[:2]
    points = torch.mm(_FILTER_FLIPPED if transposed else _FILTER, weight.reshape(o * c, 9).t(),
                      out=_workspace.get("filter", 36, o * c)).view(36, o, c)
    return points.transpose(1, 2) if transposed else points


def _conv(xp: Tensor, weight: Tensor, out_h: int, out_w: int, transposed: bool = False) -> Tensor:
    """``F.conv2d(xp, weight)`` cropped to (out_h, out_w), without bias, band of tile rows by
    band; with `transposed` the filter is used as in :func:`_transform_filter`."""
    b, c = xp.shape[:2]
    o = weight.shape[1 if transposed else 0]
    th, tw = _tile_counts(out_h, out_w)
    filt = _transform_filter(weight, transposed)
    y = xp.new_empty(b, o, out_h, out_w)
    rows = _band_rows(b, max(c, o), th, tw)
    for top in range(0, th, rows):
        n = min(rows, th - top)
        count = b * n * tw
        products = torch.bmm(filt, _transform_input(xp[:, :, 4 * top:4 * (top + n) + 2], n, tw),
                             out=_workspace.get("products", 36, o, count))
        tiles = torch.mm(_OUTPUT, products.view(36, o * count), out=_workspace.get("output", 16, o * count))
        tiles = tiles.view(4, 4, o, b, n, tw).permute(3, 2, 4, 0, 5, 1)  # (B, O, n, 4, tw, 4)
        band = y[:, :, 4 * top:4 * (top + n)]
        if band.shape[2] == 4 * n and out_w == 4 * tw:
            band.view(b, o, n, 4, tw, 4).copy_(tiles)
        else:  # the last band or the right edge overhangs the output
            whole = _workspace.get("uncropped", b, o, n, 4, tw, 4).copy_(tiles).view(b, o, 4 * n, 4 * tw)
            band.copy_(whole[:, :, :band.shape[2], :out_w])
    return y


def conv3x3_input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """Gradient of ``F.conv2d(xp, weight)`` (3x3, stride 1, no padding) to `xp`, given `grad` of
    shape (B, O, H - 2, W - 2): the full convolution of `grad` with the rotated, transposed filter."""
    b, o, gh, gw = grad.shape
    th, tw = _tile_counts(gh + 2, gw + 2)
    # Two rows and columns of zeros around `grad`, and more at the bottom and right up to whole tiles.
    padded = _workspace.get("padded_grad", b, o, 4 * th + 2, 4 * tw + 2).zero_()
    padded[:, :, 2:2 + gh, 2:2 + gw] = grad
    return _conv(padded, weight, gh + 2, gw + 2, transposed=True)


def conv3x3_weight_grad(grad: Tensor, xp: Tensor) -> Tensor:
    """Gradient of ``F.conv2d(xp, weight)`` (3x3, stride 1, no padding) to `weight`, in the
    Winograd domain (the transposes of the forward's three steps), summed band by band."""
    b, o, out_h, out_w = grad.shape
    c = xp.shape[1]
    th, tw = _tile_counts(out_h, out_w)
    grad_filter = _workspace.get("grad_filter", 36, o, c)
    rows = _band_rows(b, max(c, o), th, tw)
    for top in range(0, th, rows):
        n = min(rows, th - top)
        count = b * n * tw
        band = grad[:, :, 4 * top:4 * (top + n)]
        if band.shape[2] < 4 * n or out_w < 4 * tw:  # output tiles past the edge get zero gradient
            whole = _workspace.get("grad_overhang", b, o, 4 * n, 4 * tw).zero_()
            whole[:, :, :band.shape[2], :out_w] = band
            band = whole
        tiles = _workspace.get("grad_tiles", 4, 4, o, b, n, tw).copy_(
            band.unfold(2, 4, 4).unfold(3, 4, 4).permute(4, 5, 1, 0, 2, 3))
        grad_products = torch.mm(_OUTPUT.t(), tiles.view(16, o * count),
                                 out=_workspace.get("products", 36, o * count)).view(36, o, count)
        inputs = _transform_input(xp[:, :, 4 * top:4 * (top + n) + 2], n, tw).transpose(1, 2)
        if top == 0:
            torch.bmm(grad_products, inputs, out=grad_filter)
        else:
            grad_filter.baddbmm_(grad_products, inputs)
    grad_weight = torch.mm(_FILTER.t(), grad_filter.view(36, o * c), out=_workspace.get("grad_weight", 9, o * c))
    return grad_weight.t().reshape(o, c, 3, 3)


def conv3x3_backward(grad: Tensor, xp: Tensor, weight: Tensor, need_input: bool, need_weight: bool,
                     need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``F.conv2d(xp, weight, bias)`` (3x3, stride 1, no padding) to `xp`, `weight` and
    `bias` given `grad` to its output, each None where not needed."""
    grad = grad.contiguous()
    return (conv3x3_input_grad(grad, weight) if need_input else None,
            conv3x3_weight_grad(grad, xp) if need_weight else None,
            grad.sum((0, 2, 3)) if need_bias else None)


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D401
        ctx.save_for_backward(xp, weight)
        ctx.has_bias = bias is not None
        y = _conv(xp, weight, xp.shape[-2] - 2, xp.shape[-1] - 2)
        if bias is not None:
            y += bias.view(1, -1, 1, 1)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        xp, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return conv3x3_backward(grad, xp, weight, need_x, need_w, ctx.has_bias and need_b)


def fast_path_applies(x: Tensor, weight: Tensor, padding: int = 0, size: tuple[int, int] | None = None) -> bool:
    """Whether :func:`winograd_conv3x3` should serve ``conv2d(x, weight, padding=padding)``:
    float32 on the CPU, outside autocast, a 3x3 filter of one group, and at least _MIN_TILES
    output tiles (fewer make matrix products too small to gain; measured in benchmarks/README.md).
    `size` is the (H, W) the convolution will read when it is not `x`'s own (x is resampled first)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.ndim == 4 and weight.ndim == 4 and weight.shape[-2:] == (3, 3) and weight.shape[1] == x.shape[1]
            and not torch.is_autocast_enabled("cpu")):
        return False
    height, width = size if size is not None else x.shape[-2:]
    th, tw = _tile_counts(height + 2 * padding - 2, width + 2 * padding - 2)
    return th > 0 and tw > 0 and x.shape[0] * th * tw >= _MIN_TILES


def winograd_conv3x3(xp: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(xp, weight, bias)`` for a 3x3 filter, stride 1, no padding (pad `xp` first).

    Args:
        xp: (B, C, H, W) float32 input, H and W at least 3.
        weight: (O, C, 3, 3).
        bias: optional (O,).

    Shape:
        Output: ``(B, O, H - 2, W - 2)``.

    Example:
        >>> x, w = torch.randn(1, 8, 10, 10), torch.randn(4, 8, 3, 3)
        >>> torch.allclose(winograd_conv3x3(x, w), F.conv2d(x, w), atol=1e-4)
        True

    Reference:
        Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.
    """
    if xp.ndim != 4 or weight.ndim != 4 or weight.shape[-2:] != (3, 3) or weight.shape[1] != xp.shape[1]:
        raise ValueError(f"winograd_conv3x3 needs xp (B, C, H, W) and weight (O, C, 3, 3), "
                         f"got {tuple(xp.shape)} and {tuple(weight.shape)}")
    if min(xp.shape[-2:]) < 3:
        raise ValueError(f"xp height and width must be at least 3, got {tuple(xp.shape[-2:])}")
    return _WinogradConv3x3.apply(xp, weight, bias)


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, one group, zero padding) that runs :func:`winograd_conv3x3`
    where it applies and ``nn.Conv2d``'s own convolution elsewhere. Same parameters, same state dict.
    Made by :func:`use_winograd` from an existing layer."""

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        if ph != pw or not fast_path_applies(x, self.weight, ph):
            return super().forward(x)
        if ph:
            x = F.pad(x, (pw, pw, ph, ph))
        return winograd_conv3x3(x, self.weight, self.bias)


def eligible(conv: nn.Module, min_channels: int) -> bool:
    """Whether `conv` is a plain 3x3 stride-1 ``nn.Conv2d`` with zero padding and at least
    `min_channels` input and output channels (below that the transforms cost more than they save)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def use_winograd(model: nn.Module, min_channels: int = WINOGRAD_MIN_CHANNELS) -> int:
    """Switch every eligible ``nn.Conv2d`` of `model` (see :func:`eligible`) to
    :class:`WinogradConv2d` in place and return how many were switched. Parameters, buffers and
    state-dict keys do not change, so checkpoints load either way."""
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive int, got {min_channels!r}")
    count = 0
    for module in model.modules():
        if eligible(module, min_channels):
            module.__class__ = WinogradConv2d
            count += 1
    return count
