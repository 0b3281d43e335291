"""SinCUT's StyleGAN2-style networks: sizes, FIR resampling, modulated convs, features, training."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowcon.config import ConfigError, from_dict, load_config, preset_path, to_dict
from lowcon.models.stylegan2 import (
    Blur,
    ConvLayer,
    EqualConv2d,
    EqualLinear,
    FusedLeakyReLU,
    ModulatedConv2d,
    NoiseInjection,
    ResBlock,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    StyledConv,
    fir_filter,
    fir_kernel,
    stylegan2_resolution,
)
from lowcon.training.checkpoint import save_checkpoint
from lowcon.translation import TranslationConfig, build_discriminator, build_generator, build_method, load_translator


BLUR_1331 = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (tests/conftest.py)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _set_noise_weights(net: nn.Module, value: float) -> None:
    for module in net.modules():
        if isinstance(module, NoiseInjection):
            module.weight.data.fill_(value)


# -- parameter counts ------------------------------------------------------------------------------


def test_sincut_generator_has_the_official_parameter_count_worked_out_by_hand():
    # ngf 10 -> channel multiplier 10/32; at 64 px: 256 * 10/32 = 80 channels, at 32 px: 160.
    # A 3x3 ConvLayer with activation: out*in*9 weights + out biases (in the fused leaky ReLU).
    first = 80 * 3 * 1 + 80                                   # 1x1 conv 3 -> 80: 320
    down_block = (80 * 80 * 9 + 80) + (160 * 80 * 9 + 160) + 160 * 80 * 1  # conv1, conv2, skip: 185,840
    block = 2 * (160 * 160 * 9 + 160)                         # identity skip: 461,120
    encoder = first + down_block + 3 * block                  # 1,569,520
    up_conv = 80 * 160 * 9 + 1 + 80                           # modulated weight, noise weight, bias: 115,281
    last = 3 * 80 * 1 + 3                                     # 1x1 conv 80 -> 3: 243
    decoder = 3 * block + up_conv + last                      # 1,498,884
    assert encoder + decoder == 3_068_404
    assert _count(StyleGAN2Generator(3, 3, ngf=10, n_blocks=6, size=64, num_downsampling=1)) == 3_068_404


def test_sincut_discriminator_has_the_official_parameter_count_worked_out_by_hand():
    # ndf 8 -> multiplier 8/64: 64 px: 32, 32 px: 64, 16 px: 128, 8 px: 256, 4 px: min(384, 512) = 384.
    def down_block(c_in, c_out):                              # conv1 3x3, conv2 3x3 (down), skip 1x1 (no bias)
        return (c_in * c_in * 9 + c_in) + (c_out * c_in * 9 + c_out) + c_out * c_in

    first = 32 * 3 + 32                                       # 128
    blocks = down_block(32, 64) + down_block(64, 128) + down_block(128, 256) + down_block(256, 384)
    assert blocks == 29_792 + 118_976 + 475_520 + 1_573_504
    final_conv = 384 * 384 * 9 + 384                          # 1,327,488
    final_linear = (384 * 4 * 4 * 384 + 384) + (384 + 1)      # 2,359,680 + 385
    assert first + blocks + final_conv + final_linear == 5_885_473
    assert _count(StyleGAN2Discriminator(3, ndf=8, size=64)) == 5_885_473


@pytest.mark.parametrize("ngf, ndf, n_blocks, size, steps, g_count, d_count", [
    # Counted on the official StyleGAN2Generator / StyleGAN2Discriminator classes.
    (64, 64, 6, 256, 2, 32_170_373, 14_263_105),  # CUT-sized: generator channels capped at 512
    (4, 4, 2, 32, 1, 783_556, 2_263_585),         # discriminator channels capped at 384
])
def test_other_settings_match_the_official_parameter_counts(ngf, ndf, n_blocks, size, steps, g_count, d_count):
    net = StyleGAN2Generator(ngf=ngf, n_blocks=n_blocks, size=size, num_downsampling=steps, nce_layers=(0, 2))
    assert _count(net) == g_count
    assert _count(StyleGAN2Discriminator(ndf=ndf, size=size)) == d_count


def test_resolution_rounds_the_crop_to_the_nearest_power_of_two_in_log_scale():
    assert [stylegan2_resolution(c) for c in (64, 90, 91, 256, 300, 362, 363)] == [64, 64, 128, 256, 256, 256, 512]


def test_state_dict_names_and_shapes_follow_the_official_networks():
    g = StyleGAN2Generator().state_dict()
    shapes = {"encoder.convs.1.0.weight": (80, 3, 1, 1), "encoder.convs.1.1.bias": (1, 80, 1, 1),
              "encoder.convs.2.conv2.0.kernel": (4, 4), "encoder.convs.2.conv2.1.weight": (160, 80, 3, 3),
              "encoder.convs.2.skip.1.weight": (160, 80, 1, 1), "encoder.convs.5.conv1.0.weight": (160, 160, 3, 3),
              "decoder.convs.3.conv.weight": (1, 80, 160, 3, 3), "decoder.convs.3.conv.blur.kernel": (4, 4),
              "decoder.convs.3.noise.weight": (1,), "decoder.convs.3.activate.bias": (1, 80, 1, 1),
              "decoder.convs.4.0.weight": (3, 80, 1, 1), "decoder.convs.4.1.bias": (1, 3, 1, 1)}
    assert {k: tuple(g[k].shape) for k in shapes} == shapes
    d = StyleGAN2Discriminator().state_dict()
    shapes = {"convs.0.0.weight": (32, 3, 1, 1), "convs.4.conv2.1.weight": (384, 256, 3, 3),
              "final_conv.0.weight": (384, 384, 3, 3), "final_linear.0.weight": (384, 6144),
              "final_linear.1.bias": (1,)}
    assert {k: tuple(d[k].shape) for k in shapes} == shapes


# -- equalized learning rate -------------------------------------------------------------------------


def test_weights_are_unit_normal_scaled_at_run_time_and_biases_start_at_zero():
    torch.manual_seed(0)
    conv = EqualConv2d(64, 32, 3, padding=1)
    w = conv.weight.detach()
    assert abs(float(w.mean())) < 0.02 and abs(float(w.std()) - 1) < 0.02
    x = torch.randn(2, 64, 5, 5)
    expected = F.conv2d(x, w / math.sqrt(64 * 9), padding=1)  # bias 0
    torch.testing.assert_close(conv(x), expected)

    linear = EqualLinear(50, 7, activate=True)
    v = torch.randn(3, 50)
    expected = F.leaky_relu(v @ linear.weight.detach().T / math.sqrt(50), 0.2) * math.sqrt(2)  # bias 0
    torch.testing.assert_close(linear(v), expected)

    net = StyleGAN2Generator(ngf=2, n_blocks=2, size=32, nce_layers=(0, 2, 3))
    for module in net.modules():
        if isinstance(module, FusedLeakyReLU):
            assert not module.bias.any()
        if isinstance(module, NoiseInjection):
            assert not module.weight.any()
    cfg = TranslationConfig(method="sincut", netG="stylegan2", netD="stylegan2", crop_size=32, ngf=2, ndf=2,
                            n_blocks=2, nce_layers=(0, 2, 3))
    # build_* must not apply init_weights (xavier with gain 0.02 would give a std near 0.02).
    for built in (build_generator(cfg), build_discriminator(cfg)):
        weights = torch.cat([p.detach().flatten() for n, p in built.named_parameters() if n.endswith("weight")
                             and p.numel() > 1])
        assert abs(float(weights.std()) - 1) < 0.05


def test_fused_leaky_relu_is_bias_then_leaky_relu_times_sqrt2():
    act = FusedLeakyReLU(2)
    act.bias.data = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    x = torch.tensor([[[[1.0]], [[0.5]]]])  # +0.5 -> 1.5 ; -1 -> -0.5
    torch.testing.assert_close(act(x).flatten(), torch.tensor([1.5, -0.5 * 0.2]) * math.sqrt(2))


# -- FIR resampling and modulated convs against explicit loops ----------------------------------------


def _fir_reference(x: np.ndarray, kernel: np.ndarray, pad: tuple[int, int]) -> np.ndarray:
    """Zero-pad each side, then a true 2D convolution: out[i, j] = sum_ab k[a, b] xp[i + K-1-a, j + K-1-b]."""
    xp = np.pad(x, ((0, 0), (0, 0), pad, pad))
    size = kernel.shape[0]
    out = np.zeros((x.shape[0], x.shape[1], xp.shape[2] - size + 1, xp.shape[3] - size + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            for a in range(size):
                for b in range(size):
                    out[:, :, i, j] += kernel[a, b] * xp[:, :, i + size - 1 - a, j + size - 1 - b]
    return out


def test_fir_kernel_is_the_normalised_outer_product_of_1331():
    row = np.array([1.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(fir_kernel().numpy(), row[:, None] * row[None, :] / 64)


@pytest.mark.parametrize("pad", [(2, 2), (2, 1), (1, 1), (0, 0)])
def test_fir_filter_equals_a_loop_convolution_with_an_asymmetric_kernel(pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    kernel = torch.arange(1.0, 10.0, dtype=torch.float64).view(3, 3)  # asymmetric: the flip matters
    expected = _fir_reference(x.numpy(), kernel.numpy(), pad)
    np.testing.assert_allclose(fir_filter(x, kernel, pad).numpy(), expected, rtol=1e-12)
    blurred = Blur(pad).double()(x)
    np.testing.assert_allclose(blurred.numpy(), _fir_reference(x.numpy(), BLUR_1331, pad))


@pytest.mark.parametrize("size", [5, 6, 8, 9])
def test_downsampling_conv_layer_is_blur_then_stride_2_conv_and_halves_the_size(size):
    torch.manual_seed(0)
    layer = ConvLayer(2, 3, 3, downsample=True, activate=False).double()
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    blurred = _fir_reference(x.numpy(), BLUR_1331, (2, 2))
    w = layer[1].weight.detach().numpy() / math.sqrt(2 * 9)
    n = size // 2
    expected = np.zeros((1, 3, n, n))
    for i in range(n):
        for j in range(n):
            expected[0, :, i, j] = np.einsum("ocab,cab->o", w, blurred[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3])
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    block = ResBlock(2, 4, downsample=True)
    assert block(x.float()).shape == (1, 4, n, n)


def test_residual_block_averages_its_branches_with_unit_variance_gain():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    same = ResBlock(2, 2, downsample=False).double()
    with torch.no_grad():
        same.conv2[0].weight.zero_()  # the conv branch gives leaky_relu(0) = 0
    torch.testing.assert_close(same(x), x / math.sqrt(2))
    down = ResBlock(2, 3, downsample=True).double()
    with torch.no_grad():
        down.conv2[1].weight.zero_()
    # The skip: blur padded (1, 1) (6 -> 5 px), then a 1x1 conv on every other pixel.
    blurred = _fir_reference(x.numpy(), BLUR_1331, (1, 1))[:, :, ::2, ::2]
    w = down.skip[1].weight.detach().numpy()[:, :, 0, 0] / math.sqrt(2)
    expected = np.einsum("oc,bchw->bohw", w, blurred) / math.sqrt(2)
    np.testing.assert_allclose(down(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def _modulated_weight(conv: ModulatedConv2d, style_b: torch.Tensor) -> torch.Tensor:
    """The weight for one sample, by the StyleGAN2 formulas (out, in, k, k)."""
    fan_in = conv.in_channels * conv.kernel_size ** 2
    s = conv.modulation.weight @ style_b / math.sqrt(conv.modulation.weight.shape[1]) + conv.modulation.bias
    w = conv.weight[0] / math.sqrt(fan_in) * s[None, :, None, None]
    return w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)


def test_modulated_conv_equals_a_plain_conv_per_sample_with_the_hand_built_weight():
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 3, 3, style_dim=5).double()
    conv.modulation.bias.data.normal_()
    x, style = torch.randn(3, 4, 6, 7, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.cat([F.conv2d(x[b:b + 1], _modulated_weight(conv, style[b]), padding=1) for b in range(3)])
        torch.testing.assert_close(conv(x, style), expected)
        # Demodulated filters have unit norm: a unit-variance white input gives unit-variance outputs.
        norms = _modulated_weight(conv, style[0]).pow(2).sum(dim=(1, 2, 3))
        torch.testing.assert_close(norms, torch.ones(3, dtype=torch.float64))


def test_upsampling_modulated_conv_equals_zero_insertion_conv_and_fir_loops():
    torch.manual_seed(0)
    conv = ModulatedConv2d(2, 3, 3, style_dim=4, upsample=True).double()
    x, style = torch.randn(2, 2, 3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    out = conv(x, style).detach().numpy()
    assert out.shape == (2, 3, 6, 8)
    for b in range(2):
        w = _modulated_weight(conv, style[b]).detach().numpy()
        # Stride-2 transposed conv: every input pixel spreads w over rows 2i .. 2i+2, cols 2j .. 2j+2.
        spread = np.zeros((1, 3, 2 * 3 + 1, 2 * 4 + 1))
        for i in range(3):
            for j in range(4):
                spread[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum("c,ocab->oab", x[b, :, i, j].numpy(), w)
        expected = _fir_reference(spread, BLUR_1331 * 4, (1, 1))
        np.testing.assert_allclose(out[b:b + 1], expected, rtol=1e-10, atol=1e-12)


def test_unmodulated_conv_as_the_decoder_calls_it_uses_a_style_of_ones():
    # The official decoder calls its StyledConv with no style: the weight is only demodulated.
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 2, 3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = conv.weight[0] / math.sqrt(27)
    w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, padding=1))
    with pytest.raises(ValueError, match="style"):
        conv(x, torch.ones(2, 3, dtype=torch.float64))


def test_styled_conv_adds_noise_before_the_bias_and_activation():
    torch.manual_seed(0)
    layer = StyledConv(3, 4, 3)
    layer.noise.weight.data.fill_(0.7)
    layer.activate.bias.data.normal_()
    x = torch.randn(2, 3, 5, 5)
    torch.manual_seed(9)
    out = layer(x)
    torch.manual_seed(9)
    noise = torch.randn(2, 1, 5, 5)
    expected = F.leaky_relu(layer.conv(x) + 0.7 * noise + layer.activate.bias, 0.2) * math.sqrt(2)
    torch.testing.assert_close(out, expected)


def test_noise_is_one_fresh_map_per_sample_shared_by_the_channels():
    torch.manual_seed(0)
    layer = StyledConv(3, 4, 3, upsample=True)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), layer(x))  # noise weight starts at 0
    noise = NoiseInjection()
    noise.weight.data.fill_(0.5)
    image = torch.zeros(2, 4, 3, 3)
    first, second = noise(image), noise(image)
    assert not torch.equal(first, second)  # drawn afresh each call
    assert torch.equal(first[:, :1].expand_as(first), first) and not torch.equal(first[0], first[1])
    given = torch.randn(2, 1, 3, 3)
    torch.testing.assert_close(noise(image, given), 0.5 * given.expand(2, 4, 3, 3))


# -- the generator's interface --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_generator() -> StyleGAN2Generator:
    torch.manual_seed(0)
    net = StyleGAN2Generator(ngf=2, n_blocks=4, size=64, num_downsampling=2, nce_layers=(0, 2, 4))
    _set_noise_weights(net, 0.3)  # make the noise visible
    return net


@pytest.mark.parametrize("height, width", [(4, 4), (5, 7), (17, 32), (64, 64), (33, 66)])
def test_output_has_the_input_size(small_generator, height, width):
    assert small_generator(torch.randn(1, 3, height, width)).shape == (1, 3, height, width)


def test_odd_sizes_are_reflect_padded_and_cropped_back(small_generator):
    x = torch.randn(1, 3, 9, 10)
    padded = F.pad(x, (0, 2, 0, 3), mode="reflect")  # to 12 x 12, a multiple of 4
    torch.manual_seed(5)
    out = small_generator(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, small_generator(padded)[..., :9, :10])


def test_features_follow_the_official_encoder_indexing(small_generator):
    convs = small_generator.encoder.convs
    assert isinstance(convs[0], nn.Identity) and isinstance(convs[1], ConvLayer)
    assert all(isinstance(convs[k], ResBlock) for k in range(2, 6)) and len(convs) == 6
    x = torch.randn(2, 3, 32, 32)
    feats = small_generator.forward_features(x, (0, 1, 2, 3, 4, 5))
    # ngf 2 at size 64: 64 px -> 16 channels, 32 px -> 32, 16 px -> 64.
    assert [tuple(f.shape[1:]) for f in feats] == [(3, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8),
                                                    (64, 8, 8), (64, 8, 8)]
    assert small_generator.feature_channels((0, 1, 2, 3, 4, 5)) == [3, 16, 32, 64, 64, 64]
    torch.testing.assert_close(feats[0], x)  # layer 0 is the input itself
    assert small_generator.feature_channels() == [3, 32, 64]
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        small_generator.forward_features(x, (6,))


def test_forward_with_features_equals_forward_and_forward_features(small_generator):
    x = torch.randn(2, 3, 20, 24)
    torch.manual_seed(1)
    y, feats = small_generator.forward_with_features(x, (0, 2, 4))
    torch.manual_seed(1)  # the encoder draws nothing: the decoder's noise is the same
    torch.testing.assert_close(y, small_generator(x))
    for a, b in zip(feats, small_generator.forward_features(x, (0, 2, 4))):
        torch.testing.assert_close(a, b)
    assert not torch.equal(small_generator(x), small_generator(x))  # noise: a fresh draw per call


def test_checkpointed_blocks_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = StyleGAN2Generator(ngf=2, n_blocks=2, size=32, nce_layers=(0, 2, 3))
    _set_noise_weights(plain, 0.3)
    recomputed = StyleGAN2Generator(ngf=2, n_blocks=2, size=32, nce_layers=(0, 2, 3), checkpoint_blocks=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for net in (plain, recomputed):
        torch.manual_seed(3)
        net.zero_grad()
        out = net(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_bad_inputs_and_arguments_are_one_line_errors():
    net = StyleGAN2Generator(ngf=2, n_blocks=2, size=32, num_downsampling=2, nce_layers=(0, 2))
    cases = [(lambda: net(torch.randn(1, 3, 3, 8)), "at least 4"),
             (lambda: net(torch.randn(1, 1, 8, 8)), "shape"),
             (lambda: StyleGAN2Generator(n_blocks=3), "n_blocks"),
             (lambda: StyleGAN2Generator(size=48), "size"),
             (lambda: StyleGAN2Generator(size=8, num_downsampling=2), "size"),
             (lambda: StyleGAN2Discriminator(size=2048), "size"),
             (lambda: StyleGAN2Discriminator(ndf=8, size=64)(torch.randn(1, 3, 80, 64)), r"\[64, 79\]"),
             (lambda: StyleGAN2Discriminator(ndf=8, size=64)(torch.randn(1, 3, 64, 63)), r"\[64, 79\]")]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


# -- the discriminator --------------------------------------------------------------------------------


def test_discriminator_gives_one_logit_per_image_for_every_size_its_linear_layer_admits():
    net = StyleGAN2Discriminator(ndf=2, size=32)
    assert len(net.convs) == 1 + 3  # 32 -> 16 -> 8 -> 4
    for side in (32, 35, 39):
        assert net(torch.randn(2, 3, side, side)).shape == (2, 1)


def test_discriminator_is_twice_differentiable_for_the_r1_penalty():
    torch.manual_seed(0)
    block = ResBlock(2, 3, downsample=True).double()  # blur, strided and 1x1 convs, fused leaky ReLUs
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: block(t).sum(), (x,))
    net = StyleGAN2Discriminator(ndf=1, size=8).double()
    real = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(net(real).sum(), real, create_graph=True)
    grad.pow(2).flatten(1).sum(1).mean().backward()
    # d logit / d input is piecewise linear in the input: every weight gets a gradient, the biases
    # (which only move the leaky ReLUs' kinks) a zero one, the last bias none at all.
    named = dict(net.named_parameters())
    assert named.pop("final_linear.1.bias").grad is None
    for name, p in named.items():
        assert torch.isfinite(p.grad).all() and (p.grad.abs().sum() > 0) == name.endswith("weight"), name


# -- through the translation pipeline -------------------------------------------------------------------


def _tiny(method: str = "sincut", **overrides) -> TranslationConfig:
    values = dict(method=method, netG="stylegan2", netD="stylegan2", crop_size=32, ngf=2, ndf=2, n_blocks=2,
                  nce_layers=(0, 2, 3), num_patches=4, batch_size=2, n_epochs=1, n_epochs_decay=1, device="cpu")
    if method == "sincut":
        values.update(lambda_R1=1.0, lambda_identity=1.0, nce_negatives="batch", gan_mode="nonsaturating",
                      lr=0.002, beta1=0.0, beta2=0.99)
    if method == "cyclegan":
        del values["nce_layers"], values["num_patches"]  # CUT-only keys: a cyclegan config refuses them
    values.update(overrides)
    return TranslationConfig(**values)


@pytest.mark.parametrize("method", ["sincut", "cyclegan"])
def test_a_training_step_runs_and_changes_the_weights(method):
    torch.manual_seed(0)
    cfg = _tiny(method)
    cfg.validate()
    trained = build_method(cfg, steps_per_epoch=1)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in trained.checkpoint_modules().items()}
    batch = {"A": torch.rand(2, 3, 32, 32), "B": torch.rand(2, 3, 32, 32)}
    losses = trained.train_step(batch)
    assert all(math.isfinite(v) for v in losses.values())
    if method == "sincut":
        assert {"D_R1", "idt", "NCE_X", "NCE_Y"} <= set(losses)
        assert isinstance(trained.G, StyleGAN2Generator) and isinstance(trained.D, StyleGAN2Discriminator)
    for key, module in trained.checkpoint_modules().items():
        if key.startswith(("G", "D")):
            changed = [not torch.equal(a, b) for a, b in zip(before[key], module.parameters())]
            assert sum(changed) > len(changed) // 2, key


def test_sincut_preset_builds_the_official_networks():
    cfg = load_config(TranslationConfig, preset_path("sincut"))
    assert (cfg.netG, cfg.netD, cfg.nce_layers, cfg.ngf, cfg.ndf, cfg.stylegan2_G_num_downsampling, cfg.n_blocks) == (
        "stylegan2", "stylegan2", (0, 2, 4), 10, 8, 1, 6)
    generator, discriminator = build_generator(cfg), build_discriminator(cfg)
    assert (_count(generator), _count(discriminator)) == (3_068_404, 5_885_473)
    assert generator.feature_channels((0, 2, 4)) == [3, 160, 160]
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        assert generator(x).shape == (1, 3, 64, 64) and discriminator(x).shape == (1, 1)


def test_a_saved_stylegan2_generator_loads_and_old_configs_default_to_resnet(tmp_path):
    cfg = _tiny()
    net = build_generator(cfg)
    state = {"method": "cut", "config": to_dict(cfg), "generator": {"G": net.state_dict()}}
    path = save_checkpoint(tmp_path / "g.pt", state)
    loaded, loaded_cfg = load_translator(path)
    assert isinstance(loaded, StyleGAN2Generator) and loaded_cfg.netG == "stylegan2"
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), net(x))  # noise weights are 0 at init: deterministic
    old = {k: v for k, v in to_dict(TranslationConfig()).items()
           if k not in ("netG", "netD", "stylegan2_G_num_downsampling")}
    assert (from_dict(TranslationConfig, old).netG, from_dict(TranslationConfig, old).netD) == ("resnet", "patch")


@pytest.mark.parametrize("overrides, key", [
    ({"nce_layers": (0, 4, 8)}, "nce_layers"),   # 4 is past a 2-block, 1-downsampling encoder
    ({"n_blocks": 3}, "n_blocks"),
    ({"crop_size": 48}, "crop_size"),             # rounds to 64: the 4x4 linear layer needs 64..79 px
    ({"method": "cut", "preprocess": "none"}, "preprocess"),
    ({"stylegan2_G_num_downsampling": 4}, "stylegan2_G_num_downsampling"),
    ({"netG": "unet"}, "netG"),
])
def test_bad_stylegan2_settings_are_one_line_errors_naming_the_key(overrides, key):
    data = {k: v for k, v in to_dict(_tiny()).items()}
    data.update(overrides)
    with pytest.raises(ConfigError, match=key) as err:
        from_dict(TranslationConfig, data)
    assert "\n" not in str(err.value)


# -- large images in bands of rows ----------------------------------------------------------------------


def _random_generator(num_downsampling: int) -> StyleGAN2Generator:
    """A float64 generator with every parameter drawn afresh, the noise weights (0 at init) too."""
    torch.manual_seed(num_downsampling)
    net = StyleGAN2Generator(ngf=4, n_blocks=2, size=64, num_downsampling=num_downsampling, nce_layers=(0, 2, 3)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net


@pytest.mark.parametrize("num_downsampling", [1, 2])
def test_bands_of_rows_give_the_one_pass_output(num_downsampling, monkeypatch):
    # Odd sizes (padded inside), a batch of 2, noise injected: every band size, from the
    # smallest (one stride phase of rows) to one band, gives forward(x) to float64 rounding
    # when the random state is the same.
    net = _random_generator(num_downsampling)
    x = torch.randn(2, 3, 157, 61, dtype=torch.float64)
    torch.manual_seed(7)
    with torch.no_grad():
        want = net(x)
    slabs = []
    run = net._run
    monkeypatch.setattr(net, "_run", lambda h, layers, last: slabs.append(h.shape[-2]) or run(h, layers, last))
    for band_pixels in (1, 2 * 61 * 20, 10 ** 7):
        slabs.clear()
        torch.manual_seed(7)
        got = net.forward_in_bands(x, band_pixels=band_pixels)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-12 * want.abs().max()
        m = 2 ** num_downsampling  # bands of whole stride phases, of the padded image's rows
        height, width = -(-157 // m) * m, -(-61 // m) * m
        rows = max(m, band_pixels // (2 * width) // m * m)
        assert len(slabs) == -(-height // rows) and max(slabs) <= min(height, rows + 2 * net.context_rows())
    torch.manual_seed(8)  # another random state: other noise, so another output
    assert not torch.allclose(net.forward_in_bands(x), want)


def test_bands_need_their_context_rows():
    # With too few rows of context the bands' edges see zero padding where the image goes on.
    net = _random_generator(1)
    x = torch.randn(1, 3, 64, 32, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        want = net(x)
    net.context_rows = lambda: 2
    torch.manual_seed(0)
    assert (net.forward_in_bands(x, band_pixels=16 * 32) - want).abs().max() > 1e-3


def test_context_rows_of_sincut_worked_out_by_hand():
    # Input pixels of reach, layer by layer: the 1x1 conv 0; the down ResBlock's 3x3 conv 1, its
    # blur 3 and stride-2 3x3 conv 2 (6); then at half resolution 3 + 3 ResBlocks of two 3x3
    # convs, 2 pixels each (24); the up-conv's transposed 3x3 at half resolution 2 and its blur
    # 3; the last 1x1 conv 0. 35 in all, rounded up to a multiple of 2.
    assert build_generator(load_config(TranslationConfig, preset_path("sincut"))).context_rows() == 36
    assert StyleGAN2Generator(ngf=4, n_blocks=2, size=64, num_downsampling=2, nce_layers=(0, 2, 3)).context_rows() % 4 == 0


def test_bands_refuse_a_bad_band_size():
    net = StyleGAN2Generator(ngf=2, n_blocks=2, size=32, nce_layers=(0, 2, 3))
    with pytest.raises(ValueError, match="band_pixels"):
        net.forward_in_bands(torch.randn(1, 3, 32, 32), band_pixels=0)


def test_translate_runs_a_large_image_through_sincut_in_bands(tmp_path, monkeypatch):
    import lowcon.translation as translation
    from lowcon.data.io import read_image
    from lowcon.translation import translate_paths

    cfg = _tiny()
    net = build_generator(cfg)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, NoiseInjection):
                module.weight.fill_(0.3)
    path = save_checkpoint(tmp_path / "g.pt", {"method": "cut", "config": to_dict(cfg), "generator": {"G": net.state_dict()}})
    image = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((50, 37, 3)) * 255).astype(np.uint8)).save(image)
    torch.manual_seed(3)
    plain = translate_paths([image], tmp_path / "plain", path)
    calls = []
    bands = StyleGAN2Generator.forward_in_bands
    monkeypatch.setattr(StyleGAN2Generator, "forward_in_bands",
                        lambda self, x: calls.append(tuple(x.shape)) or bands(self, x, band_pixels=37 * 4))
    monkeypatch.setattr(translation, "BANDS_FROM_PIXELS", 50 * 37 - 1)
    torch.manual_seed(3)
    banded = translate_paths([image], tmp_path / "banded", path)
    assert calls == [(1, 3, 50, 37)]
    assert (read_image(banded[0]) - read_image(plain[0])).abs().max() <= 1 / 255
