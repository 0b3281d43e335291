"""Speed and memory of AECR-Net training and inference: lowcon, and optionally the official code.

    python benchmarks/bench_aecrnet.py [--official DIR] [--repeats N] [--warmup N] \
        [--out benchmarks/results/aecrnet.json] [--profile]

Measured, each case in a fresh process (see ``common.py``), 2 torch threads:

- one training step (forward, L1 [+ 0.1 CR with a random-weight VGG-19], backward, Adam) at
  240x240, batch 2: L1 only and L1 + CR in fp32, then lowcon's other settings
  (activation checkpointing, torchvision's DCN kernel, channels_last, bf16 autocast,
  torch.compile);
- inference (eval, no grad, batch 1): images per second at 620x460, peak memory at 1600x1200.

``--official DIR`` is a checkout of github.com/GlassyWu/AECR-Net. Its network imports a
CUDA-only DCNv2 extension and its constructors call ``.cuda()``; the benchmark process (never
their files) provides a stand-in ``DCNv2.dcn_v2.DCN`` computed with
``torchvision.ops.deform_conv2d`` (lowcon's ``dcn_impl="torchvision"``; its default on CPU is
its own ``sampled_deform_conv2d``), turns ``.cuda()`` into a no-op, and makes ``torchvision.models.vgg19`` return
random weights (no download). Their step is the one of ``train_aecrnet.py``: L1 + 0.1 *
``ContrastLoss(out, clear, hazy)``, Adam(1e-4, (0.9, 0.999)).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (cell, fmt, machine_info, machine_line, markdown_table, memory_cell, paired_cell,  # noqa: E402
                    paired_ratio, ratio, run_case, run_paired, run_rounds, time_repeats, write_json)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


# --------------------------------------------------------------------------------------------
# The official code, made importable on a CPU-only machine (in this process only)
# --------------------------------------------------------------------------------------------
class _DCNStandIn(nn.Module):
    """Stand-in for DCNv2's ``DCN(in, out, kernel_size, stride, padding, dilation=1,
    deformable_groups=1)``: a conv predicts 2k*k offsets and k*k mask logits (zero init), then a
    modulated deformable conv. Same parameters and shapes as the CUDA extension; the offset
    channel order may differ from DCNv2's, which changes no timing."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1, deformable_groups=1):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * kh * kw)
        nn.init.uniform_(self.weight, -bound, bound)
        self.conv_offset_mask = nn.Conv2d(in_channels, deformable_groups * 3 * kh * kw, (kh, kw),
                                          stride=stride, padding=padding, bias=True)
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x):
        from torchvision.ops import deform_conv2d

        o1, o2, mask = torch.chunk(self.conv_offset_mask(x), 3, dim=1)
        return deform_conv2d(x, torch.cat((o1, o2), dim=1), self.weight, self.bias, stride=self.stride,
                             padding=self.padding, dilation=self.dilation, mask=torch.sigmoid(mask))


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_official(official: str):
    """(their network module, their CR module) with the CPU shims of this file installed."""
    models_dir = Path(official) / "models"
    if not (models_dir / "AECRNet.py").is_file():
        raise ValueError(f"official: {official} has no models/AECRNet.py (a GlassyWu/AECR-Net checkout?)")
    nn.Module.cuda = lambda self, device=None: self  # their constructors call .cuda()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    dcn = types.ModuleType("DCNv2.dcn_v2")
    dcn.DCN = _DCNStandIn
    package = types.ModuleType("DCNv2")
    package.dcn_v2 = dcn
    sys.modules["DCNv2"], sys.modules["DCNv2.dcn_v2"] = package, dcn
    import torchvision.models

    random_vgg19 = torchvision.models.vgg19
    torchvision.models.vgg19 = lambda *args, **kwargs: random_vgg19(weights=None)
    sys.path.insert(0, str(models_dir))  # `from deconv import FastDeconv`
    net_module = _import_file("official_aecrnet", models_dir / "AECRNet.py")
    cr_module = _import_file("official_cr", models_dir / "CR.py")
    return net_module, cr_module


