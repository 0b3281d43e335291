"""Unpaired data for translation (CUT, FastCUT, SinCUT): images of domain A and domain B.

`UnpairedDataset` follows CycleGAN/CUT's unaligned data set: the A image walks the folder in
order, the B image is drawn at random (or walks in order with ``serial_batches``), both get the
same kind of preprocessing but independent random crops/flips. `SingleImagePairDataset` is the
single-image (SinCUT) variant: random patches of one A image and one B image at random zooms.
Grey and RGBA files become 3-channel RGB (alpha dropped); data are in [0, 1] (the models map
them to [-1, 1]).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lowcon.data.io import (
    ImageReadError,
    check_on_error,
    list_images,
    probe_image,
    read_image,
    report_bad_image,
)
from lowcon.data.transforms import (
    PREPROCESS_MODES,
    random_hflip,
    resize,
    sample_generator,
    unpaired_transform,
)

__all__ = ["resolve_unpaired_root", "UnpairedDataset", "SingleImagePairDataset"]

PathLike = Union[str, os.PathLike]


def resolve_unpaired_root(root: PathLike, phase: str = "train") -> tuple[Path, Path]:
    """The two domain folders of a CycleGAN/CUT data root: ``(root/<phase>A, root/<phase>B)``.

    As the official code, ``phase="test"`` falls back to ``valA``/``valB`` when ``testA`` is
    missing and ``valA`` exists.

    Raises:
        FileNotFoundError: one line naming the missing folder.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: data root is a file, not a folder (with trainA/ and trainB/)")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist")
    dir_a, dir_b = root / f"{phase}A", root / f"{phase}B"
    if phase == "test" and not dir_a.is_dir() and (root / "valA").is_dir():
        dir_a, dir_b = root / "valA", root / "valB"
    for folder in (dir_a, dir_b):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: domain folder does not exist")
    return dir_a, dir_b


def _usable_images(folder: Path, on_error: str, min_size: int) -> list[Path]:
    paths = []
    for path in list_images(folder):
        try:
            probe_image(path, min_size=min_size)
        except ImageReadError as err:
            report_bad_image(err, on_error)
            continue
        paths.append(path)
    if not paths:
        raise ValueError(f"{folder}: no readable images")
    return paths


