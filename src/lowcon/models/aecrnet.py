"""AECR-Net's dehazing network: an autoencoder-like net with adaptive mixup and dynamic features.

The network of Wu et al. (CVPR 2021), rebuilt from the official ``Dehaze`` class so that it
runs anywhere torchvision does (the official DCNv2 is a CUDA-only compiled extension):

    FastDeconv (3->3 whitening conv)
    -> down1: ReflectionPad(3) + 7x7 conv ngf + ReLU
    -> down2: 3x3 stride-2 conv 2 ngf + ReLU
    -> down3: 3x3 stride-2 conv 4 ngf + ReLU
    -> FA block applied 6 times (ONE shared block in the released code)
    -> DCN block applied 2 times (dynamic feature enhancement, again ONE shared block)
    -> mix1(down3, dcn) -> up1: 3x3 stride-2 transposed conv 2 ngf + ReLU
    -> mix2(down2, up1) -> up2: 3x3 stride-2 transposed conv ngf + ReLU
    -> up3: ReflectionPad(3) + 7x7 conv out_channels + Tanh

The defaults give the released network: 2,614,229 parameters. Module names follow the official
ones (``down1``, ``block``, ``dcn_block.dcn``, ``mix1`` ...), so a state dict of the released
network loads with ``load_state_dict`` once any ``module.`` prefix is stripped.

Output range: the data are images in [0, 1] (the official normalisation is commented out), but
the released head ends in Tanh, whose range is [-1, 1]. ``output="tanh"`` keeps that oddity for
fidelity; ``"sigmoid"`` maps to (0, 1); ``"clamp"`` is a linear head that is clamped to [0, 1]
in eval mode only (training sees the unclamped values, so gradients never vanish).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from .deform_conv import sampled_deform_conv2d

__all__ = [
    "inverse_sqrt_psd",
    "FastDeconv",
    "ChannelAttention",
    "PixelAttention",
    "FABlock",
    "ModulatedDeformConv2d",
    "DCNBlock",
    "DCN_IMPLS",
    "Mix",
    "AECRNet",
    "AECRNET_VARIANTS",
    "build_aecrnet",
]


# --------------------------------------------------------------------------------------------
# Network deconvolution (Ye et al., ICLR 2020): the FastDeconv first layer
# --------------------------------------------------------------------------------------------
def inverse_sqrt_psd(cov: Tensor, method: str = "newton_schulz", n_iter: int = 5) -> Tensor:
    """Inverse square root ``cov^(-1/2)`` of a symmetric positive definite matrix.

    Args:
        cov: (D, D) symmetric positive definite matrix.
        method: ``"newton_schulz"`` (coupled Newton-Schulz iterations on ``cov / ||cov||_F``:
            matrix products only, stable gradients; a few iterations give a partial whitening,
            as in network deconvolution) or ``"eigh"`` (exact, by eigendecomposition in float64;
            its gradient is ill-conditioned when two eigenvalues nearly coincide).
        n_iter: Newton-Schulz iterations (ignored by ``"eigh"``).

    Shape:
        cov (D, D) -> (D, D)

    Example:
        >>> a = torch.tensor([[4.0, 0.0], [0.0, 9.0]])
        >>> inverse_sqrt_psd(a, method="eigh")
        tensor([[0.5000, 0.0000],
                [0.0000, 0.3333]])

    Reference:
        Higham, Functions of Matrices, 2008, eq. 6.35 (coupled Newton-Schulz iteration).
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov: expected a square (D, D) matrix, got shape {tuple(cov.shape)}")
    if method == "eigh":
        evals, evecs = torch.linalg.eigh(cov.double())
        # Rounding can leave a tiny negative eigenvalue on a PSD matrix: keep it invertible.
        evals = evals.clamp_min(torch.finfo(torch.float64).tiny ** 0.5)
        return ((evecs * evals.rsqrt()) @ evecs.T).to(cov.dtype)
    if method != "newton_schulz":
        raise ValueError(f"method: expected 'newton_schulz' or 'eigh', got {method!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter: expected a positive number of iterations, got {n_iter}")
    # Scaling by the Frobenius norm puts every eigenvalue in (0, 1], where the iteration converges.
    norm = torch.linalg.matrix_norm(cov)
    identity = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    y, z = cov / norm, identity
    for _ in range(n_iter):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    return z / norm.sqrt()


