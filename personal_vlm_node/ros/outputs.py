"""Detections in the messages other ROS tools read, and the overlay as a JPEG.

- ``vision_msgs/Detection2DArray``: what trackers, annotators and behaviour trees consume (the
  detectors users already run publish it). One ``Detection2D`` per concept: the box in pixels
  (centre + size), ``results[0].hypothesis`` = (concept name, the same score as ``~/detections``),
  ``id`` = the track id ("" when untracked).
- ``vision_msgs/LabelInfo``: the class map, latched. The class ids in the detections are the
  concepts' names themselves, so the map only lists them (number = position in name order); it is
  published again whenever a concept is taught or forgotten.
- ``visualization_msgs/ImageMarker``: one outline box per concept on the camera's header, which
  Foxglove's image panel draws over the camera topic. ``ns`` is the concept's name and ``id`` its
  track id; a box that is gone is removed explicitly, and every box also has a lifetime.
- ``sensor_msgs/CompressedImage`` (JPEG) of the overlay.

Each builder takes plain values (header, detections) and returns messages, so tests check them on
a known frame without a node.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image as PILImage

from ..errors import PersonalVLMError

MARKER_LINE_WIDTH = 2.0           # pixels, as the overlay draws its boxes


def clamped_score(score: float) -> float:
    """A score in [0, 1] (a matcher score of a token with itself can round to 1.0000001)."""
    score = float(score)
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0


def detections_2d_msg(header, detections):
    """``vision_msgs/Detection2DArray`` of the assistant's detections (box x, y, w, h in pixels)."""
    from vision_msgs.msg import (BoundingBox2D, Detection2D, Detection2DArray, ObjectHypothesis,
                                 ObjectHypothesisWithPose, Point2D, Pose2D)

    out = Detection2DArray(header=header)
    for d in detections:
        x, y, w, h = (float(v) for v in d.box)
        hypothesis = ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(class_id=d.name,
                                                                          score=clamped_score(d.score)))
        box = BoundingBox2D(center=Pose2D(position=Point2D(x=x + w / 2.0, y=y + h / 2.0), theta=0.0),
                            size_x=w, size_y=h)
        out.detections.append(Detection2D(header=header, results=[hypothesis], bbox=box,
                                          id=str(d.track_id) if d.track_id else ""))
    return out


def label_info_msg(header, names):
    """``vision_msgs/LabelInfo`` listing ``names`` in sorted order (class_id = position)."""
    from vision_msgs.msg import LabelInfo, VisionClass

    ordered = sorted(names)
    if len(ordered) > 65535:
        raise PersonalVLMError(f"{len(ordered)} concepts do not fit a LabelInfo (at most 65535)")
    # threshold 0: the node's own decision band, not one cut-off score, decides what is reported.
    return LabelInfo(header=header, threshold=0.0,
                     class_map=[VisionClass(class_id=i, class_name=n) for i, n in enumerate(ordered)])


class ImageMarkers:
    """Outline boxes as ``visualization_msgs/ImageMarker`` messages, removing those that vanished."""

    def __init__(self, lifetime_s: float):
        self.lifetime_s = float(lifetime_s)
        self._shown: set[tuple[str, int]] = set()      # (ns, id) of the boxes last published

    def markers(self, header, detections) -> list:
        """The markers for one frame: ADD for every detection, REMOVE for boxes no longer there."""
        from builtin_interfaces.msg import Duration
        from geometry_msgs.msg import Point
        from std_msgs.msg import ColorRGBA
        from visualization_msgs.msg import ImageMarker

        from .convert import name_colour

        seconds = int(self.lifetime_s)
        lifetime = Duration(sec=seconds, nanosec=int((self.lifetime_s - seconds) * 1e9))
        out, shown = [], set()
        for d in detections:
            x, y, w, h = (float(v) for v in d.box)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                continue
            r, g, b = name_colour(d.name)
            key = (d.name, int(d.track_id))
            shown.add(key)
            out.append(ImageMarker(
                header=header, ns=key[0], id=key[1], type=ImageMarker.POLYGON, action=ImageMarker.ADD,
                scale=MARKER_LINE_WIDTH, outline_color=ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=1.0),
                filled=0, lifetime=lifetime,
                points=[Point(x=x, y=y), Point(x=x + w, y=y), Point(x=x + w, y=y + h), Point(x=x, y=y + h)]))
        for ns, marker_id in sorted(self._shown - shown):
            out.append(ImageMarker(header=header, ns=ns, id=marker_id, action=ImageMarker.REMOVE))
        self._shown = shown
        return out


def array_to_compressed_msg(array: np.ndarray, header=None, quality: int = 80):
    """An H×W×3 uint8 RGB array as a JPEG ``sensor_msgs/CompressedImage`` (format "rgb8; jpeg
    compressed bgr8", as image_transport's compressed publisher names a JPEG of a colour image)."""
    from sensor_msgs.msg import CompressedImage

    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape[:2]:
        raise PersonalVLMError(
            f"cannot compress an array of shape {array.shape} and dtype {array.dtype}; expected H×W×3 uint8 RGB")
    if not 1 <= int(quality) <= 100:
        raise PersonalVLMError(f"JPEG quality must lie in [1, 100], got {quality}")
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array), "RGB").save(buffer, format="JPEG", quality=int(quality))
    msg = CompressedImage(format="rgb8; jpeg compressed bgr8")
    if header is not None:
        msg.header = header
    msg.data = buffer.getvalue()      # bytes: the setter walks a numpy array element by element
    return msg
