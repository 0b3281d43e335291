"""PatchGAN discriminator of pix2pix / CycleGAN / CUT, with blur-pooled downsampling.

Layer order with the defaults (``self.model``, indexed as the official ``NLayerDiscriminator``
so that its checkpoints load)::

    Conv 4x4 in -> ndf, LeakyReLU(0.2), Downsample          (no norm on the first layer)
    for n in 1 .. n_layers-1:  Conv 4x4 -> ndf * min(2^n, 8), norm, LeakyReLU, Downsample
    Conv 4x4 -> ndf * min(2^n_layers, 8) (stride 1), norm, LeakyReLU
    Conv 4x4 -> 1 (stride 1): one logit per patch

All 4x4 convs have padding 1. With ``antialias=False`` the convs followed by a Downsample have
stride 2 instead and the Downsample is dropped: that is the classic 70x70 PatchGAN.

Note: the official CUT code also has a class named ``PatchDiscriminator`` that cuts the image into
16x16 tiles; this class is its ``NLayerDiscriminator`` (``--netD basic``), CUT's default.
"""
from __future__ import annotations

from torch import Tensor, nn

from lowcon.models.blur import Downsample
from lowcon.models.fused import layer_steps
from lowcon.models.resnet_generator import NORMS, norm_layer


class PatchDiscriminator(nn.Module):
    """PatchGAN: a fully convolutional classifier giving one real/fake logit per image patch.

    Args:
        in_channels: channels of the judged image.
        ndf: channels of the first conv; doubled per layer up to ``8 * ndf``.
        n_layers: downsampling layers (3 gives the 70x70 PatchGAN).
        norm: ``"instance"`` (CUT), ``"batch"`` or ``"none"``.
        antialias: stride-1 conv + blur-pool instead of stride-2 convs (CUT default).

    Convs have biases except before batch norm (the official code also drops them with
    ``norm="none"``; lowcon keeps them there).

    Shape:
        Input: ``(B, in_channels, H, W)``. Output: ``(B, 1, h, w)`` logits, no sigmoid; with
        ``n_layers=3``, ``h = H/8 - 2`` for H a multiple of 8 (30x30 for 256x256).

    Example:
        >>> import torch
        >>> PatchDiscriminator()(torch.randn(1, 3, 256, 256)).shape
        torch.Size([1, 1, 30, 30])

    Reference:
        Isola et al., pix2pix, CVPR 2017; ``NLayerDiscriminator`` in the official CUT
        ``models/networks.py`` (``no_antialias=False``).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 antialias: bool = True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.in_channels = in_channels
        bias = norm != "batch"
        stride = 1 if antialias else 2

        model: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=stride, padding=1),
                                  nn.LeakyReLU(0.2)]
        if antialias:
            model.append(Downsample(ndf))
        channels = ndf
        for n in range(1, n_layers):
            out = ndf * min(2 ** n, 8)
            model += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=bias),
                      norm_layer(norm, out), nn.LeakyReLU(0.2)]
            if antialias:
                model.append(Downsample(out))
            channels = out

        out = ndf * min(2 ** n_layers, 8)
        model += [nn.Conv2d(channels, out, 4, padding=1, bias=bias), norm_layer(norm, out), nn.LeakyReLU(0.2),
                  nn.Conv2d(out, 1, 4, padding=1)]
        self.model = nn.Sequential(*model)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        # Training on the CPU: each [norm], LeakyReLU, blur-pool or conv runs as one NormActConv,
        # which keeps only its input for backward (lowcon.models.fused); the same values and gradients.
        for _, step in layer_steps(self.model, len(self.model) - 1, device=x.device):
            x = step(x)
        return x
