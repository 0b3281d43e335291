"""Winograd F(4x4, 3x3) and F(3x3, 4x4) convolutions: the transform matrices against the published
ones, values and gradients against float64 ``F.conv2d`` (a direct sum, an independent formulation),
the fast-path rules, and the switch of a network's layers."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowcon.models.winograd as wg
from lowcon.models.resnet_generator import ResnetGenerator
from lowcon.models.winograd import (WinogradConv2d, conv_input_grad, conv_weight_grad, fast_path_applies, toom_cook,
                                    use_winograd, winograd_conv)


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def test_toom_cook_gives_the_published_matrices():
    # F(4, 3) with the points 0, +-1, +-2, as published (Lavin & Gray, CVPR 2016)
    at, g, bt = toom_cook(4, 3)
    assert bt == [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    assert g == [[Fraction(1, 4), 0, 0], [Fraction(-1, 6)] * 3, [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
                 [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)], [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
                 [0, 0, 1]]
    assert at == [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook(4, 3, (0, 1, 1, 2, -2))


@pytest.mark.parametrize("m, r", [(4, 3), (3, 4), (2, 3)])
def test_toom_cook_is_exact_correlation(m, r):
    # A^T ((G g) * (B^T d)) against the correlation sum_k g[k] d[i + k], in exact fractions, for
    # the unit filters and signals (so for all of them, by linearity).
    at, g, bt = toom_cook(m, r, (0, 1, -1, 2, -2)[:m + r - 2])
    n = m + r - 1
    for tap in range(r):
        for pixel in range(n):
            gg = [sum(row[k] * (k == tap) for k in range(r)) for row in g]
            dd = [sum(row[k] * (k == pixel) for k in range(n)) for row in bt]
            y = [sum(at[i][j] * gg[j] * dd[j] for j in range(n)) for i in range(m)]
            assert y == [int(pixel == i + tap) for i in range(m)]


def test_constant_image_and_filter_by_hand():
    # Every output pixel sums 3 x 3 taps x 2 channels of 1 * 0.5: 9.0, and the input gradient of a
    # unit output gradient counts how many outputs each input pixel feeds (1, 2 or 3 per axis).
    x = torch.ones(1, 2, 7, 9, requires_grad=True)
    w = torch.full((1, 2, 3, 3), 0.5, requires_grad=True)
    y = winograd_conv(x, w)
    assert y.shape == (1, 1, 5, 7)
    assert torch.allclose(y, torch.full_like(y, 9.0), atol=1e-5)
    y.sum().backward()
    per_row, per_col = torch.tensor([1., 2, 3, 3, 3, 2, 1]), torch.tensor([1., 2, 3, 3, 3, 3, 3, 2, 1])
    expected = 0.5 * per_row[:, None] * per_col[None, :]
    assert torch.allclose(x.grad[0, 0], expected, atol=1e-5) and torch.allclose(x.grad[0, 1], expected, atol=1e-5)
    assert torch.allclose(w.grad, torch.full_like(w, 35.0), atol=1e-4)  # each tap sees 5 x 7 ones


def _against_float64(x_shape, o, r, padding, seed, nnpack=False):
    """winograd_conv of a float32 copy of float64 (x, weight, bias), and its backward of a float64
    gradient, beside F.conv2d and its backward in float64: (output, reference) and the
    (float32, float64) gradient pairs of x, weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, dtype=torch.float64, generator=gen)
    w = torch.randn(o, x_shape[1], r, r, dtype=torch.float64, generator=gen)
    bias = torch.randn(o, dtype=torch.float64, generator=gen)
    xs, ws, bs = (t.float().requires_grad_() for t in (x, w, bias))
    y = winograd_conv(xs, ws, bs, padding, nnpack=nnpack)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    y.backward(grad.float())
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    ref = F.conv2d(xd, wd, bd, padding=padding)
    ref.backward(grad)
    return (y, ref), [(xs.grad, xd.grad), (ws.grad, wd.grad), (bs.grad, bd.grad)]


