"""The running node over real ROS 2: camera frames in, detections out, and the four services.

One node process (tiny random-weight Qwen2.5-VL, its own namespace) serves the whole module; an
in-test rclpy node publishes frames and calls the services. Thresholds accept 0.999 / reject 0.5
and no verification make detection deterministic: a memory is a subset of its picture's own
tokens, so frames of that picture score exactly 1.0, and other random pictures score about 0.4.
"""

from __future__ import annotations

import json
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

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from personal_vlm_interfaces.msg import DetectionArray  # noqa: E402
from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept  # noqa: E402
from sensor_msgs.msg import Image, RegionOfInterest  # noqa: E402

from personal_vlm_node.ros.client import NodeClient  # noqa: E402
from personal_vlm_node.testing.kit import (HEIGHT, WIDTH, image_msg, node_command, node_env, params_file,  # noqa: E402
                                          pixels, start_node)

NAMESPACE = f"/vlm_test_{os.getpid()}"     # keeps this run's names apart from any other node
STATUS_NAME = f"{NAMESPACE}/personal_vlm: frame path"   # this node's diagnostics status
WAIT_S = 120.0                             # tiny models on two busy cores: generous, never asserted


# ---- the node's pieces, without a process --------------------------------------------------

def test_the_frame_holder_keeps_only_the_newest_frame_and_counts_the_dropped_ones():
    from personal_vlm_node.ros.frames import LatestFrame

    frames = LatestFrame()
    assert frames.take(timeout=0.0) is None and frames.latest() is None
    for i in range(3):
        frames.put(f"frame {i}", float(i))
    assert frames.take(timeout=0.0) == ("frame 2", 2.0)
    assert (frames.received, frames.dropped) == (3, 2)
    assert frames.take(timeout=0.0) is None             # taken frames are not processed twice
    assert frames.latest() == ("frame 2", 2.0)          # but stay available to the services


def test_a_detection_box_becomes_centre_and_size():
    from personal_vlm_node.assistant import Detection
    from personal_vlm_node.ros.convert import detection_to_msg

    msg = detection_to_msg(Detection("my mug", "mug", 0.93, "ego", (10.0, 20.0, 30.0, 40.0), 7))
    assert (msg.name, msg.category, msg.source, msg.track_id) == ("my mug", "mug", "ego", 7)
    assert msg.score == pytest.approx(0.93)
    assert (msg.center_x, msg.center_y, msg.size_x, msg.size_y) == (25.0, 40.0, 30.0, 40.0)


def test_detection_scores_are_clamped_to_the_range_the_message_promises():
    from personal_vlm_node.assistant import Detection
    from personal_vlm_node.ros.convert import detection_to_msg

    scores = [detection_to_msg(Detection("a", "", s, "match", (0.0, 0.0, 1.0, 1.0), 1)).score
              for s in (1.0000001192092896, -0.25, float("nan"), 0.5)]
    assert scores == [1.0, 0.0, 0.0, 0.5]


def test_compressed_frames_are_decoded_and_corrupt_ones_refused():
    from sensor_msgs.msg import CompressedImage

    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.ros.convert import frame_to_array
    from personal_vlm_node.testing.kit import compressed_msg

    array = pixels(7)
    assert np.array_equal(frame_to_array(compressed_msg(array)), array)
    with pytest.raises(PersonalVLMError, match="cannot be decoded"):
        frame_to_array(CompressedImage(format="jpeg", data=b"\xff\xd8 not really a jpeg"))


def test_profile_parameters_override_the_profile_only_when_not_negative():
    from personal_vlm_node.ros.parameters import assistant_options
    from personal_vlm_node.settings import PARAMETERS

    values = {name: setting.default for name, setting in PARAMETERS.items()}
    options = assistant_options(values)
    assert (options.accept_threshold, options.reject_threshold, options.max_concepts_in_context,
            options.r2p_margin) == (None, None, None, None)          # the defaults: the profile's
    values.update(accept_threshold=0.9, reject_threshold=-1.0, max_concepts_in_context=3, r2p_margin=0.2,
                  encoder_backend="onnxruntime", engine_cache_dir="")
    options = assistant_options(values)
    assert (options.accept_threshold, options.reject_threshold, options.max_concepts_in_context) == (0.9, None, 3)
    assert options.r2p_margin == 0.2
    assert options.backend == "onnxruntime" and options.engine_cache is None
    assert (options.verifications_per_second, options.verification_busy_fraction) == (2.0, 0.5)
    values.update(verifications_per_second=1, verification_busy_fraction=0.25)     # integers welcome
    options = assistant_options(values)
    assert (options.verifications_per_second, options.verification_busy_fraction) == (1.0, 0.25)


def test_default_parameters_keep_a_calibrated_profiles_margin_and_concepts_in_context(tiny_checkpoints, tmp_path):
    # A calibrated r2p_margin (0.1437), and an M other than the defaults' 64.
    from personal_vlm_node.ros.parameters import open_assistant
    from personal_vlm_node.settings import PARAMETERS

    profile = tmp_path / "calibrated.yaml"
    profile.write_text("r2p_margin: 0.1437\nmax_concepts_in_context: 3\n")
    values = {name: setting.default for name, setting in PARAMETERS.items()}
    values.update(model=str(tiny_checkpoints["qwen2_5_vl"]), device="cpu", dtype="float32",
                  store_dir=str(tmp_path / "store"), profile=str(profile), verification=False)

    class Log:
        def info(self, message):
            pass

        def warning(self, message):
            pass

    with open_assistant(values, Log()) as assistant:
        assert (assistant.r2p_margin, assistant.profile.max_concepts_in_context) == (0.1437, 3)
    values.update(r2p_margin=0.2, max_concepts_in_context=2)
    with open_assistant(values, Log()) as assistant:
        assert (assistant.r2p_margin, assistant.profile.max_concepts_in_context) == (0.2, 2)


