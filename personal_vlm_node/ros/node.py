"""The ROS 2 node: a thin adapter over :class:`personal_vlm_node.assistant.Assistant`.

Run it with ``ros2 run personal_vlm_node assistant_node --ros-args --params-file config/assistant.yaml``
or ``ros2 launch personal_vlm_node assistant.launch.py``; ``assistant_lifecycle_node`` (see
:mod:`.lifecycle`) is the same node as a managed lifecycle node. Parameters are declared with
descriptions and ranges; their defaults live in ``config/assistant.yaml``. Those that pick what is
loaded (model, device, dtype, store, backends …) are read-only; the others apply while running,
checked first by a set-parameters callback that refuses bad values with a reason.

Topics and services (names relative to the node's namespace):

- ``image`` (in): ``sensor_msgs/Image``, or ``sensor_msgs/CompressedImage`` on the same name when
  ``compressed`` is true. Sensor-data QoS, depth 1.
- ``~/detections`` (out): ``DetectionArray`` for every processed frame, empty ones included, with
  the camera image's header.
- ``~/overlay`` (out): the processed frame with the detections drawn, while someone subscribes.
- ``/diagnostics`` (out): one ``DiagnosticStatus`` per second about the frame path.
- ``teach_concept``, ``ask``, ``list_concepts``, ``forget_concept``: the services.
- ``ask`` (action ``personal_vlm_interfaces/action/Ask``): the answer streams as feedback; a
  cancel stops the generation at the next token.

Threads: the camera callback only drops the message into a one-slot holder; one worker thread
takes the newest frame at most ``process_rate_hz`` times a second and runs
``Assistant.observe`` (frames that arrive meanwhile replace each other and are counted as dropped).
Every request is taken from DDS as soon as it arrives (one reentrant callback group, a deep request
queue). Requests of each kind (teach, ask — the service and the action's goals —, list, forget)
are worked on one at a time in order of arrival (:class:`RequestLine`); one that finds
``max_waiting_requests`` of its kind already waiting is answered at once: ``success=false``,
"busy: …". The multi-threaded executor has a thread for every request that may wait, and more, so
a slow teach or ask never holds up the camera callback, diagnostics, a cancel request or another
kind of request. On shutdown, requests in flight are ended (generation interrupted), waiting ones
are not started, and all are answered before the node is destroyed.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from ..errors import PersonalVLMError
from ..options import DEFAULT_MODEL, ENCODER_CHOICES, DTYPES, AssistantOptions, check_thresholds
from ..output import plural
from .requests import RequestLine

NODE_NAME = "personal_vlm"


@dataclass(frozen=True)
class Param:
    default: object
    description: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    live: bool = False          # applies while running; the others need a restart (read-only)


REQUEST_KINDS = ("teach", "ask", "list", "forget")     # the ask action's goals wait with the asks
MAX_WAITING_REQUESTS = 16          # the parameter's upper bound: each waiting request holds a thread


PARAMETERS: dict[str, Param] = {
    "model": Param(DEFAULT_MODEL, "Hugging Face model id or local checkpoint folder"),
    "device": Param("auto", "auto, cpu, cuda or cuda:N"),
    "dtype": Param("auto", "weight precision", DTYPES),
    "store_dir": Param("", "concept store folder; empty = $XDG_DATA_HOME/personal_vlm"),
    "profile": Param("", "model profile YAML; empty = models/<model>.yaml or the defaults"),
    "encoder_backend": Param("torch", "vision encoder on the frame path and for teaching", ENCODER_CHOICES),
    "engine_cache_dir": Param("", "cache for exported ONNX files and TensorRT engines"),
    "process_rate_hz": Param(2.0, "most camera frames processed per second", low=0.01, high=120.0, live=True),
    "accept_threshold": Param(-1.0, "match score that detects without verification; <0 = profile", low=-1.0, high=1.0, live=True),
    "reject_threshold": Param(-1.0, "match score that rejects without verification; <0 = profile", low=-1.0, high=1.0, live=True),
    "max_concepts_in_context": Param(5, "most memories in one /ask prompt", low=0, high=64, live=True),
    "verification": Param(True, "settle uncertain matches with the model", live=True),
    "verifications_per_second": Param(2.0, "most verifications started per second", low=0.01, high=100.0),
    "verification_busy_fraction": Param(0.5, "most of the time verification may compute, beside the frames",
                                        low=0.01, high=1.0),
    "overlay": Param(True, "publish ~/overlay while someone subscribes", live=True),
    "compressed": Param(False, "subscribe to sensor_msgs/CompressedImage instead of Image"),
    "verifier_model": Param("", "CLIP/SigLIP id or folder for R2P's image-text scores; empty = the VLM's yes/no"),
    "r2p_margin": Param(0.15, "Ego p(yes) this close to its threshold is settled by R2P; 0 = never", low=0.0, high=0.5, live=True),
    "max_waiting_requests": Param(4, "most requests of one kind (teach, ask, list, forget) waiting behind the one "
                                     "being worked on; any more are answered busy",
                                  low=0, high=MAX_WAITING_REQUESTS, live=True),
}

DIAGNOSTICS_PERIOD_S = 1.0
STORE_CHECK_PERIOD_S = 0.1     # how often the store is checked for other processes' teach/forget (one cheap query)
WARNING_THROTTLE_S = 2.0       # a failing client must not flood the log
MAX_LOGGED_CHARS = 300
NO_FRAMES_WARNING_S = 5.0      # diagnostics warn when the camera has been silent this long
WORKER_JOIN_TIMEOUT_S = 3.0
REQUESTS_DRAIN_TIMEOUT_S = 3.0   # shutdown waits this long for interrupted requests to answer
SPINNER_JOIN_TIMEOUT_S = 5.0     # and this long for the spinning thread to leave rclpy's wait
# rclpy's default service QoS keeps the last 10 requests that no callback has taken yet and silently
# replaces the oldest: a burst of 50 teach requests lost 39 while one teach ran. The callbacks now
# take every request at once (it joins its RequestLine or is answered busy), so this queue only
# holds a burst until the executor gets to it; 1000 is the depth ROS gives the parameter services,
# whose requests must not get lost either.
SERVICE_QUEUE_DEPTH = 1000


def check_value(name: str, value) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is."""
    spec = PARAMETERS[name]
    expected = type(spec.default)
    if expected is float:
        # Integers are welcome where a float is meant (`-p process_rate_hz:=5`).
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
    elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"{name} must be {'true or false' if expected is bool else 'a ' + expected.__name__}, got {value!r}"
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}"
    if spec.low is not None and not spec.low <= float(value) <= spec.high:
        return f"{name} must lie in [{spec.low:g}, {spec.high:g}]"
    if name == "model" and not str(value).strip():
        return "model must name a Hugging Face id or a local folder"
    return None


