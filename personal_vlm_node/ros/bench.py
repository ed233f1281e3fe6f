"""``personal-vlm bench --node``: the node over real ROS 2, as a camera and viewers see it.

One node process (the bench's model, ``process_rate_hz`` 10, no verification) is fed camera frames
at 15 Hz by an in-process publisher, at 640×480 and 1280×720. For each size three phases of
``seconds`` each: no overlay subscriber, a raw ``~/overlay`` subscriber, a ``~/overlay/compressed``
(JPEG) subscriber. Each phase reports the detection rate the node reached, the overlay rate the
subscriber got and the overlay's bytes per frame. The frames are a smooth synthetic scene
(upscaled coarse noise plus fine noise), closer to a camera's statistics than pure noise, which no
JPEG compresses. The node's own diagnostics give the rate it received frames at, which tells
transport losses from a slow frame path. ``ROS_AUTOMATIC_DISCOVERY_RANGE`` is set to LOCALHOST and a domain of its own is
chosen unless the caller set one: nothing leaves the machine.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from ..errors import PersonalVLMError

SIZES = ((640, 480), (1280, 720))
CAMERA_HZ = 15.0
PROCESS_RATE_HZ = 10.0
PHASES = ("no overlay subscriber", "raw overlay subscriber", "JPEG overlay subscriber")


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: coarse colour noise upscaled smoothly, plus a little fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(PILImage.fromarray(coarse).resize((width, height), PILImage.BICUBIC), dtype=np.int16)
    fine = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return np.clip(smooth + fine, 0, 255).astype(np.uint8)        # (H, W, 3)


class _Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def __call__(self, msg) -> None:
        with self.lock:
            self.count += 1
            self.bytes += len(msg.data) if hasattr(msg, "data") else 0

    def take(self) -> tuple[int, int]:
        with self.lock:
            out, self.count, self.bytes = (self.count, self.bytes), 0, 0
        return out


def run_node_bench(model: str, device: str = "cpu", dtype: str = "float32", seconds: float = 8.0,
                   progress=print) -> dict:
    """Figures of the node's frame path with and without overlay subscribers (see the module)."""
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 101))
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image

    from ..testing.kit import image_msg, params_file, start_node
    from .client import NodeClient

    namespace = f"/bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        values = {"model": model, "device": device, "dtype": dtype, "store_dir": str(Path(tmp) / "store"),
                  "process_rate_hz": PROCESS_RATE_HZ, "verification": False, "overlay": True,
                  "verifier_model": ""}     # the frame path is measured: no contrastive model to fetch
        params = params_file(Path(tmp) / "params.yaml", values)
        try:
            proc = start_node(params, namespace, Path(tmp) / "node.log")
        except RuntimeError as exc:
            raise PersonalVLMError(str(exc)) from exc
        client = None
        try:
            client = NodeClient(namespace, timeout=60.0, client_name="personal_vlm_bench")
            camera = client.node.create_publisher(Image, client.name("image"), qos_profile_sensor_data)
            detections = _Counter()
            client.record_detections(entry=detections, into=[])
            from diagnostic_msgs.msg import DiagnosticArray

            status_name = f"{namespace}/personal_vlm: frame path"
            reports: list = []
            client.record(DiagnosticArray, "/diagnostics", into=reports, entry=lambda a: next(
                ({kv.key: kv.value for kv in s.values} for s in a.status if s.name == status_name), None))
            report = {"camera_hz": CAMERA_HZ, "process_rate_hz": PROCESS_RATE_HZ, "phase_seconds": seconds,
                      "model": model, "sizes": {},
                      "fastdds_profile": os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")}
            for width, height in SIZES:
                frame = image_msg(scene(width, height))
                stop = threading.Event()

                def feed(frame=frame, stop=stop):
                    period = 1.0 / CAMERA_HZ
                    next_at = time.monotonic()
                    while not stop.is_set():
                        frame.header.stamp = client.node.get_clock().now().to_msg()
                        camera.publish(frame)
                        next_at += period
                        stop.wait(max(0.0, next_at - time.monotonic()))

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                size = {}
                try:
                    for phase in PHASES:
                        progress(f"{width}×{height}: {phase}…")
                        overlay, subscription = _Counter(), None
                        if phase.startswith("raw"):
                            subscription = client.node.create_subscription(
                                Image, client.name("personal_vlm/overlay"), overlay, 1)
                        elif phase.startswith("JPEG"):
                            subscription = client.node.create_subscription(
                                CompressedImage, client.name("personal_vlm/overlay/compressed"), overlay, 1)
                        time.sleep(2.0)                      # discovery, and the node's rate settles
                        detections.take()
                        overlay.take()
                        t0 = time.monotonic()
                        time.sleep(seconds)
                        elapsed = time.monotonic() - t0
                        count, _ = detections.take()
                        shown, shown_bytes = overlay.take()
                        node_view = next((r for r in reversed(reports) if r is not None), {})
                        size[phase] = {"detections_hz": count / elapsed, "overlay_hz": shown / elapsed,
                                       "overlay_bytes_per_frame": shown_bytes / shown if shown else None,
                                       # what the node saw (its diagnostics, the last 5 s)
                                       "node_received_hz": float(node_view.get("received_hz", "nan")),
                                       "node_latency_ms": float(node_view.get("latency_ms", "nan"))}
                        if subscription is not None:
                            client.node.destroy_subscription(subscription)
                finally:
                    stop.set()
                    feeder.join()
                size["raw_frame_bytes"] = width * height * 3
                report["sizes"][f"{width}x{height}"] = size
            return report
        finally:
            if client is not None:
                client.close()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def format_node_table(report: dict) -> str:
    rows = [("node", f"camera {report['camera_hz']:g} Hz, process_rate_hz {report['process_rate_hz']:g}, "
                     f"{report['phase_seconds']:g} s a phase"),
            ("Fast DDS profile", report["fastdds_profile"] or "default (512 KiB shared-memory segment)")]
    for size, phases in report["sizes"].items():
        for phase in PHASES:
            entry = phases[phase]
            text = (f"detections {entry['detections_hz']:.1f} Hz (node received {entry['node_received_hz']:.1f} Hz, "
                    f"latency {entry['node_latency_ms']:.0f} ms)")
            if entry["overlay_bytes_per_frame"]:
                text += (f", overlay {entry['overlay_hz']:.1f} Hz, {entry['overlay_bytes_per_frame'] / 1000:.0f} kB "
                         f"a frame ({entry['overlay_bytes_per_frame'] / phases['raw_frame_bytes']:.1%} of raw)")
            rows.append((f"{size} {phase}", text))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
