"""Scenario 1, killed writers: store writers and CLI processes SIGKILLed mid-operation lose nothing acknowledged."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from .world import Report, World, say


# ---- scenario 1: killed writers --------------------------------------------------------------

WRITER_NAMES = ("mug", "ネコ", "Grandpa's cane", "🐈‍⬛ cat", "café", "red ball")


def writer_main(root: str, seed: int, journal: str, prefix: str = "") -> None:
    """A store writer (run in a child process): every operation is journalled before ("DO") and
    after it returned ("ACK"), in one write each, so a SIGKILL leaves a readable journal. Each
    version number is unique and fills the memory, so a reader tells whole versions apart. ``root``
    is a store folder or a library URL; an operation the store refuses (a library whose server is
    down) is journalled "FAIL" — it may or may not have landed — and the writer goes on. Names are
    ``prefix`` + one of WRITER_NAMES."""
    import torch
    from PIL import Image as PILImage

    from ...errors import PersonalVLMError
    from ...store import ConceptRecord, open_library

    rng = random.Random(seed)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    store = open_library(root)
    for step in range(1_000_000):
        version = seed * 1_000_000 + step
        name = prefix + rng.choice(WRITER_NAMES)
        rows = rng.randint(64, 520)
        memory = {"m": torch.full((rows, 256), float(version))}  # (K_c, D)
        roll = rng.random()
        try:
            present = name in store
            op = "forget" if present and roll < 0.25 else "replace" if present and roll < 0.45 else "add"
            os.write(fd, f"DO\t{op}\t{name}\t{version}\t{rows}\n".encode())
            if op == "forget":
                store.forget(name)
            elif op == "replace":
                store.replace_memory(name, memory, "field-test", rows, extra={"version": version, "rows": rows})
            else:
                n_images = rng.randint(1, 3)
                pictures = [PILImage.new("L", (16, 16), version % 256) for _ in range(n_images)]
                extra = {"version": version, "rows": rows, "image_version": version, "n_images": n_images}
                store.add(ConceptRecord(name, "thing", [], {}, None, rows, "field-test", extra=extra),
                          memory, pictures, overwrite=True)
        except PersonalVLMError:
            os.write(fd, f"FAIL\t-\t{name}\t{version}\t{rows}\n".encode())
            time.sleep(0.05)
            continue
        os.write(fd, f"ACK\t{op}\t{name}\t{version}\t{rows}\n".encode())


def read_journal(path: Path) -> tuple[list[tuple[str, str, int]], tuple[str, str, int] | None]:
    """(acknowledged operations, the operation in flight when the writer died or None)."""
    acked, pending = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 5:
            continue                      # cannot happen with one write per line; ignored if it does
        kind, op, name, version = parts[0], parts[1], parts[2], int(parts[3])
        if kind == "DO":
            pending = (op, name, version)
        elif kind == "ACK":
            acked.append((op, name, version))
            pending = None
    return acked, pending


def leftover_entries(root: Path) -> int:
    """What a killed writer left for the next open to finish: staging folders, unreferenced versions,
    and folders recorded as pending (a write killed before its folder was made leaves only that row)."""
    # Read-only: this is also called while a writer may be making the store, and must not create it.
    with contextlib.closing(sqlite3.connect(f"{(root / 'concepts.db').as_uri()}?mode=ro", uri=True)) as db:
        referenced = {row[0] for row in db.execute("SELECT dir FROM concepts UNION SELECT dir FROM memories")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        pending = {row[0] for row in db.execute("SELECT dir FROM pending")} if "pending" in tables else set()
    tmp = os.listdir(root / "tmp") if (root / "tmp").is_dir() else []
    concepts = os.listdir(root / "concepts") if (root / "concepts").is_dir() else []
    return len(set(tmp) | (set(concepts) - referenced) | pending)


def store_problems(root: Path, expect_versions: bool) -> tuple[list[str], dict]:
    """Open the store (which removes what interrupted writes left) and read every concept whole.

    Returns (problems, name → the version its memory holds, or -1 for CLI-taught concepts)."""
    from ...store import ConceptStore

    problems = []
    store = ConceptStore(root)
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("the SQLite index fails its integrity check")
    if leftover_entries(root):
        problems.append("files of an interrupted write survive reopening the store")
    more, state = version_problems(store, expect_versions)
    return problems + more, state


def version_problems(store, expect_versions: bool) -> tuple[list[str], dict]:
    """Every concept of ``store`` (any backend) read whole: (problems, name → the version its memory
    holds, or -1 for CLI-taught concepts)."""
    from ...errors import PersonalVLMError

    problems, state = [], {}
    records = store.list()
    if len(records) != len(store):
        problems.append("a row of the index cannot be read")
    for record in records:
        try:
            memory = store.load_memory(record.name)
            pictures = store.load_images(record.name)
        except PersonalVLMError as exc:
            problems.append(f"{record.name!r} cannot be read: {exc}")
            continue
        if not pictures:
            problems.append(f"{record.name!r} has no reference picture")
        if not expect_versions:
            tokens = memory["memory"].shape[0] if "memory" in memory else -1
            if tokens != record.memory_tokens:
                problems.append(f"{record.name!r} has {tokens} memory tokens, its record says {record.memory_tokens}")
            state[record.name] = -1
            continue
        extra = record.extra
        m = memory.get("m")
        whole = (m is not None and tuple(m.shape) == (extra["rows"], 256)
                 and bool((m == float(extra["version"])).all()) and record.memory_tokens == extra["rows"]
                 and len(pictures) == extra["n_images"]
                 and all(p.getextrema() == (extra["image_version"] % 256,) * 2 for p in pictures))
        if not whole:
            problems.append(f"{record.name!r} is not one whole version")
        state[record.name] = int(extra["version"])
    return problems, state


def _write_under_way(root: Path) -> bool:
    try:
        return leftover_entries(root) > 0
    except (OSError, sqlite3.Error):
        return False               # the store is not made yet, or its index is busy: look again


def _after(op: str, version: int) -> int | None:
    return None if op == "forget" else version


def killed_writers(report: Report, world: World, count: int) -> None:
    import multiprocessing

    figures = report.scenario("killed_writers")
    root = world.out / "store_writers"
    journals = world.out / "journals"
    journals.mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "safetensors.torch", "personal_vlm_node.store",
                                "PIL.PngImagePlugin"])
    rng = random.Random(world.seed * 7 + 1)
    expected: dict[str, int] = {}     # name → version its memory must hold (absent: not a key)
    acked_total = kills = mid_write = lost = problems_total = 0
    say(f"scenario 1a: {count} store writers killed at random")
    for i in range(count):
        journal = journals / f"writer_{i:04d}.tsv"
        child = ctx.Process(target=writer_main, args=(str(root), world.seed * 1000 + i + 1, str(journal)), daemon=True)
        wanted = rng.randint(0, 40)
        child.start()
        deadline = time.monotonic() + 60.0
        while child.is_alive() and time.monotonic() < deadline:
            if journal.is_file() and journal.read_bytes().count(b"ACK\t") >= wanted:
                break
            time.sleep(0.002)
        if i % 2:
            # Every other writer dies while a write is visibly under way (its files or pending row
            # exist): random kills alone miss the middle of a write often enough on a fast disk
            # that a run of a few could test nothing.
            while child.is_alive() and time.monotonic() < deadline and not _write_under_way(root):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.05))
        if not report.check(child.is_alive(), f"writer {i} ended before it was killed (exit {child.exitcode})"):
            continue
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += 1
        acked, pending = read_journal(journal) if journal.is_file() else ([], None)
        acked_total += len(acked)
        for op, name, version in acked:
            if op == "forget":
                expected.pop(name, None)
            else:
                expected[name] = version
        mid_write += leftover_entries(root) > 0
        problems, state = store_problems(root, expect_versions=True)
        problems_total += len(problems)
        for problem in problems:
            report.check(False, f"after writer {i}: {problem}")
        for name in WRITER_NAMES:
            have = state.get(name)
            want = expected.get(name)
            if have == want:
                continue
            if pending is not None and pending[1] == name and have == _after(pending[0], pending[2]):
                continue                  # the operation in flight landed whole: allowed either way
            lost += 1
            report.check(False, f"after writer {i}: {name!r} holds version {have}, acknowledged {want}")
        # What the store holds now is what the next writer starts from.
        expected = {n: v for n, v in state.items()}
    figures.update(writers_killed=kills, operations_acknowledged=acked_total, acknowledged_lost=lost,
                   kills_mid_write=mid_write, damaged_concepts=problems_total)
    report.check(lost == 0, f"{lost} acknowledged writer operations lost")
    report.check(kills == 0 or mid_write > 0, "no writer kill landed in the middle of a write")


def killed_clis(report: Report, world: World, count: int) -> None:
    figures = report.scenario("killed_cli")
    store = world.out / "store_cli_kills"
    rng = random.Random(world.seed * 7 + 2)
    say(f"scenario 1b: {count} personal-vlm teach/forget processes killed at random")
    # One unkilled teach and forget say how long they take on this machine.
    first = world.run_cli(store, world.model_a, "teach", "kill 0", str(world.picture_file(5000)), "--no-wait")
    report.check(first.proc.returncode == 0, f"an unkilled CLI teach failed: {first.stderr[-300:]}")
    teach_s = first.ended - first.started
    present = {"kill 0"} if first.proc.returncode == 0 else set()
    probe = world.run_cli(store, None, "forget", "kill 0")
    forget_s = probe.ended - probe.started
    if probe.proc.returncode == 0:
        present.discard("kill 0")
    acked = kills = lost = crashes = landed_after_kill = 0
    serial = 0
    for i in range(count):
        teach = not present or rng.random() < 0.6
        if teach:
            serial += 1
            name = f"kill {serial}"
            args = ["teach", name, str(world.picture_file(5000 + serial))] + (["--no-wait"] if rng.random() < 0.7 else [])
            typical = teach_s
        else:
            name = rng.choice(sorted(present))
            args = ["forget", name]
            typical = forget_s
        # A quarter run to the end (acknowledged operations a later kill must not lose); the others
        # are killed anywhere in the run or near its end, where the store is written.
        roll = rng.random()
        delay = (None if roll < 0.25 else rng.uniform(0.0, typical) if roll < 0.6
                 else rng.uniform(0.75 * typical, 1.1 * typical))
        run = world.start_cli(store, world.model_a if teach else None, *args)
        if delay is not None:
            try:
                run.proc.wait(delay)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)
        run.wait()
        killed = run.proc.returncode == -signal.SIGKILL
        kills += killed
        crashes += run.crashed and not killed
        if run.proc.returncode == 0:
            acked += 1
            if teach:
                present.add(name)
            else:
                present.discard(name)
        problems, state = store_problems(store, expect_versions=False)
        for problem in problems:
            report.check(False, f"after CLI {' '.join(args[:2])}: {problem}")
        for other in present - ({name} if killed else set()):
            if other not in state:
                lost += 1
                report.check(False, f"acknowledged concept {other!r} is gone after CLI {args[0]} {name!r}")
        if killed:
            landed_after_kill += (name in state) == teach
            if name in state:
                present.add(name)
            else:
                present.discard(name)
        elif run.proc.returncode == 0 and not teach and name in state:
            lost += 1
            report.check(False, f"acknowledged forget of {name!r} did not remove it")
    figures.update(cli_processes=count, killed=kills, acknowledged=acked, acknowledged_lost=lost,
                   crashes=crashes, kills_after_the_commit=landed_after_kill,
                   teach_seconds=round(teach_s, 2), forget_seconds=round(forget_s, 2))
    report.check(lost == 0, f"{lost} acknowledged CLI operations lost")
    report.check(crashes == 0, f"{crashes} CLI processes crashed (exit 1 or a traceback)")
