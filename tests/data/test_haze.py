"""lowcon.data.haze and the embedded dehazing set: the scattering model by hand, synthesis to disk."""
from __future__ import annotations

import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowcon.data.embedded import EMBEDDED_PHOTOS, embedded_clear_images, skimage_data_dir, write_embedded_dehaze_set
from lowcon.data.haze import (
    HAZE_SETTINGS,
    add_haze,
    depth_from_disparity,
    depth_prior,
    load_depth_map,
    normalize_depth,
    synthesize_haze_folder,
    transmission,
)
from lowcon.data.io import BadImageWarning, ImageReadError, read_image
from lowcon.data.paired import PairedDehazeDataset


def test_add_haze_matches_the_formula_by_hand():
    clear = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    depth = torch.tensor([[0.0, 1.0, 2.0], [3.0, 5.0, 8.0]], dtype=torch.float64)
    light = (0.9, 0.8, 1.0)
    hazy = add_haze(clear, depth, A=light, beta=0.3)
    scalar = add_haze(clear, depth[None], A=0.85, beta=0.3)
    for c in range(3):
        for y in range(2):
            for x in range(3):
                t = math.exp(-0.3 * float(depth[y, x]))
                j = float(clear[c, y, x])
                assert abs(float(hazy[c, y, x]) - (j * t + light[c] * (1 - t))) < 1e-12
                assert abs(float(scalar[c, y, x]) - (j * t + 0.85 * (1 - t))) < 1e-12
    assert torch.equal(add_haze(clear, torch.zeros(2, 3, dtype=torch.float64), 0.9, 1.0), clear)  # d = 0: no haze


def test_add_haze_batch_with_per_image_beta():
    clear = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    depth = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    hazy = add_haze(clear, depth, A=1.0, beta=torch.tensor([0.5, 2.0]))
    for b, beta in enumerate((0.5, 2.0)):
        t = torch.exp(-beta * depth[b])
        assert torch.allclose(hazy[b], clear[b] * t + (1 - t), atol=1e-6)
    assert torch.allclose(transmission(torch.tensor([[0.0, 2.0]]), 0.5), torch.tensor([[1.0, math.exp(-1.0)]]))
    with pytest.raises(ValueError, match="depth"):
        add_haze(clear[0], torch.ones(5, 5), 1.0, 1.0)
    with pytest.raises(ValueError, match="A"):
        add_haze(clear[0], torch.ones(4, 4), (1.0, 1.0), 1.0)


def test_settings_keep_transmission_in_a_sensible_range():
    for setting in HAZE_SETTINGS.values():
        near, far = setting["depth_range"]
        low_beta, high_beta = setting["beta"]
        assert 0.05 <= math.exp(-high_beta * far) <= 0.15  # thickest haze, farthest point
        assert 0.9 <= math.exp(-low_beta * near) <= 0.97  # thinnest haze, nearest point
    assert HAZE_SETTINGS["ots"]["A"] == (0.8, 1.0) and HAZE_SETTINGS["ots"]["beta"] == (0.04, 0.2)


def test_depth_from_disparity_fills_unknown_pixels_from_the_nearest():
    disparity = torch.tensor([[2.0, 4.0, float("inf")], [0.0, 8.0, 1.0]])
    depth = depth_from_disparity(disparity)
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.125, 1.0]])  # inf <- left neighbour, 0 <- above
    assert torch.allclose(depth, expected)
    with pytest.raises(ValueError, match="no finite"):
        depth_from_disparity(torch.zeros(2, 2))


def test_depth_prior_is_far_at_the_top_and_in_bright_grey_regions():
    image = torch.zeros(3, 32, 32)
    image[:, :, :16] = 0.95  # bright, unsaturated (sky-like)
    image[0, :, 16:] = 0.8  # saturated red
    vertical = depth_prior(image, "vertical")
    assert vertical.shape == (1, 32, 32)
    assert torch.allclose(vertical[0, :, 5], torch.linspace(1, 0, 32))
    cue = depth_prior(image, "luminance")
    assert float(cue[0, 16, 2]) > float(cue[0, 16, 30])
    mixed = depth_prior(image, "mixed")
    assert mixed.min() == 0 and mixed.max() == 1
    assert torch.equal(normalize_depth(torch.full((2, 2), 3.0)), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kind"):
        depth_prior(image, "stereo")


def _clear_folder(root: Path, stems=("0001", "0002")) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    pixels = {}
    for i, stem in enumerate(stems):
        pixels[stem] = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels[stem]).save(root / f"{stem}.jpg", format="PNG")  # suffix lies on purpose
    return pixels


