"""The fleet library on a real PostgreSQL server with pgvector: what only a database backend has —
refusals when opening, migrations, injection attempts, the watcher across connections, the prefilter
in the database, outages and the offline copy, copying to and from a local store.
(What every backend does is in test_store_contract.py, run against this backend too.)"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import pytest
import torch
from PIL import Image

from personal_vlm_node.cli import main as cli_main
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.store import ConceptRecord, ConceptStore, open_library
from personal_vlm_node.store.postgres import PostgresLibrary
from personal_vlm_node.store.postgres_schema import SCHEMA_VERSION, migrate

MODEL = "qwen2_5_vl|tiny-vlm|r1|float32|d8"
OTHER = "internvl|tiny-internvl|r1|float32|d8"


def _concept(name: str, category: str = "mug", fill: float = 1.0, direction: int | None = None, model=MODEL):
    tokens = torch.full((3, 8), fill) if direction is None else torch.nn.functional.one_hot(
        torch.tensor([direction] * 3), 8).float()
    record = ConceptRecord(name=name, category=category, keywords=["red"], fingerprint={}, fingerprint_complete=None,
                           memory_tokens=3, model_identity=model, extra={"rois": [None]})
    return record, {"memory": tokens}, [Image.new("RGB", (8, 6), (200, 10, 10))]


@pytest.fixture
def library(library_url, tmp_path):
    made = PostgresLibrary(library_url, cache_dir=tmp_path / "offline")
    yield made
    made.close()


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---- opening: one clear line, nothing written -----------------------------------------------------

def test_an_unreachable_server_is_refused_in_one_line(tmp_path):
    with pytest.raises(PersonalVLMError) as e:
        PostgresLibrary(f"postgresql://robot@/fleet?host={tmp_path}/nowhere&port=5999", cache_dir=tmp_path / "c")
    assert "cannot open the concept library at postgresql://robot@/fleet" in _one_line(e)


def test_a_url_that_does_not_parse_is_refused(tmp_path):
    with pytest.raises(PersonalVLMError, match="cannot be read"):
        PostgresLibrary("postgresql://robot@host/db?nonsense_option=1", cache_dir=tmp_path)


def test_bad_credentials_are_refused_and_the_password_is_never_shown(postgres_server, tmp_path, caplog):
    name = f"t_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    postgres_server.add_role(f"r_{name}", "right-password", name)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PersonalVLMError) as e:
        PostgresLibrary(postgres_server.url(name, f"r_{name}", "wrong-secret"), cache_dir=tmp_path)
    text = _one_line(e)
    assert "password authentication failed" in text and "check the user and password" in text
    assert "wrong-secret" not in text and "wrong-secret" not in caplog.text
    good = PostgresLibrary(postgres_server.url(name, f"r_{name}", "right-password", tcp=True), cache_dir=tmp_path)
    try:
        assert "right-password" not in good.location()
        assert good.location() == f"postgresql://r_{name}@127.0.0.1:{postgres_server.port}/{name}"
    finally:
        good.close()


def test_credentials_from_a_password_file(postgres_server, tmp_path, monkeypatch):
    name = f"t_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    postgres_server.add_role(f"r_{name}", "from-the-file", name)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:{name}:r_{name}:from-the-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    library = PostgresLibrary(postgres_server.url(name, f"r_{name}", tcp=True), cache_dir=tmp_path)
    library.close()


def test_a_database_without_pgvector_that_this_user_cannot_add_is_refused_untouched(postgres_server, tmp_path):
    name = f"t_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name, vector=False)
    postgres_server.add_role(f"r_{name}", "pw", name)
    with pytest.raises(PersonalVLMError) as e:
        PostgresLibrary(postgres_server.url(name, f"r_{name}", "pw"), cache_dir=tmp_path)
    assert "no pgvector" in _one_line(e) and "CREATE EXTENSION vector" in _one_line(e)
    import psycopg

    with psycopg.connect(postgres_server.url(name)) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()[0] == 0


def test_a_library_of_a_newer_format_is_refused_unchanged(library_url, tmp_path):
    PostgresLibrary(library_url, cache_dir=tmp_path).close()
    import psycopg

    with psycopg.connect(library_url, autocommit=True) as conn:
        conn.execute("UPDATE personal_vlm_schema SET version=%s", (SCHEMA_VERSION + 1,))
    with pytest.raises(PersonalVLMError) as e:
        PostgresLibrary(library_url, cache_dir=tmp_path)
    assert f"format version {SCHEMA_VERSION + 1}, newer" in _one_line(e) and "upgrade personal_vlm_node" in str(e.value)
    with psycopg.connect(library_url) as conn:
        assert conn.execute("SELECT version FROM personal_vlm_schema").fetchone()[0] == SCHEMA_VERSION + 1


def test_a_version_1_library_is_migrated_and_keeps_its_concepts(library_url, tmp_path):
    import psycopg
    from safetensors.torch import save

    with psycopg.connect(library_url, autocommit=True) as conn:
        with conn.transaction():
            migrate(conn, 0, target=1)
            conn.execute("INSERT INTO concepts VALUES ('old mug', 'mug', '[]', '{}', NULL, 3, %s, 1.0, 1.0, '{}')",
                         (MODEL,))
            conn.execute("INSERT INTO pictures VALUES ('old mug', 0, '.png', %s)", (b"not read here",))
            conn.execute("INSERT INTO memories VALUES ('old mug', %s, %s, 3, %s, 1.0, %s)",
                         ("qwen2_5_vl|tiny-vlm|r1|d8", MODEL, uuid.uuid4(), save({"memory": torch.eye(8)[:3]})))
    library = PostgresLibrary(library_url, cache_dir=tmp_path)
    try:
        assert library.names() == ["old mug"]
        assert torch.equal(library.load_memory("old mug")["memory"], torch.eye(8)[:3])
        assert library.nearest(MODEL, torch.eye(8)[:1], k=1) == ["old mug"]
    finally:
        library.close()
    with psycopg.connect(library_url) as conn:
        assert conn.execute("SELECT version FROM personal_vlm_schema").fetchone()[0] == SCHEMA_VERSION


# ---- values are data, never SQL ---------------------------------------------------------------------

@pytest.mark.parametrize("name, category", [
    ("x'); DROP TABLE concepts; --", "mug"),
    ("robert\"; DELETE FROM memories; --", "' OR '1'='1"),
    ("$$; SELECT pg_sleep(5); $$", "cat\\'; TRUNCATE pictures; --"),
])
def test_injection_attempts_are_stored_verbatim_and_harmless(library, name, category):
    library.add(*_concept("keeper"))
    library.add(*_concept(name, category=category))
    assert library.get(name).category == category
    assert sorted(library.names()) == sorted(["keeper", name])
    assert library.load_memory("keeper")["memory"].shape == (3, 8) and len(library.load_images("keeper")) == 1
    library.forget(name)
    assert library.names() == ["keeper"]


# ---- several robots on one library ------------------------------------------------------------------

def test_another_connection_sees_a_teach_and_a_forget_within_a_second(library_url, tmp_path):
    writer = PostgresLibrary(library_url, cache_dir=tmp_path / "a")
    reader = PostgresLibrary(library_url, cache_dir=tmp_path / "b")
    watcher = reader.watch()
    try:
        assert watcher.changed() is False
        writer.add(*_concept("fluffy"))
        for action in (None, lambda: writer.forget("fluffy")):
            if action:
                action()
            deadline = time.monotonic() + 1.0
            while not watcher.changed():
                assert time.monotonic() < deadline, "no notification within 1 s"
                time.sleep(0.01)
            assert ("fluffy" in reader) is (action is None)
        assert watcher.changed() is False
    finally:
        watcher.close()
        writer.close()
        reader.close()


def test_each_backbone_reads_only_its_own_memories(library):
    library.add(*_concept("cane", direction=2))
    assert library.memory_versions(OTHER) == {}
    library.replace_memory("cane", {"memory": torch.eye(8)[5:7]}, OTHER, 2)
    assert library.load_memory("cane", OTHER)["memory"].shape == (2, 8)
    assert library.load_memory("cane", MODEL)["memory"].shape == (3, 8)
    assert library.nearest(OTHER, torch.eye(8)[5:6], k=1) == ["cane"]
    assert library.nearest(OTHER, torch.eye(8)[2:3], k=5) == ["cane"]   # its only concept, however far


def test_the_prefilter_in_the_database_finds_the_nearest_concepts(library):
    for direction in range(8):
        library.add(*_concept(f"thing {direction}", direction=direction))
    queries = torch.eye(8)[[3, 6]] + 0.05                   # (Q=2, D=8): near directions 3 and 6
    assert sorted(library.nearest(MODEL, queries, k=2)) == ["thing 3", "thing 6"]


# ---- outages -------------------------------------------------------------------------------------------

def test_an_outage_keeps_reads_from_the_offline_copy_refuses_writes_and_catches_up(postgres_server, tmp_path):
    url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:10]}")
    robot = PostgresLibrary(url, cache_dir=tmp_path / "robot")
    other = PostgresLibrary(url, cache_dir=tmp_path / "other")
    robot.add(*_concept("mug", direction=1))
    watcher = robot.watch()
    versions = robot.memory_versions(MODEL)
    robot.list()
    robot.load_memory("mug", MODEL)
    try:
        postgres_server.kill()
        assert robot.memory_versions(MODEL) == versions
        assert robot.get("mug").category == "mug" and robot.names() == ["mug"]
        assert robot.load_memory("mug", MODEL)["memory"].shape == (3, 8)
        assert "offline" in robot.health() and "teaching is refused" in robot.health()
        with pytest.raises(PersonalVLMError, match="cannot be reached.*nothing was written"):
            robot.add(*_concept("cup"))
        assert watcher.changed() is False
        # A restart in the outage reads the copy on disk.
        restarted = robot.cache.__class__.for_library(robot.location(), tmp_path / "robot")
        assert set(restarted.records) == {"mug"} and restarted.memory(
            "qwen2_5_vl|tiny-vlm|r1|d8", "mug") is not None
        postgres_server.restart()
        other_back = PostgresLibrary(url, cache_dir=tmp_path / "other2")
        other_back.add(*_concept("cup", direction=4))        # taught elsewhere while the robot was cut off
        other_back.close()
        deadline = time.monotonic() + 35
        while not watcher.changed():
            assert time.monotonic() < deadline, "the watcher did not come back"
            time.sleep(0.1)
        deadline = time.monotonic() + 35
        while True:
            try:
                names = robot.names()
                if robot.health() is None:
                    break
            except PersonalVLMError:
                pass
            assert time.monotonic() < deadline, "the library did not reconnect"
            time.sleep(0.1)
        assert names == ["cup", "mug"]
    finally:
        watcher.close()
        robot.close()
        other.close()


def test_a_robot_restarted_in_an_outage_starts_from_its_offline_copy(postgres_server, tmp_path):
    url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:10]}")
    first = PostgresLibrary(url, cache_dir=tmp_path / "robot")
    first.add(*_concept("mug", direction=1))
    first.list()
    first.memory_versions(MODEL)
    first.load_memory("mug", MODEL)
    first.close()
    postgres_server.kill()
    try:
        with pytest.raises(PersonalVLMError, match="cannot open the concept library"):
            PostgresLibrary(url, cache_dir=tmp_path / "robot")                      # a command refuses
        with pytest.raises(PersonalVLMError, match="cannot open the concept library"):
            PostgresLibrary(url, cache_dir=tmp_path / "new", start_offline=True)   # nothing to start from
        robot = PostgresLibrary(url, cache_dir=tmp_path / "robot", start_offline=True)
        watcher = robot.watch()
        assert robot.names() == ["mug"] and robot.load_memory("mug", MODEL)["memory"].shape == (3, 8)
        assert "offline" in robot.health()
    finally:
        postgres_server.restart()
    try:
        deadline = time.monotonic() + 15
        while robot.health() is not None:
            with contextlib.suppress(PersonalVLMError):
                robot.names()
            assert time.monotonic() < deadline, "the library started offline never connected"
            time.sleep(0.1)
        robot.add(*_concept("cup", direction=2))
        assert robot.names() == ["cup", "mug"]
    finally:
        watcher.close()
        robot.close()


# ---- copying concepts between a local store and a library ------------------------------------------

def test_store_push_pull_and_check_copy_every_concept_whole(library_url, tmp_path, capsys):
    local = ConceptStore(tmp_path / "local")
    local.add(*_concept("mug", direction=1))
    local.add(*_concept("cane", direction=2))
    local.replace_memory("cane", {"memory": torch.eye(8)[:4]}, OTHER, 4)
    local.update_fingerprint("mug", {"color": "red"})
    assert cli_main(["--store", str(tmp_path / "local"), "store", "push", library_url]) == 0
    assert "copied 2 concept(s)" in capsys.readouterr().out
    assert cli_main(["--store", str(tmp_path / "local"), "store", "push", library_url]) == 0
    assert "left 2 alone" in capsys.readouterr().out
    assert cli_main(["--store", library_url, "store", "check"]) == 0
    out = capsys.readouterr().out
    assert "2 concept(s), all readable" in out and OTHER in out

    assert cli_main(["--store", str(tmp_path / "back"), "store", "pull", library_url]) == 0
    back = ConceptStore(tmp_path / "back")
    assert back.names() == ["cane", "mug"]
    assert back.get("mug").fingerprint == {"color": "red"}
    assert torch.equal(back.load_memory("cane", OTHER)["memory"], torch.eye(8)[:4])
    assert back.load_images("mug")[0].tobytes() == local.load_images("mug")[0].tobytes()
    assert back.memory_models("cane") == [MODEL, OTHER]


def test_store_commands_on_a_bad_url_exit_2_with_one_line(tmp_path, capsys):
    url = f"postgresql://robot:hunter2@/fleet?host={tmp_path}&port=5999"
    assert cli_main(["--store", url, "list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("personal-vlm: error: cannot open the concept library")
    assert "hunter2" not in err
    assert cli_main(["--store", str(tmp_path / "local"), "store", "push", url]) == 2


def test_open_library_chooses_the_backend_by_the_location(library_url, tmp_path):
    assert isinstance(open_library(str(tmp_path / "s")), ConceptStore)
    library = open_library(library_url, cache_dir=tmp_path / "c")
    try:
        assert isinstance(library, PostgresLibrary)
    finally:
        library.close()


# ---- TLS options pass through to libpq ----------------------------------------------------------------

def test_tls_options_in_the_url_reach_the_server(tmp_path):
    """The embedded server is built without TLS: this runs the distribution's PostgreSQL (without
    pgvector, so a library refuses it — after the TLS handshake, which is what is tested)."""
    import glob
    import shutil
    import subprocess

    from personal_vlm_node.testing.postgres import LocalServer

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found or shutil.which("openssl") is None:
        pytest.skip("needs the distribution's PostgreSQL server (apt install postgresql) and openssl")
    from pathlib import Path

    with LocalServer(tls=True, programs=Path(found[-1]).parent) as server:
        server.create_database("fleet", vector=False)
        server.add_role("robot", "pw", "fleet")
        base = server.url("fleet", "robot", "pw", tcp=True)
        import psycopg

        with psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={server.certificate}") as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        # Trusted certificate: the connection is made over TLS and gets as far as the missing pgvector.
        with pytest.raises(PersonalVLMError) as e:
            PostgresLibrary(f"{base}?sslmode=verify-full&sslrootcert={server.certificate}", cache_dir=tmp_path)
        assert "no pgvector" in _one_line(e)
        # A certificate the client was told not to trust is refused, in one line, before anything else.
        other = tmp_path / "other.crt"
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                               "/CN=other", "-keyout", str(tmp_path / "other.key"), "-out", str(other)],
                              capture_output=True)
        assert made.returncode == 0
        with pytest.raises(PersonalVLMError) as e:
            PostgresLibrary(f"{base}?sslmode=verify-full&sslrootcert={other}", cache_dir=tmp_path)
        assert "cannot open the concept library" in _one_line(e) and "certificate" in str(e.value)
        assert "pw@" not in str(e.value) and ":pw" not in str(e.value)


def test_two_backbones_on_one_machine_keep_their_own_offline_copies(tmp_path):
    from safetensors.torch import save

    from personal_vlm_node.store.offline import OfflineCache

    a = OfflineCache.for_library("postgresql://robot@db/fleet", tmp_path)
    b = OfflineCache.for_library("postgresql://robot@db/fleet", tmp_path)
    record = _concept("mug")[0]
    for cache, key, version in ((a, "qwen|x|r|d8", "v-a"), (b, "internvl|y|r|d8", "v-b")):
        cache.set_records([record])
        cache.set_versions(key, {"mug": version})
        cache.put_memory(key, "mug", version, save({"memory": torch.ones(2, 8)}))
    a.set_versions("qwen|x|r|d8", {})                 # a's memory of "mug" went away: only a's file goes
    again = OfflineCache.for_library("postgresql://robot@db/fleet", tmp_path)
    assert again.memory("internvl|y|r|d8", "mug") is not None
    assert again.memory("qwen|x|r|d8", "mug") is None and set(again.records) == {"mug"}
    files = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert "v-b.safetensors" in files and "v-a.safetensors" not in files
    assert all((p.stat().st_mode & 0o077) == 0 for p in next(tmp_path.iterdir()).iterdir())
