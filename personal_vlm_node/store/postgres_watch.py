"""PostgresWatcher: tells a node that someone changed the fleet library, via LISTEN/NOTIFY.

Every write's transaction sends a NOTIFY on ``personal_vlm_library`` (delivered at commit) and bumps
``personal_vlm_state.generation``. The watcher keeps a connection of its own that LISTENs; each
:meth:`changed` drains what arrived, without waiting, and reads the counter: a notification
reaches the listener a moment after the commit, while the counter is exact at once (one query on
an open connection, what a poll every 0.1 s costs). When that connection is lost it reconnects
with a backoff (0.5 s doubling to 5 s: a robot is back within 5 s of its server) and then
reports a change once, so the node reads the library again: a teach or a forget made during the
outage is caught up at once. Use it from one thread at a time.
"""

from __future__ import annotations

import logging
import time

from .postgres_connect import Connector
from .postgres_schema import NOTIFY_CHANNEL

logger = logging.getLogger("personal_vlm_node.store")

_RETRY_FIRST, _RETRY_MAX = 0.5, 5.0


class PostgresWatcher:
    def __init__(self, connector: Connector):
        self._connector = connector
        self._conn = None
        self._generation: int | None = None
        self._next_try = 0.0
        self._retry = _RETRY_FIRST
        import psycopg

        try:
            self._listen()
        except psycopg.Error:          # a library started offline: listen once the server is back
            self._conn = None
            self._next_try = time.monotonic() + self._retry

    def _listen(self) -> None:
        """(Re)open the listening connection."""
        conn = self._connector.connect()
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        generation = conn.execute("SELECT generation FROM personal_vlm_state").fetchone()[0]
        self._conn = conn
        self._generation = generation
        self._retry = _RETRY_FIRST

    def changed(self) -> bool:
        import psycopg

        if self._conn is None:
            if time.monotonic() < self._next_try:
                return False
            try:
                self._listen()
            except psycopg.Error:
                self._retry = min(self._retry * 2, _RETRY_MAX)
                self._next_try = time.monotonic() + self._retry
                return False
            # Back: the bank reads the library again whatever the generation says (one query when
            # nothing changed; a notification sent while this connection was down is never missed).
            return True
        try:
            list(self._conn.notifies(timeout=0))          # drain what arrived
            # The counter is the answer: a notification reaches this connection a moment after the
            # commit, and one query on an open connection tells exactly whether anyone committed.
            generation = self._conn.execute("SELECT generation FROM personal_vlm_state").fetchone()[0]
            moved, self._generation = generation != self._generation, generation
            return moved
        except psycopg.Error:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
            self._next_try = time.monotonic() + self._retry
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
