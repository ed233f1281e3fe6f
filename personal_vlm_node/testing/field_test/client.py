"""The field test's client of the node, and a camera that publishes one picture at a fixed rate."""

from __future__ import annotations

import threading
import time

import numpy as np

from ...ros.client import NodeClient
from ..kit import image_msg
from .world import REQUEST_TIMEOUT_S


# ---- the node's client ------------------------------------------------------------------------

class FieldClient(NodeClient):
    """The node's client; it keeps (monotonic, wall, stamp, names) of every DetectionArray."""

    def __init__(self, namespace: str):
        super().__init__(namespace, timeout=REQUEST_TIMEOUT_S, client_name="personal_vlm_field_test", threads=2)
        self.detections: list[tuple[float, float, tuple, tuple]] = self.record_detections(entry=_detection_entry)

    def since(self, t0: float) -> list:
        with self.arrived:
            return [d for d in self.detections if d[0] >= t0]


def _detection_entry(msg) -> tuple[float, float, tuple, tuple]:
    return (time.monotonic(), time.time(), (msg.header.stamp.sec, msg.header.stamp.nanosec),
            tuple(d.name for d in msg.detections))


class Camera:
    """Publishes one picture (changeable) at a fixed rate on a thread."""

    def __init__(self, client: FieldClient, rate_hz: float):
        self.client, self.period = client, 1.0 / rate_hz
        self.msg = None
        self.stop_event = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def show(self, array: np.ndarray | None) -> None:
        self.msg = None if array is None else image_msg(array)

    def _run(self) -> None:
        while not self.stop_event.wait(self.period):
            if self.msg is not None:
                self.client.publish_frame(self.msg)
                self.count += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


def teach_request(name: str, arrays=(), **fields):
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept.Request(name=name, images=[image_msg(a) for a in arrays], **fields)


def node_names(client: FieldClient) -> list[str] | None:
    from personal_vlm_interfaces.srv import ListConcepts

    response = client.send(ListConcepts, "list_concepts", ListConcepts.Request())
    return None if response is None or not response.success else list(response.names)


def teach_type():
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept
