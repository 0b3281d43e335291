"""[instance norm], ReLU or LeakyReLU, a fixed resampling or padding, then a convolution, trained as
one autograd Function that keeps only its input for backward.

Autograd keeps, for such a run of layers, the norm's input, the activation's output, the padded or
upsampled copy that the convolution reads, and the norm's statistics: up to four maps where one
will do. :class:`NormActConv` keeps the first (and the convolution's weight) and recomputes the rest
in backward, which is elementwise work and a resampling; the convolution is not run again. Forward
values are those of the plain layers bit for bit (the same kernels on the same inputs: the
networks' norms are :class:`InstanceNorm2d`, which runs :func:`instance_norm_with_stats` as this
module does) and the gradients are the same formulas (tests compare with the plain layers and with
gradcheck).

:func:`fused_step` finds such runs in an ``nn.Sequential`` of the CUT / CycleGAN networks: the
residual blocks' second half, the first down-convolution, the down steps' blur-pools, the second
up step's upsampling and convolution, the last 7x7 convolution, and the discriminator's layers.
:func:`layer_steps` walks a network's layers with them. Where autograd must differentiate twice
(SinCUT's R1 penalty), :func:`unfused` turns this off.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lowcon.models.bf16conv import bf16_active, conv_backward_bf16, conv_forward_bf16
from lowcon.models.blur import Downsample, Upsample
from lowcon.models.winograd import NNPACKConv2d, WinogradConv2d, conv_backward, conv_forward, direct


@dataclass(frozen=True)
class FusedSpec:
    """What :class:`NormActConv` computes after its input `h`.

    Attributes:
        eps: instance norm's epsilon; ``None`` for no norm.
        slope: the activation's negative slope: 0 for ReLU, e.g. 0.2 for LeakyReLU.
        pre: a fixed linear map between the activation and the convolution, with no
            parameters: a :class:`ReflectPad` or an :class:`~lowcon.models.blur.Upsample`
            (called on the map, and its ``input_grad`` on the map's gradient); ``None`` for none.
        stride, padding, groups: the convolution's (zero padding).
        fast: run the convolution as the layers of :mod:`lowcon.models.winograd` do
            (:func:`~lowcon.models.winograd.conv_forward` and
            :func:`~lowcon.models.winograd.conv_backward`).
        nnpack: with `fast`, NNPACK where it serves, as the layer asks (its ``nnpack`` flag).
        bf16: without `fast`, the convolution (one group) in bfloat16 as
            :mod:`lowcon.models.bf16conv` computes it (set inside its ``bf16_convolutions``).
    """

    eps: Optional[float]
    slope: float = 0.0
    pre: Optional[Union[ReflectPad, Upsample]] = None
    stride: int = 1
    padding: int = 0
    groups: int = 1
    fast: bool = False
    nnpack: bool = False
    bf16: bool = False


def _act(x: Tensor, slope: float) -> Tensor:
    return F.relu(x) if slope == 0 else F.leaky_relu(x, slope)


def _act_(x: Tensor, slope: float) -> Tensor:
    """:func:`_act` in place, on a map nothing else holds."""
    return x.relu_() if slope == 0 else F.leaky_relu_(x, slope)


class NormActConv(torch.autograd.Function):
    """``conv2d(pre(act(instance_norm(h))), weight, bias)`` as set by a :class:`FusedSpec`,
    keeping only `h` and `weight` for backward.

    Example:
        >>> h, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
        >>> y = NormActConv.apply(h, w, None, FusedSpec(eps=1e-5, padding=1))
        >>> torch.allclose(y, F.conv2d(F.relu(F.instance_norm(h)), w, padding=1), atol=1e-5)
        True
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], spec: FusedSpec) -> Tensor:  # noqa: D401
        # The same kernels as the plain modules, so the forward values are bit for bit theirs.
        if spec.eps is not None:  # the norm's output is ours: activated in place, one map fewer
            x = _act_(instance_norm_with_stats(h, spec.eps)[0], spec.slope)
        else:
            x = _act(h, spec.slope)
        if spec.pre is not None:
            x = spec.pre(x)
        ctx.save_for_backward(h, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        if spec.fast:
            return conv_forward(x, weight, bias, spec.padding, spec.nnpack)
        if spec.bf16:
            return conv_forward_bf16(x, weight, bias, [spec.stride] * 2, [spec.padding] * 2)
        return F.conv2d(x, weight, bias, stride=spec.stride, padding=spec.padding, groups=spec.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        spec: FusedSpec = ctx.spec
        if spec.eps is not None:
            normed, mean, invstd = instance_norm_with_stats(h, spec.eps)
            act = _act_(normed, spec.slope)
        else:
            act = _act(h, spec.slope)
        # the map the convolution read, again (its weight gradient needs it)
        x = act if spec.pre is None else spec.pre(act.detach())
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if spec.fast:
            grad_x, grad_w, grad_b = conv_backward(grad, x.detach(), weight, spec.padding, True, need_w, need_b,
                                                   spec.nnpack)
        elif spec.bf16:
            grad_x, grad_w, grad_b = conv_backward_bf16(grad, x.detach(), weight, [spec.stride] * 2,
                                                        [spec.padding] * 2, (True, need_w, need_b))
        else:
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x.detach(), weight, [weight.shape[0]] if ctx.has_bias else None, [spec.stride] * 2,
                [spec.padding] * 2, [1, 1], False, [0, 0], spec.groups, [True, need_w, need_b])
        del x
        if spec.pre is not None:
            grad_x = spec.pre.input_grad(grad_x)
        # The activation's output has the sign of its input, so its backward can read either.
        if spec.slope == 0:
            grad_x = torch.ops.aten.threshold_backward(grad_x, act, 0)
        else:
            grad_x = torch.ops.aten.leaky_relu_backward(grad_x, act, spec.slope, True)
        del act
        if spec.eps is not None:
            grad_x = _instance_norm_backward(grad_x, h, mean, invstd, spec.eps)
        return grad_x, grad_w if need_w else None, grad_b if need_b else None, None


def _as_batch_norm_input(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (1, B * C, H, W): instance norm is batch norm over this view."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def instance_norm_with_stats(h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``F.instance_norm(h, eps=eps)`` with the mean and 1/std per image and channel (flat, as
    aten's batch-norm kernels take them), in two passes over `h`: the mean, then the centred map
    and its norm. On a CPU 2-4x faster than aten's kernel (which updates a running mean and
    variance element by element) at the generator's sizes; the same values to float32's rounding
    (``benchmarks/bench_layer_ops.py``)."""
    mean = h.mean(dim=(2, 3), keepdim=True)
    return _scale_centred_(h - mean, mean, eps)


def instance_norm_(h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`instance_norm_with_stats` in place: `h` itself becomes the normalised map (for
    passes without gradients that cannot afford a second map of its size)."""
    mean = h.mean(dim=(2, 3), keepdim=True)
    return _scale_centred_(h.sub_(mean), mean, eps)


def _scale_centred_(centred: Tensor, mean: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """`centred` divided in place by its standard deviation per image and channel; with the
    flat mean and 1/std."""
    hw = centred.shape[2] * centred.shape[3]
    var = torch.linalg.vector_norm(centred, dim=(2, 3), keepdim=True).square_().div_(hw)
    invstd = var.add_(eps).rsqrt_()
    return centred.mul_(invstd), mean.view(-1), invstd.view(-1)


def _instance_norm_backward(grad: Tensor, h: Tensor, mean: Tensor, invstd: Tensor, eps: float) -> Tensor:
    """The input gradient of instance norm (no affine), by aten's batch-norm backward kernel."""
    grad_h = torch.ops.aten.native_batch_norm_backward(
        _as_batch_norm_input(grad), _as_batch_norm_input(h), None, None, None, mean, invstd, True, eps,
        [True, False, False])[0]
    return grad_h.view_as(h)


class _InstanceNormFn(torch.autograd.Function):
    """Instance norm by :func:`instance_norm_with_stats`, backward by aten's kernel; keeps what
    autograd keeps for aten's instance norm (the input, the mean and 1/std)."""

    @staticmethod
    def forward(ctx, h: Tensor, eps: float) -> Tensor:  # noqa: D401
        normed, mean, invstd = instance_norm_with_stats(h, eps)
        ctx.save_for_backward(h, mean, invstd)
        ctx.eps = eps
        return normed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        h, mean, invstd = ctx.saved_tensors
        return _instance_norm_backward(grad, h, mean, invstd, ctx.eps), None


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` that runs :func:`instance_norm_with_stats` (backward: aten's kernel)
    on float32 or float64 maps on the CPU, without affine or running statistics (as CUT and
    CycleGAN use it). Elsewhere it is torch's layer: on a GPU, under autocast, and inside
    :func:`unfused`, whose graphs are differentiated twice. It has no parameters or buffers, so
    state dicts are those of ``nn.InstanceNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.affine or self.track_running_stats or x.ndim != 4 or x.shape[2] * x.shape[3] < 2
                or x.dtype not in (torch.float32, torch.float64) or not _own_kernels(x.device)):
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _InstanceNormFn.apply(x, self.eps)
        return instance_norm_with_stats(x, self.eps)[0]


class ReflectPad:
    """``F.pad(x, (size,) * 4, mode="reflect")`` that knows the size it returns and its
    gradient (:meth:`input_grad`, also the backward pass on the CPU)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        if x.requires_grad and x.device.type == "cpu":
            return _ReflectPadFn.apply(x, self)
        return F.pad(x, (self.size,) * 4, mode="reflect")

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return height + 2 * self.size, width + 2 * self.size

    def input_grad(self, grad: Tensor) -> Tensor:
        """The gradient of the input from `grad`, the padded map's: the interior, plus each
        border row and column added onto the row or column it mirrors. On a CPU 2.5-4x faster
        than aten's ``reflection_pad2d_backward`` (differentiable ops, so it also serves a
        gradient of the gradient)."""
        p = self.size
        height, width = grad.shape[-2:]
        h, w = height - 2 * p, width - 2 * p
        rows, cols = slice(p, height - p), slice(p, width - p)  # the interior's, in `grad`
        top, bottom = slice(1, p + 1), slice(h - p - 1, h - 1)  # where the border rows fold to
        left, right = slice(1, p + 1), slice(w - p - 1, w - 1)

        def mirrored(t: Tensor, dims: tuple[int, ...]) -> Tensor:
            return t if p == 1 else t.flip(dims)  # one row or column is its own mirror

        out = grad[..., rows, cols].clone()
        out[..., top, :] += mirrored(grad[..., :p, cols], (-2,))
        out[..., bottom, :] += mirrored(grad[..., height - p:, cols], (-2,))
        out[..., left] += mirrored(grad[..., rows, :p], (-1,))
        out[..., right] += mirrored(grad[..., rows, width - p:], (-1,))
        for source_rows, target_rows in ((slice(0, p), top), (slice(height - p, height), bottom)):  # corners
            for source_cols, target_cols in ((slice(0, p), left), (slice(width - p, width), right)):
                out[..., target_rows, target_cols] += mirrored(grad[..., source_rows, source_cols], (-2, -1))
        return out


class _ReflectPadFn(torch.autograd.Function):
    """Reflection padding whose backward is :meth:`ReflectPad.input_grad`."""

    @staticmethod
    def forward(ctx, x: Tensor, pad: ReflectPad) -> Tensor:  # noqa: D401
        ctx.pad = pad
        return F.pad(x, (pad.size,) * 4, mode="reflect")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.pad.input_grad(grad), None


def norm_act_conv(h: Tensor, conv: nn.Conv2d, spec: FusedSpec) -> Tensor:
    """`conv` applied through :class:`NormActConv` with `spec`; through the fast path of
    :mod:`lowcon.models.winograd` when `conv` is one of its layers (:class:`WinogradConv2d`,
    :class:`NNPACKConv2d`) and the layer's `applies` accepts the map the convolution reads; else in
    bf16 where :func:`~lowcon.models.bf16conv.bf16_active` (one group)."""
    if isinstance(conv, (WinogradConv2d, NNPACKConv2d)) and spec.stride == 1 and spec.groups == 1:
        height, width = h.shape[-2:]
        if isinstance(spec.pre, ReflectPad):
            height, width = spec.pre.out_size(height, width)
        elif isinstance(spec.pre, Upsample):
            height, width = 2 * height, 2 * width
        if conv.applies(h, conv.weight, spec.padding, size=(height, width)):
            spec = replace(spec, fast=True, nnpack=conv.nnpack)
    if not spec.fast and spec.groups == 1 and bf16_active(h):
        spec = replace(spec, bf16=True)
    return NormActConv.apply(h, conv.weight, conv.bias, spec)


_state = threading.local()


@contextmanager
def unfused() -> Iterator[None]:
    """Inside this block the networks run their plain layers, not :class:`NormActConv` nor
    Winograd (:func:`lowcon.models.winograd.direct`), so that their graph can be differentiated
    twice (e.g. an R1 penalty, the gradient of a gradient).

    Example:
        >>> from lowcon.models.patch_discriminator import PatchDiscriminator
        >>> x = torch.randn(1, 3, 32, 32, requires_grad=True)
        >>> with unfused():
        ...     (g,) = torch.autograd.grad(PatchDiscriminator(ndf=4)(x).sum(), x, create_graph=True)
        >>> g.requires_grad
        True
    """
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        with direct():
            yield
    finally:
        _state.off = previous


def _own_kernels(device: Optional[torch.device] = None) -> bool:
    """Whether this module's own kernels may serve here: outside :func:`unfused` (in this thread),
    outside autocast (mixed precision runs the plain layers) and, when `device` is given, on the
    CPU."""
    return ((device is None or device.type == "cpu") and not getattr(_state, "off", False)
            and not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda"))


def fusing(device: Optional[torch.device] = None) -> bool:
    """Whether runs train fused here: autograd on, and :func:`_own_kernels` (outside
    :func:`unfused` and autocast, on the CPU when `device` is given). On a GPU the recomputation
    in backward costs more time than it saves memory: a CycleGAN step at 256x256 on an H200 took
    0.135 s fused against the official code's 0.085 s."""
    return torch.is_grad_enabled() and _own_kernels(device)


def _is_instance_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.InstanceNorm2d) and not layer.affine and not layer.track_running_stats


def _activation_slope(layer: nn.Module) -> Optional[float]:
    if isinstance(layer, nn.ReLU):
        return 0.0
    if isinstance(layer, nn.LeakyReLU) and layer.negative_slope > 0:
        return float(layer.negative_slope)
    return None


def _plain_conv(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and layer.padding[0] == layer.padding[1] and layer.stride[0] == layer.stride[1]
            and layer.dilation == (1, 1))


def fused_step(layers: Sequence[nn.Module], index: int, last: int, wanted: set[int],
               device: Optional[torch.device] = None) -> Optional[tuple[int, Callable[[Tensor], Tensor]]]:
    """Whether `layers[index:]` starts a run that trains as one :class:`NormActConv`.

    The run is [instance norm (optional)], ReLU or LeakyReLU, then one of: a reflect-padded
    blur-pool (:class:`Downsample`); a zero-padded ``Conv2d``; an :class:`Upsample` and a
    ``Conv2d``; a ``ReflectionPad2d`` and a ``Conv2d``. It must end at or before `last`, and no
    layer of it but the last may be in `wanted` (their outputs never exist). Only where
    :func:`fusing` (on `device`, the input's).

    Returns:
        ``(index of the run's last layer, function of the run's input)``, or ``None``.
    """
    if not fusing(device):
        return None
    i, eps = index, None
    if _is_instance_norm(layers[i]):
        eps, i = layers[i].eps, i + 1
    if i > last or _activation_slope(layers[i]) is None:
        return None
    slope, i = _activation_slope(layers[i]), i + 1
    if i > last:
        return None
    layer, pre = layers[i], None
    if isinstance(layer, Downsample):
        if any(k in wanted for k in range(index, i)):
            return None
        if layer.padding != "reflect" or len(set(layer.pad_sizes)) != 1:
            return None  # CUT's blur-pools pad by reflection, 1 on each side
        spec = FusedSpec(eps, slope, ReflectPad(layer.pad_sizes[0]), layer.stride, 0, layer.channels)
        return i, lambda h: NormActConv.apply(h, layer.filt, None, spec)
    if isinstance(layer, Upsample):
        pre, i = layer, i + 1
    elif isinstance(layer, nn.ReflectionPad2d) and len(set(layer.padding)) == 1:
        pre, i = ReflectPad(layer.padding[0]), i + 1
    if i > last or not _plain_conv(layers[i]) or any(k in wanted for k in range(index, i)):
        return None
    conv = layers[i]
    spec = FusedSpec(eps, slope, pre, conv.stride[0], conv.padding[0], conv.groups)
    return i, lambda h: norm_act_conv(h, conv, spec)


def layer_steps(layers: Sequence[nn.Module], last: int, wanted: set[int] = frozenset(),
                device: Optional[torch.device] = None) -> Iterator[tuple[int, Callable[[Tensor], Tensor]]]:
    """The steps that run ``layers[:last + 1]`` on `device` in order: ``(index of the step's
    last layer, function)``, a fused run where :func:`fused_step` finds one, else the layer."""
    index = 0
    while index <= last:
        run = fused_step(layers, index, last, wanted, device)
        index, step = run if run is not None else (index, layers[index])
        yield index, step
        index += 1
