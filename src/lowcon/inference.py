"""Running an image-to-image network on images of any size: pad, tile, crop back."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pad_to_multiple", "run_padded", "run_tiled", "auto_device", "cpu_flags", "cpu_has_native_bf16"]


def auto_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when present, else the CPU; any other name is passed to torch. A name torch
    does not know, or a CUDA device this machine does not have, is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); None where unknown. Without
    it, bf16 autocast on the CPU is emulated and slower than float32."""
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad H and W at the bottom/right up to a multiple; returns the padded image and (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # Reflection needs the pad to be smaller than the side; replicate covers tiny images.
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


@torch.no_grad()
def run_padded(net: nn.Module, x: Tensor, multiple: int = 1) -> Tensor:
    """net(x) for any H, W: padded to `multiple`, output cropped back to the input size."""
    padded, (h, w) = pad_to_multiple(x, max(1, multiple))
    return net(padded)[..., :h, :w]


@torch.no_grad()
def run_tiled(net: nn.Module, x: Tensor, tile: int = 512, overlap: int = 32, multiple: int = 1) -> Tensor:
    """net(x) over overlapping tiles blended with a linear ramp, for images that do not fit at once.

    Args:
        tile: tile side in pixels (rounded up to `multiple`).
        overlap: pixels shared by neighbouring tiles; their outputs are cross-faded there.
    """
    if tile <= 2 * overlap:
        raise ValueError(f"tile: {tile} must exceed twice the overlap ({overlap})")
    b, _, h, w = x.shape
    if h <= tile and w <= tile:
        return run_padded(net, x, multiple)
    stride = tile - overlap
    ys = list(range(0, max(1, h - overlap), stride))
    xs = list(range(0, max(1, w - overlap), stride))
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            y0c, x0c = max(0, y1 - tile), max(0, x1 - tile)  # last tiles flush with the border
            piece = run_padded(net, x[..., y0c:y1, x0c:x1], multiple)
            ramp = _ramp(y1 - y0c, x1 - x0c, overlap, piece.device, piece.dtype, y0c > 0, y1 < h, x0c > 0, x1 < w)
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], h, w)
                weight = piece.new_zeros(1, 1, h, w)
            out[..., y0c:y1, x0c:x1] += piece * ramp
            weight[..., y0c:y1, x0c:x1] += ramp
    return out / weight


def _ramp(th: int, tw: int, overlap: int, device, dtype, top: bool, bottom: bool, left: bool, right: bool) -> Tensor:
    def axis(n: int, lo: bool, hi: bool) -> Tensor:
        r = torch.ones(n, device=device, dtype=dtype)
        k = min(overlap, n // 2)
        if k:
            # The outer quarter of the overlap sees the tile's artificial border: (almost) no
            # weight there, then a linear cross-fade into the neighbouring tile.
            margin = k // 4
            edge = torch.cat([
                torch.full((margin,), 1e-6, device=device, dtype=dtype),
                torch.linspace(1.0 / (k - margin + 1), (k - margin) / (k - margin + 1), k - margin, device=device, dtype=dtype),
            ])
            if lo:
                r[:k] = edge
            if hi:
                r[n - k:] = edge.flip(0)
        return r

    return (axis(th, top, bottom)[:, None] * axis(tw, left, right)[None, :])[None, None]
