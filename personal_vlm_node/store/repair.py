"""``personal-vlm store repair``: rebuild a concept store's index from its concept folders.

The index (``concepts.db``) is the only place a concept's name points at its folder. When it is
lost, emptied or damaged, each version folder still holds everything the row held: its
``record.json`` (name, category, keywords, fingerprint, K_c, model, times, extra, picture count),
its memory and its pictures, and each memory of another model names its concept and model. The
repair reads them, writes a fresh index beside the old one, moves the old one aside (never
deleting it) and puts the new one in its place; no concept folder is changed or removed.

When a concept has several versions (an overwrite whose old folder was not removed yet), the most
recently updated one is restored and the others are left where they are. A concept whose memory is
damaged is restored all the same, so that it shows as damaged and can be forgotten; a folder whose
record cannot be read is left as it is and reported. Folders written before records existed (no
``record.json``) that still hold a memory and pictures are restored as ``recovered <id>``, with
their memory rebuilt from the pictures when a model loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import validate_name
from personal_vlm_node.output import plural
from .layout import (SCHEMA_VERSION, _DB_FILE, _DIR_MODE, _FILE_MODE, _MARKER_FILE, _MEMORY_FILE, _RECORD_FILE,
                     _STORE_ENTRIES, _VERSION_NAME)
from .records import default_store_dir
from .files import (_exclusive_lock, _check_pictures_present, _fsync_dir, _fsync_file, _read_memory,
                    _reference_file)
from .index import _COLUMNS, _create_tables
from .folder import _refuse_links, _check_marker, _is_index, _write_marker

@dataclass
class RepairReport:
    """What a repair found and did; :meth:`lines` says it for a person."""

    root: Path
    repaired: bool                                       # False: the index was healthy and left alone
    restored: list[str] = field(default_factory=list)    # concept names now in the index
    memories: int = 0                                    # memories of other models attached to them
    recovered: list[str] = field(default_factory=list)   # names given to folders without a record
    damaged: dict[str, str] = field(default_factory=dict)   # restored, but unusable until taught again
    left: list[str] = field(default_factory=list)        # "folder (why)" for each folder not restored
    old_index: Path | None = None                        # where the previous index was moved
    seconds: float = 0.0

    def lines(self) -> list[str]:
        if not self.repaired:
            return [f"the concept index in {self.root} is healthy ({plural(len(self.restored), 'concept')}); nothing was "
                    "changed (--force rebuilds it anyway)"]
        out = [f"rebuilt the concept index in {self.root} from its folders in {self.seconds:.1f} s: "
               f"{plural(len(self.restored), 'concept')}, memories of other models: {self.memories}"]
        if self.old_index is not None:
            out.append(f"the previous index was kept as {self.old_index}")
        if self.recovered:
            out.append(f"{len(self.recovered)} folders without a record were restored under new names: "
                       + ", ".join(repr(n) for n in self.recovered[:5]) + (", ..." if len(self.recovered) > 5 else ""))
        for name, reason in sorted(self.damaged.items()):
            out.append(f"concept {name!r} is damaged ({reason}); forget it and teach it again")
        for entry in self.left:
            out.append(f"left as it is: {entry}")
        return out

    def as_dict(self) -> dict:
        return {"root": str(self.root), "repaired": self.repaired, "restored": self.restored,
                "memories": self.memories, "recovered": self.recovered, "damaged": self.damaged,
                "left": self.left, "old_index": None if self.old_index is None else str(self.old_index),
                "seconds": round(self.seconds, 3)}


def repair_store(root: str | Path | None = None, force: bool = False, progress=None) -> RepairReport:
    """Rebuild the index of the store in ``root`` from its concept folders (see the module doc).

    Without ``force`` a healthy index is left alone. Refuses a folder that is not a concept store.
    """
    started = time.perf_counter()
    root = Path(root).expanduser() if root is not None else default_store_dir()
    _check_repairable(root)
    say = progress or (lambda message: None)
    with _exclusive_lock(root):
        index = root / _DB_FILE
        if not force and _healthy(index):
            return RepairReport(root, repaired=False, restored=_names(index))
        say(f"reading the concept folders in {root / 'concepts'}…")
        concepts, memories, report = _scan(root / "concepts", say)
        report.root = root
        rebuilt = root / (_DB_FILE + ".rebuilding")
        _remove_own_file(rebuilt)
        _write_index(rebuilt, concepts, memories)
        report.old_index = _move_aside(index)
        os.rename(rebuilt, index)
        os.chmod(index, _FILE_MODE)
        if not (root / _MARKER_FILE).exists():
            _write_marker(root)
        (root / "tmp").mkdir(mode=_DIR_MODE, exist_ok=True)
        _fsync_dir(root)
    report.seconds = time.perf_counter() - started
    return report


def _check_repairable(root: Path) -> None:
    if not root.is_dir():
        raise PersonalVLMError(f"there is no concept store in {root} (no such folder)")
    entries = set(os.listdir(root))
    _refuse_links(root, entries)
    concepts = root / "concepts"
    if not concepts.is_dir():
        raise PersonalVLMError(f"{root} has no concepts folder: there is nothing to rebuild an index from")
    if _MARKER_FILE in entries:
        _check_marker(root)
        return
    foreign = sorted(e for e in entries - _STORE_ENTRIES if not e.startswith(_DB_FILE + "."))
    if foreign:
        raise PersonalVLMError(f"{root} is not a concept store: it holds files personal_vlm_node did not write "
                               f"({', '.join(repr(e) for e in foreign[:3])}); nothing was changed")


def _healthy(index: Path) -> bool:
    if not _is_index(index):
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as conn:
            return conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.Error:
        return False


def _names(index: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as conn:
        return sorted(row[0] for row in conn.execute("SELECT name FROM concepts"))


def _scan(concepts_dir: Path, say) -> tuple[dict, dict, RepairReport]:
    """The newest readable version of each concept, and the memories of other models that belong
    to those versions."""
    report = RepairReport(Path(), repaired=True)
    concepts: dict[str, tuple[str, dict]] = {}       # name -> (folder, record)
    memories: dict[tuple[str, str], tuple[str, dict]] = {}
    folders = sorted(os.scandir(concepts_dir), key=lambda e: e.name)
    for i, entry in enumerate(folders):
        if i and i % 500 == 0:
            say(f"read {i}/{len(folders)} folders")
        path = Path(entry.path)
        if not (_VERSION_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False)):
            report.left.append(f"{path} (not a folder the store writes)")
            continue
        try:
            record = _read_record(path)
        except (OSError, ValueError, PersonalVLMError) as e:
            report.left.append(f"{path} (its record cannot be read: {e})")
            continue
        if record is None:
            record = _legacy_record(path)
            if record is None:
                report.left.append(f"{path} (no record, and no memory and pictures to restore a concept from)")
                continue
            report.recovered.append(record["name"])
        if record["kind"] == "memory":
            key = (record["name"], record["model"])
            if key not in memories or memories[key][1]["updated"] < record["updated"]:
                memories[key] = (entry.name, record)
            continue
        name = record["name"]
        if name in concepts and concepts[name][1]["updated"] >= record["updated"]:
            report.left.append(f"{path} (an older version of {name!r})")
            continue
        if name in concepts:
            report.left.append(f"{concepts_dir / concepts[name][0]} (an older version of {name!r})")
        concepts[name] = (entry.name, record)
    attached = {}
    for (name, model), (folder, record) in memories.items():
        if name in concepts and record.get("concept_dir") == concepts[name][0]:
            attached[(name, model)] = (folder, record)
        else:
            report.left.append(f"{concepts_dir / folder} (a memory of {name!r} for a version no longer restored)")
    for name, (folder, record) in concepts.items():
        reason = _damage(concepts_dir / folder, record)
        if reason:
            report.damaged[name] = reason
    report.restored = sorted(concepts)
    report.memories = len(attached)
    return concepts, attached, report


def _read_record(directory: Path) -> dict | None:
    path = directory / _RECORD_FILE
    if not path.exists():
        return None
    with open(path, "rb") as f:
        record = json.loads(f.read().decode("utf-8"))
    if not isinstance(record, dict) or record.get("kind") not in ("concept", "memory"):
        raise ValueError("not a record the store writes")
    record["name"] = validate_name(record.get("name"))
    needed = (("model", str), ("model_fingerprint", str), ("memory_tokens", int), ("updated", (int, float))) \
        if record["kind"] == "memory" else \
        (("category", str), ("keywords", list), ("fingerprint", dict), ("memory_tokens", int),
         ("model_fingerprint", str), ("created", (int, float)), ("updated", (int, float)), ("extra", dict),
         ("n_images", int))
    for key, kind in needed:
        if not isinstance(record.get(key), kind):
            raise ValueError(f"its {key!r} is missing or of the wrong type")
    return record


def _legacy_record(directory: Path) -> dict | None:
    """A record for a folder written before records existed, when it holds a whole concept."""
    pictures = 0
    while _reference_file(directory, pictures).is_file():
        pictures += 1
    if not pictures or not (directory / _MEMORY_FILE).is_file():
        return None
    try:
        memory = _read_memory(directory / _MEMORY_FILE)
    except (OSError, ValueError, RuntimeError, SafetensorError):
        memory = {}
    tokens = memory.get("memory")
    stamp = os.stat(directory).st_mtime
    return {"kind": "concept", "name": f"recovered {directory.name[:8]}", "category": "", "keywords": [],
            "fingerprint": {}, "fingerprint_complete": None,
            "memory_tokens": int(tokens.shape[0]) if tokens is not None and tokens.dim() == 2 else 0,
            # No model is known: the memory is rebuilt from the pictures for whichever model loads.
            "model_fingerprint": "", "created": stamp, "updated": stamp, "extra": {"recovered": True},
            "n_images": pictures}


def _damage(directory: Path, record: dict) -> str | None:
    try:
        _read_memory(directory / _MEMORY_FILE)
        _check_pictures_present(directory, record["n_images"])
    except FileNotFoundError as e:
        return f"one of its files is missing ({e})"
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        return str(e)
    return None


def _write_index(path: Path, concepts: dict, memories: dict) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    os.close(fd)
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            _create_tables(conn, 0)
            for name, (folder, record) in concepts.items():
                conn.execute(
                    f"INSERT INTO concepts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, record["category"], _json(record["keywords"]), _json(record["fingerprint"]),
                     record.get("fingerprint_complete"), record["memory_tokens"], record["model_fingerprint"],
                     float(record["created"]), float(record["updated"]), _json(record["extra"]), folder,
                     record["n_images"]))
            for (name, model), (folder, record) in memories.items():
                conn.execute(
                    "INSERT INTO memories (name, model, model_fingerprint, memory_tokens, dir, updated) "
                    "VALUES (?,?,?,?,?,?)",
                    (name, model, record["model_fingerprint"], record["memory_tokens"], folder,
                     float(record["updated"])))
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        _fsync_file(path)
    except BaseException:
        _remove_own_file(path)
        raise


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _move_aside(index: Path) -> Path | None:
    """Rename the old index (and its log files, which belong to it) to a dated name; never delete it."""
    if not index.exists() and not index.with_name(index.name + "-wal").exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = index.with_name(f"{index.name}.damaged-{stamp}")
    n = 1
    while kept.exists():
        kept = index.with_name(f"{index.name}.damaged-{stamp}-{n}")
        n += 1
    for suffix in ("-wal", "-shm", "-journal", ""):
        source = index.with_name(index.name + suffix)
        if source.exists():
            os.rename(source, kept.with_name(kept.name + suffix))
    return kept


def _remove_own_file(path: Path) -> None:
    """Remove a file only this module names (a half-written rebuild); never through a link."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise PersonalVLMError(f"{path} is not a file the repair wrote; move it away and repair again")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
