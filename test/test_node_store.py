"""The node on a store with a damaged concept: the others are detected, /ask answers, the list says so.

Its own node process (the one of test_node.py is gone by then: module fixtures end with their module),
started on a store prepared by the command: two concepts, one of whose memories holds a NaN.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from test_node import WAIT_S, Client, _command, names  # noqa: E402

from personal_vlm_node.testing.kit import image_msg, node_env, params_file, pixels  # noqa: E402

_spec = importlib.util.spec_from_file_location("store_cases", Path(__file__).parents[1] / "scripts" / "store_cases.py")
_CASES = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_CASES)


@pytest.fixture(scope="module")
def damaged_store_node(tiny_checkpoints, tmp_path_factory):
    from PIL import Image as PILImage

    tmp = tmp_path_factory.mktemp("damaged")
    model, store = str(tiny_checkpoints["qwen2_5_vl"]), tmp / "store"
    for name, seed in (("red vase", 61), ("blue box", 62)):
        PILImage.fromarray(pixels(seed)).save(tmp / f"{seed}.png")
        subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", "--model", model, "--store", str(store),
                        "--device", "cpu", "--dtype", "float32", "teach", name, str(tmp / f"{seed}.png"), "--no-wait"],
                       check=True, capture_output=True, timeout=300)
    _CASES.poison_memory(store, "red vase")
    values = {"model": model, "device": "cpu", "dtype": "float32", "store_dir": str(store),
              "process_rate_hz": 20.0, "accept_threshold": 0.999, "reject_threshold": 0.5, "verification": False}
    params = params_file(tmp / "params.yaml", values)
    log = tmp / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(params), stdout=out, stderr=subprocess.STDOUT, env=node_env(), cwd=tmp)
    deadline = time.monotonic() + WAIT_S
    while "ready:" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the node did not become ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    client = Client()
    client.wait_until(lambda: client.frames.get_subscription_count() > 0, what="the node's camera subscription")
    yield client, log
    client.close()
    proc.kill()
    proc.wait()


def test_a_damaged_concept_leaves_the_others_detected_and_ask_answering(damaged_store_node):
    ros, log = damaged_store_node

    result = ros.observe_until(pixels(62), lambda r: "blue box" in names(r))
    asked = ros.ask("Is the blue box here?", image_msg(pixels(62)))
    listed = ros.list()

    assert "red vase" not in names(result)
    assert asked.success, asked.message
    assert "red vase" not in asked.concepts
    assert sorted(listed.names) == ["blue box", "red vase"]
    assert "damaged" in listed.message and "NaN" in listed.message
    output = log.read_text(errors="replace")
    assert output.count("'red vase' is damaged") == 1 and "Traceback" not in output