@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 13), (1, 8, 4, 10, 10), (3, 16, 16, 7, 6), (1, 4, 4, 23, 30)])
@pytest.mark.parametrize("band_bytes", [16 * 2 ** 20, 3000])  # one band, and one tile row per band
@pytest.mark.parametrize("r, padding", [(3, 0), (3, 1), (4, 1)])
def test_values_and_gradients_match_float64_direct_convolution(shape, band_bytes, r, padding, monkeypatch):
    monkeypatch.setattr(wg, "_BAND_BYTES", band_bytes)
    b, c, o, h, w_ = shape
    (y, ref), (gx, gw, gb) = _against_float64((b, c, h, w_), o, r, padding, seed=sum(shape))
    assert y.shape == ref.shape
    # F(4, 3) and F(3, 4) in float32: a few 1e-6 relative here (direct float32: about 1e-6)
    assert _relative(y, ref) < 2e-5
    assert _relative(*gx) < 2e-5
    assert _relative(*gw) < 2e-5
    assert _relative(*gb) < 1e-5


def test_gradient_helpers_match_autograd_of_direct_convolution():
    gen = torch.Generator().manual_seed(3)
    xp = torch.randn(2, 6, 12, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(2, 5, 10, 9, dtype=torch.float64, generator=gen)
    F.conv2d(xp, w).backward(grad)
    assert _relative(conv_input_grad(grad.float(), w.detach().float()), xp.grad) < 2e-5
    assert _relative(conv_weight_grad(grad.float(), xp.detach().float(), 3), w.grad) < 2e-5


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="weight \\(O, C, r, r\\) with r in \\(3, 4\\)"):
        winograd_conv(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="at least 3"):
        winograd_conv(torch.randn(1, 3, 2, 8), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="at least 4"):
        winograd_conv(torch.randn(1, 3, 8, 3), torch.randn(4, 3, 4, 4))
    with pytest.raises(ValueError, match="padding must be in 0..2"):
        winograd_conv(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=3)


def test_fast_path_rules():
    w = torch.randn(4, 8, 3, 3)
    assert fast_path_applies(torch.randn(1, 8, 34, 34), w)  # 8 x 8 tiles
    assert not fast_path_applies(torch.randn(1, 8, 18, 18), w)  # 4 x 4 tiles: too few to gain
    assert fast_path_applies(torch.randn(4, 8, 18, 18), w)  # ... unless the batch makes them up
    assert fast_path_applies(torch.randn(1, 8, 32, 32), w, padding=1)
    assert not fast_path_applies(torch.randn(1, 8, 32, 32), w, padding=3)  # F.conv2d serves it
    assert not fast_path_applies(torch.randn(1, 8, 34, 34, dtype=torch.float64), w.double())
    assert not fast_path_applies(torch.randn(1, 8, 34, 34), torch.randn(4, 8, 5, 5))
    assert fast_path_applies(torch.randn(1, 8, 25, 25), torch.randn(4, 8, 4, 4))  # 22 x 22: 8 x 8 tiles of 3
    assert not fast_path_applies(torch.randn(1, 8, 24, 24), torch.randn(4, 8, 4, 4))  # 7 x 7 tiles
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_path_applies(torch.randn(1, 8, 34, 34), w)


def test_layer_switch_keeps_parameters_and_falls_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 128, 3, stride=2, padding=1),
                        nn.Conv2d(128, 64, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1),
                        nn.Conv2d(128, 128, 4, padding=1))
    keys = list(net.state_dict())
    assert use_winograd(net) == 2  # stride 2 and the 64-channel layers stay direct
    assert [type(m) is WinogradConv2d for m in net] == [True, False, False, False, True]
    assert list(net.state_dict()) == keys
    x = torch.randn(1, 128, 32, 32)
    assert torch.allclose(net[0](x), F.conv2d(x, net[0].weight, net[0].bias, padding=1), atol=1e-4)
    assert torch.allclose(net[4](x), F.conv2d(x, net[4].weight, net[4].bias, padding=1), atol=1e-4)
    xd = x.double()  # float64 runs F.conv2d itself: exactly
    assert torch.equal(net[0].double()(xd), F.conv2d(xd, net[0].weight, net[0].bias, padding=1))
    with pytest.raises(ValueError, match="min_channels"):
        use_winograd(net, 0)


