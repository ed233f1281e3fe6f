"""open_library: the concept store a location names — a folder, or a PostgreSQL URL."""

from __future__ import annotations

from .library import ConceptLibrary
from .local import ConceptStore
from .postgres_connect import is_library_url


def open_library(location=None, cache_dir=None, start_offline: bool = False) -> ConceptLibrary:
    """``postgresql://…`` (or ``postgres://…``): the fleet library in that database
    (:class:`~personal_vlm_node.store.postgres.PostgresLibrary`, its offline copy under
    ``cache_dir``; ``start_offline``: from that copy when the server cannot be reached); anything
    else: the local store folder (None or "" = the default folder)."""
    if is_library_url(location):
        from .postgres import PostgresLibrary

        return PostgresLibrary(location, cache_dir=cache_dir, start_offline=start_offline)
    return ConceptStore(location or None)