def effective_thresholds(values: dict, profile_accept: float, profile_reject: float) -> tuple[float, float]:
    """The decision band the parameters ask for: a negative value keeps the profile's."""
    accept = float(values["accept_threshold"]) if values["accept_threshold"] >= 0 else profile_accept
    reject = float(values["reject_threshold"]) if values["reject_threshold"] >= 0 else profile_reject
    return accept, reject


def descriptor_for(name: str):
    """The ParameterDescriptor of ``name``: description, range or choices, read-only unless live."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    spec = PARAMETERS[name]
    lifetime = "applies while running" if spec.live else "read-only: takes effect on restart"
    descriptor = ParameterDescriptor(name=name, description=f"{spec.description} ({lifetime})",
                                     read_only=not spec.live)
    if spec.choices:
        descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
    if isinstance(spec.default, float):
        # Dynamic typing lets an integer through (`-p process_rate_hz:=5`); the set-parameters
        # callback checks that it is a number, and integers are stored as floats.
        descriptor.dynamic_typing = True
        descriptor.additional_constraints = "a number (integers accepted)"
        if spec.low is not None:
            descriptor.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
    else:
        descriptor.type = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                           str: ParameterType.PARAMETER_STRING}[type(spec.default)]
        if spec.low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    return descriptor


def _declare(node) -> None:
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
    from rclpy.parameter import Parameter

    for name, spec in PARAMETERS.items():
        try:
            node.declare_parameter(name, spec.default, descriptor_for(name))
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise PersonalVLMError(f"invalid parameter {name}: {exc}") from exc
        value = node.get_parameter(name).value
        if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
            node.set_parameters([Parameter(name, Parameter.Type.DOUBLE, float(value))])


def _values(node) -> dict:
    values = {name: node.get_parameter(name).value for name in PARAMETERS}
    problems = [p for p in (check_value(n, v) for n, v in values.items()) if p]
    if not problems and values["accept_threshold"] >= 0 and values["reject_threshold"] >= 0:
        problem = check_thresholds(values["accept_threshold"], values["reject_threshold"])
        if problem:
            problems.append(f"{problem}; a negative value keeps the model profile's")
    if problems:
        raise PersonalVLMError("invalid parameters: " + "; ".join(problems))
    return {n: float(v) if isinstance(PARAMETERS[n].default, float) else v for n, v in values.items()}


def assistant_options(values: dict) -> AssistantOptions:
    """The assistant's options from the parameters; a negative threshold keeps the profile's."""
    def threshold(name):
        return float(values[name]) if values[name] >= 0 else None

    return AssistantOptions(
        backend=values["encoder_backend"], engine_cache=values["engine_cache_dir"] or None,
        accept_threshold=threshold("accept_threshold"), reject_threshold=threshold("reject_threshold"),
        max_concepts_in_context=int(values["max_concepts_in_context"]),
        verification=values["verification"], verifications_per_second=float(values["verifications_per_second"]),
        verification_busy_fraction=float(values["verification_busy_fraction"]),
        verifier_model=values["verifier_model"] or None, r2p_margin=values["r2p_margin"])


class NodeParameters:
    """The node's parameters: declared once, checked before every change, applied while running.

    ``values`` is the one dict the rest of the node reads. A change of a live parameter is checked
    by ``_check`` (ROS refuses it with the reason when that returns one; read-only parameters are
    refused by ROS itself) and then handed to the Assistant / frame path by ``_apply``.
    """

    def __init__(self, node):
        self.node = node
        _declare(node)
        self.values = _values(node)
        self.assistant = None       # set while a model is loaded
        self.frontend = None        # set while serving
        self._profile_band: tuple[float, float] | None = None   # the profile's own thresholds
        node.add_pre_set_parameters_callback(self._floats)
        node.add_on_set_parameters_callback(self._check)
        node.add_post_set_parameters_callback(self._apply)

    def attach(self, assistant, profile_band: tuple[float, float]) -> None:
        self.assistant, self._profile_band = assistant, profile_band

    def detach(self) -> None:
        self.assistant = self._profile_band = None

    def _floats(self, parameters):
        """Integers given for float parameters become floats, so the stored type stays double."""
        from rclpy.parameter import Parameter

        out = []
        for p in parameters:
            spec = PARAMETERS.get(p.name)
            if spec is not None and isinstance(spec.default, float) and p.type_ == Parameter.Type.INTEGER:
                p = Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
            out.append(p)
        return out

    def _check(self, parameters):
        from rcl_interfaces.msg import SetParametersResult

        proposed = dict(self.values)
        for p in parameters:
            if p.name not in PARAMETERS:
                continue
            problem = check_value(p.name, p.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            proposed[p.name] = p.value
        if self._profile_band is not None:
            problem = check_thresholds(*effective_thresholds(proposed, *self._profile_band))
        elif proposed["accept_threshold"] >= 0 and proposed["reject_threshold"] >= 0:
            problem = check_thresholds(proposed["accept_threshold"], proposed["reject_threshold"])
        else:
            problem = None
        return SetParametersResult(successful=problem is None, reason=problem or "")

    def _apply(self, parameters) -> None:
        changed = {p.name for p in parameters if p.name in PARAMETERS}
        for name in changed:
            value = next(p.value for p in parameters if p.name == name)
            self.values[name] = float(value) if isinstance(PARAMETERS[name].default, float) else value
        assistant = self.assistant
        try:
            if assistant is not None:
                if changed & {"accept_threshold", "reject_threshold"}:
                    assistant.set_thresholds(*effective_thresholds(self.values, *self._profile_band))
                if "max_concepts_in_context" in changed:
                    assistant.set_max_concepts_in_context(self.values["max_concepts_in_context"])
                if "verification" in changed:
                    assistant.set_verification(self.values["verification"])
                if "r2p_margin" in changed:
                    assistant.set_r2p_margin(self.values["r2p_margin"])
            if self.frontend is not None and "process_rate_hz" in changed:
                self.frontend.set_rate(self.values["process_rate_hz"])
        except PersonalVLMError as exc:      # checked before, so this is a bug, but keep running
            self.node.get_logger().error(f"parameter change not applied: {exc}")
            return
        live = sorted(changed & {n for n, spec in PARAMETERS.items() if spec.live})
        if live and (assistant is not None or self.frontend is not None):
            self.node.get_logger().info(
                "now " + ", ".join(f"{n} = {self.values[n]}" for n in live))


def open_assistant(values: dict, log):
    """Load the model and store for these parameter values; returns (assistant, profile's band)."""
    from ..assistant import Assistant

    assistant = Assistant.open(values["model"], store_dir=values["store_dir"] or None,
                               device=values["device"], dtype=values["dtype"],
                               profile_path=values["profile"] or None,
                               progress=lambda m: log.info(m), options=assistant_options(values))
    return assistant, assistant.profile_thresholds


def ready_line(values: dict, assistant) -> str:
    """What was loaded, with what ``auto`` resolved to."""
    count = len(assistant.concepts())
    return (f"ready: {values['model']} on {assistant.vlm.device} ({dtype_name(assistant)}, "
            f"{assistant.vlm.family}), {plural(count, 'concept')} in {assistant.store.root}")


def dtype_name(assistant) -> str:
    return str(assistant.vlm.dtype).replace("torch.", "")


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
    # Detection.msg promises [0, 1]; a matcher score of a token with itself can round to 1.0000001.
    score = float(detection.score)
    score = min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0
    return Detection(name=detection.name, category=detection.category, score=score,
                     source=detection.source, center_x=x + w / 2.0, center_y=y + h / 2.0,
                     size_x=w, size_y=h, track_id=int(detection.track_id))


class AssistantNode:
    """Topics, services, the ask action, the frame worker and diagnostics of one loaded Assistant.

    Made when the node starts serving and ``destroy``-ed when it stops (the lifecycle node's
    deactivate); the rclpy node and the Assistant outlive it.
    """

    # A thread for each request that may be worked on or wait in a RequestLine (the ask action's
    # goals among the asks), and 8 more for the callbacks that must never wait behind them: camera,
    # diagnostics, cancel requests, parameter services, and requests being answered busy. The pool
    # starts its threads only as they are needed.
    EXECUTOR_THREADS = len(REQUEST_KINDS) * (MAX_WAITING_REQUESTS + 1) + 8

    def __init__(self, node, assistant, values: dict):
        from diagnostic_msgs.msg import DiagnosticArray
        from personal_vlm_interfaces.action import Ask as AskAction
        from personal_vlm_interfaces.msg import DetectionArray
        from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept
        from rclpy.action import ActionServer, CancelResponse, GoalResponse
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
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
        # Requests being worked on or waiting, so that shutdown can let them answer before
        # destroying the node.
        self._requests = 0
        self._requests_done = threading.Condition()
        self._closing = False

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

        self.lines = {kind: RequestLine(kind, lambda: int(self.values["max_waiting_requests"]))
                      for kind in REQUEST_KINDS}
        request_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=SERVICE_QUEUE_DEPTH,
                                 reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        # Reentrant: every request is taken as soon as it arrives, whatever else is waiting, and
        # either joins its RequestLine (which keeps each kind's work in order, one at a time) or is
        # answered busy.
        requests_group = ReentrantCallbackGroup()
        self.services = [
            node.create_service(srv_type, name, callback, qos_profile=request_qos, callback_group=requests_group)
            for srv_type, name, callback in [(TeachConcept, "teach_concept", self._teach), (Ask, "ask", self._ask),
                                             (ListConcepts, "list_concepts", self._list),
                                             (ForgetConcept, "forget_concept", self._forget)]
        ]
        # Reentrant: a cancel request must get through while the goal's execute callback runs.
        self.ask_action = ActionServer(
            node, AskAction, "ask", execute_callback=self._ask_goal,
            goal_callback=lambda _goal: GoalResponse.REJECT if self._closing else GoalResponse.ACCEPT,
            cancel_callback=lambda _goal: CancelResponse.ACCEPT, callback_group=ReentrantCallbackGroup(),
            goal_service_qos_profile=request_qos, result_service_qos_profile=request_qos,
            cancel_service_qos_profile=request_qos)
        self._diagnostics_clock = (time.monotonic(), 0, 0)   # (time, received, dropped) at last report
        self.diagnostics_timer = node.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics,
                                                   callback_group=MutuallyExclusiveCallbackGroup())
        self.worker = threading.Thread(target=self._run, name="frame-worker", daemon=True)

    def start(self) -> None:
        self.assistant.bank_listeners.append(self.concepts_changed)
        self.worker.start()

    def concepts_changed(self) -> None:
        """Process the next camera frame as soon as it comes: the concepts it is matched against changed."""
        self._concepts_changed.set()
        self.frames.wake()

    def set_rate(self, hz: float) -> None:
        """Process at most ``hz`` frames a second from the next frame on."""
        self._period = 1.0 / float(hz)
        self.frames.wake()

    def stop(self) -> None:
        """Stop the worker; it finishes the frame in hand (bounded wait: it is a daemon thread).

        New requests are refused from here on, and waiting ones are answered "shutting down"."""
        self._closing = True
        for line in self.lines.values():
            line.close()
        if self.concepts_changed in self.assistant.bank_listeners:
            self.assistant.bank_listeners.remove(self.concepts_changed)
        self._stop.set()
        self.frames.wake()
        if self.worker.is_alive():
            self.worker.join(WORKER_JOIN_TIMEOUT_S)

    def drain(self, timeout: float = REQUESTS_DRAIN_TIMEOUT_S) -> bool:
        """Wait until no request is being worked on; True if none is left. Interrupt the model first."""
        deadline = time.monotonic() + timeout
        with self._requests_done:
            while self._requests > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._requests_done.wait(left)
        return True

    def destroy(self) -> None:
        """Stop serving: the worker, the subscription, publishers, services, action and timer go."""
        self.stop()
        self.drain()
        node = self.node
        node.destroy_timer(self.diagnostics_timer)
        self.ask_action.destroy()
        for service in self.services:
            node.destroy_service(service)
        node.destroy_subscription(self.subscription)
        for publisher in (self.detections_pub, self.overlay_pub, self.diagnostics_pub):
            node.destroy_publisher(publisher)

    @contextlib.contextmanager
    def _request(self):
        """One request: counted while it waits in its line or runs; refused once the node is closing."""
        with self._requests_done:
            if self._closing:
                raise PersonalVLMError("the node is shutting down")
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests -= 1
                self._requests_done.notify_all()

    def describe(self) -> str:
        kind = "CompressedImage" if self.values["compressed"] else "Image"
        return (f"camera {self.subscription.topic_name} ({kind}), detections on "
                f"{self.detections_pub.topic_name}, services {', '.join(s.service_name for s in self.services)}, "
                f"action {self.services[1].service_name}")

    # ---- the frame path -----------------------------------------------------------------------
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
    def _serve(self, kind: str, service: str, response, work, withdraw_if=None):
        """Run ``work(response)`` in its turn on the ``kind`` line, or refuse it at once when the line
        is full; a refusal, a user error or a bug becomes success=false and the node goes on."""
        try:
            with self._request():
                self.lines[kind].run(lambda: work(response), withdraw_if)
            response.success = True
        except PersonalVLMError as exc:
            response.success = False
            response.message = str(exc)
            self.log.warning(f"{service}: {str(exc)[:MAX_LOGGED_CHARS]}", throttle_duration_sec=WARNING_THROTTLE_S)
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
            known = request.add and name in self.assistant.store
            result = self.assistant.teach(name, arrays, category=request.category,
                                          rois=None if rois[0] is None else rois, overwrite=request.overwrite,
                                          add=request.add)
            out.memory_tokens = int(result.memory_tokens)
            out.keywords = list(result.keywords)
            out.seconds = float(result.seconds)
            source = f"{len(arrays)} image(s)" if request.images else "the latest camera frame"
            verb = "added a view to" if known else "taught"
            out.message = (f"{verb} {result.name!r} from {source}: {result.memory_tokens} memory tokens "
                           f"in {result.seconds:.1f} s")
            self.log.info(out.message)

        return self._serve("teach", "teach_concept", response, work)

    def _question_image(self, image):
        from .convert import image_msg_to_array, is_empty_image

        if is_empty_image(image):
            return self._latest_frame_array()
        try:
            return image_msg_to_array(image)
        except PersonalVLMError as exc:
            raise PersonalVLMError(f"image: {exc}") from exc

    def _ask(self, request, response):
        def work(out):
            array = self._question_image(request.image)
            result = self.assistant.ask(request.question, array, on_partial=lambda _text: not self._closing)
            if result.stopped:
                raise PersonalVLMError("the node is shutting down")
            out.answer = result.answer
            out.concepts = list(result.concepts)
            out.message = f"answered in {result.seconds:.1f} s"

        return self._serve("ask", "ask", response, work)

    def _ask_goal(self, goal):
        """The ask action: the answer so far as feedback after every token; a cancel stops it, or
        takes a goal that is still waiting out of the line. Goals wait in line with ask requests."""
        from personal_vlm_interfaces.action import Ask as AskAction

        request = goal.request

        def partial(text: str) -> bool:
            if goal.is_cancel_requested or self._closing:
                return False
            goal.publish_feedback(AskAction.Feedback(partial_answer=text))
            return True

        result = self._serve("ask", "ask action", AskAction.Result(),
                             lambda out: self._answer_goal(out, request, partial),
                             withdraw_if=lambda: goal.is_cancel_requested)
        if goal.is_cancel_requested:
            result.success = False
            result.message = f"cancelled after {plural(len(result.answer), 'character')} of the answer"
            goal.canceled()
        elif result.success:
            goal.succeed()
        else:
            goal.abort()
        return result

    def _answer_goal(self, out, request, partial) -> None:
        array = self._question_image(request.image)
        result = self.assistant.ask(request.question, array, on_partial=partial)
        out.answer = result.answer
        out.concepts = list(result.concepts)
        if result.stopped and self._closing:
            raise PersonalVLMError("the node is shutting down")
        out.message = f"answered in {result.seconds:.1f} s"

    def _list(self, request, response):
        def work(out):
            records = self.assistant.concepts()
            out.names = [r.name for r in records]
            out.categories = [r.category for r in records]
            out.memory_tokens = [int(r.memory_tokens) for r in records]
            out.keywords_json = [json.dumps(list(r.keywords), ensure_ascii=False) for r in records]
            out.message = plural(len(records), "concept")
            damaged = self.assistant.damaged
            if damaged:
                # Listed all the same (so they can be forgotten), and said to be unrecognised.
                out.message += ("; damaged, not recognised until taught again: "
                                + "; ".join(damaged[n] for n in sorted(damaged)))

        return self._serve("list", "list_concepts", response, work)

    def _forget(self, request, response):
        def work(out):
            result = self.assistant.forget(request.name)
            out.message = result.message
            (self.log.warning if result.left_behind else self.log.info)(out.message)

        return self._serve("forget", "forget_concept", response, work)

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
            "dtype": dtype_name(self.assistant),
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