class UnpairedDataset(Dataset):
    """Images of two domains, never paired (CycleGAN/CUT ``unaligned`` data set).

    Args:
        dir_a: folder of domain A (source) images.
        dir_b: folder of domain B (target) images. `resolve_unpaired_root` gives both from a
            ``trainA``/``trainB`` root.
        load_size: side of the square resize before cropping (``"resize_and_crop"``).
        crop_size: side of the random crop.
        flip: random horizontal flip (p = 0.5), drawn separately for A and B.
        preprocess: ``"resize_and_crop"`` (official default), ``"crop"`` or ``"none"`` (whole
            image, sides rounded to multiples of 4); see `unpaired_transform`.
        serial_batches: B index = index mod len(B) instead of a random B.
        seed: seed of all random choices; item ``index`` of epoch ``e`` depends on (seed, e,
            index) only, so the data are the same after a resume.
        on_error: ``"skip"`` (report and leave out) or ``"raise"`` for unreadable files.
        min_size: smallest accepted image side (default 5, as ``lowcon translate``: the generator
            needs 5 px per side).
        no_resize_after_epoch: when set and the epoch (see `set_epoch`) is larger, load_size is
            taken equal to crop_size, as the official code does in the learning-rate decay phase
            (``epoch > n_epochs``). None (default) keeps load_size throughout.

    Shape:
        item["A"], item["B"]: (3, crop_size, crop_size) float32 in [0, 1]; item["path_A"],
        item["path_B"]: str. ``len`` is max(len(A), len(B)), as the official code.

    Example:
        >>> data = UnpairedDataset(*resolve_unpaired_root("horse2zebra"))  # doctest: +SKIP
    """

    def __init__(
        self,
        dir_a: PathLike,
        dir_b: PathLike,
        load_size: int = 286,
        crop_size: int = 256,
        flip: bool = True,
        preprocess: str = "resize_and_crop",
        serial_batches: bool = False,
        seed: int = 0,
        on_error: str = "skip",
        *,
        min_size: int = 5,
        no_resize_after_epoch: Optional[int] = None,
    ) -> None:
        self.on_error = check_on_error(on_error)
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess: expected one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
        if crop_size < 1 or load_size < 1:
            raise ValueError(f"load_size and crop_size must be >= 1, got {load_size}, {crop_size}")
        if preprocess == "resize_and_crop" and load_size < crop_size:
            raise ValueError(f"load_size ({load_size}) must be >= crop_size ({crop_size})")
        if seed < 0:
            raise ValueError(f"seed: expected >= 0, got {seed}")
        self.load_size, self.crop_size, self.flip = load_size, crop_size, flip
        self.preprocess, self.serial_batches, self.seed = preprocess, serial_batches, seed
        self.min_size, self.no_resize_after_epoch = min_size, no_resize_after_epoch
        self.epoch = 0
        self.paths_a = _usable_images(Path(dir_a), self.on_error, min_size)
        self.paths_b = _usable_images(Path(dir_b), self.on_error, min_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random B images and crops."""
        if epoch < 0:
            raise ValueError(f"epoch: expected >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.paths_a), len(self.paths_b))

    def _transform(self, path: Path, generator: torch.Generator) -> Tensor:
        load_size = self.load_size
        if self.no_resize_after_epoch is not None and self.epoch > self.no_resize_after_epoch:
            load_size = self.crop_size
        image = read_image(path, min_size=self.min_size)
        return unpaired_transform(
            image, generator=generator, load_size=load_size, crop_size=self.crop_size,
            preprocess=self.preprocess, flip=self.flip, name=str(path),
        )

    def _read(self, paths: list[Path], start: int, generator: torch.Generator) -> tuple[Path, Tensor]:
        # A file that fails only when decoded is reported and replaced by the next one.
        for attempt in range(len(paths)):
            path = paths[(start + attempt) % len(paths)]
            try:
                return path, self._transform(path, generator)
            except ImageReadError as err:
                report_bad_image(err, self.on_error)
        raise ValueError(f"{paths[0].parent}: no readable images (every one failed to load)")

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        generator = sample_generator(self.seed, self.epoch, index)
        if self.serial_batches:
            index_b = index % len(self.paths_b)
        else:
            index_b = int(torch.randint(0, len(self.paths_b), (1,), generator=generator))
        path_a, image_a = self._read(self.paths_a, index % len(self.paths_a), generator)
        path_b, image_b = self._read(self.paths_b, index_b, generator)
        return {"A": image_a, "B": image_b, "path_A": str(path_a), "path_B": str(path_b)}


class SingleImagePairDataset(Dataset):
    """Random patches of one A image and one B image at random zooms (SinCUT training data).

    Each item zooms the A image by independent factors for width and height, uniform in
    ``zoom_range`` (never below ``crop_size``), cuts the zoomed image into a grid of
    ``crop_size`` cells with a random offset, takes one cell and flips it with p = 0.5; the same
    for B with its own draws. One zoom and one grid offset are shared by each block of
    ``batch_size`` consecutive indices, and the cells within a block are distinct (a random
    permutation). The trainer reads the indices shuffled, as the official loader does, so a
    batch mixes the zooms and places of several blocks, as the official batches do.

    Official facts (``singleimage_dataset.py``, ``sincut_model.py``, ``base_dataset.py``):
    ``preprocess="zoom_and_patch"``, crop 64, batch 16, zoom per axis uniform in
    [1 / random_scale_max, 1] with random_scale_max = 3, bilinear resize, a fixed length of
    100,000. The official code also draws the zooms per block of batch_size indices. What
    differs here: it assigns cells from one shuffled list over all indices and draws a new grid
    offset per patch; it rounds sides to multiples of 4 (a no-op for crop 64); its data are in
    [-1, 1]. Here every draw comes from (seed, epoch, block or index), and data are in [0, 1].

    Args:
        path_a: the source image.
        path_b: the target-style image.
        crop_size: patch side.
        zoom_range: (min, max) zoom factor per axis.
        flip: random horizontal flip per patch.
        length: items per epoch.
        batch_size: size of the blocks that share a zoom.
        seed: seed of all random choices.

    Shape:
        item["A"], item["B"]: (3, crop_size, crop_size); item["path_A"], item["path_B"]: str.
    """

    def __init__(
        self,
        path_a: PathLike,
        path_b: PathLike,
        crop_size: int = 64,
        zoom_range: tuple[float, float] = (1.0 / 3.0, 1.0),
        flip: bool = True,
        length: int = 100_000,
        seed: int = 0,
        *,
        batch_size: int = 16,
    ) -> None:
        low, high = zoom_range
        if not 0.0 < low <= high:
            raise ValueError(f"zoom_range: expected 0 < min <= max, got {zoom_range}")
        if crop_size < 1 or length < 1 or batch_size < 1 or seed < 0:
            raise ValueError(
                f"crop_size, length and batch_size must be >= 1 and seed >= 0, got "
                f"{crop_size}, {length}, {batch_size}, {seed}"
            )
        self.path_a, self.path_b = Path(path_a), Path(path_b)
        self.image_a = read_image(self.path_a)
        self.image_b = read_image(self.path_b)
        self.crop_size, self.zoom_range, self.flip = crop_size, (float(low), float(high)), flip
        self.length, self.seed, self.batch_size, self.epoch = length, seed, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch: expected >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _patch(self, image: Tensor, domain: int, index: int) -> Tensor:
        block, slot = divmod(index, self.batch_size)
        block_generator = sample_generator(self.seed, self.epoch, domain, block)
        low, high = self.zoom_range
        zoom_w, zoom_h = (low + (high - low) * torch.rand(2, generator=block_generator)).tolist()
        height, width = image.shape[-2:]
        new_w = max(self.crop_size, int(round(width * zoom_w)))
        new_h = max(self.crop_size, int(round(height * zoom_h)))
        zoomed = resize(image, (new_h, new_w), mode="bilinear")
        cells_x, cells_y = new_w // self.crop_size, new_h // self.crop_size
        offset_x = int(torch.randint(0, new_w - cells_x * self.crop_size + 1, (1,), generator=block_generator))
        offset_y = int(torch.randint(0, new_h - cells_y * self.crop_size + 1, (1,), generator=block_generator))
        cells = torch.randperm(cells_x * cells_y, generator=block_generator)
        cell = int(cells[slot % len(cells)])
        left = offset_x + (cell % cells_x) * self.crop_size
        top = offset_y + (cell // cells_x) * self.crop_size
        patch = zoomed[:, top:top + self.crop_size, left:left + self.crop_size]
        if self.flip:
            (patch,) = random_hflip(patch, generator=sample_generator(self.seed, self.epoch, domain, block, slot + 1))
        return patch.contiguous()

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        return {
            "A": self._patch(self.image_a, 0, index),
            "B": self._patch(self.image_b, 1, index),
            "path_A": str(self.path_a),
            "path_B": str(self.path_b),
        }
