"""``lowcon`` command line: train, eval, dehaze, translate, synth-haze, demo, presets."""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

__all__ = ["main"]

DEHAZE_METHODS = ("aecrnet",)
TRANSLATION_METHODS = ("cut", "fastcut", "sincut", "cyclegan")


def _config_class(method: str):
    if method in DEHAZE_METHODS:
        from .dehazing import DehazeConfig

        return DehazeConfig
    if method in TRANSLATION_METHODS:
        from .translation import TranslationConfig

        return TranslationConfig
    valid = ", ".join(DEHAZE_METHODS + TRANSLATION_METHODS)
    raise ValueError(f"method: {method!r} is not a lowcon method; valid: {valid}")


def _restart(args, *, malloc_tcache: bool, brief_openmp_spin: bool) -> None:
    """Run this same command again with the settings glibc and OpenMP read only when a process
    starts (:func:`lowcon.training.memory.restart_with_process_settings`): glibc's tcache off
    unless `malloc_tcache`; with `brief_openmp_spin`, OpenMP's idle threads spinning briefly, so
    that the translation networks' NNPACK layers serve (config key ``nnpack``). Only from a real
    command line, and before anything is written."""
    if getattr(args, "restartable", False):
        from .training.memory import restart_with_process_settings

        restart_with_process_settings([sys.executable, "-m", "lowcon", *args.argv], malloc_tcache=malloc_tcache,
                                      brief_openmp_spin=brief_openmp_spin)


def _resumed_config_path(path: Path, method: str, cls, overrides: dict) -> Path:
    """For ``--resume``: the run folder's own ``config.yaml`` (what the run was trained with,
    ``--set`` overrides included), when there is one and it is a run of `method`; else `path`.
    A run whose ``config.yaml`` was deleted gets it back from its ``last.pt``, which holds it."""
    from .config import atomic_write_text, load_config, read_yaml

    run_dir = Path(load_config(cls, path, overrides).run_dir)
    saved = run_dir / "config.yaml"
    checkpoint = run_dir / "last.pt"
    if not saved.is_file() and checkpoint.is_file():
        import yaml

        from .training import load_checkpoint

        config = load_checkpoint(checkpoint).get("config")
        if isinstance(config, dict) and config:
            atomic_write_text(saved, yaml.safe_dump(config, sort_keys=False))
            print(f"{saved}: missing; written again from {checkpoint}", file=sys.stderr)
    if not saved.is_file():
        return path
    saved_method = read_yaml(saved).get("method", "aecrnet")
    if saved_method != method:
        raise ValueError(f"{run_dir}: a {saved_method!r} run, resumed as {method!r}")
    return saved