def test_resnet_generator_trains_the_same_with_and_without(monkeypatch):
    calls = []
    conv = wg._conv
    monkeypatch.setattr(wg, "_conv", lambda *a, **k: calls.append(1) or conv(*a, **k))
    torch.manual_seed(0)
    direct = ResnetGenerator(ngf=32, n_blocks=2)  # 128 channels in the residual blocks
    fast = ResnetGenerator(ngf=32, n_blocks=2)
    fast.load_state_dict(direct.state_dict())
    assert use_winograd(fast) == 4  # the blocks' convs; the 64 <-> 128 down- and up-convs stay direct
    x = torch.randn(1, 3, 128, 128)  # 32 x 32 in the blocks: 64 tiles, the fast path's least
    outs, grads = [], []
    for net in (direct, fast):
        y, feats = net.forward_with_features(x, (4, 12, 13))
        (y.square().mean() + sum(f.mean() for f in feats)).backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    # 2 blocks x 2 convs, a forward and an input gradient each (the weight gradients do not go
    # through _conv): the fused second convs ran the fast path as well
    assert len(calls) == 8
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    assert _relative(grads[1], grads[0].double()) < 1e-3


def test_band_size_is_set_and_checked(monkeypatch):
    from lowcon.config import ConfigError, from_dict
    from lowcon.dehazing import DehazeConfig

    monkeypatch.setattr(wg, "_BAND_BYTES", wg._BAND_BYTES)  # restored after the test
    wg.set_band_size(4)
    assert wg._BAND_BYTES == 4 * 2 ** 20
    # 256 channels, 16 tiles a row take 36 * 4 * 16 * 256 bytes = 0.5625 MB: 7 rows in 4 MB, so
    # 16 rows go in three bands of about the same size
    assert wg._bands(256, 16, 16) == [(0, 6), (6, 5), (11, 5)]
    assert wg._bands(256, 7, 16) == [(0, 7)]
    with pytest.raises(ValueError, match="band size"):
        wg.set_band_size(0)
    with pytest.raises((ConfigError, ValueError), match="winograd_band_mb"):
        from_dict(DehazeConfig, {"winograd_band_mb": 0})


def test_configs_switch_the_networks():
    from lowcon.dehazing import DehazeConfig, build_network
    from lowcon.translation import TranslationConfig, build_discriminator, build_generator

    def count(net):
        return sum(type(m) is WinogradConv2d for m in net.modules())

    # 18 block convs, the two down- and the two up-convs (64 <-> 128 <-> 256 channels)
    assert count(build_generator(TranslationConfig(method="cut"))) == 22
    assert count(build_generator(TranslationConfig(method="cut", winograd=False))) == 0
    # the 4x4 stride-1 convs of 64 channels or more: all but the first and the last when
    # anti-aliased (CUT), and only the 256 -> 512 one with strided convs (CycleGAN)
    assert count(build_discriminator(TranslationConfig(method="cut"))) == 3
    assert count(build_discriminator(TranslationConfig(method="cyclegan", antialias=False))) == 1
    assert count(build_discriminator(TranslationConfig(method="cut", winograd=False))) == 0
    assert count(build_network(DehazeConfig())) == 2  # the shared FA block's two convs
    assert count(build_network(DehazeConfig(winograd=False))) == 0


def test_keeps_only_the_unpadded_input_and_weight_for_backward():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    assert use_winograd(conv, 8) == 1
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv(x)
    # no padded copy of x (34 x 34) is kept: it is made again in backward
    assert sorted(t.data_ptr() for t in saved) == sorted([x.data_ptr(), conv.weight.data_ptr()])
    y.square().sum().backward()
    xd, wd = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    F.conv2d(xd, wd, padding=1).square().sum().backward()
    assert _relative(x.grad, xd.grad) < 2e-5 and _relative(conv.weight.grad, wd.grad) < 2e-5


