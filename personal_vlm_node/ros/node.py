"""The ROS 2 node: a thin adapter over :class:`personal_vlm_node.assistant.Assistant`.

Run it with ``ros2 run personal_vlm_node assistant_node --ros-args --params-file config/assistant.yaml``
or ``ros2 launch personal_vlm_node assistant.launch.py``. Parameters are declared with descriptions
and ranges; their defaults live in ``config/assistant.yaml``.

Topics and services (names relative to the node's namespace):

- ``image`` (in): ``sensor_msgs/Image``, or ``sensor_msgs/CompressedImage`` on the same name when
  ``compressed`` is true. Sensor-data QoS, depth 1.
- ``~/detections`` (out): ``DetectionArray`` for every processed frame, empty ones included, with
  the camera image's header.
- ``~/overlay`` (out): the processed frame with the detections drawn, while someone subscribes.
- ``/diagnostics`` (out): one ``DiagnosticStatus`` per second about the frame path.
- ``teach_concept``, ``ask``, ``list_concepts``, ``forget_concept``: the services.

Threads: the camera callback only drops the message into a one-slot holder; one worker thread
takes the newest frame at most ``process_rate_hz`` times a second and runs
``Assistant.observe`` (frames that arrive meanwhile replace each other and are counted as dropped).
Each service has its own callback group in a multi-threaded executor, so a slow teach or ask never
holds up the camera callback, the worker or another service.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from ..errors import PersonalVLMError
from ..options import DEFAULT_MODEL, ENCODER_CHOICES, DTYPES, AssistantOptions, check_thresholds

NODE_NAME = "personal_vlm"


@dataclass(frozen=True)
class Param:
    default: object
    description: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None


PARAMETERS: dict[str, Param] = {
    "model": Param(DEFAULT_MODEL, "Hugging Face model id or local checkpoint folder"),
    "device": Param("auto", "auto, cpu, cuda or cuda:N"),
    "dtype": Param("auto", "weight precision", DTYPES),
    "store_dir": Param("", "concept store folder; empty = $XDG_DATA_HOME/personal_vlm"),
    "profile": Param("", "model profile YAML; empty = models/<model>.yaml or the defaults"),
    "encoder_backend": Param("torch", "vision encoder on the frame path", ENCODER_CHOICES),
    "engine_cache_dir": Param("", "cache for exported ONNX files and TensorRT engines"),
    "process_rate_hz": Param(2.0, "most camera frames processed per second", low=0.01, high=120.0),
    "accept_threshold": Param(-1.0, "match score that detects without verification; <0 = profile", low=-1.0, high=1.0),
    "reject_threshold": Param(-1.0, "match score that rejects without verification; <0 = profile", low=-1.0, high=1.0),
    "max_concepts_in_context": Param(5, "most memories in one /ask prompt", low=0, high=64),
    "verification": Param(True, "settle uncertain matches with the model"),
    "overlay": Param(True, "publish ~/overlay while someone subscribes"),
    "compressed": Param(False, "subscribe to sensor_msgs/CompressedImage instead of Image"),
    "verifier_model": Param("", "CLIP/SigLIP id or folder for R2P's image-text scores; empty = the VLM's yes/no"),
    "r2p_margin": Param(0.15, "Ego p(yes) this close to its threshold is settled by R2P; 0 = never", low=0.0, high=0.5),
}

DIAGNOSTICS_PERIOD_S = 1.0
NO_FRAMES_WARNING_S = 5.0      # diagnostics warn when the camera has been silent this long
WORKER_JOIN_TIMEOUT_S = 3.0


def check_value(name: str, value) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is."""
    spec = PARAMETERS[name]
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}"
    if spec.low is not None and not spec.low <= float(value) <= spec.high:
        return f"{name} must lie in [{spec.low:g}, {spec.high:g}]"
    if name == "model" and not str(value).strip():
        return "model must name a Hugging Face id or a local folder"
    return None


def _declare(node) -> None:
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    for name, spec in PARAMETERS.items():
        descriptor = ParameterDescriptor(description=spec.description)
        if spec.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
        if spec.low is not None and isinstance(spec.default, float):
            descriptor.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
        elif spec.low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
        try:
            node.declare_parameter(name, spec.default, descriptor)
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise PersonalVLMError(f"invalid parameter {name}: {exc}") from exc