class FastDeconv(nn.Module):
    """Convolution on whitened im2col patches, with BatchNorm-like running statistics.

    In training mode the ``k*k*C`` dimensional patches of the batch (taken every
    ``sampling_stride * stride`` pixels to save work) give a mean ``m`` and a covariance ``S``;
    the layer computes ``weight . S^(-1/2) (patch - m) + bias`` at every output pixel, folded
    into a single convolution whose kernel is ``weight @ S^(-1/2)``. Gradients flow through
    ``m`` and ``S^(-1/2)``. ``running_mean`` and ``running_deconv`` (start: 0 and identity, so an
    untrained layer in eval mode is a plain convolution) follow the batch values with
    ``momentum``; eval mode uses them. As in the official layer, every channel of a patch is
    whitened jointly (the official ``block`` option only splits wide layers; here the layer
    sits on the 3-channel input).

    Args:
        in_channels: input channels C.
        out_channels: output channels.
        kernel_size: square kernel size k.
        stride: convolution stride.
        padding: zero padding of the convolution (and of the patches used for statistics).
        eps: added to the covariance diagonal before the inverse square root.
        n_iter: Newton-Schulz iterations (official: 5, a partial whitening).
        momentum: weight of the new batch in the running statistics (BatchNorm convention).
        sampling_stride: take patches every ``sampling_stride * stride`` pixels for statistics.
        method: ``"newton_schulz"`` (official) or ``"eigh"`` (exact whitening).

    Shape:
        (B, C, H, W) -> (B, out_channels, H_out, W_out), as ``nn.Conv2d`` with the same settings.

    Example:
        >>> layer = FastDeconv(3, 3, kernel_size=3, padding=1)
        >>> layer(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])

    Reference:
        Ye et al., Network Deconvolution, ICLR 2020; its use as AECR-Net's first layer is in the
        official code only, not in the AECR-Net paper.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        eps: float = 1e-5,
        n_iter: int = 5,
        momentum: float = 0.1,
        sampling_stride: int = 3,
        method: str = "newton_schulz",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride),
                            ("sampling_stride", sampling_stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")
        if eps < 0:
            raise ValueError(f"eps: expected a non-negative value, got {eps}")
        if method not in ("newton_schulz", "eigh"):
            raise ValueError(f"method: expected 'newton_schulz' or 'eigh', got {method!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.eps, self.n_iter, self.momentum = eps, n_iter, momentum
        self.sampling_stride, self.method = sampling_stride, method
        self.num_features = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_deconv", torch.eye(self.num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default initialisation, as the official layer (a _ConvNd subclass) has.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.num_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (D,) and whitening matrix (D, D) of the batch's sampled patches, D = C*k*k."""
        # unfold orders a patch channel-major (c, ky, kx): the same order as weight.flatten(1).
        patches = F.unfold(x.float(), self.kernel_size, padding=self.padding,
                           stride=self.sampling_stride * self.stride)
        patches = patches.transpose(1, 2).reshape(-1, self.num_features)
        if distributed.world_size() > 1:
            # Data-parallel training: the statistics of the whole batch, every process's patches
            # (the same count in each: fixed-size crops). Gradient reaches this process's own
            # patches only, which is exact where the input needs none (AECR-Net's hazy input).
            whole, start = distributed.gather_rows(patches)
            patches = torch.cat([whole[:start], patches, whole[start + patches.shape[0]:]])
        mean = patches.mean(0)
        centred = patches - mean
        identity = torch.eye(self.num_features, dtype=centred.dtype, device=centred.device)
        cov = centred.T @ centred / centred.shape[0] + self.eps * identity
        return mean, inverse_sqrt_psd(cov, self.method, self.n_iter)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        if self.training:
            mean, deconv = self.batch_statistics(x)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_deconv.lerp_(
                    deconv.detach().to(self.running_deconv.dtype), self.momentum
                )
        else:
            mean, deconv = self.running_mean, self.running_deconv
        weight = self.weight.flatten(1) @ deconv.to(self.weight.dtype)
        bias = self.bias - weight @ mean.to(self.weight.dtype)
        return F.conv2d(x, weight.view_as(self.weight).to(x.dtype), bias.to(x.dtype),
                        self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, method={self.method!r}, "
                f"n_iter={self.n_iter}, eps={self.eps}, momentum={self.momentum}")


# --------------------------------------------------------------------------------------------
# FA block (FFA-Net): residual conv block with channel and pixel attention
# --------------------------------------------------------------------------------------------
class ChannelAttention(nn.Module):
    """Scale each channel by a weight computed from the global average of all channels.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.ca = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.ca(x.mean(dim=(2, 3), keepdim=True))


class PixelAttention(nn.Module):
    """Scale each pixel by one weight in (0, 1): haze is thicker in some places than in others.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.pa = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.pa(x)


