"""``personal-vlm web`` and the node's ``web_port`` as a user starts them, and the live view's holder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from personal_vlm_node.cli import build_parser
from personal_vlm_node.cli_web import node_arguments
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.testing.kit import node_command, node_env, params_file
from personal_vlm_node.web.live import KEPT_FRAMES, LiveView

WAIT_S = 120.0


class _Detection:
    def __init__(self, name, box=(1.0, 2.0, 3.0, 4.0), score=0.9):
        self.name, self.category, self.score, self.source, self.box, self.track_id = name, "", score, "match", box, 3


def parsed(*argv):
    args = build_parser().parse_args(["web", *argv])
    args.model = args.model or "Qwen/Qwen2.5-VL-3B-Instruct"
    return args


# ---- without a node -------------------------------------------------------------------------

def test_the_live_view_costs_nothing_while_no_page_watches():
    live = LiveView()
    woken = []
    live.wake = lambda: woken.append(1)
    live.offer(np.zeros((4, 4, 3), np.uint8), [_Detection("a")], time.monotonic())
    assert (live.offered, woken, live.take()) == (0, [], None)


def test_the_live_view_keeps_the_newest_frame_and_the_last_few_by_number():
    live = LiveView()
    live.watchers = 1
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(KEPT_FRAMES + 3)]
    live.offer(frames[0], [], time.monotonic())
    live.offer(frames[1], [_Detection("a"), _Detection("bad", box=(float("nan"), 0, 1, 1))], time.monotonic())
    seq, array, rows, _ = live.take()
    assert (seq, live.replaced, [r["name"] for r in rows]) == (2, 1, ["a"])    # non-finite boxes are left out
    assert live.frame(1) is None and live.frame(2) is array
    assert live.pin(2) and not live.pin(99)
    for frame in frames[2:]:
        live.offer(frame, [], time.monotonic())
        live.take()
    assert live.frame(2) is array                                   # pinned: kept while a box is drawn on it
    live.unpin(2)
    assert live.frame(2) is None and live.frame(True) is None


def test_web_passes_its_options_to_the_node_as_parameters_after_the_users_ros_arguments():
    argv = node_arguments(parsed("--port", "9001", "--token", "t0k", "--ros-args", "-r", "image:=/cam"))
    assert argv == ["personal-vlm", "--ros-args", "-r", "image:=/cam", "-p", "web_port:=9001",
                    "-p", "web_host:=127.0.0.1", "-p", "web_token:=t0k"]
    args = build_parser().parse_args(["--model", "/tmp/m", "--device", "cpu", "--store", "/tmp/s", "web"])
    assert node_arguments(args)[-8:] == ["-p", "web_host:=127.0.0.1", "-p", "model:=/tmp/m", "-p", "device:=cpu",
                                         "-p", "store_dir:=/tmp/s"]


@pytest.mark.parametrize("argv, problem", [
    (("--port", "0"), "--port must lie in"), (("--port", "70000"), "--port must lie in"),
    (("--host", " "), "--host must name an address"),
])
def test_web_refuses_what_it_cannot_serve_with_one_line(argv, problem):
    with pytest.raises(PersonalVLMError, match=problem):
        node_arguments(parsed(*argv))


def test_the_installed_package_ships_the_page_as_in_the_sources(tmp_path):
    # Away from the sources, so that the package found is the installed one.
    done = subprocess.run([sys.executable, "-c", "import personal_vlm_node.web as w; print(w.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, env=node_env(PYTHONPATH=""), timeout=60)
    installed = Path(done.stdout.strip()).parent / "static"
    sources = Path(__file__).resolve().parent.parent / "personal_vlm_node" / "web" / "static"
    if installed.parent == sources.parent:
        pytest.skip("the package is installed in editable mode: its files are the sources")
    for name in ("index.html", "console.js", "console.css"):
        assert (installed / name).read_bytes() == (sources / name).read_bytes(), name


# ---- the node ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints["qwen2_5_vl"]


def _wait_for_line(proc, log, text: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return log.read_text(errors="replace")


def test_personal_vlm_web_serves_the_page_from_the_node(tiny, tmp_path):
    pytest.importorskip("rclpy")
    port = _free_port()
    log = tmp_path / "web.log"
    cmd = [sys.executable, "-m", "personal_vlm_node.cli", "--model", str(tiny), "--device", "cpu", "--dtype", "float32",
           "--store", str(tmp_path / "store"), "web", "--port", str(port),
           "--ros-args", "-r", f"__ns:=/web_cli_{os.getpid()}", "-p", "auto_calibrate:=false", "-p", "verifier_model:=''"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=node_env())
    try:
        output = _wait_for_line(proc, log, "ready:")
        assert f"web console on http://127.0.0.1:{port}/" in output, output[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as answer:
            assert answer.status == 200 and b"<canvas id=\"view\"" in answer.read()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_web_port_in_use_stops_the_node_with_one_line(tiny, tmp_path):
    pytest.importorskip("rclpy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        params = params_file(tmp_path / "params.yaml", {"model": str(tiny), "device": "cpu", "dtype": "float32",
                                                        "store_dir": str(tmp_path / "store"), "web_port": port,
                                                        "verifier_model": ""})
        done = subprocess.run(node_command("--params-file", str(params), "-r", f"__ns:=/web_busy_{os.getpid()}"),
                              capture_output=True, text=True, timeout=WAIT_S, env=node_env())
    assert done.returncode == 2, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert f"the web console cannot listen on 127.0.0.1:{port}: " in output
    assert "address already in use; choose another web_port" in output
    assert "Traceback" not in output


def _page_status(port: int):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            return answer.status
    except OSError as exc:              # refused: nothing listens
        return type(exc).__name__


def test_the_managed_node_serves_its_console_only_while_active(tiny, tmp_path):
    pytest.importorskip("rclpy")
    from lifecycle_msgs.msg import State, Transition

    from personal_vlm_node.ros.client import NodeClient

    namespace = f"/web_lifecycle_{os.getpid()}"
    port = _free_port()
    command = node_command("-r", f"__ns:={namespace}", "-p", f"model:={tiny}", "-p", "device:=cpu",
                           "-p", "dtype:=float32", "-p", f"store_dir:={tmp_path / 'store'}", "-p", "auto_calibrate:=false",
                           "-p", "verification:=false", "-p", f"web_port:={port}", lifecycle=True)
    log = tmp_path / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=node_env())
    ros = NodeClient(namespace, timeout=WAIT_S, client_name="web_lifecycle_client")
    try:
        assert ros.change_state(Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE)
        assert _page_status(port) == "URLError"                       # inactive: no console yet
        assert ros.change_state(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert _page_status(port) == 200
        assert ros.change_state(Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_INACTIVE)
        assert _page_status(port) == "URLError"
        assert ros.change_state(Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE)
        assert _page_status(port) == 200                              # the same port again
    finally:
        ros.close()
        proc.terminate()
        proc.wait(30)