def _start_in_line(line, work, **kwargs):
    """``line.run(work)`` on a thread of its own; returns (thread, outcome dict)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = line.run(work, **kwargs)
        except Exception as exc:
            outcome["error"] = str(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_request_line_works_one_at_a_time_in_order_and_refuses_past_its_limit():
    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.ros.requests import RequestLine

    line = RequestLine("teach", lambda: 2)
    release, order = threading.Event(), []

    def work(i):
        def run():
            order.append(i)
            release.wait(5)
            return i
        return run

    started = [_start_in_line(line, work(0))]
    _until(lambda: order == [0])                          # the first one is worked on at once
    for i in (1, 2):                                      # two may wait behind it
        started.append(_start_in_line(line, work(i)))
        _until(lambda: len(line._waiting) == i)
    with pytest.raises(PersonalVLMError, match=r"^busy: 2 teach requests are already waiting; try again"):
        line.run(work(3))
    release.set()
    for thread, _ in started:
        thread.join(5)
    assert order == [0, 1, 2]                             # one at a time, in order of arrival
    assert [outcome["result"] for _, outcome in started] == [0, 1, 2]
    alone = RequestLine("ask", lambda: 0)
    hold = threading.Event()
    thread, _ = _start_in_line(alone, lambda: hold.wait(5))
    _until(lambda: alone._running)
    with pytest.raises(PersonalVLMError, match=r"^busy: another ask request is being worked on"):
        alone.run(lambda: None)
    hold.set()
    thread.join(5)
    assert alone.run(lambda: "free again") == "free again"


def test_closing_a_request_line_answers_the_waiting_and_withdraws_on_request():
    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.ros.requests import RequestLine

    line = RequestLine("ask", lambda: 4)
    release, cancel, ran = threading.Event(), threading.Event(), []
    running, _ = _start_in_line(line, lambda: release.wait(5))
    _until(lambda: line._running)
    waiting, waited = _start_in_line(line, lambda: ran.append("waiting"))
    goal, goal_outcome = _start_in_line(line, lambda: ran.append("goal"), withdraw_if=cancel.is_set)
    _until(lambda: len(line._waiting) == 2)
    cancel.set()                                          # a cancelled goal leaves the line at once
    goal.join(2)
    assert "withdrawn" in goal_outcome["error"] and len(line._waiting) == 1
    line.close()                                          # shutdown: the waiting one is not started
    waiting.join(2)
    assert waited == {"error": "the node is shutting down"}
    with pytest.raises(PersonalVLMError, match="shutting down"):
        line.run(lambda: ran.append("late"))
    release.set()
    running.join(5)
    assert ran == []


# ---- the node process -------------------------------------------------------------------------

def _command(params: Path) -> list[str]:
    return node_command("--params-file", str(params), "-r", f"__ns:={NAMESPACE}")


class NodeProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, model: str, store: Path):
        self.proc, self.log, self.model, self.store = proc, log, model, store

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def node_process(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node")
    model = str(tiny_checkpoints["qwen2_5_vl"])
    values = {"model": model, "device": "cpu", "dtype": "float32", "store_dir": str(tmp / "store"),
              "process_rate_hz": 20.0, "accept_threshold": 0.999, "reject_threshold": 0.5,
              "max_concepts_in_context": 2, "verification": False, "overlay": True,
              # A damaged ICPT projector: one warning at startup, and every test here runs on Ego.
              "icpt_projector": str(tmp / "damaged-projector.safetensors"), "recognition_method": "icpt"}
    (tmp / "damaged-projector.safetensors").write_bytes(b"not a projector")
    params = params_file(tmp / "params.yaml", values)
    log = tmp / "node.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(params), stdout=out, stderr=subprocess.STDOUT, env=node_env(),
                                cwd=Path(__file__).resolve().parent.parent)
    node = NodeProcess(proc, log, model, tmp / "store")
    deadline = time.monotonic() + WAIT_S
    while "ready:" not in node.output():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the node did not become ready:\n{node.output()}")
        time.sleep(0.2)
    yield node
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ---- the in-test client -----------------------------------------------------------------------

class Client(NodeClient):
    """The node's client, with what these tests ask of it in one line each."""

    def __init__(self):
        super().__init__(NAMESPACE, timeout=WAIT_S, client_name="personal_vlm_test_client")
        self.frames = self.camera()
        self.detections: list[DetectionArray] = self.record_detections()
        self.diagnostics: list[DiagnosticArray] = self.record(DiagnosticArray, "/diagnostics")
        self.overlays: list[Image] = []

    def subscribe_overlay(self):
        self.record(Image, "personal_vlm/overlay", depth=5, into=self.overlays)

    # services ------------------------------------------------------------------------------
    def request(self, srv_type, service: str, /, **fields):
        response = self.send(srv_type, service, srv_type.Request(**fields))
        assert response is not None, f"no answer from {service}"
        return response

    def teach(self, name, images=(), **fields):
        return self.request(TeachConcept, "teach_concept", name=name, images=list(images), **fields)

    def ask(self, question, image=None):
        return self.request(Ask, "ask", question=question, image=image or Image())

    def list(self):
        return self.request(ListConcepts, "list_concepts")

    def forget(self, name):
        return self.request(ForgetConcept, "forget_concept", name=name)

    # frames ---------------------------------------------------------------------------------
    def detections_for(self, stamp, timeout: float) -> DetectionArray | None:
        def match():
            return next((d for d in self.detections if (d.header.stamp.sec, d.header.stamp.nanosec) == stamp), None)
        try:
            return self.wait_until(match, timeout, f"detections of the frame stamped {stamp}")
        except TimeoutError:
            return None

    def observe(self, array: np.ndarray, frame_id: str = "camera") -> DetectionArray:
        """Publish one frame (again, if a best-effort frame got lost) and return its DetectionArray."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = self.detections_for(self.publish_frame(image_msg(array), frame_id), timeout=5.0)
            if found is not None:
                return found
        raise AssertionError("the node published no detections for the frames sent")

    def observe_until(self, array: np.ndarray, condition, frame_id: str = "camera", frames: int = 20):
        """Frames of ``array`` until ``condition(detection_array)``; the tracker needs 2 of 3 frames."""
        for _ in range(frames):
            result = self.observe(array, frame_id)
            if condition(result):
                return result
        raise AssertionError(f"no frame out of {frames} satisfied the condition")


@pytest.fixture(scope="module")
def ros(node_process):
    client = Client()
    client.wait_until(lambda: client.frames.get_subscription_count() > 0, what="the node's camera subscription")
    # Asked before this module publishes any frame, whatever order its tests run in.
    client.before_any_frame = {"teach": client.teach("too early"), "ask": client.ask("What do you see?")}
    yield client
    client.close()


def diagnostic_values(ros, since: int, key: str) -> list[tuple[int, str, str]]:
    """(level, message, the value of ``key``) of this node's diagnostics from report ``since`` on."""
    with ros.arrived:
        arrays = list(ros.diagnostics[since:])
    out = []
    for array in arrays:
        for status in array.status:
            if status.name == STATUS_NAME:
                values = {kv.key: kv.value for kv in status.values}
                out.append((status.level[0], status.message, values.get(key, "")))
    return out


def names(detections: DetectionArray) -> list[str]:
    return [d.name for d in detections.detections]


# ---- camera frames in, detections out -----------------------------------------------------

def test_requests_that_need_the_latest_frame_fail_before_any_frame_arrived(ros):
    for response in ros.before_any_frame.values():
        assert response.success is False
        assert "no camera frame has arrived" in response.message
    assert "too early" not in ros.list().names


