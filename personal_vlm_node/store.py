"""Concept store: the user's taught objects, kept on disk so they survive restarts.

Layout under ``root`` (default ``$XDG_DATA_HOME/personal_vlm``)::

    concepts.db                SQLite index (WAL), one row per concept
    concepts/<uuid hex>/       one directory per concept *version*
        memory.safetensors     the concept memory, tensors stored verbatim
        ref_0.jpg, ref_1.png   the reference pictures, kept to rebuild the memory: the photo's own
                               file when it came encoded (JPEG/PNG/WebP), else a PNG
    concepts/<uuid hex>/       or a memory of the concept for another model: memory.safetensors only
    tmp/<uuid hex>/            a version being written
    store.lock                 serialises writers across processes

A concept's row points at the version it was taught with (its pictures and that model's memory).
The ``memories`` table holds the concept's memories for other models, one per concept and model,
each in a directory of its own: a node on one model and a command on another never overwrite each
other's memories, and each uses only its own model's. Precision is not part of that key: a memory
built in float32 is cast for a model loaded in bfloat16 instead of being rebuilt.

Every file is private to the user (0600 in 0700 folders, whatever the umask), and SQLite's
``secure_delete`` overwrites what a forget removes from the index.

A version directory is never modified after it is published: ``add`` and ``replace_memory``
write a fresh one under ``tmp/``, fsync it, rename it into ``concepts/`` and only then point the
row at it in one SQLite transaction. The row is the commit point, so after a crash at any instant
a concept is either wholly present (row + all its files) or wholly absent. Directories left
behind by a crash (a ``tmp/`` entry, or a published directory whose transaction never committed,
or an old version whose removal was interrupted) are referenced by no row and are removed the
next time a store is opened.

Names are user text and are never used in paths; directories are named by random uuids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load, save

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.images import ENCODED_INFO
from personal_vlm_node.names import MAX_NAME_CHARS, validate_category, validate_name

try:
    import fcntl
except ImportError:  # not POSIX: writers in one process are still serialised by the thread lock
    fcntl = None

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_DB_FILE = "concepts.db"
_LOCK_FILE = "store.lock"
_MEMORY_FILE = "memory.safetensors"

_FILE_MODE = 0o600
_DIR_MODE = 0o700

# Encoded photos kept as they came, by format.
_SUFFIXES = {"JPEG": ".jpg", "WEBP": ".webp", "PNG": ".png"}

# Modes the PNG writer stores losslessly.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}

_COLUMNS = (
    "name, category, keywords, fingerprint, fingerprint_complete, memory_tokens, "
    "model_fingerprint, created, updated, extra, dir, n_images"
)


def model_key(fingerprint: str) -> str:
    """The part of a model fingerprint that a memory depends on: everything but the precision.

    Adapters write ``family|model id|revision|dtype|d<hidden size>``; a memory made in one dtype
    is cast for the same model in another. Other fingerprint strings are compared whole.
    """
    parts = fingerprint.split("|")
    if len(parts) == 5 and parts[3] in _DTYPE_NAMES:
        return "|".join(parts[:3] + parts[4:])
    return fingerprint


_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64"}


class MemoryMissing(PersonalVLMError):
    """The concept exists but has no memory built for the asked model (rebuild it or report it)."""


def default_store_dir() -> Path:
    """``$XDG_DATA_HOME/personal_vlm``, or ``~/.local/share/personal_vlm`` when it is unset."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "personal_vlm"


@dataclass
class ConceptRecord:
    name: str
    category: str
    keywords: list[str]
    fingerprint: dict  # R2P attributes + description; {} until the background pass completes it
    fingerprint_complete: float | None  # unix time the fingerprint was completed, None if pending
    memory_tokens: int  # K_c, total over all reference images
    model_fingerprint: str  # backbone/revision/dtype/layers the memory was built with
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # method-specific JSON (ROIs, timings, ...)


