import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowcon.models import banded
from lowcon.models.banded import run_in_bands
from lowcon.models.blur import Downsample, Upsample
from lowcon.models.init import init_weights
from lowcon.models.resnet_generator import ResnetGenerator
from lowcon.models.winograd import conv_forward, nnpack_usable, use_nnpack, use_winograd

ROW = 8  # bytes of one float64 value: band_bytes=ROW gives bands of one row


def _row_bytes(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[1] * x.shape[3] * x.element_size()


@pytest.mark.parametrize("layer", [
    nn.ReflectionPad2d(2), nn.ReplicationPad2d((1, 2, 3, 1)), nn.ZeroPad2d((0, 1, 2, 0)),
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(3, 4, 4, stride=2, padding=1),
    nn.Conv2d(3, 4, 7), nn.Conv2d(3, 6, 3, padding=2, groups=3),
    nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1), nn.ConvTranspose2d(3, 4, 3, stride=1, padding=1),
    Downsample(3), Downsample(3, padding="zero"), Downsample(3, filter_size=4, padding="replicate"), Upsample(3),
], ids=lambda layer: repr(layer).replace(" ", ""))
def test_each_neighbourhood_layer_in_bands_of_every_height_equals_the_layer(layer):
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    layer = layer.double()
    with torch.no_grad():
        expected = layer(x)
    for rows in range(1, expected.shape[2] + 1):  # every band height, the last band shorter
        got = run_in_bands([layer], x, band_bytes=rows * max(_row_bytes(expected), _row_bytes(x)) * 2)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=0, atol=1e-12), rows


def test_chains_of_neighbourhood_layers_equal_the_sequential():
    layers = nn.Sequential(Upsample(3), nn.ReflectionPad2d(1), nn.Conv2d(3, 5, 3), Downsample(5),
                           nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1),
                           nn.Conv2d(4, 2, 3, stride=2, padding=1)).double()
    x = torch.randn(1, 3, 13, 10, dtype=torch.float64)
    with torch.no_grad():
        expected = layers(x)
    for band_bytes in (ROW, 5 * 20 * ROW, 10 ** 9):
        assert torch.allclose(run_in_bands(layers, x, band_bytes), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("antialias,antialias_up,padding,norm", list(itertools.product(
    [True, False], [True, False], ["reflect", "zero", "replicate"], ["instance", "batch", "none"])))
def test_generator_in_bands_equals_its_forward_in_float64(antialias, antialias_up, padding, norm):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=2, antialias=antialias, antialias_up=antialias_up, padding=padding,
                          norm=norm)
    net = init_weights(net, "normal", 0.5).double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # running statistics that are not the identity
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 37, 53, dtype=torch.float64) * 2 - 1  # not a multiple of 4
    before = x.clone()
    with torch.no_grad():
        expected = net(x)
    for band_mb in (ROW / 2 ** 20, 0.002, 64):  # one-row bands, a few rows, whole maps
        got = net.forward_in_bands(x, band_mb=band_mb)
        assert got.shape == x.shape
        assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    assert torch.equal(x, before)  # in-place work only on the pass's own maps


def test_generator_in_bands_runs_the_layers_fast_paths_and_matches_float32_forward(monkeypatch):
    torch.manual_seed(1)
    net = init_weights(ResnetGenerator(ngf=16, n_blocks=2), "xavier", 0.02).eval()
    use_winograd(net, 32, nnpack=True)  # the 3x3 convolutions of 32 channels or more
    use_nnpack(net)  # the 7x7 ones
    x = torch.rand(1, 3, 136, 131) * 2 - 1
    with torch.no_grad():
        expected = net(x)
    calls = []
    monkeypatch.setattr(banded, "conv_forward", lambda *args: calls.append(tuple(args[1].shape)) or conv_forward(*args))
    # whole maps: the 3x3 layers of 32 channels or more by Winograd (or NNPACK), the 7x7 ones by
    # NNPACK where OpenMP is set for it; bands of a few rows are too small for the fast paths
    fast = {(64, 64, 3, 3), (64, 32, 3, 3), (32, 64, 3, 3)}
    fast |= {(16, 3, 7, 7), (3, 16, 7, 7)} if nnpack_usable() else set()
    for band_mb, served in ((0.05, set()), (64, fast)):
        calls.clear()
        got = net.forward_in_bands(x, band_mb=band_mb)
        assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
        assert set(calls) == served


