"""What a training method is: networks, optimisers, and one `train_step`.

A method writes five things:

1. ``__init__``: build its networks, losses and optimisers (device chosen by the caller).
2. ``train_step(batch) -> dict[str, float]``: one optimisation step, each loss term on its own.
3. ``visuals(batch) -> dict[str, Tensor]``: images in [0, 1] for sample grids.
4. ``checkpoint_modules() -> dict[str, nn.Module]``: what a checkpoint keeps (not frozen
   feature networks such as VGG-19).
5. ``inference_module()``: the network that restores or translates images at test time.

The :class:`lowcon.training.Trainer` runs it; optimisers and schedulers registered in
``self.optimizers`` / ``self.schedulers`` are saved and restored with it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lowcon.config import first_line

__all__ = ["Method"]


class Method(nn.Module):
    name = "method"

    def __init__(self) -> None:
        super().__init__()
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, Any] = {}

    # -- to be written by each method ------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        raise NotImplementedError

    def visuals(self, batch: dict) -> dict[str, Tensor]:
        return {}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def inference_module(self) -> nn.Module:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for module in self.checkpoint_modules().values():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    def log_extras(self) -> dict[str, float]:
        extras = {}
        for name, opt in self.optimizers.items():
            groups = opt.param_groups
            if groups:
                extras[f"lr_{name}"] = groups[0]["lr"]
        return extras

    def state_dict(self, *args, **kwargs) -> dict:  # type: ignore[override]
        return {name: m.state_dict() for name, m in self.checkpoint_modules().items()}

    def load_state_dict(self, state: dict, strict: bool = True):  # type: ignore[override]
        modules = self.checkpoint_modules()
        missing = sorted(set(modules) - set(state))
        if missing:
            raise ValueError(f"checkpoint: no weights for {missing} (has {sorted(state)})")
        for name, module in modules.items():
            try:
                module.load_state_dict(state[name], strict=strict)
            except RuntimeError as err:
                raise ValueError(
                    f"checkpoint: weights of {name!r} do not fit this network ({first_line(err)})") from None
        return None

    def training_state_dict(self) -> dict:
        return {
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
        }

    def load_training_state_dict(self, state: dict) -> None:
        for k, v in state.get("optimizers", {}).items():
            self.optimizers[k].load_state_dict(v)
        for k, v in state.get("schedulers", {}).items():
            self.schedulers[k].load_state_dict(v)
