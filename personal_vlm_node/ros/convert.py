"""sensor_msgs images ⇄ H×W×3 uint8 RGB arrays, ROIs as boxes, detections as messages, and the overlay.

Raw images are read straight from ``msg.data`` with numpy (honouring ``step`` row padding and
``is_bigendian``); compressed ones are decoded with Pillow. Every input a user or a camera driver
can get wrong raises :class:`PersonalVLMError` with a message that names the numbers involved.
"""

from __future__ import annotations

import colorsys
import functools
import math
import zlib

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest

from ..errors import PersonalVLMError
from ..images import MAX_PIXELS, load_image, scale_to_uint8

Box = tuple[float, float, float, float]  # (x, y, w, h) in image pixels
Detection = tuple[str, float, Box, str]  # (name, score, box, source)


# encoding -> (channels, numpy dtype without byte order, channel order of the first three)
_ENCODINGS: dict[str, tuple[int, str, str]] = {
    "rgb8": (3, "u1", "rgb"),
    "bgr8": (3, "u1", "bgr"),
    "rgba8": (4, "u1", "rgb"),
    "bgra8": (4, "u1", "bgr"),
    "mono8": (1, "u1", "mono"),
    "mono16": (1, "u2", "mono"),
    "8UC1": (1, "u1", "mono"),
    "8UC3": (3, "u1", "bgr"),  # OpenCV's default channel order, which is what publishes 8UC3
    "16UC1": (1, "u2", "mono"),
    "32FC1": (1, "f4", "mono"),
}
_ENCODING_BY_LOWER = {name.lower(): name for name in _ENCODINGS}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)


def is_empty_image(msg: Image) -> bool:
    """True for an Image with no pixels and no data: the services' "use the latest camera frame"."""
    return msg.width == 0 and msg.height == 0 and len(msg.data) == 0


def image_msg_to_array(msg: Image) -> np.ndarray:
    """A sensor_msgs/Image as an H×W×3 uint8 RGB array (a copy; ``msg`` is not modified).

    Alpha is dropped rather than composited: camera drivers often leave it 0, which would turn the
    frame black. 16-bit and float images are scaled to 8 bit by their own finite min/max.
    """
    width, height = int(msg.width), int(msg.height)
    if width == 0 or height == 0:
        raise PersonalVLMError(
            f"Image is {width}×{height}; it needs pixels (an Image with width = height = 0 and no data "
            "means 'use the latest camera frame' where a service allows it)")
    if width * height > MAX_PIXELS:
        raise PersonalVLMError(
            f"Image is {width}×{height} = {width * height / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP "
            "limit; downscale it first")
    channels, kind, order = _encoding_layout(msg.encoding)

    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    bytes_per_pixel = channels * dtype.itemsize
    row_bytes = width * bytes_per_pixel
    step = int(msg.step)
    if step < row_bytes:
        raise PersonalVLMError(
            f"Image step {step} is smaller than width × bytes per pixel = {width} × {bytes_per_pixel} = "
            f"{row_bytes} for encoding {_shown(msg.encoding)}; fix the publisher's step")
    raw = np.frombuffer(msg.data, dtype=np.uint8)  # (len(data),) no copy
    if raw.size < step * height:
        raise PersonalVLMError(
            f"Image step/size mismatch: step {step} × height {height} = {step * height} bytes expected, "
            f"but data has {raw.size} bytes")

    # A strided view skips the row padding without copying; unaligned multi-byte reads are fine.
    pixels = np.ndarray(  # (H, W, C) view into msg.data
        (height, width, channels), dtype=dtype, buffer=raw,
        strides=(step, bytes_per_pixel, dtype.itemsize))

    if order == "mono":
        gray = scale_to_uint8(pixels[:, :, 0])  # (H, W)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3), a new array
    channel_slice = slice(0, 3) if order == "rgb" else slice(2, None, -1)
    return np.array(pixels[:, :, channel_slice], dtype=np.uint8, order="C")  # (H, W, 3), copied


def compressed_msg_to_array(msg: CompressedImage) -> np.ndarray:
    """A sensor_msgs/CompressedImage (JPEG or PNG) as an H×W×3 uint8 RGB array."""
    if "compresseddepth" in msg.format.lower().replace(" ", ""):
        raise PersonalVLMError(
            f"CompressedImage format '{_shown(msg.format)}' (compressedDepth) is not supported; "
            "subscribe to the raw depth Image instead")
    if len(msg.data) == 0:
        raise PersonalVLMError("CompressedImage has no data; send a JPEG or PNG")
    try:
        image = load_image(bytes(msg.data))
    except PersonalVLMError as exc:
        raise PersonalVLMError(
            f"CompressedImage (format '{_shown(msg.format)}', {len(msg.data)} bytes) cannot be decoded: {exc}") from exc
    return np.array(image, dtype=np.uint8)  # (H, W, 3), writable


def frame_to_array(msg) -> np.ndarray:
    """A camera message (Image or CompressedImage) as an H×W×3 uint8 RGB array."""
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_array(msg)
    return image_msg_to_array(msg)


