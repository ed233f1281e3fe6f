"""sensor_msgs images to RGB arrays and back, ROIs and the detection overlay, on real ROS messages."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.ros.convert import (
    SUPPORTED_ENCODINGS,
    array_to_image_msg,
    compressed_msg_to_array,
    draw_overlay,
    image_msg_to_array,
    is_empty_image,
    name_colour,
    roi_to_xywh,
)

# The 2×3 RGB image every hand-made message below encodes.
RGB = np.array([
    [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
    [[10, 20, 30], [200, 100, 50], [255, 255, 255]],
], dtype=np.uint8)  # (H=2, W=3, 3)


def _msg(encoding: str, pixels: np.ndarray, *, bigendian: bool = False, padding: int = 0, step=None) -> Image:
    """An Image holding ``pixels`` (H×W×C or H×W) in ``encoding``, rows padded with ``padding`` bytes."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<"))
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1).view(np.uint8)  # (H, W·bpp)
    if padding:
        rows = np.concatenate([rows, np.full((height, padding), 0xAB, np.uint8)], axis=1)
    msg = Image()
    msg.height, msg.width = height, width
    msg.encoding = encoding
    msg.is_bigendian = int(bigendian)
    msg.step = rows.shape[1] if step is None else step
    msg.data = rows.tobytes()
    return msg


def _error(msg: Image) -> str:
    with pytest.raises(PersonalVLMError) as caught:
        image_msg_to_array(msg)
    return str(caught.value)


# ---- raw encodings -----------------------------------------------------------------------------

def test_rgb8_is_returned_as_is():
    out = image_msg_to_array(_msg("rgb8", RGB))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["bgr8", "8UC3"])
def test_bgr8_and_8uc3_swap_to_rgb(encoding):
    out = image_msg_to_array(_msg(encoding, RGB[:, :, ::-1]))
    np.testing.assert_array_equal(out, RGB)


def test_bgr8_red_pixel_becomes_rgb_red():
    msg = _msg("bgr8", np.array([[[0, 0, 255]]], np.uint8))
    assert image_msg_to_array(msg)[0, 0].tolist() == [255, 0, 0]


def test_rgba8_drops_alpha_even_when_zero():
    alpha = np.array([[0, 128, 255], [255, 0, 7]], np.uint8)[:, :, None]
    out = image_msg_to_array(_msg("rgba8", np.concatenate([RGB, alpha], axis=2)))
    np.testing.assert_array_equal(out, RGB)


def test_bgra8_swaps_and_drops_alpha():
    alpha = np.full((2, 3, 1), 255, np.uint8)
    out = image_msg_to_array(_msg("bgra8", np.concatenate([RGB[:, :, ::-1], alpha], axis=2)))
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8_is_replicated_to_three_channels_unscaled(encoding):
    gray = np.array([[0, 50, 100], [150, 200, 250]], np.uint8)
    out = image_msg_to_array(_msg(encoding, gray))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
def test_16_bit_is_scaled_by_its_own_min_and_max(encoding):
    depth = np.array([[1000, 1255, 1510], [2020, 3040, 1000]], np.uint16)
    out = image_msg_to_array(_msg(encoding, depth))
    expected = np.array([[0, 32, 64], [128, 255, 0]], np.uint8)  # round((v - 1000) / 2040 · 255)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 1], expected)
    np.testing.assert_array_equal(out[:, :, 2], expected)


def test_mono16_big_and_little_endian_give_the_same_pixels():
    depth = np.array([[1, 256, 258], [65535, 0, 4660]], np.uint16)  # high and low bytes both matter
    little = image_msg_to_array(_msg("mono16", depth, bigendian=False))
    big = image_msg_to_array(_msg("mono16", depth, bigendian=True))
    assert bytes(_msg("mono16", depth, bigendian=True).data) != bytes(_msg("mono16", depth).data)
    np.testing.assert_array_equal(little, big)
    assert little[1, 0, 0] == 255 and little[1, 1, 0] == 0


def test_32fc1_ignores_nan_and_inf_when_scaling():
    depth = np.array([[0.5, np.nan, 1.5], [2.5, np.inf, -np.inf]], np.float32)
    out = image_msg_to_array(_msg("32FC1", depth))
    assert out[:, :, 0].tolist() == [[0, 0, 128], [255, 0, 0]]
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_32fc1_big_endian_matches_little_endian():
    depth = np.array([[0.25, 3.0, 1.0], [2.0, 0.0, 4.0]], np.float32)
    little = image_msg_to_array(_msg("32FC1", depth))
    big = image_msg_to_array(_msg("32FC1", depth, bigendian=True))
    np.testing.assert_array_equal(little, big)
    assert little[1, 2, 0] == 255 and little[1, 1, 0] == 0


