"""Measure the web console: page load, the live view's rate and delay in the page, and the node's
frame rate with no page, with a websocket client that only receives, and with the page in
headless Chromium.

    python -m personal_vlm_node.testing.console_figures --seconds 15 --size 640x480

A tiny random-weight model (real code paths; the model's speed is not the point), a test camera
publishing :func:`.console.tabletop` at ``--camera-hz``, the node at ``--rate`` frames a second.
The node's rate is counted from its ``~/detections`` messages. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _detections_rate(client, seconds: float, url: str) -> dict:
    """Detections a second over ``seconds``, and what the node's diagnostics said at the end."""
    import urllib.request

    before = len(client.detections)
    time.sleep(seconds)
    rate = (len(client.detections) - before) / seconds
    with urllib.request.urlopen(url + "api/health", timeout=10) as answer:
        values = json.load(answer)["values"]
    return {"detections_hz": round(rate, 2), **{k: float(values[k]) for k in ("received_hz", "processed_hz",
                                                                            "latency_ms", "encode_ms")}}


async def _receive_frames(url: str, seconds: float) -> dict:
    import struct

    import aiohttp

    frames, delays = 0, []
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(url + "ws")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                message = await socket.receive(timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if message.type == aiohttp.WSMsgType.BINARY:
                length = struct.unpack(">I", message.data[:4])[0]
                header = json.loads(message.data[4:4 + length])
                frames += 1
                delays.append(time.time() - header["captured"])
        await socket.close()
    return {"frames_per_s": frames / seconds, "delay_ms": 1000 * sum(delays) / max(1, len(delays))}


def measure(seconds: float, width: int, height: int, rate: float, camera_hz: float) -> dict:
    from ..ros.client import NodeClient
    from .browser import Browser, find_chromium
    from .console import TestCamera, start_console_node, tabletop
    from .kit import node_env
    from .tiny_model import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="console_figures_"))
    model = build_tiny_model(folder / "tiny", "qwen2_5_vl")
    namespace = f"/console_figures_{os.getpid()}"
    proc, url = start_console_node(folder, str(model), namespace, process_rate_hz=rate)
    client = NodeClient(namespace, timeout=60, client_name="console_figures")
    client.detections = client.record_detections()
    camera = TestCamera(client, picture=tabletop(width, height), hz=camera_hz)
    figures = {"frame": f"{width}x{height}", "camera_hz": camera_hz, "process_rate_hz": rate, "seconds": seconds}
    try:
        time.sleep(3.0)
        figures["node_no_page"] = _detections_rate(client, seconds, url)
        # The receiving client is a process of its own, as a browser is: in this one it would take
        # the camera publisher's time.
        receiver = subprocess.Popen([sys.executable, "-m", "personal_vlm_node.testing.console_figures",
                                     "--receive", url, "--seconds", str(seconds + 2)],
                                    stdout=subprocess.PIPE, text=True, env=node_env())
        time.sleep(1.0)
        figures["node_with_socket_client"] = _detections_rate(client, seconds, url)
        figures["socket_client"] = json.loads(receiver.communicate(timeout=seconds + 60)[0])
        figures["node_no_page_again"] = _detections_rate(client, seconds, url)
        chromium = find_chromium()
        if chromium is None:
            figures["browser"] = "chromium not installed"
            return figures
        browser = Browser(chromium, folder / "chromium")
        try:
            started = time.monotonic()
            browser.open(url)
            loaded = time.monotonic() - started
            browser.wait_for("window.consoleState && consoleState.frames >= 1", 60, "the first frame")
            first_frame = time.monotonic() - started
            timing = browser.evaluate("(() => { const t = performance.getEntriesByType('navigation')[0]; "
                                      "return {dom: t.domContentLoadedEventEnd, load: t.loadEventEnd}; })()")
            time.sleep(2.0)
            figures["node_with_page"] = _detections_rate(client, seconds, url)
            state = browser.evaluate("({fps: consoleState.fps, latency: consoleState.latencyMs, frames: consoleState.frames})")
            figures["page"] = {"navigate_to_load_s": round(loaded, 2), "dom_content_loaded_ms": round(timing["dom"]),
                               "load_event_ms": round(timing["load"]), "to_first_frame_s": round(first_frame, 2),
                               "view_frames_per_s": round(state["fps"], 1), "view_delay_ms": round(state["latency"])}
        finally:
            browser.close()
        figures["node_after_page"] = _detections_rate(client, seconds, url)
    finally:
        camera.stop()
        client.close()
        proc.terminate()
        proc.wait(30)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.console_figures",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    parser.add_argument("--size", default="640x480", help="camera frame WIDTHxHEIGHT")
    parser.add_argument("--rate", type=float, default=10.0, help="the node's process_rate_hz")
    parser.add_argument("--camera-hz", type=float, default=15.0)
    parser.add_argument("--receive", metavar="URL", help=argparse.SUPPRESS)   # the receiving client's process
    args = parser.parse_args(argv)
    if args.receive:
        received = asyncio.run(_receive_frames(args.receive, args.seconds))
        print(json.dumps({k: round(v, 1) for k, v in received.items()}))
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    print(json.dumps(measure(args.seconds, width, height, args.rate, args.camera_hz), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
