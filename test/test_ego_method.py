"""Ego's method choices, pinned with hand-checked cases: memory positions, Yes/No ids, keyword
rows, attention-sink baseline, single-pass attention, the memory budget."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from personal_vlm_node import ego
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.testing.kit import photo
from personal_vlm_node.vlm import Memory


class _PieceTokenizer:
    """Decodes ids to fixed text pieces, so token spans are known by hand."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


def _keyword_tokens(pieces, keywords):
    text, spans = ego.token_char_spans(_PieceTokenizer(pieces), list(range(len(pieces))))
    assert text == "".join(pieces)
    return ego.keyword_token_indices(text, spans, keywords)


# ---- keyword tokens ------------------------------------------------------------------------
def test_keyword_tokens_are_the_generated_tokens_that_spell_each_keyword():
    pieces = ['{"', "key", "words", '":', ' ["', "red", '",', ' "', "mu", "g", '"]}']
    assert _keyword_tokens(pieces, ["red", "mug"]) == [5, 8, 9]          # "mug" is two tokens


def test_a_token_that_carries_a_quote_counts_but_a_bare_quote_never_does():
    assert _keyword_tokens(['["', '"red', '",', ' "', 'blue"', "]"], ["red", "blue"]) == [1, 4]
    assert _keyword_tokens(['"', "red", '"'], ["red"]) == [1]


def test_keywords_match_whole_words_only():
    assert _keyword_tokens([" bored", " reddish", " red", " car"], ["red"]) == [2]
    assert _keyword_tokens([" curved", " handle"], ["curved handle"]) == [0, 1]
    assert _keyword_tokens([" a", " mug"], ["cup"]) == []


def test_special_tokens_never_count_as_keyword_tokens():
    text, spans = ego.token_char_spans(_PieceTokenizer([" red", "<eos>"]), [0, 1])
    assert ego.keyword_token_indices(text, spans, ["red"], skip={0}) == []


# ---- which rows, and the attention-sink baseline -------------------------------------------
# Rows of a planted (T'=5, N=4) map: row i produced token i. Column 0 is a sink every row
# attends to; keyword tokens 1 and 3 are predicted by rows that look at column 2, while their
# own rows (2 and 4) look at column 3.
_PLANTED = torch.tensor([
    [0.70, 0.10, 0.10, 0.10],   # row 0: produced token 0 (not a keyword)
    [0.50, 0.05, 0.40, 0.05],   # row 1: produced keyword token 1
    [0.60, 0.05, 0.05, 0.30],   # row 2: token 1's own row; produced token 2 (not a keyword)
    [0.50, 0.05, 0.40, 0.05],   # row 3: produced keyword token 3
    [0.60, 0.05, 0.05, 0.30],   # row 4: token 3's own row
])


@pytest.mark.parametrize("rows, baseline, top2", [
    ("predict", "none", [0, 2]),      # the sink wins without a baseline
    ("predict", "answer", [2, 1]),    # minus the non-keyword rows (0, 2): the sink drops
    ("own", "none", [0, 3]),
    ("own", "answer", [3, 0]),
])
def test_planted_attention_selects_exact_tokens(rows, baseline, top2):
    importance = ego.token_importance(_PLANTED, [1, 3], [0, 2], rows, baseline)
    assert torch.topk(importance, 2).indices.tolist() == top2


def test_baseline_subtracts_the_mean_of_the_other_answer_rows():
    importance = ego.token_importance(_PLANTED, [1, 3], [0, 2], "predict", "answer")
    expected = _PLANTED[[1, 3]].mean(0) - _PLANTED[[0, 2]].mean(0)
    torch.testing.assert_close(importance, expected)
    assert ego.token_importance(_PLANTED, [4], [0], "own", "none") is None   # row 5 does not exist


# ---- memory budget --------------------------------------------------------------------------
@pytest.mark.parametrize("area, n, expected", [
    (None, 100, 20),     # K = 20 % of the image's tokens
    (50.0, 100, 20),     # a large subject is capped by K
    (10.0, 100, 10),     # a small one keeps α·N/100
    (1.0, 100, 4),       # with the floor
    (None, 1000, 64),    # the absolute cap
    (None, 10, 4),       # the floor also bounds K
])
def test_memory_size_is_a_budget_share_of_the_image(area, n, expected):
    assert ego.memory_size(area, n, max_tokens=64, min_tokens=4, budget=0.2) == expected


