"""The fleet library's connection: opening it with clear refusals, and living through outages.

Opening checks, in order, and refuses with one line each (nothing is written before all pass):
the URL parses; the server answers; the credentials are accepted; the database exists; pgvector is
installed in it (or can be, by this role); the tables are not of a newer format than this code's.
Then an empty database gets the tables, an older one is migrated
(:mod:`personal_vlm_node.store.postgres_schema`).

After that, a lost connection makes :meth:`Connector.run` raise :class:`LibraryOffline` (the
library then answers reads from its offline copy) and reconnection is tried on later calls with a
backoff: 0.5 s, doubling, at most 5 s apart (a robot is back within 5 s of its server).
:meth:`Connector.health` says which state it is in.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from personal_vlm_node.errors import PersonalVLMError
from .postgres_schema import MIGRATION_LOCK, SCHEMA_VERSION, current_version, migrate

logger = logging.getLogger("personal_vlm_node.store")

_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 5.0


class LibraryOffline(Exception):
    """The server cannot be reached now (str: which library, and why; ``refusal``: the line
    :meth:`Connector.open` would refuse it with)."""

    refusal = ""


_NOT_REACHABILITY = ("password", "does not exist", "certificate", "ssl", "role", "permission", "authentication")


def is_library_url(location) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0].lower() in ("postgresql", "postgres")


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise PersonalVLMError("a postgresql:// store needs the psycopg package: pip install 'psycopg[binary]'") \
            from None
    return psycopg


def describe_url(url: str) -> str:
    """The URL as a user would recognise it, without its password (whatever form it came in)."""
    psycopg = _psycopg()
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise PersonalVLMError(f"the store URL cannot be read ({_first_line(e)}); write it as "
                               "postgresql://user@host:port/database") from None
    user = params.get("user", "")
    host = params.get("host", "")
    port = params.get("port", "")
    database = params.get("dbname", "")
    where = host if not host.startswith("/") else ""
    text = "postgresql://" + (quote(user, safe="") + "@" if user else "") + where + (f":{port}" if port and where else "")
    text += "/" + quote(database, safe="")
    if host.startswith("/"):
        text += f"?host={host}" + (f"&port={port}" if port else "")
    return text


def _first_line(error) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _why(error) -> str:
    """libpq's reason, without the "connection failed: connection to server … failed:" preamble."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    for marker in ("FATAL:", "failed:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
    # libpq's own hint repeats the advice the caller gives.
    text = text.split(" Is the server running", 1)[0].strip()
    return text or type(error).__name__


def _open_error(location: str, error) -> PersonalVLMError:
    reason = _why(error)
    lowered = reason.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        advice = "check the user and password (the URL, PGPASSWORD or PGPASSFILE)"
    elif "does not exist" in lowered and "database" in lowered:
        advice = "create the database first (createdb), or fix the URL"
    elif "timeout" in lowered:
        advice = "is the server up and reachable from here?"
    else:
        advice = "is the server running, and is the host, port or socket folder right?"
    return PersonalVLMError(f"cannot open the concept library at {location}: {reason}; {advice}")


