"""lowcon.data.paired: pairing rules, ground-truth sizes, errors, splits and aligned augmentation."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowcon.data.io import BadImageWarning, ImageReadError
from lowcon.data.paired import HazyFolder, PairedDehazeDataset, scene_ids, split_ids

# Real data beside the checkout (../shared/data), or wherever LOWCON_SHARED_DATA points.
SHARED = Path(os.environ.get("LOWCON_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "dehaze"


def _save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255)


def test_reside_pairs_several_hazy_per_clear(tmp_path):
    clear = {"0001": _pixels(16, 20, 1), "0002": _pixels(16, 20, 2)}
    _save(tmp_path / "clear" / "0001.png", clear["0001"])
    _save(tmp_path / "clear" / "0002.bmp", clear["0002"], "BMP")  # any extension
    for name in ("0001_0.8_0.2.png", "0001_0.9_0.1.png", "0002_0.85_0.08.png"):
        _save(tmp_path / "hazy" / name, _pixels(16, 20, 7))
    _save(tmp_path / "hazy" / "0002_1_0.04.jpg", _pixels(16, 20, 8), "PNG")  # lying suffix
    data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert data.layout == "reside" and len(data) == 4
    items = [data[i] for i in range(4)]
    assert [item["name"] for item in items] == ["0001_0.8_0.2", "0001_0.9_0.1", "0002_0.85_0.08", "0002_1_0.04"]
    assert [item["id"] for item in items] == ["0001", "0001", "0002", "0002"]
    for item in items:
        assert torch.equal(item["clear"], _tensor(clear[item["id"]]))
        assert item["hazy"].shape == (3, 16, 20) and item["hazy"].dtype == torch.float32
    assert data.scene_ids == ["0001", "0002"]


def test_larger_ground_truth_is_centre_cropped(tmp_path):
    gt = _pixels(48, 64, 3)
    _save(tmp_path / "clear" / "1400.png", gt)
    _save(tmp_path / "hazy" / "1400_3.png", _pixels(46, 62, 4))  # SOTS-indoor-like: 2 px border
    item = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")[0]
    assert torch.equal(item["clear"], _tensor(gt[1:47, 1:63]))


@pytest.mark.parametrize("clear_size", [(40, 50), (96, 128)])  # smaller, and much larger (rescaled)
def test_mismatched_ground_truth_names_both_files(tmp_path, clear_size):
    _save(tmp_path / "clear" / "0001.png", _pixels(*clear_size, 3))
    _save(tmp_path / "hazy" / "0001_0.8_0.2.png", _pixels(46, 62, 4))
    with pytest.raises(ImageReadError) as info:
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", on_error="raise")
    message = str(info.value)
    assert "0001_0.8_0.2.png" in message and "0001.png" in message and "62x46" in message
    assert f"{clear_size[1]}x{clear_size[0]}" in message and "\n" not in message


def test_same_name_layout_with_different_extensions(tmp_path):
    for stem in ("51", "52"):
        _save(tmp_path / "clear" / f"{stem}.jpg", _pixels(12, 12, int(stem)), "JPEG")
        _save(tmp_path / "hazy" / f"{stem}.png", _pixels(12, 12, 0))
    data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert data.layout == "same-name"
    assert [data[i]["id"] for i in range(2)] == ["51", "52"]


def test_auto_reads_original_nh_haze_names(tmp_path):
    for stem in ("01", "02"):
        _save(tmp_path / "clear" / f"{stem}_GT.png", _pixels(8, 8, 1))
        _save(tmp_path / "hazy" / f"{stem}_hazy.png", _pixels(8, 8, 2))
    data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert data.layout == "reside" and [data[i]["id"] for i in range(2)] == ["01", "02"]


def test_missing_clear_image_skip_or_raise(tmp_path):
    _save(tmp_path / "clear" / "0001.png", _pixels(8, 8, 1))
    _save(tmp_path / "hazy" / "0001_0.8_0.2.png", _pixels(8, 8, 2))
    _save(tmp_path / "hazy" / "0003_0.8_0.2.png", _pixels(8, 8, 3))
    with pytest.raises(ImageReadError) as info:
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", on_error="raise")
    assert "0003_0.8_0.2.png" in str(info.value) and "no clear image for ID '0003'" in str(info.value)
    with pytest.warns(BadImageWarning, match="0003_0.8_0.2.png"):
        data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert len(data) == 1 and data[0]["id"] == "0001"


def test_folder_errors_are_one_line(tmp_path):
    (tmp_path / "hazy").mkdir()
    _save(tmp_path / "clear" / "0001.png", _pixels(8, 8, 1))
    with pytest.raises(FileNotFoundError) as info:
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert str(info.value) == f"{tmp_path / 'hazy'}: no images found"
    _save(tmp_path / "hazy" / "0001_1.png", _pixels(8, 8, 1))
    _save(tmp_path / "clear" / "0001.jpg", _pixels(8, 8, 1))
    with pytest.raises(ValueError, match="two clear images for ID '0001'"):
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    with pytest.raises(ValueError, match="layout"):
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", layout="nyu")


def _scene_set(root: Path, n_scenes: int = 12, per_scene: int = 3, size: int = 8) -> None:
    for scene in range(1, n_scenes + 1):
        _save(root / "clear" / f"{scene:04d}.png", _pixels(size, size, scene))
        for k in range(per_scene):
            _save(root / "hazy" / f"{scene:04d}_{k}.png", _pixels(size, size, 100 + k))


def test_split_ids_is_deterministic_and_has_no_leakage(tmp_path):
    _scene_set(tmp_path)
    ids = scene_ids(tmp_path / "hazy")
    assert ids == [f"{i:04d}" for i in range(1, 13)]
    train, val = split_ids(ids, val_fraction=0.25, seed=5)
    assert (train, val) == split_ids(list(reversed(ids)), val_fraction=0.25, seed=5)
    assert len(val) == math.ceil(12 * 0.25) and set(train) | set(val) == set(ids) and not set(train) & set(val)
    order = np.random.default_rng(5).permutation(12)  # the documented rule
    assert val == sorted(ids[i] for i in order[:3])
    assert split_ids(ids, 0.25, seed=6) != (train, val)
    train_data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", ids=train)
    val_data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", ids=val)
    assert len(train_data) == 3 * 9 and len(val_data) == 3 * 3
    train_scenes = {train_data[i]["id"] for i in range(len(train_data))}
    val_scenes = {val_data[i]["id"] for i in range(len(val_data))}
    assert not train_scenes & val_scenes  # every hazy version of a scene is on one side
    with pytest.raises(ValueError, match="not in"):
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", ids=["9999"])
    assert split_ids(["a"], 0.5) == (["a"], []) and split_ids(["a", "b"], 0.9) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_ids(["a", "b"], 1.0) == ([], ["a", "b"]) and split_ids(["a", "b"], 0.0) == (["a", "b"], [])


def test_augmentation_keeps_hazy_and_clear_aligned(tmp_path):
    rng = np.random.default_rng(0)
    clear = rng.integers(0, 128, (20, 24, 3), dtype=np.uint8)
    _save(tmp_path / "clear" / "7.png", clear)
    _save(tmp_path / "hazy" / "7.png", clear * 2)  # clear = hazy * 0.5 exactly
    data = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", crop=8, augment=True, seed=3)
    hazy_full = torch.from_numpy((clear * 2).transpose(2, 0, 1).astype(np.float32) / 255)
    for epoch in range(4):
        data.set_epoch(epoch)
        item = data[0]
        assert item["hazy"].shape == (3, 8, 8)
        assert torch.allclose(item["clear"], item["hazy"] * 0.5, atol=1e-6)
        # The hazy crop is some flip/rotation of some 8x8 window of the original.
        candidates = [
            torch.rot90(window, k, dims=(1, 2))
            for top in range(13) for left in range(17)
            for window in (hazy_full[:, top:top + 8, left:left + 8], hazy_full[:, top:top + 8, left:left + 8].flip(-1))
            for k in range(4)
        ]
        assert any(torch.equal(item["hazy"], c) for c in candidates)
    data.set_epoch(1)
    again = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", crop=8, augment=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(data[0]["hazy"], again[0]["hazy"])  # same seed, epoch, index -> same crop
    crops = set()
    for epoch in range(6):
        again.set_epoch(epoch)
        crops.add(again[0]["hazy"].numpy().tobytes())
    assert len(crops) > 1


def test_crop_modes_without_augmentation(tmp_path):
    pixels = _pixels(10, 14, 1)
    _save(tmp_path / "clear" / "1.png", pixels)
    _save(tmp_path / "hazy" / "1.png", pixels)
    whole = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")[0]
    assert torch.equal(whole["hazy"], _tensor(pixels))
    centre = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", crop=4)[0]
    assert torch.equal(centre["hazy"], _tensor(pixels[3:7, 5:9]))
    with pytest.raises(ValueError, match="smaller than the crop"):
        PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", crop=12)[0]
    padded = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", crop=12, pad_if_needed=True)[0]
    assert padded["hazy"].shape == (3, 12, 12)


def test_truncated_image_is_replaced_or_raises(tmp_path):
    _scene_set(tmp_path, n_scenes=3, per_scene=1, size=32)
    broken = tmp_path / "hazy" / "0002_0.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    dataset = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear")
    assert len(dataset) == 3  # the header is fine: found only when decoded
    with pytest.warns(BadImageWarning, match="0002_0.png"):
        item = dataset[1]
    assert item["id"] == "0003"
    strict = PairedDehazeDataset(tmp_path / "hazy", tmp_path / "clear", on_error="raise")
    with pytest.raises(ImageReadError, match="truncated"):
        strict[1]


def test_hazy_folder_reads_by_content_and_skips_broken_files(tmp_path):
    _save(tmp_path / "a.png", _pixels(6, 9, 1), "BMP")
    _save(tmp_path / "b", _pixels(5, 5, 2), "JPEG")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.warns(BadImageWarning, match="c.jpg"):
        folder = HazyFolder(tmp_path)
    assert len(folder) == 2
    first = folder[0]
    assert set(first) == {"hazy", "name", "path"} and first["name"] == "a"
    assert torch.equal(first["hazy"], _tensor(_pixels(6, 9, 1)))
    with pytest.raises(ImageReadError, match="c.jpg"):
        HazyFolder(tmp_path, on_error="raise")


def test_shared_benchmarks_pair_completely():
    if not SHARED.is_dir():
        pytest.skip(f"shared data absent: {SHARED}")
    sots = PairedDehazeDataset(SHARED / "sots-outdoor-150" / "hazy", SHARED / "sots-outdoor-150" / "clear", on_error="raise")
    assert sots.layout == "reside" and len(sots) == 150 and len(sots.scene_ids) == 146
    item = sots[0]
    assert item["id"] == "0001" and item["hazy"].shape == item["clear"].shape
    nh = PairedDehazeDataset(SHARED / "nh-haze-test" / "hazy", SHARED / "nh-haze-test" / "clear", on_error="raise")
    assert nh.layout == "same-name" and len(nh) == 5 and nh.scene_ids == ["21", "22", "23", "24", "25"]
