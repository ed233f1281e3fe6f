"""The version-folder protocol under every concept operation (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from safetensors import SafetensorError

from personal_vlm_node.errors import PersonalVLMError
from . import files as _files
from .layout import SCHEMA_VERSION, _DB_FILE, _DIR_MODE, _FILE_MODE, _MEMORY_FILE, _RECORD_FILE
from .records import MemoryMissing, default_store_dir, model_key
from .errors import (_SQLITE_CANTOPEN, _SQLITE_FULL, _SQLITE_IOERR, _damaged_error, _disk_nearly_full,
                     _index_error, _lost_index_error, _missing_error, _os_error)
from .files import (_exclusive_lock, _NonFinite, _copy_file, _file_size, _fsync_dir, _make_private,
                    _record_bytes, _remove_version, _write_bytes, _write_memory, _write_record_file)
from .index import _COLUMNS, _create_tables, _fetch_row, _memory_record, _open_index, _row_record
from .folder import _can_write, _has_version_dirs, _write_marker, identify_folder

logger = logging.getLogger("personal_vlm_node.store")


class VersionFolders:
    """A store folder and its version protocol: opening (and refusing) a folder, the index's
    connections and writer lock, publishing a version folder, garbage collection of pending
    folders, and reading a version's files. :class:`ConceptStore` adds the concepts on top."""

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
        with self._lock, _exclusive_lock(self.root):
            yield

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
                if _files.kept_encoding(image) is not None:
                    data, suffix = _files._picture_bytes(image)
                    _write_bytes(staging / f"ref_{i}{suffix}", data)
                else:
                    _files._write_png(staging / f"ref_{i}.png", image)
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
        return _missing_error(name, [row[0] for row in conn.execute("SELECT name FROM concepts")])