class Connector:
    """One psycopg connection (autocommit; writes take explicit transactions), reopened on demand."""

    def __init__(self, url: str, connect_timeout: float = 5.0, quiet: bool = False):
        """``quiet``: log nothing about outages (a second connection of a library that logs them)."""
        if not is_library_url(url):
            raise PersonalVLMError(f"not a PostgreSQL URL: {url!r}")
        self.url = url
        self.location = describe_url(url)
        self.connect_timeout = connect_timeout
        self.quiet = quiet
        self._conn = None
        self._offline_since: float | None = None
        self._reason = ""
        self._next_try = 0.0
        self._backoff = _BACKOFF_FIRST

    def connect(self, autocommit: bool = True):
        """A new connection to the library's database (errors as psycopg raises them)."""
        psycopg = _psycopg()
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=max(1, int(self.connect_timeout)),
                               application_name="personal_vlm_node")

    def open(self) -> None:
        """Connect, check and prepare the tables; PersonalVLMError with one line when it cannot."""
        psycopg = _psycopg()
        try:
            conn = self.connect()
        except psycopg.Error as e:
            refusal = _open_error(self.location, e)
            if any(word in _why(e).lower() for word in _NOT_REACHABILITY):
                raise refusal from None
            self._lost(e, quiet=True)  # out of reach: the caller refuses, or starts offline and says so
            offline = LibraryOffline(self._offline_text())
            offline.refusal = str(refusal)
            raise offline from None
        try:
            self._prepare(conn)
        except PersonalVLMError:
            conn.close()
            raise
        except psycopg.Error as e:
            conn.close()
            raise PersonalVLMError(f"cannot use the concept library at {self.location}: {_first_line(e)}") from None
        self._conn = conn

    def _prepare(self, conn) -> None:
        has_vector = conn.execute("SELECT 1 FROM pg_extension WHERE extname='vector'").fetchone() is not None
        if not has_vector:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name='vector'").fetchone() is not None
            if not available:
                raise PersonalVLMError(
                    f"the database of the concept library at {self.location} has no pgvector: install the "
                    "pgvector extension on the server (e.g. apt install postgresql-<version>-pgvector)")
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except _psycopg().Error as e:
                raise PersonalVLMError(
                    f"the database of the concept library at {self.location} has no pgvector and this user "
                    f"cannot add it ({_first_line(e)}); as a superuser run: CREATE EXTENSION vector") from None
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise PersonalVLMError(
                f"the concept library at {self.location} has format version {version}, newer than this "
                f"personal_vlm_node reads ({SCHEMA_VERSION}); upgrade personal_vlm_node")
        if version < SCHEMA_VERSION:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                version = current_version(conn)         # another robot may have migrated meanwhile
                if version < SCHEMA_VERSION:
                    if version:
                        logger.info("migrating the concept library at %s from format %d to %d",
                                    self.location, version, SCHEMA_VERSION)
                    migrate(conn, version)

    # ---- living through outages ----------------------------------------------------------------
    def run(self, work):
        """``work(connection)``; LibraryOffline when the server cannot be reached (now or lately)."""
        psycopg = _psycopg()
        if self._conn is None or self._conn.closed:
            self._reconnect()
        try:
            result = work(self._conn)
        except psycopg.OperationalError as e:
            if self._conn is not None and not self._conn.closed and not self._conn.broken:
                raise PersonalVLMError(f"the concept library at {self.location} refused the request: "
                                       f"{_first_line(e)}") from None
            self._lost(e)
            raise LibraryOffline(self._offline_text()) from None
        except psycopg.Error as e:
            if self._conn.broken:
                self._lost(e)
                raise LibraryOffline(self._offline_text()) from None
            raise PersonalVLMError(f"the concept library at {self.location} refused the request: "
                                   f"{_first_line(e)}") from None
        return result

    def _reconnect(self) -> None:
        now = time.monotonic()
        if now < self._next_try:
            raise LibraryOffline(self._offline_text())
        try:
            conn = self.connect()
            self._prepare(conn)
        except Exception as e:
            self._lost(e)
            raise LibraryOffline(self._offline_text()) from None
        self._conn = conn
        if self._offline_since is not None and not self.quiet:
            logger.warning("the concept library at %s is reachable again (it was not for %.0f s)",
                           self.location, time.time() - self._offline_since)
        self._offline_since, self._backoff, self._next_try = None, _BACKOFF_FIRST, 0.0

    def _lost(self, error, quiet: bool = False) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        self._reason = _why(error)
        if self._offline_since is None:
            self._offline_since = time.time()
            if not (quiet or self.quiet):
                logger.warning("the concept library at %s cannot be reached (%s); recognising from the offline "
                               "copy, reconnecting in the background", self.location, self._reason)
        else:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._next_try = time.monotonic() + self._backoff

    def _offline_text(self) -> str:
        return f"the concept library at {self.location} cannot be reached ({self._reason})"

    @property
    def online(self) -> bool:
        return self._offline_since is None

    def health(self, cached: int) -> str | None:
        """None while connected; else one line for /diagnostics."""
        if self._offline_since is None:
            return None
        return (f"offline for {time.time() - self._offline_since:.0f} s ({self._reason}): recognising from the "
                f"offline copy ({cached} concepts); teaching is refused until {self.location} is back")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
