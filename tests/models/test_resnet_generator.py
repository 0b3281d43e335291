import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowcon.models.blur import Downsample, Upsample
from lowcon.models import fused as fused_module
from lowcon.models.resnet_generator import ResnetBlock, ResnetGenerator


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def _generator_params(c_in: int, c_out: int, ngf: int, n_blocks: int) -> int:
    """Instance norm (no affine): only the convs count; each has a bias."""
    return (_conv(c_in, ngf, 7)
            + _conv(ngf, 2 * ngf, 3) + _conv(2 * ngf, 4 * ngf, 3)         # two down steps
            + n_blocks * 2 * _conv(4 * ngf, 4 * ngf, 3)                    # residual blocks
            + _conv(4 * ngf, 2 * ngf, 3) + _conv(2 * ngf, ngf, 3)         # two up steps
            + _conv(ngf, c_out, 7))


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_parameter_count_matches_hand_formula_and_official_11_38m():
    count = _count(ResnetGenerator())
    assert count == _generator_params(3, 3, 64, 9)
    assert abs(count - 11.38e6) < 0.01e6


def test_plain_resampling_has_the_same_parameter_count():
    # Stride-2 conv and ConvTranspose2d(3x3) have the same weights as the anti-aliased convs.
    net = ResnetGenerator(1, 2, ngf=8, n_blocks=3, antialias=False, antialias_up=False)
    assert _count(net) == _generator_params(1, 2, 8, 3)


def test_batch_norm_drops_conv_biases_and_adds_affine_parameters():
    ngf, n_blocks = 8, 2
    # Every conv but the last is followed by a norm: its bias goes, the norm brings 2 per channel.
    normed_channels = ngf + 2 * ngf + 4 * ngf + n_blocks * 2 * 4 * ngf + 2 * ngf + ngf
    expected = _generator_params(3, 3, ngf, n_blocks) - normed_channels + 2 * normed_channels
    assert _count(ResnetGenerator(ngf=ngf, n_blocks=n_blocks, norm="batch")) == expected


def test_layer_indices_and_state_dict_keys_follow_the_official_model():
    net = ResnetGenerator()
    model = net.model
    assert len(model) == 32
    assert isinstance(model[0], nn.ReflectionPad2d)
    assert isinstance(model[4], nn.Conv2d) and model[4].stride == (1, 1) and model[4].out_channels == 128
    assert isinstance(model[7], Downsample) and isinstance(model[11], Downsample)
    assert isinstance(model[8], nn.Conv2d) and model[8].out_channels == 256
    assert all(isinstance(model[k], ResnetBlock) for k in range(12, 21))
    assert isinstance(model[21], Upsample) and isinstance(model[25], Upsample)
    assert isinstance(model[31], nn.Tanh)
    keys = set(net.state_dict())
    for key in ("model.1.weight", "model.7.filt", "model.12.conv_block.1.weight",
                "model.12.conv_block.5.bias", "model.21.filt", "model.22.weight", "model.30.bias"):
        assert key in keys
    assert net.nce_layers == (0, 4, 8, 12, 16)


@pytest.mark.parametrize("shape", [(1, 3, 17, 23), (2, 3, 31, 45), (1, 3, 64, 64)])
@pytest.mark.parametrize("antialias", [True, False])
def test_output_has_input_size_and_tanh_range(shape, antialias):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8, n_blocks=2, antialias=antialias, antialias_up=antialias)
    x = torch.rand(shape) * 2 - 1
    y = net(x)
    assert y.shape == shape
    assert torch.isfinite(y).all() and y.abs().max() <= 1


def test_multiple_of_4_runs_the_plain_sequential_and_others_are_reflect_padded_then_cropped():
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8, n_blocks=2)
    x = torch.randn(1, 3, 32, 36)
    torch.testing.assert_close(net(x), net.model(x))
    x = torch.randn(1, 3, 17, 23)  # padded to 20 x 24 at the bottom / right
    expected = net.model(F.pad(x, (0, 1, 0, 3), mode="reflect"))[..., :17, :23]
    torch.testing.assert_close(net(x), expected)