def cmd_train(args) -> int:
    from .config import load_config, parse_overrides, preset_path, read_yaml

    path = preset_path(args.config)
    overrides = parse_overrides(args.set or [])
    for key in ("data", "run_dir", "steps", "device"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if ("dir_a" in overrides or "dir_b" in overrides) and "data" not in overrides:
        overrides["data"] = None  # two domain folders replace the preset's data root
    method = overrides.get("method") or read_yaml(path).get("method", "aecrnet")
    cls = _config_class(method)
    if "steps" in overrides and method in TRANSLATION_METHODS:
        overrides["max_steps"] = overrides.pop("steps")  # translation counts epochs; --steps caps them
    if args.resume:
        path = _resumed_config_path(path, method, cls, overrides)
    cfg = load_config(cls, path, overrides)
    _restart(args, malloc_tcache=cfg.malloc_tcache, brief_openmp_spin=bool(getattr(cfg, "nnpack", False)))
    from . import distributed

    if method in DEHAZE_METHODS:
        from .dehazing import train_dehaze

        run_dir = train_dehaze(cfg, resume=args.resume, progress=not args.quiet)
    else:
        from .translation import train_translation

        run_dir = train_translation(cfg, resume=args.resume, progress=not args.quiet)
    if not distributed.is_main():
        return 0
    run_dir = Path(run_dir)
    found = [name for name in ("last.pt", "best.pt", "log.csv", "curves.png", "config.yaml", "train.log", "epochs/",
                                "samples/")
             if (run_dir / name.rstrip("/")).exists()]
    print(f"run folder: {run_dir} ({', '.join(found)})")
    return 0


def cmd_eval(args) -> int:
    if args.run:
        from .translation import evaluate_run

        if not (args.real and args.test):
            raise ValueError("eval --run: also give --real (target-domain images) and --test (source images)")
        _restart(args, malloc_tcache=True, brief_openmp_spin=True)
        result = evaluate_run(args.run, args.real, args.test, inception_weights=args.inception_weights, device=args.device,
                              allow_download=args.download_inception, size=args.size, on_error=args.on_error)
        for key in ("best", "last"):
            if key in result:
                print(f"{key} epoch: {result[key]}")
        return 0
    if not args.data:
        raise ValueError("eval: give --data DIR (with hazy/ and clear/) or --run RUN for translation")
    from .data.paired import PairedDehazeDataset
    from .dehazing import evaluate_dehazer, load_dehazer

    root = Path(args.data)
    ids = None
    if args.ids:
        ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
    dataset = PairedDehazeDataset(root / "hazy", root / "clear", layout=args.layout, on_error="raise", ids=ids)
    out = Path(args.out) if args.out else None
    results = []
    for source in args.model:
        if source == "hazy":
            import torch

            net, multiple, label = torch.nn.Identity(), 1, "hazy input (do nothing)"
        else:
            net, multiple, label = load_dehazer(source, args.device)
        csv_path = out / f"scores_{Path(source).stem}.csv" if out else None
        s = evaluate_dehazer(net, dataset, args.protocol, multiple, csv_path=csv_path, tile=args.tile,
                             progress=not args.quiet, identity=source == "hazy")
        results.append((label, s))
        print(f"{label}: PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  on {s['n']} images of {root}  [protocol {s['protocol']}]")
    if out:
        from .report import markdown_table, write_text_atomic
        from .metrics.protocols import get_protocol

        proto = get_protocol(args.protocol)
        table = markdown_table(["method", "PSNR (dB)", "SSIM", "images"],
                               [(lab, s["psnr"], f"{s['ssim']:.4f}", s["n"]) for lab, s in results])
        write_text_atomic(out / "summary.md", f"# {root}\n\nProtocol `{proto.name}`: {proto.description}\n\n{table}\n")
        print(f"per-image CSV and summary.md in {out}")
    return 0


def _check_written(written: list, args) -> None:
    """A command asked to write images that wrote none has failed (every input was skipped), unless
    it was asked to keep the outputs that were there (``--skip-existing``)."""
    inputs = args.inputs
    if not written and args.existing != "skip":
        raise ValueError(f"{' '.join(map(str, inputs))}: no image written: no readable image among the inputs "
                         "(each skipped file was named above)")


def cmd_dehaze(args) -> int:
    from .dehazing import dehaze_paths

    source = "dcp" if args.method == "dcp" else args.model
    written = dehaze_paths(args.inputs, args.output, source=source, device=args.device, batch_size=args.batch_size,
                           tile=args.tile, on_error=args.on_error, progress=not args.quiet, existing=args.existing)
    _check_written(written, args)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0


def cmd_translate(args) -> int:
    from .translation import translate_paths

    _restart(args, malloc_tcache=True, brief_openmp_spin=True)
    written = translate_paths(args.inputs, args.output, args.checkpoint, device=args.device,
                              batch_size=args.batch_size, direction=args.direction, on_error=args.on_error,
                              progress=not args.quiet, existing=args.existing)
    _check_written(written, args)
    print(f"wrote {len(written)} image(s) to {args.output}")
    return 0


def cmd_synth_haze(args) -> int:
    from .data.haze import synthesize_haze_folder

    written = synthesize_haze_folder(args.clear_dir, args.output, setting=args.setting, per_image=args.per_image,
                                     depth_dir=args.depth, disparity_dir=args.disparity, seed=args.seed)
    print(f"wrote {len(written)} hazy image(s) to {Path(args.output) / 'hazy'} (clear images in {Path(args.output) / 'clear'})")
    return 0


def cmd_demo(args) -> int:
    if args.task == "dehaze":
        from .demo_dehaze import demo_dehaze

        report = demo_dehaze(args.out or "runs/demo-dehaze", minutes=args.minutes, progress=not args.quiet)
    else:
        from .translation import demo_translation

        _restart(args, malloc_tcache=True, brief_openmp_spin=True)
        report = demo_translation(args.out or "runs/demo-translate", minutes=args.minutes, progress=not args.quiet)
    print(Path(report).read_text())
    print(f"report: {report}")
    return 0


def cmd_export(args) -> int:
    from .training import load_checkpoint, save_checkpoint

    state = load_checkpoint(args.checkpoint)
    slim = {k: state[k] for k in ("method", "step", "config", "model") if k in state}
    out = save_checkpoint(args.output, slim)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: weights and config, no optimiser state)")
    return 0