class FABlock(nn.Module):
    """FFA-Net's feature attention block: conv-ReLU-(+x)-conv-CA-PA-(+x).

    Args:
        channels: feature channels (kept).
        kernel_size: kernel of the two convolutions (zero "same" padding).
        reduction: channel reduction inside both attention branches.

    Shape:
        (B, C, H, W) -> (B, C, H, W)

    Reference:
        Qin et al., FFA-Net: Feature Fusion Attention Network for Single Image Dehazing, AAAI 2020.
    """

    def __init__(self, channels: int, kernel_size: int = 3, reduction: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.calayer = ChannelAttention(channels, reduction)
        self.palayer = PixelAttention(channels, reduction)

    def forward(self, x: Tensor) -> Tensor:
        res = self.act1(self.conv1(x)) + x
        res = self.palayer(self.calayer(self.conv2(res)))
        return res + x


# --------------------------------------------------------------------------------------------
# Dynamic feature enhancement: modulated deformable convolution (DCNv2)
# --------------------------------------------------------------------------------------------
DCN_IMPLS = ("auto", "sampled", "torchvision")


class ModulatedDeformConv2d(nn.Module):
    """DCNv2: a conv whose sampling offsets and per-tap modulation are predicted from the input.

    A plain conv (``conv_offset_mask``) predicts, at every output pixel, ``2*k*k`` offsets (the
    first ``2*k*k`` channels, read by ``torchvision.ops.deform_conv2d`` as (dy, dx) pairs per
    tap) and ``k*k`` mask logits (the last ``k*k`` channels, through a sigmoid). That conv starts
    at zero, as in DCNv2: offsets 0 and mask sigmoid(0) = 0.5, so at initialisation the layer
    equals ``conv2d(0.5 * x, weight) + bias``.

    Two implementations compute the same function (tested to float precision, gradients too):
    ``"torchvision"`` (``torchvision.ops.deform_conv2d``) and ``"sampled"``
    (:func:`lowcon.models.deform_conv.sampled_deform_conv2d`: ``grid_sample`` plus a matmul,
    about 5x faster forward + backward on CPU, and usable under bf16 autocast). ``"auto"`` picks
    ``"sampled"`` on CPU and torchvision's kernels elsewhere.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size k.
        stride: convolution stride.
        padding: zero padding.
        impl: ``"auto"``, ``"sampled"`` or ``"torchvision"``.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H_out, W_out)

    Reference:
        Zhu et al., Deformable ConvNets v2: More Deformable, Better Results, CVPR 2019.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
        padding: int = 1, impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in DCN_IMPLS:
            raise ValueError(f"impl: expected one of {', '.join(DCN_IMPLS)}, got {impl!r}")
        self.stride, self.padding, self.kernel_size = stride, padding, kernel_size
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        taps = kernel_size * kernel_size
        self.conv_offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, stride, padding)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset_mask = self.conv_offset_mask(x)
        taps = self.kernel_size * self.kernel_size
        offset, mask_logits = offset_mask.split([2 * taps, taps], dim=1)
        impl = self.impl
        if impl == "auto":
            impl = "sampled" if x.device.type == "cpu" else "torchvision"
        if impl == "sampled":
            op = sampled_deform_conv2d
        else:  # imported here: torchvision's compiled ops add about 170 MB to the process at import
            from torchvision.ops import deform_conv2d as op
        return op(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                  mask=torch.sigmoid(mask_logits))

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, impl={self.impl!r}")


class DCNBlock(nn.Module):
    """One 3x3 DCNv2 layer at constant width, AECR-Net's dynamic feature enhancement (DFE) unit.

    A wrapper only so that parameter names (``dcn_block.dcn.weight`` ...) match the released
    checkpoints.

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, impl: str = "auto") -> None:
        super().__init__()
        self.dcn = ModulatedDeformConv2d(channels, channels, kernel_size=3, stride=1, padding=1,
                                         impl=impl)

    def forward(self, x: Tensor) -> Tensor:
        return self.dcn(x)


