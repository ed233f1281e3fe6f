"""PostgresLibrary: one concept library for a fleet, on PostgreSQL + pgvector.

Chosen by a URL wherever a store is chosen (``--store``, the node's ``store_dir``, the launch
argument, ``Assistant.open``): ``postgresql://[user[:password]@]host[:port]/database[?options]``,
libpq's own URL, so everything libpq reads passes through: ``PGPASSWORD``, ``PGPASSFILE`` or
``passfile=`` (credentials out of the URL), ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``
(TLS), ``host=/socket/folder``. The password is never logged or shown: :meth:`location` and every
message name the library without it.

Tables: :mod:`personal_vlm_node.store.postgres_schema`. Every write is one transaction, taken
under one advisory lock (so the look-alike check and the insert cannot interleave with another
robot's) and bumps ``personal_vlm_state.generation``, the change counter every node's watcher
reads (:mod:`.postgres_watch`): each sees a teach or a forget at its next look. Every value —
names, categories, keywords, vectors — goes as a query parameter, never into the SQL's text.

Memories are kept per backbone (``memories.model`` is the model key, precision left out): a robot
with another VLM computes its own from the shared pictures, never uses another backbone's.

Offline: every read that succeeds refreshes a local cache of this process's backbone
(:mod:`personal_vlm_node.store.offline`); when the server cannot be reached the library serves
records and memories from it, :meth:`health` says so (the node's ``/diagnostics``), writes are
refused with one line, and reconnection is tried again with a backoff (0.5 s doubling to 5 s:
a robot is back within 5 s of its server).
Forget removes the concept's rows and pictures and vacuums the tables, so the deleted rows do not
wait on disk for autovacuum.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import torch
from PIL import Image

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import quoted, validate_name
from .errors import _damaged_error, _exists_error, _missing_error
from .files import _NonFinite, _check_memory, _memory_bytes, _memory_from_bytes, _picture_bytes
from .index import _check_dict, _check_keywords, _checked_concept, _encode_json, _refuse_lookalike
from .library import ConceptLibrary
from .offline import OfflineCache
from .postgres_connect import Connector, LibraryOffline
from .postgres_schema import WRITE_LOCK, ensure_pooled_index, pooled_vector, vector_literal
from .records import ConceptRecord, ForgetResult, MemoryMissing, model_key

logger = logging.getLogger("personal_vlm_node.store")

_RECORD_COLUMNS = ("name, category, keywords, fingerprint, fingerprint_complete, memory_tokens, "
                   "model_identity, created, updated, extra")


def _record(row) -> ConceptRecord:
    name, category, keywords, fingerprint, complete, tokens, identity, created, updated, extra = row
    return ConceptRecord(name=name, category=category, keywords=list(keywords), fingerprint=dict(fingerprint),
                         fingerprint_complete=complete, memory_tokens=int(tokens), model_identity=identity,
                         created=float(created), updated=float(updated), extra=dict(extra))


class PostgresLibrary(ConceptLibrary):
    """The concept library in a PostgreSQL database with pgvector. Safe to share across threads."""

    indexed = True               # nearest(): pgvector's HNSW index

    def __init__(self, url: str, cache_dir=None, connect_timeout: float = 5.0, start_offline: bool = False):
        """Opens the library, refusing (one line) an unreachable server, bad credentials, a
        database without pgvector or of a newer format. ``start_offline``: a server that cannot
        be reached is not refused when this machine has an offline copy of the library; the
        library then starts offline, from the copy, and connects when the server is back."""
        self._connector = Connector(url, connect_timeout=connect_timeout)
        self._lock = threading.RLock()
        self.cache = OfflineCache.for_library(self._connector.location, cache_dir)
        try:
            self._connector.open()
        except LibraryOffline as unreachable:
            if not (start_offline and self.cache.records):
                raise PersonalVLMError(unreachable.refusal) from None
            logger.warning("%s; starting from this machine's offline copy (%d concepts)", unreachable.refusal,
                           len(self.cache.records))

    # ------------------------------------------------------------------ plumbing

    def location(self) -> str:
        return self._connector.location

    def health(self) -> str | None:
        return self._connector.health(len(self.cache.records))

    def close(self) -> None:
        self._connector.close()

    def _run(self, work, offline=None):
        """``work(conn)`` on the shared connection; ``offline()`` answers instead when the server
        cannot be reached (writes pass None: they are refused)."""
        with self._lock:
            try:
                return self._connector.run(work)
            except LibraryOffline as lost:
                if offline is None:
                    raise PersonalVLMError(f"{lost}; nothing was written (teach and forget need the library: "
                                           "try again when it is back)") from None
                return offline()

    def _write(self, work):
        def transaction(conn):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                result = work(conn)
                conn.execute("UPDATE personal_vlm_state SET generation = generation + 1")
                return result
        return self._run(transaction)

    @staticmethod
    def _names(conn) -> list[str]:
        return [row[0] for row in conn.execute("SELECT name FROM concepts")]

    def _fetch(self, conn, name: str) -> ConceptRecord | None:
        row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM concepts WHERE name=%s", (name,)).fetchone()
        return None if row is None else _record(row)

    def _fetch_or_missing(self, conn, name: str) -> ConceptRecord:
        record = self._fetch(conn, name)
        if record is None:
            raise _missing_error(name, self._names(conn))
        return record

    @staticmethod
    def _put_memory(conn, name: str, memory: dict, identity: str, tokens: int, now: float) -> None:
        data = _memory_bytes(memory)
        vector = pooled_vector(memory)
        if vector is not None:
            ensure_pooled_index(conn, len(vector))
        conn.execute(
            "INSERT INTO memories (name, model, model_identity, memory_tokens, version, updated, data, dim, pooled) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector) "
            "ON CONFLICT (name, model) DO UPDATE SET model_identity=EXCLUDED.model_identity, "
            "memory_tokens=EXCLUDED.memory_tokens, version=EXCLUDED.version, updated=EXCLUDED.updated, "
            "data=EXCLUDED.data, dim=EXCLUDED.dim, pooled=EXCLUDED.pooled",
            (name, model_key(identity), identity, int(tokens), uuid.uuid4(), now, data,
             None if vector is None else len(vector), None if vector is None else vector_literal(vector)))

    # ------------------------------------------------------------------ writes

    def add(self, record: ConceptRecord, memory: dict[str, torch.Tensor], images: list[Image.Image],
            overwrite: bool = False) -> ConceptRecord:
        name, keywords, fingerprint, extra = _checked_concept(record, memory, images)
        pictures = [_picture_bytes(image) for image in images]

        def work(conn):
            exists = conn.execute("SELECT 1 FROM concepts WHERE name=%s", (name,)).fetchone() is not None
            if exists and not overwrite:
                raise _exists_error(name)
            if not exists:
                _refuse_lookalike(conn, name)
            # A re-taught concept starts afresh: other backbones' memories of the old pictures go too.
            conn.execute("DELETE FROM concepts WHERE name=%s", (name,))
            now = time.time()
            conn.execute(
                f"INSERT INTO concepts ({_RECORD_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (name, record.category, keywords, fingerprint, record.fingerprint_complete,
                 int(record.memory_tokens), record.model_identity, float(record.created), now, extra))
            for position, (data, suffix) in enumerate(pictures):
                conn.execute("INSERT INTO pictures (name, position, suffix, data) VALUES (%s,%s,%s,%s)",
                             (name, position, suffix, data))
            self._put_memory(conn, name, memory, record.model_identity, record.memory_tokens, now)
            return self._fetch(conn, name)
        stored = self._write(work)
        self.cache.put_record(stored)
        return stored

    def update_fingerprint(self, name: str, fingerprint: dict, keywords: list[str] | None = None,
                           expected_created: float | None = None) -> ConceptRecord:
        name = validate_name(name)
        fingerprint_json = _encode_json(_check_dict(fingerprint, "fingerprint"), "fingerprint")
        keywords_json = None if keywords is None else _encode_json(_check_keywords(keywords), "keywords")

        def work(conn):
            now = time.time()
            cursor = conn.execute(
                "UPDATE concepts SET fingerprint=%s, fingerprint_complete=%s, updated=%s, "
                "keywords=COALESCE(%s::jsonb, keywords) WHERE name=%s AND (%s::float8 IS NULL OR created=%s)",
                (fingerprint_json, now, now, keywords_json, name, expected_created, expected_created))
            if cursor.rowcount == 0:
                if expected_created is not None and self._fetch(conn, name) is not None:
                    raise PersonalVLMError(f"concept {name!r} was replaced while its fingerprint was computed")
                raise _missing_error(name, self._names(conn))
            return self._fetch(conn, name)
        stored = self._write(work)
        self.cache.put_record(stored)
        return stored

    def replace_memory(self, name: str, memory: dict[str, torch.Tensor], model_identity: str,
                       memory_tokens: int, extra: dict | None = None) -> ConceptRecord:
        name = validate_name(name)
        _check_memory(memory)
        extra = _check_dict(extra if extra is not None else {}, "extra")

        def work(conn):
            record = self._fetch_or_missing(conn, name)
            now = time.time()
            self._put_memory(conn, name, memory, model_identity, memory_tokens, now)
            if model_key(record.model_identity) == model_key(model_identity):
                merged = {**record.extra, **extra}
                conn.execute("UPDATE concepts SET model_identity=%s, memory_tokens=%s, extra=%s, updated=%s "
                             "WHERE name=%s", (model_identity, int(memory_tokens), _encode_json(merged, "extra"),
                                                now, name))
            return self._fetch(conn, name)
        stored = self._write(work)
        self.cache.put_record(stored)
        return stored

    def forget(self, name: str) -> ForgetResult:
        name = validate_name(name)

        def work(conn):
            if conn.execute("DELETE FROM concepts WHERE name=%s", (name,)).rowcount == 0:
                raise _missing_error(name, self._names(conn))
        self._write(work)
        self.cache.drop(name)
        left = []
        try:
            # The deleted rows (pictures among them) would stay in the table files until autovacuum.
            self._run(lambda conn: conn.execute("VACUUM concepts, pictures, memories"))
        except Exception as e:         # the forget itself is committed; say what was not done
            left.append(f"the deleted rows in {self.location()} ({e}; run VACUUM there)")
        return ForgetResult(name, left)

    # ------------------------------------------------------------------ reads

    def check_new_name(self, name: str) -> str:
        name = validate_name(name)

        def work(conn):
            if conn.execute("SELECT 1 FROM concepts WHERE name=%s", (name,)).fetchone() is None:
                _refuse_lookalike(conn, name)
            return name
        return self._run(work)

    def get(self, name: str) -> ConceptRecord:
        name = validate_name(name)

        def offline():
            if name in self.cache.records:
                return self.cache.records[name]
            raise _missing_error(name, list(self.cache.records))
        record = self._run(lambda conn: self._fetch_or_missing(conn, name), offline)
        return record

    def __contains__(self, name: object) -> bool:
        try:
            name = validate_name(name)
        except PersonalVLMError:
            return False
        return self._run(
            lambda conn: conn.execute("SELECT 1 FROM concepts WHERE name=%s", (name,)).fetchone() is not None,
            lambda: name in self.cache.records)

    def names(self) -> list[str]:
        return sorted(self._run(self._names, lambda: list(self.cache.records)))

    def list(self) -> list[ConceptRecord]:
        def work(conn):
            records = [_record(row) for row in conn.execute(f"SELECT {_RECORD_COLUMNS} FROM concepts")]
            self.cache.set_records(records)
            return records
        records = self._run(work, lambda: list(self.cache.records.values()))
        return sorted(records, key=lambda r: r.name)

    def problems(self) -> dict[str, str]:
        found = {}
        for name in self.names():
            try:
                self.get(name)
                self.load_memory(name)
            except PersonalVLMError as e:
                found[name] = str(e)
        return found

    def __len__(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT count(*) FROM concepts").fetchone()[0],
                         lambda: len(self.cache.records))

    def load_memory(self, name: str, model: str | None = None) -> dict[str, torch.Tensor]:
        name = validate_name(name)

        def work(conn):
            record = self._fetch_or_missing(conn, name)
            key = model_key(model if model is not None else record.model_identity)
            row = conn.execute("SELECT data, version FROM memories WHERE name=%s AND model=%s",
                               (name, key)).fetchone()
            if row is None:
                raise MemoryMissing(
                    f"concept {name!r} has no memory for this model (it was taught with {record.model_identity}); "
                    "it is rebuilt from its pictures when the model loads, or teach it again")
            try:
                memory = _memory_from_bytes(bytes(row[0]), "the library")
            except _NonFinite as e:
                raise _damaged_error(name, str(e)) from None
            except Exception as e:
                raise _damaged_error(name, f"its memory in the library cannot be read ({e})") from None
            self.cache.put_memory(key, name, str(row[1]), row[0])
            return memory

        def offline():
            key = model_key(model if model is not None else self.cache.records.get(name).model_identity) \
                if (model is not None or name in self.cache.records) else None
            memory = None if key is None else self.cache.memory(key, name)
            if memory is None:
                raise PersonalVLMError(f"concept {quoted(name)}'s memory is not in this robot's offline copy of "
                                       f"the library, and {self.location()} cannot be reached")
            return memory
        return self._run(work, offline)

    def has_memory(self, name: str, model: str) -> bool:
        return validate_name(name) in self.memory_versions(model)

    def memory_versions(self, model: str) -> dict[str, str]:
        key = model_key(model)

        def work(conn):
            versions = {name: str(version) for name, version in
                        conn.execute("SELECT name, version FROM memories WHERE model=%s", (key,))}
            self.cache.set_versions(key, versions)
            return versions
        return self._run(work, lambda: self.cache.versions(key))

    def memory_models(self, name: str) -> list[str]:
        """The model identities the concept has a memory for: the one it was taught with first."""
        name = validate_name(name)

        def work(conn):
            taught = self._fetch_or_missing(conn, name).model_identity
            others = [row[0] for row in conn.execute(
                "SELECT model_identity FROM memories WHERE name=%s AND model<>%s ORDER BY model",
                (name, model_key(taught)))]
            return [taught, *others]
        return self._run(work)

    def watch(self):
        from .postgres_watch import PostgresWatcher

        return PostgresWatcher(self._connector)

    def load_images(self, name: str) -> list[Image.Image]:
        import io

        name = validate_name(name)

        def work(conn):
            self._fetch_or_missing(conn, name)
            rows = conn.execute("SELECT data FROM pictures WHERE name=%s ORDER BY position", (name,)).fetchall()
            pictures = []
            for (data,) in rows:
                try:
                    with Image.open(io.BytesIO(bytes(data))) as image:
                        image.load()
                        pictures.append(image.copy())
                except Exception as e:
                    raise _damaged_error(name, f"a reference picture in the library cannot be read ({e})") from None
            return pictures
        return self._run(work)

    # ------------------------------------------------------------------ the prefilter in the database

    def nearest(self, model: str, queries: torch.Tensor, k: int) -> list[str]:
        """The concepts whose pooled vector is nearest (cosine) to any of ``queries`` (Q, D): for
        each query the ``k`` best by the HNSW index, then the ``k`` best of their union."""
        key, dim = model_key(model), int(queries.shape[1])
        literals = [vector_literal(q) for q in queries.to("cpu", torch.float32)]

        def work(conn):
            with conn.transaction():
                conn.execute("SET LOCAL hnsw.ef_search = %s" % max(40, int(k)))
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                rows = conn.execute(
                    f"SELECT name, min(distance) AS best FROM unnest(%s::text[]) AS q(v) CROSS JOIN LATERAL ("
                    f" SELECT name, pooled::vector({dim}) <=> q.v::vector({dim}) AS distance FROM memories"
                    f" WHERE dim = {dim} AND model = %s"
                    f" ORDER BY pooled::vector({dim}) <=> q.v::vector({dim}) LIMIT %s) AS hit"
                    f" GROUP BY name ORDER BY best LIMIT %s", (literals, key, int(k), int(k))).fetchall()
            return [row[0] for row in rows]
        return self._run(work)