def test_explicit_channel_counts():
    net = ResnetGenerator(in_channels=1, out_channels=4, ngf=8, n_blocks=1)
    assert net(torch.randn(2, 1, 20, 20)).shape == (2, 4, 20, 20)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        net(torch.randn(2, 3, 20, 20))


def test_default_features_channels_sizes_and_equal_to_the_sequential_prefix():
    torch.manual_seed(0)
    net = ResnetGenerator()
    x = torch.randn(1, 3, 32, 32)
    feats = net.forward_features(x)
    assert [f.shape[1] for f in feats] == [3, 128, 256, 256, 256]
    assert [tuple(f.shape[2:]) for f in feats] == [(38, 38), (32, 32), (16, 16), (8, 8), (8, 8)]
    assert net.feature_channels() == [3, 128, 256, 256, 256]
    with torch.no_grad():
        for k, feat in zip((0, 4, 8, 12, 16), feats):
            torch.testing.assert_close(feat, net.model[:k + 1](x))


def test_forward_features_stops_at_the_deepest_requested_layer():
    net = ResnetGenerator(ngf=8, n_blocks=6)
    called = []
    net.model[17].register_forward_hook(lambda *args: called.append(17))
    net.model[16].register_forward_hook(lambda *args: called.append(16))
    net.forward_features(torch.randn(1, 3, 16, 16))
    assert called == [16]


def test_forward_with_features_equals_forward_and_forward_features():
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8, n_blocks=5)
    x = torch.randn(2, 3, 30, 26)
    y, feats = net.forward_with_features(x, layers=(8, 0, 13))
    torch.testing.assert_close(y, net(x))
    expected = net.forward_features(x, layers=(8, 0, 13))
    assert [f.shape[1] for f in feats] == [32, 3, 32]
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want)
    # Features are those of the image padded to 32 x 28 (+6 for the 7x7 conv's reflection pad).
    assert feats[1].shape[2:] == (38, 34)


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8, n_blocks=1, dropout=True)
    assert any(isinstance(m, nn.Dropout) for m in net.modules())
    x = torch.randn(1, 3, 16, 16)
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("padding", ["replicate", "zero"])
def test_other_paddings_of_the_residual_blocks(padding):
    net = ResnetGenerator(ngf=8, n_blocks=1, padding=padding)
    assert net(torch.randn(1, 3, 12, 12)).shape == (1, 3, 12, 12)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="norm"):
        ResnetGenerator(norm="group")
    with pytest.raises(ValueError, match="padding"):
        ResnetGenerator(padding="circular")
    with pytest.raises(ValueError, match="layers"):
        ResnetGenerator(ngf=8, n_blocks=1, nce_layers=(0, 99))
    net = ResnetGenerator(ngf=8, n_blocks=1)
    with pytest.raises(ValueError, match="at least 5"):
        net(torch.randn(1, 3, 4, 16))
    with pytest.raises(ValueError, match="layers"):
        net.forward_features(torch.randn(1, 3, 16, 16), layers=[])


