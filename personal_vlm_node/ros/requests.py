"""Requests of one kind served one at a time in order of arrival, or refused "busy" at once."""

from __future__ import annotations

import collections
import threading

from ..errors import PersonalVLMError
from ..output import plural

WITHDRAW_CHECK_S = 0.1             # how often a waiting ask goal checks whether it was cancelled


class RequestLine:
    """Requests of one kind, worked on one at a time in order of arrival.

    ``run`` answers at once when ``limit()`` requests are already waiting behind the one being
    worked on (PersonalVLMError "busy: …"), or when the line is closed; otherwise it waits for its
    turn in the calling (executor) thread and runs the work. Waiting blocks the thread rather than
    awaiting in a coroutine: rclpy's executor resumes every awaiting coroutine at each of its turns,
    once per camera frame, which cost a sixth of a core for five waiting requests at 30 frames/s.
    """

    def __init__(self, kind: str, limit):
        self.kind = kind
        self._limit = limit
        self._condition = threading.Condition()
        self._waiting: collections.deque = collections.deque()     # tickets, in order of arrival
        self._running = False
        self._closed = False

    def run(self, work, withdraw_if=None):
        """``work()`` in its turn. While it waits, ``withdraw_if()`` is asked every
        WITHDRAW_CHECK_S; when that is true the request leaves the line unworked on (a cancelled
        action goal)."""
        ticket = object()
        with self._condition:
            if self._closed:
                raise PersonalVLMError("the node is shutting down")
            waiting = len(self._waiting)
            if waiting + self._running > self._limit():
                raise PersonalVLMError(self._busy(waiting))
            self._waiting.append(ticket)
        try:
            while True:
                with self._condition:
                    if self._closed:
                        raise PersonalVLMError("the node is shutting down")
                    if not self._running and self._waiting[0] is ticket:
                        self._waiting.popleft()
                        self._running = True
                        break
                    self._condition.wait(WITHDRAW_CHECK_S if withdraw_if is not None else None)
                if withdraw_if is not None and withdraw_if():      # outside our lock: it takes the goal's
                    raise PersonalVLMError("withdrawn before it was worked on")
        except BaseException:
            with self._condition:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                self._condition.notify_all()            # the next one may be first now
            raise
        try:
            return work()
        finally:
            with self._condition:
                self._running = False
                self._condition.notify_all()

    def _busy(self, waiting: int) -> str:
        if waiting == 0:
            return f"busy: another {self.kind} request is being worked on; try again in a few seconds"
        are = "is" if waiting == 1 else "are"
        return (f"busy: {plural(waiting, self.kind + ' request')} {are} already waiting; "
                "try again in a few seconds")

    def close(self) -> None:
        """Refuse new requests and answer the waiting ones "shutting down"; the one being worked on
        ends as the model is interrupted."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
