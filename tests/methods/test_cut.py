"""CUT / FastCUT / SinCUT training steps against hand recomputations with the public losses."""
import copy

import pytest
import torch
from torch import nn

from lowcon.contrast.patchnce import PatchNCELoss
from lowcon.contrast.projector import PatchProjector
from lowcon.methods.cut import CUT, linear_decay_factor
from lowcon.models.gan_loss import GANLoss
from lowcon.models.patch_discriminator import PatchDiscriminator
from lowcon.models.resnet_generator import ResnetGenerator

LAYERS = (0, 4, 8, 12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (tests/conftest.py)


def tiny_cut(seed: int = 0, **kwargs) -> CUT:
    torch.manual_seed(seed)
    generator = ResnetGenerator(ngf=4, n_blocks=1, nce_layers=LAYERS)
    discriminator = PatchDiscriminator(ndf=4, n_layers=2)
    return CUT(generator, discriminator, **kwargs)


def images(seed: int, batch: int = 1, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


def num(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def patches(feat: torch.Tensor) -> torch.Tensor:
    return feat.flatten(2).transpose(1, 2)  # every location: (B, H*W, C)


def hand_nce(G, head, source, output, flipped=False, temperature=0.07, negatives="image"):
    loss = PatchNCELoss(temperature=temperature, negatives=negatives)
    total = 0.0
    feats_q = G.forward_features(output, LAYERS)
    feats_k = G.forward_features(source, LAYERS)
    for layer, (fq, fk) in enumerate(zip(feats_q, feats_k)):
        if flipped:
            fq = torch.flip(fq, dims=[3])
        q = head.mlps[layer](patches(fq))
        k = head.mlps[layer](patches(fk))
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-7)
        k = k / (k.norm(dim=-1, keepdim=True) + 1e-7)
        total = total + loss(q, k)
    return total / len(LAYERS)


def test_generator_and_discriminator_losses_match_hand_recomputation():
    cut = tiny_cut(lambda_GAN=0.7, lambda_NCE=2.0, nce_idt=True, num_patches=0)
    a, b = images(1) * 2 - 1, images(2) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=False)
    # one pass over [a, b] against a pass each: the same to float32's rounding (the kernels'
    # order of summation depends on the batch)
    assert torch.allclose(passed["fake_B"], cut.G(a), atol=1e-5)
    assert torch.allclose(passed["idt_B"], cut.G(b), atol=1e-5)

    g = cut.generator_losses(a, b, passed)
    fake = cut.G(a)
    gan = GANLoss("lsgan")
    g_gan = gan(cut.D(fake), True)
    assert num(g_gan) == pytest.approx(num(((cut.D(fake) - 1) ** 2).mean()), rel=1e-6)
    nce_x = hand_nce(cut.G, cut.F, a, fake)
    nce_y = hand_nce(cut.G, cut.F, b, cut.G(b))
    assert num(g["G_GAN"]) == pytest.approx(num(g_gan), rel=1e-5)
    assert num(g["NCE_X"]) == pytest.approx(num(nce_x), rel=1e-5)
    assert num(g["NCE_Y"]) == pytest.approx(num(nce_y), rel=1e-5)
    assert num(g["G"]) == pytest.approx(0.7 * num(g_gan) + 2.0 * (num(nce_x) + num(nce_y)) / 2, rel=1e-5)

    d = cut.discriminator_losses(passed["fake_B"], b)
    d_fake = num((cut.D(fake) ** 2).mean())
    d_real = num(((cut.D(b) - 1) ** 2).mean())
    assert num(d["D_fake"]) == pytest.approx(d_fake, rel=1e-5)
    assert num(d["D_real"]) == pytest.approx(d_real, rel=1e-5)
    assert num(d["D"]) == pytest.approx(0.5 * (d_fake + d_real), rel=1e-5)


def test_train_step_logs_the_terms_of_the_tensors_it_trained_on():
    cut = tiny_cut(lambda_GAN=1.0, lambda_NCE=1.0, nce_idt=True, num_patches=0)
    before = copy.deepcopy(cut)
    batch = {"A": images(3), "B": images(4)}
    logged = cut.train_step(batch)
    a, b = batch["A"] * 2 - 1, batch["B"] * 2 - 1
    assert set(logged) == {"D_fake", "D_real", "D", "G_GAN", "NCE_X", "NCE_Y", "G"}
    with torch.no_grad():
        fake = before.G(a)
        # D is updated first (official order), so the generator's GAN term sees the new D.
        assert logged["D_fake"] == pytest.approx(num((before.D(fake) ** 2).mean()), rel=1e-5)
        assert logged["D_real"] == pytest.approx(num(((before.D(b) - 1) ** 2).mean()), rel=1e-5)
        assert logged["G_GAN"] == pytest.approx(num(((cut.D(fake) - 1) ** 2).mean()), rel=1e-5)
        nce_x = num(hand_nce(before.G, before.F, a, fake))
        nce_y = num(hand_nce(before.G, before.F, b, before.G(b)))
    assert logged["NCE_X"] == pytest.approx(nce_x, rel=1e-5)
    assert logged["NCE_Y"] == pytest.approx(nce_y, rel=1e-5)
    assert logged["G"] == pytest.approx(logged["G_GAN"] + (nce_x + nce_y) / 2, rel=1e-5)


def test_fastcut_has_no_identity_term_and_weights_nce_by_lambda():
    cut = tiny_cut(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True, num_patches=0)
    a, b = images(5) * 2 - 1, images(6) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=False)
    assert passed["idt_B"] is None
    losses = cut.generator_losses(a, b, passed)
    assert set(losses) == {"G_GAN", "NCE_X", "G"}
    assert num(losses["G"]) == pytest.approx(num(losses["G_GAN"]) + 10 * num(losses["NCE_X"]), rel=1e-6)
    logged = cut.train_step({"A": images(5), "B": images(6)})
    assert "NCE_Y" not in logged
    assert "idt_B" not in cut.visuals({"A": images(5), "B": images(6)})


