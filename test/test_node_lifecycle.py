"""The managed (lifecycle) node, driven through its lifecycle services from an rclpy client.

configure loads the model, activate serves (services and detections), deactivate stops
processing frames and serving, cleanup frees the model, shutdown ends it; Ctrl-C then exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from personal_vlm_interfaces.msg import DetectionArray  # noqa: E402
from personal_vlm_interfaces.srv import ListConcepts  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

NAMESPACE = f"/vlm_lifecycle_{os.getpid()}"
WAIT_S = 120.0
ANSWER_RETRY_S = 10.0


def _frame() -> Image:
    array = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)   # (H, W, 3)
    return Image(height=120, width=160, encoding="rgb8", step=480, data=array.tobytes())


class LifecycleClient:
    def __init__(self):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("lifecycle_test_client", namespace=NAMESPACE, context=self.context)
        self.frames = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.detections = []
        self.node.create_subscription(DetectionArray, "personal_vlm/detections", self.detections.append, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def call(self, srv_type, name, timeout=WAIT_S, answer_s=WAIT_S, **fields):
        """One request; None when the service does not appear within ``timeout`` or no answer
        comes within ``answer_s``."""
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                return None
            done = threading.Event()
            future = client.call_async(srv_type.Request(**fields))
            future.add_done_callback(lambda _: done.set())
            return future.result() if done.wait(answer_s) else None
        finally:
            self.node.destroy_client(client)

    def state(self) -> int:
        """The node's lifecycle state. Asking is idempotent, so a request whose answer is lost
        (the first request of a new participant can race DDS discovery on a loaded machine) is
        simply asked again."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            answer = self.call(GetState, "personal_vlm/get_state", answer_s=ANSWER_RETRY_S)
            if answer is not None:
                return answer.current_state.id
        raise AssertionError(f"no answer from personal_vlm/get_state within {WAIT_S:g} s")

    def transition(self, transition_id, goal_state) -> bool:
        """Request a transition; if its answer does not come, the node's state says whether it
        happened (a transition must not be requested twice)."""
        client = self.node.create_client(ChangeState, "personal_vlm/change_state")
        try:
            assert client.wait_for_service(timeout_sec=WAIT_S), "no personal_vlm/change_state"
            done = threading.Event()
            future = client.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
            future.add_done_callback(lambda _: done.set())
            deadline = time.monotonic() + WAIT_S
            while not done.wait(ANSWER_RETRY_S):
                if self.state() == goal_state:
                    return True
                assert time.monotonic() < deadline, f"transition {transition_id}: no answer within {WAIT_S:g} s"
            return future.result().success
        finally:
            self.node.destroy_client(client)

    def frames_processed_in(self, seconds: float) -> int:
        start = len(self.detections)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.frames.publish(_frame())
            time.sleep(0.1)
        return len(self.detections) - start

    def close(self):
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def lifecycle_node(tiny_checkpoints, tmp_path):
    wrapper = Path(sys.prefix) / "lib" / "personal_vlm_node" / "assistant_lifecycle_node"
    head = [str(wrapper)] if wrapper.is_file() else [sys.executable, "-m", "personal_vlm_node.ros.lifecycle"]
    command = head + ["--ros-args", "-r", f"__ns:={NAMESPACE}",
                      "-p", f"model:={tiny_checkpoints['qwen2_5_vl']}", "-p", "device:=cpu",
                      "-p", "dtype:=float32", "-p", f"store_dir:={tmp_path / 'store'}",
                      "-p", "process_rate_hz:=10", "-p", "verification:=false"]
    env = dict(os.environ)
    env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
    env["PYTHONUNBUFFERED"] = "1"
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parent.parent)
    proc.log = log
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    print(f"---- node log ----\n{log.read_text()}")      # shown by pytest when the test failed


def test_lifecycle_transitions_load_serve_stop_and_free(lifecycle_node):
    ros = LifecycleClient()
    try:
        assert ros.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert ros.call(ListConcepts, "list_concepts", timeout=1.0) is None     # not serving yet

        assert ros.transition(Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE)
        assert ros.state() == State.PRIMARY_STATE_INACTIVE
        assert "configured:" in lifecycle_node.log.read_text()
        assert ros.frames_processed_in(1.5) == 0

        assert ros.transition(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert ros.state() == State.PRIMARY_STATE_ACTIVE
        listed = ros.call(ListConcepts, "list_concepts")
        assert listed.success and listed.message == "0 concepts"
        assert ros.frames_processed_in(3.0) > 0

        assert ros.transition(Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_INACTIVE)
        assert ros.state() == State.PRIMARY_STATE_INACTIVE
        time.sleep(0.5)
        assert ros.frames_processed_in(1.5) == 0
        assert ros.call(ListConcepts, "list_concepts", timeout=1.0) is None

        assert ros.transition(Transition.TRANSITION_CLEANUP, State.PRIMARY_STATE_UNCONFIGURED)
        assert ros.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert "the model is unloaded" in lifecycle_node.log.read_text()

        # Configure again: the model loads a second time, and activate serves again.
        assert ros.transition(Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE)
        assert ros.transition(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert ros.call(ListConcepts, "list_concepts").success

        assert ros.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN, State.PRIMARY_STATE_FINALIZED)
        assert ros.state() == State.PRIMARY_STATE_FINALIZED
    finally:
        ros.close()
    lifecycle_node.send_signal(signal.SIGINT)
    lifecycle_node.wait(timeout=30)
    output = lifecycle_node.log.read_text()
    assert lifecycle_node.returncode == 0, output
    assert "Traceback" not in output and "never retrieved" not in output
