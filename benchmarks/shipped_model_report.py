"""Package a finished run as lowcon's shipped AECR-Net and write docs/shipped-model.md.

    python benchmarks/shipped_model_report.py --run RUN_DIR [--data ../shared/data]

Exports RUN/<checkpoint> into src/lowcon/weights/aecrnet_sots150.pt (weights + config only) with
its config and training log beside it, then scores it beside the hazy input and DCP on the run's
validation split of SOTS-outdoor-150, on the Dense-Haze and NH-HAZE test pairs, and writes the
tables, comparison grids and loss curves into docs/.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowcon.data.paired import PairedDehazeDataset
from lowcon.dehazing import SHIPPED_MODEL, dehaze_tensor, evaluate_dehazer, load_dehazer
from lowcon.metrics.protocols import get_protocol
from lowcon.report import markdown_table, plot_curves, save_grid, write_text_atomic
from lowcon.training import load_checkpoint, read_log, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", default="last.pt")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    run, data, docs = Path(args.run), Path(args.data) / "dehaze", Path(args.docs)
    if not data.is_dir():
        raise SystemExit(f"{data}: benchmark data not found (this script needs ../shared/data)")
    state = load_checkpoint(run / args.checkpoint, method="aecrnet")
    save_checkpoint(SHIPPED_MODEL, {k: state[k] for k in ("method", "step", "config", "model")})
    shutil.copy(run / "config.yaml", SHIPPED_MODEL.with_suffix(".yaml"))
    shutil.copy(run / "log.csv", SHIPPED_MODEL.with_suffix(".csv"))
    size_mb = SHIPPED_MODEL.stat().st_size / 1e6
    out = docs / "shipped"
    out.mkdir(parents=True, exist_ok=True)

    val_ids = [line.strip() for line in (run / "val_ids.txt").read_text().splitlines() if line.strip()]
    sets = {
        f"SOTS-outdoor-150 val split ({len(val_ids)} scenes, never trained on)": PairedDehazeDataset(
            data / "sots-outdoor-150/hazy", data / "sots-outdoor-150/clear", ids=val_ids, on_error="raise"),
        "Dense-Haze test 51-55 (1600x1200)": PairedDehazeDataset(
            data / "dense-haze-test/hazy", data / "dense-haze-test/clear", on_error="raise"),
        "NH-HAZE test 21-25 (1600x1200)": PairedDehazeDataset(
            data / "nh-haze-test/hazy", data / "nh-haze-test/clear", on_error="raise"),
    }
    proto = get_protocol("ffa")
    models = {"hazy input": None, "DCP": load_dehazer("dcp")[0], "lowcon AECR-Net (shipped)": load_dehazer("shipped")[0]}
    sections = []
    for k, (title, dataset) in enumerate(sets.items()):
        rows, seconds = [], {}
        for label, net in models.items():
            t0 = time.time()
            s = evaluate_dehazer(net or torch.nn.Identity(), dataset, proto.name, size_multiple=4 if "AECR" in label else 1,
                                 identity=net is None, csv_path=out / f"scores_{k}_{label.split()[0].lower()}.csv")
            seconds[label] = time.time() - t0
            rows.append((label, s["psnr"], f"{s['ssim']:.4f}", s["n"]))
        n_show = min(3, len(dataset))
        hazy = [dataset[i]["hazy"] for i in range(n_show)]
        cols = {"hazy": [], "DCP": [], "shipped AECR-Net": [], "clear": []}
        for i in range(n_show):
            cols["hazy"].append(hazy[i])
            cols["DCP"].append(dehaze_tensor(models["DCP"], hazy[i][None], 1)[0])
            cols["shipped AECR-Net"].append(dehaze_tensor(models["lowcon AECR-Net (shipped)"], hazy[i][None], 4)[0])
            cols["clear"].append(dataset[i]["clear"])
        size = tuple(hazy[0].shape[-2:])  # scenes differ in size: show all at the first one's
        same = {n: torch.stack([F.interpolate(t[None], size=size, mode="area")[0] for t in v]) for n, v in cols.items()}
        grid = save_grid(same, out / f"grid_{k}.png", max_side=320)
        table = markdown_table(["method", "PSNR (dB)", "SSIM", "images"], rows)
        sections.append(f"### {title}\n\n{table}\n\n![{title}](shipped/{grid.name})\n")
    log = read_log(run / "log.csv")
    curves = plot_curves(log, ["l1", "total", "val_psnr", "val_ssim"], out / "loss_curves.png", title="shipped AECR-Net training")
    cfg = state["config"]
    text = f"""# The shipped AECR-Net model

`src/lowcon/weights/aecrnet_sots150.pt` ({size_mb:.1f} MB) is what `lowcon dehaze photo.jpg` uses when no
model is given. Its config (`aecrnet_sots150.yaml`) and training log (`aecrnet_sots150.csv`) are beside it.

**What it was trained on, plainly:** {cfg['steps']} steps of `lowcon train` with batch {cfg['batch_size']}
and random {cfg['crop']}x{cfg['crop']} crops (flips, 90-degree rotations) on the SOTS-outdoor-150 pairs of
`../shared/data` minus a validation split of {len(val_ids)} scenes (split by scene ID with
`split_ids(val_fraction={cfg['val_fraction']}, seed={cfg['split_seed']})`; the IDs are in the run's `val_ids.txt`),
on 2 CPU cores. That is about {cfg['steps'] * cfg['batch_size']} crops, against the paper's 500,000 steps of
batch 16 on RESIDE ITS/OTS. Loss: {'L1 only (beta = 0)' if cfg['beta'] == 0 else f"L1 + {cfg['beta']} CR"}; CR needs
ImageNet VGG-19 weights, which cannot be downloaded on the machine that trained it, and a random VGG would
not be the paper's CR, so the CPU budget went to more L1 steps. Adam, lr {cfg['lr']} with cosine decay to 0.
Network: the released AECR-Net (variant `{cfg['variant']}`, shared blocks, Tanh head, 2,614,229 parameters).

It is a small, honest starting point that works offline on any image size; it is far from the paper's
numbers and from a model trained on RESIDE. Train your own with `lowcon train aecrnet --data ...`.

Reproduce: `lowcon train docs/shipped/aecrnet_sots150.yaml` (the config above, with `data` pointing at
SOTS-outdoor-150), then `python benchmarks/shipped_model_report.py --run RUN_DIR`.

Scores: protocol `{proto.name}`: {proto.description}. Measured by `benchmarks/shipped_model_report.py`.

{chr(10).join(sections)}
![training curves](shipped/{curves.name})
"""
    write_text_atomic(docs / "shipped-model.md", text)
    shutil.copy(run / "config.yaml", out / "aecrnet_sots150.yaml")
    print(text)


if __name__ == "__main__":
    main()