# -- NNPACK for the forward pass and the input gradient of large maps -------------------------------

needs_nnpack = pytest.mark.skipif(not wg.nnpack_works(), reason="this torch build has no working NNPACK")


@pytest.fixture
def nnpack_on(monkeypatch):
    """OpenMP said to spin briefly, and a count of the NNPACK calls."""
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    calls = []
    real = wg._nnpack_conv
    monkeypatch.setattr(wg, "_nnpack_conv", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@needs_nnpack
@pytest.mark.parametrize("b, r, padding", [(1, 3, 1), (2, 3, 0), (2, 4, 1), (1, 4, 0)])
def test_nnpack_values_and_gradients_match_float64_direct_convolution(nnpack_on, b, r, padding):
    (y, ref), (gx, gw, gb) = _against_float64((b, 6, 61, 64), 5, r, padding, seed=10 * r + padding, nnpack=True)
    # the forward pass and the input gradient went through NNPACK
    assert nnpack_on == [(b, 6, 61, 64), y.shape]
    assert y.shape == ref.shape
    # NNPACK's F(6x6, 3x3) and FFT: about 1e-5 relative here
    assert _relative(y, ref) < 5e-5
    assert _relative(*gx) < 5e-5
    assert _relative(*gw) < 2e-5  # lowcon's own transforms
    assert _relative(*gb) < 1e-5


@needs_nnpack
def test_nnpack_serves_only_large_maps_and_only_when_openmp_spins_briefly(nnpack_on, monkeypatch):
    w = torch.randn(3, 4, 3, 3)
    small = torch.randn(1, 4, wg.NNPACK_MIN_SIDE - 1, 80, requires_grad=True)
    winograd_conv(small, w, padding=1, nnpack=True).sum().backward()
    assert nnpack_on == []  # 55 rows: lowcon's transforms, forward and backward
    too_large = torch.randn(1, 4, 513, 512)  # above NNPACK_MAX_PIXELS: its scratch would grow with it
    winograd_conv(too_large, w, padding=1, nnpack=True)
    assert nnpack_on == []
    large = torch.randn(1, 4, wg.NNPACK_MIN_SIDE, 80)
    winograd_conv(large, w, padding=1, nnpack=True)
    assert len(nnpack_on) == 1
    winograd_conv(large, w, padding=1)  # not asked for
    assert len(nnpack_on) == 1
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # OpenMP's default spinning: the pools compete
    winograd_conv(large, w, padding=1, nnpack=True)
    assert len(nnpack_on) == 1


@pytest.mark.parametrize("env, brief", [
    ({}, False), ({"GOMP_SPINCOUNT": "20000"}, True), ({"GOMP_SPINCOUNT": "100000"}, True),
    ({"GOMP_SPINCOUNT": "300000"}, False), ({"GOMP_SPINCOUNT": "infinity"}, False),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, True), ({"OMP_WAIT_POLICY": "active"}, False),
])
def test_openmp_spins_briefly_reads_the_environment(env, brief):
    assert wg.openmp_spins_briefly(env) is brief


def test_without_nnpack_in_torch_the_own_transforms_run(monkeypatch):
    monkeypatch.setattr(wg, "_nnpack_state", {})
    monkeypatch.setattr(torch, "_nnpack_available", lambda: False)
    assert wg.nnpack_works() is False
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    assert wg.nnpack_usable() is False
    x = torch.randn(1, 4, 64, 64)
    w = torch.randn(3, 4, 3, 3)
    got = winograd_conv(x, w, padding=1, nnpack=True)
    assert _relative(got, F.conv2d(x.double(), w.double(), padding=1)) < 2e-5


