"""ResNet generator of CycleGAN / CUT, with anti-aliased resampling and PatchNCE feature taps.

Layer order (indices of ``self.model`` with the defaults; the same indexing as the official CUT
code, so its PatchNCE layer list ``'0,4,8,12,16'`` means the same layers here)::

    0  ReflectionPad2d(3)          <- nce layer 0: the padded RGB input
    1  Conv 7x7, in -> ngf;  2 norm;  3 ReLU
    4  Conv 3x3, ngf -> 2ngf       <- nce layer 4: first down-conv (full resolution)
    5  norm;  6 ReLU;  7 Downsample (blur-pool, stride 2)
    8  Conv 3x3, 2ngf -> 4ngf      <- nce layer 8: second down-conv (1/2 resolution)
    9  norm; 10 ReLU; 11 Downsample
    12 .. 12+n_blocks-1  ResnetBlock(4ngf)   <- nce layers 12, 16: outputs of blocks 1 and 5
    then per up step: Upsample, Conv 3x3 (halve channels), norm, ReLU   (x2)
    ReflectionPad2d(3), Conv 7x7 ngf -> out, Tanh

With ``antialias=False`` each down step is [stride-2 conv, norm, ReLU] (three layers instead of
four), so later indices shift; the official code keeps ``'0,4,8,12,16'`` regardless and so do we.
The official ReLUs are in-place, so there a requested norm output followed by a ReLU (layer 8
with ``antialias=False``) comes back rectified; here ReLUs are not in-place and every feature is
the named layer's own output. With the defaults the features are identical.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowcon.models.banded import run_in_bands
from lowcon.models.blur import Downsample, Upsample
from lowcon.models.feature_generator import FeatureGenerator
from lowcon.models.fused import FusedSpec, InstanceNorm2d, ReflectPad, fusing, layer_steps, norm_act_conv

NORMS = ("instance", "batch", "none")
PADDINGS = ("reflect", "replicate", "zero")
# Two stride-2 steps down and two up: sizes that are multiples of 4 come back unchanged.
_SIZE_MULTIPLE = 4


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The CycleGAN/CUT normalisation: instance (no affine, no running stats), batch, or none."""
    if norm == "instance":
        return InstanceNorm2d(channels, affine=False, track_running_stats=False)  # lowcon's faster CPU kernel
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "none":
        # Kept as a layer so that the sequential indices do not depend on the norm.
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ResnetBlock(nn.Module):
    """``x + [pad, conv3x3, norm, ReLU, (dropout), pad, conv3x3, norm](x)``.

    Args:
        channels: input = output channels.
        norm: ``"instance"``, ``"batch"`` or ``"none"``.
        padding: ``"reflect"``, ``"replicate"`` or ``"zero"``.
        dropout: insert ``Dropout(0.5)`` after the first ReLU (pix2pix option; off in CUT).
        bias: conv biases (redundant before batch norm).

    Shape:
        Input and output: ``(B, channels, H, W)`` with ``H, W >= 2`` for reflection padding.
    """

    def __init__(self, channels: int, *, norm: str = "instance", padding: str = "reflect",
                 dropout: bool = False, bias: bool = True):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        layers: list[nn.Module] = []
        for half in ("first", "second"):
            if padding == "reflect":
                layers.append(nn.ReflectionPad2d(1))
            elif padding == "replicate":
                layers.append(nn.ReplicationPad2d(1))
            conv_padding = 1 if padding == "zero" else 0
            layers += [nn.Conv2d(channels, channels, 3, padding=conv_padding, bias=bias),
                       norm_layer(norm, channels)]
            if half == "first":
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(0.5))
        # Named as in the official code so that its checkpoints load.
        self.conv_block = nn.Sequential(*layers)
        # The official block (instance norm, reflection padding, no dropout) trains its second
        # half through NormActConv: the same function, with two fewer activations kept for backward.
        self.fused = norm == "instance" and padding == "reflect" and not dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and fusing(x.device):
            pad, conv1, norm1, _, _, conv2, norm2 = self.conv_block
            pad = ReflectPad(pad.padding[0])  # the same padding, with a faster backward on the CPU
            return x + norm2(norm_act_conv(conv1(pad(x)), conv2, FusedSpec(norm1.eps, pre=pad)))
        return x + self.conv_block(x)

    def forward_in_bands(self, x: Tensor, band_bytes: int) -> Tensor:
        """``forward(x)`` without gradients, its padding and convolutions in bands of rows
        (:func:`lowcon.models.banded.run_in_bands`)."""
        return run_in_bands(self.conv_block, x, band_bytes).add_(x)


