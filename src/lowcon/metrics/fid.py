"""Frechet Inception Distance (FID) and Kernel Inception Distance (KID).

The math (:func:`feature_statistics`, :func:`frechet_distance`,
:func:`kernel_inception_distance`) works on any (N, D) features in float64. :func:`compute_fid_kid`
takes two sets of images and any feature extractor (B, 3, H, W) in [0, 1] -> (B, D), so it runs
with a tiny network in tests. The standard FID network is the TensorFlow Inception-v3 of
2015-12-05 ported to PyTorch; :func:`load_inception` builds it through torch-fidelity (optional
dependency: ``pip install torch-fidelity``, or ``pip install lowcon[fid]``) from a local weights
file and never downloads unless asked to.

torch-fidelity resizes to 299x299 with TensorFlow-1 bilinear resampling, which reproduces the
original TensorFlow FID; pytorch-fid (used by the CUT papers) resizes with PyTorch's bilinear
interpolation, so its FIDs can differ slightly from the ones here.
"""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

# one error for every missing weights file (VGG-19, Inception): the CLI reports it in one line
from lowcon.config import first_line
from lowcon.contrast.embeddings import WeightsNotFoundError

__all__ = [
    "WeightsNotFoundError",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "iter_image_folder",
    "extract_features",
    "compute_fid_kid",
    "fid_kid_from_features",
    "find_inception_weights",
    "InceptionFeatureExtractor",
    "load_inception",
    "folder_fid_kid",
]

# torch-fidelity's file (torch.hub caches it under this name); pytorch-fid publishes the same
# 2015-12-05 port as pt_inception-..., accepted too when found in the same folder.
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

ArrayLike = Union[Tensor, np.ndarray]
ImageSource = Union[str, os.PathLike, Tensor, Iterable[Tensor]]


# ---------------------------------------------------------------------------------------------
# Math on features
# ---------------------------------------------------------------------------------------------