def test_translation_configs_turn_nnpack_on_and_off_per_network():
    from lowcon.dehazing import DehazeConfig, build_network
    from lowcon.translation import TranslationConfig, build_method

    def flags(net):
        return [m.nnpack for m in net.modules() if isinstance(m, wg.WinogradConv2d)]

    small = dict(method="fastcut", ngf=64, ndf=64, n_blocks=1, nce_layers=(0, 4))
    on = build_method(TranslationConfig(**small), steps_per_epoch=1)
    # G's and D's Winograd layers (128 channels and more) ask for NNPACK
    on_g, on_d = flags(on.G), flags(on.D)
    assert len(on_g) == 6 and all(on_g) and len(on_d) == 3 and all(on_d)
    off = build_method(TranslationConfig(**small, nnpack=False), steps_per_epoch=1)
    assert flags(off.G) == [False] * 6 and flags(off.D) == [False] * 3
    # each network keeps its own: building another (or AECR-Net, which never asks) changes nothing
    aecr = flags(build_network(DehazeConfig()))
    assert flags(on.G) == on_g and aecr and not any(aecr)
    # the 7x7 convolutions are switched whatever `winograd` says, and only with `nnpack`
    method = build_method(TranslationConfig(**small, winograd=False), steps_per_epoch=1)
    assert sum(type(m) is wg.NNPACKConv2d for m in method.G.modules()) == 2
    assert sum(type(m) is wg.WinogradConv2d for m in method.G.modules()) == 0
    assert sum(type(m) is wg.NNPACKConv2d for m in off.G.modules()) == 0


