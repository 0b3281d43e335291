"""Speed and memory of one training step of CUT, FastCUT and CycleGAN: lowcon, optionally official.

    python benchmarks/bench_translation.py [--official DIR] [--repeats N] [--warmup N] \
        [--device cuda] [--bf16 [--paired --also-fp32]] [--out benchmarks/results/translation.json]

One step = everything ``train_step`` (lowcon) or ``set_input`` + ``optimize_parameters``
(official) does for one batch of random 256x256 images, batch 1, with the presets'
networks (9-block ResNet generator, 3-layer PatchGAN, PatchNCE head of width 256 on 5 layers
for CUT / FastCUT). Each case runs in a fresh process (see ``common.py``), 2 torch threads.
With ``--device cuda`` both sides run on the GPU (the official code with ``--gpu_ids 0``), each
step waits for the GPU, and the report adds the GPU's peak allocated memory; ``--bf16`` runs
lowcon with ``bf16: true``; targets and ordering then use the GPU's peak memory. ``--paired
--bf16 --also-fp32`` steps three processes per method in turn (lowcon with bf16, lowcon in
float32, official) and reports bf16 against float32 round by round, and the 0.5x target of the
fastest settings.

``--official DIR`` is a checkout of github.com/taesungp/contrastive-unpaired-translation. Its
models are built in-process from its own option parser (``--gpu_ids -1``) and driven as its
``train.py`` drives them: ``data_dependent_initialize`` on the first batch (it builds the MLP
head of CUT), ``setup``, ``parallelize``, then ``set_input`` / ``optimize_parameters``. Their
``cut_model.py`` reads ``--CUT_mode`` from ``sys.argv`` rather than from ``cmd_line``, so the
case process also puts the options in ``sys.argv`` (without that, "FastCUT" silently runs as
CUT); the case checks the resulting ``nce_idt`` and ``lambda_NCE``. Its
``cycle_gan_model.py`` reads ``opt.amp``, which no option defines; the benchmark sets it to
False on the parsed options. Its CycleGAN runs with its own default options, as lowcon's
``cyclegan`` preset does (CUT's anti-aliased networks, xavier init); ``--methods cyclegan_original``
compares lowcon's ``cyclegan_original`` preset with the official code run with that preset's settings
(no anti-aliasing, normal init: the CycleGAN repository's).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (cell, fmt, machine_info, machine_line, markdown_table, memory_cell, paired_cell,  # noqa: E402
                    paired_ratio, ratio, run_paired, run_rounds, time_repeats, write_json)

import torch  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
METHODS = ("cut", "fastcut", "cyclegan")
EXTRA_METHODS = ("cyclegan_original",)  # run only when asked for by --methods
# The seed's GPU measurements (s/iter, GB), for the ordering only: these are not CPU numbers.
SEED_GPU = {"cut": (0.24, 3.33), "fastcut": (0.15, 2.25), "cyclegan": (0.40, 4.81), "cyclegan_original": (0.40, 4.81)}
OFFICIAL_ARGS = {
    "cut": "--model cut --CUT_mode CUT",
    "fastcut": "--model cut --CUT_mode FastCUT",
    "cyclegan": "--model cycle_gan",
    "cyclegan_original": "--model cycle_gan --no_antialias --no_antialias_up --init_type normal",
}


def _images(size: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"A": torch.rand(batch, 3, size, size, generator=gen),
            "B": torch.rand(batch, 3, size, size, generator=gen)}


def _timed_steps(step, device: str, repeats: int, warmup: int) -> dict:
    """`time_repeats` of `step`, waiting for the GPU after each step when `device` is cuda. On a
    GPU also its peak allocated memory (``torch.cuda.max_memory_allocated``): over the warm-up
    steps, where cuDNN's autotuner tries its algorithms in workspaces of many GB
    (``peak_gpu_warmup_gb``), and over the timed steps, the memory training keeps needing
    (``peak_gpu_gb``)."""
    cuda = device.startswith("cuda")

    def synced() -> None:
        step()
        if cuda:
            torch.cuda.synchronize()

    if not cuda:
        return time_repeats(synced, repeats, warmup)
    for _ in range(warmup):
        synced()
    warm_peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    result = time_repeats(synced, repeats, 0)
    return {**result, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9, "peak_gpu_warmup_gb": warm_peak}


def train_lowcon(method: str, size: int = 256, batch: int = 1, repeats: int = 5, warmup: int = 2,
                 device: str = "cpu", **settings) -> dict:
    """Time lowcon's training step (:func:`lowcon_step`; `settings` are its keywords)."""
    return _timed_steps(lowcon_step(method, size, batch, device=device, **settings), device, repeats, warmup)


