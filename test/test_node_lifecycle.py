"""The managed (lifecycle) node, driven through its lifecycle services from an rclpy client.

configure loads the model, activate serves (services and detections), deactivate stops
processing frames and serving, cleanup frees the model, shutdown ends it; Ctrl-C then exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from lifecycle_msgs.msg import State, Transition  # noqa: E402
from personal_vlm_interfaces.srv import ListConcepts  # noqa: E402

from personal_vlm_node.ros.client import NodeClient  # noqa: E402
from personal_vlm_node.testing.kit import image_msg, node_command, node_env, pixels  # noqa: E402

NAMESPACE = f"/vlm_lifecycle_{os.getpid()}"
WAIT_S = 120.0


class LifecycleClient(NodeClient):
    """The node's client, with the few steps the lifecycle test repeats."""

    def __init__(self):
        super().__init__(NAMESPACE, timeout=WAIT_S, client_name="lifecycle_test_client")
        self.detections = self.record_detections()

    def frames_processed_in(self, seconds: float) -> int:
        frame = image_msg(pixels(3, 160, 120))
        start = len(self.detections)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.publish_frame(frame)
            time.sleep(0.1)
        return len(self.detections) - start


@pytest.fixture
def lifecycle_node(tiny_checkpoints, tmp_path):
    command = node_command("-r", f"__ns:={NAMESPACE}",
                           "-p", f"model:={tiny_checkpoints['qwen2_5_vl']}", "-p", "device:=cpu",
                           "-p", "dtype:=float32", "-p", f"store_dir:={tmp_path / 'store'}",
                           "-p", "process_rate_hz:=10", "-p", "verification:=false", "-p", "auto_calibrate:=false",
                           lifecycle=True)
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=node_env(),
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
        assert ros.lifecycle_state() == State.PRIMARY_STATE_UNCONFIGURED
        assert ros.send(ListConcepts, "list_concepts", ListConcepts.Request(), timeout=1.0) is None     # not serving yet

        assert ros.change_state(Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE)
        assert ros.lifecycle_state() == State.PRIMARY_STATE_INACTIVE
        assert "configured:" in lifecycle_node.log.read_text()
        assert ros.frames_processed_in(1.5) == 0

        assert ros.change_state(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert ros.lifecycle_state() == State.PRIMARY_STATE_ACTIVE
        listed = ros.send(ListConcepts, "list_concepts", ListConcepts.Request())
        assert listed.success and listed.message == "0 concepts"
        assert ros.frames_processed_in(3.0) > 0

        assert ros.change_state(Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_INACTIVE)
        assert ros.lifecycle_state() == State.PRIMARY_STATE_INACTIVE
        time.sleep(0.5)
        assert ros.frames_processed_in(1.5) == 0
        assert ros.send(ListConcepts, "list_concepts", ListConcepts.Request(), timeout=1.0) is None

        assert ros.change_state(Transition.TRANSITION_CLEANUP, State.PRIMARY_STATE_UNCONFIGURED)
        assert ros.lifecycle_state() == State.PRIMARY_STATE_UNCONFIGURED
        assert "the model is unloaded" in lifecycle_node.log.read_text()

        # Configure again: the model loads a second time, and activate serves again.
        assert ros.change_state(Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE)
        assert ros.change_state(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert ros.send(ListConcepts, "list_concepts", ListConcepts.Request()).success

        assert ros.change_state(Transition.TRANSITION_ACTIVE_SHUTDOWN, State.PRIMARY_STATE_FINALIZED)
        assert ros.lifecycle_state() == State.PRIMARY_STATE_FINALIZED
    finally:
        ros.close()
    lifecycle_node.send_signal(signal.SIGINT)
    lifecycle_node.wait(timeout=30)
    output = lifecycle_node.log.read_text()
    assert lifecycle_node.returncode == 0, output
    assert "Traceback" not in output and "never retrieved" not in output