def _view(area, importance):
    """One reference view's attention result (100 tokens on a 10 × 10 grid) and its tokens."""
    from personal_vlm_node.vlm.parts import ImageTokens

    n = len(importance)
    boxes = torch.tensor([[(j % 10) * 10, (j // 10) * 10, (j % 10) * 10 + 10, (j // 10) * 10 + 10] for j in range(n)],
                         dtype=torch.float32)
    tokens = ImageTokens(torch.zeros(n, 4), list(range(n)), list(range(n)), boxes, (10, 10), (100, 100))
    attended = ego.Attended("", ["red"], area, {0: torch.tensor(importance)}, [], {})
    return tokens, attended


def test_a_view_without_an_area_takes_the_other_views_median_then_the_attentions_extent():
    options = ego.IntroductionOptions([0], max_tokens=64, min_tokens=4, budget=0.2)    # K = 20 of 100
    peaked = [0.0] * 100
    for j, v in ((11, 1.0), (12, 0.8), (21, 0.6), (22, 0.55), (23, 0.4), (40, 0.3)):
        peaked[j] = v                        # 4 tokens at ≥ half the peak: the subject covers 4 %
    tokens, no_area = _view(None, peaked)
    alone = ego.select_memory(tokens, no_area, options)
    assert (alone.area, alone.area_from, len(alone.indices)) == (4.0, "attention", 4)
    assert alone.indices.tolist() == [11, 12, 21, 22]
    # The other views' median wins over the attention's estimate (views of 8 %, 10 % and 30 %).
    beside = ego.select_memory(tokens, no_area, options, views_area=10.0)
    assert (beside.area, beside.area_from, len(beside.indices)) == (10.0, "views", 10)
    # A flat or negative map says nothing: K stays the budget, as before.
    flat_tokens, flat = _view(None, [-0.1] * 100)
    assert (lambda i: (i.area, i.area_from, len(i.indices)))(ego.select_memory(flat_tokens, flat, options)) == \
        (None, "none", 20)
    # An answered area and a region of interest are used as they are.
    answered = ego.select_memory(tokens, _view(6.0, peaked)[1], options, views_area=30.0)
    assert (answered.area, answered.area_from, len(answered.indices)) == (6.0, "answer", 6)
    roi = ego.select_memory(tokens, no_area, options, roi=(10, 10, 30, 30))
    assert (roi.area, roi.area_from, len(roi.indices)) == (9.0, "roi", 9)


def test_introduce_fills_a_missing_area_from_the_other_views(adapters, monkeypatch):
    adapter = adapters("qwen2_5_vl")
    views = [adapter.encode_image(photo(k)) for k in (1, 2, 3, 4)]
    areas = iter([8.0, None, 10.0, 30.0])
    original = ego.attend

    def attend(*args, **kwargs):
        attended = original(*args, **kwargs)
        attended.area = next(areas)
        return attended

    monkeypatch.setattr(ego, "attend", attend)
    intro = ego.introduce(adapter, views, "my mug", "", ego.IntroductionOptions([0], 64, 1, budget=1.0))
    assert [(i.area, i.area_from) for i in intro.images] == [(8.0, "answer"), (10.0, "views"), (10.0, "answer"),
                                                           (30.0, "answer")]


# ---- Yes / No ids -----------------------------------------------------------------------------
@pytest.mark.parametrize("family, yes, no", [
    ("qwen2_5_vl", "Yes", "No"),        # ChatML: the answer follows "assistant\n" directly
    ("internvl", "Yes", "No"),
    ("idefics3", " Yes", " No"),        # "Assistant:" + " Yes", as SmolVLM writes it
    ("qwen3_vl", "Yes", "No"),
    ("smolvlm", " Yes", " No"),
])
def test_yes_no_ids_are_the_first_tokens_the_template_produces(adapters, family, yes, no):
    adapter = adapters(family)
    yes_id, no_id = adapter.yes_no_ids()
    assert yes_id == adapter.tokenizer(yes, add_special_tokens=False)["input_ids"][0]
    assert no_id == adapter.tokenizer(no, add_special_tokens=False)["input_ids"][0]
    assert yes_id != no_id
    decoded = adapter.tokenizer.decode([yes_id])
    assert decoded == yes[: len(decoded)] and (decoded.startswith(" ") == yes.startswith(" "))


# ---- memory positions -------------------------------------------------------------------------
def _whole_image_memory(tokens, name="it"):
    """The memory Ego stores when it keeps every token of one picture (through ``build_memory``)."""
    n = tokens.num_tokens
    chosen = SimpleNamespace(indices=torch.arange(n), importance=torch.ones(n))
    return Memory.from_stored(ego.build_memory([tokens], [chosen]), name)


def test_qwen_positions_equal_the_models_own_rope_index(adapters):
    adapter = adapters("qwen2_5_vl")
    a, b = adapter.encode_image(photo(1)), adapter.encode_image(photo(2, 140, 280))
    prompt = adapter.build(["Compare ", a, " with ", b, "."])
    types = torch.zeros_like(prompt.input_ids, dtype=torch.int32)
    for rows in prompt.image_positions:
        types[0, rows] = 1
    adapter.model.model.rope_deltas = None
    expected, _ = adapter.model.model.get_rope_index(
        prompt.input_ids, mm_token_type_ids=types,
        image_grid_thw=torch.cat([a.rope["image_grid_thw"], b.rope["image_grid_thw"]]))
    assert torch.equal(prompt.position_ids.cpu(), expected.cpu())
    assert prompt.next_position == int(expected.max()) + 1


def test_qwen_memory_keeps_its_grid_positions_inside_vision_markers(adapters):
    adapter = adapters("qwen2_5_vl")
    # Tokens 1, 5, 6 of a 3×4 grid: (row, col) = (0, 1), (1, 1), (1, 2).
    memory = Memory(torch.zeros(3, adapter.hidden_size), "it", torch.tensor([1, 5, 6]),
                    torch.zeros(3, dtype=torch.long), torch.tensor([[3, 4]]))
    prompt = adapter.build(["x", memory, "y"])
    rows = prompt.memory_positions[0]
    assert rows.tolist() == list(range(int(rows[0]), int(rows[0]) + 3))
    ids = prompt.input_ids[0]
    assert int(ids[rows[0] - 1]) == adapter.config.vision_start_token_id
    assert int(ids[rows[-1] + 1]) == adapter.config.vision_end_token_id
    p = int(prompt.position_ids[0, 0, rows[0] - 1]) + 1         # the block starts after <|vision_start|>
    assert prompt.position_ids[:, 0, rows].tolist() == [[p, p, p], [p, p + 1, p + 1], [p + 1, p + 1, p + 2]]
    assert int(prompt.position_ids[0, 0, rows[-1] + 1]) == p + 4   # text resumes after max(3, 4)


def test_a_memory_of_every_token_reads_exactly_like_the_image(adapters, family):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(3, 140, 140))
    question = "\nIs it here? Answer Yes or No."
    as_image = adapter.yes_probability(["Look: ", tokens, question])
    as_memory = adapter.yes_probability(["Look: ", _whole_image_memory(tokens), question])
    if family in ("idefics3", "smolvlm") and len(tokens.segment_ids) != tokens.num_tokens + 3:
        pytest.skip("tiled image: its segment has per-tile markers a memory does not repeat")
    assert as_memory == pytest.approx(as_image, abs=1e-6)
    if family == "qwen3_vl":
        # The memory carries the tokens' DeepStack features; without them it reads differently.
        bare = _whole_image_memory(tokens)
        bare.layer_features = None
        assert adapter.yes_probability(["Look: ", bare, question]) != pytest.approx(as_image, abs=1e-6)


def test_memories_of_several_views_get_one_marked_block_each(adapters, family):
    adapter = adapters(family)
    memory = Memory(torch.zeros(5, adapter.hidden_size), "it", torch.tensor([0, 3, 1, 2, 7]),
                    torch.tensor([0, 0, 1, 1, 1]), torch.tensor([[2, 2], [3, 3]]))
    prompt = adapter.build(["x", memory])
    rows = prompt.memory_positions[0]
    segment, slots = adapter.memory_segment(2)
    first = int(rows[0]) - slots[0]
    assert prompt.input_ids[0, first:first + len(segment)].tolist()[: slots[0]] == segment[: slots[0]]
    assert int(rows[2]) - int(rows[1]) == len(segment) - slots[1] + slots[0]   # markers between views


def test_text_layout_and_old_records_splice_as_plain_rows(adapters):
    adapter = adapters("qwen2_5_vl")
    stored = {"memory": torch.zeros(4, adapter.hidden_size)}                # a record without a layout
    old = Memory.from_stored(stored, "old")
    assert not old.has_layout
    prompt = adapter.build(["x", old])
    mem = prompt.position_ids[:, 0, prompt.memory_positions[0]]
    assert torch.equal(mem[0], mem[1]) and torch.equal(mem[1], mem[2])
    laid_out = Memory(torch.zeros(4, adapter.hidden_size), "new", torch.arange(4),
                      torch.zeros(4, dtype=torch.long), torch.tensor([[2, 2]]))
    adapter.memory_layout = "text"
    try:
        prompt = adapter.build(["x", laid_out])
    finally:
        adapter.memory_layout = "image"
    assert adapter.config.vision_start_token_id not in prompt.input_ids[0].tolist()
    mem = prompt.position_ids[:, 0, prompt.memory_positions[0]]
    assert torch.equal(mem[1], mem[2]) and mem[0].tolist() == list(range(int(mem[0, 0]), int(mem[0, 0]) + 4))


# ---- one prefill ------------------------------------------------------------------------------
def test_attention_captured_while_generating_equals_the_second_pass(adapters, family):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(4))
    parts = [tokens, "\nDescribe it."]
    layers = [0, adapter.num_layers - 1]
    generation = adapter.generate(parts, max_new_tokens=6, attention_layers=layers)
    assert generation.token_ids
    forced = adapter.answer_attention(parts, generation.token_ids, layers)
    for layer in layers:
        captured = generation.attention[layer]
        assert captured.shape[1] == tokens.num_tokens
        assert captured.shape[0] in (len(generation.token_ids), len(generation.token_ids) + 1)
        torch.testing.assert_close(captured, forced[layer][: captured.shape[0]], atol=1e-5, rtol=1e-4)


def test_introduction_reads_attention_in_one_pass_unless_asked_for_two(adapters, family, monkeypatch):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(5))
    calls = []
    original = adapter.answer_attention
    monkeypatch.setattr(adapter, "answer_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    options = ego.IntroductionOptions([0, 1], max_tokens=8, min_tokens=2)
    one = ego.introduce_image(adapter, tokens, "my mug", "", options)
    assert calls == [] or one.answer == "my mug"     # a second pass only when nothing was generated
    calls.clear()
    two = ego.introduce_image(adapter, tokens, "my mug", "", ego.IntroductionOptions([0, 1], 8, 2, passes=2))
    assert calls == [1]
    assert torch.equal(one.indices, two.indices)
    torch.testing.assert_close(one.importance, two.importance, atol=1e-5, rtol=1e-4)


def test_the_description_stops_as_soon_as_its_answer_object_closes(adapters, monkeypatch):
    assert ego.introduction_complete('```json\n{"keywords": ["red", "mug"], "area": 30}')
    assert ego.introduction_complete('{"keyword": "red"}')
    assert not ego.introduction_complete('{"keywords": ["red", "mug"], "area": 30')
    assert not ego.introduction_complete('{"area": 30}') and not ego.introduction_complete("red mug")
    adapter = adapters("qwen2_5_vl")
    tokens = adapter.encode_image(photo(5))
    options = ego.IntroductionOptions([0, 1], max_tokens=8, min_tokens=2)
    generations = []
    original = adapter.generate
    monkeypatch.setattr(adapter, "generate", lambda *a, **k: generations.append(original(*a, **k)) or generations[-1])
    full = ego.attend(adapter, tokens, "my mug", "", options)
    # A random model never closes the object; planted: "complete" after the third token.
    seen = []
    monkeypatch.setattr(ego, "introduction_complete", lambda text: seen.append(text) or len(seen) >= 3)
    short = ego.attend(adapter, tokens, "my mug", "", options)
    assert len(generations[0].token_ids) == options.max_new_tokens
    assert len(seen) == 3 and len(generations[1].token_ids) == 3 and generations[1].stopped
    assert generations[1].token_ids == generations[0].token_ids[:3]       # greedy: the same start
    for layer in (0, 1):
        assert short.importance[layer].shape == full.importance[layer].shape
        assert bool(torch.isfinite(short.importance[layer]).all())


# ---- several prompts sharing a prefix, joint recognition, more views ---------------------------
def test_shared_prefix_yes_probabilities_equal_separate_passes(adapters, family):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(6))
    memories = [Memory.from_stored({"memory": tokens.features[:3].clone(), "positions": torch.tensor([0, 1, 2]),
                                    "image_index": torch.zeros(3, dtype=torch.long),
                                    "grids": torch.tensor([list(tokens.grid)])}, "my mug"),
                Memory(tokens.features[3:5].clone(), "Fluffy")]
    joint = ego.recognize_joint(adapter, tokens, memories)
    from personal_vlm_node import prompts

    for name in ("my mug", "Fluffy"):
        alone = adapter.yes_probability(prompts.recognize_joint(memories, tokens, name, adapter.family))
        assert joint[name] == pytest.approx(alone, abs=1e-5)
    # A second round reuses nothing stale from the first.
    assert ego.recognize_joint(adapter, tokens, memories) == pytest.approx(joint, abs=1e-6)


