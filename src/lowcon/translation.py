"""Unpaired translation end to end: train CUT / FastCUT / SinCUT / CycleGAN, translate, evaluate.

The pieces the command line calls:

- :class:`TranslationConfig`: one flat config for the four methods (presets in ``configs/``).
- :func:`train_translation`: data + networks + method + :class:`lowcon.training.Trainer`; saves
  the resolved config, ``last.pt`` (resumable, exactly), and the generator's weights at the end
  of every ``save_epoch_every`` epochs (``epochs/epoch_XXX.pt``) for best-epoch evaluation.
- :func:`load_translator` / :func:`translate_paths`: a trained generator on files and folders of
  any size (the output has the input's size), grey or RGBA inputs, PNGs written atomically.
- :func:`evaluate_run`: FID / KID of every saved epoch, reporting the best AND the last epoch
  (papers report the best epoch, users get the last: official CUT issue #65).
- :func:`collapse_check`: warnings for mode collapse and for a generator stuck at the identity
  (FastCUT, official issue #94), run during training and by :func:`evaluate_run`.
- :func:`demo_translation`: a known-answer run on the photos shipped with scikit-image.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from lowcon import distributed
from lowcon.config import ConfigError, first_line, from_dict, preset_path, read_yaml, save_config, to_dict
from lowcon.data.io import (BadImageWarning, RenamedOutputWarning, check_on_error, list_images, load_or_report,
                            plan_outputs, read_image, same_size_batches, write_image)
from lowcon.data.transforms import resize
from lowcon.data.unpaired import SingleImagePairDataset, UnpairedDataset, resolve_unpaired_root
from lowcon.inference import auto_device, cpu_has_native_bf16
from lowcon.methods.cut import CUT
from lowcon.methods.cyclegan import CycleGAN
from lowcon.models.bf16conv import use_bf16_convolutions
from lowcon.models.init import init_weights
from lowcon.models.patch_discriminator import PatchDiscriminator
from lowcon.models.resnet_generator import ResnetGenerator
from lowcon.models.winograd import use_nnpack, use_winograd
from lowcon.models.stylegan2 import (
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    discriminator_channels,
    generator_channels,
    stylegan2_resolution,
)
from lowcon.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lowcon.training.loop import Terminated, Trainer
from lowcon.training.memory import check_allocator_settings, configure_allocator

__all__ = [
    "TranslationConfig",
    "CollapseWarning",
    "RenamedOutputWarning",
    "build_dataset",
    "build_method",
    "train_translation",
    "load_translator",
    "translate_paths",
    "evaluate_run",
    "collapse_check",
    "demo_translation",
]

PathLike = Union[str, os.PathLike]
METHODS = ("cut", "fastcut", "sincut", "cyclegan")
# Winograd for the networks' 3x3 and 4x4 convolutions of at least this many channels: in a CUT step
# the 64 <-> 128-channel 256x256 layers and the discriminator's 4x4 layers gain too (benchmarks/README.md).
WINOGRAD_MIN_CHANNELS = 64
CUT_FAMILY = ("cut", "fastcut", "sincut")
# Keys that steer a run but not what it computes: they may change between a run and its resume.
RUN_KEYS = frozenset({
    "data", "dir_a", "dir_b", "run_dir", "log_every", "sample_every", "checkpoint_every",
    "save_epoch_every", "max_steps", "device", "num_workers", "tensorboard", "on_error",
})


class CollapseWarning(UserWarning):
    """Translations look collapsed: all alike, or the inputs unchanged."""


@dataclass
class TranslationConfig:
    """Everything a translation run needs; the defaults are CUT's (``configs/cut.yaml``). A config
    file loaded by :func:`lowcon.config.load_config` starts from its method's preset instead
    (:meth:`method_defaults`).

    Data: ``data`` is a CycleGAN/CUT root with ``trainA``/``trainB`` (``phase`` picks the
    prefix); ``dir_a``/``dir_b`` name the two folders directly (any two folders). SinCUT takes
    one image per domain: folders holding one image each, or the files themselves.

    Keys read by the CUT family only: lambda_GAN, lambda_NCE, nce_idt, nce_layers, num_patches,
    nce_T, nce_negatives, netF_nc, flip_equivariance, lambda_R1. By CycleGAN only: lambda_A,
    lambda_B, pool_size. ``lambda_identity`` is SinCUT's L1 identity weight or CycleGAN's
    identity weight. By SinCUT only: single_image_length, zoom_min.

    Networks: ``netG`` "resnet" reads ngf, n_blocks, norm, antialias, antialias_up, init_type,
    init_gain; "stylegan2" (SinCUT's official networks) reads ngf, n_blocks (even: half in the
    encoder, half in the decoder), stylegan2_G_num_downsampling and crop_size (rounded to a power
    of 2, it sets the channel widths), and brings its own init (equalized learning rate).
    ``netD`` "patch" reads ndf, n_layers_D, norm, antialias, init_type, init_gain; "stylegan2"
    reads ndf and crop_size (it judges whole crops). ``init_gain`` also initialises the PatchNCE head.
    """

    method: Literal["cut", "fastcut", "sincut", "cyclegan"] = "cut"
    # data
    data: Optional[str] = None
    dir_a: Optional[str] = None
    dir_b: Optional[str] = None
    phase: str = "train"
    direction: Literal["AtoB", "BtoA"] = "AtoB"
    preprocess: Literal["resize_and_crop", "crop", "none"] = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    flip: bool = True
    no_resize_in_decay: bool = True  # CUT's data set: crop only (load = crop) while the lr decays
    serial_batches: bool = False
    single_image_length: int = 100_000
    zoom_min: float = 1.0 / 3.0
    on_error: Literal["skip", "raise"] = "skip"
    # schedule
    batch_size: int = 1
    n_epochs: int = 200
    n_epochs_decay: int = 200
    max_steps: int = 0
    # losses
    lambda_GAN: float = 1.0
    lambda_NCE: float = 1.0
    nce_idt: bool = True
    nce_layers: tuple[int, ...] = (0, 4, 8, 12, 16)
    num_patches: int = 256
    nce_T: float = 0.07
    nce_negatives: Literal["image", "batch"] = "image"
    netF_nc: int = 256
    flip_equivariance: bool = False
    lambda_R1: float = 0.0
    lambda_identity: float = 0.0
    lambda_A: float = 10.0
    lambda_B: float = 10.0
    pool_size: int = 0
    gan_mode: Literal["lsgan", "vanilla", "hinge", "nonsaturating"] = "lsgan"
    # optimiser
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # networks
    netG: Literal["resnet", "stylegan2"] = "resnet"
    netD: Literal["patch", "stylegan2"] = "patch"
    stylegan2_G_num_downsampling: int = 1
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_D: int = 3
    norm: Literal["instance", "batch", "none"] = "instance"
    antialias: bool = True
    antialias_up: bool = True
    init_type: Literal["normal", "xavier", "kaiming", "orthogonal"] = "xavier"
    init_gain: float = 0.02
    # recompute the generator's residual blocks in backward: less memory, more time
    activation_checkpointing: bool = False
    # CPU memory: allocations of at least this many MB get their own mapping, freed at once
    # (glibc; 0 = glibc's default). Lowers the peak by the heap's holes, costs page faults.
    heap_mmap_threshold_mb: float = 0
    # CPU time: keep freed memory in the process for the next step instead of faulting it in
    # again (glibc; about 2 s less per CUT step at 256x256, same peak). Off to use the key above.
    retain_freed_memory: bool = True
    # CPU memory: glibc's per-thread cache of freed small blocks keeps the heap's holes from merging;
    # false turns it off (lowcon train restarts itself with GLIBC_TUNABLES): 0.1-0.2 GB lower peak
    malloc_tcache: bool = False
    # CPU time: 3x3 and 4x4 convolutions of >= 64 channels by Winograd (lowcon.models.winograd):
    # the same function to ~1e-5 relative, a residual block's conv forward + backward 2x faster
    winograd: bool = True
    # CPU time: the forward pass and input gradient of those convolutions and of the 7x7 ones, on
    # maps of 56x56 or more, by NNPACK's kernels (inside torch), used when OpenMP's idle threads
    # spin briefly: lowcon train restarts itself with GOMP_SPINCOUNT=20000 (lowcon.models.winograd)
    nnpack: bool = True
    # time (and memory on a GPU): bfloat16 mixed precision in training. On a GPU the forward passes
    # and losses run under torch.autocast: on an H200 at batch 1, 256x256 it took 40-55 % less GPU
    # memory but more time than float32 (the step waits on kernel launches there). On a CPU only
    # the convolutions that lowcon's float32 kernels do not serve (strided, transposed, < 64
    # channels) compute in bf16 (lowcon.models.bf16conv): CycleGAN's step 6-8 % faster, CUT's and
    # FastCUT's unchanged; it needs native bf16 (AMX, AVX512-BF16), emulated, so slow, elsewhere
    # (benchmarks/README.md)
    bf16: bool = False
    # run
    seed: int = 0
    run_dir: str = "runs/translation"
    log_every: int = 100
    sample_every: int = 1000
    checkpoint_every: int = 5000
    save_epoch_every: int = 5
    device: str = "auto"
    num_workers: int = 0
    tensorboard: bool = False

    @property
    def is_cut(self) -> bool:
        return self.method in CUT_FAMILY

    @classmethod
    def method_defaults(cls, method: object) -> dict:
        """The keys of `method`'s shipped preset (``configs/<method>.yaml``) but its data location:
        what :func:`lowcon.config.load_config` starts a config file from, so that a file that names
        only its method (``method: fastcut``) trains that method's official defaults, as the
        official code's ``--CUT_mode`` and model options do. {} for an unknown method."""
        if method not in METHODS:
            return {}
        preset = read_yaml(preset_path(method))
        return {k: v for k, v in preset.items() if k not in ("data", "dir_a", "dir_b")}

    def validate(self) -> None:
        """Raise ValueError (one line, naming the key) on a bad value or combination."""
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.data and (self.dir_a or self.dir_b):
            raise ValueError("data, dir_a/dir_b: give a data root OR the two domain folders, not both")
        if bool(self.dir_a) != bool(self.dir_b):
            raise ValueError("dir_a, dir_b: give both domain folders (or a data root with trainA/trainB)")
        positive = {"batch_size": self.batch_size, "crop_size": self.crop_size, "load_size": self.load_size,
                    "ngf": self.ngf, "ndf": self.ndf, "n_layers_D": self.n_layers_D, "log_every": self.log_every,
                    "netF_nc": self.netF_nc, "single_image_length": self.single_image_length}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        non_negative = {"n_epochs": self.n_epochs, "n_epochs_decay": self.n_epochs_decay, "max_steps": self.max_steps,
                        "num_patches": self.num_patches, "n_blocks": self.n_blocks, "sample_every": self.sample_every,
                        "checkpoint_every": self.checkpoint_every, "save_epoch_every": self.save_epoch_every,
                        "num_workers": self.num_workers, "pool_size": self.pool_size, "seed": self.seed,
                        "lambda_GAN": self.lambda_GAN, "lambda_NCE": self.lambda_NCE, "lambda_R1": self.lambda_R1,
                        "lambda_identity": self.lambda_identity, "lambda_A": self.lambda_A, "lambda_B": self.lambda_B,
                        "stylegan2_G_num_downsampling": self.stylegan2_G_num_downsampling}
        for key, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{key}: must be >= 0, got {value}")
        if self.n_epochs + self.n_epochs_decay < 1:
            raise ValueError("n_epochs, n_epochs_decay: both 0, nothing to train")
        if self.crop_size < 8:
            raise ValueError(f"crop_size: must be >= 8 (the generator downsamples twice), got {self.crop_size}")
        if self.netD == "patch" and self.crop_size < 2 ** (self.n_layers_D + 2):
            raise ValueError(
                f"crop_size: a PatchGAN of {self.n_layers_D} layers needs crops of at least "
                f"{2 ** (self.n_layers_D + 2)} px, got {self.crop_size} (lower n_layers_D)"
            )
        if self.preprocess == "resize_and_crop" and self.load_size < self.crop_size:
            raise ValueError(f"load_size: {self.load_size} is smaller than crop_size {self.crop_size}")
        if self.lr <= 0 or self.nce_T <= 0 or self.init_gain <= 0:
            raise ValueError(f"lr, nce_T, init_gain: must be > 0, got {self.lr}, {self.nce_T}, {self.init_gain}")
        for key, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key}: must be in [0, 1), got {value}")
        if not 0.0 < self.zoom_min <= 1.0:
            raise ValueError(f"zoom_min: must be in (0, 1], got {self.zoom_min}")
        if not (self.device in ("auto", "cpu", "mps") or self.device.split(":")[0] == "cuda"):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.run_dir:
            raise ValueError("run_dir: must not be empty")
        check_allocator_settings(self.heap_mmap_threshold_mb, self.retain_freed_memory)
        self._validate_stylegan2()
        if self.is_cut:
            self._validate_cut()
        else:  # a CUT-family key set away from its default would be ignored: say so
            for key in CUT_ONLY_KEYS:
                value, default = getattr(self, key), _FIELD_DEFAULTS[key]
                if (tuple(value) if isinstance(value, (list, tuple)) else value) != default:
                    raise ValueError(f"{key}: a CUT-family option, not used by cyclegan; remove it (got {value!r})")

    def _validate_cut(self) -> None:
        if self.pool_size:
            raise ValueError(f"pool_size: the CUT family uses no image pool (CycleGAN only), got {self.pool_size}")
        if self.lambda_GAN == 0 and self.lambda_NCE == 0 and self.lambda_identity == 0:
            raise ValueError("lambda_GAN, lambda_NCE, lambda_identity: all 0, nothing to train")
        layers = tuple(self.nce_layers)
        if self.netG == "stylegan2":
            # encoder.convs: input, 1x1 conv, one ResBlock per downsampling, n_blocks // 2 ResBlocks
            encoder_end = 2 + self.stylegan2_G_num_downsampling + self.n_blocks // 2
            example = "e.g. 0,2,4 for SinCUT's 6 blocks and 1 downsampling"
        else:
            encoder_end = (12 if self.antialias else 10) + self.n_blocks
            example = "e.g. 0,4,8,12,16 for 9 blocks; 0,4,8,12 for 1 block"
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= encoder_end:
            raise ValueError(
                f"nce_layers: need distinct layers of the {self.netG} encoder in [0, {encoder_end - 1}] for "
                f"n_blocks={self.n_blocks}, got {list(layers)} ({example})"
            )
        if self.flip_equivariance and self.preprocess != "none" and self.crop_size % 4:
            raise ValueError(f"crop_size: flip_equivariance needs a multiple of 4, got {self.crop_size}")

    def _validate_stylegan2(self) -> None:
        size = stylegan2_resolution(self.crop_size)
        if self.netG == "stylegan2":
            steps = self.stylegan2_G_num_downsampling
            if self.n_blocks % 2:
                raise ValueError(f"n_blocks: the stylegan2 generator splits its blocks between encoder and decoder; "
                                 f"need an even number, got {self.n_blocks}")
            if size > 1024 or size // 2 ** steps < 4:
                raise ValueError(f"crop_size, stylegan2_G_num_downsampling: the stylegan2 generator sizes its "
                                 f"channels for 2^round(log2 crop_size) in [{4 * 2 ** steps}, 1024] with {steps} "
                                 f"downsamplings, got crop_size {self.crop_size}")
            if generator_channels(size, self.ngf) < 1:
                raise ValueError(f"ngf: {self.ngf} gives the stylegan2 generator 0 channels at {size} px; raise it")
        if self.netD == "stylegan2":
            if self.preprocess == "none" and self.method != "sincut":
                raise ValueError("preprocess: the stylegan2 discriminator judges fixed-size crops; "
                                 "use crop or resize_and_crop, not none")
            if size > 1024 or self.crop_size // (size // 4) != 4:
                raise ValueError(f"crop_size: the stylegan2 discriminator takes crops of 2^k to 1.25 * 2^k - 1 px "
                                 f"(k <= 10), got {self.crop_size}; use a power of 2 such as 64 or 256")
            if discriminator_channels(size, self.ndf) < 1:
                raise ValueError(f"ndf: {self.ndf} gives the stylegan2 discriminator 0 channels at {size} px; raise it")