def shut_down(frontend, assistant) -> bool:
    """End serving before the node is destroyed: stop the frame worker, interrupt the model so
    running requests end at their next token, and let them answer. True if all of them did."""
    drained = True
    if frontend is not None:
        frontend.stop()
    if assistant is not None:
        # Pending background fingerprints are dropped (the store keeps the concept).
        assistant.close(wait=False)
    if frontend is not None:
        drained = frontend.drain()
    return drained


def init_ros(argv: list[str] | None) -> None:
    """rclpy without its own SIGINT/SIGTERM handling: that would shut the context down at once,
    and requests in flight could then no longer be answered. :func:`spin_until_signal` handles
    them; before it runs (loading the model), Ctrl-C is Python's KeyboardInterrupt."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)


def _spin(executor) -> None:
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:      # rclpy.shutdown() from elsewhere: stop as on a signal
        pass


def spin_until_signal(executor) -> threading.Thread:
    """Spin ``executor`` on a thread until SIGINT or SIGTERM; the caller then ends the requests in
    flight while the executor still runs and the context is still valid, so they are answered.
    Returns the spinning thread, for :func:`stop_ros` to join."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    spinner = threading.Thread(target=_spin, args=(executor,), name="executor", daemon=True)
    spinner.start()
    try:
        while spinner.is_alive() and not stop.wait(0.25):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.is_set():
        print(f"[{NODE_NAME}] shutting down", file=sys.stderr, flush=True)
    return spinner


