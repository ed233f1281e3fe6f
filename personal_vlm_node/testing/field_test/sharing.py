"""Scenario 4, sharing: what the CLI teaches or forgets shows in the running node's detections, per model."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from ..kit import pixels
from .client import Camera, FieldClient, teach_type, teach_request
from .world import SHARING_LIMIT_S, NodeRun, Report, World, say


# ---- scenario 4: sharing ---------------------------------------------------------------------

class NamePoller:
    """Times when concepts appear in / vanish from a store, polled every 10 ms on a thread.

    ``connect()`` opens a connection to the store's index and returns ``names(connection)``'s
    reader: ``(connection, read)``; an error while reading drops the connection and retries."""

    def __init__(self, connect, errors: tuple):
        self.connect, self.errors = connect, errors
        self.seen: dict[str, float] = {}      # name → monotonic time first seen
        self.gone: dict[str, float] = {}      # name → monotonic time first seen absent after being seen
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = None
        while not self.stop_event.wait(0.01):
            try:
                conn = conn or self.connect()
                names = {row[0] for row in conn.execute("SELECT name FROM concepts")}
            except self.errors:
                if conn is not None:
                    with contextlib.suppress(*self.errors):
                        conn.close()
                conn = None
                continue
            now = time.monotonic()
            for name in names:
                self.seen.setdefault(name, now)
                self.gone.pop(name, None)
            for name in set(self.seen) - names:
                self.gone.setdefault(name, now)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


def StorePoller(root: Path) -> NamePoller:
    """A local store folder's :class:`NamePoller`."""
    return NamePoller(lambda: sqlite3.connect(root / "concepts.db", timeout=30.0, check_same_thread=False),
                      (sqlite3.Error,))


def sharing(report: Report, world: World, node: NodeRun, client: FieldClient, rounds: int) -> None:
    figures = report.scenario("sharing")
    store = node.store
    camera = Camera(client, 10.0)
    poller = StorePoller(store)
    detect_latency, stop_latency, exit_to_detect = [], [], []
    say(f"scenario 4a: {rounds} rounds of CLI teach → node detects → CLI forget → detections stop")
    try:
        for r in range(rounds):
            seed = 7000 + r
            name = f"shared {r}"
            camera.show(pixels(seed))
            time.sleep(0.5)
            teach = world.run_cli(store, world.model_a, "teach", name, str(world.picture_file(seed)), "--no-wait")
            if not report.check(teach.proc.returncode == 0, f"CLI teach {name!r} failed: {teach.stderr[-300:]}"):
                continue
            committed = poller.seen.get(name)
            seen = _first_detection(client, name, committed, 10.0)
            if report.check(seen is not None, f"the node never detected {name!r} taught by the CLI"):
                detect_latency.append(seen - committed)
                exit_to_detect.append(seen - teach.ended)
            time.sleep(1.0)
            forget = world.run_cli(store, None, "forget", name)
            if not report.check(forget.proc.returncode == 0, f"CLI forget {name!r} failed: {forget.stderr[-300:]}"):
                continue
            time.sleep(0.2)
            while name not in poller.gone:
                time.sleep(0.01)
            gone = poller.gone[name]
            time.sleep(3.0)           # frames keep showing the picture: detections of it must stop
            last = max((d[0] for d in client.since(gone - 5.0) if name in d[3]), default=None)
            stop_latency.append(0.0 if last is None or last < gone else last - gone)
            after = [d for d in client.since(gone + 2.0) if name in d[3]]
            report.check(not after, f"{len(after)} detections of {name!r} 2-3 s after a CLI forget")
    finally:
        camera.show(None)
    figures.update(rounds=rounds, teach_to_detect_s=[round(v, 3) for v in detect_latency],
                   teach_to_detect_max_s=max(detect_latency, default=None),
                   cli_exit_to_detect_s=[round(v, 3) for v in exit_to_detect],
                   forget_to_stop_s=[round(v, 3) for v in stop_latency],
                   forget_to_stop_max_s=max(stop_latency, default=None))
    report.check(all(v <= SHARING_LIMIT_S for v in detect_latency),
                 f"a CLI teach reached the node's detections after {max(detect_latency, default=0):.3f} s (> 1 s)")
    report.check(all(v <= SHARING_LIMIT_S for v in stop_latency),
                 f"a CLI forget stopped the node's detections after {max(stop_latency, default=0):.3f} s (> 1 s)")

    say("scenario 4b: a node on model A and a CLI on model B share one store")
    cross_models(report, world, node, client, camera, poller)
    camera.stop()
    poller.stop()


def _first_detection(client: FieldClient, name: str, t0: float | None, timeout: float) -> float | None:
    if t0 is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [d[0] for d in client.since(t0 - 1.0) if name in d[3]]
        if found:
            return min(found)
        time.sleep(0.02)
    return None


def _memory_dirs(root: Path, name: str) -> dict:
    """model key → version directory of every stored memory of ``name``."""
    from ...store import model_key

    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        row = db.execute("SELECT model_fingerprint, dir FROM concepts WHERE name=?", (name,)).fetchone()
        others = dict(db.execute("SELECT model, dir FROM memories WHERE name=?", (name,)).fetchall())
    return {} if row is None else {model_key(row[0]): row[1], **others}


