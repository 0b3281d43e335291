import pytest
import torch
from torch import nn

from lowcon.models.blur import Downsample
from lowcon.models.patch_discriminator import PatchDiscriminator


def _patchgan_params(c_in: int, ndf: int, n_layers: int) -> int:
    """4x4 convs through channels c_in, ndf, 2ndf, ... (capped at 8ndf), then 1; all with bias."""
    channels = [c_in] + [ndf * min(2 ** n, 8) for n in range(n_layers + 1)] + [1]
    return sum(a * b * 16 + b for a, b in zip(channels, channels[1:]))


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_parameter_count_matches_hand_formula_and_official_2_77m():
    count = _count(PatchDiscriminator())
    assert count == 3 * 64 * 16 + 64 + 64 * 128 * 16 + 128 + 128 * 256 * 16 + 256 + 256 * 512 * 16 + 512 + 512 * 16 + 1
    assert count == _patchgan_params(3, 64, 3)
    assert abs(count - 2.77e6) < 0.01e6


@pytest.mark.parametrize("n_layers", [1, 2, 5])
def test_parameter_count_other_depths_and_plain_variant(n_layers):
    assert _count(PatchDiscriminator(2, ndf=8, n_layers=n_layers)) == _patchgan_params(2, 8, n_layers)
    assert _count(PatchDiscriminator(2, ndf=8, n_layers=n_layers, antialias=False)) == _patchgan_params(2, 8, n_layers)


def test_layer_order_and_state_dict_keys_follow_the_official_model():
    net = PatchDiscriminator()
    model = net.model
    assert len(model) == 15
    assert [k for k, m in enumerate(model) if isinstance(m, Downsample)] == [2, 6, 10]
    assert [k for k, m in enumerate(model) if isinstance(m, nn.Conv2d)] == [0, 3, 7, 11, 14]
    assert all(model[k].stride == (1, 1) for k in (0, 3, 7, 11, 14))
    assert {"model.0.bias", "model.2.filt", "model.3.weight", "model.14.weight"} <= set(net.state_dict())


@pytest.mark.parametrize("antialias", [True, False])
def test_output_is_a_map_of_patch_logits(antialias):
    net = PatchDiscriminator(ndf=8, antialias=antialias)
    # 64 -> 32 -> 16 -> 8 by the three down steps, then each stride-1 4x4 conv (pad 1) loses one.
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert net(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_plain_patchgan_sees_70x70_patches():
    torch.manual_seed(0)
    net = PatchDiscriminator(ndf=8, norm="none", antialias=False)  # no norm: no global coupling
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    out = net(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    rows = touched.any(dim=1).nonzero().flatten()
    cols = touched.any(dim=0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70 and len(rows) == 70
    assert cols.max() - cols.min() + 1 == 70 and len(cols) == 70


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        PatchDiscriminator(ndf=8)(torch.randn(1, 1, 64, 64))
