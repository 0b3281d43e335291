from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowcon.models.bf16conv import (Bf16Conv2d, Bf16ConvTranspose2d, bf16_active, bf16_conv, bf16_convolutions,
                                    use_bf16_convolutions)
from lowcon.models.fused import FusedSpec, InstanceNorm2d, NormActConv, ReflectPad, fused_step, unfused
from lowcon.models.resnet_generator import ResnetGenerator
from lowcon.models.winograd import WinogradConv2d, direct, use_winograd

BF16_EPS = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16, in float64."""
    return t.detach().to(torch.bfloat16).double()


# (x shape, weight shape, stride, padding, transposed, output padding)
CASES = {
    "3x3 stride 1": ((2, 5, 9, 11), (6, 5, 3, 3), 1, 1, False, 0),
    "3x3 stride 2 (CycleGAN's down step), odd size": ((1, 6, 13, 9), (7, 6, 3, 3), 2, 1, False, 0),
    "4x4 stride 2 (PatchGAN)": ((2, 3, 16, 12), (8, 3, 4, 4), 2, 1, False, 0),
    "transposed 3x3 stride 2 (CycleGAN's up step)": ((1, 8, 7, 5), (8, 4, 3, 3), 2, 1, True, 1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_conv_is_the_float64_convolution_of_rounded_operands_rounded(case, bias):
    # Independent formulation: the float64 convolution (autograd for the gradients) of x, the
    # filter and the output gradient rounded to bf16. oneDNN accumulates in float32 and rounds the
    # result to bf16, so each value is the reference to 2^-8 relative (plus the float32 sums' own
    # error); the bias gradient is float32 throughout.
    x_shape, w_shape, stride, padding, transposed, output_padding = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    w = (torch.randn(w_shape, generator=gen) * 0.3).requires_grad_()
    b = torch.randn(w_shape[1] if transposed else w_shape[0], generator=gen, requires_grad=True) if bias else None
    y = bf16_conv(x, w, b, stride=stride, padding=padding, transposed=transposed, output_padding=output_padding)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)

    xr, wr = _rounded(x).requires_grad_(), _rounded(w).requires_grad_()
    op = F.conv_transpose2d if transposed else F.conv2d
    extra = {"output_padding": output_padding} if transposed else {}
    ref = op(xr, wr, None, stride=stride, padding=padding, **extra)
    ref.backward(_rounded(g))
    assert y.dtype == torch.float32 and y.shape == ref.shape
    no_bias = y - b.view(1, -1, 1, 1) if bias else y
    for i, (got, want) in enumerate(((no_bias, ref), (x.grad, xr.grad), (w.grad, wr.grad))):
        got = got.detach().double()
        if i > 0 or not bias:  # computed in bf16: values that bf16 holds exactly
            assert torch.equal(got, got.to(torch.bfloat16).double())
        assert ((got - want).abs() <= BF16_EPS * want.abs() + 1e-5 * want.abs().max()).all()
    if bias:
        torch.testing.assert_close(b.grad, g.sum((0, 2, 3)), rtol=1e-6, atol=1e-5)


def test_bf16_conv_differs_from_float32_by_rounding_only():
    # Sanity check of the tolerance above: float32 and bf16 results differ, by at most a few
    # bf16 roundings.
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 16, 12, 12, generator=gen), torch.randn(8, 16, 3, 3, generator=gen)
    exact = F.conv2d(x, w, stride=2, padding=1)
    got = bf16_conv(x, w, stride=2, padding=1)
    error = (got - exact).abs().max() / exact.abs().max()
    assert 1e-4 < error < 3e-2


def test_layers_compute_in_bf16_only_inside_the_block():
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 4, 3, 2, 1, output_padding=1),
                        nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"))
    plain = [m for m in net]
    assert use_bf16_convolutions(net) == 2  # grouped and string-padded layers stay
    assert [type(m) for m in net] == [Bf16Conv2d, Bf16ConvTranspose2d, nn.Conv2d, nn.Conv2d]
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias",
                                      "3.weight", "3.bias"]
    x = torch.randn(1, 3, 10, 10, generator=gen)
    down, up = plain[0], plain[1]
    want = F.conv_transpose2d(F.conv2d(x, down.weight, down.bias, 2, 1), up.weight, up.bias, 2, 1, output_padding=1)
    with torch.no_grad():
        assert torch.equal(net[1](net[0](x)), want)  # outside the block: float32, unchanged
        with bf16_convolutions():
            assert bf16_active(x)
            inside = net[1](net[0](x))
            h = bf16_conv(x, down.weight, down.bias, stride=2, padding=1)
            assert torch.equal(inside, bf16_conv(h, up.weight, up.bias, stride=2, padding=1, transposed=True,
                                                 output_padding=1))
            assert not torch.equal(inside, want)
            for off in (direct(), unfused()):  # graphs differentiated twice stay float32
                with off:
                    assert not bf16_active(x) and torch.equal(net[1](net[0](x)), want)
            assert not bf16_active(x.double()) and not bf16_active(x.to(torch.bfloat16))
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own casts, not this module's
                assert not bf16_active(x) and net[0](x).dtype == torch.bfloat16
        assert not bf16_active(x)


def test_winograd_layers_are_left_to_their_kernels():
    net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(128, 64, 3, stride=2))
    assert use_winograd(net) == 1
    assert use_bf16_convolutions(net) == 1
    assert [type(m) for m in net] == [WinogradConv2d, Bf16Conv2d]


@pytest.mark.parametrize("stride,padding,pre", [(2, 1, None), (1, 1, None), (1, 0, ReflectPad(1))],
                         ids=["strided (CycleGAN down, PatchGAN)", "zero-padded", "reflect-padded"])
def test_fused_runs_compute_their_convolution_in_bf16_inside_the_block(stride, padding, pre, record_convolutions):
    # NormActConv with the bf16 flag against the same function from separate pieces: lowcon's
    # instance norm layer, LeakyReLU and padding by autograd, then bf16_conv (itself checked
    # against float64 above). The fused run recomputes the convolution's input in backward with the
    # same kernels, so the two agree to float32's rounding.
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 6, 11, 9, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=padding)
    spec = FusedSpec(1e-5, 0.2, pre, stride, padding)
    assert use_bf16_convolutions(conv) == 1
    with bf16_convolutions():
        layers = [InstanceNorm2d(6), nn.LeakyReLU(0.2)] + ([nn.ReflectionPad2d(1)] if pre else []) + [conv]
        end, run = fused_step(layers, 0, len(layers) - 1, set())
        assert end == len(layers) - 1
        with record_convolutions() as seen:
            fused = NormActConv.apply(h, w, b, replace(spec, bf16=True))
            via_layers = run(h)
        fused.backward(torch.ones_like(fused))
    assert seen.calls == [(torch.bfloat16, (5, 6, 3, 3))] * 2
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    x = F.leaky_relu(InstanceNorm2d(6)(h), 0.2)
    x = F.pad(x, (1,) * 4, mode="reflect") if pre else x
    pieces = bf16_conv(x, w, b, stride=stride, padding=padding)
    pieces.backward(torch.ones_like(pieces))
    assert torch.equal(fused, pieces)
    assert torch.equal(via_layers.detach(), bf16_conv(x, conv.weight, conv.bias, stride=stride, padding=padding))
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_a_generator_keeps_its_float32_kernels_and_rounds_the_others(record_convolutions):
    # CycleGAN's generator (strided and transposed resampling) with 128-channel residual blocks:
    # inside the block the blocks' convolutions stay lowcon's float32 Winograd, the resampling
    # convolutions run in bf16, and the output is close to float32's.
    torch.manual_seed(0)
    net = ResnetGenerator(3, 3, ngf=32, n_blocks=1, antialias=False, antialias_up=False)
    use_winograd(net)
    assert use_bf16_convolutions(net) == 6  # the 7x7 layers, two down and two up
    x = torch.rand(1, 3, 128, 128) * 2 - 1  # residual maps of 32x32: enough tiles for Winograd
    want = net(x)
    with bf16_convolutions(), record_convolutions() as seen:
        got = net(x)
        got.sum().backward()
    in_bf16 = {shape for dtype, shape in seen.calls if dtype == torch.bfloat16}
    in_fp32 = {shape for dtype, shape in seen.calls if dtype == torch.float32}
    # the 7x7 layers, the down convolutions, the transposed ones (filters (in, out, 3, 3))
    assert in_bf16 == {(32, 3, 7, 7), (64, 32, 3, 3), (128, 64, 3, 3), (3, 32, 7, 7)}
    assert in_fp32 == {(36, 1, 6, 6), (36, 1, 4, 4)}  # Winograd's tile transforms: the residual blocks
    assert 0 < (got - want).abs().max() < 0.05
