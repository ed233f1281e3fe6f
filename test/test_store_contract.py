"""What every concept-library backend must do, asked only through ConceptLibrary's operations.

Each test runs once per backend in ``BACKENDS``; a new backend adds a factory there and is held to
the same behaviour as the local folder store.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.store import ConceptLibrary, ConceptRecord, ConceptStore, model_key

MODEL_A = "qwen2_5_vl|tiny-vlm|r1|float32|d64"
MODEL_A_BF16 = "qwen2_5_vl|tiny-vlm|r1|bfloat16|d64"
MODEL_B = "qwen2_5_vl|other-vlm|r7|float32|d96"


def _local(tmp_path):
    return ConceptStore(tmp_path / "library")


def _postgres(tmp_path, request):
    from personal_vlm_node.store.postgres import PostgresLibrary

    made = PostgresLibrary(request.getfixturevalue("library_url"), cache_dir=tmp_path / "offline")
    request.addfinalizer(made.close)
    return made


BACKENDS = {"local": lambda tmp_path, request: _local(tmp_path), "postgres": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def library(request, tmp_path) -> ConceptLibrary:
    made = BACKENDS[request.param](tmp_path, request)
    assert isinstance(made, ConceptLibrary)
    return made


def _concept(name: str, model: str = MODEL_A, tokens: int = 4, fill: float = 1.0):
    record = ConceptRecord(name=name, category="mug", keywords=["blue", "mug"], fingerprint={},
                           fingerprint_complete=None, memory_tokens=tokens, model_identity=model,
                           extra={"rois": [None]})
    memory = {"tokens": torch.full((tokens, 8), fill)}      # (K_c, D)
    picture = Image.new("RGB", (6, 5), (int(fill * 10) % 256, 20, 30))
    return record, memory, [picture]


def test_a_taught_concept_reads_back_as_it_was_given(library):
    record, memory, pictures = _concept("my mug", fill=2.5)
    library.add(record, memory, pictures)
    got = library.get("my mug")
    assert (got.name, got.category, got.keywords, got.memory_tokens) == ("my mug", "mug", ["blue", "mug"], 4)
    assert got.extra == {"rois": [None]}
    assert torch.equal(library.load_memory("my mug", MODEL_A)["tokens"], memory["tokens"])
    [image] = library.load_images("my mug")
    assert image.tobytes() == pictures[0].tobytes()
    assert "my mug" in library and "your mug" not in library and len(library) == 1


def test_names_are_sorted_and_list_matches_them(library):
    for name in ("zebra", "Apple", "mango"):
        library.add(*_concept(name))
    assert library.names() == sorted(["zebra", "Apple", "mango"])
    assert [r.name for r in library.list()] == library.names()
    assert library.problems() == {}


def test_adding_a_taken_name_is_refused_and_overwrite_replaces_it(library):
    library.add(*_concept("keys", fill=1.0))
    with pytest.raises(PersonalVLMError, match="keys"):
        library.add(*_concept("keys", fill=3.0))
    assert library.load_memory("keys", MODEL_A)["tokens"][0, 0].item() == 1.0
    library.add(*_concept("keys", fill=3.0), overwrite=True)
    assert library.load_memory("keys", MODEL_A)["tokens"][0, 0].item() == 3.0


def test_look_alike_and_invalid_names_are_refused_before_any_write(library):
    library.add(*_concept("mug"))
    with pytest.raises(PersonalVLMError, match="looks like"):
        library.check_new_name("\u043cug")          # Cyrillic м
    with pytest.raises(PersonalVLMError):
        library.check_new_name("   ")
    assert library.check_new_name("  cup ") == "cup"
    assert library.names() == ["mug"]


def test_forget_removes_the_concept_and_says_what_it_removed(library):
    library.add(*_concept("cane"))
    result = library.forget("cane")
    assert result.name == "cane"
    assert "cane" not in library and library.names() == []
    with pytest.raises(PersonalVLMError, match="cane"):
        library.get("cane")
    with pytest.raises(PersonalVLMError, match="cane"):
        library.forget("cane")


def test_a_completed_fingerprint_lands_only_on_the_version_it_was_computed_for(library):
    library.add(*_concept("ball"))
    created = library.get("ball").created
    updated = library.update_fingerprint("ball", {"color": "red"}, keywords=["red"], expected_created=created)
    assert updated.fingerprint == {"color": "red"} and updated.keywords == ["red"]
    assert updated.fingerprint_complete is not None
    library.add(*_concept("ball", fill=4.0), overwrite=True)
    with pytest.raises(PersonalVLMError, match="replaced"):
        library.update_fingerprint("ball", {"color": "blue"}, expected_created=created)
    assert library.get("ball").fingerprint == {}


def test_memories_of_two_models_live_side_by_side(library):
    library.add(*_concept("hat", model=MODEL_A, fill=1.0))
    library.replace_memory("hat", {"tokens": torch.full((6, 8), 9.0)}, MODEL_B, 6)
    assert library.has_memory("hat", MODEL_A) and library.has_memory("hat", MODEL_B)
    assert library.load_memory("hat", MODEL_A)["tokens"].shape == (4, 8)
    assert library.load_memory("hat", MODEL_B)["tokens"][0, 0].item() == 9.0
    # Precision is not part of a memory's key.
    assert model_key(MODEL_A) == model_key(MODEL_A_BF16)
    assert library.has_memory("hat", MODEL_A_BF16)
    assert library.memory_models("hat") == [MODEL_A, MODEL_B]


def test_memory_versions_change_only_for_the_replaced_memory(library):
    library.add(*_concept("bag"))
    library.add(*_concept("bottle"))
    before = library.memory_versions(MODEL_A)
    assert sorted(before) == ["bag", "bottle"]
    library.replace_memory("bag", {"tokens": torch.zeros(4, 8)}, MODEL_A, 4)
    after = library.memory_versions(MODEL_A)
    assert after["bottle"] == before["bottle"] and after["bag"] != before["bag"]
    assert library.memory_versions(MODEL_B) == {}


def test_the_watcher_sees_each_commit_once(library):
    watcher = library.watch()
    try:
        assert watcher.changed() is False
        library.add(*_concept("toy"))
        assert watcher.changed() is True
        assert watcher.changed() is False
        library.forget("toy")
        assert watcher.changed() is True
    finally:
        watcher.close()


def test_location_names_where_the_concepts_are(library, tmp_path):
    assert str(tmp_path) in library.location() or "://" in library.location()
