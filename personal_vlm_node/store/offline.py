"""A robot's offline copy of a shared concept library: records and its backbones' memories.

Kept under ``$XDG_CACHE_HOME/personal_vlm/library/<hash of the library's location>/`` (or
``$PERSONAL_VLM_LIBRARY_CACHE/<hash>/``; 0700, files 0600): ``records.json`` (the records), one
``versions-<hash of the model key>.json`` per backbone (each concept's memory version) and one
``<version>.safetensors`` per memory read. Every successful read of the library refreshes it; when the server cannot be reached, the library answers reads from it, so a robot
keeps recognising — across a restart too. A forget, or a refresh that no longer lists a concept,
removes the concept's record and memory files from it. Pictures are not copied: rebuilding a
memory for another backbone waits for the library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from .files import _memory_from_bytes
from .records import ConceptRecord

logger = logging.getLogger("personal_vlm_node.store")


def default_cache_root() -> Path:
    """``$PERSONAL_VLM_LIBRARY_CACHE``, else ``$XDG_CACHE_HOME/personal_vlm/library``."""
    if os.environ.get("PERSONAL_VLM_LIBRARY_CACHE"):
        return Path(os.environ["PERSONAL_VLM_LIBRARY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "personal_vlm" / "library"


class OfflineCache:
    """Records and memories of one library, as last read; safe to share across threads."""

    def __init__(self, folder: Path | None):
        self.folder = folder              # None: kept in memory only (the folder could not be made)
        self.records: dict[str, ConceptRecord] = {}
        self._versions: dict[str, dict[str, str]] = {}
        self._seen: set[str] = set()              # memory versions this process has had in the copy
        self._lock = threading.Lock()
        if folder is not None:
            self._load()
            self._seen = {v for versions in self._versions.values() for v in versions.values()}

    @classmethod
    def for_library(cls, location: str, cache_dir=None) -> "OfflineCache":
        root = Path(cache_dir) if cache_dir else default_cache_root()
        folder = root / hashlib.sha256(location.encode()).hexdigest()[:16]
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        except OSError as e:
            logger.warning("no offline copy of the concept library on disk (%s: %s); a restart during an "
                           "outage starts with no concepts", folder, e.strerror)
            folder = None
        return cls(folder)

    # ---- disk --------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            records = json.loads((self.folder / "records.json").read_text(encoding="utf-8"))
            self.records = {name: ConceptRecord(**fields) for name, fields in records.items()}
            for path in self.folder.glob("versions-*.json"):
                state = json.loads(path.read_text(encoding="utf-8"))
                self._versions[state["model"]] = dict(state["versions"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as e:
            logger.warning("the offline copy in %s cannot be read (%s); starting it afresh", self.folder, e)
            self.records, self._versions = {}, {}

    @staticmethod
    def _versions_file(key: str) -> str:
        return f"versions-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _save(self) -> None:
        if self.folder is None:
            return
        records = {name: asdict(r) for name, r in self.records.items()}
        self._write(self.folder / "records.json", json.dumps(records, ensure_ascii=False).encode())
        # One file per backbone: processes of other backbones on this machine may share the folder.
        for key, versions in self._versions.items():
            self._write(self.folder / self._versions_file(key),
                        json.dumps({"model": key, "versions": versions}, ensure_ascii=False).encode())
        # Only memories this process saw replaced or removed: the other files are other processes'.
        keep = {v for versions in self._versions.values() for v in versions.values()}
        for version in self._seen - keep:
            (self.folder / f"{version}.safetensors").unlink(missing_ok=True)
        self._seen = keep

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as e:
            logger.warning("could not update the offline copy (%s: %s)", path, e.strerror)

    # ---- what the library tells it -------------------------------------------------------------
    def put_record(self, record: ConceptRecord) -> None:
        with self._lock:
            self.records[record.name] = record
            self._save()

    def set_records(self, records: list[ConceptRecord]) -> None:
        with self._lock:
            self.records = {r.name: r for r in records}
            for versions in self._versions.values():
                for name in [n for n in versions if n not in self.records]:
                    del versions[name]
            self._save()

    def set_versions(self, key: str, versions: dict[str, str]) -> None:
        with self._lock:
            if self._versions.get(key) == versions:
                return
            self._versions[key] = dict(versions)
            self._save()

    def put_memory(self, key: str, name: str, version: str, data: bytes) -> None:
        with self._lock:
            self._versions.setdefault(key, {})[name] = version
            self._seen.add(version)
            if self.folder is not None:
                path = self.folder / f"{version}.safetensors"
                if not path.exists():
                    self._write(path, bytes(data))
            # The versions file is written by set_versions, which a reader calls before loading memories.

    def drop(self, name: str) -> None:
        with self._lock:
            self.records.pop(name, None)
            for versions in self._versions.values():
                versions.pop(name, None)
            self._save()

    # ---- answers while offline -----------------------------------------------------------------
    def versions(self, key: str) -> dict[str, str]:
        with self._lock:
            return dict(self._versions.get(key, {}))

    def memory(self, key: str, name: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            version = self._versions.get(key, {}).get(name)
        if version is None or self.folder is None:
            return None
        try:
            return _memory_from_bytes((self.folder / f"{version}.safetensors").read_bytes(), "the offline copy")
        except (OSError, ValueError, RuntimeError):
            return None
