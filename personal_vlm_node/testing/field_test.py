"""A reproducible field test: faults, concurrency, fuzzing, sharing and a soak, on the real entry points.

    python -m personal_vlm_node.testing.field_test OUT_DIR [--scale small|full] [--minutes M] [--seed S]

Tiny random-weight models (:mod:`.tiny_model`) are written to ``OUT_DIR/models``; the node runs as
its own process (``python -m personal_vlm_node.ros.node``, as the tests start it), the
``personal-vlm`` CLI runs as subprocesses, and this process talks to the node with rclpy. Five
scenarios:

1. **killed writers** — ``personal-vlm teach`` / ``forget`` processes and store-writer processes
   (many acknowledged operations each) are SIGKILLed at random moments; afterwards every
   acknowledged operation is present, every concept is whole or absent, nothing is left
   half-written.
2. **concurrency** — many concurrent CLI processes (teach / list / forget / ask) on the node's
   store while the node serves.
3. **fuzz** — thousands of malformed and valid service requests and camera frames: every request
   is answered, malformed ones with success=false and a message, the node never dies nor logs a
   traceback, and its log stays small.
4. **sharing** — a concept taught by the CLI is detected by the running node within a second, a
   CLI forget stops its detections within a second; a node on model A and a CLI on model B share
   a store and each uses only memories of its own model.
5. **soak** — frames at the node's rate plus periodic requests for ``--minutes``: RSS growth,
   frame latency drift, no crash.

Figures go to ``OUT_DIR/field_test.json`` and ``OUT_DIR/field_test.txt``. Exit code 0 when every
check passes, 1 with the list of what failed. Set ``ROS_DOMAIN_ID`` (and
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, the default here) before running it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 300, 200
NODE_READY_TIMEOUT_S = 300.0
CLI_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 120.0
SHARING_LIMIT_S = 1.0           # a CLI teach / forget must show in the node's detections this fast
MAX_REPLY_CHARS = 1000          # a rejected request's message must not echo its input whole
MAX_FUZZ_LOG_BYTES = 256 * 1024  # the node's log growth over the whole fuzz run


@dataclass(frozen=True)
class Scale:
    cli_kills: int           # personal-vlm teach/forget processes killed at random
    writer_kills: int        # store-writer processes killed at random
    concurrent_clis: int     # CLI processes in the concurrency scenario
    parallel: int            # how many of them run at once
    fuzz_requests: int
    fuzz_frames: int
    sharing_rounds: int      # CLI teach → detect → CLI forget → stop cycles
    minutes: float           # soak length


SCALES = {
    "small": Scale(cli_kills=6, writer_kills=12, concurrent_clis=8, parallel=4, fuzz_requests=400,
                   fuzz_frames=400, sharing_rounds=2, minutes=0.5),
    "full": Scale(cli_kills=40, writer_kills=200, concurrent_clis=40, parallel=10, fuzz_requests=5000,
                  fuzz_frames=8000, sharing_rounds=6, minutes=5.0),
}


def say(message: str) -> None:
    print(f"[field-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- figures and checks ---------------------------------------------------------------------

@dataclass
class Report:
    figures: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    checks: int = 0

    def check(self, ok: bool, what: str) -> bool:
        self.checks += 1
        if not ok:
            self.failures.append(what)
            say(f"FAILED: {what}")
        return ok

    def scenario(self, name: str) -> dict:
        return self.figures.setdefault(name, {})


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def summary_text(report: Report, header: dict) -> str:
    lines = [f"personal_vlm field test — {header['command']}",
             f"scale {header['scale']}, seed {header['seed']}, soak {header['minutes']:g} min, "
             f"{header['seconds']:.0f} s in all", ""]
    for scenario, figures in report.figures.items():
        lines.append(f"{scenario}:")
        for key, value in figures.items():
            if isinstance(value, float):
                value = f"{value:.3f}"
            elif isinstance(value, (list, dict)):
                value = json.dumps(value, ensure_ascii=False)
                value = value if len(value) <= 160 else value[:157] + "..."
            lines.append(f"  {key}: {value}")
        lines.append("")
    if report.failures:
        lines.append(f"FAILED {len(report.failures)} of {report.checks} checks:")
        lines += [f"  - {f}" for f in report.failures]
    else:
        lines.append(f"PASSED all {report.checks} checks")
    return "\n".join(lines) + "\n"


# ---- the world: models, pictures, processes --------------------------------------------------

def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)  # (H, W, 3)


class World:
    """Paths, the environment of child processes, and the two tiny models (A: the node's, B: another)."""

    def __init__(self, out: Path, seed: int, build_models: bool = True):
        from PIL import Image as PILImage

        from .tiny_model import build_tiny_model

        self.out = out
        self.seed = seed
        # A rerun in the same folder starts from empty stores; the models are kept.
        for previous in ("logs", "journals", "store_writers", "store_cli_kills", "store_node"):
            shutil.rmtree(out / previous, ignore_errors=True)
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pictures = out / "pictures"
        self.pictures.mkdir(exist_ok=True)
        models = out / "models"
        self.model_a = models / "model_a"
        self.model_b = models / "model_b"
        for folder, model_seed in ((self.model_a, 0), (self.model_b, 1)):
            if build_models and not (folder / "config.json").is_file():
                say(f"building the tiny model {folder.name}")
                build_tiny_model(folder, "qwen2_5_vl", seed=model_seed)
        self._pil = PILImage
        self.env = dict(os.environ)
        self.env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        self.env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        # The node and the CLIs run the same code as this process (a checkout's, or the installed one).
        code = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)
        self.namespace = f"/field_test_{os.getpid()}"
        self._cli_count = 0

    def picture_file(self, seed: int) -> Path:
        path = self.pictures / f"picture_{seed}.png"
        if not path.is_file():
            self._pil.fromarray(picture(seed)).save(path)
        return path

    def cli_command(self, store: Path, model: Path | None, *args: str) -> list[str]:
        script = Path(sys.executable).parent / "personal-vlm"
        head = [str(script)] if script.is_file() else [sys.executable, "-m", "personal_vlm_node.cli"]
        common = ["--store", str(store), "--device", "cpu", "--dtype", "float32"]
        if model is not None:
            common = ["--model", str(model)] + common
        return head + common + list(args)

    def start_cli(self, store: Path, model: Path | None, *args: str) -> CliRun:
        self._cli_count += 1
        log = self.logs / f"cli_{self._cli_count:04d}.log"
        command = self.cli_command(store, model, *args)
        with open(log, "w") as out:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out, env=self.env, text=True,
                                    start_new_session=True)
        return CliRun(proc, log, list(args), time.monotonic())

    def run_cli(self, store: Path, model: Path | None, *args: str) -> CliRun:
        run = self.start_cli(store, model, *args)
        run.wait()
        return run


