"""Synthetic haze with the atmospheric scattering model, as RESIDE made its training sets.

    I = J * t + A * (1 - t),    t = exp(-beta * d)

J: clear image, A: atmospheric light (global, scalar or per channel), beta: scattering
coefficient, d: scene depth. RESIDE OTS drew A in 0.8..1.0 and beta in 0.04..0.2 with depth
estimated from each photo; ITS used A in about 0.7..1.0 and beta in about 0.6..1.8 with NYU depth.

Depth units. The betas only make sense with depth in the right units. Here every depth map (from a
file, from disparity, or the `depth_prior`) is first normalised to [0, 1] per image, then mapped
linearly onto the setting's ``depth_range``, chosen so that the transmission t stays in about
[0.1, 0.95] over the setting's beta range:

- ``"ots"``: depth in [1, 12] (metre-like, outdoor): beta 0.04 gives t in [0.62, 0.96], beta 0.2
  gives t in [0.09, 0.82];
- ``"its"``: depth in [0.1, 1.3]: beta 0.6 gives t in [0.46, 0.94], beta 1.8 gives t in [0.10, 0.84].

`depth_prior` is a PRIOR, not a measured depth: farther towards the top of the picture, and
farther where the image is bright and unsaturated (sky, haze-like regions). It makes plausible
haze for demos and smoke tests; a benchmark needs real depth.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lowcon.data.io import (
    ImageReadError,
    check_on_error,
    list_images,
    read_image,
    report_bad_image,
    write_image,
)

__all__ = [
    "HAZE_SETTINGS",
    "transmission",
    "add_haze",
    "depth_from_disparity",
    "depth_prior",
    "normalize_depth",
    "scale_depth",
    "load_depth_map",
    "draw_haze_params",
    "hazy_name",
    "synthesize_haze_folder",
    "write_hazy_pair",
]

PathLike = Union[str, os.PathLike]
Number = Union[float, Sequence[float], Tensor]

HAZE_SETTINGS: dict[str, dict[str, tuple[float, float]]] = {
    "ots": {"A": (0.8, 1.0), "beta": (0.04, 0.2), "depth_range": (1.0, 12.0)},
    "its": {"A": (0.7, 1.0), "beta": (0.6, 1.8), "depth_range": (0.1, 1.3)},
}
DEPTH_PRIORS = ("vertical", "luminance", "mixed")


def _as_tensor(value: Number, like: Tensor, name: str) -> Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if tensor.dim() == 0:
        return tensor
    if tensor.dim() == 1:  # one value per channel, or per batch item for beta
        return tensor
    raise ValueError(f"{name}: expected a scalar or a 1-D sequence, got shape {tuple(tensor.shape)}")


def transmission(depth: Tensor, beta: Union[float, Tensor]) -> Tensor:
    """t = exp(-beta * depth); ``beta`` scalar, or (B,) for a (B, 1, H, W) depth."""
    beta = _as_tensor(beta, depth, "beta")
    if beta.dim() == 1:
        if depth.dim() != 4 or beta.shape[0] != depth.shape[0]:
            raise ValueError(f"beta: a per-image beta of shape {tuple(beta.shape)} needs a (B, 1, H, W) depth")
        beta = beta.view(-1, 1, 1, 1)
    return torch.exp(-beta * depth)


def add_haze(clear: Tensor, depth: Tensor, A: Number, beta: Union[float, Tensor]) -> Tensor:
    """Hazy image by the atmospheric scattering model I = J * t + A * (1 - t), t = exp(-beta * d).

    Args:
        clear: haze-free image J in [0, 1].
        depth: scene depth d, in the units beta expects (see the module docstring).
        A: atmospheric light: a scalar, or 3 values (one per channel).
        beta: scattering coefficient: a scalar, or (B,) for a batch.

    Shape:
        clear (3, H, W) with depth (H, W) or (1, H, W); or clear (B, 3, H, W) with depth
        (B, 1, H, W). Output: the shape of clear.

    Example:
        >>> hazy = add_haze(torch.rand(3, 8, 8), torch.ones(8, 8), A=0.9, beta=0.5)

    Reference:
        Narasimhan & Nayar, Vision and the atmosphere, IJCV 2002; Li et al., RESIDE, TIP 2019.
    """
    if clear.dim() not in (3, 4) or clear.shape[-3] != 3:
        raise ValueError(f"clear: expected shape (3, H, W) or (B, 3, H, W), got {tuple(clear.shape)}")
    if depth.dim() == 2:
        depth = depth[None]
    if depth.shape[-2:] != clear.shape[-2:] or depth.shape[-3] != 1 or depth.dim() != clear.dim():
        raise ValueError(
            f"depth: expected (H, W), (1, H, W) or (B, 1, H, W) matching clear {tuple(clear.shape)}, "
            f"got {tuple(depth.shape)}"
        )
    depth = depth.to(clear.dtype)
    t = transmission(depth, beta)
    light = _as_tensor(A, clear, "A")
    if light.dim() == 1:
        if light.shape[0] != 3:
            raise ValueError(f"A: expected a scalar or 3 values, got {light.shape[0]}")
        light = light.view(3, 1, 1)
    return clear * t + light * (1.0 - t)


def depth_from_disparity(disparity: Tensor, eps: float = 1e-6) -> Tensor:
    """Relative depth 1 / disparity (depth = focal * baseline / disparity, up to that scale).

    Disparities that are not finite or not above ``eps`` (unknown or occluded pixels in stereo
    data, e.g. inf in Middlebury maps) take the depth of the nearest valid pixel.

    Shape:
        (H, W) or (1, H, W) -> same.
    """
    if eps <= 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    array = disparity.detach().to("cpu", torch.float64).numpy()
    valid = np.isfinite(array) & (array > eps)
    if not valid.any():
        raise ValueError("disparity: no finite value above eps")
    depth = np.zeros_like(array)
    depth[valid] = 1.0 / array[valid]
    if not valid.all():
        from scipy.ndimage import distance_transform_edt

        nearest = distance_transform_edt(~valid, return_distances=False, return_indices=True)
        depth = depth[tuple(nearest)]
    return torch.from_numpy(depth).to(disparity.dtype if disparity.is_floating_point() else torch.float32)


def normalize_depth(depth: Tensor) -> Tensor:
    """Min-max normalise a depth map to [0, 1] (a constant map becomes all zeros)."""
    low, high = depth.min(), depth.max()
    if not torch.isfinite(low) or not torch.isfinite(high):
        raise ValueError("depth: holds NaN or inf values")
    if high - low <= 0:
        return torch.zeros_like(depth)
    return (depth - low) / (high - low)


def scale_depth(depth01: Tensor, depth_range: tuple[float, float]) -> Tensor:
    """Map a [0, 1] depth linearly onto ``depth_range`` (near, far)."""
    near, far = depth_range
    if not 0 <= near <= far:
        raise ValueError(f"depth_range: expected 0 <= near <= far, got {depth_range}")
    return near + (far - near) * depth01


def _box_blur(image: Tensor, radius: int) -> Tensor:
    kernel = 2 * radius + 1
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, kernel, stride=1)[0]


def depth_prior(clear: Tensor, kind: str = "mixed") -> Tensor:
    """A plain depth PRIOR for an image with no depth map; in [0, 1], 1 = far.

    - ``"vertical"``: 1 at the top row, 0 at the bottom row (ground near, sky far);
    - ``"luminance"``: bright and unsaturated pixels are far (sky, distant haze-coloured
      surfaces): value = smoothed (luminance * (1 - saturation)), box blur of radius ~H/16;
    - ``"mixed"``: the mean of the two, renormalised.
    Not a real depth; see the module docstring.

    Shape:
        (3, H, W) -> (1, H, W).
    """
    if kind not in DEPTH_PRIORS:
        raise ValueError(f"kind: expected one of {', '.join(DEPTH_PRIORS)}, got {kind!r}")
    if clear.dim() != 3 or clear.shape[0] != 3:
        raise ValueError(f"clear: expected shape (3, H, W), got {tuple(clear.shape)}")
    height, width = clear.shape[-2:]
    rows = torch.linspace(1.0, 0.0, height, dtype=clear.dtype) if height > 1 else torch.ones(1, dtype=clear.dtype)
    vertical = rows.view(1, height, 1).expand(1, height, width)
    if kind == "vertical":
        return vertical.clone()
    luminance = (0.299 * clear[0] + 0.587 * clear[1] + 0.114 * clear[2])[None]
    high, low = clear.max(0, keepdim=True).values, clear.min(0, keepdim=True).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-8), torch.zeros_like(high))
    cue = _box_blur(luminance * (1.0 - saturation), max(1, min(height, width) // 16))
    cue = normalize_depth(cue)
    if kind == "luminance":
        return cue
    return normalize_depth(0.5 * vertical + 0.5 * cue)


def load_depth_map(path: PathLike) -> Tensor:
    """A depth or disparity map from ``.npy`` (any numeric array), ``.npz`` (first array) or an
    image (16-bit PNG read as raw integers, 8-bit as 0..255); returns the raw values, (H, W)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path)
        elif path.suffix.lower() == ".npz":
            with np.load(path) as archive:
                array = archive[archive.files[0]]
        else:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image)
    except Exception as err:  # noqa: BLE001 - numpy and Pillow fail in many ways
        raise ImageReadError(path, f"cannot read depth map ({type(err).__name__}: {err})") from None
    array = np.squeeze(np.asarray(array, dtype=np.float64))
    if array.ndim == 3:  # an RGB-saved map: take the first channel
        array = array[..., 0]
    if array.ndim != 2:
        raise ImageReadError(path, f"depth map must be 2-D, got shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


def draw_haze_params(
    setting: str, rng: np.random.Generator
) -> tuple[float, float]:
    """Draw (A, beta) uniformly in the setting's ranges, rounded to 0.01 as RESIDE names show them."""
    if setting not in HAZE_SETTINGS:
        raise ValueError(f"setting: expected one of {', '.join(HAZE_SETTINGS)}, got {setting!r}")
    params = HAZE_SETTINGS[setting]
    light = round(float(rng.uniform(*params["A"])), 2)
    beta = round(float(rng.uniform(*params["beta"])), 2)
    return light, max(beta, 0.01)


def hazy_name(scene: str, light: float, beta: float, suffix: str = ".png") -> str:
    """RESIDE-OTS-style file name ``ID_A_BETA.png``, e.g. ``0001_0.8_0.16.png``."""
    return f"{scene}_{light:g}_{beta:g}{suffix}"


def _sanitize_id(stem: str) -> str:
    # The pairing rule reads the ID up to the first "_", so an ID must not contain one.
    return stem.replace("_", "-")


def _find_map(folder: Path, stem: str) -> Optional[Path]:
    matches = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix.lower() in (".npy", ".npz", ".png", ".tif", ".tiff"))
    return matches[0] if matches else None


