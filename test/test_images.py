"""Turning what users hand over into RGB pictures: orientation, transparency, errors naming the picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from personal_vlm_node.errors import PersonalVLMError
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


def test_an_unreadable_image_is_named_by_its_source_not_by_a_buffer(tmp_path):
    path = tmp_path / "holiday.png"
    path.write_bytes(b"<html>not a picture</html>")
    cases = [
        (lambda: load_image(str(path)), f"{path} is not a readable image"),
        (lambda: load_image(b"<html>not a picture</html>"), "the image data is not a readable image"),
        (lambda: load_image(b"\x89PNG\r\n\x1a\n" + bytes(20), label="images[1]"),
         "images[1]: the image data is not a readable image"),
    ]
    for load, start in cases:
        with pytest.raises(PersonalVLMError) as refused:
            load()
        message = str(refused.value)
        assert message.startswith(start), message
        assert "object at 0x" not in message and "BytesIO" not in message


def test_a_label_names_which_picture_failed_for_every_kind_of_error():
    with pytest.raises(PersonalVLMError, match=r"^images\[2\]: image array has shape \(4,\)"):
        load_image(np.zeros(4), label="images[2]")
    with pytest.raises(PersonalVLMError, match=r"^images\[0\]: the image data is empty"):
        load_image(b"", label="images[0]")
