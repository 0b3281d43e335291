import platform
import subprocess
import sys

import pytest

from lowcon.training.memory import configure_allocator, map_large_allocations

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Runs in its own process: the setting is process-wide. Prints the bytes that glibc holds in
# separate mappings while one 16 MB tensor is alive, after an earlier 16 MB tensor was freed (which
# by default raises glibc's threshold to 16 MB, so the second one comes from the heap).
PROBE = """
import ctypes, sys, torch
from lowcon.training.memory import map_large_allocations

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "on":
    assert map_large_allocations(8) is True
first = torch.empty(4 * 2**20)  # 16 MB
del first
second = torch.empty(4 * 2**20)
print(libc.mallinfo2().hblkhd)
"""


def _mapped_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@glibc
def test_large_tensors_get_their_own_mapping_only_when_asked():
    sixteen_mb = 16 * 2**20
    assert _mapped_bytes("off") < sixteen_mb  # glibc's default: the freed block moved the threshold up
    assert _mapped_bytes("on") >= sixteen_mb


@pytest.mark.parametrize("value", [0, -1, 33])
def test_threshold_outside_the_range_is_a_one_line_error(value):
    with pytest.raises(ValueError, match=r"^heap_mmap_threshold_mb: expected a value in \(0, 32\]"):
        map_large_allocations(value)


# Prints, after a 64 MB tensor was allocated and freed: the bytes glibc held in separate mappings
# while it was alive, and how much the heap grew (measured after the tensor was freed).
RETAIN_PROBE = """
import ctypes, sys, torch
from lowcon.training.memory import retain_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "on":
    assert retain_freed_memory() is True
heap = libc.mallinfo2().arena
big = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest automatic threshold (32 MB)
mapped = libc.mallinfo2().hblkhd
del big
print(mapped, libc.mallinfo2().arena - heap)
"""


def _retain_probe(mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", RETAIN_PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mapped, heap = done.stdout.strip().splitlines()[-1].split()
    return int(mapped), int(heap)


@glibc
def test_retained_memory_stays_in_the_heap_after_it_is_freed():
    mb64 = 64 * 2**20
    mapped, grown = _retain_probe("off")
    assert mapped >= mb64 and grown < mb64  # glibc's default: its own mapping, gone when freed
    mapped, grown = _retain_probe("on")
    assert mapped < mb64 and grown >= mb64  # from the heap, and the heap keeps it for reuse


def test_config_keys_are_validated():
    from lowcon.dehazing import DehazeConfig
    from lowcon.translation import TranslationConfig

    for config in (DehazeConfig, TranslationConfig):
        with pytest.raises(ValueError, match="^heap_mmap_threshold_mb"):
            config(heap_mmap_threshold_mb=64, retain_freed_memory=False).validate()
        config(heap_mmap_threshold_mb=8, retain_freed_memory=False).validate()
        with pytest.raises(ValueError, match="^heap_mmap_threshold_mb, retain_freed_memory: opposite"):
            config(heap_mmap_threshold_mb=8, retain_freed_memory=True).validate()
        with pytest.raises(ValueError, match="^heap_mmap_threshold_mb, retain_freed_memory: opposite"):
            configure_allocator(8, True)
    # On by default for translation (its steps fault heavily otherwise), off for dehazing.
    assert TranslationConfig().retain_freed_memory is True
    assert DehazeConfig().retain_freed_memory is False
