"""StyleGAN2-style generator and discriminator of SinCUT (the official ``--netG/--netD stylegan2``).

SinCUT learns a translation from one image per domain with a small StyleGAN2-flavoured
encoder-decoder and a StyleGAN2 discriminator. Both use equalized learning rate: weights are
drawn from N(0, 1) and scaled by ``1 / sqrt(fan_in)`` at every call, biases start at 0, and no
other initialisation is applied (the official code skips ``init_weights`` for these networks).
Activations are the "fused" leaky ReLU: ``leaky_relu(x + bias, 0.2) * sqrt(2)``. Resampling
uses the separable FIR filter ``[1, 3, 3, 1]``. Everything is plain PyTorch (no compiled ops), so
the discriminator is twice differentiable, as the R1 penalty needs.

Generator layer order (``encoder.convs``, indexed as in the official code, so its PatchNCE list
``'0,2,4'`` means the same layers here)::

    0  Identity                          <- nce layer 0: the input image
    1  1x1 conv -> C(size), fused lrelu
    2  ResBlock, down x2                 <- nce layer 2 (one downsampling, SinCUT)
    .. one ResBlock per further downsampling, then n_blocks // 2 ResBlocks   <- nce layer 4
    decoder.convs: n_blocks // 2 ResBlocks, per downsampling an up x2 StyledConv (3x3 modulated
    conv with noise injection), then a 1x1 conv -> out_channels with fused lrelu (no Tanh).

``C(r)`` is the official channel table: ``round(16384 / r * ngf / 32)``, at most 512 for
``r <= 32``. The decoder's modulated convs get no style (the official decoder is an
``nn.Sequential`` that calls them with ``style=None``, i.e. a style of ones): their weights are
demodulated but not modulated. Module and parameter names follow the official code, so its
checkpoints load.

Discriminator: a 1x1 conv, ResBlocks halving the resolution from ``size`` down to 4, a 3x3
conv and two linear layers on the flattened 4x4 map: one logit per image. Its channels are
``int(16384 / r * ndf / 64)``, at most 384 for ``r <= 32``. No minibatch-std layer (the official
one is switched off).

Reference:
    Park et al., CUT, ECCV 2020 (SinCUT, Fig. 9); Karras et al., StyleGAN2, CVPR 2020;
    ``models/stylegan_networks.py`` of the official CUT code (after rosinality's port).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowcon.models.feature_generator import FeatureGenerator

BLUR_TAPS = (1, 3, 3, 1)
_SLOPE = 0.2
_GAIN = math.sqrt(2.0)  # He's gain: restores the second moment that the (leaky) ReLU about halves
_EPS = 1e-8


def stylegan2_resolution(crop_size: int) -> int:
    """The power of 2 nearest to ``crop_size`` in log scale: the ``size`` the official code gives
    both networks (it uses ``min(load_size, crop_size)``, which is the crop whenever load >= crop)."""
    return 2 ** round(math.log2(crop_size))


def generator_channels(resolution: int, ngf: int) -> int:
    """Channels of the generator's features at ``resolution`` px (the official table)."""
    channels = round(16384 / resolution * ngf / 32)
    return min(512, channels) if resolution <= 32 else channels


def discriminator_channels(resolution: int, ndf: int) -> int:
    """Channels of the discriminator's features at ``resolution`` px (the official table)."""
    channels = int(16384 / resolution * ndf / 64)
    return min(384, channels) if resolution <= 32 else channels


# -- building blocks -------------------------------------------------------------------------------


def fir_kernel(taps: Sequence[float] = BLUR_TAPS) -> Tensor:
    """2D FIR filter: the outer product of ``taps`` with itself, normalised to sum to 1."""
    row = torch.tensor(taps, dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


def fir_filter(x: Tensor, kernel: Tensor, pad: tuple[int, int]) -> Tensor:
    """Zero-pad each spatial side by ``pad = (before, after)`` and convolve every channel with
    ``kernel`` (a true convolution: the kernel is flipped; the ``[1, 3, 3, 1]`` one is symmetric).

    Shape:
        ``(B, C, H, W) -> (B, C, H + before + after - k + 1, W + before + after - k + 1)``.
    """
    channels = x.shape[1]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, dims=(0, 1)).to(x.dtype)[None, None].expand(channels, 1, -1, -1)
    return F.conv2d(x, weight, groups=channels)


