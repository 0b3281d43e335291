"""lowcon: contrastive learning for low-level vision.

The three parts of contrastive learning in low-level vision, task-agnostic:

- sample construction: :class:`CRSampler`, :func:`batch_samples`, :class:`PatchSampler`
- embeddings: :class:`VGG19Features`, :class:`PatchProjector`
- losses: :class:`ContrastiveRegularization`, :class:`PatchNCELoss`, :class:`InfoNCE`

and the systems built from them: AECR-Net (dehazing) and CUT / FastCUT (unpaired translation).
"""
import importlib

# Each public name and the module it lives in. They are imported on first use (PEP 562), so that
# `import lowcon` and the `lowcon` command start without torch: a Ctrl-C during torch's import
# then lands inside the command, which reports it in one line ("lowcon: interrupted"), and
# `lowcon --help` answers at once.
_EXPORTS = {
    **dict.fromkeys((
        "AECR_LAYER_WEIGHTS", "AECR_LAYERS", "ContrastiveRegularization", "CRSampler", "DeferredOptimizer",
        "InfoNCE", "PatchNCELoss", "PatchProjector", "PatchSampler", "VGG19Features", "WeightsNotFoundError",
        "batch_samples", "contrastive_regularization", "info_nce", "own_sample", "patch_nce_loss",
        "stack_samples"), ".contrast"),
    "DarkChannelPrior": ".baselines.dcp", "dehaze_dcp": ".baselines.dcp",
    "AECRNET_VARIANTS": ".models.aecrnet", "AECRNet": ".models.aecrnet", "build_aecrnet": ".models.aecrnet",
    "GANLoss": ".models.gan_loss",
    "PatchDiscriminator": ".models.patch_discriminator",
    "ResnetGenerator": ".models.resnet_generator",
    "StyleGAN2Discriminator": ".models.stylegan2", "StyleGAN2Generator": ".models.stylegan2",
    "psnr": ".metrics.psnr",
    "ssim": ".metrics.ssim",
}
_SUBPACKAGES = ("baselines", "contrast", "data", "methods", "metrics", "models", "training", "weights")

__version__ = "0.1.0"

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'lowcon' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