class ConceptStore:
    """SQLite index + one immutable directory per concept version. Safe to share across threads."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self._db_path = self.root / _DB_FILE
        self._concepts_dir = self.root / "concepts"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        try:
            for directory in (self.root, self._concepts_dir, self._tmp_dir):
                directory.mkdir(parents=True, exist_ok=True)
                _make_private(directory, _DIR_MODE)
            # Created before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self._db_path, os.O_RDWR | os.O_CREAT, _FILE_MODE))
            _make_private(self._db_path, _FILE_MODE)
        except OSError as e:
            raise PersonalVLMError(
                f"cannot create the concept store in {self.root} ({e}); set store_dir to a writable folder"
            ) from e
        with self._mutating():
            self._init_schema()
            self._collect_garbage()

    # ------------------------------------------------------------------ writes

    def add(
        self,
        record: ConceptRecord,
        memory: dict[str, torch.Tensor],
        images: list[Image.Image],
        overwrite: bool = False,
    ) -> ConceptRecord:
        """Store a new concept (or, with ``overwrite``, replace one) with its memory and pictures."""
        name = validate_name(record.name)
        if not images:
            raise PersonalVLMError(
                f"concept {name!r} needs at least one reference picture; teach it with a photo of the object"
            )
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"reference pictures must be PIL images, got {type(image).__name__}")
        _check_memory(memory)
        keywords = _encode_json(_check_keywords(record.keywords), "keywords")
        fingerprint = _encode_json(_check_dict(record.fingerprint, "fingerprint"), "fingerprint")
        extra = _encode_json(_check_dict(record.extra, "extra"), "extra")
        if not isinstance(record.category, str):
            raise TypeError(f"category must be a str, got {type(record.category).__name__}")
        validate_category(record.category)

        with self._mutating():
            with self._connect() as conn:
                if not overwrite and _dir_of(conn, name) is not None:
                    raise _exists_error(name)
            version = self._publish_version(name, memory, images=images)
            now = time.time()
            values = (
                record.category, keywords, fingerprint, record.fingerprint_complete,
                int(record.memory_tokens), record.model_fingerprint, float(record.created), now,
                extra, version, len(images),
            )
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    # Checked again inside the transaction: another writer may have added the name
                    # since the check above (e.g. a process on a system without file locks).
                    old = _dir_of(conn, name)
                    if old is not None and not overwrite:
                        conn.execute("ROLLBACK")
                        raise _exists_error(name)
                    others = _other_memory_dirs(conn, name)
                    conn.execute("DELETE FROM memories WHERE name=?", (name,))
                    if old is None:
                        conn.execute(
                            f"INSERT INTO concepts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (name, *values),
                        )
                    else:
                        conn.execute(
                            "UPDATE concepts SET category=?, keywords=?, fingerprint=?, "
                            "fingerprint_complete=?, memory_tokens=?, model_fingerprint=?, created=?, "
                            "updated=?, extra=?, dir=?, n_images=? WHERE name=?",
                            (*values, name),
                        )
                    conn.execute("COMMIT")
                    stored = _fetch(conn, name)
            except BaseException:
                self._discard_unless_referenced(version)
                raise
            for directory in ([old] if old is not None else []) + others:
                _remove(self._concepts_dir / directory)
        return stored

    def update_fingerprint(
        self, name: str, fingerprint: dict, keywords: list[str] | None = None,
        expected_created: float | None = None,
    ) -> ConceptRecord:
        """Record the completed fingerprint (and optionally new keywords) of a concept.

        With ``expected_created``, only the version created at that time is updated (checked in
        the same transaction): a fingerprint computed for a concept that was re-taught meanwhile
        raises instead of landing on the new version.
        """
        name = validate_name(name)
        fingerprint_json = _encode_json(_check_dict(fingerprint, "fingerprint"), "fingerprint")
        keywords_json = None if keywords is None else _encode_json(_check_keywords(keywords), "keywords")
        with self._mutating(), self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            cursor = conn.execute(
                "UPDATE concepts SET fingerprint=?, fingerprint_complete=?, updated=?, "
                "keywords=COALESCE(?, keywords) WHERE name=? AND (? IS NULL OR created=?)",
                (fingerprint_json, now, now, keywords_json, name, expected_created, expected_created),
            )
            if cursor.rowcount == 0:
                conn.execute("ROLLBACK")
                if expected_created is not None and _fetch_row(conn, name) is not None:
                    raise PersonalVLMError(f"concept {name!r} was replaced while its fingerprint was computed")
                raise self._missing_error(conn, name)
            conn.execute("COMMIT")
            return _fetch(conn, name)

    def replace_memory(
        self,
        name: str,
        memory: dict[str, torch.Tensor],
        model_fingerprint: str,
        memory_tokens: int,
        extra: dict | None = None,
    ) -> ConceptRecord:
        """Store a memory rebuilt from the stored reference pictures for ``model_fingerprint``.

        For the model the concept was taught with, the concept's version is replaced (pictures
        kept; keys of ``extra`` overwrite the stored ones, other stored keys such as ROIs stay).
        For another model, the memory is kept beside it, replacing only that model's previous one.
        """
        name = validate_name(name)
        _check_memory(memory)
        with self._mutating():
            with self._connect() as conn:
                row = _fetch_row(conn, name)
                if row is None:
                    raise self._missing_error(conn, name)
            if model_key(row["model_fingerprint"]) != model_key(model_fingerprint):
                return self._put_other_memory(row, memory, model_fingerprint, memory_tokens)
            old = row["dir"]
            merged = dict(_decode_json(row["extra"], name, "extra"))
            merged.update(_check_dict(extra if extra is not None else {}, "extra"))
            extra_json = _encode_json(merged, "extra")
            sources = [_reference_file(self._concepts_dir / old, i) for i in range(row["n_images"])]
            for source in sources:
                if not source.is_file():
                    raise _damaged_error(name, f"its reference picture {source.name} is missing")
            version = self._publish_version(name, memory, image_files=sources)
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    cursor = conn.execute(
                        "UPDATE concepts SET dir=?, model_fingerprint=?, memory_tokens=?, extra=?, "
                        "updated=? WHERE name=? AND dir=?",
                        (version, model_fingerprint, int(memory_tokens), extra_json, time.time(), name, old),
                    )
                    if cursor.rowcount == 0:
                        conn.execute("ROLLBACK")
                        raise PersonalVLMError(
                            f"concept {name!r} was changed by another program while its memory was "
                            "rebuilt; try again"
                        )
                    conn.execute("COMMIT")
                    stored = _fetch(conn, name)
            except BaseException:
                self._discard_unless_referenced(version)
                raise
            _remove(self._concepts_dir / old)
        return stored

    def _put_other_memory(self, row, memory, model_fingerprint: str, memory_tokens: int) -> ConceptRecord:
        name, key = row["name"], model_key(model_fingerprint)
        version = self._publish_version(name, memory)
        try:
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                if _dir_of(conn, name) != row["dir"]:
                    conn.execute("ROLLBACK")
                    raise PersonalVLMError(
                        f"concept {name!r} was changed by another program while its memory was rebuilt; try again"
                    )
                previous = conn.execute(
                    "SELECT dir FROM memories WHERE name=? AND model=?", (name, key)).fetchone()
                conn.execute(
                    "INSERT OR REPLACE INTO memories (name, model, model_fingerprint, memory_tokens, dir, updated) "
                    "VALUES (?,?,?,?,?,?)",
                    (name, key, model_fingerprint, int(memory_tokens), version, time.time()),
                )
                conn.execute("COMMIT")
                stored = _fetch(conn, name)
        except BaseException:
            self._discard_unless_referenced(version)
            raise
        if previous is not None:
            _remove(self._concepts_dir / previous[0])
        return stored

    def forget(self, name: str) -> None:
        """Delete the concept: its row, its memories and its reference pictures."""
        name = validate_name(name)
        with self._mutating():
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                old = _dir_of(conn, name)
                if old is None:
                    conn.execute("ROLLBACK")
                    raise self._missing_error(conn, name)
                others = _other_memory_dirs(conn, name)
                conn.execute("DELETE FROM memories WHERE name=?", (name,))
                conn.execute("DELETE FROM concepts WHERE name=?", (name,))
                conn.execute("COMMIT")
            # A crash before this completes leaves unreferenced directories, removed on next open.
            for directory in [old, *others]:
                _remove(self._concepts_dir / directory)

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> ConceptRecord:
        name = validate_name(name)
        with self._connect() as conn:
            row = _fetch_row(conn, name)
            if row is None:
                raise self._missing_error(conn, name)
        return _record_from_row(row)

    def __contains__(self, name: object) -> bool:
        try:
            name = validate_name(name)
        except PersonalVLMError:
            return False
        with self._connect() as conn:
            return _dir_of(conn, name) is not None

    def names(self) -> list[str]:
        with self._connect() as conn:
            return sorted(row[0] for row in conn.execute("SELECT name FROM concepts"))

    def list(self) -> list[ConceptRecord]:
        """All readable records, sorted by name. A damaged row is logged and left out."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM concepts").fetchall()
        records = []
        for row in sorted(rows, key=lambda r: r["name"]):
            try:
                records.append(_record_from_row(row))
            except PersonalVLMError as e:
                logger.warning("%s", e)
        return records

    def __len__(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM concepts").fetchone()[0]

    def load_memory(self, name: str, model: str | None = None) -> dict[str, torch.Tensor]:
        """The concept memory exactly as it was stored, on CPU.

        ``model`` (a model fingerprint) asks for the memory built for that model, in any precision;
        MemoryMissing when there is none. Without it: the memory of the model it was taught with.
        """
        name = validate_name(name)
        read = lambda directory, n_images: _read_memory(directory / _MEMORY_FILE)  # noqa: E731
        return self._read_version(name, read, model)

    def has_memory(self, name: str, model: str) -> bool:
        """Whether the concept has a memory built for ``model`` (a fingerprint; precision ignored)."""
        return validate_name(name) in self.memory_versions(model)

    def memory_versions(self, model: str) -> dict[str, str]:
        """Concept name → an id of its memory for ``model``, for every concept that has one.

        The id changes whenever that memory is replaced: comparing two calls tells what to reload.
        """
        key = model_key(model)
        with self._connect() as conn:
            rows = conn.execute("SELECT name, model_fingerprint, dir FROM concepts").fetchall()
            others = dict(conn.execute("SELECT name, dir FROM memories WHERE model=?", (key,)).fetchall())
        versions = {}
        for row in rows:
            if model_key(row["model_fingerprint"]) == key:
                versions[row["name"]] = row["dir"]
            elif row["name"] in others:
                versions[row["name"]] = others[row["name"]]
        return versions

    def watch(self) -> StoreWatcher:
        """A cheap check for commits by any other connection: this process's or another's."""
        return StoreWatcher(self._db_path)

    def load_images(self, name: str) -> list[Image.Image]:
        """The reference pictures as stored (PNG-compatible modes), fully loaded in memory."""
        name = validate_name(name)
        return self._read_version(
            name, lambda directory, n_images: [_read_picture(_reference_file(directory, i)) for i in range(n_images)]
        )

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per call: threads never share a connection, and WAL lets
        # readers proceed while a writer holds the lock.
        try:
            conn = sqlite3.connect(self._db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise PersonalVLMError(f"cannot open the concept index {self._db_path} ({e})") from e
        try:
            conn.row_factory = sqlite3.Row
            # FULL: a commit must be durable before the previous version's files are deleted.
            conn.execute("PRAGMA synchronous=FULL")
            # A forgotten concept's name and description must not linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive access for writers: threads of this process and other processes on this root."""
        with self._lock:
            if fcntl is None:
                yield
                return
            fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # also releases the flock

    def _init_schema(self) -> None:
        try:
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    conn.execute("ROLLBACK")
                    raise PersonalVLMError(
                        f"the concept store in {self.root} was written by a newer personal_vlm_node "
                        f"(store format {version}, this version reads up to {SCHEMA_VERSION}); "
                        "upgrade personal_vlm_node or set store_dir to another folder"
                    )
                if version == 0:
                    conn.execute(
                        """CREATE TABLE IF NOT EXISTS concepts (
                            name TEXT PRIMARY KEY NOT NULL,
                            category TEXT NOT NULL,
                            keywords TEXT NOT NULL,
                            fingerprint TEXT NOT NULL,
                            fingerprint_complete REAL,
                            memory_tokens INTEGER NOT NULL,
                            model_fingerprint TEXT NOT NULL,
                            created REAL NOT NULL,
                            updated REAL NOT NULL,
                            extra TEXT NOT NULL,
                            dir TEXT NOT NULL UNIQUE,
                            n_images INTEGER NOT NULL
                        )"""
                    )
                if version < 2:
                    # Format 2: memories for other models than the one a concept was taught with.
                    conn.execute(
                        """CREATE TABLE IF NOT EXISTS memories (
                            name TEXT NOT NULL,
                            model TEXT NOT NULL,
                            model_fingerprint TEXT NOT NULL,
                            memory_tokens INTEGER NOT NULL,
                            dir TEXT NOT NULL UNIQUE,
                            updated REAL NOT NULL,
                            PRIMARY KEY (name, model)
                        )"""
                    )
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise PersonalVLMError(
                f"the concept index {self._db_path} is unreadable ({e}); move the folder "
                f"{self.root} aside and teach your concepts again"
            ) from e

    def _collect_garbage(self) -> None:
        """Remove directories no row references: interrupted writes and interrupted deletes."""
        for entry in self._tmp_dir.iterdir():
            _remove(entry)
        with self._connect() as conn:
            referenced = {row[0] for row in conn.execute("SELECT dir FROM concepts UNION SELECT dir FROM memories")}
        for entry in self._concepts_dir.iterdir():
            if entry.name not in referenced:
                logger.info("removing %s, left by an interrupted write or delete", entry)
                _remove(entry)

    def _publish_version(
        self,
        name: str,
        memory: dict[str, torch.Tensor],
        images: list[Image.Image] | None = None,
        image_files: list[Path] | None = None,
    ) -> str:
        """Write a complete, durable version directory into ``concepts/``; return its name.

        No row references it yet, so until the caller commits, a crash leaves only garbage.
        """
        version = uuid.uuid4().hex
        staging = self._tmp_dir / version
        try:
            staging.mkdir(mode=_DIR_MODE)
            _make_private(staging, _DIR_MODE)
            _write_memory(staging / _MEMORY_FILE, memory)
            for i, image in enumerate(images or []):
                encoded = image.info.get(ENCODED_INFO)
                if encoded is not None and encoded[1] in _SUFFIXES:
                    _write_bytes(staging / f"ref_{i}{_SUFFIXES[encoded[1]]}", encoded[0])
                else:
                    _write_png(staging / f"ref_{i}.png", image)
            for i, source in enumerate(image_files or []):
                _copy_file(source, staging / f"ref_{i}{source.suffix}")
            _fsync_dir(staging)
            os.rename(staging, self._concepts_dir / version)
            _fsync_dir(self._concepts_dir)
            _fsync_dir(self._tmp_dir)
        except BaseException as e:
            _remove(staging)
            _remove(self._concepts_dir / version)
            if isinstance(e, OSError):
                raise PersonalVLMError(
                    f"could not save concept {name!r} in {self.root} ({e}); free some disk space "
                    "or set store_dir to a writable folder"
                ) from e
            raise
        return version

    def _discard_unless_referenced(self, version: str) -> None:
        """Remove a published version whose transaction failed, unless the commit did land."""
        try:
            with self._connect() as conn:
                row = conn.execute(
                    "SELECT 1 FROM concepts WHERE dir=? UNION SELECT 1 FROM memories WHERE dir=?",
                    (version, version)).fetchone()
        except (sqlite3.Error, PersonalVLMError):
            return  # unknown: leave it; the next open removes it if no row references it
        if row is None:
            _remove(self._concepts_dir / version)

    def _read_version(self, name: str, read, model: str | None = None):
        # A concurrent overwrite, rebuild or forget may delete the directory between reading the
        # row and reading the files; then the row points elsewhere (or is gone) and the read is
        # retried.
        for _ in range(5):
            with self._connect() as conn:
                row = _fetch_row(conn, name)
                if row is None:
                    raise self._missing_error(conn, name)
                directory_name = self._version_for(conn, row, model)
            directory = self._concepts_dir / directory_name
            try:
                return read(directory, row["n_images"])
            except (OSError, ValueError, RuntimeError, SafetensorError, SyntaxError,
                    Image.DecompressionBombError) as e:
                error = e
            with self._connect() as conn:
                row = _fetch_row(conn, name)
                if row is None:
                    raise self._missing_error(conn, name)
                if self._version_for(conn, row, model) == directory_name:
                    break
        if not directory.is_dir():
            reason = f"its folder {directory} is missing"
        elif isinstance(error, FileNotFoundError):
            reason = f"one of its files is missing ({error})"
        else:
            reason = f"its files cannot be read ({error})"
        raise _damaged_error(name, reason) from error

    @staticmethod
    def _version_for(conn: sqlite3.Connection, row: sqlite3.Row, model: str | None) -> str:
        if model is None or model_key(row["model_fingerprint"]) == model_key(model):
            return row["dir"]
        other = conn.execute("SELECT dir FROM memories WHERE name=? AND model=?",
                             (row["name"], model_key(model))).fetchone()
        if other is None:
            raise MemoryMissing(
                f"concept {row['name']!r} has no memory for this model (it was taught with "
                f"{row['model_fingerprint']}); it is rebuilt from its pictures when the model loads, "
                "or teach it again"
            )
        return other[0]

    def _missing_error(self, conn: sqlite3.Connection, name: str) -> PersonalVLMError:
        known = sorted(row[0] for row in conn.execute("SELECT name FROM concepts"))
        if not known:
            hint = "no concepts are taught yet"
        else:
            shown = ", ".join(repr(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
            hint = f"known concepts: {shown}"
        return PersonalVLMError(f"no concept named {name!r}; teach it first ({hint})")


# ---------------------------------------------------------------------- helpers (pure or file I/O)


def _exists_error(name: str) -> PersonalVLMError:
    return PersonalVLMError(f"a concept named {name!r} already exists; pass overwrite to replace it")


def _damaged_error(name: str, reason: str) -> PersonalVLMError:
    return PersonalVLMError(
        f"concept {name!r} is damaged: {reason}; forget it and teach it again"
    )


class StoreWatcher:
    """Tells whether the index changed since the previous call, from one long-lived connection.

    SQLite's ``PRAGMA data_version`` changes when another connection (of any process) commits; one
    query on an open connection costs microseconds, so it can be polled often, off the frame path.
    Use it from one thread at a time.
    """

    def __init__(self, db_path: Path):
        self._conn = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._version = self._read()

    def _read(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def changed(self) -> bool:
        version = self._read()
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        self._conn.close()


def _other_memory_dirs(conn: sqlite3.Connection, name: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT dir FROM memories WHERE name=?", (name,))]


def _make_private(path: Path, mode: int) -> None:
    """Set ``mode`` on a path this user owns (an existing store made under another umask too)."""
    try:
        if (os.stat(path).st_mode & 0o777) != mode:
            os.chmod(path, mode)
    except PermissionError as e:
        logger.warning("could not make %s private (%s)", path, e)


def _dir_of(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT dir FROM concepts WHERE name=?", (name,)).fetchone()
    return None if row is None else row[0]


def _fetch_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute(f"SELECT {_COLUMNS} FROM concepts WHERE name=?", (name,)).fetchone()


def _fetch(conn: sqlite3.Connection, name: str) -> ConceptRecord:
    return _record_from_row(_fetch_row(conn, name))


def _record_from_row(row: sqlite3.Row) -> ConceptRecord:
    name = row["name"]
    return ConceptRecord(
        name=name,
        category=row["category"],
        keywords=_decode_json(row["keywords"], name, "keywords"),
        fingerprint=_decode_json(row["fingerprint"], name, "fingerprint"),
        fingerprint_complete=row["fingerprint_complete"],
        memory_tokens=row["memory_tokens"],
        model_fingerprint=row["model_fingerprint"],
        created=row["created"],
        updated=row["updated"],
        extra=_decode_json(row["extra"], name, "extra"),
    )


def _encode_json(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _decode_json(text: str, name: str, what: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise _damaged_error(name, f"its {what} in the index cannot be read ({e})") from e


def _check_dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _check_keywords(keywords) -> list[str]:
    if not isinstance(keywords, (list, tuple)) or not all(isinstance(k, str) for k in keywords):
        raise TypeError(f"keywords must be a list of str, got {keywords!r}")
    return list(keywords)


def _check_memory(memory) -> None:
    if not isinstance(memory, dict):
        raise TypeError(f"memory must be a dict of tensors, got {type(memory).__name__}")
    for key, value in memory.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"memory must map str to torch.Tensor, got {key!r}: {type(value).__name__}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a directory's entries (new files, renames) durable. POSIX only; elsewhere a directory
    # cannot be opened and the filesystem gives no such guarantee to ask for.
    if os.name == "posix":
        _fsync_file(path)


def _write_memory(path: Path, memory: dict[str, torch.Tensor]) -> None:
    tensors = {}
    seen_storages = set()
    for key, value in memory.items():
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (views of one buffer); give those their own.
        storage = value.untyped_storage().data_ptr()
        if storage in seen_storages and value.numel() > 0:
            value = value.clone()
        seen_storages.add(storage)
        tensors[key] = value
    _write_bytes(path, save(tensors))


def _read_memory(path: Path) -> dict[str, torch.Tensor]:
    # Read whole through one open file: loading by path would reopen the file after a concurrent
    # forget removed it, and fail with a raw RuntimeError instead of a retry.
    with open(path, "rb") as f:
        data = f.read()
    return load(data)


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _png_ready(image: Image.Image) -> Image.Image:
    """The image in a mode PNG can hold, converting only what PNG cannot store."""
    if image.mode in _PNG_MODES:
        return image
    if image.mode == "F" or image.mode.startswith("I"):
        # 32-bit integer / float / other 16-bit layouts: keep 16-bit precision when the values
        # fit, otherwise fall back to 8-bit (Pillow clips).
        as_int = image.convert("I")
        low, high = as_int.getextrema()
        return as_int.convert("I;16") if low >= 0 and high <= 65535 else image.convert("L")
    if "A" in image.getbands() or "a" in image.getbands():
        return image.convert("RGBA")
    return image.convert("RGB")


def _write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    _png_ready(image).save(buffer, format="PNG")
    _write_bytes(path, buffer.getvalue())


def _reference_file(directory: Path, i: int) -> Path:
    """Reference picture ``i`` of a version: whichever of its kept formats is there."""
    for suffix in (".png", *_SUFFIXES.values()):
        candidate = directory / f"ref_{i}{suffix}"
        if candidate.is_file():
            return candidate
    return directory / f"ref_{i}.png"


def _read_picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        # A kept photo is upright as the user saw it when taught (ROIs are in that frame).
        upright = ImageOps.exif_transpose(image)
        return upright if upright is not image else image.copy()


def _copy_file(source: Path, target: Path) -> None:
    _write_bytes(target, source.read_bytes())


def _remove(path: Path) -> None:
    """Best-effort removal; anything left is unreferenced and removed on the next open."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("could not remove %s (%s)", path, e)