def test_every_processed_frame_gets_a_detection_array_with_the_source_header(ros):
    # Nothing was taught from this picture; a track still present from an earlier frame survives
    # one miss (tracker hysteresis), so allow the frames that takes.
    result = ros.observe_until(pixels(100), lambda r: r.detections == [], frame_id="camera_optical", frames=3)
    assert result.header.frame_id == "camera_optical"
    assert result.header.stamp.nanosec == 250_000_000


def test_a_concept_taught_from_images_is_detected_on_later_frames(ros):
    mug = pixels(1)
    taught = ros.teach("my mug", [image_msg(mug, "bgr8")], category="mug")
    assert taught.success, taught.message
    assert taught.memory_tokens > 0 and taught.seconds > 0
    listed = ros.list()
    row = list(listed.names).index("my mug")
    assert list(taught.keywords) == json.loads(listed.keywords_json[row] or "[]")   # what the store keeps
    assert "my mug" in taught.message

    result = ros.observe_until(mug, lambda r: "my mug" in names(r), frame_id="kitchen_cam")
    assert result.header.frame_id == "kitchen_cam"
    detection = next(d for d in result.detections if d.name == "my mug")
    assert detection.category == "mug" and detection.source == "match" and detection.track_id >= 1
    assert detection.score == pytest.approx(1.0, abs=1e-3)
    assert detection.size_x > 0 and detection.size_y > 0
    assert 0 <= detection.center_x - detection.size_x / 2 and detection.center_x + detection.size_x / 2 <= WIDTH + 1e-3
    assert 0 <= detection.center_y - detection.size_y / 2 and detection.center_y + detection.size_y / 2 <= HEIGHT + 1e-3
    ros.observe_until(pixels(101), lambda r: "my mug" not in names(r), frames=3)


def test_a_concept_taught_from_the_latest_frame_with_a_roi_is_detected(ros):
    sofa = pixels(2)
    ros.observe(sofa)                               # the node has processed it: it is the latest frame
    roi = RegionOfInterest(x_offset=60, y_offset=40, width=150, height=110)
    taught = ros.teach("Fluffy", [], category="cat", roi=roi)
    assert taught.success, taught.message
    assert "latest camera frame" in taught.message

    result = ros.observe_until(sofa, lambda r: "Fluffy" in names(r))
    detection = next(d for d in result.detections if d.name == "Fluffy")
    assert detection.score == pytest.approx(1.0, abs=1e-3)
    assert 60 <= detection.center_x <= 210 and 40 <= detection.center_y <= 150   # inside the ROI


def test_teaching_an_existing_name_needs_overwrite(ros):
    first = ros.teach("house keys", [image_msg(pixels(3))])
    assert first.success, first.message
    again = ros.teach("house keys", [image_msg(pixels(4))])
    assert again.success is False and "already exists" in again.message
    replaced = ros.teach("house keys", [image_msg(pixels(4))], overwrite=True)
    assert replaced.success, replaced.message
    ros.observe_until(pixels(4), lambda r: "house keys" in names(r))


def test_views_are_added_one_camera_frame_at_a_time(ros):
    ros.observe(pixels(5))
    first = ros.teach("backpack", [], add=True)                  # a new name: taught from the frame
    assert first.success and first.message.startswith("taught 'backpack' from the latest camera frame")
    ros.observe(pixels(6))
    second = ros.teach("backpack", [], add=True)                 # a second side of it
    assert second.success and second.message.startswith("added a view to 'backpack'"), second.message
    assert second.memory_tokens > first.memory_tokens
    listed = ros.list()
    assert listed.memory_tokens[list(listed.names).index("backpack")] == second.memory_tokens
    both = ros.teach("backpack", [], add=True, overwrite=True)
    assert both.success is False and "not both" in both.message


def test_ask_answers_about_a_given_image_and_about_the_latest_frame(ros):
    for name, seed in [("red cup", 5), ("blue cup", 6), ("green cup", 7)]:
        assert ros.teach(name, [image_msg(pixels(seed))]).success
    taught = set(ros.list().names)

    given = ros.ask("Where is the red cup?", image_msg(pixels(5)))
    assert given.success, given.message
    assert isinstance(given.answer, str)
    # max_concepts_in_context: 2 in the params file replaces the profile's 64.
    assert 1 <= len(given.concepts) <= 2 and set(given.concepts) <= taught
    assert given.concepts[0] == "red cup"           # its memory scores 1.0 on its own picture

    ros.observe(pixels(6))
    latest = ros.ask("Is the blue cup here?")
    assert latest.success, latest.message
    assert latest.concepts[0] == "blue cup"


def test_list_reports_every_concept_with_its_category_tokens_and_keywords(ros):
    taught = ros.teach("Grandpa's cane", [image_msg(pixels(8))], category="cane")
    assert taught.success, taught.message
    listed = ros.list()
    assert listed.success, listed.message
    assert len(listed.names) == len(listed.categories) == len(listed.memory_tokens) == len(listed.keywords_json)
    i = list(listed.names).index("Grandpa's cane")
    assert listed.categories[i] == "cane"
    assert listed.memory_tokens[i] == taught.memory_tokens
    assert json.loads(listed.keywords_json[i]) == list(taught.keywords)


def test_a_forgotten_concept_disappears_from_the_list_and_the_detections(ros):
    keys = pixels(9)
    assert ros.teach("old keys", [image_msg(keys)]).success
    ros.observe_until(keys, lambda r: "old keys" in names(r))
    forgotten = ros.forget("old keys")
    assert forgotten.success, forgotten.message
    assert "old keys" not in ros.list().names
    assert "old keys" not in names(ros.observe(keys))     # a frame sent after the forget returned
    again = ros.forget("old keys")
    assert again.success is False and "no concept named 'old keys'" in again.message


# ---- a store shared with other processes ----------------------------------------------------

