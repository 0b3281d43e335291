"""Translating large images: one pass against bands of rows (the generators' ``forward_in_bands``).

    python benchmarks/bench_large_translate.py [--preset cut|sincut] [--sizes 1024x1024,2048x2048,4000x3000] \
        [--plain-up-to-mp 4.2] [--out benchmarks/results/large_translate.json]

One image of each size (width x height, random pixels: the work does not depend on them) through
the preset's generator (CUT's ResNet generator or SinCUT's StyleGAN2 one; random weights, the
layers' fast paths as ``lowcon translate`` sets them up), once in one pass (``generator(x)``) and
once in bands (``forward_in_bands`` with its defaults, what ``lowcon translate`` runs above
``BANDS_FROM_PIXELS``), each in a fresh process set up as ``lowcon translate`` sets up
its own (glibc's tcache off, OpenMP spinning briefly, the preset's allocator settings), 2 torch
threads. Reported: seconds for the pass and the process's peak RSS. One pass of a 12-megapixel
image needs more than this machine's 24 GB, so the one-pass case runs only up to
`--plain-up-to-mp` megapixels.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, machine_line, markdown_table, memory_cell, run_case, write_results  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def translate(width: int, height: int, bands: bool, preset: str = "cut") -> dict:
    """One pass of the preset's generator over a (1, 3, height, width) image, in bands or not."""
    import torch

    from lowcon.config import load_config, preset_path
    from lowcon.training.memory import configure_allocator, restart_with_process_settings
    from lowcon.translation import TranslationConfig, build_generator

    cfg = load_config(TranslationConfig, preset_path(preset))
    restart_with_process_settings([sys.executable, *sys.argv], malloc_tcache=cfg.malloc_tcache,
                                  brief_openmp_spin=cfg.nnpack)  # as lowcon translate
    configure_allocator(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)
    torch.manual_seed(0)
    generator = build_generator(cfg).eval()
    x = torch.rand(1, 3, height, width) * 2 - 1
    start = time.perf_counter()
    with torch.no_grad():
        y = generator.forward_in_bands(x) if bands else generator(x)
    return {"seconds": time.perf_counter() - start, "mean": float(y.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cut", choices=["cut", "sincut"], help="whose generator")
    p.add_argument("--sizes", default="1024x1024,2048x2048,4000x3000", help="comma-separated WIDTHxHEIGHT")
    p.add_argument("--plain-up-to-mp", type=float, default=4.2, help="one-pass cases only up to this many megapixels")
    p.add_argument("--out", default=str(HERE / "results" / "large_translate.json"))
    args = p.parse_args()
    info = machine_info()
    rows, results = [], {}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        entry = {}
        for mode in ("one pass", "bands"):
            if mode == "one pass" and width * height > args.plain_up_to_mp * 1e6:
                continue
            print(f"{size} {mode} ...", flush=True)
            entry[mode] = run_case(SCRIPT, "translate", width=width, height=height, bands=mode == "bands",
                                   preset=args.preset)
        results[size] = entry
        plain, banded = entry.get("one pass"), entry.get("bands")
        same = "-" if not plain or not banded or "mean" not in plain or "mean" not in banded else \
            f"{abs(plain['mean'] - banded['mean']):.1e}"
        rows.append([f"{width} x {height} ({width * height / 1e6:.1f} MP)",
                     f"{plain['seconds']:.1f}" if plain and "seconds" in plain else (plain or {}).get("error", "-"),
                     memory_cell(plain) if plain else "-",
                     f"{banded['seconds']:.1f}" if banded and "seconds" in banded else (banded or {}).get("error", "-"),
                     memory_cell(banded) if banded else "-", same])
    whose = {"cut": "CUT generator (ResNet)", "sincut": "SinCUT generator (StyleGAN2)"}[args.preset]
    report = (f"{machine_line(info)}\n\n{whose} (random weights), one image, no gradients; peak = process "
              f"max RSS in GB, in brackets above the RSS after imports\n\n"
              + markdown_table(["image", "one pass s", "one pass peak GB", "bands s", "bands peak GB",
                                "|mean difference|"], rows) + "\n")
    write_results(args.out, {"machine": info, "preset": args.preset, "results": results}, report)


if __name__ == "__main__":
    main()