def test_flip_equivariance_flips_the_input_and_flips_the_query_features_back():
    cut = tiny_cut(nce_idt=False, flip_equivariance=True, num_patches=0)
    a, b = images(7) * 2 - 1, images(8) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=True)
    assert passed["flipped"]
    assert torch.allclose(passed["fake_B"], cut.G(torch.flip(a, dims=[3])), atol=1e-6)
    # The official keeps fake_B flipped and flips the query features back before PatchNCE.
    expected = hand_nce(cut.G, cut.F, a, passed["fake_B"], flipped=True)
    unflipped = hand_nce(cut.G, cut.F, a, passed["fake_B"], flipped=False)
    got = cut.generator_losses(a, b, passed)["NCE_X"]
    assert num(got) == pytest.approx(num(expected), rel=1e-5)
    assert abs(num(got) - num(unflipped)) > 1e-4

    torch.manual_seed(0)
    draws = [cut.translate_for_training(a, b)["flipped"] for _ in range(100)]
    assert 30 < sum(draws) < 70  # p = 0.5
    plain = tiny_cut(flip_equivariance=False)
    assert not any(plain.translate_for_training(a, b)["flipped"] for _ in range(20))


def test_flipped_queries_are_the_flipped_back_maps_at_the_keys_locations():
    # Sampled patches on a non-square image: the loss reads the query maps at mirrored columns;
    # the independent formulation flips the maps back first and reads them at the keys' ids.
    cut = tiny_cut(nce_idt=False, flip_equivariance=True, num_patches=8)
    a = images(9, size=24)[..., :20] * 2 - 1  # 24 x 20
    fake = cut.translate_for_training(a, a, flip=True)["fake_B"]
    torch.manual_seed(3)
    keys = cut.sampler(cut.G.forward_features(a, LAYERS))
    got = cut.nce_loss(a, fake, flipped=True, keys=keys)
    queries = cut.F(cut.sampler([torch.flip(f, dims=[3]) for f in cut.G.forward_features(fake, LAYERS)],
                                ids=keys[1])[0])
    expected = sum(cut.nce(q, k) for q, k in zip(queries, cut.F(keys[0]))) / len(LAYERS)
    assert num(got) == pytest.approx(num(expected), rel=1e-6)
    unflipped = cut.F(cut.sampler(cut.G.forward_features(fake, LAYERS), ids=keys[1])[0])
    not_flipped_back = sum(cut.nce(q, k) for q, k in zip(unflipped, cut.F(keys[0]))) / len(LAYERS)
    assert abs(num(got) - num(not_flipped_back)) > 1e-4


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(module: nn.Module, saved: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, s) for p, s in zip(module.parameters(), saved))