def _cli(node_process, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "personal_vlm_node.cli", "--model", node_process.model,
           "--store", str(node_process.store), "--device", "cpu", "--dtype", "float32", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_a_concept_taught_and_forgotten_by_another_process_is_followed(ros, node_process, tmp_path):
    from PIL import Image as PILImage

    lamp = pixels(21)
    path = tmp_path / "lamp.png"
    PILImage.fromarray(lamp).save(path)
    _cli(node_process, "teach", "desk lamp", str(path), "--category", "lamp", "--no-wait")
    ros.observe_until(lamp, lambda r: "desk lamp" in names(r), frames=200)
    detection = next(d for d in ros.observe(lamp).detections if d.name == "desk lamp")
    assert detection.category == "lamp"

    _cli(node_process, "forget", "desk lamp")
    ros.observe_until(lamp, lambda r: "desk lamp" not in names(r), frames=200)
    asked = ros.ask("Is the lamp here?", image_msg(lamp))
    assert asked.success, asked.message
    assert "desk lamp" not in asked.concepts


def test_after_a_teach_the_next_frame_is_processed_at_once_whatever_the_rate(ros):
    # One frame every 5 s; after a teach the worker takes the next frame as soon as it arrives, so a
    # new concept is looked for without waiting for the rate's next turn.
    [result] = ros.set_parameters(process_rate_hz=0.2)
    assert result.successful, result.reason
    try:
        ros.observe(pixels(40))                               # processed: the next turn is 5 s away
        taught = ros.teach("tea tin", [image_msg(pixels(41))])
        assert taught.success, taught.message
        stamp = ros.publish_frame(image_msg(pixels(41)))
        assert ros.detections_for(stamp, timeout=2.0) is not None, "the frame after the teach waited for its turn"
        later = ros.publish_frame(image_msg(pixels(41)))            # the rate applies again
        assert ros.detections_for(later, timeout=1.0) is None
    finally:
        [result] = ros.set_parameters(process_rate_hz=20.0)
        assert result.successful, result.reason
        ros.forget("tea tin")


def test_repeated_bad_requests_log_a_throttled_short_warning(ros, node_process):
    before = node_process.output().count("teach_concept:")
    long_encoding = "x" * 5000
    for _ in range(30):
        response = ros.teach("mug", [_raw(encoding=long_encoding)])
        assert response.success is False
        assert len(response.message) < 400
    time.sleep(0.5)
    log = node_process.output()
    assert log.count("teach_concept:") - before <= 3
    assert long_encoding not in log


# ---- bad requests ---------------------------------------------------------------------------

def _raw(**fields) -> Image:
    values = {"height": 4, "width": 6, "encoding": "rgb8", "step": 18, "data": bytes(72), **fields}
    return Image(**values)


BAD_REQUESTS = {
    "empty name": ("teach", {"name": "", "images": [_raw()]}, "must not be empty"),
    "blank name": ("teach", {"name": "   ", "images": [_raw()]}, "must not be empty"),
    "path in name": ("teach", {"name": "../etc", "images": [_raw()]}, "must not contain '/'"),
    "control character in name": ("teach", {"name": "mug\x07", "images": [_raw()]}, "control or invisible"),
    "unknown encoding": ("teach", {"name": "mug", "images": [_raw(encoding="yuv422_weird")]},
                         "encoding 'yuv422_weird' is not supported"),
    "zero-size image": ("teach", {"name": "mug", "images": [_raw(width=0, step=0, data=b"")]}, "needs pixels"),
    "empty image among images": ("teach", {"name": "mug", "images": [_raw(), Image()]}, "images[1]: Image is 0×0"),
    "truncated data": ("teach", {"name": "mug", "images": [_raw(data=bytes(50))]}, "step/size mismatch"),
    "step smaller than a row": ("teach", {"name": "mug", "images": [_raw(step=10)]}, "step 10 is smaller"),
    "roi outside the image": ("teach", {"name": "mug", "images": [_raw()],
                                        "roi": RegionOfInterest(x_offset=4, y_offset=0, width=5, height=2)},
                              "not inside"),
    "too many images": ("teach", {"name": "mug", "images": [_raw()] * 9}, "at most 8"),
    "empty question": ("ask", {"question": "  ", "image": _raw()}, "question is empty"),
    "over-long question": ("ask", {"question": "why? " * 300, "image": _raw()}, "over 1000 characters"),
    "bayer image": ("ask", {"question": "what?", "image": _raw(encoding="bayer_rggb8", step=6, data=bytes(24))},
                    "debayer it first"),
    "unknown concept": ("forget", {"name": "never taught"}, "no concept named 'never taught'"),
    "forget empty name": ("forget", {"name": ""}, "must not be empty"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_fails_with_a_message_and_the_node_keeps_serving(ros, case):
    service, fields, message = BAD_REQUESTS[case]
    srv_type, srv_name = {"teach": (TeachConcept, "teach_concept"), "ask": (Ask, "ask"),
                          "forget": (ForgetConcept, "forget_concept")}[service]
    response = ros.request(srv_type, srv_name, **fields)
    assert response.success is False
    assert message in response.message
    assert "internal error" not in response.message
    assert ros.list().success


def _diagnostic_value(ros, key: str, after: int = 0) -> str | None:
    """``key`` of this node's newest diagnostics report among those received after index ``after``."""
    for array in reversed(ros.diagnostics[after:]):
        for status in array.status:
            if status.name == STATUS_NAME:
                return next((kv.value for kv in status.values if kv.key == key), None)
    return None


def test_unreadable_camera_frames_are_skipped_and_later_ones_processed(ros, node_process):
    def skipped():
        return int(_diagnostic_value(ros, "unreadable_frames") or 0) > 0

    deadline = time.monotonic() + WAIT_S
    bad_stamps = []
    while time.monotonic() < deadline:
        bad_stamps.append(ros.publish_frame(_raw(encoding="yuv422_weird")))
        try:
            ros.wait_until(skipped, timeout=3.0)     # diagnostics report once a second
            break
        except TimeoutError:
            continue
    assert skipped(), "the node never reported an unreadable frame"
    result = ros.observe(pixels(102))
    assert result.header.stamp.sec > bad_stamps[-1][0]
    assert not any(ros.detections_for(stamp, timeout=0.0) for stamp in bad_stamps)


def test_overlay_carries_the_frame_header_and_diagnostics_describe_the_frame_path(ros, node_process):
    ros.subscribe_overlay()
    ros.wait_until(lambda: ros.node.count_publishers(f"{NAMESPACE}/personal_vlm/overlay") > 0, what="overlay")
    deadline = time.monotonic() + WAIT_S
    overlay = None
    while overlay is None and time.monotonic() < deadline:   # until the node sees the subscription
        stamp = ros.publish_frame(image_msg(pixels(103)), frame_id="overlay_cam")
        ros.detections_for(stamp, timeout=5.0)
        overlay = next((o for o in ros.overlays if (o.header.stamp.sec, o.header.stamp.nanosec) == stamp), None)
    assert overlay is not None, "no overlay arrived"
    assert overlay.header.frame_id == "overlay_cam"
    assert (overlay.width, overlay.height, overlay.encoding) == (WIDTH, HEIGHT, "rgb8")
    assert len(overlay.data) == WIDTH * HEIGHT * 3

    listed = ros.list().names
    with ros.arrived:
        seen = len(ros.diagnostics)

    def ours():   # the first report of this node published after the list above
        for array in ros.diagnostics[seen:]:
            for status in array.status:
                if status.name == STATUS_NAME:
                    return status
        return None

    status = ros.wait_until(ours, what="diagnostics of this node")
    values = {kv.key: kv.value for kv in status.values}
    assert status.hardware_id == f"cpu / {node_process.model}"
    assert values["device"] == "cpu" and values["family"] == "qwen2_5_vl" and values["model"] == node_process.model
    assert int(values["concepts"]) == len(listed)
    assert int(values["processed_frames"]) > 0
    for key in ("received_hz", "processed_hz", "latency_ms", "dropped_frames", "unreadable_frames"):
        assert float(values[key]) >= 0


# ---- what other ROS tools read ----------------------------------------------------------------

def _stamped(messages, stamp):
    return next((m for m in messages if (m.header.stamp.sec, m.header.stamp.nanosec) == stamp), None)


def test_vision_msgs_detections_markers_and_the_class_map_carry_the_detections_of_a_frame(ros):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from vision_msgs.msg import Detection2DArray, LabelInfo
    from visualization_msgs.msg import ImageMarker

    from personal_vlm_node.testing.kit import KILTED_VISION_MSGS

    boxes: list = ros.record(Detection2DArray, "personal_vlm/detections_2d")
    markers: list = ros.record(ImageMarker, "personal_vlm/image_markers")
    labels: list = []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    ros.node.create_subscription(LabelInfo, ros.name("personal_vlm/label_info"), labels.append, latched)
    assert ros.teach("vm mug", [image_msg(pixels(150))]).success
    ros.wait_until(lambda: any("vm mug" in [c.class_name for c in m.class_map] for m in labels),
                   what="a class map naming the new concept")
    detected = ros.observe_until(pixels(150), lambda r: "vm mug" in names(r), frame_id="vm_cam")
    stamp = (detected.header.stamp.sec, detected.header.stamp.nanosec)
    ours = next(d for d in detected.detections if d.name == "vm mug")
    array = ros.wait_until(lambda: _stamped(boxes, stamp), what="the Detection2DArray of the frame")
    assert array.header.frame_id == "vm_cam"
    [box] = [d for d in array.detections if d.results[0].hypothesis.class_id == "vm mug"]
    assert box.header == array.header
    assert box.results[0].hypothesis.score == pytest.approx(ours.score)
    assert (box.bbox.center.position.x, box.bbox.center.position.y) == pytest.approx((ours.center_x, ours.center_y))
    assert (box.bbox.size_x, box.bbox.size_y) == pytest.approx((ours.size_x, ours.size_y))
    assert box.id == (str(ours.track_id) if ours.track_id else "")
    marker = ros.wait_until(lambda: next((m for m in markers if m.ns == "vm mug" and
                                          (m.header.stamp.sec, m.header.stamp.nanosec) == stamp), None),
                            what="the image marker of the frame")
    assert marker.header.frame_id == "vm_cam" and marker.action == ImageMarker.ADD and len(marker.points) == 4
    assert marker.points[0].x == pytest.approx(ours.center_x - ours.size_x / 2)
    [endpoint] = ros.node.get_publishers_info_by_topic(ros.name("personal_vlm/detections_2d"))
    assert str(endpoint.topic_type_hash) == KILTED_VISION_MSGS["Detection2DArray"]
    assert ros.forget("vm mug").success
    ros.wait_until(lambda: labels and "vm mug" not in [c.class_name for c in labels[-1].class_map],
                   what="a class map without the forgotten concept")


def test_the_jpeg_overlay_is_published_while_someone_subscribes(ros):
    from sensor_msgs.msg import CompressedImage

    from personal_vlm_node.ros.convert import compressed_msg_to_array

    jpegs: list = ros.record(CompressedImage, "personal_vlm/overlay/compressed", depth=5)
    ros.wait_until(lambda: ros.node.count_subscribers(ros.name("personal_vlm/overlay/compressed")) > 0,
                   what="the JPEG overlay subscription")
    deadline = time.monotonic() + WAIT_S
    found = None
    while found is None and time.monotonic() < deadline:    # until the node sees the subscription
        stamp = ros.publish_frame(image_msg(pixels(151)), frame_id="jpeg_cam")
        ros.detections_for(stamp, timeout=5.0)
        found = _stamped(jpegs, stamp)
    assert found is not None, "no JPEG overlay arrived"
    assert found.header.frame_id == "jpeg_cam" and "jpeg" in found.format
    assert compressed_msg_to_array(found).shape == (HEIGHT, WIDTH, 3)


def test_a_second_robot_reads_compressed_frames_and_names_its_own_diagnostics(ros, node_process, tmp_path):
    from personal_vlm_node.testing.kit import compressed_msg

    namespace = f"{NAMESPACE}_robot2"
    values = {"model": node_process.model, "device": "cpu", "dtype": "float32", "store_dir": str(tmp_path / "store"),
              "process_rate_hz": 20.0, "verification": False, "image_transport": "compressed"}
    proc = start_node(params_file(tmp_path / "params.yaml", values), namespace, tmp_path / "node.log")
    log = tmp_path / "node.log"
    robot2 = NodeClient(namespace, timeout=WAIT_S, client_name="personal_vlm_test_robot2")
    try:
        raw_camera = robot2.camera()                       # a camera on the wrong transport
        statuses: list = robot2.record(DiagnosticArray, "/diagnostics")
        name2 = f"{namespace}/personal_vlm: frame path"

        def status_of(name, condition=lambda s: True):
            return next((s for a in reversed(statuses) for s in a.status if s.name == name and condition(s)), None)

        warned = robot2.wait_until(lambda: status_of(name2, lambda s: "set image_transport: raw" in s.message),
                                   what="a warning naming the raw topic that has data")
        assert warned.level == b"\x01"
        assert f"no camera frame on {namespace}/image/compressed" in warned.message
        assert f"{namespace}/image has 1 publisher" in warned.message
        assert robot2.wait_until(lambda: status_of(STATUS_NAME), what="the first robot's status") is not None
        robot2.node.destroy_publisher(raw_camera)

        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage

        jpeg_camera = robot2.node.create_publisher(CompressedImage, robot2.name("image/compressed"),
                                                   qos_profile_sensor_data)
        detections = robot2.record_detections()
        deadline = time.monotonic() + WAIT_S
        seen = None
        while seen is None and time.monotonic() < deadline:
            msg = compressed_msg(pixels(152))
            msg.header.stamp.sec, msg.header.frame_id = 77, "jpeg_in"
            jpeg_camera.publish(msg)
            try:
                seen = robot2.wait_until(lambda: next((d for d in detections if d.header.frame_id == "jpeg_in"), None),
                                         timeout=2.0)
            except TimeoutError:
                continue
        assert seen is not None, f"no detections from compressed frames:\n{log.read_text(errors='replace')}"
        assert seen.header.stamp.sec == 77
    finally:
        robot2.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- many requests at once --------------------------------------------------------------------

BURST = 40                 # more than a DDS queue of rclpy's default depth (10) holds
BURST_WAIT_S = 90.0        # every answer within this; the served ones are a few tiny-model teaches


def _handshake(clients, ping) -> None:
    """Each client is answered once (anything) before the burst: a new client's first reply can be
    lost while the node has not yet discovered its reply reader, and that is not what is tested."""
    deadline = time.monotonic() + WAIT_S
    pending = list(clients)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} clients never got an answer to a ping"
        futures = [client.call_async(ping) for client in pending]
        time.sleep(2.0)
        pending = [client for client, future in zip(pending, futures) if not future.done()]


def _send_at_once(ros, srv_type, service: str, requests: list, timeout: float, ping) -> list:
    """Send every request at once, each from a client of its own (as separate callers would), and
    wait until all are answered or ``timeout`` passed; [(response, place in the order of the answers)
    or None if unanswered]."""
    from rclpy.qos import HistoryPolicy, QoSProfile

    # A client's reply reader also receives the replies to this process's other clients; at rclpy's
    # default depth (10) a burst of those pushes out its own, a loss on this side of the test.
    reply_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000)
    clients = [ros.node.create_client(srv_type, service, qos_profile=reply_qos) for _ in requests]
    answers: dict[int, tuple] = {}
    arrived = threading.Condition()

    def keep(i):
        def answered(future):
            with arrived:
                answers[i] = (future.result(), len(answers))
                arrived.notify_all()
        return answered

    try:
        for client in clients:
            assert client.wait_for_service(timeout_sec=WAIT_S), f"service {service} never appeared"
        _handshake(clients, ping)
        for i, (client, request) in enumerate(zip(clients, requests)):
            client.call_async(request).add_done_callback(keep(i))
        deadline = time.monotonic() + timeout
        with arrived:
            while len(answers) < len(requests) and time.monotonic() < deadline:
                arrived.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            return [answers.get(i) for i in range(len(requests))]
    finally:
        for client in clients:
            ros.node.destroy_client(client)


def test_a_burst_of_teach_requests_is_served_or_refused_busy_and_every_one_is_answered(ros):
    requests = [TeachConcept.Request(name=f"burst {i}", images=[image_msg(pixels(200 + i))]) for i in range(BURST)]
    answers = _send_at_once(ros, TeachConcept, "teach_concept", requests, BURST_WAIT_S,
                            ping=TeachConcept.Request(name=""))
    unanswered = [i for i, answer in enumerate(answers) if answer is None]
    served = [i for i, answer in enumerate(answers) if answer is not None and answer[0].success]
    refused = {i: answer for i, answer in enumerate(answers) if answer is not None and not answer[0].success}
    try:
        assert not unanswered, (f"{len(unanswered)} of {BURST} teach requests got no answer within "
                                f"{BURST_WAIT_S:g} s ({len(served)} served, {len(refused)} refused)")
        assert served, "no teach request of the burst was served"
        for response, _order in refused.values():
            assert response.message.startswith("busy: "), response.message
            assert "teach requests are already waiting" in response.message and "try again" in response.message
        # The refused were answered at once, not after waiting their turn behind the served ones.
        assert max(order for _response, order in refused.values()) < max(answers[i][1] for i in served)
        taught = {name for name in ros.list().names if name.startswith("burst ")}
        assert taught == {f"burst {i}" for i in served}
    finally:
        for name in [n for n in ros.list().names if n.startswith("burst ")]:
            ros.forget(name)


def test_a_burst_of_ask_goals_is_answered_or_aborted_busy_and_a_waiting_goal_cancels_at_once(ros):
    from action_msgs.msg import GoalStatus
    from personal_vlm_interfaces.action import Ask as AskAction
    from rclpy.action import ActionClient
    from rclpy.qos import HistoryPolicy, QoSProfile

    deep = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000)     # one client, many replies at once
    action = ActionClient(ros.node, AskAction, "ask", goal_service_qos_profile=deep,
                          result_service_qos_profile=deep, cancel_service_qos_profile=deep)
    assert action.wait_for_server(timeout_sec=WAIT_S)
    count, handles, streamed, results, ended = 12, {}, set(), {}, {}
    arrived = threading.Condition()

    def keep(i):
        def result(future):
            with arrived:
                results[i], ended[i] = future.result(), time.monotonic()
                arrived.notify_all()
        return result

    def accepted(i):
        def handle(future):
            with arrived:
                handles[i] = future.result()
                arrived.notify_all()
            handles[i].get_result_async().add_done_callback(keep(i))
        return handle

    try:
        for i in range(count):
            goal = AskAction.Goal(question="Describe everything in detail.", image=image_msg(pixels(300 + i)))
            action.send_goal_async(goal, feedback_callback=lambda _msg, i=i: streamed.add(i)
                                   ).add_done_callback(accepted(i))
        with arrived:
            assert arrived.wait_for(lambda: len(handles) == count, timeout=WAIT_S), "not every goal was accepted"
            # One is worked on and max_waiting_requests (4) wait; the others are aborted busy at once.
            assert arrived.wait_for(lambda: len(results) >= count - 5, timeout=WAIT_S)
            waiting = sorted(i for i in range(count) if i not in results and i not in streamed)
        assert len(waiting) >= 2, (waiting, sorted(results), sorted(streamed))
        last, ahead = waiting[-1], waiting[:-1]
        handles[last].cancel_goal_async()
        with arrived:
            assert arrived.wait_for(lambda: len(results) == count, timeout=BURST_WAIT_S), \
                f"{count - len(results)} of {count} ask goals got no result"
    finally:
        action.destroy()
    assert results[last].status == GoalStatus.STATUS_CANCELED and "cancelled" in results[last].result.message
    assert ended[last] < max(ended[i] for i in ahead)      # it did not wait for its turn
    statuses = {i: r.status for i, r in results.items() if i != last}
    assert GoalStatus.STATUS_SUCCEEDED in statuses.values()
    for i, status in statuses.items():
        result = results[i].result
        if status == GoalStatus.STATUS_ABORTED:
            assert result.message.startswith("busy: ") and "ask requests are already waiting" in result.message
        else:
            assert status == GoalStatus.STATUS_SUCCEEDED and result.success, (status, result.message)


