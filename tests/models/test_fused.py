import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowcon.models import fused as fused_module
from lowcon.models import winograd
from lowcon.models.blur import Downsample, Upsample
from lowcon.models.fused import (FusedSpec, InstanceNorm2d, NormActConv, ReflectPad, fused_step, instance_norm_with_stats,
                                 norm_act_conv, unfused)
from lowcon.models.patch_discriminator import PatchDiscriminator
from lowcon.models.winograd import WinogradConv2d, use_winograd


def _plain(h, weight, bias, spec: FusedSpec):
    """The same function from plain ops, differentiated by autograd: the independent formulation."""
    x = F.instance_norm(h, eps=spec.eps) if spec.eps is not None else h
    x = F.relu(x) if spec.slope == 0 else F.leaky_relu(x, spec.slope)
    if isinstance(spec.pre, ReflectPad):  # aten's padding and interpolation, with aten's backward
        x = F.pad(x, (spec.pre.size,) * 4, mode="reflect")
    elif isinstance(spec.pre, Upsample):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.conv2d(x, weight, bias, stride=spec.stride, padding=spec.padding, groups=spec.groups)


_DOWN = Downsample(3).double()

SPECS = {
    # The residual block's second half.
    "norm relu reflect-pad conv": (FusedSpec(1e-5, pre=ReflectPad(1)), (4, 3, 3, 3), True),
    # A down step's blur-pool (fixed filter, stride 2, one group per channel).
    "norm relu blur-pool": (FusedSpec(1e-5, pre=ReflectPad(1), stride=2, groups=3), None, False),
    # The discriminator's first layer: no norm, LeakyReLU, blur-pool.
    "leaky blur-pool": (FusedSpec(None, 0.2, ReflectPad(1), stride=2, groups=3), None, False),
    # An up step: upsample, then a zero-padded conv.
    "norm relu upsample conv": (FusedSpec(1e-5, pre=Upsample(3).double(), padding=1), (2, 3, 3, 3), True),
    # The last layer: reflection pad 3 and a 7x7 conv.
    "norm relu reflect-pad-3 conv7": (FusedSpec(1e-5, pre=ReflectPad(3)), (2, 3, 7, 7), True),
    # The discriminator's strided variant: norm, LeakyReLU, a 4x4 conv with stride 2 and padding 1.
    "norm leaky strided conv": (FusedSpec(1e-5, 0.2, stride=2, padding=1), (5, 3, 4, 4), False),
}


@pytest.mark.parametrize("size, shape", [(1, (2, 2)), (1, (5, 9)), (3, (4, 4)), (3, (7, 12)), (2, (3, 30))])
def test_reflect_pad_gradient_folds_the_borders_back(size, shape):
    # input_grad against aten's reflection_pad2d_backward, and the backward that the padding uses
    # on the CPU when its input needs a gradient; a second order works too
    g = torch.Generator().manual_seed(size + shape[1])
    pad = ReflectPad(size)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, shape[0] + 2 * size, shape[1] + 2 * size, dtype=torch.float64, generator=g)
    (expected,) = torch.autograd.grad(F.pad(x, (size,) * 4, mode="reflect"), x, grad)
    torch.testing.assert_close(pad.input_grad(grad), expected, rtol=0, atol=1e-12)
    out = pad(x)
    assert out.grad_fn is not None and "ReflectPad" in type(out.grad_fn).__name__
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradgradcheck(pad, (x,))


@pytest.mark.parametrize("shape", [(2, 3, 1, 2), (1, 4, 5, 7), (2, 8, 16, 16)])
def test_instance_norm_matches_torch_and_its_gradient_is_torchs(shape):
    # lowcon's two-pass statistics against aten's kernel, in float64 (the same values to
    # rounding), with a mean far from zero; the layer's gradient against torch's, and the plain
    # torch layer inside unfused() (a graph differentiated twice)
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, dtype=torch.float64, generator=g) * 0.3 + 5).requires_grad_()
    expected = F.instance_norm(x, eps=1e-5)
    normed, mean, invstd = instance_norm_with_stats(x.detach(), 1e-5)
    torch.testing.assert_close(normed, expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, x.detach().mean(dim=(2, 3)).flatten(), rtol=0, atol=1e-12)
    var = x.detach().var(dim=(2, 3), unbiased=False).flatten()
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt(), rtol=1e-12, atol=0)
    layer, grad = InstanceNorm2d(shape[1]), torch.randn(*shape, dtype=torch.float64, generator=g)
    out = layer(x)
    assert "InstanceNormFn" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               rtol=0, atol=1e-10)
    with unfused():
        assert "InstanceNormFn" not in type(layer(x).grad_fn).__name__
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # as torch's layer
        layer(torch.randn(1, shape[1], 1, 1))


