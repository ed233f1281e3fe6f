"""PostgresWatcher: tells a node that someone changed the fleet library.

Every write's transaction bumps ``personal_vlm_state.generation``, the library's change counter.
The watcher reads it on a connection of its own (one query, what a poll every 0.1 s costs) and
reports a change when it moved: exact at once after a commit, which a NOTIFY is not (it reaches
a listener a moment later). The connection is a :class:`~.postgres_connect.Connector` of its own,
so it lives through outages as the library's does (backoff 0.5 s doubling to 5 s); back from one,
it reports a change once, so the node reads the library again and catches up on what was taught
or forgotten meanwhile. Use it from one thread at a time.
"""

from __future__ import annotations

from personal_vlm_node.errors import PersonalVLMError
from .postgres_connect import Connector, LibraryOffline


class PostgresWatcher:
    def __init__(self, connector: Connector):
        # Quiet: the library's own connection already says when the server goes and comes back.
        self._connector = Connector(connector.url, connect_timeout=connector.connect_timeout, quiet=True)
        self._generation = self._read()       # None when the library started offline

    def _read(self) -> int | None:
        try:
            return self._connector.run(
                lambda conn: conn.execute("SELECT generation FROM personal_vlm_state").fetchone()[0])
        except (LibraryOffline, PersonalVLMError):
            return None

    def changed(self) -> bool:
        was_offline = self._generation is None or not self._connector.online
        generation = self._read()
        if generation is None:
            return False
        moved = was_offline or generation != self._generation
        self._generation = generation
        return moved

    def close(self) -> None:
        self._connector.close()
