"""Convolutions in bfloat16 inside float32 networks on the CPU: ``bf16: true`` of the translation
configs.

On a CPU with native bf16 (AVX512-BF16, AMX) oneDNN's bf16 convolutions run about twice as fast
as its float32 ones, but no faster than lowcon's float32 Winograd and NNPACK layers
(:mod:`lowcon.models.winograd`), which autocast would turn off along with the fused norm runs
(:mod:`lowcon.models.fused`). So inside :func:`bf16_convolutions` only the convolutions those
kernels do not serve compute in bf16: strided and transposed convolutions (CycleGAN's resampling,
the discriminators' strided layers) and the stride-1 ones left to aten (fewer than 64 channels in
or out, such as the discriminators' first and last layers; the 7x7 ones when NNPACK is off). In
CUT and FastCUT almost every convolution is Winograd's or NNPACK's, so they gain nothing
(benchmarks/README.md). Their input and filter are rounded to bf16, oneDNN accumulates in float32,
and the output, rounded to bf16, comes back as float32, as under autocast; the bias is added in
float32. Norms, activations, losses, the Winograd and NNPACK layers and the optimiser stay
float32. Backward computes the input and weight gradients in bf16 the same way from the bf16
copies kept in forward (half the memory of float32 ones).

Nothing changes outside the block (translation, evaluation), under autocast, on a GPU, for other
dtypes, nor inside :func:`lowcon.models.winograd.direct` (graphs differentiated twice).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lowcon.models.winograd import in_direct

_state = threading.local()


@contextmanager
def bf16_convolutions(enabled: bool = True) -> Iterator[None]:
    """Inside this block (in this thread) the convolutions that take part (:func:`bf16_conv` where
    :func:`bf16_active`, the layers of :func:`use_bf16_convolutions`, the fused runs' strided
    and plain convolutions) compute in bfloat16. Backward needs no block: each convolution keeps
    what it decided in forward.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, stride=2)
        >>> _ = use_bf16_convolutions(conv)
        >>> x = torch.randn(1, 4, 9, 9)
        >>> with bf16_convolutions():
        ...     y = conv(x)
        >>> y.dtype, torch.allclose(y, nn.functional.conv2d(x, conv.weight, conv.bias, 2), rtol=0.05, atol=0.05)
        (torch.float32, True)
    """
    previous = getattr(_state, "on", False)
    _state.on = bool(enabled)
    try:
        yield
    finally:
        _state.on = previous


def bf16_active(x: Tensor) -> bool:
    """Whether a convolution of `x` computes in bf16 here: inside :func:`bf16_convolutions`, `x`
    float32 on the CPU, outside autocast and :func:`lowcon.models.winograd.direct`."""
    return (getattr(_state, "on", False) and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not in_direct())


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * 2


def conv_forward_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                      padding: Sequence[int], transposed: bool = False,
                      output_padding: Sequence[int] = (0, 0)) -> Tensor:
    """The convolution (``transposed``: the transposed one) of `x` and `weight` rounded to bf16,
    accumulated in float32 by oneDNN, returned as float32 (its values rounded to bf16), plus
    `bias` in float32. One group, no dilation."""
    y = torch.ops.aten.convolution(x.to(torch.bfloat16), weight.to(torch.bfloat16), None, _pair(stride),
                                   _pair(padding), [1, 1], transposed, _pair(output_padding), 1).float()
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


def conv_backward_bf16(grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                       need: tuple[bool, bool, bool], transposed: bool = False,
                       output_padding: Sequence[int] = (0, 0)) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`conv_forward_bf16` to ``(x, weight, bias)`` given `grad` to its output,
    each None where `need` says so: `grad` rounded to bf16, the input and weight gradients by
    oneDNN's bf16 kernels (float32 accumulation) and returned as float32; the bias gradient in
    float32. `x` and `weight` may already be bf16."""
    need_x, need_w, need_b = need
    grad_x = grad_w = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.contiguous().to(torch.bfloat16), x.to(torch.bfloat16), weight.to(torch.bfloat16), None,
            _pair(stride), _pair(padding), [1, 1], transposed, _pair(output_padding), 1, [need_x, need_w, False])
    return (grad_x.float() if need_x else None, grad_w.float() if need_w else None,
            grad.sum((0, 2, 3)) if need_b else None)


class _Bf16Conv(torch.autograd.Function):
    """:func:`conv_forward_bf16` and :func:`conv_backward_bf16`, keeping bf16 copies of the input
    and the filter for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list, padding: list,
                transposed: bool, output_padding: list) -> Tensor:  # noqa: D401
        low_x, low_w = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(low_x, low_w)
        ctx.args = stride, padding, transposed, output_padding
        ctx.has_bias = bias is not None
        return conv_forward_bf16(low_x, low_w, bias, stride, padding, transposed, output_padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        low_x, low_w = ctx.saved_tensors
        stride, padding, transposed, output_padding = ctx.args
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        grads = conv_backward_bf16(grad, low_x, low_w, stride, padding, need, transposed, output_padding)
        return (*grads, None, None, None, None)


def bf16_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, padding=0,
              transposed: bool = False, output_padding=0) -> Tensor:
    """:func:`conv_forward_bf16` as an autograd Function (one group, no dilation, zero padding):
    ``conv2d`` or, with `transposed`, ``conv_transpose2d`` of `x` by `weight` computed in bf16,
    float32 in and out. Called directly it runs whether or not :func:`bf16_active`.

    Example:
        >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(4, 8, 3, 3)
        >>> y = bf16_conv(x, w, stride=2, padding=1)
        >>> y.shape, y.dtype
        (torch.Size([1, 4, 8, 8]), torch.float32)
    """
    return _Bf16Conv.apply(x, weight, bias, _pair(stride), _pair(padding), transposed, _pair(output_padding))


class Bf16Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (one group, no dilation, zero padding) that computes in bf16 where
    :func:`bf16_active`, else as ``nn.Conv2d``. Same parameters and state dict. Made by
    :func:`use_bf16_convolutions`."""

    def forward(self, x: Tensor) -> Tensor:
        if not bf16_active(x):
            return super().forward(x)
        return bf16_conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class Bf16ConvTranspose2d(nn.ConvTranspose2d):
    """The same for ``nn.ConvTranspose2d`` (with its ``output_padding``)."""

    def forward(self, x: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        if output_size is not None or not bf16_active(x):
            return super().forward(x, output_size)
        return bf16_conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding, transposed=True,
                         output_padding=self.output_padding)


def _plain(conv: nn.Module) -> bool:
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def use_bf16_convolutions(model: nn.Module) -> int:
    """Switch the plain ``nn.Conv2d`` and ``nn.ConvTranspose2d`` layers of `model` (exactly those
    classes, so not lowcon's Winograd and NNPACK layers; one group, no dilation, zero padding) to
    :class:`Bf16Conv2d` / :class:`Bf16ConvTranspose2d` in place and return how many were
    switched. Parameters and state-dict keys do not change; the layers compute in bf16 only inside
    :func:`bf16_convolutions`."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and _plain(module):
            module.__class__ = Bf16Conv2d
            count += 1
        elif type(module) is nn.ConvTranspose2d and _plain(module):
            module.__class__ = Bf16ConvTranspose2d
            count += 1
    return count