# ---- parameters while running -----------------------------------------------------------------

def test_restart_only_parameters_are_read_only_and_described(ros):
    from rcl_interfaces.srv import DescribeParameters

    for name, value in [("model", "foo"), ("device", "cuda"), ("dtype", "float16"), ("store_dir", "/tmp/x"),
                        ("encoder_backend", "onnxruntime"), ("image_transport", "compressed"), ("verifier_model", "x")]:
        [result] = ros.set_parameters(**{name: value})
        assert result.successful is False, name
        assert "read-only" in result.reason, (name, result.reason)
    described = ros.request(DescribeParameters, "personal_vlm/describe_parameters",
                         names=["model", "process_rate_hz", "max_concepts_in_context"]).descriptors
    model, rate, concepts = described
    assert model.read_only and "restart" in model.description
    assert not rate.read_only and "frames processed per second" in rate.description
    assert (rate.floating_point_range[0].from_value, rate.floating_point_range[0].to_value) == (0.01, 120.0)
    # Negative: the model profile's.
    assert (concepts.integer_range[0].from_value, concepts.integer_range[0].to_value) == (-1, 64)


@pytest.mark.parametrize("values, reason", [
    ({"reject_threshold": 0.9995}, "reject_threshold (0.9995) must be below accept_threshold (0.999)"),
    ({"accept_threshold": 0.4}, "must be below accept_threshold (0.4)"),
    ({"process_rate_hz": 0.0}, "process_rate_hz"),
    ({"process_rate_hz": "fast"}, "process_rate_hz must be a number"),
    ({"max_concepts_in_context": 65}, "max_concepts_in_context"),
    ({"max_waiting_requests": 17}, "max_waiting_requests"),
    ({"verification": "yes"}, "Wrong parameter type"),             # refused by rclpy itself
])
def test_a_live_parameter_change_with_a_bad_value_is_refused_with_the_reason(ros, values, reason):
    before = ros.get_parameters(*values)
    [result] = ros.set_parameters(**values)
    assert result.successful is False
    assert reason in result.reason
    assert ros.get_parameters(*values) == before


