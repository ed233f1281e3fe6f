"""What the tests and the field test make again and again: pictures and the ROS messages that carry them.

Every picture is random noise drawn from its seed, so the same ``(seed, width, height)`` is the
same picture in every test and every process. The argument order is always seed, then size.
ROS types are imported only by the functions that build messages, so the rest needs no ROS.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 300, 200        # the size of a picture unless a test asks for another


def pixels(seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """(height, width, 3) uint8 RGB noise, the same for the same seed and size."""
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)   # (H, W, 3)


def photo(seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """:func:`pixels` as an RGB PIL image."""
    return Image.fromarray(pixels(seed, width, height))


def photo_file(path: str | Path, seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> str:
    """:func:`photo` saved at ``path`` (the format follows its suffix); returns the path as a string."""
    photo(seed, width, height).save(path)
    return str(path)


def image_msg(array: np.ndarray, encoding: str = "rgb8"):
    """A sensor_msgs/Image of an (H, W, 3) uint8 RGB array in ``encoding`` (rgb8 or bgr8).

    bgr8 carries the channels in reverse order, so the node's decoder must give back ``array``."""
    from sensor_msgs.msg import Image as ImageMsg

    if encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"image_msg builds rgb8 or bgr8, not {encoding!r}")
    data = array[:, :, ::-1] if encoding == "bgr8" else array
    return ImageMsg(height=array.shape[0], width=array.shape[1], encoding=encoding, step=array.shape[1] * 3,
                    data=np.ascontiguousarray(data).tobytes())


def compressed_msg(array: np.ndarray, format: str = "png"):
    """A sensor_msgs/CompressedImage of an (H, W, 3) uint8 RGB array, encoded by Pillow as ``format``."""
    from sensor_msgs.msg import CompressedImage

    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format=format.upper())
    return CompressedImage(format=format, data=encoded.getvalue())
