"""Weight initialisation for the CycleGAN / CUT networks (``init_weights`` of their code).

CUT initialises every network (generator, discriminator, projection MLPs) with
``init_type="xavier", gain=0.02``; CycleGAN and pix2pix used ``"normal"`` with the same gain.
"""
from __future__ import annotations

from torch import nn

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")

_WEIGHTED = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def init_weights(net: nn.Module, init_type: str = "xavier", gain: float = 0.02) -> nn.Module:
    """Initialise conv / linear weights in place; zero their biases; batch norms get N(1, gain).

    Args:
        net: the network; every submodule is visited.
        init_type: ``"normal"`` (N(0, gain)), ``"xavier"`` (Xavier normal with ``gain``),
            ``"kaiming"`` (Kaiming normal, fan_in, a=0; ``gain`` unused, as in the official code)
            or ``"orthogonal"`` (with ``gain``).
        gain: scale for normal, xavier and orthogonal; the std of the batch-norm weights.

    Returns:
        ``net`` itself, so that ``net = init_weights(Net())`` reads naturally.

    Example:
        >>> net = init_weights(nn.Conv2d(3, 8, 3))          # CUT default: xavier, gain 0.02
        >>> bool((net.bias == 0).all())
        True

    Reference:
        ``init_weights`` in ``models/networks.py`` of the official CUT and CycleGAN code.
        Norm layers without affine parameters (CUT's instance norm) have nothing to initialise.
    """
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {INIT_TYPES}, got {init_type!r}")
    if not isinstance(gain, (int, float)) or gain <= 0:
        raise ValueError(f"gain must be a positive number, got {gain!r}")

    for module in net.modules():
        if isinstance(module, _WEIGHTED):
            if init_type == "normal":
                nn.init.normal_(module.weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(module.weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BATCH_NORMS) and module.affine:
            nn.init.normal_(module.weight, 1.0, gain)
            nn.init.zeros_(module.bias)
    return net