def _processed_per_second(ros, seconds: float) -> float:
    """Frames published as fast as the node could want them; detections counted for ``seconds``."""
    stop = threading.Event()

    def camera():
        while not stop.is_set():
            ros.publish_frame(image_msg(pixels(120)))
            time.sleep(0.02)

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)                                  # the previous rate's last frame is done
        with ros.arrived:
            start = len(ros.detections)
        time.sleep(seconds)
        with ros.arrived:
            count = len(ros.detections) - start
    finally:
        stop.set()
        thread.join()
    return count / seconds


def test_a_live_change_of_the_processing_rate_changes_the_processed_rate(ros):
    [result] = ros.set_parameters(process_rate_hz=1)               # an integer for a float parameter
    assert result.successful, result.reason
    assert ros.get_parameters("process_rate_hz") == [1.0]          # stored as a float
    slow = _processed_per_second(ros, 4.0)
    [result] = ros.set_parameters(process_rate_hz=20.0)
    assert result.successful, result.reason
    fast = _processed_per_second(ros, 4.0)
    assert slow <= 1.5, slow
    assert fast >= 2.5 * max(slow, 0.5), (slow, fast)


def test_live_thresholds_change_what_is_detected(ros):
    plate, table = pixels(130), pixels(131)
    assert ros.teach("plate", [image_msg(plate)]).success
    ros.observe_until(table, lambda r: "plate" not in names(r), frames=3)
    # Another random picture scores about 0.4: below the module's reject threshold of 0.5, above 0.3.
    for name, value in [("reject_threshold", 0.2), ("accept_threshold", 0.3)]:
        [result] = ros.set_parameters(**{name: value})
        assert result.successful, result.reason
    try:
        ros.observe_until(table, lambda r: "plate" in names(r), frames=10)
    finally:
        for name, value in [("accept_threshold", 0.999), ("reject_threshold", 0.5)]:
            [result] = ros.set_parameters(**{name: value})
            assert result.successful, result.reason
    ros.observe_until(table, lambda r: "plate" not in names(r), frames=3)
    assert ros.forget("plate").success


