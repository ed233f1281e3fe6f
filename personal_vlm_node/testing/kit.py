"""What the tests and the field test make again and again: pictures, the ROS messages that carry
them, and the command and environment that start the node as its own process.

Every picture is random noise drawn from its seed, so the same ``(seed, width, height)`` is the
same picture in every test and every process. The argument order is always seed, then size.
ROS types are imported only by the functions that build messages, so the rest needs no ROS.
"""

from __future__ import annotations

import io
import os
import sys
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


def node_command(*ros_args: str, lifecycle: bool = False) -> list[str]:
    """The command that starts the node (the managed one with ``lifecycle``) with ``--ros-args
    ros_args``: the installed launcher when this environment has one, as a user starts it, else
    ``python -m``."""
    launcher, module = (("assistant_lifecycle_node", "personal_vlm_node.ros.lifecycle") if lifecycle
                        else ("assistant_node", "personal_vlm_node.ros.node"))
    wrapper = Path(sys.prefix) / "lib" / "personal_vlm_node" / launcher
    head = [str(wrapper)] if wrapper.is_file() else [sys.executable, "-m", module]
    return head + ["--ros-args", *ros_args]


def node_env(**extra: str) -> dict[str, str]:
    """This process's environment for a node or CLI subprocess, with ``extra`` on top. The ROS
    wheels' startup hook marks that it has run; a child that inherits the mark would skip setting
    its own library path. Output is unbuffered, so a log read mid-run is complete."""
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
