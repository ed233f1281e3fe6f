"""Concept store: the user's taught objects, kept on disk so they survive restarts.

Layout under ``root`` (default ``$XDG_DATA_HOME/personal_vlm``)::

    personal_vlm_store.json    marker: this folder is a concept store (written first, never removed)
    concepts.db                SQLite index (WAL), one row per concept
    concepts/<uuid hex>/       one directory per concept *version*
        memory.safetensors     the concept memory, tensors stored verbatim
        ref_0.jpg, ref_1.png   the reference pictures, kept to rebuild the memory: the photo's own
                               file when it came encoded (JPEG/PNG/WebP), else a PNG
        record.json            the concept's row as of its latest change: with the files beside
                               it, everything ``repair`` needs to rebuild a lost index
    concepts/<uuid hex>/       or a memory of the concept for another model: memory.safetensors
                               and a record.json naming the concept and the model
    tmp/<uuid hex>/            a version being written
    store.lock                 serialises writers across processes

A concept's row points at the version it was taught with (its pictures and that model's memory).
The ``memories`` table holds the concept's memories for other models, one per concept and model,
each in a directory of its own: a node on one model and a command on another never overwrite each
other's memories, and each uses only its own model's. Precision is not part of that key: a memory
built in float32 is cast for a model loaded in bfloat16 instead of being rebuilt.

Every file is private to the user (0600 in 0700 folders, whatever the umask), SQLite's
``secure_delete`` overwrites what a forget removes from the index, and a forget checkpoints the
write-ahead log so the forgotten text does not wait there for the last connection to close.

The store only ever deletes what it wrote. A folder is a store when it holds the marker (or, for
stores written before markers, an index of this format); any other non-empty folder is refused,
and so is a store whose ``concepts/``, ``tmp/`` or index is a symbolic link. A store whose index is
missing or empty while concept folders exist is refused too, with a pointer to ``personal-vlm
store repair`` (:mod:`personal_vlm_node.repair`), which rebuilds the index from the folders.

A version's memory and pictures are never modified after it is published: ``add`` and
``replace_memory`` first record the new directory's name in the index's ``pending`` table, write it
under ``tmp/``, fsync it, rename it into ``concepts/`` and only then point the row at it in one
SQLite transaction, which also records the replaced directories as pending deletion. The row is
the commit point, so after a crash at any instant a concept is either wholly present (row + all
its files) or wholly absent. Garbage collection, when a store is opened, removes exactly the
``pending`` entries no row references, and in them only the files the store writes: a folder the
index does not know is never touched, whatever its name.

Names are user text and are never used in paths; directories are named by random uuids.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
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
from personal_vlm_node.names import (MAX_NAME_CHARS, find_lookalike, lookalike_error, quoted, validate_category,
                                     validate_name)

try:
    import fcntl
except ImportError:  # not POSIX: writers in one process are still serialised by the thread lock
    fcntl = None

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3

_DB_FILE = "concepts.db"
_LOCK_FILE = "store.lock"
_MEMORY_FILE = "memory.safetensors"
_RECORD_FILE = "record.json"
_MARKER_FILE = "personal_vlm_store.json"
_MARKER_FORMAT = "personal_vlm_node concept store"
_STORE_DIRS = {"concepts", "tmp"}
# Everything a store keeps at its top level; a folder holding anything else is not a store.
_STORE_ENTRIES = _STORE_DIRS | {_DB_FILE, _DB_FILE + "-wal", _DB_FILE + "-shm", _DB_FILE + "-journal",
                                _LOCK_FILE, _MARKER_FILE}
_VERSION_NAME = re.compile(r"^[0-9a-f]{32}$")
# The only files the store writes in a version directory, and so the only ones it removes.
_OWN_FILE = re.compile(r"^(memory\.safetensors|record\.json(\.tmp)?|ref_[0-9]+\.(png|jpg|webp))$")

# SQLite's primary result codes (the low byte of sqlite3.Error.sqlite_errorcode).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26

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
_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))
_JSON_COLUMNS = {"keywords", "fingerprint", "extra"}


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


@dataclass
class ForgetResult:
    """What a forget removed: the concept is gone from the index whatever ``left_behind`` says."""

    name: str
    left_behind: list[str] = field(default_factory=list)  # "path (reason)" for each folder not removed

    @property
    def message(self) -> str:
        if not self.left_behind:
            return f"forgot {quoted(self.name)}"
        return (f"forgot {quoted(self.name)}, but could not remove {'; '.join(self.left_behind)}: remove it by hand "
                "(the store retries each time it is opened)")


class ConceptStore:
    """SQLite index + one directory per concept version. Safe to share across threads.

    ``read_only`` is True when the folder cannot be written (permissions, an immutable folder, a
    read-only file system): every read works, and a write raises one line saying why.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self._db_path = self.root / _DB_FILE
        self._concepts_dir = self.root / "concepts"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self.read_only = False
        self._checkpoint_due = False
        self._open()

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        kind = identify_folder(self.root)
        if kind == "new":
            self._create()
            return
        self.read_only = not _can_write(self.root)
        version = self._index_version()
        if version <= 0 and self._has_versions():
            raise _lost_index_error(self.root, "empty" if self._db_path.exists() else "missing")
        if version > SCHEMA_VERSION:
            raise PersonalVLMError(
                f"the concept store in {self.root} was written by a newer personal_vlm_node "
                f"(store format {version}, this version reads up to {SCHEMA_VERSION}); "
                "upgrade personal_vlm_node or set store_dir to another folder"
            )
        if self.read_only:
            if version <= 0:
                raise PersonalVLMError(
                    f"the concept store in {self.root} has no index yet and this user cannot write there to "
                    "create one: check the folder's permissions, or set store_dir to a writable folder"
                )
            if version < 2:
                raise PersonalVLMError(
                    f"the concept store in {self.root} is read-only and in an older format ({version}) that "
                    "must be upgraded once: open it once with write access"
                )
            logger.info("the concept store in %s is read-only: concepts can be used, not taught or forgotten",
                        self.root)
            return
        with self._mutating():
            for directory in (self._concepts_dir, self._tmp_dir):
                if not directory.is_dir():
                    self._make_dir(directory)
            if version < SCHEMA_VERSION:
                self._migrate(max(version, 0))
            if kind == "unmarked":
                _write_marker(self.root)
            self._collect_garbage()

    def _create(self) -> None:
        """A new store in a missing or empty folder: the marker first, so a crash midway still
        leaves a folder recognisable as this store's."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _make_private(self.root, _DIR_MODE)
            _write_marker(self.root)
            for directory in (self._concepts_dir, self._tmp_dir):
                directory.mkdir(exist_ok=True)
                _make_private(directory, _DIR_MODE)
        except OSError as e:
            raise _os_error(e, f"cannot create the concept store in {self.root}") from e
        with self._mutating():
            self._migrate(0)

    def _make_dir(self, directory: Path) -> None:
        try:
            directory.mkdir(mode=_DIR_MODE, exist_ok=True)
            _make_private(directory, _DIR_MODE)
        except OSError as e:
            raise _os_error(e, f"cannot create {directory}") from e

    def _index_version(self) -> int:
        """The index's format: -1 missing or zero bytes, 0 holding no concept table, else its version."""
        # An index is never empty once created (switching it to WAL writes its header), so an
        # empty file is a lost index, whatever log file lies beside it.
        if _file_size(self._db_path) == 0:
            return -1
        with self._connect() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return version if "concepts" in tables else 0

    def _has_versions(self) -> bool:
        return _has_version_dirs(self._concepts_dir)

    def _migrate(self, version: int) -> None:
        """Bring the index from format ``version`` to :data:`SCHEMA_VERSION` in one transaction."""
        if version == 0:
            # Created before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
            try:
                os.close(os.open(self._db_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE))
            except OSError as e:
                raise _os_error(e, f"cannot create the concept index {self._db_path}") from e
            _make_private(self._db_path, _FILE_MODE)
        with self._connect() as conn:
            if version == 0:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            _create_tables(conn, version)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        if 0 < version < 3:
            self._backfill_records()

    def _backfill_records(self) -> None:
        """Give every version of a store written before format 3 its record.json, so that a lost
        index can be rebuilt from the folders from now on."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM concepts").fetchall()
            others = conn.execute("SELECT name, model, model_fingerprint, memory_tokens, dir, updated "
                                  "FROM memories").fetchall()
        concept_dirs = {}
        for row in rows:
            concept_dirs[row["name"]] = row["dir"]
            directory = self._concepts_dir / row["dir"]
            if directory.is_dir() and not (directory / _RECORD_FILE).exists():
                _write_record_file(directory, _row_record(row))
        for row in others:
            directory = self._concepts_dir / row["dir"]
            if directory.is_dir() and not (directory / _RECORD_FILE).exists():
                _write_record_file(directory, _memory_record(
                    row["name"], row["model"], row["model_fingerprint"], row["memory_tokens"], row["updated"],
                    concept_dirs.get(row["name"], "")))

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
                if _dir_of(conn, name) is not None:
                    if not overwrite:
                        raise _exists_error(name)
                else:
                    # "мug" beside "mug" would be two concepts no one can tell apart in a list.
                    lookalike = find_lookalike(name, [row[0] for row in conn.execute("SELECT name FROM concepts")])
                    if lookalike is not None:
                        raise lookalike_error(name, lookalike)
            now = time.time()
            values = (
                record.category, keywords, fingerprint, record.fingerprint_complete,
                int(record.memory_tokens), record.model_fingerprint, float(record.created), now,
                extra, len(images),
            )
            stored_record = _row_record(dict(zip(_COLUMN_NAMES, (name, *values[:-1], "", len(images)))))
            version = self._publish_version(name, memory, stored_record, images=images)
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    # Checked again inside the transaction: another writer may have added the name
                    # since the check above (e.g. a process on a system without file locks).
                    old = _dir_of(conn, name)
                    if old is not None and not overwrite:
                        conn.execute("ROLLBACK")
                        raise _exists_error(name)
                    replaced = ([old] if old is not None else []) + _other_memory_dirs(conn, name)
                    conn.execute("DELETE FROM memories WHERE name=?", (name,))
                    if old is None:
                        conn.execute(
                            f"INSERT INTO concepts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (name, *values[:-1], version, values[-1]),
                        )
                    else:
                        conn.execute(
                            "UPDATE concepts SET category=?, keywords=?, fingerprint=?, "
                            "fingerprint_complete=?, memory_tokens=?, model_fingerprint=?, created=?, "
                            "updated=?, extra=?, n_images=?, dir=? WHERE name=?",
                            (*values, version, name),
                        )
                    _settle_pending(conn, version, replaced)
                    conn.execute("COMMIT")
                    stored = _fetch(conn, name)
            except BaseException:
                self._discard_unless_referenced(version)
                raise
            self._remove_pending(replaced)
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
        with self._mutating():
            with self._connect() as conn:
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
                row = _fetch_row(conn, name)
            # The index is the truth; the folder's copy only has to be good enough for a repair.
            try:
                _write_record_file(self._concepts_dir / row["dir"], _row_record(row))
            except OSError as e:
                logger.warning("could not update the record file of %r (%s); a repair of the index would "
                               "restore it without its fingerprint", name, e)
            return _record_from_row(row)

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
            now = time.time()
            stored_record = {**_row_record(row), "model_fingerprint": model_fingerprint,
                             "memory_tokens": int(memory_tokens), "extra": merged, "updated": now}
            version = self._publish_version(name, memory, stored_record, image_files=sources)
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    cursor = conn.execute(
                        "UPDATE concepts SET dir=?, model_fingerprint=?, memory_tokens=?, extra=?, "
                        "updated=? WHERE name=? AND dir=?",
                        (version, model_fingerprint, int(memory_tokens), extra_json, now, name, old),
                    )
                    if cursor.rowcount == 0:
                        conn.execute("ROLLBACK")
                        raise PersonalVLMError(
                            f"concept {name!r} was changed by another program while its memory was "
                            "rebuilt; try again"
                        )
                    _settle_pending(conn, version, [old])
                    conn.execute("COMMIT")
                    stored = _fetch(conn, name)
            except BaseException:
                self._discard_unless_referenced(version)
                raise
            self._remove_pending([old])
        return stored

    def _put_other_memory(self, row, memory, model_fingerprint: str, memory_tokens: int) -> ConceptRecord:
        name, key = row["name"], model_key(model_fingerprint)
        now = time.time()
        version = self._publish_version(
            name, memory, _memory_record(name, key, model_fingerprint, int(memory_tokens), now, row["dir"]))
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
                    (name, key, model_fingerprint, int(memory_tokens), version, now),
                )
                replaced = [] if previous is None else [previous[0]]
                _settle_pending(conn, version, replaced)
                conn.execute("COMMIT")
                stored = _fetch(conn, name)
        except BaseException:
            self._discard_unless_referenced(version)
            raise
        self._remove_pending(replaced)
        return stored

    def forget(self, name: str) -> ForgetResult:
        """Delete the concept: its row, its memories and its reference pictures.

        The index forgets at once (and its write-ahead log is checkpointed so the name does not
        linger there); a folder that cannot be removed is named in the result, stays recorded as
        pending deletion and is retried whenever the store is opened.
        """
        name = validate_name(name)
        with self._mutating():
            with self._connect() as conn:
                conn.execute("BEGIN IMMEDIATE")
                old = _dir_of(conn, name)
                if old is None:
                    conn.execute("ROLLBACK")
                    raise self._missing_error(conn, name)
                directories = [old, *_other_memory_dirs(conn, name)]
                conn.execute("DELETE FROM memories WHERE name=?", (name,))
                conn.execute("DELETE FROM concepts WHERE name=?", (name,))
                _settle_pending(conn, None, directories)
                conn.execute("COMMIT")
            # A crash before this completes leaves the folders recorded as pending: the next open removes them.
            left = self._remove_pending(directories)
            self._checkpoint_due = True
            self._checkpoint()
        return ForgetResult(name, left)

    # ------------------------------------------------------------------ reads

    def check_new_name(self, name: str) -> str:
        """``name`` as it would be stored; PersonalVLMError when it is invalid or is a different
        name that looks like an existing concept's (the check ``add`` makes, before any work)."""
        name = validate_name(name)
        with self._connect() as conn:
            known = [row[0] for row in conn.execute("SELECT name FROM concepts")]
        lookalike = None if name in known else find_lookalike(name, known)
        if lookalike is not None:
            raise lookalike_error(name, lookalike)
        return name

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
        """All readable records, sorted by name. A damaged row is logged and left out (see :meth:`problems`)."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM concepts").fetchall()
        records = []
        for row in sorted(rows, key=lambda r: r["name"]):
            try:
                records.append(_record_from_row(row))
            except PersonalVLMError as e:
                logger.warning("%s", e)
        return records

    def problems(self) -> dict[str, str]:
        """Concept name → why it is damaged, for every concept whose row or files cannot be used.

        Reads every memory and checks every picture's presence: a full check, for ``list`` and
        ``repair``, not for the frame path.
        """
        found = {}
        for name in self.names():
            try:
                self.get(name)
                self.load_memory(name)
                self._read_version(name, _check_pictures_present)
            except PersonalVLMError as e:
                found[name] = _reason_of(e)
        return found

    def __len__(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM concepts").fetchone()[0]

    def load_memory(self, name: str, model: str | None = None) -> dict[str, torch.Tensor]:
        """The concept memory exactly as it was stored, on CPU.

        ``model`` (a model fingerprint) asks for the memory built for that model, in any precision;
        MemoryMissing when there is none. Without it: the memory of the model it was taught with.
        A memory holding NaN or infinite values is damage, reported like a truncated file.
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
        return StoreWatcher(self._db_path, read_only=self.read_only)

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
        # readers proceed while a writer holds the lock. Every SQLite error, raised while
        # connecting or by the caller's statements, leaves as a PersonalVLMError naming its cause.
        try:
            conn = _open_index(self._db_path, self.read_only)
            try:
                conn.execute("PRAGMA user_version").fetchone()
            except sqlite3.OperationalError as e:
                if not self._may_read_as_is(e):
                    raise
                conn.close()
                conn = _open_index(self._db_path, read_only=True, as_is=True)
        except sqlite3.Error as e:
            raise _index_error(e, self.root) from e
        try:
            conn.row_factory = sqlite3.Row
            # FULL: a commit must be durable before the previous version's files are deleted.
            conn.execute("PRAGMA synchronous=FULL")
            # A forgotten concept's name and description must not linger in free pages.
            conn.execute("PRAGMA secure_delete=ON")
            yield conn
        except sqlite3.Error as e:
            raise _index_error(e, self.root) from e
        finally:
            conn.close()

    def _may_read_as_is(self, error: sqlite3.OperationalError) -> bool:
        """Whether a connection that failed to start may read the index file as it is on disk.

        Reading a WAL index needs its shared-memory file (32 KiB), which a full disk cannot hold.
        When no log is waiting to be copied in, the index file alone holds every commit, and
        nobody can commit while the disk is full: reading it as it is gives what is stored.
        """
        code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
        log = self._db_path.with_name(_DB_FILE + "-wal")
        return code in (_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN) and _disk_nearly_full(self.root) \
            and _file_size(log) == 0

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive access for writers: threads of this process and other processes on this root."""
        if self.read_only:
            raise PersonalVLMError(
                f"the concept store in {self.root} is read-only (this user cannot write to it); concepts can "
                "be listed and recognised but not taught or forgotten: check the folder's permissions, or "
                "set store_dir to a writable folder"
            )
        with self._lock:
            if fcntl is None:
                yield
                return
            try:
                fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE)
            except OSError as e:
                raise _os_error(e, f"cannot lock the concept store in {self.root}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # also releases the flock

    def _collect_garbage(self) -> None:
        """Finish what interrupted writes and deletes left: remove the pending directories no row
        references (and only those: a folder the index does not know is never removed)."""
        with self._connect() as conn:
            pending = [row[0] for row in conn.execute(
                "SELECT dir FROM pending WHERE dir NOT IN (SELECT dir FROM concepts UNION SELECT dir FROM memories)")]
            stale = conn.execute(
                "SELECT COUNT(*) FROM pending WHERE dir IN (SELECT dir FROM concepts UNION SELECT dir FROM memories)"
            ).fetchone()[0]
            if stale:     # a referenced directory is no garbage, whatever a pending row says
                conn.execute("DELETE FROM pending WHERE dir IN (SELECT dir FROM concepts UNION SELECT dir FROM memories)")
        if pending:
            logger.info("removing %d folder(s) left by an interrupted write or delete", len(pending))
            for problem in self._remove_pending(pending):
                logger.warning("could not remove %s; it is retried the next time the store is opened", problem)
            self._checkpoint()

    def _remove_pending(self, directories: list[str]) -> list[str]:
        """Remove pending directories (their staging copy in tmp/ too); forget those removed.

        Returns "path (reason)" for each one that could not be removed completely.
        """
        problems, done = [], []
        for directory in directories:
            left = [p for p in (_remove_version(self._tmp_dir / directory), _remove_version(self._concepts_dir / directory))
                    if p]
            if left:
                problems.extend(left)
            else:
                done.append(directory)
        if done:
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany("DELETE FROM pending WHERE dir=?", [(d,) for d in done])
                    conn.execute("COMMIT")
            except PersonalVLMError as e:   # the files are gone; the rows are cleared at the next open
                logger.warning("%s", e)
        return problems

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the index and empty it, so a forgotten concept's text is
        only in the index file, where secure_delete has overwritten it."""
        if not self._checkpoint_due:
            return
        try:
            with self._connect() as conn:
                for _ in range(20):
                    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if not busy:
                        self._checkpoint_due = False
                        return
                    time.sleep(0.05)
        except PersonalVLMError as e:
            logger.warning("could not checkpoint the concept index (%s)", e)
            return
        # A reader in the middle of a long read holds the log; the next write tries again.
        logger.warning("the concept index's write-ahead log could not be emptied (a reader holds it); "
                       "forgotten text stays there until the next write or until every program closes the store")

    def _publish_version(
        self,
        name: str,
        memory: dict[str, torch.Tensor],
        record: dict,
        images: list[Image.Image] | None = None,
        image_files: list[Path] | None = None,
    ) -> str:
        """Write a complete, durable version directory into ``concepts/``; return its name.

        Its name is recorded as pending first, so that whatever a crash leaves of it is known to
        be the store's; no row references it yet, so until the caller commits it is garbage.
        """
        version = uuid.uuid4().hex
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO pending (dir, since) VALUES (?, ?)", (version, time.time()))
            conn.execute("COMMIT")
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
            _write_bytes(staging / _RECORD_FILE, _record_bytes(record))
            _fsync_dir(staging)
            os.rename(staging, self._concepts_dir / version)
            _fsync_dir(self._concepts_dir)
            _fsync_dir(self._tmp_dir)
        except BaseException as e:
            self._discard_unless_referenced(version)
            if isinstance(e, OSError):
                raise _os_error(e, f"could not save concept {name!r} in {self.root}") from e
            raise
        return version

    def _discard_unless_referenced(self, version: str) -> None:
        """Remove a published version whose transaction failed, unless the commit did land."""
        try:
            with self._connect() as conn:
                row = conn.execute(
                    "SELECT 1 FROM concepts WHERE dir=? UNION SELECT 1 FROM memories WHERE dir=?",
                    (version, version)).fetchone()
        except PersonalVLMError:
            return  # unknown: leave it; it is pending, and the next open removes it if no row references it
        if row is None:
            self._remove_pending([version])

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
        elif isinstance(error, _NonFinite):
            reason = str(error)
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
        lookalike = find_lookalike(name, known)
        if lookalike is not None:
            return PersonalVLMError(f"no concept named {quoted(name)}; did you mean {quoted(lookalike)}? "
                                    "(the names differ only in characters that look alike)")
        if not known:
            hint = "no concepts are taught yet"
        else:
            listed = ", ".join(quoted(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
            hint = f"known concepts: {listed}"
        return PersonalVLMError(f"no concept named {quoted(name)}; teach it first ({hint})")


# ---------------------------------------------------------------------- what a folder is


def identify_folder(root: Path) -> str:
    """What ``root`` is: "new" (missing or empty), "store" (marked) or "unmarked" (a store written
    before markers). Raises PersonalVLMError, changing nothing, for anything else."""
    try:
        info = os.stat(root)     # a symlinked root is the user's choice of where the store lives
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise _os_error(e, f"cannot open the concept store folder {root}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise PersonalVLMError(f"the concept store {root} is a file, not a folder; set store_dir to a folder")
    try:
        entries = set(os.listdir(root))
    except OSError as e:
        raise _os_error(e, f"cannot read the concept store folder {root}") from e
    for entry in sorted(entries & _STORE_ENTRIES):
        path = root / entry
        if path.is_symlink():
            raise PersonalVLMError(
                f"{path} is a symbolic link; a concept store never follows links inside its folder (they "
                "would let it change files elsewhere): put the folder or file itself there"
            )
        is_dir = path.is_dir()
        if (entry in _STORE_DIRS) != is_dir:
            raise PersonalVLMError(
                f"{path} is a {'folder' if is_dir else 'file'} where a concept store keeps a "
                f"{'file' if is_dir else 'folder'}; {root} is not a concept store: set store_dir to an empty "
                "or new folder"
            )
    if _MARKER_FILE in entries:
        _check_marker(root)
        return "store"
    if not entries:
        return "new"
    foreign = sorted(entries - _STORE_ENTRIES)
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PersonalVLMError(
            f"{root} is not a concept store: it holds files personal_vlm_node did not write ({shown}); "
            "nothing was changed: set store_dir (--store) to an empty or new folder"
        )
    if _has_version_dirs(root / "concepts") and not _is_index(root / _DB_FILE):
        raise _lost_index_error(root, "missing or empty")
    if _is_index(root / _DB_FILE):
        return "unmarked"
    if _DB_FILE not in entries and all(_is_empty(root / entry) for entry in entries):
        return "new"         # a creation interrupted before anything was stored
    raise PersonalVLMError(
        f"{root} is not a concept store: its {', '.join(sorted(entries))} were not written by personal_vlm_node; "
        "nothing was changed: set store_dir (--store) to an empty or new folder"
    )


def _is_index(path: Path) -> bool:
    """Whether ``path`` is an SQLite file holding this store's concept table (read without writing)."""
    if _file_size(path) == 0:
        return False
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return False
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='concepts'").fetchone() is not None
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return False


def _is_empty(path: Path) -> bool:
    try:
        return not any(os.scandir(path)) if path.is_dir() else path.stat().st_size == 0
    except OSError:
        return False


def _has_version_dirs(concepts_dir: Path) -> bool:
    try:
        with os.scandir(concepts_dir) as entries:
            return any(_VERSION_NAME.match(e.name) and e.is_dir(follow_symlinks=False) for e in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise _os_error(e, f"cannot read {concepts_dir}") from e


def _write_marker(root: Path) -> None:
    _write_bytes(root / _MARKER_FILE, (json.dumps(
        {"format": _MARKER_FORMAT, "version": SCHEMA_VERSION, "created": time.time()}) + "\n").encode())
    _fsync_dir(root)


def _check_marker(root: Path) -> None:
    path = root / _MARKER_FILE
    try:
        with open(path, "rb") as f:
            content = json.loads(f.read(4096) or b"null")
    except OSError as e:
        raise _os_error(e, f"cannot read {path}") from e
    except ValueError:
        content = None
    if not isinstance(content, dict) or content.get("format") != _MARKER_FORMAT:
        raise PersonalVLMError(
            f"{path} is not a concept store's marker (its content is not the one personal_vlm_node writes); "
            f"nothing was changed: set store_dir to an empty or new folder"
        )


def _lost_index_error(root: Path, how: str) -> PersonalVLMError:
    return PersonalVLMError(
        f"the concept index {root / _DB_FILE} is {how} but {root / 'concepts'} holds concepts; nothing was "
        f"changed: run 'personal-vlm --store {root} store repair' to rebuild the index from the concept folders"
    )


def _can_write(root: Path) -> bool:
    """Whether this process can write in ``root``: tried, since permission bits do not tell about
    an immutable folder, a read-only mount or a root user."""
    # access() sees an immutable folder and a read-only mount (not a root user's mode bits: root
    # may write there, and does); SQLite must be able to create its log files beside the index.
    for path in (root, root / "concepts", root / "tmp", root / _DB_FILE):
        if path.exists() and not os.access(path, os.W_OK):
            return False
    probe = root / _LOCK_FILE
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise _os_error(e, f"cannot open the concept store in {root}") from e
    os.close(fd)
    return True


# ---------------------------------------------------------------------- errors, by cause


def _index_error(error: sqlite3.Error, root: Path) -> PersonalVLMError:
    """One line for an SQLite error, naming its real cause and what to do about it."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    index = root / _DB_FILE
    if code == _SQLITE_FULL or (code in (_SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN)
                                and _disk_nearly_full(root)):
        # On a full disk SQLite's own words vary ("disk I/O error", "readonly database" when the
        # index could only be read as it is): the cause is the free space, said as such.
        return PersonalVLMError(
            f"the disk holding the concept store {root} is full ({_free_space(root)} free); nothing was "
            "changed: free some space and try again"
        )
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return PersonalVLMError(
            f"the concept index {index} is damaged ({error}); the concepts' folders are intact: run "
            f"'personal-vlm --store {root} store repair' to rebuild the index from them"
        )
    if code in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_AUTH) or (code == _SQLITE_CANTOPEN and root.is_dir()):
        return PersonalVLMError(
            f"cannot use the concept index {index} ({error}): this user may not write there (permissions, an "
            "immutable folder or a read-only disk); check them, or set store_dir to a writable folder"
        )
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return PersonalVLMError(
            f"the concept index {index} stayed locked by another program for 30 s ({error}); try again"
        )
    if code == _SQLITE_IOERR:
        return PersonalVLMError(
            f"the disk reported an error on the concept index {index} ({error}); check the disk (dmesg) and try again"
        )
    return PersonalVLMError(f"the concept index {index} cannot be used ({error})")


def _os_error(error: OSError, doing: str) -> PersonalVLMError:
    """One line for a failed file operation: ``doing``, then the real cause and the right advice."""
    number = error.errno
    if number in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full (or the user's quota used up): free some space and try again"
    elif number in (errno.EACCES, errno.EPERM):
        advice = ("permission denied: the folder is read-only, immutable or another user's; check its permissions, "
                  "or set store_dir to a writable folder")
    elif number == errno.EROFS:
        advice = "the file system is mounted read-only; set store_dir to a writable folder"
    elif number == errno.EIO:
        advice = "the disk reported an I/O error; check the disk (dmesg)"
    else:
        advice = "set store_dir to a writable folder if this persists"
    where = f" ({error.filename})" if error.filename else ""
    return PersonalVLMError(f"{doing}: {error.strerror or error}{where}; {advice}")


def _free_space(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free // 1024} KiB"
    except OSError:
        return "unknown space"


def _disk_nearly_full(root: Path) -> bool:
    try:
        return shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


def _reason_of(error: PersonalVLMError) -> str:
    """A damage message's reason part: what follows "is damaged: " when there is one."""
    text = str(error)
    marker = " is damaged: "
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.rsplit("; forget it and teach it again", 1)[0]
    return text


# ---------------------------------------------------------------------- helpers (pure or file I/O)


def _exists_error(name: str) -> PersonalVLMError:
    return PersonalVLMError(f"a concept named {quoted(name)} already exists; pass overwrite to replace it")


def _damaged_error(name: str, reason: str) -> PersonalVLMError:
    return PersonalVLMError(
        f"concept {quoted(name)} is damaged: {reason}; forget it and teach it again"
    )


class StoreWatcher:
    """Tells whether the index changed since the previous call, from one long-lived connection.

    SQLite's ``PRAGMA data_version`` changes when another connection (of any process) commits; one
    query on an open connection costs microseconds, so it can be polled often, off the frame path.
    Use it from one thread at a time.
    """

    def __init__(self, db_path: Path, read_only: bool = False):
        try:
            self._conn = _open_index(db_path, read_only)
            self._version = self._read()
        except sqlite3.Error as e:
            raise _index_error(e, db_path.parent) from e

    def _read(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def changed(self) -> bool:
        version = self._read()
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        self._conn.close()


def _open_index(path: Path, read_only: bool, as_is: bool = False) -> sqlite3.Connection:
    if as_is:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=30.0,
                               isolation_level=None, check_same_thread=False)
    if not read_only:
        return sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    # A folder this user cannot write: SQLite cannot create the log's shared-memory file there, so
    # when it is not there already the index is read as it is on disk (immutable), which is what a
    # folder nobody can write holds.
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=30.0, isolation_level=None,
                               check_same_thread=False)


def _create_tables(conn: sqlite3.Connection, version: int) -> None:
    """The tables of every format after ``version``, in the caller's transaction."""
    if version < 1:
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
    if version < 3:
        # Format 3: the directories the store is writing or deleting, so that garbage collection
        # removes exactly those and nothing it did not write.
        conn.execute("CREATE TABLE IF NOT EXISTS pending (dir TEXT PRIMARY KEY NOT NULL, since REAL NOT NULL)")


def _settle_pending(conn: sqlite3.Connection, published: str | None, replaced: list[str]) -> None:
    """In the commit's transaction: the published directory is no longer pending, the replaced ones are."""
    if published is not None:
        conn.execute("DELETE FROM pending WHERE dir=?", (published,))
    now = time.time()
    conn.executemany("INSERT OR REPLACE INTO pending (dir, since) VALUES (?, ?)", [(d, now) for d in replaced])


def _remove_version(path: Path) -> str | None:
    """Remove a version directory the store wrote: only the files it writes there, never through a
    link. Returns "path (reason)" when something is left, None when the directory is gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} ({e.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} (not a folder the store wrote; left as it is)"
    strangers = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if _OWN_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                else:
                    strangers.append(entry.name)
        if strangers:
            return f"{path} (it holds files the store did not write: {', '.join(sorted(strangers)[:3])})"
        os.rmdir(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} ({e.strerror})"
    return None


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode("utf-8")


def _write_record_file(directory: Path, record: dict) -> None:
    """Replace ``directory``'s record.json atomically (a crash leaves the old one or the new one)."""
    target = directory / _RECORD_FILE
    staging = directory / (_RECORD_FILE + ".tmp")
    _write_bytes(staging, _record_bytes(record))
    os.rename(staging, target)
    _fsync_dir(directory)


def _row_record(row) -> dict:
    """A concept row as record.json keeps it (JSON columns decoded, the directory left out)."""
    record = {"kind": "concept", "format": SCHEMA_VERSION}
    for column in _COLUMN_NAMES:
        if column == "dir":
            continue
        value = row[column]
        if column in _JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        record[column] = value
    return record


def _memory_record(name: str, model: str, model_fingerprint: str, memory_tokens: int, updated: float,
                   concept_dir: str) -> dict:
    return {"kind": "memory", "format": SCHEMA_VERSION, "name": name, "model": model,
            "model_fingerprint": model_fingerprint, "memory_tokens": int(memory_tokens), "updated": updated,
            "concept_dir": concept_dir}


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _check_pictures_present(directory: Path, n_images: int) -> None:
    for i in range(n_images):
        if not _reference_file(directory, i).is_file():
            raise FileNotFoundError(errno.ENOENT, "reference picture missing", str(directory / f"ref_{i}"))


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
        # Stored, it would be reported as damage at every load: refused before anything is written.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise PersonalVLMError(
                f"the memory's {key!r} holds NaN or infinite values, so it was not stored: the model produced "
                "them (in float16 an overflow can); try dtype bfloat16 or float32")


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


class _NonFinite(ValueError):
    """A memory file that reads but holds NaN or infinite values: damage, not a memory."""


def _read_memory(path: Path) -> dict[str, torch.Tensor]:
    # Read whole through one open file: loading by path would reopen the file after a concurrent
    # forget removed it, and fail with a raw RuntimeError instead of a retry.
    with open(path, "rb") as f:
        data = f.read()
    tensors = load(data)
    for key, value in tensors.items():
        # A flipped bit can make a NaN that would spread through every score it enters.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _NonFinite(f"its memory holds NaN or infinite values (tensor {key!r} in {path.name})")
    return tensors


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _FILE_MODE)
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