# --------------------------------------------------------------------------------------------
# Adaptive mixup
# --------------------------------------------------------------------------------------------
class Mix(nn.Module):
    """Adaptive mixup of an encoder (downsampling) feature and a decoder (upsampling) feature.

    ``out = sigmoid(w) * f_down + (1 - sigmoid(w)) * f_up`` with one learnable scalar ``w``.

    Args:
        init: initial ``w`` (AECR-Net: -1 for the 4x mix, -0.6 for the 2x mix).

    Shape:
        f_down, f_up (B, C, H, W) -> (B, C, H, W)

    Example:
        >>> mix = Mix(init=0.0)  # sigmoid(0) = 0.5: the plain average
        >>> mix(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)).item()
        0.5
    """

    def __init__(self, init: float = -0.8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, f_down: Tensor, f_up: Tensor) -> Tensor:
        if f_down.shape != f_up.shape:
            raise ValueError(
                f"f_up: expected the shape of f_down {tuple(f_down.shape)}, got {tuple(f_up.shape)}"
            )
        factor = torch.sigmoid(self.w)
        return f_down * factor + f_up * (1 - factor)


class _ClampInEval(nn.Module):
    # Linear head for training (no saturated gradients), valid [0, 1] images at inference.
    def forward(self, x: Tensor) -> Tensor:
        return x if self.training else x.clamp(0.0, 1.0)


_OUTPUTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "clamp": _ClampInEval}
_FUSIONS = ("mixup", "skip", "none")


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class AECRNet(nn.Module):
    """AECR-Net's compact dehazing network (the official ``Dehaze`` class), 2.61M parameters.

    Args:
        in_channels: input image channels.
        out_channels: output image channels.
        ngf: width of the first encoder level (then 2 ngf, 4 ngf); 4 ngf must divide by 8.
        n_fa_blocks: how many times an FA block is applied at 4x downsampling.
        n_dcn: how many times a DCN block is applied after the FA blocks (with ``use_dfe``).
        share_blocks: one FA block object and one DCN block object applied repeatedly, as
            released (2,614,229 parameters); ``False`` makes separate blocks (9,291,989).
        use_dfe: the dynamic feature enhancement (deformable conv) stage.
        fusion: how the 4x / 2x encoder features join the decoder: ``"mixup"`` (adaptive
            mixup, released), ``"skip"`` (plain addition) or ``"none"``.
        use_fastdeconv: the FastDeconv whitening first layer (in the released code, not in
            the paper; it is part of the 2.61M count).
        output: head activation: ``"tanh"`` (released, although the data are in [0, 1]),
            ``"sigmoid"``, or ``"clamp"`` (linear in training, clamped to [0, 1] in eval).
        dcn_impl: the deformable conv's implementation, ``"auto"`` (``"sampled"`` on CPU,
            torchvision's kernels elsewhere), ``"sampled"`` or ``"torchvision"``; same
            function and parameters, different speed and memory.
        checkpoint_blocks: activation checkpointing: the FA blocks and the full-resolution
            encoder and decoder layers keep only their inputs and recompute the rest in
            backward. About 45 % fewer saved activations for 15-20 % more time; same
            outputs and gradients; no effect under ``torch.no_grad``.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W); H and W multiples of
        ``size_multiple`` (4); pad the input first otherwise.

    Example:
        >>> net = AECRNet()
        >>> net(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])

    Reference:
        Wu et al., Contrastive Learning for Compact Single Image Dehazing, CVPR 2021;
        official code github.com/GlassyWu/AECR-Net, models/AECRNet.py.
    """

    size_multiple: int = 4

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        n_fa_blocks: int = 6,
        n_dcn: int = 2,
        share_blocks: bool = True,
        use_dfe: bool = True,
        fusion: str = "mixup",
        use_fastdeconv: bool = True,
        output: str = "tanh",
        dcn_impl: str = "auto",
        checkpoint_blocks: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("ngf", ngf, 2), ("n_fa_blocks", n_fa_blocks, 0),
                                 ("n_dcn", n_dcn, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if (4 * ngf) % 8:
            raise ValueError(f"ngf: 4 * ngf must divide by the attention reduction 8, got {ngf}")
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion: expected one of {', '.join(_FUSIONS)}, got {fusion!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output: expected one of {', '.join(_OUTPUTS)}, got {output!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.n_fa_blocks, self.n_dcn = n_fa_blocks, n_dcn
        self.share_blocks, self.use_dfe, self.fusion = share_blocks, use_dfe, fusion
        self.output = output
        self.checkpoint_blocks = checkpoint_blocks

        # Official order of definition (and of the state dict): down, block, up, dcn, deconv, mix.
        self.down1 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7),
                                   nn.ReLU(inplace=True))
        self.down2 = nn.Sequential(nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1),
                                   nn.ReLU(inplace=True))
        self.down3 = nn.Sequential(nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1),
                                   nn.ReLU(inplace=True))
        if share_blocks:
            self.block = FABlock(4 * ngf) if n_fa_blocks else None
        else:
            self.blocks = nn.ModuleList(FABlock(4 * ngf) for _ in range(n_fa_blocks))
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
        )
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
        )
        self.up3 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7),
                                 _OUTPUTS[output]())
        if use_dfe:
            if share_blocks:
                self.dcn_block = DCNBlock(4 * ngf, dcn_impl)
            else:
                self.dcn_blocks = nn.ModuleList(DCNBlock(4 * ngf, dcn_impl) for _ in range(n_dcn))
        self.deconv = (FastDeconv(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
                       if use_fastdeconv else nn.Identity())
        if fusion == "mixup":
            self.mix1 = Mix(init=-1.0)
            self.mix2 = Mix(init=-0.6)

    def fa_blocks(self) -> list[nn.Module]:
        """The FA block applied at each of the ``n_fa_blocks`` steps (one object if shared)."""
        if self.share_blocks:
            return [self.block] * self.n_fa_blocks
        return list(self.blocks)

    def dcn_steps(self) -> list[nn.Module]:
        """The DCN block applied at each of the ``n_dcn`` steps (empty without DFE)."""
        if not self.use_dfe:
            return []
        return [self.dcn_block] * self.n_dcn if self.share_blocks else list(self.dcn_blocks)

    def _fuse(self, mix: str, f_down: Tensor, f_up: Tensor) -> Tensor:
        if self.fusion == "mixup":
            return getattr(self, mix)(f_down, f_up)
        if self.fusion == "skip":
            return f_down + f_up
        return f_up

    def forward(self, hazy: Tensor) -> Tensor:
        if hazy.dim() != 4 or hazy.shape[1] != self.in_channels:
            raise ValueError(
                f"hazy: expected (B, {self.in_channels}, H, W), got shape {tuple(hazy.shape)}"
            )
        height, width = hazy.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"hazy: H and W must be multiples of {self.size_multiple}, got shape "
                f"{tuple(hazy.shape)}; pad the image first"
            )
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()

        def run(fn, x: Tensor) -> Tensor:
            return checkpoint(fn, x, use_reentrant=False) if recompute else fn(x)

        # FastDeconv stays outside any checkpoint: its training forward updates running stats.
        x = self.deconv(hazy)
        f_down2 = run(self._full_resolution_encoder, x)
        f_down4 = self.down3(f_down2)
        x = f_down4
        for block in self.fa_blocks():
            x = run(block, x)
        for block in self.dcn_steps():
            x = block(x)
        x = self.up1(self._fuse("mix1", f_down4, x))
        return run(self._full_resolution_decoder, self._fuse("mix2", f_down2, x))

    def _full_resolution_encoder(self, x: Tensor) -> Tensor:
        return self.down2(self.down1(x))

    def _full_resolution_decoder(self, x: Tensor) -> Tensor:
        return self.up3(self.up2(x))


