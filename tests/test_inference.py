import pytest
import torch
from torch import nn

from lowcon.inference import pad_to_multiple, run_padded, run_tiled


class Local(nn.Module):
    """A 3x3 conv: translation-equivariant, so tiles with enough overlap reproduce the whole."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError("needs multiples of 4")
        return self.conv(x)


def test_pad_to_multiple_shapes_and_content():
    x = torch.rand(1, 3, 5, 7)
    padded, (h, w) = pad_to_multiple(x, 4)
    assert padded.shape == (1, 3, 8, 8) and (h, w) == (5, 7)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflection about the last row
    tiny, _ = pad_to_multiple(torch.rand(1, 3, 1, 1), 4)  # too small to reflect: replicate
    assert tiny.shape == (1, 3, 4, 4)


def test_run_padded_any_size():
    out = run_padded(Local(), torch.rand(2, 3, 31, 45), multiple=4)
    assert out.shape == (2, 3, 31, 45)


def test_tiled_equals_whole_image_away_from_seams():
    net = Local()
    x = torch.rand(1, 3, 64, 80)
    whole = run_padded(net, x, 4)
    tiled = run_tiled(net, x, tile=32, overlap=8, multiple=4)
    assert tiled.shape == whole.shape
    # Only the 1-pixel borders of a tile see a different padding, and they get no weight.
    assert (tiled - whole).abs().max() < 1e-4
    with pytest.raises(ValueError, match="tile"):
        run_tiled(net, x, tile=16, overlap=8)