def _inputs(weight_shape, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    if weight_shape is None:
        return h, _DOWN.filt, None
    w = torch.randn(*weight_shape, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(weight_shape[0], dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    return h, w, b


@pytest.mark.parametrize("name", sorted(SPECS))
def test_values_and_gradients_are_those_of_the_plain_ops(name):
    spec, weight_shape, with_bias = SPECS[name]
    h, w, b = _inputs(weight_shape, with_bias, seed=len(name))
    out = NormActConv.apply(h, w, b, spec)
    expected = _plain(h, w, b, spec)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
    for a, e in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(expected, wrt, grad)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_passes_gradcheck(name):
    spec, weight_shape, with_bias = SPECS[name]
    h, w, b = _inputs(weight_shape, with_bias, seed=7)
    if weight_shape is None:
        assert torch.autograd.gradcheck(lambda h: NormActConv.apply(h, w, None, spec), (h,))
    else:
        assert torch.autograd.gradcheck(lambda *t: NormActConv.apply(*t, spec), (h, w, b) if with_bias else (h, w, None))


def test_a_hand_worked_case():
    # One channel [[-1, 1], [3, -3]]: mean 0, variance 5, so instance norm gives x / sqrt(5 + eps);
    # ReLU keeps the two positives; a 1x1 conv of weight 2 and bias 1 doubles them and adds 1.
    h = torch.tensor([[[[-1.0, 1.0], [3.0, -3.0]]]], dtype=torch.float64)
    w, b = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    out = NormActConv.apply(h, w, b, FusedSpec(eps=0.0))
    s = 5 ** 0.5
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 1 + 2 / s], [1 + 6 / s, 1.0]]]], dtype=torch.float64))


def test_the_winograd_path_matches_the_plain_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    conv.__class__ = WinogradConv2d
    for pre, size in ((None, 32), (Upsample(8), 16), (ReflectPad(1), 32)):
        spec = FusedSpec(1e-5, pre=pre, padding=0 if isinstance(pre, ReflectPad) else 1)
        h = torch.randn(1, 8, size, size, requires_grad=True)
        out = norm_act_conv(h, conv, spec)
        grads = torch.autograd.grad(out.square().sum(), [h, conv.weight, conv.bias])
        h64 = h.detach().double().requires_grad_()
        w64, b64 = (p.detach().double().requires_grad_() for p in (conv.weight, conv.bias))
        pre64 = Upsample(8).double() if isinstance(pre, Upsample) else pre
        ref = _plain(h64, w64, b64, FusedSpec(1e-5, pre=pre64, padding=spec.padding))
        ref_grads = torch.autograd.grad(ref.square().sum(), [h64, w64, b64])
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        for a, e in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), e, rtol=1e-3, atol=1e-3 * e.abs().max().item())


def test_the_fast_path_is_taken_only_where_it_applies(monkeypatch):
    seen = []
    monkeypatch.setattr(NormActConv, "apply", lambda h, w, b, spec: seen.append(spec.fast))
    conv = nn.Conv2d(8, 8, 3, padding=1)
    conv.__class__ = WinogradConv2d
    norm_act_conv(torch.randn(1, 8, 32, 32), conv, FusedSpec(1e-5, padding=1))  # 8 x 8 = 64 tiles
    norm_act_conv(torch.randn(1, 8, 16, 16), conv, FusedSpec(1e-5, pre=Upsample(8), padding=1))  # upsampled to 32
    norm_act_conv(torch.randn(1, 8, 16, 16), conv, FusedSpec(1e-5, padding=1))  # 16 tiles: too few
    norm_act_conv(torch.randn(1, 8, 32, 32), nn.Conv2d(8, 8, 3, padding=1), FusedSpec(1e-5, padding=1))
    assert seen == [True, True, False, False]


def test_fused_step_finds_the_runs_and_leaves_requested_outputs_alone():
    layers = nn.Sequential(
        nn.Conv2d(3, 4, 3),                           # 0
        nn.InstanceNorm2d(4), nn.ReLU(), Downsample(4),  # 1-3: norm, ReLU, blur-pool
        InstanceNorm2d(4), nn.ReLU(), Upsample(4), nn.Conv2d(4, 4, 3, padding=1),  # 4-7 (lowcon's norm)
        nn.LeakyReLU(0.2), nn.ReflectionPad2d(3), nn.Conv2d(4, 3, 7),  # 8-10: no norm
        nn.ReLU(), nn.Conv2d(3, 3, 3, padding_mode="reflect", padding=1),  # 11-12: not a zero-padded conv
        nn.BatchNorm2d(3), nn.ReLU(), nn.Tanh())      # 13-15: batch norm is not fused, nor a ReLU before Tanh
    runs = {i: fused_step(layers, i, len(layers) - 1, set()) for i in range(len(layers))}
    assert {i: r[0] for i, r in runs.items() if r is not None} == {1: 3, 2: 3, 4: 7, 5: 7, 8: 10}
    assert fused_step(layers, 4, 6, set()) is None  # the run would end after `last`
    assert fused_step(layers, 4, 7, {6}) is None  # the upsampled map was asked for
    assert fused_step(layers, 4, 7, {7})[0] == 7  # the run's own output may be asked for
    assert fused_step(layers, 1, 3, {2}) is None
    # runs fuse on the CPU only: on a GPU the plain layers are faster (benchmarks/README.md)
    assert fused_step(layers, 4, 7, set(), torch.device("cpu"))[0] == 7
    assert fused_step(layers, 4, 7, set(), torch.device("cuda")) is None
    x = torch.randn(1, 4, 9, 9)
    end, step = runs[4]
    with torch.no_grad():  # bit for bit: the same kernels as lowcon's InstanceNorm2d
        torch.testing.assert_close(step(x), layers[4:8](x), rtol=0, atol=0)


