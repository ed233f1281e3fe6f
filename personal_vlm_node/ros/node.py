"""The ROS 2 node: a thin front end over :class:`personal_vlm_node.assistant.Assistant`.

Run it with ``ros2 run personal_vlm_node assistant_node --ros-args --params-file config/assistant.yaml``
or ``ros2 launch personal_vlm_node assistant.launch.py``; ``assistant_lifecycle_node`` (see
:mod:`.lifecycle`) is the same node as a managed lifecycle node. The parameters are
:mod:`personal_vlm_node.settings`'s (see :mod:`.parameters`); their defaults are also in
``config/assistant.yaml``.

Topics and services (names relative to the node's namespace):

- ``image`` (in): ``sensor_msgs/Image``, or with ``image_transport: compressed``
  ``sensor_msgs/CompressedImage`` on ``image/compressed`` (the remapped base name + ``/compressed``,
  as image_transport does). Sensor-data QoS, depth 1.
- ``~/detections`` (out): ``DetectionArray`` for every processed frame, empty ones included, with
  the camera image's header; ``~/detections_2d`` the same as ``vision_msgs/Detection2DArray``, with
  the class map on ``~/label_info`` (latched); ``~/image_markers`` the boxes as
  ``visualization_msgs/ImageMarker`` (:mod:`.outputs`).
- ``~/overlay`` and ``~/overlay/compressed`` (out): the processed frame with the detections drawn
  (raw, JPEG), each only while someone subscribes.
- ``/diagnostics`` (out): one ``DiagnosticStatus`` per second about the frame path (:mod:`.diagnostics`).
- ``teach_concept``, ``ask``, ``list_concepts``, ``forget_concept``: the services.
- ``ask`` (action ``personal_vlm_interfaces/action/Ask``): the answer streams as feedback; a
  cancel stops the generation at the next token.

Threads: the camera callback only fills a one-slot holder and one worker runs the model on the
newest frame (:mod:`.frames`); every request is taken at once and waits in its kind's line
(:mod:`.services`). The multi-threaded executor has a thread for every request that may wait, and
more, so a slow teach or ask never holds up the camera callback, diagnostics, a cancel request or
another kind of request.
"""

from __future__ import annotations

import sys

# Only the standard library here: a Ctrl-C while this module is imported would end the process with
# a traceback, and main() catches one from the moment it runs; the package is imported from there on.
STORE_CHECK_PERIOD_S = 0.1     # how often the store is checked for other processes' teach/forget (one cheap query)


class RosFrontend:
    """The ROS face of one loaded Assistant: the frame path, the services and the ask action, and
    diagnostics.

    Made when the node starts serving and ``destroy``-ed when it stops (the lifecycle node's
    deactivate); the rclpy node and the Assistant outlive it.
    """

    def __init__(self, node, assistant, values: dict):
        from .diagnostics import Diagnostics
        from .frames import FramePath
        from .services import Services

        self.values = values
        self.frame_path = FramePath(node, assistant, values)
        self.services = Services(node, assistant, values, self.frame_path.latest_frame_array)
        self.diagnostics = Diagnostics(node, assistant, values, self.frame_path)
        self.assistant = assistant
        self.node = node
        self.web = None         # the web console while serving, when web_port is set

    def start(self) -> None:
        self.frame_path.start()
        if int(self.values["web_port"]) > 0:
            from .web import start_web_console

            self.web = start_web_console(self.node, self.assistant, self.values, self.frame_path, self.services,
                                         self.diagnostics)

    def set_rate(self, hz: float) -> None:
        self.frame_path.set_rate(hz)

    def stop(self) -> None:
        """Refuse new requests, answer the waiting ones "shutting down", and stop the frame worker."""
        if self.web is not None:
            from .web import stop_web_console

            stop_web_console(self.web, self.assistant, self.frame_path)
            self.web = None
        self.services.close()
        self.frame_path.stop()

    def drain(self) -> bool:
        """Wait until no request is being worked on; True if none is left. Interrupt the model first."""
        return self.services.drain()

    def destroy(self) -> None:
        """Stop serving: the worker, the subscription, publishers, services, action and timer go."""
        self.stop()
        self.drain()
        self.diagnostics.destroy()
        self.services.destroy()
        self.frame_path.destroy()

    def describe(self) -> str:
        path = self.frame_path
        kind = "CompressedImage" if self.values["image_transport"] == "compressed" else "Image"
        outputs = [p.topic_name for p in (path.detections_pub, path.detections_2d_pub, path.markers_pub)
                   if p is not None]
        return f"camera {path.camera_topic} ({kind}), detections on {', '.join(outputs)}, {self.services.names()}"


def ready_line(values: dict, assistant) -> str:
    """What was loaded, with what ``auto`` resolved to."""
    from ..output import plural

    loaded = assistant.describe()
    count = len(assistant.concepts())
    return (f"ready: {values['model']} on {loaded['device']} ({loaded['dtype']}, {loaded['family']}), "
            f"{plural(count, 'concept')} in {loaded['store']}, recognition {assistant.recognition_status(why=False)}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:               # Ctrl-C during the imports or before the node existed
        from .process import NODE_NAME

        print(f"[{NODE_NAME}] interrupted during startup", file=sys.stderr, flush=True)
        return 0


def _main(argv: list[str] | None) -> int:
    import rclpy

    from .parameters import NodeParameters, open_assistant, settings_line, start_calibration
    from .process import NODE_NAME, init_ros, serve, shut_down
    from .services import EXECUTOR_THREADS

    init_ros(argv)
    node = rclpy.create_node(NODE_NAME)
    log = node.get_logger()
    held = {"assistant": None, "frontend": None}

    def start() -> None:
        parameters = NodeParameters(node)
        values = parameters.values
        assistant = held["assistant"] = parameters.assistant = open_assistant(values, log)
        frontend = held["frontend"] = parameters.frontend = RosFrontend(node, assistant, values)
        frontend.start()
        assistant.watch_store(STORE_CHECK_PERIOD_S)
        log.info(frontend.describe())
        log.info(settings_line(assistant))
        log.info(ready_line(values, assistant))
        start_calibration(assistant, log)

    return serve(node, EXECUTOR_THREADS, start,
                 lambda: shut_down(held["frontend"], held["assistant"]))


if __name__ == "__main__":
    sys.exit(main())