def detection_to_msg(detection):
    """An assistant Detection (box x, y, w, h) as a personal_vlm_interfaces/Detection (centre, size)."""
    from personal_vlm_interfaces.msg import Detection as DetectionMsg

    from .outputs import clamped_score

    x, y, w, h = (float(v) for v in detection.box)
    # Detection.msg promises a score in [0, 1].
    return DetectionMsg(name=detection.name, category=detection.category, score=clamped_score(detection.score),
                        source=detection.source, center_x=x + w / 2.0, center_y=y + h / 2.0,
                        size_x=w, size_y=h, track_id=int(detection.track_id))


def array_to_image_msg(array: np.ndarray, header=None, encoding: str = "rgb8") -> Image:
    """An H×W×3 uint8 RGB array as a sensor_msgs/Image in ``encoding`` (rgb8 or bgr8)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PersonalVLMError(
            f"cannot publish an array of shape {array.shape} and dtype {array.dtype}; expected H×W×3 uint8 RGB")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise PersonalVLMError(f"cannot publish an empty image of shape {array.shape}")
    if encoding == "bgr8":
        array = array[:, :, ::-1]
    elif encoding != "rgb8":
        raise PersonalVLMError(f"cannot publish encoding '{encoding}'; use rgb8 or bgr8")

    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    # bytes, not the array: the message setter walks a numpy array element by element (~30× slower).
    msg.data = np.ascontiguousarray(array).tobytes()
    return msg


def roi_to_xywh(roi: RegionOfInterest, width: int, height: int) -> Box | None:
    """The ROI as (x, y, w, h) pixels inside a width×height image; None for the all-zero "no ROI"."""
    x, y, w, h = int(roi.x_offset), int(roi.y_offset), int(roi.width), int(roi.height)
    if x == y == w == h == 0:
        return None
    if w == 0 or h == 0:
        raise PersonalVLMError(
            f"region of interest at ({x}, {y}) is {w}×{h}; give it a width and a height, "
            "or leave all four fields 0 for the whole image")
    if x + w > width or y + h > height:
        raise PersonalVLMError(
            f"region of interest x={x} y={y} {w}×{h} (reaching to {x + w}, {y + h}) is not inside "
            f"the {width}×{height} image")
    return float(x), float(y), float(w), float(h)


def draw_overlay(array: np.ndarray, detections: list[Detection]) -> np.ndarray:
    """A copy of ``array`` (H×W×3 uint8 RGB) with each detection's box and "name 0.87" label drawn.

    The source (match, ego, r2p) is not drawn: the label stays short enough to read on small frames.
    Boxes are clipped to the image; boxes entirely outside it, empty or not finite are skipped.
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PersonalVLMError(
            f"cannot draw on an array of shape {array.shape} and dtype {array.dtype}; expected H×W×3 uint8 RGB")
    height, width = array.shape[:2]
    canvas = PILImage.fromarray(np.ascontiguousarray(array), "RGB")
    draw = ImageDraw.Draw(canvas)
    font = _label_font(max(10, min(width, height) // 40))
    for name, score, box, _source in detections:
        corners = _clipped_corners(box, width, height)
        if corners is None:
            continue
        x0, y0, x1, y1 = corners
        colour = name_colour(name)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)

        label = f"{name} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left + 4, bottom - top + 4
        ty = y0 - text_h if y0 - text_h >= 0 else y0  # above the box when there is room
        tx = min(x0, max(0, width - text_w))
        draw.rectangle((tx, ty, tx + text_w - 1, ty + text_h - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 2 - left, ty + 2 - top), label, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return np.array(canvas, dtype=np.uint8)  # (H, W, 3)


def name_colour(name: str) -> tuple[int, int, int]:
    """A bright RGB colour that depends only on ``name`` (crc32, unlike hash(), is stable across runs)."""
    hue = (zlib.crc32(name.encode("utf-8")) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _shown(text: str, limit: int = 40) -> str:
    """A client's string as it goes into a message: shortened, with control characters escaped."""
    text = text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _encoding_layout(encoding: str) -> tuple[int, str, str]:
    canonical = _ENCODING_BY_LOWER.get(encoding.lower())
    if canonical is not None:
        return _ENCODINGS[canonical]
    supported = ", ".join(SUPPORTED_ENCODINGS)
    if encoding.lower().startswith("bayer"):
        raise PersonalVLMError(
            f"Image encoding '{_shown(encoding)}' (Bayer) is not supported; debayer it first (image_proc) and send "
            f"one of: {supported}")
    raise PersonalVLMError(f"Image encoding '{_shown(encoding)}' is not supported; send one of: {supported}")


def _clipped_corners(box: Box, width: int, height: int) -> tuple[int, int, int, int] | None:
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0 = max(0, round(x)), max(0, round(y))
    x1, y1 = min(width - 1, round(x + w) - 1), min(height - 1, round(y + h) - 1)
    if x0 > x1 or y0 > y1:
        return None
    return x0, y0, x1, y1


@functools.lru_cache(maxsize=8)
def _label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow without FreeType has only the fixed bitmap font
        return ImageFont.load_default()
