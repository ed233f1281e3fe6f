"""VerificationQueue: settle uncertain detections with the VLM, off the frame path, on a budget.

The frame path calls `submit(key, payload)` for every (concept, track) whose score fell between
the reject and accept thresholds. It never waits: it gets a fresh cached result for the key if
one exists, else the request is queued and `None` comes back (the detection stays uncertain on
this frame). One worker thread runs the slow `verify` function (Ego's in-context check, then R2P)
on the queued requests.

Budget, in rate and in time. A token bucket of capacity 1 refilled at `max_per_second` tokens per
second; each verification spends one token, so on average at most `max_per_second` run per
second. A rate is not a time budget (one verification can take seconds on a CPU), so the busy
fraction is capped too: after a verification that kept the worker busy for d seconds, the next
one starts no earlier than d·(1−f)/f later, f = `max_busy_fraction`; over any stretch the worker
computes at most about f of the time.

Frames first. The frame path wraps each frame in `with queue.frame():`. The worker starts no
verification while a frame is in flight, and a running one pauses at its next `yield_point()`
(the caller wires that into the model, e.g. before every linear layer) until no frame is in
flight; time spent paused does not count as busy. Verification thus runs in the frame path's idle
time. So that verdicts still arrive when frames come back to back, one verification is held back
by frames (before it starts and while paused) for at most `max_defer_seconds` in all; after that
it runs through, still under the busy-fraction cap.

Queue: at most `max_pending` requests, oldest first. A key that is already pending keeps its
place and takes the newest payload (the latest frame is the one worth checking); when the queue
is full a new key evicts the oldest pending request. A key that is being verified right now is
not queued again: its result arrives soon.

Cache: each result is kept per key for `cache_seconds`, so a track is verified at most about
once per `cache_seconds` however many frames it stays uncertain. A `verify` that returns None
("no verdict") is cached like any result; one that raises is logged, counted and not cached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from personal_vlm_node.errors import PersonalVLMError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One case handed to `verify`."""

    key: Hashable  # typically (concept name, track id)
    payload: Any  # whatever `verify` needs: frame, candidate concepts, ...
    submitted_at: float  # queue clock time of the latest submit for this key


# Whatever `verify` returns; the queue only stores and hands it back.
Result = Any


