import math

import pytest
import torch
from torch import nn

from lowcon.models.init import init_weights
from lowcon.models.resnet_generator import ResnetGenerator


@torch.no_grad()
def test_xavier_gain_002_std_and_zero_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 96, 3)
    assert init_weights(conv) is conv
    fan_in, fan_out = 64 * 9, 96 * 9
    expected = 0.02 * math.sqrt(2.0 / (fan_in + fan_out))
    assert float(conv.weight.std()) == pytest.approx(expected, rel=0.03)
    assert float(conv.weight.mean()) == pytest.approx(0.0, abs=expected * 0.05)
    assert torch.count_nonzero(conv.bias) == 0


@torch.no_grad()
def test_normal_kaiming_orthogonal():
    torch.manual_seed(0)
    conv = init_weights(nn.Conv2d(64, 64, 3), "normal", 0.05)
    assert float(conv.weight.std()) == pytest.approx(0.05, rel=0.03)
    conv = init_weights(nn.Conv2d(64, 64, 3), "kaiming")
    assert float(conv.weight.std()) == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.03)
    linear = init_weights(nn.Linear(32, 16), "orthogonal", 0.5)
    torch.testing.assert_close(linear.weight @ linear.weight.T, 0.25 * torch.eye(16), atol=1e-5, rtol=0)


@torch.no_grad()
def test_batch_norm_weights_near_one_and_instance_norm_without_affine_untouched():
    torch.manual_seed(0)
    net = init_weights(nn.Sequential(nn.BatchNorm2d(4096), nn.InstanceNorm2d(8)))
    assert float(net[0].weight.mean()) == pytest.approx(1.0, abs=0.002)
    assert float(net[0].weight.std()) == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(net[0].bias) == 0


@torch.no_grad()
def test_every_conv_of_the_generator_is_initialised():
    net = init_weights(ResnetGenerator(ngf=8, n_blocks=2, antialias_up=False))
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 10  # two 7x7, two down, four in the blocks, two up
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    assert all(float(m.weight.abs().max()) < 0.02 for m in convs)  # xavier 0.02 is tiny vs default


def test_unknown_init_type_raises():
    with pytest.raises(ValueError, match="normal"):
        init_weights(nn.Linear(2, 2), "uniform")