# --------------------------------------------------------------------------------------------
# Cases (each runs in its own process)
# --------------------------------------------------------------------------------------------
def _pair(size: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"hazy": torch.rand(batch, 3, size, size, generator=gen),
            "clear": torch.rand(batch, 3, size, size, generator=gen)}


def train_lowcon(size: int = 240, batch: int = 2, beta: float = 0.1, channels_last: bool = False,
                 bf16: bool = False, compile: bool = False, dcn_impl: str = "auto",
                 activation_checkpointing: bool = False, heap_mmap_threshold_mb: float = 0,
                 retain_freed_memory: bool = False, winograd: bool = True, malloc_tcache: bool = False,
                 winograd_band_mb: float = 16, repeats: int = 5, warmup: int = 2) -> dict:
    from lowcon.contrast import ContrastiveRegularization, VGG19Features
    from lowcon.dehazing import CHECKPOINT_VGG_SLICES
    from lowcon.methods.aecr import AECRTraining
    from lowcon.models.aecrnet import AECRNet
    from lowcon.models.winograd import set_band_size, use_winograd

    from lowcon.training.memory import configure_allocator, restart_with_process_settings

    # as `lowcon train` does: this case process starts again with the tcache off
    restart_with_process_settings([sys.executable, *sys.argv], malloc_tcache=malloc_tcache)
    configure_allocator(heap_mmap_threshold_mb, retain_freed_memory)  # as lowcon.dehazing.train_dehaze does
    set_band_size(winograd_band_mb)
    torch.manual_seed(0)
    net = AECRNet(dcn_impl=dcn_impl, checkpoint_blocks=activation_checkpointing)
    cr = None
    if beta > 0:  # as lowcon.dehazing.build_dehaze_method builds it
        slices = CHECKPOINT_VGG_SLICES if activation_checkpointing else 0
        cr = ContrastiveRegularization(VGG19Features(weights="random", checkpoint_slices=slices))
    if winograd:  # as lowcon.dehazing builds them with the config's default `winograd: true`
        use_winograd(net)
        if cr is not None:
            use_winograd(cr.embedding)
    if compile:
        net = torch.compile(net)
        if cr is not None:
            cr.embedding = torch.compile(cr.embedding)
    method = AECRTraining(net, cr, beta=beta, total_steps=10_000, channels_last=channels_last,
                          autocast_dtype=torch.bfloat16 if bf16 else None)
    batch_ = _pair(size, batch)
    result = {}
    if compile:  # the first step compiles forward and backward: timed on its own
        start = time.perf_counter()
        method.train_step(batch_)
        result["compile_seconds"] = time.perf_counter() - start
    result.update(time_repeats(lambda: method.train_step(batch_), repeats, warmup))
    return result


def train_official(official: str, size: int = 240, batch: int = 2, beta: float = 0.1,
                   repeats: int = 5, warmup: int = 2) -> dict:
    net_module, cr_module = _load_official(official)
    torch.manual_seed(0)
    net = net_module.Dehaze(3, 3)
    net.train()
    contrast = cr_module.ContrastLoss(ablation=False) if beta > 0 else None
    l1 = nn.L1Loss()
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, net.parameters()), lr=1e-4,
                                 betas=(0.9, 0.999), eps=1e-08)
    data = _pair(size, batch)
    x, y = data["hazy"], data["clear"]

    def step() -> None:  # train_aecrnet.py, one iteration
        out = net(x)
        loss = l1(out, y)
        if contrast is not None:
            loss = loss + beta * contrast(out, y, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return time_repeats(step, repeats, warmup)


def infer_lowcon(width: int = 620, height: int = 460, winograd: bool = True, repeats: int = 5,
                 warmup: int = 1) -> dict:
    from lowcon.dehazing import dehaze_tensor
    from lowcon.models.aecrnet import AECRNet
    from lowcon.models.winograd import use_winograd

    torch.manual_seed(0)
    net = AECRNet().eval()
    if winograd:
        use_winograd(net)
    hazy = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    result = time_repeats(lambda: dehaze_tensor(net, hazy, size_multiple=4, tile=0), repeats, warmup)
    result["images_per_s"] = 1.0 / result["seconds_median"]
    return result


def infer_official(official: str, width: int = 620, height: int = 460, repeats: int = 5, warmup: int = 1) -> dict:
    net_module, _ = _load_official(official)
    torch.manual_seed(0)
    net = net_module.Dehaze(3, 3).eval()
    hazy = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))

    def run() -> None:
        with torch.no_grad():
            net(hazy).clamp(0, 1)

    result = time_repeats(run, repeats, warmup)
    result["images_per_s"] = 1.0 / result["seconds_median"]
    return result


