"""The node process: rclpy started without its own signal handling, spun until Ctrl-C or SIGTERM,
then stopped so that requests in flight are answered before the node is destroyed.

Shared by the plain node (:mod:`.node`) and the lifecycle node (:mod:`.lifecycle`).
"""

from __future__ import annotations

import signal
import sys
import threading

from ..errors import PersonalVLMError
from .services import REQUESTS_DRAIN_TIMEOUT_S

NODE_NAME = "personal_vlm"
SPINNER_JOIN_TIMEOUT_S = 5.0     # and this long for the spinning thread to leave rclpy's wait


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


def say_shutting_down() -> None:
    print(f"[{NODE_NAME}] shutting down", file=sys.stderr, flush=True)


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
        say_shutting_down()
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


def serve(node, threads: int, start, release) -> int:
    """Run ``node`` until Ctrl-C or SIGTERM: ``start()`` sets it up, ``release()`` ends its work
    (True when every request in flight answered). Returns the exit code: 2 for a user error."""
    from rclpy.executors import MultiThreadedExecutor

    log = node.get_logger()
    code = 0
    spinner = None
    # Built before "ready" is logged: a Ctrl-C that lands while an executor is being constructed
    # leaves a half-made object whose destructor raises.
    executor = MultiThreadedExecutor(num_threads=threads)
    executor.add_node(node)
    try:
        start()
        spinner = spin_until_signal(executor)
    except PersonalVLMError as exc:
        log.error(str(exc))
        code = 2
    except KeyboardInterrupt:
        say_shutting_down()
    finally:
        stop_ros(node, executor, release(), spinner)
    return code