def cross_models(report: Report, world: World, node: NodeRun, client: FieldClient, camera: Camera,
                 poller: NamePoller) -> None:
    import torch

    from ...assistant import Assistant
    from ...store import ConceptStore, model_key

    figures = report.scenario("cross_model")
    store_dir = node.store
    store = ConceptStore(store_dir)
    pa, pb = pixels(8001), pixels(8002)
    response = client.send(teach_type(), "teach_concept", teach_request("cross a", [pa]))
    report.check(response is not None and response.success, "the node could not teach 'cross a'")
    # The camera already shows B's picture while model B's CLI teaches it: the node then sees a
    # concept with no memory for its model; it must build its own, never match B's.
    fp_a = store.get("cross a").model_identity
    built = {}                     # when a model-A memory of 'cross b' first shows in the store
    stop_polling = threading.Event()

    def poll_for_the_node_memory():
        while not stop_polling.wait(0.01):
            with contextlib.suppress(Exception):
                if store.has_memory("cross b", fp_a):
                    built.setdefault("at", time.monotonic())
                    return

    polling = threading.Thread(target=poll_for_the_node_memory, daemon=True)
    polling.start()
    t0 = time.monotonic()
    camera.show(pb)
    teach_b = world.run_cli(store_dir, world.model_b, "teach", "cross b", str(world.picture_file(8002)), "--no-wait")
    report.check(teach_b.proc.returncode == 0, f"CLI teach on model B failed: {teach_b.stderr[-300:]}")
    fp_b = store.get("cross b").model_identity
    report.check(model_key(fp_a) != model_key(fp_b), "models A and B have the same identity")
    polling.join(60.0)
    stop_polling.set()
    rebuilt_a = built.get("at")
    report.check(rebuilt_a is not None, "the node on model A never built its own memory of 'cross b'")
    time.sleep(2.0)
    seen_b = [d[0] for d in client.since(t0) if "cross b" in d[3]]
    early = [s for s in seen_b if rebuilt_a is None or s < rebuilt_a]
    report.check(not early, f"the node detected 'cross b' {len(early)} times before it had a model-A memory")
    dirs_before = {n: _memory_dirs(store_dir, n) for n in ("cross a", "cross b")}
    # Model B's CLI opens the store: it builds B's memory of 'cross a' and leaves A's alone.
    detect_a = world.run_cli(store_dir, world.model_b, "--json", "detect", str(world.picture_file(8001)))
    detect_b = world.run_cli(store_dir, world.model_b, "--json", "detect", str(world.picture_file(8002)))
    for run in (detect_a, detect_b):
        report.check(run.proc.returncode == 0, f"CLI detect on model B failed: {run.stderr[-300:]}")

    def found(run):
        names = set()
        for line in run.stdout.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                names |= {d["name"] for d in json.loads(line)["detections"]}
        return names

    report.check("cross a" in found(detect_a), "the CLI on model B did not detect 'cross a' with its own memory")
    report.check("cross b" in found(detect_b), "the CLI on model B did not detect 'cross b'")
    dirs_after = {n: _memory_dirs(store_dir, n) for n in ("cross a", "cross b")}
    key_a, key_b = model_key(fp_a), model_key(fp_b)
    report.check(set(dirs_after["cross a"]) == {key_a, key_b} and set(dirs_after["cross b"]) == {key_a, key_b},
                 f"each concept should hold one memory per model, found {dirs_after}")
    rebuilt_back = [n for n in dirs_before for k in (key_a, key_b)
                    if k in dirs_before[n] and dirs_before[n][k] != dirs_after[n].get(k)]
    report.check(not rebuilt_back, f"memories rebuilt back and forth between the models: {rebuilt_back}")
    for name in ("cross a", "cross b"):
        a = store.load_memory(name, model=fp_a)["memory"]
        b = store.load_memory(name, model=fp_b)["memory"]
        report.check(a.shape != b.shape or not torch.equal(a, b), f"{name!r}: the A and B memories are the same")
    # Each model's assistant uses only its own model's memories.
    used = {}
    for label, model, fp in (("A", world.model_a, fp_a), ("B", world.model_b, fp_b)):
        assistant = Assistant.open(str(model), store_dir=store_dir, device="cpu", dtype="float32", progress=None,
                                   rebuild=False, verification=False)
        try:
            for name in ("cross a", "cross b"):
                mine = assistant.stored_memory(name)["memory"]
                same = torch.equal(mine, store.load_memory(name, model=fp)["memory"])
                used[f"{label}:{name}"] = "own" if same else "OTHER"
                report.check(same, f"the model-{label} assistant's memory of {name!r} is not its own model's")
        finally:
            assistant.close()
    camera.show(None)
    node_seen = sorted({n for d in client.since(t0) for n in d[3]})
    figures.update(models={"A": fp_a, "B": fp_b}, memories_per_concept={n: sorted(d) for n, d in dirs_after.items()},
                   memory_used=used, node_detected=node_seen,
                   node_memory_of_cross_b_ready_s=None if rebuilt_a is None else round(rebuilt_a - t0, 3),
                   cli_b_teach_committed_s=None if "cross b" not in poller.seen else round(poller.seen["cross b"] - t0, 3),
                   cross_model_matches=len(early) + len(rebuilt_back) + list(used.values()).count("OTHER"))
