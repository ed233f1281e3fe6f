"""The package as ROS sees it: generated interface types, installed files, node launcher, launch file.

Run through `./quickstart.sh test`, which installs both packages into the venv first.
"""

import ast
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from personal_vlm_interfaces.msg import Detection, DetectionArray
from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "personal_vlm_node"


# --- generated interface types -------------------------------------------------------------


@pytest.mark.parametrize(
    ("interface", "expected"),
    [
        (
            Detection,
            {
                "name": "string",
                "category": "string",
                "score": "float",
                "source": "string",
                "center_x": "float",
                "center_y": "float",
                "size_x": "float",
                "size_y": "float",
                "track_id": "uint32",
            },
        ),
        (
            DetectionArray,
            {
                "header": "std_msgs/Header",
                "detections": "sequence<personal_vlm_interfaces/Detection>",
            },
        ),
        (
            TeachConcept.Request,
            {
                "name": "string",
                "category": "string",
                "images": "sequence<sensor_msgs/Image>",
                "roi": "sensor_msgs/RegionOfInterest",
                "overwrite": "boolean", "add": "boolean",
            },
        ),
        (
            TeachConcept.Response,
            {
                "success": "boolean",
                "message": "string",
                "memory_tokens": "uint32",
                "keywords": "sequence<string>",
                "seconds": "float",
            },
        ),
        (Ask.Request, {"question": "string", "image": "sensor_msgs/Image"}),
        (
            Ask.Response,
            {
                "success": "boolean",
                "answer": "string",
                "concepts": "sequence<string>",
                "message": "string",
            },
        ),
        (ListConcepts.Request, {}),
        (
            ListConcepts.Response,
            {
                "success": "boolean",
                "message": "string",
                "names": "sequence<string>",
                "categories": "sequence<string>",
                "memory_tokens": "sequence<uint32>",
                "keywords_json": "sequence<string>",
            },
        ),
        (ForgetConcept.Request, {"name": "string"}),
        (ForgetConcept.Response, {"success": "boolean", "message": "string"}),
    ],
    ids=lambda x: getattr(x, "__qualname__", None),
)
def test_interface_has_documented_fields(interface, expected):
    # ListConcepts.Request has no field of its own; rosidl adds a placeholder for empty messages.
    fields = {
        name: kind
        for name, kind in interface.get_fields_and_field_types().items()
        if name != "structure_needs_at_least_one_member"
    }
    assert fields == expected


def test_detection_array_survives_serialization():
    detection = Detection(
        name="my mug",
        category="mug",
        score=0.875,
        source="match",
        center_x=320.5,
        center_y=240.0,
        size_x=64.0,
        size_y=48.0,
        track_id=7,
    )
    array = DetectionArray(
        header=Header(frame_id="camera_optical_frame"), detections=[detection]
    )

    restored = deserialize_message(serialize_message(array), DetectionArray)

    assert restored.header.frame_id == "camera_optical_frame"
    assert len(restored.detections) == 1
    got = restored.detections[0]
    assert (got.name, got.category, got.source, got.track_id) == ("my mug", "mug", "match", 7)
    assert (got.score, got.center_x, got.center_y, got.size_x, got.size_y) == (
        0.875,
        320.5,
        240.0,
        64.0,
        48.0,
    )


def test_teach_request_carries_images_and_roi():
    image = Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(range(18)))
    request = TeachConcept.Request(
        name="Fluffy",
        category="cat",
        images=[image],
        roi=RegionOfInterest(x_offset=1, y_offset=0, width=2, height=2),
        overwrite=True,
    )

    restored = deserialize_message(serialize_message(request), TeachConcept.Request)

    assert restored.name == "Fluffy" and restored.category == "cat" and restored.overwrite
    assert len(restored.images) == 1
    assert bytes(restored.images[0].data) == bytes(range(18))
    assert (restored.roi.x_offset, restored.roi.width, restored.roi.height) == (1, 2, 2)


def test_teach_request_defaults_mean_latest_frame_whole_image():
    request = TeachConcept.Request()
    assert list(request.images) == []
    roi = request.roi
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (0, 0, 0, 0)
    assert request.overwrite is False


# --- installed files ------------------------------------------------------------------------


def _install_prefix():
    """The prefix this package is installed in: the venv (pip) or a colcon install space."""
    candidates = [sys.prefix] + [
        p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p
    ]
    for prefix in candidates:
        if (Path(prefix) / "share/ament_index/resource_index/packages" / PACKAGE).is_file():
            return Path(prefix)
    pytest.fail(
        f"{PACKAGE} is not installed in any of {candidates}; run ./quickstart.sh test "
        "(or: pip install --no-deps --no-build-isolation .)"
    )


def test_installed_share_files_match_the_sources():
    share = _install_prefix() / "share" / PACKAGE
    assert (share / "package.xml").read_bytes() == (REPO / "package.xml").read_bytes()
    for relative in ("launch/assistant.launch.py", "config/assistant.yaml"):
        assert (share / relative).read_bytes() == (REPO / relative).read_bytes(), relative


