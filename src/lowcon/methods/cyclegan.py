"""CycleGAN training: two generators, two PatchGANs, cycle and identity L1, image pools.

As the official ``cycle_gan_model.py`` (CycleGAN and CUT repositories): G_A maps A to B and
D_A judges G_A(A) against real B; G_B and D_B the other way. Each step updates both generators
first (D frozen), then both discriminators on fakes drawn from a history pool of 50 per
direction. Loss of the generators:

    G_A + G_B + lambda_A * cycle_A + lambda_B * cycle_B
        + lambda_identity * (lambda_B * idt_A + lambda_A * idt_B)

with cycle_A = |G_B(G_A(a)) - a|, idt_A = |G_A(b) - b| (L1 means, in [-1, 1]); each D loss is
0.5 * (real + fake). Logged terms are unweighted (the official logs weight cycle and idt);
``G`` is the weighted total. The pools are saved with the optimisers, so a resumed run continues
exactly.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowcon import distributed
from lowcon.methods.cut import TranslationMethod, _to_unit, set_requires_grad
from lowcon.models.gan_loss import GAN_MODES, GANLoss
from lowcon.models.image_pool import ImagePool

__all__ = ["CycleGAN"]


class CycleGAN(TranslationMethod):
    """CycleGAN on any generator / discriminator pair of networks.

    Args:
        generator_A, generator_B: A -> B and B -> A networks (e.g. ResnetGenerator), on the device.
        discriminator_A, discriminator_B: judges of domain B and of domain A.
        lambda_A, lambda_B: cycle weights (10, 10).
        lambda_identity: identity weight relative to lambda_A/B (0.5; 0 turns it off).
        pool_size: fakes kept per discriminator (50; 0 = no pool).
        gan_mode: "lsgan" (CycleGAN), "vanilla", "hinge" or "nonsaturating".
        lr, betas: Adam for both generators (one optimiser) and both discriminators (another).
        n_epochs, n_epochs_decay, steps_per_epoch: the linear schedule (100 + 100 epochs).
        direction: "AtoB" or "BtoA" (swaps the roles of batch["A"] and batch["B"]).

    Example:
        >>> from lowcon.models.resnet_generator import ResnetGenerator
        >>> from lowcon.models.patch_discriminator import PatchDiscriminator
        >>> gan = CycleGAN(ResnetGenerator(ngf=8, n_blocks=1), ResnetGenerator(ngf=8, n_blocks=1),
        ...                PatchDiscriminator(ndf=8), PatchDiscriminator(ndf=8))
        >>> losses = gan.train_step({"A": torch.rand(1, 3, 32, 32), "B": torch.rand(1, 3, 32, 32)})

    Reference:
        Zhu et al., Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
        Networks, ICCV 2017; official ``models/cycle_gan_model.py``.
    """

    name = "cyclegan"

    def __init__(
        self,
        generator_A: nn.Module,
        generator_B: nn.Module,
        discriminator_A: nn.Module,
        discriminator_B: nn.Module,
        *,
        lambda_A: float = 10.0,
        lambda_B: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        gan_mode: str = "lsgan",
        lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        n_epochs: int = 100,
        n_epochs_decay: int = 100,
        steps_per_epoch: int = 1,
        direction: str = "AtoB",
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(lr=lr, n_epochs=n_epochs, n_epochs_decay=n_epochs_decay,
                         steps_per_epoch=steps_per_epoch, direction=direction, autocast_dtype=autocast_dtype)
        for name, value in (("lambda_A", lambda_A), ("lambda_B", lambda_B), ("lambda_identity", lambda_identity)):
            if value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode: expected one of {GAN_MODES}, got {gan_mode!r}")
        self.G_A, self.G_B = generator_A, generator_B
        self.D_A, self.D_B = discriminator_A, discriminator_B
        self.lambda_A, self.lambda_B, self.lambda_identity = lambda_A, lambda_B, lambda_identity
        # pool_A holds fakes of domain A (for D_B), pool_B fakes of domain B (for D_A).
        self.pool_A, self.pool_B = ImagePool(pool_size), ImagePool(pool_size)
        self.gan = GANLoss(gan_mode)
        betas = tuple(betas)
        self.optimizers["G"] = torch.optim.Adam(
            itertools.chain(self.G_A.parameters(), self.G_B.parameters()), lr=lr, betas=betas)
        self.optimizers["D"] = torch.optim.Adam(
            itertools.chain(self.D_A.parameters(), self.D_B.parameters()), lr=lr, betas=betas)
        self._start_schedule()

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"G_A": self.G_A, "G_B": self.G_B, "D_A": self.D_A, "D_B": self.D_B}

    def inference_module(self) -> nn.Module:
        return self.G_A

    # -- pools travel with the optimiser state, so that a resume is exact ------------------------
    def training_state_dict(self) -> dict:
        state = super().training_state_dict()
        state["pools"] = {name: [img.cpu() for img in pool.images]
                          for name, pool in (("A", self.pool_A), ("B", self.pool_B))}
        return state

    def load_training_state_dict(self, state: dict) -> None:
        super().load_training_state_dict(state)
        device = self.device
        for name, pool in (("A", self.pool_A), ("B", self.pool_B)):
            pool.images = [img.to(device) for img in state.get("pools", {}).get(name, [])]

    # -- one step ------------------------------------------------------------------------------
    def translate_for_training(self, real_A: Tensor, real_B: Tensor) -> dict[str, Tensor]:
        fake_B = self.G_A(real_A)
        fake_A = self.G_B(real_B)
        return {"fake_B": fake_B, "rec_A": self.G_B(fake_B), "fake_A": fake_A, "rec_B": self.G_A(fake_A)}

    def generator_losses(self, real_A: Tensor, real_B: Tensor, passed: dict) -> dict[str, Tensor]:
        losses = {
            "G_A": self.gan(self.D_A(passed["fake_B"]), True, for_discriminator=False),
            "G_B": self.gan(self.D_B(passed["fake_A"]), True, for_discriminator=False),
            "cycle_A": F.l1_loss(passed["rec_A"], real_A),
            "cycle_B": F.l1_loss(passed["rec_B"], real_B),
        }
        total = (losses["G_A"] + losses["G_B"]
                 + self.lambda_A * losses["cycle_A"] + self.lambda_B * losses["cycle_B"])
        if self.lambda_identity > 0:
            losses["idt_A"] = F.l1_loss(self.G_A(real_B), real_B)
            losses["idt_B"] = F.l1_loss(self.G_B(real_A), real_A)
            total = total + self.lambda_identity * (self.lambda_B * losses["idt_A"] + self.lambda_A * losses["idt_B"])
        losses["G"] = total
        return losses

    def discriminator_losses(self, real_A: Tensor, real_B: Tensor, fake_A: Tensor, fake_B: Tensor) -> dict[str, Tensor]:
        """D_A on real B vs (pooled) fake B, D_B on real A vs (pooled) fake A; pass pooled fakes."""
        losses = {
            "D_A_real": self.gan(self.D_A(real_B), True),
            "D_A_fake": self.gan(self.D_A(fake_B.detach()), False),
            "D_B_real": self.gan(self.D_B(real_A), True),
            "D_B_fake": self.gan(self.D_B(fake_A.detach()), False),
        }
        losses["D_A"] = 0.5 * (losses["D_A_real"] + losses["D_A_fake"])
        losses["D_B"] = 0.5 * (losses["D_B_real"] + losses["D_B_fake"])
        return losses

    def generator_step(self, real_A: Tensor, real_B: Tensor, passed: dict) -> dict[str, float]:
        set_requires_grad([self.D_A, self.D_B], False)
        try:
            self.optimizers["G"].zero_grad()
            losses = self._losses(self.generator_losses, real_A, real_B, passed)
            losses["G"].backward()
            self.optimizers["G"].step()
        finally:
            set_requires_grad([self.D_A, self.D_B], True)
        return {k: float(v.detach()) for k, v in losses.items()}

    @staticmethod
    def _pooled(pool: ImagePool, fakes: Tensor) -> Tensor:
        """``pool.query`` of the whole batch's fakes, this process's rows. In data-parallel
        training (:mod:`lowcon.distributed`) every process queries with every process's fakes
        and the same random draws, so each keeps the one pool a single process would."""
        whole, start = distributed.gather_rows(fakes)
        return pool.query(whole)[start:start + fakes.shape[0]]

    def discriminator_step(self, real_A: Tensor, real_B: Tensor, fake_A: Tensor, fake_B: Tensor) -> dict[str, float]:
        self.optimizers["D"].zero_grad()
        # D_A's pool first, as the official order of draws; the pools keep float32 images
        pooled_B = self._pooled(self.pool_B, fake_B.float())
        pooled_A = self._pooled(self.pool_A, fake_A.float())
        losses = self._losses(self.discriminator_losses, real_A, real_B, pooled_A, pooled_B)
        # Each D has its own loss; the sum gives each its own gradient (as two backward calls do).
        (losses["D_A"] + losses["D_B"]).backward()
        self.optimizers["D"].step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def train_step(self, batch: dict) -> dict[str, float]:
        real_A, real_B = self._domains(batch)
        with self._autocast():
            passed = self.translate_for_training(real_A, real_B)
        logged = self.generator_step(real_A, real_B, passed)
        logged.update(self.discriminator_step(real_A, real_B, passed["fake_A"], passed["fake_B"]))
        self._finish_step()
        return logged

    @torch.no_grad()
    def visuals(self, batch: dict) -> dict[str, Tensor]:
        real_A, real_B = self._domains(batch)
        fake_B, fake_A = self.G_A(real_A), self.G_B(real_B)
        shown = {"real_A": real_A, "fake_B": fake_B, "rec_A": self.G_B(fake_B),
                 "real_B": real_B, "fake_A": fake_A, "rec_B": self.G_A(fake_A)}
        return self._run_visual_hooks({k: _to_unit(v) for k, v in shown.items()})
