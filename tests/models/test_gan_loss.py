import math

import pytest
import torch

from lowcon.models.gan_loss import GAN_MODES, GANLoss, gan_loss

VALUES = [-2.0, 0.0, 0.5, 3.0]


def _prediction() -> torch.Tensor:
    return torch.tensor(VALUES).view(1, 1, 2, 2)


def _mean(values):
    return sum(values) / len(values)


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_lsgan_is_mean_squared_distance_to_1_or_0():
    loss = GANLoss("lsgan")
    assert float(loss(_prediction(), True)) == pytest.approx((9 + 1 + 0.25 + 4) / 4)
    assert float(loss(_prediction(), False)) == pytest.approx((4 + 0 + 0.25 + 9) / 4)
    assert float(loss(_prediction(), True, for_discriminator=False)) == pytest.approx(14.25 / 4)
    assert float(loss(torch.ones(2, 1, 3, 3), True)) == 0.0


@pytest.mark.parametrize("mode", ["vanilla", "nonsaturating"])
def test_vanilla_and_nonsaturating_are_binary_cross_entropy_on_logits(mode):
    loss = GANLoss(mode)
    # -log(sigmoid(x)) = log(1 + e^-x) for real, -log(1 - sigmoid(x)) = log(1 + e^x) for fake
    real = _mean([-math.log(1 / (1 + math.exp(-v))) for v in VALUES])
    fake = _mean([-math.log(1 - 1 / (1 + math.exp(-v))) for v in VALUES])
    assert float(loss(_prediction(), True)) == pytest.approx(real, rel=1e-6)
    assert float(loss(_prediction(), False)) == pytest.approx(fake, rel=1e-6)
    assert real == pytest.approx(_mean([_softplus(-v) for v in VALUES]))
    assert float(loss(_prediction(), True, for_discriminator=False)) == pytest.approx(real, rel=1e-6)


def test_hinge_discriminator_and_generator():
    loss = GANLoss("hinge")
    assert float(loss(_prediction(), True)) == pytest.approx((3 + 1 + 0.5 + 0) / 4)
    assert float(loss(_prediction(), False)) == pytest.approx((0 + 1 + 1.5 + 4) / 4)
    assert float(loss(_prediction(), True, for_discriminator=False)) == pytest.approx(-1.5 / 4)
    with pytest.raises(ValueError, match="target_is_real=True"):
        loss(_prediction(), False, for_discriminator=False)


@pytest.mark.parametrize("mode", GAN_MODES)
def test_scalar_function_equals_module_and_gradcheck(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    for target in (True, False):
        out = GANLoss(mode)(x, target)
        assert out.shape == ()
        torch.testing.assert_close(out, gan_loss(x, target, mode=mode))
        assert torch.autograd.gradcheck(lambda t: gan_loss(t, target, mode=mode), (x,))


def test_bad_arguments_raise():
    with pytest.raises(ValueError) as info:
        GANLoss("wgan")
    assert all(mode in str(info.value) for mode in GAN_MODES)
    with pytest.raises(TypeError, match="target_is_real"):
        gan_loss(_prediction(), 1)
    with pytest.raises(TypeError, match="prediction"):
        gan_loss([0.0], True)
