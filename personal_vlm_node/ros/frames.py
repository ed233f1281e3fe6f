"""The frame path: camera messages in, one worker running ``Assistant.observe``, detections out.

The camera callback only drops the message into a one-slot holder (:class:`LatestFrame`); one
worker thread takes the newest frame at most ``process_rate_hz`` times a second (frames that arrive
meanwhile replace each other and are counted as dropped).
"""

from __future__ import annotations

import threading
import time
import traceback

from ..errors import PersonalVLMError

WORKER_JOIN_TIMEOUT_S = 3.0


class LatestFrame:
    """A one-slot holder between the camera callback and the worker.

    ``put`` replaces a frame the worker has not taken yet (that one counts as dropped), so the
    worker always sees the newest frame and nothing queues up behind a slow model. The newest frame
    also stays readable after it was taken, for services that work on "the latest camera frame".
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._pending = None        # (msg, monotonic receive time) not yet taken by the worker
        self._latest = None         # the newest (msg, receive time), taken or not
        self.received = 0
        self.dropped = 0

    def put(self, msg, received: float) -> None:
        with self._condition:
            if self._pending is not None:
                self.dropped += 1
            self._pending = self._latest = (msg, received)
            self.received += 1
            self._condition.notify_all()

    def take(self, timeout: float):
        """The pending frame as (msg, receive time), waiting up to ``timeout`` s; None if none came."""
        with self._condition:
            if self._pending is None:
                self._condition.wait(timeout)
            frame, self._pending = self._pending, None
            return frame

    def latest(self):
        with self._condition:
            return self._latest

    def wake(self) -> None:
        with self._condition:
            self._condition.notify_all()


class FrameStats:
    """Counters of the frame path, read once per diagnostics period."""

    def __init__(self):
        self._lock = threading.Lock()
        self.processed = 0
        self.unreadable = 0
        self.failed = 0
        self._latency_sum = self._encode_sum = 0.0
        self._window_count = 0
        self.last_handled: float | None = None   # when the worker last finished a frame (any outcome)

    def add(self, latency: float, encode: float) -> None:
        with self._lock:
            self.last_handled = time.monotonic()
            self.processed += 1
            self._window_count += 1
            self._latency_sum += latency
            self._encode_sum += encode

    def add_unreadable(self) -> None:
        with self._lock:
            self.last_handled = time.monotonic()
            self.unreadable += 1

    def add_failed(self) -> None:
        with self._lock:
            self.last_handled = time.monotonic()
            self.failed += 1

    def window(self) -> tuple[int, float, float]:
        """(frames, mean receive→publish latency s, mean encode s) since the previous call."""
        with self._lock:
            count, latency, encode = self._window_count, self._latency_sum, self._encode_sum
            self._window_count, self._latency_sum, self._encode_sum = 0, 0.0, 0.0
        if count == 0:
            return 0, 0.0, 0.0
        return count, latency / count, encode / count


def camera_topics(node, transport: str) -> tuple[str, str]:
    """(the topic this node reads, the one of the other transport), image_transport style: the base
    name ``image`` is resolved (remapped) first and ``/compressed`` appended to it."""
    base = node.resolve_topic_name("image")
    compressed = base.rstrip("/") + "/compressed"
    return (compressed, base) if transport == "compressed" else (base, compressed)


def _latched_qos():
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


class FramePath:
    """The camera subscription, the detection, marker and overlay publishers, and the worker between them."""

    def __init__(self, node, assistant, values: dict):
        from personal_vlm_interfaces.msg import DetectionArray
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        self.node = node
        self.assistant = assistant
        self.values = values
        self.log = node.get_logger()
        self.frames = LatestFrame()
        self.stats = FrameStats()
        self._period = 1.0 / float(values["process_rate_hz"])
        self._stop = threading.Event()
        # Set when the concepts changed (taught or forgotten here or by another process): the worker
        # then takes the next camera frame as soon as it arrives instead of at its next turn, so a
        # new concept's first detection is not a whole frame period late.
        self._concepts_changed = threading.Event()

        # Sensor-data QoS with depth 1: a camera frame is worth nothing once a newer one exists.
        camera_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                reliability=ReliabilityPolicy.BEST_EFFORT,
                                durability=DurabilityPolicy.VOLATILE)
        compressed = values["image_transport"] == "compressed"
        self.camera_topic, self.other_transport_topic = camera_topics(node, values["image_transport"])
        self.subscription = node.create_subscription(
            CompressedImage if compressed else Image, self.camera_topic, self._on_frame, camera_qos,
            callback_group=MutuallyExclusiveCallbackGroup())
        self.detections_pub = node.create_publisher(DetectionArray, "~/detections", 10)
        self._publishers = [self.detections_pub]
        self.detections_2d_pub = self.label_info_pub = None
        try:
            from vision_msgs.msg import Detection2DArray, LabelInfo
        except ImportError:
            self.log.warning("vision_msgs is not installed, so ~/detections_2d and ~/label_info are off "
                             "(apt install ros-$ROS_DISTRO-vision-msgs, or build interfaces/vision_msgs)")
        else:
            self.detections_2d_pub = node.create_publisher(Detection2DArray, "~/detections_2d", 10)
            self.label_info_pub = node.create_publisher(LabelInfo, "~/label_info", _latched_qos())
            self._publishers += [self.detections_2d_pub, self.label_info_pub]
        self.markers_pub = self.image_markers = None
        try:
            from visualization_msgs.msg import ImageMarker
        except ImportError:
            self.log.warning("visualization_msgs is not installed, so ~/image_markers is off")
        else:
            from .outputs import ImageMarkers

            self.markers_pub = node.create_publisher(ImageMarker, "~/image_markers", 10)
            self.image_markers = ImageMarkers(self.marker_lifetime())
            self._publishers.append(self.markers_pub)
        # Reliable, so that default subscribers (rviz, ros2 topic echo) are compatible.
        self.overlay_pub = node.create_publisher(Image, "~/overlay", 1)
        self.overlay_jpeg_pub = node.create_publisher(CompressedImage, "~/overlay/compressed", 1)
        self._publishers += [self.overlay_pub, self.overlay_jpeg_pub]
        # Called with (frame array, detections, receive time) after each processed frame: the web
        # console's live view, which must return at once.
        self.listeners: list = []
        self.worker = threading.Thread(target=self._run, name="frame-worker", daemon=True)

    def marker_lifetime(self) -> float:
        """How long a marker box stays without news: three frame periods, at least one second."""
        return max(1.0, 3.0 * self._period)

    def start(self) -> None:
        self.assistant.bank_listeners.append(self.concepts_changed)
        self.publish_label_info()
        self.worker.start()

    def concepts_changed(self) -> None:
        """Process the next camera frame as soon as it comes: the concepts it is matched against changed."""
        self._concepts_changed.set()
        self.frames.wake()
        self.publish_label_info()

    def publish_label_info(self) -> None:
        """The latched class map: every taught concept's name."""
        if self.label_info_pub is None:
            return
        from std_msgs.msg import Header

        from .outputs import label_info_msg

        header = Header(stamp=self.node.get_clock().now().to_msg())
        try:
            info = label_info_msg(header, [c.name for c in self.assistant.concepts()])
        except PersonalVLMError as exc:     # an unreadable store, or more names than a LabelInfo holds
            self.log.warning(f"~/label_info not updated: {exc}", throttle_duration_sec=10.0)
            return
        self.label_info_pub.publish(info)

    def set_rate(self, hz: float) -> None:
        """Process at most ``hz`` frames a second from the next frame on."""
        self._period = 1.0 / float(hz)
        if self.image_markers is not None:
            self.image_markers.lifetime_s = self.marker_lifetime()
        self.frames.wake()

    def other_transport_publishers(self) -> int:
        """How many publishers the camera topic of the other transport has (a misconfigured camera)."""
        return self.node.count_publishers(self.other_transport_topic)

    def stop(self) -> None:
        """Stop the worker; it finishes the frame in hand (bounded wait: it is a daemon thread)."""
        if self.concepts_changed in self.assistant.bank_listeners:
            self.assistant.bank_listeners.remove(self.concepts_changed)
        self._stop.set()
        self.frames.wake()
        if self.worker.is_alive():
            self.worker.join(WORKER_JOIN_TIMEOUT_S)

    def destroy(self) -> None:
        self.stop()
        self.node.destroy_subscription(self.subscription)
        for publisher in self._publishers:
            self.node.destroy_publisher(publisher)

    def latest_frame_array(self):
        """The newest camera frame as an array, for requests that work on "the latest camera frame"."""
        from .convert import frame_to_array

        frame = self.frames.latest()
        if frame is None:
            raise PersonalVLMError(
                f"no camera frame has arrived on {self.camera_topic} yet; "
                "send an image with the request or start the camera")
        try:
            return frame_to_array(frame[0])
        except PersonalVLMError as exc:
            raise PersonalVLMError(f"the latest camera frame cannot be used: {exc}") from exc

    def _on_frame(self, msg) -> None:
        self.frames.put(msg, time.monotonic())

    def _run(self) -> None:
        next_start = 0.0
        while not self._stop.is_set():
            rush = self._concepts_changed.is_set()
            wait = next_start - time.monotonic()
            if wait > 0 and not rush:
                self._concepts_changed.wait(min(wait, 0.25))
                continue
            self._concepts_changed.clear()
            frame = self.frames.take(timeout=0.25)   # a new frame: one frame must not count twice
            if frame is None or self._stop.is_set():
                if rush:
                    self._concepts_changed.set()     # still owed: take the next frame as soon as it comes
                continue
            next_start = time.monotonic() + self._period
            try:
                self._process(*frame)
            except Exception:   # a bug on one frame must not end detection for the node's life
                if self._stop.is_set() or not self.node.context.ok():
                    break                       # Ctrl-C: the publishers are gone
                self.stats.add_failed()
                self.log.error(f"frame processing failed:\n{traceback.format_exc()}", throttle_duration_sec=10.0)

    def _process(self, msg, received: float) -> None:
        from personal_vlm_interfaces.msg import DetectionArray

        from .convert import array_to_image_msg, detection_to_msg, draw_overlay, frame_to_array
        from .outputs import array_to_compressed_msg, detections_2d_msg

        try:
            array = frame_to_array(msg)
        except PersonalVLMError as exc:
            self.stats.add_unreadable()
            self.log.warning(f"camera frame skipped: {exc}", throttle_duration_sec=5.0)
            return
        result = self.assistant.observe(array)
        detections = result.detections
        self.detections_pub.publish(
            DetectionArray(header=msg.header, detections=[detection_to_msg(d) for d in detections]))
        if self.detections_2d_pub is not None:
            self.detections_2d_pub.publish(detections_2d_msg(msg.header, detections))
        if self.markers_pub is not None:
            for marker in self.image_markers.markers(msg.header, detections):
                self.markers_pub.publish(marker)
        # The overlay is drawn and encoded only for a transport someone watches.
        raw = self.overlay_pub.get_subscription_count() > 0
        jpeg = self.overlay_jpeg_pub.get_subscription_count() > 0
        if self.values["overlay"] and (raw or jpeg):
            drawn = draw_overlay(array, [(d.name, d.score, d.box, d.source) for d in detections])
            if raw:
                self.overlay_pub.publish(array_to_image_msg(drawn, msg.header))
            if jpeg:
                self.overlay_jpeg_pub.publish(
                    array_to_compressed_msg(drawn, msg.header, self.values["overlay_jpeg_quality"]))
        self.stats.add(time.monotonic() - received, result.timings.get("encode", 0.0))
        for listener in list(self.listeners):
            listener(array, detections, received)