class VerificationQueue:
    """A budgeted, cached, never-blocking queue in front of one slow `verify` function."""

    def __init__(
        self,
        verify: Callable[[Request], Result],
        max_per_second: float = 2.0,
        cache_seconds: float = 5.0,
        max_pending: int = 4,
        clock: Callable[[], float] = time.monotonic,
        max_busy_fraction: float = 0.5,
        max_defer_seconds: float = 10.0,
    ) -> None:
        if not max_per_second > 0:
            raise PersonalVLMError(f"max_per_second must be > 0, got {max_per_second!r}")
        if not cache_seconds >= 0:
            raise PersonalVLMError(f"cache_seconds must be >= 0, got {cache_seconds!r}")
        if not 0.0 < max_busy_fraction <= 1.0:
            raise PersonalVLMError(f"max_busy_fraction must lie in (0, 1], got {max_busy_fraction!r}")
        if not max_defer_seconds >= 0:
            raise PersonalVLMError(f"max_defer_seconds must be >= 0, got {max_defer_seconds!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise PersonalVLMError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self._verify = verify
        self.max_per_second = float(max_per_second)
        self.cache_seconds = float(cache_seconds)
        self.max_pending = max_pending
        self.max_busy_fraction = float(max_busy_fraction)
        self.max_defer_seconds = float(max_defer_seconds)
        self._held_since: float | None = None  # when frames first held back the next start
        self._clock = clock
        self._not_before = -float("inf")  # busy-fraction cap: no verification starts before this
        self._frames_in_flight = 0
        self._worker_local = threading.local()  # .verifying: this thread runs `verify` now
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, Request] = OrderedDict()
        self._cache: dict[Hashable, tuple[Result, float]] = {}  # key -> (result, finished at)
        self._inflight: Hashable | None = None
        self._inflight_cancelled = False
        self._has_inflight = False
        self._deferred_before_start = 0.0
        self._tokens = 1.0  # token bucket level, capacity 1 (burst 1)
        self._refilled_at = clock()
        self._waiting_for_budget = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {
            "submitted": 0,  # submit() calls
            "verified": 0,  # verify() calls that returned a result
            "errors": 0,  # verify() calls that raised
            "dropped": 0,  # pending requests evicted by newer ones
            "cache_hits": 0,  # submit() calls answered from the cache
            "budget_waits": 0,  # verifications that had to wait for the budget
            "busy_seconds": 0.0,  # time spent in verify(), pauses excluded
            "yields": 0,  # pauses of a running verification for a frame
            "yield_seconds": 0.0,  # time running verifications spent paused
        }

    # ------------------------------------------------------------ frame path
    def submit(self, key: Hashable, payload: Any) -> Result | None:
        """Return a fresh cached result for `key`, or queue the case and return None."""
        with self._cond:
            self.stats["submitted"] += 1
            now = self._clock()
            cached = self._fresh(key, now)
            if cached is not None:
                self.stats["cache_hits"] += 1
                return cached[0]
            if self._has_inflight and key == self._inflight:
                return None
            request = Request(key, payload, now)
            if key in self._pending:
                self._pending[key] = request  # newest payload, same place in the queue
            else:
                if len(self._pending) >= self.max_pending:
                    self._pending.popitem(last=False)
                    self.stats["dropped"] += 1
                self._pending[key] = request
            self._cond.notify()
            return None

    def result(self, key: Hashable) -> Result | None:
        """The latest result for `key` if it is still fresh, else None."""
        with self._cond:
            cached = self._fresh(key, self._clock())
            return None if cached is None else cached[0]

    def invalidate(self, key_prefix_or_predicate: Hashable | Callable[[Hashable], bool]) -> int:
        """Forget cached results and pending requests of matching keys; return how many.

        A callable is used as a predicate on keys. Anything else is a prefix: a tuple matches
        the keys that start with it, any other value matches the key equal to it and the
        tuple keys whose first element equals it, so `invalidate("mug")` drops ("mug", 3).
        A matching verification in flight finishes, but its result is not cached.
        """
        matches = _key_filter(key_prefix_or_predicate)
        with self._cond:
            cache_keys = [k for k in self._cache if matches(k)]
            pending_keys = [k for k in self._pending if matches(k)]
            for k in cache_keys:
                del self._cache[k]
            for k in pending_keys:
                del self._pending[k]
            if self._has_inflight and matches(self._inflight):
                self._inflight_cancelled = True
            return len(cache_keys) + len(pending_keys)

    @property
    def pending(self) -> list[Hashable]:
        """Keys waiting for verification, oldest first."""
        with self._cond:
            return list(self._pending)

    @contextmanager
    def frame(self) -> Iterator[None]:
        """Mark a frame in flight: verification does not start and pauses at its yield points."""
        with self._cond:
            self._frames_in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._frames_in_flight -= 1
                if self._frames_in_flight == 0:
                    self._cond.notify_all()

    def yield_point(self) -> None:
        """Pause the running verification while a frame is in flight; a no-op on other threads.

        Cheap enough to call before every layer of the model (one attribute read when idle).
        """
        local = self._worker_local
        if (not getattr(local, "verifying", False) or not self._frames_in_flight
                or local.deferred >= self.max_defer_seconds):
            return
        with self._cond:
            if not self._frames_in_flight:
                return
            self.stats["yields"] += 1
            local = self._worker_local
            paused_at = self._clock()
            while self._frames_in_flight and not self._stopping:
                left = self.max_defer_seconds - local.deferred - (self._clock() - paused_at)
                if left <= 0:
                    break                   # held back long enough: run through
                self._cond.wait(timeout=left)
            paused = self._clock() - paused_at
            self.stats["yield_seconds"] += paused
            local.paused += paused
            local.deferred += paused

    # ---------------------------------------------------------------- worker
    def start(self) -> None:
        """Start the worker thread (no-op if it runs)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="verification-queue", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker and join it; True if it ended within `timeout` seconds.

        A verification in progress is not interrupted: the worker ends after it.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        with self._cond:
            self._thread = None
            self._stopping = False   # verify_next() may still drive the queue by hand
        return True

    def verify_next(self) -> bool:
        """Run the oldest pending verification now if the budget allows; True if one ran.

        The worker thread's loop body, public for single-threaded callers and tests; don't call
        it while the worker runs.
        """
        with self._cond:
            request, _ = self._take(self._clock())
        if request is None:
            return False
        self._execute(request)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
                request, wait = self._take(self._clock())
                if request is None:
                    # Sleep until a token or the busy cap is due; a stop, a new submit or a
                    # frame's end wakes us earlier, which is harmless: the loop re-checks.
                    self._cond.wait(timeout=wait)
                    continue
            self._execute(request)

    def _take(self, now: float) -> tuple[Request | None, float]:
        """Pop the oldest request and spend a token, or say how long until one may start.

        Nothing starts while a frame is in flight, unless frames have held this start back for
        `max_defer_seconds` (a frame's end wakes the worker earlier). Called with the lock held.
        """
        if not self._pending:
            self._held_since = None
            return None, 0.0
        if now < self._not_before:
            return None, self._not_before - now
        if self._frames_in_flight:
            if self._held_since is None:
                self._held_since = now
            left = self.max_defer_seconds - (now - self._held_since)
            if left > 0:
                return None, left
        self._tokens = min(1.0, self._tokens + (now - self._refilled_at) * self.max_per_second)
        self._refilled_at = now
        if self._tokens < 1.0:
            if not self._waiting_for_budget:
                self._waiting_for_budget = True
                self.stats["budget_waits"] += 1
            return None, (1.0 - self._tokens) / self.max_per_second
        self._tokens -= 1.0
        self._waiting_for_budget = False
        self._deferred_before_start = 0.0 if self._held_since is None else now - self._held_since
        self._held_since = None
        key, request = self._pending.popitem(last=False)
        self._inflight = key
        self._has_inflight = True
        self._inflight_cancelled = False
        return request, 0.0

    def _execute(self, request: Request) -> None:
        """Run `verify` outside the lock, store its result and set the busy-fraction pause."""
        local = self._worker_local
        local.verifying, local.paused = True, 0.0
        local.deferred = self._deferred_before_start
        started = self._clock()
        try:
            result = self._verify(request)
        except Exception:  # a failing verifier must not take the worker down
            log.exception("verification of %r failed", request.key)
            with self._cond:
                self._spent(started, local.paused)
                self.stats["errors"] += 1
                self._has_inflight = False
                self._inflight = None
            return
        finally:
            local.verifying = False
        with self._cond:
            now = self._spent(started, local.paused)
            self.stats["verified"] += 1
            if not self._inflight_cancelled:
                self._prune(now)
                self._cache[request.key] = (result, now)
            self._has_inflight = False
            self._inflight = None

    def _spent(self, started: float, paused: float) -> float:
        """Account one verification's busy time and push the next start back; return now."""
        now = self._clock()
        busy = max(0.0, now - started - paused)
        self.stats["busy_seconds"] += busy
        f = self.max_busy_fraction
        self._not_before = now + busy * (1.0 - f) / f
        return now

    # --------------------------------------------------------------- helpers
    def _fresh(self, key: Hashable, now: float) -> tuple[Result, float] | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if now - entry[1] > self.cache_seconds:
            del self._cache[key]
            return None
        return entry

    def _prune(self, now: float) -> None:
        # Track ids only grow, so keys of dead tracks would pile up without this.
        stale = [k for k, (_, t) in self._cache.items() if now - t > self.cache_seconds]
        for k in stale:
            del self._cache[k]


def _key_filter(key_prefix_or_predicate: Any) -> Callable[[Hashable], bool]:
    if callable(key_prefix_or_predicate):
        return key_prefix_or_predicate
    prefix = key_prefix_or_predicate
    if isinstance(prefix, tuple):
        return lambda key: isinstance(key, tuple) and key[: len(prefix)] == prefix
    return lambda key: key == prefix or (isinstance(key, tuple) and key[:1] == (prefix,))
