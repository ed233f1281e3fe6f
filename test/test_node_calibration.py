"""The node calibrates an uncalibrated checkpoint on its first start, in the background, and says so.

Its own node process (tiny random-weight Qwen2.5-VL, its profile the shipped defaults): while it
calibrates, /diagnostics says "calibrating (n/N, …)" at WARN and the services answer; then the
calibration is cached and in use, and the next start uses the cache without measuring again.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("rclpy")

from test_node import NAMESPACE, WAIT_S, Client, diagnostic_values  # noqa: E402

from personal_vlm_node.testing.kit import image_msg, params_file, pixels, start_node  # noqa: E402


def _start(params, log):
    return start_node(params, NAMESPACE, log, timeout=WAIT_S)


def _calibration_reports(ros, since: int) -> list[tuple[int, str, str]]:
    return diagnostic_values(ros, since, "calibration")


def test_the_first_start_calibrates_in_the_background_and_the_next_uses_the_cache(tiny_checkpoints, tmp_path):
    cache = tmp_path / "calibrations"
    values = {"model": str(tiny_checkpoints["qwen2_5_vl"]), "device": "cpu", "dtype": "float32",
              "store_dir": str(tmp_path / "store"), "verification": False, "auto_calibrate": True,
              "calibration_cache_dir": str(cache), "concept_thresholds": True}
    params = params_file(tmp_path / "params.yaml", values)
    log = tmp_path / "node.log"
    proc = _start(params, log)
    ros = Client()
    try:
        seen = []
        deadline = time.monotonic() + WAIT_S
        listed_while_calibrating = None
        while time.monotonic() < deadline:
            seen = _calibration_reports(ros, 0)
            if listed_while_calibrating is None and seen and seen[-1][2].startswith("calibrating ("):
                listed_while_calibrating = ros.list()          # it serves meanwhile
            if seen and seen[-1][2].startswith("calibrated automatically"):
                break
            time.sleep(0.2)
        calibrating = [s for s in seen if s[2].startswith("calibrating (")]
        assert calibrating, f"no 'calibrating' report: {seen[-3:]}\n{log.read_text(errors='replace')[-2000:]}"
        level, message, _ = calibrating[0]
        assert level == 1 and "calibrating (" in message and "uncalibrated values are in use" in message
        assert listed_while_calibrating is not None and listed_while_calibrating.success
        assert seen[-1][2].startswith("calibrated automatically"), seen[-3:]
        assert "calibrating" not in seen[-1][1]
        written = list(cache.glob("*.yaml"))
        assert len(written) == 1 and str(written[0]) in seen[-1][2]
        # concept_thresholds: the list says each concept's own accept threshold.
        for name, seed in (("red vase", 61), ("blue box", 62)):
            assert ros.teach(name, [image_msg(pixels(seed))]).success
        listed = ros.list()
        assert listed.success and "own accept thresholds: blue box 0." in listed.message, listed.message
        output = log.read_text(errors="replace")
        assert "calibrating it once on the built-in synthetic world" in output
        assert "calibrated layers and thresholds in" in output and "in use now" in output
        assert "Traceback" not in output
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # The next start: the cached calibration, at once.
    log2 = tmp_path / "node2.log"
    proc = _start(params, log2)
    try:
        expected = f"profile: calibrated automatically ({written[0]})"
        deadline = time.monotonic() + 30.0          # said right after "ready:"
        while expected not in log2.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert expected in log2.read_text(errors="replace")
        time.sleep(2.0)
        assert "calibrating" not in log2.read_text(errors="replace")
    finally:
        ros.close()
        proc.terminate()
        proc.wait(timeout=60)
