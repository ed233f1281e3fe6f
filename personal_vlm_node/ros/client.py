"""``personal-vlm node teach|ask|list|forget|watch``: a client of the running node, with rclpy only.

The ``ros2`` command (ros2cli, launch) has no PyPI wheels, so a machine set up with the quick start
has rclpy and the interface types but no ``ros2 service call``. This client calls the node's
services, its ask action (``ask --stream``) and reads its detections topic from the same
environment. A node that does not answer within ``--timeout`` seconds is a user error (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from ..errors import PersonalVLMError
from ..output import emit as _emit

REQUEST_TIMEOUT_S = 600.0     # a teach on a big model on a CPU takes minutes
# The first request of a brand-new process can race DDS discovery on a loaded machine: the node
# answers before it has matched this process's reply reader, and the answer is lost. An idempotent
# request is therefore re-sent this often until one answer arrives.
RESEND_S = 2.0


def run(args) -> None:
    try:
        import rclpy  # noqa: F401
        from personal_vlm_interfaces.srv import Ask  # noqa: F401
    except ImportError as exc:
        raise PersonalVLMError(
            f"`personal-vlm node` needs rclpy and the personal_vlm_interfaces types ({exc}); run it in the "
            "quick start's .venv or in a shell with the ROS workspace sourced") from exc
    if args.timeout <= 0:
        raise PersonalVLMError("--timeout must be above 0 seconds")
    client = NodeClient(args.namespace, args.node_name, args.timeout)
    try:
        VERBS[args.verb](client, args)
    finally:
        client.close()


class NodeClient:
    """An rclpy node of its own context, spun on a thread, that talks to one personal_vlm node: its
    services, its ask action, its lifecycle and parameter services, and its topics.

    The ``personal-vlm node`` verbs, the field test and the node's tests all talk to the node
    through it. Names are resolved in ``namespace``; a name that starts with ``/`` is taken as is.
    """

    def __init__(self, namespace: str, node_name: str = "personal_vlm", timeout: float = REQUEST_TIMEOUT_S,
                 client_name: str | None = None, threads: int = 1):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

        self.namespace = "/" + namespace.strip("/") if namespace.strip("/") else ""
        self.node_name = node_name
        self.timeout = timeout
        self._known = False           # the node has answered this process once
        self._services: dict = {}     # kept clients of the node's services, by name
        self._camera = None
        self.last_stamp = 1_000_000      # the seconds of the last frame stamp this client published
        self.published: dict[tuple[int, int], float] = {}     # frame stamp → monotonic time it was published
        self.arrived = threading.Condition()                   # notified whenever a recorded message arrives
        self.context = Context()
        rclpy.init(args=[], context=self.context)
        self.node = rclpy.create_node(client_name or f"personal_vlm_cli_{os.getpid()}", namespace=self.namespace or None,
                                      context=self.context, start_parameter_services=False)
        # More than one thread when recorded topics are busy enough to delay service answers.
        self.executor = (MultiThreadedExecutor(num_threads=threads, context=self.context) if threads > 1
                         else SingleThreadedExecutor(context=self.context))
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=0)
        self.node.destroy_node()
        if self.context.ok():
            rclpy.shutdown(context=self.context)
        self._thread.join(2.0)

    def name(self, relative: str) -> str:
        return relative if relative.startswith("/") else f"{self.namespace}/{relative}"

    def _absent(self, what: str) -> PersonalVLMError:
        domain = os.environ.get("ROS_DOMAIN_ID", "0")
        return PersonalVLMError(
            f"no node answers on {what} within {self.timeout:g} s; start it (./quickstart.sh node or "
            f"ros2 launch personal_vlm_node assistant.launch.py), or check the namespace (--namespace) "
            f"and that both use ROS_DOMAIN_ID={domain}")

    # ---- one request at a time, as a user sends it -------------------------------------------
    def call(self, srv_type, relative: str, request, idempotent: bool = False):
        """One request. An ``idempotent`` one is re-sent every RESEND_S until it is answered (within
        ``timeout``); any other is preceded by :meth:`handshake`, so it is sent once and not lost."""
        if not idempotent:
            self.handshake()
        client = self.node.create_client(srv_type, self.name(relative))
        try:
            if not client.wait_for_service(timeout_sec=self.timeout):
                raise self._absent(self.name(relative))
            if not idempotent:
                return self._wait(client.call_async(request), relative)
            answered = threading.Event()
            deadline = time.monotonic() + self.timeout
            futures = []
            while not answered.is_set():
                if futures and time.monotonic() >= deadline:
                    raise self._absent(self.name(relative))
                futures.append(client.call_async(request))
                futures[-1].add_done_callback(lambda _f: answered.set())
                answered.wait(RESEND_S)
            return next(f for f in futures if f.done()).result()
        finally:
            self.node.destroy_client(client)

    def handshake(self) -> None:
        """Ask the node for its concept list until it answers: from then on it knows this process,
        and a request that must not be sent twice (teach, forget, ask) reaches it and is answered."""
        if self._known:
            return
        from personal_vlm_interfaces.srv import ListConcepts

        self.call(ListConcepts, "list_concepts", ListConcepts.Request(), idempotent=True)
        self._known = True

    @staticmethod
    def _wait(future, what: str):
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(REQUEST_TIMEOUT_S):
            raise PersonalVLMError(f"{what}: no answer within {REQUEST_TIMEOUT_S:g} s")
        return future.result()

    # ---- many requests, on kept clients ------------------------------------------------------
    def service(self, srv_type, relative: str, timeout: float | None = None):
        """A kept client of the node's ``relative`` service, once the service is there (None when
        it does not appear within ``timeout``, default the client's)."""
        client = self._services.get(relative)
        if client is None:
            client = self.node.create_client(srv_type, self.name(relative))
            if not client.wait_for_service(timeout_sec=self.timeout if timeout is None else timeout):
                self.node.destroy_client(client)
                return None
            self._services[relative] = client
        return client

    def call_async(self, srv_type, relative: str, request):
        """Send ``request`` on a kept client; the future of its answer."""
        client = self.service(srv_type, relative)
        if client is None:
            raise self._absent(self.name(relative))
        return client.call_async(request)

    def send(self, srv_type, relative: str, request, timeout: float | None = None):
        """One request on a kept client: its answer, or None when the service is not there or no
        answer came within ``timeout`` (default the client's)."""
        timeout = self.timeout if timeout is None else timeout
        client = self.service(srv_type, relative, timeout)
        if client is None:
            return None
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _f: done.set())
        return future.result() if done.wait(timeout) else None

    def _answered(self, response, relative: str):
        if response is None:
            raise self._absent(self.name(relative))
        return response

    # ---- parameters and lifecycle ------------------------------------------------------------
    def set_parameters(self, **values) -> list:
        """Set the node's parameters live; one rcl_interfaces SetParametersResult per value."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        relative = f"{self.node_name}/set_parameters"
        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()
                                                    for name, value in values.items()])
        return list(self._answered(self.send(SetParameters, relative, request), relative).results)

    def get_parameters(self, *names: str) -> list:
        """The node's values of ``names``, as Python values."""
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        relative = f"{self.node_name}/get_parameters"
        response = self._answered(self.send(GetParameters, relative, GetParameters.Request(names=list(names))),
                                  relative)
        return [parameter_value_to_python(v) for v in response.values]

    def lifecycle_state(self) -> int:
        """The node's lifecycle state id. Asking is idempotent, so it is re-sent until answered."""
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"{self.node_name}/get_state", GetState.Request(), idempotent=True).current_state.id

    def change_state(self, transition_id: int, goal_state: int) -> bool:
        """Request a lifecycle transition, once (a transition must not be requested twice): its
        success, or, when its answer does not come, whether the node reached ``goal_state``."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        relative = f"{self.node_name}/change_state"
        client = self.service(ChangeState, relative)
        if client is None:
            raise self._absent(self.name(relative))
        done = threading.Event()
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        future.add_done_callback(lambda _f: done.set())
        deadline = time.monotonic() + self.timeout
        while not done.wait(5 * RESEND_S):
            if self.lifecycle_state() == goal_state:
                return True
            if time.monotonic() >= deadline:
                raise PersonalVLMError(f"{relative}: no answer within {self.timeout:g} s")
        return future.result().success

    # ---- the ask action ----------------------------------------------------------------------
    def ask_goal(self, question: str, image, on_feedback=None):
        """The ask action: (status, result, feedback messages in order). ``on_feedback(goal, feedback)``
        sees each feedback as it comes (``partial_answer``, ``new_text``; it may cancel the goal);
        Ctrl-C cancels it."""
        from personal_vlm_interfaces.action import Ask
        from rclpy.action import ActionClient

        action = ActionClient(self.node, Ask, self.name("ask"))
        partials, goal = [], [None]

        def feedback(msg):
            partials.append(msg.feedback)
            if on_feedback is not None:
                on_feedback(goal[0], msg.feedback)

        try:
            if not action.wait_for_server(timeout_sec=self.timeout):
                raise self._absent(f"the action {self.name('ask')}")
            goal[0] = self._wait(action.send_goal_async(Ask.Goal(question=question, image=image),
                                                        feedback_callback=feedback), "ask")
            if not goal[0].accepted:
                raise PersonalVLMError("ask: the node refused the question (it is shutting down)")
            try:
                response = self._wait(goal[0].get_result_async(), "ask")
            except KeyboardInterrupt:
                self._wait(goal[0].cancel_goal_async(), "cancel")
                raise
            return response.status, response.result, partials
        finally:
            action.destroy()

    # ---- topics ------------------------------------------------------------------------------
    def camera(self):
        """The publisher of camera frames on the node's input (best effort, as cameras publish)."""
        if self._camera is None:
            from rclpy.qos import qos_profile_sensor_data
            from sensor_msgs.msg import Image

            self._camera = self.node.create_publisher(Image, self.name("image"), qos_profile_sensor_data)
        return self._camera

    def publish_frame(self, msg, frame_id: str = "camera") -> tuple[int, int]:
        """Publish ``msg`` on the camera input with a stamp no other frame of this client had;
        returns the stamp (sec, nanosec), by which the node's detections name the frame."""
        with self.arrived:
            self.last_stamp += 1
            stamp = (self.last_stamp, 250_000_000)
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        msg.header.frame_id = frame_id
        self.published[stamp] = time.monotonic()
        self.camera().publish(msg)
        return stamp

    def record(self, msg_type, relative: str, depth: int = 50, entry=None, into: list | None = None) -> list:
        """Every message on the topic from now on, appended (as ``entry(msg)``, default the message)
        to ``into`` or a new list, which is returned; :attr:`arrived` is notified each time."""
        kept = [] if into is None else into

        def keep(msg):
            item = msg if entry is None else entry(msg)
            with self.arrived:
                kept.append(item)
                self.arrived.notify_all()

        self.node.create_subscription(msg_type, self.name(relative), keep, depth)
        return kept

    def record_detections(self, entry=None, into: list | None = None) -> list:
        """The node's DetectionArray messages from now on (see :meth:`record`)."""
        from personal_vlm_interfaces.msg import DetectionArray

        return self.record(DetectionArray, f"{self.node_name}/detections", 50, entry, into)

    def wait_until(self, condition, timeout: float | None = None, what: str = "a condition"):
        """The first true value of ``condition()``, checked as recorded messages arrive (and at
        least every half second); TimeoutError when none came within ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self.arrived:
            while True:
                found = condition()
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                self.arrived.wait(min(left, 0.5))


# ---- the verbs -----------------------------------------------------------------------------

def _image_msg(path: str):
    import numpy as np

    from ..images import load_image
    from .convert import array_to_image_msg

    if not os.path.isfile(path):
        raise PersonalVLMError(f"image not found: {path}")
    return array_to_image_msg(np.asarray(load_image(path), dtype=np.uint8))


def _roi(text: str | None):
    from sensor_msgs.msg import RegionOfInterest

    if text is None:
        return RegionOfInterest()
    try:
        x, y, w, h = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise PersonalVLMError(f"--roi takes x,y,w,h in pixels, got {text!r}") from None
    if min(x, y, w, h) < 0:
        raise PersonalVLMError(f"--roi values must not be negative, got {text!r}")
    return RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h)


def _check(response, what: str):
    if not response.success:
        raise PersonalVLMError(f"{what}: {response.message}")
    return response


def _teach(client: NodeClient, args) -> None:
    from personal_vlm_interfaces.srv import TeachConcept

    request = TeachConcept.Request(name=args.name, category=args.category, roi=_roi(args.roi),
                                   images=[_image_msg(p) for p in args.images], overwrite=args.overwrite,
                                   add=args.add)
    response = _check(client.call(TeachConcept, "teach_concept", request), "teach")
    _emit(args, {"name": args.name, "memory_tokens": response.memory_tokens, "keywords": list(response.keywords),
                 "seconds": round(response.seconds, 3), "message": response.message}, response.message)


def _ask(client: NodeClient, args) -> None:
    from sensor_msgs.msg import Image

    image = _image_msg(args.image) if args.image else Image()
    if args.stream:
        answer, concepts = _ask_streaming(client, args, image)
    else:
        from personal_vlm_interfaces.srv import Ask

        response = _check(client.call(Ask, "ask", Ask.Request(question=args.question, image=image)), "ask")
        answer, concepts = response.answer, list(response.concepts)
        _emit(args, {"answer": answer, "concepts": concepts}, answer)
        return
    if getattr(args, "json", False):
        _emit(args, {"answer": answer, "concepts": concepts}, answer)


def _ask_streaming(client: NodeClient, args, image):
    """The ask action: the answer is printed as it grows; Ctrl-C cancels the goal."""
    shown = [""]
    quiet = getattr(args, "json", False)

    def feedback(_goal, message):
        if not quiet and message.new_text:
            sys.stdout.write(message.new_text)
            sys.stdout.flush()
            shown[0] += message.new_text

    client.handshake()
    _status, result, _partials = client.ask_goal(args.question, image, on_feedback=feedback)
    _check(result, "ask")
    if not quiet:
        sys.stdout.write(result.answer[len(shown[0]):] if result.answer.startswith(shown[0]) else
                         "\n" + result.answer)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return result.answer, list(result.concepts)


def _list(client: NodeClient, args) -> None:
    from personal_vlm_interfaces.srv import ListConcepts

    response = _check(client.call(ListConcepts, "list_concepts", ListConcepts.Request(), idempotent=True), "list")
    rows = [{"name": n, "category": c, "memory_tokens": int(t), "keywords": json.loads(k or "[]")}
            for n, c, t, k in zip(response.names, response.categories, response.memory_tokens,
                                  response.keywords_json)]
    text = "\n".join(f"{r['name']}\t{r['category'] or '-'}\t{r['memory_tokens']} tokens\t"
                     f"{', '.join(r['keywords'])}" for r in rows)
    _emit(args, {"concepts": rows}, text or "no concepts taught yet")


def _forget(client: NodeClient, args) -> None:
    from personal_vlm_interfaces.srv import ForgetConcept

    response = _check(client.call(ForgetConcept, "forget_concept", ForgetConcept.Request(name=args.name)),
                      "forget")
    _emit(args, {"forgotten": args.name, "message": response.message}, response.message)


def _watch(client: NodeClient, args) -> None:
    topic = client.name(f"{client.node_name}/detections")
    arrived = client.arrived
    frames = client.record_detections()
    deadline = time.monotonic() + client.timeout
    while client.node.count_publishers(topic) == 0:
        if time.monotonic() > deadline:
            raise client._absent(topic)
        time.sleep(0.1)
    end = time.monotonic() + args.seconds if args.seconds > 0 else None
    shown = 0
    while not args.count or shown < args.count:
        with arrived:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            if len(frames) <= shown:
                arrived.wait(0.5 if left is None else min(left, 0.5))
                continue
            batch = frames[shown:]
        for msg in batch[: (args.count - shown) if args.count else None]:
            _print_detections(args, msg)
            shown += 1


def _print_detections(args, msg) -> None:
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    rows = [{"name": d.name, "category": d.category, "score": round(d.score, 4), "source": d.source,
             "center": [round(d.center_x, 1), round(d.center_y, 1)], "size": [round(d.size_x, 1), round(d.size_y, 1)],
             "track_id": d.track_id} for d in msg.detections]
    text = ", ".join(f"{r['name']} {r['score']:.2f} at {r['center']} size {r['size']}" for r in rows) or "nothing"
    _emit(args, {"stamp": stamp, "frame_id": msg.header.frame_id, "detections": rows},
          f"{stamp:.3f} {msg.header.frame_id}: {text}")


VERBS = {"teach": _teach, "ask": _ask, "list": _list, "forget": _forget, "watch": _watch}
