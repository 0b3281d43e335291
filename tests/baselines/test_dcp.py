"""Dark Channel Prior: each step against explicit loops, and recovery of a synthetic haze."""
import numpy as np
import pytest
import torch

from lowcon.baselines.dcp import (
    DarkChannelPrior,
    box_filter,
    dark_channel,
    dehaze_dcp,
    estimate_atmospheric_light,
    guided_filter,
)


def window(a, i, j, r):
    """The (2r+1)^2 window around (i, j) of a 2-D array, cut at the border."""
    return a[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1]


def psnr(a, b):
    return 10 * torch.log10(1 / ((a - b) ** 2).mean()).item()


@pytest.mark.parametrize("patch", [1, 3, 5, 15])
def test_dark_channel_against_a_min_filter_loop(patch):
    img = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    darkest = img.numpy().min(axis=1)
    expected = np.empty_like(darkest)
    for b in range(2):
        for i in range(9):
            for j in range(11):
                expected[b, i, j] = window(darkest[b], i, j, patch // 2).min()
    np.testing.assert_array_equal(dark_channel(img, patch)[:, 0].numpy(), expected)


def test_box_filter_against_window_means():
    x = torch.rand(1, 2, 8, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for r in (0, 1, 3, 20):
        expected = np.array([[[window(x[0, c].numpy(), i, j, r).mean() for j in range(13)]
                              for i in range(8)] for c in range(2)])
        np.testing.assert_allclose(box_filter(x, r)[0].numpy(), expected, rtol=1e-12)


def naive_guided_filter(guide, src, r, eps):
    """He et al. Algorithm 1 written out: per-window linear fit, then average the fits."""
    h, w = src.shape
    a, b = np.empty((h, w)), np.empty((h, w))
    for i in range(h):
        for j in range(w):
            g, p = window(guide, i, j, r), window(src, i, j, r)
            a[i, j] = ((g * p).mean() - g.mean() * p.mean()) / (g.var() + eps)
            b[i, j] = p.mean() - a[i, j] * g.mean()
    out = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = window(a, i, j, r).mean() * guide[i, j] + window(b, i, j, r).mean()
    return out


@pytest.mark.parametrize("radius, eps", [(2, 1e-2), (3, 1e-4)])
def test_guided_filter_against_naive_windows(radius, eps):
    gen = torch.Generator().manual_seed(2)
    guide = torch.rand(1, 1, 12, 10, generator=gen, dtype=torch.float64)
    src = torch.rand(1, 3, 12, 10, generator=gen, dtype=torch.float64)
    got = guided_filter(guide, src, radius, eps)
    for c in range(3):
        expected = naive_guided_filter(guide[0, 0].numpy(), src[0, c].numpy(), radius, eps)
        np.testing.assert_allclose(got[0, c].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_guided_filter_keeps_edges_of_its_guide():
    # src = guide: with a tiny eps the filter is the identity (a = 1, b = 0 in every window).
    guide = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    guide[..., 8:] = 1.0
    torch.testing.assert_close(guided_filter(guide, guide, 4, 1e-8), guide, atol=1e-6, rtol=0)


def test_atmospheric_light_mean_and_brightest():
    img = torch.full((1, 3, 10, 10), 0.1)
    haze = torch.tensor([[0.90, 0.90, 0.90], [0.80, 0.95, 0.85], [0.99, 0.70, 0.97]])
    for (i, j), colour in zip([(0, 0), (4, 7), (9, 3)], haze):
        img[0, :, i, j] = colour
    img[0, :, 5, 5] = torch.tensor([1.0, 1.0, 0.05])  # bright but not hazy: low dark channel
    dark = dark_channel(img, patch=1)
    top = 3 / 100
    mean = estimate_atmospheric_light(img, dark, top=top, method="mean")
    torch.testing.assert_close(mean.flatten(), haze.mean(0))
    brightest = estimate_atmospheric_light(img, dark, top=top, method="brightest")
    torch.testing.assert_close(brightest.flatten(), haze[0])  # sums 2.70 > 2.66 > 2.60


def synthetic_haze(size=64, t=0.5):
    """A clear image that obeys the prior (one channel near zero in every block), a sky of
    colour A on top, and I = J t + A (1 - t)."""
    gen = torch.Generator().manual_seed(3)
    blocks = torch.rand(1, 3, 8, 8, generator=gen)
    blocks = blocks.scatter(1, torch.randint(0, 3, (1, 1, 8, 8), generator=gen), 0.02)
    clear = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")
    clear = (clear + 0.03 * torch.rand(1, 3, size, size, generator=gen)).clamp(0, 1)
    light = torch.tensor([0.9, 0.85, 0.95]).view(1, 3, 1, 1)
    clear[:, :, : size // 4] = light
    return clear, clear * t + light * (1 - t), light


def test_dcp_recovers_a_synthetic_hazy_image():
    clear, hazy, light = synthetic_haze()
    torch.testing.assert_close(
        estimate_atmospheric_light(hazy, dark_channel(hazy)), light, atol=1e-6, rtol=0
    )
    out = dehaze_dcp(hazy)
    assert psnr(hazy, clear) < 12.0
    assert psnr(out, clear) > psnr(hazy, clear) + 12.0
    sharp = dehaze_dcp(hazy, radius=8, airlight="brightest")
    assert psnr(sharp, clear) > 30.0


def test_output_range_shape_and_module():
    hazy = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(4))
    out = dehaze_dcp(hazy, radius=5)
    assert out.shape == hazy.shape and out.min() >= 0 and out.max() <= 1
    dcp = DarkChannelPrior(radius=5)
    assert DarkChannelPrior.size_multiple == 1 and len(list(dcp.parameters())) == 0
    torch.testing.assert_close(dcp(hazy), out)
    black = dehaze_dcp(torch.zeros(1, 3, 8, 8))
    assert torch.isfinite(black).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"hazy: expected \(B, 3, H, W\)"):
        dehaze_dcp(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="hazy"):
        dehaze_dcp(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="patch"):
        dark_channel(torch.rand(1, 3, 8, 8), patch=4)
    with pytest.raises(ValueError, match="airlight|method"):
        dehaze_dcp(torch.rand(1, 3, 8, 8), airlight="median")
    with pytest.raises(ValueError, match="guide"):
        guided_filter(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8), 2, 1e-3)
