"""lowcon.data.io: reading by content, every pixel format, errors, atomic writes, folder listing."""
from __future__ import annotations

import struct
import warnings
import zlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lowcon.data.io import (
    BadImageWarning,
    ImageReadError,
    list_images,
    load_or_report,
    looks_like_image,
    probe_image,
    read_image,
    write_image,
)

# Real data beside the checkout (../shared/data), or wherever LOWCON_SHARED_DATA points.
SHARED = Path(os.environ.get("LOWCON_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _rgb(height: int = 6, width: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png16(path: Path, array: np.ndarray, color_type: int) -> None:
    """Hand-written 16-bit PNG encoder; rows alternate filter Sub (1) and Up (2), so the reader's
    unfiltering with 6 or 8 bytes per pixel is exercised."""
    height, width = array.shape[:2]
    bpp = 2 * (array.shape[2] if array.ndim == 3 else 1)
    rows = [np.frombuffer(array[y].astype(">u2").tobytes(), dtype=np.uint8).astype(np.int64) for y in range(height)]
    raw = b""
    for y, row in enumerate(rows):
        if y % 2 == 0:
            left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
            raw += b"\x01" + ((row - left) % 256).astype(np.uint8).tobytes()
        else:
            raw += b"\x02" + ((row - rows[y - 1]) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_png_with_jpg_suffix_is_read_by_content(tmp_path):
    pixels = _rgb()
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, format="PNG")
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 6, 5)
    assert torch.equal(image, torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255))


def test_bmp_with_png_suffix_is_read_by_content(tmp_path):
    pixels = _rgb(seed=1)
    path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(path, format="BMP")
    assert path.read_bytes()[:2] == b"BM"
    assert torch.equal(read_image(path) * 255, torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32)))


def test_grey_is_repeated_over_three_channels(tmp_path):
    grey = np.array([[0, 51, 255], [1, 128, 254]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 2, 3)
    for channel in range(3):
        assert torch.equal(image[channel], torch.from_numpy(grey.astype(np.float32) / 255))
    assert read_image(tmp_path / "g.png", mode="L").shape == (1, 2, 3)


def test_rgba_and_la_drop_alpha(tmp_path):
    rgb = _rgb(3, 4)
    alpha = np.array([[0, 10, 128, 255]] * 3, dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    assert torch.equal(read_image(tmp_path / "rgba.png") * 255, torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)))
    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    assert torch.equal(image[1] * 255, torch.from_numpy(grey.astype(np.float32)))


def test_palette_image_gives_palette_colours(tmp_path):
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30]], dtype=np.uint8)
    indices = np.array([[0, 1, 2], [2, 2, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "p.png")
    expected = palette[indices]  # explicit lookup
    assert torch.equal(read_image(tmp_path / "p.png") * 255, torch.from_numpy(expected.transpose(2, 0, 1).astype(np.float32)))


def test_16bit_grey_png_keeps_full_precision(tmp_path):
    values = np.array([[65535, 32768, 1, 256]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    expected = torch.tensor([1.0, 32768 / 65535, 1 / 65535, 256 / 65535])
    assert torch.allclose(image[0, 0], expected, rtol=0, atol=1e-7)
    assert abs(float(image[0, 0, 1]) - 0.50000762951) < 1e-7
    assert not torch.equal(image[0, 0, 2], image[0, 0, 3] * 0)  # 1/65535 is not truncated to 0


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4)])
def test_16bit_colour_png_is_not_cut_to_8_bits(tmp_path, color_type, channels):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (5, 4, channels), dtype=np.uint16)
    values[0, 0, :3] = (65535, 32768, 1)
    _png16(tmp_path / "c16.png", values, color_type)
    image = read_image(tmp_path / "c16.png")
    expected = torch.from_numpy(values[..., :3].transpose(2, 0, 1).astype(np.float64) / 65535)
    assert torch.allclose(image.double(), expected, rtol=0, atol=1e-7)


def test_16bit_colour_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    values = np.random.default_rng(4).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", values, photometric="rgb")
    image = read_image(tmp_path / "c16.tif")
    assert torch.allclose(image.double(), torch.from_numpy(values.transpose(2, 0, 1) / 65535.0), rtol=0, atol=1e-7)


