"""Train the toys (VLM, then CLIP, then the VLM's ICPT projector; or those named) in a background process while other work goes on.

The test suite starts it as soon as it has collected a test that needs a toy that is not cached
yet, and runs those tests last; ``python -m personal_vlm_node.testing.toy_background`` is that
process. Training itself is :func:`~personal_vlm_node.testing.toy_vlm.ensure_toy_vlm` and
:func:`~personal_vlm_node.testing.toy_clip.ensure_toy_clip`: one machine-wide lock, so a second
run waits for the first rather than training again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import toy_clip, toy_icpt, toy_vlm

# name -> (cached folder, the file that marks it complete, the function that trains it when missing)
TOYS = {
    "toy_vlm": (toy_vlm.toy_vlm_folder, toy_vlm.MARKER, toy_vlm.ensure_toy_vlm),
    "toy_clip": (toy_clip.toy_clip_folder, toy_clip.MARKER, toy_clip.ensure_toy_clip),
    "toy_projector": (toy_icpt.toy_projector_folder, toy_icpt.MARKER, toy_icpt.ensure_toy_projector),
}
LOG_NAME = "background-training.log"
# The trainer (and the renderer it forks) runs at this niceness, so the other tests come first for
# the CPU while it trains (they still run about 1.6x slower beside it). It runs in a session of its own, and where the kernel groups sessions for
# scheduling (autogroup), niceness counts only within the group: the group's niceness is set too.
NICENESS = 19
AUTOGROUP = Path("/proc/self/autogroup")


def lower_priority(niceness: int = NICENESS) -> None:
    """Run this process, and those it forks, at ``niceness``: its own and its autogroup's."""
    os.nice(max(0, niceness - os.nice(0)))
    try:
        AUTOGROUP.write_text(str(niceness))
    except OSError:                     # no autogroup scheduling here, or not writable
        pass


def ready(name: str) -> bool:
    folder, marker, _ = TOYS[name]
    return (folder() / marker).is_file()


def start(names=tuple(TOYS)) -> tuple[subprocess.Popen, Path] | None:
    """Start training those of the toys ``names`` that are not cached; None when all are. The
    process and its log."""
    missing = [name for name in names if not ready(name)]
    if not missing:
        return None
    log = toy_vlm.cache_root() / LOG_NAME
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", __name__, *missing], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process, log


def wait(process: subprocess.Popen | None, name: str, log: Path | None, poll_s: float = 2.0) -> str | None:
    """Wait until toy ``name`` is cached or the background process has ended; a message when that
    process failed before caching it (None otherwise)."""
    if process is None:
        return None
    while not ready(name) and process.poll() is None:
        time.sleep(poll_s)
    if ready(name) or process.returncode == 0:
        return None
    tail = ""
    if log is not None and log.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    return f"training the toys in the background failed (exit code {process.returncode}); {log}:\n{tail}"


def ensure(name: str) -> Path:
    return TOYS[name][2]()


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the background training (its process group: the scene renderer too) if it still runs."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(TOYS)
    unknown = [name for name in names if name not in TOYS]
    if unknown:
        print(f"[toy_background] unknown toy(s) {unknown}; known: {sorted(TOYS)}", file=sys.stderr)
        return 2
    lower_priority()
    for name in names:
        print(f"[toy_background] {name}: {ensure(name)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