def profile_train(impl: str, official: Optional[str] = None, size: int = 240, batch: int = 2,
                  beta: float = 0.1, steps: int = 2, top: int = 15) -> dict:
    """Top ops (self CPU time) of `steps` training steps after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    if impl == "lowcon":
        from lowcon.contrast import ContrastiveRegularization, VGG19Features
        from lowcon.methods.aecr import AECRTraining
        from lowcon.models.aecrnet import AECRNet

        torch.manual_seed(0)
        method = AECRTraining(AECRNet(), ContrastiveRegularization(VGG19Features(weights="random")), beta=beta)
        data = _pair(size, batch)
        step = lambda: method.train_step(data)  # noqa: E731
    else:
        net_module, cr_module = _load_official(official)
        torch.manual_seed(0)
        net, contrast = net_module.Dehaze(3, 3), cr_module.ContrastLoss(ablation=False)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        data = _pair(size, batch)

        def step() -> None:
            out = net(data["hazy"])
            loss = F.l1_loss(out, data["clear"]) + beta * contrast(out, data["clear"], data["hazy"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6 / steps, "share": e.self_cpu_time_total / total,
             "calls": e.count // steps} for e in events[:top]]
    return {"top_ops": rows, "steps": steps}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _above_base(result: Optional[dict]) -> Optional[dict]:
    """The case's own memory: peak RSS minus the RSS after imports (Python, torch: same for all)."""
    if not result or "error" in result:
        return result
    return {**result, "peak_rss_gb": result["peak_rss_gb"] - result["base_rss_gb"]}


def _label(key: str) -> str:
    parts = key.split("/", 2)
    return parts[2] if len(parts) == 3 else "fp32"