# ---------------------------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------------------------


# Keys only the CUT family reads; a cyclegan config must leave them at their defaults.
CUT_ONLY_KEYS = ("lambda_GAN", "lambda_NCE", "nce_idt", "nce_layers", "num_patches", "nce_T", "nce_negatives",
                 "netF_nc", "flip_equivariance", "lambda_R1")
_FIELD_DEFAULTS = {f.name: f.default for f in fields(TranslationConfig)}


def _single_image(location: Path, domain: str) -> Path:
    if location.is_file():
        return location
    images = list_images(location)
    if len(images) != 1:
        raise ValueError(f"{location}: SinCUT takes one image per domain ({domain}), found {len(images)}")
    return images[0]


def build_dataset(cfg: TranslationConfig) -> Dataset:
    """The training data of `cfg`: `UnpairedDataset`, or `SingleImagePairDataset` for SinCUT."""
    if cfg.data:
        if cfg.method == "sincut":
            root = Path(cfg.data)
            dir_a, dir_b = root / f"{cfg.phase}A", root / f"{cfg.phase}B"
        else:
            dir_a, dir_b = resolve_unpaired_root(cfg.data, cfg.phase)
    elif cfg.dir_a and cfg.dir_b:
        dir_a, dir_b = Path(cfg.dir_a), Path(cfg.dir_b)
    else:
        raise ValueError("data: no training data; set data (a root with trainA/trainB) or dir_a and dir_b")
    if cfg.method == "sincut":
        return SingleImagePairDataset(
            _single_image(Path(dir_a), "A"), _single_image(Path(dir_b), "B"), crop_size=cfg.crop_size,
            zoom_range=(cfg.zoom_min, 1.0), flip=cfg.flip, length=cfg.single_image_length, seed=cfg.seed,
            batch_size=cfg.batch_size,
        )
    return UnpairedDataset(
        dir_a, dir_b, load_size=cfg.load_size, crop_size=cfg.crop_size, flip=cfg.flip,
        preprocess=cfg.preprocess, serial_batches=cfg.serial_batches, seed=cfg.seed, on_error=cfg.on_error,
        # The data set counts epochs from 0; the official crop-only phase starts after n_epochs.
        no_resize_after_epoch=cfg.n_epochs - 1 if cfg.no_resize_in_decay else None,
    )