def test_synthesized_folder_follows_the_model_and_loads_as_reside(tmp_path):
    pixels = _clear_folder(tmp_path / "clear")
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    depths = {}
    for i, stem in enumerate(pixels):
        depths[stem] = np.random.default_rng(10 + i).uniform(2.0, 30.0, (12, 16))
        np.save(depth_dir / f"{stem}.npy", depths[stem])
    written = synthesize_haze_folder(tmp_path / "clear", tmp_path / "out", per_image=3, depth_dir=depth_dir, seed=4)
    hazy_paths = sorted(p for p in written if p.parent.name == "hazy")
    assert len(written) == 2 + 6 and len(hazy_paths) == 6
    near, far = HAZE_SETTINGS["ots"]["depth_range"]
    for path in hazy_paths:
        match = re.fullmatch(r"(\d{4})_([0-9.]+)_([0-9.]+)", path.stem)
        assert match, path.name
        stem, light, beta = match.group(1), float(match.group(2)), float(match.group(3))
        assert 0.8 <= light <= 1.0 and 0.04 <= beta <= 0.2
        raw = depths[stem]
        depth = near + (far - near) * (raw - raw.min()) / (raw.max() - raw.min())
        t = np.exp(-beta * depth)[..., None]
        expected = (pixels[stem] / 255.0) * t + light * (1 - t)
        got = read_image(path).numpy().transpose(1, 2, 0)
        assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-6
    assert torch.equal(read_image(tmp_path / "out" / "clear" / "0001.png") * 255,
                       torch.from_numpy(pixels["0001"].transpose(2, 0, 1).astype(np.float32)))
    data = PairedDehazeDataset(tmp_path / "out" / "hazy", tmp_path / "out" / "clear", layout="reside", on_error="raise")
    assert len(data) == 6 and data.scene_ids == ["0001", "0002"]


def test_synthesis_is_deterministic_and_seeded(tmp_path):
    _clear_folder(tmp_path / "clear", stems=("a_1", "b"))
    first = synthesize_haze_folder(tmp_path / "clear", tmp_path / "one", per_image=2, seed=7)
    second = synthesize_haze_folder(tmp_path / "clear", tmp_path / "two", per_image=2, seed=7)
    assert [p.name for p in first] == [p.name for p in second]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(first, second))
    assert (tmp_path / "one" / "clear" / "a-1.png").is_file()  # "_" would break the ID rule
    other = synthesize_haze_folder(tmp_path / "clear", tmp_path / "three", per_image=2, seed=8)
    assert [p.name for p in other] != [p.name for p in first]
    its = synthesize_haze_folder(tmp_path / "clear", tmp_path / "its", setting="its", seed=7)
    betas = [float(p.stem.split("_")[2]) for p in its if p.parent.name == "hazy"]
    assert all(0.6 <= b <= 1.8 for b in betas)


def test_disparity_folder_and_missing_maps(tmp_path):
    _clear_folder(tmp_path / "clear")
    disparity_dir = tmp_path / "disp"
    disparity_dir.mkdir()
    disparity = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) + 1) * 100
    Image.fromarray(disparity).save(disparity_dir / "0001.png")  # 16-bit PNG
    assert torch.equal(load_depth_map(disparity_dir / "0001.png"), torch.from_numpy(disparity.astype(np.float32)))
    with pytest.warns(BadImageWarning, match="0002.jpg"):
        written = synthesize_haze_folder(tmp_path / "clear", tmp_path / "out", disparity_dir=disparity_dir)
    assert sorted(p.name for p in written if p.parent.name == "clear") == ["0001.png"]
    with pytest.raises(ImageReadError, match="no disparity map"):
        synthesize_haze_folder(tmp_path / "clear", tmp_path / "out2", disparity_dir=disparity_dir, on_error="raise")


def _block_network(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_embedded_images_load_offline(monkeypatch):
    _block_network(monkeypatch)
    for file_name in EMBEDDED_PHOTOS.values():
        assert (skimage_data_dir() / file_name).is_file()  # shipped inside the wheel
    images = embedded_clear_images(size=32)
    assert [name for name, _ in images] == list(EMBEDDED_PHOTOS)
    for _, image in images:
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0.05
    native = dict(embedded_clear_images())
    assert native["astronaut"].shape == (3, 512, 512) and native["chelsea"].shape == (3, 300, 451)


def test_embedded_dehaze_set_splits_by_scene(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    splits = write_embedded_dehaze_set(tmp_path, size=32, per_image=2, val_names=("chelsea",))
    train = PairedDehazeDataset(splits["train"] / "hazy", splits["train"] / "clear", layout="reside", on_error="raise")
    val = PairedDehazeDataset(splits["val"] / "hazy", splits["val"] / "clear", layout="reside", on_error="raise")
    assert len(train) == 8 and len(val) == 2 and val.scene_ids == ["chelsea"]
    assert "chelsea" not in train.scene_ids
    item = val[0]
    assert item["hazy"].shape == (3, 32, 32)
    assert float(item["hazy"].mean()) > float(item["clear"].mean())  # haze brightens (A >= 0.8)
