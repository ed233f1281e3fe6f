"""One ``DiagnosticStatus`` a second on ``/diagnostics`` about the frame path and what is loaded."""

from __future__ import annotations

import time

from ..errors import PersonalVLMError

DIAGNOSTICS_PERIOD_S = 1.0
NO_FRAMES_WARNING_S = 5.0      # diagnostics warn when the camera has been silent this long


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
        self._clock = (time.monotonic(), 0, 0)   # (time, received, dropped) at the last report
        self.timer = node.create_timer(DIAGNOSTICS_PERIOD_S, self.publish,
                                       callback_group=MutuallyExclusiveCallbackGroup())

    def destroy(self) -> None:
        self.node.destroy_timer(self.timer)
        self.node.destroy_publisher(self.publisher)

    def publish(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        from std_msgs.msg import Header

        frames, stats = self.frame_path.frames, self.frame_path.stats
        topic = self.frame_path.subscription.topic_name
        now = time.monotonic()
        then, received_before, _ = self._clock
        received, dropped = frames.received, frames.dropped
        self._clock = (now, received, dropped)
        elapsed = max(now - then, 1e-6)
        count, latency, encode = stats.window()
        try:
            concepts = str(len(self.assistant.concepts()))
        except PersonalVLMError as exc:
            concepts = f"unreadable: {exc}"

        latest = frames.latest()
        level, message = DiagnosticStatus.OK, f"processing {count / elapsed:.1f} frames/s"
        if latest is None:
            level, message = DiagnosticStatus.WARN, f"no camera frame on {topic} yet"
        elif now - latest[1] > NO_FRAMES_WARNING_S:
            level, message = DiagnosticStatus.WARN, f"no camera frame on {topic} for {now - latest[1]:.0f} s"
        loaded = self.assistant.describe()
        values = {
            "received_hz": f"{(received - received_before) / elapsed:.2f}",
            "processed_hz": f"{count / elapsed:.2f}",
            "max_rate_hz": f"{self.values['process_rate_hz']:g}",
            "latency_ms": f"{latency * 1000:.1f}",
            "encode_ms": f"{encode * 1000:.1f}",
            "dropped_frames": str(dropped),
            "unreadable_frames": str(stats.unreadable),
            "failed_frames": str(stats.failed),
            "processed_frames": str(stats.processed),
            "concepts": concepts,
            "model": str(self.values["model"]),
            "family": loaded["family"],
            "device": loaded["device"],
            "dtype": loaded["dtype"],
            "encoder_backend": str(self.values["encoder_backend"]),
            "verification": str(bool(self.values["verification"])).lower(),
        }
        status = DiagnosticStatus(level=level, name=f"{self.node.get_name()}: frame path", message=message,
                                  hardware_id=str(self.values["model"]),
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        header = Header(stamp=self.node.get_clock().now().to_msg())
        self.publisher.publish(DiagnosticArray(header=header, status=[status]))
