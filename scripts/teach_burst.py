#!/usr/bin/env python3
"""Send many teach_concept requests to the node at once and count how each one ended.

    .venv/bin/python scripts/teach_burst.py [--calls 200] [--size 300x200] [--timeout 120]
                                            [--namespace /robot1] [--max-waiting N]

Without --namespace it starts a node of its own (a tiny random-weight Qwen2.5-VL on the CPU, a
temporary store, ROS_DOMAIN_ID 50–59 unless set) and stops it afterwards; with one it calls the
node running there and forgets the concepts it taught. Every call comes from a client of its own,
as separate callers would; each client is answered once (a teach of an empty name) before the
burst, so that the figures are the node's and not DDS discovery's. Each request carries one
random picture of --size; at 300x200 the 200 requests are 36 MB, which DDS takes seconds to
deliver on a small machine, so they reach the node spread out. Prints one JSON line: answered,
served, refused busy, failed otherwise, unanswered, and the slowest busy and served answers in
seconds; the exit status is 1 when a call got no answer within --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def start_node(folder: Path, namespace: str, max_waiting: int | None) -> subprocess.Popen:
    from personal_vlm_node.testing.tiny_model import build_tiny_model

    values = {"model": str(build_tiny_model(folder / "model", "qwen2_5_vl")), "device": "cpu",
              "dtype": "float32", "store_dir": str(folder / "store"), "verification": False}
    if max_waiting is not None:
        values["max_waiting_requests"] = max_waiting
    params = folder / "params.yaml"
    lines = ["/**:", "  ros__parameters:"] + [f"    {k}: {json.dumps(v)}" for k, v in values.items()]
    params.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"}
    log = folder / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "personal_vlm_node.ros.node", "--ros-args", "--params-file",
                             str(params), "-r", f"__ns:={namespace}"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)
    deadline = time.monotonic() + 300
    while "ready:" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            node.kill()
            sys.exit(f"the node did not become ready; see {log}")
        time.sleep(0.2)
    return node


def handshake(clients, ping, limit_s: float = 120.0) -> None:
    """Until every client has had an answer (any: a refused name or busy) to ``ping``.

    A new client's reply reader is discovered by the node a moment after the client has found the
    service; a reply sent before that is lost. The burst must count the node's answers, not DDS
    discovery, so each client first gets one answer through."""
    deadline = time.monotonic() + limit_s
    pending = list(clients)
    while pending and time.monotonic() < deadline:
        futures = [client.call_async(ping) for client in pending]
        time.sleep(2.0)
        pending = [client for client, future in zip(pending, futures) if not future.done()]
    if pending:
        sys.exit(f"{len(pending)} clients got no answer to a ping within {limit_s:g} s")


def burst(namespace: str, calls: int, timeout: float, width: int, height: int) -> dict:
    import numpy as np
    import rclpy
    from personal_vlm_interfaces.srv import ForgetConcept, TeachConcept
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile
    from sensor_msgs.msg import Image

    rclpy.init(args=[])
    node = rclpy.create_node(f"teach_burst_{os.getpid()}", namespace=namespace, start_parameter_services=False)
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    # Each client's reply reader sees its process's other clients' replies too; with rclpy's default
    # depth (10) a burst of them pushes out its own (measured: 15 of 200 answered by a trivial service).
    reply_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000)
    clients = [node.create_client(TeachConcept, "teach_concept", qos_profile=reply_qos) for _ in range(calls)]
    for client in clients:
        if not client.wait_for_service(timeout_sec=60):
            sys.exit(f"no teach_concept service in {namespace or '/'}")
    handshake(clients, TeachConcept.Request(name=""))
    prefix = f"burst {os.getpid()}"
    requests = []
    for i in range(calls):
        array = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)   # (H, W, 3)
        image = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=array.tobytes())
        requests.append(TeachConcept.Request(name=f"{prefix} {i}", images=[image]))
    answers, arrived = {}, threading.Condition()

    def keep(i, start):
        def answered(future):
            with arrived:
                answers[i] = (future.result(), time.monotonic() - start)
                arrived.notify_all()
        return answered

    for i, (client, request) in enumerate(zip(clients, requests)):
        client.call_async(request).add_done_callback(keep(i, time.monotonic()))
    deadline = time.monotonic() + timeout
    with arrived:
        while len(answers) < calls and time.monotonic() < deadline:
            arrived.wait(0.5)
        answers = dict(answers)
    served = [i for i, (response, _) in answers.items() if response.success]
    busy_seconds = [seconds for response, seconds in answers.values()
                    if not response.success and response.message.startswith("busy: ")]
    forget = node.create_client(ForgetConcept, "forget_concept")
    for i in served:                       # leave a running node's store as it was
        forget.call_async(ForgetConcept.Request(name=f"{prefix} {i}"))
    time.sleep(1.0)
    executor.shutdown(timeout_sec=1.0)
    rclpy.shutdown()
    return {"calls": calls, "answered": len(answers), "served": len(served), "refused_busy": len(busy_seconds),
            "failed_otherwise": len(answers) - len(served) - len(busy_seconds), "unanswered": calls - len(answers),
            "slowest_busy_answer_s": round(max(busy_seconds, default=0.0), 2),
            "slowest_served_answer_s": round(max((answers[i][1] for i in served), default=0.0), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all answers")
    parser.add_argument("--namespace", help="call the node running in this namespace instead of starting one")
    parser.add_argument("--max-waiting", type=int, help="max_waiting_requests of the node this starts")
    parser.add_argument("--size", default="300x200", help="WIDTHxHEIGHT of each request's picture")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if args.namespace is not None:
        figures = burst(args.namespace, args.calls, args.timeout, width, height)
    else:
        os.environ.setdefault("ROS_DOMAIN_ID", str(50 + os.getpid() % 10))
        namespace = f"/teach_burst_{os.getpid()}"
        with tempfile.TemporaryDirectory() as folder:
            node = start_node(Path(folder), namespace, args.max_waiting)
            try:
                figures = burst(namespace, args.calls, args.timeout, width, height)
            finally:
                node.send_signal(signal.SIGTERM)       # as Ctrl-C; a background job ignores SIGINT
                node.wait(30)
    print(json.dumps(figures))
    return 1 if figures["unanswered"] else 0


if __name__ == "__main__":
    sys.exit(main())
