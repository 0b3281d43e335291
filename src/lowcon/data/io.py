"""Reading, writing and finding images: the one place where files become tensors.

Every image in lowcon is a float32 tensor (C, H, W) in [0, 1]. Files are opened by their content,
never by their suffix (real data sets hold BMPs named ``.png``), EXIF orientation is applied, and
every way a file can be unusable ends in one `ImageReadError` whose message is one line,
``"<path>: <problem>"``, so that a data set can report the file and move on (``on_error="skip"``)
or stop the run (``on_error="raise"``).

Conversions (to RGB unless ``mode="L"``):
    - grey (L, 1-bit) is repeated over the three channels;
    - alpha (RGBA, LA, PA, palette with transparency) is DROPPED, not composited: the colour
      values are kept as stored. Photos rarely carry a meaningful alpha, and compositing on a
      chosen background would invent pixel values;
    - 16-bit files (grey I;16*, PNG and TIFF RGB/RGBA with 16 bits per sample) are scaled by
      1/65535, keeping their full precision (Pillow itself keeps only the high byte of 16-bit
      colour PNGs; see `_read_png_rgb16`). Only 16-bit grey+alpha PNGs stay at 8 bits. 32-bit
      integer images (mode I, what old Pillow made of 16-bit PNGs) are taken as 16-bit data,
      clipped to [0, 65535];
    - float images (mode F) are taken as already in [0, 1] and clipped to it;
    - CMYK, YCbCr, HSV use Pillow's conversion to RGB.
Multi-frame files (GIF, multi-page TIFF) give their first frame.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lowcon.config import publish

__all__ = [
    "ImageReadError",
    "BadImageWarning",
    "IMAGE_SUFFIXES",
    "read_image",
    "probe_image",
    "write_image",
    "list_images",
    "looks_like_image",
    "load_or_report",
    "report_bad_image",
    "check_on_error",
    "RenamedOutputWarning",
    "KeptOutputWarning",
    "plan_outputs",
    "same_size_batches",
]

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}
)
_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF"}
_EXIF_ORIENTATION = 0x0112
_ON_ERROR = ("skip", "raise")
EXISTING = ("error", "overwrite", "skip")


class ImageReadError(ValueError):
    """An image file cannot be used; ``str(err)`` is one line, ``"<path>: <problem>"``."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the decoder said
        super().__init__(f"{self.path}: {self.problem}")


