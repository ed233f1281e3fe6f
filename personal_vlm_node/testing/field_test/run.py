"""The whole field test: every scenario in turn, figures to field_test.json and field_test.txt."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .client import FieldClient
from .concurrency import concurrency
from .fleet import fleet
from .fuzz import fuzz
from .sharing import sharing
from .soak import soak
from .world import SCALES, NodeRun, Report, Scale, World, say, summary_text
from .writers import killed_clis, killed_writers


# ---- the run ---------------------------------------------------------------------------------

def run(out: Path, scale: Scale, minutes: float, seed: int, only: set[str] | None = None) -> Report:
    report = Report()
    world = World(out, seed)
    wanted = lambda name: only is None or name in only  # noqa: E731

    def guarded(name, work):
        if not wanted(name):
            return
        try:
            work()
        except Exception as exc:            # a scenario that breaks is a failure, not the end of the run
            import traceback

            traceback.print_exc()
            report.check(False, f"{name}: {type(exc).__name__}: {exc}")

    guarded("killed_writers", lambda: killed_writers(report, world, scale.writer_kills))
    guarded("killed_cli", lambda: killed_clis(report, world, scale.cli_kills))
    guarded("fleet", lambda: fleet(report, world, scale.sharing_rounds + 1, max(3, scale.writer_kills // 4),
                                   outage_s=10.0 if scale is SCALES["small"] else 30.0))
    if not any(wanted(n) for n in ("sharing", "concurrency", "fuzz", "soak")):
        return report
    rate_hz = 5.0
    node = NodeRun(world, world.model_a, out / "store_node", rate_hz, "a")
    say("starting the node on model A")
    node.start()
    client = FieldClient(world.namespace)
    crashes = 0

    def with_node(name, work):
        nonlocal crashes
        if not node.alive():
            crashes += 1
            say(f"the node is dead before {name}; starting it again")
            node.start()
        guarded(name, work)

    try:
        with_node("sharing", lambda: sharing(report, world, node, client, scale.sharing_rounds))
        with_node("concurrency", lambda: concurrency(report, world, node, client, scale.concurrent_clis,
                                                     scale.parallel))
        with_node("fuzz", lambda: fuzz(report, world, node, client, scale.fuzz_requests, scale.fuzz_frames))
        with_node("soak", lambda: soak(report, world, node, client, minutes, rate_hz))
        crashes += not node.alive()
    finally:
        client.close()
        code = node.stop()
    figures = report.scenario("node")
    figures.update(crashes=crashes, starts=node.starts, exit_code_on_ctrl_c=code, tracebacks=node.tracebacks(),
                   log_bytes=node.log_bytes())
    report.check(crashes == 0, f"the node crashed {crashes} times")
    report.check(code == 0, f"the node exited {code} on Ctrl-C")
    report.check(node.tracebacks() == 0, f"the node logged {node.tracebacks()} tracebacks (see {node.log})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personal_vlm_node.testing.field_test",
        description="Field test of the store, the CLI and the node: killed writers, concurrency, fuzz, "
                    "sharing and a soak, on tiny random-weight models.")
    parser.add_argument("out_dir", help="folder for models, stores, logs and the figures")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--minutes", type=float, default=None, help="soak length (default: the scale's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=("killed_writers", "killed_cli", "fleet", "sharing",
                                                            "concurrency", "fuzz", "soak"),
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    minutes = scale.minutes if args.minutes is None else args.minutes
    if minutes < 0:
        parser.error("--minutes must not be negative")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report = run(out, scale, minutes, args.seed, set(args.only) if args.only else None)
    header = {"command": " ".join(["python -m personal_vlm_node.testing.field_test"] + sys.argv[1:]
                                  if argv is None else argv),
              "scale": args.scale, "scale_settings": asdict(scale), "minutes": minutes, "seed": args.seed,
              "seconds": time.monotonic() - t0, "checks": report.checks, "failures": report.failures,
              "passed": not report.failures}
    (out / "field_test.json").write_text(json.dumps({**header, "figures": report.figures}, indent=2,
                                                    ensure_ascii=False) + "\n")
    text = summary_text(report, header)
    (out / "field_test.txt").write_text(text)
    print(text, flush=True)
    return 1 if report.failures else 0
