"""What the benchmarks share: one measurement per fresh process, timing, machine facts, tables.

Every measurement runs in its own child process, so that its peak memory is that process's
peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) and nothing of an earlier case
(allocator caches, compiled kernels, imported modules) is counted twice. A case is a plain
function ``case(**kwargs) -> dict`` in a benchmark script; it times its own work with
:func:`time_repeats` and returns JSON-able numbers. The child adds the memory figures.

Run a case by hand (prints its JSON)::

    python benchmarks/common.py benchmarks/bench_aecrnet.py:train_lowcon '{"size": 64}'
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "RESULT_MARKER", "peak_rss_gb", "time_repeats", "run_case", "run_rounds", "run_paired", "paired_ratio",
    "machine_info", "markdown_table", "write_json", "write_results", "fmt",
]

RESULT_MARKER = "@@BENCH-RESULT@@ "
STEP_MARKER = "@@BENCH-STEP@@ "
READY_MARKER = "@@BENCH-READY@@"
# Set in a case process started by run_paired: time_repeats then runs one step per request.
STEP_SERVER_ENV = "LOWCON_BENCH_STEP_SERVER"
THREADS = 2


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports kB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 / 1e9


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed.

    Returns:
        {"seconds_median", "seconds_all", "cpu_seconds_median", "cpu_seconds_all"}: wall-clock
        and process CPU time (all threads) per run. The warm-up runs are left out because they
        pay the one-off costs (allocator growth, oneDNN primitive creation, compilation). CPU
        time is the cross-check on a shared machine: other work slows the wall clock more.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats, warmup: need >= 1 and >= 0, got {repeats}, {warmup}")
    if os.environ.get(STEP_SERVER_ENV):
        return _serve_steps(fn)
    for _ in range(warmup):
        fn()
    seconds, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds_median": statistics.median(seconds), "seconds_all": seconds,
            "cpu_seconds_median": statistics.median(cpu), "cpu_seconds_all": cpu}


def _serve_steps(fn: Callable[[], Any]) -> dict:
    """The case process's side of :func:`run_paired`: run `fn` once per line ``warm`` or ``step``
    read from stdin, answer each with its wall-clock and CPU seconds, and return the timed
    (``step``) runs as :func:`time_repeats` does once ``done`` arrives."""
    print(READY_MARKER, flush=True)
    seconds, cpu = [], []
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            break
        if command not in ("warm", "step"):
            raise ValueError(f"step server: unknown command {command!r}")
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if command == "step":
            seconds.append(took)
            cpu.append(took_cpu)
        print(STEP_MARKER + json.dumps({"seconds": took, "cpu_seconds": took_cpu}), flush=True)
    if not seconds:
        raise RuntimeError("step server: no timed step was asked for")
    return {"seconds_median": statistics.median(seconds), "seconds_all": seconds,
            "cpu_seconds_median": statistics.median(cpu), "cpu_seconds_all": cpu, "paired": True}


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"script: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _child(target: str, kwargs_json: str) -> None:
    """Entry of the child process: import the script, run one case, print its JSON last."""
    import torch

    torch.set_num_threads(THREADS)
    script, _, name = target.rpartition(":")
    module = _load_script(script)
    # What the process holds before the case builds anything (Python, torch, the script).
    base = peak_rss_gb()
    result = getattr(module, name)(**json.loads(kwargs_json))
    result["peak_rss_gb"] = peak_rss_gb()
    result["base_rss_gb"] = base
    result["threads"] = torch.get_num_threads()
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_case(script: str, case: str, timeout_s: float = 1800, **kwargs) -> dict:
    """Run ``case(**kwargs)`` of benchmark `script` in a fresh Python process.

    Returns:
        the case's dict plus ``peak_rss_gb`` and ``base_rss_gb`` (after imports), or
        ``{"error": "..."}`` with the child's last error line when it fails or times out.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), f"{Path(script).resolve()}:{case}", json.dumps(kwargs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    # The 1-minute load average before and after: other work on the machine shows up here.
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            return result
    lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "stderr_tail": lines[-15:]}


