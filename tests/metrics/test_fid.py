"""FID / KID math against closed forms and explicit loops; image plumbing with a tiny network."""
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from lowcon.metrics.fid import (
    INCEPTION_WEIGHTS_FILENAME,
    InceptionFeatureExtractor,
    WeightsNotFoundError,
    compute_fid_kid,
    feature_statistics,
    find_inception_weights,
    folder_fid_kid,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
)


def _random_spd(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ----------------------------------------------------------------------------- FID math


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 2.0, 6), rng.uniform(0.1, 2.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)  # tensors or arrays
    assert got == pytest.approx(expected, abs=1e-6)


def test_feature_statistics_and_fid_of_a_set_with_itself():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((20, 32))  # N < D: singular covariance
    mu, sigma = feature_statistics(torch.from_numpy(feats).float())
    np.testing.assert_allclose(mu, feats.mean(axis=0), atol=1e-6)
    centred = feats - feats.mean(axis=0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 19, atol=1e-5)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    with pytest.raises(ValueError, match="features"):
        feature_statistics(feats[:1])
    with pytest.raises(ValueError, match="mu1, sigma1, mu2, sigma2"):
        frechet_distance(mu, sigma, mu[:3], sigma)


# ----------------------------------------------------------------------------- KID math


def _explicit_unbiased_mmd2(x, y):
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_explicit_loop():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((7, 5))
    fake = rng.standard_normal((7, 5)) + 0.5
    # One subset of all n rows: a permutation, to which the MMD estimate is invariant.
    mean, std = kernel_inception_distance(real, fake, subsets=1, subset_size=7)
    assert mean == pytest.approx(_explicit_unbiased_mmd2(real, fake), rel=1e-10)
    assert std == 0.0
    # subset_size above both set sizes is clipped to the smaller set instead of failing.
    clipped, _ = kernel_inception_distance(real, fake, subsets=1, subset_size=1000)
    assert clipped == pytest.approx(mean, rel=1e-10)


def test_kid_subsets_match_torch_fidelity():
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid", reason="torch-fidelity not installed")
    rng = np.random.default_rng(4)
    real = rng.standard_normal((30, 16)).astype(np.float32)
    fake = (rng.standard_normal((25, 16)) * 1.2).astype(np.float32)
    mean, std = kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=7)
    reference = metric_kid.kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=5,
        kid_subset_size=10,
        rng_seed=7,
        verbose=False,
    )
    assert mean == pytest.approx(reference[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert std == pytest.approx(reference[metric_kid.KEY_METRIC_KID_STD], rel=1e-6)


# ----------------------------------------------------------------------------- images -> FID/KID


class _TinyExtractor(nn.Module):
    """A random conv net standing in for Inception: (B, 3, H, W) -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_compute_fid_kid_end_to_end_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(12, 3, 16, 16, generator=gen)
    fake = torch.rand(10, 3, 16, 16, generator=gen) * 0.5
    net = _TinyExtractor().eval()
    # Fake images given as an iterable of single images, real ones as a tensor, batch size 4.
    scores = compute_fid_kid(real, list(fake), net, batch_size=4, kid_subsets=3, kid_subset_size=6)
    with torch.no_grad():
        fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    diff = fr.mean(0) - ff.mean(0)
    expected = diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert scores["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-8)
    assert scores["fid"] > 0 and np.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0
    same = compute_fid_kid(real, real, net, kid_subsets=1, kid_subset_size=12)
    assert abs(same["fid"]) < 1e-6


def test_compute_fid_kid_reads_folders_of_mixed_sizes(tmp_path):
    rng = np.random.default_rng(5)
    for name, count in (("real", 4), ("fake", 3)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(count):
            size = (20, 16) if i % 2 else (24, 24)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "grey.png")
        (folder / "notes.txt").write_text("not an image")
    scores = compute_fid_kid(tmp_path / "real", tmp_path / "fake", _TinyExtractor().eval(), batch_size=2)
    assert set(scores) == {"fid", "kid_mean", "kid_std"} and np.isfinite(scores["fid"])
    with pytest.raises(ValueError, match="no images"):
        compute_fid_kid(tmp_path / "real" / "..", tmp_path / "fake", _TinyExtractor())


# ----------------------------------------------------------------------------- Inception weights


def test_load_inception_without_weights_fails_fast_with_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        load_inception()
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILENAME in message
    assert "--inception-weights" in message
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in message
    with pytest.raises(WeightsNotFoundError, match="missing.pth: not found"):
        load_inception(tmp_path / "missing.pth")
    with pytest.raises(WeightsNotFoundError, match="is a folder, not a weights file"):
        load_inception(tmp_path)
    (tmp_path / "real").mkdir()
    with pytest.raises(WeightsNotFoundError, match=INCEPTION_WEIGHTS_FILENAME):
        folder_fid_kid(tmp_path / "real", tmp_path / "real")


def test_find_inception_weights_uses_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_inception_weights() is None
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_WEIGHTS_FILENAME).write_bytes(b"placeholder")
    assert find_inception_weights() == cache / INCEPTION_WEIGHTS_FILENAME


def test_inception_extractor_wraps_torch_fidelity(tmp_path, monkeypatch):
    inception = pytest.importorskip(
        "torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity not installed"
    )
    # No real weights offline: keep the random initialisation to check shapes and plumbing.
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    weights = tmp_path / "random.pth"
    torch.save({}, weights)
    extractor = load_inception(weights)
    assert isinstance(extractor, InceptionFeatureExtractor)
    assert not extractor.train().training and not extractor.net.training  # stays in eval mode
    images = torch.rand(1, 3, 40, 52)
    features = extractor(images)
    assert features.shape == (1, 2048) and torch.isfinite(features).all()
    # The [0, 1] -> bytes conversion: the library sees exactly round(255 x).
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(features, extractor.net(as_bytes)[0])