def test_constant_16_bit_image_is_black_not_an_error():
    out = image_msg_to_array(_msg("mono16", np.full((2, 3), 700, np.uint16)))
    assert out.shape == (2, 3, 3) and not out.any()


def test_all_nan_float_image_is_black():
    out = image_msg_to_array(_msg("32FC1", np.full((2, 3), np.nan, np.float32)))
    assert not out.any()


def test_encoding_names_are_matched_case_insensitively():
    np.testing.assert_array_equal(image_msg_to_array(_msg("RGB8", RGB)), RGB)


@pytest.mark.parametrize("encoding,pixels", [
    ("rgb8", RGB),
    ("bgr8", RGB[:, :, ::-1]),
    ("rgba8", np.concatenate([RGB, np.full((2, 3, 1), 9, np.uint8)], axis=2)),
    ("mono8", RGB[:, :, 0]),
    ("mono16", RGB[:, :, 1].astype(np.uint16) * 300),
    ("32FC1", RGB[:, :, 2].astype(np.float32) / 7),
])
def test_row_padding_gives_the_same_pixels_as_no_padding(encoding, pixels):
    plain = image_msg_to_array(_msg(encoding, pixels))
    padded_msg = _msg(encoding, pixels, padding=5)
    bpp = (pixels.shape[2] if pixels.ndim == 3 else 1) * pixels.dtype.itemsize
    assert padded_msg.step == 3 * bpp + 5
    np.testing.assert_array_equal(image_msg_to_array(padded_msg), plain)


def test_big_endian_16_bit_with_odd_row_padding():
    depth = np.array([[1, 2, 3], [4, 5, 6]], np.uint16)
    plain = image_msg_to_array(_msg("16UC1", depth))
    padded = image_msg_to_array(_msg("16UC1", depth, bigendian=True, padding=3))
    np.testing.assert_array_equal(padded, plain)


def test_extra_trailing_data_is_ignored():
    msg = _msg("rgb8", RGB)
    msg.data = bytes(msg.data) + b"\x01\x02\x03"
    np.testing.assert_array_equal(image_msg_to_array(msg), RGB)


def test_result_is_a_writable_copy_that_does_not_alias_the_message():
    msg = _msg("rgb8", RGB)
    out = image_msg_to_array(msg)
    out[0, 0] = (1, 2, 3)
    assert bytes(msg.data[:3]) == bytes([255, 0, 0])


def test_full_hd_rgb8_message_converts_to_the_right_shape():
    frame = np.zeros((1080, 1920, 3), np.uint8)
    frame[540, 960] = (1, 2, 3)
    out = image_msg_to_array(array_to_image_msg(frame))
    assert out.shape == (1080, 1920, 3)
    assert out[540, 960].tolist() == [1, 2, 3]


# ---- raw errors --------------------------------------------------------------------------------

def test_zero_width_is_rejected():
    msg = _msg("rgb8", RGB)
    msg.width = 0
    assert "0×2" in _error(msg)


def test_zero_height_is_rejected():
    msg = _msg("rgb8", RGB)
    msg.height = 0
    assert "3×0" in _error(msg)


def test_unknown_encoding_lists_the_supported_ones():
    message = _error(_msg("yuv422", RGB[:, :, :2]))
    assert "yuv422" in message
    for encoding in SUPPORTED_ENCODINGS:
        assert encoding in message


def test_bayer_is_rejected_with_a_hint_and_the_supported_list():
    message = _error(_msg("bayer_rggb8", RGB[:, :, 0]))
    assert "bayer_rggb8" in message and "Bayer" in message
    assert "rgb8" in message and "32FC1" in message


def test_step_smaller_than_a_row_is_rejected_with_the_numbers():
    message = _error(_msg("rgb8", RGB, step=8))
    assert "step 8" in message and "9" in message


def test_short_data_reports_a_step_size_mismatch_with_the_numbers():
    msg = _msg("rgb8", RGB, padding=5)  # step 14, needs 28 bytes
    msg.data = bytes(msg.data)[:27]
    message = _error(msg)
    assert "step/size mismatch" in message
    assert "14" in message and "28" in message and "27" in message


def test_step_too_large_for_the_data_is_a_size_mismatch():
    message = _error(_msg("rgb8", RGB, step=100))
    assert "step/size mismatch" in message and "200" in message and "18" in message


def test_more_than_64_megapixels_is_rejected_before_reading_data():
    msg = Image()
    msg.width, msg.height, msg.encoding, msg.step = 9000, 8000, "mono8", 9000
    message = _error(msg)
    assert "9000×8000" in message and "MP" in message


def test_empty_image_means_latest_frame():
    assert is_empty_image(Image())
    assert not is_empty_image(_msg("rgb8", RGB))
    sizeless_with_data = Image()
    sizeless_with_data.data = b"\x00"
    assert not is_empty_image(sizeless_with_data)