# The configuration documented for the least memory: the memory settings of the AECR-Net config
# as the aecrnet_low_memory preset sets them. At 240x240, batch 2, 8 MB maps the full- and
# half-resolution maps (29.5 and 14.7 MB); the quarter-resolution ones (7.4 MB) stay on the heap.
LOW_MEMORY = "activation_checkpointing + heap_mmap_threshold_mb=8 + winograd_band_mb=4"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", help="a checkout of GlassyWu/AECR-Net (optional)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=240, help="training crop (square)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--infer-size", default="620x460", help="WxH for images per second")
    p.add_argument("--mem-size", default="1600x1200", help="WxH for inference peak memory")
    p.add_argument("--no-fast", action="store_true", help="skip channels_last / bf16 / compile")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-bf16", action="store_true", help="skip bf16 autocast (emulated, slow, on CPUs without bf16)")
    p.add_argument("--bf16-repeats", type=int, default=2,
                   help="timed repeats (after 1 warm-up) of the bf16 cases: slow on CPUs without native bf16")
    p.add_argument("--compile-timeout", type=float, default=1800, help="seconds before the compile case is given up")
    p.add_argument("--profile", action="store_true", help="also list the top ops of one CR training step")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved passes over the cases; each keeps its fastest pass (shared machines)")
    p.add_argument("--paired", action="store_true",
                   help="keep the selected training cases alive side by side and step them in turn (--repeats "
                        "rounds after --warmup); the report adds round-by-round time ratios to the official code")
    p.add_argument("--only", help="comma-separated substrings: run only the cases whose key contains one "
                        "(a trailing $: whose key ends with it)")
    p.add_argument("--merge", action="store_true", help="update the cases of an existing --out file")
    p.add_argument("--out", default=str(HERE / "results" / "aecrnet.json"))
    args = p.parse_args(argv)
    iw, ih = (int(v) for v in args.infer_size.lower().split("x"))
    mw, mh = (int(v) for v in args.mem_size.lower().split("x"))
    off = args.official
    common = dict(size=args.size, batch=args.batch, repeats=args.repeats, warmup=args.warmup)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    specs = [  # (key, case, kwargs, timeout_s, once): lowcon and official side by side
        ("train/l1/lowcon", "train_lowcon", dict(beta=0.0, **common), 1800, False),
        ("train/l1/official", "train_official", dict(official=off, beta=0.0, **common), 1800, False),
        ("train/cr/lowcon", "train_lowcon", dict(beta=0.1, **common), 1800, False),
        ("train/cr/official", "train_official", dict(official=off, beta=0.1, **common), 1800, False),
        ("infer/speed/lowcon", "infer_lowcon", dict(width=iw, height=ih, repeats=args.repeats, warmup=1), 1800, False),
        ("infer/speed/official", "infer_official", dict(official=off, width=iw, height=ih, repeats=args.repeats,
                                                        warmup=1), 1800, False),
        ("infer/memory/lowcon", "infer_lowcon", dict(width=mw, height=mh, repeats=1, warmup=0), 1800, True),
        ("infer/speed/lowcon/winograd: false", "infer_lowcon", dict(width=iw, height=ih, winograd=False,
                                                                    repeats=args.repeats, warmup=1), 1800, False),
        ("infer/memory/official", "infer_official", dict(official=off, width=mw, height=mh, repeats=1, warmup=0),
         1800, True),
    ]
    if not off:
        specs = [spec for spec in specs if not spec[0].endswith("/official")]
    if not args.no_fast:
        fast = [("activation_checkpointing", dict(activation_checkpointing=True)),
                ("heap_mmap_threshold_mb=8", dict(heap_mmap_threshold_mb=8)),
                (LOW_MEMORY, dict(activation_checkpointing=True, heap_mmap_threshold_mb=8, winograd_band_mb=4)),
                ("activation_checkpointing + heap_mmap_threshold_mb=8",
                 dict(activation_checkpointing=True, heap_mmap_threshold_mb=8)),
                ("activation_checkpointing + heap_mmap_threshold_mb=24",
                 dict(activation_checkpointing=True, heap_mmap_threshold_mb=24)),
                ("retain_freed_memory", dict(retain_freed_memory=True)),
                ("direct convolutions (winograd: false)", dict(winograd=False)),
                ("malloc_tcache: true (glibc's default)", dict(malloc_tcache=True)),
                ("activation_checkpointing + heap_mmap_threshold_mb=24, winograd: false",
                 dict(activation_checkpointing=True, heap_mmap_threshold_mb=24, winograd=False)),
                ("DCN by torchvision (dcn_impl=torchvision)", dict(dcn_impl="torchvision")),
                ("channels_last", dict(channels_last=True))]
        if not args.no_bf16:
            fast.append(("bf16 autocast", dict(bf16=True)))
        if not args.no_compile:
            fast.append(("torch.compile", dict(compile=True)))
        for label, kw in fast:
            settings = dict(common)
            if kw.get("bf16"):
                settings.update(repeats=min(args.repeats, args.bf16_repeats), warmup=1)
                label += f" [median of {settings['repeats']} after 1 warm-up]"
            slow = bool(kw.get("bf16") or kw.get("compile"))
            timeout = args.compile_timeout if kw.get("compile") else 3600
            specs.append((f"train/cr/lowcon/{label}", "train_lowcon", dict(beta=0.1, **kw, **settings), timeout, slow))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        specs = [spec for spec in specs
                 if any(spec[0].endswith(w[:-1]) if w.endswith("$") else w in spec[0] for w in wanted)]
    if args.paired:
        if args.rounds != 1:
            p.error("--paired and --rounds: pick one")
        # Training cases step in turn; the slow ones (compile, emulated bf16) and inference as before.
        stepped = [spec for spec in specs if spec[0].startswith("train/") and not spec[4]]
        measured = run_paired(SCRIPT, [(key, case, kw) for key, case, kw, _, _ in stepped],
                              repeats=args.repeats, warmup=args.warmup, log=log)
        measured.update(run_rounds(SCRIPT, [spec for spec in specs if spec not in stepped], log=log))
    else:
        measured = run_rounds(SCRIPT, specs, rounds=args.rounds, log=log)
    results: dict = {"machine": machine_info(), "args": vars(args), "train": {}, "infer": {}}
    if args.merge and Path(args.out).is_file():  # keep the other cases of an earlier run
        earlier = json.loads(Path(args.out).read_text())
        results = {**earlier, "merged_runs": earlier.get("merged_runs", []) + [
            {"machine": results["machine"], "args": results["args"], "keys": sorted(measured)}]}
    for key, res in measured.items():
        group, rest = key.split("/", 1)
        results[group][rest] = res
    if args.profile:
        results["profile"] = {"lowcon": run_case(SCRIPT, "profile_train", impl="lowcon", size=args.size,
                                                 batch=args.batch)}
        if off:
            results["profile"]["official"] = run_case(SCRIPT, "profile_train", impl="official", official=off,
                                                      size=args.size, batch=args.batch)
    write_json(args.out, results)
    print(report(results))
    return results