# Table 2 of the paper (SOTS-indoor ablation), network rows only: CR rows change the loss.
AECRNET_VARIANTS: dict[str, dict] = {
    "base": {"use_dfe": False, "fusion": "none"},
    "mixup": {"use_dfe": False, "fusion": "mixup"},
    "dfe": {"use_dfe": True, "fusion": "none"},
    "dfe_skip": {"use_dfe": True, "fusion": "skip"},
    "dfe_mixup": {"use_dfe": True, "fusion": "mixup"},
}


def build_aecrnet(variant: str = "dfe_mixup", **overrides) -> AECRNet:
    """An AECR-Net of one of the paper's ablation rows (``AECRNET_VARIANTS``).

    Args:
        variant: ``"base"``, ``"mixup"``, ``"dfe"``, ``"dfe_skip"`` or ``"dfe_mixup"`` (the
            full network). Every variant keeps the FastDeconv first layer and the shared blocks.
        overrides: any other ``AECRNet`` keyword argument; it wins over the variant's.

    Example:
        >>> net = build_aecrnet("dfe_skip", ngf=8)
        >>> net.fusion
        'skip'
    """
    if variant not in AECRNET_VARIANTS:
        raise ValueError(
            f"variant: unknown AECR-Net variant {variant!r}; valid: {', '.join(AECRNET_VARIANTS)}"
        )
    return AECRNet(**{**AECRNET_VARIANTS[variant], **overrides})
