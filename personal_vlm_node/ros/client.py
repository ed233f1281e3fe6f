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


def _emit(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False) if getattr(args, "json", False) else text, flush=True)


class NodeClient:
    """An rclpy node of its own context, spun on a thread, that talks to one personal_vlm node."""

    def __init__(self, namespace: str, node_name: str, timeout: float):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.namespace = "/" + namespace.strip("/") if namespace.strip("/") else ""
        self.node_name = node_name
        self.timeout = timeout
        self._known = False           # the node has answered this process once
        self.context = Context()
        rclpy.init(args=[], context=self.context)
        self.node = rclpy.create_node(f"personal_vlm_cli_{os.getpid()}", context=self.context,
                                      start_parameter_services=False)
        self.executor = SingleThreadedExecutor(context=self.context)
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
        return f"{self.namespace}/{relative}"

    def _absent(self, what: str) -> PersonalVLMError:
        domain = os.environ.get("ROS_DOMAIN_ID", "0")
        return PersonalVLMError(
            f"no node answers on {what} within {self.timeout:g} s; start it (./quickstart.sh node or "
            f"ros2 launch personal_vlm_node assistant.launch.py), or check the namespace (--namespace) "
            f"and that both use ROS_DOMAIN_ID={domain}")

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
    from personal_vlm_interfaces.action import Ask
    from rclpy.action import ActionClient

    action = ActionClient(client.node, Ask, client.name("ask"))
    shown = [""]
    quiet = getattr(args, "json", False)

    def feedback(msg):
        text = msg.feedback.partial_answer
        if not quiet and text.startswith(shown[0]):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    try:
        client.handshake()
        if not action.wait_for_server(timeout_sec=client.timeout):
            raise client._absent(f"the action {client.name('ask')}")
        goal = client._wait(action.send_goal_async(Ask.Goal(question=args.question, image=image),
                                                   feedback_callback=feedback), "ask")
        if not goal.accepted:
            raise PersonalVLMError("ask: the node refused the question (it is shutting down)")
        try:
            result = client._wait(goal.get_result_async(), "ask").result
        except KeyboardInterrupt:
            client._wait(goal.cancel_goal_async(), "cancel")
            raise
        _check(result, "ask")
        if not quiet:
            sys.stdout.write(result.answer[len(shown[0]):] if result.answer.startswith(shown[0]) else
                             "\n" + result.answer)
            sys.stdout.write("\n")
            sys.stdout.flush()
        return result.answer, list(result.concepts)
    finally:
        action.destroy()


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
    from personal_vlm_interfaces.msg import DetectionArray

    topic = client.name(f"{client.node_name}/detections")
    arrived = threading.Condition()
    frames: list = []

    def keep(msg):
        with arrived:
            frames.append(msg)
            arrived.notify_all()

    client.node.create_subscription(DetectionArray, topic, keep, 10)
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
