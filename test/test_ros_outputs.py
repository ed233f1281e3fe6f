"""What the node publishes for other ROS tools, built on known values without a node process:
vision_msgs detections and class map, image markers, the JPEG overlay, the ask action's feedback
text, and the diagnostics' verdicts. The vision_msgs built here must be the Kilted package's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("vision_msgs")

from std_msgs.msg import Header  # noqa: E402

from personal_vlm_node.frames import Detection  # noqa: E402
from personal_vlm_node.ros.diagnostics import ERROR, OK, WARN, FrameWindow, assess  # noqa: E402
from personal_vlm_node.ros.outputs import (ImageMarkers, array_to_compressed_msg, detections_2d_msg,  # noqa: E402
                                           label_info_msg)
from personal_vlm_node.ros.services import AnswerStream  # noqa: E402
from personal_vlm_node.testing.kit import KILTED_VISION_MSGS, pixels  # noqa: E402

def _header(frame_id: str = "camera_optical") -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 41, 500
    return header


def test_every_vision_msgs_type_has_the_kilted_type_hash():
    from ament_index_python.packages import get_package_share_directory

    share = Path(get_package_share_directory("vision_msgs")) / "msg"
    built = {}
    for description in share.glob("*.json"):
        [own, *_] = json.loads(description.read_text(encoding="utf-8"))["type_hashes"]
        built[own["type_name"].rpartition("/")[2]] = own["hash_string"]
    assert built == KILTED_VISION_MSGS


def test_detections_become_vision_msgs_boxes_with_name_score_and_track_id():
    header = _header()
    out = detections_2d_msg(header, [Detection("my mug", "mug", 0.93, "ego", (10.0, 20.0, 30.0, 40.0), 7),
                                      Detection("ネコ", "cat", 1.0000001, "match", (0.0, 0.0, 5.0, 6.0), 0)])
    assert out.header == header
    mug, cat = out.detections
    assert mug.header == header
    assert (mug.bbox.center.position.x, mug.bbox.center.position.y, mug.bbox.center.theta) == (25.0, 40.0, 0.0)
    assert (mug.bbox.size_x, mug.bbox.size_y) == (30.0, 40.0)
    [hypothesis] = mug.results
    assert hypothesis.hypothesis.class_id == "my mug" and hypothesis.hypothesis.score == pytest.approx(0.93)
    assert mug.id == "7"
    assert cat.results[0].hypothesis.class_id == "ネコ"
    assert cat.results[0].hypothesis.score == 1.0 and cat.id == ""     # clamped; untracked
    assert detections_2d_msg(header, []).detections == []


def test_the_class_map_lists_every_name_in_order():
    info = label_info_msg(_header(), ["mug", "Fluffy", "ネコ"])
    assert [(c.class_id, c.class_name) for c in info.class_map] == [(0, "Fluffy"), (1, "mug"), (2, "ネコ")]
    assert info.threshold == 0.0


def test_markers_outline_each_box_and_remove_those_that_vanished():
    from visualization_msgs.msg import ImageMarker

    markers = ImageMarkers(lifetime_s=1.5)
    header = _header()
    [box] = markers.markers(header, [Detection("my mug", "mug", 0.9, "match", (10.0, 20.0, 30.0, 40.0), 3)])
    assert (box.ns, box.id, box.type, box.action) == ("my mug", 3, ImageMarker.POLYGON, ImageMarker.ADD)
    assert box.header == header and box.filled == 0 and box.scale > 0
    assert [(p.x, p.y) for p in box.points] == [(10.0, 20.0), (40.0, 20.0), (40.0, 60.0), (10.0, 60.0)]
    assert (box.lifetime.sec, box.lifetime.nanosec) == (1, 500_000_000)
    assert box.outline_color.a == 1.0
    [gone] = markers.markers(header, [])
    assert (gone.ns, gone.id, gone.action) == ("my mug", 3, ImageMarker.REMOVE)
    assert markers.markers(header, []) == []
    # Boxes that cannot be drawn are left out.
    assert markers.markers(header, [Detection("x", "", 0.5, "match", (1.0, 1.0, 0.0, 4.0), 1)]) == []


def test_the_jpeg_overlay_decodes_to_the_drawn_frame_and_is_far_smaller():
    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.ros.convert import compressed_msg_to_array

    smooth = np.zeros((480, 640, 3), dtype=np.uint8)             # (H, W, 3) a frame JPEG is meant for
    smooth[:, :, 0] = np.linspace(0, 255, 640, dtype=np.uint8)
    smooth[100:300, 200:400] = (20, 200, 40)
    msg = array_to_compressed_msg(smooth, _header(), quality=80)
    assert msg.header.frame_id == "camera_optical" and "jpeg" in msg.format
    back = compressed_msg_to_array(msg)
    assert back.shape == smooth.shape
    assert np.abs(back.astype(int) - smooth.astype(int)).mean() < 3.0
    assert len(msg.data) < smooth.nbytes / 20
    assert len(array_to_compressed_msg(pixels(1), quality=10).data) < len(array_to_compressed_msg(pixels(1),
                                                                                                   quality=95).data)
    with pytest.raises(PersonalVLMError, match="quality"):
        array_to_compressed_msg(smooth, quality=0)


def test_feedback_new_text_concatenates_to_the_answer_and_holds_back_unfinished_characters():
    stream = AnswerStream()
    growing = ["The", "The mug", "The mug is \ufffd", "The mug is 🐈", "The mug is 🐈 on the sofa."]
    sent = [stream.advance(text) for text in growing]
    assert sent == ["The", " mug", " is ", "🐈", " on the sofa."]
    assert stream.advance("The mug is 🐈 on the sofa.", final=True) == ""
    assert "".join(sent) == growing[-1] == stream.sent
    # A final answer with a character still unfinished keeps it: nothing more will come.
    tail = AnswerStream()
    assert tail.advance("ok \ufffd") == "ok " and tail.advance("ok \ufffd", final=True) == "\ufffd"


VALUES = {"process_rate_hz": 2.0, "image_transport": "raw", "verifications_per_second": 2.0}


def _window(**changes) -> FrameWindow:
    fields = dict(seconds=5.0, received_hz=10.0, processed_hz=2.0, failed=0, unreadable=0, unverified=0,
                  camera_silent_s=0.1, idle_s=0.3)
    fields.update(changes)
    return FrameWindow(**fields)


def _assessed(window, values=VALUES, others=0):
    return assess(window, values, "/robot1/image", "/robot1/image/compressed", others)


def test_diagnostics_are_ok_while_the_frame_path_keeps_its_rate():
    assert _assessed(_window()) == []
    assert _assessed(_window(received_hz=1.0, processed_hz=1.0)) == []   # a slow camera is no problem


def test_a_stalled_frame_path_is_an_error_and_a_slow_one_a_warning():
    [(level, text)] = _assessed(_window(processed_hz=0.0, idle_s=12.0))
    assert level == ERROR and "stalled" in text and "12 s" in text
    [(level, text)] = _assessed(_window(processed_hz=0.6))
    assert level == WARN and "0.60 of 2.00 frames/s" in text
    [(level, text)] = _assessed(_window(failed=3))
    assert level == ERROR and "3 frames failed" in text
    [(level, text)] = _assessed(_window(unverified=4))
    assert level == WARN and "verification behind its budget" in text and "4 uncertain matches" in text
    assert _assessed(_window(processed_hz=0.6, seconds=1.0)) == []       # too short a window to judge


def test_a_camera_on_the_other_transport_is_named_in_the_warning():
    [(level, text)] = _assessed(_window(camera_silent_s=None, received_hz=0.0, processed_hz=0.0), others=1)
    assert level == WARN
    assert text == ("no camera frame on /robot1/image yet; /robot1/image/compressed has 1 publisher: "
                    "set image_transport: compressed")
    compressed = dict(VALUES, image_transport="compressed")
    [(level, text)] = assess(_window(camera_silent_s=9.0, received_hz=0.0, processed_hz=0.0), compressed,
                             "/robot1/image/compressed", "/robot1/image", 2)
    assert "for 9 s" in text and "/robot1/image has 2 publishers: set image_transport: raw" in text
    [(level, text)] = _assessed(_window(camera_silent_s=None, received_hz=0.0, processed_hz=0.0))
    assert text == "no camera frame on /robot1/image yet"
    assert OK < WARN < ERROR