class Blur(nn.Module):
    """:func:`fir_filter` with a fixed ``[1, 3, 3, 1]`` kernel (buffer ``kernel``), times ``gain``
    (4 after a stride-2 transposed conv, which leaves 3 of 4 pixels empty)."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.pad = tuple(pad)
        self.register_buffer("kernel", fir_kernel() * gain)

    def forward(self, x: Tensor) -> Tensor:
        return fir_filter(x, self.kernel, self.pad)


class FusedLeakyReLU(nn.Module):
    """``leaky_relu(x + bias, 0.2) * sqrt(2)`` with a per-channel bias (starts at 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, _SLOPE) * _GAIN


class EqualConv2d(nn.Module):
    """Conv with equalized learning rate: ``weight ~ N(0, 1)`` used as ``weight / sqrt(fan_in)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate; ``activate`` adds the fused leaky ReLU after
    the bias. ``bias_init`` is the bias's starting value (1 for a style modulation)."""

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = 1.0 / math.sqrt(in_features)
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias)
        return F.leaky_relu(out, _SLOPE) * _GAIN if self.activate else out


class ConvLayer(nn.Sequential):
    """``[Blur] + EqualConv2d + [FusedLeakyReLU]``.

    ``downsample``: blur, then a stride-2 conv without padding (output ``floor(H / 2)``);
    otherwise a stride-1 conv with ``kernel_size // 2`` zero padding. With ``activate`` the bias
    lives in the activation, without it the conv has no bias (the only uses in these networks).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, downsample: bool = False,
                 activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            # Blur padding so that blur + stride-2 conv halve the size: taps - 2 + kernel - 1 in all.
            total = len(BLUR_TAPS) - 2 + kernel_size - 1
            layers.append(Blur(((total + 1) // 2, total // 2)))
            layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=2, bias=False))
        else:
            layers.append(EqualConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False))
        if activate:
            layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)
        self.out_channels = out_channels


class ResBlock(nn.Module):
    """``(conv2(conv1(x)) + skip(x)) / sqrt(2)``: two 3x3 ConvLayers (the second halving the size
    with ``downsample``) and a 1x1 linear skip conv when the shape changes (identity otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=downsample)
        if downsample or in_channels != out_channels:
            self.skip = ConvLayer(in_channels, out_channels, 1, downsample=downsample, activate=False)
        else:
            self.skip = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2.0)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight-(de)modulated conv, optionally upsampling x2.

    ``w = weight / sqrt(fan_in) * s_in`` with ``s = modulation(style)`` (per sample; ones when
    the layer has no ``style_dim``), then with ``demodulate`` each output filter is divided by
    ``sqrt(sum w^2 + 1e-8)``. ``upsample``: a stride-2 transposed conv with ``w``, then a
    ``[1, 3, 3, 1]`` blur (gain 4), which gives exactly ``2H x 2W``; otherwise a conv with
    ``kernel_size // 2`` zero padding.

    Shape:
        Input ``(B, in_channels, H, W)`` and, with ``style_dim``, ``style (B, style_dim)``.
        Output ``(B, out_channels, H, W)``, or ``2H x 2W`` with ``upsample``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, style_dim: Optional[int] = None,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        if style_dim:
            self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        if upsample:
            # The transposed conv gives 2H + kernel - 2 rows; the blur brings them back to 2H.
            total = len(BLUR_TAPS) - 2 - (kernel_size - 1)
            self.blur = Blur(((total + 1) // 2 + 1, total // 2 + 1), gain=4.0)

    def forward(self, x: Tensor, style: Optional[Tensor] = None) -> Tensor:
        batch = x.shape[0]
        weight = self.weight * self.scale  # (1 or B, out, in, k, k)
        if hasattr(self, "modulation"):
            if style is None:
                raise ValueError("style: this layer is modulated, give a (B, style_dim) style")
            weight = weight * self.modulation(style)[:, None, :, None, None]
        elif style is not None:
            raise ValueError("style: this layer has no modulation (style_dim=None); pass no style")
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + _EPS)

        # One weight per sample: fold the batch into conv groups. A shared weight: a plain conv.
        groups = weight.shape[0]
        k = self.kernel_size
        x = x.reshape(batch // groups, groups * self.in_channels, *x.shape[-2:])
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(groups * self.in_channels, self.out_channels, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=groups)
            out = self.blur(out.reshape(batch, self.out_channels, *out.shape[-2:]))
        else:
            weight = weight.reshape(groups * self.out_channels, self.in_channels, k, k)
            out = F.conv2d(x, weight, padding=k // 2, groups=groups)
        return out.reshape(batch, self.out_channels, *out.shape[-2:])


class NoiseInjection(nn.Module):
    """``x + weight * noise``: one N(0, 1) map per sample shared by all channels, drawn afresh at
    every call (in eval mode too, as officially); ``weight`` is learned and starts at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[-2:]).normal_()
        return x + self.weight * noise


class StyledConv(nn.Module):
    """ModulatedConv2d, noise injection (unless ``inject_noise=False``), fused leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, style_dim: Optional[int] = None,
                 upsample: bool = False, inject_noise: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim=style_dim, upsample=upsample)
        self.noise = NoiseInjection()  # kept without injection too: the parameter is in the official checkpoints
        self.activate = FusedLeakyReLU(out_channels)
        self.inject_noise = inject_noise

    def forward(self, x: Tensor, style: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
        """`noise`: the (B, 1, H, W) map to inject (drawn afresh when None)."""
        out = self.conv(x, style)
        if self.inject_noise:
            out = self.noise(out, noise)
        return self.activate(out)


# -- the networks ------------------------------------------------------------------------------------


def _check_resolution(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low or value > 1024 or value & (value - 1):
        raise ValueError(f"{name} must be a power of 2 in [{low}, 1024], got {value!r}")


class StyleGAN2Generator(FeatureGenerator):
    """SinCUT's generator: a StyleGAN2-style encoder (PatchNCE taps) and decoder.

    Any input size works: H and W are reflect-padded at the bottom/right up to a multiple of
    ``2 ** num_downsampling`` and the output is cropped back, so it has the input's size (the
    official output is smaller for other sizes, e.g. one pixel less for odd sizes with one
    downsampling). Multiples go through untouched.

    Args:
        in_channels, out_channels: image channels.
        ngf: width: the features at resolution r have ``round(16384 / r * ngf / 32)`` channels.
        n_blocks: residual blocks, half in the encoder and half in the decoder (even; the
            official ``stylegan2`` has 6, ``smallstylegan2`` 2).
        size: the training crop as a power of 2 (see :func:`stylegan2_resolution`); it picks
            the channel widths only, not the sizes the network accepts.
        num_downsampling: x2 down steps in the encoder and up steps in the decoder.
        inject_noise: noise in the decoder's up-convs (off in the official ``smallstylegan2``).
        nce_layers: default layer indices of ``encoder.convs`` for ``forward_features``.
        checkpoint_blocks: recompute each residual block in backward (less memory, same result).

    Shape:
        Input: ``(B, in_channels, H, W)`` with ``H, W >= 2 ** num_downsampling``, data in [-1, 1].
        Output: ``(B, out_channels, H, W)``, unbounded (a leaky ReLU, no Tanh, as officially).

    Example:
        >>> import torch
        >>> net = StyleGAN2Generator()                      # SinCUT: ngf 10, 64 px crops
        >>> y, feats = net.forward_with_features(torch.randn(2, 3, 64, 64))
        >>> y.shape, [f.shape[1] for f in feats]
        (torch.Size([2, 3, 64, 64]), [3, 160, 160])
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 10, n_blocks: int = 6,
                 size: int = 64, num_downsampling: int = 1, inject_noise: bool = True,
                 nce_layers: Sequence[int] = (0, 2, 4), checkpoint_blocks: bool = False):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("ngf", ngf, 1), ("n_blocks", n_blocks, 0), ("num_downsampling", num_downsampling, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if n_blocks % 2:
            raise ValueError(f"n_blocks must be even (half in the encoder, half in the decoder), got {n_blocks}")
        _check_resolution("size", size, 4 * 2 ** num_downsampling)
        if generator_channels(size, ngf) < 1:
            raise ValueError(f"ngf={ngf} gives 0 channels at size {size}; raise ngf")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_downsampling = num_downsampling
        self.checkpoint_blocks = checkpoint_blocks

        def width(resolution: int) -> int:
            return generator_channels(resolution, ngf)

        res = size
        encoder: list[nn.Module] = [nn.Identity(), ConvLayer(in_channels, width(res), 1)]
        for _ in range(num_downsampling):
            encoder.append(ResBlock(width(res), width(res // 2), downsample=True))
            res //= 2
        encoder += [ResBlock(width(res), width(res), downsample=False) for _ in range(n_blocks // 2)]
        decoder: list[nn.Module] = [ResBlock(width(res), width(res), downsample=False) for _ in range(n_blocks // 2)]
        for _ in range(num_downsampling):
            decoder.append(StyledConv(width(res), width(res * 2), 3, upsample=True, inject_noise=inject_noise))
            res *= 2
        decoder.append(ConvLayer(width(res), out_channels, 1))
        # Kept under ``encoder.convs`` / ``decoder.convs``, the official names, so its checkpoints load.
        self.encoder = nn.ModuleDict({"convs": nn.Sequential(*encoder)})
        self.decoder = nn.ModuleDict({"convs": nn.Sequential(*decoder)})
        self.nce_layers = self._check_layers(nce_layers)

    _layer_noun = "encoder indices"

    def _feature_layers(self) -> nn.Sequential:
        return self.encoder.convs

    def _size_multiple(self) -> int:
        return 2 ** self.num_downsampling

    def _run(self, x: Tensor, layers: tuple[int, ...], last: int) -> tuple[Tensor, list[Tensor]]:
        wanted, found = set(layers), {}
        for index in range(last + 1):
            x = self._block(self.encoder.convs[index], x)
            if index in wanted:
                found[index] = x
        return x, [found[k] for k in layers]

    def _finish(self, x: Tensor, noise: Optional[dict] = None) -> Tensor:  # the decoder
        """`noise`: the maps some of the decoder's StyledConvs inject, by layer (else drawn)."""
        for layer in self.decoder.convs:
            x = layer(x, noise=noise[layer]) if noise and layer in noise else self._block(layer, x)
        return x

    def _block(self, layer: nn.Module, x: Tensor) -> Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled() and isinstance(layer, ResBlock):
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        low = 2 ** self.num_downsampling
        if min(x.shape[-2:]) < low:
            raise ValueError(f"x height and width must be at least {low}, got {tuple(x.shape[-2:])}")

    # -- large images: bands of rows with their context -----------------------------------------
    def context_rows(self) -> int:
        """Rows of input above and below a band that reach its output: at least the network's
        receptive radius (an upper bound, summed layer by layer in input pixels), rounded up to a
        multiple of ``2 ** num_downsampling`` so that bands keep the stride-2 phase."""
        rows, scale = 0, 1  # scale: input pixels per pixel of the current map
        for layer in (*self.encoder.convs, *self.decoder.convs):
            if isinstance(layer, ResBlock):
                rows += scale  # conv1, 3x3
                if isinstance(layer.conv2[0], Blur):  # blur (4 taps), then a 3x3 stride-2 conv
                    rows += 3 * scale + 2 * scale
                    scale *= 2
                else:
                    rows += scale
            elif isinstance(layer, StyledConv):  # x2 transposed 3x3, then a 4-tap blur
                rows += scale
                scale //= 2
                rows += 3 * scale
            elif isinstance(layer, ConvLayer):
                rows += scale * (layer[0].weight.shape[-1] // 2)
        multiple = self._size_multiple()
        return -(-rows // multiple) * multiple

    @torch.no_grad()
    def forward_in_bands(self, x: Tensor, band_pixels: int = 2 ** 21) -> Tensor:
        """``forward(x)`` for large images, without gradients, band of rows by band.

        The network has no norms, so a band's output depends only on the input rows within
        :meth:`context_rows` of it. Each band runs with that much context above and below
        (clipped at the image's edges, where the network pads as in one pass), and only its
        own rows are kept. The decoder's noise is drawn for the whole image first, in the order
        and shapes of one pass, and each band reads its rows of it: with the same random state
        the output equals ``forward(x)`` up to float rounding.

        Args:
            x: ``(B, C, H, W)``.
            band_pixels: about this many pixels (batch times rows times width) per band, context
                excluded; bands are at least ``2 ** num_downsampling`` rows.
        """
        if not isinstance(band_pixels, int) or band_pixels < 1:
            raise ValueError(f"band_pixels must be a positive int, got {band_pixels!r}")
        self._check_input(x)
        height, width = x.shape[-2:]
        xp = self._pad(x)
        full = xp.shape[-2]
        multiple, context = self._size_multiple(), self.context_rows()
        noise = {}  # the decoder's up-convs, whole-image noise in one pass's order
        rows_per_pixel = 2 ** self.num_downsampling
        for layer in self.decoder.convs:
            if isinstance(layer, StyledConv):
                rows_per_pixel //= 2
                if layer.inject_noise:
                    noise[layer] = (xp.new_empty(xp.shape[0], 1, full // rows_per_pixel,
                                                 xp.shape[-1] // rows_per_pixel).normal_(), rows_per_pixel)
        rows = max(multiple, band_pixels // (xp.shape[0] * xp.shape[-1]) // multiple * multiple)
        y = None
        for top in range(0, full, rows):
            bottom = min(full, top + rows)
            start, end = max(0, top - context), min(full, bottom + context)
            h, _ = self._run(xp[..., start:end, :], (), last=len(self.encoder.convs) - 1)
            h = self._finish(h, {layer: maps[..., start // per:end // per, :] for layer, (maps, per) in noise.items()})
            if y is None:
                y = h.new_empty(*h.shape[:2], full, h.shape[-1])
            y[..., top:bottom, :] = h[..., top - start:bottom - start, :]
        return y[..., :height, :width]


class StyleGAN2Discriminator(nn.Module):
    """SinCUT's discriminator: StyleGAN2's residual discriminator, one logit per image.

    Args:
        in_channels: channels of the judged image.
        ndf: width: features at resolution r have ``int(16384 / r * ndf / 64)`` channels, at most
            384 for r <= 32.
        size: the crop it judges, a power of 2 (see :func:`stylegan2_resolution`): the depth is
            ``log2(size) - 2`` ResBlocks, down to 4x4.

    Shape:
        Input: ``(B, in_channels, H, W)`` with ``floor(H / (size / 4)) == 4`` (and the same for
        W): ``H`` in ``[size, 5 * size / 4 - 1]``, what the final 4x4 linear layer admits.
        Output: ``(B, 1)`` logits.

    Example:
        >>> import torch
        >>> StyleGAN2Discriminator()(torch.randn(2, 3, 64, 64)).shape   # SinCUT: ndf 8, 64 px
        torch.Size([2, 1])
    """

    def __init__(self, in_channels: int = 3, ndf: int = 8, size: int = 64):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_resolution("size", size, 4)
        if discriminator_channels(size, ndf) < 1:
            raise ValueError(f"ndf={ndf} gives 0 channels at size {size}; raise ndf")
        self.in_channels, self.size = in_channels, size
        convs: list[nn.Module] = [ConvLayer(in_channels, discriminator_channels(size, ndf), 1)]
        res = size
        while res > 4:
            convs.append(ResBlock(discriminator_channels(res, ndf), discriminator_channels(res // 2, ndf),
                                  downsample=True))
            res //= 2
        self.convs = nn.Sequential(*convs)
        top = discriminator_channels(4, ndf)
        self.final_conv = ConvLayer(discriminator_channels(4, ndf), top, 3)
        self.final_linear = nn.Sequential(EqualLinear(top * 4 * 4, top, activate=True), EqualLinear(top, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        step = self.size // 4
        if x.shape[-2] // step != 4 or x.shape[-1] // step != 4:
            raise ValueError(f"x height and width must be in [{self.size}, {self.size + step - 1}] for a "
                             f"size-{self.size} discriminator, got {tuple(x.shape[-2:])}")
        out = self.final_conv(self.convs(x))
        return self.final_linear(out.flatten(1))
