import pytest
import torch

from lowcon.contrast.projector import PatchProjector, l2_normalize
from lowcon.contrast.sampler import PatchSampler, sample_patches


def test_sampler_same_ids_for_query_and_key():
    src = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    out = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    sampler = PatchSampler(num_patches=10, generator=torch.Generator().manual_seed(0))
    k, ids = sampler(src)
    q, ids_again = sampler(out, ids=ids)
    assert [t.shape for t in k] == [(2, 10, 4), (2, 10, 6)]
    assert all(a is b for a, b in zip(ids, ids_again))
    # Patch j of image b is the feature vector at flat location ids[j]: check by hand.
    h, w = 8, 8
    for j, loc in enumerate(ids[0].tolist()):
        assert torch.equal(q[0][1, j], out[0][1, :, loc // w, loc % w])
    assert len(set(ids[0].tolist())) == 10  # without replacement


def test_sampler_all_locations():
    feat = torch.randn(1, 3, 4, 5)
    patches, ids = sample_patches(feat, 0)
    assert patches.shape == (1, 20, 3) and torch.equal(ids, torch.arange(20))
    patches, _ = sample_patches(feat, 1000)  # more than H*W: all of them
    assert patches.shape == (1, 20, 3)


def test_sampler_gradient_comes_back_in_the_maps_own_layout():
    # The gradient of the sampled patches lands on the drawn locations only, and as a contiguous
    # (B, C, H, W) tensor: a channels-last gradient would be added to the network's own and copied
    # again for the convolution below, several passes over a full-size map.
    leaf = torch.randn(2, 3, 4, 5, requires_grad=True)
    feat = leaf * 1  # a map inside a network: its gradient arrives as computed, not re-laid out
    arrived = []
    feat.register_hook(arrived.append)
    patches, ids = sample_patches(feat, 6, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(patches.shape)
    (patches * weights).sum().backward()
    assert arrived[0].is_contiguous()
    expected = torch.zeros(2, 3, 20)
    expected[:, :, ids] = weights.transpose(1, 2)
    assert torch.equal(arrived[0], expected.view(2, 3, 4, 5))


def test_sampler_errors():
    with pytest.raises(ValueError, match="feat"):
        sample_patches(torch.randn(3, 4, 4), 2)
    with pytest.raises(ValueError, match="ids"):
        sample_patches(torch.randn(1, 3, 2, 2), 2, ids=torch.tensor([7]))
    with pytest.raises(ValueError, match="num_patches"):
        PatchSampler(-1)


def test_projector_mlp_by_hand():
    head = PatchProjector(dim=5, in_channels=[3], init_gain=1.0)
    x = torch.randn(2, 4, 3)
    lin1, lin2 = head.mlps[0][0], head.mlps[0][2]
    expected = torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    # unit vectors, except a patch whose 5 hidden units are all off: its output is exactly zero
    # and stays zero
    nonzero = (expected.norm(dim=-1) > 0).float()
    expected = expected / (expected.norm(dim=-1, keepdim=True) + 1e-7)
    (got,) = head([x])
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), nonzero, atol=1e-5)


def test_lazy_build_and_deferred_optimizer():
    head = PatchProjector(dim=8)
    opt = head.make_optimizer(lambda p: torch.optim.SGD(p, lr=0.1))
    opt.zero_grad()  # harmless before the head exists
    assert not head.built and len(list(head.parameters())) == 0
    z = head([torch.randn(1, 5, 3), torch.randn(1, 5, 7)])
    assert head.built and [m[0].in_features for m in head.mlps] == [3, 7]
    before = head.mlps[1][2].weight.detach().clone()
    sum(t.sum() for t in z).backward()
    opt.step()
    assert not torch.equal(before, head.mlps[1][2].weight)


def test_lazy_head_restores_from_checkpoint():
    head = PatchProjector(dim=8)
    opt = head.make_optimizer(lambda p: torch.optim.Adam(p, lr=1e-3))
    z = head([torch.randn(1, 5, 3)])
    z[0].sum().backward()
    opt.step()
    state, opt_state = head.state_dict(), opt.state_dict()
    fresh = PatchProjector(dim=8)
    fresh_opt = fresh.make_optimizer(lambda p: torch.optim.Adam(p, lr=1e-3))
    fresh.load_state_dict(state)
    fresh_opt.load_state_dict(opt_state)
    x = [torch.randn(1, 5, 3)]
    assert torch.allclose(fresh(x)[0], head(x)[0])
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def test_no_mlp_only_normalises():
    x = torch.randn(1, 4, 3)
    assert torch.allclose(PatchProjector(use_mlp=False)([x])[0], l2_normalize(x))
    with pytest.raises(ValueError, match="feats"):
        PatchProjector()([torch.randn(4, 3)])


@pytest.mark.parametrize("init_type, std", [
    ("xavier", lambda fan_in, fan_out: 0.02 * (2.0 / (fan_in + fan_out)) ** 0.5),  # Glorot normal with gain
    ("normal", lambda fan_in, fan_out: 0.02),                                        # N(0, 0.02)
])
def test_projector_init_follows_init_type(init_type, std):
    # As the official define_F: the head is initialised with --init_type and --init_gain.
    head = PatchProjector(dim=256, in_channels=[512], init_type=init_type)
    for layer in (head.mlps[0][0], head.mlps[0][2]):
        fan_out, fan_in = layer.weight.shape
        weight = layer.weight.detach()
        assert float(weight.std()) == pytest.approx(std(fan_in, fan_out), rel=0.02)
        assert float(weight.mean()) == pytest.approx(0.0, abs=0.05 * std(fan_in, fan_out))
        assert torch.all(layer.bias == 0)