def stop_ros(node, executor, drained: bool, spinner: threading.Thread | None = None) -> None:
    """Stop the executor (waiting for the answers being sent unless a request did not end in
    time), wait for the spinning thread to return, then destroy the node and shut rclpy down."""
    import rclpy

    executor.shutdown(timeout_sec=REQUESTS_DRAIN_TIMEOUT_S if drained else 0, wait_for_threads=drained)
    if spinner is not None:
        # The spinning thread may still be inside rclpy's C++ wait. Were the interpreter to
        # finalize first, that daemon thread would be ended while re-taking the GIL, unwinding
        # through C++ frames: std::terminate, and the process aborts (SIGABRT) after a clean stop.
        spinner.join(SPINNER_JOIN_TIMEOUT_S)
    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:               # Ctrl-C during the imports or before the node existed
        print(f"[{NODE_NAME}] interrupted during startup", file=sys.stderr, flush=True)
        return 0


def _main(argv: list[str] | None) -> int:
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    init_ros(argv)
    node = rclpy.create_node(NODE_NAME)
    log = node.get_logger()
    assistant = None
    frontend = None
    code = 0
    spinner = None
    # Built before "ready" is logged: a Ctrl-C that lands while an executor is being constructed
    # leaves a half-made object whose destructor raises.
    executor = MultiThreadedExecutor(num_threads=AssistantNode.EXECUTOR_THREADS)
    executor.add_node(node)
    try:
        parameters = NodeParameters(node)
        values = parameters.values
        assistant, band = open_assistant(values, log)
        parameters.attach(assistant, band)
        frontend = AssistantNode(node, assistant, values)
        parameters.frontend = frontend
        frontend.start()
        assistant.watch_store(STORE_CHECK_PERIOD_S)
        log.info(frontend.describe())
        log.info(ready_line(values, assistant))
        spinner = spin_until_signal(executor)
    except PersonalVLMError as exc:
        log.error(str(exc))
        code = 2
    except KeyboardInterrupt:
        print(f"[{NODE_NAME}] shutting down", file=sys.stderr, flush=True)
    finally:
        stop_ros(node, executor, shut_down(frontend, assistant), spinner)
    return code


if __name__ == "__main__":
    sys.exit(main())
