"""VerificationQueue: budget, cache, bounded queue, never blocking, surviving failures."""

import logging
import threading
import time

import pytest

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.verification_queue import Request, VerificationQueue


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class RecordingVerify:
    """Answers "verdict:<payload>" and remembers every request it saw."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        return f"verdict:{request.payload}"


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def drain(queue):
    while queue.verify_next():
        pass


def test_budget_allows_three_verifications_in_one_second_at_two_per_second():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_per_second=2.0, max_pending=10, clock=clock)
    for i in range(10):
        assert queue.submit(("mug", i), i) is None
    # Tokens: 1 at t=0 (burst 1), then one every 0.5 s -> t = 0, 0.5, 1.0.
    ran_at = []
    for tick in range(9):
        clock.now = tick / 8
        before = len(verify.requests)
        drain(queue)
        ran_at += [clock.now] * (len(verify.requests) - before)
    assert ran_at == [0.0, 0.5, 1.0]
    assert [r.key for r in verify.requests] == [("mug", 0), ("mug", 1), ("mug", 2)]
    assert queue.stats["verified"] == 3
    # The 2nd, 3rd and (still waiting) 4th requests each found the bucket empty.
    assert queue.stats["budget_waits"] == 3
    assert len(queue.pending) == 7


def test_budget_with_submissions_spread_over_one_second():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_per_second=2.0, max_pending=10, clock=clock)
    for i in range(10):
        clock.now = i / 9
        queue.submit(("mug", i), i)
        drain(queue)
    assert clock.now == pytest.approx(1.0)
    assert 2 <= len(verify.requests) <= 3
    assert queue.stats["submitted"] == 10


def test_worker_thread_waits_for_budget():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_per_second=2.0, max_pending=10, clock=clock)
    queue.start()
    try:
        for i in range(5):
            queue.submit(i, i)
        assert wait_until(lambda: queue.stats["verified"] == 1)
        time.sleep(0.2)  # the fake clock is frozen, so no token can come due
        assert queue.stats["verified"] == 1
        clock.now = 0.5
        queue.submit(99, 99)  # wakes the worker, which now finds a token
        assert wait_until(lambda: queue.stats["verified"] == 2)
    finally:
        assert queue.stop(timeout=5.0)
    assert [r.key for r in verify.requests] == [0, 1]


def test_cached_result_is_returned_without_verifying_again():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, cache_seconds=5.0, clock=clock)
    assert queue.submit(("mug", 1), "frame-1") is None
    assert queue.verify_next()
    clock.now = 4.0
    assert queue.submit(("mug", 1), "frame-2") == "verdict:frame-1"
    assert queue.result(("mug", 1)) == "verdict:frame-1"
    assert len(verify.requests) == 1
    assert queue.stats["cache_hits"] == 1
    assert queue.pending == []


def test_stale_result_expires_and_key_is_queued_again():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, cache_seconds=5.0, clock=clock)
    queue.submit("k", "old")
    queue.verify_next()
    clock.now = 5.5
    assert queue.result("k") is None
    assert queue.submit("k", "new") is None
    assert queue.verify_next()
    assert queue.result("k") == "verdict:new"


def test_full_queue_drops_oldest_pending_request():
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_pending=2, clock=FakeClock())
    queue.submit("a", 1)
    queue.submit("b", 1)
    queue.submit("c", 1)
    assert queue.pending == ["b", "c"]
    assert queue.stats["dropped"] == 1


def test_pending_key_takes_newest_payload_without_duplicate():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_pending=3, clock=clock)
    queue.submit("a", "a1")
    queue.submit("b", "b1")
    clock.now = 0.25
    queue.submit("a", "a2")
    assert queue.pending == ["a", "b"]
    assert queue.stats["dropped"] == 0
    queue.verify_next()
    assert verify.requests == [Request("a", "a2", 0.25)]


def test_submit_does_not_wait_for_slow_verify():
    started, release = threading.Event(), threading.Event()

    def slow_verify(request):
        started.set()
        release.wait(timeout=30.0)
        return "done"

    queue = VerificationQueue(slow_verify, max_per_second=100.0)
    queue.start()
    try:
        queue.submit("first", None)
        assert started.wait(timeout=5.0)
        returned, answers = threading.Event(), []

        def submit_more():
            answers.append(queue.submit("second", None))
            answers.append(queue.submit("first", None))     # in flight: not queued again
            returned.set()

        threading.Thread(target=submit_more, daemon=True).start()
        # Both return while the verification they queue behind is still blocked.
        assert returned.wait(timeout=5.0) and not release.is_set()
        assert answers == [None, None]
        assert queue.pending == ["second"]
    finally:
        release.set()
        assert queue.stop(timeout=5.0)


def test_exception_in_verify_is_logged_and_worker_keeps_going(caplog):
    def flaky_verify(request):
        if request.key == "bad":
            raise RuntimeError("model exploded")
        return "ok"

    queue = VerificationQueue(flaky_verify, max_per_second=1000.0)
    with caplog.at_level(logging.ERROR, logger="personal_vlm_node.verification_queue"):
        queue.start()
        try:
            queue.submit("bad", None)
            assert wait_until(lambda: queue.stats["errors"] == 1)
            queue.submit("good", None)
            assert wait_until(lambda: queue.result("good") == "ok")
        finally:
            assert queue.stop(timeout=5.0)
    assert queue.result("bad") is None
    assert queue.stats["verified"] == 1
    assert any("bad" in r.getMessage() for r in caplog.records)


def test_stop_joins_worker_thread():
    threads = []

    def verify(request):
        threads.append(threading.current_thread())
        return True

    queue = VerificationQueue(verify, max_per_second=1000.0)
    queue.start()
    queue.submit("k", None)
    assert wait_until(lambda: queue.result("k") is True)
    assert threads[0].is_alive()
    assert queue.stop(timeout=5.0) is True
    assert not threads[0].is_alive()
    # Stopping twice, or a queue never started, is fine.
    assert queue.stop() is True
    assert VerificationQueue(verify).stop() is True


def test_invalidate_by_concept_name_drops_cache_and_pending():
    clock = FakeClock()
    queue = VerificationQueue(RecordingVerify(), max_per_second=1000.0, clock=clock)
    for key in [("mug", 1), ("cat", 1), ("mug", 2)]:
        queue.submit(key, key)
        clock.now += 1.0
        queue.verify_next()
    queue.submit(("mug", 3), None)
    assert queue.invalidate("mug") == 3
    assert queue.result(("mug", 1)) is None
    assert queue.result(("mug", 2)) is None
    assert queue.result(("cat", 1)) == "verdict:('cat', 1)"
    assert queue.pending == []


def test_invalidate_by_predicate_and_tuple_prefix():
    clock = FakeClock()
    queue = VerificationQueue(RecordingVerify(), max_per_second=1000.0, clock=clock)
    for key in [("mug", 1), ("mug", 2), ("cat", 7)]:
        queue.submit(key, 0)
        clock.now += 1.0
        queue.verify_next()
    assert queue.invalidate(("mug", 2)) == 1
    assert queue.invalidate(lambda key: key[1] == 7) == 1
    assert queue.result(("mug", 1)) == "verdict:0"


def test_result_of_verification_invalidated_while_running_is_not_cached():
    queue = None

    def verify(request):
        queue.invalidate("mug")  # the concept is forgotten while the VLM is busy
        return "yes"

    queue = VerificationQueue(verify)
    queue.submit(("mug", 1), None)
    assert queue.verify_next()
    assert queue.result(("mug", 1)) is None
    assert queue.stats["verified"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"max_per_second": 0.0}, {"cache_seconds": -1.0}, {"max_pending": 0}, {"max_busy_fraction": 0.0}, {"max_busy_fraction": 1.5}, {"max_defer_seconds": -1.0}],
)
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(PersonalVLMError):
        VerificationQueue(RecordingVerify(), **kwargs)


class TimedVerify(RecordingVerify):
    """Takes `seconds` of the fake clock per verification."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def __call__(self, request):
        self.clock.now += self.seconds
        return super().__call__(request)


