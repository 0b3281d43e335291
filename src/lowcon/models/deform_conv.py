"""Modulated deformable convolution (DCNv2) written as bilinear sampling plus one matmul.

``torchvision.ops.deform_conv2d`` is the reference op, but on CPU its backward kernel is the
slowest single op of an AECR-Net training step (about 40 % of the step at 240x240, batch 2) and
it has no bfloat16 kernel. :func:`sampled_deform_conv2d` computes the same function from
vectorised aten ops:

1. the sampling position of every tap at every output pixel, ``base + offset``;
2. one ``grid_sample`` (bilinear, zeros outside the image: exactly DCN's interpolation) that
   gathers a ``(B, C, k*k, H_out, W_out)`` column tensor;
3. the per-tap modulation mask, and one matmul with the weight.

The backward pass is written out by hand and recomputes the columns instead of keeping them:
only the inputs are saved, so it holds less memory than keeping the graph, and the column
tensor is processed in bands of output rows of bounded size (large images, inference
included).

Offsets follow torchvision's layout: channel ``2*t`` is the row (dy) and ``2*t + 1`` the
column (dx) offset of tap ``t = i * k_w + j``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sampled_deform_conv2d", "COLUMN_CHUNK_ELEMENTS"]

#: Upper bound on the elements of one chunk of the (B, C, k*k, H, W) column tensor (32 MB fp32).
COLUMN_CHUNK_ELEMENTS = 8 * 1024 * 1024

_Pair = Union[int, tuple[int, int]]


def _pair(value: _Pair, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) for v in pair):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _sampling_grid(offset: Tensor, in_hw: tuple[int, int], kernel: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], row_start: int = 0) -> Tensor:
    # Normalised (x, y) grid of shape (B, taps * rows, W_out, 2) for grid_sample with
    # align_corners=False, where pixel p sits at (2p + 1) / size - 1. `offset` holds the output
    # rows row_start, row_start + 1, ... of the full offset map.
    b, _, out_h, out_w = offset.shape
    (h, w), (k_h, k_w) = in_hw, kernel
    taps = k_h * k_w
    kw = dict(dtype=offset.dtype, device=offset.device)
    tap_y = (torch.arange(k_h, **kw) * dilation[0]).repeat_interleave(k_w).view(1, taps, 1, 1)
    tap_x = (torch.arange(k_w, **kw) * dilation[1]).repeat(k_h).view(1, taps, 1, 1)
    rows = (torch.arange(row_start, row_start + out_h, **kw) * stride[0] - padding[0]).view(1, 1, out_h, 1)
    cols = (torch.arange(out_w, **kw) * stride[1] - padding[1]).view(1, 1, 1, out_w)
    y = rows + tap_y + offset[:, 0::2]
    x = cols + tap_x + offset[:, 1::2]
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    return grid.view(b, taps * out_h, out_w, 2)


def _row_bands(b: int, c: int, taps: int, out_h: int, out_w: int) -> list[slice]:
    # Bands of output rows whose (B, C, taps, rows, W_out) columns stay under the chunk bound.
    per_row = max(1, b * c * taps * out_w)
    step = max(1, min(out_h, COLUMN_CHUNK_ELEMENTS // per_row))
    return [slice(start, min(start + step, out_h)) for start in range(0, out_h, step)]


def _columns(x: Tensor, grid: Tensor, taps: int, rows: int) -> Tensor:
    # (B, C, taps, rows, W_out): bilinear samples, zero outside the image like DCN.
    b, c = x.shape[:2]
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.view(b, c, taps, rows, grid.shape[2])


class _SampledDeformConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation):  # noqa: D401
        b, c, h, w = x.shape
        out_ch, _, k_h, k_w = weight.shape
        taps = k_h * k_w
        out_h, out_w = offset.shape[-2:]
        weight_flat = weight.reshape(out_ch, c * taps)
        out = x.new_empty(b, out_ch, out_h, out_w)
        for band in _row_bands(b, c, taps, out_h, out_w):
            rows = band.stop - band.start
            grid = _sampling_grid(offset[:, :, band], (h, w), (k_h, k_w), stride, padding, dilation, band.start)
            cols = _columns(x, grid, taps, rows)
            if mask is not None:
                cols.mul_(mask[:, :, band].unsqueeze(1))
            out[:, :, band] = torch.matmul(weight_flat, cols.view(b, c * taps, rows * out_w)).view(
                b, out_ch, rows, out_w)
            del cols
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        b, c, h, w = x.shape
        out_ch, _, k_h, k_w = weight.shape
        taps = k_h * k_w
        out_h, out_w = offset.shape[-2:]
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_mask = need_mask and mask is not None
        weight_flat = weight.reshape(out_ch, c * taps)

        grad_x = torch.zeros_like(x) if need_x else None
        grad_offset = torch.zeros_like(offset) if need_offset else None
        grad_mask = torch.zeros_like(mask) if need_mask else None
        grad_weight = torch.zeros_like(weight_flat) if need_weight else None
        x_in = x.detach().requires_grad_(need_x)
        for band in _row_bands(b, c, taps, out_h, out_w):
            rows = band.stop - band.start
            grid = _sampling_grid(offset[:, :, band], (h, w), (k_h, k_w), stride, padding, dilation, band.start)
            track = need_x or need_offset
            with torch.enable_grad():
                grid_in = grid.detach().requires_grad_(need_offset)
                cols = _columns(x_in, grid_in, taps, rows) if track else None
            cols_data = cols.detach() if track else _columns(x, grid, taps, rows)
            band_mask = mask[:, :, band].unsqueeze(1) if mask is not None else None
            grad_band = grad_out[:, :, band].reshape(b, out_ch, rows * out_w)
            if grad_weight is not None:
                modulated = cols_data * band_mask if band_mask is not None else cols_data
                grad_weight += torch.matmul(grad_band, modulated.view(b, c * taps, -1).transpose(1, 2)).sum(0)
                del modulated
            if not (track or need_mask):
                continue
            # d loss / d (modulated columns): (B, C, taps, rows, W_out)
            grad_cols = torch.matmul(weight_flat.t(), grad_band).view(b, c, taps, rows, out_w)
            if need_mask:
                grad_mask[:, :, band] = (grad_cols * cols_data).sum(1)
            if track:
                if band_mask is not None:
                    grad_cols.mul_(band_mask)
                inputs = [t for t, need in ((x_in, need_x), (grid_in, need_offset)) if need]
                grads = list(torch.autograd.grad(cols, inputs, grad_cols))
                if need_x:
                    grad_x += grads.pop(0)
                if need_offset:
                    # grid = ((2x + 1) / W - 1, (2y + 1) / H - 1), x = ... + dx, y = ... + dy
                    g = grads.pop(0).view(b, taps, rows, out_w, 2)
                    grad_offset[:, 0::2, band] = g[..., 1] * (2.0 / h)
                    grad_offset[:, 1::2, band] = g[..., 0] * (2.0 / w)
            del cols, cols_data, grad_cols

        grad_bias = grad_out.sum(dim=(0, 2, 3)) if (need_bias and ctx.has_bias) else None
        if grad_weight is not None:
            grad_weight = grad_weight.view_as(weight)
        return grad_x, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None


def sampled_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Deformable convolution v1/v2, the same function as ``torchvision.ops.deform_conv2d``.

    Args:
        input: (B, C, H, W).
        offset: (B, 2*k_h*k_w, H_out, W_out), (dy, dx) per tap; one offset group only.
        weight: (C_out, C, k_h, k_w); groups are not supported.
        bias: (C_out,) or None.
        stride, padding, dilation: as in ``conv2d``.
        mask: (B, k_h*k_w, H_out, W_out) modulation (DCNv2), or None (DCNv1).

    Returns:
        (B, C_out, H_out, W_out).

    Example:
        >>> x, w = torch.rand(1, 2, 5, 5), torch.rand(4, 2, 3, 3)
        >>> zero = torch.zeros(1, 18, 5, 5)
        >>> torch.allclose(sampled_deform_conv2d(x, zero, w, padding=1),
        ...                F.conv2d(x, w, padding=1), atol=1e-5)
        True
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"input, weight: expected 4-D tensors, got shapes {tuple(input.shape)} "
                         f"and {tuple(weight.shape)}")
    b, c, h, w = input.shape
    out_ch, in_ch, k_h, k_w = weight.shape
    if in_ch != c:
        raise ValueError(f"weight: expected {c} input channels (grouped conv is not supported), "
                         f"got shape {tuple(weight.shape)}")
    out_h = (h + 2 * padding[0] - dilation[0] * (k_h - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (k_w - 1) - 1) // stride[1] + 1
    taps = k_h * k_w
    if tuple(offset.shape) != (b, 2 * taps, out_h, out_w):
        raise ValueError(f"offset: expected shape {(b, 2 * taps, out_h, out_w)} (one offset group), "
                         f"got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (b, taps, out_h, out_w):
        raise ValueError(f"mask: expected shape {(b, taps, out_h, out_w)}, got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (out_ch,):
        raise ValueError(f"bias: expected shape {(out_ch,)}, got {tuple(bias.shape)}")
    dtype = torch.promote_types(input.dtype, weight.dtype)
    if torch.is_autocast_enabled(input.device.type) or dtype in (torch.float16, torch.bfloat16):
        # Sampling positions need fp32 (bf16 resolves 1/128 of the image); under autocast
        # the op runs in fp32 and the next layer casts back.
        dtype = torch.float32
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    with torch.autocast(input.device.type, enabled=False):
        return _SampledDeformConv2d.apply(cast(input), cast(offset), cast(mask), cast(weight),
                                          cast(bias), stride, padding, dilation)