def test_checkpointed_blocks_keep_outputs_features_and_gradients():
    torch.manual_seed(0)
    plain = ResnetGenerator(ngf=4, n_blocks=2, dropout=True).double()
    saving = ResnetGenerator(ngf=4, n_blocks=2, dropout=True, checkpoint_blocks=True).double()
    saving.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 18, 22, dtype=torch.float64)
    results = []
    for net in (plain, saving):
        torch.manual_seed(1)  # same dropout masks; the recompute must replay them
        y, feats = net.forward_with_features(x, layers=(4, 13))
        loss = y.square().mean() + sum(f.mean() for f in feats)
        results.append((y, [g.clone() for g in torch.autograd.grad(loss, list(net.parameters()))]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def _plain_block(block: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """The block through the plain modules and autograd (the fused path bypassed)."""
    return x + block.conv_block(x)


def test_fused_block_matches_the_plain_modules_values_and_gradients():
    torch.manual_seed(0)
    block = ResnetBlock(5).double()
    assert block.fused
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    out = block(x)
    grad = torch.randn_like(out)
    fused = torch.autograd.grad(out, [x, *params], grad)
    plain_out = _plain_block(block, x)
    plain = torch.autograd.grad(plain_out, [x, *params], grad)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-12)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_fused_block_does_not_keep_the_relu_output_its_padded_copies_or_the_norm_statistics(saved_bytes):
    b, c, h, w = 2, 4, 6, 8
    block = ResnetBlock(c)
    x = torch.randn(b, c, h, w, requires_grad=True)
    fused = saved_bytes(block, x)
    block.fused = False
    plain = saved_bytes(block, x)
    relu_out, padded = b * c * h * w * 4, b * c * (h + 2) * (w + 2) * 4
    norm_statistics = 2 * b * c * 4  # mean and 1/std, which the fused backward recomputes
    pad_input = b * c * h * w * 4  # aten's reflection pad keeps its input; ReflectPad's backward needs none
    assert plain - fused == relu_out + padded + norm_statistics + pad_input


def test_blocks_that_are_not_the_official_one_are_not_fused():
    assert not ResnetBlock(4, padding="zero").fused
    assert not ResnetBlock(4, norm="batch").fused
    assert not ResnetBlock(4, dropout=True).fused


def test_down_steps_train_fused_with_the_values_and_gradients_of_the_plain_layers(monkeypatch):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=1, nce_layers=(0, 4, 8, 12)).double()
    x = torch.randn(2, 3, 16, 20, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())

    def run():
        out, feats = net.forward_with_features(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
            + sum((f ** 2).mean() for f in feats)
        return [out, *feats], torch.autograd.grad(loss, [x, *params])

    fused_values, fused_grads = run()
    monkeypatch.setattr(fused_module, "fused_step", lambda *args: None)
    plain_values, plain_grads = run()
    for a, b in zip(fused_values + list(fused_grads), plain_values + list(plain_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_fused_runs_keep_only_their_inputs(monkeypatch, saved_bytes):
    b, ngf, h, w = 2, 4, 16, 12
    net = ResnetGenerator(ngf=ngf, n_blocks=1)
    x = torch.randn(b, 3, h, w)
    fused = saved_bytes(net, x)
    monkeypatch.setattr(fused_module, "fused_step", lambda *args: None)
    plain = saved_bytes(net, x)
    # What the plain layers keep and the fused runs recompute (float32, so 4 bytes a number).
    # [norm, ReLU, conv 3x3]: the ReLU output and the norm's mean and 1/std.
    first = b * ngf * (h * w + 2)
    # Each down step [norm, ReLU, blur-pool]: also the padded copy the blur reads.
    down1 = b * 2 * ngf * (h * w + (h + 2) * (w + 2) + 2)
    down2 = b * 4 * ngf * ((h // 2) * (w // 2) + (h // 2 + 2) * (w // 2 + 2) + 2)
    # The second up step [norm, ReLU, Upsample, conv]: the ReLU output and statistics, and the
    # upsampled map the conv reads. The first up step follows a residual block: no ReLU, not fused.
    c, h2, w2 = 2 * ngf, h // 2, w // 2
    up2 = b * c * (h2 * w2 + 2 + h * w)
    # The last [norm, ReLU, reflection pad 3, conv 7x7]: the ReLU output, statistics, padded copy.
    last = b * ngf * (h * w + 2 + (h + 6) * (w + 6))
    assert plain - fused == 4 * (first + down1 + down2 + up2 + last)


def test_a_requested_inner_feature_keeps_the_down_step_unfused():
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=1)
    x = torch.randn(1, 3, 16, 16)
    (feat,) = net.forward_features(x, [6])  # the first down step's ReLU output
    with torch.no_grad():
        torch.testing.assert_close(feat, net.model[:7](x))
