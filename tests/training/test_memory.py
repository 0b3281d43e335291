import platform
import subprocess
import sys

import pytest

from lowcon.training.memory import map_large_allocations

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


def test_config_keys_are_validated():
    from lowcon.dehazing import DehazeConfig
    from lowcon.translation import TranslationConfig

    for config in (DehazeConfig, TranslationConfig):
        with pytest.raises(ValueError, match="^heap_mmap_threshold_mb"):
            config(heap_mmap_threshold_mb=64).validate()
        config(heap_mmap_threshold_mb=8).validate()
