"""AECR-Net network: parameter counts, wiring, DCN, FastDeconv whitening, variants, errors."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from lowcon.models.aecrnet import (
    AECRNET_VARIANTS,
    AECRNet,
    DCNBlock,
    FastDeconv,
    Mix,
    build_aecrnet,
    inverse_sqrt_psd,
)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- parameter counts worked out from the layer formulas -------------------------------------
def conv(k, cin, cout):
    return k * k * cin * cout + cout


def hand_count(ngf=64, n_fa=6, n_dcn=2, shared=True, dfe=True, mixup=True, deconv=True, cin=3,
               cout=3):
    c4 = 4 * ngf
    fa = 2 * conv(3, c4, c4) + conv(1, c4, c4 // 8) + conv(1, c4 // 8, c4)  # convs + CA
    fa += conv(1, c4, c4 // 8) + conv(1, c4 // 8, 1)  # PA
    dcn = conv(3, c4, c4) + conv(3, c4, 27)  # main conv + offset/mask conv (18 + 9 channels)
    total = conv(7, cin, ngf) + conv(3, ngf, 2 * ngf) + conv(3, 2 * ngf, c4)
    total += conv(3, c4, 2 * ngf) + conv(3, 2 * ngf, ngf) + conv(7, ngf, cout)  # transposed: same
    total += fa * (1 if shared else n_fa)
    total += (dcn * (1 if shared else n_dcn)) if dfe else 0
    total += 2 if mixup else 0
    total += conv(3, cin, cin) if deconv else 0
    return total


def test_default_parameter_count_is_the_released_one():
    assert n_params(AECRNet()) == 2_614_229


def test_unshared_parameter_count():
    assert n_params(AECRNet(share_blocks=False)) == 9_291_989


@pytest.mark.parametrize(
    "kwargs, hand",
    [
        ({}, {}),
        ({"share_blocks": False}, {"shared": False}),
        ({"ngf": 8, "n_fa_blocks": 3, "n_dcn": 4, "share_blocks": False},
         {"ngf": 8, "n_fa": 3, "n_dcn": 4, "shared": False}),
        ({"use_dfe": False, "fusion": "skip", "use_fastdeconv": False},
         {"dfe": False, "mixup": False, "deconv": False}),
        ({"in_channels": 1, "out_channels": 2, "ngf": 16}, {"cin": 1, "cout": 2, "ngf": 16}),
    ],
)
def test_parameter_count_matches_layer_formulas(kwargs, hand):
    assert n_params(AECRNet(**kwargs)) == hand_count(**hand)


def test_state_dict_keys_are_the_official_ones():
    # Written from the official Dehaze class, so released checkpoints load without renaming.
    fa = ["conv1", "conv2", "calayer.ca.0", "calayer.ca.2", "palayer.pa.0", "palayer.pa.2"]
    expected = ["down1.1", "down2.0", "down3.0"] + [f"block.{n}" for n in fa]
    expected += ["up1.0", "up2.0", "up3.1", "dcn_block.dcn", "dcn_block.dcn.conv_offset_mask",
                 "deconv"]
    keys = [f"{m}.{p}" for m in expected for p in ("weight", "bias")]
    keys += ["deconv.running_mean", "deconv.running_deconv", "mix1.w", "mix2.w"]
    assert sorted(AECRNet().state_dict()) == sorted(keys)


# ---- shapes, variants -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 24, 40)])
def test_output_shape_equals_input_shape(shape):
    torch.manual_seed(0)
    net = AECRNet() if shape[0] == 1 else AECRNet(ngf=8)
    out = net(torch.rand(shape))
    assert out.shape == shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", list(AECRNET_VARIANTS))
def test_each_variant_builds_and_runs(variant):
    net = build_aecrnet(variant, ngf=8)
    dfe = variant.startswith("dfe")
    fusion = {"base": "none", "mixup": "mixup", "dfe": "none", "dfe_skip": "skip",
              "dfe_mixup": "mixup"}[variant]
    assert net.use_dfe == dfe and net.fusion == fusion
    assert hasattr(net, "dcn_block") == dfe
    assert hasattr(net, "mix1") == (fusion == "mixup")
    assert n_params(net) == hand_count(ngf=8, dfe=dfe, mixup=fusion == "mixup")
    assert net(torch.rand(1, 3, 16, 20)).shape == (1, 3, 16, 20)


def test_full_variant_is_the_default_network():
    assert AECRNET_VARIANTS["dfe_mixup"] == {"use_dfe": True, "fusion": "mixup"}
    assert n_params(build_aecrnet()) == 2_614_229


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="base, mixup, dfe, dfe_skip, dfe_mixup"):
        build_aecrnet("full")


def test_overrides_win_over_the_variant():
    assert build_aecrnet("base", fusion="skip").fusion == "skip"


# ---- sharing and wiring ---------------------------------------------------------------------
def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(m))
    return calls


def test_shared_blocks_are_one_object_applied_repeatedly():
    net = AECRNet(ngf=8)
    fa_calls, dcn_calls = _count_calls(net.block), _count_calls(net.dcn_block)
    net(torch.rand(1, 3, 16, 16))
    assert len(fa_calls) == 6 and len(dcn_calls) == 2
    # One FA block: 6 convs x (weight, bias) tensors; one DCN: 2 convs x 2; the rest by hand.
    n_tensors = 2 * 3 + 12 + 4 + 2 * 3 + 2 + 2  # down, FA, DCN, up, deconv, mixes
    assert len(list(net.parameters())) == n_tensors


def test_changing_the_shared_block_changes_every_application():
    torch.manual_seed(0)
    net = AECRNet(ngf=8).eval()
    inputs = []
    net.block.register_forward_hook(lambda m, i, o: inputs.append(o.detach().clone()))
    x = torch.rand(1, 3, 16, 16)
    net(x)
    before = inputs[:]
    inputs.clear()
    with torch.no_grad():
        net.block.conv2.bias.add_(0.1)
    net(x)
    assert all(not torch.allclose(a, b) for a, b in zip(before, inputs))


def test_unshared_blocks_are_distinct_objects():
    net = AECRNet(ngf=8, share_blocks=False)
    assert len({id(b) for b in net.fa_blocks()}) == 6
    assert len({id(b) for b in net.dcn_steps()}) == 2
    calls = [_count_calls(b) for b in net.fa_blocks()]
    net(torch.rand(1, 3, 16, 16))
    assert [len(c) for c in calls] == [1] * 6


def test_mix_initial_values():
    net = AECRNet(ngf=8)
    assert torch.sigmoid(net.mix1.w).item() == pytest.approx(1 / (1 + math.e))
    assert torch.sigmoid(net.mix2.w).item() == pytest.approx(1 / (1 + math.exp(0.6)))


def test_mix_formula():
    mix = Mix(init=0.3)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s = 1 / (1 + math.exp(-0.3))
    torch.testing.assert_close(mix(a, b), s * a + (1 - s) * b)


def test_mixes_join_the_official_features():
    # mix1(down3, last DCN output), mix2(down2, up1), checked by hooks on the wiring.
    torch.manual_seed(0)
    net = AECRNet(ngf=8).eval()
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs, output)
        return hook

    for name in ("deconv", "down1", "down2", "down3", "dcn_block", "up1", "mix1", "mix2"):
        getattr(net, name).register_forward_hook(keep(name))
    net(torch.rand(1, 3, 16, 16))
    assert seen["down1"][0][0] is seen["deconv"][1]
    assert seen["mix1"][0][0] is seen["down3"][1] and seen["mix1"][0][1] is seen["dcn_block"][1]
    assert seen["mix2"][0][0] is seen["down2"][1] and seen["mix2"][0][1] is seen["up1"][1]
    assert seen["up1"][0][0] is seen["mix1"][1]


def test_skip_adds_and_none_drops_the_encoder_features():
    torch.manual_seed(0)
    reference = AECRNet(ngf=8, fusion="mixup").eval()
    x = torch.rand(1, 3, 16, 16)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("mix")}
    outputs = {}
    for fusion in ("skip", "none"):
        net = AECRNet(ngf=8, fusion=fusion).eval()
        net.load_state_dict(state)
        outputs[fusion] = net(x)
    with torch.no_grad():
        reference.mix1.w.fill_(-40.0)  # sigmoid ~ 0: decoder features only, as "none"
        reference.mix2.w.fill_(-40.0)
    torch.testing.assert_close(reference(x), outputs["none"])
    assert not torch.allclose(outputs["skip"], outputs["none"])


def test_fa_block_order():
    # conv-ReLU-(+x)-conv-CA-PA-(+x), written out with functional ops and the block's weights.
    torch.manual_seed(0)
    block = AECRNet(ngf=8).block
    x = torch.randn(2, 32, 6, 6)
    p = dict(block.named_parameters())

    def conv1x1(t, name):
        return F.conv2d(t, p[f"{name}.weight"], p[f"{name}.bias"])

    res = F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)) + x
    res = F.conv2d(res, p["conv2.weight"], p["conv2.bias"], padding=1)
    pooled = res.mean(dim=(2, 3), keepdim=True)
    res = res * torch.sigmoid(conv1x1(F.relu(conv1x1(pooled, "calayer.ca.0")), "calayer.ca.2"))
    res = res * torch.sigmoid(conv1x1(F.relu(conv1x1(res, "palayer.pa.0")), "palayer.pa.2"))
    torch.testing.assert_close(block(x), res + x)


# ---- DCN ------------------------------------------------------------------------------------
def test_dcn_at_init_is_a_conv_of_half_the_input():
    # Offset/mask conv starts at zero: offsets 0, mask sigmoid(0) = 1/2 on every tap.
    torch.manual_seed(0)
    block = DCNBlock(8)
    with torch.no_grad():
        block.dcn.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 7, 9)
    expected = F.conv2d(0.5 * x, block.dcn.weight, block.dcn.bias, padding=1)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_dcn_with_zero_offsets_and_unit_mask_is_a_plain_conv():
    torch.manual_seed(0)
    block = DCNBlock(8)
    with torch.no_grad():
        block.dcn.conv_offset_mask.bias[18:] = 40.0  # mask logits: sigmoid(40) = 1 in float32
    x = torch.randn(2, 8, 7, 9)
    expected = F.conv2d(x, block.dcn.weight, block.dcn.bias, padding=1)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_dcn_offsets_shift_the_sampling_grid():
    # Offset channels are (dy, dx) pairs per tap: dx = +1 everywhere samples one pixel right.
    torch.manual_seed(0)
    block = DCNBlock(4)
    with torch.no_grad():
        block.dcn.conv_offset_mask.bias[1:18:2] = 1.0
        block.dcn.conv_offset_mask.bias[18:] = 40.0
    x = torch.randn(1, 4, 6, 8)
    shifted = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    expected = F.conv2d(shifted, block.dcn.weight, block.dcn.bias, padding=1)
    # Column 0 differs: the plain conv reads zero padding where the shifted sample is x[..., 0].
    torch.testing.assert_close(block(x)[..., 1:], expected[..., 1:], rtol=1e-4, atol=1e-5)


# ---- FastDeconv -----------------------------------------------------------------------------
def correlated_images(seed=0, batch=2, size=30):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size))
    x = np.einsum("ij,bjhw->bihw", [[1, 0.5, 0.2], [0.3, 1, 0.4], [0.1, 0.6, 1]], x)
    x = x + 0.7 * np.roll(x, 1, axis=2) + 0.5 * np.roll(x, 1, axis=3) + 2.0
    return torch.tensor(x, dtype=torch.float32)


def identity_deconv(**kwargs):
    # 27 output channels with identity weight: the output is the whitened patch itself.
    layer = FastDeconv(3, 27, kernel_size=3, padding=1, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(27).view(27, 3, 3, 3))
        layer.bias.zero_()
    return layer


def numpy_patches(x, stride):
    """im2col by explicit loops: (N * positions, 27), channel-major like a conv weight."""
    x = np.pad(x.numpy().astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, _, h, w = x.shape
    rows = [x[b, :, i:i + 3, j:j + 3].reshape(-1)
            for b in range(n) for i in range(0, h - 2, stride) for j in range(0, w - 2, stride)]
    return np.stack(rows)


@pytest.mark.parametrize("kwargs", [{"method": "eigh"}, {"method": "newton_schulz", "n_iter": 20}])
def test_fastdeconv_whitens_patches_in_training(kwargs):
    x = correlated_images()
    raw = np.cov(numpy_patches(x, 3), rowvar=False, bias=True)
    assert np.abs(raw - np.eye(27)).max() > 1.0  # the input really is correlated
    layer = identity_deconv(**kwargs).train()
    with torch.no_grad():
        out = layer(x)
    # Statistics come from every third patch (sampling_stride 3): check those positions.
    z = out[:, :, ::3, ::3].permute(0, 2, 3, 1).reshape(-1, 27).double().numpy()
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(27), atol=2e-3)


def test_fastdeconv_default_is_a_partial_whitening():
    # Five Newton-Schulz iterations (official) decorrelate, but do not fully whiten.
    x = correlated_images()
    raw = np.cov(numpy_patches(x, 3), rowvar=False, bias=True)
    with torch.no_grad():
        out = identity_deconv().train()(x)
    z = out[:, :, ::3, ::3].permute(0, 2, 3, 1).reshape(-1, 27).double().numpy()
    cov = np.cov(z, rowvar=False, bias=True)
    off = ~np.eye(27, dtype=bool)
    corr = lambda c: np.abs(c / np.sqrt(np.outer(np.diag(c), np.diag(c))))[off].max()
    assert corr(cov) < 0.5 * corr(raw)


def test_fastdeconv_running_statistics_and_eval():
    x = correlated_images()
    layer = FastDeconv(3, 5, kernel_size=3, padding=1, method="eigh").train()
    layer(x)
    patches = numpy_patches(x, 3)
    mean = patches.mean(0)
    cov = np.cov(patches, rowvar=False, bias=True) + 1e-5 * np.eye(27)
    deconv = np.linalg.inv(scipy.linalg.sqrtm(cov).real)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.1 * mean, atol=1e-5)
    np.testing.assert_allclose(layer.running_deconv.numpy(), 0.9 * np.eye(27) + 0.1 * deconv,
                               atol=1e-4)

    layer.eval()
    buffers = [b.clone() for b in layer.buffers()]
    x_new = correlated_images(seed=1, batch=1, size=12)
    out = layer(x_new)
    for before, after in zip(buffers, layer.buffers()):
        torch.testing.assert_close(before, after)  # eval leaves the statistics alone
    # Independent formula: weight . R (patch - m) + bias with the running R and m.
    w = layer.weight.detach().reshape(5, 27).double().numpy()
    r, m = layer.running_deconv.double().numpy(), layer.running_mean.double().numpy()
    expected = (numpy_patches(x_new, 1) - m) @ (w @ r).T + layer.bias.detach().double().numpy()
    got = out.detach().permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_fastdeconv_untrained_eval_is_a_plain_conv():
    layer = FastDeconv(3, 4, kernel_size=3, padding=1).eval()
    x = torch.rand(2, 3, 10, 10)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))


def test_inverse_sqrt_against_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    expected = np.linalg.inv(scipy.linalg.sqrtm(cov).real)
    for method, n_iter in (("eigh", 1), ("newton_schulz", 30)):
        got = inverse_sqrt_psd(torch.tensor(cov), method=method, n_iter=n_iter).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ---- training, heads, errors ----------------------------------------------------------------
@pytest.mark.parametrize("share_blocks", [True, False])
def test_gradients_reach_every_parameter(share_blocks):
    torch.manual_seed(0)
    net = AECRNet(ngf=8, share_blocks=share_blocks).train()
    out = net(torch.rand(2, 3, 16, 16))
    (out - torch.rand_like(out)).abs().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_output_heads():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    net = AECRNet(ngf=8, output="clamp")
    with torch.no_grad():
        net.up3[1].bias.fill_(5.0)  # push the linear output above 1
    assert net.train()(x).min() > 1.0
    torch.testing.assert_close(net.eval()(x), torch.ones(1, 3, 16, 16))
    sig = AECRNet(ngf=8, output="sigmoid").eval()(x)
    assert ((sig > 0) & (sig < 1)).all()
    tanh = AECRNet(ngf=8).eval()(x)
    assert tanh.abs().max() < 1 and isinstance(AECRNet(ngf=8).up3[2], torch.nn.Tanh)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = AECRNet(ngf=8).eval()
    x = torch.rand(1, 3, 16, 16)
    expected = net(x)
    got = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_size_multiple_and_bad_shapes():
    net = AECRNet(ngf=8)
    assert AECRNet.size_multiple == 4
    with pytest.raises(ValueError, match=r"multiples of 4.*\(1, 3, 30, 32\)"):
        net(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32\)"):
        net(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="hazy"):
        net(torch.rand(3, 32, 32))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"fusion": "concat"}, "fusion: expected one of mixup, skip, none"),
     ({"output": "relu"}, "output: expected one of tanh, sigmoid, clamp"),
     ({"ngf": 3}, "ngf"),
     ({"n_fa_blocks": -1}, "n_fa_blocks")],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AECRNet(**kwargs)