def test_installed_node_launcher_is_executable():
    launcher = _install_prefix() / "lib" / PACKAGE / "assistant_node"
    assert launcher.is_file()
    assert os.access(launcher, os.X_OK)
    assert launcher.read_bytes() == (REPO / "scripts" / "assistant_node").read_bytes()


def _fake_python(path):
    """An executable named like an interpreter that prints who it is, the ROS wheels' bootstrap
    marker and its arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{path}" "${{_ROS_WHEELS_BOOTSTRAP_COMPLETE:-unset}}" "$@"\n')
    path.chmod(0o755)


def _run_launcher(prefix, env_path):
    launcher = prefix / "lib" / PACKAGE / "assistant_node"
    launcher.parent.mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "assistant_node", launcher)
    launcher.chmod(0o755)
    env = {"PATH": env_path, "_ROS_WHEELS_BOOTSTRAP_COMPLETE": "1"}
    return subprocess.run(
        [str(launcher), "--ros-args", "-r", "image:=/cam"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()


def test_launcher_prefers_the_interpreter_of_its_own_environment(tmp_path):
    venv_python = tmp_path / "venv" / "bin" / "python3"
    _fake_python(venv_python)
    path_python = tmp_path / "elsewhere" / "python3"
    _fake_python(path_python)

    argv = _run_launcher(tmp_path / "venv", f"{path_python.parent}:/usr/bin:/bin")

    assert Path(argv[0]).resolve() == venv_python.resolve()
    # The marker came from another environment; this one's bootstrap must run again.
    assert argv[1] == "unset"
    assert argv[2:] == ["-m", "personal_vlm_node.ros.node", "--ros-args", "-r", "image:=/cam"]


def test_launcher_falls_back_to_python3_on_path(tmp_path):
    # A colcon install space has no bin/python3 next to lib/<package>/.
    path_python = tmp_path / "elsewhere" / "python3"
    _fake_python(path_python)

    argv = _run_launcher(tmp_path / "install", f"{path_python.parent}:/usr/bin:/bin")

    assert argv[0] == str(path_python)
    assert argv[2:] == ["-m", "personal_vlm_node.ros.node", "--ros-args", "-r", "image:=/cam"]


# --- launch and parameters files ----------------------------------------------------------------


def test_launch_file_compiles(tmp_path):
    py_compile.compile(
        str(REPO / "launch" / "assistant.launch.py"), cfile=str(tmp_path / "x.pyc"), doraise=True
    )


def test_launch_file_starts_the_assistant_node_or_its_lifecycle_variant():
    tree = ast.parse((REPO / "launch" / "assistant.launch.py").read_text(encoding="utf-8"))
    calls = {
        call.func.id: {kw.arg: kw.value.value for kw in call.keywords if isinstance(kw.value, ast.Constant)}
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("Node", "LifecycleNode")
    }
    assert calls["Node"]["executable"] == "assistant_node"
    assert calls["LifecycleNode"]["executable"] == "assistant_lifecycle_node"
    common = next(
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "common"
    )
    keywords = {kw.arg: kw.value.value for kw in common.keywords if isinstance(kw.value, ast.Constant)}
    assert keywords["package"] == PACKAGE
    assert keywords["name"] == "personal_vlm"


def test_the_lifecycle_node_module_is_importable():
    # The launch arguments themselves are checked against the settings in test_settings.py.
    import importlib.util

    assert importlib.util.find_spec("personal_vlm_node.ros.lifecycle") is not None


def test_installed_lifecycle_launcher_is_executable():
    launcher = _install_prefix() / "lib" / PACKAGE / "assistant_lifecycle_node"
    assert launcher.is_file() and os.access(launcher, os.X_OK)
    assert launcher.read_bytes() == (REPO / "scripts" / "assistant_lifecycle_node").read_bytes()


def test_package_xml_lists_what_the_node_and_launch_file_import():
    text = (REPO / "package.xml").read_text(encoding="utf-8")
    for dependency in ("rclpy", "launch", "launch_ros", "ament_index_python", "std_msgs", "sensor_msgs",
                       "diagnostic_msgs", "lifecycle_msgs", "action_msgs", "rcl_interfaces", "vision_msgs", "visualization_msgs",
                       "personal_vlm_interfaces"):
        assert f"<exec_depend>{dependency}</exec_depend>" in text, dependency


def test_parameters_file_applies_to_the_node_in_any_namespace():
    params = yaml.safe_load((REPO / "config" / "assistant.yaml").read_text(encoding="utf-8"))
    assert list(params) == ["/**"]
    values = params["/**"]["ros__parameters"]
    assert values["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert values["encoder_backend"] == "torch"
    assert isinstance(values["process_rate_hz"], float)
    assert isinstance(values["accept_threshold"], float)
    assert isinstance(values["max_concepts_in_context"], int)
    assert values["verification"] is True