def cmd_presets(args) -> int:
    from .config import PRESET_DIR, list_presets

    for name in list_presets():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:24s} {first}")
    return 0


_DEVICE_HELP = "cpu, cuda, cuda:N or auto"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default after its help where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return action.help or ""
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{action.help} (default: {shown.replace('%', '%%')})"


def _command(sub, name: str, summary: str, examples: str, parents) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with `summary` and ends with `examples`."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog="examples:\n" + examples, formatter_class=_HelpFormatter, parents=parents)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowcon", description="Contrastive learning for low-level vision.",
                                epilog="`lowcon COMMAND --help` explains each command, with examples.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # also after the command (`lowcon train cut --quiet`); unset there, it keeps the value above
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    # what dehaze and translate share: image files in, one PNG each out
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("-o", "--output", required=True, help="output folder (one PNG per input)")
    images.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    images.add_argument("--batch-size", type=int, default=1, dest="batch_size", help="images of one size per batch")
    images.add_argument("--on-error", default="skip", choices=["skip", "raise"], dest="on_error",
                        help="an unreadable image: report it in one line and go on, or stop")
    there = images.add_mutually_exclusive_group()
    there.add_argument("--overwrite", dest="existing", action="store_const", const="overwrite", default="error",
                       help="replace outputs that exist already (without it such an output is an error, "
                            "before anything is written)")
    there.add_argument("--skip-existing", dest="existing", action="store_const", const="skip",
                       help="keep outputs that exist already and write the others (go on after a stop)")
    sub = p.add_subparsers(dest="command", required=True)

    t = _command(sub, "train", "train a preset or config file (see `lowcon presets`)", """\
  lowcon train aecrnet --data datasets/RESIDE/ITS --set batch_size=8
  lowcon train cut --set dir_a=photos/cats --set dir_b=photos/dogs --run-dir runs/c2d
  lowcon train cut --run-dir runs/c2d --resume
  torchrun --nproc_per_node 4 -m lowcon train cut --data datasets/horse2zebra --set batch_size=4
""", [quiet])
    t.add_argument("config", help="preset name (aecrnet, cut, fastcut, sincut, cyclegan, ...) or a YAML file")
    t.add_argument("--data", help="data folder (overrides the config's `data`)")
    t.add_argument("--run-dir", dest="run_dir", help="run folder for checkpoints, logs and samples "
                                                     "(overrides the config's `run_dir`)")
    t.add_argument("--steps", type=int, help="stop after this many optimisation steps; the learning-rate "
                                             "schedule still follows the config's epochs")
    t.add_argument("--device", help=f"{_DEVICE_HELP} (overrides the config's `device`)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its last.pt, with its own config.yaml")
    t.set_defaults(func=cmd_train)

    e = _command(sub, "eval", "PSNR/SSIM of dehazers on paired images, or FID/KID of a translation run", """\
  lowcon eval --data ../shared/data/dehaze/nh-haze-test --model hazy dcp shipped --out scores/
  lowcon eval --data datasets/SOTS/outdoor --model runs/aecrnet/best.pt --protocol ffa
  lowcon eval --run runs/h2z --real datasets/horse2zebra/testB --test datasets/horse2zebra/testA \\
      --inception-weights pt_inception-2015-12-05-6726825d.pth
""", [quiet])
    dehazing = e.add_argument_group("dehazing (PSNR/SSIM)")
    dehazing.add_argument("--data", help="folder with hazy/ and clear/")
    dehazing.add_argument("--model", nargs="+", default=["shipped"],
                          help="what to score: shipped, dcp, hazy (the input itself) or checkpoint paths")
    dehazing.add_argument("--layout", default="auto", choices=["auto", "reside", "same-name"],
                          help="how hazy files find their clear image: RESIDE's ID_A_BETA names or the same name")
    dehazing.add_argument("--ids", help="file of scene IDs to score, one per line (e.g. a run's val_ids.txt)")
    dehazing.add_argument("--protocol", default="ffa",
                          help="ffa, skimage, y or dehazeformer: how PSNR and SSIM are computed (README)")
    dehazing.add_argument("--out", help="folder for per-image CSVs and summary.md")
    dehazing.add_argument("--tile", type=int, default=0, help="dehaze in overlapping tiles of this side (0: whole images)")
    e.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    translation = e.add_argument_group("translation (FID/KID over a run's saved epochs)")
    translation.add_argument("--run", help="translation run folder")
    translation.add_argument("--real", help="target-domain images (e.g. testB)")
    translation.add_argument("--test", help="source images to translate (e.g. testA)")
    translation.add_argument("--inception-weights", dest="inception_weights",
                             help="local file of torch-fidelity's Inception weights (pt_inception-2015-12-05)")
    translation.add_argument("--download-inception", dest="download_inception", action="store_true",
                             help="with no local Inception file, download torch-fidelity's into its cache "
                                  "(needs internet)")
    translation.add_argument("--on-error", default="skip", choices=["skip", "raise"], dest="on_error",
                             help="an unreadable image in --real or --test: report it in one line and leave it "
                                  "out, or stop")
    translation.add_argument("--size", type=int, default=None,
                             help="resize the test and real images to SIZE x SIZE first (default: the run's "
                                  "crop_size, as the official test; SinCUT: whole images; 0: their own sizes)")
    e.set_defaults(func=cmd_eval)

    d = _command(sub, "dehaze", "dehaze image files and folders (any size), writing PNGs", """\
  lowcon dehaze photo.jpg hazy_folder/ -o dehazed/
  lowcon dehaze photo.jpg -o dehazed/ --method dcp
  lowcon dehaze hazy_folder/ -o dehazed/ --model runs/aecrnet/best.pt --device cuda
""", [quiet, images])
    d.add_argument("inputs", nargs="+", help="image files and folders")
    d.add_argument("--model", default="shipped", help="shipped or a checkpoint path")
    d.add_argument("--method", default="aecrnet", choices=["aecrnet", "dcp"],
                   help="aecrnet (the --model network) or dcp (the Dark Channel Prior)")
    d.add_argument("--tile", type=int, default=0,
                   help="overlapping tiles of this side (0: tiles of 1024 above 4 megapixels only)")
    d.set_defaults(func=cmd_dehaze)

    tr = _command(sub, "translate", "translate image files and folders with a CUT, FastCUT, SinCUT or CycleGAN "
                                    "checkpoint, writing PNGs at the inputs' sizes", """\
  lowcon translate photos/ -o out/ --checkpoint runs/cut/last.pt
  lowcon translate zebra.jpg -o out/ --checkpoint runs/cyclegan --direction BtoA
  lowcon translate testA/ -o out/ --checkpoint runs/cut/epochs/epoch_200.pt --batch-size 4 --device cuda
""", [quiet, images])
    tr.add_argument("inputs", nargs="+", help="image files and folders (any size; grey and RGBA are read as RGB)")
    tr.add_argument("--checkpoint", required=True, help="a run's last.pt or epochs/epoch_XXX.pt, or a run folder")
    tr.add_argument("--direction", default="AtoB", choices=["AtoB", "BtoA"],
                    help="BtoA: CycleGAN's reverse generator")
    tr.set_defaults(func=cmd_translate)

    s = _command(sub, "synth-haze", "make a paired hazy/clear set from clear images (atmospheric scattering model)",
                 """\
  lowcon synth-haze clear_photos/ -o my_set --setting ots --per-image 3
  lowcon synth-haze nyu/rgb/ -o my_its --setting its --depth nyu/depth/
""", [quiet])
    s.add_argument("clear_dir", help="folder of clear images")
    s.add_argument("-o", "--output", required=True, help="output folder: writes hazy/ and clear/ in RESIDE's naming")
    s.add_argument("--setting", default="ots", choices=["ots", "its"],
                   help="RESIDE's ranges of airlight A and scattering beta: outdoor (ots) or indoor (its)")
    s.add_argument("--per-image", type=int, default=1, dest="per_image", help="hazy versions of each clear image")
    s.add_argument("--depth", help="folder of depth maps (.npy or 16-bit PNG, same stem)")
    s.add_argument("--disparity", help="folder of disparity maps (same stem)")
    s.add_argument("--seed", type=int, default=0, help="each image's draws depend on this seed and its name only")
    s.set_defaults(func=cmd_synth_haze)

    m = _command(sub, "demo", "the embedded-data demos: dehaze (AECR-Net + CR) or translate (CUT and FastCUT)",
                 """\
  lowcon demo                      # what `make demo` runs
  lowcon demo translate --minutes 10
""", [quiet])
    m.add_argument("task", nargs="?", default="dehaze", choices=["dehaze", "translate"], help="which demo")
    m.add_argument("--out", help="report folder (default: runs/demo-dehaze or runs/demo-translate)")
    m.add_argument("--minutes", type=float, default=3.0, help="training time, about")
    m.set_defaults(func=cmd_demo)

    x = _command(sub, "export", "strip a run checkpoint to weights + config for inference", """\
  lowcon export runs/aecrnet/best.pt -o aecrnet_weights.pt
""", [quiet])
    x.add_argument("checkpoint", help="a run's checkpoint (last.pt, best.pt, epochs/...)")
    x.add_argument("-o", "--output", required=True, help="file to write")
    x.set_defaults(func=cmd_export)

    pr = _command(sub, "presets", "list the shipped config presets", "  lowcon presets\n", [quiet])
    pr.set_defaults(func=cmd_presets)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """lowcon's own warnings (a skipped image, a collapse) as one line; others as Python shows them."""
    if category.__module__.startswith("lowcon"):
        return f"lowcon: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on lines of its own while a progress bar is drawn (tqdm clears the bar first)."""
    from tqdm import tqdm

    text = warnings.formatwarning(message, category, filename, lineno, line)
    tqdm.write(text.rstrip("\n"), file=file or sys.stderr)


