"""The layers besides convolutions whose CPU kernels lowcon replaces: aten's time against lowcon's.

    python benchmarks/bench_layer_ops.py [--repeats 15] [--out benchmarks/results/layer_ops.json]

At the shapes of the CUT / CycleGAN generator at 256x256 (batch 1), median of `--repeats` after
two warm-up calls, one process, 2 torch threads, ``retain_freed_memory`` as translation trains:

- instance norm, forward: aten's ``F.instance_norm`` (its batch-norm kernel, which updates a
  running mean and variance element by element) against
  :func:`lowcon.models.fused.instance_norm_with_stats` (the mean, then the centred map and its
  norm), which the networks' :class:`~lowcon.models.fused.InstanceNorm2d` and fused runs use;
- the gradient of reflection padding: aten's ``reflection_pad2d_backward`` against
  :meth:`lowcon.models.fused.ReflectPad.input_grad` (the interior, plus the border rows and
  columns added onto those they mirror);
- the gradient of the x2 upsampling: aten's ``upsample_bilinear2d_backward`` against
  :meth:`lowcon.models.blur.Upsample.input_grad` (a blur-pool of the replicate-padded gradient,
  the interpolation's adjoint).

The report gives both times and the largest difference between the two results.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import THREADS, machine_info, machine_line, markdown_table, write_results  # noqa: E402

import torch  # noqa: E402

# (name, channels, input side, what): "norm", a reflection padding's size, or "up" (x2 upsampling)
CASES = [
    ("instance norm: 64 ch, 256x256", 64, 256, "norm"),
    ("instance norm: 128 ch, 128x128", 128, 128, "norm"),
    ("instance norm: 256 ch, 64x64 (residual blocks)", 256, 64, "norm"),
    ("reflection pad 1, gradient: 256 ch, 64x64 (residual blocks)", 256, 64, 1),
    ("reflection pad 1, gradient: 128 ch, 128x128 (blur-pool)", 128, 128, 1),
    ("reflection pad 3, gradient: 64 ch, 256x256 (last layer)", 64, 256, 3),
    ("x2 upsampling, gradient: 256 ch, 64x64 -> 128x128", 256, 64, "up"),
    ("x2 upsampling, gradient: 128 ch, 128x128 -> 256x256", 128, 128, "up"),
]


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(repeats: int = 15) -> list[dict]:
    import torch.nn.functional as F

    from lowcon.models.blur import Upsample
    from lowcon.models.fused import ReflectPad, instance_norm_with_stats

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, channels, side, pad in CASES:
        shape = [1, channels, side, side]
        if pad == "norm":
            x = torch.randn(shape, generator=gen)
            ours = lambda x=x: instance_norm_with_stats(x, 1e-5)[0]  # noqa: E731
            aten = lambda x=x: F.instance_norm(x, eps=1e-5)  # noqa: E731
        elif pad == "up":
            grad = torch.randn(1, channels, 2 * side, 2 * side, generator=gen)
            ours = lambda layer=Upsample(channels), g=grad: layer.input_grad(g)  # noqa: E731
            aten = lambda g=grad, s=shape: torch.ops.aten.upsample_bilinear2d_backward(  # noqa: E731
                g, [2 * s[2], 2 * s[3]], s, False, None, None)
        else:
            x = torch.empty(shape)
            grad = torch.randn(1, channels, side + 2 * pad, side + 2 * pad, generator=gen)
            ours = lambda layer=ReflectPad(pad), g=grad: layer.input_grad(g)  # noqa: E731
            aten = lambda g=grad, x=x, p=pad: torch.ops.aten.reflection_pad2d_backward(g, x, [p] * 4)  # noqa: E731
        diff = (ours() - aten()).abs().max().item()
        rows.append({"case": name, "aten_ms": _median_ms(aten, repeats), "lowcon_ms": _median_ms(ours, repeats),
                     "max_abs_difference": diff})
    return rows


def report(results: dict) -> str:
    rows = [[r["case"], f"{r['aten_ms']:.2f}", f"{r['lowcon_ms']:.2f}", f"{r['aten_ms'] / r['lowcon_ms']:.1f}x",
             f"{r['max_abs_difference']:.1e}"] for r in results["cases"]]
    return "\n".join([
        f"Machine: {machine_line(results['machine'])}", "",
        f"Forward (instance norm) or the input's gradient from the output's (padding, upsampling), batch 1, "
        f"median of {results['args']['repeats']} calls after 2 warm-up:", "",
        markdown_table(["layer", "aten ms", "lowcon ms", "speed-up", "max |difference|"], rows), ""])


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(HERE / "results" / "layer_ops.json"))
    args = p.parse_args(argv)
    from lowcon.training.memory import configure_allocator

    torch.set_num_threads(THREADS)
    configure_allocator(0, True)  # as translation trains: freed memory is kept for the next call
    results = {"machine": machine_info(), "args": vars(args), "cases": measure(args.repeats)}
    write_results(args.out, results, report(results))
    return results


if __name__ == "__main__":
    main()
