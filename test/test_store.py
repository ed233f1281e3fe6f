"""Behaviour of the on-disk concept store, including what survives a process being killed."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from personal_vlm_node import store as store_module
from personal_vlm_node.store import files as store_files
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.store import MAX_NAME_CHARS, SCHEMA_VERSION, ConceptRecord, ConceptStore, validate_name


def _record(name: str, **fields) -> ConceptRecord:
    values = dict(
        category="mug",
        keywords=["mug", "blue"],
        fingerprint={},
        fingerprint_complete=None,
        memory_tokens=4,
        model_identity="tiny-vlm@r1/float32/layers=2",
        extra={},
    )
    values.update(fields)
    return ConceptRecord(name=name, **values)


def _memory(fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"tokens": torch.full((4, 8), fill)}  # (K_c, D)


def _picture(value: int = 10, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (6, 5), (value, value, value) if mode == "RGB" else value)


def _version_dirs(store: ConceptStore) -> list[str]:
    return sorted(os.listdir(store.root / "concepts"))


def _concept_dir(store: ConceptStore, name: str) -> Path:
    with contextlib.closing(sqlite3.connect(store.root / "concepts.db")) as db:
        (directory,) = db.execute("SELECT dir FROM concepts WHERE name=?", (name,)).fetchone()
    return store.root / "concepts" / directory


def _pixels_equal(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Grandpa's cane", "Grandpa's cane"),
        ("  my mug \u00a0", "my mug"),  # ordinary and no-break spaces
        ("ネコ", "ネコ"),
        ("Fluffy 🐱", "Fluffy 🐱"),
        ("👩\u200d🔬 lab coat", "👩\u200d🔬 lab coat"),  # emoji joined with a zero-width joiner
        ("é" * MAX_NAME_CHARS, "é" * MAX_NAME_CHARS),  # 64 characters, 128 bytes
        ("Cafe\u0301", "Caf\u00e9"),  # decomposed é is stored composed
    ],
)
def test_validate_name_accepts_unicode_and_strips_whitespace(raw, expected):
    assert validate_name(raw) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "x" * (MAX_NAME_CHARS + 1),
        "é" * (MAX_NAME_CHARS + 1),
        "\n",
        "my\nmug",
        "mug\t",
        "a\x00b",
        "a\u202eb",  # right-to-left override, invisible
        "a/b",
        "a\\b",
        ".",
        "..",
        " .. ",
        None,
        42,
        b"mug",
    ],
)
def test_validate_name_rejects_with_project_error(bad):
    with pytest.raises(PersonalVLMError):
        validate_name(bad)


def test_add_rejects_invalid_name_and_writes_nothing(tmp_path):
    store = ConceptStore(tmp_path)
    with pytest.raises(PersonalVLMError, match="must not contain '/'"):
        store.add(_record("../escape"), _memory(), [_picture()])
    assert len(store) == 0
    assert _version_dirs(store) == []
    assert os.listdir(store.root / "tmp") == []


def test_same_name_in_different_unicode_forms_is_one_concept(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("Caf\u00e9"), _memory(), [_picture()])
    assert "Cafe\u0301" in store
    assert store.get("Cafe\u0301").name == "Caf\u00e9"
    with pytest.raises(PersonalVLMError, match="already exists"):
        store.add(_record("Cafe\u0301"), _memory(), [_picture()])


def test_names_never_appear_in_file_names(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("ネコ"), _memory(), [_picture()])
    store.add(_record("Grandpa's cane"), _memory(), [_picture()])
    paths = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    assert not any("ネコ" in p or "Grandpa" in p for p in paths)


# ---------------------------------------------------------------------------- round trip


def test_add_then_read_back_record_memory_and_images_exactly(tmp_path):
    store = ConceptStore(tmp_path)
    memory = {
        "layer0.keys": torch.randn(3, 8).to(torch.bfloat16),  # (K_c, D)
        "token_ids": torch.arange(-5, 7, dtype=torch.int64),  # (12,)
        "scale": torch.tensor(0.25),
    }
    rgb = Image.frombytes("RGB", (4, 3), bytes(range(36)))
    rgba = Image.frombytes("RGBA", (4, 3), bytes(range(100, 148)))
    gray = Image.frombytes("L", (4, 3), bytes(range(200, 212)))
    levels16 = (0, 1, 300, 40000, 65535, 7)
    gray16 = Image.frombytes("I;16", (3, 2), b"".join(v.to_bytes(2, "little") for v in levels16))
    record = _record(
        "Fluffy 🐱",
        category="cat toy",
        keywords=["plush", "ネコ"],
        fingerprint={"color": "grey", "description": "a small plush cat"},
        fingerprint_complete=1700000000.5,
        memory_tokens=3,
        created=1600000000.0,
        extra={"rois": [[0, 0, 4, 3]], "timings_ms": {"encode": 12.5}},
    )

    before = time.time()
    stored = store.add(record, memory, [rgb, rgba, gray, gray16])

    assert stored.name == "Fluffy 🐱"
    assert stored.updated >= before
    assert stored.created == 1600000000.0
    assert store.get("Fluffy 🐱") == stored
    got = store.get("  Fluffy 🐱 ")
    assert (got.category, got.keywords, got.fingerprint, got.fingerprint_complete) == (
        "cat toy", ["plush", "ネコ"], {"color": "grey", "description": "a small plush cat"}, 1700000000.5,
    )
    assert (got.memory_tokens, got.model_identity, got.extra) == (
        3, "tiny-vlm@r1/float32/layers=2", {"rois": [[0, 0, 4, 3]], "timings_ms": {"encode": 12.5}},
    )
    assert store.list() == [stored]
    assert store.names() == ["Fluffy 🐱"]
    assert "Fluffy 🐱" in store and len(store) == 1

    loaded = store.load_memory("Fluffy 🐱")
    assert sorted(loaded) == sorted(memory)
    for key, tensor in memory.items():
        assert loaded[key].dtype == tensor.dtype
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor)

    images = store.load_images("Fluffy 🐱")
    assert [im.mode for im in images] == ["RGB", "RGBA", "L", "I;16"]
    for original, back in zip([rgb, rgba, gray, gray16], images):
        assert _pixels_equal(original, back)


def test_images_in_modes_png_cannot_hold_are_converted(tmp_path):
    store = ConceptStore(tmp_path)
    cmyk = Image.frombytes("CMYK", (2, 2), bytes(range(0, 160, 10)))
    wide = Image.new("I", (2, 1))  # 32-bit integers whose values fit 16 bits
    wide.putpixel((0, 0), 50000)
    wide.putpixel((1, 0), 3)
    store.add(_record("printer test"), _memory(), [cmyk, wide])

    back_cmyk, back_wide = store.load_images("printer test")
    assert _pixels_equal(back_cmyk, cmyk.convert("RGB"))
    assert back_wide.mode == "I;16"
    assert [back_wide.getpixel((0, 0)), back_wide.getpixel((1, 0))] == [50000, 3]


def test_memory_views_of_one_buffer_are_stored_independently(tmp_path):
    store = ConceptStore(tmp_path)
    buffer = torch.arange(10.0)
    store.add(_record("views"), {"all": buffer, "part": buffer[2:4], "same": buffer}, [_picture()])
    loaded = store.load_memory("views")
    assert torch.equal(loaded["all"], buffer)
    assert torch.equal(loaded["part"], torch.tensor([2.0, 3.0]))
    assert torch.equal(loaded["same"], buffer)


def test_add_requires_at_least_one_picture(tmp_path):
    store = ConceptStore(tmp_path)
    with pytest.raises(PersonalVLMError, match="at least one reference picture"):
        store.add(_record("mug"), _memory(), [])
    assert "mug" not in store


def test_list_and_names_are_sorted_by_name(tmp_path):
    store = ConceptStore(tmp_path)
    for name in ["zebra mug", "Apple", "ネコ", "banana"]:
        store.add(_record(name), _memory(), [_picture()])
    assert store.names() == sorted(["zebra mug", "Apple", "ネコ", "banana"])
    assert [r.name for r in store.list()] == store.names()


# ---------------------------------------------------------------------------- replace / forget


def test_adding_existing_name_without_overwrite_raises_and_keeps_original(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(1.0), [_picture(10)])
    with pytest.raises(PersonalVLMError, match="already exists; pass overwrite to replace it"):
        store.add(_record("mug", category="cup"), _memory(2.0), [_picture(20)])
    assert store.get("mug").category == "mug"
    assert torch.equal(store.load_memory("mug")["tokens"], torch.full((4, 8), 1.0))
    assert len(_version_dirs(store)) == 1
    assert os.listdir(store.root / "tmp") == []


def test_overwrite_replaces_memory_and_images_and_removes_old_files(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(1.0), [_picture(10), _picture(11)])
    old_dirs = _version_dirs(store)

    store.add(_record("mug", category="cup"), _memory(2.0), [_picture(20)], overwrite=True)

    assert store.get("mug").category == "cup"
    assert torch.equal(store.load_memory("mug")["tokens"], torch.full((4, 8), 2.0))
    images = store.load_images("mug")
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (20, 20, 20)
    new_dirs = _version_dirs(store)
    assert len(new_dirs) == 1 and new_dirs != old_dirs
    assert len(store) == 1


def test_disk_full_during_add_raises_project_error_and_keeps_old_version(tmp_path, monkeypatch):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(1.0), [_picture(10)])
    kept = _version_dirs(store)

    def disk_full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_files, "_write_png", disk_full)
    with pytest.raises(PersonalVLMError, match="could not save concept 'mug'.*disk is full.*free some space"):
        store.add(_record("mug", category="cup"), _memory(2.0), [_picture(20)], overwrite=True)

    assert store.get("mug").category == "mug"
    assert torch.equal(store.load_memory("mug")["tokens"], torch.full((4, 8), 1.0))
    assert _version_dirs(store) == kept
    assert os.listdir(store.root / "tmp") == []


def test_forget_removes_row_and_every_file(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture(), _picture(3)])
    store.add(_record("keys"), _memory(), [_picture()])

    store.forget("mug")

    assert "mug" not in store
    assert store.names() == ["keys"]
    store.forget("keys")
    assert len(store) == 0
    assert _version_dirs(store) == []
    assert os.listdir(store.root / "tmp") == []
    with pytest.raises(PersonalVLMError, match="no concept named 'mug'"):
        store.get("mug")


def test_forget_unknown_name_raises(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture()])
    with pytest.raises(PersonalVLMError, match="no concept named 'cup'.*'mug'"):
        store.forget("cup")
    assert store.names() == ["mug"]


def test_reads_of_unknown_name_raise_project_error(tmp_path):
    store = ConceptStore(tmp_path)
    for read in (store.get, store.load_memory, store.load_images):
        with pytest.raises(PersonalVLMError, match="no concept named 'ghost'"):
            read("ghost")
    assert "ghost" not in store
    assert "a/b" not in store and 7 not in store


def test_update_fingerprint_sets_fingerprint_time_and_keywords(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", keywords=["mug"]), _memory(), [_picture()])
    before = time.time()

    updated = store.update_fingerprint("mug", {"handle": "left", "description": "blue mug"}, ["mug", "blue"])

    assert updated.fingerprint == {"handle": "left", "description": "blue mug"}
    assert updated.keywords == ["mug", "blue"]
    assert before <= updated.fingerprint_complete <= time.time()
    assert store.get("mug") == updated

    again = store.update_fingerprint("mug", {"description": "a blue mug"})
    assert again.keywords == ["mug", "blue"]  # None keeps the keywords
    assert again.fingerprint == {"description": "a blue mug"}
    with pytest.raises(PersonalVLMError, match="no concept named"):
        store.update_fingerprint("cup", {})


def test_replace_memory_of_the_taught_model_keeps_images_and_merges_extra(tmp_path):
    store = ConceptStore(tmp_path)
    record = _record("mug", extra={"rois": [[1, 2, 3, 4]], "build_ms": 5},
                     model_identity="big-vlm@r2/bfloat16/layers=3")
    store.add(record, _memory(1.0), [_picture(10), _picture(11)])
    old_dirs = _version_dirs(store)
    new_memory = {"layer3.keys": torch.ones(6, 16, dtype=torch.bfloat16)}  # (K_c, D)

    replaced = store.replace_memory(
        "mug", new_memory, "big-vlm@r2/bfloat16/layers=3", 6, extra={"build_ms": 9}
    )

    assert replaced.model_identity == "big-vlm@r2/bfloat16/layers=3"
    assert replaced.memory_tokens == 6
    assert replaced.extra == {"rois": [[1, 2, 3, 4]], "build_ms": 9}
    loaded = store.load_memory("mug")
    assert list(loaded) == ["layer3.keys"] and torch.equal(loaded["layer3.keys"], new_memory["layer3.keys"])
    assert [im.getpixel((0, 0)) for im in store.load_images("mug")] == [(10, 10, 10), (11, 11, 11)]
    assert len(_version_dirs(store)) == 1 and _version_dirs(store) != old_dirs
    with pytest.raises(PersonalVLMError, match="no concept named"):
        store.replace_memory("cup", new_memory, "x", 1)


# ---------------------------------------------------------------------------- persistence & recovery


def test_store_reopened_by_new_instance_sees_everything(tmp_path):
    first = ConceptStore(tmp_path)
    first.add(_record("mug"), _memory(1.0), [_picture(10)])
    first.add(_record("ネコ"), _memory(2.0), [_picture(20), _picture(21)])
    first.update_fingerprint("mug", {"description": "blue"})

    second = ConceptStore(tmp_path)

    assert second.list() == first.list()
    assert torch.equal(second.load_memory("ネコ")["tokens"], torch.full((4, 8), 2.0))
    assert len(second.load_images("ネコ")) == 2
    assert second.get("mug").fingerprint == {"description": "blue"}


def test_default_root_is_under_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert ConceptStore().root == tmp_path / "data" / "personal_vlm"
    assert (tmp_path / "data" / "personal_vlm" / "concepts.db").is_file()

    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ConceptStore().root == tmp_path / "home" / ".local" / "share" / "personal_vlm"


def test_open_removes_what_an_interrupted_write_left_and_nothing_else(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture()])
    kept = _version_dirs(store)
    # A write killed after its staging folder was recorded as pending: the store's own garbage.
    half = "fedcba9876543210fedcba9876543210"
    with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
        db.execute("INSERT INTO pending (dir, since) VALUES (?, 0)", (half,))
        db.commit()
    (store.root / "tmp" / half).mkdir()
    (store.root / "tmp" / half / "ref_0.png").write_bytes(b"\x89PNG")
    # A folder named like a version that the index never recorded: not the store's to remove.
    stranger = store.root / "concepts" / "0123456789abcdef0123456789abcdef"
    stranger.mkdir()
    (stranger / "memory.safetensors").write_bytes(b"somebody else's")

    reopened = ConceptStore(tmp_path)

    assert _version_dirs(reopened) == sorted(kept + [stranger.name])
    assert (stranger / "memory.safetensors").read_bytes() == b"somebody else's"
    assert os.listdir(reopened.root / "tmp") == []
    with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
    assert torch.equal(reopened.load_memory("mug")["tokens"], _memory()["tokens"])


def test_uses_wal_and_refuses_store_from_newer_version(tmp_path):
    ConceptStore(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("PRAGMA user_version=99")
        db.commit()
    with pytest.raises(PersonalVLMError, match="newer personal_vlm_node"):
        ConceptStore(tmp_path)


def test_unreadable_index_raises_project_error(tmp_path):
    (tmp_path / "concepts.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PersonalVLMError, match="unreadable"):
        ConceptStore(tmp_path)


def test_deleted_memory_file_is_reported_and_other_concepts_still_load(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(1.0), [_picture(10)])
    broken_dir = _version_dirs(store)[0]
    store.add(_record("keys"), _memory(2.0), [_picture(20)])
    (store.root / "concepts" / broken_dir / "memory.safetensors").unlink()

    with pytest.raises(PersonalVLMError, match="'mug' is damaged.*forget it and teach it again"):
        store.load_memory("mug")
    assert torch.equal(store.load_memory("keys")["tokens"], torch.full((4, 8), 2.0))
    assert [r.name for r in store.list()] == ["keys", "mug"]

    store.forget("mug")
    assert len(_version_dirs(store)) == 1 and broken_dir not in _version_dirs(store)


def test_truncated_or_missing_files_are_reported_as_damage(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture()])
    store.add(_record("keys"), _memory(), [_picture(), _picture()])
    mug_dir, keys_dir = _concept_dir(store, "mug"), _concept_dir(store, "keys")
    memory_file = mug_dir / "memory.safetensors"
    memory_file.write_bytes(memory_file.read_bytes()[:-7])
    (keys_dir / "ref_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    with pytest.raises(PersonalVLMError, match="'mug' is damaged"):
        store.load_memory("mug")
    with pytest.raises(PersonalVLMError, match="'keys' is damaged"):
        store.load_images("keys")
    assert len(store.load_images("mug")) == 1
    assert torch.equal(store.load_memory("keys")["tokens"], _memory()["tokens"])

    shutil.rmtree(keys_dir)
    with pytest.raises(PersonalVLMError, match="folder .* is missing"):
        store.load_memory("keys")


def test_damaged_index_row_is_reported_and_left_out_of_list(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture()])
    store.add(_record("keys"), _memory(), [_picture()])
    with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
        db.execute("UPDATE concepts SET fingerprint='{not json' WHERE name='mug'")
        db.commit()

    with pytest.raises(PersonalVLMError, match="'mug' is damaged.*forget it and teach it again"):
        store.get("mug")
    assert [r.name for r in store.list()] == ["keys"]
    store.forget("mug")
    assert store.names() == ["keys"] and len(_version_dirs(store)) == 1


def test_writers_on_several_threads_all_land(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("shared"), _memory(-1.0), [_picture()])
    errors = []

    def teach(i: int) -> None:
        try:
            store.add(_record(f"thing {i}"), _memory(float(i)), [_picture(i)])
            store.update_fingerprint(f"thing {i}", {"index": i})
            assert torch.equal(store.load_memory("shared")["tokens"], torch.full((4, 8), -1.0))
        except Exception as e:  # collected so the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=teach, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(store) == 9
    for i in range(8):
        assert store.get(f"thing {i}").fingerprint == {"index": i}
        assert torch.equal(store.load_memory(f"thing {i}")["tokens"], torch.full((4, 8), float(i)))
    assert len(_version_dirs(store)) == 9


# ---------------------------------------------------------------------------- crash safety

# Runs in the killed child. It is a script rather than a test-module function so that the child,
# forked from a server that has already imported torch, starts in milliseconds without importing
# this module. Every version number is unique; the memory is filled with it and the record's
# `extra` says which version, shape and pictures to expect, so a reader can tell whether what it
# sees is one whole version.
_WRITER_SCRIPT = """
import itertools, random
import torch
from PIL import Image
from personal_vlm_node.store import ConceptRecord, ConceptStore

rng = random.Random(seed)
store = ConceptStore(root)
for step in itertools.count():
    version = seed * 1_000_000 + step
    name = rng.choice(["mug", "ネコ", "Grandpa's cane"])
    rows = rng.randint(500, 520)
    memory = {"m": torch.full((rows, 256), float(version))}  # (K_c, D)
    action = rng.random()
    if name in store and action < 0.15:
        store.forget(name)
    elif name in store and action < 0.3:
        store.replace_memory(name, memory, "crash-test", rows, extra={"version": version, "rows": rows})
    elif name in store and action < 0.4:
        store.update_fingerprint(name, {"version": version})
    else:
        n_images = rng.randint(1, 3)
        pictures = [Image.new("L", (16, 16), version % 256) for _ in range(n_images)]
        extra = {"version": version, "rows": rows, "image_version": version, "n_images": n_images}
        record = ConceptRecord(name, "thing", [], {}, None, rows, "crash-test", extra=extra)
        store.add(record, memory, pictures, overwrite=True)
    steps_done.value += 1
"""


def _leftover_count(root: Path) -> int:
    """What a killed writer left for the next open to finish: folders, or only their pending rows."""
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        referenced = {row[0] for row in db.execute("SELECT dir FROM concepts")}
        pending = {row[0] for row in db.execute("SELECT dir FROM pending")}
    return len(set(os.listdir(root / "tmp")) | (set(os.listdir(root / "concepts")) - referenced) | pending)


def _assert_whole_versions(root: Path) -> None:
    store = ConceptStore(root)  # opening collects what the killed writer left behind
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        referenced = {row[0] for row in db.execute("SELECT dir FROM concepts")}
    assert set(os.listdir(root / "concepts")) == referenced
    assert os.listdir(root / "tmp") == []
    with contextlib.closing(sqlite3.connect(root / "concepts.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
    records = store.list()
    assert [r.name for r in records] == store.names()
    for record in records:
        extra = record.extra
        memory = store.load_memory(record.name)
        assert list(memory) == ["m"]
        assert memory["m"].shape == (extra["rows"], 256)
        assert bool((memory["m"] == float(extra["version"])).all())
        assert record.memory_tokens == extra["rows"]
        pictures = store.load_images(record.name)
        assert len(pictures) == extra["n_images"]
        assert all(p.getextrema() == (extra["image_version"] % 256,) * 2 for p in pictures)


def test_killed_writer_leaves_each_concept_whole_or_absent(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "safetensors.torch", "personal_vlm_node.store"]
        # PIL imports these on first save; preloaded, each child skips that.
        + [f"PIL.{plugin}ImagePlugin" for plugin in ("Bmp", "Gif", "Jpeg", "Ppm", "Png")]
    )
    rng = random.Random(1234)
    steps_done = ctx.Value("q", 0, lock=False)  # written by one child at a time
    interrupted_writes = 0
    for round_ in range(30):
        scope = {"root": str(tmp_path), "seed": round_ + 1, "steps_done": steps_done}
        child = ctx.Process(target=exec, args=(_WRITER_SCRIPT, scope), daemon=True)
        # Kill a random time after a random number of completed steps: the moment is random
        # within an operation however fast or slow this machine's disk is.
        wait_for_steps = steps_done.value + rng.randint(0, 3)
        child.start()
        deadline = time.monotonic() + 10.0
        while steps_done.value < wait_for_steps and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.04))
        assert child.is_alive(), "the writer stopped before it was killed"
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert steps_done.value >= wait_for_steps, "the writer made no progress in 10 s"
        interrupted_writes += _leftover_count(tmp_path) > 0
        _assert_whole_versions(tmp_path)
    assert interrupted_writes >= 3, "too few kills landed in the middle of a write"


def test_a_fingerprint_for_a_replaced_version_is_refused(tmp_path):
    store = ConceptStore(tmp_path)
    first = store.add(_record("mug", created=1000.0), _memory(), [_picture()])
    store.add(_record("mug", created=2000.0), _memory(), [_picture()], overwrite=True)
    with pytest.raises(PersonalVLMError, match="replaced"):
        store.update_fingerprint("mug", {"description": "old"}, expected_created=first.created)
    assert store.get("mug").fingerprint == {}
    updated = store.update_fingerprint("mug", {"description": "new"}, expected_created=2000.0)
    assert updated.fingerprint == {"description": "new"}


# ---------------------------------------------------------------------------- sharing one store

QWEN_F32 = "qwen2_5_vl|Qwen/x|main|float32|d64"
QWEN_BF16 = "qwen2_5_vl|Qwen/x|main|bfloat16|d64"
INTERN_F32 = "internvl|OpenGVLab/y|main|float32|d64"


def test_a_store_keeps_one_memory_per_model_and_reads_only_the_asked_models(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(1.0), [_picture()])
    store.replace_memory("mug", _memory(2.0), INTERN_F32, 4)
    assert torch.equal(store.load_memory("mug", model=QWEN_F32)["tokens"], _memory(1.0)["tokens"])
    assert torch.equal(store.load_memory("mug", model=INTERN_F32)["tokens"], _memory(2.0)["tokens"])
    # Rebuilding for one model never replaces another model's memory.
    store.replace_memory("mug", _memory(3.0), QWEN_F32, 4)
    assert torch.equal(store.load_memory("mug", model=INTERN_F32)["tokens"], _memory(2.0)["tokens"])
    assert torch.equal(store.load_memory("mug", model=QWEN_F32)["tokens"], _memory(3.0)["tokens"])
    with pytest.raises(store_module.MemoryMissing, match="no memory for this model"):
        store.load_memory("mug", model="idefics3|other|main|float32|d64")


def test_a_memory_of_the_same_model_in_another_dtype_is_found(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(1.0), [_picture()])
    assert store.has_memory("mug", QWEN_BF16)
    assert torch.equal(store.load_memory("mug", model=QWEN_BF16)["tokens"], _memory(1.0)["tokens"])
    assert not store.has_memory("mug", INTERN_F32)


def test_forget_and_overwrite_remove_every_models_memory(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(1.0), [_picture()])
    store.replace_memory("mug", _memory(2.0), INTERN_F32, 4)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(5.0), [_picture()], overwrite=True)
    assert not store.has_memory("mug", INTERN_F32)
    assert len(_version_dirs(store)) == 1
    store.replace_memory("mug", _memory(2.0), INTERN_F32, 4)
    store.forget("mug")
    assert _version_dirs(store) == []
    assert not store.has_memory("mug", INTERN_F32)


def test_memory_versions_tell_what_changed_for_one_model(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(1.0), [_picture()])
    store.add(_record("cat", model_identity=INTERN_F32), _memory(1.0), [_picture()])
    before = store.memory_versions(QWEN_F32)
    assert set(before) == {"mug"}
    store.replace_memory("cat", _memory(2.0), QWEN_F32, 4)
    after = store.memory_versions(QWEN_F32)
    assert set(after) == {"mug", "cat"} and after["mug"] == before["mug"]


def test_a_store_written_by_format_1_opens_and_keeps_its_concepts(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug", model_identity=QWEN_F32), _memory(1.0), [_picture()])
    with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
        db.execute("DROP TABLE memories")
        db.execute("PRAGMA user_version=1")
        db.commit()
    reopened = ConceptStore(tmp_path)
    assert reopened.names() == ["mug"]
    assert torch.equal(reopened.load_memory("mug", model=QWEN_F32)["tokens"], _memory(1.0)["tokens"])
    reopened.replace_memory("mug", _memory(2.0), INTERN_F32, 4)
    assert reopened.has_memory("mug", INTERN_F32)


def test_the_watcher_sees_a_commit_of_another_store_object(tmp_path):
    store = ConceptStore(tmp_path)
    watcher = store.watch()
    assert watcher.changed() is False
    ConceptStore(tmp_path).add(_record("mug"), _memory(), [_picture()])
    assert watcher.changed() is True
    assert watcher.changed() is False
    ConceptStore(tmp_path).forget("mug")
    assert watcher.changed() is True
    watcher.close()


def test_a_read_racing_a_forget_never_raises_a_raw_error(tmp_path, monkeypatch):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [_picture()])
    real_load = store_files._read_memory

    def load_after_forget(path):
        # The version being read goes away between reading the row and the file, after the file
        # was opened: torch then fails to reopen it by path with a RuntimeError.
        if "mug" in store:
            ConceptStore(tmp_path).forget("mug")
            raise RuntimeError(f"unable to open file <{path}>: No such file or directory")
        return real_load(path)

    monkeypatch.setattr(store_files, "_read_memory", load_after_forget)
    with pytest.raises(PersonalVLMError, match="no concept named 'mug'"):
        store.load_memory("mug")


def test_a_memory_file_deleted_after_it_was_opened_is_still_read(tmp_path):
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(7.0), [_picture()])
    path = _concept_dir(store, "mug") / "memory.safetensors"
    tensors = store_files._read_memory(path)
    path.unlink()
    assert torch.equal(tensors["tokens"], _memory(7.0)["tokens"])


# ---------------------------------------------------------------------------- privacy


def test_store_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = ConceptStore(tmp_path / "s")
        store.add(_record("mug"), _memory(), [_picture()])
        store.replace_memory("mug", _memory(2.0), INTERN_F32, 4)
    finally:
        os.umask(old)
    root = tmp_path / "s"
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode == 0o600, (path, oct(mode))


def test_forgotten_text_does_not_linger_in_the_index_file(tmp_path):
    store = ConceptStore(tmp_path)
    secret = "grandmother's insulin pen xyzzy"
    store.add(_record("mug"), _memory(), [_picture()])
    store.add(_record("pen", category="medical", keywords=[secret]), _memory(), [_picture()])

    def checkpoint():
        with contextlib.closing(sqlite3.connect(tmp_path / "concepts.db")) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    checkpoint()                                   # the row now lives in the database file itself
    assert secret.encode() in (tmp_path / "concepts.db").read_bytes()
    store.forget("pen")
    checkpoint()
    assert secret.encode() not in (tmp_path / "concepts.db").read_bytes()


@pytest.mark.parametrize("bad", ["\u200d", "\u200d\u200c\u200d", " \u200b "])
def test_names_of_only_invisible_characters_are_refused(bad):
    with pytest.raises(PersonalVLMError):
        validate_name(bad)


def test_names_with_characters_newer_than_pythons_tables_are_accepted():
    newer = "\U0001FAE9"   # an emoji assigned after the Unicode version of some Pythons
    assert validate_name(f"face {newer}") == f"face {newer}"


@pytest.mark.parametrize("bad", ["mug\x1b[31m", "a\x07b", "x\u202ey"])
def test_categories_with_control_characters_are_refused(tmp_path, bad):
    store = ConceptStore(tmp_path)
    with pytest.raises(PersonalVLMError, match="category"):
        store.add(_record("mug", category=bad), _memory(), [_picture()])
    assert store.names() == []


def test_an_encoded_photo_is_kept_byte_for_byte_and_read_back_upright(tmp_path):
    import io

    from PIL import ImageOps

    from personal_vlm_node.images import load_image

    sensor = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # view rotated 90° clockwise
    buffer = io.BytesIO()
    sensor.save(buffer, format="JPEG", exif=exif.tobytes(), quality=90)
    original = buffer.getvalue()
    store = ConceptStore(tmp_path)
    store.add(_record("mug"), _memory(), [load_image(original), _picture()])
    directory = _concept_dir(store, "mug")
    assert sorted(p.name for p in directory.iterdir()) == ["memory.safetensors", "record.json", "ref_0.jpg", "ref_1.png"]
    assert (directory / "ref_0.jpg").read_bytes() == original
    first, second = store.load_images("mug")
    assert first.size == (20, 40) and second.size == (6, 5)
    store.replace_memory("mug", _memory(2.0), "tiny-vlm@r1/float32/layers=2", 4)
    assert (_concept_dir(store, "mug") / "ref_0.jpg").read_bytes() == original
    assert ImageOps.exif_transpose(first).size == (20, 40)


@pytest.mark.parametrize("bad", ["y" * 5000 + "\x07", "\x07" + "y" * 5000, "\u200d" * 5000])
def test_a_refused_long_name_is_not_echoed_whole(bad):
    # A client sending a 5,000-character name must not get it back in the reply, the log or a terminal.
    with pytest.raises(PersonalVLMError) as refused:
        validate_name(bad)
    assert len(str(refused.value)) < 300
    assert "U+0007" in str(refused.value) or "invisible" in str(refused.value)