@dataclass
class CliRun:
    proc: subprocess.Popen
    log: Path
    args: list
    started: float
    ended: float | None = None      # time.monotonic() when the exit was seen
    ended_wall: float | None = None
    stdout: str = ""

    def wait(self, timeout: float = CLI_TIMEOUT_S) -> int:
        try:
            self.stdout = self.proc.communicate(timeout=timeout)[0] or ""
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout = self.proc.communicate()[0] or ""
        self.ended, self.ended_wall = time.monotonic(), time.time()
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def crashed(self) -> bool:
        """Exit 1 or a traceback: an internal error (user errors exit 2 with one line)."""
        return self.proc.returncode == 1 or "Traceback" in self.stderr


class NodeRun:
    """The node as its own process, on one store, in the world's namespace."""

    def __init__(self, world: World, model: Path, store: Path, rate_hz: float, tag: str):
        self.world, self.store = world, store
        values = {"model": str(model), "device": "cpu", "dtype": "float32", "store_dir": str(store),
                  "process_rate_hz": rate_hz, "accept_threshold": 0.999, "reject_threshold": 0.5,
                  "max_concepts_in_context": 2, "verification": False, "overlay": False}
        params = world.out / f"node_{tag}.yaml"
        params.write_text("\n".join(["/**:", "  ros__parameters:"]
                                    + [f"    {k}: {json.dumps(v)}" for k, v in values.items()]) + "\n")
        self.log = world.logs / f"node_{tag}.log"
        self.command = [sys.executable, "-m", "personal_vlm_node.ros.node", "--ros-args", "--params-file",
                        str(params), "-r", f"__ns:={world.namespace}"]
        self.proc = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.world.env,
                                         cwd=self.world.out, start_new_session=True)
        deadline = time.monotonic() + NODE_READY_TIMEOUT_S
        while self.output().count("ready:") < self.starts:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not become ready; see {self.log}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def log_bytes(self) -> int:
        return self.log.stat().st_size if self.log.is_file() else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def tracebacks(self) -> int:
        return self.output().count("Traceback")

    def stop(self) -> int | None:
        """Ctrl-C, as a user stops it; the exit code (None when it had to be killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


# ---- scenario 1: killed writers --------------------------------------------------------------

WRITER_NAMES = ("mug", "ネコ", "Grandpa's cane", "🐈‍⬛ cat", "café", "red ball")


def writer_main(root: str, seed: int, journal: str) -> None:
    """A store writer (run in a child process): every operation is journalled before ("DO") and
    after it returned ("ACK"), in one write each, so a SIGKILL leaves a readable journal. Each
    version number is unique and fills the memory, so a reader tells whole versions apart."""
    import torch
    from PIL import Image as PILImage

    from ..store import ConceptRecord, ConceptStore

    rng = random.Random(seed)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    store = ConceptStore(root)
    for step in range(1_000_000):
        version = seed * 1_000_000 + step
        name = rng.choice(WRITER_NAMES)
        rows = rng.randint(64, 520)
        memory = {"m": torch.full((rows, 256), float(version))}  # (K_c, D)
        present = name in store
        roll = rng.random()
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
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        referenced = {row[0] for row in db.execute("SELECT dir FROM concepts UNION SELECT dir FROM memories")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        pending = {row[0] for row in db.execute("SELECT dir FROM pending")} if "pending" in tables else set()
    tmp = os.listdir(root / "tmp") if (root / "tmp").is_dir() else []
    concepts = os.listdir(root / "concepts") if (root / "concepts").is_dir() else []
    return len(set(tmp) | (set(concepts) - referenced) | pending)


def store_problems(root: Path, expect_versions: bool) -> tuple[list[str], dict]:
    """Open the store (which removes what interrupted writes left) and read every concept whole.

    Returns (problems, name → the version its memory holds, or -1 for CLI-taught concepts)."""
    from ..errors import PersonalVLMError
    from ..store import ConceptStore

    problems, state = [], {}
    store = ConceptStore(root)
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("the SQLite index fails its integrity check")
    if leftover_entries(root):
        problems.append("files of an interrupted write survive reopening the store")
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


# ---- the rclpy client of the node ------------------------------------------------------------

class Client:
    """Publishes frames, calls services and records detections, from its own rclpy context."""

    def __init__(self, namespace: str):
        import rclpy
        from personal_vlm_interfaces.msg import DetectionArray
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        self.context = Context()
        rclpy.init(args=[], context=self.context)
        self.node = rclpy.create_node("personal_vlm_field_test", namespace=namespace, context=self.context,
                                      start_parameter_services=False)
        self.frames = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.lock = threading.Lock()
        self.detections: list[tuple[float, float, tuple, tuple]] = []   # (monotonic, wall, stamp, names)
        self.node.create_subscription(DetectionArray, "personal_vlm/detections", self._on_detections, 50)
        self._clients = {}
        self._stamp = 0
        self.published: dict[tuple, float] = {}      # stamp → monotonic publish time
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            self.executor.spin()

    def _on_detections(self, msg) -> None:
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        with self.lock:
            self.detections.append((time.monotonic(), time.time(), stamp, tuple(d.name for d in msg.detections)))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(5)

    def service(self, srv_type, name: str):
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.node.create_client(srv_type, name)
            if not client.wait_for_service(timeout_sec=REQUEST_TIMEOUT_S):
                raise RuntimeError(f"the node's {name} service never appeared")
        return client

    def call_async(self, srv_type, name: str, request):
        return self.service(srv_type, name).call_async(request)

    def call(self, srv_type, name: str, request, timeout: float = REQUEST_TIMEOUT_S):
        done = threading.Event()
        future = self.call_async(srv_type, name, request)
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            return None
        return future.result()

    def publish(self, msg) -> tuple:
        """Publish with a stamp no other frame had; returns the stamp."""
        self._stamp += 1
        stamp = (1_000_000 + self._stamp, 0)
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        msg.header.frame_id = "camera"
        self.published[stamp] = time.monotonic()
        self.frames.publish(msg)
        return stamp

    def since(self, t0: float) -> list:
        with self.lock:
            return [d for d in self.detections if d[0] >= t0]


def image_msg(array: np.ndarray, encoding: str = "rgb8"):
    from sensor_msgs.msg import Image

    return Image(height=array.shape[0], width=array.shape[1], encoding=encoding, step=array.shape[1] * 3,
                 data=np.ascontiguousarray(array).tobytes())


class Camera:
    """Publishes one picture (changeable) at a fixed rate on a thread."""

    def __init__(self, client: Client, rate_hz: float):
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
                self.client.publish(self.msg)
                self.count += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


def teach_request(name: str, arrays=(), **fields):
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept.Request(name=name, images=[image_msg(a) for a in arrays], **fields)


def node_names(client: Client) -> list[str] | None:
    from personal_vlm_interfaces.srv import ListConcepts

    response = client.call(ListConcepts, "list_concepts", ListConcepts.Request())
    return None if response is None or not response.success else list(response.names)


# ---- scenario 4: sharing ---------------------------------------------------------------------

class StorePoller:
    """Times when concepts appear in / vanish from a store, polled every 10 ms on a thread."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: dict[str, float] = {}      # name → monotonic time first seen
        self.gone: dict[str, float] = {}      # name → monotonic time first seen absent after being seen
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.root / "concepts.db", timeout=30.0)) as db:
            while not self.stop_event.wait(0.01):
                now = time.monotonic()
                try:
                    names = {row[0] for row in db.execute("SELECT name FROM concepts")}
                except sqlite3.Error:
                    continue
                for name in names:
                    self.seen.setdefault(name, now)
                    self.gone.pop(name, None)
                for name in set(self.seen) - names:
                    self.gone.setdefault(name, now)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(2)