def test_the_discriminator_trains_fused_with_the_values_and_gradients_of_its_plain_layers():
    torch.manual_seed(0)
    net = PatchDiscriminator(ndf=4).double()
    x = torch.randn(2, 3, 32, 36, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    out = net(x)
    grad = torch.randn_like(out)
    fused = torch.autograd.grad(out, [x, *params], grad)
    plain_out = net.model(x)
    plain = torch.autograd.grad(plain_out, [x, *params], grad)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-12)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain_out, rtol=0, atol=0)


def test_the_discriminator_keeps_only_each_runs_input(monkeypatch, saved_bytes):
    b, ndf, size = 2, 4, 32
    net = PatchDiscriminator(ndf=ndf)
    x = torch.randn(b, 3, size, size)
    fused = saved_bytes(net, x)
    monkeypatch.setattr(fused_module, "fused_step", lambda *args: None)
    plain = saved_bytes(net, x)
    # 4x4 convs with padding 1 take n to n - 1; blur-pools (reflect pad 1, stride 2) take m to m // 2 + 1.
    n0 = size - 1                      # first conv: 31
    first = ndf * (n0 * n0 + (n0 + 2) ** 2)  # LeakyReLU output (the pad keeps it) and the padded copy
    n1 = (n0 // 2 + 1) - 1                # after blur-pool (16) and the second conv: 15
    # [norm, LeakyReLU, blur-pool]: the norm output (LeakyReLU keeps its input), the LeakyReLU
    # output, the padded copy, and the norm's mean and 1/std.
    second = 2 * ndf * (2 * n1 * n1 + (n1 + 2) ** 2 + 2)
    n2 = (n1 // 2 + 1) - 1                # 7
    third = 4 * ndf * (2 * n2 * n2 + (n2 + 2) ** 2 + 2)
    n3 = (n2 // 2 + 1) - 1                # 3
    last = 8 * ndf * (2 * n3 * n3 + 2)     # [norm, LeakyReLU, conv]: no padded copy
    assert plain - fused == 4 * b * (first + second + third + last)


def test_unfused_gives_a_graph_that_can_be_differentiated_twice():
    torch.manual_seed(0)
    net = PatchDiscriminator(ndf=4).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        g.square().sum().backward()
    with unfused():
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(g.square().sum(), x)
    # The gradient of the R1 penalty against central differences of the first gradient's norm.
    eps, direction = 1e-6, torch.randn_like(x)

    def penalty(t):
        with unfused():
            (gt,) = torch.autograd.grad(net(t).sum(), t, create_graph=False)
        return gt.square().sum()

    plus = penalty((x + eps * direction).detach().requires_grad_())
    minus = penalty((x - eps * direction).detach().requires_grad_())
    torch.testing.assert_close((plus - minus) / (2 * eps), (second * direction).sum(), rtol=1e-5, atol=1e-8)
    assert fused_step(net.model, 1, len(net.model) - 1, set()) is not None  # back on after the block


def test_unfused_runs_winograd_layers_directly_for_a_second_derivative(monkeypatch):
    torch.manual_seed(0)
    net = PatchDiscriminator(ndf=8)
    assert use_winograd(net, 8) == 3  # its three inner 4x4 layers
    x = torch.randn(1, 3, 64, 64, requires_grad=True)  # 31 x 31 outputs: 121 tiles, the fast path
    calls = []
    conv = winograd._conv
    monkeypatch.setattr(winograd, "_conv", lambda *a, **k: calls.append(1) or conv(*a, **k))
    monkeypatch.setattr(fused_module, "fused_step", lambda *args: None)  # the Winograd layers alone
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    assert calls  # Winograd served the layers, and its backward cannot be differentiated again
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.square().sum().backward()
    calls.clear()
    with unfused():
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(g.square().sum(), x)
    assert not calls and torch.isfinite(second).all() and second.abs().sum() > 0
    net(x)
    assert calls  # back on after the block
