"""The fleet library's tables in PostgreSQL, their versions and the migrations between them.

Version 1::

    personal_vlm_schema (version int)       one row: the format of the tables below
    personal_vlm_state (generation bigint)  one row: +1 in every write's transaction; a watcher
                                            back from an outage compares it to catch up
    concepts (name text PRIMARY KEY, category, keywords jsonb, fingerprint jsonb,
              fingerprint_complete float8, memory_tokens int, model_identity text,
              created float8, updated float8, extra jsonb)
    pictures (name → concepts ON DELETE CASCADE, position int, suffix text, data bytea)
    memories (name → concepts ON DELETE CASCADE, model text   the model key (precision left out),
              model_identity text, memory_tokens int, version uuid, updated float8,
              data bytea                                     the memory's safetensors bytes)

Version 2 adds the prefilter's vectors: ``memories.dim`` and ``memories.pooled`` (pgvector,
p = normalise(sum_k normalise(M[k])), the matcher's pooled vector), and an HNSW index on
``pooled`` per dimension (``memories_pooled_<dim>``, made when the first memory of that
dimension is stored: an HNSW index needs one fixed dimension, and backbones differ in theirs).

Every migration runs in one transaction under an advisory lock, so two robots opening an old
library at once migrate it once; a library of a newer version than this code is refused, unchanged.
"""

from __future__ import annotations

import torch
from safetensors.torch import load

SCHEMA_VERSION = 2
# pg_advisory_xact_lock keys: one for migrations, one that serialises writes.
MIGRATION_LOCK = 0x70766C6D_0001
WRITE_LOCK = 0x70766C6D_0002

_VERSION_1 = [
    "CREATE TABLE personal_vlm_schema (version int NOT NULL)",
    "CREATE TABLE personal_vlm_state (generation bigint NOT NULL)",
    "INSERT INTO personal_vlm_state (generation) VALUES (0)",
    """CREATE TABLE concepts (
        name text PRIMARY KEY,
        category text NOT NULL,
        keywords jsonb NOT NULL,
        fingerprint jsonb NOT NULL,
        fingerprint_complete double precision,
        memory_tokens integer NOT NULL,
        model_identity text NOT NULL,
        created double precision NOT NULL,
        updated double precision NOT NULL,
        extra jsonb NOT NULL)""",
    """CREATE TABLE pictures (
        name text NOT NULL REFERENCES concepts (name) ON DELETE CASCADE,
        position integer NOT NULL,
        suffix text NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (name, position))""",
    """CREATE TABLE memories (
        name text NOT NULL REFERENCES concepts (name) ON DELETE CASCADE,
        model text NOT NULL,
        model_identity text NOT NULL,
        memory_tokens integer NOT NULL,
        version uuid NOT NULL,
        updated double precision NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (name, model))""",
    "CREATE INDEX memories_by_model ON memories (model)",
]

_VERSION_2 = [
    "ALTER TABLE memories ADD COLUMN dim integer",
    "ALTER TABLE memories ADD COLUMN pooled vector",
]


def pooled_vector(memory: dict[str, torch.Tensor]) -> list[float] | None:
    """The prefilter's vector of a memory, or None when it has no (K, D) ``memory`` tensor."""
    tokens = memory.get("memory")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
        return None
    m = tokens.detach().to("cpu", torch.float32)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)        # (K, D)
    p = m.sum(dim=0)
    return (p / p.norm().clamp_min(1e-12)).tolist()              # (D,)


def vector_literal(values) -> str:
    """pgvector's text form of a vector: '[v1,v2,…]' (sent as a query parameter, never spliced)."""
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def ensure_pooled_index(conn, dim: int) -> None:
    """The HNSW index for vectors of ``dim``, in the caller's transaction (created once)."""
    dim = int(dim)        # an int from len() of a tensor row: the only value formatted into DDL
    conn.execute(f"CREATE INDEX IF NOT EXISTS memories_pooled_{dim} ON memories "
                 f"USING hnsw ((pooled::vector({dim})) vector_cosine_ops) WHERE dim = {dim}")


def current_version(conn) -> int:
    """The library's format version: 0 for an empty database."""
    exists = conn.execute("SELECT to_regclass('personal_vlm_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM personal_vlm_schema").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn, version: int, target: int = SCHEMA_VERSION) -> None:
    """Bring the tables from ``version`` to ``target``, in the caller's transaction."""
    if version < 1 <= target:
        for statement in _VERSION_1:
            conn.execute(statement)
        conn.execute("INSERT INTO personal_vlm_schema (version) VALUES (1)")
    if version < 2 <= target:
        for statement in _VERSION_2:
            conn.execute(statement)
        rows = conn.execute("SELECT name, model, data FROM memories").fetchall()
        for name, model, data in rows:
            vector = pooled_vector(load(bytes(data)))
            if vector is not None:
                ensure_pooled_index(conn, len(vector))
                conn.execute("UPDATE memories SET dim=%s, pooled=%s::vector WHERE name=%s AND model=%s",
                             (len(vector), vector_literal(vector), name, model))
    conn.execute("UPDATE personal_vlm_schema SET version=%s", (target,))
