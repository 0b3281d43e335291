"""Whole training epochs on real images: `lowcon train` against the official CUT code's `train.py`.

    python benchmarks/bench_epochs.py --official DIR [--data-a FOLDER --data-b FOLDER] \
        [--methods fastcut,cyclegan] [--epochs 2] [--rounds 2] [--first official] [--out benchmarks/results/epochs.json]

The issue's speed targets time whole epochs of the official code on this CPU (``--gpu_ids -1``).
This script runs both programs as a user runs them, each in its own process, on the same two
folders (by default AFHQ cat -> dog in ``../shared/data/translate/afhq``, 512x512 JPEGs, load 286,
crop 256, flip, batch 1: the presets' data settings on both sides):

- official: ``python train.py --dataroot ROOT --model cut --CUT_mode FastCUT --gpu_ids -1
  --display_id 0 --no_html`` (``--model cycle_gan`` for CycleGAN), all else at its defaults (4
  data-loading workers, its epoch print). Two bugs of the CUT repository stop its ``train.py``
  for CycleGAN at the first step: ``cycle_gan_model.py`` reads ``opt.amp``, which no option
  defines, and its ``data_dependent_initialize()`` takes no data where ``train.py`` passes the
  batch. The launcher here sets ``opt.amp = False`` and lets that method take the batch, then
  runs the unchanged ``train.py`` with ``runpy``. It needs ``dominate`` importable (its
  visualizer imports it even with ``--no_html``).
- lowcon: ``python -m lowcon train METHOD --data ROOT --steps E*N`` (``bf16: true`` too with
  ``--bf16``, lowcon's fastest setting for CycleGAN on a CPU with native bf16), which writes each
  epoch's wall-clock time to ``train.log``.

Each run trains ``--epochs`` E epochs of the preset's schedule; each process is stopped (SIGTERM)
once it has finished its E-th epoch. An epoch's time is the whole epoch (data loading,
steps, the loop's own work): for the official code the time between two of its "End of epoch"
lines, as they arrive; for lowcon the time its ``train.log`` records. The first epoch also
holds each side's first-step set-up (the official ``data_dependent_initialize`` and ``setup``);
it is reported apart, and the ratio is taken over the later epochs. Rounds alternate which side
runs first; each round's ratio is lowcon's mean epoch over the official one's. Peak memory is the
training process's peak resident memory (``VmHWM``) when its last timed epoch ends (the official
code's data-loading workers are processes of their own, not counted).
"""
from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, machine_line, markdown_table, write_results  # noqa: E402

SHARED_AFHQ = HERE.parent.parent / "shared" / "data" / "translate" / "afhq"
OFFICIAL_ARGS = {
    "cut": ["--model", "cut", "--CUT_mode", "CUT"],
    "fastcut": ["--model", "cut", "--CUT_mode", "FastCUT"],
    "cyclegan": ["--model", "cycle_gan"],
}
# Runs the official train.py unchanged, after the two fixes its CycleGAN needs (module docstring).
LAUNCHER = r"""
import runpy, sys
root = sys.argv[1]
sys.argv = [root + "/train.py"] + sys.argv[2:]
sys.path.insert(0, root)
from options.train_options import TrainOptions
parse = TrainOptions.parse
def parse_with_amp(self):
    opt = parse(self)
    if not hasattr(opt, "amp"):
        opt.amp = False
    return opt
TrainOptions.parse = parse_with_amp
from models import cycle_gan_model
cycle_gan_model.CycleGANModel.data_dependent_initialize = lambda self, data=None: None
runpy.run_path(root + "/train.py", run_name="__main__")
"""
END_OF_EPOCH = re.compile(r"End of epoch (\d+) / \d+ \t Time Taken: (\d+) sec")
LOWCON_EPOCH = re.compile(r"epoch (\d+) of \d+: ([0-9.]+) s, ")