# ---- the ask action -------------------------------------------------------------------------

def test_the_ask_action_streams_the_answer_as_feedback(ros):
    from action_msgs.msg import GoalStatus

    assert ros.teach("teapot", [image_msg(pixels(140))]).success
    status, result, feedback = ros.ask_goal("Where is the teapot?", image_msg(pixels(140)))
    assert status == GoalStatus.STATUS_SUCCEEDED
    assert result.success, result.message
    assert result.concepts[0] == "teapot"
    assert feedback, "no partial answer was streamed"
    partials = [f.partial_answer for f in feedback]
    assert partials[-1] == result.answer != ""
    assert all(later.startswith(earlier) for earlier, later in zip(partials, partials[1:]))
    assert len(feedback) >= 2                             # one per token, not one at the end
    # Each feedback's new text is what it adds to the one before; together they are the answer.
    assert all(f.new_text for f in feedback)
    assert [f.new_text for f in feedback[1:]] == [b[len(a):] for a, b in zip(partials, partials[1:])]
    assert "".join(f.new_text for f in feedback) == result.answer


def test_a_cancelled_ask_goal_stops_generating(ros):
    from action_msgs.msg import GoalStatus

    cancelled = []

    def cancel_on_first(goal, _partial):
        if not cancelled:
            cancelled.append(goal.cancel_goal_async())

    status, result, feedback = ros.ask_goal("Describe everything in detail.", image_msg(pixels(141)),
                                          on_feedback=cancel_on_first)
    assert cancelled
    assert status == GoalStatus.STATUS_CANCELED
    assert result.success is False and "cancelled" in result.message
    full = ros.ask("Describe everything in detail.", image_msg(pixels(141)))
    assert full.success and len(result.answer) < len(full.answer)   # it stopped early


def test_the_ask_action_refuses_a_bad_request_with_a_message(ros):
    from action_msgs.msg import GoalStatus

    status, result, feedback = ros.ask_goal("  ", image_msg(pixels(142)))
    assert status == GoalStatus.STATUS_ABORTED
    assert result.success is False and "question is empty" in result.message and feedback == []


# ---- wording and values -------------------------------------------------------------------------

def test_list_says_1_concept_and_diagnostics_name_the_resolved_dtype(ros, node_process):
    for name in ros.list().names:                  # what earlier tests taught
        assert ros.forget(name).success
    assert ros.teach("lone cup", [image_msg(pixels(170))]).success
    listed = ros.list()
    assert list(listed.names) == ["lone cup"] and listed.message == "1 concept"
    assert ros.forget("lone cup").success
    assert ros.list().message == "0 concepts"
    assert _diagnostic_value(ros, "dtype") == "float32"
    assert "(float32, qwen2_5_vl)" in node_process.output()


