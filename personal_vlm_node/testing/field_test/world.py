"""The field test's world: its scales and checks, the tiny models and pictures, and the CLI and node processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..kit import node_env, params_file, pixels

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

class World:
    """Paths, the environment of child processes, and the two tiny models (A: the node's, B: another)."""

    def __init__(self, out: Path, seed: int, build_models: bool = True):
        from PIL import Image as PILImage

        from ..tiny_model import build_tiny_model

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
        self.env = node_env(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        self.env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        # The node and the CLIs run the same code as this process (a checkout's, or the installed one).
        code = str(Path(__file__).resolve().parents[3])      # above personal_vlm_node/
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)
        self.namespace = f"/field_test_{os.getpid()}"
        self._cli_count = 0

    def picture_file(self, seed: int) -> Path:
        path = self.pictures / f"picture_{seed}.png"
        if not path.is_file():
            self._pil.fromarray(pixels(seed)).save(path)
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

    def __init__(self, world: World, model: Path, store: Path | str, rate_hz: float, tag: str,
                 namespace: str | None = None):
        self.world, self.store = world, store
        self.namespace = namespace or world.namespace
        values = {"model": str(model), "device": "cpu", "dtype": "float32", "store_dir": str(store),
                  "process_rate_hz": rate_hz, "accept_threshold": 0.999, "reject_threshold": 0.5,
                  "max_concepts_in_context": 2, "verification": False, "overlay": False}
        params = params_file(world.out / f"node_{tag}.yaml", values)
        self.log = world.logs / f"node_{tag}.log"
        self.command = [sys.executable, "-m", "personal_vlm_node.ros.node", "--ros-args", "--params-file",
                        str(params), "-r", f"__ns:={self.namespace}"]
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