def test_a_joint_prompt_holds_the_asked_concepts_and_the_best_matching_others():
    scores = {"cane": 0.9, "Fluffy": 0.1, "my mug": 0.5, "keys": 0.7}
    assert set(ego.joint_context(["Fluffy"], scores, 3)) == {"Fluffy", "cane", "keys"}
    assert set(ego.joint_context(["my mug", "Fluffy"], scores, 3)) == {"my mug", "Fluffy", "cane"}
    assert ego.joint_context(["Fluffy", "Fluffy"], scores, 1) == ["Fluffy"]
    assert set(ego.joint_context(["Fluffy", "cane"], scores, 1)) == {"Fluffy", "cane"}   # never drops an asked one
    assert set(ego.joint_context(["Fluffy"], scores, 9)) == {"Fluffy", "cane", "keys", "my mug"}
    # The same concepts stand in the same order, whichever is asked and however they were listed.
    assert (ego.joint_context(["Fluffy"], scores, 9) == ego.joint_context(["keys"], scores, 9)
            == ego.context_order(["my mug", "keys", "cane", "Fluffy"]))


def test_every_concept_is_in_context_while_they_fit_and_the_best_matching_first_beyond():
    scores = {"cane": 0.9, "Fluffy": 0.1, "my mug": 0.5, "keys": 0.7}
    sizes = {"cane": 30, "Fluffy": 10, "my mug": 20, "keys": 25}
    everyone = set(scores)
    assert set(ego.joint_context(["Fluffy"], scores, 64, 85, sizes.get)) == everyone        # 85 tokens: all fit
    assert set(ego.joint_context(["Fluffy"], scores, 64, 84, sizes.get)) == {"Fluffy", "cane", "keys"}
    assert set(ego.joint_context(["Fluffy"], scores, 64, 39, sizes.get)) == {"Fluffy"}     # cane (30) no longer fits
    # The filter keeps the best-matching: it never skips one that does not fit for a smaller, worse one.
    assert set(ego.joint_context(["Fluffy"], scores, 64, 64, sizes.get)) == {"Fluffy", "cane"}
    assert set(ego.joint_context(["Fluffy", "cane"], scores, 64, 1, sizes.get)) == {"Fluffy", "cane"}   # asked: always
    assert set(ego.joint_context([], scores, 2, 10_000, sizes.get)) == {"cane", "keys"}     # the count cap too


def test_ask_and_recognition_hold_every_concept_that_fits_the_profile_s_context_budget(adapters, tmp_path):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.profiles import ModelProfile
    from personal_vlm_node.store import ConceptStore

    profile = ModelProfile(max_memory_tokens=4, min_memory_tokens=4, context_tokens=4 * 6)
    a = Assistant(adapters("qwen2_5_vl"), ConceptStore(tmp_path / "store"), profile, progress=None,
                  verification=False, verifier_model=None)
    try:
        names = [f"thing {k}" for k in range(8)]
        for k, name in enumerate(names):
            a.teach(name, [photo(40 + k)])
        assert set(a.matcher.memory_sizes().values()) == {4}
        tokens = a.vlm.encode_image(photo(40))
        scores = {m.name: m.score for m in a.matcher.score(tokens.features, tokens.token_boxes)}
        best = sorted(names, key=lambda n: -scores[n])
        assert a.in_context(tokens, 64) == best[:6]                       # 6 memories of 4 tokens fit 24
        a.profile.context_tokens = 4 * 8
        assert a.in_context(tokens, 64) == best                           # now all of them
        assert a.in_context(tokens, 3) == best[:3]
        assert set(a.ask("what is this?", photo(40)).concepts) == set(names)
        a.profile.context_tokens = 4 * 6
        assert set(a.ask("what is this?", photo(40)).concepts) == set(best[:6])
    finally:
        a.close()
    with pytest.raises(PersonalVLMError, match="context_tokens must be an integer >= max_memory_tokens"):
        ModelProfile(max_memory_tokens=32, context_tokens=16).validate()


def test_where_a_memory_stands_says_nothing_of_which_concept_is_asked():
    others = [f"concept {k}" for k in range(40)]
    seen: dict[int, int] = {}
    for k in range(200):
        draw = random.Random(k)
        scores = {n: draw.random() for n in others}
        order = ego.joint_context(["Fluffy"], scores, 4)
        assert order == ego.joint_context(["Fluffy"], scores, 4)                  # deterministic
        seen[order.index("Fluffy")] = seen.get(order.index("Fluffy"), 0) + 1
    # Every position, each about a quarter of the time (200 draws: 50 ± 7 each).
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(25 <= count <= 75 for count in seen.values()), seen


def test_joint_p_yes_is_the_joint_prompts_and_the_cascade_uses_it(adapters):
    from personal_vlm_node import prompts
    from personal_vlm_node.r2p import R2PVerifier, settle_uncertain

    adapter = adapters("qwen2_5_vl")
    tokens = adapter.encode_image(photo(8))
    memories = {n: Memory(tokens.features[i:i + 2].clone(), n) for i, n in enumerate(("my mug", "Fluffy", "cane"))}
    scores = {"my mug": 0.3, "Fluffy": 0.1, "cane": 0.9}
    joint = ego.p_yes(adapter, tokens, ["Fluffy"], memories.__getitem__, joint=2, scores=scores)
    together = [memories[n] for n in ego.context_order(["Fluffy", "cane"])]
    expected = adapter.yes_probability(prompts.recognize_joint(together, tokens, "Fluffy", adapter.family))
    assert joint == {"Fluffy": pytest.approx(expected, abs=1e-5)}
    alone = ego.p_yes(adapter, tokens, ["Fluffy"], memories.__getitem__)
    assert alone == {"Fluffy": pytest.approx(adapter.yes_probability(
        prompts.recognize(memories["Fluffy"], tokens, adapter.family)), abs=1e-5)}
    # The frame path's and eval's cascade: Ego's verdict comes from the same joint prompt.
    for size, p in ((2, joint["Fluffy"]), (None, alone["Fluffy"])):
        verdicts, result = settle_uncertain(adapter, tokens, ["Fluffy"], memories.__getitem__, threshold=0.5,
                                            margin=0.0, verifier=R2PVerifier(adapter), scores=scores,
                                            fingerprint_of=lambda n: None, pool=3, joint=size)
        assert result is None and verdicts["Fluffy"].p_yes == pytest.approx(p, abs=1e-6)


