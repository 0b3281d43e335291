import numpy as np
import pytest
import torch

from lowcon.contrast.infonce import InfoNCE, info_nce
from lowcon.contrast.samples import CRSampler, batch_samples, group_patches, own_sample, stack_samples


def test_batch_samples_others_by_hand():
    images = torch.arange(4.0).view(4, 1, 1, 1)  # image i has value i
    got = batch_samples(images, 3).view(4, 3).tolist()
    assert got == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    got = batch_samples(images, 2, include_own=False).view(4, 2).tolist()
    assert got == [[1, 2], [2, 3], [3, 0], [0, 1]]


def test_batch_samples_flip_like_mindspore():
    images = torch.arange(4.0).view(4, 1, 1, 1)
    got = batch_samples(images, 3, mode="flip").view(4, 3).tolist()
    assert got == [[3, 2, 1]] * 4


def test_batch_samples_errors():
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="batch of at least 3"):
        batch_samples(images, 3)
    with pytest.raises(ValueError, match="images"):
        batch_samples(torch.zeros(3, 4, 4), 1)
    with pytest.raises(ValueError, match="mode"):
        batch_samples(images, 1, mode="random")


def test_cr_sampler_table4_rows_and_extra_negatives():
    hazy = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    clear = hazy + 10
    pos, neg = CRSampler(1, 1)(hazy, clear)
    assert pos.shape == (4, 1, 3, 2, 2) and torch.equal(neg[:, 0], hazy) and torch.equal(pos[:, 0], clear)
    pos, neg = CRSampler(1, 3)(hazy, clear)
    assert neg[:, :, 0, 0, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    pos, neg = CRSampler(2, 1)(hazy, clear)
    assert pos[:, :, 0, 0, 0].tolist() == [[10, 11], [11, 12], [12, 13], [13, 10]]
    extra = torch.full((4, 2, 3, 2, 2), -1.0)
    _, neg = CRSampler(1, 1)(hazy, clear, extra_negatives=extra)
    assert neg.shape == (4, 3, 3, 2, 2) and torch.equal(neg[:, 1:], extra)
    _, neg = CRSampler(1, 0)(hazy, clear, extra_negatives=extra)
    assert torch.equal(neg, extra)
    with pytest.raises(ValueError, match="hazy/clear"):
        CRSampler()(hazy, clear[:, :, :1])


def test_stack_and_own():
    a = torch.zeros(2, 3, 4, 4)
    assert stack_samples(own_sample(a), own_sample(a + 1)).shape == (2, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="own_sample"):
        stack_samples(a)


def test_group_patches():
    q = torch.randn(2, 3, 4)
    assert group_patches(q, q, "batch")[0].shape == (1, 6, 4)
    assert group_patches(q, q, "image")[0].shape == (2, 3, 4)


def test_infonce_matches_loop():
    g = torch.Generator().manual_seed(0)
    a, p, n = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 6, 4, generator=g)
    got = info_nce(a, p, n, temperature=0.2).item()
    an, pn, nn_ = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (a.double().numpy(), p.double().numpy(), n.double().numpy()))
    losses = []
    for i in range(5):
        logits = np.concatenate([[an[i] @ pn[i]], nn_[i] @ an[i]]) / 0.2
        losses.append(-logits[0] + np.log(np.exp(logits).sum()))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)
    shared = torch.randn(6, 4)
    assert InfoNCE(0.2)(a, p, shared).item() == pytest.approx(info_nce(a, p, shared.expand(5, 6, 4), 0.2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(a, p, torch.randn(5, 6, 3))