def lowcon_step(method: str, size: int = 256, batch: int = 1, activation_checkpointing: Optional[bool] = None,
                heap_mmap_threshold_mb: float = 0, retain_freed_memory: bool = True, winograd: bool = True,
                malloc_tcache: bool = False, nnpack: bool = True, device: str = "cpu",
                bf16: bool = False) -> Callable[[], None]:
    """One lowcon training step of `method`'s preset on random images, ready to call, in a
    process set up as ``lowcon train`` sets up its own (it may start this process again)."""
    from lowcon.config import load_config, preset_path
    from lowcon.training.memory import configure_allocator, restart_with_process_settings
    from lowcon.translation import TranslationConfig, build_method

    torch.manual_seed(0)
    keep = {} if activation_checkpointing is None else {"activation_checkpointing": activation_checkpointing}
    cfg = load_config(TranslationConfig, preset_path(method), {"crop_size": size, "batch_size": batch, **keep,
                                                              "heap_mmap_threshold_mb": heap_mmap_threshold_mb,
                                                              "retain_freed_memory": retain_freed_memory,
                                                              "winograd": winograd,
                                                              "nnpack": nnpack,
                                                              "malloc_tcache": malloc_tcache,
                                                              "bf16": bf16})
    # as `lowcon train` does: this case process starts again with the tcache off and OpenMP
    # spinning briefly (for NNPACK)
    restart_with_process_settings([sys.executable, *sys.argv], malloc_tcache=cfg.malloc_tcache,
                                  brief_openmp_spin=cfg.nnpack)
    configure_allocator(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)  # as train_translation does
    model = build_method(cfg, steps_per_epoch=1000, device=device)
    data = {k: v.to(device) for k, v in _images(size, batch).items()}
    return lambda: model.train_step(data)


def train_official(official: str, method: str, size: int = 256, batch: int = 1,
                   repeats: int = 5, warmup: int = 2, device: str = "cpu") -> dict:
    """Time the official code's training step (:func:`official_step`)."""
    return _timed_steps(official_step(official, method, size, batch, device), device, repeats, warmup)


