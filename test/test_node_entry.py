"""The node's entry point, started as a user starts it: its own process with a params file."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from personal_vlm_node.testing.kit import node_command, node_env  # noqa: E402


def _command(params: Path) -> list[str]:
    return node_command("--params-file", str(params))


def _params(tmp_path, **values) -> Path:
    values = {"auto_calibrate": False, **values}
    lines = ["/**:", "  ros__parameters:"] + [f"    {k}: {v!r}".replace("'", '"') for k, v in values.items()]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _terminal_sigint() -> None:
    """In the child before it runs: SIGINT's default action, as a process started from a terminal
    has it. A test run started in the background by a shell without job control (``cmd &`` in a
    script, as some CI runners do) ignores SIGINT, and children inherit that: the node would then
    never see the Ctrl-C these tests send before it installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _until_ready(params: Path) -> tuple[subprocess.Popen, list[str]]:
    """The node started with ``params``, and what it printed up to its "ready:" line (or its end)."""
    proc = subprocess.Popen(_command(params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=node_env(), cwd=Path(__file__).resolve().parent.parent, preexec_fn=_terminal_sigint)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready:" in line:
            break
    return proc, lines


def test_node_loads_the_model_reports_ready_and_stops_on_ctrl_c(tiny_checkpoints, tmp_path):
    params = _params(tmp_path, model=str(tiny_checkpoints["internvl"]), device="cpu", dtype="float32",
                     store_dir=str(tmp_path / "store"))
    proc, lines = _until_ready(params)
    assert any("ready:" in l for l in lines), "".join(lines)
    assert "0 concepts" in lines[-1]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "Traceback" not in "".join(lines) + out


@pytest.mark.parametrize("values, message", [
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"process_rate_hz": 0.0}, "process_rate_hz"),
    ({"verification_busy_fraction": 0.0}, "verification_busy_fraction"),
    ({"model": "/nonexistent/checkpoint"}, "model folder not found"),
    ({"accept_threshold": 0.5, "reject_threshold": 0.7}, "reject_threshold (0.7) must be below accept_threshold (0.5)"),
])
def test_node_refuses_bad_parameters_with_one_line(tmp_path, values, message):
    params = _params(tmp_path, **{"model": "/nonexistent/checkpoint", "device": "cpu",
                                  "store_dir": str(tmp_path / "s"), **values})
    done = subprocess.run(_command(params), capture_output=True, text=True, env=node_env(), timeout=120)
    assert done.returncode == 2
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_node_refuses_a_threshold_that_crosses_the_model_profiles_other_one(tiny_checkpoints, tmp_path):
    # Only accept_threshold is set; the profile's reject_threshold (0.55 by default) lies above it.
    params = _params(tmp_path, model=str(tiny_checkpoints["internvl"]), device="cpu", dtype="float32",
                     store_dir=str(tmp_path / "store"), accept_threshold=0.3)
    done = subprocess.run(_command(params), capture_output=True, text=True, env=node_env(), timeout=120)
    assert done.returncode == 2
    assert "must be below accept_threshold (0.3)" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("given, expected", [
    ({}, "max_concepts_in_context = 3, verification = true, r2p_margin = 0.1437"),
    ({"max_concepts_in_context": 2, "r2p_margin": 0.2}, "max_concepts_in_context = 2, verification = true, "
                                                         "r2p_margin = 0.2"),
])
def test_the_node_uses_the_profiles_calibrated_values_unless_a_parameter_sets_them(tiny_checkpoints, tmp_path,
                                                                                    given, expected):
    # As the toy profile: a calibrated margin, and an M other than the defaults'.
    profile = tmp_path / "calibrated.yaml"
    profile.write_text("r2p_margin: 0.1437\nmax_concepts_in_context: 3\naccept_threshold: 0.97\n"
                       "reject_threshold: 0.92\n")
    params = _params(tmp_path, model=str(tiny_checkpoints["internvl"]), device="cpu", dtype="float32",
                     store_dir=str(tmp_path / "store"), profile=str(profile), **given)
    proc, lines = _until_ready(params)
    _interrupted(proc)
    settings = next((l for l in lines if "settings:" in l), "")
    assert f"accept_threshold = 0.97, reject_threshold = 0.92, {expected}" in settings, "".join(lines)


def _start(tiny_checkpoints, tmp_path):
    params = _params(tmp_path, model=str(tiny_checkpoints["internvl"]), device="cpu", dtype="float32",
                     store_dir=str(tmp_path / "store"))
    return subprocess.Popen(_command(params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=node_env(), cwd=Path(__file__).resolve().parent.parent, preexec_fn=_terminal_sigint)


def _interrupted(proc) -> str:
    """The node's output once Ctrl-C ended it; it must end within a generous 20 s."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the node ignored Ctrl-C:\n{out}")
    return out


def _ended_by_ctrl_c(returncode: int) -> bool:
    """0, or the signal's own exit (what a shell reports as 130): native libraries loaded during
    startup briefly restore SIGINT's default action, and a Ctrl-C landing then ends the process
    at once, promptly and without a traceback, which is what a user expects of it."""
    return returncode in (0, -signal.SIGINT)


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_ctrl_c_early_in_startup_ends_the_node_cleanly(tiny_checkpoints, tmp_path, delay):
    proc = _start(tiny_checkpoints, tmp_path)
    time.sleep(delay)
    out = _interrupted(proc)
    assert _ended_by_ctrl_c(proc.returncode), out
    assert "Traceback" not in out and "ready:" not in out


def test_ctrl_c_while_the_model_loads_ends_the_node_cleanly(tiny_checkpoints, tmp_path):
    proc = _start(tiny_checkpoints, tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "loading" in line:
            break
    out = "".join(lines) + _interrupted(proc)
    assert _ended_by_ctrl_c(proc.returncode), out
    assert "Traceback" not in out and "context is invalid" not in out and "ready:" not in out


def test_stop_ros_waits_for_the_spinning_thread_before_the_node_goes():
    """A daemon thread still inside rclpy's C++ wait when the interpreter finalizes aborts the
    process (SIGABRT after "shutting down"); stop_ros joins it first."""
    import threading

    from personal_vlm_node.ros import process

    events, release = [], threading.Event()

    def spin():
        release.wait(5)
        events.append("spinner returned")

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()

    class Executor:
        def shutdown(self, timeout_sec, wait_for_threads):
            events.append("shutdown")
            threading.Timer(0.2, release.set).start()     # the wait wakes a little later

    class Node:
        def destroy_node(self):
            events.append("destroy")

    process.stop_ros(Node(), Executor(), True, spinner)
    assert events == ["shutdown", "spinner returned", "destroy"] and not spinner.is_alive()
