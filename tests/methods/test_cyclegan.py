"""CycleGAN training step against hand recomputations: losses, pools, optimisers, schedule."""
import copy

import pytest
import torch
from torch import nn

from lowcon.methods.cyclegan import CycleGAN
from lowcon.models.patch_discriminator import PatchDiscriminator
from lowcon.models.resnet_generator import ResnetGenerator


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (tests/conftest.py)


def tiny_cyclegan(seed: int = 0, **kwargs) -> CycleGAN:
    torch.manual_seed(seed)
    nets = [ResnetGenerator(ngf=4, n_blocks=1, antialias=False, antialias_up=False) for _ in range(2)]
    nets += [PatchDiscriminator(ndf=4, n_layers=2, antialias=False) for _ in range(2)]
    return CycleGAN(*nets, **kwargs)


def images(seed: int, batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def mse_to(x: torch.Tensor, target: float) -> float:
    return float(((x - target) ** 2).mean())


def l1(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().mean())


@torch.no_grad()
def test_generator_loss_is_gan_plus_weighted_cycle_and_identity():
    gan = tiny_cyclegan(lambda_A=10.0, lambda_B=5.0, lambda_identity=0.5)
    a, b = images(1) * 2 - 1, images(2) * 2 - 1
    passed = gan.translate_for_training(a, b)
    losses = gan.generator_losses(a, b, passed)
    fake_b, fake_a = gan.G_A(a), gan.G_B(b)
    expected = {
        "G_A": mse_to(gan.D_A(fake_b), 1.0),
        "G_B": mse_to(gan.D_B(fake_a), 1.0),
        "cycle_A": l1(gan.G_B(fake_b), a),
        "cycle_B": l1(gan.G_A(fake_a), b),
        "idt_A": l1(gan.G_A(b), b),
        "idt_B": l1(gan.G_B(a), a),
    }
    for key, value in expected.items():
        assert float(losses[key]) == pytest.approx(value, rel=1e-5), key
    # Official weighting: idt_A (G_A on B) by lambda_B, idt_B by lambda_A.
    total = (expected["G_A"] + expected["G_B"] + 10 * expected["cycle_A"] + 5 * expected["cycle_B"]
             + 0.5 * (5 * expected["idt_A"] + 10 * expected["idt_B"]))
    assert float(losses["G"]) == pytest.approx(total, rel=1e-5)
    assert "idt_A" not in tiny_cyclegan(lambda_identity=0.0).generator_losses(a, b, passed)


def test_train_step_updates_generators_first_then_discriminators_on_pooled_fakes():
    gan = tiny_cyclegan(pool_size=50)
    before = copy.deepcopy(gan)
    batch = {"A": images(3), "B": images(4)}
    logged = gan.train_step(batch)
    a, b = batch["A"] * 2 - 1, batch["B"] * 2 - 1
    with torch.no_grad():
        fake_b, fake_a = before.G_A(a), before.G_B(b)
        # A pool that is not full returns the new fakes and keeps them.
        assert torch.allclose(gan.pool_B.images[0], fake_b[0], atol=1e-6)
        assert torch.allclose(gan.pool_A.images[0], fake_a[0], atol=1e-6)
        assert logged["D_A_real"] == pytest.approx(mse_to(before.D_A(b), 1.0), rel=1e-5)
        assert logged["D_A_fake"] == pytest.approx(mse_to(before.D_A(fake_b), 0.0), rel=1e-5)
        assert logged["D_B_fake"] == pytest.approx(mse_to(before.D_B(fake_a), 0.0), rel=1e-5)
    assert logged["D_A"] == pytest.approx(0.5 * (logged["D_A_real"] + logged["D_A_fake"]), rel=1e-6)
    assert logged["D_B"] == pytest.approx(0.5 * (logged["D_B_real"] + logged["D_B_fake"]), rel=1e-6)
    assert len(gan.pool_A) == len(gan.pool_B) == 1


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(module: nn.Module, saved) -> bool:
    return all(torch.equal(p, s) for p, s in zip(module.parameters(), saved))


def test_each_optimizer_steps_only_its_networks():
    gan = tiny_cyclegan()
    a, b = images(5) * 2 - 1, images(6) * 2 - 1
    passed = gan.translate_for_training(a, b)
    saved = {name: _params(getattr(gan, name)) for name in ("G_A", "G_B", "D_A", "D_B")}
    gan.generator_step(a, b, passed)
    assert not _same(gan.G_A, saved["G_A"]) and not _same(gan.G_B, saved["G_B"])
    assert _same(gan.D_A, saved["D_A"]) and _same(gan.D_B, saved["D_B"])
    after_g = {name: _params(getattr(gan, name)) for name in ("G_A", "G_B")}
    gan.discriminator_step(a, b, passed["fake_A"], passed["fake_B"])
    assert not _same(gan.D_A, saved["D_A"]) and not _same(gan.D_B, saved["D_B"])
    assert _same(gan.G_A, after_g["G_A"]) and _same(gan.G_B, after_g["G_B"])


def test_pools_travel_with_the_training_state():
    gan = tiny_cyclegan(pool_size=3)
    for step in range(2):
        gan.train_step({"A": images(step), "B": images(10 + step)})
    state = gan.training_state_dict()
    fresh = tiny_cyclegan(seed=1, pool_size=3)
    fresh.load_training_state_dict(state)
    assert len(fresh.pool_A) == 2
    assert all(torch.equal(x, y) for x, y in zip(fresh.pool_A.images, gan.pool_A.images))
    assert fresh.steps_done == 2


def test_schedule_ends_at_zero_learning_rate():
    gan = tiny_cyclegan(n_epochs=1, n_epochs_decay=2, steps_per_epoch=1, lr=1e-3)
    lrs = []
    for step in range(3):
        lrs.append(gan.optimizers["D"].param_groups[0]["lr"])
        gan.train_step({"A": images(step), "B": images(5 + step)})
    assert lrs == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert gan.optimizers["G"].param_groups[0]["lr"] == 0.0
