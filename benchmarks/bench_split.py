"""Where a translation training step's time goes, lowcon beside the official code, by kind of work.

    python benchmarks/bench_split.py --official DIR [--methods cut,fastcut,cyclegan] [--steps 2] \
        [--out benchmarks/results/split.json]

One CUT, FastCUT or CycleGAN step at 256x256, batch 1, as ``bench_translation.py`` builds it
(lowcon's preset with its fastest settings, the process started again as ``lowcon train`` does;
the official code with ``--gpu_ids -1``), each side in its own fresh process, 2 torch threads.
After two warm-up steps, `--steps` steps run under a ``TorchDispatchMode`` that times every aten
operation and files it under one kind of work:

- **3x3 / 4x4 convolutions, stride 1**: the residual blocks, the anti-aliased down and up steps'
  convolutions, the PatchGAN's inner layers; aten's (oneDNN) on the official side, NNPACK and
  lowcon's Winograd transforms and products on lowcon's (every ``bmm`` and ``baddbmm`` of 36
  Winograd points, every ``mm`` with a side of 36, the 36-kernel transform convolutions).
- **strided and transposed convolutions**: CycleGAN's down and up steps and PatchGAN layers
  (no anti-aliasing); the same oneDNN calls on both sides.
- **7x7 convolutions**: the generators' first and last layers (NNPACK for lowcon's forward and
  input gradient).
- **blur filters**: the anti-aliasing depthwise convolutions.
- **everything else**: instance norms, activations, padding, upsampling, losses, PatchNCE, the
  optimisers, copies.

The seconds are those inside the operations, summed (the dispatch mode adds a little per
operation, so the plain step time is reported beside them). The report shows, per kind, the
official seconds over lowcon's: where lowcon's step is faster, and where both run the same work.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, machine_line, markdown_table, run_case, write_results  # noqa: E402

import torch  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
METHODS = ("cut", "fastcut", "cyclegan")
KINDS = ("3x3 / 4x4 convolutions, stride 1", "strided and transposed convolutions", "7x7 convolutions",
         "blur filters", "everything else")
_CONV_OPS = {"convolution", "convolution_backward", "_nnpack_spatial_convolution"}
# Winograd transforms of lowcon: 36 points (6x6 tiles) per tile
_POINTS = 36


def _conv_kind(name: str, args: tuple) -> str:
    """The kind of one convolution call, from its weight, stride, transposition and groups."""
    if name == "_nnpack_spatial_convolution":  # (input, weight, bias, padding): stride 1
        weight, stride, transposed, groups = args[1], [1, 1], False, 1
    elif name == "convolution":  # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        weight, stride, transposed, groups = args[1], args[3], args[6], args[8]
    else:  # convolution_backward(grad, input, weight, bias_sizes, stride, padding, dilation, transposed, ...)
        weight, stride, transposed, groups = args[2], args[4], args[7], args[9]
    out_channels, in_per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[-1]
    if groups == 1 and in_per_group == 1 and out_channels == _POINTS:
        return KINDS[0]  # a Winograd input or gradient transform
    if groups > 1:
        return KINDS[3]
    if kernel >= 5:
        return KINDS[2]
    if transposed or any(s != 1 for s in stride):
        return KINDS[1]
    return KINDS[0]


def kind_of(name: str, args: tuple) -> str:
    """The kind of work of one aten operation (`name` without the ``aten.`` prefix)."""
    if name in _CONV_OPS:
        return _conv_kind(name, args)
    if name in ("bmm", "baddbmm", "baddbmm_"):
        batch = args[0] if name == "bmm" else args[1]
        return KINDS[0] if batch.shape[0] == _POINTS else KINDS[4]
    if name == "mm" and any(_POINTS in a.shape for a in args[:2]):
        return KINDS[0]
    return KINDS[4]


def split_steps(step: Callable[[], None], steps: int) -> dict:
    """Run `step` twice untimed, then `steps` times under the timing mode: per kind, the median
    seconds inside the operations, and the median plain step time (a step right before each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    spent: dict[str, float] = defaultdict(float)

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            spent[kind_of(str(func.overloadpacket).split(".")[-1], args)] += time.perf_counter() - start
            return out

    for _ in range(2):
        step()
    plain, per_kind = [], {k: [] for k in KINDS}
    for _ in range(steps):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
        spent.clear()
        with Timed():
            step()
        for k in KINDS:
            per_kind[k].append(spent.get(k, 0.0))
    return {"step_s": statistics.median(plain), "kinds_s": {k: statistics.median(v) for k, v in per_kind.items()}}


def split_lowcon(method: str, steps: int = 2) -> dict:
    from bench_translation import lowcon_step

    return split_steps(lowcon_step(method), steps)


def split_official(official: str, method: str, steps: int = 2) -> dict:
    from bench_translation import official_step

    return split_steps(official_step(official, method), steps)


def report(results: dict) -> str:
    lines = [f"Machine: {machine_line(results['machine'])}", "",
             "Seconds inside the operations of one training step (256x256, batch 1; median of "
             f"{results['args']['steps']} steps under the timing mode), by kind of work:", ""]
    for method, sides in results["methods"].items():
        low, off = sides.get("lowcon", {}), sides.get("official", {})
        if "error" in low or "error" in off:
            lines += [f"{method}: failed: {low.get('error') or off.get('error')}", ""]
            continue
        rows = []
        for k in KINDS:
            a, b = low["kinds_s"][k], off["kinds_s"][k]
            rows.append([k, f"{a:.2f}", f"{b:.2f}", f"{b / a:.1f}x" if a > 0 else "-"])
        total_low, total_off = sum(low["kinds_s"].values()), sum(off["kinds_s"].values())
        rows.append(["all operations", f"{total_low:.2f}", f"{total_off:.2f}", f"{total_off / total_low:.1f}x"])
        rows.append(["plain step (no timing mode)", f"{low['step_s']:.2f}", f"{off['step_s']:.2f}",
                     f"{off['step_s'] / low['step_s']:.1f}x"])
        lines += [f"**{method}**", "", markdown_table(["kind of work", "lowcon s", "official s",
                                                       "official / lowcon"], rows), ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="a checkout of taesungp/contrastive-unpaired-translation")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after two warm-up steps)")
    p.add_argument("--out", default=str(HERE / "results" / "split.json"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    results: dict = {"machine": machine_info(), "args": vars(args), "methods": {}}
    for method in methods:  # one process at a time: the two sides never share the cores
        sides = {"lowcon": run_case(SCRIPT, "split_lowcon", method=method, steps=args.steps),
                 "official": run_case(SCRIPT, "split_official", official=args.official, method=method,
                                      steps=args.steps)}
        results["methods"][method] = sides
        print(f"{method}: " + ", ".join(f"{side} {res.get('step_s', res.get('error'))}" for side, res in sides.items()),
              file=sys.stderr, flush=True)
    write_results(args.out, results, report(results))
    return results


if __name__ == "__main__":
    main()
