"""One ``DiagnosticStatus`` a second on ``/diagnostics`` about the frame path and what is loaded.

The status is named ``<fully qualified node name>: frame path`` (``/robot1/personal_vlm_node: frame
path``), so an aggregator tells robots apart, and its ``hardware_id`` names the device and the model.
Rates are measured over the last :data:`RATE_WINDOW_S` seconds (or four frame periods, if longer).
Its level is the worst of:

- ERROR: frames arrive but the worker finished none for :data:`STALL_S` s (or three periods), or frames
  failed (a bug, logged) in the window;
- WARN: the model profile is being calibrated ("calibrating (n/N, about … left)": the profile's
  default values are in use meanwhile) or its automatic calibration failed (why); no camera frame yet, or none for :data:`NO_FRAMES_WARNING_S` s (naming the topic of the
  other transport when that one has publishers); fewer frames processed than the rate limit
  allows by more than :data:`SHORTFALL_WARNING` (frames dropped beyond the limit: the model is
  slower than ``process_rate_hz``); uncertain matches dropped unverified (verification behind its
  budget); camera frames that could not be read; the fleet library cannot be reached (the node
  recognises from its offline copy and refuses teaching: key ``library`` says since when and why).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from ..errors import PersonalVLMError

DIAGNOSTICS_PERIOD_S = 1.0
NO_FRAMES_WARNING_S = 5.0      # diagnostics warn when the camera has been silent this long
RATE_WINDOW_S = 5.0            # rates and counts over the last seconds
STALL_S = 5.0                  # frames arrive, none processed this long: the frame path stalled
SHORTFALL_WARNING = 0.5        # processed below half of min(camera rate, process_rate_hz): WARN
OK, WARN, ERROR = 0, 1, 2      # diagnostic_msgs/DiagnosticStatus levels


@dataclass(frozen=True)
class FrameWindow:
    """What the frame path did over the last window."""

    seconds: float                  # the window's length
    received_hz: float
    processed_hz: float
    failed: int                     # frames whose processing raised
    unreadable: int                 # frames that did not decode
    unverified: int                 # uncertain matches evicted from the verification queue unverified
    camera_silent_s: float | None   # since the newest camera frame; None: none came yet
    idle_s: float                   # since the worker last finished a frame (or the window's start)


def assess(window: FrameWindow, values: dict, topic: str, other_topic: str,
           other_publishers: int) -> list[tuple[int, str]]:
    """The problems of the frame path as (level, text), in the order they are told."""
    max_rate = float(values["process_rate_hz"])
    problems: list[tuple[int, str]] = []
    silent = window.camera_silent_s
    if silent is None or silent > NO_FRAMES_WARNING_S:
        text = f"no camera frame on {topic} " + ("yet" if silent is None else f"for {silent:.0f} s")
        if other_publishers:
            other = "raw" if values["image_transport"] == "compressed" else "compressed"
            text += (f"; {other_topic} has {other_publishers} publisher{'s' * (other_publishers > 1)}: "
                     f"set image_transport: {other}")
        problems.append((WARN, text))
    if window.received_hz > 0 and window.idle_s > max(STALL_S, 3.0 / max_rate):
        problems.append((ERROR, f"frame path stalled: no frame processed for {window.idle_s:.0f} s "
                                f"while the camera sends {window.received_hz:.1f} frames/s"))
    elif window.seconds >= 0.8 * RATE_WINDOW_S:
        wanted = min(window.received_hz, max_rate)
        if wanted > 0 and window.processed_hz < (1.0 - SHORTFALL_WARNING) * wanted:
            problems.append((WARN, f"dropping frames beyond the rate limit: processing {window.processed_hz:.2f} "
                                   f"of {wanted:.2f} frames/s (the model is slower than process_rate_hz "
                                   f"{max_rate:g})"))
    if window.failed:
        problems.append((ERROR, f"{window.failed} frames failed in the last {window.seconds:.0f} s (see the log)"))
    if window.unreadable:
        problems.append((WARN, f"{window.unreadable} camera frames could not be read in the last "
                               f"{window.seconds:.0f} s (see the log)"))
    if window.unverified:
        problems.append((WARN, f"verification behind its budget: {window.unverified} uncertain matches dropped "
                               f"unverified in the last {window.seconds:.0f} s (verifications_per_second "
                               f"{float(values['verifications_per_second']):g})"))
    return problems


class Diagnostics:
    """Publishes the frame path's rates, latencies and counters, and the model it runs."""

    def __init__(self, node, assistant, values: dict, frame_path):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

        self.node = node
        self.assistant = assistant
        self.values = values
        self.frame_path = frame_path
        self.publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.latest = None          # the status last published (the web console shows it)
        self._snapshots: collections.deque = collections.deque()
        self._snapshots.append(self._snapshot(time.monotonic()))
        self.timer = node.create_timer(DIAGNOSTICS_PERIOD_S, self.publish,
                                       callback_group=MutuallyExclusiveCallbackGroup())

    def destroy(self) -> None:
        self.node.destroy_timer(self.timer)
        self.node.destroy_publisher(self.publisher)

    def name(self) -> str:
        return f"{self.node.get_fully_qualified_name()}: frame path"

    def _snapshot(self, now: float) -> dict:
        frames, stats = self.frame_path.frames, self.frame_path.stats
        queue = self.assistant.verifier
        return {"time": now, "received": frames.received, "dropped": frames.dropped,
                "processed": stats.processed, "failed": stats.failed, "unreadable": stats.unreadable,
                "unverified": queue.stats["dropped"] if queue is not None else 0}

    def _window(self, now: float) -> tuple[dict, dict]:
        """(the snapshot at the window's start, now's), keeping the snapshots the window needs."""
        current = self._snapshot(now)
        self._snapshots.append(current)
        span = max(RATE_WINDOW_S, 4.0 / float(self.values["process_rate_hz"]))
        while len(self._snapshots) > 2 and now - self._snapshots[1]["time"] >= span:
            self._snapshots.popleft()
        return self._snapshots[0], current

    def status(self, now: float | None = None):
        """The DiagnosticStatus now (also what :meth:`publish` sends)."""
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        now = time.monotonic() if now is None else now
        path, frames, stats = self.frame_path, self.frame_path.frames, self.frame_path.stats
        first, last = self._window(now)
        elapsed = max(now - first["time"], 1e-6)
        rate = {k: (last[k] - first[k]) / elapsed for k in ("received", "processed")}
        window = {k: last[k] - first[k] for k in ("failed", "unreadable", "unverified")}
        count, latency, encode = stats.window()
        try:
            concepts = str(len(self.assistant.concepts()))
        except PersonalVLMError as exc:
            concepts = f"unreadable: {exc}"

        latest = frames.latest()
        last_handled = stats.last_handled if stats.last_handled is not None else first["time"]
        others = 0
        if latest is None or now - latest[1] > NO_FRAMES_WARNING_S:
            others = path.other_transport_publishers()
        problems = assess(
            FrameWindow(seconds=elapsed, received_hz=rate["received"], processed_hz=rate["processed"],
                        failed=window["failed"], unverified=window["unverified"],
                        camera_silent_s=None if latest is None else now - latest[1],
                        unreadable=window["unreadable"], idle_s=now - last_handled),
            self.values, path.camera_topic, path.other_transport_topic, others)
        calibration = self.assistant.calibration_status()
        if calibration["state"] in ("calibrating", "failed"):
            problems.append((WARN, calibration["text"]))
        store = self.assistant.store.location()
        library = self.assistant.store.health()
        if library is not None:
            problems.append((WARN, f"concept library {library}"))
        max_rate = float(self.values["process_rate_hz"])
        level = max((lvl for lvl, _ in problems), default=OK)
        message = "; ".join(text for lvl, text in problems if lvl == level) if problems else \
            f"processing {rate['processed']:.1f} frames/s"

        loaded = self.assistant.describe()
        values = {
            "received_hz": f"{rate['received']:.2f}",
            "processed_hz": f"{rate['processed']:.2f}",
            "max_rate_hz": f"{max_rate:g}",
            "latency_ms": f"{latency * 1000:.1f}",
            "encode_ms": f"{encode * 1000:.1f}",
            "dropped_frames": str(frames.dropped),
            "unreadable_frames": str(stats.unreadable),
            "failed_frames": str(stats.failed),
            "processed_frames": str(stats.processed),
            "unverified_matches": str(last["unverified"]),
            "frames_in_last_report": str(count),
            "camera_topic": path.camera_topic,
            "concepts": concepts,
            "model": str(self.values["model"]),
            "family": loaded["family"],
            "device": loaded["device"],
            "dtype": loaded["dtype"],
            "encoder_backend": str(self.values["encoder_backend"]),
            "verification": str(bool(self.values["verification"])).lower(),
            "calibration": calibration["text"],
            "store": store,
            "library": (library or "connected") if "://" in store else "local",
            "recognition_method": self.assistant.recognition_status(),
        }
        return DiagnosticStatus(level=bytes([level]), name=self.name(), message=message,
                                hardware_id=f"{loaded['device']} / {self.values['model']}",
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def publish(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from std_msgs.msg import Header

        status = self.latest = self.status()
        header = Header(stamp=self.node.get_clock().now().to_msg())
        self.publisher.publish(DiagnosticArray(header=header, status=[status]))
