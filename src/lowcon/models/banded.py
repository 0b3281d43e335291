"""A generator's forward pass over large images in bands of rows, with the same result.

Run in one pass, the ResNet generator keeps whole feature maps of ngf = 64 channels at the
image's full size, and its up steps make 128-channel ones (3 and 6 GB for a 12-megapixel photo,
4000 x 3000, plus the copies the convolutions make): translating such a photo needs more than
24 GB. Tiles would change the result, because every instance norm takes its statistics over
the whole map.

:func:`run_in_bands` runs a list of layers so that each norm still sees the whole map, in place,
while the layers between two norms that look at a neighbourhood (padding, convolutions, blur-pool,
upsampling, transposed convolutions) run as one chain, band of output rows by band. Each band is
computed from the rows of the last whole map that it needs, so the maps inside a chain (the padded
copies, the upsampled 128-channel map) never exist whole. With a 12-megapixel photo the peak is
the two whole maps around one chain instead of every map of the pass. A norm named in
``streamed`` does not make its map whole either: it gathers its statistics in a first pass over
its chain and normalises each band as the next chain reads it. Between stages the freed maps are
given back to the system (:func:`lowcon.training.memory.release_free_memory`). The output is
the one-pass forward's, up to the order of float sums (tests: to 1e-10 in float64).

Layers it does not know run as themselves on the whole map; a layer can run itself in bands by
defining ``forward_in_bands(x, band_bytes)`` (``ResnetBlock`` does).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowcon.models.blur import Downsample, Upsample
from lowcon.models.fused import instance_norm_
from lowcon.models.winograd import NNPACKConv2d, WinogradConv2d, conv_forward
from lowcon.training.memory import release_free_memory

__all__ = ["run_in_bands"]

_PAD_LAYERS = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate", nn.ZeroPad2d: "constant"}
_DOWNSAMPLE_MODES = {"reflect": "reflect", "replicate": "replicate", "zero": "constant"}


class _Rows:
    """A (B, C, H, W) map known by its rows: ``rows(start, stop)`` is rows start..stop - 1,
    0 <= start < stop <= height. `cost` is the bytes a band of the chain up to this map holds
    per row of this map (what sets the band's height)."""

    shape: tuple[int, int, int, int]
    cost: float
    dtype: torch.dtype

    @property
    def height(self) -> int:
        return self.shape[2]

    def rows(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def _row_bytes(self) -> int:
        b, c, _, w = self.shape
        return b * c * w * 4


class _Whole(_Rows):
    def __init__(self, x: Tensor):
        self.x, self.shape, self.cost, self.dtype = x, tuple(x.shape), 0.0, x.dtype

    def rows(self, start: int, stop: int) -> Tensor:
        return self.x[:, :, start:stop]


class _Pad(_Rows):
    """`source` padded by (left, right, top, bottom) in `mode` (F.pad's names)."""

    def __init__(self, source: _Rows, sizes: Sequence[int], mode: str):
        self.source, self.mode = source, mode
        self.dtype = source.dtype
        self.left, self.right, self.top, self.bottom = sizes
        b, c, h, w = source.shape
        self.shape = (b, c, h + self.top + self.bottom, w + self.left + self.right)
        self.cost = max(self._row_bytes(), source.cost)

    def _source_row(self, row: int) -> int:
        """The source row that padded row `row` (in source coordinates) repeats."""
        h = self.source.height
        if self.mode == "reflect":
            return -row if row < 0 else (2 * (h - 1) - row if row >= h else row)
        return min(max(row, 0), h - 1)  # replicate

    def rows(self, start: int, stop: int) -> Tensor:
        first, last = start - self.top, stop - self.top  # in the source's rows
        h = self.source.height
        if self.mode == "constant":
            lo, hi = max(first, 0), min(last, h)
            if hi <= lo:
                b, c, _, w = self.shape
                return self.source.rows(0, 1).new_zeros(b, c, stop - start, w)
            return F.pad(self.source.rows(lo, hi), (self.left, self.right, lo - first, last - hi))
        index = [self._source_row(r) for r in range(first, last)]
        lo, hi = min(index), max(index) + 1
        band = self.source.rows(lo, hi)
        if index != list(range(lo, hi)):
            band = band.index_select(2, torch.tensor(index, device=band.device) - lo)
        return F.pad(band, (self.left, self.right, 0, 0), mode=self.mode) if self.left or self.right else band


class _Conv(_Rows):
    """`conv` (its weight, bias, stride, groups) over `source`, which holds its padding."""

    def __init__(self, source: _Rows, conv: nn.Module, weight: Tensor, bias: Tensor | None, stride: int, groups: int):
        self.source, self.conv, self.weight, self.bias = source, conv, weight, bias
        self.dtype = source.dtype
        self.stride, self.groups = stride, groups
        k = weight.shape[-1]
        b, _, h, w = source.shape
        self.shape = (b, weight.shape[0], (h - k) // stride + 1, (w - k) // stride + 1)
        self.cost = max(self._row_bytes(), source.cost * stride)

    def rows(self, start: int, stop: int) -> Tensor:
        k = self.weight.shape[-1]
        band = self.source.rows(start * self.stride, (stop - 1) * self.stride + k)
        conv = self.conv
        if isinstance(conv, (WinogradConv2d, NNPACKConv2d)) and conv.applies(band, self.weight, 0):
            return conv_forward(band.contiguous(), self.weight, self.bias, 0, conv.nnpack)  # the layer's fast path
        return F.conv2d(band, self.weight, self.bias, self.stride, 0, 1, self.groups)


class _Upsample(_Rows):
    """:class:`Upsample`: bilinear x2 (align_corners=False), edge rows repeated. Output row 2i
    reads input rows i - 1 and i, row 2i + 1 rows i and i + 1."""

    def __init__(self, source: _Rows):
        self.source = source
        self.dtype = source.dtype
        b, c, h, w = source.shape
        self.shape = (b, c, 2 * h, 2 * w)
        self.cost = max(self._row_bytes(), source.cost / 2)

    def rows(self, start: int, stop: int) -> Tensor:
        h = self.source.height
        lo, hi = (start - 1) // 2, stop // 2 + 1  # input rows, one beyond on each side
        band = self.source.rows(max(lo, 0), min(hi, h))
        band = F.pad(band, (0, 0, max(0, -lo), max(0, hi - h)), mode="replicate")
        # Rows 2 lo and 2 hi - 1 of the band's upsampling would read past the band; they are not used.
        up = F.interpolate(band, scale_factor=2, mode="bilinear", align_corners=False)
        return up[:, :, start - 2 * lo:stop - 2 * lo]


class _ConvTranspose(_Rows):
    """``nn.ConvTranspose2d`` (one dilation, output padding at most the padding): output row r
    is the sum over input rows i and filter rows ky with r = i * stride - padding + ky."""

    def __init__(self, source: _Rows, conv: nn.ConvTranspose2d):
        self.source, self.conv = source, conv
        self.dtype = source.dtype
        (self.stride, sw), (self.padding, pw) = conv.stride, conv.padding
        b, _, h, w = source.shape
        k, (_, kw), (oph, opw) = conv.kernel_size[0], conv.kernel_size, conv.output_padding
        self.shape = (b, conv.out_channels, (h - 1) * self.stride - 2 * self.padding + k + oph,
                      (w - 1) * sw - 2 * pw + kw + opw)
        self.cost = max(self._row_bytes(), source.cost / self.stride)

    def rows(self, start: int, stop: int) -> Tensor:
        conv, s, p, k = self.conv, self.stride, self.padding, self.conv.kernel_size[0]
        lo = max(-(-(start + p - k + 1) // s), 0)  # the first input row that reaches row `start`
        hi = min((stop - 1 + p) // s + 1, self.source.height)
        out = F.conv_transpose2d(self.source.rows(lo, hi), conv.weight, conv.bias, (s, conv.stride[1]),
                                 (0, conv.padding[1]), (0, conv.output_padding[1]), conv.groups)
        # its row t is output row lo * s - p + t; rows past its end get no input, only the bias
        first = start - lo * s + p
        return out[:, :, first:first + stop - start]


class _Normed(_Rows):
    """Instance norm (no affine) of the chain `source`, without its whole map: each image's and
    channel's mean and variance from one pass over `source` in bands (each band's own mean and
    centred sum of squares, in float64, merged by Chan, Golub and LeVeque's pairwise update), then
    every band normalised as it is read. The chain up to here runs twice."""

    def __init__(self, source: _Rows, eps: float, band_bytes: int):
        self.source, self.shape, self.dtype = source, source.shape, source.dtype
        self.cost = max(self._row_bytes(), source.cost)
        count, mean, m2 = 0, None, None
        for start, stop in _bands(source, band_bytes):
            band = source.rows(start, stop).double()
            n = band.shape[2] * band.shape[3]
            band_mean = band.mean(dim=(2, 3))
            band_m2 = (band - band_mean[:, :, None, None]).square_().sum(dim=(2, 3))
            if mean is None:
                mean, m2 = band_mean, band_m2
            else:
                delta, total = band_mean - mean, count + n
                mean = mean + delta * (n / total)
                m2 = m2 + band_m2 + delta.square() * (count * n / total)
            count += n
        invstd = (m2 / count + eps).rsqrt()
        self.mean = mean.to(self.dtype)[:, :, None, None]
        self.invstd = invstd.to(self.dtype)[:, :, None, None]

    def rows(self, start: int, stop: int) -> Tensor:
        return self.source.rows(start, stop).sub(self.mean).mul_(self.invstd)


class _Relu(_Rows):
    """ReLU of a normalised chain's rows (fresh tensors, so in place)."""

    def __init__(self, source: _Normed):
        self.source, self.shape, self.dtype, self.cost = source, source.shape, source.dtype, source.cost

    def rows(self, start: int, stop: int) -> Tensor:
        return self.source.rows(start, stop).relu_()


def _plain_instance_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.InstanceNorm2d) and not layer.affine and not layer.track_running_stats


def _chain(source: _Rows, layer: nn.Module) -> _Rows | None:
    """`layer` applied to `source` as a band-wise map, or None where it is not a neighbourhood
    layer this module knows."""
    if type(layer) in _PAD_LAYERS:
        return _Pad(source, layer.padding, _PAD_LAYERS[type(layer)])
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str) \
            and layer.dilation == (1, 1) and layer.stride[0] == layer.stride[1] \
            and layer.kernel_size[0] == layer.kernel_size[1]:
        ph, pw = layer.padding
        padded = _Pad(source, (pw, pw, ph, ph), "constant") if ph or pw else source
        return _Conv(padded, layer, layer.weight, layer.bias, layer.stride[0], layer.groups)
    if isinstance(layer, Downsample):
        padded = _Pad(source, layer.pad_sizes, _DOWNSAMPLE_MODES[layer.padding])
        return _Conv(padded, layer, layer.filt.to(source.dtype), None, layer.stride, layer.channels)
    if isinstance(layer, Upsample):
        return _Upsample(source)
    if isinstance(layer, nn.ConvTranspose2d) and layer.dilation == (1, 1) and layer.padding_mode == "zeros" \
            and layer.output_padding[0] <= layer.padding[0] and layer.kernel_size[0] >= layer.stride[0]:
        return _ConvTranspose(source, layer)
    return None


def _bands(source: _Rows, band_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the bands of `source`'s rows that hold at most about `band_bytes` each
    (at least one row)."""
    step = max(1, int(band_bytes // max(source.cost, 1)))
    for start in range(0, source.height, step):
        yield start, min(start + step, source.height)


def _whole(source: _Rows, band_bytes: int) -> Tensor:
    """Every row of `source`, computed in bands of at most about `band_bytes` each."""
    if isinstance(source, _Whole):
        return source.x
    out = None
    for start, stop in _bands(source, band_bytes):
        band = source.rows(start, stop)
        if out is None:
            out = band.new_empty(source.shape)
        out[:, :, start:stop] = band
    return out


def _on_whole_map(layer: nn.Module, x: Tensor, owned: bool, band_bytes: int) -> Tensor:
    """`layer` on the whole map `x`; in place where `x` is this pass's own (`owned`)."""
    if _plain_instance_norm(layer):
        return instance_norm_(x if owned else x.clone(), layer.eps)[0]
    if isinstance(layer, nn.ReLU):
        return x.relu_() if owned else x.relu()
    if isinstance(layer, nn.Tanh):
        return x.tanh_() if owned else x.tanh()
    if isinstance(layer, nn.Identity) or (isinstance(layer, nn.Dropout) and not layer.training):
        return x
    if hasattr(layer, "forward_in_bands"):
        return layer.forward_in_bands(x, band_bytes)
    return layer(x)


@torch.no_grad()
def run_in_bands(layers: Sequence[nn.Module], x: Tensor, band_bytes: int = 64 * 2 ** 20,
                 streamed: frozenset[int] = frozenset()) -> Tensor:
    """``nn.Sequential(*layers)(x)`` under ``torch.no_grad``, with the neighbourhood layers between
    two whole-map layers run band of rows by band (module docstring).

    Args:
        layers: the layers, in order.
        x: (B, C, H, W) input; not changed.
        band_bytes: about how many bytes one band of a chain holds; smaller bands take less memory
            and run more, smaller convolutions.
        streamed: indices of instance norms (no affine) that normalise their chain band by band
            from statistics gathered in a first pass over it, instead of making its whole map:
            the chain is computed twice. A ReLU right after such a norm joins the chain.

    Returns:
        a new tensor, the layers' output.
    """
    if band_bytes < 1:
        raise ValueError(f"band_bytes must be >= 1, got {band_bytes!r}")
    source: _Rows = _Whole(x)
    owned = False  # whether x is this pass's own map, which may change in place
    for index, layer in enumerate(layers):
        chained = _chain(source, layer)
        if chained is not None:
            source = chained
            continue
        if index in streamed and _plain_instance_norm(layer) and not isinstance(source, _Whole):
            source = _Normed(source, layer.eps, band_bytes)
            continue
        if isinstance(layer, nn.ReLU) and isinstance(source, _Normed):
            source = _Relu(source)
            continue
        if not isinstance(source, _Whole):
            x, owned = _whole(source, band_bytes), True
        source = None  # the chain, and the map it read, can go
        release_free_memory()  # and leave the process's resident memory (glibc keeps it otherwise)
        y = _on_whole_map(layer, x, owned, band_bytes)
        owned = owned or y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        x, source = y, _Whole(y)
    if not isinstance(source, _Whole):
        return _whole(source, band_bytes)
    return x if owned else x.clone()
