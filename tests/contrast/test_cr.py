import numpy as np
import pytest
import torch
from torch import nn

from lowcon.contrast.cr import AECR_LAYER_WEIGHTS, ContrastiveRegularization, contrastive_regularization
from lowcon.contrast.samples import CRSampler


class TinyEmbedding(nn.Module):
    """Two-layer frozen feature net standing in for VGG-19 in tests."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


class Identity1(nn.Module):
    def forward(self, x):
        return [x]


def loop_cr(emb, out, positives, negatives, weights, reduction, use_neg=True):
    """Independent formulation in numpy: per layer, per sample, the official batch-mean L1."""
    with torch.no_grad():
        fo = [f.double().numpy() for f in emb(out)]
        fp = [[f.double().numpy() for f in emb(positives[:, j])] for j in range(positives.shape[1])]
        fn = [[f.double().numpy() for f in emb(negatives[:, j])] for j in range(negatives.shape[1])]
    total = 0.0
    for i, w in enumerate(weights):
        d_pos = [np.abs(fo[i] - fp[j][i]).mean() for j in range(len(fp))]
        num = np.sum(d_pos) if reduction == "sum" else np.mean(d_pos)
        if use_neg:
            d_neg = [np.abs(fo[i] - fn[j][i]).mean() for j in range(len(fn))]
            den = (np.sum(d_neg) if reduction == "sum" else np.mean(d_neg)) + 1e-7
            total += w * num / den
        else:
            total += w * num
    return total


def test_hand_worked_case():
    # Identity embedding, constant images: |0.5-0.6| / |0.5-0.1| = 0.1 / 0.4 = 0.25.
    cr = ContrastiveRegularization(Identity1(), layer_weights=[1.0])
    out = torch.full((1, 3, 4, 4), 0.5)
    loss = cr(out, positive=torch.full_like(out, 0.6), negative=torch.full_like(out, 0.1))
    assert loss.item() == pytest.approx(0.25, rel=1e-5)
    # Weighted layer and no negatives: 2 * 0.1.
    cr = ContrastiveRegularization(Identity1(), layer_weights=[2.0], use_negatives=False)
    assert cr(out, positive=torch.full_like(out, 0.6)).item() == pytest.approx(0.2, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (1, 3), (3, 1), (3, 3)])
def test_matches_loop(reduction, n_pos, n_neg):
    g = torch.Generator().manual_seed(1)
    emb = TinyEmbedding()
    out = torch.rand(4, 3, 8, 8, generator=g)
    hazy = torch.rand(4, 3, 8, 8, generator=g)
    clear = torch.rand(4, 3, 8, 8, generator=g)
    positives, negatives = CRSampler(n_pos, n_neg)(hazy, clear)
    weights = [0.5, 1.0]
    cr = ContrastiveRegularization(emb, layer_weights=weights, reduction=reduction)
    got = cr(out, positive=positives, negative=negatives).item()
    assert got == pytest.approx(loop_cr(emb, out, positives, negatives, weights, reduction), rel=1e-5)


def test_without_negatives_matches_loop():
    emb = TinyEmbedding()
    out, clear = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    cr = ContrastiveRegularization(emb, layer_weights=[1.0, 0.25], use_negatives=False)
    expected = loop_cr(emb, out, clear[:, None], clear[:, None], [1.0, 0.25], "mean", use_neg=False)
    assert cr(out, positive=clear).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_to_r_vectorised_equals_loop_over_negatives(reduction):
    emb = TinyEmbedding()
    out, clear = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    negatives = torch.rand(3, 4, 3, 8, 8)
    cr = ContrastiveRegularization(emb, layer_weights=[1.0, 1.0], reduction=reduction)
    vectorised = cr(out, positive=clear, negative=negatives)
    # Loop over negatives: per layer, numerator / combined per-negative denominators.
    with torch.no_grad():
        fo, fp = emb(out), emb(clear)
        per_neg = [emb(negatives[:, n]) for n in range(4)]
    expected = 0.0
    for i in range(2):
        d = torch.stack([(fo[i] - per_neg[n][i]).abs().mean() for n in range(4)])
        den = d.sum() if reduction == "sum" else d.mean()
        expected += ((fo[i] - fp[i]).abs().mean() / (den + 1e-7)).item()
    assert vectorised.item() == pytest.approx(expected, rel=1e-5)


def test_negative_weights():
    emb = Identity1()
    out = torch.full((2, 3, 4, 4), 0.5)
    negatives = torch.stack([torch.full_like(out, 0.1), torch.full_like(out, 0.3)], dim=1)  # d = .4, .2
    cr = ContrastiveRegularization(emb, layer_weights=[1.0], reduction="sum")
    got = cr(out, positive=torch.full_like(out, 0.6), negative=negatives, negative_weights=torch.tensor([1.0, 3.0]))
    assert got.item() == pytest.approx(0.1 / (0.4 + 3 * 0.2), rel=1e-5)
    per_sample = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    again = cr(out, positive=torch.full_like(out, 0.6), negative=negatives, negative_weights=per_sample)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)
    with pytest.raises(ValueError, match="negative_weights"):
        cr(out, positive=out, negative=negatives, negative_weights=torch.ones(3))


def test_gradient_reaches_output_only():
    emb = TinyEmbedding()
    out = torch.rand(2, 3, 8, 8, requires_grad=True)
    clear = torch.rand(2, 3, 8, 8, requires_grad=True)
    hazy = torch.rand(2, 3, 8, 8, requires_grad=True)
    ContrastiveRegularization(emb, layer_weights=[1.0, 1.0])(out, positive=clear, negative=hazy).backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert clear.grad is None and hazy.grad is None
    assert all(p.grad is None for p in emb.parameters())


def test_each_sample_set_is_embedded_without_gradient_and_dropped_before_the_next():
    import weakref

    calls, alive_at_call, refs = [], [], []

    class Streaming(TinyEmbedding):
        def iter_features(self, x):
            calls.append((x.shape[0], torch.is_grad_enabled()))
            alive_at_call.append(sum(r() is not None for r in refs))
            for f in self(x):
                refs.append(weakref.ref(f))
                yield f

    emb = Streaming()
    cr = ContrastiveRegularization(emb, layer_weights=[1.0, 1.0])
    out, pos, neg = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8)
    loss = cr(out, positive=pos, negative=neg)
    # One pass per sample set (1 positive, then 3 negatives), each a batch of B = 2, no graph.
    assert calls == [(2, False)] * 4
    # No feature map of an earlier set is alive when the next set starts.
    assert alive_at_call == [0, 0, 0, 0]
    expected = loop_cr(emb, out, pos[:, None], neg, [1.0, 1.0], "mean")
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_functional_equals_module():
    emb = TinyEmbedding()
    out, clear, hazy = (torch.rand(2, 3, 8, 8) for _ in range(3))
    module = ContrastiveRegularization(emb, layer_weights=[1.0, 0.5])(out, clear, hazy)
    functional = contrastive_regularization(
        emb(out), [f[:, None] for f in emb(clear)], [f[:, None] for f in emb(hazy)], [1.0, 0.5]
    )
    assert module.item() == pytest.approx(functional.item(), rel=1e-6)


def test_default_layer_weights():
    assert AECR_LAYER_WEIGHTS == (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def test_bad_shapes_name_the_argument():
    cr = ContrastiveRegularization(TinyEmbedding(), layer_weights=[1.0, 1.0])
    out = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^out"):
        cr(out[0], positive=out, negative=out)
    with pytest.raises(ValueError, match="^positive"):
        cr(out, positive=torch.rand(2, 3, 4, 4), negative=out)
    with pytest.raises(ValueError, match="^negative"):
        cr(out, positive=out, negative=torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="^negative"):
        cr(out, positive=out)
    with pytest.raises(ValueError, match="layer_weights"):
        ContrastiveRegularization(TinyEmbedding(), layer_weights=[1.0])(out, positive=out, negative=out)


def test_distance_keeps_only_an_int8_sign_and_matches_plain_autograd():
    from lowcon.contrast.cr import _l1_per_sample

    torch.manual_seed(0)
    anchor = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    samples = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    samples[:, 0, 0, 0, 0] = anchor.detach()[:, 0, 0, 0]  # a zero difference: subgradient 0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        ours = _l1_per_sample(anchor, samples)
    assert set(saved) == {torch.int8}
    plain = torch.stack([(anchor - samples[:, n]).abs().flatten(1).mean(1) for n in range(3)], dim=1)
    torch.testing.assert_close(ours, plain)
    weights = torch.rand(2, 3, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours * weights).sum(), anchor)[0]
    g_plain = torch.autograd.grad((plain * weights).sum(), anchor)[0]
    torch.testing.assert_close(g_ours, g_plain)
