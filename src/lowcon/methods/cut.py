"""CUT, FastCUT and SinCUT training: a generator, a PatchGAN and PatchNCE between input and output.

One class covers the three, as the official ``cut_model.py`` / ``sincut_model.py`` do by options:

- CUT: ``lambda_NCE=1``, ``nce_idt=True`` (PatchNCE also between real_B and G(real_B)),
  G loss = lambda_GAN * GAN + lambda_NCE * (NCE_X + NCE_Y) / 2.
- FastCUT: ``lambda_NCE=10``, ``nce_idt=False``, ``flip_equivariance=True``,
  G loss = lambda_GAN * GAN + lambda_NCE * NCE_X.
- SinCUT: CUT plus an R1 gradient penalty on D (``lambda_R1``), an L1 identity loss
  ``lambda_identity * |G(real_B) - real_B|`` and negatives from the whole minibatch. It runs on
  the networks it is given; the sincut preset uses the official StyleGAN2-style ones
  (:mod:`lowcon.models.stylegan2`, ``netG``/``netD: stylegan2``).

Each step updates D first on the detached fakes, then G and the projection head together, as
the official ``optimize_parameters``. Data come in [0, 1] and are mapped to [-1, 1] here. Logged
terms are unweighted (``G_GAN``, ``NCE_X``, ``NCE_Y``, ``idt``, ``D_real``, ``D_fake``, ``D_R1``);
``G`` and ``D`` are the weighted totals that are back-propagated. The official logs multiply
G_GAN and NCE by their lambdas.

The learning rate follows the official linear rule (constant for ``n_epochs``, then linear to 0
over ``n_epochs_decay``) evaluated per step instead of per epoch; the method is told
``steps_per_epoch`` by whoever builds it. The schedule is a scheduler in ``self.schedulers``, so
the trainer saves and restores it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowcon.contrast.patchnce import PatchNCELoss
from lowcon.contrast.projector import PatchProjector
from lowcon.contrast.sampler import PatchSampler
from lowcon.models.bf16conv import bf16_convolutions
from lowcon.models.fused import unfused
from lowcon.models.gan_loss import GAN_MODES, GANLoss
from lowcon.methods.base import Method

__all__ = ["CUT", "TranslationMethod", "LinearDecaySchedule", "linear_decay_factor", "set_requires_grad"]

DIRECTIONS = ("AtoB", "BtoA")


def linear_decay_factor(step: int, constant_steps: int, decay_steps: int) -> float:
    """Learning-rate factor of period `step` (0-based): 1 for `constant_steps`, then linear to 0.

    The official rule ``1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)``, in whatever
    period is counted (epochs, as :class:`LinearDecaySchedule` does for the translation methods,
    or steps): the last period runs at 1 / (decay_steps + 1) and the factor reaches 0 right after.
    """
    return max(0.0, 1.0 - max(0, step + 1 - constant_steps) / float(decay_steps + 1))


class LinearDecaySchedule:
    """Sets the lr of every param group of several optimisers from the number of steps done.

    With `every` = the steps of an epoch the lr changes once an epoch, as the official code's
    scheduler (stepped at the end of each epoch) changes it: epoch e (0-based) runs at
    ``linear_decay_factor(e, n_epochs, n_epochs_decay)``. With `every` = 1 it changes every step.
    Works with optimisers whose parameters appear late (:class:`DeferredOptimizer`): the lr is
    written on every step, never accumulated. ``state_dict`` holds the step count and the shape.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = LinearDecaySchedule([opt], 1.0, constant_steps=2 * 3, decay_steps=2 * 3, every=3)
        >>> lrs = []
        >>> for _ in range(12):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     sched.step()
        >>> lrs  # 2 + 2 epochs of 3 steps: the decay epochs at 1 - 1/3 and 1 - 2/3
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.6667, 0.6667, 0.6667, 0.3333, 0.3333, 0.3333]
    """

    def __init__(self, optimizers: Iterable, base_lr: float, constant_steps: int, decay_steps: int,
                 every: int = 1) -> None:
        if constant_steps < 0 or decay_steps < 0:
            raise ValueError(f"constant_steps, decay_steps: must be >= 0, got {constant_steps}, {decay_steps}")
        if every < 1 or constant_steps % every or decay_steps % every:
            raise ValueError(f"every: must be >= 1 and divide constant_steps and decay_steps, got {every} for "
                             f"{constant_steps} and {decay_steps}")
        self.optimizers = list(optimizers)
        self.base_lr = float(base_lr)
        self.constant_steps = int(constant_steps)
        self.decay_steps = int(decay_steps)
        self.every = int(every)
        self.last_step = 0
        self.apply()

    @property
    def factor(self) -> float:
        e = self.every
        return linear_decay_factor(self.last_step // e, self.constant_steps // e, self.decay_steps // e)

    def apply(self) -> None:
        lr = self.base_lr * self.factor
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        return [self.base_lr * self.factor]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "constant_steps": self.constant_steps, "decay_steps": self.decay_steps,
                "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        if (state["constant_steps"], state["decay_steps"]) != (self.constant_steps, self.decay_steps):
            raise ValueError(
                "schedule: the checkpoint's schedule has "
                f"{state['constant_steps']} + {state['decay_steps']} steps, this run {self.constant_steps} + "
                f"{self.decay_steps} (changed epochs, batch size or data?)"
            )
        self.last_step = int(state["last_step"])
        # A run keeps the schedule it started with: checkpoints written before the lr changed once an
        # epoch (lowcon 0.1.0 until 2026-12-07) have no "every" and changed it every step.
        self.every = int(state.get("every", 1))
        self.apply()


def set_requires_grad(nets: nn.Module | Sequence[nn.Module], flag: bool) -> None:
    for net in [nets] if isinstance(nets, nn.Module) else nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class TranslationMethod(Method):
    """What CUT and CycleGAN share: [0, 1] <-> [-1, 1], direction, the linear schedule (changed
    once an epoch),
    and hooks the pipeline uses to save epoch weights and check samples.

    Hooks: ``epoch_end_hooks`` are called with the 1-based number of each epoch just finished;
    ``visual_hooks`` with ``(visuals, steps_done)`` every time `visuals` runs.
    """

    def __init__(
        self, *, lr: float, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int, direction: str,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
        if n_epochs < 0 or n_epochs_decay < 0 or n_epochs + n_epochs_decay < 1:
            raise ValueError(f"n_epochs, n_epochs_decay: need >= 0 and a sum >= 1, got {n_epochs}, {n_epochs_decay}")
        if lr <= 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        self.lr = lr
        self.n_epochs, self.n_epochs_decay = n_epochs, n_epochs_decay
        self.steps_per_epoch = steps_per_epoch
        self.direction = direction
        self.autocast_dtype = autocast_dtype
        self.epoch_end_hooks: list[Callable[[int], None]] = []
        self.visual_hooks: list[Callable[[dict, int], None]] = []

    @property
    def total_steps(self) -> int:
        return (self.n_epochs + self.n_epochs_decay) * self.steps_per_epoch

    @property
    def steps_done(self) -> int:
        return self.schedulers["lr"].last_step

    def _start_schedule(self) -> None:
        self.schedulers["lr"] = LinearDecaySchedule(
            self.optimizers.values(), self.lr,
            self.n_epochs * self.steps_per_epoch, self.n_epochs_decay * self.steps_per_epoch,
            every=self.steps_per_epoch,  # once an epoch, as the official code
        )

    def _finish_step(self) -> None:
        self.schedulers["lr"].step()
        done = self.steps_done
        if done % self.steps_per_epoch == 0:
            for hook in self.epoch_end_hooks:
                hook(done // self.steps_per_epoch)

    def _autocast(self) -> ContextManager:
        """The networks' forward passes and losses run under this: mixed precision with
        `autocast_dtype` (e.g. ``torch.bfloat16``), or plain float32 when it is None. Backward runs
        outside it, as PyTorch recommends; the losses are returned in float32.

        bfloat16 on the CPU is :func:`~lowcon.models.bf16conv.bf16_convolutions` rather than
        autocast: the convolutions that lowcon's float32 Winograd, NNPACK and fused kernels do not
        serve compute in bf16 (the networks' layers were switched by ``use_bf16_convolutions``),
        and those kernels, which autocast would turn off, keep running."""
        if self.autocast_dtype == torch.bfloat16 and self.device.type == "cpu":
            return bf16_convolutions()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _losses(self, compute: Callable[..., dict[str, Tensor]], *args) -> dict[str, Tensor]:
        """``compute(*args)`` under :meth:`_autocast`, each loss term in float32."""
        with self._autocast():
            return {k: v.float() for k, v in compute(*args).items()}

    def _domains(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(real_A, real_B) in [-1, 1] on the method's device, swapped for ``BtoA``."""
        key_a, key_b = ("A", "B") if self.direction == "AtoB" else ("B", "A")
        device = self.device
        return batch[key_a].to(device) * 2 - 1, batch[key_b].to(device) * 2 - 1

    def _run_visual_hooks(self, visuals: dict[str, Tensor]) -> dict[str, Tensor]:
        for hook in self.visual_hooks:
            hook(visuals, self.steps_done)
        return visuals


def _to_unit(x: Tensor) -> Tensor:
    return ((x + 1) / 2).clamp(0, 1)


class CUT(TranslationMethod):
    """CUT / FastCUT / SinCUT training of `generator` against `discriminator`.

    Args:
        generator: a network with ``forward`` and ``forward_features(x, layers)`` (e.g.
            :class:`lowcon.models.resnet_generator.ResnetGenerator`), on the training device.
        discriminator: PatchGAN (or any network giving logits), on the same device.
        projector: the PatchNCE head; default a :class:`PatchProjector` (one MLP per layer
            of width `netF_nc`, xavier init with `init_gain`), built at once from
            ``generator.feature_channels`` (or lazily if the generator cannot tell).
        lambda_GAN, lambda_NCE: weights of the adversarial and PatchNCE terms.
        nce_idt: PatchNCE between real_B and G(real_B) too (CUT); the two NCE terms are averaged.
        nce_layers: generator layers for PatchNCE (default ``generator.nce_layers``).
        num_patches: locations per layer (256; 0 = all).
        nce_T: temperature (0.07).
        nce_negatives: "image" (other patches of the same image) or "batch" (SinCUT).
        flip_equivariance: FastCUT: with p = 0.5 per step the input of G is flipped left-right and
            the features of the output are flipped back before PatchNCE (official behaviour:
            fake_B itself stays flipped, the keys come from the unflipped real_A).
        lambda_R1: R1 penalty ``lambda_R1 / 2 * E|grad_x D(real_B)|^2`` (SinCUT: 1).
        lambda_identity: weight of L1(G(real_B), real_B) (SinCUT: 1; computed in [-1, 1]).
        gan_mode: "lsgan" (CUT), "nonsaturating" (SinCUT), "vanilla" or "hinge".
        lr, betas: Adam for G, D and the head (2e-4, (0.5, 0.999)).
        n_epochs, n_epochs_decay, steps_per_epoch: the linear schedule.
        direction: "AtoB" translates batch["A"] to look like batch["B"]; "BtoA" swaps them.
        netF_nc, init_gain, init_type: width and init of the default projection head.

    Example:
        >>> from lowcon.models.resnet_generator import ResnetGenerator
        >>> from lowcon.models.patch_discriminator import PatchDiscriminator
        >>> cut = CUT(ResnetGenerator(ngf=8, n_blocks=1, nce_layers=(0, 4, 8, 12)), PatchDiscriminator(ndf=8))
        >>> losses = cut.train_step({"A": torch.rand(1, 3, 32, 32), "B": torch.rand(1, 3, 32, 32)})
        >>> sorted(losses)
        ['D', 'D_fake', 'D_real', 'G', 'G_GAN', 'NCE_X', 'NCE_Y']

    Reference:
        Park et al., Contrastive Learning for Unpaired Image-to-Image Translation, ECCV 2020;
        official ``models/cut_model.py`` and ``models/sincut_model.py``.
    """

    name = "cut"

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        projector: Optional[PatchProjector] = None,
        *,
        lambda_GAN: float = 1.0,
        lambda_NCE: float = 1.0,
        nce_idt: bool = True,
        nce_layers: Optional[Sequence[int]] = None,
        num_patches: int = 256,
        nce_T: float = 0.07,
        nce_negatives: Literal["image", "batch"] = "image",
        flip_equivariance: bool = False,
        lambda_R1: float = 0.0,
        lambda_identity: float = 0.0,
        gan_mode: str = "lsgan",
        lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        n_epochs: int = 200,
        n_epochs_decay: int = 200,
        steps_per_epoch: int = 1,
        direction: str = "AtoB",
        netF_nc: int = 256,
        init_gain: float = 0.02,
        init_type: str = "xavier",
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(lr=lr, n_epochs=n_epochs, n_epochs_decay=n_epochs_decay,
                         steps_per_epoch=steps_per_epoch, direction=direction, autocast_dtype=autocast_dtype)
        for name, value in (("lambda_GAN", lambda_GAN), ("lambda_NCE", lambda_NCE),
                            ("lambda_R1", lambda_R1), ("lambda_identity", lambda_identity)):
            if value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        if lambda_GAN == 0 and lambda_NCE == 0 and lambda_identity == 0:
            raise ValueError("lambda_GAN, lambda_NCE, lambda_identity: all 0, nothing to train")
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode: expected one of {GAN_MODES}, got {gan_mode!r}")
        if not hasattr(generator, "forward_features"):
            raise TypeError("generator: needs forward_features(x, layers) for PatchNCE (e.g. ResnetGenerator)")
        self.G = generator
        self.D = discriminator
        self.nce_layers = tuple(nce_layers if nce_layers is not None else generator.nce_layers)
        if projector is None:
            channels = generator.feature_channels(self.nce_layers) if hasattr(generator, "feature_channels") else None
            projector = PatchProjector(dim=netF_nc, in_channels=channels, init_gain=init_gain, init_type=init_type)
            projector.to(next(generator.parameters()).device)
        self.F = projector
        self.lambda_GAN, self.lambda_NCE = lambda_GAN, lambda_NCE
        self.nce_idt, self.flip_equivariance = nce_idt, flip_equivariance
        self.lambda_R1, self.lambda_identity = lambda_R1, lambda_identity
        self.sampler = PatchSampler(num_patches)
        self.nce = PatchNCELoss(temperature=nce_T, negatives=nce_negatives)
        self.gan = GANLoss(gan_mode)

        betas = tuple(betas)
        self.optimizers["G"] = torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas)
        self.optimizers["D"] = torch.optim.Adam(self.D.parameters(), lr=lr, betas=betas)
        self.optimizers["F"] = self.F.make_optimizer(lambda params: torch.optim.Adam(params, lr=lr, betas=betas))
        self._start_schedule()

    # -- what the trainer asks for ---------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "F": self.F}

    def inference_module(self) -> nn.Module:
        return self.G

    @property
    def needs_idt(self) -> bool:
        return self.nce_idt or self.lambda_identity > 0

    # -- the three pieces of a step ------------------------------------------------------------
    def translate_for_training(self, real_A: Tensor, real_B: Tensor, flip: Optional[bool] = None) -> dict:
        """G on real_A (and real_B when an identity term needs G(real_B)), in one pass.

        The same pass also returns the generator's NCE-layer features of the real images: they
        are PatchNCE's keys, which the official code computes with a second encoder pass (and
        a graph it never uses). Taken from this pass they are the same values, detached. Their
        patch locations are drawn here and only the drawn patches are kept (the full maps of
        the five layers are 57 MB per 256x256 image); the draws come in the same order from
        the same generator as when ``nce_loss`` draws them, so the values are the same. When
        the input was flipped (FastCUT's flip equivariance) the keys must be those of the
        unflipped image, so ``nce_loss`` computes them itself.

        Args:
            flip: force the flip-equivariance draw (None: draw with p = 0.5 when enabled).

        Returns:
            {"fake_B", "idt_B" (or None), "flipped", "keys_A", "keys_B"}; images in [-1, 1],
            fake_B flipped when ``flipped`` (as the official code keeps it); keys as
            (patches per layer, patch ids per layer) from ``self.sampler``, None when not reusable.
        """
        real = torch.cat([real_A, real_B]) if self.needs_idt else real_A
        if flip is None:
            flip = self.flip_equivariance and bool(torch.rand(()) < 0.5)
        if flip:
            real = torch.flip(real, dims=[3])
        n = real_A.shape[0]
        keys_A = keys_B = None
        reuse = self.lambda_NCE > 0 and not flip and hasattr(self.G, "forward_with_features")
        if reuse:
            fake, feats = self.G.forward_with_features(real, self.nce_layers)
            feats = [f.detach() for f in feats]
            keys_A = self.sampler([f[:n] for f in feats])
            keys_B = self.sampler([f[n:] for f in feats]) if self.needs_idt else None
            del feats
        else:
            fake = self.G(real)
        return {"fake_B": fake[:n], "idt_B": fake[n:] if self.needs_idt else None, "flipped": bool(flip),
                "keys_A": keys_A, "keys_B": keys_B}

    def nce_loss(self, source: Tensor, output: Tensor, flipped: bool = False,
                 keys: Optional[tuple[list[Tensor], list[Tensor]]] = None) -> Tensor:
        """PatchNCE between the generator's features of `output` (queries) and of `source` (keys),
        averaged over the NCE layers; `flipped` flips the query features back first; `keys`:
        the source's key patches and their ids (``self.sampler``'s output) when already drawn
        (no gradient flows into them)."""
        feat_q = self.G.forward_features(output, self.nce_layers)
        # The keys are detached inside the loss, so they need no graph.
        if keys is None:
            with torch.no_grad():
                keys = self.sampler(self.G.forward_features(source, self.nce_layers))
        patches_k, ids = [k.detach() for k in keys[0]], keys[1]
        if flipped:  # the query features flipped back, read in place: column x of the flip is W - 1 - x
            ids = [i + (f.shape[3] - 1) - 2 * (i % f.shape[3]) for i, f in zip(ids, feat_q)]
        patches_q, _ = self.sampler(feat_q, ids=ids)
        with torch.no_grad():
            keys = self.F(patches_k)
        queries = self.F(patches_q)
        total = sum(self.nce(q, k) for q, k in zip(queries, keys))
        return total / len(self.nce_layers)

    def discriminator_losses(self, fake_B: Tensor, real_B: Tensor) -> dict[str, Tensor]:
        """D_fake, D_real, (D_R1) and D = 0.5 * (D_fake + D_real) + D_R1."""
        losses = {"D_fake": self.gan(self.D(fake_B.detach()), False)}
        real = real_B.detach().requires_grad_(self.lambda_R1 > 0)
        # R1 differentiates D's gradient: its layers must run plain, not as fused Functions.
        with unfused() if self.lambda_R1 > 0 else nullcontext():
            pred_real = self.D(real)
        losses["D_real"] = self.gan(pred_real, True)
        total = 0.5 * (losses["D_fake"] + losses["D_real"])
        if self.lambda_R1 > 0:
            (grad,) = torch.autograd.grad(pred_real.sum(), real, create_graph=True)
            losses["D_R1"] = grad.pow(2).flatten(1).sum(1).mean() * 0.5
            total = total + self.lambda_R1 * losses["D_R1"]
        losses["D"] = total
        return losses

    def generator_losses(self, real_A: Tensor, real_B: Tensor, passed: dict) -> dict[str, Tensor]:
        """G_GAN, NCE_X, NCE_Y (with nce_idt), idt (with lambda_identity) and the weighted total G."""
        losses: dict[str, Tensor] = {}
        total = real_A.new_zeros(())
        if self.lambda_GAN > 0:
            losses["G_GAN"] = self.gan(self.D(passed["fake_B"]), True, for_discriminator=False)
            total = total + self.lambda_GAN * losses["G_GAN"]
        if self.lambda_NCE > 0:
            losses["NCE_X"] = self.nce_loss(real_A, passed["fake_B"], passed["flipped"], passed.get("keys_A"))
            nce = losses["NCE_X"]
            if self.nce_idt:
                losses["NCE_Y"] = self.nce_loss(real_B, passed["idt_B"], passed["flipped"], passed.get("keys_B"))
                nce = (nce + losses["NCE_Y"]) * 0.5
            total = total + self.lambda_NCE * nce
        if self.lambda_identity > 0:
            idt_B = passed["idt_B"]
            if passed["flipped"]:
                idt_B = torch.flip(idt_B, dims=[3])
            losses["idt"] = F.l1_loss(idt_B, real_B)
            total = total + self.lambda_identity * losses["idt"]
        losses["G"] = total
        return losses

    def discriminator_step(self, fake_B: Tensor, real_B: Tensor) -> dict[str, float]:
        set_requires_grad(self.D, True)
        self.optimizers["D"].zero_grad()
        losses = self._losses(self.discriminator_losses, fake_B, real_B)
        losses["D"].backward()
        self.optimizers["D"].step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def generator_step(self, real_A: Tensor, real_B: Tensor, passed: dict) -> dict[str, float]:
        set_requires_grad(self.D, False)  # G's loss goes through D; D's grads are not wanted
        try:
            self.optimizers["G"].zero_grad()
            self.optimizers["F"].zero_grad()
            losses = self._losses(self.generator_losses, real_A, real_B, passed)
            losses["G"].backward()
            self.optimizers["G"].step()
            self.optimizers["F"].step()
        finally:
            set_requires_grad(self.D, True)
        return {k: float(v.detach()) for k, v in losses.items()}

    def train_step(self, batch: dict) -> dict[str, float]:
        real_A, real_B = self._domains(batch)
        with self._autocast():
            passed = self.translate_for_training(real_A, real_B)
        logged = self.discriminator_step(passed["fake_B"], real_B)
        logged.update(self.generator_step(real_A, real_B, passed))
        self._finish_step()
        return logged

    @torch.no_grad()
    def visuals(self, batch: dict) -> dict[str, Tensor]:
        real_A, real_B = self._domains(batch)
        shown = {"real_A": _to_unit(real_A), "fake_B": _to_unit(self.G(real_A)), "real_B": _to_unit(real_B)}
        if self.needs_idt:
            shown["idt_B"] = _to_unit(self.G(real_B))
        return self._run_visual_hooks(shown)