def _values(node) -> dict:
    values = {name: node.get_parameter(name).value for name in PARAMETERS}
    problems = [p for p in (check_value(n, v) for n, v in values.items()) if p]
    if not problems and values["accept_threshold"] >= 0 and values["reject_threshold"] >= 0:
        problem = check_thresholds(values["accept_threshold"], values["reject_threshold"])
        if problem:
            problems.append(f"{problem}; a negative value keeps the model profile's")
    if problems:
        raise PersonalVLMError("invalid parameters: " + "; ".join(problems))
    return values


def assistant_options(values: dict) -> AssistantOptions:
    """The assistant's options from the parameters; a negative threshold keeps the profile's."""
    def threshold(name):
        return float(values[name]) if values[name] >= 0 else None

    return AssistantOptions(
        backend=values["encoder_backend"], engine_cache=values["engine_cache_dir"] or None,
        accept_threshold=threshold("accept_threshold"), reject_threshold=threshold("reject_threshold"),
        max_concepts_in_context=int(values["max_concepts_in_context"]),
        verification=values["verification"], verifier_model=values["verifier_model"] or None,
        r2p_margin=values["r2p_margin"])


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

    def add(self, latency: float, encode: float) -> None:
        with self._lock:
            self.processed += 1
            self._window_count += 1
            self._latency_sum += latency
            self._encode_sum += encode

    def add_unreadable(self) -> None:
        with self._lock:
            self.unreadable += 1

    def add_failed(self) -> None:
        with self._lock:
            self.failed += 1

    def window(self) -> tuple[int, float, float]:
        """(frames, mean receive→publish latency s, mean encode s) since the previous call."""
        with self._lock:
            count, latency, encode = self._window_count, self._latency_sum, self._encode_sum
            self._window_count, self._latency_sum, self._encode_sum = 0, 0.0, 0.0
        if count == 0:
            return 0, 0.0, 0.0
        return count, latency / count, encode / count


def frame_to_array(msg):
    """A camera message (Image or CompressedImage) as an H×W×3 uint8 RGB array."""
    from sensor_msgs.msg import CompressedImage

    from .convert import compressed_msg_to_array, image_msg_to_array

    if isinstance(msg, CompressedImage):
        return compressed_msg_to_array(msg)
    return image_msg_to_array(msg)


def detection_to_msg(detection):
    """An assistant Detection (box x, y, w, h) as a personal_vlm_interfaces/Detection (centre, size)."""
    from personal_vlm_interfaces.msg import Detection

    x, y, w, h = (float(v) for v in detection.box)
    return Detection(name=detection.name, category=detection.category, score=float(detection.score),
                     source=detection.source, center_x=x + w / 2.0, center_y=y + h / 2.0,
                     size_x=w, size_y=h, track_id=int(detection.track_id))


