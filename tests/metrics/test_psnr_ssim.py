"""PSNR, SSIM and the evaluation protocols against scikit-image and independent numpy code."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lowcon.metrics.protocols import (
    PROTOCOLS,
    dehazeformer_downsample_factor,
    get_protocol,
    rgb_to_y,
)
from lowcon.metrics.psnr import PSNR, psnr
from lowcon.metrics.ssim import SSIM, ssim


def _pair(batch=2, channels=3, height=40, width=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clear = torch.rand(batch, channels, height, width, generator=gen)
    noise = 0.1 * torch.randn(batch, channels, height, width, generator=gen)
    restored = (clear + noise).clamp(0, 1)
    return restored, clear


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def _skimage_ssim(pred: np.ndarray, target: np.ndarray, channel_axis=-1) -> float:
    return structural_similarity(
        target,
        pred,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )


def _zero_padded_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """FFA-Net's SSIM written out with scipy: 2-D Gaussian window, zero 'same' padding."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    g /= g.sum()
    window = np.outer(g, g)

    def blur(a):
        return ndimage.convolve(a, window, mode="constant", cval=0.0)

    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for ch in range(pred.shape[-1]):
        x, y = pred[..., ch], target[..., ch]
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx**2
        vy = blur(y * y) - my**2
        cxy = blur(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


# ----------------------------------------------------------------------------- PSNR


def test_psnr_matches_skimage():
    restored, clear = _pair()
    values = psnr(restored, clear)
    assert values.shape == (2,) and values.dtype == torch.float64
    for i in range(2):
        expected = peak_signal_noise_ratio(_hwc(clear[i]), _hwc(restored[i]), data_range=1.0)
        assert values[i].item() == pytest.approx(expected, abs=1e-5)


def test_psnr_hand_worked_and_data_range():
    clear = torch.full((1, 3, 8, 8), 0.5)
    # Uniform error 0.1: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert psnr(clear + 0.1, clear).item() == pytest.approx(20.0, abs=1e-5)
    # Same images on a 0..255 scale: error 25.5, MSE 650.25, PSNR = 10 log10(255^2 / 650.25) = 20 dB.
    assert psnr((clear + 0.1) * 255, clear * 255, data_range=255).item() == pytest.approx(20.0, abs=1e-5)
    # Error 0.5 on one of four pixels: MSE 0.0625, PSNR = 10 log10(16) = 12.0412 dB.
    a = torch.zeros(1, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.5
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(16), abs=1e-9)


def test_psnr_identical_is_inf_and_reductions():
    restored, clear = _pair()
    assert torch.isinf(psnr(clear, clear)).all()
    per_image = psnr(restored, clear)
    assert psnr(restored, clear, reduction="mean").item() == pytest.approx(per_image.mean().item())
    assert torch.equal(PSNR()(restored, clear), per_image)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_inputs_raise_naming_the_argument(metric):
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="pred"):
        metric(x[0], x[0])
    with pytest.raises(ValueError, match="shapes differ"):
        metric(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(TypeError, match="target"):
        metric(x, x.numpy())
    with pytest.raises(ValueError, match="reduction"):
        metric(x, x, reduction="sum")
    with pytest.raises(ValueError, match="data_range"):
        metric(x, x, data_range=0)


# ----------------------------------------------------------------------------- SSIM


def test_ssim_same_padding_matches_scipy_reference():
    restored, clear = _pair(height=32, width=36)
    values = ssim(restored, clear)  # default: FFA-Net's zero 'same' padding
    for i in range(2):
        expected = _zero_padded_ssim(_hwc(restored[i]), _hwc(clear[i]))
        assert values[i].item() == pytest.approx(expected, abs=1e-6)


def test_ssim_valid_padding_matches_skimage():
    restored, clear = _pair(height=40, width=33)
    values = ssim(restored, clear, padding="valid")
    for i in range(2):
        expected = _skimage_ssim(_hwc(restored[i]), _hwc(clear[i]))
        assert values[i].item() == pytest.approx(expected, abs=1e-4)


def test_ssim_of_identical_images_is_one_and_module_matches():
    _, clear = _pair()
    assert torch.allclose(ssim(clear, clear), torch.ones(2, dtype=torch.float64), atol=1e-12)
    restored, clear = _pair(seed=3)
    assert torch.equal(SSIM(padding="valid")(restored, clear), ssim(restored, clear, padding="valid"))
    # Different conventions give different numbers on the same pair.
    assert (ssim(restored, clear) - ssim(restored, clear, padding="valid")).abs().min() > 1e-4


def test_ssim_checks_window_and_padding():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="window"):
        ssim(x, x, padding="valid")  # 8x8 image, 11x11 window
    with pytest.raises(ValueError, match="window_size"):
        ssim(x, x, window_size=4)
    with pytest.raises(ValueError, match="padding"):
        ssim(x, x, padding="reflect")