def test_busy_fraction_caps_verification_time_not_just_rate():
    clock = FakeClock()
    verify = TimedVerify(clock, seconds=1.0)
    queue = VerificationQueue(verify, max_per_second=1000.0, max_pending=10, clock=clock, max_busy_fraction=0.25)
    for i in range(3):
        queue.submit(("mug", i), i)
    assert queue.verify_next()                # runs 0 -> 1.0 s
    # busy 1 s at f = 0.25: idle for 1 * 0.75 / 0.25 = 3 s before the next one.
    clock.now = 3.99
    assert not queue.verify_next()
    clock.now = 4.0
    assert queue.verify_next()                # runs 4.0 -> 5.0 s
    clock.now = 7.99
    assert not queue.verify_next()
    clock.now = 8.0
    assert queue.verify_next()
    assert queue.stats["busy_seconds"] == 3.0
    assert len(verify.requests) == 3


def test_full_busy_fraction_lets_verifications_run_back_to_back():
    clock = FakeClock()
    verify = TimedVerify(clock, seconds=1.0)
    queue = VerificationQueue(verify, max_per_second=1000.0, max_pending=10, clock=clock, max_busy_fraction=1.0)
    for i in range(3):
        queue.submit(("mug", i), i)
    drain(queue)
    assert len(verify.requests) == 3 and clock.now == 3.0


