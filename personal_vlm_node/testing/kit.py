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

# The type hashes of vision_msgs 4.1.1, the release in ROS 2 Kilted: computed by rosidl (RIHS01)
# from that release's message files (ros-perception/vision_msgs, tag 4.1.1) against the Kilted
# std_msgs and geometry_msgs. A subscriber built from the distribution's vision_msgs matches only a
# publisher whose type hash is the same.
KILTED_VISION_MSGS = {
    "BoundingBox2D": "RIHS01_008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f",
    "BoundingBox2DArray": "RIHS01_2464e82838009386d371b523211c21c91d74d313fcdd6788223c531d621cf691",
    "BoundingBox3D": "RIHS01_bbb73a65c163d7f9bb29009c7bde9f7faa576bd2d23299c4511d19230dab4698",
    "BoundingBox3DArray": "RIHS01_a81938db9576b10c2eecd7c5a5da3eac496efd00221b25ed051dfbc81fb56da6",
    "Classification": "RIHS01_f74db28d0eaef3afb78f48bf2161cd709a1383a0309d3454383b25be11345143",
    "Detection2D": "RIHS01_0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea",
    "Detection2DArray": "RIHS01_214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
    "Detection3D": "RIHS01_ddd703be132ab0b69d33121f1bb034132bfbb3b0ac5f9fb1516005ba1c8a265b",
    "Detection3DArray": "RIHS01_793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018",
    "LabelInfo": "RIHS01_3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783",
    "ObjectHypothesis": "RIHS01_51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90",
    "ObjectHypothesisWithPose": "RIHS01_41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc",
    "Point2D": "RIHS01_eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247",
    "Pose2D": "RIHS01_b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648",
    "VisionClass": "RIHS01_1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a",
    "VisionInfo": "RIHS01_95d3116a17484ad91c9a2686e1d54890bbfc3ff6c6a2de137738c4950d45d284",
}


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


def params_file(path: str | Path, values: dict) -> Path:
    """A ROS parameters file at ``path`` that gives ``values`` to the node in any namespace.
    A test node does not calibrate its random-weight model unless ``values`` say ``auto_calibrate``."""
    import json

    values = {"auto_calibrate": False, **values}
    lines = ["/**:", "  ros__parameters:"] + [f"    {k}: {json.dumps(v)}" for k, v in values.items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def start_node(params: Path, namespace: str, log: Path, timeout: float = 300.0):
    """The node as its own process with ``params`` in ``namespace``, its output in ``log``,
    returned once it is ready; RuntimeError with the log's end if it exits or times out first."""
    import subprocess
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(node_command("--params-file", str(params), "-r", f"__ns:={namespace}"),
                                stdout=out, stderr=subprocess.STDOUT, env=node_env())
    deadline = time.monotonic() + timeout
    while "ready:" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the node did not become ready:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return proc


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