class AssistantNode:
    """Topics, services, the frame worker and diagnostics of one loaded Assistant on one rclpy node."""

    # One executor thread per callback group: camera, four services, diagnostics.
    EXECUTOR_THREADS = 6

    def __init__(self, node, assistant, values: dict):
        from diagnostic_msgs.msg import DiagnosticArray
        from personal_vlm_interfaces.msg import DetectionArray
        from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept
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

        # Sensor-data QoS with depth 1: a camera frame is worth nothing once a newer one exists.
        camera_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                reliability=ReliabilityPolicy.BEST_EFFORT,
                                durability=DurabilityPolicy.VOLATILE)
        frame_type = CompressedImage if values["compressed"] else Image
        self.subscription = node.create_subscription(
            frame_type, "image", self._on_frame, camera_qos,
            callback_group=MutuallyExclusiveCallbackGroup())
        self.detections_pub = node.create_publisher(DetectionArray, "~/detections", 10)
        # Reliable, so that default subscribers (rviz, ros2 topic echo) are compatible.
        self.overlay_pub = node.create_publisher(Image, "~/overlay", 1)
        self.diagnostics_pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self.services = [
            node.create_service(TeachConcept, "teach_concept", self._teach,
                                callback_group=MutuallyExclusiveCallbackGroup()),
            node.create_service(Ask, "ask", self._ask, callback_group=MutuallyExclusiveCallbackGroup()),
            node.create_service(ListConcepts, "list_concepts", self._list,
                                callback_group=MutuallyExclusiveCallbackGroup()),
            node.create_service(ForgetConcept, "forget_concept", self._forget,
                                callback_group=MutuallyExclusiveCallbackGroup()),
        ]
        self._diagnostics_clock = (time.monotonic(), 0, 0)   # (time, received, dropped) at last report
        self.diagnostics_timer = node.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics,
                                                   callback_group=MutuallyExclusiveCallbackGroup())
        self.worker = threading.Thread(target=self._run, name="frame-worker", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Stop the worker; it finishes the frame in hand (bounded wait: it is a daemon thread)."""
        self._stop.set()
        self.frames.wake()
        if self.worker.is_alive():
            self.worker.join(WORKER_JOIN_TIMEOUT_S)

    def describe(self) -> str:
        kind = "CompressedImage" if self.values["compressed"] else "Image"
        return (f"camera {self.subscription.topic_name} ({kind}), detections on "
                f"{self.detections_pub.topic_name}, services {', '.join(s.service_name for s in self.services)}")

    # ---- the frame path -----------------------------------------------------------------------
    def _on_frame(self, msg) -> None:
        self.frames.put(msg, time.monotonic())

    def _run(self) -> None:
        next_start = 0.0
        while not self._stop.is_set():
            wait = next_start - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            frame = self.frames.take(timeout=0.25)
            if frame is None or self._stop.is_set():
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

        from .convert import array_to_image_msg, draw_overlay

        try:
            array = frame_to_array(msg)
        except PersonalVLMError as exc:
            self.stats.add_unreadable()
            self.log.warning(f"camera frame skipped: {exc}", throttle_duration_sec=5.0)
            return
        result = self.assistant.observe(array)
        self.detections_pub.publish(
            DetectionArray(header=msg.header, detections=[detection_to_msg(d) for d in result.detections]))
        if self.values["overlay"] and self.overlay_pub.get_subscription_count() > 0:
            drawn = draw_overlay(array, [(d.name, d.score, d.box, d.source) for d in result.detections])
            self.overlay_pub.publish(array_to_image_msg(drawn, msg.header))
        self.stats.add(time.monotonic() - received, result.timings.get("encode", 0.0))

    def _latest_frame_array(self):
        frame = self.frames.latest()
        if frame is None:
            raise PersonalVLMError(
                f"no camera frame has arrived on {self.subscription.topic_name} yet; "
                "send an image with the request or start the camera")
        try:
            return frame_to_array(frame[0])
        except PersonalVLMError as exc:
            raise PersonalVLMError(f"the latest camera frame cannot be used: {exc}") from exc

    # ---- services -----------------------------------------------------------------------------
    def _serve(self, service: str, response, work):
        """Run ``work(response)``; a user error or a bug becomes success=false and the node goes on."""
        try:
            work(response)
            response.success = True
        except PersonalVLMError as exc:
            response.success = False
            response.message = str(exc)
            self.log.warning(f"{service}: {exc}")
        except Exception as exc:
            response.success = False
            response.message = f"internal error: {type(exc).__name__}: {exc}"
            self.log.error(f"{service}: internal error\n{traceback.format_exc()}")
        return response

    def _teach(self, request, response):
        def work(out):
            from .convert import image_msg_to_array, roi_to_xywh

            name = self.assistant.check_name(request.name)   # before any image work: the cheapest mistake
            if request.images:
                arrays = []
                for i, image in enumerate(request.images):
                    try:
                        arrays.append(image_msg_to_array(image))
                    except PersonalVLMError as exc:
                        raise PersonalVLMError(f"images[{i}]: {exc}") from exc
            else:
                arrays = [self._latest_frame_array()]
            rois = [roi_to_xywh(request.roi, a.shape[1], a.shape[0]) for a in arrays]
            result = self.assistant.teach(name, arrays, category=request.category,
                                          rois=None if rois[0] is None else rois, overwrite=request.overwrite)
            out.memory_tokens = int(result.memory_tokens)
            out.keywords = list(result.keywords)
            out.seconds = float(result.seconds)
            source = f"{len(arrays)} image(s)" if request.images else "the latest camera frame"
            out.message = (f"taught {result.name!r} from {source}: {result.memory_tokens} memory tokens "
                           f"in {result.seconds:.1f} s")
            self.log.info(out.message)

        return self._serve("teach_concept", response, work)

    def _ask(self, request, response):
        def work(out):
            from .convert import image_msg_to_array, is_empty_image

            if is_empty_image(request.image):
                array = self._latest_frame_array()
            else:
                try:
                    array = image_msg_to_array(request.image)
                except PersonalVLMError as exc:
                    raise PersonalVLMError(f"image: {exc}") from exc
            result = self.assistant.ask(request.question, array)
            out.answer = result.answer
            out.concepts = list(result.concepts)
            out.message = f"answered in {result.seconds:.1f} s"

        return self._serve("ask", response, work)

    def _list(self, request, response):
        def work(out):
            records = self.assistant.concepts()
            out.names = [r.name for r in records]
            out.categories = [r.category for r in records]
            out.memory_tokens = [int(r.memory_tokens) for r in records]
            out.keywords_json = [json.dumps(list(r.keywords), ensure_ascii=False) for r in records]
            out.message = f"{len(records)} concepts"

        return self._serve("list_concepts", response, work)

    def _forget(self, request, response):
        def work(out):
            self.assistant.forget(request.name)
            out.message = f"forgot {request.name.strip()!r}"
            self.log.info(out.message)

        return self._serve("forget_concept", response, work)

    # ---- diagnostics ----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

        now = time.monotonic()
        then, received_before, dropped_before = self._diagnostics_clock
        received, dropped = self.frames.received, self.frames.dropped
        self._diagnostics_clock = (now, received, dropped)
        elapsed = max(now - then, 1e-6)
        count, latency, encode = self.stats.window()
        try:
            concepts = str(len(self.assistant.concepts()))
        except PersonalVLMError as exc:
            concepts = f"unreadable: {exc}"

        latest = self.frames.latest()
        level, message = DiagnosticStatus.OK, f"processing {count / elapsed:.1f} frames/s"
        if latest is None:
            level, message = DiagnosticStatus.WARN, f"no camera frame on {self.subscription.topic_name} yet"
        elif now - latest[1] > NO_FRAMES_WARNING_S:
            level, message = (DiagnosticStatus.WARN,
                              f"no camera frame on {self.subscription.topic_name} for {now - latest[1]:.0f} s")
        values = {
            "received_hz": f"{(received - received_before) / elapsed:.2f}",
            "processed_hz": f"{count / elapsed:.2f}",
            "max_rate_hz": f"{self.values['process_rate_hz']:g}",
            "latency_ms": f"{latency * 1000:.1f}",
            "encode_ms": f"{encode * 1000:.1f}",
            "dropped_frames": str(dropped),
            "unreadable_frames": str(self.stats.unreadable),
            "failed_frames": str(self.stats.failed),
            "processed_frames": str(self.stats.processed),
            "concepts": concepts,
            "model": str(self.values["model"]),
            "family": str(self.assistant.vlm.family),
            "device": str(self.assistant.vlm.device),
            "encoder_backend": str(self.values["encoder_backend"]),
            "verification": str(bool(self.values["verification"])).lower(),
        }
        status = DiagnosticStatus(level=level, name=f"{self.node.get_name()}: frame path", message=message,
                                  hardware_id=str(self.values["model"]),
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        self.diagnostics_pub.publish(
            DiagnosticArray(header=self._stamped_header(), status=[status]))

    def _stamped_header(self):
        from std_msgs.msg import Header

        return Header(stamp=self.node.get_clock().now().to_msg())


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from ..assistant import Assistant

    rclpy.init(args=argv if argv is not None else sys.argv)
    node = rclpy.create_node(NODE_NAME)
    log = node.get_logger()
    assistant = None
    frontend = None
    code = 0
    # Built before "ready" is logged: a Ctrl-C that lands while an executor is being constructed
    # leaves a half-made object whose destructor raises.
    executor = MultiThreadedExecutor(num_threads=AssistantNode.EXECUTOR_THREADS)
    executor.add_node(node)
    try:
        _declare(node)
        values = _values(node)
        assistant = Assistant.open(values["model"], store_dir=values["store_dir"] or None,
                                   device=values["device"], dtype=values["dtype"],
                                   profile_path=values["profile"] or None,
                                   progress=lambda m: log.info(m), options=assistant_options(values))
        frontend = AssistantNode(node, assistant, values)
        frontend.start()
        log.info(frontend.describe())
        log.info(f"ready: {values['model']} on {assistant.vlm.device} ({assistant.vlm.family}), "
                 f"{len(assistant.concepts())} concepts in {assistant.store.root}")
        executor.spin()
    except PersonalVLMError as exc:
        log.error(str(exc))
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        # The context is already shut down here, so /rosout can't carry this line.
        print(f"[{NODE_NAME}] shutting down", file=sys.stderr, flush=True)
    finally:
        if frontend is not None:
            frontend.stop()
        # Don't wait for a running teach/ask: interrupting the model ends its generation at the
        # next token, and a pending background fingerprint is dropped (the store keeps the concept).
        executor.shutdown(timeout_sec=0, wait_for_threads=False)
        if assistant is not None:
            assistant.close(wait=False)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
