import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowcon.contrast.patchnce import PatchNCELoss, patch_nce_loss


def loop_patchnce(q, k, tau, negatives="image"):
    """Independent formulation: one softmax per patch, written out with numpy in float64."""
    q = q.detach().double().numpy()
    k = k.detach().double().numpy()
    b, p, _ = q.shape
    if negatives == "batch":
        q, k = q.reshape(1, b * p, -1), k.reshape(1, b * p, -1)
    losses = []
    for g in range(q.shape[0]):
        for i in range(q.shape[1]):
            logits = [q[g, i] @ k[g, i]]
            for j in range(q.shape[1]):
                logits.append(-10.0 if j == i else q[g, i] @ k[g, j])
            logits = np.array(logits) / tau
            losses.append(-logits[0] + np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    return float(np.mean(losses))


@pytest.mark.parametrize("negatives", ["image", "batch"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_matches_explicit_loop(negatives, tau):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 7, 5, generator=g), dim=-1)
    k = F.normalize(torch.randn(3, 7, 5, generator=g), dim=-1)
    got = patch_nce_loss(q, k, temperature=tau, negatives=negatives).item()
    assert got == pytest.approx(loop_patchnce(q, k, tau, negatives), rel=1e-5, abs=1e-5)


def test_hand_worked_case():
    # Two orthogonal patches that match their keys exactly, tau = 1:
    # logits of patch 0 = [q0.k0, -10 (itself), q0.k1] = [1, -10, 0].
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = -1.0 + math.log(math.e + math.exp(-10) + 1.0)
    assert patch_nce_loss(q, q.clone(), temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # Same case at tau = 0.07 (the positive dominates, so the loss is about e^{-1/0.07}).
    expected = -1 / 0.07 + math.log(math.exp(1 / 0.07) + math.exp(-10 / 0.07) + 1.0)
    assert patch_nce_loss(q, q.clone(), temperature=0.07).item() == pytest.approx(expected, abs=1e-7)


def test_no_reduction_shape_and_module():
    q = F.normalize(torch.randn(2, 4, 3), dim=-1)
    k = F.normalize(torch.randn(2, 4, 3), dim=-1)
    per_patch = patch_nce_loss(q, k, reduction="none")
    assert per_patch.shape == (8,)
    assert PatchNCELoss(0.07)(q, k).item() == pytest.approx(per_patch.mean().item(), abs=1e-6)


def test_keys_are_detached_gradient_reaches_queries():
    q = F.normalize(torch.randn(2, 5, 4), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(2, 5, 4), dim=-1).requires_grad_()
    patch_nce_loss(q, k).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_gradcheck_float64():
    q = F.normalize(torch.randn(1, 4, 3, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1, 4, 3, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda x: patch_nce_loss(x, k, temperature=0.5), (q,))


def test_perfect_match_beats_random_keys():
    q = F.normalize(torch.randn(1, 64, 16), dim=-1)
    assert patch_nce_loss(q, q.clone()) < patch_nce_loss(q, F.normalize(torch.randn(1, 64, 16), dim=-1))


@pytest.mark.parametrize(
    "q_shape,k_shape,match",
    [((4, 3), (4, 3), "q, k"), ((1, 4, 3), (1, 5, 3), "q, k"), ((1, 4, 3, 1), (1, 4, 3, 1), "q, k")],
)
def test_bad_shapes(q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        patch_nce_loss(torch.randn(q_shape), torch.randn(k_shape))


def test_bad_options():
    q = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        patch_nce_loss(q, q, temperature=0)
    with pytest.raises(ValueError, match="negatives"):
        PatchNCELoss(negatives="pixels")
