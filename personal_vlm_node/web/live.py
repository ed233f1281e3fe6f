"""The frames the console's pages watch: handed over by the frame path, JPEG-encoded only while a
page watches, and the last few kept so that a box drawn on one of them teaches from that frame.
"""

from __future__ import annotations

import io
import json
import math
import struct
import threading
import time
from collections import OrderedDict

from PIL import Image

KEPT_FRAMES = 8          # the frames last sent to the pages, by number (a box is drawn on one of them)
PINNED_FRAMES = 8        # frames held while a box is drawn on them, over all pages (one a page)
JPEG_QUALITY = 80


def detection_rows(detections) -> list[dict]:
    """Detections as the page reads them: name, category, score, source, box (x, y, w, h), track id."""
    rows = []
    for d in detections:
        box = [float(v) for v in d.box]
        if not all(math.isfinite(v) for v in box):
            continue
        score = float(d.score) if math.isfinite(float(d.score)) else 0.0
        rows.append({"name": d.name, "category": d.category, "score": round(score, 4), "source": d.source,
                     "box": [round(v, 1) for v in box], "track_id": int(d.track_id)})
    return rows


def packed_frame(seq: int, array, rows: list[dict], captured: float, quality: int = JPEG_QUALITY) -> bytes:
    """One websocket message for a frame: a 4-byte big-endian header length, the JSON header
    (number, size, detections, when the camera frame arrived), then the JPEG."""
    encoded = io.BytesIO()
    Image.fromarray(array, "RGB").save(encoded, format="JPEG", quality=quality)
    header = json.dumps({"type": "frame", "seq": seq, "width": int(array.shape[1]), "height": int(array.shape[0]),
                         "detections": rows, "captured": captured, "sent": time.time()}).encode()
    return struct.pack(">I", len(header)) + header + encoded.getvalue()


class LiveView:
    """A one-slot holder between the frame worker and the pages, like the camera's own.

    :meth:`offer` costs the frame worker nothing while no page watches, and only a reference to the
    frame while one does: the encoding happens on the console's thread (:meth:`take` then
    :func:`packed_frame`). A frame not yet taken is replaced by a newer one.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = None                         # (seq, array, rows, captured) not yet taken
        self._kept: OrderedDict = OrderedDict()      # seq -> array, the frames last taken
        self._pinned: dict[int, tuple] = {}          # seq -> (array, holders)
        self._seq = 0
        self.watchers = 0                            # pages connected
        self.offered = self.replaced = 0
        self.last_source: dict[str, str] = {}        # concept -> the stage that decided its latest detection
        self.wake = lambda: None                     # called on the frame worker's thread after each offer

    def offer(self, array, detections, received: float) -> None:
        """A processed frame (H×W×3 uint8 RGB) and its detections; ``received``: time.monotonic()
        when the camera frame arrived."""
        if self.watchers <= 0:
            return
        rows = detection_rows(detections)
        captured = time.time() - (time.monotonic() - received)
        with self._lock:
            self._seq += 1
            if self._pending is not None:
                self.replaced += 1
            self._pending = (self._seq, array, rows, captured)
            self.offered += 1
            for row in rows:
                self.last_source[row["name"]] = row["source"]
        self.wake()

    def take(self):
        """The pending frame (seq, array, rows, captured), or None; it is then kept by its number."""
        with self._lock:
            frame, self._pending = self._pending, None
            if frame is not None:
                self._kept[frame[0]] = frame[1]
                while len(self._kept) > KEPT_FRAMES:
                    self._kept.popitem(last=False)
            return frame

    def frame(self, seq):
        """The array of frame ``seq`` if it is still kept or pinned, else None."""
        if not isinstance(seq, int) or isinstance(seq, bool):
            return None
        with self._lock:
            if seq in self._pinned:
                return self._pinned[seq][0]
            return self._kept.get(seq)

    def pin(self, seq) -> bool:
        """Keep frame ``seq`` while a box is drawn on it; False when it is gone already."""
        with self._lock:
            if seq in self._pinned:
                array, holders = self._pinned[seq]
                self._pinned[seq] = (array, holders + 1)
                return True
            array = self._kept.get(seq) if isinstance(seq, int) else None
            if array is None or len(self._pinned) >= PINNED_FRAMES:
                return False
            self._pinned[seq] = (array, 1)
            return True

    def unpin(self, seq) -> None:
        with self._lock:
            if seq in self._pinned:
                array, holders = self._pinned[seq]
                if holders <= 1:
                    del self._pinned[seq]
                else:
                    self._pinned[seq] = (array, holders - 1)

    def forget_concept(self, name: str) -> None:
        with self._lock:
            self.last_source.pop(name, None)