def official_step(official: str, method: str, size: int = 256, batch: int = 1,
                  device: str = "cpu") -> Callable[[], None]:
    """One training step of the official code's model for `method`, ready to call, driven as its
    ``train.py`` drives it."""
    import numpy as np

    root = Path(official)
    if not (root / "models" / "cut_model.py").is_file():
        raise ValueError(f"official: {official} has no models/cut_model.py (a contrastive-unpaired-translation checkout?)")
    sys.path.insert(0, str(root))
    from models import create_model
    from options.train_options import TrainOptions

    torch.manual_seed(0)
    np.random.seed(0)
    checkpoints = tempfile.mkdtemp(prefix="bench_cut_")  # print_options writes its opt file there
    gpu_ids = device.split(":")[1] if ":" in device else "0" if device == "cuda" else "-1"
    cmd = (f"--dataroot none --name bench --gpu_ids {gpu_ids} --checkpoints_dir {checkpoints} "
           f"--crop_size {size} --load_size {size} --batch_size {batch} {OFFICIAL_ARGS[method]}")
    # Their model option setters call parser.parse_known_args() on sys.argv, not on cmd_line
    # (cut_model.py reads --CUT_mode that way): give sys.argv the same options.
    sys.argv = [sys.argv[0]] + cmd.split()
    opt = TrainOptions(cmd_line=cmd).parse()
    expected = {"cut": (True, 1.0), "fastcut": (False, 10.0)}.get(method)
    if expected and (opt.nce_idt, opt.lambda_NCE) != expected:
        raise RuntimeError(f"official options for {method}: nce_idt={opt.nce_idt}, lambda_NCE={opt.lambda_NCE}, "
                           f"expected {expected}")
    if not hasattr(opt, "amp"):
        opt.amp = False  # read by their cycle_gan_model.py, defined by no option
    model = create_model(opt)
    data = {**_images(size, batch), "A_paths": ["a.png"] * batch, "B_paths": ["b.png"] * batch}
    # As train.py does on the first batch (CycleGAN's version takes no data).
    try:
        model.data_dependent_initialize(data)
    except TypeError:
        model.data_dependent_initialize()
    model.setup(opt)
    model.parallelize()

    def step() -> None:
        model.set_input(data)
        model.optimize_parameters()

    return step


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", help="a checkout of taesungp/contrastive-unpaired-translation (optional)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of cut,fastcut,cyclegan (and cyclegan_original)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved passes over the cases; each keeps its fastest pass (shared machines)")
    p.add_argument("--paired", action="store_true",
                   help="per method, keep lowcon and official alive side by side and step them in turn "
                        "(--repeats rounds after --warmup); the report gives round-by-round time ratios")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="lowcon cases with activation_checkpointing: true (the generator's residual blocks)")
    p.add_argument("--heap-mmap-threshold-mb", type=float, default=0,
                   help="lowcon cases with heap_mmap_threshold_mb set (large tensors mapped and unmapped at once; "
                        "turns retain_freed_memory off)")
    p.add_argument("--no-retain-freed-memory", action="store_true",
                   help="lowcon cases with retain_freed_memory: false (glibc gives freed memory back, as by default)")
    p.add_argument("--no-nnpack", action="store_true",
                   help="lowcon with nnpack: false (lowcon's own Winograd transforms everywhere)")
    p.add_argument("--no-winograd", action="store_true",
                   help="lowcon with winograd: false (direct 3x3 convolutions, as before that key)")
    p.add_argument("--malloc-tcache", action="store_true",
                   help="lowcon with malloc_tcache: true (glibc's default; lowcon train turns it off)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda / cuda:N for both sides (the official code then runs with --gpu_ids N)")
    p.add_argument("--bf16", action="store_true",
                   help="lowcon with bf16: true (on a CPU its bf16 convolutions, on a GPU bfloat16 autocast; "
                        "for a GPU or a CPU with native bf16)")
    p.add_argument("--also-fp32", action="store_true",
                   help="with --bf16 and --paired: a third process per method, lowcon in float32, stepped in "
                        "the same rounds, so that the report compares bf16 with float32 round by round")
    p.add_argument("--out", default=str(HERE / "results" / "translation.json"))
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; valid: {', '.join(METHODS + EXTRA_METHODS)}")
    if args.also_fp32 and not (args.bf16 and args.paired):
        p.error("--also-fp32 needs --bf16 and --paired")
    common = dict(size=args.size, batch=args.batch, repeats=args.repeats, warmup=args.warmup)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    specs = []  # lowcon and official side by side, so that both see the same machine load
    for m in methods:
        lowcon = dict(method=m, activation_checkpointing=True if args.activation_checkpointing else None,
                      heap_mmap_threshold_mb=args.heap_mmap_threshold_mb,
                      retain_freed_memory=not (args.no_retain_freed_memory or args.heap_mmap_threshold_mb),
                      winograd=not args.no_winograd, malloc_tcache=args.malloc_tcache,
                      nnpack=not args.no_nnpack, device=args.device, **common)
        specs.append((f"lowcon/{m}", "train_lowcon", dict(lowcon, bf16=args.bf16), 1800, False))
        if args.also_fp32:
            specs.append((f"lowcon_fp32/{m}", "train_lowcon", dict(lowcon, bf16=False), 1800, False))
        if args.official:
            specs.append((f"official/{m}", "train_official",
                          dict(official=args.official, method=m, device=args.device, **common), 1800, False))
    if args.paired:
        if args.rounds != 1:
            p.error("--paired and --rounds: pick one")
        measured = {}
        for m in methods:  # one pair at a time: two processes alive, stepped in turn
            group = [(key, case, kw) for key, case, kw, _, _ in specs if key.endswith(f"/{m}")]
            measured.update(run_paired(SCRIPT, group, repeats=args.repeats, warmup=args.warmup, log=log))
    else:
        measured = run_rounds(SCRIPT, specs, rounds=args.rounds, log=log)
    results: dict = {"machine": machine_info(), "args": vars(args), "lowcon": {}, "official": {}}
    if args.also_fp32:
        results["lowcon_fp32"] = {}
    for key, res in measured.items():
        side, m = key.split("/")
        results[side][m] = res
    write_json(args.out, results)
    print(report(results))
    return results


