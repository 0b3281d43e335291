import warnings

import pytest
import torch
from torchvision.models import vgg19

from lowcon.contrast.embeddings import AECR_LAYERS, VGG19_LAYER_INDEX, VGG19Features, WeightsNotFoundError


@pytest.fixture(scope="module")
def reference_vgg():
    torch.manual_seed(0)
    return vgg19(weights=None).features.eval()


def test_layer_names_match_official_slices():
    # The official CR slices features[0:2], [2:7], [7:12], [12:21], [21:30].
    assert [VGG19_LAYER_INDEX[n] + 1 for n in AECR_LAYERS] == [2, 7, 12, 21, 30]


def test_local_state_dict_equals_torchvision_slices(tmp_path, reference_vgg):
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in reference_vgg.state_dict().items()}, path)
    feats_net = VGG19Features(weights=path)
    x = torch.rand(1, 3, 32, 32)
    feats = feats_net(x)
    with torch.no_grad():
        for f, end in zip(feats, [2, 7, 12, 21, 30]):
            assert torch.allclose(f, reference_vgg[:end](x), atol=1e-5)
    # Only the layers up to relu5_1 are kept.
    assert sum(len(s) for s in feats_net.slices) == 30


def test_features_only_layout_and_normalisation(tmp_path, reference_vgg):
    path = tmp_path / "features.pth"
    torch.save(reference_vgg.state_dict(), path)
    net = VGG19Features(weights=path, layers=("relu1_2",), normalize_input=True)
    x = torch.rand(1, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(x)[0], reference_vgg[:4]((x - mean) / std), atol=1e-5)


def test_frozen_and_stays_in_eval():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = VGG19Features(weights="random", layers=("relu1_1", "relu2_1"))
    net.train()
    assert not net.training and all(not m.training for m in net.modules())
    assert all(not p.requires_grad for p in net.parameters())
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    sum(f.sum() for f in net(x)).backward()
    assert x.grad is not None and all(p.grad is None for p in net.parameters())


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="not comparable"):
        VGG19Features(weights="random", layers=("relu1_1",))


def test_imagenet_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    try:
        VGG19Features(weights="imagenet")
    except WeightsNotFoundError as err:
        msg = str(err)
        assert "vgg19-dcbb9e9d.pth" in msg and str(tmp_path) in msg and "random" in msg
        assert "\n" not in msg
    else:  # a connected machine downloads the weights into tmp_path instead
        assert (tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth").is_file()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(weights="random", layers=("relu9_9",))
    with pytest.raises(WeightsNotFoundError, match="weights"):
        VGG19Features(weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        VGG19Features(weights=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = VGG19Features(weights="random", layers=("relu1_1",))
    with pytest.raises(ValueError, match="^x"):
        net(torch.rand(3, 16, 16))


@pytest.mark.filterwarnings("ignore:VGG19Features\\(weights='random'\\)")
def test_checkpointed_slices_give_the_same_features_and_gradients():
    torch.manual_seed(0)
    plain = VGG19Features(weights="random").double()
    saving = VGG19Features(weights="random", checkpoint_slices=3).double()
    saving.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = []
    for net in (plain, saving):
        feats = net(x)
        grads.append(torch.autograd.grad(sum(f.square().mean() for f in feats), x)[0])
    torch.testing.assert_close(grads[1], grads[0])
    with pytest.raises(ValueError, match="checkpoint_slices: expected an int in \\[0, 5\\]"):
        VGG19Features(weights="random", checkpoint_slices=6)