def _generator_network(cfg: TranslationConfig, checkpoint_blocks: bool = False) -> nn.Module:
    """The `cfg.netG` generator as constructed (no init_weights)."""
    nce_layers = tuple(cfg.nce_layers) if cfg.is_cut else (0,)
    if cfg.netG == "stylegan2":
        return StyleGAN2Generator(
            3, 3, ngf=cfg.ngf, n_blocks=cfg.n_blocks, size=stylegan2_resolution(cfg.crop_size),
            num_downsampling=cfg.stylegan2_G_num_downsampling, nce_layers=nce_layers,
            checkpoint_blocks=checkpoint_blocks,
        )
    net = ResnetGenerator(
        3, 3, ngf=cfg.ngf, n_blocks=cfg.n_blocks, norm=cfg.norm, antialias=cfg.antialias,
        antialias_up=cfg.antialias_up, nce_layers=nce_layers, checkpoint_blocks=checkpoint_blocks,
    )
    if cfg.winograd:
        use_winograd(net, WINOGRAD_MIN_CHANNELS, nnpack=cfg.nnpack)
    if cfg.nnpack:
        use_nnpack(net)  # the 7x7 convolutions
    if cfg.bf16:
        use_bf16_convolutions(net)  # the others: bf16 in training on the CPU (lowcon.models.bf16conv)
    return net


def build_generator(cfg: TranslationConfig) -> nn.Module:
    net = _generator_network(cfg, checkpoint_blocks=cfg.activation_checkpointing)
    # The StyleGAN2 networks keep their own init (N(0, 1) weights scaled at run time: equalized
    # learning rate); the official code skips init_weights for them too.
    return net if cfg.netG == "stylegan2" else init_weights(net, cfg.init_type, cfg.init_gain)


