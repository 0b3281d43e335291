"""What a PatchNCE generator offers, written once: translation of any size and the features of
chosen layers, from one pass.

:class:`FeatureGenerator` gives ``forward``, ``forward_features``, ``forward_with_features`` and
``feature_channels`` over one indexed list of layers (``_feature_layers``). A subclass says which
list that is, how a pass through its first layers runs (``_run``), what follows them
(``_finish``), the multiple its input is padded to and which inputs it accepts.
:class:`lowcon.models.resnet_generator.ResnetGenerator` and
:class:`lowcon.models.stylegan2.StyleGAN2Generator` are the two.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureGenerator"]


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


class FeatureGenerator(nn.Module):
    """Base of the generators PatchNCE reads features from (see the module docstring).

    Subclasses set ``in_channels`` and ``nce_layers`` (through ``_check_layers``) and define
    ``_feature_layers``, ``_run``, ``_size_multiple`` and ``_check_input``; ``_finish`` is the
    identity unless layers follow the indexed ones.
    """

    in_channels: int
    nce_layers: tuple[int, ...]
    _layer_noun = "indices"  # in the error for bad layer indices

    # -- what a subclass defines ------------------------------------------------------------
    def _feature_layers(self) -> Sequence[nn.Module]:
        """The layers that ``layers`` indices refer to, in order."""
        raise NotImplementedError

    def _run(self, x: Tensor, layers: tuple[int, ...], last: int) -> tuple[Tensor, list[Tensor]]:
        """Run the indexed layers 0..last on the padded `x`; return the last output and the
        outputs of `layers`, in their order."""
        raise NotImplementedError

    def _finish(self, x: Tensor) -> Tensor:
        """What follows the indexed layers (nothing by default)."""
        return x

    def _size_multiple(self) -> int:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    # -- written once ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Translate ``x``; the output has the input's height and width."""
        self._check_input(x)
        height, width = x.shape[-2:]
        y, _ = self._run(self._pad(x), (), last=len(self._feature_layers()) - 1)
        return self._finish(y)[..., :height, :width]

    def forward_features(self, x: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
        """Outputs of the indexed layer ``k`` for each ``k`` in ``layers`` (default ``self.nce_layers``).

        Runs the network only up to the deepest requested layer. The input is padded as in
        ``forward`` and the features are those of the padded image (not cropped), so images of
        one size always give features of one size and locations match between a source and its
        translation.
        """
        self._check_input(x)
        layers = self._resolve_layers(layers)
        _, features = self._run(self._pad(x), layers, last=max(layers))
        return features

    def forward_with_features(self, x: Tensor, layers: Sequence[int] | None = None
                              ) -> tuple[Tensor, list[Tensor]]:
        """``(forward(x), forward_features(x, layers))`` from a single pass."""
        self._check_input(x)
        layers = self._resolve_layers(layers)
        height, width = x.shape[-2:]
        y, features = self._run(self._pad(x), layers, last=len(self._feature_layers()) - 1)
        return self._finish(y)[..., :height, :width], features

    def feature_channels(self, layers: Sequence[int] | None = None) -> list[int]:
        """Channels of the features ``forward_features`` returns, known without a forward pass
        (so a projection head can be built eagerly)."""
        layers = self._resolve_layers(layers)
        channels, after = self.in_channels, []
        for layer in self._feature_layers():
            channels = getattr(layer, "out_channels", channels)  # layers without it keep the width
            after.append(channels)
        return [after[k] for k in layers]

    def _pad(self, x: Tensor) -> Tensor:
        return _pad_to_multiple(x, self._size_multiple())

    def _resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        return self.nce_layers if layers is None else self._check_layers(layers)

    def _check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(layers)
        n = len(self._feature_layers())
        if not layers or not all(isinstance(k, int) and 0 <= k < n for k in layers):
            raise ValueError(f"layers must be a non-empty list of {self._layer_noun} in [0, {n - 1}], got {layers}")
        return layers