class BadImageWarning(UserWarning):
    """An unusable image was skipped (``on_error="skip"``)."""


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` argument: ``"skip"`` (warn and leave the file out) or ``"raise"``."""
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error: expected one of {', '.join(_ON_ERROR)}, got {on_error!r}")
    return on_error


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageReadError(path, "no such file" if not path.exists() else "not a file")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "cannot identify image file") from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"too many pixels ({err})") from None
    except Exception as err:  # noqa: BLE001 - a broken header can fail in any decoder
        raise ImageReadError(path, f"cannot open image ({type(err).__name__}: {err})") from None


def _check_size(path: Path, width: int, height: int, min_size: int) -> None:
    if width == 0 or height == 0:
        raise ImageReadError(path, f"image is empty ({width}x{height})")
    if width < min_size or height < min_size:
        raise ImageReadError(
            path, f"too small: {width}x{height}, need at least {min_size}x{min_size}"
        )


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the pixels unusable
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    # The eight EXIF orientations, as the transposes ImageOps.exif_transpose applies, on (H, W, C).
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _swapped_rawmode(image: Image.Image) -> Optional[str]:
    # 16-bit colour PNGs decode through rawmodes that keep one byte of each sample; the same
    # decoder with the opposite byte order keeps the other byte (unfiltering is identical).
    if image.format != "PNG" or len(image.tile) != 1:
        return None
    rawmode = image.tile[0].args
    return {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}.get(rawmode)


def _read_png_rgb16(path: Path, image: Image.Image, low_rawmode: str) -> np.ndarray:
    image.load()
    high = np.asarray(image, dtype=np.uint16)
    with Image.open(path) as other:
        other.tile = [other.tile[0]._replace(args=low_rawmode)]
        other.load()
        low = np.asarray(other, dtype=np.uint16)
    return (high << 8 | low)[..., :3].astype(np.float32) / 65535.0


def _is_tiff_16bit_colour(image: Image.Image) -> bool:
    if image.format != "TIFF" or image.mode not in ("RGB", "RGBA") or not image.tile:
        return False
    args = image.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _read_tiff_16bit(path: Path) -> np.ndarray:
    import tifffile  # a scikit-image dependency; only 16-bit colour TIFFs need it

    array = np.asarray(tifffile.imread(path, key=0))
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint16:
        raise ValueError(f"unexpected 16-bit TIFF layout {array.shape} {array.dtype}")
    return array[..., :3].astype(np.float32) / 65535.0


def _to_float_array(image: Image.Image) -> np.ndarray:
    """Loaded PIL image -> (H, W, 1 or 3) float32 in [0, 1]."""
    mode = image.mode
    if mode.startswith("I;16"):
        return (np.asarray(image).astype(np.float32) / 65535.0)[..., None]
    if mode == "I":
        return (np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 65535.0).astype(
            np.float32
        )[..., None]
    if mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)[..., None]
    if mode in ("1", "L", "LA", "La"):
        image = image.convert("L")
        return (np.asarray(image, dtype=np.float32) / 255.0)[..., None]
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # honours palette transparency without Pillow's warning
    if image.mode != "RGB":
        image = image.convert("RGB")  # drops alpha; CMYK/YCbCr/HSV by Pillow's conversion
    return np.asarray(image, dtype=np.float32) / 255.0


def _grey(array: np.ndarray) -> np.ndarray:
    # ITU-R 601-2 luma, the weights of Pillow's convert("L").
    return (array @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


def read_image(path: PathLike, mode: str = "RGB", *, min_size: int = 1) -> Tensor:
    """Read an image file into a float32 tensor in [0, 1].

    Args:
        path: the file; its format is found from its content, whatever its suffix.
        mode: ``"RGB"`` (3 channels; grey is repeated) or ``"L"`` (1 channel; colour becomes
            ITU-R 601 luma).
        min_size: smallest accepted width and height in pixels (after EXIF orientation).

    Shape:
        (3, H, W) for ``"RGB"``, (1, H, W) for ``"L"``.

    Raises:
        ImageReadError: one line ``"<path>: <problem>"`` for a missing, unidentifiable,
            truncated, empty or too small image.

    Example:
        >>> hazy = read_image("hazy/0001_0.8_0.2.jpg")  # doctest: +SKIP
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode: expected 'RGB' or 'L', got {mode!r}")
    if min_size < 1:
        raise ValueError(f"min_size: expected >= 1, got {min_size}")
    path = Path(path)
    image = _open(path)
    try:
        _check_size(path, *image.size, min_size=min_size)
        low_rawmode = _swapped_rawmode(image)
        try:
            if low_rawmode is not None:
                array = _read_png_rgb16(path, image, low_rawmode)
            elif _is_tiff_16bit_colour(image):
                array = _read_tiff_16bit(path)
            else:
                image.load()
                array = _to_float_array(image)
        except ImageReadError:
            raise
        except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error...
            message = str(err)
            if "truncated" in message.lower() or isinstance(err, EOFError):
                raise ImageReadError(path, "truncated image") from None
            raise ImageReadError(path, f"cannot decode image ({type(err).__name__}: {message})") from None
        orientation = _orientation(image)
    finally:
        image.close()
    array = _orient(array, orientation)
    if mode == "L" and array.shape[-1] == 3:
        array = _grey(array)
    elif mode == "RGB" and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    height, width = array.shape[:2]
    _check_size(path, width, height, min_size=min_size)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


def probe_image(path: PathLike, *, min_size: int = 1) -> tuple[int, int]:
    """Check that a file is an image without decoding its pixels; return its (width, height).

    Cheap (header only), so data sets can check thousands of files when they are built. The size
    is after EXIF orientation, except for PNGs whose EXIF block comes after the pixel data (rare).
    Truncation is only found when the pixels are decoded (`read_image`).

    Raises:
        ImageReadError: as `read_image`, for what the header shows.
    """
    path = Path(path)
    image = _open(path)
    try:
        width, height = image.size
        if image.format == "PNG":
            # PngImageFile.getexif decodes the whole image when EXIF is not in the header.
            orientation = _orientation(image) if "exif" in image.info else 1
        else:
            orientation = _orientation(image)
    finally:
        image.close()
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    _check_size(path, width, height, min_size=min_size)
    return width, height


def write_image(path: PathLike, image: Tensor, *, quality: int = 95) -> Path:
    """Write a [0, 1] image to an 8-bit file, atomically; the format follows the suffix.

    The file is written to a temporary file in the same folder, then renamed over ``path``
    (``os.replace``), so a crash never leaves a half-written image under the final name.
    Parent folders are created.

    Args:
        path: destination; suffix .png, .jpg/.jpeg, .bmp or .tif/.tiff.
        image: values in [0, 1] (clipped), rounded to 8 bits.
        quality: JPEG quality (ignored by the lossless formats).

    Shape:
        image: (3, H, W), (1, 3, H, W), or (1, H, W) for grey.
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"path: unsupported suffix {path.suffix!r} for {path}; use one of "
            f"{', '.join(sorted(_WRITE_FORMATS))}"
        )
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image: expected shape (3, H, W), (1, 3, H, W) or (1, H, W), got {tuple(image.shape)}")
    array = image.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(array).all():
        raise ValueError(f"image: holds NaN or inf values (writing {path})")
    array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            options = {"quality": quality} if fmt == "JPEG" else {}
            pil.save(tmp, format=fmt, **options)
        publish(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def looks_like_image(path: PathLike) -> bool:
    """True for a known image suffix, or for a file whose first bytes are an image signature
    (PNG, JPEG, BMP, GIF, TIFF, WebP), so that mis-suffixed images are found."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":  # RIFF, 4 size bytes, WEBP
        return True
    return any(head.startswith(magic) for magic in _MAGIC)


def list_images(folder: PathLike, *, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted by path (plain string order).

    A file counts when its suffix is an image suffix or its first bytes are an image signature;
    hidden files and folders (name starting with ".") are left out. Content is not validated
    here: a corrupt file with an image suffix is listed and reported when it is read.

    Raises:
        FileNotFoundError: one line naming the folder, when it does not exist or holds no image.
        NotADirectoryError: when ``folder`` is a file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if looks_like_image(path):
            found.append(path)
    if not found:
        raise FileNotFoundError(f"{folder}: no images found")
    return sorted(found, key=lambda p: str(p))


def report_bad_image(error: ImageReadError, on_error: str) -> None:
    """Stop (``"raise"``) or warn with one line naming the file (``"skip"``)."""
    check_on_error(on_error)
    if on_error == "raise":
        raise error
    warnings.warn(f"skipping image: {error}", BadImageWarning, stacklevel=3)


def load_or_report(
    path: PathLike, on_error: str = "skip", *, mode: str = "RGB", min_size: int = 1
) -> Optional[Tensor]:
    """`read_image`, or None after a one-line `BadImageWarning` (``"skip"``), or raise (``"raise"``)."""
    check_on_error(on_error)
    try:
        return read_image(path, mode, min_size=min_size)
    except ImageReadError as err:
        report_bad_image(err, on_error)
        return None


# ---------------------------------------------------------------------------------------------
# Image files in, one PNG each out (lowcon translate, lowcon dehaze)
# ---------------------------------------------------------------------------------------------


class RenamedOutputWarning(UserWarning):
    """An output file took another name than ``<stem>.png``: another input has that stem."""


class KeptOutputWarning(UserWarning):
    """Outputs that were there already are kept and their inputs not processed (``existing="skip"``)."""


def expand_inputs(inputs: Sequence[PathLike], on_error: str) -> list[Path]:
    """The image files of `inputs` (files, and the images of folders), in order. A missing path,
    an empty folder, a broken symbolic link or a FIFO is reported in one line and skipped, or
    raised (`on_error`)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                files.extend(list_images(path))
            except FileNotFoundError as err:  # an empty folder: skipped like a missing file
                report_bad_image(ImageReadError(path, str(err).split(": ", 1)[-1]), on_error)
        elif path.is_file():
            files.append(path)
        else:
            problem = ("a broken or looping symbolic link" if path.is_symlink() else
                       "not a regular file or folder" if os.path.lexists(path) else "no such file or folder")
            report_bad_image(ImageReadError(path, problem), on_error)
    return files


def _names(files: Sequence[Path], out_dir: Path) -> tuple[list[Path], list[int]]:
    """:func:`output_names` without its warnings: the outputs and the indices of the renamed inputs."""
    used: set[str] = set()
    names: list[Optional[str]] = [None] * len(files)
    renamed: list[int] = []
    for i, path in enumerate(files):  # .png inputs first: x.png stays x.png
        if path.suffix.lower() == ".png" and f"{path.stem}.png" not in used:
            names[i] = f"{path.stem}.png"
            used.add(names[i])
    for i, path in enumerate(files):
        if names[i] is not None:
            continue
        name, k = f"{path.stem}.png", 1
        while name in used:
            name, k = f"{path.stem}_{k}.png", k + 1
        used.add(name)
        names[i] = name
        if k > 1:
            renamed.append(i)
    return [out_dir / name for name in names], renamed


def _warn_renamed(files: Sequence[Path], outputs: Sequence[Path], renamed: Sequence[int], stacklevel: int) -> None:
    for i in renamed:
        warnings.warn(f"{files[i]}: written as {outputs[i]} ({files[i].stem}.png is another input's)",
                      RenamedOutputWarning, stacklevel=stacklevel + 1)


def output_names(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<stem>.png`` for each input. Inputs that share a stem (x.jpg and x.png, or x.png in
    two folders) are all kept: a .png input keeps its own name where it can, the others get
    ``<stem>_1.png``, ``<stem>_2.png``, ..., each renaming reported in one line."""
    outputs, renamed = _names(files, Path(out_dir))
    _warn_renamed(files, outputs, renamed, stacklevel=2)
    return outputs


def plan_outputs(
    inputs: Sequence[PathLike], out_dir: PathLike, on_error: str = "skip", existing: str = "error"
) -> list[tuple[Path, Path]]:
    """(input file, output PNG) for the images of `inputs`, checked before anything is written.

    Outputs are ``out_dir/<stem>.png`` (:func:`output_names`; a renaming is reported once the
    checks have passed, for outputs to be written). `out_dir` must be a folder (or not
    exist yet), and no output may replace an input. An output that exists already, from an
    earlier run, is an error naming it (``existing="error"``), replaced (``"overwrite"``), or kept
    and its input left out of the plan, with one line saying how many (``"skip"``: a run cut short
    goes on where it stopped; outputs are written atomically, so one that is there is whole).

    Raises:
        NotADirectoryError, ValueError, FileExistsError: one line each; nothing is written.
    """
    check_on_error(on_error)
    if existing not in EXISTING:
        raise ValueError(f"existing: expected one of {EXISTING}, got {existing!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; the output must be a folder")
    files = expand_inputs(inputs, on_error)
    outputs, renamed = _names(files, out_dir)
    sources = {p.resolve() for p in files}
    clash = [o for o in outputs if o.resolve() in sources]
    if clash:
        raise ValueError(f"{clash[0]}: would overwrite an input image; choose another output folder")
    there = [o for o in outputs if os.path.lexists(o)]
    if there and existing == "error":
        more = f" (and {len(there) - 1} more outputs)" if len(there) > 1 else ""
        raise FileExistsError(f"{there[0]}: exists already{more}; nothing written. Replace: --overwrite "
                              "(existing='overwrite'); keep and write the rest: --skip-existing (existing='skip')")
    kept = set(there) if existing == "skip" else set()
    if kept:
        warnings.warn(f"{out_dir}: {len(kept)} of the {len(outputs)} outputs exist already and are kept",
                      KeptOutputWarning, stacklevel=3)
    _warn_renamed(files, outputs, [i for i in renamed if outputs[i] not in kept], stacklevel=3)
    return [(f, o) for f, o in zip(files, outputs) if o not in kept]


def same_size_batches(
    plan: Sequence[tuple[Path, Path]], batch_size: int, on_error: str, *, min_size: int = 1,
    transform: Optional[Callable[[Tensor], Tensor]] = None, progress: bool = False, desc: str = "",
) -> Iterator[tuple[list[Tensor], list[Path]]]:
    """The images of a :func:`plan_outputs` plan, read in order (then `transform`-ed), in batches
    of consecutive images of one size, up to `batch_size`: ``(images, targets)`` each. An
    unreadable input is reported in one line and skipped, or raised (`on_error`). `progress`
    shows a bar over the inputs, named `desc`."""
    from tqdm.auto import tqdm

    images: list[Tensor] = []
    targets: list[Path] = []
    for path, target in tqdm(plan, disable=not progress, desc=desc, unit="img"):
        try:
            image = read_image(path, min_size=min_size)
        except ImageReadError as err:
            report_bad_image(err, on_error)
            continue
        if transform is not None:
            image = transform(image)
        if images and (image.shape != images[0].shape or len(images) >= batch_size):
            yield images, targets
            images, targets = [], []
        images.append(image)
        targets.append(target)
    if images:
        yield images, targets
