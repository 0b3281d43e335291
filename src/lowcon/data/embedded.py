"""Default data for demos and smoke tests, offline: the colour photos inside scikit-image's wheel.

Only files that ship in the installed ``skimage/data`` folder are used, read straight from that
folder (no ``skimage.data`` fetcher, so nothing is ever downloaded): astronaut, chelsea, coffee,
rocket and motorcycle_left, the last with its stereo disparity map (``motorcycle_disp.npz``), which
gives it a real depth for haze synthesis. These are a handful of images: enough to show that a
pipeline runs and learns something, never a benchmark.

- `write_embedded_dehaze_set`: clear photos plus hazy versions made with `lowcon.data.haze`, as a
  RESIDE-style paired set split by scene into train and val.
- `write_embedded_translation_set`: an unpaired set whose target domain is the source under a
  KNOWN colour transform, so a translation model can be scored against ground truth on testA.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from lowcon.data.haze import (
    HAZE_SETTINGS,
    depth_from_disparity,
    depth_prior,
    load_depth_map,
    normalize_depth,
    write_hazy_pair,
)
from lowcon.data.io import read_image, write_image
from lowcon.data.transforms import center_crop, resize, sample_generator

__all__ = [
    "EMBEDDED_PHOTOS",
    "KNOWN_TRANSFORMS",
    "skimage_data_dir",
    "embedded_clear_images",
    "apply_known_transform",
    "write_embedded_dehaze_set",
    "write_embedded_translation_set",
]

PathLike = Union[str, os.PathLike]

# name -> file inside skimage/data (all ship in the wheel; checked by the tests).
EMBEDDED_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
_DISPARITY = {"motorcycle": "motorcycle_disp.npz"}

# name -> (3x3 colour matrix applied to RGB, gamma): out = clip(M @ rgb, 0, 1) ** gamma.
KNOWN_TRANSFORMS: dict[str, tuple[tuple[tuple[float, float, float], ...], float]] = {
    "sepia": (((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)), 1.0),
    "warm": (((1.10, 0.05, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.80)), 0.9),
    "cool": (((0.85, 0.0, 0.0), (0.0, 0.95, 0.05), (0.0, 0.05, 1.10)), 1.1),
    # the channels rotated (out R, G, B = in G, B, R): a strong change that is one-to-one on colours,
    # where sepia maps every hue of a brightness to one tint
    "gbr": (((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)), 1.0),
}


def skimage_data_dir() -> Path:
    """The ``data`` folder inside the installed scikit-image package."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def _photo_path(name: str) -> Path:
    if name not in EMBEDDED_PHOTOS:
        raise ValueError(f"name: unknown embedded photo {name!r}; valid: {', '.join(EMBEDDED_PHOTOS)}")
    path = skimage_data_dir() / EMBEDDED_PHOTOS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this scikit-image installation")
    return path


def _square(image: Tensor, size: Optional[int], mode: str = "bicubic") -> Tensor:
    # Centre square crop, then resize: demos want one size for every image.
    if size is None:
        return image
    side = min(image.shape[-2:])
    (image,) = center_crop(image, size=side)
    return resize(image, size, mode=mode)


