"""The test kit makes the same picture from the same seed, and messages the node decodes back to it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from personal_vlm_node.testing import kit


def test_a_picture_is_its_seed_and_size():
    assert kit.pixels(3).shape == (kit.HEIGHT, kit.WIDTH, 3) and kit.pixels(3).dtype == np.uint8
    assert np.array_equal(kit.pixels(3, 40, 20), kit.pixels(3, 40, 20))
    assert not np.array_equal(kit.pixels(3, 40, 20), kit.pixels(4, 40, 20))
    assert kit.pixels(5, 40, 20).shape == (20, 40, 3)
    assert np.array_equal(np.asarray(kit.photo(5, 40, 20)), kit.pixels(5, 40, 20))


def test_a_picture_file_holds_the_picture(tmp_path):
    from PIL import Image

    path = kit.photo_file(tmp_path / "p.png", 6, 30, 10)
    assert path == str(tmp_path / "p.png")
    assert np.array_equal(np.asarray(Image.open(path)), kit.pixels(6, 30, 10))


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_an_image_message_decodes_to_its_array_in_the_node(encoding):
    pytest.importorskip("sensor_msgs")
    from personal_vlm_node.ros.convert import image_msg_to_array

    array = kit.pixels(7, 32, 24)
    msg = kit.image_msg(array, encoding)
    assert (msg.width, msg.height, msg.step, msg.encoding) == (32, 24, 96, encoding)
    assert np.array_equal(image_msg_to_array(msg), array)


def test_bgr8_carries_the_channels_reversed():
    pytest.importorskip("sensor_msgs")

    array = kit.pixels(8, 4, 2)
    assert bytes(kit.image_msg(array, "bgr8").data) == np.ascontiguousarray(array[:, :, ::-1]).tobytes()
    with pytest.raises(ValueError, match="rgb8 or bgr8"):
        kit.image_msg(array, "mono8")


def test_a_compressed_message_decodes_to_its_array_in_the_node():
    pytest.importorskip("sensor_msgs")
    from personal_vlm_node.ros.convert import compressed_msg_to_array

    array = kit.pixels(9, 32, 24)
    assert np.array_equal(compressed_msg_to_array(kit.compressed_msg(array)), array)


def test_the_node_command_falls_back_to_python_m_without_a_launcher(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert kit.node_command("-p", "x:=1") == [sys.executable, "-m", "personal_vlm_node.ros.node", "--ros-args",
                                              "-p", "x:=1"]
    assert kit.node_command(lifecycle=True)[:3] == [sys.executable, "-m", "personal_vlm_node.ros.lifecycle"]
    launcher = tmp_path / "lib" / "personal_vlm_node" / "assistant_node"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("")
    assert kit.node_command() == [str(launcher), "--ros-args"]


def test_the_node_environment_drops_the_ros_wheels_mark(monkeypatch):
    monkeypatch.setenv("_ROS_WHEELS_BOOTSTRAP_COMPLETE", "1")
    env = kit.node_env(EXTRA="yes")
    assert "_ROS_WHEELS_BOOTSTRAP_COMPLETE" not in env
    assert env["PYTHONUNBUFFERED"] == "1" and env["EXTRA"] == "yes"
