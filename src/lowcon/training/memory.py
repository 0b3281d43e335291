"""Peak memory and page faults of CPU training: where freed activations go.

PyTorch's CPU tensors come from ``malloc``. glibc serves requests below a threshold from its
heap, and that threshold rises on its own (up to 32 MB) each time a large block is freed. A
training step allocates and frees activations of many sizes in a fixed pattern; served from the
heap they leave free holes between live blocks that the next step cannot always reuse, so the
process's resident memory peaks well above the memory that is actually live at any moment (on
the AECR-Net benchmark step with activation checkpointing, 1.48 GB against 1.19 GB live).

:func:`map_large_allocations` fixes the threshold: every block of at least ``threshold_mb`` gets
its own mapping, returned to the system the moment its tensor is freed. The cost is the page
faults of mapping those blocks afresh each time (measured in ``benchmarks/``).

:func:`retain_freed_memory` does the opposite, for speed: glibc by default gives memory back to
the system (blocks above the threshold are unmapped when freed, and the top of the heap is
trimmed), and the next step faults every page of it in again, zero-filled by the kernel. A CUT
step at 256x256 took about a million such faults, 2-3 s of CPU time. Kept in the process, the
memory is reused with no fault; the peak is the same high-water mark the next step would reach
anyway. The process keeps it until it exits.

:func:`restart_with_process_settings` is for the holes themselves. glibc keeps up to seven
freed small blocks of each size per thread in a cache (tcache) instead of merging them with
their free neighbours. The small blocks of a step's bookkeeping (tensor headers, autograd nodes)
are carved out of the holes between freed activations, and while they sit in that cache the holes
cannot merge, so a later large tensor goes to the top of the heap. With the cache off a FastCUT
step's peak fell from 2.33 to 2.16 GB (retained memory, 256x256), at the same speed. glibc reads
that setting only when a process starts, so ``lowcon train`` starts itself again with it (the
config key ``malloc_tcache: false``, the default of both training configs).

glibc only: on other C libraries these calls do nothing and say so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence

__all__ = ["map_large_allocations", "retain_freed_memory", "configure_allocator", "check_heap_mmap_threshold",
           "check_allocator_settings", "malloc_tcache_disabled", "restart_with_process_settings"]

TCACHE_OFF = "glibc.malloc.tcache_count=0"
# What the restart sets GOMP_SPINCOUNT to (OpenMP's default is 300000 spins).
OPENMP_SPINCOUNT = 20_000
# Set in the restarted process: never restart twice, even if glibc ignored the tunable.
_RESTARTED = "LOWCON_RESTARTED"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_MAX_THRESHOLD_MB = 32  # glibc's HEAP_MAX / DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def check_heap_mmap_threshold(threshold_mb: float) -> None:
    """The config key ``heap_mmap_threshold_mb``: 0 (glibc's default) or a value in (0, 32] MB.

    Raises:
        ValueError: one line naming the key.
    """
    if not 0 <= threshold_mb <= _MAX_THRESHOLD_MB:
        raise ValueError(f"heap_mmap_threshold_mb: expected 0 (off) or a value in (0, {_MAX_THRESHOLD_MB}], "
                         f"got {threshold_mb}")


def check_allocator_settings(heap_mmap_threshold_mb: float, retain_freed_memory: bool) -> None:
    """The two allocator keys of a training config: each valid, and not both on (they pull
    opposite ways: one hands large blocks back at once, the other never does).

    Raises:
        ValueError: one line naming the key(s).
    """
    check_heap_mmap_threshold(heap_mmap_threshold_mb)
    if heap_mmap_threshold_mb and retain_freed_memory:
        raise ValueError("heap_mmap_threshold_mb, retain_freed_memory: opposite allocator settings; set "
                         "retain_freed_memory: false to map large tensors")


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def retain_freed_memory() -> bool:
    """Keep freed memory in the process instead of giving it back to the system (glibc).

    Every block comes from the heap (no per-allocation mappings) and the heap is never trimmed,
    so freed activations are reused by the next step without page faults. Process-wide, for the
    rest of the process; the training entry points call it when the config asks
    (``retain_freed_memory``, on by default for translation). Returns True when glibc accepted
    it, False where it does not apply (not Linux/glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def release_free_memory() -> bool:
    """Give the free pages of the heap back to the system now (glibc's ``malloc_trim``), also
    those between blocks in use. With :func:`retain_freed_memory` the heap is never trimmed by
    itself, so a pass that frees a map of gigabytes and then makes other large ones would hold
    both in its resident memory; the banded translation calls this between its stages. Returns
    True when glibc gave memory back, False otherwise (nothing to give, or not glibc)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


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
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mb * 2**20)))


def configure_allocator(heap_mmap_threshold_mb: float, retain: bool) -> None:
    """Apply a training config's two allocator keys (``heap_mmap_threshold_mb``,
    ``retain_freed_memory``), as the training entry points and the benchmarks do."""
    check_allocator_settings(heap_mmap_threshold_mb, retain)
    if heap_mmap_threshold_mb:
        map_large_allocations(heap_mmap_threshold_mb)
    if retain:
        retain_freed_memory()


def malloc_tcache_disabled() -> bool:
    """Whether this process started with glibc's per-thread cache of freed blocks off."""
    return TCACHE_OFF in os.environ.get("GLIBC_TUNABLES", "").split(":")


# Blocked across a restart and taken by the new process when it is ready (release_held_signals).
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def restart_with_process_settings(command: Sequence[str], *, malloc_tcache: bool = False,
                                  brief_openmp_spin: bool = False) -> None:
    """Replace this process (``os.execve``: same PID, same open files) by `command` run with the
    settings that a process reads only when it starts. Call it before anything is written.

    - Unless `malloc_tcache`: glibc's per-thread cache of freed small blocks off
      (``GLIBC_TUNABLES``), which lowers the peak memory of training (module docstring).
    - With `brief_openmp_spin`: ``GOMP_SPINCOUNT=20000``, so that OpenMP's idle threads stop
      spinning soon and leave the cores to NNPACK's thread pool
      (:func:`lowcon.models.winograd.openmp_spins_briefly`). A ``GOMP_SPINCOUNT`` or
      ``OMP_WAIT_POLICY`` already in the environment is kept.

    Returns without doing anything when neither applies or both are already so (glibc's only
    where glibc is), when this process already restarted once, or with ``LOWCON_NO_RESTART=1``
    in the environment.
    """
    if os.environ.get(_RESTARTED) or os.environ.get("LOWCON_NO_RESTART") == "1":
        return
    env = dict(os.environ)
    changed = False
    if not malloc_tcache and _libc() is not None and not malloc_tcache_disabled():
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t] + [TCACHE_OFF]
        env["GLIBC_TUNABLES"] = ":".join(tunables)
        changed = True
    if brief_openmp_spin and "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = str(OPENMP_SPINCOUNT)
        changed = True
    if not changed:
        return
    env[_RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # A Ctrl-C or SIGTERM that arrives while the new process imports its libraries could
    # interrupt an import half-way or be swallowed by one. Blocked signals stay blocked, and
    # pending ones stay pending, across execve: the new process takes them once it is ready
    # (release_held_signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    # One that another thread took just before (torch starts one at import, with them unblocked)
    # has its Python handler run in this thread at the next check: give it that check now, so that
    # it stops this process (KeyboardInterrupt) instead of being lost in the exec.
    time.sleep(0.005)
    try:
        os.execve(command[0], list(command), env)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        raise



def restarted() -> bool:
    """Whether this process is the one :func:`restart_with_process_settings` started."""
    return bool(os.environ.get(_RESTARTED))


def release_held_signals() -> None:
    """Unblock Ctrl-C and SIGTERM, which :func:`restart_with_process_settings` blocked across the
    restart; one that arrived meanwhile is delivered now, to this process's handlers."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
