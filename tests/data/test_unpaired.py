"""lowcon.data.unpaired and the embedded translation set: sizes, determinism, errors."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowcon.data.embedded import KNOWN_TRANSFORMS, apply_known_transform, write_embedded_translation_set
from lowcon.data.io import BadImageWarning, ImageReadError, list_images, read_image
from lowcon.data.unpaired import SingleImagePairDataset, UnpairedDataset, resolve_unpaired_root


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _domains(root: Path, n_a: int = 3, n_b: int = 5, size: int = 20) -> None:
    rng = np.random.default_rng(0)
    for i in range(n_a):
        _save(root / "trainA" / f"a{i}.png", rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8))
    for i in range(n_b):
        _save(root / "trainB" / f"b{i}.png", rng.integers(0, 256, (size + 2, size, 3), dtype=np.uint8))


def test_resolve_unpaired_root(tmp_path):
    _domains(tmp_path)
    assert resolve_unpaired_root(tmp_path) == (tmp_path / "trainA", tmp_path / "trainB")
    with pytest.raises(FileNotFoundError) as info:
        resolve_unpaired_root(tmp_path, phase="test")
    assert str(info.value) == f"{tmp_path / 'testA'}: domain folder does not exist"
    (tmp_path / "valA").mkdir()
    (tmp_path / "valB").mkdir()
    assert resolve_unpaired_root(tmp_path, phase="test") == (tmp_path / "valA", tmp_path / "valB")


def test_length_order_and_serial_batches(tmp_path):
    _domains(tmp_path)
    data = UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", load_size=20, crop_size=16, serial_batches=True)
    assert len(data) == 5
    names = [(Path(data[i]["path_A"]).name, Path(data[i]["path_B"]).name) for i in range(5)]
    assert names == [("a0.png", "b0.png"), ("a1.png", "b1.png"), ("a2.png", "b2.png"), ("a0.png", "b3.png"), ("a1.png", "b4.png")]
    item = data[0]
    assert item["A"].shape == (3, 16, 16) and item["B"].shape == (3, 16, 16) and item["A"].dtype == torch.float32


def test_random_b_is_deterministic_per_seed_epoch_and_index(tmp_path):
    _domains(tmp_path)
    make = lambda seed: UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", load_size=20, crop_size=16, seed=seed)  # noqa: E731
    first, second = make(0), make(0)
    for index in range(5):
        a, b = first[index], second[index]
        assert a["path_B"] == b["path_B"] and torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
    picks = []
    for epoch in range(8):
        first.set_epoch(epoch)
        picks.append(tuple(first[i]["path_B"] for i in range(5)))
    assert len(set(picks)) > 1  # B changes between epochs
    assert len({p for epoch in picks for p in epoch}) == 5  # every B image is drawn at some point
    other = make(1)
    assert any(not torch.equal(other[i]["A"], make(0)[i]["A"]) for i in range(5))


def test_crop_without_resize_gives_exact_pixels(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _save(tmp_path / "A" / "x.png", pixels)
    _save(tmp_path / "B" / "y.png", pixels[::-1].copy())
    data = UnpairedDataset(tmp_path / "A", tmp_path / "B", crop_size=8, preprocess="crop", flip=False)
    assert torch.equal(data[0]["A"] * 255, torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32)))
    whole = UnpairedDataset(tmp_path / "A", tmp_path / "B", preprocess="none", flip=False)
    assert whole[0]["A"].shape == (3, 8, 8)


def test_grey_and_rgba_become_three_channels(tmp_path):
    grey = np.random.default_rng(2).integers(0, 256, (10, 10), dtype=np.uint8)
    _save(tmp_path / "A" / "grey.png", grey)
    rgba = np.random.default_rng(3).integers(0, 256, (10, 10, 4), dtype=np.uint8)
    _save(tmp_path / "B" / "rgba.png", rgba)
    item = UnpairedDataset(tmp_path / "A", tmp_path / "B", crop_size=10, preprocess="crop", flip=False)[0]
    assert item["A"].shape == (3, 10, 10) and torch.equal(item["A"][0], item["A"][2])
    assert torch.equal(item["A"][1] * 255, torch.from_numpy(grey.astype(np.float32)))
    assert torch.equal(item["B"] * 255, torch.from_numpy(rgba[..., :3].transpose(2, 0, 1).astype(np.float32)))


def test_tiny_and_broken_images_are_reported(tmp_path):
    _domains(tmp_path, n_a=2, n_b=2)
    _save(tmp_path / "trainA" / "dot.png", np.zeros((1, 1, 3), dtype=np.uint8))
    (tmp_path / "trainB" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.warns(BadImageWarning) as record:
        data = UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", load_size=20, crop_size=16)
    messages = [str(r.message) for r in record]
    assert any("dot.png" in m and "too small: 1x1, need at least 5x5" in m for m in messages)
    assert any("bad.png" in m for m in messages)
    assert len(data.paths_a) == 2 and len(data.paths_b) == 2
    with pytest.raises(ImageReadError, match="dot.png"):
        UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", on_error="raise")


def test_empty_domain_is_an_error_naming_it(tmp_path):
    _domains(tmp_path)
    (tmp_path / "emptyB").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        UnpairedDataset(tmp_path / "trainA", tmp_path / "emptyB")
    assert str(info.value) == f"{tmp_path / 'emptyB'}: no images found"


def test_single_image_patches_tile_the_image(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    _save(tmp_path / "a.png", pixels)
    _save(tmp_path / "b.png", pixels[:, ::-1].copy())
    data = SingleImagePairDataset(
        tmp_path / "a.png", tmp_path / "b.png", crop_size=16, zoom_range=(1.0, 1.0), flip=False, length=12, batch_size=6
    )
    image = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255)
    cells = {(top, left): image[:, top:top + 16, left:left + 16] for top in (0, 16) for left in (0, 16, 32)}
    for block in range(2):  # six indices of one block: the six grid cells, each once
        found = []
        for index in range(6 * block, 6 * block + 6):
            patch = data[index]["A"]
            found += [key for key, cell in cells.items() if torch.equal(patch, cell)]
        assert sorted(found) == sorted(cells)
    zoomed = SingleImagePairDataset(tmp_path / "a.png", tmp_path / "b.png", crop_size=16, length=40, seed=2)
    item = zoomed[7]
    assert item["A"].shape == (3, 16, 16) and item["B"].shape == (3, 16, 16)
    assert torch.equal(item["B"], SingleImagePairDataset(tmp_path / "a.png", tmp_path / "b.png", crop_size=16, length=40, seed=2)[7]["B"])
    with pytest.raises(ValueError, match="zoom_range"):
        SingleImagePairDataset(tmp_path / "a.png", tmp_path / "b.png", zoom_range=(0.0, 1.0))


def test_known_transform_matches_the_formula():
    image = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(0))
    for name, (matrix, gamma) in KNOWN_TRANSFORMS.items():
        out = apply_known_transform(name, image)
        for y in range(2):
            for x in range(3):
                rgb = [float(image[c, y, x]) for c in range(3)]
                for row in range(3):
                    mixed = min(max(sum(matrix[row][c] * rgb[c] for c in range(3)), 0.0), 1.0)
                    assert abs(float(out[row, y, x]) - mixed ** gamma) < 1e-6
    assert apply_known_transform("sepia", image[None]).shape == (1, 3, 2, 3)
    with pytest.raises(ValueError, match="valid"):
        apply_known_transform("vintage", image)


def test_demo_transform_is_one_to_one_on_colours():
    # The known-answer demo needs a map PatchNCE can follow: the channel rotation, whose third power
    # is the identity, against sepia, which gives two colours of one brightness one tint.
    from lowcon.translation import DEMO_TRANSFORM

    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1))
    once = apply_known_transform(DEMO_TRANSFORM, image)
    assert torch.equal(once, image[[1, 2, 0]])
    assert torch.equal(apply_known_transform(DEMO_TRANSFORM, apply_known_transform(DEMO_TRANSFORM, once)), image)
    grey = torch.full((3, 1, 1), 0.5)
    red_green = torch.tensor([0.5 / 0.299 * 0.5, 0.5 / 0.587 * 0.5, 0.0]).view(3, 1, 1)  # grey's luma, no blue
    sepia = [apply_known_transform("sepia", c) for c in (grey, red_green)]
    assert (sepia[0] - sepia[1]).abs().max() < 0.02 < (grey - red_green).abs().max()


def test_embedded_translation_set_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    folders = write_embedded_translation_set(tmp_path, "sepia", size=32, crops_per_image=2)
    counts = {key: len(list_images(folder)) for key, folder in folders.items()}
    assert counts == {"trainA": 8, "trainB": 8, "testA": 2, "testB": 2, "testA_transformed": 2}
    for path in list_images(folders["testA"]):
        source = read_image(path)
        target = read_image(folders["testA_transformed"] / path.name)
        assert (target - apply_known_transform("sepia", source)).abs().max() <= 4 / 255  # 8-bit rounding
    train_a = [read_image(p) for p in list_images(folders["trainA"])]
    for path in list_images(folders["trainB"]):  # never paired: no B is the transform of an A
        target = read_image(path)
        assert all((target - apply_known_transform("sepia", a)).abs().max() > 0.05 for a in train_a)
    data = UnpairedDataset(*resolve_unpaired_root(tmp_path), load_size=36, crop_size=32)
    assert len(data) == 8 and data[0]["A"].shape == (3, 32, 32)