def report(results: dict) -> str:
    train, infer, a = results["train"], results["infer"], results["args"]
    has_off = "cr/official" in train
    lines = [f"Machine: {machine_line(results['machine'])}", ""]
    for run in results.get("merged_runs", []):  # later passes (--merge) replaced these cases
        r = run["args"]
        lines.append(f"Re-measured {run['machine']['date_utc']} UTC ({r['repeats']} steps after {r['warmup']} warm-up, "
                     f"best of {r.get('rounds', 1)} rounds): {', '.join(run['keys'])}")
    if results.get("merged_runs"):
        lines.append("")
    how = ("the training cases alive side by side and stepped in turn; paired time ratio = median (range) over "
           "rounds of the two steps' ratio" if a.get("paired")
           else f"best of {a.get('rounds', 1)} interleaved round(s)")
    lines.append(f"Training step, {a['size']}x{a['size']}, batch {a['batch']}: wall-clock median of {a['repeats']} "
                 f"steps after {a['warmup']} warm-up, {how}; peak = process max RSS, in brackets above the RSS "
                 f"after imports")
    lines.append("")
    header = ["case", "lowcon s/step", "lowcon peak GB (above base)"]
    if has_off:
        header += ["official s/step", "official peak GB (above base)", "time ratio (CPU time)",
                   "paired time ratio", "memory ratio (above base)"]

    def compare(mine: Optional[dict], theirs: Optional[dict]) -> list[str]:
        mem = fmt(ratio(mine, theirs, "peak_rss_gb"), 2)
        own = fmt(ratio(_above_base(mine), _above_base(theirs), "peak_rss_gb"), 2)
        wall = fmt(ratio(mine, theirs, "seconds_median"), 2)
        cpu = fmt(ratio(mine, theirs, "cpu_seconds_median"), 2)
        return [f"{wall} ({cpu})", paired_cell(mine, theirs), f"{mem} ({own})"]

    rows = []
    for key, label in (("l1", "L1, fp32"), ("cr", "L1 + 0.1 CR, fp32")):
        mine, theirs = train.get(f"{key}/lowcon"), train.get(f"{key}/official")
        row = [label, cell(mine, "seconds_median"), memory_cell(mine)]
        if has_off:
            row += [cell(theirs, "seconds_median"), memory_cell(theirs)] + compare(mine, theirs)
        rows.append(row)
    for key, mine in train.items():
        if key.startswith("cr/lowcon/"):
            label = "L1 + 0.1 CR, " + _label(key)
            if mine and "compile_seconds" in mine:
                label += f" (first step, compiling: {mine['compile_seconds']:.0f} s)"
            row = [label, cell(mine, "seconds_median"), memory_cell(mine)]
            if has_off:
                row += ["", ""] + compare(mine, train["cr/official"])
            rows.append(row)
    lines.append(markdown_table(header, rows))
    l1, cr = train.get("l1/lowcon"), train.get("cr/lowcon")
    overhead = ratio(cr, l1, "seconds_median")
    if overhead:
        lines += ["", f"CR overhead (lowcon, fp32): x{overhead:.2f} the time of the L1-only step"]
    if has_off:
        o = ratio(train.get("cr/official"), train.get("l1/official"), "seconds_median")
        if o:
            lines.append(f"CR overhead (official, fp32): x{o:.2f}")
    lines += ["", "Inference, batch 1, eval, no grad", ""]
    header = ["case", "lowcon", "official", "ratio lowcon/official"] if "speed/official" in infer else ["case", "lowcon"]
    rows = []
    for key, label, field, digits in (("speed", f"images/s at {a['infer_size']}", "images_per_s", 2),
                                      ("speed", f"peak GB at {a['infer_size']}", "peak_rss_gb", 2),
                                      ("memory", f"peak GB at {a['mem_size']}", "peak_rss_gb", 2),
                                      ("memory", f"seconds at {a['mem_size']}", "seconds_median", 2)):
        mine, theirs = infer.get(f"{key}/lowcon"), infer.get(f"{key}/official")
        if field == "peak_rss_gb":
            row = [label + " (above base)", memory_cell(mine)]
            if len(header) > 2:
                own = fmt(ratio(_above_base(mine), _above_base(theirs), field), 2)
                row += [memory_cell(theirs), f"{fmt(ratio(mine, theirs, field), 2)} ({own})"]
        else:
            row = [label, cell(mine, field, digits)]
            if len(header) > 2:
                row += [cell(theirs, field, digits), fmt(ratio(mine, theirs, field), 2)]
        rows.append(row)
    direct = infer.get("speed/lowcon/winograd: false")
    if direct:
        row = [f"images/s at {a['infer_size']}, winograd: false", cell(direct, "images_per_s", 2)]
        if len(header) > 2:
            row += [cell(infer.get("speed/official"), "images_per_s", 2),
                    fmt(ratio(direct, infer.get("speed/official"), "images_per_s"), 2)]
        rows.append(row)
    lines.append(markdown_table(header, rows))
    if has_off:
        lines += ["", "Targets (training step, L1 + 0.1 CR):"]
        official = train.get("cr/official")
        fp32 = [("default", cr)] + [(name, train.get(f"cr/lowcon/{name}"))
                                    for name in ("activation_checkpointing", LOW_MEMORY)]
        for name, case in fp32:
            t, how = ratio(case, official, "seconds_median"), "time"
            if paired_ratio(case, official):
                t, how = paired_ratio(case, official)[0], "time (median paired ratio)"
            m = ratio(case, official, "peak_rss_gb")
            m_own = ratio(_above_base(case), _above_base(official), "peak_rss_gb")
            for text, value, limit in ((f"fp32 {name}: {how} <= 0.8x", t, 0.8),
                                       (f"fp32 {name}: peak memory <= 0.7x", m, 0.7)):
                verdict = "-" if value is None else ("met" if value <= limit else "MISSED")
                lines.append(f"- {text}: {fmt(value, 2)} -> {verdict}")
            lines.append(f"  (peak memory above the import baseline: {fmt(m_own, 2)})")
        fast = [(k, (paired_ratio(v, official) or [ratio(v, official, "seconds_median")])[0])
                for k, v in train.items() if k.startswith("cr/lowcon")]
        fast = [(k, r) for k, r in fast if r is not None]
        best = min(fast, key=lambda kr: kr[1]) if fast else (None, None)
        value = best[1]
        verdict = "-" if value is None else ("met" if value <= 0.5 else "MISSED")
        lines.append(f"- fastest settings ({_label(best[0] or '') or 'default'}): time <= 0.5x: "
                     f"{fmt(value, 2)} -> {verdict}")
    if "profile" in results:
        for impl, prof in results["profile"].items():
            if "top_ops" not in prof:
                lines += ["", f"Profile ({impl}): {prof.get('error')}"]
                continue
            lines += ["", f"Top ops, one L1 + CR step ({impl}), self CPU time", ""]
            lines.append(markdown_table(["op", "s/step", "share", "calls/step"],
                                        [[r["op"], fmt(r["self_s"]), f"{100 * r['share']:.1f}%", r["calls"]]
                                         for r in prof["top_ops"]]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
