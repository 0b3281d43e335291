import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lowcon.training.memory import configure_allocator, map_large_allocations

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# The probes run in their own process: the settings are process-wide. Each starts with this,
# which gives glibc's allocation statistics as ``libc.mallinfo2()``.
MALLINFO = """
import ctypes, sys, torch
from lowcon.training.memory import map_large_allocations, retain_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
"""

# Prints the bytes that glibc holds in separate mappings while one 16 MB tensor is alive, after an
# earlier 16 MB tensor was freed (which by default raises glibc's threshold to 16 MB, so the second
# one comes from the heap).
PROBE = MALLINFO + """
if sys.argv[1] == "on":
    assert map_large_allocations(8) is True
first = torch.empty(4 * 2**20)  # 16 MB
del first
second = torch.empty(4 * 2**20)
print(libc.mallinfo2().hblkhd)
"""


def _run_probe(probe: str, mode: str) -> list[int]:
    """The integers on the last line the probe printed, run with argument `mode`."""
    done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(v) for v in done.stdout.strip().splitlines()[-1].split()]


def _mapped_bytes(mode: str) -> int:
    (mapped,) = _run_probe(PROBE, mode)
    return mapped


@glibc
def test_large_tensors_get_their_own_mapping_only_when_asked():
    sixteen_mb = 16 * 2**20
    assert _mapped_bytes("off") < sixteen_mb  # glibc's default: the freed block moved the threshold up
    assert _mapped_bytes("on") >= sixteen_mb


@pytest.mark.parametrize("value", [0, -1, 33])
def test_threshold_outside_the_range_is_a_one_line_error(value):
    with pytest.raises(ValueError, match=r"^heap_mmap_threshold_mb: expected a value in \(0, 32\]"):
        map_large_allocations(value)


# Prints glibc's figures while a 64 MB tensor is alive and after it was freed: the bytes in
# separate mappings, the free bytes inside the heap, and the heap's size.
RETAIN_PROBE = MALLINFO + """
if sys.argv[1] == "on":
    assert retain_freed_memory() is True
big = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest automatic threshold (32 MB)
alive = libc.mallinfo2()
del big
after = libc.mallinfo2()
print(alive.hblkhd, after.hblkhd, alive.fordblks, after.fordblks, alive.arena, after.arena)
"""


@glibc
def test_retained_memory_stays_in_the_heap_after_it_is_freed():
    mb64 = 64 * 2**20
    mapped, mapped_after, _, _, _, _ = _run_probe(RETAIN_PROBE, "off")
    # glibc's default: the block has its own mapping, and it is gone once the tensor is freed.
    assert mapped >= mb64 and mapped - mapped_after >= mb64
    mapped, _, free, free_after, heap, heap_after = _run_probe(RETAIN_PROBE, "on")
    # Asked to retain: the block comes from the heap, and once freed it stays there, free for
    # reuse, with the heap not trimmed.
    assert mapped < mb64 and free_after - free >= mb64 and heap_after >= heap


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


# Restarts itself through restart_with_process_settings; the restarted run prints what it sees.
RESTART = """
import os, sys
from lowcon.training.memory import malloc_tcache_disabled, restart_with_process_settings
print("run", malloc_tcache_disabled(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
restart_with_process_settings([sys.executable, "-c", sys.argv[1] if len(sys.argv) > 1 else __doc__, *sys.argv[1:]])
"""


@glibc
@pytest.mark.parametrize("env, runs", [
    ({}, ["run False ", "run True glibc.malloc.tcache_count=0"]),
    # other tunables are kept; an explicit opt-out or a process that already restarted runs once
    ({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"},
     ["run False glibc.malloc.mxfast=0", "run True glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0"]),
    ({"LOWCON_NO_RESTART": "1"}, ["run False "]),
    ({"LOWCON_RESTARTED": "1"}, ["run False "]),
])
def test_a_process_restarts_once_with_the_tcache_off(env, runs):
    import os

    clean = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "LOWCON_NO_RESTART", "LOWCON_RESTARTED")}
    done = subprocess.run([sys.executable, "-c", RESTART, RESTART], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})
    assert done.returncode == 0, done.stderr
    assert [line.rstrip() for line in done.stdout.splitlines()] == [r.rstrip() for r in runs]


# Asks for brief OpenMP spinning (and keeps the tcache); the restarted run prints what it sees.
RESTART_SPIN = """
import os, sys
from lowcon.training.memory import restart_with_process_settings
print("run", os.environ.get("GOMP_SPINCOUNT"), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
restart_with_process_settings([sys.executable, "-c", sys.argv[1], *sys.argv[1:]], malloc_tcache=True,
                              brief_openmp_spin=True)
"""


@pytest.mark.parametrize("env, runs", [
    ({}, ["run None ", "run 20000 "]),
    # a spin setting of the user's own is kept, and then nothing needs a restart
    ({"GOMP_SPINCOUNT": "5000"}, ["run 5000 "]),
    ({"OMP_WAIT_POLICY": "passive"}, ["run None "]),
])
def test_a_process_restarts_once_with_openmp_spinning_briefly(env, runs):
    import os

    clean = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "LOWCON_NO_RESTART", "LOWCON_RESTARTED", "GOMP_SPINCOUNT",
                          "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", RESTART_SPIN, RESTART_SPIN], capture_output=True, text=True,
                          timeout=120, env={**clean, **env})
    assert done.returncode == 0, done.stderr
    assert [line.rstrip() for line in done.stdout.splitlines()] == [r.rstrip() for r in runs]


