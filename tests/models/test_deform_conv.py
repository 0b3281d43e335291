"""sampled_deform_conv2d against torchvision's kernel, a numpy loop and finite differences."""
import math

import numpy as np
import pytest
import torch
from torchvision.ops import deform_conv2d

import lowcon.models.deform_conv as dc
from lowcon.models.aecrnet import AECRNet, DCNBlock, ModulatedDeformConv2d
from lowcon.models.deform_conv import sampled_deform_conv2d

CASES = [  # batch, in, out, H, W, k, stride, padding, dilation
    (2, 3, 4, 7, 9, 3, 1, 1, 1),
    (1, 2, 3, 8, 6, 3, 2, 1, 1),
    (2, 3, 2, 9, 9, 3, 1, 2, 2),
    (1, 2, 2, 5, 5, 2, 1, 0, 1),
    (1, 1, 1, 1, 1, 3, 1, 1, 1),  # one pixel: every tap but the centre is outside
]


def random_inputs(case, dtype=torch.float64, seed=0, spread=3.0):
    b, c, o, h, w, k, s, p, d = case
    g = torch.Generator().manual_seed(seed)
    out_h = (h + 2 * p - d * (k - 1) - 1) // s + 1
    out_w = (w + 2 * p - d * (k - 1) - 1) // s + 1
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    offset = spread * torch.randn(b, 2 * k * k, out_h, out_w, generator=g, dtype=dtype)
    mask = torch.rand(b, k * k, out_h, out_w, generator=g, dtype=dtype)
    weight = torch.randn(o, c, k, k, generator=g, dtype=dtype)
    bias = torch.randn(o, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, offset, mask, weight, bias)], dict(stride=s, padding=p, dilation=d)


def numpy_dcn(x, offset, mask, weight, bias, stride, padding, dilation):
    """DCNv2 by explicit loops: bilinear sample each tap at base + (dy, dx), zero outside."""
    x, offset, mask, weight, bias = (t.detach().numpy() for t in (x, offset, mask, weight, bias))
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    _, _, oh, ow = offset.shape

    def pixel(img, yy, xx):
        return img[:, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)

    out = np.zeros((b, o, oh, ow))
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                acc = bias.copy()
                for ti in range(kh):
                    for tj in range(kw):
                        t = ti * kw + tj
                        y = i * stride - padding + ti * dilation + offset[n, 2 * t, i, j]
                        xq = j * stride - padding + tj * dilation + offset[n, 2 * t + 1, i, j]
                        y0, x0 = math.floor(y), math.floor(xq)
                        fy, fx = y - y0, xq - x0
                        val = ((1 - fy) * (1 - fx) * pixel(x[n], y0, x0) + (1 - fy) * fx * pixel(x[n], y0, x0 + 1)
                               + fy * (1 - fx) * pixel(x[n], y0 + 1, x0) + fy * fx * pixel(x[n], y0 + 1, x0 + 1))
                        acc = acc + weight[:, :, ti, tj] @ (mask[n, t, i, j] * val)
                out[n, :, i, j] = acc
    return out


@pytest.mark.parametrize("case", CASES)
def test_values_match_a_numpy_loop(case):
    (x, offset, mask, weight, bias), conv = random_inputs(case)
    out = sampled_deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    expected = numpy_dcn(x, offset, mask, weight, bias, conv["stride"], conv["padding"], conv["dilation"])
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_torchvision(case):
    inputs, conv = random_inputs(case)
    x, offset, mask, weight, bias = inputs
    ref = deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    out = sampled_deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    for ours, theirs in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_without_mask_is_dcn_v1():
    inputs, conv = random_inputs(CASES[0])
    x, offset, _, weight, bias = inputs
    torch.testing.assert_close(sampled_deform_conv2d(x, offset, weight, bias, **conv),
                               deform_conv2d(x, offset, weight, bias, **conv), rtol=1e-10, atol=1e-10)


def test_gradcheck_against_finite_differences():
    # Offsets kept away from integer positions, where bilinear sampling has kinks.
    inputs, conv = random_inputs(CASES[0], spread=0.0)
    x, offset, mask, weight, bias = inputs
    with torch.no_grad():
        offset.copy_(torch.rand_like(offset) * 0.6 + 0.2)
    assert torch.autograd.gradcheck(
        lambda x, off, m, w, b: sampled_deform_conv2d(x, off, w, b, mask=m, **conv),
        (x, offset, mask, weight, bias))


def test_row_bands_give_the_same_result(monkeypatch):
    inputs, conv = random_inputs((2, 5, 3, 9, 9, 3, 1, 1, 1))
    full = sampled_deform_conv2d(inputs[0], inputs[1], inputs[3], inputs[4], mask=inputs[2], **conv)
    full_grads = torch.autograd.grad(full.square().sum(), inputs)
    monkeypatch.setattr(dc, "COLUMN_CHUNK_ELEMENTS", 2 * 5 * 9 * 9 * 4)  # 4 output rows per band
    assert [(s.start, s.stop) for s in dc._row_bands(2, 5, 9, 9, 9)] == [(0, 4), (4, 8), (8, 9)]
    chunked = sampled_deform_conv2d(inputs[0], inputs[1], inputs[3], inputs[4], mask=inputs[2], **conv)
    torch.testing.assert_close(chunked, full)
    for a, b in zip(torch.autograd.grad(chunked.square().sum(), inputs), full_grads):
        torch.testing.assert_close(a, b)