def test_no_verification_starts_while_a_frame_is_in_flight():
    clock = FakeClock()
    verify = RecordingVerify()
    queue = VerificationQueue(verify, max_per_second=1000.0, clock=clock)
    queue.submit("mug", 1)
    with queue.frame():
        assert not queue.verify_next()
        assert queue.pending == ["mug"]
    assert queue.verify_next()
    assert queue.result("mug") == "verdict:1"


def test_running_verification_pauses_at_yield_point_until_frame_ends_and_pause_is_not_busy_time():
    clock = FakeClock()
    started, go, done = threading.Event(), threading.Event(), threading.Event()
    queue = None

    def verify(request):
        clock.now += 1.0                      # 1 s of work before the yield point
        started.set()
        go.wait(5.0)
        queue.yield_point()
        done.set()
        return "ok"

    queue = VerificationQueue(verify, max_per_second=1000.0, clock=clock, max_busy_fraction=0.5)
    queue.submit("mug", None)
    worker = threading.Thread(target=queue.verify_next)
    worker.start()
    assert started.wait(5.0)
    with queue.frame():
        go.set()
        assert wait_until(lambda: queue.stats["yields"] == 1)
        assert not done.is_set()
        clock.now += 2.0                      # the frame takes 2 s; verification waits
    worker.join(5.0)
    assert done.is_set() and queue.result("mug") == "ok"
    assert queue.stats["yield_seconds"] == 2.0
    assert queue.stats["busy_seconds"] == 1.0
    # Next start: 1 s busy at f = 0.5 -> 1 s after the end (t = 3).
    queue.submit("cup", None)
    clock.now = 3.99
    assert not queue.verify_next()
    clock.now = 4.0
    assert queue.verify_next()


def test_yield_point_is_a_no_op_outside_a_verification():
    queue = VerificationQueue(RecordingVerify(), max_per_second=1000.0, clock=FakeClock())
    with queue.frame():
        queue.yield_point()                   # the frame thread itself must never block
    assert queue.stats["yields"] == 0


def test_worker_thread_delivers_verdicts_between_frames():
    queue = VerificationQueue(RecordingVerify(), max_per_second=1000.0, max_busy_fraction=1.0)
    queue.start()
    try:
        with queue.frame():
            queue.submit("mug", 7)
            time.sleep(0.05)
            assert queue.result("mug") is None    # waits for the frame to end
        assert wait_until(lambda: queue.result("mug") == "verdict:7")
    finally:
        assert queue.stop(timeout=5.0)


def test_frames_back_to_back_hold_a_verification_back_at_most_max_defer_seconds():
    clock = FakeClock()
    queue = None
    yielded_at = []

    def verify(request):
        queue.yield_point()                   # held 2 s already: must not pause again
        yielded_at.append(clock.now)
        return "ok"

    queue = VerificationQueue(verify, max_per_second=1000.0, clock=clock, max_defer_seconds=2.0)
    queue.submit("mug", None)
    with queue.frame():
        assert not queue.verify_next()
        clock.now = 1.99
        assert not queue.verify_next()
    with queue.frame():                       # the next frame follows at once
        clock.now = 2.0
        assert queue.verify_next()            # starved long enough: runs despite the frame
    assert yielded_at == [2.0] and queue.stats["yields"] == 0
    assert queue.result("mug") == "ok"


def test_a_paused_verification_resumes_after_max_defer_seconds_even_if_frames_continue():
    reached, go, done = threading.Event(), threading.Event(), threading.Event()
    queue = None

    def verify(request):
        reached.set()
        go.wait(5.0)
        queue.yield_point()
        done.set()
        return "ok"

    queue = VerificationQueue(verify, max_per_second=1000.0, max_defer_seconds=0.05)
    queue.submit("mug", None)
    worker = threading.Thread(target=queue.verify_next)
    worker.start()
    assert reached.wait(5.0)
    with queue.frame():                       # a frame that never ends, for the verifier
        go.set()
        assert done.wait(5.0)
        assert queue.stats["yields"] == 1
    worker.join(5.0)


def test_worker_starts_a_verification_held_back_by_endless_frames_after_max_defer_seconds():
    queue = VerificationQueue(RecordingVerify(), max_per_second=1000.0, max_defer_seconds=0.05)
    queue.start()
    try:
        with queue.frame():
            queue.submit("mug", 3)
            assert wait_until(lambda: queue.result("mug") == "verdict:3")
    finally:
        assert queue.stop(timeout=5.0)