def main(argv=None) -> int:
    try:  # `import lowcon.cli` leaves torch unimported: a Ctrl-C during its import lands here too
        return _run(argv)
    except KeyboardInterrupt:
        print("lowcon: interrupted", file=sys.stderr)
        return 130


def _run(argv) -> int:
    args = build_parser().parse_args(argv)
    # Only a real command line may be started again (lowcon.training.memory); not a caller's process.
    args.restartable, args.argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError, first_line
    from .contrast.embeddings import WeightsNotFoundError
    from .training import CheckpointError, Terminated, TrainingDiverged

    def terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C: temporary files are removed
        raise Terminated("SIGTERM")

    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    previous_show, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        previous_term = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        previous_term = None
    try:
        from .training.memory import release_held_signals, restarted

        if restarted():  # signals were held across the restart (lowcon.training.memory): take them
            import torch  # noqa: F401  (after the heaviest import, which a KeyboardInterrupt could break)

            release_held_signals()
        return args.func(args)
    except (ConfigError, CheckpointError, WeightsNotFoundError, TrainingDiverged, ValueError, OSError,
            ImportError) as err:  # OSError: a missing file, a file where a folder goes, no permission
        print(f"lowcon: error: {first_line(err)}", file=sys.stderr)
        return 2
    except Terminated:
        print("lowcon: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        warnings.formatwarning, warnings.showwarning = previous_format, previous_show
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