def test_only_requested_gradients_are_computed():
    inputs, conv = random_inputs(CASES[0])
    x, offset, mask, weight, bias = inputs
    out = sampled_deform_conv2d(x.detach(), offset.detach(), weight, bias, mask=mask.detach(), **conv)
    out.sum().backward()
    assert x.grad is None and offset.grad is None and mask.grad is None
    ref_w = torch.autograd.grad(deform_conv2d(x, offset, weight, bias, mask=mask, **conv).sum(), weight)[0]
    torch.testing.assert_close(weight.grad, ref_w)


def test_bf16_autocast_runs_the_op_in_fp32():
    inputs, conv = random_inputs(CASES[0], dtype=torch.float32)
    x, offset, mask, weight, bias = (t.detach() for t in inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sampled_deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, deform_conv2d(x, offset, weight, bias, mask=mask, **conv))


@pytest.mark.parametrize("bad, message", [
    (dict(offset=torch.zeros(1, 9, 5, 5)), "offset: expected shape"),
    (dict(mask=torch.zeros(1, 8, 5, 5)), "mask: expected shape"),
    (dict(weight=torch.zeros(2, 3, 3, 3)), "weight: expected 2 input channels"),
    (dict(bias=torch.zeros(3)), "bias: expected shape"),
    (dict(stride="2"), "stride: expected an int"),
])
def test_bad_shapes_name_the_argument(bad, message):
    args = dict(input=torch.zeros(1, 2, 5, 5), offset=torch.zeros(1, 18, 5, 5), weight=torch.zeros(4, 2, 3, 3),
                bias=torch.zeros(4), mask=torch.zeros(1, 9, 5, 5), padding=1, stride=1)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        sampled_deform_conv2d(**args)


def test_aecrnet_is_the_same_function_with_either_implementation():
    torch.manual_seed(0)
    ours = AECRNet(ngf=8, dcn_impl="sampled").double()
    theirs = AECRNet(ngf=8, dcn_impl="torchvision").double()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():  # non-zero offsets and masks, so the deformable path matters
        for net in (ours, theirs):
            torch.manual_seed(1)
            net.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 0.3)
    hazy = torch.rand(2, 3, 16, 20, dtype=torch.float64)
    out_ours, out_theirs = ours(hazy), theirs(hazy)
    torch.testing.assert_close(out_ours, out_theirs)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_auto_picks_sampled_on_cpu_and_bad_impl_is_named(monkeypatch):
    import lowcon.models.aecrnet as aecrnet_module

    calls = []
    spy = lambda *a, **kw: calls.append("sampled") or sampled_deform_conv2d(*a, **kw)  # noqa: E731
    monkeypatch.setattr(aecrnet_module, "sampled_deform_conv2d", spy)
    block = DCNBlock(8)
    assert block.dcn.impl == "auto" and "impl='auto'" in repr(block)
    block(torch.rand(1, 8, 5, 5))
    assert calls == ["sampled"]
    DCNBlock(8, impl="torchvision")(torch.rand(1, 8, 5, 5))
    assert calls == ["sampled"]
    with pytest.raises(ValueError, match="impl: expected one of auto, sampled, torchvision"):
        ModulatedDeformConv2d(4, 4, impl="cuda")


@pytest.mark.parametrize("share_blocks", [True, False])
def test_activation_checkpointing_keeps_outputs_and_gradients(share_blocks):
    torch.manual_seed(0)
    plain = AECRNet(ngf=8, share_blocks=share_blocks).double()
    saving = AECRNet(ngf=8, share_blocks=share_blocks, checkpoint_blocks=True).double()
    saving.load_state_dict(plain.state_dict())
    hazy = torch.rand(2, 3, 16, 20, dtype=torch.float64)
    outs = [net(hazy) for net in (plain, saving)]
    torch.testing.assert_close(outs[1], outs[0])
    for out in outs:
        out.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    # FastDeconv's running statistics are updated once per forward, not again in the recompute.
    for name, buf in plain.named_buffers():
        torch.testing.assert_close(dict(saving.named_buffers())[name], buf, msg=name)


def test_activation_checkpointing_keeps_fewer_tensors(saved_bytes):
    torch.manual_seed(0)
    hazy = torch.rand(1, 3, 32, 32)
    plain, saving = saved_bytes(AECRNet(ngf=8), hazy), saved_bytes(AECRNet(ngf=8, checkpoint_blocks=True), hazy)
    assert saving < 0.75 * plain
