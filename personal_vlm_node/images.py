"""Turn whatever a user hands us into a clean RGB image, or a clear error.

Accepts file paths, raw encoded bytes (PNG/JPEG/...), PIL images and numpy arrays (H×W, H×W×1/3/4,
uint8/uint16/float). 16-bit and float images are scaled to 8 bit by their own range, alpha is
composited on white (as the models' processors do), palettes and CMYK are converted, and the EXIF
orientation of an encoded photo is applied, so pictures and boxes are in the frame the user sees.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PersonalVLMError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}   # picture files in folders
MAX_PIXELS = 64_000_000  # a 8000×8000 frame; beyond this we refuse instead of exhausting memory
# Where load_image leaves the bytes of an encoded photo, so the store can keep the original file
# (a JPEG stays a JPEG, not a PNG several times its size): (bytes, format).
ENCODED_INFO = "personal_vlm_encoded"
_KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise PersonalVLMError(f"image has zero size ({width}×{height}); send an image with pixels")
    if width * height > MAX_PIXELS:
        raise PersonalVLMError(
            f"image is {width}×{height} = {width * height / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP "
            "limit; downscale it first")


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit values unchanged; others mapped by their finite min/max to 0..255 (NaN/inf → 0)."""
    if array.dtype == np.uint8:
        return array
    data = array.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if array.dtype == np.bool_:
        lo, hi = 0.0, 1.0
    span = hi - lo if hi > lo else 1.0
    data = np.where(finite, (data - lo) / span, 0.0)
    return np.clip(data * 255.0 + 0.5, 0, 255).astype(np.uint8)


def from_array(array: np.ndarray) -> Image.Image:
    """An H×W or H×W×C array (C = 1, 3 RGB or 4 RGBA) as an RGB image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise PersonalVLMError(f"image array has shape {array.shape}; expected H×W, H×W×3 or H×W×4")
    _check_size(array.shape[1], array.shape[0])
    array = scale_to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[2] == 4:
        return _flatten_alpha(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as an 8-bit RGB image."""
    _check_size(*image.size)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return from_array(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image.convert("RGBA"))
    return image.convert("RGB")


def load_image(source, label: str | None = None) -> Image.Image:
    """Load ``source`` (path, bytes, PIL image or array) as RGB; PersonalVLMError if unusable.

    ``label`` says which of several pictures this is (``images[2]``); it starts every error message.
    """
    try:
        return _load(source)
    except PersonalVLMError as exc:
        if label is None:
            raise
        raise PersonalVLMError(f"{label}: {exc}") from exc


def _load(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise PersonalVLMError("the image data is empty")
        name, data = "the image data", bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PersonalVLMError(f"image file not found: {path}")
        try:
            name, data = str(path), path.read_bytes()
        except OSError as exc:
            raise PersonalVLMError(f"{path} cannot be read ({exc})") from exc
    else:
        raise PersonalVLMError(f"cannot read an image from a {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_size(*opened.size)
            opened.load()
            image = to_rgb(ImageOps.exif_transpose(opened))
            if opened.format in _KEPT_FORMATS:
                image = image if image is not opened else image.copy()
                image.info[ENCODED_INFO] = (data, opened.format)
            return image
    except PersonalVLMError:
        raise
    except UnidentifiedImageError as exc:
        # Pillow's own text names the in-memory buffer it was given ("<_io.BytesIO object at 0x…>"),
        # which tells the user nothing; the source is named instead.
        raise PersonalVLMError(f"{name} is not a readable image (Pillow recognises no image format in it); "
                               "send a PNG or JPEG") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PersonalVLMError(f"{name} is not a readable image ({exc}); send a PNG or JPEG") from exc