def test_empty_image_is_rejected_by_the_converter():
    assert "0×0" in _error(Image())


# ---- compressed --------------------------------------------------------------------------------

def _compressed(pixels: np.ndarray, fmt: str, **save) -> CompressedImage:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format=fmt, **save)
    msg = CompressedImage()
    msg.format = fmt.lower()
    msg.data = buffer.getvalue()
    return msg


def test_compressed_png_decodes_exactly():
    out = compressed_msg_to_array(_compressed(RGB, "PNG"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, RGB)


def test_compressed_jpeg_decodes_approximately():
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[:, :24] = (200, 40, 40)
    smooth[:, 24:] = (30, 60, 220)
    out = compressed_msg_to_array(_compressed(smooth, "JPEG", quality=95))
    assert out.shape == (32, 48, 3)
    assert np.abs(out[8:24, 4:18].astype(int) - (200, 40, 40)).max() <= 6
    assert np.abs(out[8:24, 30:44].astype(int) - (30, 60, 220)).max() <= 6


def test_compressed_grayscale_png_becomes_rgb():
    gray = np.array([[0, 128, 255]], np.uint8)
    out = compressed_msg_to_array(_compressed(gray, "PNG"))
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255] and out[0, :, 2].tolist() == [0, 128, 255]


def test_corrupt_compressed_data_is_an_error():
    msg = CompressedImage()
    msg.format = "jpeg"
    msg.data = b"\xff\xd8\xff\xe0 this is not a jpeg"
    with pytest.raises(PersonalVLMError, match="cannot be decoded"):
        compressed_msg_to_array(msg)


def test_truncated_jpeg_is_an_error():
    msg = _compressed(np.full((64, 64, 3), 90, np.uint8), "JPEG")
    msg.data = bytes(msg.data)[: len(msg.data) // 2]
    with pytest.raises(PersonalVLMError):
        compressed_msg_to_array(msg)


def test_empty_compressed_data_is_an_error():
    msg = CompressedImage()
    msg.format = "jpeg"
    with pytest.raises(PersonalVLMError, match="no data"):
        compressed_msg_to_array(msg)


def test_compressed_depth_is_rejected_by_name():
    msg = _compressed(RGB, "PNG")
    msg.format = "16UC1; compressedDepth png"
    with pytest.raises(PersonalVLMError, match="compressedDepth"):
        compressed_msg_to_array(msg)


# ---- publishing --------------------------------------------------------------------------------

def test_array_to_image_msg_round_trips_exactly():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    header = Header(frame_id="camera_optical")
    header.stamp.sec = 42
    msg = array_to_image_msg(frame, header=header)
    assert (msg.height, msg.width, msg.step, msg.encoding, msg.is_bigendian) == (5, 7, 21, "rgb8", 0)
    assert msg.header.frame_id == "camera_optical" and msg.header.stamp.sec == 42
    np.testing.assert_array_equal(image_msg_to_array(msg), frame)


def test_array_to_image_msg_bgr8_round_trips_to_the_same_rgb():
    msg = array_to_image_msg(RGB, encoding="bgr8")
    assert msg.encoding == "bgr8" and list(msg.data[:3]) == [0, 0, 255]
    np.testing.assert_array_equal(image_msg_to_array(msg), RGB)


def test_array_to_image_msg_assigns_bytes_not_a_numpy_array(monkeypatch):
    original = Image.data
    assigned = []

    def record(self, value):
        assigned.append(type(value))
        original.fset(self, value)

    monkeypatch.setattr(Image, "data", property(original.fget, record))
    array_to_image_msg(RGB)
    # The message's own constructor assigns an empty array('B') first; the pixels come as bytes.
    assert assigned[-1] is bytes
    assert np.ndarray not in assigned


def test_array_to_image_msg_accepts_a_non_contiguous_view():
    wide = np.zeros((2, 6, 3), np.uint8)
    wide[:, ::2] = RGB
    np.testing.assert_array_equal(image_msg_to_array(array_to_image_msg(wide[:, ::2])), RGB)


@pytest.mark.parametrize("array", [
    np.zeros((2, 3), np.uint8),
    np.zeros((2, 3, 4), np.uint8),
    np.zeros((2, 3, 3), np.float32),
    np.zeros((0, 3, 3), np.uint8),
])
def test_array_to_image_msg_rejects_non_rgb_arrays(array):
    with pytest.raises(PersonalVLMError):
        array_to_image_msg(array)


def test_array_to_image_msg_rejects_unknown_encoding():
    with pytest.raises(PersonalVLMError, match="mono8"):
        array_to_image_msg(RGB, encoding="mono8")


# ---- regions of interest -----------------------------------------------------------------------

def _roi(x: int, y: int, w: int, h: int) -> RegionOfInterest:
    return RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h)


