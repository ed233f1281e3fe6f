"""The node as a managed (lifecycle) node: ``ros2 run personal_vlm_node assistant_lifecycle_node``.

Same parameters, topics, services and action as :mod:`.node`, driven by the standard transitions
(``ros2 lifecycle set /personal_vlm configure`` …):

- configure: load the model and the concept store (the slow part; a failure says why and the node
  stays unconfigured);
- activate: subscribe to the camera, publish detections, serve the services and the ask action;
- deactivate: stop processing frames and serving (requests in flight are interrupted and answered);
- cleanup: free the model;
- shutdown: both, from any state.

The node's pieces are the plain node's (:class:`.node.RosFrontend`, :class:`.parameters.NodeParameters`)
and so is its process (:func:`.process.serve`); only the order in which the pieces are made differs.
"""

from __future__ import annotations

import gc
import sys

from ..errors import PersonalVLMError
from .node import STORE_CHECK_PERIOD_S, RosFrontend, ready_line
from .parameters import NodeParameters, open_assistant, settings_line, start_calibration
from .process import NODE_NAME, init_ros, serve, shut_down
from .services import EXECUTOR_THREADS


def _lifecycle_node_class():
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

    class AssistantLifecycleNode(LifecycleNode):
        def __init__(self, **kwargs):
            super().__init__(NODE_NAME, **kwargs)
            self.parameters: NodeParameters | None = None
            self.assistant = None
            self.frontend: RosFrontend | None = None

        def declare(self) -> None:
            """Declare and check the parameters (a PersonalVLMError names the bad ones)."""
            self.parameters = NodeParameters(self)

        # ---- transitions ------------------------------------------------------------------
        def on_configure(self, state):
            try:
                self.assistant = open_assistant(self.parameters.values, self.get_logger())
            except PersonalVLMError as exc:
                self.get_logger().error(f"configure failed: {exc}")
                return TransitionCallbackReturn.FAILURE
            self.parameters.assistant = self.assistant
            self.assistant.watch_store(STORE_CHECK_PERIOD_S)     # follow other processes' changes
            self.get_logger().info(settings_line(self.assistant))
            self.get_logger().info(
                "configured: " + ready_line(self.parameters.values, self.assistant).removeprefix("ready: ")
                + "; activate to start serving")
            start_calibration(self.assistant, self.get_logger())
            return TransitionCallbackReturn.SUCCESS

        def on_activate(self, state):
            self.frontend = RosFrontend(self, self.assistant, self.parameters.values)
            self.parameters.frontend = self.frontend
            self.frontend.start()
            self.get_logger().info(self.frontend.describe())
            self.get_logger().info(ready_line(self.parameters.values, self.assistant))
            return super().on_activate(state)

        def on_deactivate(self, state):
            self._stop_serving()
            self.get_logger().info("inactive: camera frames and requests are no longer processed")
            return super().on_deactivate(state)

        def on_cleanup(self, state):
            self._free_model()
            self.get_logger().info("unconfigured: the model is unloaded")
            return TransitionCallbackReturn.SUCCESS

        def on_shutdown(self, state):
            self.release()
            return TransitionCallbackReturn.SUCCESS

        def on_error(self, state):
            self.release()
            return TransitionCallbackReturn.SUCCESS

        # ---- the shared pieces ------------------------------------------------------------
        def _stop_serving(self) -> None:
            if self.frontend is not None:
                self.parameters.frontend = None
                self.frontend.destroy()
                self.frontend = None

        def _free_model(self) -> None:
            if self.assistant is not None:
                self.parameters.assistant = None
                self.assistant.close()
                self.assistant = None
                gc.collect()

        def release(self) -> bool:
            """Stop serving and free the model without waiting for slow work (shutdown, Ctrl-C);
            True if every request in flight answered."""
            drained = shut_down(self.frontend, self.assistant)
            if self.frontend is not None:
                if self.parameters is not None:
                    self.parameters.frontend = None
                self.frontend = None
            if self.assistant is not None:
                self.parameters.assistant = None
                self.assistant = None
            return drained

    return AssistantLifecycleNode


def main(argv: list[str] | None = None) -> int:
    init_ros(argv)
    node = _lifecycle_node_class()()

    def start() -> None:
        node.declare()
        node.get_logger().info(f"unconfigured: `ros2 lifecycle set {node.get_fully_qualified_name()} configure` "
                               f"loads {node.parameters.values['model']}, then `… activate` starts serving")

    # One thread more than the plain node: the lifecycle services.
    return serve(node, EXECUTOR_THREADS + 1, start, node.release)


if __name__ == "__main__":
    sys.exit(main())