def test_each_optimizer_steps_only_its_network():
    cut = tiny_cut(num_patches=8)
    a, b = images(9) * 2 - 1, images(10) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=False)
    g0, d0, f0 = _params(cut.G), _params(cut.D), _params(cut.F)
    cut.discriminator_step(passed["fake_B"], b)
    assert not _same(cut.D, d0)
    assert _same(cut.G, g0) and _same(cut.F, f0)
    d1 = _params(cut.D)
    cut.generator_step(a, b, passed)
    assert not _same(cut.G, g0) and not _same(cut.F, f0)
    assert _same(cut.D, d1)
    assert all(p.requires_grad for p in cut.D.parameters())


def test_schedule_is_constant_then_linear_to_zero_and_marks_epoch_ends():
    cut = tiny_cut(num_patches=4, n_epochs=2, n_epochs_decay=3, steps_per_epoch=2, lr=1e-3)
    ended = []
    cut.epoch_end_hooks.append(ended.append)
    seen = []
    for step in range(10):
        seen.append([group["lr"] for name in ("G", "D", "F") for group in cut.optimizers[name].param_groups])
        cut.train_step({"A": images(step), "B": images(100 + step)})
    # The official code: torch's LambdaLR with its rule, stepped at the end of every epoch
    # (models/networks.py get_scheduler, train.py), epoch_count 1.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    official = torch.optim.lr_scheduler.LambdaLR(probe, lambda epoch: 1.0 - max(0, epoch + 1 - 2) / float(3 + 1))
    expected = []
    for step in range(10):
        expected.append(probe.param_groups[0]["lr"])
        probe.step()  # no gradients: changes nothing, keeps torch's order (optimiser, then scheduler)
        if (step + 1) % 2 == 0:
            official.step()
    assert expected == pytest.approx([1e-3] * 4 + [7.5e-4] * 2 + [5e-4] * 2 + [2.5e-4] * 2)  # by hand
    for lrs, lr in zip(seen, expected):
        assert lrs == pytest.approx([lr] * 3)
    assert all(group["lr"] == 0.0 for group in cut.optimizers["G"].param_groups)  # after the last epoch
    assert ended == [1, 2, 3, 4, 5]
    assert linear_decay_factor(0, 0, 1) == pytest.approx(0.5)


def test_a_checkpoint_of_the_per_step_schedule_keeps_it():
    # Checkpoints written before the lr changed once an epoch have no "every": they resume with the
    # schedule they started with, 1 - (t + 1 - 4) / (6 + 1) at step t.
    cut = tiny_cut(num_patches=4, n_epochs=2, n_epochs_decay=3, steps_per_epoch=2, lr=1e-3)
    cut.schedulers["lr"].load_state_dict({"last_step": 5, "constant_steps": 4, "decay_steps": 6})
    assert cut.optimizers["G"].param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 2 / 7))
    assert cut.schedulers["lr"].state_dict()["every"] == 1