@needs_nnpack
@pytest.mark.parametrize("c, o, padding, bias", [(3, 5, 0, True), (6, 3, 3, False)])
def test_nnpack_7x7_values_and_gradients_match_float64_direct_convolution(nnpack_on, c, o, padding, bias):
    gen = torch.Generator().manual_seed(c + padding)
    x = torch.randn(2, c, 64, 62, dtype=torch.float64, generator=gen)
    w = torch.randn(o, c, 7, 7, dtype=torch.float64, generator=gen)
    b = torch.randn(o, dtype=torch.float64, generator=gen) if bias else None
    conv = nn.Conv2d(c, o, 7, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias:
            conv.bias.copy_(b)
    assert wg.use_nnpack(nn.Sequential(conv)) == 1 and type(conv) is wg.NNPACKConv2d
    xs = x.float().requires_grad_()
    y = conv(xs)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    y.backward(grad.float())
    assert nnpack_on == [xs.shape, y.shape]  # the forward pass and the input gradient
    xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
    bd = b.clone().requires_grad_() if bias else None
    ref = F.conv2d(xd, wd, bd, padding=padding)
    ref.backward(grad)
    assert _relative(y, ref) < 2e-5
    assert _relative(xs.grad, xd.grad) < 2e-5
    assert _relative(conv.weight.grad, wd.grad) < 2e-5
    if bias:
        assert _relative(conv.bias.grad, bd.grad) < 1e-5


@pytest.mark.parametrize("b, c, o, k, size", [(1, 21, 3, 7, (20, 17)), (3, 9, 2, 5, (12, 30)), (2, 4, 1, 3, (6, 6))])
def test_shifted_weight_grad_is_the_weight_gradient_in_float64(b, c, o, k, size):
    gen = torch.Generator().manual_seed(b + c + k)
    xp = torch.randn(b, c, *size, dtype=torch.float64, generator=gen)
    w = torch.randn(o, c, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(b, o, size[0] - k + 1, size[1] - k + 1, dtype=torch.float64, generator=gen)
    F.conv2d(xp, w).backward(grad)
    # the same sums in another order: equal to float64's rounding
    assert torch.allclose(wg.shifted_weight_grad(grad, xp, k), w.grad, rtol=1e-12, atol=1e-12)
    # a 1x1 "filter" of one channel is the sum of products, by hand
    one = wg.shifted_weight_grad(grad[:, :1], xp[:, :1, :grad.shape[2], :grad.shape[3]], 1)
    assert torch.allclose(one, (grad[:, :1] * xp[:, :1, :grad.shape[2], :grad.shape[3]]).sum().view(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"not the output of a 4x4 filter"):
        wg.shifted_weight_grad(grad, xp, 4)


@needs_nnpack
def test_7x7_to_few_channels_takes_the_shifted_weight_gradient(nnpack_on, monkeypatch):
    calls = []
    real = wg.shifted_weight_grad
    monkeypatch.setattr(wg, "shifted_weight_grad", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 60, 58, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 24, 7, 7, dtype=torch.float64, generator=gen)
    bias = torch.randn(3, dtype=torch.float64, generator=gen)
    xs, ws, bs = (t.float().requires_grad_() for t in (x, w, bias))
    y = wg.nnpack_conv(xs, ws, bs, padding=2)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    y.backward(grad.float())
    assert calls == [y.shape]  # 3 * 7 <= 24 channels: the shifted products, not aten
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, bias))
    F.conv2d(xd, wd, bd, padding=2).backward(grad)
    assert _relative(ws.grad, wd.grad) < 2e-5
    assert _relative(bs.grad, bd.grad) < 1e-5
    assert _relative(xs.grad, xd.grad) < 2e-5
    calls.clear()
    wide = torch.randn(24, 3, 7, 7, requires_grad=True)  # to many channels: aten's weight gradient
    wg.nnpack_conv(torch.randn(1, 3, 60, 60), wide, padding=3).sum().backward()
    assert calls == [] and wide.grad is not None


def test_use_nnpack_switches_only_large_stride_1_filters(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)  # OpenMP's default spinning: NNPACK not usable
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    net = nn.Sequential(nn.Conv2d(3, 8, 7), nn.Conv2d(8, 8, 7, stride=2), nn.Conv2d(8, 8, 3),
                        nn.Conv2d(8, 8, 5, groups=2), nn.Conv2d(8, 8, 5, padding=2, padding_mode="reflect"),
                        nn.Conv2d(8, 3, 5))
    assert wg.use_nnpack(net) == 2
    assert [type(m) is wg.NNPACKConv2d for m in net] == [True, False, False, False, False, True]
    # Without NNPACK usable (here: OpenMP spins long) the layer is nn.Conv2d's own.
    x = torch.randn(1, 3, 60, 60)
    assert torch.equal(net[0](x), F.conv2d(x, net[0].weight, net[0].bias))


@needs_nnpack
def test_a_generator_trains_the_same_through_nnpack(nnpack_on, monkeypatch):
    # The fused runs (the last 7x7 convolution after its reflection pad) and the plain 7x7 and
    # 3x3 layers through NNPACK: the same output and gradients as the plain layers, to float32.
    from lowcon.models.resnet_generator import ResnetGenerator

    torch.manual_seed(0)
    plain = ResnetGenerator(ngf=8, n_blocks=1, nce_layers=(0, 4))
    fast = ResnetGenerator(ngf=8, n_blocks=1, nce_layers=(0, 4))
    fast.load_state_dict(plain.state_dict())
    assert use_winograd(fast, 8, nnpack=True) > 0 and wg.use_nnpack(fast) == 2
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for net in (plain, fast):
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])))
    assert len(nnpack_on) > 4  # forward passes and input gradients of the 7x7 and the 64x64 3x3 layers
    assert _relative(grads[1][0], grads[0][0].double()) < 1e-4
    # all parameters' gradients as one vector: the biases before instance norm have a gradient
    # of zero but for rounding, so each on its own would compare noise with noise
    assert _relative(grads[1][1], grads[0][1].double()) < 1e-4
    # the same network's 3x3 layers switched without asking for NNPACK: lowcon's own transforms,
    # fused runs included
    calls = len(nnpack_on)
    own = ResnetGenerator(ngf=8, n_blocks=1, nce_layers=(0, 4))
    assert use_winograd(own, 8) > 0
    own(x).sum().backward()
    assert len(nnpack_on) == calls