# ----------------------------------------------------------------------------- protocols


def test_get_protocol_default_and_unknown_name():
    assert get_protocol().name == "ffa"
    for name, protocol in PROTOCOLS.items():
        assert protocol.name == name and protocol.description and "\n" not in protocol.description
    with pytest.raises(ValueError, match="dehazeformer, ffa, skimage, y"):
        get_protocol("matlab")


def test_ffa_protocol_clamps_then_matches_references():
    restored, clear = _pair(height=32, width=32)
    overshoot = restored.clone()
    overshoot[:, :, :4, :4] = 1.3  # outside [0, 1]: the protocol clamps it to 1
    scores = get_protocol("ffa").evaluate(overshoot, clear)
    clamped = overshoot.clamp(0, 1)
    for i in range(2):
        p, c = _hwc(clamped[i]), _hwc(clear[i])
        assert scores["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(c, p, data_range=1.0), abs=1e-5)
        assert scores["ssim"][i].item() == pytest.approx(_zero_padded_ssim(p, c), abs=1e-6)


def test_skimage_protocol_matches_skimage():
    restored, clear = _pair(height=36, width=44)
    scores = get_protocol("skimage").evaluate(restored, clear)
    for i in range(2):
        expected = _skimage_ssim(_hwc(restored[i]), _hwc(clear[i]))
        assert scores["ssim"][i].item() == pytest.approx(expected, abs=1e-4)


def test_y_protocol_matches_bt601_luma_with_skimage():
    restored, clear = _pair(height=36, width=36)
    scores = get_protocol("y").evaluate(restored, clear)

    def luma(x):  # MATLAB rgb2ycbcr on [0, 1] data, rescaled to [0, 1]
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0

    for i in range(2):
        yp, yc = luma(_hwc(restored[i])), luma(_hwc(clear[i]))
        assert scores["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(yc, yp, data_range=1.0), abs=1e-5)
        assert scores["ssim"][i].item() == pytest.approx(_skimage_ssim(yp, yc, channel_axis=None), abs=1e-4)
    white = torch.ones(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255))


def test_dehazeformer_downsample_factor_hand_worked():
    assert dehazeformer_downsample_factor(460, 620) == 2  # round(1.797)
    assert dehazeformer_downsample_factor(256, 300) == 1
    assert dehazeformer_downsample_factor(100, 100) == 1  # max(1, round(0.39))
    assert dehazeformer_downsample_factor(640, 900) == 2  # round(2.5) == 2 in Python
    assert dehazeformer_downsample_factor(1200, 1600) == 5  # round(4.69)


def test_dehazeformer_protocol_downsamples_before_ssim():
    # A smooth clear image plus white noise: averaging 2x2 blocks removes much of the noise.
    gen = torch.Generator().manual_seed(5)
    clear = torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 16, generator=gen), size=(384, 512), mode="bilinear", align_corners=False
    )  # factor round(384 / 256) = round(1.5) = 2
    restored = (clear + 0.1 * torch.randn(clear.shape, generator=gen)).clamp(0, 1)
    scores = get_protocol("dehazeformer").evaluate(restored, clear)

    def block_mean(x):  # adaptive average pooling by an exact factor 2
        h, w, c = x.shape
        return x.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))

    p, c = _hwc(restored[0]), _hwc(clear[0])
    assert scores["psnr"][0].item() == pytest.approx(peak_signal_noise_ratio(c, p, data_range=1.0), abs=1e-5)
    expected = _skimage_ssim(block_mean(p), block_mean(c))
    assert scores["ssim"][0].item() == pytest.approx(expected, abs=1e-4)
    assert expected - _skimage_ssim(p, c) > 0.05  # the downsampling matters
