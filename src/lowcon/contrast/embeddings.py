"""Embedding networks: where anchors, positives and negatives are compared.

`VGG19Features` is the frozen feature extractor of AECR-Net's contrastive regularization: the
outputs of chosen ReLU layers of torchvision's VGG-19 `features`.
"""
from __future__ import annotations

import os
import urllib.error
import warnings
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowcon.config import first_line

__all__ = ["VGG19Features", "WeightsNotFoundError", "VGG19_LAYER_INDEX", "AECR_LAYERS"]


class WeightsNotFoundError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable."""


def _vgg19_layer_index() -> dict[str, int]:
    # Index of every ReLU in torchvision's vgg19().features, named the usual way (relu3_2, ...).
    blocks = (2, 2, 4, 4, 4)
    names, index = {}, 0
    for block, n_convs in enumerate(blocks, start=1):
        for conv in range(1, n_convs + 1):
            names[f"relu{block}_{conv}"] = index + 1  # conv at `index`, its ReLU right after
            index += 2
        index += 1  # max pool closes the block
    return names


VGG19_LAYER_INDEX = _vgg19_layer_index()
# The five slices of the official CR: features[0:2], [2:7], [7:12], [12:21], [21:30].
AECR_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

WeightsArg = Union[str, os.PathLike]


class VGG19Features(nn.Module):
    """Frozen VGG-19 that returns the feature maps of chosen ReLU layers.

    Args:
        weights: ``"imagenet"`` (torchvision's IMAGENET1K_V1 through the weights API: downloaded
            and cached on a connected machine, read from the torch hub cache offline), a path to
            a state dict in torchvision's key layout (``features.0.weight`` ... or ``0.weight``),
            or ``"random"`` (explicit; results are then not comparable with the paper).
        layers: ReLU layer names (see ``VGG19_LAYER_INDEX``), in increasing depth. Default: the
            five AECR-Net layers relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
        normalize_input: subtract the ImageNet mean and divide by its std first. Off by default,
            as in the official CR, which feeds [0, 1] images straight in.
        checkpoint_slices: the first this many layer-to-layer slices keep only their input when
            the input needs a gradient and recompute the rest in backward (activation
            checkpointing): less memory for the anchor's pass, same values and gradients.

    Shape:
        input (B, 3, H, W) -> list of (B, C_i, H_i, W_i), one per layer.

    Example:
        >>> vgg = VGG19Features(weights="random")  # doctest: +SKIP
        >>> feats = vgg(torch.rand(1, 3, 64, 64))  # doctest: +SKIP

    Reference:
        Wu et al., Contrastive Learning for Compact Single Image Dehazing, CVPR 2021.
    """

    def __init__(
        self,
        weights: WeightsArg = "imagenet",
        layers: Sequence[str] = AECR_LAYERS,
        normalize_input: bool = False,
        checkpoint_slices: int = 0,
    ) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG19_LAYER_INDEX]
        if unknown or not layers:
            raise ValueError(
                f"layers: unknown VGG-19 layer(s) {unknown or list(layers)}; "
                f"valid: {', '.join(VGG19_LAYER_INDEX)}"
            )
        ends = [VGG19_LAYER_INDEX[name] + 1 for name in layers]
        if ends != sorted(set(ends)):
            raise ValueError(f"layers: must be distinct and in increasing depth, got {list(layers)}")
        self.layers = tuple(layers)
        self.normalize_input = normalize_input
        if not isinstance(checkpoint_slices, int) or not 0 <= checkpoint_slices <= len(layers):
            raise ValueError(f"checkpoint_slices: expected an int in [0, {len(layers)}], got {checkpoint_slices!r}")
        self.checkpoint_slices = checkpoint_slices
        features = _build_vgg19_features(weights)
        starts = [0] + ends[:-1]
        # Only the layers up to the deepest requested one are kept: the rest would be wasted work.
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in zip(starts, ends))
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":
        # Frozen feature extractor: stays in eval mode whatever the enclosing model does.
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.iter_features(x))

    def iter_features(self, x: Tensor) -> Iterator[Tensor]:
        """The features of ``forward``, one layer at a time: a caller that is done with a layer
        before asking for the next never holds more than two layers' maps."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if self.normalize_input:
            x = (x - self.mean) / self.std
        recompute = torch.is_grad_enabled() and x.requires_grad
        for i, block in enumerate(self.slices):
            if recompute and i < self.checkpoint_slices:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            yield x


def _build_vgg19_features(weights: WeightsArg) -> nn.Sequential:
    from torchvision.models import VGG19_Weights

    if isinstance(weights, str) and weights == "random":
        warnings.warn(
            "VGG19Features(weights='random'): randomly initialised VGG-19; contrastive "
            "regularization results are not comparable with the paper's ImageNet features.",
            stacklevel=3,
        )
        return _vgg19_features()
    if isinstance(weights, str) and weights == "imagenet":
        state = _imagenet_state_dict(VGG19_Weights.IMAGENET1K_V1)
        features = _vgg19_features()
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
        return features
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights: {str(weights)!r} is not 'imagenet', 'random' or an existing state-dict file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    features = _vgg19_features()
    # Accept both the full-model layout (features.0.weight) and a features-only one (0.weight).
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        features.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: not a VGG-19 state dict in torchvision's layout ({first_line(err)})") from None
    return features


def _vgg19_features() -> nn.Sequential:
    """torchvision's VGG-19 `features` with its own init, without building the 120M-parameter
    classifier that `vgg19()` would also initialise."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=False)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # as torchvision's VGG.__init__
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _imagenet_state_dict(weights_enum) -> dict:
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(weights_enum.url).name
    cached = hub_dir / filename
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsNotFoundError(
            f"VGG-19 ImageNet weights unavailable ({reason}): put {filename} in {hub_dir} "
            f"(torchvision's cache; set TORCH_HOME to move it), or pass weights=PATH to a "
            f"state dict, or weights='random' (not comparable with the paper)"
        ) from None