def build_discriminator(cfg: TranslationConfig) -> nn.Module:
    if cfg.netD == "stylegan2":  # its own init, as the generator's
        return StyleGAN2Discriminator(3, ndf=cfg.ndf, size=stylegan2_resolution(cfg.crop_size))
    net = PatchDiscriminator(3, ndf=cfg.ndf, n_layers=cfg.n_layers_D, norm=cfg.norm, antialias=cfg.antialias)
    if cfg.winograd:
        use_winograd(net, WINOGRAD_MIN_CHANNELS, nnpack=cfg.nnpack)
    if cfg.bf16:
        use_bf16_convolutions(net)
    return init_weights(net, cfg.init_type, cfg.init_gain)


def build_method(cfg: TranslationConfig, steps_per_epoch: int, device: Union[str, torch.device] = "cpu"):
    """The :class:`CUT` or :class:`CycleGAN` of `cfg`, networks initialised and on `device`. On a
    GPU, fixed-size crops turn on cuDNN's autotuner (``torch.backends.cudnn.benchmark``), as the
    official code's BaseModel does."""
    device = torch.device(device)
    if device.type == "cuda" and cfg.preprocess != "none":
        torch.backends.cudnn.benchmark = True
    common = dict(gan_mode=cfg.gan_mode, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), n_epochs=cfg.n_epochs,
                  n_epochs_decay=cfg.n_epochs_decay, steps_per_epoch=steps_per_epoch, direction=cfg.direction,
                  autocast_dtype=torch.bfloat16 if cfg.bf16 else None)
    if cfg.method == "cyclegan":
        nets = [build_generator(cfg).to(device), build_generator(cfg).to(device),
                build_discriminator(cfg).to(device), build_discriminator(cfg).to(device)]
        return CycleGAN(*nets, lambda_A=cfg.lambda_A, lambda_B=cfg.lambda_B, lambda_identity=cfg.lambda_identity,
                        pool_size=cfg.pool_size, **common)
    return CUT(
        build_generator(cfg).to(device), build_discriminator(cfg).to(device), netF_nc=cfg.netF_nc,
        init_gain=cfg.init_gain, init_type=cfg.init_type, lambda_GAN=cfg.lambda_GAN,
        lambda_NCE=cfg.lambda_NCE, nce_idt=cfg.nce_idt, nce_layers=cfg.nce_layers, num_patches=cfg.num_patches,
        nce_T=cfg.nce_T, nce_negatives=cfg.nce_negatives, flip_equivariance=cfg.flip_equivariance,
        lambda_R1=cfg.lambda_R1, lambda_identity=cfg.lambda_identity, **common,
    )


def _generators(method) -> dict[str, nn.Module]:
    return {k: v for k, v in method.checkpoint_modules().items() if k.startswith("G")}


