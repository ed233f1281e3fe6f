"""Ego concept introduction, recognition and asking, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from personal_vlm_node import ego, r2p
from personal_vlm_node.assistant import Assistant
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.profiles import ModelProfile, default_layers, load_profile, profile_filename
from personal_vlm_node.store import ConceptStore
from personal_vlm_node.testing.kit import photo


# ---- the method's maths -------------------------------------------------------------------
@pytest.mark.parametrize("roi", [(0, 0, float("nan"), 10), (float("inf"), 0, 5, 5), (0, float("-inf"), 5, 5)])
def test_non_finite_rois_are_refused_with_a_project_error(roi):
    with pytest.raises(PersonalVLMError, match="finite"):
        ego.check_roi(roi, (300, 200))


def test_a_roi_partly_outside_the_image_is_clipped_to_it():
    assert ego.check_roi((-50, -20, 100, 100), (300, 200)) == (0, 0, 50, 80)


def test_a_roi_smaller_than_the_floor_still_gives_the_floor_of_tokens_nearest_it():
    boxes = torch.tensor([[x, y, x + 10, y + 10] for y in range(0, 40, 10) for x in range(0, 40, 10)],
                         dtype=torch.float32)      # (16, 4): a 4×4 grid of 10-pixel tokens
    mask = ego.roi_mask(boxes, (31, 31, 2, 2), floor=4)
    assert int(mask.sum()) == 4
    assert mask[15] and mask[14] and mask[11]      # the corner token and its neighbours
    assert int(ego.roi_mask(boxes, (0, 0, 40, 40), floor=4).sum()) == 16


@pytest.mark.parametrize("area, n, expected", [
    (50.0, 64, 32), (10.0, 64, 6), (1.0, 64, 4), (100.0, 64, 32), (None, 64, 32), (30.0, 10, 4), (50, 3, 3),
])
def test_memory_size_follows_the_area_with_a_floor_and_a_cap(area, n, expected):
    assert ego.memory_size(area, n, max_tokens=32, min_tokens=4) == expected


def test_selected_tokens_are_the_top_k_in_spatial_order_and_respect_eligibility():
    importance = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    assert ego.select_tokens(importance, 3, torch.ones(6, dtype=torch.bool)).tolist() == [1, 3, 5]
    eligible = torch.tensor([True, False, True, True, True, False])
    assert ego.select_tokens(importance, 2, eligible).tolist() == [2, 3]
    assert ego.select_tokens(importance, 10, eligible).tolist() == [0, 2, 3, 4]


def test_roi_mask_keeps_tokens_whose_centre_is_inside():
    boxes = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]], dtype=torch.float)
    assert ego.roi_mask(boxes, (8, 0, 12, 10)).tolist() == [False, True, False, False]
    assert ego.roi_mask(boxes, None).all()
    # An ROI smaller than a token still selects the token it overlaps.
    assert ego.roi_mask(boxes, (1, 1, 2, 2)).tolist() == [True, False, False, False]


@pytest.mark.parametrize("roi", [(0, 0, 0, 5), (-10, 0, 5, 5), (400, 0, 5, 5), (0, 0, -3, 4)])
def test_invalid_rois_are_refused(roi):
    with pytest.raises(PersonalVLMError, match="region of interest"):
        ego.check_roi(roi, (300, 200))
    assert ego.check_roi((0, 0, 0, 0), (300, 200)) is None
    assert ego.check_roi((250, 150, 100, 100), (300, 200)) == (250, 150, 50, 50)


@pytest.mark.parametrize("text, keywords, area", [
    ('{"keywords": ["red", "ceramic", "mug"], "area": 30}', ["red", "ceramic", "mug"], 30.0),
    ('Sure! ```json\n{"keywords": ["red", "mug",], "area": "45%"}\n```', ["red", "mug"], 45.0),
    ("{'keywords': ['striped', 'cat'], 'area': 12}", ["striped", "cat"], 12.0),
    ('{"keywords": "wooden, cane, curved handle", "area": 250}', ["wooden", "cane", "curved handle"], None),
    ('{"keywords": ["blue", "bottle"', ["blue", "bottle"], None),
    ("Keywords: green, plastic, bottle. It covers about 20% of the image.", ["green", "plastic", "bottle"], 20.0),
    ("", [], None),
    ("\x00\x01{{{{", [], None),
])
def test_introduction_answers_are_parsed_robustly(text, keywords, area):
    assert ego.parse_introduction(text) == (keywords, area)


def test_fingerprint_answers_are_parsed_robustly():
    good = r2p.parse_fingerprint('{"shape": "cylinder", "material": "ceramic", "colour": "red", '
                                 '"pattern": "none", "description": "A red mug."}')
    assert good == {"attributes": {"shape": "cylinder", "material": "ceramic", "color": "red"},
                    "description": "A red mug."}
    broken = r2p.parse_fingerprint('shape: round\nmaterial: plush,\n"description": "A toy cat')
    assert broken["attributes"] == {"shape": "round", "material": "plush"}
    assert isinstance(broken["description"], str)
    assert r2p.parse_fingerprint("") == {"attributes": {}, "description": ""}


def test_keyword_spans_locate_keywords_in_the_answer():
    answer = '{"keywords": ["Red", "mug"]}'
    assert ego.keyword_spans(answer, ["red", "mug", "absent"]) == [(15, 18), (22, 25)]


def test_default_layers_are_middle_to_late_and_profiles_load(tmp_path):
    assert default_layers(4) == [2, 3]
    assert default_layers(36) == [18, 21, 24, 27]
    assert profile_filename("Qwen/Qwen2.5-VL-3B-Instruct") == "qwen2.5-vl-3b-instruct.yaml"
    path = tmp_path / "p.yaml"
    path.write_text("layers: [1, 2]\nmax_memory_tokens: 16\n")
    profile = load_profile("x", path)
    assert profile.layers == [1, 2] and profile.max_memory_tokens == 16
    path.write_text("layerz: [1]\n")
    with pytest.raises(PersonalVLMError, match="unknown keys"):
        load_profile("x", path)
    with pytest.raises(PersonalVLMError, match="layers"):
        ModelProfile(layers=[9]).resolved_layers(4)


# ---- end to end, every family -----------------------------------------------------------
@pytest.fixture
def assistant_for(adapters, tmp_path):
    made = []

    def make(family, store_dir=None, **profile):
        profile = ModelProfile(**{"max_memory_tokens": 8, "min_memory_tokens": 2, **profile})
        assistant = Assistant(adapters(family), ConceptStore(store_dir or tmp_path / "store"), profile,
                              progress=messages.append)
        made.append(assistant)
        return assistant

    messages: list[str] = []
    make.messages = messages
    yield make
    for assistant in made:
        assistant.close()


def test_teach_recognize_ask_forget_and_reload(assistant_for, family, tmp_path):
    a = assistant_for(family, max_concepts_in_context=2)
    mug, cat, cane = photo(1), photo(2), photo(3)

    one = a.teach("my mug", [mug], category="mug")
    assert one.memory_tokens == a.store.get("my mug").memory_tokens
    assert 2 <= one.memory_tokens <= 8
    assert set(one.timings) >= {"encode", "describe", "attention", "store", "usable"}
    fingerprint = one.wait_fingerprint(timeout=120)
    assert set(fingerprint) >= {"attributes", "description"}
    assert a.store.get("my mug").fingerprint_complete is not None

    three = a.teach("Fluffy", [cat, photo(4), photo(5)])
    memory = a.store.load_memory("Fluffy")
    assert memory["image_index"].unique().tolist() == [0, 1, 2]
    assert three.memory_tokens == memory["memory"].shape[0] <= 3 * 8
    for r in range(3):   # each image's tokens are in spatial order
        positions = memory["positions"][memory["image_index"] == r]
        assert torch.equal(positions, positions.sort().values)

    roi = (150, 100, 150, 100)     # bottom-right quarter
    a.teach("Grandpa's cane", [cane], rois=[roi])
    stored = a.store.load_memory("Grandpa's cane")
    centres_x = (stored["boxes"][:, 0] + stored["boxes"][:, 2]) / 2
    centres_y = (stored["boxes"][:, 1] + stored["boxes"][:, 3]) / 2
    assert (centres_x >= 150).all() and (centres_y >= 100).all()
    tokens = a.vlm.encode_image(cane)
    assert torch.allclose(stored["memory"], tokens.features[stored["positions"]].float(), atol=1e-5)

    # The similarity filter puts at most M concepts in context, and the best match among them.
    answer = a.ask("Where is my mug?", mug)
    assert len(answer.concepts) == 2 and "my mug" in answer.concepts
    assert isinstance(answer.answer, str)

    recognitions = a.recognize(cat, names=["Fluffy", "my mug"])
    assert {r.name for r in recognitions} == {"Fluffy", "my mug"}
    assert all(0.0 <= r.p_yes <= 1.0 and r.present == (r.p_yes >= 0.5) for r in recognitions)

    a.forget("my mug")
    assert "my mug" not in a.store and "my mug" not in a.matcher.names
    assert "my mug" not in a.ask("Where is my mug?", mug).concepts
    with pytest.raises(PersonalVLMError, match="no concept"):
        a.recognize(mug, names=["my mug"])

    reloaded = assistant_for(family)   # a restart: same store, new instance
    assert sorted(r.name for r in reloaded.concepts()) == ["Fluffy", "Grandpa's cane"]
    assert sorted(reloaded.matcher.names) == ["Fluffy", "Grandpa's cane"]
    assert reloaded.ask("Is Fluffy here?", cat).concepts[0] in {"Fluffy", "Grandpa's cane"}


def test_ask_prompt_size_does_not_grow_with_the_library(assistant_for, monkeypatch):
    a = assistant_for("idefics3", max_concepts_in_context=2)
    lengths = []
    original = a.vlm.generate

    def spy(parts, **kwargs):
        result = original(parts, **kwargs)
        lengths.append(result.prompt.input_ids.shape[1])
        return result

    monkeypatch.setattr(a.vlm, "generate", spy)
    for i in range(2):
        a.teach(f"thing {i}", [photo(10 + i)])
    a.ask("What is here?", photo(10))
    small = lengths[-1]
    for i in range(2, 7):
        a.teach(f"thing {i}", [photo(10 + i)])
    a.ask("What is here?", photo(10))
    assert lengths[-1] <= small + 2 * 8       # still two memories of at most K tokens


def test_memories_of_another_model_are_rebuilt_not_matched(assistant_for, family):
    a = assistant_for(family)
    a.teach("my mug", [photo(1)])
    old = a.store.load_memory("my mug")["memory"]
    # As if it had been taught with another model: only that model's memory is stored.
    record = a.store.get("my mug")
    record.model_identity = "some|other|model"
    a.store.add(record, {"memory": torch.zeros(3, 17)}, a.store.load_images("my mug"), overwrite=True)
    b = assistant_for(family)
    assert any("rebuilding the memory of 'my mug'" in m for m in assistant_for.messages)
    assert b.store.get("my mug").model_identity == "some|other|model"   # that one is kept
    rebuilt = b.store.load_memory("my mug", model=b.vlm.identity)["memory"]
    assert rebuilt.shape[1] == b.vlm.hidden_size
    assert torch.allclose(rebuilt, old, atol=1e-5)   # same model, same references → same memory


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "a/b", "a\\b", "line\nbreak", "nul\x00", "..", 42])
def test_teach_refuses_invalid_names_and_keeps_the_store(assistant_for, name):
    a = assistant_for("internvl")
    a.teach("keep me", [photo(1)])
    with pytest.raises(PersonalVLMError):
        a.teach(name, [photo(2)])
    assert [r.name for r in a.concepts()] == ["keep me"]


def test_teach_refuses_bad_requests_clearly(assistant_for):
    a = assistant_for("internvl")
    a.teach("my mug", [photo(1)])
    with pytest.raises(PersonalVLMError, match="already exists"):
        a.teach("my mug", [photo(2)])
    with pytest.raises(PersonalVLMError, match="at least one"):
        a.teach("empty", [])
    with pytest.raises(PersonalVLMError, match="regions of interest"):
        a.teach("two rois", [photo(2)], rois=[(0, 0, 5, 5), (0, 0, 5, 5)])
    unreadable = r"^images\[1\]: the image data is not a readable image \(Pillow recognises no image format"
    with pytest.raises(PersonalVLMError, match=unreadable):
        a.teach("corrupt", [photo(2), b"not an image"])
    with pytest.raises(PersonalVLMError, match="question is empty"):
        a.ask("  ", photo(1))
    with pytest.raises(PersonalVLMError, match="over 1000"):
        a.ask("?" * 1001, photo(1))
    replaced = a.teach("my mug", [photo(3), photo(4)], overwrite=True)
    assert a.store.load_memory("my mug")["image_index"].max() == 1
    assert replaced.memory_tokens == a.store.get("my mug").memory_tokens


def test_teach_add_gives_a_concept_more_views_and_keeps_its_fingerprint(assistant_for):
    a = assistant_for("qwen2_5_vl")
    first = a.teach("my mug", [photo(1)])
    fingerprint = first.wait_fingerprint(timeout=120)
    k1 = first.memory_tokens
    more = a.teach("my mug", [photo(2), photo(3)], add=True)
    memory = a.store.load_memory("my mug")
    assert memory["image_index"].unique().tolist() == [0, 1, 2]
    assert more.memory_tokens == memory["memory"].shape[0] > k1
    assert len(a.store.load_images("my mug")) == 3
    assert a.store.get("my mug").fingerprint == fingerprint
    assert more.wait_fingerprint(timeout=1) == fingerprint
    with pytest.raises(PersonalVLMError, match="at most"):
        a.teach("my mug", [photo(4)] * 6, add=True)


def test_joint_recognition_scores_every_asked_name(assistant_for):
    a = assistant_for("internvl", recognition="joint", max_concepts_in_context=3)
    a.teach("my mug", [photo(1)])
    a.teach("Fluffy", [photo(2)])
    results = a.recognize(photo(1), names=["my mug"])
    assert [r.name for r in results] == ["my mug"] and 0.0 <= results[0].p_yes <= 1.0
