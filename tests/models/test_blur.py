import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowcon.models.blur import Downsample, Upsample, binomial_filter


def test_binomial_filter_rows_of_pascals_triangle():
    np.testing.assert_allclose(binomial_filter(3).numpy() * 16, np.outer([1, 2, 1], [1, 2, 1]))
    np.testing.assert_allclose(binomial_filter(4).numpy() * 64, np.outer([1, 3, 3, 1], [1, 3, 3, 1]))
    assert float(binomial_filter(5).sum()) == pytest.approx(1.0)


def _blur_pool_loop(x: np.ndarray) -> np.ndarray:
    """Reflect pad 1, then [1,2,1]x[1,2,1]/16 at every second pixel, by explicit loops."""
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    b, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")  # mirror without edge repeat
    out = np.zeros((b, c, (h + 1) // 2, (w + 1) // 2))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            window = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            out[:, :, i, j] = (window * kernel).sum(axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [(5, 6), (4, 4), (7, 3)])
def test_downsample_equals_reflect_padded_binomial_blur_with_stride_2(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    y = Downsample(3).double()(x)
    np.testing.assert_allclose(y.numpy(), _blur_pool_loop(x.numpy()), rtol=0, atol=1e-12)


def _upsample_1d(x: np.ndarray, axis: int) -> np.ndarray:
    """out[2i] = (x[i-1] + 3 x[i]) / 4, out[2i+1] = (3 x[i] + x[i+1]) / 4, edges repeated."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    out = np.zeros(x.shape[:-1] + (2 * n,))
    for i in range(n):
        left, right = x[..., max(i - 1, 0)], x[..., min(i + 1, n - 1)]
        out[..., 2 * i] = (left + 3 * x[..., i]) / 4
        out[..., 2 * i + 1] = (3 * x[..., i] + right) / 4
    return np.moveaxis(out, -1, axis)


def test_upsample_equals_separable_1331_formula_and_bilinear():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = Upsample(3).double()(x)
    assert y.shape == (2, 3, 8, 10)
    expected = _upsample_1d(_upsample_1d(x.numpy(), axis=2), axis=3)
    np.testing.assert_allclose(y.numpy(), expected, rtol=0, atol=1e-12)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(y.numpy(), bilinear.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (7, 4), (16, 16)])
def test_upsample_gradient_is_the_adjoint_of_bilinear_interpolation(size):
    # input_grad (a replicate-padded blur-pool) against aten's backward of the interpolation,
    # and the layer's own backward on the CPU; its ops are differentiable, so a second order too
    g = torch.Generator().manual_seed(sum(size))
    up = Upsample(3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, 2 * size[0], 2 * size[1], dtype=torch.float64, generator=g)
    (expected,) = torch.autograd.grad(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), x, grad)
    torch.testing.assert_close(up.input_grad(grad), expected, rtol=0, atol=1e-12)
    (ours,) = torch.autograd.grad(up(x), x, grad)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradgradcheck(up, (x,))


def test_constant_image_stays_constant():
    x = torch.full((1, 4, 6, 7), 0.3)
    torch.testing.assert_close(Downsample(4)(x), torch.full((1, 4, 3, 4), 0.3))
    torch.testing.assert_close(Upsample(4)(x), torch.full((1, 4, 12, 14), 0.3))


def test_filters_are_buffers_named_as_the_official_checkpoints():
    down, up = Downsample(5), Upsample(5)
    assert list(down.state_dict()) == ["filt"] and down.filt.shape == (5, 1, 3, 3)
    assert list(up.state_dict()) == ["filt"] and up.filt.shape == (5, 1, 4, 4)
    assert list(down.parameters()) == [] and list(up.parameters()) == []


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="padding"):
        Downsample(3, padding="circular")
    with pytest.raises(ValueError, match="channels"):
        Upsample(0)
    with pytest.raises(ValueError, match="x must have shape"):
        Downsample(3)(torch.zeros(1, 4, 8, 8))
