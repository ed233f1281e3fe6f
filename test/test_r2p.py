"""R2P on fingerprints: retrieval, chain of thought, attribute verification, pairwise reasoning."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from personal_vlm_node import r2p, r2p_text
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.r2p import Candidate, ImageTextSimilarity, R2PVerifier, cascade_decision, unit
from personal_vlm_node.testing.kit import photo
from personal_vlm_node.testing.tiny_clip import build_tiny_clip
from personal_vlm_node.vlm.base import Generation


@pytest.fixture(scope="session")
def tiny_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    return {kind: build_tiny_clip(root / kind, kind) for kind in ("clip", "siglip")}


@pytest.fixture(scope="session")
def clip(tiny_clips):
    return ImageTextSimilarity(str(tiny_clips["clip"]), device="cpu")


MUG = {"attributes": {"shape": "cylinder", "material": "ceramic", "color": "red"}, "description": "A red mug."}
CAT = {"attributes": {"color": "white", "pattern": "striped", "distinct_features": "long tail"},
       "description": "A white striped cat."}
CANE = {"attributes": {"material": "wooden", "shape": "curved handle"}, "description": ""}


def _candidates(vlm):
    """Four concepts; the last one's fingerprint is still pending."""
    memories = [vlm.encode_image(photo(seed)).features[:4] for seed in (11, 12, 13, 14)]   # (4, D) each
    return [Candidate("my mug", 0.6, MUG, memories[0]), Candidate("Fluffy", 0.2, CAT, memories[1]),
            Candidate("Grandpa's cane", -0.1, CANE, memories[2]), Candidate("new thing", 0.3, {}, memories[3])]


def _stub_reasoning(monkeypatch, vlm, text):
    calls = []

    def generate(parts, max_new_tokens=64, system=None):
        calls.append(parts)
        return Generation(text, [], None)

    monkeypatch.setattr(vlm, "generate", generate)
    return calls


def _count_yes_no(monkeypatch, vlm):
    calls = []
    original = vlm.yes_probability

    def yes_probability(parts, system=None):
        calls.append(parts)
        return original(parts, system=system)

    monkeypatch.setattr(vlm, "yes_probability", yes_probability)
    return calls


# ---- parsing the chain of thought ---------------------------------------------------------
NAMES = ["my mug", "Fluffy", "Grandpa's cane"]


@pytest.mark.parametrize("text, answer, seen", [
    ('{"reasoning": "red, ceramic", "answer": "my mug", "seen_attributes": ["red", "ceramic"]}',
     "my mug", ["red", "ceramic"]),
    ("Sure! ```json\n{'reasoning': 'fur', 'answer': 'Fluffy', 'seen_attributes': ['white fur',],}\n```",
     "Fluffy", ["white fur"]),
    ('{"reasoning": "wood", "answer": "Grandpa\'s cane", "seen_attributes": ["wooden"', "Grandpa's cane", ["wooden"]),
    ("{'seen_attributes': ['wooden'], 'answer': 'Grandpa's cane'}", "Grandpa's cane", ["wooden"]),
    ("The mug is red, the cat is white. So the answer is Fluffy.", "Fluffy", []),
    ("Seen attributes: wooden, curved. Answer: 3", "Grandpa's cane", ["wooden", "curved"]),
    ('{"seen_attributes": "red; cylinder", "answer": "MY MUG"}', "my mug", ["red", "cylinder"]),
    ('{"reasoning": "the second one", "answer": 2}', "Fluffy", []),
    ('{"notes": "a red cup", "answer": "It is my mug"}', "my mug", []),
    ('{"seen_attributes": ["brown"], "answer": "the dog Rex"}', None, ["brown"]),
    ('{"seen_attributes": [], "answer": "none"}', None, []),
    ('{"reasoning": "nothing fits", "answer": null}', None, []),
    ('{"reasoning": "?", "answer": 7}', None, []),
    ('{"seen_attributes": {"my mug": ["red"], "Fluffy": []}, "reasoning": "only the mug is red"', None, ["red"]),
    ("answer: none of them", None, []),
    ("I cannot tell.", None, []),
    ("", None, []),
    ("\x00\x01{{{{[", None, []),
])
def test_broken_reasoning_output_is_parsed_robustly(text, answer, seen):
    assert r2p.parse_reasoning(text, NAMES) == (answer, seen)


@pytest.mark.parametrize("text, seen", [
    ('{"answer": "my mug", "seen_attributes": ["red"], "reasoning": "it is red"}', ["red"]),
    ("{'answer': 'Grandpa's cane', 'seen_attributes': ['wooden']}", ["wooden"]),
    ('{"answer": 2}', []),
    ("Answer: 3. Seen attributes: wooden, curved", ["wooden", "curved"]),
    ("Sure! The answer is Fluffy.", []),
])
def test_an_answer_given_before_its_reasoning_is_refused(text, seen):
    reading = r2p.read_reasoning(text, NAMES)
    assert (reading.answer, reading.seen) == (None, seen)
    assert reading.refused == r2p_text.ANSWER_FIRST


def test_the_reasoning_as_the_prompt_asks_for_it_is_read_with_its_per_candidate_attributes():
    text = ('{"seen_attributes": {"my mug": ["red", "ceramic"], "Fluffy": []}, '
            '"reasoning": "only my mug has every attribute", "answer": "my mug"}')
    assert r2p.read_reasoning(text, NAMES) == r2p_text.Reading("my mug", ["red", "ceramic"])
    assert r2p.parse_seen_by_candidate(text, NAMES) == {"my mug": ["red", "ceramic"], "Fluffy": []}


def test_names_resolve_exactly_by_index_or_inside_a_phrase_and_the_longest_wins():
    names = ["mug", "my mug", "Fluffy"]
    assert r2p.resolve_name("  'My Mug'. ", names) == "my mug"
    assert r2p.resolve_name("It is my mug", names) == "my mug"          # "mug" is inside "my mug"
    assert r2p.resolve_name("the mug or Fluffy", names) is None          # two names: no answer
    assert r2p.resolve_name(3, names) == "Fluffy" and r2p.resolve_name(0, names) is None
    assert r2p.resolve_name(True, names) is None and r2p.resolve_name(2.5, names) is None
    assert r2p.resolve_name("Fluffyish", names) is None


def test_seen_attributes_map_to_the_keys_they_name_or_quote():
    candidates = [Candidate("my mug", 0.0, MUG, torch.zeros(1, 4)), Candidate("Fluffy", 0.0, CAT, torch.zeros(1, 4))]
    assert r2p.seen_keys(["red", "colour: white"], candidates) == ["color"]
    assert r2p.seen_keys(["Shape", "long tail", "something else"], candidates) == ["shape", "distinct_features"]
    assert r2p.seen_keys(["cer"], candidates) == ["material"]       # a piece of a value
    assert r2p.seen_keys([], candidates) == []


# ---- the cascade -------------------------------------------------------------------------
@pytest.mark.parametrize("match, p_yes, expected", [
    ("accept", None, "accept"), ("reject", None, "reject"), ("accept", 0.01, "accept"),
    ("uncertain", 0.9, "accept"), ("uncertain", 0.65, "accept"), ("uncertain", 0.64, "r2p"),
    ("uncertain", 0.5, "r2p"), ("uncertain", 0.36, "r2p"), ("uncertain", 0.35, "reject"), ("uncertain", 0.0, "reject"),
])
def test_cascade_hands_only_ego_uncertain_cases_to_r2p(match, p_yes, expected):
    assert cascade_decision(match, p_yes, margin=0.15) == expected


def test_cascade_margin_zero_never_runs_r2p_and_bad_inputs_are_refused():
    assert cascade_decision("uncertain", 0.5, margin=0.0) == "accept"
    assert cascade_decision("uncertain", 0.7, margin=0.1, threshold=0.75) == "r2p"
    with pytest.raises(ValueError, match="p_yes"):
        cascade_decision("uncertain", None)
    with pytest.raises(ValueError, match="match decision"):
        cascade_decision("maybe", 0.5)
    with pytest.raises(PersonalVLMError, match="margin"):
        cascade_decision("uncertain", 0.5, margin=-0.1)


# ---- image–text similarity ----------------------------------------------------------------
def test_clip_cosines_equal_the_models_own_logits(clip):
    image, texts = photo(1), ["a photo of red", "A red mug.", "a photo of long tail"]
    cosines = clip.scores(image, texts)
    assert cosines.shape == (3,) and bool(((cosines >= -1) & (cosines <= 1)).all())
    inputs = clip.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = clip.image_processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=pixels["pixel_values"])
    expected = out.logits_per_image[0] / clip.model.logit_scale.exp()
    assert torch.allclose(cosines, expected, atol=1e-5)
    # Cached text embeddings give the same numbers, in any order and mixed with new texts.
    assert torch.allclose(clip.scores(image, texts[::-1] + ["a photo of blue"])[:3], cosines.flip(0), atol=1e-6)
    assert unit(-1.0) == 0.0 and unit(1.0) == 1.0 and unit(0.2) == pytest.approx(0.6) and unit(1.0000001) == 1.0


def test_siglip_texts_are_padded_to_its_fixed_length(tiny_clips):
    siglip = ImageTextSimilarity(str(tiny_clips["siglip"]), device="cpu")
    image, texts = photo(2), ["a photo of red", "a white striped cat with a long tail"]
    cosines = siglip.scores(image, texts)
    inputs = siglip.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
    pixels = siglip.image_processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = siglip.model(input_ids=inputs["input_ids"], pixel_values=pixels["pixel_values"])
    expected = (out.logits_per_image[0] - siglip.model.logit_bias) / siglip.model.logit_scale.exp()
    assert torch.allclose(cosines, expected, atol=1e-5)
    assert siglip.name.startswith("siglip:")


def test_a_checkpoint_that_is_not_contrastive_is_refused(tiny_checkpoints):
    with pytest.raises(PersonalVLMError, match="not a contrastive"):
        ImageTextSimilarity(str(tiny_checkpoints["idefics3"]), device="cpu")


# ---- R2P end to end, every family ---------------------------------------------------------
def test_r2p_runs_every_stage_and_records_it(adapters, family, clip):
    vlm = adapters(family)
    image = photo(1)
    tokens = vlm.encode_image(image)
    candidates = _candidates(vlm)
    result = R2PVerifier(vlm, clip, top_k=3).verify(tokens, image, candidates)
    stages = result.stages
    json.dumps(stages)                                                  # logs and eval keep it as is

    # 1. retrieval: s = ½(s_VV + s_VT), s_VT = σ(q, d_c); a pending fingerprint keeps s = s_VV.
    retrieval = stages["retrieval"]
    assert retrieval["text_similarity"].startswith("clip:")
    rows = {row["name"]: row for row in retrieval["candidates"]}
    descriptions = clip.scores(image, ["A red mug.", "A white striped cat.", "wooden, curved handle"])
    for name, cosine in zip(["my mug", "Fluffy", "Grandpa's cane"], descriptions.tolist()):
        assert rows[name]["s_vt"] == pytest.approx(unit(cosine), abs=1e-6)
        assert rows[name]["s"] == pytest.approx(0.5 * (rows[name]["s_vv"] + rows[name]["s_vt"]))
    assert rows["my mug"]["s_vv"] == pytest.approx(0.8) and rows["Grandpa's cane"]["s_vv"] == pytest.approx(0.45)
    assert rows["new thing"]["s_vt"] is None and rows["new thing"]["s"] == pytest.approx(0.65)
    ordered = [row["s"] for row in retrieval["candidates"]]
    assert ordered == sorted(ordered, reverse=True)
    assert [row["top_k"] for row in retrieval["candidates"]] == [True, True, True, False]
    top = [row["name"] for row in retrieval["candidates"][:3]]

    # 2. the chain of thought saw the top-K candidates' attributes.
    reasoning = stages["reasoning"]
    assert isinstance(reasoning["text"], str) and reasoning["answer"] in top + [None]

    # 3. s_VA per top-K candidate: mean σ(q, "a photo of <a>") over its attributes.
    s_va = stages["verification"]["s_va"]
    assert set(s_va) == set(top)
    if "my mug" in top and not stages["verification"]["keys"]:
        cosines = clip.scores(image, ["a photo of cylinder", "a photo of ceramic", "a photo of red"])
        assert s_va["my mug"] == pytest.approx(float(np.mean([unit(c) for c in cosines.tolist()])), abs=1e-6)
    assert s_va.get("new thing", None) is None

    # 4. the decision follows from the stages.
    if stages["verification"]["passed"]:
        assert result.decision == reasoning["answer"] and "pairwise" not in stages
    else:
        p = stages["pairwise"]["p"]
        assert set(p) == set(top) and all(0.0 <= v <= 1.0 for v in p.values())
        best = max(p, key=p.get)
        assert result.decision == (best if p[best] >= 0.5 else None)
    assert result.source == "r2p"
    assert set(stages["seconds"]) >= {"retrieval", "reasoning", "verification"}


def test_verification_failure_falls_back_to_pairwise_reasoning(adapters, family, clip, monkeypatch):
    vlm = adapters(family)
    image = photo(1)
    tokens = vlm.encode_image(image)
    candidates = _candidates(vlm)[:3]
    _stub_reasoning(monkeypatch, vlm, '{"seen_attributes": [], "answer": "none"}')
    s_va = R2PVerifier(vlm, clip).verify(tokens, image, candidates).stages["verification"]["s_va"]
    favoured, loser = max(s_va, key=s_va.get), min(s_va, key=s_va.get)

    # The chain of thought names the candidate the attributes disagree with → pairwise decides.
    _stub_reasoning(monkeypatch, vlm, f'{{"reasoning": "...", "answer": "{loser}", "seen_attributes": [],}}')
    yes_no = _count_yes_no(monkeypatch, vlm)
    result = R2PVerifier(vlm, clip, pairwise_threshold=0.0).verify(tokens, image, candidates)
    verification = result.stages["verification"]
    assert result.stages["reasoning"]["answer"] == loser
    assert verification["passed"] is False and verification["best"] == favoured and favoured in verification["reason"]
    pairwise = result.stages["pairwise"]
    assert len(yes_no) == 3                                   # one p_i per candidate, nothing else
    verifier = R2PVerifier(vlm, clip)
    for candidate in candidates:
        prompt = verifier.pairwise_prompt(tokens, candidate)
        assert any(isinstance(part, r2p.Memory) and torch.equal(part.tokens, candidate.memory) for part in prompt)
        assert pairwise["p"][candidate.name] == pytest.approx(vlm.yes_probability(prompt), abs=1e-6)
    assert result.decision == max(pairwise["p"], key=pairwise["p"].get) == pairwise["best"]

    # Above every p_i the pairwise stage says none.
    assert max(pairwise["p"].values()) < 1.0
    assert R2PVerifier(vlm, clip, pairwise_threshold=1.0).verify(tokens, image, candidates).decision is None

    # When the chain of thought agrees with the attributes, pairwise reasoning is skipped.
    _stub_reasoning(monkeypatch, vlm, f'It has every attribute I checked, so the answer is {favoured}.')
    yes_no.clear()
    agreed = R2PVerifier(vlm, clip).verify(tokens, image, candidates)
    assert agreed.decision == favoured and agreed.stages["verification"]["passed"] is True
    assert "pairwise" not in agreed.stages and yes_no == []
    assert agreed.score_for(favoured) == next(
        row["s"] for row in agreed.stages["retrieval"]["candidates"] if row["name"] == favoured)


def test_seen_attributes_restrict_the_verification_to_those_keys(adapters, clip, monkeypatch):
    vlm = adapters("qwen2_5_vl")
    image = photo(3)
    tokens = vlm.encode_image(image)
    candidates = _candidates(vlm)[:2]
    _stub_reasoning(monkeypatch, vlm, '{"seen_attributes": ["red"], "answer": "my mug"}')
    result = R2PVerifier(vlm, clip).verify(tokens, image, candidates)
    verification = result.stages["verification"]
    assert verification["keys"] == ["color"] and result.stages["reasoning"]["seen_keys"] == ["color"]
    red, white = clip.scores(image, ["a photo of red", "a photo of white"]).tolist()
    assert verification["s_va"] == pytest.approx({"my mug": unit(red), "Fluffy": unit(white)}, abs=1e-6)
    assert verification["passed"] == (unit(red) > unit(white))


def test_without_a_contrastive_model_the_vlm_answers_yes_no_per_attribute(adapters, family, monkeypatch):
    vlm = adapters(family)
    image = photo(4)
    tokens = vlm.encode_image(image)
    candidates = _candidates(vlm)[:3]
    _stub_reasoning(monkeypatch, vlm, '{"seen_attributes": [], "answer": "my mug"}')
    result = R2PVerifier(vlm, None).verify(tokens, image, candidates)
    retrieval = result.stages["retrieval"]
    assert retrieval["text_similarity"] == "vlm_yes_no"
    questions = [r2p.attribute_question(k, v) for k, v in MUG["attributes"].items()]
    assert questions[2] == "Does the object in the image have this colour: red? Answer Yes or No."
    expected = float(np.mean([vlm.yes_probability([tokens, "\n" + q]) for q in questions]))
    mug = next(row for row in retrieval["candidates"] if row["name"] == "my mug")
    assert mug["s_vt"] == pytest.approx(expected, abs=1e-6)
    # Verification over all attributes asks the same questions: same numbers.
    assert result.stages["verification"]["s_va"]["my mug"] == pytest.approx(expected, abs=1e-6)
    assert result.decision in {"my mug", None} or "pairwise" in result.stages


def test_no_candidates_means_no_decision(adapters):
    vlm = adapters("qwen2_5_vl")
    image = photo(5)
    result = R2PVerifier(vlm, None).verify(vlm.encode_image(image), image, [])
    assert result.decision is None and result.stages["retrieval"]["candidates"] == []
    assert result.score_for("anything") is None and not result.present("anything")


def test_bad_settings_are_refused(adapters):
    with pytest.raises(PersonalVLMError, match="top_k"):
        R2PVerifier(adapters("qwen2_5_vl"), None, top_k=0)
    with pytest.raises(PersonalVLMError, match="pairwise_threshold"):
        R2PVerifier(adapters("qwen2_5_vl"), None, pairwise_threshold=1.5)


# ---- s_VV from image embeddings, pairwise with the reference picture ------------------------
class _PlantedSimilarity:
    """A contrastive model whose image embedding of the query is planted."""

    name = "planted:clip"

    def __init__(self, query_embedding):
        self.query = torch.tensor(query_embedding, dtype=torch.float)

    def embed_image(self, image):
        return self.query / self.query.norm()

    def similarity(self, image_embedding, texts):
        return torch.zeros(len(texts))          # cos 0 → s_VT = 0.5 for every text


def test_s_vv_is_the_best_reference_views_image_similarity():
    sim = _PlantedSimilarity([1.0, 0.0])
    evidence = r2p.Evidence(None, sim, None, photo(1))
    views = torch.tensor([[0.0, 1.0], [0.6, 0.8]])      # cos 0 and 0.6 with the query
    far = torch.tensor([[-1.0, 0.0]])                  # cos -1
    candidates = [Candidate("my mug", 0.9, MUG, torch.zeros(1, 4), views),
                  Candidate("Fluffy", 0.9, CAT, torch.zeros(1, 4), far),
                  Candidate("new thing", 0.2, {}, torch.zeros(1, 4))]     # no embeddings: matcher score
    top, stage = R2PVerifier(object(), top_k=2).retrieve(evidence, candidates)
    rows = {row["name"]: row for row in stage["candidates"]}
    assert rows["my mug"]["s_vv"] == pytest.approx(0.8) and rows["my mug"]["s"] == pytest.approx(0.65)
    assert rows["Fluffy"]["s_vv"] == pytest.approx(0.0) and rows["Fluffy"]["s"] == pytest.approx(0.25)
    assert rows["new thing"]["s_vv"] == pytest.approx(0.6) and rows["new thing"]["s_vv_from"] == "matcher"
    assert [c.name for c in top] == ["my mug", "new thing"]
    assert stage["visual_similarity"] == "planted:clip"


def test_pairwise_shows_the_reference_picture_and_can_show_the_memory(adapters):
    vlm = adapters("qwen2_5_vl")
    query, reference = vlm.encode_image(photo(21)), vlm.encode_image(photo(22))
    loaded = []
    candidate = Candidate("my mug", 0.5, MUG, reference.features[:3], reference=lambda: loaded.append(1) or reference)
    with_image = R2PVerifier(vlm).pairwise_prompt(query, candidate)
    assert with_image[1] is reference and with_image[3] is query
    assert R2PVerifier(vlm).pairwise_prompt(query, candidate)[1] is reference and loaded == [1]   # loaded once
    with_memory = R2PVerifier(vlm, pairwise_reference="memory").pairwise_prompt(query, candidate)
    assert isinstance(with_memory[1], r2p.Memory) and torch.equal(with_memory[1].tokens, reference.features[:3])
    no_reference = Candidate("Fluffy", 0.5, CAT, reference.features[:2])
    assert isinstance(R2PVerifier(vlm).pairwise_prompt(query, no_reference)[1], r2p.Memory)
    with pytest.raises(PersonalVLMError, match="pairwise_reference"):
        R2PVerifier(vlm, pairwise_reference="both")


def test_candidates_cover_the_whole_library_without_a_pool():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5}
    names = [c.name for c in r2p.candidates_from_scores(scores, None, lambda n: {}, lambda n: torch.zeros(1, 2))]
    assert names == ["b", "c", "a"]
    pooled = r2p.candidates_from_scores(scores, 1, lambda n: {}, lambda n: torch.zeros(1, 2), must_include=["a"],
                                        embeddings_of=lambda n: torch.ones(1, 2))
    assert [c.name for c in pooled] == ["b", "a"] and torch.equal(pooled[0].reference_embeddings, torch.ones(1, 2))


def test_reasoning_with_attributes_per_candidate_checks_each_on_its_own():
    text = ('{"seen_attributes": {"my mug": ["red", "ceramic"], "Fluffy": ["long tail"]}, '
            '"reasoning": "the mug is red", "answer": "my mug"}')
    assert r2p.parse_reasoning(text, NAMES) == ("my mug", ["red", "ceramic", "long tail"])
    assert r2p.parse_seen_by_candidate(text, NAMES) == {"my mug": ["red", "ceramic"], "Fluffy": ["long tail"]}
    assert r2p.parse_seen_by_candidate('{"seen_attributes": ["white"], "answer": "Fluffy"}', NAMES) == {}

    class _Fixed:
        kind = "fixed"

        def attributes(self, attributes):
            return {k: {"color": 0.9, "material": 0.7, "distinct_features": 0.2}.get(k, 0.5) for k in attributes}

    candidates = [Candidate("my mug", 0.0, MUG, torch.zeros(1, 4)), Candidate("Fluffy", 0.0, CAT, torch.zeros(1, 4))]
    stage = R2PVerifier(object()).verify_attributes(
        _Fixed(), candidates, "my mug", [], {"my mug": ["red", "ceramic"], "Fluffy": ["long tail"]})
    assert stage["s_va"] == pytest.approx({"my mug": 0.8, "Fluffy": 0.2})   # colour+material vs the tail
    assert stage["passed"] and stage["best"] == "my mug"


def test_prompts_give_a_schema_not_values_a_model_could_copy():
    from personal_vlm_node import prompts

    for text in (prompts.INTRODUCE, prompts.COT_PROMPT):
        assert not re.search(r'"(red|ceramic|mug)"', text)
        assert not re.search(r'"area":\s*\d', text)
    # Reasoning first, the answer last (the order the parser insists on).
    assert prompts.COT_PROMPT.index('"seen_attributes"') < prompts.COT_PROMPT.index('"reasoning"') \
        < prompts.COT_PROMPT.index('"answer"')


# ---- the contrastive verifier by default, and without its weights ------------------------------
def test_the_node_and_the_cli_default_to_r2p_s_own_contrastive_model():
    from personal_vlm_node import settings
    from personal_vlm_node.cli import build_parser

    assert settings.PARAMETERS["verifier_model"].default == r2p.DEFAULT_VERIFIER == "openai/clip-vit-large-patch14-336"
    assert build_parser().parse_args(["eval", "x", "--out", "y"]).verifier_model == r2p.DEFAULT_VERIFIER
    assert settings.option_values({**{n: s.default for n, s in settings.PARAMETERS.items()},
                                   "verifier_model": ""})["verifier_model"] is None      # "": none at all


def test_a_verifier_whose_weights_cannot_be_had_is_one_warning_and_r2p_runs_as_without_one(
        adapters, tiny_checkpoints, tmp_path, monkeypatch):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.store import ConceptStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))            # an empty cache: the weights are nowhere
    for model in (r2p.DEFAULT_VERIFIER, r2p.SIGLIP_VERIFIER, str(tmp_path / "missing"),
                  str(tiny_checkpoints["qwen2_5_vl"])):             # the last: a checkpoint, but not CLIP/SigLIP
        said = []
        assert r2p.load_text_similarity(model, "cpu", said.append) is None
        assert len(said) == 1 and repr(model) in said[0] and "yes/no" in said[0] and "\n" not in said[0], said
    assert r2p.load_text_similarity("", "cpu", said.append) is None and len(said) == 1   # none asked: silent

    said, progress = [], []
    a = Assistant(adapters("qwen2_5_vl"), ConceptStore(tmp_path / "store"), progress=progress.append,
                  warn_to=said.append, verifier_model=r2p.DEFAULT_VERIFIER, verification=False)
    try:
        assert a.text_similarity is None and a.r2p.text_similarity is None
        assert a.warnings == said and len(said) == 1 and r2p.DEFAULT_VERIFIER in said[0]
        image = photo(5)
        tokens = a.vlm.encode_image(image)
        stages = a.r2p.verify(tokens, image, _candidates(a.vlm)[:2]).stages
        assert stages["retrieval"]["text_similarity"] == r2p.TEXT_SIMILARITY_VLM
        assert {row["s_vv_from"] for row in stages["retrieval"]["candidates"]} == {"matcher"}
    finally:
        a.close()
    progress.clear()
    quiet = Assistant(adapters("qwen2_5_vl"), ConceptStore(tmp_path / "store2"), progress=progress.append,
                      verifier_model=str(tmp_path / "missing"), verification=False)
    try:
        assert [m for m in progress if m.startswith("warning: ")] == [f"warning: {quiet.warnings[0]}"]
    finally:
        quiet.close()