def _embedded(name: str, size: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """(clear image, [0, 1] depth or None) of one embedded photo, at ``size``."""
    image = read_image(_photo_path(name))
    depth = None
    if name in _DISPARITY:
        raw = load_depth_map(skimage_data_dir() / _DISPARITY[name])
        depth = normalize_depth(depth_from_disparity(raw))[None]
        depth = _square(depth, size, mode="bilinear")
    return _square(image, size), depth


def embedded_clear_images(size: Optional[int] = None) -> list[tuple[str, Tensor]]:
    """The embedded colour photos as (name, image) pairs, in a fixed order.

    Args:
        size: None keeps each photo's own size; an int centre-crops each photo to a square and
            resizes it to size x size.

    Shape:
        each image (3, H, W) float32 in [0, 1].
    """
    if size is not None and size < 8:
        raise ValueError(f"size: expected None or >= 8, got {size}")
    return [(name, _embedded(name, size)[0]) for name in EMBEDDED_PHOTOS]


def apply_known_transform(name: str, image: Tensor) -> Tensor:
    """Apply a fixed colour transform: out = clip(M @ rgb, 0, 1) ** gamma (see KNOWN_TRANSFORMS).

    Shape:
        (3, H, W) or (B, 3, H, W) -> same.
    """
    if name not in KNOWN_TRANSFORMS:
        raise ValueError(f"name: unknown transform {name!r}; valid: {', '.join(KNOWN_TRANSFORMS)}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image: expected shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    matrix, gamma = KNOWN_TRANSFORMS[name]
    matrix = torch.tensor(matrix, dtype=image.dtype, device=image.device)
    mixed = torch.einsum("ij,...jhw->...ihw", matrix, image).clamp(0.0, 1.0)
    return mixed if gamma == 1.0 else mixed.pow(gamma)


def write_embedded_dehaze_set(
    out_dir: PathLike,
    *,
    size: Optional[int] = 128,
    per_image: int = 4,
    setting: str = "ots",
    val_names: Sequence[str] = ("chelsea",),
    seed: int = 0,
) -> dict[str, Path]:
    """Write a paired dehazing set from the embedded photos.

    Layout: ``out/train/{hazy,clear}`` and ``out/val/{hazy,clear}``, RESIDE names
    (``astronaut.png``, ``astronaut_0.87_0.12.png``); load each split with
    ``PairedDehazeDataset(split/hazy, split/clear, layout="reside")``. The photos in
    ``val_names`` go to val (whole scenes, so no leakage), the rest to train. Depth: the stereo
    disparity for the motorcycle, `depth_prior` ("mixed") for the others. Deterministic in seed.

    Returns:
        {"train": out/train, "val": out/val}.
    """
    unknown = [name for name in val_names if name not in EMBEDDED_PHOTOS]
    if unknown:
        raise ValueError(f"val_names: unknown photo(s) {unknown}; valid: {', '.join(EMBEDDED_PHOTOS)}")
    if setting not in HAZE_SETTINGS:
        raise ValueError(f"setting: expected one of {', '.join(HAZE_SETTINGS)}, got {setting!r}")
    out_dir = Path(out_dir)
    splits = {"train": out_dir / "train", "val": out_dir / "val"}
    for index, name in enumerate(EMBEDDED_PHOTOS):
        clear, depth = _embedded(name, size)
        if depth is None:
            depth = depth_prior(clear, "mixed")
        rng = np.random.default_rng([seed, index])
        split = "val" if name in val_names else "train"
        write_hazy_pair(splits[split], name, clear, depth, setting, rng, per_image)
    return splits


def _random_crops(image: Tensor, count: int, size: int, generator: torch.Generator) -> list[Tensor]:
    # Square windows of a random side (half to all of the short side) at random places.
    height, width = image.shape[-2:]
    short = min(height, width)
    crops = []
    for _ in range(count):
        side = int(torch.randint(short // 2, short + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        crops.append(resize(image[:, top:top + side, left:left + side], size))
    return crops


def write_embedded_translation_set(
    out_dir: PathLike,
    transform: str = "sepia",
    *,
    size: int = 128,
    crops_per_image: int = 8,
    test_names: Sequence[str] = ("coffee",),
    seed: int = 0,
) -> dict[str, Path]:
    """Write an unpaired translation set whose domain B is domain A under a known colour transform.

    Domain A: random square crops of the embedded photos. Domain B: OTHER random crops (drawn
    independently) of the same photos, passed through ``apply_known_transform(transform, .)``:
    never the same crops, so the set is unpaired. The photos in ``test_names`` are held out:
    ``testA`` holds their crops, ``testA_transformed`` the same crops transformed (same file
    names: the ground truth for scoring a translation of testA), ``testB`` other transformed crops.

    Returns:
        {"trainA", "trainB", "testA", "testB", "testA_transformed"} -> folders.
    """
    if transform not in KNOWN_TRANSFORMS:
        raise ValueError(f"transform: unknown {transform!r}; valid: {', '.join(KNOWN_TRANSFORMS)}")
    unknown = [name for name in test_names if name not in EMBEDDED_PHOTOS]
    if unknown or len(test_names) in (0, len(EMBEDDED_PHOTOS)):
        raise ValueError(
            f"test_names: expected some but not all of {', '.join(EMBEDDED_PHOTOS)}, got {list(test_names)}"
        )
    if size < 8 or crops_per_image < 1 or seed < 0:
        raise ValueError(f"size >= 8, crops_per_image >= 1 and seed >= 0 expected, got {size}, {crops_per_image}, {seed}")
    out_dir = Path(out_dir)
    folders = {key: out_dir / key for key in ("trainA", "trainB", "testA", "testB", "testA_transformed")}
    for index, name in enumerate(EMBEDDED_PHOTOS):
        image = read_image(_photo_path(name))
        phase = "test" if name in test_names else "train"
        crops_a = _random_crops(image, crops_per_image, size, sample_generator(seed, index, 0))
        crops_b = _random_crops(image, crops_per_image, size, sample_generator(seed, index, 1))
        for k, (crop_a, crop_b) in enumerate(zip(crops_a, crops_b)):
            name_a, name_b = f"{name}_a{k:03d}.png", f"{name}_b{k:03d}.png"
            write_image(folders[f"{phase}A"] / name_a, crop_a)
            write_image(folders[f"{phase}B"] / name_b, apply_known_transform(transform, crop_b))
            if phase == "test":
                write_image(folders["testA_transformed"] / name_a, apply_known_transform(transform, crop_a))
    return folders
