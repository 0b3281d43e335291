"""Results as pictures and tables: comparison grids, loss curves, Markdown reports."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["save_grid", "plot_curves", "markdown_table", "write_text_atomic"]


def _to_uint8(img: Tensor) -> np.ndarray:
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, *img.shape[1:])
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_grid(
    columns: Mapping[str, Tensor], path: str | os.PathLike, max_rows: int = 4, max_side: int = 256
) -> Path:
    """One row per image of the batch, one labelled column per entry of `columns`.

    Args:
        columns: name -> (B, 3, H, W) images in [0, 1] (sizes may differ between columns).
        path: the PNG to write (atomically).
    """
    names = list(columns)
    rows = min(max_rows, min(int(columns[n].shape[0]) for n in names))
    tiles = [[_to_uint8(columns[n][r]) for n in names] for r in range(rows)]
    scale = min(1.0, max_side / max(max(t.shape[:2]) for row in tiles for t in row))
    cell_h = max(int(t.shape[0] * scale) for row in tiles for t in row)
    cell_w = max(int(t.shape[1] * scale) for row in tiles for t in row)
    label_h, pad = 14, 2
    canvas = Image.new("RGB", (len(names) * (cell_w + pad) + pad, label_h + rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((pad + c * (cell_w + pad) + 2, 1), name[: max(4, cell_w // 6)], fill="black")
        for r in range(rows):
            tile = Image.fromarray(tiles[r][c])
            if scale < 1.0:
                tile = tile.resize((max(1, int(tile.width * scale)), max(1, int(tile.height * scale))), Image.BICUBIC)
            canvas.paste(tile, (pad + c * (cell_w + pad), label_h + pad + r * (cell_h + pad)))
    return _save_image_atomic(canvas, path)


def _save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def plot_curves(
    rows: Sequence[Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike, title: str = "",
    columns: int = 0,
) -> Path:
    """Loss curves (one panel per key, against `step`) from logged rows, as a PNG: one row of
    panels, or rows of `columns` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    across = max(1, min(columns, len(keys)) if columns else len(keys))
    down = max(1, -(-len(keys) // across))
    fig, axes = plt.subplots(down, across, figsize=(3.2 * across, 2.8 * down), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        pts = [(float(r["step"]), float(r[key])) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], floatfmt: str = ".2f") -> str:
    def cell(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    from .config import atomic_write_text

    atomic_write_text(path, text)
    return Path(path)
