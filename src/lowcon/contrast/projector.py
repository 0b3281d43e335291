"""Patch projection head of CUT: one small MLP per encoder layer, then L2 normalisation."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["PatchProjector", "DeferredOptimizer", "l2_normalize"]


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-7) -> Tensor:
    """x / (||x||_2 + eps) along `dim`, as the official CUT `Normalize(2)` computes it.

    The squared norm is clamped at 1e-30 before the square root: the values are unchanged (eps
    dominates there), but a patch whose MLP output is exactly zero (every hidden ReLU off) gets
    a finite gradient instead of the official 0 * inf = NaN that ruins the head for good.
    """
    return x / (x.pow(2).sum(dim, keepdim=True).clamp_min(1e-30).sqrt() + eps)


class PatchProjector(nn.Module):
    """Per-layer MLP Linear(C, dim)-ReLU-Linear(dim, dim) followed by L2 normalisation.

    The input channel count of each layer is often only known once the encoder has run, so the
    MLPs are built from the first input (as in CUT); pass `in_channels` to build them at once.
    Create the head's optimiser with :meth:`make_optimizer`: it is ready before the first pass
    and becomes a real optimiser the moment the MLPs exist, so no special first step is needed.

    Args:
        dim: output (and hidden) width, 256 in CUT.
        in_channels: channel count per layer; ``None`` to build lazily.
        use_mlp: ``False`` keeps the features as they are and only normalises (CUT's
            ``netF=sample`` option).
        init_type, init_gain: the init applied on build (:func:`lowcon.models.init.init_weights`;
            CUT: xavier, gain 0.02), as the official ``define_F`` initialises with ``--init_type``.

    Shape:
        list of (B, P, C_l) -> list of (B, P, dim), unit L2 norm along the last axis.

    Example:
        >>> head = PatchProjector()
        >>> opt = head.make_optimizer(lambda params: torch.optim.Adam(params, lr=2e-4))
        >>> z = head([torch.randn(1, 256, 64)])  # builds the MLP; opt now holds its params

    Reference:
        Park et al., Contrastive Learning for Unpaired Image-to-Image Translation, ECCV 2020.
    """

    def __init__(
        self,
        dim: int = 256,
        in_channels: Optional[Sequence[int]] = None,
        use_mlp: bool = True,
        init_gain: float = 0.02,
        init_type: str = "xavier",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.use_mlp = use_mlp
        self.init_gain = init_gain
        self.init_type = init_type
        self.mlps = nn.ModuleList()
        self._built = not use_mlp
        if in_channels is not None and use_mlp:
            self.build(in_channels)

    @property
    def built(self) -> bool:
        return self._built

    def build(self, in_channels: Sequence[int], device=None, dtype=None) -> None:
        """Create one MLP per layer for the given channel counts (once)."""
        if self._built:
            return
        from lowcon.models.init import init_weights

        for c in in_channels:
            mlp = nn.Sequential(nn.Linear(int(c), self.dim), nn.ReLU(), nn.Linear(self.dim, self.dim))
            self.mlps.append(init_weights(mlp, self.init_type, self.init_gain).to(device=device, dtype=dtype))
        self._built = True

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        for i, f in enumerate(feats):
            if f.dim() != 3:
                raise ValueError(f"feats[{i}]: expected (B, P, C) patch features, got {tuple(f.shape)}")
        if not self._built:
            self.build([f.shape[-1] for f in feats], device=feats[0].device, dtype=feats[0].dtype)
        if self.use_mlp and len(feats) != len(self.mlps):
            raise ValueError(f"feats: expected {len(self.mlps)} layers, got {len(feats)}")
        if not self.use_mlp:
            return [l2_normalize(f) for f in feats]
        return [l2_normalize(mlp(f)) for mlp, f in zip(self.mlps, feats)]

    def make_optimizer(self, factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> "DeferredOptimizer":
        """An optimiser for this head that may be made before the head is built."""
        return DeferredOptimizer(self, factory)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # A lazy head restored from a checkpoint builds itself from the saved weight shapes.
        if not self._built:
            shapes = {}
            for key, value in state_dict.items():
                if key.startswith(prefix + "mlps.") and key.endswith(".0.weight"):
                    shapes[int(key[len(prefix) + 5:].split(".")[0])] = value.shape[1]
            if shapes:
                self.build([shapes[i] for i in sorted(shapes)])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class DeferredOptimizer:
    """Optimiser for a module whose parameters appear on its first forward pass.

    Behaves like the optimiser that `factory` makes; until the module has parameters,
    `zero_grad` and `step` do nothing and a loaded state is kept until it can be applied.
    """

    def __init__(self, module: nn.Module, factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        self.module = module
        self.factory = factory
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._pending_state: Optional[dict] = None

    def _ensure(self) -> Optional[torch.optim.Optimizer]:
        if self.optimizer is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            if params:
                self.optimizer = self.factory(params)
                if self._pending_state is not None:
                    self.optimizer.load_state_dict(self._pending_state)
                    self._pending_state = None
        return self.optimizer

    @property
    def param_groups(self) -> list:
        opt = self._ensure()
        return opt.param_groups if opt is not None else []

    def zero_grad(self, set_to_none: bool = True) -> None:
        opt = self._ensure()
        if opt is not None:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        opt = self._ensure()
        if opt is not None:
            opt.step()

    def state_dict(self) -> dict:
        opt = self._ensure()
        if opt is not None:
            return opt.state_dict()
        return self._pending_state or {}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        opt = self._ensure()
        if opt is None:
            self._pending_state = state
        else:
            opt.load_state_dict(state)