class ResnetGenerator(FeatureGenerator):
    """CUT / CycleGAN ResNet generator: 7x7 conv, 2 down steps, residual blocks, 2 up steps, Tanh.

    Any input size works: H and W are reflect-padded at the bottom/right up to the next multiple
    of 4 before the network and the output is cropped back, so the output has the input's size
    (the official code returns a different size otherwise, its issues #69 and #98). Sizes that
    are already multiples of 4 (e.g. 256) go through untouched, exactly as in the official code.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        ngf: channels after the first conv; the bottleneck has ``4 * ngf``.
        n_blocks: residual blocks (9 in CUT; 6 is CycleGAN's small variant).
        norm: ``"instance"`` (CUT), ``"batch"`` or ``"none"``.
        padding: padding of the residual blocks' convs: ``"reflect"``, ``"replicate"``, ``"zero"``.
        antialias: down steps as stride-1 conv + norm + ReLU + blur-pool (CUT default); else a
            stride-2 conv + norm + ReLU.
        antialias_up: up steps as fixed [1,3,3,1] upsample + 3x3 conv + norm + ReLU (CUT
            default); else ConvTranspose2d(3, stride 2, padding 1, output_padding 1) + norm + ReLU.
        dropout: Dropout(0.5) inside the residual blocks.
        nce_layers: default layer indices for ``forward_features``.
        checkpoint_blocks: activation checkpointing: each residual block keeps only its input
            and recomputes the rest in backward. Less training memory for more time; same
            outputs and gradients (dropout masks included); no effect under ``torch.no_grad``.

    Convs have biases except before batch norm. The official code also drops them with
    ``norm="none"``, leaving those convs with neither norm nor bias; lowcon keeps them there.

    Shape:
        Input: ``(B, in_channels, H, W)`` with ``H, W >= 5``, data in [-1, 1].
        Output: ``(B, out_channels, H, W)`` in [-1, 1].

    Example:
        >>> import torch
        >>> from lowcon.models.init import init_weights
        >>> net = init_weights(ResnetGenerator())           # CUT: xavier, gain 0.02
        >>> y, feats = net.forward_with_features(torch.randn(1, 3, 64, 64))
        >>> [f.shape[1] for f in feats]
        [3, 128, 256, 256, 256]

    Reference:
        Johnson et al. 2016 (architecture); Zhu et al., CycleGAN, ICCV 2017; Park et al., CUT,
        ECCV 2020: ``ResnetGenerator`` in the official ``models/networks.py``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 norm: str = "instance", padding: str = "reflect", antialias: bool = True,
                 antialias_up: bool = True, dropout: bool = False,
                 nce_layers: Sequence[int] = (0, 4, 8, 12, 16), checkpoint_blocks: bool = False):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("ngf", ngf, 1), ("n_blocks", n_blocks, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.checkpoint_blocks = checkpoint_blocks
        bias = norm != "batch"

        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(),  # not in-place: a requested feature must not be overwritten by the next layer
        ]
        channels = ngf
        for _ in range(2):
            if antialias:
                model += [nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=bias),
                          norm_layer(norm, 2 * channels), nn.ReLU(), Downsample(2 * channels)]
            else:
                model += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=bias),
                          norm_layer(norm, 2 * channels), nn.ReLU()]
            channels *= 2

        model += [ResnetBlock(channels, norm=norm, padding=padding, dropout=dropout, bias=bias)
                  for _ in range(n_blocks)]

        for _ in range(2):
            if antialias_up:
                model += [Upsample(channels), nn.Conv2d(channels, channels // 2, 3, padding=1, bias=bias)]
            else:
                model += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1,
                                             output_padding=1, bias=bias)]
            model += [norm_layer(norm, channels // 2), nn.ReLU()]
            channels //= 2

        model += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)
        self.nce_layers = self._check_layers(nce_layers)

    @torch.no_grad()
    def forward_in_bands(self, x: Tensor, band_mb: float = 64.0) -> Tensor:
        """``forward(x)`` for large images, without gradients: every norm still sees the whole
        map, but the padding, convolutions and resampling between two norms run in bands of rows
        of about `band_mb` MB (:mod:`lowcon.models.banded`), and the first down step's norm
        normalises from streamed statistics (:meth:`_streamed_norms`). The output equals
        ``forward(x)`` up to float rounding. A 4000 x 3000 photo takes about 7.4 GB instead of
        more than 24."""
        if not band_mb > 0:
            raise ValueError(f"band_mb must be > 0, got {band_mb!r}")
        self._check_input(x)
        height, width = x.shape[-2:]
        return run_in_bands(self.model, self._pad(x), int(band_mb * 2 ** 20),
                            streamed=self._streamed_norms())[..., :height, :width]

    def _streamed_norms(self) -> frozenset[int]:
        """The norm of the first anti-aliased down step (followed by a ReLU and a blur-pool): its
        map, 2 ngf channels at full size, is the largest of a pass, so in bands it normalises from
        streamed statistics instead of a whole map (its 3x3 convolution then runs twice). Streaming
        the second down step's norm too saved 0.8 GB more for 23 % more time at 4000 x 3000
        (benchmarks/README.md)."""
        layers = list(self.model)
        for i in range(len(layers) - 2):
            if (isinstance(layers[i], nn.InstanceNorm2d) and isinstance(layers[i + 1], nn.ReLU)
                    and isinstance(layers[i + 2], Downsample)):
                return frozenset({i})
        return frozenset()

    def _feature_layers(self) -> nn.Sequential:
        return self.model

    def _size_multiple(self) -> int:
        return _SIZE_MULTIPLE

    def _run(self, x: Tensor, layers: tuple[int, ...], last: int) -> tuple[Tensor, list[Tensor]]:
        wanted, found = set(layers), {}
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        # A fused run's inner layers have no output: only its last one's (see fused_step).
        for index, step in layer_steps(self.model, last, wanted, x.device):
            if recompute and isinstance(step, ResnetBlock):
                x = checkpoint(step, x, use_reentrant=False)
            else:
                x = step(x)
            if index in wanted:
                found[index] = x
        return x, [found[k] for k in layers]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 5:
            # After padding to a multiple of 4 the bottleneck (1/4 scale) needs >= 2 pixels.
            raise ValueError(f"x height and width must be at least 5, got {tuple(x.shape[-2:])}")