class _LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_map_between_two_norms_is_made_whole():
    # CycleGAN's down steps (no 2ngf map at full size) with CUT's up steps: in one pass the
    # largest map is the upsampled 2ngf-channel one before the last 3x3 convolution.
    ngf, size = 4, 64
    net = ResnetGenerator(ngf=ngf, n_blocks=1, antialias=False, antialias_up=True).eval()
    x = torch.rand(1, 3, size, size)
    with torch.no_grad(), _LargestOutput() as one_pass:
        net(x)
    with _LargestOutput() as banded:
        net.forward_in_bands(x, band_mb=ngf * 2 * size * 4 * 8 / 2 ** 20)  # bands of about 8 rows
    assert one_pass.largest >= 2 * ngf * size * size
    # in bands, only the normed ngf-channel maps at full size are whole
    assert banded.largest == ngf * size * size


def test_anti_aliased_down_steps_normalise_from_streamed_statistics():
    # CUT's down steps: in one pass the 2ngf-channel map at full size is the largest (it is
    # normalised whole); in bands the first down step's norm streams its statistics, so the
    # largest map is a normed ngf-channel one (or the 4ngf one at half size, as large), and the
    # output is the same.
    ngf, size = 4, 64
    net = ResnetGenerator(ngf=ngf, n_blocks=1, antialias=True, antialias_up=False).double().eval()
    assert net._streamed_norms() == {5}  # [4] conv, [5] norm, [6] ReLU, [7] blur-pool
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad(), _LargestOutput() as one_pass:
        expected = net(x)
    band_mb = ngf * 2 * size * 8 * 8 / 2 ** 20  # bands of about 8 rows
    with _LargestOutput() as banded:
        got = net.forward_in_bands(x, band_mb=band_mb)
    assert one_pass.largest >= 2 * ngf * size * size
    assert banded.largest == ngf * size * size
    assert (got - expected).abs().max() < 1e-10
    with _LargestOutput() as whole_norms:
        whole = run_in_bands(net.model, x, int(band_mb * 2 ** 20))  # no norm streamed
    assert whole_norms.largest == 2 * ngf * size * size
    assert (whole - expected).abs().max() < 1e-10
    assert (run_in_bands(net.model, x, int(band_mb * 2 ** 20), streamed=frozenset({5, 9})) - expected).abs().max() < 1e-10


def test_bands_give_free_memory_back_between_stages(monkeypatch):
    # The whole maps between chains are gigabytes for a large photo; with the heap never trimmed
    # (retain_freed_memory) each would stay in the resident memory after it is freed.
    import lowcon.models.banded as banded

    calls = []
    monkeypatch.setattr(banded, "release_free_memory", lambda: calls.append(1))
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.Tanh()]
    run_in_bands(layers, torch.randn(1, 3, 8, 8), band_bytes=64)
    assert len(calls) == 3  # before the norm, the ReLU and the Tanh


@pytest.mark.parametrize("band_bytes", [1, 3 * 6 * 19 * 8 * 4, 10 ** 9], ids=["one row", "four rows", "whole"])
def test_a_streamed_norm_equals_the_norm_of_the_whole_map(band_bytes):
    # Statistics merged band by band (a batch of 2, odd sizes, values far from 0 so that a
    # one-pass variance would lose digits): the same map as normalising it whole.
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.InstanceNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3, stride=2)]
    torch.manual_seed(0)
    for layer in (layers[0], layers[3]):
        layer.double()
    with torch.no_grad():
        layers[0].bias.add_(1e3)
    x = torch.randn(2, 3, 19, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = nn.Sequential(*layers)(x)
    got = run_in_bands(layers, x, band_bytes, streamed=frozenset({1}))
    assert (got - expected).abs().max() < 1e-10 * expected.abs().max()


def test_layers_it_does_not_know_run_on_the_whole_map():
    layers = [nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
              nn.Conv2d(4, 2, 3, dilation=2)]
    x = torch.randn(1, 3, 9, 8)
    with torch.no_grad():
        expected = nn.Sequential(*layers)(x)
    assert torch.allclose(run_in_bands(layers, x, band_bytes=64), expected, atol=1e-6)


def test_bad_band_sizes_raise():
    with pytest.raises(ValueError, match="band_bytes"):
        run_in_bands([nn.ReLU()], torch.zeros(1, 1, 2, 2), band_bytes=0)
    with pytest.raises(ValueError, match="band_mb"):
        ResnetGenerator(ngf=4, n_blocks=1).forward_in_bands(torch.zeros(1, 3, 8, 8), band_mb=0)