def sharing(report: Report, world: World, node: NodeRun, client: Client, rounds: int) -> None:
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
            camera.show(picture(seed))
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


def _first_detection(client: Client, name: str, t0: float | None, timeout: float) -> float | None:
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
    from ..store import model_key

    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        row = db.execute("SELECT model_fingerprint, dir FROM concepts WHERE name=?", (name,)).fetchone()
        others = dict(db.execute("SELECT model, dir FROM memories WHERE name=?", (name,)).fetchall())
    return {} if row is None else {model_key(row[0]): row[1], **others}


def cross_models(report: Report, world: World, node: NodeRun, client: Client, camera: Camera,
                 poller: StorePoller) -> None:
    import torch

    from ..assistant import Assistant
    from ..store import ConceptStore, model_key

    figures = report.scenario("cross_model")
    store_dir = node.store
    store = ConceptStore(store_dir)
    pa, pb = picture(8001), picture(8002)
    response = client.call(_teach_type(), "teach_concept", teach_request("cross a", [pa]))
    report.check(response is not None and response.success, "the node could not teach 'cross a'")
    # The camera already shows B's picture while model B's CLI teaches it: the node then sees a
    # concept with no memory for its model; it must build its own, never match B's.
    fp_a = store.get("cross a").model_fingerprint
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
    fp_b = store.get("cross b").model_fingerprint
    report.check(model_key(fp_a) != model_key(fp_b), "models A and B have the same fingerprint")
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