def test_all_zero_roi_means_no_roi():
    assert roi_to_xywh(RegionOfInterest(), 640, 480) is None


def test_roi_becomes_xywh_pixels():
    assert roi_to_xywh(_roi(10, 20, 100, 50), 640, 480) == (10.0, 20.0, 100.0, 50.0)


def test_roi_touching_the_far_corner_is_inside():
    assert roi_to_xywh(_roi(540, 380, 100, 100), 640, 480) == (540.0, 380.0, 100.0, 100.0)


@pytest.mark.parametrize("roi", [_roi(10, 20, 0, 50), _roi(10, 20, 100, 0), _roi(5, 0, 0, 0)])
def test_roi_with_zero_width_or_height_is_rejected(roi):
    with pytest.raises(PersonalVLMError, match="width and a height"):
        roi_to_xywh(roi, 640, 480)


@pytest.mark.parametrize("roi", [_roi(600, 0, 41, 10), _roi(0, 400, 10, 81), _roi(700, 500, 1, 1)])
def test_roi_outside_the_image_is_rejected_with_the_sizes(roi):
    with pytest.raises(PersonalVLMError) as caught:
        roi_to_xywh(roi, 640, 480)
    message = str(caught.value)
    assert "640×480" in message and f"{roi.width}×{roi.height}" in message


# ---- overlay -----------------------------------------------------------------------------------

def test_overlay_draws_the_box_edge_and_leaves_far_pixels_untouched():
    frame = np.full((120, 160, 3), 40, np.uint8)
    out = draw_overlay(frame, [("mug", 0.87, (60.0, 50.0, 40.0, 30.0), "match")])
    colour = list(name_colour("mug"))
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert out[65, 60].tolist() == colour  # left edge
    assert out[65, 61].tolist() == colour  # 2 px wide
    assert out[79, 80].tolist() == colour  # bottom edge
    assert out[65, 80].tolist() == [40, 40, 40]  # inside the box
    assert out[115, 5].tolist() == [40, 40, 40]  # far away
    assert (out[38:50, 60:100] != 40).any()  # the label sits above the box
    assert (frame == 40).all()  # the input is not modified


def test_overlay_colour_is_stable_per_name_and_differs_between_names():
    assert name_colour("mug") == name_colour("mug")
    assert name_colour("mug") != name_colour("keys")


def test_overlay_label_is_drawn_inside_when_the_box_touches_the_top():
    frame = np.zeros((100, 200, 3), np.uint8)
    out = draw_overlay(frame, [("keys", 0.5, (20.0, 0.0, 100.0, 60.0), "ego")])
    assert (out[3:10, 25:60] != 0).any()


def test_overlay_clips_boxes_partly_outside_the_image():
    frame = np.zeros((50, 60, 3), np.uint8)
    out = draw_overlay(frame, [("cat", 0.9, (-20.0, 30.0, 50.0, 100.0), "r2p")])
    colour = list(name_colour("cat"))
    assert out[40, 0].tolist() == colour  # left edge clipped to column 0
    assert out[49, 10].tolist() == colour  # bottom edge clipped to the last row
    assert out[40, 29].tolist() == colour  # right edge (x + w − 1 = 29) is inside


@pytest.mark.parametrize("box", [
    (500.0, 500.0, 20.0, 20.0),
    (-100.0, -100.0, 20.0, 20.0),
    (10.0, 10.0, 0.0, 5.0),
    (10.0, 10.0, -5.0, 5.0),
    (float("nan"), 0.0, 5.0, 5.0),
    (0.0, 0.0, float("inf"), 5.0),
])
def test_overlay_skips_boxes_it_cannot_draw_without_crashing(box):
    frame = np.full((30, 40, 3), 7, np.uint8)
    out = draw_overlay(frame, [("ghost", 0.1, box, "match")])
    np.testing.assert_array_equal(out, frame)


def test_overlay_with_no_detections_is_an_equal_copy():
    out = draw_overlay(RGB, [])
    np.testing.assert_array_equal(out, RGB)
    assert out is not RGB


def test_overlay_rejects_a_non_rgb_array():
    with pytest.raises(PersonalVLMError):
        draw_overlay(np.zeros((4, 4), np.uint8), [])


def test_a_long_rejected_encoding_is_shortened_in_the_message():
    msg = Image(height=2, width=2, encoding="x" * 5000, step=6, data=bytes(12))
    with pytest.raises(PersonalVLMError) as caught:
        image_msg_to_array(msg)
    assert len(str(caught.value)) < 400
    assert "5000 characters" in str(caught.value)


def test_control_characters_of_a_rejected_encoding_are_escaped():
    msg = Image(height=2, width=2, encoding="rgb\x1b[31m", step=6, data=bytes(12))
    with pytest.raises(PersonalVLMError) as caught:
        image_msg_to_array(msg)
    assert "\x1b" not in str(caught.value)
