"""The task-agnostic contrastive core: sample construction, embeddings, losses."""
from .cr import AECR_LAYER_WEIGHTS, ContrastiveRegularization, contrastive_regularization
from .embeddings import AECR_LAYERS, VGG19_LAYER_INDEX, VGG19Features, WeightsNotFoundError
from .infonce import InfoNCE, info_nce
from .patchnce import PatchNCELoss, patch_nce_loss
from .projector import DeferredOptimizer, PatchProjector, l2_normalize
from .sampler import PatchSampler, sample_patches
from .samples import CRSampler, batch_samples, group_patches, negative_groups, own_sample, stack_samples
