"""3x3 and 4x4 convolutions by Winograd's minimal filtering, forward and backward, in plain torch.

A 3x3, stride-1 convolution over 4x4 output tiles, F(4x4, 3x3), costs 36 multiplications per tile
and channel pair in the Winograd domain instead of 144 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016); so does a 4x4 convolution over 3x3 output tiles,
F(3x3, 4x4) (PatchGAN's layers). Both read 6x6 input tiles and use the interpolation points 0, +-1,
+-2 and infinity; their matrices come from the Toom-Cook construction (:func:`toom_cook`).

Each of the three steps is a library call (oneDNN or BLAS) over a whole band of tiles:
- the input transform is a convolution of every channel with 36 fixed 6x6 kernels at stride
  m (the tile's output size), which reads the tiles in place;
- the products are 36 batched matrix products, one per Winograd point (channels by channels);
- the output transform is a (m*m, 36) matrix product, then the tiles are written in place.
The input and weight gradients are computed in the Winograd domain as well. On this project's
2-core CPU a 256-channel 64x64 convolution's forward and backward take about half the time of
``F.conv2d``'s (43 against 90 ms); see ``benchmarks/README.md``. It is the same function as
``F.conv2d`` with a relative error of about 1e-5 instead of 2e-6.

Large maps are transformed in bands of tile rows, so that the transformed tiles of one band take at
most ``winograd_band_mb`` (:func:`set_band_size`). Nothing is compiled: it runs wherever torch does.

:func:`use_winograd` switches the eligible ``nn.Conv2d`` layers of a network to it in place
(parameters and state-dict keys unchanged); each layer falls back to ``F.conv2d`` at run time for
inputs the fast path does not cover (not float32, not on the CPU, under autocast).

Where it is faster, the forward pass and the input gradient run NNPACK's kernels instead, in the
layers that ask for it (``use_winograd(model, nnpack=True)``, the translation configs' ``nnpack``
key; AECR-Net's layers do not):
a hand-written AVX2 library of Winograd F(6x6, 3x3) and FFT convolutions that ships inside torch
(``torch._nnpack_spatial_convolution``; torch itself uses it for inference only). It is 1.2-2x
faster on outputs of 56x56 and more (``benchmarks/bench_conv.py``) and slower on smaller ones,
which keep lowcon's own transforms, as do outputs of more than 512x512 pixels (NNPACK's scratch
grows with the image). The weight gradient is always lowcon's: torch has no NNPACK backward.
:class:`NNPACKConv2d` (:func:`use_nnpack`) does the same for larger filters, such as the
generators' 7x7 convolutions to and from 3 channels, where oneDNN is slow (3-4x); their weight
gradient is aten's or, to few channels, :func:`shifted_weight_grad`'s (2-2.7x faster than aten's
on an AVX-512 CPU). NNPACK runs on its own thread pool: while OpenMP's idle threads spin, the two
pools compete for the cores and a training step gains nothing, so NNPACK serves only when OpenMP
was told to stop spinning soon (``GOMP_SPINCOUNT`` of at most 100000, or
``OMP_WAIT_POLICY=passive``, set before torch loads). ``lowcon train``, ``lowcon translate``,
``lowcon eval --run`` and ``lowcon demo translate`` start themselves again with ``GOMP_SPINCOUNT=20000``
(:func:`lowcon.training.memory.restart_with_process_settings`).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Interpolation points of the 6-point transforms; the sixth is infinity.
POINTS = (0, 1, -1, 2, -2)
TILE = len(POINTS) + 1  # input tile side


def toom_cook(m: int, r: int, points: tuple = POINTS) -> tuple[list, list, list]:
    """Matrices ``(A^T, G, B^T)`` of Winograd's F(m, r) from the Toom-Cook construction with
    `points` and infinity, as exact fractions: ``A^T ((G g) * (B^T d))`` is the correlation of a
    length-(m + r - 1) signal `d` with a length-r filter `g`, m outputs (Lavin & Gray, CVPR 2016).

    Example:
        >>> at, g, bt = toom_cook(2, 3, (0, 1, -1))
        >>> [[int(v) for v in row] for row in bt]
        [[-1, 0, 1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]]
    """
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points!r}")
    pts = [Fraction(p) for p in points]

    def poly_times_root(coeffs: list, root: Fraction) -> list:  # coeffs (ascending) times (x - root)
        return [(coeffs[i - 1] if i else 0) - root * (coeffs[i] if i < len(coeffs) else 0)
                for i in range(len(coeffs) + 1)]

    def product_without(skip: int | None) -> list:  # prod over the points but `skip` of (x - p)
        coeffs = [Fraction(1)]
        for j, p in enumerate(pts):
            if j != skip:
                coeffs = poly_times_root(coeffs, p)
        return coeffs

    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        denom = math.prod((p - q for k, q in enumerate(pts) if k != j), start=Fraction(1))
        g.append([p ** k / denom for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt = [product_without(j) + [Fraction(0)] for j in range(n - 1)] + [product_without(None)]
    return at, g, bt


def _kron(a: list, b: list) -> Tensor:
    def tensor(rows: list) -> Tensor:
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    return torch.kron(tensor(a), tensor(b)).float()


@dataclass(frozen=True)
class _Transforms:
    """F(m x m, r x r) on 6x6 tiles, its 2D matrices in the forms the three steps use."""

    m: int
    r: int
    input_kernels: Tensor  # (36, 1, 6, 6): a tile's 36 Winograd points, as convolution kernels
    filter: Tensor  # (36, r * r): a filter's 36 points
    filter_flipped: Tensor  # the same for the filter rotated by 180 degrees
    output: Tensor  # (m * m, 36): 36 products -> an output tile
    grad_kernels: Tensor  # (36, 1, m, m): an output tile's gradient -> the products' gradient

    @classmethod
    def make(cls, r: int) -> "_Transforms":
        m = TILE + 1 - r
        at, g, bt = toom_cook(m, r)
        flt = _kron(g, g)
        output = _kron(at, at)
        return cls(m, r, _kron(bt, bt).view(36, 1, TILE, TILE), flt, flt.flip(1), output,
                   output.t().reshape(36, 1, m, m).contiguous())


_TRANSFORMS = {3: _Transforms.make(3), 4: _Transforms.make(4)}
KERNEL_SIZES = tuple(_TRANSFORMS)
# Large maps are transformed in bands of tile rows, so that one band's transformed tiles take at
# most this many bytes. Set by set_band_size.
_BAND_BYTES = 16 * 2 ** 20
_MIN_TILES = 64
# Layers with fewer input or output channels stay direct by default (benchmarks/README.md).
WINOGRAD_MIN_CHANNELS = 128


# NNPACK serves the forward pass and the input gradient of outputs at least this wide and high
# (smaller maps are faster with lowcon's transforms; benchmarks/README.md), in the layers that ask.
NNPACK_MIN_SIDE = 56
# ... and at most this many pixels: NNPACK transforms a whole image at once into a scratch buffer
# that torch keeps for the process (about 0.4 GB more peak for a 512x512 translation), where
# lowcon's transforms work in bounded bands.
NNPACK_MAX_PIXELS = 512 * 512
_nnpack_state: dict[str, bool] = {}
# OpenMP spin counts up to this count as "stops spinning soon" (see the module docstring).
_MAX_SPINCOUNT = 100_000


def openmp_spins_briefly(environ: dict | None = None) -> bool:
    """Whether this process's OpenMP threads were told to stop spinning soon after their work
    (``GOMP_SPINCOUNT`` <= 100000 or ``OMP_WAIT_POLICY=passive`` in `environ`, default the process
    environment). OpenMP reads these when torch loads, so they must be set before that."""
    env = os.environ if environ is None else environ
    if env.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    try:
        return int(env.get("GOMP_SPINCOUNT", "")) <= _MAX_SPINCOUNT
    except ValueError:
        return False


def nnpack_works() -> bool:
    """Whether this torch has NNPACK and a small convolution through it matches ``F.conv2d``
    (checked once per process)."""
    if "works" not in _nnpack_state:
        works = False
        try:
            if torch._nnpack_available():  # also initialises NNPACK, which its first call needs
                g = torch.Generator().manual_seed(0)
                x, w = torch.randn(1, 4, 8, 8, generator=g), torch.randn(3, 4, 3, 3, generator=g)
                got = torch._nnpack_spatial_convolution(x, w, None, [1, 1])
                works = torch.allclose(got, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
        except (AttributeError, RuntimeError):
            works = False
        _nnpack_state["works"] = works
    return _nnpack_state["works"]


def nnpack_usable() -> bool:
    """Whether NNPACK can serve the layers that ask for it: working here (:func:`nnpack_works`)
    and OpenMP spinning briefly (:func:`openmp_spins_briefly`)."""
    return openmp_spins_briefly() and nnpack_works()


def _nnpack_serves(out_h: int, out_w: int) -> bool:
    return min(out_h, out_w) >= NNPACK_MIN_SIDE and out_h * out_w <= NNPACK_MAX_PIXELS and nnpack_usable()


def _nnpack_conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` by NNPACK, image by image (its one-image
    path is the fast one)."""
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, [padding, padding])
    return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, [padding, padding])
                      for i in range(x.shape[0])])


