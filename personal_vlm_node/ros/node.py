"""The ROS 2 node: a thin adapter over :class:`personal_vlm_node.assistant.Assistant`.

Run it with ``ros2 run personal_vlm_node assistant_node --ros-args --params-file config/assistant.yaml``
or ``ros2 launch personal_vlm_node assistant.launch.py``. Parameters are declared with descriptions
and ranges; their defaults live in ``config/assistant.yaml``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import PersonalVLMError

NODE_NAME = "personal_vlm"
BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Param:
    default: object
    description: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None


PARAMETERS: dict[str, Param] = {
    "model": Param("Qwen/Qwen2.5-VL-3B-Instruct", "Hugging Face model id or local checkpoint folder"),
    "device": Param("auto", "auto, cpu, cuda or cuda:N"),
    "dtype": Param("auto", "weight precision", ("auto", "float32", "bfloat16", "float16")),
    "store_dir": Param("", "concept store folder; empty = $XDG_DATA_HOME/personal_vlm"),
    "profile": Param("", "model profile YAML; empty = models/<model>.yaml or the defaults"),
    "encoder_backend": Param("torch", "vision encoder on the frame path", BACKENDS),
    "engine_cache_dir": Param("", "cache for exported ONNX files and TensorRT engines"),
    "process_rate_hz": Param(2.0, "most camera frames processed per second", low=0.01, high=120.0),
    "accept_threshold": Param(-1.0, "match score that detects without verification; <0 = profile", low=-1.0, high=1.0),
    "reject_threshold": Param(-1.0, "match score that rejects without verification; <0 = profile", low=-1.0, high=1.0),
    "max_concepts_in_context": Param(5, "most memories in one /ask prompt", low=0, high=64),
    "verification": Param(True, "settle uncertain matches with the model"),
    "overlay": Param(True, "publish ~/overlay while someone subscribes"),
    "compressed": Param(False, "subscribe to sensor_msgs/CompressedImage instead of Image"),
}


def check_value(name: str, value) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is."""
    spec = PARAMETERS[name]
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}"
    if spec.low is not None and not spec.low <= float(value) <= spec.high:
        return f"{name} must lie in [{spec.low:g}, {spec.high:g}]"
    if name == "model" and not str(value).strip():
        return "model must name a Hugging Face id or a local folder"
    return None


def _declare(node) -> None:
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException

    for name, spec in PARAMETERS.items():
        descriptor = ParameterDescriptor(description=spec.description)
        if spec.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
        if spec.low is not None and isinstance(spec.default, float):
            descriptor.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high)]
        elif spec.low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
        try:
            node.declare_parameter(name, spec.default, descriptor)
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise PersonalVLMError(f"invalid parameter {name}: {exc}") from exc


def _values(node) -> dict:
    values = {name: node.get_parameter(name).value for name in PARAMETERS}
    problems = [p for p in (check_value(n, v) for n, v in values.items()) if p]
    if problems:
        raise PersonalVLMError("invalid parameters: " + "; ".join(problems))
    return values


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from ..assistant import Assistant

    rclpy.init(args=argv if argv is not None else sys.argv)
    node = rclpy.create_node(NODE_NAME)
    log = node.get_logger()
    assistant = None
    code = 0
    # Built before "ready" is logged: a Ctrl-C that lands while an executor is being constructed
    # leaves a half-made object whose destructor raises.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        _declare(node)
        values = _values(node)
        assistant = Assistant.open(values["model"], store_dir=values["store_dir"] or None,
                                   device=values["device"], dtype=values["dtype"],
                                   profile_path=values["profile"] or None,
                                   progress=lambda m: log.info(m))
        log.info(f"ready: {values['model']} on {assistant.vlm.device} ({assistant.vlm.family}), "
                 f"{len(assistant.concepts())} concepts in {assistant.store.root}")
        executor.spin()
    except PersonalVLMError as exc:
        log.error(str(exc))
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        # The context is already shut down here, so /rosout can't carry this line.
        print(f"[{NODE_NAME}] shutting down", file=sys.stderr, flush=True)
    finally:
        if assistant is not None:
            assistant.close()
        executor.shutdown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
