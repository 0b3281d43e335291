"""lowcon.data.transforms: paired crops/flips/rotations stay aligned and are reproducible."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lowcon.data.transforms import (
    augment_pair,
    center_crop,
    paired_random_crop,
    random_hflip,
    random_rot90,
    resize,
    round_to_multiple,
    sample_generator,
    unpaired_transform,
)


def _ramp(channels: int = 3, height: int = 6, width: int = 7) -> torch.Tensor:
    # Every value distinct, so a crop's position can be found by search.
    return torch.arange(channels * height * width, dtype=torch.float32).view(channels, height, width)


def _find_window(image: torch.Tensor, crop: torch.Tensor) -> list[tuple[int, int]]:
    height, width = crop.shape[-2:]
    hits = []
    for top in range(image.shape[-2] - height + 1):
        for left in range(image.shape[-1] - width + 1):
            if torch.equal(image[:, top:top + height, left:left + width], crop):
                hits.append((top, left))
    return hits


def test_sample_generator_is_reproducible_and_keyed():
    draw = lambda *keys: torch.rand(4, generator=sample_generator(*keys))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 1, 3))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 2))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))
    with pytest.raises(ValueError):
        sample_generator(-1)


def test_paired_random_crop_cuts_the_same_window():
    hazy = _ramp()
    clear = hazy * 0.5
    positions = set()
    for seed in range(60):
        crop_hazy, crop_clear = paired_random_crop(hazy, clear, size=4, generator=sample_generator(seed))
        assert crop_hazy.shape == (3, 4, 4)
        assert torch.equal(crop_clear, crop_hazy * 0.5)
        (position,) = _find_window(hazy, crop_hazy)
        positions.add(position)
    assert positions == {(top, left) for top in range(3) for left in range(4)}  # every window reachable


def test_paired_random_crop_rectangular_and_errors():
    (crop,) = paired_random_crop(_ramp(), size=(2, 5), generator=sample_generator(1))
    assert crop.shape == (3, 2, 5) and len(_find_window(_ramp(), crop)) == 1
    with pytest.raises(ValueError) as info:
        paired_random_crop(_ramp(), size=8, generator=sample_generator(0), name="hazy/0001.png")
    message = str(info.value)
    assert "hazy/0001.png" in message and "7x6" in message and "8x8" in message
    with pytest.raises(ValueError, match="one size"):
        paired_random_crop(_ramp(), _ramp(width=8), size=2, generator=sample_generator(0))


def test_pad_if_needed_reflects_like_numpy():
    image = _ramp(1, 4, 5)
    (padded,) = paired_random_crop(image, size=6, generator=sample_generator(0), pad_if_needed=True)
    expected = np.pad(image[0].numpy(), ((1, 1), (0, 1)), mode="reflect")  # 2 rows, 1 column to add
    assert torch.equal(padded[0], torch.from_numpy(expected))


def test_center_crop_takes_the_middle():
    image = _ramp(height=7, width=8)
    (crop,) = center_crop(image, size=(3, 4))
    assert torch.equal(crop, image[:, 2:5, 2:6])
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(image, size=9)


def test_hflip_flips_both_or_neither_about_half_the_time():
    hazy = _ramp()
    flips = 0
    for seed in range(200):
        out_hazy, out_clear = random_hflip(hazy, hazy * 2, generator=sample_generator(seed))
        assert torch.equal(out_clear, out_hazy * 2)
        if torch.equal(out_hazy, torch.from_numpy(hazy.numpy()[:, :, ::-1].copy())):
            flips += 1
        else:
            assert torch.equal(out_hazy, hazy)
    assert 70 < flips < 130


def test_rot90_uses_all_four_rotations_for_squares():
    image = _ramp(height=5, width=5)
    seen = set()
    for seed in range(40):
        (out,) = random_rot90(image, generator=sample_generator(seed))
        ks = [k for k in range(4) if np.array_equal(out.numpy(), np.rot90(image.numpy(), k, axes=(1, 2)))]
        assert len(ks) == 1
        seen.add(ks[0])
    assert seen == {0, 1, 2, 3}
    for seed in range(10):
        (out,) = random_rot90(_ramp(), generator=sample_generator(seed))
        assert out.shape == (3, 6, 7)  # non-square: only 0 or 180 degrees


def test_augment_pair_keeps_the_pair_aligned():
    hazy = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    clear = hazy * 0.5
    dihedral = [np.rot90(m, k, axes=(1, 2)) for m in (hazy.numpy(), hazy.numpy()[:, :, ::-1]) for k in range(4)]
    for seed in range(16):
        out_hazy, out_clear = augment_pair(hazy, clear, generator=sample_generator(seed))
        assert torch.equal(out_clear, out_hazy * 0.5)
        assert any(np.array_equal(out_hazy.numpy(), d) for d in dihedral)


def test_resize_close_to_pillow_bicubic():
    y, x = np.mgrid[0:40, 0:50] / 50.0
    smooth = np.stack([0.5 + 0.4 * np.sin(3 * x), 0.5 + 0.4 * np.cos(2 * y), x * 0.9]).astype(np.float32)
    ours = resize(torch.from_numpy(smooth), (24, 30))
    assert ours.shape == (3, 24, 30)
    pillow = np.stack(
        [np.asarray(Image.fromarray(c, mode="F").resize((30, 24), Image.BICUBIC)) for c in smooth]
    )
    assert np.abs(ours.numpy() - pillow).max() < 0.02
    constant = resize(torch.full((3, 9, 9), 0.3), 20)
    assert torch.allclose(constant, torch.full((3, 20, 20), 0.3), atol=1e-6)


def test_round_to_multiple_of_four():
    assert round_to_multiple(torch.rand(3, 29, 43)).shape == (3, 28, 44)
    image = torch.rand(3, 32, 36)
    assert round_to_multiple(image) is image


def test_unpaired_transform_modes():
    image = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    out = unpaired_transform(image, generator=sample_generator(0), load_size=24, crop_size=16)
    assert out.shape == (3, 16, 16)
    same = unpaired_transform(image, generator=sample_generator(0), load_size=24, crop_size=16)
    assert torch.equal(out, same)
    crop = unpaired_transform(image, generator=sample_generator(3), crop_size=16, preprocess="crop", flip=False)
    assert len(_find_window(image, crop)) == 1
    whole = unpaired_transform(image, generator=sample_generator(0), preprocess="none", flip=False)
    assert torch.equal(whole, round_to_multiple(image))
    with pytest.raises(ValueError, match="preprocess"):
        unpaired_transform(image, generator=sample_generator(0), preprocess="scale_width")
    with pytest.raises(ValueError, match="load_size"):
        unpaired_transform(image, generator=sample_generator(0), load_size=8, crop_size=16)