def _as_float64(name: str, x: ArrayLike, dims: int) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != dims:
        raise ValueError(f"{name}: expected {dims}-D, got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def feature_statistics(features: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N - 1) of a feature set, in float64.

    Shape:
        features: (N, D) with N >= 2. Output: mu (D,), sigma (D, D).
    """
    feats = _as_float64("features", features, 2)
    if feats.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    # Sample covariances are PSD up to rounding; tiny negative eigenvalues would give NaNs.
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Tr((sigma1 sigma2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2) (same non-zero spectrum as
    sigma1 sigma2), which stays real and finite for singular covariances (N < D) where
    scipy.linalg.sqrtm needs an eps offset.

    Shape:
        mu1, mu2: (D,); sigma1, sigma2: (D, D). Output: a Python float.

    Reference:
        M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
        Equilibrium", NeurIPS 2017; D. C. Dowson, B. V. Landau, J. Multivar. Anal. 1982.
    """
    m1, m2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    s1, s2 = _as_float64("sigma1", sigma1, 2), _as_float64("sigma2", sigma2, 2)
    dim = m1.shape[0]
    if m2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(
            "mu1, sigma1, mu2, sigma2: inconsistent shapes "
            f"{m1.shape}, {s1.shape}, {m2.shape}, {s2.shape}"
        )
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def _polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float
) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def kernel_inception_distance(
    features_real: ArrayLike,
    features_fake: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: Optional[float] = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> Tuple[float, float]:
    """KID: unbiased MMD^2 with a polynomial kernel, mean and std over random subsets.

    k(x, y) = (gamma * x.y + coef0)^degree, gamma = 1 / D by default. For each subset, m rows are
    drawn without replacement from each set (real first, then fake, from one
    ``np.random.RandomState(seed)``, the order torch-fidelity uses, whose default seed is 2020)
    and MMD^2 = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
    - 2 sum_{i,j} k(x_i, y_j) / m^2. Unlike torch-fidelity, m = min(subset_size, N_real, N_fake)
    instead of an error when a set is smaller than subset_size (clean-fid does the same).

    Args:
        features_real, features_fake: (N_real, D) and (N_fake, D) features.
        subsets: number of random subsets.
        subset_size: rows per subset (clipped as above).
        degree, gamma, coef0: polynomial kernel.
        seed: seed of the subset sampling.

    Returns:
        (mean, std) over the subsets; std is the population standard deviation (ddof 0).

    Reference:
        M. Binkowski et al., "Demystifying MMD GANs", ICLR 2018.
    """
    real = _as_float64("features_real", features_real, 2)
    fake = _as_float64("features_fake", features_fake, 2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            "features_real, features_fake: feature sizes differ, "
            f"{real.shape[1]} vs {fake.shape[1]}"
        )
    if subsets < 1:
        raise ValueError(f"subsets: must be >= 1, got {subsets}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"subset_size: KID needs subsets of at least 2 samples per set, got {m}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        k_xx = _polynomial_kernel(x, x, degree, gamma, coef0)
        k_yy = _polynomial_kernel(y, y, degree, gamma, coef0)
        k_xy = _polynomial_kernel(x, y, degree, gamma, coef0)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------
# Images -> features
# ---------------------------------------------------------------------------------------------


def iter_image_folder(folder: Union[str, os.PathLike]) -> Iterator[Tensor]:
    """Images of a folder (not recursive, sorted by name) as (3, H, W) float tensors in [0, 1]."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder: not a directory: {root}")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        yield torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)


def _iter_batches(images: ImageSource, batch_size: int, name: str) -> Iterator[Tensor]:
    # Single images are grouped into batches of equal size; a change of size closes the batch,
    # so folders of mixed sizes work with extractors that resize (as Inception does).
    if isinstance(images, (str, os.PathLike)):
        images = iter_image_folder(images)
    elif isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"{name}: expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
        images = images.split(batch_size)
    pending: List[Tensor] = []
    for item in images:
        if not isinstance(item, Tensor) or item.dim() not in (3, 4) or item.shape[-3] != 3:
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"{name}: expected (3, H, W) or (B, 3, H, W) RGB tensors, got {shape}")
        if item.dim() == 4:
            if pending:
                yield torch.stack(pending)
                pending = []
            yield from item.split(batch_size)
            continue
        if pending and (item.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending)
            pending = []
        pending.append(item)
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def extract_features(
    images: ImageSource,
    feature_extractor: Callable[[Tensor], Tensor],
    batch_size: int = 50,
    device: Union[str, torch.device] = "cpu",
) -> Tensor:
    """Features of a set of images, (N, D) float64 on the CPU.

    Args:
        images: a folder path, an (N, 3, H, W) tensor, or an iterable of (3, H, W) or
            (B, 3, H, W) tensors, all RGB in [0, 1].
        feature_extractor: callable (B, 3, H, W) in [0, 1] -> (B, D), already on ``device`` and
            in eval mode.
        batch_size: images per call of the extractor.
        device: where the images are sent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    chunks = []
    for batch in _iter_batches(images, batch_size, "images"):
        feats = feature_extractor(batch.to(device))
        if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != batch.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(
                f"feature_extractor: expected (B, D) features for {batch.shape[0]} images, got {shape}"
            )
        chunks.append(feats.detach().to("cpu", torch.float64))
    if not chunks:
        raise ValueError("images: the set is empty")
    return torch.cat(chunks)


def compute_fid_kid(
    real_images: ImageSource,
    fake_images: ImageSource,
    feature_extractor: Callable[[Tensor], Tensor],
    batch_size: int = 50,
    device: Union[str, torch.device] = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 2020,
) -> Dict[str, float]:
    """FID and KID between two image sets under one feature extractor.

    Args:
        real_images, fake_images: folder paths, (N, 3, H, W) tensors or iterables of tensors in
            [0, 1] (see :func:`extract_features`).
        feature_extractor: callable (B, 3, H, W) in [0, 1] -> (B, D), e.g.
            :func:`load_inception` for the standard FID.
        batch_size, device: see :func:`extract_features`.
        kid_subsets, kid_subset_size, kid_seed: see :func:`kernel_inception_distance`.

    Returns:
        dict(fid=..., kid_mean=..., kid_std=...) as Python floats.

    Example:
        >>> scores = compute_fid_kid("results/fake_B", "datasets/trainB", load_inception("pt.pth"))  # doctest: +SKIP
    """
    real = extract_features(real_images, feature_extractor, batch_size=batch_size, device=device)
    fake = extract_features(fake_images, feature_extractor, batch_size=batch_size, device=device)
    return fid_kid_from_features(real, fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                 kid_seed=kid_seed)


def fid_kid_from_features(
    real: Tensor,
    fake: Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 2020,
) -> Dict[str, float]:
    """:func:`compute_fid_kid` from the two sets' features, (N, D) and (M, D) (:func:`extract_features`):
    for scoring several fake sets against one real set, whose features are then extracted once."""
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            "feature_extractor: feature sizes differ between the sets, "
            f"{real.shape[1]} vs {fake.shape[1]}"
        )
    mu_real, sigma_real = feature_statistics(real)
    mu_fake, sigma_fake = feature_statistics(fake)
    kid_mean, kid_std = kernel_inception_distance(
        real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed
    )
    return {
        "fid": frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
    }


# ---------------------------------------------------------------------------------------------
# The standard FID Inception-v3 (through torch-fidelity)
# ---------------------------------------------------------------------------------------------


def _hub_checkpoint_dir() -> Path:
    # torch.hub caches downloads in <hub dir>/checkpoints; the hub dir follows $TORCH_HOME.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_weights_message(reason: str) -> str:
    return (
        f"{reason}. FID/KID need the Inception-v3 weights file '{INCEPTION_WEIGHTS_FILENAME}' "
        f"(pytorch-fid's '{PYTORCH_FID_WEIGHTS_FILENAME}' also works): put it in "
        f"{_hub_checkpoint_dir()} (torch-fidelity's cache, follows $TORCH_HOME) or pass its path "
        f"with --inception-weights PATH (inception_weights=... in Python). On a machine with internet, "
        f"--download-inception (allow_download=True) fetches it from {INCEPTION_WEIGHTS_URL}"
    )


def find_inception_weights(
    weights_path: Optional[Union[str, os.PathLike]] = None,
) -> Optional[Path]:
    """The Inception weights file to use: ``weights_path`` if given (it must exist), else the
    torch.hub cache copy if present, else None. Never touches the network."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            problem = "is a folder, not a weights file" if path.is_dir() else "not found"
            raise WeightsNotFoundError(_missing_weights_message(f"Inception weights {path}: {problem}"))
        return path
    for filename in (INCEPTION_WEIGHTS_FILENAME, PYTORCH_FID_WEIGHTS_FILENAME):
        cached = _hub_checkpoint_dir() / filename
        if cached.is_file():
            return cached
    return None


def _import_torch_fidelity_inception():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError(
            "FID/KID with Inception-v3 need torch-fidelity: pip install torch-fidelity "
            "(or pip install lowcon[fid])"
        ) from error
    return FeatureExtractorInceptionV3


class InceptionFeatureExtractor(nn.Module):
    """The FID Inception-v3 (2015-12-05 TensorFlow graph, torch-fidelity port): 2048-d pool features.

    Args:
        weights_path: the local weights file (see :func:`load_inception` to find it).

    Shape:
        Input: (B, 3, H, W) RGB in [0, 1], any size (resized to 299x299 inside, TensorFlow-1
        bilinear). Output: (B, 2048) float32.

    Reference:
        C. Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016;
        torch-fidelity (A. Obukhov et al.), ``FeatureExtractorInceptionV3``.
    """

    def __init__(self, weights_path: Union[str, os.PathLike]) -> None:
        super().__init__()
        path = find_inception_weights(weights_path)
        extractor_class = _import_torch_fidelity_inception()
        try:
            self.net = extractor_class(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        except Exception as err:  # torch.load and load_state_dict raise many types for a wrong file
            raise ValueError(f"{path}: not the FID Inception-v3 weights file ({first_line(err)[:120]})") from None
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatureExtractor":
        # A fixed measuring instrument: batch-norm statistics must never update.
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, 3, H, W) RGB images in [0, 1], got {shape}")
        # torch-fidelity takes bytes, as the original TensorFlow code took decoded images; images
        # read from 8-bit files come back exactly.
        as_bytes = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        (features,) = self.net(as_bytes)
        return features


def load_inception(
    weights_path: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
    allow_download: bool = False,
) -> InceptionFeatureExtractor:
    """The FID Inception-v3 from a local file, in eval mode on ``device``.

    Args:
        weights_path: the weights file; None looks for it in torch.hub's checkpoints folder
            (where torch-fidelity caches its download).
        device: where the network goes.
        allow_download: with no local file, download torch-fidelity's file into that folder.
            Off by default so that an offline machine fails at once with
            :class:`WeightsNotFoundError`.

    Raises:
        WeightsNotFoundError: no weights file, and no download allowed or possible; the message
            names the file, the cache folder and the ``--inception-weights`` option.
    """
    path = find_inception_weights(weights_path)
    if path is not None:
        return InceptionFeatureExtractor(path).to(device)
    if not allow_download:
        raise WeightsNotFoundError(
            _missing_weights_message("Inception weights not found and downloads are off")
        )
    target = _hub_checkpoint_dir() / INCEPTION_WEIGHTS_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), progress=False)
    except (urllib.error.URLError, OSError) as error:
        raise WeightsNotFoundError(
            _missing_weights_message(f"Inception weights download failed ({error})")
        ) from None
    return InceptionFeatureExtractor(target).to(device)


def folder_fid_kid(
    real_dir: Union[str, os.PathLike],
    fake_dir: Union[str, os.PathLike],
    inception_weights: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 50,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    allow_download: bool = False,
) -> Dict[str, float]:
    """FID and KID between two folders of images with the standard Inception-v3.

    Images are read with PIL in any format and converted to RGB; the network resizes them to
    299x299. See :func:`compute_fid_kid` and :func:`load_inception` for the arguments.

    Returns:
        dict(fid=..., kid_mean=..., kid_std=...).

    Example:
        >>> folder_fid_kid("results/horse2zebra/fake_B", "datasets/horse2zebra/testB",  # doctest: +SKIP
        ...                inception_weights="weights-inception-2015-12-05-6726825d.pth")
    """
    for name, folder in (("real_dir", real_dir), ("fake_dir", fake_dir)):
        if not Path(folder).is_dir():
            raise ValueError(f"{name}: not a directory: {folder}")
    extractor = load_inception(inception_weights, device=device, allow_download=allow_download)
    return compute_fid_kid(
        real_dir,
        fake_dir,
        extractor,
        batch_size=batch_size,
        device=device,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )
