"""The store never destroys what the user has: refusals instead of wipes, damage isolated, errors by
cause, forget for real, and a repair that rebuilds a lost index from the concept folders."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.store.repair import repair_store
from personal_vlm_node.store import ConceptRecord, ConceptStore

# The same faults the store's field cases use (scripts/store_cases.py imports nothing of the package).
_spec = importlib.util.spec_from_file_location("store_cases", Path(__file__).parents[1] / "scripts" / "store_cases.py")
_CASES = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_CASES)

QWEN = "qwen2_5_vl|tiny|main|float32|d8"
OTHER = "internvl|tiny|main|float32|d8"


def _record(name: str, **fields) -> ConceptRecord:
    values = dict(category="thing", keywords=["red", "round"], fingerprint={}, fingerprint_complete=None,
                  memory_tokens=4, model_identity=QWEN, extra={"rois": [[0, 0, 3, 3]]})
    values.update(fields)
    return ConceptRecord(name=name, **values)


def _memory(fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"memory": torch.full((4, 8), fill), "positions": torch.arange(4)}  # (K_c, D), (K_c,)


def _picture(value: int = 10) -> Image.Image:
    return Image.new("RGB", (6, 5), (value, value, value))


def _three_concepts(root: Path) -> ConceptStore:
    store = ConceptStore(root)
    store.add(_record("mug", category="mug"), _memory(1.0), [_picture(10), _picture(11)])
    store.add(_record("Fluffy", category="cat"), _memory(2.0), [_picture(20)])
    store.update_fingerprint("Fluffy", {"attributes": {"colour": "grey"}, "description": "a grey cat"},
                             keywords=["grey", "fluffy"])
    store.add(_record("keys"), _memory(3.0), [_picture(30)])
    store.add(_record("keys", category="keys"), _memory(4.0), [_picture(40)], overwrite=True)
    store.replace_memory("mug", _memory(5.0), OTHER, 4)
    return store


def _snapshot(*roots: Path) -> dict:
    """Every path under ``roots`` (links not followed) → what it is, its mode and content."""
    seen = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.exists() or root.is_symlink() else []:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                seen[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                seen[str(path)] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                seen[str(path)] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def _snapshot_unchanged(before: dict, after: dict) -> list[str]:
    """Paths of ``before`` that are gone or differ in ``after`` (new paths are allowed)."""
    return [p for p, what in before.items() if after.get(p) != what]


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "personal_vlm_node.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


# ---- 1. a lost or empty index ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_index_is_refused_and_every_concept_folder_kept(tmp_path, how):
    store = _three_concepts(tmp_path / "store")
    index = store.root / "concepts.db"
    if how == "deleted":
        index.unlink()
    else:
        os.truncate(index, 0)
    before = _snapshot(store.root)

    with pytest.raises(PersonalVLMError, match=r"concepts\.db is (missing|empty).*store repair"):
        ConceptStore(store.root)
    done = _run_cli("--store", str(store.root), "list")

    assert done.returncode == 2 and "store repair" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert _snapshot_unchanged(before, _snapshot(store.root)) == []


def test_repair_rebuilds_a_deleted_index_with_every_concept_usable(tmp_path):
    store = _three_concepts(tmp_path / "store")
    records = {r.name: r for r in store.list()}
    memories = {n: store.load_memory(n) for n in records}
    pictures = {n: [p.tobytes() for p in store.load_images(n)] for n in records}
    other = store.load_memory("mug", model=OTHER)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (store.root / f"concepts.db{suffix}").unlink()

    report = repair_store(store.root)

    assert report.repaired and report.restored == ["Fluffy", "keys", "mug"] and report.memories == 1
    assert report.damaged == {} and report.recovered == []
    reopened = ConceptStore(store.root)
    for name, record in records.items():
        again = reopened.get(name)
        for field in ("category", "keywords", "fingerprint", "fingerprint_complete", "memory_tokens",
                      "model_identity", "created", "extra"):
            assert getattr(again, field) == getattr(record, field), (name, field)
        assert all(torch.equal(reopened.load_memory(name)[k], v) for k, v in memories[name].items())
        assert [p.tobytes() for p in reopened.load_images(name)] == pictures[name]
    assert torch.equal(reopened.load_memory("mug", model=OTHER)["memory"], other["memory"])
    assert reopened.get("Fluffy").fingerprint["description"] == "a grey cat"
    # Usable for writes too: teach, overwrite and forget work on the rebuilt index.
    reopened.add(_record("cane"), _memory(6.0), [_picture(60)])
    reopened.forget("keys")
    assert reopened.names() == ["Fluffy", "cane", "mug"]


def test_repair_moves_a_damaged_index_aside_and_a_healthy_one_is_left_alone(tmp_path):
    store = _three_concepts(tmp_path / "store")
    assert not repair_store(store.root).repaired
    index = store.root / "concepts.db"
    _damage_a_page(index)

    report = repair_store(store.root)

    assert report.repaired and report.restored == ["Fluffy", "keys", "mug"]
    assert report.old_index is not None and report.old_index.read_bytes()[:16] == b"SQLite format 3\x00"
    assert ConceptStore(store.root).names() == ["Fluffy", "keys", "mug"]


def test_repair_restores_a_damaged_concept_as_damaged_and_reports_foreign_folders(tmp_path):
    store = _three_concepts(tmp_path / "store")
    _poison_memory(store, "keys")
    stranger = store.root / "concepts" / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("mine")
    (store.root / "concepts.db").unlink()

    report = repair_store(store.root)

    assert "keys" in report.damaged and "NaN" in report.damaged["keys"]
    assert any(str(stranger) in entry for entry in report.left)
    assert (stranger / "todo.txt").read_text() == "mine"
    assert ConceptStore(store.root).problems().keys() == {"keys"}


def test_repair_through_the_command_prints_what_it_did(tmp_path):
    store = _three_concepts(tmp_path / "store")
    (store.root / "concepts.db").unlink()

    done = _run_cli("--store", str(store.root), "--json", "store", "repair")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["restored"] == ["Fluffy", "keys", "mug"]
    listed = _run_cli("--store", str(store.root), "list")
    assert listed.returncode == 0 and [line.split("\t")[0] for line in listed.stdout.splitlines()] == \
        ["Fluffy", "keys", "mug"]


def test_repair_refuses_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "concepts").mkdir()
    with pytest.raises(PersonalVLMError, match="not a concept store"):
        repair_store(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["concepts", "notes.txt"]


def test_a_store_written_before_records_can_be_repaired_after_one_open(tmp_path):
    store = _three_concepts(tmp_path / "store")
    for directory in (store.root / "concepts").iterdir():
        (directory / "record.json").unlink()
    os.remove(store.root / "personal_vlm_store.json")
    with contextlib.closing(sqlite3.connect(store.root / "concepts.db")) as db:
        db.execute("DROP TABLE pending")
        db.execute("PRAGMA user_version=2")
        db.commit()

    ConceptStore(store.root)                       # the upgrade writes every version's record
    (store.root / "concepts.db").unlink()
    report = repair_store(store.root)

    assert report.restored == ["Fluffy", "keys", "mug"] and report.memories == 1


# ---- 2. a folder that is not a store ------------------------------------------------------------

def _users_folder(root: Path) -> Path:
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "draft.txt").write_text("a draft")
    (root / "concepts").mkdir()
    (root / "concepts" / "essay.md").write_text("# an essay")
    (root / "notes.txt").write_text("notes")
    os.chmod(root, 0o755)
    return root


@pytest.mark.parametrize("keep_notes", [True, False])
def test_a_folder_holding_other_files_is_refused_and_nothing_changes(tmp_path, keep_notes):
    root = _users_folder(tmp_path / "home")
    if not keep_notes:
        (root / "notes.txt").unlink()
    before = _snapshot(root)

    with pytest.raises(PersonalVLMError, match="not a concept store.*nothing was changed"):
        ConceptStore(root)
    done = _run_cli("--store", str(root), "list")

    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and str(root) in done.stderr
    assert _snapshot(root) == before


def test_an_empty_folder_becomes_a_store_and_a_store_keeps_files_it_did_not_write(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    store = ConceptStore(root)
    store.add(_record("mug"), _memory(), [_picture()])
    (root / "README.txt").write_text("my notes about this store")
    (root / "concepts" / "photos").mkdir()
    (root / "concepts" / "photos" / "a.jpg").write_bytes(b"jpeg")

    ConceptStore(root).forget("mug")
    ConceptStore(root)

    assert (root / "README.txt").read_text() == "my notes about this store"
    assert (root / "concepts" / "photos" / "a.jpg").read_bytes() == b"jpeg"
    assert os.listdir(root / "concepts") == ["photos"]


# ---- 3. links inside the store --------------------------------------------------------------------

@pytest.mark.parametrize("part", ["concepts", "tmp", "concepts.db"])
def test_a_symlinked_store_part_is_refused_and_its_target_untouched(tmp_path, part):
    store = _three_concepts(tmp_path / "store")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if part == "tmp":
        target = elsewhere / "tmp"
        target.mkdir()
        (target / "draft.txt").write_text("a draft")
        (target / "0123456789abcdef0123456789abcdef").mkdir()
        shutil.rmtree(store.root / "tmp")
    else:
        target = elsewhere / part
        shutil.move(store.root / part, target)
        if part == "concepts.db":
            os.chmod(target, 0o644)
    os.symlink(target, store.root / part)
    before = _snapshot(elsewhere, store.root)

    with pytest.raises(PersonalVLMError, match="symbolic link"):
        ConceptStore(store.root)

    assert _snapshot(elsewhere, store.root) == before


def test_a_new_folder_with_a_linked_index_is_refused_and_the_target_stays_empty(tmp_path):
    target = tmp_path / "some.db"
    target.write_bytes(b"")
    os.chmod(target, 0o644)
    root = tmp_path / "store"
    root.mkdir()
    os.symlink(target, root / "concepts.db")

    with pytest.raises(PersonalVLMError, match="symbolic link"):
        ConceptStore(root)

    assert target.read_bytes() == b"" and stat.S_IMODE(target.stat().st_mode) == 0o644


# ---- 4. one damaged memory ------------------------------------------------------------------------

def _poison_memory(store: ConceptStore, name: str) -> None:
    _CASES.poison_memory(store.root, name)


def test_a_memory_with_nan_is_damage_and_the_others_still_load(tmp_path):
    store = _three_concepts(tmp_path / "store")
    _poison_memory(store, "mug")

    with pytest.raises(PersonalVLMError, match="'mug' is damaged: its memory holds NaN"):
        store.load_memory("mug")
    assert torch.equal(store.load_memory("keys")["memory"], _memory(4.0)["memory"])
    assert list(store.problems()) == ["mug"]


def test_a_damaged_concept_is_left_out_and_every_other_one_recognised(tiny_checkpoints, tmp_path):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.options import AssistantOptions
    from personal_vlm_node.vlm import load_vlm

    vlm = load_vlm(str(tiny_checkpoints["qwen2_5_vl"]), device="cpu", dtype="float32")
    options = AssistantOptions(verification=False)
    pictures = {name: Image.new("RGB", (64, 48), colour) for name, colour in
                (("mug", (200, 30, 30)), ("keys", (30, 200, 30)), ("cane", (30, 30, 200)))}
    with Assistant(vlm, ConceptStore(tmp_path / "store"), progress=None, options=options) as assistant:
        for name, picture in pictures.items():
            assistant.teach(name, [picture]).wait_fingerprint()
    _poison_memory(ConceptStore(tmp_path / "store"), "mug")

    with Assistant(vlm, ConceptStore(tmp_path / "store"), progress=None, options=options) as assistant:
        assert list(assistant.damaged) == ["mug"] and "NaN" in assistant.damaged["mug"]
        assert sorted(assistant.matcher.names) == ["cane", "keys"]
        scores = assistant.observe(pictures["keys"])
        assert all(d.name != "mug" for d in scores.detections)
        answer = assistant.ask("Where are my keys?", pictures["keys"])
        assert "mug" not in answer.concepts and answer.answer is not None


def test_the_command_reports_a_damaged_concept_and_keeps_working(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["qwen2_5_vl"])
    store = tmp_path / "store"
    common = ("--model", model, "--store", str(store), "--device", "cpu", "--dtype", "float32")
    for name, colour in (("mug", (200, 30, 30)), ("keys", (30, 200, 30))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / f"{name}.png")
        assert _run_cli(*common, "teach", name, str(tmp_path / f"{name}.png")).returncode == 0
    _poison_memory(ConceptStore(store), "mug")

    recognized = _run_cli(*common, "--json", "recognize", str(tmp_path / "keys.png"), "--all")
    asked = _run_cli(*common, "ask", "where are my keys?", "--image", str(tmp_path / "keys.png"))
    listed = _run_cli(*common, "list")

    def no_nan(text):
        raise AssertionError(f"{text} in JSON output")

    assert recognized.returncode == 0, recognized.stderr
    assert [c["name"] for c in json.loads(recognized.stdout, parse_constant=no_nan)["concepts"]] == ["keys"]
    assert recognized.stderr.count("'mug' is damaged") == 1
    assert asked.returncode == 0 and "Traceback" not in asked.stderr
    mug_line = next(line for line in listed.stdout.splitlines() if line.startswith("mug\t"))
    assert "DAMAGED" in mug_line and "NaN" in mug_line


# ---- 5. a malformed index page ---------------------------------------------------------------------

def _damage_a_page(index: Path) -> None:
    """Overwrite the index's second page (a table's root) with garbage, as a failing disk would."""
    with contextlib.closing(sqlite3.connect(index)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
    with open(index, "r+b") as f:
        f.seek(page)
        f.write(bytes(random.Random(7).getrandbits(8) for _ in range(page)))


def test_a_malformed_index_page_gives_one_line_pointing_to_repair(tmp_path):
    store = _three_concepts(tmp_path / "store")
    _damage_a_page(store.root / "concepts.db")

    with pytest.raises(PersonalVLMError, match="concepts.db is damaged.*store repair"):
        ConceptStore(store.root).list()
    done = _run_cli("--store", str(store.root), "list")

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "store repair" in done.stderr


# ---- 6. a full disk, a read-only folder -------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system of its own (tmpfs), so that filling it fills nothing else."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_as_full_and_loses_nothing(small_disk):
    store = _three_concepts(small_disk / "store")
    filler = _CASES.fill_disk(small_disk, 0)

    with pytest.raises(PersonalVLMError, match="full.*free some space"):
        store.update_fingerprint("mug", {"description": "x" * 200_000})
    with pytest.raises(PersonalVLMError, match="full.*free some space"):
        store.add(_record("cane"), _memory(), [_picture()])
    filler.unlink()

    reopened = ConceptStore(small_disk / "store")
    assert reopened.names() == ["Fluffy", "keys", "mug"]
    assert reopened.get("mug").fingerprint == {} and reopened.problems() == {}


def test_a_store_can_be_listed_with_almost_no_free_space(small_disk):
    _three_concepts(small_disk / "store")
    _CASES.fill_disk(small_disk, 16 * 1024)

    assert ConceptStore(small_disk / "store").names() == ["Fluffy", "keys", "mug"]
    done = _run_cli("--store", str(small_disk / "store"), "list")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3


@contextlib.contextmanager
def _immutable(*paths: Path):
    """chattr +i: even root may not write there (as on an immutable or read-only folder)."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({done.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=False)


def test_a_read_only_store_is_listed_and_refuses_writes_with_the_right_reason(tmp_path):
    store = _three_concepts(tmp_path / "store")
    parts = [store.root, store.root / "concepts", store.root / "tmp", store.root / "concepts.db",
             store.root / "store.lock"]
    with _immutable(*parts):
        opened = ConceptStore(store.root)
        listed = _run_cli("--store", str(store.root), "list")
        with pytest.raises(PersonalVLMError, match="read-only") as refused:
            opened.add(_record("cane"), _memory(), [_picture()])

        assert opened.read_only and opened.names() == ["Fluffy", "keys", "mug"]
        assert torch.equal(opened.load_memory("keys")["memory"], _memory(4.0)["memory"])
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3
        assert "disk space" not in str(refused.value)


def test_an_immutable_folder_is_told_as_a_permission_problem(tmp_path):
    store = _three_concepts(tmp_path / "store")
    with _immutable(store.root / "tmp"):
        with pytest.raises(PersonalVLMError, match="permission denied") as refused:
            store.add(_record("cane"), _memory(), [_picture()])
    assert "disk" not in str(refused.value).split("permission denied")[0]
    assert ConceptStore(store.root).names() == ["Fluffy", "keys", "mug"]


# ---- 8. forget for real ---------------------------------------------------------------------------

def test_forget_leaves_no_trace_of_the_name_in_the_log_while_the_store_stays_open(tmp_path):
    store = ConceptStore(tmp_path / "store")
    watcher = store.watch()                  # a node keeps a connection open for days
    store.add(_record("Grandpa's zebra cane", category="walking aid xq"), _memory(), [_picture()])
    store.add(_record("mug"), _memory(), [_picture()])
    store.forget("Grandpa's zebra cane")

    for path in store.root.glob("concepts.db*"):
        data = path.read_bytes()
        assert b"zebra" not in data and b"walking aid xq" not in data, path.name
    assert watcher.changed() and store.names() == ["mug"]
    watcher.close()


def test_forget_says_when_a_folder_could_not_be_removed_and_retries_on_open(tmp_path):
    store = _three_concepts(tmp_path / "store")
    with contextlib.closing(sqlite3.connect(store.root / "concepts.db")) as db:
        (directory,) = db.execute("SELECT dir FROM concepts WHERE name='keys'").fetchone()
    folder = store.root / "concepts" / directory
    with _immutable(folder):
        result = store.forget("keys")
        assert result.left_behind and str(folder) in result.message and "could not remove" in result.message
        assert store.names() == ["Fluffy", "mug"]
    ConceptStore(store.root)

    assert not folder.exists()


def test_a_folder_holding_a_stranger_file_is_not_removed_with_the_concept(tmp_path):
    store = _three_concepts(tmp_path / "store")
    with contextlib.closing(sqlite3.connect(store.root / "concepts.db")) as db:
        (directory,) = db.execute("SELECT dir FROM concepts WHERE name='keys'").fetchone()
    (store.root / "concepts" / directory / "mine.txt").write_text("keep me")

    result = store.forget("keys")

    assert "mine.txt" in result.message
    assert (store.root / "concepts" / directory / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(store.root / "concepts" / directory)) == ["mine.txt"]


# ---- property: opening any folder never removes or changes what the store did not write ----------

_NAMES = ["concepts", "tmp", "concepts.db", "store.lock", "personal_vlm_store.json", "notes.txt",
          "memory.safetensors", "ref_0.png", "record.json", "essay.md", "concepts.db-wal"]


def _random_tree(rng: random.Random, root: Path, outside: Path, depth: int = 0) -> None:
    for _ in range(rng.randint(0, 4 if depth else 5)):
        name = rng.choice(_NAMES + [uuid.UUID(int=rng.getrandbits(128)).hex])
        path = root / name
        if path.exists() or path.is_symlink():
            continue
        kind = rng.random()
        if kind < 0.35 and depth < 3:
            path.mkdir()
            _random_tree(rng, path, outside, depth + 1)
        elif kind < 0.5:
            target = rng.choice([outside / "dir", outside / "file", outside / "missing"])
            os.symlink(target, path)
        elif kind < 0.6 and name == "personal_vlm_store.json":
            path.write_text(json.dumps({"format": "personal_vlm_node concept store", "version": 3}))
        else:
            path.write_bytes(rng.choice([b"", b"SQLite format 3\x00" + bytes(100), rng.randbytes(rng.randint(1, 300))]))
        if rng.random() < 0.3 and not path.is_symlink():
            os.chmod(path, rng.choice([0o755, 0o644, 0o700, 0o600]))


