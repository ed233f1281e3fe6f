"""ConceptStore: the concepts of one local store folder (SQLite index + one folder per version)."""

from __future__ import annotations

import logging
import time

import torch
from PIL import Image

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import validate_name
from . import files as _files
from .layout import _MEMORY_FILE
from .records import ConceptRecord, ForgetResult, model_key
from .errors import _damaged_error, _exists_error, _reason_of
from .files import _check_memory, _check_pictures_present, _read_picture, _reference_file, _write_record_file
from .index import (StoreWatcher, _COLUMNS, _COLUMN_NAMES, _check_dict, _check_keywords, _decode_json, _dir_of,
                    _encode_json, _fetch, _fetch_row, _memory_record, _other_memory_dirs, _record_from_row,
                    _refuse_lookalike, _row_record, _settle_pending, _checked_concept)
from .library import ConceptLibrary
from .versions import VersionFolders

logger = logging.getLogger("personal_vlm_node.store")


class ConceptStore(VersionFolders, ConceptLibrary):
    """SQLite index + one directory per concept version. Safe to share across threads.

    ``read_only`` is True when the folder cannot be written (permissions, an immutable folder, a
    read-only file system): every read works, and a write raises one line saying why.
    """

    def location(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------ writes

    def add(
        self,
        record: ConceptRecord,
        memory: dict[str, torch.Tensor],
        images: list[Image.Image],
        overwrite: bool = False,
    ) -> ConceptRecord:
        """Store a new concept (or, with ``overwrite``, replace one) with its memory and pictures."""
        name, keywords, fingerprint, extra = _checked_concept(record, memory, images)

        with self._mutating():
            with self._connect() as conn:
                if _dir_of(conn, name) is not None:
                    if not overwrite:
                        raise _exists_error(name)
                else:
                    _refuse_lookalike(conn, name)
            now = time.time()
            values = (
                record.category, keywords, fingerprint, record.fingerprint_complete,
                int(record.memory_tokens), record.model_identity, float(record.created), now,
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
        model_identity: str,
        memory_tokens: int,
        extra: dict | None = None,
    ) -> ConceptRecord:
        """Store a memory rebuilt from the stored reference pictures for ``model_identity``.

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
            if model_key(row["model_fingerprint"]) != model_key(model_identity):
                return self._put_other_memory(row, memory, model_identity, memory_tokens)
            old = row["dir"]
            merged = dict(_decode_json(row["extra"], name, "extra"))
            merged.update(_check_dict(extra if extra is not None else {}, "extra"))
            extra_json = _encode_json(merged, "extra")
            sources = [_reference_file(self._concepts_dir / old, i) for i in range(row["n_images"])]
            for source in sources:
                if not source.is_file():
                    raise _damaged_error(name, f"its reference picture {source.name} is missing")
            now = time.time()
            stored_record = {**_row_record(row), "model_fingerprint": model_identity,
                             "memory_tokens": int(memory_tokens), "extra": merged, "updated": now}
            version = self._publish_version(name, memory, stored_record, image_files=sources)
            try:
                with self._connect() as conn:
                    conn.execute("BEGIN IMMEDIATE")
                    cursor = conn.execute(
                        "UPDATE concepts SET dir=?, model_fingerprint=?, memory_tokens=?, extra=?, "
                        "updated=? WHERE name=? AND dir=?",
                        (version, model_identity, int(memory_tokens), extra_json, now, name, old),
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

    def _put_other_memory(self, row, memory, model_identity: str, memory_tokens: int) -> ConceptRecord:
        name, key = row["name"], model_key(model_identity)
        now = time.time()
        version = self._publish_version(
            name, memory, _memory_record(name, key, model_identity, int(memory_tokens), now, row["dir"]))
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
                    (name, key, model_identity, int(memory_tokens), version, now),
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
            if _dir_of(conn, name) is None:
                _refuse_lookalike(conn, name)
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
        read = lambda directory, n_images: _files._read_memory(directory / _MEMORY_FILE)  # noqa: E731
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

    def memory_models(self, name: str) -> list[str]:
        """The model identities the concept has a memory for: the one it was taught with first."""
        name = validate_name(name)
        with self._connect() as conn:
            row = _fetch_row(conn, name)
            if row is None:
                raise self._missing_error(conn, name)
            others = [r[0] for r in conn.execute(
                "SELECT model_fingerprint FROM memories WHERE name=? ORDER BY model", (name,))]
        return [row["model_fingerprint"], *others]

    def watch(self) -> StoreWatcher:
        """A cheap check for commits by any other connection: this process's or another's."""
        return StoreWatcher(self._db_path, read_only=self.read_only)

    def load_images(self, name: str) -> list[Image.Image]:
        """The reference pictures as stored (PNG-compatible modes), fully loaded in memory."""
        name = validate_name(name)
        return self._read_version(
            name, lambda directory, n_images: [_read_picture(_reference_file(directory, i)) for i in range(n_images)]
        )

