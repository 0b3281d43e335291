"""The dehazing pipeline behind ``lowcon train / eval / dehaze`` for AECR-Net and DCP."""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed
from .baselines.dcp import DarkChannelPrior
from .config import first_line, save_config, to_dict
from .contrast import ContrastiveRegularization, CRSampler, VGG19Features
from .data.io import plan_outputs, same_size_batches, write_image
from .data.paired import PairedDehazeDataset, scene_ids, split_ids
from .inference import auto_device, run_padded, run_tiled
from .methods.aecr import AECRTraining
from .metrics.protocols import DEFAULT_PROTOCOL, get_protocol
from .models.aecrnet import AECRNET_VARIANTS, AECRNet, build_aecrnet
from .models.winograd import set_band_size, use_winograd
from .report import write_text_atomic
from .training import Trainer, load_checkpoint
from .training.memory import check_allocator_settings, configure_allocator

__all__ = [
    "DehazeConfig", "build_dehaze_method", "train_dehaze", "load_dehazer", "dehaze_tensor",
    "evaluate_dehazer", "dehaze_paths", "SHIPPED_MODEL",
]

SHIPPED_MODEL = Path(__file__).parent / "weights" / "aecrnet_sots150.pt"


@dataclass
class DehazeConfig:
    """Everything an AECR-Net run needs; the presets in lowcon/configs are files of these keys."""

    method: Literal["aecrnet"] = "aecrnet"
    # data: a folder with hazy/ and clear/ (RESIDE, Dense-Haze/NH-HAZE or any pair of folders)
    data: str = "datasets/RESIDE/ITS"
    layout: Literal["auto", "reside", "same-name"] = "auto"
    val_data: str = ""  # a separate validation folder; empty = split `data` by scene ID
    val_fraction: float = 0.1
    split_seed: int = 0
    val_max_images: int = 20
    crop: int = 240
    batch_size: int = 16
    num_workers: int = 0
    on_error: Literal["skip", "raise"] = "skip"
    # network (Table 2 rows are variants; CR rows are loss settings below)
    variant: str = "dfe_mixup"
    share_blocks: bool = True
    output: Literal["tanh", "sigmoid", "clamp"] = "tanh"
    use_fastdeconv: bool = True
    ngf: int = 64
    dcn_impl: Literal["auto", "sampled", "torchvision"] = "auto"
    # activation checkpointing in the network and the CR's VGG: less memory, a little more time
    activation_checkpointing: bool = False
    # CPU memory: allocations of at least this many MB get their own mapping, freed at once
    # (glibc; 0 = glibc's default). Lowers the peak by the heap's holes, costs page faults.
    heap_mmap_threshold_mb: float = 0
    # CPU time: keep freed memory in the process instead of faulting it in again next step
    # (glibc). Off here: AECR-Net's step takes few faults, and its peak rose with it.
    retain_freed_memory: bool = False
    # CPU memory: Winograd transforms large maps in bands of at most this many MB of transformed
    # tiles (scratch of one call, freed after it); at 240x240 crops 4 and 16 gave the same peak
    winograd_band_mb: float = 16
    # CPU memory: glibc's per-thread cache of freed small blocks keeps the heap's holes from merging;
    # false turns it off (lowcon train restarts itself with GLIBC_TUNABLES)
    malloc_tcache: bool = False
    # CPU time: 3x3 convolutions of >= 128 channels (the FA blocks, VGG-19 from conv2_2 on) by
    # Winograd F(4x4, 3x3) (lowcon.models.winograd): the same function to ~1e-5 relative, faster
    winograd: bool = True
    # loss: L1 + beta * CR
    beta: float = 0.1
    cr_negatives: bool = True
    num_positives: int = 1
    num_negatives: int = 1
    negative_mode: Literal["others", "flip"] = "others"
    cr_reduction: Literal["mean", "sum"] = "mean"
    layer_weights: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    vgg_weights: str = "imagenet"
    vgg_normalize: bool = False
    # optimisation
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    steps: int = 500_000
    seed: int = 0
    # loop
    run_dir: str = "runs/aecrnet"
    log_every: int = 50
    val_every: int = 5000
    checkpoint_every: int = 1000
    sample_every: int = 5000
    tensorboard: bool = False
    protocol: str = DEFAULT_PROTOCOL
    # speed
    device: str = "auto"
    channels_last: bool = False
    bf16: bool = False

    def validate(self) -> None:
        if self.variant not in AECRNET_VARIANTS:
            raise ValueError(f"variant: {self.variant!r}; valid: {', '.join(AECRNET_VARIANTS)}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")
        if self.beta > 0 and len(self.layer_weights) != 5:
            raise ValueError(f"layer_weights: the AECR VGG layers need 5 weights, got {len(self.layer_weights)}")
        for name in ("crop", "batch_size", "steps", "num_positives"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.crop % 4:
            raise ValueError(f"crop: must be a multiple of 4 (the network downsamples 4x), got {self.crop}")
        check_allocator_settings(self.heap_mmap_threshold_mb, self.retain_freed_memory)
        if not self.winograd_band_mb > 0:
            raise ValueError(f"winograd_band_mb: must be > 0, got {self.winograd_band_mb}")
        needed = max(self.num_positives, self.num_negatives)
        if needed > self.batch_size:
            raise ValueError(f"num_negatives/num_positives: {needed} samples per anchor need batch_size >= {needed}")
        get_protocol(self.protocol)


# With `activation_checkpointing`, the VGG slices up to relu3_1 (the full- and half-resolution layers, most of
# the anchor's activations) are recomputed in backward; the deeper ones are cheap to keep.
CHECKPOINT_VGG_SLICES = 3


def build_network(cfg: DehazeConfig) -> AECRNet:
    net = build_aecrnet(
        cfg.variant, share_blocks=cfg.share_blocks, output=cfg.output,
        use_fastdeconv=cfg.use_fastdeconv, ngf=cfg.ngf, dcn_impl=cfg.dcn_impl,
        checkpoint_blocks=cfg.activation_checkpointing,
    )
    if cfg.winograd:
        # without NNPACK: an in-process A/B of AECR-Net's training step gave no clear gain
        # (benchmarks/README.md)
        use_winograd(net)
    return net


def build_dehaze_method(cfg: DehazeConfig, device: Optional[torch.device] = None) -> AECRTraining:
    device = device or auto_device(cfg.device)
    if device.type == "cuda":  # fixed-size crops: cuDNN's autotuner, as the official train_aecrnet.py
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    net = build_network(cfg).to(device)
    cr = None
    if cfg.beta > 0:
        vgg = VGG19Features(weights=cfg.vgg_weights, normalize_input=cfg.vgg_normalize,
                            checkpoint_slices=CHECKPOINT_VGG_SLICES if cfg.activation_checkpointing else 0).to(device)
        if cfg.winograd:
            use_winograd(vgg)
        cr = ContrastiveRegularization(
            vgg, layer_weights=cfg.layer_weights, use_negatives=cfg.cr_negatives, reduction=cfg.cr_reduction
        )
    sampler = CRSampler(cfg.num_positives, cfg.num_negatives if cfg.cr_negatives else 0, cfg.negative_mode)
    return AECRTraining(
        net, cr, sampler, beta=cfg.beta, lr=cfg.lr, betas=cfg.betas, total_steps=cfg.steps,
        channels_last=cfg.channels_last, autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
    )


def _datasets(cfg: DehazeConfig):
    root = Path(cfg.data)
    hazy_dir, clear_dir = root / "hazy", root / "clear"
    for folder in (hazy_dir, clear_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (data must hold hazy/ and clear/)")
    if cfg.val_data:
        train = PairedDehazeDataset(hazy_dir, clear_dir, cfg.layout, crop=cfg.crop, augment=True,
                                    on_error=cfg.on_error, seed=cfg.seed)
        val_root = Path(cfg.val_data)
        val = PairedDehazeDataset(val_root / "hazy", val_root / "clear", cfg.layout, on_error=cfg.on_error)
        return train, val
    ids = scene_ids(hazy_dir, cfg.layout, clear_dir=clear_dir)
    train_ids, val_ids = split_ids(ids, cfg.val_fraction, cfg.split_seed)
    train = PairedDehazeDataset(hazy_dir, clear_dir, cfg.layout, crop=cfg.crop, augment=True,
                                on_error=cfg.on_error, ids=train_ids, seed=cfg.seed)
    val = PairedDehazeDataset(hazy_dir, clear_dir, cfg.layout, on_error=cfg.on_error, ids=val_ids) if val_ids else None
    return train, val


def train_dehaze(cfg: DehazeConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train AECR-Net (or a Table 2 / Table 4 variant) as configured; returns the run folder.

    Started by ``torchrun --nproc_per_node N``, the N processes train as one run with the whole
    batch ``batch_size`` split among them (:mod:`lowcon.distributed`); process 0 writes
    the files and validates."""
    run_dir = Path(cfg.run_dir)
    distributed.share_of(cfg.batch_size, distributed.launched_processes())  # before anything is started
    if resume and not (run_dir / "last.pt").is_file():
        raise FileNotFoundError(f"{run_dir / 'last.pt'}: nothing to resume (train without --resume first)")
    configure_allocator(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)
    set_band_size(cfg.winograd_band_mb)
    train_set, val_set = _datasets(cfg)
    device = distributed.setup(auto_device(cfg.device))
    main = distributed.is_main()
    method = build_dehaze_method(cfg, device)
    protocol = get_protocol(cfg.protocol)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if val_set is not None and main:
        # The validation scene IDs, one per line: `lowcon eval --ids val_ids.txt` scores the same split.
        ids = sorted(set(getattr(val_set, "scene_ids", [])))
        write_text_atomic(run_dir / "val_ids.txt", "".join(f"{i}\n" for i in ids))

    def validate(m: AECRTraining) -> dict:
        if val_set is None:
            return {}
        scores = evaluate_dehazer(m.net, val_set, protocol.name, size_multiple=4, max_images=cfg.val_max_images)
        return {"psnr": scores["psnr"], "ssim": scores["ssim"]}

    sample = next(iter(DataLoader(val_set, batch_size=1))) if val_set is not None and main else None
    trainer = Trainer(
        method, train_set, run_dir, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.num_workers, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        sample_every=cfg.sample_every, val_every=cfg.val_every if val_set is not None else 0,
        validate=validate, best_metric="psnr", config=to_dict(cfg), tensorboard=cfg.tensorboard,
        progress=progress, sample_batch=sample,
    )
    with distributed.leaving():
        trainer.fit(resume=resume)
    return run_dir


# -- inference ---------------------------------------------------------------------------
def load_dehazer(source: str = "shipped", device: str = "cpu") -> tuple[nn.Module, int, str]:
    """A ready dehazer: ``"shipped"`` (the model inside the package), ``"dcp"``, or a checkpoint.

    Returns (module in eval mode, size multiple, description).
    """
    dev = auto_device(device)
    if source == "dcp":
        return DarkChannelPrior().to(dev).eval(), 1, "Dark Channel Prior (He et al.)"
    path = SHIPPED_MODEL if source == "shipped" else Path(source)
    if source == "shipped" and not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped AECR-Net model is missing from this install")
    state = load_checkpoint(path, method="aecrnet")
    cfg_dict = {k: v for k, v in state.get("config", {}).items() if k in {f.name for f in dataclasses.fields(DehazeConfig)}}
    from .config import from_dict

    cfg = from_dict(DehazeConfig, cfg_dict, str(path))
    net = build_network(cfg)
    weights = state["model"]["net"] if "model" in state else state["net"]
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the network of its config ({first_line(err)})") from None
    return net.to(dev).eval(), net.size_multiple, f"AECR-Net ({path.name}, variant {cfg.variant})"


@torch.no_grad()
def dehaze_tensor(net: nn.Module, hazy: torch.Tensor, size_multiple: int = 4, tile: int = 0, overlap: int = 32) -> torch.Tensor:
    """Dehaze (B, 3, H, W) images in [0, 1] of any size; output clamped to [0, 1]."""
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else hazy.device
    hazy = hazy.to(device)
    if tile:
        out = run_tiled(net, hazy, tile=tile, overlap=overlap, multiple=size_multiple)
    else:
        out = run_padded(net, hazy, size_multiple)
    return out.float().clamp(0, 1)


def evaluate_dehazer(
    net: nn.Module, dataset, protocol: str = DEFAULT_PROTOCOL, size_multiple: int = 4,
    max_images: int = 0, csv_path: Optional[Path] = None, tile: int = 0,
    progress: bool = False, identity: bool = False,
) -> dict:
    """PSNR / SSIM of `net` on a paired dataset under a named protocol.

    With ``identity=True`` the hazy input itself is scored (the "do nothing" baseline).
    Returns the means and a per-image list; writes the per-image CSV when asked.
    """
    proto = get_protocol(protocol)
    was_training = getattr(net, "training", False)
    if isinstance(net, nn.Module):
        net.eval()
    rows = []
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    from tqdm.auto import tqdm

    for i in tqdm(range(n), disable=not progress, desc=f"eval [{proto.name}]", unit="img"):
        item = dataset[i]
        hazy, clear = item["hazy"][None], item["clear"][None]
        out = hazy if identity else dehaze_tensor(net, hazy, size_multiple, tile).cpu()
        scores = proto.evaluate(out, clear)
        rows.append({"name": item["name"], "psnr": float(scores["psnr"][0]), "ssim": float(scores["ssim"][0])})
    if isinstance(net, nn.Module):
        net.train(was_training)
    summary = {
        "protocol": proto.name,
        "n": len(rows),
        "psnr": sum(r["psnr"] for r in rows) / max(1, len(rows)),
        "ssim": sum(r["ssim"] for r in rows) / max(1, len(rows)),
        "per_image": rows,
    }
    if csv_path is not None:
        write_scores_csv(csv_path, rows, proto.name)
    return summary


def write_scores_csv(path: Path, rows: Sequence[dict], protocol: str) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", "psnr", "ssim", "protocol"])
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r[k] for k in ("name", "psnr", "ssim")}, "protocol": protocol})
    write_text_atomic(path, buf.getvalue())


def dehaze_paths(
    inputs: Sequence[str], out_dir: str | Path, source: str = "shipped", device: str = "cpu",
    batch_size: int = 1, tile: int = 0, max_pixels: int = 4_000_000, on_error: str = "skip",
    progress: bool = True, existing: str = "error",
) -> list[Path]:
    """Dehaze image files and folders into `out_dir` (PNG, same stem, atomic writes).

    Images above `max_pixels` are processed in overlapping tiles so they fit in memory.
    Images of equal size are batched `batch_size` at a time. Inputs and outputs are planned and
    checked before anything runs (:func:`lowcon.data.io.plan_outputs`): inputs sharing a stem
    get distinct names, an unreadable or missing input is reported and skipped or raised
    (`on_error`), and an output that is there already is an error, replaced or kept (`existing`).
    """
    plan = plan_outputs(inputs, out_dir, on_error, existing)
    if not plan:
        return []
    net, multiple, _ = load_dehazer(source, device)
    written: list[Path] = []
    for images, targets in same_size_batches(plan, batch_size, on_error, min_size=4, progress=progress, desc="dehaze"):
        batch = torch.stack(images)
        tile_size = tile or (1024 if batch.shape[-1] * batch.shape[-2] > max_pixels else 0)
        out = dehaze_tensor(net, batch, multiple, tile_size).cpu()
        written += [write_image(target, image) for image, target in zip(out, targets)]
    return written
