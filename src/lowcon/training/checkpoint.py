"""Checkpoints written atomically: a crash mid-write never replaces a good file with a broken one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lowcon.config import first_line, publish

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another method, preset or version."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"lowcon_checkpoint": FORMAT_VERSION, **state}, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, method: str | None = None, map_location="cpu") -> dict[str, Any]:
    """Load a lowcon checkpoint (a run folder stands for its ``last.pt``); with `method`, check it
    was written by that method."""
    path = Path(path)
    if path.is_dir():
        if not (path / "last.pt").is_file():
            raise CheckpointError(f"{path}: a folder without last.pt; give a checkpoint file")
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint, damaged or not written by torch.save "
                              f"(torch: {first_line(err).split('. ')[0].rstrip('.')})") from None
    if not isinstance(state, dict) or "lowcon_checkpoint" not in state:
        raise CheckpointError(f"{path}: not a lowcon checkpoint")
    if state["lowcon_checkpoint"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer lowcon (format {state['lowcon_checkpoint']}, this one reads {FORMAT_VERSION})"
        )
    if method is not None and state.get("method") != method:
        raise CheckpointError(f"{path}: a checkpoint of method {state.get('method')!r}, not {method!r}")
    return state
