"""The teach / ask / list / forget services and the ask action, over one Assistant.

Every request is taken from DDS as soon as it arrives (one reentrant callback group, a deep request
queue). Requests of each kind (teach, ask — the service and the action's goals —, list, forget)
are worked on one at a time in order of arrival (:class:`RequestLine`); one that finds
``max_waiting_requests`` of its kind already waiting is answered at once: ``success=false``,
"busy: …". On shutdown, requests in flight are ended (generation interrupted), waiting ones are not
started, and all are answered before the node is destroyed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback

from ..errors import PersonalVLMError
from ..output import plural
from ..settings import MAX_WAITING_REQUESTS
from .requests import RequestLine

REQUEST_KINDS = ("teach", "ask", "list", "forget")     # the ask action's goals wait with the asks
# The executor's threads: one for each request that may be worked on or wait in a RequestLine (the
# ask action's goals among the asks), and 8 more for the callbacks that must never wait behind them:
# camera, diagnostics, cancel requests, parameter services, and requests being answered busy. The
# pool starts its threads only as they are needed.
EXECUTOR_THREADS = len(REQUEST_KINDS) * (MAX_WAITING_REQUESTS + 1) + 8
WARNING_THROTTLE_S = 2.0       # a failing client must not flood the log
MAX_LOGGED_CHARS = 300
REQUESTS_DRAIN_TIMEOUT_S = 3.0   # shutdown waits this long for interrupted requests to answer
# rclpy's default service QoS keeps the last 10 requests that no callback has taken yet and silently
# replaces the oldest: a burst of 50 teach requests lost 39 while one teach ran. The callbacks now
# take every request at once (it joins its RequestLine or is answered busy), so this queue only
# holds a burst until the executor gets to it; 1000 is the depth ROS gives the parameter services,
# whose requests must not get lost either.
SERVICE_QUEUE_DEPTH = 1000


class AnswerStream:
    """The ask action's feedback: the answer so far and the text new since the previous feedback.

    The model's answer is decoded whole after every token, so its end may still change (a character
    whose bytes are not all generated shows as U+FFFD). Only text that will stay is sent: trailing
    U+FFFD is held back until the final answer. ``sent`` is the concatenation of every ``new_text``;
    a decoder that rewrote text already sent (not seen with the supported tokenizers) makes
    ``advance`` send nothing more until the text agrees again.
    """

    def __init__(self):
        self.sent = ""

    def advance(self, text: str, final: bool = False) -> str:
        """The new text to send for the answer so far (empty: nothing new that will stay)."""
        stable = text if final else text.rstrip("\ufffd")
        if not stable.startswith(self.sent):
            return ""
        new_text, self.sent = stable[len(self.sent):], stable
        return new_text


class Services:
    """The four services and the ask action; ``latest_frame`` gives the newest camera frame's array
    for requests that send no image."""

    def __init__(self, node, assistant, values: dict, latest_frame):
        from personal_vlm_interfaces.action import Ask as AskAction
        from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept
        from rclpy.action import ActionServer, CancelResponse, GoalResponse
        from rclpy.callback_groups import ReentrantCallbackGroup
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        self.node = node
        self.assistant = assistant
        self.log = node.get_logger()
        self._latest_frame = latest_frame
        # Requests being worked on or waiting, so that shutdown can let them answer before
        # destroying the node.
        self._requests = 0
        self._requests_done = threading.Condition()
        self.closing = False

        self.lines = {kind: RequestLine(kind, lambda: int(values["max_waiting_requests"]))
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
            goal_callback=lambda _goal: GoalResponse.REJECT if self.closing else GoalResponse.ACCEPT,
            cancel_callback=lambda _goal: CancelResponse.ACCEPT, callback_group=ReentrantCallbackGroup(),
            goal_service_qos_profile=request_qos, result_service_qos_profile=request_qos,
            cancel_service_qos_profile=request_qos)

    def close(self) -> None:
        """New requests are refused from here on, and waiting ones are answered "shutting down"."""
        self.closing = True
        for line in self.lines.values():
            line.close()

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
        self.ask_action.destroy()
        for service in self.services:
            self.node.destroy_service(service)

    def names(self) -> str:
        return (f"services {', '.join(s.service_name for s in self.services)}, "
                f"action {self.services[1].service_name}")

    @contextlib.contextmanager
    def _request(self):
        """One request: counted while it waits in its line or runs; refused once the node is closing."""
        with self._requests_done:
            if self.closing:
                raise PersonalVLMError("the node is shutting down")
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests -= 1
                self._requests_done.notify_all()

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
                arrays = [self._latest_frame()]
            rois = [roi_to_xywh(request.roi, a.shape[1], a.shape[0]) for a in arrays]
            known = request.add and self.assistant.knows(name)
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
            return self._latest_frame()
        try:
            return image_msg_to_array(image)
        except PersonalVLMError as exc:
            raise PersonalVLMError(f"image: {exc}") from exc

    def _ask(self, request, response):
        def work(out):
            array = self._question_image(request.image)
            result = self.assistant.ask(request.question, array, on_partial=lambda _text: not self.closing)
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
        stream = AnswerStream()

        def send(text: str, final: bool = False) -> None:
            new_text = stream.advance(text, final)
            if new_text:
                goal.publish_feedback(AskAction.Feedback(partial_answer=stream.sent, new_text=new_text))

        def partial(text: str) -> bool:
            if goal.is_cancel_requested or self.closing:
                return False
            send(text)
            return True

        result = self._serve("ask", "ask action", AskAction.Result(),
                             lambda out: self._answer_goal(out, request, partial),
                             withdraw_if=lambda: goal.is_cancel_requested)
        if result.success and not goal.is_cancel_requested:
            send(result.answer, final=True)       # what the last token's feedback held back
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
        if result.stopped and self.closing:
            raise PersonalVLMError("the node is shutting down")
        out.message = f"answered in {result.seconds:.1f} s"

    # ---- the same requests from the web console (personal_vlm_node.web), in the same lines --------
    def teach(self, request):
        """A TeachConcept request from elsewhere in the process, checked and queued as the service's."""
        from personal_vlm_interfaces.srv import TeachConcept

        return self._teach(request, TeachConcept.Response())

    def forget(self, request):
        from personal_vlm_interfaces.srv import ForgetConcept

        return self._forget(request, ForgetConcept.Response())

    def ask_streaming(self, question: str, on_partial):
        """An ask on the latest camera frame, in line with the others; ``on_partial(answer so far)``
        after every token, returning False stops the answer there."""
        from personal_vlm_interfaces.srv import Ask

        def partial(text: str) -> bool:
            return not self.closing and on_partial(text)

        return self._serve("ask", "web console ask", Ask.Response(),
                           lambda out: self._answer_goal(out, Ask.Request(question=question), partial))

    def _list(self, request, response):
        def work(out):
            records = self.assistant.concepts()
            out.names = [r.name for r in records]
            out.categories = [r.category for r in records]
            out.memory_tokens = [int(r.memory_tokens) for r in records]
            out.keywords_json = [json.dumps(list(r.keywords), ensure_ascii=False) for r in records]
            out.message = plural(len(records), "concept")
            own = self.assistant.concept_accepts()       # concept_thresholds on: each concept's accept
            if own:
                out.message += "; own accept thresholds: " + ", ".join(f"{n} {own[n]:.3f}" for n in sorted(own))
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
