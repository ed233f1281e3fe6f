"""The SQLite index: connections, the tables of each format, the pending protocol's rows, and rows as records."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path


from .layout import SCHEMA_VERSION
from .records import ConceptRecord
from .errors import _damaged_error, _index_error


_COLUMNS = (
    "name, category, keywords, fingerprint, fingerprint_complete, memory_tokens, "
    "model_fingerprint, created, updated, extra, dir, n_images"
)


_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))


_JSON_COLUMNS = {"keywords", "fingerprint", "extra"}


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


def _memory_record(name: str, model: str, model_identity: str, memory_tokens: int, updated: float,
                   concept_dir: str) -> dict:
    return {"kind": "memory", "format": SCHEMA_VERSION, "name": name, "model": model,
            "model_fingerprint": model_identity, "memory_tokens": int(memory_tokens), "updated": updated,
            "concept_dir": concept_dir}


def _other_memory_dirs(conn: sqlite3.Connection, name: str) -> list[str]:
    return [row[0] for row in conn.execute("SELECT dir FROM memories WHERE name=?", (name,))]


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
        model_identity=row["model_fingerprint"],
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


def _checked_concept(record, memory, images) -> tuple[str, str, str, str]:
    """What every backend checks before it stores a new concept: (name, keywords, fingerprint and
    extra as JSON); PersonalVLMError or TypeError, before anything is written."""
    from PIL import Image

    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.names import validate_category, validate_name
    from .files import _check_memory

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
    return name, keywords, fingerprint, extra


def _refuse_lookalike(conn, name: str) -> None:
    """A new ``name`` that looks like an existing concept's is refused: "мug" beside "mug" would be
    two concepts no one can tell apart in a list. (The query suits sqlite3 and psycopg alike.)"""
    from personal_vlm_node.names import find_lookalike, lookalike_error

    lookalike = find_lookalike(name, [row[0] for row in conn.execute("SELECT name FROM concepts")])
    if lookalike is not None:
        raise lookalike_error(name, lookalike)
