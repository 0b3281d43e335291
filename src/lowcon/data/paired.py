"""Paired dehazing data: hazy images with their clear ground truth, and hazy-only folders.

Two folder layouts are understood:

- ``"reside"``: RESIDE names. A hazy image ``ID_...`` (``0001_0.8_0.2.jpg`` in OTS/SOTS-outdoor,
  ``1400_3.png`` in SOTS-indoor, ``1400_3_0.8.png`` in ITS) pairs with the clear image whose ID,
  the part of its stem before the first ``_``, is the same (``0001.png``; ``01_GT.png`` also works,
  which covers the original Dense-Haze/NH-HAZE names ``01_hazy.png`` / ``01_GT.png``). Several
  hazy images may share one clear image.
- ``"same-name"``: ``hazy/51.png`` pairs with ``clear/51.png``; the extensions may differ.

``"auto"`` takes ``"same-name"`` when every hazy stem is also a clear stem, else ``"reside"`` when
at least one hazy ID has a clear image, else ``"same-name"`` (which then reports the missing
pairs).

Files are checked when the data set is built, from their headers only (cheap for thousands of
files): unreadable files, hazy images without a clear image and ground truth of the wrong size are
reported in one line naming the file(s) and left out (``on_error="skip"``, a `BadImageWarning`)
or raised (``on_error="raise"``). A file that only fails when decoded (a truncated image) is
reported when it is first read; under ``"skip"`` the data set then returns the next good sample
instead, so a training run goes on.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
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
    Size,
    augment_pair,
    center_crop,
    paired_random_crop,
    sample_generator,
)

__all__ = [
    "LAYOUTS",
    "PairedDehazeDataset",
    "HazyFolder",
    "scene_id",
    "scene_ids",
    "split_ids",
    "resolve_layout",
]

PathLike = Union[str, os.PathLike]
LAYOUTS = ("auto", "reside", "same-name")


def scene_id(stem: str, layout: str) -> str:
    """The scene ID of a file stem: the part before the first ``_`` for ``"reside"``, else the stem."""
    if layout not in ("reside", "same-name"):
        raise ValueError(f"layout: expected 'reside' or 'same-name', got {layout!r}")
    return stem.split("_", 1)[0] if layout == "reside" else stem


def resolve_layout(hazy_stems: Sequence[str], clear_stems: Sequence[str], layout: str = "auto") -> str:
    """Turn ``"auto"`` into ``"reside"`` or ``"same-name"`` (rule in the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    clear = set(clear_stems)
    if all(stem in clear for stem in hazy_stems):
        return "same-name"
    clear_ids = {scene_id(stem, "reside") for stem in clear_stems}
    if any(scene_id(stem, "reside") in clear_ids for stem in hazy_stems):
        return "reside"
    return "same-name"


def scene_ids(hazy_dir: PathLike, layout: str = "auto", *, clear_dir: Optional[PathLike] = None) -> list[str]:
    """Sorted unique scene IDs of the hazy images in a folder.

    With ``layout="auto"`` and ``clear_dir`` given, the layout is resolved as the data set does;
    without ``clear_dir``, ``"auto"`` means ``"reside"`` when every hazy stem contains ``_``.
    """
    stems = [path.stem for path in list_images(hazy_dir)]
    if layout == "auto":
        if clear_dir is not None:
            layout = resolve_layout(stems, [path.stem for path in list_images(clear_dir)])
        else:
            layout = "reside" if all("_" in stem for stem in stems) else "same-name"
    return sorted({scene_id(stem, layout) for stem in stems})


def split_ids(ids: Iterable[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split scene IDs into (train_ids, val_ids), deterministically.

    Rule: take the unique IDs in sorted order, permute them with
    ``numpy.random.default_rng(seed).permutation``, and put the first ``ceil(n * val_fraction)``
    in validation, but never all of them while val_fraction < 1 (at least one ID is left for
    training).
    Both lists are returned sorted. Splitting by scene ID, not by file, keeps every hazy version
    of a scene on one side: no leakage of a validation scene into training.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1], got {val_fraction}")
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")
    unique = sorted(set(ids))
    n = len(unique)
    n_val = math.ceil(n * val_fraction)
    if val_fraction < 1.0:
        n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return train, val


@dataclass(frozen=True)
class _Pair:
    hazy: Path
    clear: Path
    scene: str


def _check_gt_size(
    hazy: Path, hazy_size: tuple[int, int], clear: Path, clear_size: tuple[int, int], max_border: float
) -> None:
    """Raise unless the ground truth equals the hazy size or is a little larger (a border)."""
    (hazy_w, hazy_h), (clear_w, clear_h) = hazy_size, clear_size
    if (hazy_w, hazy_h) == (clear_w, clear_h):
        return
    fits = clear_w >= hazy_w and clear_h >= hazy_h
    if fits and clear_w - hazy_w <= max_border * hazy_w and clear_h - hazy_h <= max_border * hazy_h:
        return
    raise ImageReadError(
        hazy,
        f"is {hazy_w}x{hazy_h} but its ground truth {clear} is {clear_w}x{clear_h}; the ground "
        f"truth must be the same size or larger by at most {max_border:.0%} per side (centre-cropped)",
    )


class _SkippingDataset(Dataset):
    """Shared: per-sample generator, epoch, and replacement of samples that fail to decode."""

    seed: int
    on_error: str
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random crops (call before each epoch; with persistent workers the
        workers keep the epoch they were started with)."""
        if epoch < 0:
            raise ValueError(f"epoch: expected >= 0, got {epoch}")
        self.epoch = epoch

    def _load(self, index: int, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        generator = sample_generator(self.seed, self.epoch, index)
        for attempt in range(n):
            current = (index + attempt) % n
            if current in self._bad:
                continue
            try:
                return self._load(current, generator)
            except ImageReadError as err:
                self._bad.add(current)
                report_bad_image(err, self.on_error)
        raise RuntimeError(f"{type(self).__name__}: every sample failed to load")


class PairedDehazeDataset(_SkippingDataset):
    """Hazy / clear image pairs from two folders.

    Args:
        hazy_dir: folder of hazy images.
        clear_dir: folder of clear (ground-truth) images.
        layout: ``"auto"``, ``"reside"`` or ``"same-name"`` (module docstring).
        crop: crop side or (height, width); None keeps the whole image.
        augment: with ``crop``, a random crop, horizontal flip (p = 0.5) and rotation by
            k * 90 degrees (k uniform in 0..3; 0 or 2 for non-square crops), the same for hazy
            and clear, as AECR-Net/FFA-Net training. Without ``augment``, a centre crop. With
            ``crop=None``, ``augment`` flips/rotates the whole image.
        on_error: ``"skip"`` (report one line and leave the pair out) or ``"raise"``.
        ids: keep only these scene IDs (see `scene_ids`, `split_ids`).
        seed: seed of the random crops; a sample's crop depends on (seed, epoch, index) only.
        pad_if_needed: reflect-pad images smaller than ``crop`` instead of reporting them.
        min_size: smallest accepted image side in pixels.
        max_gt_border: a ground truth larger than its hazy image by at most this fraction per side
            is centre-cropped to the hazy size (SOTS-indoor: 640x480 clear, 620x460 hazy);
            anything else is an error naming both files and sizes.

    Shape:
        item["hazy"], item["clear"]: (3, H, W) float32 in [0, 1]; also "name" (hazy stem),
        "id" (scene ID) and "path" (hazy file).

    Example:
        >>> data = PairedDehazeDataset("sots/hazy", "sots/clear", crop=240, augment=True)  # doctest: +SKIP
        >>> item = data[0]; item["hazy"].shape  # doctest: +SKIP
        torch.Size([3, 240, 240])
    """

    def __init__(
        self,
        hazy_dir: PathLike,
        clear_dir: PathLike,
        layout: str = "auto",
        crop: Optional[Size] = None,
        augment: bool = False,
        on_error: str = "skip",
        ids: Optional[Iterable[str]] = None,
        seed: int = 0,
        *,
        pad_if_needed: bool = False,
        min_size: int = 1,
        max_gt_border: float = 0.1,
    ) -> None:
        self.on_error = check_on_error(on_error)
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        if seed < 0:
            raise ValueError(f"seed: expected >= 0, got {seed}")
        if max_gt_border < 0:
            raise ValueError(f"max_gt_border: expected >= 0, got {max_gt_border}")
        self.hazy_dir, self.clear_dir = Path(hazy_dir), Path(clear_dir)
        self.crop, self.augment, self.seed = crop, augment, seed
        self.pad_if_needed, self.min_size, self.max_gt_border = pad_if_needed, min_size, max_gt_border
        self.epoch, self._bad = 0, set()

        hazy_paths = list_images(self.hazy_dir)
        clear_paths = list_images(self.clear_dir)
        self.layout = resolve_layout([p.stem for p in hazy_paths], [p.stem for p in clear_paths], layout)
        clear_by_id = self._index_clear(clear_paths)
        wanted = self._check_ids(ids, hazy_paths)
        self.pairs = self._pair(hazy_paths, clear_by_id, wanted)
        if not self.pairs:
            raise ValueError(f"{self.hazy_dir}: no usable hazy/clear pairs (clear folder {self.clear_dir})")

    def _index_clear(self, clear_paths: list[Path]) -> dict[str, Path]:
        by_id: dict[str, Path] = {}
        for path in clear_paths:
            key = scene_id(path.stem, self.layout)
            if key in by_id:
                raise ValueError(
                    f"{self.clear_dir}: two clear images for ID {key!r}: {by_id[key].name} and {path.name}"
                )
            by_id[key] = path
        return by_id

    def _check_ids(self, ids: Optional[Iterable[str]], hazy_paths: list[Path]) -> Optional[set[str]]:
        if ids is None:
            return None
        wanted = {str(i) for i in ids}
        present = {scene_id(p.stem, self.layout) for p in hazy_paths}
        unknown = sorted(wanted - present)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(f"ids: {len(unknown)} ID(s) not in {self.hazy_dir}: {shown}")
        return wanted

    def _pair(self, hazy_paths: list[Path], clear_by_id: dict[str, Path], wanted: Optional[set[str]]) -> list[_Pair]:
        clear_sizes: dict[Path, Optional[tuple[int, int]]] = {}
        pairs = []
        for hazy in hazy_paths:
            key = scene_id(hazy.stem, self.layout)
            if wanted is not None and key not in wanted:
                continue
            clear = clear_by_id.get(key)
            try:
                if clear is None:
                    raise ImageReadError(hazy, f"no clear image for ID {key!r} in {self.clear_dir}")
                if clear not in clear_sizes:
                    clear_sizes[clear] = None  # a broken clear image is reported once
                    clear_sizes[clear] = probe_image(clear, min_size=self.min_size)
                elif clear_sizes[clear] is None:
                    continue
                hazy_size = probe_image(hazy, min_size=self.min_size)
                _check_gt_size(hazy, hazy_size, clear, clear_sizes[clear], self.max_gt_border)
            except ImageReadError as err:
                report_bad_image(err, self.on_error)
                continue
            pairs.append(_Pair(hazy, clear, key))
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def scene_ids(self) -> list[str]:
        """Sorted unique scene IDs of the pairs kept."""
        return sorted({pair.scene for pair in self.pairs})

    def _load(self, index: int, generator: torch.Generator) -> dict:
        pair = self.pairs[index]
        hazy = read_image(pair.hazy, min_size=self.min_size)
        clear = read_image(pair.clear, min_size=self.min_size)
        hazy_h, hazy_w = hazy.shape[-2:]
        clear_h, clear_w = clear.shape[-2:]
        _check_gt_size(pair.hazy, (hazy_w, hazy_h), pair.clear, (clear_w, clear_h), self.max_gt_border)
        if (clear_h, clear_w) != (hazy_h, hazy_w):
            (clear,) = center_crop(clear, size=(hazy_h, hazy_w))
        if self.crop is not None:
            if self.augment:
                hazy, clear = paired_random_crop(
                    hazy, clear, size=self.crop, generator=generator,
                    pad_if_needed=self.pad_if_needed, name=str(pair.hazy),
                )
            else:
                hazy, clear = center_crop(
                    hazy, clear, size=self.crop, pad_if_needed=self.pad_if_needed, name=str(pair.hazy)
                )
        if self.augment:
            hazy, clear = augment_pair(hazy, clear, generator=generator)
        return {
            "hazy": hazy.contiguous(),
            "clear": clear.contiguous(),
            "name": pair.hazy.stem,
            "id": pair.scene,
            "path": str(pair.hazy),
        }


class HazyFolder(_SkippingDataset):
    """Hazy images with no ground truth, for inference: every image in a folder, by content.

    Args:
        folder: folder of images (any format Pillow reads; suffixes may lie).
        on_error: ``"skip"`` or ``"raise"``. Unreadable headers are left out when the data set is
            built; a file that only fails when decoded is replaced by the next good image (whose
            own item carries its own name and path, so outputs are never misnamed).
        min_size: smallest accepted image side in pixels.
        recursive: also look in subfolders.

    Shape:
        item["hazy"]: (3, H, W) float32 in [0, 1]; item["name"]: file stem; item["path"]: str.
    """

    def __init__(
        self, folder: PathLike, on_error: str = "skip", *, min_size: int = 1, recursive: bool = False
    ) -> None:
        self.on_error = check_on_error(on_error)
        self.folder, self.min_size = Path(folder), min_size
        self.seed, self.epoch, self._bad = 0, 0, set()
        self.paths = []
        for path in list_images(self.folder, recursive=recursive):
            try:
                probe_image(path, min_size=min_size)
            except ImageReadError as err:
                report_bad_image(err, self.on_error)
                continue
            self.paths.append(path)
        if not self.paths:
            raise ValueError(f"{self.folder}: no readable images")

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int, generator: torch.Generator) -> dict:
        path = self.paths[index]
        return {"hazy": read_image(path, min_size=self.min_size), "name": path.stem, "path": str(path)}