def _dataroot(folder_a: Path, folder_b: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench_epochs_data_"))
    (root / "trainA").symlink_to(folder_a.resolve(), target_is_directory=True)
    (root / "trainB").symlink_to(folder_b.resolve(), target_is_directory=True)
    return root


def _peak_gb(pid: int) -> float:
    """The process's peak resident memory so far (``VmHWM``), in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    raise RuntimeError(f"/proc/{pid}/status: no VmHWM")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_official(official: Path, method: str, root: Path, epochs: int, log: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_epochs_official_"))
    cmd = [sys.executable, "-u", "-c", LAUNCHER, str(official), "--dataroot", str(root), "--name", "bench",
           "--checkpoints_dir", str(work), "--gpu_ids", "-1", "--display_id", "0", "--no_html", *OFFICIAL_ARGS[method]]
    started = time.time()
    ends: dict[int, tuple[float, int]] = {}
    peak = None
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=official, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            match = END_OF_EPOCH.search(line)
            if match:
                ends[int(match.group(1))] = (time.time(), int(match.group(2)))
                if len(ends) == epochs:
                    peak = _peak_gb(proc.pid)
                    break
        _stop(proc)
        proc.stdout.close()
    if peak is None:
        raise RuntimeError(f"official {method}: exit {proc.returncode} after {len(ends)} epochs; see {log}")
    arrivals = [ends[e][0] for e in sorted(ends)]
    return {"first_epoch_s": float(ends[min(ends)][1]), "start_to_first_epoch_s": arrivals[0] - started,
            "epochs_s": [b - a for a, b in zip(arrivals, arrivals[1:])], "peak_rss_gb": peak}


def run_lowcon(method: str, root: Path, epochs: int, steps_per_epoch: int, bf16: bool, log: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_epochs_lowcon_")) / "run"
    # one epoch more than timed: the process is stopped as the official one is, after the last timed epoch
    cmd = [sys.executable, "-m", "lowcon", "train", method, "--quiet", "--data", str(root), "--run-dir", str(run_dir),
           "--steps", str((epochs + 1) * steps_per_epoch), "--set", f"bf16={str(bf16).lower()}"]
    times: dict[int, float] = {}
    peak = None
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.1)
            if (run_dir / "train.log").exists():
                text = (run_dir / "train.log").read_text()
                times = {int(m.group(1)): float(m.group(2)) for m in LOWCON_EPOCH.finditer(text)}
                if len(times) >= epochs:
                    peak = _peak_gb(proc.pid)
                    break
        _stop(proc)
    if peak is None:
        raise RuntimeError(f"lowcon {method}: exit {proc.returncode} after {len(times)} epochs; see {log}")
    ordered = [times[e] for e in sorted(times)][:epochs]
    return {"first_epoch_s": ordered[0], "epochs_s": ordered[1:], "peak_rss_gb": peak}


def round_ratio(entry: dict) -> float:
    """lowcon's mean epoch over the official code's, the set-up epochs left out."""
    return statistics.mean(entry["lowcon"]["epochs_s"]) / statistics.mean(entry["official"]["epochs_s"])


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="checkout of taesungp/contrastive-unpaired-translation")
    p.add_argument("--data-a", default=str(SHARED_AFHQ / "cat"))
    p.add_argument("--data-b", default=str(SHARED_AFHQ / "dog"))
    p.add_argument("--methods", default="fastcut,cyclegan", help="comma-separated: cut, fastcut, cyclegan")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (>= 2: the first is reported apart)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--first", default="official", choices=["official", "lowcon"],
                   help="which side runs first in the first round (then they alternate)")
    p.add_argument("--bf16", default="cyclegan", help="methods lowcon runs with bf16: true (comma-separated)")
    p.add_argument("--out", default="benchmarks/results/epochs.json")
    args = p.parse_args(argv)
    official = Path(args.official)
    if not (official / "train.py").is_file():
        p.error(f"--official: {official} has no train.py (a contrastive-unpaired-translation checkout?)")
    folders = [Path(args.data_a), Path(args.data_b)]
    for folder in folders:
        if not folder.is_dir():
            p.error(f"{folder}: no such folder (the default is ../shared/data/translate/afhq)")
    if args.epochs < 2:
        p.error("--epochs: at least 2 (the first epoch holds the set-up and is reported apart)")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in OFFICIAL_ARGS]
    if bad:
        p.error(f"--methods: unknown {bad[0]!r}; choose from {', '.join(OFFICIAL_ARGS)}")
    bf16 = set(args.bf16.split(",")) if args.bf16 else set()

    from lowcon.data.io import list_images

    steps_per_epoch = max(len(list_images(f)) for f in folders)  # both sides: max(|A|, |B|), batch 1
    root = _dataroot(*folders)
    logs = Path(tempfile.mkdtemp(prefix="bench_epochs_logs_"))
    info = machine_info()
    print(machine_line(info), flush=True)
    results: dict = {"machine": info, "data": [str(f) for f in folders], "steps_per_epoch": steps_per_epoch,
                     "epochs": args.epochs, "bf16": sorted(bf16), "runs": {}}
    for method in methods:
        rounds = results["runs"][method] = []
        for r in range(args.rounds):
            entry = {}
            order = ("official", "lowcon") if (r % 2 == 0) == (args.first == "official") else ("lowcon", "official")
            for side in order:
                log = logs / f"{method}_{side}_{r}.log"
                print(f"{method} round {r + 1}/{args.rounds}: {side} ({args.epochs} epochs of {steps_per_epoch} steps) ...",
                      flush=True)
                entry[side] = (run_official(official, method, root, args.epochs, log) if side == "official" else
                               run_lowcon(method, root, args.epochs, steps_per_epoch, method in bf16, log))
                print(f"  epochs {', '.join(f'{s:.1f}' for s in [entry[side]['first_epoch_s'], *entry[side]['epochs_s']])} s, "
                      f"peak {entry[side]['peak_rss_gb']:.2f} GB", flush=True)
            entry["ratio"] = round_ratio(entry)
            print(f"  ratio (epochs after the first) {entry['ratio']:.3f}", flush=True)
            rounds.append(entry)
    write_results(args.out, results, report(results))
    return results


def _shown(path: str) -> str:
    """`path` relative to the repository's parent folder where it lies there (../shared/...)."""
    try:
        return "../" + str(Path(path).resolve().relative_to(HERE.parent.parent.resolve()))
    except ValueError:
        return path


def report(results: dict) -> str:
    rows = []
    for method, rounds in results["runs"].items():
        def epochs(side: str) -> list[float]:
            return [s for entry in rounds for s in entry[side]["epochs_s"]]

        lowcon, official = epochs("lowcon"), epochs("official")
        ratios = [entry["ratio"] for entry in rounds]
        first = [entry["lowcon"]["first_epoch_s"] / entry["official"]["first_epoch_s"] for entry in rounds]
        peaks = [entry["lowcon"]["peak_rss_gb"] / entry["official"]["peak_rss_gb"] for entry in rounds]
        peak_gb = [max(entry[side]["peak_rss_gb"] for entry in rounds) for side in ("lowcon", "official")]
        n = results["steps_per_epoch"]
        rows.append([
            method + (" (bf16)" if method in results["bf16"] else ""),
            f"{statistics.median(lowcon):.1f} ({statistics.median(lowcon) / n:.2f})",
            f"{statistics.median(official):.1f} ({statistics.median(official) / n:.2f})",
            ", ".join(f"{x:.3f}" for x in ratios),
            ", ".join(f"{x:.2f}" for x in first),
            f"{peak_gb[0]:.2f} / {peak_gb[1]:.2f}",
            ", ".join(f"{x:.2f}" for x in peaks),
        ])
    head = ["method", "lowcon epoch s (s/step)", "official epoch s (s/step)", "epoch time ratio per round",
            "first epoch ratio", "peak GB, lowcon / official", "peak memory ratio per round"]
    return "\n".join([
        "# Whole epochs: lowcon train against the official train.py", "",
        machine_line(results["machine"]), "",
        f"Data: {' -> '.join(_shown(d) for d in results['data'])}, {results['steps_per_epoch']} steps per epoch, "
        f"{results['epochs']} epochs per run; times are medians of the epochs after the first.", "",
        markdown_table(head, rows), "",
    ])


if __name__ == "__main__":
    main()