def _teach_type():
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept


# ---- scenario 2: concurrency -----------------------------------------------------------------

def concurrency(report: Report, world: World, node: NodeRun, client: Client, total: int, parallel: int) -> None:
    figures = report.scenario("concurrency")
    store = node.store
    rng = random.Random(world.seed * 7 + 3)
    say(f"scenario 2: {total} CLI processes, {parallel} at a time, on the node's store")
    pre = [f"conc pre {i}" for i in range(max(2, total // 4))]
    for i, name in enumerate(pre):
        response = client.call(_teach_type(), "teach_concept", teach_request(name, [picture(9000 + i)]))
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
    camera.show(picture(9000))
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


# ---- scenario 3: fuzz ------------------------------------------------------------------------

def _raw_image(width, height, encoding="rgb8", step=None, data=b"", bigendian=0):
    from sensor_msgs.msg import Image

    return Image(width=width, height=height, encoding=encoding, step=width * 3 if step is None else step,
                 data=data, is_bigendian=bigendian)


def bad_images(rng: random.Random):
    """Malformed sensor_msgs/Image messages, each with what is wrong with it."""
    good = picture(rng.randint(0, 10_000))
    data = good.tobytes()
    return [
        ("unknown encoding", _raw_image(WIDTH, HEIGHT, "yuv422_what", data=data)),
        ("5000-character encoding", _raw_image(WIDTH, HEIGHT, "x" * 5000, data=data)),
        ("empty encoding", _raw_image(WIDTH, HEIGHT, "", data=data)),
        ("step too small", _raw_image(WIDTH, HEIGHT, step=WIDTH, data=data)),
        ("data truncated", _raw_image(WIDTH, HEIGHT, data=data[: len(data) // 2])),
        ("no data", _raw_image(WIDTH, HEIGHT, data=b"")),
        ("zero width", _raw_image(0, HEIGHT, data=data)),
        ("zero height", _raw_image(WIDTH, 0, data=data)),
        ("huge size claimed", _raw_image(1_000_000, 1_000_000, data=data[:1000])),
        ("huge step claimed", _raw_image(WIDTH, HEIGHT, step=2**32 - 1, data=data)),
        ("mono16 odd bytes", _raw_image(WIDTH, HEIGHT, "mono16", step=WIDTH * 2, data=data[: WIDTH * HEIGHT * 2 - 1])),
    ]


def odd_images(rng: random.Random):
    """Well-formed images in unusual encodings: each must be accepted."""
    good = picture(rng.randint(0, 10_000))
    padded = np.zeros((HEIGHT, WIDTH * 4 + 16), dtype=np.uint8)
    padded[:, : WIDTH * 4] = np.concatenate([good, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=2).reshape(HEIGHT, -1)
    nan = np.full((HEIGHT, WIDTH), np.nan, dtype="<f4")
    nan[10:20, 10:20] = np.inf
    nan[50:60, 50:60] = 1.0
    return [
        ("rgb8", image_msg(good)),
        ("bgr8", _raw_image(WIDTH, HEIGHT, "bgr8", data=good[:, :, ::-1].tobytes())),
        ("rgba8 with row padding", _raw_image(WIDTH, HEIGHT, "rgba8", step=WIDTH * 4 + 16, data=padded.tobytes())),
        ("mono8", _raw_image(WIDTH, HEIGHT, "mono8", step=WIDTH, data=good[:, :, 0].tobytes())),
        ("mono16 big-endian", _raw_image(WIDTH, HEIGHT, "mono16", step=WIDTH * 2,
                                         data=good[:, :, :2].astype(">u2").tobytes()[: WIDTH * HEIGHT * 2], bigendian=1)),
        ("32FC1 with NaN and inf", _raw_image(WIDTH, HEIGHT, "32FC1", step=WIDTH * 4, data=nan.tobytes())),
    ]


BAD_NAMES = ["", "   ", "a/b", "..", "x" * 5000, "\u200d\u200d\u200b", "my \x1b[31mmug", "tab\tname",
             "\x00zero", "\ud7ff\ufeff", "y" * 5000 + "\x07"]
ODD_NAMES = ["ネコ 🐈‍⬛", "café", "Grandpa's cane", "מִשְׁקָפַיִם", "🫨 shaking", "e\u0301clair", "Ω≈ç√∫",
             "👩🏽‍🚀 astronaut", "空", "x" * 55]   # a numeric suffix follows: 64 characters at most


def fuzz_cases(rng: random.Random, count: int):
    """(service, request, expectation, what) for ``count`` requests: "fail" (success=false and a
    short message), "ok" or "any". Forgets of names taught here are added by the sender."""
    from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts
    from sensor_msgs.msg import Image, RegionOfInterest

    good = picture(rng.randint(0, 10_000))
    for i in range(count):
        roll = rng.random()
        if roll < 0.30:
            what, image = rng.choice(bad_images(rng))
            yield "teach_concept", _with_images(f"fuzz {i}", [image]), "fail", f"teach with a bad image ({what})"
        elif roll < 0.40:
            name = rng.choice(BAD_NAMES)
            yield "teach_concept", teach_request(name, [good]), "fail", f"teach named {name[:20]!r}"
        elif roll < 0.48:
            roi = rng.choice([RegionOfInterest(x_offset=WIDTH, y_offset=0, width=10, height=10),
                              RegionOfInterest(x_offset=5, y_offset=5, width=0, height=10),
                              RegionOfInterest(x_offset=0, y_offset=0, width=2**32 - 1, height=2**32 - 1),
                              RegionOfInterest(x_offset=2**32 - 1, y_offset=2**32 - 1, width=1, height=1)])
            yield "teach_concept", teach_request(f"fuzz roi {i}", [good], roi=roi), "fail", "teach with a bad ROI"
        elif roll < 0.52:
            category = rng.choice(["\x1b[2J\x1b[31mred", "c" * 5000, "bell\x07", "new\nline"])
            yield "teach_concept", teach_request(f"fuzz cat {i}", [good], category=category), "fail", \
                "teach with a bad category"
        elif roll < 0.53:
            yield "teach_concept", teach_request(f"fuzz many {i}", [good] * 9), "fail", "teach with 9 pictures"
        elif roll < 0.545:
            what, image = rng.choice(odd_images(rng))
            name = f"{rng.choice(ODD_NAMES)} {i}"
            yield "teach_concept", _with_images(name, [image]), "ok", f"teach {name!r} from {what}"
        elif roll < 0.65:
            question = rng.choice(["", "   ", "q" * 1001, "w" * 100_000, "\x1b[31m?" * 400])
            yield "ask", Ask.Request(question=question, image=image_msg(good)), "fail", \
                f"ask {question[:10]!r} ({len(question)} characters)"
        elif roll < 0.72:
            what, image = rng.choice(bad_images(rng))
            yield "ask", Ask.Request(question="where is my mug?", image=image), "fail", f"ask on a bad image ({what})"
        elif roll < 0.725:
            yield "ask", Ask.Request(question="what is this?", image=image_msg(good)), "ok", "ask"
        elif roll < 0.73:
            yield "ask", Ask.Request(question="what is this?", image=Image()), "any", "ask on the latest frame"
        elif roll < 0.85:
            yield "list_concepts", ListConcepts.Request(), "ok", "list"
        else:
            name = rng.choice(BAD_NAMES + [f"never taught {i}", "ネコ"])
            yield "forget_concept", ForgetConcept.Request(name=name), "fail", f"forget {name[:20]!r}"


def _with_images(name: str, images: list):
    from personal_vlm_interfaces.srv import TeachConcept

    return TeachConcept.Request(name=name, images=images)


def bad_frames(rng: random.Random):
    frames = bad_images(rng)
    return [(what, image) for what, image in frames] + [("a good frame", image_msg(picture(rng.randint(0, 99))))]


def fuzz(report: Report, world: World, node: NodeRun, client: Client, requests: int, frames: int) -> None:
    from personal_vlm_interfaces.srv import Ask, ForgetConcept, ListConcepts, TeachConcept

    types = {"teach_concept": TeachConcept, "ask": Ask, "list_concepts": ListConcepts,
             "forget_concept": ForgetConcept}
    figures = report.scenario("fuzz")
    rng = random.Random(world.seed * 7 + 4)
    say(f"scenario 3: {requests} fuzzed service requests and {frames} camera frames")
    log_before = node.log_bytes()
    tracebacks_before = node.tracebacks()
    window = threading.BoundedSemaphore(8)
    lock = threading.Lock()
    results = []                          # (expectation, what, service, response or None)
    taught: list[str] = []
    frame_menu = bad_frames(rng) + [("an odd frame " + w, m) for w, m in odd_images(rng)]
    sent = frames_sent = malformed_frames = 0
    pending: list = []

    def send(service, request, expect, what):
        window.acquire()
        future = client.call_async(types[service], service, request)
        entry = [expect, what, service, None, request.name if service == "teach_concept" else None]

        def answered(f):
            entry[3] = f.result()
            with lock:
                results.append(entry)
                if entry[2] == "teach_concept" and entry[0] == "ok" and entry[3] is not None and entry[3].success:
                    taught.append(entry[4])
            window.release()

        future.add_done_callback(answered)
        pending.append((future, entry))

    frames_per_request = frames / max(1, requests)
    frame_credit = 0.0
    t0 = time.monotonic()
    for service, request, expect, what in fuzz_cases(rng, requests):
        send(service, request, expect, what)
        sent += 1
        with lock:
            name = taught.pop() if taught and rng.random() < 0.5 else None
        if name is not None:
            send("forget_concept", ForgetConcept.Request(name=name), "ok", f"forget {name!r}")
            sent += 1
        frame_credit += frames_per_request
        while frame_credit >= 1.0:
            frame_credit -= 1.0
            what_frame, msg = rng.choice(frame_menu)
            client.publish(msg)
            frames_sent += 1
            malformed_frames += what_frame in {w for w, _m in bad_images(random.Random(0))}
        if sent % 500 == 0:
            say(f"  {sent} requests sent, {len(results)} answered, node {'alive' if node.alive() else 'DEAD'}")
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while len(results) < sent and time.monotonic() < deadline and node.alive():
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    with lock:
        answered = list(results)
    lost = sent - len(answered)
    wrong = []
    longest = 0
    by_expectation: dict[str, int] = {}
    for expect, what, service, response, _name in answered:
        by_expectation[expect] = by_expectation.get(expect, 0) + 1
        longest = max(longest, len(response.message))
        if expect == "fail" and (response.success or not response.message.strip()):
            wrong.append(f"{service}: {what} was {'accepted' if response.success else 'refused without a message'}")
        elif expect == "ok" and not response.success:
            wrong.append(f"{service}: {what} was refused: {response.message[:200]}")
        elif expect == "any" and not response.success and not response.message.strip():
            wrong.append(f"{service}: {what} was refused without a message")
        if len(response.message) > MAX_REPLY_CHARS:
            wrong.append(f"{service}: {what}: a {len(response.message)}-character reply")
    # The node still serves frames after all that.
    after = time.monotonic()
    good_frame = image_msg(picture(1))
    for _ in range(30):
        client.publish(good_frame)
        time.sleep(0.1)
    time.sleep(1.0)
    detections_after = len(client.since(after))
    log_growth = node.log_bytes() - log_before
    new_tracebacks = node.tracebacks() - tracebacks_before
    distinct_wrong = sorted(set(wrong))
    figures.update(requests_sent=sent, requests_answered=len(answered), requests_lost=lost,
                   answered_as_expected=len(answered) - len(wrong), wrong_answers=len(wrong),
                   by_expectation=by_expectation, frames_sent=frames_sent, malformed_frames=malformed_frames,
                   detection_messages_after=detections_after, longest_reply_chars=longest,
                   node_log_growth_bytes=log_growth, node_tracebacks=new_tracebacks, seconds=round(elapsed, 1))
    report.check(lost == 0, f"{lost} fuzzed requests never answered")
    report.check(not wrong, f"{len(wrong)} fuzzed requests answered wrongly: {distinct_wrong[:10]}")
    report.check(node.alive(), "the node died during the fuzz")
    report.check(new_tracebacks == 0, f"the node logged {new_tracebacks} tracebacks during the fuzz")
    report.check(log_growth <= MAX_FUZZ_LOG_BYTES, f"the node's log grew {log_growth} bytes during the fuzz")
    report.check(detections_after > 0, "the node published no detections after the fuzz")


# ---- scenario 5: soak ------------------------------------------------------------------------

def soak(report: Report, world: World, node: NodeRun, client: Client, minutes: float, rate_hz: float) -> None:
    from personal_vlm_interfaces.srv import Ask, ForgetConcept

    figures = report.scenario("soak")
    say(f"scenario 5: soak for {minutes:g} min, frames at {rate_hz:g} Hz plus periodic requests")
    shown = picture(9500)
    response = client.call(_teach_type(), "teach_concept", teach_request("soak thing", [shown], overwrite=True))
    report.check(response is not None and response.success, "the node could not teach 'soak thing'")
    frame = image_msg(shown)
    t0 = time.monotonic()
    end = t0 + minutes * 60.0
    rss: list[tuple[float, float]] = []
    requests = {"sent": 0, "failed": 0}
    first_stamp = client._stamp + 1
    next_frame = next_list = next_ask = next_teach = next_rss = t0
    teach_cycle = 0
    while time.monotonic() < end and node.alive():
        now = time.monotonic()
        if now >= next_frame:
            client.publish(frame)
            next_frame += 1.0 / rate_hz
        if now >= next_rss:
            value = node.rss_mb()
            if value is not None:
                rss.append((now - t0, value))
            next_rss += 5.0
        calls = []
        if now >= next_list:
            calls.append(lambda: node_names(client) is not None)
            next_list += 2.0
        if now >= next_ask:
            calls.append(lambda: _ok(client.call(Ask, "ask", Ask.Request(question="is my thing here?", image=frame))))
            next_ask += 20.0
        if now >= next_teach:
            teach_cycle += 1
            temp = f"soak temp {teach_cycle}"
            calls.append(lambda temp=temp: _ok(client.call(_teach_type(), "teach_concept",
                                                           teach_request(temp, [picture(9600 + teach_cycle)]))))
            calls.append(lambda temp=temp: _ok(client.call(ForgetConcept, "forget_concept",
                                                           ForgetConcept.Request(name=temp))))
            next_teach += 30.0
        for call in calls:
            requests["sent"] += 1
            requests["failed"] += not call()
        time.sleep(max(0.0, min(next_frame, next_rss, next_list) - time.monotonic()))
    time.sleep(1.0)
    latencies = []                # (seconds into the soak, latency)
    for received, _wall, stamp, names in client.since(t0):
        if stamp[0] - 1_000_000 >= first_stamp and stamp in client.published:
            latencies.append((client.published[stamp] - t0, received - client.published[stamp]))
    span = max(1e-9, time.monotonic() - t0)
    first = [lat for at, lat in latencies if at < span / 3]
    last = [lat for at, lat in latencies if at >= 2 * span / 3]
    p95_first, p95_last = percentile(first, 95), percentile(last, 95)
    warm = [v for at, v in rss if at >= span / 4] or [v for _at, v in rss]
    growth = (warm[-1] - warm[0]) if warm else None
    frames_published = client._stamp - first_stamp + 1
    figures.update(minutes=round(span / 60.0, 2), frames_published=frames_published,
                   detection_messages=len(latencies), requests_sent=requests["sent"],
                   requests_failed=requests["failed"],
                   p50_latency_s=percentile([lat for _a, lat in latencies], 50),
                   p95_latency_first_third_s=p95_first, p95_latency_last_third_s=p95_last,
                   rss_mb_start=rss[0][1] if rss else None, rss_mb_after_warmup=warm[0] if warm else None,
                   rss_mb_end=rss[-1][1] if rss else None, rss_growth_mb_after_warmup=growth,
                   rss_samples=[[round(a, 1), round(v, 1)] for a, v in rss])
    report.check(node.alive(), "the node died during the soak")
    report.check(requests["failed"] == 0, f"{requests['failed']} of {requests['sent']} soak requests failed")
    report.check(len(latencies) >= 0.5 * frames_published,
                 f"only {len(latencies)} detection messages for {frames_published} frames in the soak")
    if p95_first is not None and p95_last is not None:
        report.check(p95_last <= max(2.0 * p95_first, p95_first + 0.25),
                     f"frame latency p95 drifted from {p95_first:.3f} s to {p95_last:.3f} s")
    if growth is not None:
        report.check(growth <= 64.0, f"the node's RSS grew {growth:.1f} MB after warm-up")


def _ok(response) -> bool:
    return response is not None and response.success


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
    if not any(wanted(n) for n in ("sharing", "concurrency", "fuzz", "soak")):
        return report
    rate_hz = 5.0
    node = NodeRun(world, world.model_a, out / "store_node", rate_hz, "a")
    say("starting the node on model A")
    node.start()
    client = Client(world.namespace)
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
    parser.add_argument("--only", action="append", choices=("killed_writers", "killed_cli", "sharing",
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


if __name__ == "__main__":
    sys.exit(main())
