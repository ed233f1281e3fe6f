"""What every part of the package writes the same way: durable files and progress lines on stderr."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stderr_progress(tag: str = "personal-vlm") -> Callable[[str], None]:
    """A progress callback printing ``[tag] message`` lines on stderr (stdout stays for results)."""
    def say(message: str) -> None:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)

    return say


def emit(args, payload: dict, text: str) -> None:
    """A command's result on stdout: ``payload`` as one JSON line with ``--json``, else ``text``."""
    import json

    print(json.dumps(payload, ensure_ascii=False) if getattr(args, "json", False) else text, flush=True)


def plural(count: int, noun: str) -> str:
    """``1 concept``, ``2 concepts``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
