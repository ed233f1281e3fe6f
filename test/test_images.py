"""Turning what users hand over into RGB pictures: orientation, transparency."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from personal_vlm_node.images import load_image


def _portrait_photo_as_a_phone_stores_it() -> bytes:
    # The sensor writes a landscape 40×20 image; EXIF orientation 6 says "rotate 90° clockwise to view".
    sensor = np.zeros((20, 40, 3), np.uint8)
    sensor[:, :20] = (255, 0, 0)                         # left half red in the sensor's frame
    image = Image.fromarray(sensor)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def test_exif_orientation_is_applied_from_bytes_and_files(tmp_path):
    data = _portrait_photo_as_a_phone_stores_it()
    path = tmp_path / "portrait.jpg"
    path.write_bytes(data)
    for source in (data, str(path)):
        image = load_image(source)
        assert image.size == (20, 40)                    # portrait, as the user sees it
        top = np.asarray(image)[2, 10]
        assert top[0] > 200 and top[1] < 60              # the sensor's left half is now on top


def test_transparent_pixels_become_white_like_the_processors():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    array = np.zeros((4, 4, 4), np.uint8)
    assert load_image(array).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert load_image(opaque).getpixel((0, 0)) == (10, 20, 30)