def write_hazy_pair(
    out_dir: PathLike,
    scene: str,
    clear: Tensor,
    depth01: Tensor,
    setting: str,
    rng: np.random.Generator,
    per_image: int = 1,
) -> list[Path]:
    """Write ``out/clear/<scene>.png`` and ``per_image`` hazy versions ``out/hazy/<scene>_A_BETA.png``.

    ``depth01`` is a [0, 1] depth (1 = far), mapped onto the setting's depth range. Two draws
    that would give the same file name are redrawn.
    """
    out_dir = Path(out_dir)
    depth = scale_depth(depth01, HAZE_SETTINGS[setting]["depth_range"])
    written = [write_image(out_dir / "clear" / f"{scene}.png", clear)]
    names: set[str] = set()
    for _ in range(per_image):
        for _attempt in range(100):
            light, beta = draw_haze_params(setting, rng)
            name = hazy_name(scene, light, beta)
            if name not in names:
                break
        names.add(name)
        written.append(write_image(out_dir / "hazy" / name, add_haze(clear, depth, light, beta)))
    return written


def synthesize_haze_folder(
    clear_dir: PathLike,
    out_dir: PathLike,
    setting: str = "ots",
    per_image: int = 1,
    depth_dir: Optional[PathLike] = None,
    disparity_dir: Optional[PathLike] = None,
    seed: int = 0,
    on_error: str = "skip",
    *,
    prior: str = "mixed",
) -> list[Path]:
    """Make a RESIDE-style paired set from clear images.

    Writes ``out_dir/clear/ID.png`` (the clear image as PNG) and ``per_image`` hazy versions
    ``out_dir/hazy/ID_A_BETA.png`` per clear image; the result loads with
    ``PairedDehazeDataset(out/hazy, out/clear, layout="reside")``. ID = the clear stem with ``_``
    replaced by ``-``. A and beta are drawn uniformly in the setting's ranges (rounded to 0.01,
    the values written in the name are the values used). Depth: ``depth_dir/ID.(npy|npz|png|tif)``
    when given, else ``1 / disparity`` from ``disparity_dir``, else `depth_prior` (``prior``);
    normalised to [0, 1] and mapped onto the setting's depth range (module docstring).
    Deterministic: each image's draws depend only on (seed, its stem), not on the other files.

    Args:
        on_error: ``"skip"`` (report one line, leave the image out) or ``"raise"`` for unreadable
            images and missing or mis-sized depth maps.

    Returns:
        the written paths (for each image: its clear file, then its hazy files).
    """
    check_on_error(on_error)
    if setting not in HAZE_SETTINGS:
        raise ValueError(f"setting: expected one of {', '.join(HAZE_SETTINGS)}, got {setting!r}")
    if per_image < 1:
        raise ValueError(f"per_image: expected >= 1, got {per_image}")
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")
    if depth_dir is not None and disparity_dir is not None:
        raise ValueError("depth_dir and disparity_dir: give at most one")
    written: list[Path] = []
    for path in list_images(clear_dir):
        rng = np.random.default_rng([seed, zlib.crc32(path.stem.encode("utf-8"))])
        try:
            clear = read_image(path)
            depth01 = _depth_for(path, clear, depth_dir, disparity_dir, prior)
        except ImageReadError as err:
            report_bad_image(err, on_error)
            continue
        written += write_hazy_pair(out_dir, _sanitize_id(path.stem), clear, depth01, setting, rng, per_image)
    return written


def _depth_for(
    path: Path, clear: Tensor, depth_dir: Optional[PathLike], disparity_dir: Optional[PathLike], prior: str
) -> Tensor:
    folder = depth_dir if depth_dir is not None else disparity_dir
    if folder is None:
        return depth_prior(clear, prior)
    found = _find_map(Path(folder), path.stem)
    if found is None:
        raise ImageReadError(path, f"no {'depth' if depth_dir is not None else 'disparity'} map for it in {folder}")
    raw = load_depth_map(found)
    if tuple(raw.shape) != tuple(clear.shape[-2:]):
        raise ImageReadError(
            found, f"map is {raw.shape[1]}x{raw.shape[0]} but {path.name} is {clear.shape[2]}x{clear.shape[1]}"
        )
    depth = raw if depth_dir is not None else depth_from_disparity(raw)
    if not torch.isfinite(depth).all():
        raise ImageReadError(found, "depth map holds NaN or inf values")
    return normalize_depth(depth)[None]
