"""Peak memory of CPU training: where freed activations go.

PyTorch's CPU tensors come from ``malloc``. glibc serves requests below a threshold from its
heap, and that threshold rises on its own (up to 32 MB) each time a large block is freed. A
training step allocates and frees activations of many sizes in a fixed pattern; served from the
heap they leave free holes between live blocks that the next step cannot always reuse, so the
process's resident memory peaks well above the memory that is actually live at any moment (on
the AECR-Net benchmark step with activation checkpointing, 1.48 GB against 1.19 GB live).

:func:`map_large_allocations` fixes the threshold: every block of at least ``threshold_mb`` gets
its own mapping, returned to the system the moment its tensor is freed. The cost is the page
faults of mapping those blocks afresh each time (measured in ``benchmarks/``). glibc only: on
other C libraries the call does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["map_large_allocations", "check_heap_mmap_threshold"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MAX_THRESHOLD_MB = 32  # glibc's HEAP_MAX / DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def check_heap_mmap_threshold(threshold_mb: float) -> None:
    """The config key ``heap_mmap_threshold_mb``: 0 (glibc's default) or a value in (0, 32] MB.

    Raises:
        ValueError: one line naming the key.
    """
    if not 0 <= threshold_mb <= _MAX_THRESHOLD_MB:
        raise ValueError(f"heap_mmap_threshold_mb: expected 0 (off) or a value in (0, {_MAX_THRESHOLD_MB}], "
                         f"got {threshold_mb}")


def map_large_allocations(threshold_mb: float) -> bool:
    """Serve every allocation of at least `threshold_mb` MB from its own mapping (glibc).

    Process-wide, for the rest of the process; the training entry points call it when the
    config asks (``heap_mmap_threshold_mb``). Returns True when glibc accepted the setting,
    False where it does not apply (not Linux/glibc).

    Raises:
        ValueError: threshold outside (0, 32] MB.
    """
    if not 0 < threshold_mb <= _MAX_THRESHOLD_MB:
        raise ValueError(f"heap_mmap_threshold_mb: expected a value in (0, {_MAX_THRESHOLD_MB}], got {threshold_mb}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mb * 2**20)))