def test_opening_arbitrary_folders_never_removes_or_changes_a_file_the_store_did_not_write(tmp_path):
    outcomes = {"refused": 0, "opened": 0}
    for seed in range(150):
        rng = random.Random(seed)
        case = tmp_path / f"case{seed}"
        outside = case / "outside"
        (outside / "dir").mkdir(parents=True)
        (outside / "dir" / "precious.txt").write_text("precious")
        (outside / "file").write_text("precious too")
        root = case / "root"
        root.mkdir()
        _random_tree(rng, root, outside)
        before = _snapshot(root, outside)
        # An empty folder (or one holding only empty store folders) becomes a store, made private.
        becomes_store = all(e.name in ("concepts", "tmp", "store.lock") and
                            (not any(e.iterdir()) if e.is_dir() and not e.is_symlink() else e.stat().st_size == 0)
                            for e in root.iterdir() if not e.is_symlink())
        if becomes_store:
            before = {p: what for p, what in before.items() if what[0] != "dir"}
        try:
            store = ConceptStore(root)
            store.names()
            outcomes["opened"] += 1
        except PersonalVLMError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
        changed = _snapshot_unchanged(before, _snapshot(root, outside))
        assert changed == [], f"seed {seed}: {changed}"
    assert outcomes["refused"] > 50 and outcomes["opened"] > 5, outcomes


# ---- 9. look-alike names ---------------------------------------------------------------------------

@pytest.mark.parametrize("lookalike", ["\u043cug", "\uff4d\uff55\uff47", "mug\ufe0f", "Mug"])
def test_a_name_that_looks_like_an_existing_one_is_refused_and_pointed_to_it(tmp_path, lookalike):
    store = ConceptStore(tmp_path / "store")
    store.add(_record("mug"), _memory(), [_picture()])

    with pytest.raises(PersonalVLMError, match="looks like the existing concept 'mug'"):
        store.add(_record(lookalike), _memory(2.0), [_picture()])
    with pytest.raises(PersonalVLMError, match="did you mean 'mug'"):
        store.forget(lookalike)

    assert store.names() == ["mug"]
    store.add(_record("mugs"), _memory(3.0), [_picture()])
    store.add(_record("mug"), _memory(4.0), [_picture()], overwrite=True)
    assert store.names() == ["mug", "mugs"]


def test_a_memory_with_nan_is_never_stored(tmp_path):
    store = ConceptStore(tmp_path / "store")
    memory = _memory()
    memory["memory"][1, 2] = float("inf")

    with pytest.raises(PersonalVLMError, match="NaN or infinite values, so it was not stored"):
        store.add(_record("mug"), memory, [_picture()])

    assert store.names() == [] and os.listdir(store.root / "concepts") == []