def set_band_size(megabytes: float) -> None:
    """Transform maps in bands of at most this many MB of transformed tiles (default 16), in this
    process. Smaller bands take less scratch memory at a time and run smaller matrix products."""
    global _BAND_BYTES
    if not megabytes > 0:
        raise ValueError(f"band size must be > 0 MB, got {megabytes!r}")
    _BAND_BYTES = int(megabytes * 2 ** 20)


def _tile_counts(out_h: int, out_w: int, m: int) -> tuple[int, int]:
    return -(-out_h // m), -(-out_w // m)


def _bands(channels: int, th: int, tw: int) -> list[tuple[int, int]]:
    """``(first tile row, tile rows)`` of each band of one image: as few bands as keep a band's
    transformed tiles within _BAND_BYTES, of sizes that differ by at most one row."""
    rows = max(1, min(th, _BAND_BYTES // (36 * 4 * tw * channels)))
    count = -(-th // rows)
    base, extra = divmod(th, count)
    sizes = [base + (i < extra) for i in range(count)]
    return [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]


def _whole_tiles(x: Tensor, height: int, width: int) -> Tensor:
    """`x` zero-padded at the bottom and right to at least (height, width)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, max(0, width - w), 0, max(0, height - h))) if h < height or w < width else x


def _transform_input(x: Tensor, t: _Transforms, top: int, n: int) -> Tensor:
    """The 6x6 tiles (stride m) of tile rows ``top .. top + n - 1`` of one image `x` (C, H, W),
    whole tiles only, in the Winograd domain: (36, C, n * tiles per row), a view."""
    rows = x[:, t.m * top:t.m * (top + n) + t.r - 1]
    points = F.conv2d(rows.unsqueeze(1), t.input_kernels, stride=t.m)  # (C, 36, n, tiles per row)
    return points.flatten(2).transpose(0, 1)


def _transform_filter(weight: Tensor, t: _Transforms, transposed: bool) -> Tensor:
    """(O, C, r, r) -> (36, O, C), or with `transposed` the filter of the input gradient's
    convolution, (36, C, O): rotated by 180 degrees, in and out channels swapped (a view)."""
    o, c = weight.shape[:2]
    points = torch.mm(t.filter_flipped if transposed else t.filter, weight.reshape(o * c, -1).t()).view(36, o, c)
    return points.transpose(1, 2) if transposed else points


def _conv(xp: Tensor, weight: Tensor, out_h: int, out_w: int, transposed: bool = False) -> Tensor:
    """``F.conv2d(xp, weight)`` cropped to (out_h, out_w), without bias, image by image and band of
    tile rows by band; with `transposed` the filter is used as in :func:`_transform_filter`."""
    t = _TRANSFORMS[weight.shape[-1]]
    b, c = xp.shape[:2]
    o = weight.shape[1 if transposed else 0]
    th, tw = _tile_counts(out_h, out_w, t.m)
    filt = _transform_filter(weight, t, transposed)
    xp = _whole_tiles(xp, t.m * th + t.r - 1, t.m * tw + t.r - 1)
    y = xp.new_empty(b, o, out_h, out_w)
    whole = out_w == t.m * tw
    for i in range(b):
        for top, n in _bands(max(c, o), th, tw):
            products = torch.bmm(filt, _transform_input(xp[i], t, top, n))  # (36, O, n * tw)
            tiles = torch.mm(t.output, products.view(36, -1)).view(t.m, t.m, o, n, tw).permute(2, 3, 0, 4, 1)
            band = y[i, :, t.m * top:t.m * (top + n)]
            if whole and band.shape[1] == t.m * n:
                band.view(o, n, t.m, tw, t.m).copy_(tiles)
            else:  # the last band or the right edge overhangs the output
                band.copy_(tiles.reshape(o, t.m * n, t.m * tw)[:, :band.shape[1], :out_w])
    return y


def conv_input_grad(grad: Tensor, weight: Tensor, padding: int = 0) -> Tensor:
    """Gradient of ``F.conv2d(x, weight, padding=padding)`` (r x r, stride 1, zero padding of at
    most r - 1) to `x`, given `grad` of shape (B, O, H + 2 padding - r + 1, W + 2 padding - r + 1):
    the full convolution of `grad` with the rotated, transposed filter, less the padding's rows and
    columns (they are never computed)."""
    r = weight.shape[-1]
    gh, gw = grad.shape[-2:]
    border = r - 1 - padding
    return _conv(F.pad(grad, (border,) * 4), weight, gh + 2 * border - r + 1, gw + 2 * border - r + 1,
                 transposed=True)


def conv_weight_grad(grad: Tensor, xp: Tensor, kernel_size: int) -> Tensor:
    """Gradient of ``F.conv2d(xp, weight)`` (`kernel_size` square, stride 1, no padding) to
    `weight`, in the Winograd domain (the transposes of the forward's three steps), summed image by
    image and band by band."""
    t = _TRANSFORMS[kernel_size]
    b, o, out_h, out_w = grad.shape
    c = xp.shape[1]
    th, tw = _tile_counts(out_h, out_w, t.m)
    xp = _whole_tiles(xp, t.m * th + t.r - 1, t.m * tw + t.r - 1)
    grad = _whole_tiles(grad, t.m * th, t.m * tw)  # output tiles past the edge get zero gradient
    grad_filter = None
    for i in range(b):
        for top, n in _bands(max(c, o), th, tw):
            rows = grad[i, :, t.m * top:t.m * (top + n)]
            grad_products = F.conv2d(rows.unsqueeze(1), t.grad_kernels, stride=t.m).flatten(2).transpose(0, 1)
            pair = grad_products, _transform_input(xp[i], t, top, n).transpose(1, 2)  # (36, O, T), (36, T, C)
            grad_filter = torch.bmm(*pair) if grad_filter is None else grad_filter.baddbmm_(*pair)
    grad_weight = torch.mm(t.filter.t(), grad_filter.view(36, o * c))
    return grad_weight.t().reshape(o, c, kernel_size, kernel_size)


def shifted_weight_grad(grad: Tensor, xp: Tensor, kernel_size: int) -> Tensor:
    """Gradient of ``F.conv2d(xp, weight)`` (`kernel_size` k square, stride 1, no padding) to
    `weight`, as k matrix products, for filters to few channels (the generators' last 7x7 layer,
    64 -> 3, where oneDNN's weight gradient runs at about 35 GFLOP/s).

    With rows of `xp` (width Wp) laid end to end, output row y, filter row ky reads the input from
    ``(y + ky) * Wp`` on. So `grad`'s rows are first written k times, at column offsets 0 .. k - 1
    into rows of width Wp (zeros elsewhere): (O * k, H * Wp), the filter's columns. The filter's
    row ky is then one product of that matrix with ``xp`` from row ky on, (C, H * Wp), read in
    place. The written matrix is O * k / C times the input's size: this pays where O * k <= C."""
    k = kernel_size
    b, o, h, w = grad.shape
    c, hp, wp = xp.shape[1:]
    if (hp - k + 1, wp - k + 1) != (h, w):
        raise ValueError(f"shifted_weight_grad: grad {tuple(grad.shape)} is not the output of a {k}x{k} filter "
                         f"on {tuple(xp.shape)}")
    columns = grad.new_zeros(b, o, k, h, wp)
    for kx in range(k):
        columns[:, :, kx, :, kx:kx + w] = grad
    columns = columns.view(b, o * k, h * wp)
    rows = xp.contiguous().view(b, c, hp * wp)
    out = grad.new_empty(k, o * k, c)
    for ky in range(k):
        for i in range(b):
            window = rows[i, :, ky * wp:ky * wp + h * wp].t()
            if i == 0:
                torch.mm(columns[i], window, out=out[ky])
            else:
                out[ky].addmm_(columns[i], window)
    return out.view(k, o, k, c).permute(1, 3, 0, 2).contiguous()  # (ky, o, kx, c) -> (o, c, ky, kx)


def _output_size(x: Tensor, weight: Tensor, padding: int) -> tuple[int, int]:
    r = weight.shape[-1]
    return x.shape[-2] + 2 * padding - r + 1, x.shape[-1] + 2 * padding - r + 1


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, nnpack: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, square filter): with `nnpack`
    NNPACK where it serves the output, else lowcon's Winograd for 3x3 and 4x4 filters, else
    ``F.conv2d``."""
    out_h, out_w = _output_size(x, weight, padding)
    if nnpack and _nnpack_serves(out_h, out_w):
        return _nnpack_conv(x.contiguous(), weight.contiguous(), bias, padding)
    if weight.shape[-1] not in KERNEL_SIZES:
        return F.conv2d(x, weight, bias, padding=padding)
    y = _conv(F.pad(x, (padding,) * 4) if padding else x, weight, out_h, out_w)
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


def conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int, need_input: bool, need_weight: bool,
                  need_bias: bool, nnpack: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, square filter) to
    `x`, `weight` and `bias` given `grad` to its output, each None where not needed.

    The input gradient is the convolution of `grad` with the rotated, transposed filter: with
    `nnpack` by NNPACK where it serves `x`'s size, else by lowcon's Winograd (3x3, 4x4) or aten. The weight and bias
    gradients: lowcon's Winograd for 3x3 and 4x4 filters, :func:`shifted_weight_grad` for larger filters to few
    channels (out channels times the filter's side at most the in channels), aten (oneDNN) for the others."""
    grad = grad.contiguous()
    r = weight.shape[-1]
    winograd = r in KERNEL_SIZES
    grad_x = grad_w = grad_b = None
    if need_input:
        if nnpack and _nnpack_serves(*x.shape[-2:]):
            grad_x = _nnpack_conv(grad, weight.flip(2, 3).transpose(0, 1).contiguous(), None, r - 1 - padding)
        elif winograd:
            grad_x = conv_input_grad(grad, weight, padding)
        else:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [padding] * 2, [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
    if winograd:
        if need_weight:
            grad_w = conv_weight_grad(grad, F.pad(x, (padding,) * 4) if padding else x, r)
        if need_bias:
            grad_b = grad.sum((0, 2, 3))
    elif need_weight and weight.shape[0] * r <= weight.shape[1]:  # few output channels (see shifted_weight_grad)
        grad_w = shifted_weight_grad(grad, F.pad(x, (padding,) * 4) if padding else x, r)
        grad_b = grad.sum((0, 2, 3)) if need_bias else None
    elif need_weight or need_bias:
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if need_bias else None, [1, 1], [padding] * 2, [1, 1], False, [0, 0],
            1, [False, need_weight, need_bias])
    return grad_x, grad_w if need_weight else None, grad_b if need_bias else None


class _FastConv(torch.autograd.Function):
    """:func:`conv_forward` and :func:`conv_backward` as one Function. Keeps the unpadded input
    for backward; a padded copy lives only inside each call."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, nnpack: bool) -> Tensor:  # noqa: D401
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.padding, ctx.nnpack = bias is not None, padding, nnpack
        return conv_forward(x, weight, bias, padding, nnpack)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (*conv_backward(grad, x, weight, ctx.padding, need_x, need_w, ctx.has_bias and need_b, ctx.nnpack),
                None, None)


_state = threading.local()


@contextmanager
def direct() -> Iterator[None]:
    """Inside this block (in this thread) :class:`WinogradConv2d` layers run ``F.conv2d``, whose
    graph can be differentiated twice; the Winograd Functions' backward cannot (an R1 penalty needs
    the gradient of a gradient). :func:`lowcon.models.fused.unfused` enters it too."""
    previous = getattr(_state, "direct", False)
    _state.direct = True
    try:
        yield
    finally:
        _state.direct = previous


def in_direct() -> bool:
    """Whether this thread is inside :func:`direct`."""
    return getattr(_state, "direct", False)


def _fast_path_input(x: Tensor, weight: Tensor) -> bool:
    """What both fast paths need: float32 on the CPU, outside autocast and :func:`direct`, a
    (B, C, H, W) input and a square (O, C, r, r) filter of one group."""
    return (not in_direct() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.ndim == 4 and weight.ndim == 4
            and weight.shape[-2] == weight.shape[-1] and weight.shape[1] == x.shape[1]
            and not torch.is_autocast_enabled("cpu"))


def fast_path_applies(x: Tensor, weight: Tensor, padding: int = 0, size: tuple[int, int] | None = None) -> bool:
    """Whether :func:`winograd_conv` should serve ``conv2d(x, weight, padding=padding)``: float32
    on the CPU, outside autocast and :func:`direct`, a 3x3 or 4x4 filter of one group, padding below the filter's
    size, and at least _MIN_TILES output tiles (fewer make matrix products too small to gain;
    measured in benchmarks/README.md). `size` is the (H, W) the convolution will read when it is not `x`'s own (x is resampled first)."""
    if not _fast_path_input(x, weight) or weight.shape[-1] not in KERNEL_SIZES:
        return False
    r = weight.shape[-1]
    if not 0 <= padding < r:
        return False
    height, width = size if size is not None else x.shape[-2:]
    th, tw = _tile_counts(height + 2 * padding - r + 1, width + 2 * padding - r + 1, _TRANSFORMS[r].m)
    return th > 0 and tw > 0 and x.shape[0] * th * tw >= _MIN_TILES


def winograd_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 0, *,
                  nnpack: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` for a 3x3 or 4x4 filter, stride 1.

    Args:
        x: (B, C, H, W) float32 input, H and W plus twice `padding` at least the filter's size r.
        weight: (O, C, r, r), r = 3 or 4.
        bias: optional (O,).
        padding: zeros on each side, at most r - 1.
        nnpack: run the forward pass and the input gradient by NNPACK where it serves the map
            (``NNPACK_MIN_SIDE`` .. ``NNPACK_MAX_PIXELS``) and :func:`nnpack_usable`.

    Shape:
        Output: ``(B, O, H + 2 padding - r + 1, W + 2 padding - r + 1)``.

    Example:
        >>> x, w = torch.randn(1, 8, 10, 10), torch.randn(4, 8, 3, 3)
        >>> torch.allclose(winograd_conv(x, w, padding=1), F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-3)
        True

    Reference:
        Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.
    """
    if (x.ndim != 4 or weight.ndim != 4 or weight.shape[-1] not in KERNEL_SIZES
            or weight.shape[-2] != weight.shape[-1] or weight.shape[1] != x.shape[1]):
        raise ValueError(f"winograd_conv needs x (B, C, H, W) and weight (O, C, r, r) with r in "
                         f"{KERNEL_SIZES}, got {tuple(x.shape)} and {tuple(weight.shape)}")
    r = weight.shape[-1]
    if not 0 <= padding < r:
        raise ValueError(f"padding must be in 0..{r - 1} for a {r}x{r} filter, got {padding!r}")
    if min(x.shape[-2:]) + 2 * padding < r:
        raise ValueError(f"x height and width plus padding must be at least {r}, got {tuple(x.shape[-2:])} "
                         f"and padding {padding}")
    return _FastConv.apply(x, weight, bias, padding, nnpack)


class _FastConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (stride 1, one group, zero padding) that runs :class:`_FastConv` where its
    class's `applies` says so and ``nn.Conv2d``'s own convolution elsewhere; through NNPACK where
    it serves if `nnpack` (a per-layer flag, not saved: set by :func:`use_winograd`). Same
    parameters, same state dict."""

    applies: staticmethod  # (x, weight, padding) -> bool, set by each subclass
    nnpack: bool = False

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        if ph != pw or not self.applies(x, self.weight, ph):
            return super().forward(x)
        return _FastConv.apply(x, self.weight, self.bias, ph, self.nnpack)


class WinogradConv2d(_FastConv2d):
    """A 3x3 or 4x4 layer that runs :func:`winograd_conv` where :func:`fast_path_applies` (with its
    `nnpack` flag, NNPACK where it serves, else lowcon's Winograd). Made by :func:`use_winograd`
    from an existing layer."""

    applies = staticmethod(fast_path_applies)


# -- larger filters: NNPACK's FFT for the forward pass and the input gradient -------------------
# oneDNN is slow on convolutions to or from 3 channels with 7x7 filters (the generators' first
# and last layers); NNPACK's FFT kernels are 3-4x faster there (benchmarks/README.md).
NNPACK_MIN_KERNEL = 5


def nnpack_applies(x: Tensor, weight: Tensor, padding: int = 0, size: tuple[int, int] | None = None) -> bool:
    """Whether :func:`nnpack_conv` should serve ``conv2d(x, weight, padding=padding)``: float32 on
    the CPU, outside autocast and :func:`direct`, a square filter of one group, padding below its
    size, an output of at least ``NNPACK_MIN_SIDE`` each way, and :func:`nnpack_usable`. `size`:
    the (H, W) the convolution reads when it is not `x`'s own."""
    if not _fast_path_input(x, weight):
        return False
    r = weight.shape[-1]
    height, width = size if size is not None else x.shape[-2:]
    return 0 <= padding < r and _nnpack_serves(height + 2 * padding - r + 1, width + 2 * padding - r + 1)


def nnpack_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 0) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, square filter) with the forward
    pass and the input gradient by NNPACK where it serves (:func:`conv_backward`); the weight
    gradient by aten, by :func:`shifted_weight_grad` to few channels, or by lowcon's Winograd for 3x3
    and 4x4 filters.

    Example:
        >>> x, w = torch.randn(1, 8, 12, 12), torch.randn(3, 8, 7, 7)
        >>> torch.allclose(nnpack_conv(x, w, padding=3), F.conv2d(x, w, padding=3), rtol=1e-4, atol=1e-3)
        True
    """
    return _FastConv.apply(x, weight, bias, padding, True)


class NNPACKConv2d(_FastConv2d):
    """A layer with a square filter of ``NNPACK_MIN_KERNEL`` or more that runs :func:`nnpack_conv`
    where :func:`nnpack_applies`. Made by :func:`use_nnpack` from an existing layer."""

    applies = staticmethod(nnpack_applies)
    nnpack = True


def _plain_stride_1(conv: nn.Module) -> bool:
    """Whether `conv` is a plain ``nn.Conv2d`` (not a subclass) of stride 1, one group, no
    dilation and numeric zero padding: what both fast layers replace."""
    return (type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def use_nnpack(model: nn.Module) -> int:
    """Switch every plain stride-1 ``nn.Conv2d`` of `model` with a square filter of
    ``NNPACK_MIN_KERNEL`` or more (one group, zero padding) to :class:`NNPACKConv2d` in place and
    return how many were switched. Parameters and state-dict keys do not change. They run NNPACK
    where :func:`nnpack_usable`, else ``nn.Conv2d``'s own convolution."""
    count = 0
    for module in model.modules():
        if _plain_stride_1(module) and module.kernel_size[0] == module.kernel_size[1] >= NNPACK_MIN_KERNEL:
            module.__class__ = NNPACKConv2d
            count += 1
    return count


def eligible(conv: nn.Module, min_channels: int) -> bool:
    """Whether `conv` is a plain 3x3 or 4x4 stride-1 ``nn.Conv2d`` with zero padding and at least
    `min_channels` input and output channels (below that the transforms cost more than they save)."""
    return (_plain_stride_1(conv) and conv.kernel_size in ((3, 3), (4, 4))
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def use_winograd(model: nn.Module, min_channels: int = WINOGRAD_MIN_CHANNELS, *, nnpack: bool = False) -> int:
    """Switch every eligible ``nn.Conv2d`` of `model` (see :func:`eligible`) to
    :class:`WinogradConv2d` in place and return how many were switched. Parameters, buffers and
    state-dict keys do not change, so checkpoints load either way. With `nnpack` the switched
    layers run their forward pass and input gradient by NNPACK where it serves (these layers
    only: other networks in the process are not affected)."""
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive int, got {min_channels!r}")
    count = 0
    for module in model.modules():
        if eligible(module, min_channels):
            module.__class__ = WinogradConv2d
            module.nnpack = bool(nnpack)
            count += 1
    return count