def run_rounds(script: str, specs: Sequence[tuple], rounds: int = 1, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run cases in `rounds` interleaved passes and keep, per case, the least disturbed run.

    Args:
        specs: ``(key, case, kwargs, timeout_s, once)`` in running order; ``once=True`` cases
            (slow ones: compilation, emulated bf16) run in the first pass only.
        rounds: passes over all cases. On a shared machine other jobs come and go; interleaving
            the lowcon and official cases and keeping each case's fastest pass compares them
            under the quietest conditions each saw.

    Returns:
        key -> the result with the smallest ``seconds_median`` (or the last error), plus
        ``rounds_seconds_median``: every pass's median.
    """
    out: dict = {}
    for r in range(rounds):
        for key, case, kwargs, timeout_s, once in specs:
            if once and r > 0:
                continue
            if log:
                log(f"... [{r + 1}/{rounds}] {key}")
            res = run_case(script, case, timeout_s=timeout_s, **kwargs)
            if log:
                log("    " + json.dumps({k: v for k, v in res.items() if not k.endswith("_all")})[:400])
            prev = out.get(key)
            medians = (prev or {}).get("rounds_seconds_median", [])
            if "error" not in res:
                medians = medians + [res["seconds_median"]]
            if prev is None or "error" in prev or ("error" not in res and res["seconds_median"] < prev["seconds_median"]):
                out[key] = res
            out[key]["rounds_seconds_median"] = medians
    return out


class _CaseProcess:
    """One case of :func:`run_paired`, alive in its own process and stepped on request."""

    def __init__(self, script: str, case: str, kwargs: dict, workdir: Path) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), f"{Path(script).resolve()}:{case}", json.dumps(kwargs)]
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), **{STEP_SERVER_ENV: "1"})
        self.stderr_path = workdir / f"{len(list(workdir.iterdir()))}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1, env=env)
        self.error: Optional[str] = None

    def _read_until(self, marker: str) -> Optional[str]:
        """The rest of the first stdout line starting with `marker`; None (and .error) at EOF."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        self.proc.wait()
        self._stderr.close()
        lines = [ln for ln in self.stderr_path.read_text().splitlines() if ln.strip()]
        self.error = lines[-1] if lines else f"exit status {self.proc.returncode}"
        return None

    def ready(self) -> bool:
        return self._read_until(READY_MARKER) is not None

    def run(self, command: str) -> Optional[dict]:
        if self.error:
            return None
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        answer = self._read_until(STEP_MARKER if command != "done" else RESULT_MARKER)
        return None if answer is None else json.loads(answer)

    def finish(self) -> dict:
        result = self.run("done")
        self.proc.wait()
        if not self._stderr.closed:
            self._stderr.close()
        return result if result is not None else {"error": self.error}


def run_paired(script: str, specs: Sequence[tuple], repeats: int, warmup: int,
               log: Optional[Callable[[str], None]] = None) -> dict:
    """Run cases step by step in turn, each in its own live process, so that all see the same load.

    On a shared machine the load changes over minutes; a case run after another can see a
    different machine. Here every case is built once in its own process and then stepped in
    turn: one step of each, in alternating order (A B ... then ... B A), `warmup` untimed rounds
    and then `repeats` timed ones. Step r of two cases ran seconds apart, so :func:`paired_ratio`
    compares them round by round. Each process still reports its own peak memory.

    Args:
        specs: ``(key, case, kwargs)``; the case calls :func:`time_repeats` once, as always.

    Returns:
        key -> the case's result (``seconds_all`` in round order, ``paired: True``) or
        ``{"error": ...}``.
    """
    import tempfile

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats, warmup: need >= 1 and >= 0, got {repeats}, {warmup}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_paired_") as tmp:
        procs = {key: _CaseProcess(script, case, kwargs, Path(tmp)) for key, case, kwargs in specs}
        live = [key for key, proc in procs.items() if proc.ready()]
        for r in range(warmup + repeats):
            order = live if r % 2 == 0 else live[::-1]
            for key in order:
                answer = procs[key].run("warm" if r < warmup else "step")
                if log:
                    state = "warm-up" if r < warmup else f"step {r - warmup + 1}/{repeats}"
                    log(f"... {key} {state}: " + (f"{answer['seconds']:.2f} s" if answer else
                                                 f"failed: {procs[key].error}"))
            live = [key for key in live if not procs[key].error]
        out = {}
        for key, proc in procs.items():
            out[key] = proc.finish() if not proc.error else {"error": proc.error}
            out[key]["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return out


def paired_ratio(a: Optional[dict], b: Optional[dict]) -> Optional[tuple[float, float, float]]:
    """(median, min, max) over rounds of a's step time / b's step time, for two cases of one
    :func:`run_paired` call; None unless both were run that way with the same number of steps."""
    if not a or not b or not a.get("paired") or not b.get("paired"):
        return None
    mine, theirs = a.get("seconds_all") or [], b.get("seconds_all") or []
    if not mine or len(mine) != len(theirs):
        return None
    ratios = [x / y for x, y in zip(mine, theirs)]
    return statistics.median(ratios), min(ratios), max(ratios)


def paired_cell(a: Optional[dict], b: Optional[dict]) -> str:
    """'median (min-max)' of :func:`paired_ratio`, '-' when not paired."""
    r = paired_ratio(a, b)
    return "-" if r is None else f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Date (UTC), CPU, core count, thread setting and library versions of this run."""
    import torch
    import torchvision

    from lowcon.inference import cpu_has_native_bf16

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "threads": THREADS,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(cpu_has_native_bf16()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        **({"gpu": f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"}
           if torch.cuda.is_available() else {}),
    }


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['date_utc']} UTC, {info['cpu']} ({info['nproc']} cores, {info['threads']} torch threads, "
            f"{info['cpu_capability']}, native bf16: {'yes' if info['native_bf16'] else 'no'}), "
            f"Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}{gpu}")


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def ratio(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    """a[key] / b[key] for two case results, None when either is missing or failed."""
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def cell(result: Optional[dict], key: str, digits: int = 3) -> str:
    """One result field for a table: '-' when not run, the error's tail when it failed."""
    if result is None:
        return "-"
    if "error" in result:
        return f"failed: {result['error'][-90:]}"
    return fmt(result.get(key), digits)


def memory_cell(result: Optional[dict]) -> str:
    """'peak (above the RSS after imports)' in GB."""
    if result is None or "error" in result:
        return "-"
    return f"{result['peak_rss_gb']:.2f} ({result['peak_rss_gb'] - result['base_rss_gb']:.2f})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_results(path: str | os.PathLike, payload: dict, report: str) -> None:
    """`payload` as JSON at `path`, `report` (markdown) beside it as ``<stem>_report.md``, and the
    report printed."""
    write_json(path, payload)
    Path(path).with_name(Path(path).stem + "_report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/common.py SCRIPT.py:CASE 'JSON kwargs'")
    _child(sys.argv[1], sys.argv[2])
