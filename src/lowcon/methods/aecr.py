"""AECR-Net training: L1 to the clear image plus beta times contrastive regularization."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..contrast import ContrastiveRegularization, CRSampler
from ..inference import run_padded
from .base import Method

__all__ = ["AECRTraining", "cosine_schedule"]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * 0.5 * (1 + cos(pi * step / total)): the released cosine decay to 0 over all steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


class AECRTraining(Method):
    """Trains a dehazing network with L1(out, clear) + beta * CR(out; clear+, hazy-).

    Args:
        net: the dehazing network (e.g. :class:`lowcon.AECRNet`), on the caller's device.
        cr: a :class:`lowcon.ContrastiveRegularization`, or ``None`` / ``beta=0`` for L1 only.
        sampler: builds positives and negatives from (hazy, clear): the 1:1, 1:r, r:1, r:r rows.
        beta: weight of CR (0.1 in the paper).
        lr, betas: Adam settings (1e-4, (0.9, 0.999) as released).
        total_steps: length of the cosine schedule.
        channels_last, autocast_dtype: speed settings (``torch.bfloat16`` autocast on CPUs
            and GPUs that have it).
    """

    name = "aecrnet"

    def __init__(
        self,
        net: nn.Module,
        cr: Optional[ContrastiveRegularization] = None,
        sampler: Optional[CRSampler] = None,
        beta: float = 0.1,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        total_steps: int = 500_000,
        channels_last: bool = False,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.cr = cr if beta > 0 else None
        self.sampler = sampler or CRSampler()
        self.beta = beta
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
            if self.cr is not None:
                self.cr.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=tuple(betas))
        self.optimizers["net"] = opt
        self.schedulers["net"] = cosine_schedule(opt, total_steps)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def inference_module(self) -> nn.Module:
        return self.net

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def losses(self, hazy: Tensor, clear: Tensor) -> dict[str, Tensor]:
        """Every loss term of one batch, with gradient (used by `train_step` and tests)."""
        device_type = hazy.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            out = self.net(hazy)
            terms = {"l1": F.l1_loss(out.float(), clear)}
            if self.cr is not None:
                positives, negatives = self.sampler(hazy, clear)
                terms["cr"] = self.cr(out, positive=positives, negative=negatives)
        terms = {k: v.float() for k, v in terms.items()}
        terms["total"] = terms["l1"] + (self.beta * terms["cr"] if "cr" in terms else 0.0)
        return terms

    def train_step(self, batch: dict) -> dict[str, float]:
        self.net.train()
        hazy, clear = self._prepare(batch["hazy"]), self._prepare(batch["clear"])
        terms = self.losses(hazy, clear)
        opt = self.optimizers["net"]
        opt.zero_grad(set_to_none=True)
        # data-parallel processes step together or not at all (their gradients are averaged)
        if distributed.in_every_process(bool(torch.isfinite(terms["total"]))):
            terms["total"].backward()
            opt.step()
            self.schedulers["net"].step()
        out = {k: v.item() for k, v in terms.items()}
        if "cr" in out:
            out["beta_cr"] = self.beta * out["cr"]  # the term as it enters the total (issue #37)
        return out

    @torch.no_grad()
    def visuals(self, batch: dict) -> dict[str, Tensor]:
        was_training = self.net.training
        self.net.eval()
        hazy = self._prepare(batch["hazy"][:4])
        # Sample images are whole validation images, of any size: padded to the network's multiple.
        out = run_padded(self.net, hazy, getattr(self.net, "size_multiple", 1)).float().clamp(0, 1)
        self.net.train(was_training)
        return {"hazy": hazy.cpu(), "dehazed": out.cpu(), "clear": batch["clear"][:4]}
