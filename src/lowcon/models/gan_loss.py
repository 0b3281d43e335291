"""Adversarial losses on discriminator logits: LSGAN (CUT/CycleGAN default), vanilla, hinge,
non-saturating."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAN_MODES = ("lsgan", "vanilla", "hinge", "nonsaturating")


def gan_loss(prediction: Tensor, target_is_real: bool, *, mode: str = "lsgan",
             for_discriminator: bool = True) -> Tensor:
    """Adversarial loss of discriminator logits against a real or fake target, averaged to a scalar.

    Modes (``x`` = ``prediction``, means over all elements):

    - ``"lsgan"``: ``mean((x - t)^2)``, ``t = 1`` for real and ``0`` for fake.
    - ``"vanilla"``: binary cross-entropy with logits to ``t``.
    - ``"nonsaturating"``: ``mean(softplus(-x))`` for real, ``mean(softplus(x))`` for fake
      (``= vanilla``; the official code averages per image, then the caller over the batch).
    - ``"hinge"``: discriminator ``mean(relu(1 - x))`` for real, ``mean(relu(1 + x))`` for fake;
      generator ``-mean(x)``.

    Only hinge treats the two players differently; for the others the generator loss is the
    real-target loss on the fakes' logits (``target_is_real=True``), as in the CUT code.

    Args:
        prediction: discriminator logits (no sigmoid), any shape.
        target_is_real: whether the target label is "real".
        mode: one of ``GAN_MODES``.
        for_discriminator: ``False`` for the generator's loss (matters for hinge only, where the
            generator's loss needs ``target_is_real=True``).

    Shape:
        Input: any; output: scalar.

    Example:
        >>> gan_loss(torch.zeros(1, 1, 30, 30), True)   # LSGAN: (0 - 1)^2
        tensor(1.)

    Reference:
        Mao et al., LSGAN, ICCV 2017; Lim & Ye 2017 (hinge); ``GANLoss`` in the official CUT
        ``models/networks.py``.
    """
    if mode not in GAN_MODES:
        raise ValueError(f"mode must be one of {GAN_MODES}, got {mode!r}")
    if not isinstance(prediction, Tensor):
        raise TypeError(f"prediction must be a Tensor, got {type(prediction).__name__}")
    if not isinstance(target_is_real, bool):
        raise TypeError(f"target_is_real must be a bool, got {type(target_is_real).__name__}")

    if mode == "lsgan":
        return F.mse_loss(prediction, torch.full_like(prediction, float(target_is_real)))
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(prediction, torch.full_like(prediction, float(target_is_real)))
    if mode == "nonsaturating":
        return F.softplus(-prediction if target_is_real else prediction).mean()
    # hinge
    if not for_discriminator:
        if not target_is_real:
            raise ValueError("hinge generator loss is defined for target_is_real=True only")
        return -prediction.mean()
    return F.relu(1 - prediction).mean() if target_is_real else F.relu(1 + prediction).mean()


class GANLoss(nn.Module):
    """Module form of ``gan_loss`` with the mode fixed at construction.

    Args:
        mode: ``"lsgan"`` (CUT default), ``"vanilla"``, ``"hinge"`` or ``"nonsaturating"``.

    Example:
        >>> criterion = GANLoss("lsgan")
        >>> loss_d = 0.5 * (criterion(d(real), True) + criterion(d(fake.detach()), False))  # doctest: +SKIP
        >>> loss_g = criterion(d(fake), True, for_discriminator=False)  # doctest: +SKIP
    """

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"mode must be one of {GAN_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, prediction: Tensor, target_is_real: bool, for_discriminator: bool = True) -> Tensor:
        return gan_loss(prediction, target_is_real, mode=self.mode, for_discriminator=for_discriminator)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