def report(results: dict) -> str:
    a, mine_all, theirs_all = results["args"], results["lowcon"], results["official"]
    has_off = bool(theirs_all)
    settings = []
    if a.get("activation_checkpointing"):
        settings.append("activation_checkpointing: true")
    if a.get("heap_mmap_threshold_mb"):
        settings.append(f"heap_mmap_threshold_mb: {a['heap_mmap_threshold_mb']:g}")
    if a.get("no_retain_freed_memory") or a.get("heap_mmap_threshold_mb"):
        settings.append("retain_freed_memory: false")
    if a.get("no_winograd"):
        settings.append("winograd: false")
    if a.get("no_nnpack"):
        settings.append("nnpack: false")
    if a.get("malloc_tcache"):
        settings.append("malloc_tcache: true")
    if a.get("bf16"):
        settings.append("bf16: true")
    setting = f"; lowcon with {', '.join(settings)}" if settings else ""
    how = (f"lowcon and official alive side by side and stepped in turn, {a['repeats']} rounds after "
           f"{a['warmup']} warm-up; paired ratio = median (range) over rounds of the two steps' ratio"
           if a.get("paired") else f"best of {a.get('rounds', 1)} interleaved round(s)")
    lines = [f"Machine: {machine_line(results['machine'])}", "",
             f"One training step, {a['size']}x{a['size']}, batch {a['batch']}: wall-clock median of {a['repeats']} "
             f"steps after {a['warmup']} warm-up, {how}; peak = process max RSS, in brackets above the RSS after "
             f"imports{setting}", ""]
    header = ["method", "lowcon s/iter", "lowcon peak GB"]
    if has_off:
        header += ["official s/iter", "official peak GB", "time ratio (CPU time)", "paired time ratio",
                   "memory ratio"]
    header += ["seed GPU s/iter", "seed GPU GB"]
    rows = []
    for m, mine in mine_all.items():
        row = [m, cell(mine, "seconds_median"), memory_cell(mine)]
        if has_off:
            theirs = theirs_all.get(m)
            row += [cell(theirs, "seconds_median"), memory_cell(theirs),
                    f"{fmt(ratio(mine, theirs, 'seconds_median'), 2)} ({fmt(ratio(mine, theirs, 'cpu_seconds_median'), 2)})",
                    paired_cell(mine, theirs), fmt(ratio(mine, theirs, "peak_rss_gb"), 2)]
        row += [fmt(SEED_GPU[m][0], 2), fmt(SEED_GPU[m][1], 2)]
        rows.append(row)
    lines.append(markdown_table(header, rows))
    if any("peak_gpu_gb" in (r or {}) for r in (*mine_all.values(), *theirs_all.values())):
        lines += ["", f"GPU peak memory on {a.get('device')} (torch.cuda.max_memory_allocated), GB, over the "
                  f"timed steps (in brackets over the warm-up steps, cuDNN's autotuner included):"]
        for m, mine in mine_all.items():
            theirs = theirs_all.get(m)
            lines.append(f"- {m}: lowcon {cell(mine, 'peak_gpu_gb')} ({cell(mine, 'peak_gpu_warmup_gb')}), "
                         f"official {cell(theirs, 'peak_gpu_gb')} ({cell(theirs, 'peak_gpu_warmup_gb')}), "
                         f"ratio {fmt(ratio(mine, theirs, 'peak_gpu_gb'), 2)}")
    # on a GPU the memory that counts is the GPU's (the seed's GB are GPU memory)
    memory_key = "peak_gpu_gb" if str(a.get("device", "cpu")).startswith("cuda") else "peak_rss_gb"
    if has_off:
        lines += ["", "Targets against the official code (fp32): time <= 0.8x and peak memory <= 0.8x"
                  + (" (set for the CPU; on the GPU for reference):" if memory_key == "peak_gpu_gb" else ":")]
        for m, mine in mine_all.items():
            theirs = theirs_all.get(m)
            for key, what in (("seconds_median", "time"), (memory_key, "peak memory")):
                value = ratio(mine, theirs, key)
                paired = paired_ratio(mine, theirs)
                if key == "seconds_median" and paired:
                    value, what = paired[0], "time (median paired ratio)"
                verdict = "-" if value is None else ("met" if value <= 0.8 else "MISSED")
                lines.append(f"- {m} {what}: {fmt(value, 2)} -> {verdict}")
    fp32_all = results.get("lowcon_fp32") or {}
    if fp32_all:
        lines += ["", "lowcon in float32, stepped in the same rounds (bf16 against float32, and each against "
                  "the official code; paired ratios, median (range)):", ""]
        rows = []
        for m, mine in mine_all.items():
            fp32, theirs = fp32_all.get(m), theirs_all.get(m)
            rows.append([m, cell(fp32, "seconds_median"), memory_cell(fp32), paired_cell(mine, fp32),
                         paired_cell(fp32, theirs) if has_off else "-", paired_cell(mine, theirs) if has_off else "-"])
        lines.append(markdown_table(["method", "float32 s/iter", "float32 peak GB", "bf16 / float32",
                                     "float32 / official", "bf16 / official"], rows))
        if has_off:
            lines += ["", "Target with the fastest settings: time <= 0.5x the official code's (median paired ratio "
                      "of the faster setting):"]
            for m, mine in mine_all.items():
                ratios = [r[0] for r in (paired_ratio(mine, theirs_all.get(m)),
                                         paired_ratio(fp32_all.get(m), theirs_all.get(m))) if r]
                best = min(ratios) if ratios else None
                verdict = "-" if best is None else ("met" if best <= 0.5 else "MISSED")
                lines.append(f"- {m}: {fmt(best, 2)} -> {verdict}")
    lines += ["", "Ordering (seed, GPU: FastCUT < CUT < CycleGAN in time and memory):"]
    for side, res in (("lowcon", mine_all), ("official", theirs_all)):
        if not res:
            continue
        for key, what in (("seconds_median", "time"), (memory_key, "memory")):
            vals = {m: r.get(key) for m, r in res.items() if r and "error" not in r}
            if not all(m in vals for m in METHODS):
                lines.append(f"- {side} {what}: not all three methods measured")
                continue
            holds = vals["fastcut"] < vals["cut"] < vals["cyclegan"]
            lines.append(f"- {side} {what}: fastcut {fmt(vals['fastcut'], 2)} < cut {fmt(vals['cut'], 2)} "
                         f"< cyclegan {fmt(vals['cyclegan'], 2)} -> {'holds' if holds else 'DOES NOT HOLD'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
