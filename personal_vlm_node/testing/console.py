"""The web console's tests and measurements: a node with its console on, fed by a test camera.

The node runs as its own process (:func:`.kit.start_node`) with a tiny random-weight model and
the thresholds that make detection deterministic (a memory is a subset of its picture's tokens:
frames of that picture score 1.0, other noise about 0.4); :class:`TestCamera` publishes one
picture over and over, as a camera driver would.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .kit import image_msg, params_file, pixels, start_node

CAMERA_HZ = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_node_values(model: str, store: Path, port: int, token: str = "", **values) -> dict:
    """Node parameters for a console test: deterministic detection, no verification, fast frames."""
    return {"model": model, "device": "cpu", "dtype": "float32", "store_dir": str(store), "process_rate_hz": 10.0,
            "accept_threshold": 0.999, "reject_threshold": 0.5, "verification": False, "web_port": port,
            "web_token": token, **values}


def start_console_node(folder: Path, model: str, namespace: str, token: str = "", **values):
    """(node process, console URL) for a node in ``namespace`` with its console on a free port."""
    port = free_port()
    params = params_file(folder / "params.yaml", console_node_values(model, folder / "store", port, token, **values))
    log = folder / "node.log"
    proc = start_node(params, namespace, log)
    if f"web console on http://127.0.0.1:{port}/" not in log.read_text(errors="replace"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the node did not start its web console:\n{log.read_text(errors='replace')[-2000:]}")
    return proc, f"http://127.0.0.1:{port}/"


def tabletop(width: int = 320, height: int = 240) -> np.ndarray:
    """(height, width, 3) uint8 RGB: a wall, a table and three things on it (a red mug at about
    x 100-190, y 60-150 of 320×240, a blue book, a green ball). Smooth, unlike :func:`.kit.pixels`,
    so that screenshots of the console stay small; the same picture every time."""
    picture = Image.new("RGB", (320, 240), (222, 214, 196))
    draw = ImageDraw.Draw(picture)
    for y in range(120, 240):                                   # the table, darker towards the viewer
        shade = 150 - (y - 120) // 3
        draw.line([(0, y), (320, y)], fill=(shade, shade * 2 // 3, shade // 3))
    draw.rectangle((110, 70, 170, 145), fill=(196, 40, 36), outline=(120, 20, 18), width=3)     # the mug
    draw.ellipse((160, 88, 192, 126), outline=(150, 30, 28), width=7)                         # its handle
    draw.ellipse((112, 62, 168, 78), fill=(230, 230, 225), outline=(120, 20, 18), width=2)
    draw.rectangle((215, 120, 300, 150), fill=(40, 70, 170), outline=(20, 35, 90), width=3)     # a book
    draw.ellipse((30, 115, 80, 165), fill=(60, 160, 70), outline=(30, 90, 35), width=3)         # a ball
    return np.asarray(picture.resize((width, height)), dtype=np.uint8).copy()


class TestCamera:
    """Publishes ``picture`` (default ``pixels(seed)``) on the node's camera input ``hz`` times a
    second on a thread, as a camera driver does."""

    __test__ = False            # not a pytest class

    def __init__(self, client, seed: int = 1, hz: float = CAMERA_HZ, picture: np.ndarray | None = None):
        self.client, self.hz = client, hz
        self.picture = pixels(seed) if picture is None else picture
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.publish_frame(image_msg(self.picture))
            self._stop.wait(1.0 / self.hz)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def wait_for(condition, timeout: float, what: str, period: float = 0.1):
    """The first true value of ``condition()`` within ``timeout`` s; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)
