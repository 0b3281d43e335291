"""Data augmentation on (C, H, W) tensors, driven by an explicit `torch.Generator`.

Paired operations take several images and apply the SAME window / flip / rotation to all of them,
so a hazy image and its clear ground truth stay aligned. Every random choice comes from the
generator the caller passes; data sets make one per sample with `sample_generator(seed, epoch,
index)`, so a sample's crop depends only on (seed, epoch, index): the same on every run, with any
number of workers, and after a resume.

Recipes:
    - AECR-Net / FFA-Net training: random crop (240), horizontal flip with p = 0.5, rotation by
      k * 90 degrees counter-clockwise with k uniform in {0, 1, 2, 3} (`augment_pair`).
    - CycleGAN / CUT ``resize_and_crop``: resize to load_size x load_size (bicubic, aspect not
      kept), random crop crop_size, horizontal flip (`unpaired_transform`).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sample_generator",
    "random_crop_params",
    "paired_random_crop",
    "center_crop",
    "random_hflip",
    "random_rot90",
    "augment_pair",
    "resize",
    "round_to_multiple",
    "unpaired_transform",
    "PREPROCESS_MODES",
]

Size = Union[int, Sequence[int]]
PREPROCESS_MODES = ("resize_and_crop", "crop", "none")


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``, e.g. ``(seed, epoch, index)``.

    Uses numpy's SeedSequence to mix the keys, so neighbouring indices get unrelated streams.
    """
    if seed < 0 or any(key < 0 for key in keys):
        raise ValueError(f"seed and keys must be >= 0, got {seed}, {keys}")
    high, low = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(high) << 32 | int(low))
    return generator


def _pair(size: Size, name: str = "size") -> tuple[int, int]:
    if isinstance(size, int):
        height, width = size, size
    else:
        if len(size) != 2:
            raise ValueError(f"{name}: expected an int or (height, width), got {size!r}")
        height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"{name}: expected positive sizes, got {size!r}")
    return height, width


def _same_size(images: Sequence[Tensor]) -> tuple[int, int]:
    if not images:
        raise ValueError("images: expected at least one image")
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images: paired images must have one size, got {sorted(sizes)}")
    height, width = sizes.pop()
    return height, width


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


def random_crop_params(
    height: int, width: int, size: Size, generator: torch.Generator
) -> tuple[int, int]:
    """Top-left corner (top, left) of a uniformly drawn crop window that fits the image."""
    crop_h, crop_w = _pair(size)
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} (HxW) does not fit an image of {height}x{width}")
    return _randint(height - crop_h + 1, generator), _randint(width - crop_w + 1, generator)


def _pad_to(image: Tensor, crop_h: int, crop_w: int, name: str) -> Tensor:
    height, width = image.shape[-2:]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h >= height or pad_w >= width:
        raise ValueError(
            f"{name}: cannot reflect-pad a {height}x{width} image to {crop_h}x{crop_w}: "
            "reflection needs the image to be more than half the crop"
        )
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return F.pad(image[None], padding, mode="reflect")[0]


def paired_random_crop(
    *images: Tensor,
    size: Size,
    generator: torch.Generator,
    pad_if_needed: bool = False,
    name: str = "image",
) -> tuple[Tensor, ...]:
    """Crop the same random window out of every image.

    Args:
        images: tensors of one spatial size.
        size: crop side, or (height, width).
        generator: source of the window position.
        pad_if_needed: reflect-pad an image smaller than the crop (centred) instead of failing.
        name: what to call the image in the error (e.g. its file name).

    Shape:
        each (C, H, W) -> (C, size_h, size_w).

    Example:
        >>> g = sample_generator(0, 0, 7)
        >>> hazy, clear = paired_random_crop(torch.rand(3, 64, 80), torch.rand(3, 64, 80), size=32, generator=g)
    """
    height, width = _same_size(images)
    crop_h, crop_w = _pair(size)
    if crop_h > height or crop_w > width:
        if not pad_if_needed:
            raise ValueError(
                f"{name}: image {width}x{height} (WxH) is smaller than the crop {crop_w}x{crop_h}; "
                "use a smaller crop or pad_if_needed=True"
            )
        images = tuple(_pad_to(image, crop_h, crop_w, name) for image in images)
        height, width = images[0].shape[-2:]
    top, left = random_crop_params(height, width, (crop_h, crop_w), generator)
    return tuple(image[..., top:top + crop_h, left:left + crop_w] for image in images)


def center_crop(
    *images: Tensor, size: Size, pad_if_needed: bool = False, name: str = "image"
) -> tuple[Tensor, ...]:
    """Crop the central window (the extra pixel of an odd margin goes to the bottom/right).

    With ``pad_if_needed``, an image smaller than the crop is first reflect-padded (centred).
    """
    height, width = _same_size(images)
    crop_h, crop_w = _pair(size)
    if crop_h > height or crop_w > width:
        if not pad_if_needed:
            raise ValueError(
                f"{name}: image {width}x{height} (WxH) is smaller than the crop {crop_w}x{crop_h}; "
                "use a smaller crop or pad_if_needed=True"
            )
        images = tuple(_pad_to(image, crop_h, crop_w, name) for image in images)
        height, width = images[0].shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return tuple(image[..., top:top + crop_h, left:left + crop_w] for image in images)


def random_hflip(*images: Tensor, generator: torch.Generator, p: float = 0.5) -> tuple[Tensor, ...]:
    """Mirror all images left-right together, with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    if float(torch.rand((), generator=generator)) < p:
        return tuple(image.flip(-1) for image in images)
    return tuple(images)


def random_rot90(*images: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Rotate all images together by k * 90 degrees counter-clockwise, k uniform in {0, 1, 2, 3}.

    For images that are not square only k in {0, 2} is drawn, so the size is kept.
    """
    height, width = _same_size(images)
    k = _randint(4, generator) if height == width else 2 * _randint(2, generator)
    return tuple(torch.rot90(image, k, dims=(-2, -1)) for image in images)


def augment_pair(
    *images: Tensor, generator: torch.Generator, hflip: bool = True, rot90: bool = True
) -> tuple[Tensor, ...]:
    """AECR-Net / FFA-Net augmentation: flip with p = 0.5, then a random multiple of 90 degrees."""
    if hflip:
        images = random_hflip(*images, generator=generator)
    if rot90:
        images = random_rot90(*images, generator=generator)
    return tuple(images)


def resize(image: Tensor, size: Size, *, mode: str = "bicubic") -> Tensor:
    """Resize (C, H, W) to ``size`` (int = square, or (height, width)), antialiased, clipped to [0, 1].

    Bicubic by default, as CycleGAN/CUT (which resize PIL images; values differ slightly).
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode: expected 'bicubic' or 'bilinear', got {mode!r}")
    height, width = _pair(size)
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image[None], size=(height, width), mode=mode, align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def round_to_multiple(image: Tensor, base: int = 4, *, mode: str = "bicubic") -> Tensor:
    """Resize so both sides are the nearest multiple of ``base`` (CUT's ``__make_power_2``)."""
    height, width = image.shape[-2:]
    new_h = max(base, int(round(height / base)) * base)
    new_w = max(base, int(round(width / base)) * base)
    return resize(image, (new_h, new_w), mode=mode)


def unpaired_transform(
    image: Tensor,
    *,
    generator: torch.Generator,
    load_size: int = 286,
    crop_size: int = 256,
    preprocess: str = "resize_and_crop",
    flip: bool = True,
    name: str = "image",
) -> Tensor:
    """CycleGAN/CUT preprocessing of one image.

    - ``"resize_and_crop"``: resize to load_size x load_size (aspect not kept), random crop
      crop_size, as the official default (286 -> 256).
    - ``"crop"``: random crop crop_size at the original resolution (error if the image is smaller).
    - ``"none"``: the whole image, sides rounded to multiples of 4 as the official code does.
    Then a horizontal flip with p = 0.5 when ``flip``.

    Shape:
        (3, H, W) -> (3, crop_size, crop_size), or (3, ~H, ~W) for ``"none"``.
    """
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess: expected one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    if preprocess == "resize_and_crop":
        if load_size < crop_size:
            raise ValueError(f"load_size ({load_size}) must be >= crop_size ({crop_size})")
        image = resize(image, load_size)
        (image,) = paired_random_crop(image, size=crop_size, generator=generator, name=name)
    elif preprocess == "crop":
        (image,) = paired_random_crop(image, size=crop_size, generator=generator, name=name)
    else:
        image = round_to_multiple(image, 4)
    if flip:
        (image,) = random_hflip(image, generator=generator)
    return image