def _sample_batch(dataset: Dataset, count: int = 4) -> dict:
    """A fixed batch for sample grids and collapse checks (same images all run long)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    items = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        if items and item["A"].shape != items[0]["A"].shape:
            continue
        items.append(item)
    return default_collate(items)


def _log_line(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _check_resumable(cfg: TranslationConfig, run_dir: Path) -> None:
    last = run_dir / "last.pt"
    family = "cyclegan" if cfg.method == "cyclegan" else "cut"
    state = load_checkpoint(last, method=family)
    saved, now = state.get("config") or {}, to_dict(cfg)
    if saved.get("method") != cfg.method:
        raise CheckpointError(f"{last}: a {saved.get('method')!r} run, resumed as {cfg.method!r}")
    changed = [k for k in now if k not in RUN_KEYS and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise CheckpointError(
            f"{last}: resume with a different config: {k} was {saved[k]!r}, now {now[k]!r}"
            + (f" (and {changed[1:]})" if len(changed) > 1 else "") + "; resume with the run's config.yaml"
        )


def train_translation(cfg: TranslationConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train `cfg` and return its run folder.

    Writes ``config.yaml``, ``last.pt`` (every ``checkpoint_every`` steps and at the end),
    ``epochs/epoch_XXX.pt`` (generator weights after every ``save_epoch_every``-th epoch and
    the last epoch), ``log.csv`` (every loss term), ``samples/`` (grids of a fixed batch every
    ``sample_every`` steps) and ``train.log`` (start and stop, each epoch's wall-clock time,
    skipped images, collapse warnings).

    Args:
        resume: continue ``run_dir/last.pt`` exactly (same schedule, data order and random
            draws); without it, a run folder that already holds a run is an error (nothing is
            overwritten).
        progress: show a progress bar.

    Started by ``torchrun --nproc_per_node N``, the N processes train as one run with the
    whole batch ``batch_size`` split among them (:mod:`lowcon.distributed`); process 0
    writes the files.

    Raises:
        FileExistsError, CheckpointError, ValueError, FileNotFoundError: one line each.
    """
    cfg.validate()
    distributed.share_of(cfg.batch_size, distributed.launched_processes())  # before anything is started
    run_dir = Path(cfg.run_dir)
    if resume:
        _check_resumable(cfg, run_dir)
    elif (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir}: holds a run already (last.pt); resume it or choose another run_dir")
    configure_allocator(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)
    torch.manual_seed(cfg.seed)  # the same in every process: the same networks and random draws
    device = distributed.setup(auto_device(cfg.device))
    main = distributed.is_main()
    if cfg.bf16 and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("bf16: this CPU has no native bfloat16 (AVX512-BF16, AMX); mixed precision is emulated "
                      "here and slower than float32", stacklevel=2)
    with warnings.catch_warnings(record=True) as caught:  # the skipped images go to train.log too
        warnings.simplefilter("always", BadImageWarning)
        dataset = build_dataset(cfg)
    for w in caught if main else ():
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size: {cfg.batch_size} is larger than the data set ({len(dataset)} images)")
    method = build_method(cfg, steps_per_epoch, device)
    total_epochs = cfg.n_epochs + cfg.n_epochs_decay
    steps = total_epochs * steps_per_epoch
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)

    def save_epoch(epoch: int) -> None:
        if main and (epoch == total_epochs or (cfg.save_epoch_every and epoch % cfg.save_epoch_every == 0)):
            save_checkpoint(run_dir / "epochs" / f"epoch_{epoch:03d}.pt", {
                "method": method.name, "kind": "generator", "epoch": epoch, "step": epoch * steps_per_epoch,
                "config": to_dict(cfg), "generator": {k: m.state_dict() for k, m in _generators(method).items()},
            })

    warmup = max(1, total_epochs * steps_per_epoch // 20)  # a fresh generator gives one grey for every input

    def check_samples(visuals: dict, step: int) -> None:
        if step < warmup:
            return
        for message in collapse_check(visuals["real_A"], visuals["fake_B"], targets=visuals["real_B"]):
            warnings.warn(f"step {step}: {message}", CollapseWarning, stacklevel=2)
            _log_line(run_dir, f"step {step}: warning: {message}")

    def log_epoch_time(epoch: int, seconds: float, steps_run: int) -> None:
        # as the official train.py's "End of epoch N / M  Time Taken: T sec"
        part = "" if steps_run == steps_per_epoch else f", {steps_run} of its {steps_per_epoch} steps (resumed mid-epoch)"
        _log_line(run_dir, f"epoch {epoch} of {total_epochs}: {seconds:.1f} s, {seconds / steps_run:.3f} s/step{part}")

    method.epoch_end_hooks.append(save_epoch)
    method.visual_hooks.append(check_samples)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        processes = f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
        _log_line(run_dir, f"{'resume' if resume else 'start'} {cfg.method}: {len(dataset)} items, "
                           f"{steps_per_epoch} steps/epoch, {steps} steps, device {device}{processes}")
        for w in caught:
            if issubclass(w.category, BadImageWarning):
                _log_line(run_dir, f"warning: {w.message}")
    trainer = Trainer(
        method, dataset, run_dir, steps=steps, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.num_workers, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        sample_every=cfg.sample_every, config=to_dict(cfg), tensorboard=cfg.tensorboard, progress=progress,
        sample_batch=_sample_batch(dataset) if cfg.sample_every and main else None,
        on_epoch_end=log_epoch_time if main else None,
    )
    with distributed.leaving():
        try:
            done = trainer.fit(resume=resume)
        except (KeyboardInterrupt, Terminated) as stop:
            if main:
                how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
                _log_line(run_dir, f"stopped by {how} at step {trainer.step} of {steps} (resume with --resume)")
            raise
        if main:
            _log_line(run_dir, f"stopped at step {trainer.step} of {steps}" if done["trained"] else
                      f"nothing to train: at step {trainer.step} already, the run asks for {steps}")
    return run_dir


# ---------------------------------------------------------------------------------------------
# Using a trained generator
# ---------------------------------------------------------------------------------------------


def load_translator(
    checkpoint_path: PathLike, device: Union[str, torch.device] = "cpu", *, method: Optional[str] = None,
    direction: str = "AtoB",
) -> tuple[nn.Module, TranslationConfig]:
    """The generator of a run's ``last.pt`` or ``epochs/epoch_XXX.pt``, in eval mode, and its config.

    Args:
        method: the expected method (cut, fastcut, sincut or cyclegan); another one is an error.
        direction: "AtoB" = the learned mapping; "BtoA" = the reverse generator (CycleGAN only).

    Raises:
        CheckpointError: one line, for a damaged file, a file of another method or preset, of
            another lowcon version, or weights that do not fit.
    """
    path = Path(checkpoint_path)
    state = load_checkpoint(path)
    weights = state.get("generator") or state.get("model")
    saved = state.get("config")
    if state.get("method") not in ("cut", "cyclegan"):
        raise CheckpointError(f"{path}: not a translation checkpoint (method {state.get('method')!r})")
    missing = [key for key, ok in (("config", isinstance(saved, dict)), ("generator weights", weights is not None))
               if not ok]
    if missing:
        raise CheckpointError(f"{path}: a {state.get('method')} checkpoint without its {' and '.join(missing)}")
    if saved.get("method") == "cyclegan":  # CycleGAN never read these; older runs may have set them
        saved = {k: v for k, v in saved.items() if k not in CUT_ONLY_KEYS}
    try:
        cfg = from_dict(TranslationConfig, saved, source=str(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: written by another lowcon version ({err})") from None
    if method is not None and cfg.method != method:
        raise CheckpointError(f"{path}: a checkpoint of {cfg.method!r}, not {method!r}")
    if direction not in ("AtoB", "BtoA"):
        raise ValueError(f"direction: expected AtoB or BtoA, got {direction!r}")
    if cfg.is_cut and direction == "BtoA":
        raise ValueError(f"direction: {cfg.method} learns one direction only; BtoA needs a cyclegan checkpoint")
    key = "G" if cfg.is_cut else ("G_A" if direction == "AtoB" else "G_B")
    if key not in weights:
        raise CheckpointError(f"{path}: no {key} weights (has {sorted(weights)})")
    generator = _generator_network(cfg)  # a saved config without netG (older lowcon) gets the resnet default
    try:
        generator.load_state_dict(weights[key])
    except RuntimeError as err:  # torch's first line only says "Error(s) in loading state_dict for ...:"
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), first_line(err))
        raise CheckpointError(f"{path}: {key} weights do not fit the configured generator ({detail})") from None
    return generator.to(device).eval(), cfg


# Batches of more pixels than this go through the generator in bands of rows (forward_in_bands
# of ResnetGenerator and StyleGAN2Generator): the same output in less memory, and on 2 CPU cores
# no slower from about a megapixel on for the ResNet generator (benchmarks/README.md).
BANDS_FROM_PIXELS = 1024 * 1024


@torch.no_grad()
def _translate_batch(generator: nn.Module, images: list[Tensor], device: torch.device) -> Tensor:
    x = torch.stack(images).to(device) * 2 - 1
    large = x.shape[0] * x.shape[2] * x.shape[3] > BANDS_FROM_PIXELS
    y = generator.forward_in_bands(x) if large and hasattr(generator, "forward_in_bands") else generator(x)
    return ((y + 1) / 2).clamp(0, 1).cpu()


def translate_paths(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    checkpoint: PathLike,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 1,
    direction: str = "AtoB",
    on_error: str = "skip",
    *,
    method: Optional[str] = None,
    progress: bool = False,
    size: Optional[int] = None,
    existing: str = "error",
) -> list[Path]:
    """Translate image files and folders with a trained generator; write ``out_dir/<stem>.png``.

    Any size (the output has the input's size), grey (repeated to RGB) and RGBA (alpha dropped)
    inputs. Images of one size are batched together up to `batch_size`. Files are written
    atomically; an unreadable or too small (< 5 px) file is reported in one line and skipped
    (``on_error="skip"``) or raised (``"raise"``). On the CPU the checkpoint's memory settings
    (``retain_freed_memory``, ``heap_mmap_threshold_mb``) apply to this process, as in training:
    by default freed memory is kept for the next image instead of being faulted in again. Batches
    of more than ``BANDS_FROM_PIXELS`` pixels run through the generator in bands of rows
    (``forward_in_bands`` of the ResNet and StyleGAN2 generators: the same output in less
    memory). `progress` shows a bar over the images. `size`: resize every input to size x size
    first (bicubic, antialiased), as the official test script does (``load_size = crop_size``); the
    outputs then have that size. `existing`: an output that is there already stops the call before
    anything is written (``"error"``), is replaced (``"overwrite"``), or is kept and its input
    skipped (``"skip"``); see :func:`lowcon.data.io.plan_outputs`.

    Returns:
        the written paths, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    device = auto_device(device) if isinstance(device, str) else device
    plan = plan_outputs(inputs, out_dir, on_error, existing)  # its checks first: nothing loaded or written
    if not plan:
        return []
    generator, cfg = load_translator(checkpoint, device, method=method, direction=direction)
    if device.type == "cpu":  # the run's memory settings, as in training: by default freed memory
        configure_allocator(cfg.heap_mmap_threshold_mb, cfg.retain_freed_memory)  # serves the next image
    written: list[Path] = []
    for images, targets in same_size_batches(plan, batch_size, on_error, min_size=5,  # the generator needs 5 px
                                             transform=(lambda image: resize(image, size)) if size else None,
                                             progress=progress, desc="translate"):
        translated = _translate_batch(generator, images, device)
        written += [write_image(target, image) for image, target in zip(translated, targets)]
    return written


# ---------------------------------------------------------------------------------------------
# Checks and evaluation
# ---------------------------------------------------------------------------------------------


def _as_small_batch(images: Union[Tensor, Sequence[Tensor]], side: int = 64) -> Tensor:
    items = list(images) if not isinstance(images, Tensor) or images.dim() == 4 else [images]
    return torch.stack([F.interpolate(x[None].float(), size=(side, side), mode="area")[0] for x in items])


def _mean_pairwise_distance(x: Tensor) -> float:
    flat = x.flatten(1)
    n = flat.shape[0]
    total = sum(float((flat[i] - flat[j]).abs().mean()) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def _colour_statistics(x: Tensor) -> Tensor:
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).mean(0)


def collapse_check(
    inputs: Union[Tensor, Sequence[Tensor]],
    outputs: Union[Tensor, Sequence[Tensor]],
    targets: Union[Tensor, Sequence[Tensor], None] = None,
    *,
    diversity_ratio: float = 0.1,
    identity_tolerance: float = 0.01,
) -> list[str]:
    """Warnings (one line each) when translations look collapsed; empty when they look fine.

    - Mode collapse (official issues #178, #181): the mean pairwise L1 distance between the
      outputs of different inputs is below `diversity_ratio` times that between the inputs.
    - Identity collapse (FastCUT, official issue #94): mean |G(a) - a| is below
      `identity_tolerance` while the target domain differs from the inputs (per-channel colour
      means and stds further apart than the tolerance; without `targets` the domains are taken
      to differ).

    Args:
        inputs, outputs: (N, 3, H, W) tensors or sequences of (3, H, W) images in [0, 1];
            output i has the size of input i, sizes may differ between i.
        targets: images of the target domain (any number, any sizes), optional.
    """
    inputs_list = list(inputs) if not isinstance(inputs, Tensor) or inputs.dim() == 4 else [inputs]
    outputs_list = list(outputs) if not isinstance(outputs, Tensor) or outputs.dim() == 4 else [outputs]
    if len(inputs_list) != len(outputs_list) or not inputs_list:
        raise ValueError(f"inputs, outputs: need the same non-zero count, got {len(inputs_list)} and {len(outputs_list)}")
    for i, (a, b) in enumerate(zip(inputs_list, outputs_list)):
        if a.shape != b.shape:
            raise ValueError(f"outputs[{i}]: shape {tuple(b.shape)} differs from its input's {tuple(a.shape)}")
    messages = []
    change = sum(float((b.float() - a.float()).abs().mean()) for a, b in zip(inputs_list, outputs_list)) / len(inputs_list)
    small_in = _as_small_batch(inputs_list)
    domains_differ = True
    if targets is not None:
        gap = float((_colour_statistics(small_in) - _colour_statistics(_as_small_batch(targets))).abs().mean())
        domains_differ = gap > identity_tolerance
    if change < identity_tolerance and domains_differ:
        messages.append(
            f"outputs are nearly the inputs (mean |G(a) - a| = {change:.4f} < {identity_tolerance}) although the "
            "target domain differs: the generator may have collapsed to the identity (FastCUT issue #94; "
            "try a smaller lambda_NCE or the cut preset)"
        )
    if len(inputs_list) >= 2:
        spread_in = _mean_pairwise_distance(small_in)
        spread_out = _mean_pairwise_distance(_as_small_batch(outputs_list))
        if spread_in > 1e-3 and spread_out < diversity_ratio * spread_in:
            messages.append(
                f"outputs of different inputs are near-identical (mean pairwise L1 {spread_out:.4f} vs "
                f"{spread_in:.4f} between the inputs): mode collapse"
            )
    return messages


def _epoch_entries(run_dir: Path) -> list[tuple[str, int, Path]]:
    """(label, step, path) of every saved generator, oldest first; last.pt when it is newer."""
    entries = []
    for path in sorted((run_dir / "epochs").glob("epoch_*.pt")):
        state = load_checkpoint(path)
        entries.append((f"epoch {int(state['epoch'])}", int(state["step"]), path))
    last = run_dir / "last.pt"
    if last.is_file():
        step = int(load_checkpoint(last)["step"])
        if not entries or step > entries[-1][1]:
            entries.append((f"step {step} (last.pt)", step, last))
    if not entries:
        raise FileNotFoundError(f"{run_dir}: no saved generators (epochs/epoch_*.pt or last.pt)")
    return entries


def _read_folder(folder: Path, size: Optional[int], on_error: str) -> Iterator[Tensor]:
    """The readable images of `folder` (each resized to size x size where `size`), an unreadable one
    reported in one line and skipped (``on_error="skip"``) or raised."""
    for path in list_images(folder):
        image = load_or_report(path, on_error, min_size=5)
        if image is not None:
            yield resize(image, size) if size else image


def _test_size(run_dir: Path) -> Optional[int]:
    """The side the official test script gives a run's test images: its crop_size (``load_size =
    crop_size``, resize_and_crop), or None (the image's own size) for SinCUT, whose test loads
    whole images (preprocess none), and for runs trained without resizing."""
    saved = run_dir / "config.yaml"
    cfg = read_yaml(saved) if saved.is_file() else {}
    if cfg.get("method") == "sincut" or cfg.get("preprocess", "resize_and_crop") == "none":
        return None
    return int(cfg.get("crop_size", 256))


def evaluate_run(
    run_dir: PathLike,
    real_dir: PathLike,
    test_dir: PathLike,
    inception_weights: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    metric_fn: Optional[Callable[[Tensor], Tensor]] = None,
    *,
    direction: str = "AtoB",
    batch_size: int = 1,
    allow_download: bool = False,
    size: Optional[int] = None,
    on_error: str = "skip",
) -> dict:
    """FID and KID of every saved epoch of a run, with the best and the last epoch named apart.

    Translates `test_dir` with each ``epochs/epoch_XXX.pt`` (and ``last.pt`` when it is newer)
    into ``run_dir/eval/<epoch>/``, scores it against `real_dir` (the target domain's test
    images) and writes ``eval/scores.csv``, ``eval/scores.png`` (FID and KID against the step)
    and ``eval/report.md``. As the official protocol: the test images and the real ones are
    resized to crop_size x crop_size first (the official test script's ``load_size =
    crop_size``; the FID compares its saved ``fake_B`` and ``real_B``); SinCUT's stay whole.

    Args:
        inception_weights: the FID Inception file (see :func:`lowcon.metrics.fid.load_inception`).
        metric_fn: a feature extractor (B, 3, H, W) in [0, 1] -> (B, D) to use instead of
            Inception (tests pass a tiny one).
        allow_download: without a local Inception file, download torch-fidelity's into its cache
            (a connected machine; off by default, so that an offline one fails at once).
        size: the side both image sets are resized to; None: the run's crop_size (the image's own
            size for SinCUT); 0: every image at its own size.
        on_error: an unreadable image in either folder is reported in one line and left out of
            both the translation and the scores (``"skip"``), or stops the evaluation (``"raise"``).

    Returns:
        {"rows": [{"label", "step", "fid", "kid_mean", "kid_std", "warnings"}...], "best": row
        with the lowest FID, "last": the newest row, "csv": path, "report": path}.
    """
    from lowcon.metrics.fid import extract_features, fid_kid_from_features, load_inception
    from lowcon.report import markdown_table, plot_curves, write_text_atomic

    run_dir, real_dir, test_dir = Path(run_dir), Path(real_dir), Path(test_dir)
    device = auto_device(device) if isinstance(device, str) else device
    entries = _epoch_entries(run_dir)
    if metric_fn is None:
        metric_fn = load_inception(inception_weights, device=device, allow_download=allow_download)
    size = _test_size(run_dir) if size is None else (size or None)
    if size is not None and size < 5:
        raise ValueError(f"size: must be >= 5 px (or 0 for the images' own sizes), got {size}")
    check_on_error(on_error)
    inputs = list(_read_folder(test_dir, size, on_error))  # each bad file of either set is reported here, once
    targets: list[Tensor] = []  # the first 64 real images, for the collapse check

    def real_images() -> Iterator[Tensor]:
        for image in _read_folder(real_dir, size, on_error):
            if len(targets) < 64:
                targets.append(image)
            yield image

    # the real set's features are the same for every epoch: extracted once, streamed
    real_features = extract_features(real_images(), metric_fn, device=device)
    rows = []
    for label, step, path in entries:
        out = run_dir / "eval" / label.split(" (")[0].replace(" ", "_")
        for stale in out.glob("*.png") if out.is_dir() else []:  # our own outputs of an earlier evaluation
            stale.unlink()
        with warnings.catch_warnings():  # the test set's bad files were reported when it was read
            warnings.simplefilter("ignore", BadImageWarning)
            written = translate_paths([test_dir], out, path, device=device, batch_size=batch_size,
                                      direction=direction, size=size, on_error=on_error)
        scores = fid_kid_from_features(real_features, extract_features(out, metric_fn, device=device))
        outputs = [read_image(p) for p in written]
        found = collapse_check(inputs, outputs, targets=targets) if len(outputs) == len(inputs) else []
        for message in found:
            warnings.warn(f"{label}: {message}", CollapseWarning, stacklevel=2)
        rows.append({"label": label, "step": step, **scores, "warnings": " | ".join(found)})
    best = min(rows, key=lambda r: r["fid"] if math.isfinite(r["fid"]) else math.inf)
    last = rows[-1]

    csv_path = run_dir / "eval" / "scores.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["label", "step", "fid", "kid_mean", "kid_std", "warnings"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, buffer.getvalue())
    plot_curves([{"step": r["step"], "FID": r["fid"], "KID x 1000": 1000 * r["kid_mean"]} for r in rows],
                ["FID", "KID x 1000"], run_dir / "eval" / "scores.png",
                title=f"FID and KID of each saved generator (best: {best['label']}; last: {last['label']})")
    table = markdown_table(
        ["saved", "step", "FID", "KID x 1000", "warnings"],
        [[r["label"], r["step"], r["fid"], f"{1000 * r['kid_mean']:.2f} ± {1000 * r['kid_std']:.2f}", r["warnings"] or "-"]
         for r in rows],
    )
    report = "\n".join([
        f"# Evaluation of {run_dir}", "",
        f"Test images: {test_dir} ({len(inputs)}), real target images: {real_dir}; "
        + (f"both resized to {size} x {size} (bicubic), as the official test." if size else "at their own sizes."),
        "",
        f"- **Best epoch** (lowest FID, what papers report): {best['label']}: FID {best['fid']:.2f}, "
        f"KID x 1000 {1000 * best['kid_mean']:.2f}",
        f"- **Last epoch** (what a finished run gives you): {last['label']}: FID {last['fid']:.2f}, "
        f"KID x 1000 {1000 * last['kid_mean']:.2f}", "",
        table, "",
        "![FID and KID by step](scores.png)", "",
        "Choosing the best epoch by test FID is optimistic (official CUT issue #65): report both.", "",
    ])
    report_path = write_text_atomic(run_dir / "eval" / "report.md", report)
    return {"rows": rows, "best": best, "last": last, "csv": csv_path, "report": report_path}


# ---------------------------------------------------------------------------------------------
# The known-answer demo
# ---------------------------------------------------------------------------------------------

# The channel rotation (embedded.KNOWN_TRANSFORMS): one-to-one on colours, so the input patch that
# PatchNCE pairs with each output patch does determine it. Until 2026-12-06 the demo used sepia,
# which maps every hue of a brightness to one tint: FastCUT's NCE term, weighted 10, kept the hues
# apart and it scored below the identity map in five runs in a row (docs/translation.md).
DEMO_TRANSFORM = "gbr"
DEMO_TRANSFORM_TEXT = "the channels rotated: R, G, B <- G, B, R"  # what the report says DEMO_TRANSFORM is
# The demo's networks and lr were chosen for 1000-2400 steps. On fast CPUs the time budget buys more,
# and then the discriminator wins: on the sepia demo CUT fell to the identity map's PSNR after 3264
# steps, where eight runs of 1280-2368 steps gave 16.9-18.4 dB. So a run stops here, early if need be.
DEMO_MAX_STEPS = 2400


def _demo_config(method: str, data: Path, run_dir: Path) -> TranslationConfig:
    # Small enough for about a thousand steps in three CPU minutes. The loss weights are the
    # presets'; the lr is raised from 2e-4 to 5e-4 for the short schedule.
    small = dict(data=str(data), run_dir=str(run_dir), load_size=54, crop_size=48, ngf=8, ndf=16, n_blocks=2,
                 nce_layers=(0, 4, 8, 12, 13), lr=5e-4, device="cpu", log_every=10, checkpoint_every=0,
                 save_epoch_every=0)
    if method == "fastcut":
        return TranslationConfig(method="fastcut", lambda_NCE=10.0, nce_idt=False, flip_equivariance=True, **small)
    return TranslationConfig(method="cut", **small)


def _seconds_per_step(cfg: TranslationConfig, probe_steps: int = 5) -> float:
    dataset = build_dataset(cfg)
    method = build_method(cfg, len(dataset) // cfg.batch_size, "cpu")
    batch = default_collate([dataset[i] for i in range(cfg.batch_size)])
    method.train_step(batch)  # the first step pays one-off costs
    started = time.perf_counter()
    for _ in range(probe_steps):
        method.train_step(batch)
    return (time.perf_counter() - started) / probe_steps


def _fastest_threads(cfg: TranslationConfig) -> int:
    """1 or 2 threads, whichever steps faster here (2 loses on a busy machine)."""
    timings = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        timings[threads] = _seconds_per_step(cfg)
    return min(timings, key=timings.get)


def _demo_epochs(minutes: float, seconds_per_step: float, steps_per_epoch: int) -> int:
    """Epochs of a demo run: what `minutes` buy at `seconds_per_step`, at most ``DEMO_MAX_STEPS``
    steps and at least 2 epochs (one at the full lr, one decaying)."""
    affordable = int(minutes * 60 / seconds_per_step / steps_per_epoch)
    return max(2, min(affordable, DEMO_MAX_STEPS // steps_per_epoch))


def demo_translation(out_dir: PathLike, minutes: float = 3.0, progress: bool = True) -> Path:
    """Train CUT and FastCUT for about `minutes` each (at most ``DEMO_MAX_STEPS`` steps) on a
    translation with a known answer.

    Domain A: crops of the colour photos shipped with scikit-image; domain B: other crops under
    a fixed colour transform T, ``DEMO_TRANSFORM`` (the channel rotation: R, G, B <- G, B, R),
    never paired with A. After training, the PSNR of G(a) against T(a) on a held-out photo is
    compared with the identity map's PSNR (a against T(a)): a model that learned the map beats it.
    Runs on the CPU with 1 or 2 threads (whichever is faster).

    Writes ``report.md`` (table), ``comparison.png`` (input | CUT | FastCUT | target),
    ``curves_<method>.png`` (losses) and the two run folders under `out_dir`.

    Returns:
        the path of ``report.md``.
    """
    from lowcon.data.embedded import apply_known_transform, write_embedded_translation_set
    from lowcon.metrics.psnr import psnr
    from lowcon.report import markdown_table, plot_curves, save_grid, write_text_atomic
    from lowcon.training.logger import read_log

    if minutes <= 0:
        raise ValueError(f"minutes: must be > 0, got {minutes}")
    out_dir = Path(out_dir)
    for method in ("cut", "fastcut"):
        if (out_dir / method / "last.pt").exists():
            raise FileExistsError(f"{out_dir}: holds a demo run already ({method}/last.pt); choose another folder")
    threads = torch.get_num_threads()
    try:
        folders = write_embedded_translation_set(out_dir / "data", DEMO_TRANSFORM, size=96, crops_per_image=16,
                                                 test_names=("coffee",))
        test_inputs = list(_read_folder(folders["testA"], None, "raise"))
        test_targets = list(_read_folder(folders["testA_transformed"], None, "raise"))
        domain_b = list(_read_folder(folders["testB"], None, "raise"))  # the collapse check's targets
        truth = torch.stack(test_targets)
        identity = float(psnr(torch.stack(test_inputs), truth, reduction="mean"))
        results, translations = [], {}
        used_threads = _fastest_threads(_demo_config("cut", out_dir / "data", out_dir / "cut"))
        torch.set_num_threads(used_threads)
        for method in ("cut", "fastcut"):
            run_dir = out_dir / method
            cfg = _demo_config(method, out_dir / "data", run_dir)
            steps_per_epoch = len(build_dataset(cfg)) // cfg.batch_size
            epochs = _demo_epochs(minutes, _seconds_per_step(cfg), steps_per_epoch)
            cfg.n_epochs, cfg.n_epochs_decay = (epochs + 1) // 2, epochs // 2
            cfg.sample_every = max(1, epochs * steps_per_epoch // 4)
            started = time.perf_counter()
            train_translation(cfg, progress=progress)
            elapsed = (time.perf_counter() - started) / 60
            generator, _ = load_translator(run_dir / "last.pt", "cpu")
            fake = _translate_batch(generator, test_inputs, torch.device("cpu"))
            translations[method] = fake
            score = float(psnr(fake, truth, reduction="mean"))
            found = collapse_check(test_inputs, list(fake), targets=domain_b)
            results.append([method.replace("cut", "CUT").replace("fast", "Fast"), score, f"{elapsed:.1f}",
                            epochs * steps_per_epoch, " | ".join(found) or "-"])
            rows = read_log(run_dir / "log.csv")
            plot_curves(rows, ["G_GAN", "NCE_X", "NCE_Y", "D", "lr_G"], out_dir / f"curves_{method}.png",
                        title=f"{method} on the {DEMO_TRANSFORM} demo")
        grid = {"input": torch.stack(test_inputs)[:4], "CUT": translations["cut"][:4],
                "FastCUT": translations["fastcut"][:4], "target": apply_known_transform(DEMO_TRANSFORM, torch.stack(test_inputs))[:4]}
        save_grid(grid, out_dir / "comparison.png")
    finally:
        torch.set_num_threads(threads)
    table = markdown_table(
        ["model", f"PSNR vs {DEMO_TRANSFORM}(a) (dB)", "training minutes", "steps", "collapse check"],
        results + [["identity (a itself)", identity, "-", "-", "-"]],
    )
    report = "\n".join([
        "# Known-answer translation demo", "",
        f"Domain A: {len(list_images(folders['trainA']))} crops of scikit-image photos; domain B: "
        f"{len(list_images(folders['trainB']))} other crops under a fixed colour map, {DEMO_TRANSFORM} "
        f"({DEMO_TRANSFORM_TEXT}), never paired with A. Test: held-out photo (coffee), PSNR of "
        f"G(a) against the true {DEMO_TRANSFORM}(a).", "",
        "A model that learned the map beats the identity row.", "",
        table, "",
        f"Small networks (ngf 8, 2 residual blocks, 48 px crops of 54 px resized photos, lr 5e-4; loss "
        f"weights of the cut and fastcut presets) trained on the CPU with {used_threads} thread(s), the "
        f"number of steps set from a timing of the first steps, at most {DEMO_MAX_STEPS}. GAN training is "
        "noisy at this scale: another seed or duration moves these numbers by a dB or two.", "",
        "![comparison](comparison.png)", "",
        "![CUT losses](curves_cut.png)", "",
        "![FastCUT losses](curves_fastcut.png)", "",
    ])
    return write_text_atomic(out_dir / "report.md", report)