def test_int32_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert torch.equal(read_image(tmp_path / "i.tif")[0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    Image.fromarray(np.array([[0.25, 2.0, -1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert torch.equal(read_image(tmp_path / "f.tif")[:, 0], torch.tensor([[0.25, 1.0, 0.0]] * 3))


def test_cmyk_is_converted(tmp_path):
    # C=51, K=0 -> R = 255 - 51; Y=255 -> B = 0 (the same under every CMYK->RGB formula with K=0).
    Image.new("CMYK", (2, 2), (51, 0, 255, 0)).save(tmp_path / "cmyk.tif")
    assert torch.equal(read_image(tmp_path / "cmyk.tif")[:, 0, 0] * 255, torch.tensor([204.0, 255.0, 0.0]))


def test_exif_orientation_6_transposes_the_shape(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(16, 24)).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (24, 16)
    assert read_image(tmp_path / "rot.jpg").shape == (3, 24, 16)
    assert probe_image(tmp_path / "rot.jpg") == (16, 24)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(_rgb(3, 5, seed=orientation)).save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert torch.equal(read_image(path) * 255, torch.from_numpy(expected.transpose(2, 0, 1).astype(np.float32)))


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file_raises_one_line_error_naming_it(tmp_path, fmt, suffix):
    path = tmp_path / f"broken{suffix}"
    Image.fromarray(_rgb(64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "truncated" in message
    assert isinstance(info.value, ValueError)


def test_empty_missing_and_small_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="cannot identify image file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "dot.png", min_size=4)
    assert str(info.value) == f"{tmp_path / 'dot.png'}: too small: 1x1, need at least 4x4"
    with pytest.raises(ImageReadError, match="too small"):
        probe_image(tmp_path / "dot.png", min_size=4)
    assert read_image(tmp_path / "dot.png").shape == (3, 1, 1)


def test_write_image_round_trip_and_atomic(tmp_path):
    pixels = _rgb(7, 9).transpose(2, 0, 1).astype(np.float32)
    values = torch.from_numpy(pixels / 255)
    out = tmp_path / "a" / "b" / "x.png"
    write_image(out, values[None])
    assert torch.equal(read_image(out), values)
    write_image(out, torch.from_numpy((255 - pixels) / 255))  # overwrite in place
    assert torch.equal(read_image(out) * 255, torch.from_numpy(255 - pixels))
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]  # no temp file left
    write_image(tmp_path / "y.jpg", values)
    assert (tmp_path / "y.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    write_image(tmp_path / "z.bmp", values)
    assert (tmp_path / "z.bmp").read_bytes()[:2] == b"BM"


def test_written_files_get_an_ordinary_mode_under_the_umask(tmp_path):
    # mkstemp makes 0600 files; images, configs and checkpoints are ordinary files
    import os

    from lowcon.config import atomic_write_text
    from lowcon.training import save_checkpoint

    old = os.umask(0o027)
    try:
        paths = [write_image(tmp_path / "x.png", torch.zeros(3, 4, 4)), tmp_path / "c.yaml",
                 save_checkpoint(tmp_path / "last.pt", {"step": 1})]
        atomic_write_text(paths[1], "a: 1\n")
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o640)] * 3


def test_write_image_clips_and_rejects_bad_input(tmp_path):
    write_image(tmp_path / "c.png", torch.tensor([[[-0.5, 1.5]]]).expand(3, 1, 2))
    assert torch.equal(read_image(tmp_path / "c.png")[0, 0], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "n.png", torch.full((3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "n.gifx", torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "n.png", torch.zeros(2, 3, 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]


def test_list_images_by_suffix_and_content(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "b.png")
    Image.fromarray(_rgb()).save(tmp_path / "a.data", format="PNG")  # mis-suffixed
    Image.fromarray(_rgb()).save(tmp_path / "noext", format="JPEG")
    Image.fromarray(_rgb()).save(tmp_path / "c.bin", format="TIFF")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(_rgb()).save(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "sub" / "d.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.data", "b.png", "c.bin", "noext"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.data", "b.png", "c.bin", "noext", "d.png"]
    assert not looks_like_image(tmp_path / "notes.txt")


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        list_images(tmp_path / "nope")
    assert str(info.value) == f"{tmp_path / 'nope'}: folder does not exist"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        list_images(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty'}: no images found"


def test_load_or_report_skip_and_raise(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(BadImageWarning) as record:
        assert load_or_report(bad, "skip") is None
    assert len(record) == 1 and str(bad) in str(record[0].message) and "\n" not in str(record[0].message)
    with pytest.raises(ImageReadError):
        load_or_report(bad, "raise")
    with pytest.raises(ValueError, match="on_error"):
        load_or_report(bad, "ignore")
    Image.fromarray(_rgb()).save(tmp_path / "good.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_report(tmp_path / "good.png").shape == (3, 6, 5)


def test_every_real_hazy_file_opens():
    folder = SHARED / "dehaze" / "real-hazy"
    if not folder.is_dir():
        pytest.skip(f"shared data absent: {folder}")
    paths = list_images(folder)
    assert len(paths) == 32
    for path in paths:
        image = read_image(path)
        assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1
    # The suffixes lie for these three: content is BMP, BMP, PNG.
    assert (folder / "guogong.png").read_bytes()[:2] == b"BM"
    assert (folder / "test13.jpg").read_bytes()[:4] == b"\x89PNG"
    assert read_image(folder / "test12.jpg").shape[0] == 3