def test_only_a_real_command_line_restarts(monkeypatch):
    # main(argv) from a caller's process (tests, notebooks) must never replace that process.
    import os

    from lowcon import cli

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("execve called"))
    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append((args.restartable, args.argv)) or 0)
    assert cli.main(["train", "cut", "--set", "max_steps=1"]) == 0
    monkeypatch.setattr(sys, "argv", ["lowcon", "train", "cut"])
    assert cli.main() == 0  # the console script: this one may start again
    assert seen == [(False, ["train", "cut", "--set", "max_steps=1"]), (True, ["train", "cut"])]


def test_tcache_defaults():
    from lowcon.dehazing import DehazeConfig
    from lowcon.translation import TranslationConfig

    assert TranslationConfig().malloc_tcache is False and DehazeConfig().malloc_tcache is False


def test_translation_does_not_load_torchvision():
    # torchvision's compiled ops add about 170 MB to a process's memory at import; translation
    # needs none of them (AECR-Net imports them only for dcn_impl torchvision, VGG-19 for CR).
    code = "import sys, lowcon, lowcon.translation; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_translate_restarts_with_openmp_spinning_briefly(monkeypatch):
    # `lowcon translate` (also `eval --run` and the translation demo) starts again so that NNPACK
    # serves; the allocator's tcache is left as it is.
    import os

    import lowcon.translation
    from lowcon import cli

    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "LOWCON_NO_RESTART", "LOWCON_RESTARTED", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    seen = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: seen.append((argv, env)))
    monkeypatch.setattr(lowcon.translation, "translate_paths", lambda *a, **k: [Path("out/x.png")])
    command = ["translate", "in", "-o", "out", "--checkpoint", "last.pt"]
    assert cli.main(command) == 0
    assert seen == []  # main(argv) from a caller's process never restarts
    monkeypatch.setattr(sys, "argv", ["lowcon", *command])
    assert cli.main() == 0  # the console script (execve is a stand-in here, so it carries on)
    (argv, env), = seen
    assert argv == [sys.executable, "-m", "lowcon", *command]
    assert env["GOMP_SPINCOUNT"] == "20000" and "GLIBC_TUNABLES" not in env


# Sends itself Ctrl-C right before restarting (as a user's Ctrl-C during the restart); the new process
# reports whether SIGINT is blocked and pending when it starts, then runs the CLI, which takes it.
RESTART_HELD = """
import os, signal, sys
if os.environ.get("LOWCON_RESTARTED"):
    print("held", signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), signal.SIGINT in signal.sigpending(),
          flush=True)
    from lowcon.cli import main
    sys.exit(main(["presets"]))
if sys.argv[2] == "ctrl-c, one thread":  # the module alone, without the package (which starts torch's thread)
    import importlib.util
    package = importlib.util.find_spec("lowcon").submodule_search_locations[0]  # found, not imported
    spec = importlib.util.spec_from_file_location("memory", os.path.join(package, "training", "memory.py"))
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    restart_with_process_settings = memory.restart_with_process_settings
else:
    from lowcon.training.memory import restart_with_process_settings
if sys.argv[2].startswith("ctrl-c"):
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # so that it is still pending at the execve
    os.kill(os.getpid(), signal.SIGINT)
try:
    restart_with_process_settings([sys.executable, "-c", sys.argv[1], *sys.argv[1:]], malloc_tcache=True,
                                  brief_openmp_spin=True)
except KeyboardInterrupt:  # taken here, before the exec (by torch's thread, then this one's handler)
    print("lowcon: interrupted", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("case", ["ctrl-c", "ctrl-c, one thread", "none"])
def test_a_ctrl_c_during_the_restart_is_held_then_taken_by_the_new_process(case):
    import os

    clean = {k: v for k, v in os.environ.items()
             if k not in ("LOWCON_NO_RESTART", "LOWCON_RESTARTED", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    # Ctrl-C as a terminal gives it: a shell's background job (a test run started with &) inherits
    # SIGINT ignored, which the child would keep
    done = subprocess.run([sys.executable, "-c", RESTART_HELD, RESTART_HELD, case], capture_output=True, text=True,
                          timeout=120, env=clean, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if case.startswith("ctrl-c"):
        # Taken as a Ctrl-C, not lost and not a broken import: by this process before the exec (when
        # torch's thread took it), or held across it and taken by the new one once the CLI is ready.
        assert done.returncode == 130 and done.stderr.strip() == "lowcon: interrupted", done.stderr
        if case == "ctrl-c, one thread":  # no other thread could take it: held across the exec
            assert done.stdout.splitlines()[0] == "held True True"
        assert "cyclegan" not in done.stdout  # the command did not run
    else:  # the restart itself blocks SIGINT for the new process, which then runs as usual
        assert done.stdout.splitlines()[0] == "held True False"
        assert done.returncode == 0 and "cyclegan" in done.stdout, done.stderr