def test_append_views_offsets_the_image_index():
    old = {"memory": torch.ones(2, 3), "positions": torch.tensor([4, 5]), "image_index": torch.tensor([0, 0]),
           "grids": torch.tensor([[3, 3]]), "num_tokens": torch.tensor([9])}
    new = {"memory": torch.zeros(1, 3), "positions": torch.tensor([2]), "image_index": torch.tensor([0]),
           "grids": torch.tensor([[2, 2]]), "num_tokens": torch.tensor([4])}
    both = ego.append_views(old, new)
    assert both["image_index"].tolist() == [0, 0, 1]
    assert both["positions"].tolist() == [4, 5, 2]
    assert both["grids"].tolist() == [[3, 3], [2, 2]]
    assert Memory.from_stored(both).has_layout


def test_views_keep_layer_features_only_when_every_view_has_them():
    old = {"memory": torch.ones(2, 3), "positions": torch.tensor([4, 5]), "image_index": torch.tensor([0, 0]),
           "grids": torch.tensor([[3, 3]]), "layer_features": torch.ones(2, 2, 3)}
    new = {"memory": torch.zeros(1, 3), "positions": torch.tensor([2]), "image_index": torch.tensor([0]),
           "grids": torch.tensor([[2, 2]]), "layer_features": torch.zeros(1, 2, 3)}
    both = ego.append_views(old, new)
    assert both["layer_features"].shape == (3, 2, 3) and Memory.from_stored(both).has_layer_features
    older = {k: v for k, v in old.items() if k != "layer_features"}        # stored before they were kept
    mixed = ego.append_views(older, new)
    assert "layer_features" not in mixed and not Memory.from_stored(mixed).has_layer_features


def test_one_resolution_policy_gives_reference_and_frame_the_same_token_scale(adapters):
    adapter = adapters("qwen2_5_vl")
    big, small = photo(7, 224, 112), photo(7, 112, 56)
    adapter.max_image_pixels = 112 * 56
    try:
        assert adapter.encode_image(big).grid == adapter.encode_image(small).grid
    finally:
        adapter.max_image_pixels = 0
    assert adapter.encode_image(big).num_tokens > adapter.encode_image(small).num_tokens
