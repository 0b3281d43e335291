"""lowcon: contrastive learning for low-level vision.

The three parts of contrastive learning in low-level vision, task-agnostic:

- sample construction: :class:`CRSampler`, :func:`batch_samples`, :class:`PatchSampler`
- embeddings: :class:`VGG19Features`, :class:`PatchProjector`
- losses: :class:`ContrastiveRegularization`, :class:`PatchNCELoss`, :class:`InfoNCE`

and the systems built from them: AECR-Net (dehazing) and CUT / FastCUT (unpaired translation).
"""
from .contrast import (
    AECR_LAYER_WEIGHTS,
    AECR_LAYERS,
    ContrastiveRegularization,
    CRSampler,
    DeferredOptimizer,
    InfoNCE,
    PatchNCELoss,
    PatchProjector,
    PatchSampler,
    VGG19Features,
    WeightsNotFoundError,
    batch_samples,
    contrastive_regularization,
    info_nce,
    own_sample,
    patch_nce_loss,
    stack_samples,
)
from .baselines.dcp import DarkChannelPrior, dehaze_dcp
from .models.aecrnet import AECRNET_VARIANTS, AECRNet, build_aecrnet
from .models.gan_loss import GANLoss
from .models.patch_discriminator import PatchDiscriminator
from .models.resnet_generator import ResnetGenerator
from .models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from .metrics.psnr import psnr
from .metrics.ssim import ssim

__version__ = "0.1.0"

__all__ = [
    "AECR_LAYER_WEIGHTS", "AECR_LAYERS", "AECRNET_VARIANTS", "AECRNet", "ContrastiveRegularization",
    "CRSampler", "DarkChannelPrior", "DeferredOptimizer", "GANLoss", "InfoNCE", "PatchDiscriminator",
    "PatchNCELoss", "PatchProjector", "PatchSampler", "ResnetGenerator", "StyleGAN2Discriminator",
    "StyleGAN2Generator", "VGG19Features",
    "WeightsNotFoundError", "batch_samples", "build_aecrnet", "contrastive_regularization", "dehaze_dcp",
    "info_nce", "own_sample", "patch_nce_loss", "psnr", "ssim", "stack_samples",
]
