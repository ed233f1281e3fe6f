"""Scenario 2, concurrency: many CLI processes on the node's store while the node serves."""

from __future__ import annotations

import random
import threading
import time

from ..kit import pixels
from .client import Camera, FieldClient, teach_type, node_names, teach_request
from .world import NodeRun, Report, World, say
from .writers import store_problems


# ---- scenario 2: concurrency -----------------------------------------------------------------

def concurrency(report: Report, world: World, node: NodeRun, client: FieldClient, total: int, parallel: int) -> None:
    figures = report.scenario("concurrency")
    store = node.store
    rng = random.Random(world.seed * 7 + 3)
    say(f"scenario 2: {total} CLI processes, {parallel} at a time, on the node's store")
    pre = [f"conc pre {i}" for i in range(max(2, total // 4))]
    for i, name in enumerate(pre):
        response = client.send(teach_type(), "teach_concept", teach_request(name, [pixels(9000 + i)]))
        report.check(response is not None and response.success, f"the node could not teach {name!r}")
    to_forget = list(pre)
    jobs = []
    for i in range(total):
        roll = rng.random()
        if roll < 0.35:
            jobs.append(("teach", f"conc new {i}", world.model_a,
                         ["teach", f"conc new {i}", str(world.picture_file(9100 + i)), "--no-wait"]))
        elif roll < 0.6 and to_forget:
            name = to_forget.pop()
            jobs.append(("forget", name, None, ["forget", name]))
        elif roll < 0.8:
            jobs.append(("list", "", None, ["list"]))
        else:
            jobs.append(("ask", "", world.model_a, ["ask", "what is in the picture?", "--image",
                                                    str(world.picture_file(9000))]))
    camera = Camera(client, 5.0)
    camera.show(pixels(9000))
    node_answers = {"answered": 0, "failed": 0}
    stop = threading.Event()

    def keep_asking_the_node():
        while not stop.wait(0.5):
            names = node_names(client)
            node_answers["answered" if names is not None else "failed"] += 1

    asker = threading.Thread(target=keep_asking_the_node, daemon=True)
    asker.start()
    running, done = [], []
    started_at = time.monotonic()
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < parallel:
            verb, name, model, args = queue.pop(0)
            running.append((verb, name, world.start_cli(store, model, *args)))
        for item in list(running):
            if item[2].proc.poll() is not None:
                item[2].wait()
                running.remove(item)
                done.append(item)
        time.sleep(0.05)
    elapsed = time.monotonic() - started_at
    stop.set()
    asker.join(5)
    camera.stop()
    by_code: dict[str, int] = {}
    crashes = []
    for verb, name, run in done:
        by_code[str(run.proc.returncode)] = by_code.get(str(run.proc.returncode), 0) + 1
        if run.crashed:
            crashes.append(f"{verb} {name!r} (see {run.log})")
        elif run.proc.returncode != 0:
            report.check(False, f"CLI {verb} {name!r} exited {run.proc.returncode}: {run.stderr.strip()[-200:]}")
    time.sleep(1.0)       # the node's store watcher catches up
    problems, state = store_problems(store, expect_versions=False)
    for problem in problems:
        report.check(False, f"concurrency: {problem}")
    acked_teach = [name for verb, name, run in done if verb == "teach" and run.proc.returncode == 0]
    acked_forget = [name for verb, name, run in done if verb == "forget" and run.proc.returncode == 0]
    lost = [n for n in acked_teach if n not in state] + [n for n in acked_forget if n in state]
    seen_by_node = node_names(client)
    report.check(not crashes, f"CLI processes crashed: {crashes}")
    report.check(not lost, f"acknowledged operations lost: {lost}")
    report.check(node.alive(), "the node died during the concurrency scenario")
    report.check(node_answers["failed"] == 0 and node_answers["answered"] > 0,
                 f"the node's list_concepts failed {node_answers['failed']} times while CLIs ran")
    report.check(seen_by_node is not None and sorted(seen_by_node) == sorted(state),
                 "the node lists other concepts than the store holds after the CLIs ended")
    figures.update(cli_processes=len(done), parallel=parallel, seconds=round(elapsed, 1), exit_codes=by_code,
                   acknowledged=len(acked_teach) + len(acked_forget) + sum(
                       1 for verb, _n, run in done if verb in ("list", "ask") and run.proc.returncode == 0),
                   acknowledged_lost=len(lost), crashes=len(crashes),
                   node_list_calls_answered=node_answers["answered"], node_list_calls_failed=node_answers["failed"])
