"""How fast the translation networks' convolutions run, and how much of a training step they take.

    python benchmarks/bench_conv.py [--repeats 7] [--steps 3] [--out benchmarks/results/conv.json]

Three parts, in one process, 2 torch threads, ``retain_freed_memory`` as translation trains:

1. **Layers.** Each convolution shape of the CUT generator and PatchGAN at 256x256 (batch 1), timed
   forward alone and forward + backward (input and weight gradients), fastest of `--repeats`:
   - direct: ``F.conv2d`` and ``aten.convolution_backward`` (oneDNN);
   - lowcon's own Winograd transforms (:mod:`lowcon.models.winograd`, NNPACK off);
   - NNPACK's forward (``torch._nnpack_spatial_convolution``): a hand-written AVX2 library of
     fused Winograd and FFT convolutions inside torch, which torch uses for inference only;
   - with NNPACK: what training runs now, NNPACK's forward and input gradient (where the output
     is 56x56 or more) and lowcon's weight gradient (for the 7x7 filters aten's, or to 3 channels
     :func:`lowcon.models.winograd.shifted_weight_grad`).
2. **Matrix products.** sgemm (2048^3) and the 36 batched products of a 256-channel 64x64 layer,
   in GFLOP/s: the ceiling of the Winograd products.
3. **Steps.** One CUT, FastCUT and CycleGAN training step at 256x256 (median of `--steps`, after
   two warm-up steps, the presets' settings), split into the time inside the fast-path
   convolutions (forward and input gradient: lowcon's transforms, ``_conv``, or NNPACK,
   ``_nnpack_conv``; weight gradient, ``conv_weight_grad``) and everything else. The split wraps
   those functions with a timer, in this benchmark only. The process starts again with
   ``GOMP_SPINCOUNT=20000`` first, as ``lowcon train`` does, so that NNPACK serves the large maps.
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
import torch.nn.functional as F  # noqa: E402

# (name, in channels, out channels, input side, filter, padding): the CUT networks at 256x256.
LAYERS = (
    ("G first (after its reflection pad)", 3, 64, 262, 7, 0),
    ("G down 1", 64, 128, 256, 3, 1),
    ("G down 2", 128, 256, 128, 3, 1),
    ("G residual", 256, 256, 64, 3, 1),
    ("G up 1", 256, 128, 128, 3, 1),
    ("G up 2", 128, 64, 256, 3, 1),
    ("G last (after its reflection pad)", 64, 3, 262, 7, 0),
    ("D layer 2", 64, 128, 128, 4, 1),
    ("D layer 3", 128, 256, 64, 4, 1),
    ("D layer 4", 256, 512, 32, 4, 1),
)
STEP_METHODS = ("cut", "fastcut", "cyclegan")


def fastest_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def nnpack_ready() -> bool:
    """Whether NNPACK can run here (its first call needs ``_nnpack_available`` to initialise it)."""
    return bool(torch._nnpack_available())


def bench_layers(repeats: int) -> list[dict]:
    from lowcon.models import winograd

    conv_backward = torch.ops.aten.convolution_backward
    usable = winograd.openmp_spins_briefly() and winograd.nnpack_works()
    rows = []
    for name, c, o, side, r, pad in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, c, side, side, generator=g)
        w = torch.randn(o, c, r, r, generator=g) / (r * c ** 0.5)
        b = torch.zeros(o)
        y = F.conv2d(x, w, b, padding=pad)
        grad = torch.randn(y.shape, generator=g)
        row = {"layer": name, "in": c, "out": o, "side": side, "filter": r}
        row["direct_fwd_ms"] = fastest_ms(lambda: F.conv2d(x, w, b, padding=pad), repeats)
        row["direct_fwd_bwd_ms"] = fastest_ms(lambda: (
            F.conv2d(x, w, b, padding=pad),
            conv_backward(grad, x, w, [o], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, True])), repeats)
        if usable:
            row["nnpack_fwd_ms"] = fastest_ms(lambda: torch._nnpack_spatial_convolution(x, w, b, [pad, pad]), repeats)
        for key, nnpack in (("winograd", False), ("lowcon_nnpack", True)):
            if nnpack and not usable:
                continue
            if r not in winograd.KERNEL_SIZES and not nnpack:
                continue
            forward, backward = winograd.conv_forward, winograd.conv_backward
            row[f"{key}_fwd_ms"] = fastest_ms(lambda: forward(x, w, b, pad, nnpack), repeats)
            row[f"{key}_fwd_bwd_ms"] = fastest_ms(lambda: (forward(x, w, b, pad, nnpack),
                                                           backward(grad, x, w, pad, True, True, True, nnpack)),
                                                  repeats)
            row[f"{key}_rel_err"] = float((forward(x, w, b, pad, nnpack) - y).abs().max() / y.abs().max())
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def bench_products(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    sgemm = 2 * 2048 ** 3 / fastest_ms(lambda: a @ b, repeats) / 1e6
    filt, tiles = torch.randn(36, 256, 256, generator=g), torch.randn(36, 256, 256, generator=g)
    bmm = 2 * 36 * 256 ** 3 / fastest_ms(lambda: torch.bmm(filt, tiles), repeats) / 1e6
    print(f"sgemm 2048^3 {sgemm:.0f} GFLOP/s, Winograd products of a 256-channel 64x64 layer {bmm:.0f} GFLOP/s",
          flush=True)
    return {"sgemm_gflops": sgemm, "winograd_products_gflops": bmm}


def bench_steps(methods: tuple[str, ...], steps: int) -> list[dict]:
    from lowcon.config import load_config, preset_path
    from lowcon.models import winograd
    from lowcon.translation import TranslationConfig, build_method

    spent = {"conv": 0.0, "weight_grad": 0.0}
    nnpack_on = winograd.openmp_spins_briefly() and winograd.nnpack_works()

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    originals = winograd._conv, winograd._nnpack_conv, winograd.conv_weight_grad
    winograd._conv, winograd._nnpack_conv, winograd.conv_weight_grad = (
        timed(originals[0], "conv"), timed(originals[1], "conv"), timed(originals[2], "weight_grad"))
    rows = []
    try:
        for method in methods:
            torch.manual_seed(0)
            cfg = load_config(TranslationConfig, preset_path(method), {"crop_size": 256, "batch_size": 1})
            model = build_method(cfg, steps_per_epoch=1000, device="cpu")
            g = torch.Generator().manual_seed(0)
            batch = {"A": torch.rand(1, 3, 256, 256, generator=g), "B": torch.rand(1, 3, 256, 256, generator=g)}
            for _ in range(2):
                model.train_step(batch)
            samples = []
            for _ in range(steps):
                spent.update(conv=0.0, weight_grad=0.0)
                start = time.perf_counter()
                model.train_step(batch)
                total = time.perf_counter() - start
                samples.append((total, spent["conv"], spent["weight_grad"]))
            total, conv, wgrad = (statistics.median(s[i] for s in samples) for i in range(3))
            rows.append({"method": method, "nnpack": nnpack_on, "step_s": total, "winograd_conv_s": conv,
                         "winograd_weight_grad_s": wgrad,
                         "rest_s": total - conv - wgrad})
            print(f"{method}: step {total:.2f} s, Winograd forward + input gradient {conv:.2f} s, "
                  f"weight gradient {wgrad:.2f} s, rest {total - conv - wgrad:.2f} s", flush=True)
            del model
    finally:
        winograd._conv, winograd._nnpack_conv, winograd.conv_weight_grad = originals
    return rows


def report(results: dict) -> str:
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [f"Machine: {machine_line(results['machine'])}", ""]
    rows = []
    for r in results["layers"]:
        rows.append([f"{r['layer']}: {r['in']} -> {r['out']}, {r['filter']}x{r['filter']}, {r['side']}x{r['side']}",
                     ms(r["direct_fwd_ms"]), ms(r.get("winograd_fwd_ms")), ms(r.get("nnpack_fwd_ms")),
                     ms(r["direct_fwd_bwd_ms"]), ms(r.get("winograd_fwd_bwd_ms")),
                     ms(r.get("lowcon_nnpack_fwd_bwd_ms"))])
    lines.append(markdown_table(["layer (batch 1, input side)", "direct fwd ms", "lowcon Winograd fwd ms",
                                 "NNPACK fwd ms",
                                 "direct fwd+bwd ms", "lowcon Winograd fwd+bwd ms",
                                 "with NNPACK fwd+bwd ms"], rows))
    p = results["products"]
    lines += ["", f"sgemm 2048^3: {p['sgemm_gflops']:.0f} GFLOP/s; the 36 products of a 256-channel 64x64 layer: "
              f"{p['winograd_products_gflops']:.0f} GFLOP/s.", ""]
    if results.get("steps"):
        lines.append(markdown_table(
            ["method", "NNPACK", "step s", "fwd + input grad s", "weight grad s", "rest s"],
            [[s["method"], "yes" if s["nnpack"] else "no", f"{s['step_s']:.2f}", f"{s['winograd_conv_s']:.2f}",
              f"{s['winograd_weight_grad_s']:.2f}",
              f"{s['rest_s']:.2f}"] for s in results["steps"]]))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per method (0: skip the steps)")
    p.add_argument("--methods", default=",".join(STEP_METHODS))
    p.add_argument("--out", default=str(HERE / "results" / "conv.json"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 0:
        p.error("--repeats must be >= 1 and --steps >= 0")
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := set(methods) - set(STEP_METHODS):
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {STEP_METHODS}")

    from lowcon.training.memory import configure_allocator, restart_with_process_settings

    restart_with_process_settings([sys.executable, *sys.argv], brief_openmp_spin=True)  # as lowcon train
    torch.set_num_threads(THREADS)
    configure_allocator(0, True)  # as translation trains (retain_freed_memory: true)
    results = {"machine": machine_info(), "args": vars(args), "layers": bench_layers(args.repeats),
               "products": bench_products(args.repeats)}
    results["steps"] = bench_steps(methods, args.steps) if args.steps else []
    write_results(args.out, results, report(results))
    return results


if __name__ == "__main__":
    main()