def test_sincut_r1_penalty_and_identity_loss():
    torch.manual_seed(0)
    generator = ResnetGenerator(ngf=4, n_blocks=1, nce_layers=LAYERS)
    critic = nn.Conv2d(3, 1, 1)  # linear: grad of sum D(x) w.r.t. each pixel is the weight vector
    cut = CUT(generator, critic, lambda_R1=2.0, lambda_identity=3.0, nce_negatives="batch", num_patches=1,
              gan_mode="nonsaturating")
    a, b = images(11, batch=4) * 2 - 1, images(12, batch=4) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=False)
    d = cut.discriminator_losses(passed["fake_B"], b)
    r1 = 0.5 * 16 * 16 * num(critic.weight.pow(2).sum())  # (1/2) sum over pixels of |w|^2, per image
    assert num(d["D_R1"]) == pytest.approx(r1, rel=1e-5)
    assert num(d["D"]) == pytest.approx(0.5 * (num(d["D_fake"]) + num(d["D_real"])) + 2.0 * r1, rel=1e-5)
    g = cut.generator_losses(a, b, passed)
    assert num(g["idt"]) == pytest.approx(num((cut.G(b) - b).abs().mean()), rel=1e-5)
    total = num(g["G_GAN"]) + 1.0 * (num(g["NCE_X"]) + num(g["NCE_Y"])) / 2 + 3.0 * num(g["idt"])
    assert num(g["G"]) == pytest.approx(total, rel=1e-5)
    logged = cut.train_step({"A": images(11, batch=4), "B": images(12, batch=4)})
    assert {"D_R1", "idt", "NCE_Y"} <= set(logged)


def test_projection_head_gradient_is_finite_for_an_all_zero_patch():
    head = PatchProjector(dim=8, in_channels=[3])
    feats = torch.zeros(1, 2, 3)
    feats[0, 1] = torch.tensor([0.5, -0.2, 0.1])
    feats.requires_grad_(True)
    out = head([feats])[0]
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    z = head.mlps[0](feats.detach())[0, 1]
    assert torch.allclose(out[0, 1], z / (z.norm() + 1e-7), atol=1e-7)  # values as the official formula
    assert torch.equal(out[0, 0], torch.zeros(8))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="lambda_NCE"):
        tiny_cut(lambda_NCE=-1.0)
    with pytest.raises(ValueError, match="direction"):
        tiny_cut(direction="sideways")
    with pytest.raises(ValueError, match="nothing to train"):
        tiny_cut(lambda_GAN=0.0, lambda_NCE=0.0)


def test_keys_come_from_the_translation_pass_unless_flipped(monkeypatch):
    cut = tiny_cut(lambda_NCE=1.0, nce_idt=True, num_patches=0)
    a, b = images(11) * 2 - 1, images(12) * 2 - 1
    passed = cut.translate_for_training(a, b, flip=False)
    for (patches, ids), x in ((passed["keys_A"], a), (passed["keys_B"], b)):
        for got, layer_ids, feat in zip(patches, ids, cut.G.forward_features(x, LAYERS)):
            torch.testing.assert_close(got, feat.flatten(2).transpose(1, 2)[:, layer_ids])
            assert not got.requires_grad
    encoded = []
    original = cut.G.forward_features
    monkeypatch.setattr(cut.G, "forward_features", lambda x, layers=None: encoded.append(x) or original(x, layers))
    cut.generator_losses(a, b, passed)
    assert len(encoded) == 2  # the two query passes (fake_B, idt_B); no second pass for the keys
    flipped = cut.translate_for_training(a, b, flip=True)
    assert flipped["keys_A"] is None and flipped["keys_B"] is None
    encoded.clear()
    cut.generator_losses(a, b, flipped)
    assert len(encoded) == 4


def test_keys_drawn_in_the_translation_pass_give_the_same_loss_as_drawn_in_the_loss():
    # The translation pass draws the key patches' locations (A, then B) from the same generator
    # and in the same order as nce_loss does when it computes the keys itself.
    cut = tiny_cut(lambda_NCE=1.0, nce_idt=True, num_patches=5)
    a, b = images(13) * 2 - 1, images(14) * 2 - 1
    torch.manual_seed(5)
    passed = cut.translate_for_training(a, b, flip=False)
    early = cut.generator_losses(a, b, passed)
    torch.manual_seed(5)
    late = cut.generator_losses(a, b, dict(passed, keys_A=None, keys_B=None))
    for key in ("NCE_X", "NCE_Y", "G"):
        torch.testing.assert_close(early[key], late[key])
    torch.manual_seed(6)  # another draw: another loss, so the comparison above is not vacuous
    other = cut.generator_losses(a, b, dict(passed, keys_A=None, keys_B=None))
    assert not torch.allclose(other["NCE_X"], early["NCE_X"])