def test_a_verifier_model_without_weights_is_one_warning_at_startup_and_the_node_serves(ros, node_process):
    """The default contrastive model (CLIP ViT-L/14-336) is not in this machine's cache and the
    hub is offline: one WARN line at startup says so, and R2P runs on the VLM's own yes/no."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("openai/clip-vit-large-patch14-336", "config.json"), str):
        pytest.skip("CLIP ViT-L/14-336 is in this machine's Hugging Face cache: it loads")
    lines = [line for line in node_process.output().splitlines() if "R2P verifier model" in line]
    assert len(lines) == 1, lines
    assert "[WARN]" in lines[0] and "openai/clip-vit-large-patch14-336" in lines[0] and "yes/no" in lines[0]
    assert ros.list().success


def test_a_damaged_icpt_projector_is_one_warning_at_startup_and_ego_serves(ros, node_process):
    lines = [line for line in node_process.output().splitlines() if "ICPT unavailable" in line]
    assert len(lines) == 1, lines
    assert "[WARN]" in lines[0] and "damaged-projector.safetensors" in lines[0] and "Ego recognises instead" in lines[0]
    assert _diagnostic_value(ros, "recognition_method").startswith("ego (ICPT unavailable: ")
    assert next(l for l in node_process.output().splitlines() if "ready:" in l).endswith(", recognition ego")
    assert ros.teach("icpt fallback cup", [image_msg(pixels(151))]).success      # taught with Ego alone
    assert ros.forget("icpt fallback cup").success


# ---- personal-vlm node …: the client for machines without the ros2 command --------------------

def _node_cli(*args, timeout=WAIT_S):
    return subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", *args], capture_output=True, text=True,
                          env=node_env(), timeout=timeout)


def test_the_node_client_teaches_lists_asks_and_forgets(ros, tmp_path):
    from PIL import Image as PILImage

    path = tmp_path / "kettle.png"
    PILImage.fromarray(pixels(150)).save(path)
    ns = ["node", "--namespace", NAMESPACE]

    taught = _node_cli(*ns, "teach", "kettle", str(path), "--category", "kettle", "--json")
    assert taught.returncode == 0, taught.stderr
    assert json.loads(taught.stdout)["memory_tokens"] > 0

    listed = _node_cli("--json", *ns, "list")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout)["concepts"] if r["name"] == "kettle")
    assert row["category"] == "kettle" and row["memory_tokens"] > 0

    added = _node_cli(*ns, "teach", "kettle", str(path), "--add", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["memory_tokens"] > row["memory_tokens"]
    assert json.loads(added.stdout)["message"].startswith("added a view to 'kettle'")

    asked = _node_cli(*ns, "ask", "Where is the kettle?", "--image", str(path), "--json")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["concepts"][0] == "kettle"

    streamed = _node_cli(*ns, "ask", "Where is the kettle?", "--image", str(path), "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == json.loads(asked.stdout)["answer"]

    forgotten = _node_cli(*ns, "forget", "kettle")
    assert forgotten.returncode == 0 and "forgot 'kettle'" in forgotten.stdout
    again = _node_cli(*ns, "forget", "kettle")
    assert again.returncode == 2 and "no concept named 'kettle'" in again.stderr
    assert "Traceback" not in again.stderr


def test_the_node_client_watches_the_detections(ros):
    stop = threading.Event()

    def camera():
        while not stop.is_set():
            ros.publish_frame(image_msg(pixels(151)), frame_id="watch_cam")
            time.sleep(0.1)

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    try:
        watched = _node_cli("node", "--namespace", NAMESPACE, "--json", "watch", "--count", "2")
    finally:
        stop.set()
        thread.join()
    assert watched.returncode == 0, watched.stderr
    frames = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(frames) == 2
    assert all(f["frame_id"] == "watch_cam" and f["detections"] == [] for f in frames)


def test_the_node_client_says_when_no_node_answers():
    done = _node_cli("node", "--namespace", "/nobody_here", "--timeout", "1", "list")
    assert done.returncode == 2
    assert "no node answers on /nobody_here/list_concepts within 1 s" in done.stderr
    assert "Traceback" not in done.stderr


class _LossyService:
    """A service client whose first ``lose`` answers never come (a reply lost to discovery)."""

    def __init__(self, log, lose):
        self.log, self.lose = log, lose

    def wait_for_service(self, timeout_sec):
        return True

    def call_async(self, request):
        from concurrent.futures import Future

        self.log.append(type(request).__name__)
        future = Future()
        if self.lose > 0:
            self.lose -= 1
        else:
            future.set_result(f"answer to {type(request).__name__}")
        return future


def test_the_node_client_resends_idempotent_requests_and_sends_the_others_once(monkeypatch):
    from types import SimpleNamespace

    from personal_vlm_node.ros import client as node_client

    monkeypatch.setattr(node_client, "RESEND_S", 0.05)
    sent = []
    services = {"list_concepts": _LossyService(sent, lose=2), "teach_concept": _LossyService(sent, lose=0)}
    fake = node_client.NodeClient.__new__(node_client.NodeClient)
    fake.namespace, fake.timeout, fake._known = "", 5.0, False
    fake.node = SimpleNamespace(create_client=lambda _type, name: services[name.lstrip("/")],
                                destroy_client=lambda _client: None)
    # A teach is preceded by a list, re-sent until answered (two answers lost), then sent once.
    assert fake.call(TeachConcept, "teach_concept", TeachConcept.Request(name="x")) == "answer to TeachConcept_Request"
    assert sent == ["ListConcepts_Request"] * 3 + ["TeachConcept_Request"]
    fake.call(TeachConcept, "teach_concept", TeachConcept.Request(name="y"))       # known now: no handshake
    assert sent[4:] == ["TeachConcept_Request"]


# ---- shutdown (last: it stops the module's node) ---------------------------------------------

def test_ctrl_c_stops_the_node_and_ends_requests_in_flight(ros, node_process):
    from personal_vlm_interfaces.action import Ask as AskAction
    from rclpy.action import ActionClient

    assert ros.list().success
    # An ask goal that is generating, and an ask request behind it, when Ctrl-C arrives.
    streaming = threading.Event()
    action = ActionClient(ros.node, AskAction, "ask")
    assert action.wait_for_server(timeout_sec=WAIT_S)
    action.send_goal_async(AskAction.Goal(question="Tell me a long story.", image=image_msg(pixels(160))),
                           feedback_callback=lambda _msg: streaming.set())
    assert streaming.wait(WAIT_S), "the goal never started answering"
    behind = ros.call_async(Ask, "ask", Ask.Request(question="And another one?", image=image_msg(pixels(161))))
    time.sleep(0.2)
    node_process.proc.send_signal(signal.SIGINT)
    node_process.proc.wait(timeout=15)
    output = node_process.output()
    assert node_process.proc.returncode == 0, output
    assert "Traceback" not in output
    assert "never retrieved" not in output and "Destroyable" not in output
    # The ask request waiting behind the goal was not started, but answered.
    ros.wait_until(behind.done, timeout=5.0, what="the answer to the waiting ask request")
    assert behind.result().success is False and "shutting down" in behind.result().message
