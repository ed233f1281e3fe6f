"""Matcher: late-interaction scores, prefilter, boxes, bank edits, thresholds."""

import math
import threading

import pytest
import torch

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.matcher import Matcher, MatchResult, decide

R2 = math.sqrt(2.0) / 2.0


def hand_frame():
    # Unnormalised on purpose: the matcher must normalise. Directions: 0°, 90°, 45°.
    return torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])  # (3, 2)


def hand_memories():
    return {
        # 0° and 90°: both find an exact partner -> s = (1 + 1) / 2 = 1.
        "mug": torch.tensor([[3.0, 0.0], [0.0, 0.5]]),  # (2, 2)
        # -45°: best is F0 (cos √2/2); 180°: best is F1 (cos 0, vs -1 and -√2/2)
        # -> s = (√2/2 + 0) / 2 = √2/4.
        "cat": torch.tensor([[3.0, -3.0], [-2.0, 0.0]]),  # (2, 2)
    }


def by_name(results):
    return {r.name: r for r in results}


def test_score_equals_hand_computed_late_interaction():
    matcher = Matcher()
    matcher.set_concepts(hand_memories())
    results = matcher.score(hand_frame())
    assert [r.name for r in results] == ["mug", "cat"]
    assert results[0].score == pytest.approx(1.0, abs=1e-6)
    assert results[1].score == pytest.approx(R2 / 2.0, abs=1e-6)
    assert all(isinstance(r, MatchResult) for r in results)


def test_score_reports_best_frame_token_per_memory_token():
    matcher = Matcher()
    matcher.set_concepts(hand_memories())
    results = by_name(matcher.score(hand_frame()))
    assert results["mug"].matched.tolist() == [0, 1]
    assert results["cat"].matched.tolist() == [0, 1]
    assert results["mug"].matched.dtype == torch.long


def test_score_matches_45_degree_token_with_cos_sqrt2_over_2():
    matcher = Matcher()
    matcher.set_concepts({"tilted": torch.tensor([[1.0, 1.0]])})  # (1, 2)
    frame = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # (2, 2): 0° and -90°
    (result,) = matcher.score(frame)
    assert result.score == pytest.approx(R2, abs=1e-6)
    assert result.matched.tolist() == [0]


def test_zero_vectors_score_zero_instead_of_nan():
    matcher = Matcher()
    matcher.set_concepts({"a": torch.tensor([[0.0, 0.0], [1.0, 0.0]])})  # (2, 2)
    frame = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # (2, 2)
    (result,) = matcher.score(frame)
    assert result.score == pytest.approx(0.5, abs=1e-6)


def test_padding_of_short_memory_does_not_change_its_score():
    torch.manual_seed(0)
    short = torch.randn(1, 8)  # (1, 8)
    long = torch.randn(5, 8)  # (5, 8)
    frame = torch.randn(7, 8)  # (7, 8)
    alone = Matcher()
    alone.set_concepts({"short": short})
    together = Matcher()
    together.set_concepts({"short": short, "long": long})
    (a,) = alone.score(frame)
    b = by_name(together.score(frame))["short"]
    assert b.score == pytest.approx(a.score, abs=1e-6)
    assert b.matched.tolist() == a.matched.tolist()
    assert b.matched.shape == (1,)
    # The one real token's score is its own best cosine.
    expected = torch.nn.functional.cosine_similarity(short, frame).max().item()
    assert a.score == pytest.approx(expected, abs=1e-6)


def random_bank(count, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        f"c{i}": torch.randn(int(torch.randint(1, 9, (1,), generator=g)), dim, generator=g)
        for i in range(count)
    }


def test_prefilter_with_top_at_least_bank_size_equals_exhaustive():
    memories = random_bank(50, 16, seed=1)
    frame = torch.randn(20, 16, generator=torch.Generator().manual_seed(2))  # (20, 16)
    exhaustive = Matcher(prefilter_top=10_000)
    exhaustive.set_concepts(memories)
    exact = Matcher(prefilter_top=50)
    exact.set_concepts(memories)
    a, b = exhaustive.score(frame), exact.score(frame)
    assert [r.name for r in a] == [r.name for r in b]
    assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-6)
    assert len(a) == 50


def test_prefilter_finds_planted_concept_among_many_with_exact_score():
    dim, n = 128, 50
    g = torch.Generator().manual_seed(3)
    memories = random_bank(3000, dim, seed=4)
    frame = torch.randn(n, dim, generator=g)  # (N, D)
    # The true concept: three frame tokens, slightly perturbed.
    memories["my mug"] = frame[[5, 17, 33]] + 0.05 * torch.randn(3, dim, generator=g)  # (3, D)
    filtered = Matcher(prefilter_top=16)
    filtered.set_concepts(memories)
    exhaustive = Matcher(prefilter_top=10_000)
    exhaustive.set_concepts(memories)
    fast = filtered.score(frame)
    slow = by_name(exhaustive.score(frame))
    assert len(fast) == 16
    assert fast[0].name == "my mug"
    assert fast[0].score == pytest.approx(slow["my mug"].score, abs=1e-6)
    assert fast[0].matched.tolist() == [5, 17, 33]
    for r in fast:
        assert r.score == pytest.approx(slow[r.name].score, abs=1e-6)


def test_top_limits_number_of_results():
    matcher = Matcher()
    matcher.set_concepts(random_bank(10, 8, seed=5))
    results = matcher.score(torch.randn(4, 8), top=3)
    assert len(results) == 3
    assert results[0].score >= results[1].score >= results[2].score


def test_dimension_mismatch_says_memory_was_built_with_another_model():
    matcher = Matcher()
    matcher.set_concepts({"mug": torch.randn(3, 8)})
    with pytest.raises(PersonalVLMError, match="another model"):
        matcher.score(torch.randn(5, 16))


def test_add_with_other_dimension_is_refused_and_bank_kept():
    matcher = Matcher()
    matcher.set_concepts({"mug": torch.randn(3, 8)})
    with pytest.raises(PersonalVLMError, match="another model"):
        matcher.add("cat", torch.randn(2, 16))
    assert matcher.names == ("mug",)


def test_empty_bank_scores_nothing():
    assert Matcher().score(torch.randn(4, 8)) == []


def test_frame_without_tokens_is_an_error():
    matcher = Matcher()
    matcher.set_concepts({"mug": torch.randn(3, 8)})
    with pytest.raises(PersonalVLMError, match="no visual tokens"):
        matcher.score(torch.zeros(0, 8))


def test_memory_without_tokens_is_refused():
    with pytest.raises(PersonalVLMError):
        Matcher().set_concepts({"mug": torch.zeros(0, 8)})


def test_box_is_union_of_matched_tokens_without_low_similarity_stray():
    frame = torch.eye(3)  # (3, 3): F0 = e1, F1 = e2, F2 = e3
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [100.0, 100.0, 110.0, 110.0]]
    )  # (3, 4)
    stray = torch.tensor([-0.5, -0.5, 0.3])  # best partner F2, cos 0.3 / sqrt(0.59)
    memory = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), stray])  # (3, 3)
    matcher = Matcher(box_similarity=0.7)
    matcher.set_concepts({"mug": memory})
    (result,) = matcher.score(frame, token_boxes=boxes)
    stray_cos = 0.3 / math.sqrt(0.59)
    assert result.matched.tolist() == [0, 1, 2]
    assert result.score == pytest.approx((1.0 + 1.0 + stray_cos) / 3.0, abs=1e-6)
    assert result.box == pytest.approx((0.0, 0.0, 20.0, 10.0))


def test_box_keeps_every_token_when_similarities_are_close():
    frame = torch.eye(3)  # (3, 3)
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [10.0, 10.0, 20.0, 20.0]]
    )  # (3, 4)
    matcher = Matcher()
    matcher.set_concepts({"mug": torch.eye(3)})
    (result,) = matcher.score(frame, token_boxes=boxes)
    assert result.box == pytest.approx((0.0, 0.0, 20.0, 20.0))


def test_box_drops_isolated_far_match_of_large_blob():
    # 11 orthogonal tokens, all matched with cos 1: ten form a 5x2 grid of 10-px cells,
    # the eleventh sits far away. floor(0.1 * 11) = 1 token is ignored on each side.
    frame = torch.eye(11)  # (11, 11)
    cells = [[10.0 * c, 10.0 * r, 10.0 * c + 10, 10.0 * r + 10] for r in range(2) for c in range(5)]
    boxes = torch.tensor(cells + [[500.0, 500.0, 510.0, 510.0]])  # (11, 4)
    matcher = Matcher(box_quantile=0.1)
    matcher.set_concepts({"mug": torch.eye(11)})
    (result,) = matcher.score(frame, token_boxes=boxes)
    assert result.box == pytest.approx((0.0, 0.0, 50.0, 20.0))
    exact = Matcher(box_quantile=0.0)
    exact.set_concepts({"mug": torch.eye(11)})
    (result,) = exact.score(frame, token_boxes=boxes)
    assert result.box == pytest.approx((0.0, 0.0, 510.0, 510.0))


def test_box_is_zero_without_token_boxes():
    matcher = Matcher()
    matcher.set_concepts(hand_memories())
    assert all(r.box == (0.0, 0.0, 0.0, 0.0) for r in matcher.score(hand_frame()))


def test_add_and_remove_edit_the_bank_incrementally():
    matcher = Matcher()
    matcher.add("mug", hand_memories()["mug"])
    matcher.add("cat", hand_memories()["cat"])
    assert len(matcher) == 2
    results = by_name(matcher.score(hand_frame()))
    assert results["cat"].score == pytest.approx(R2 / 2.0, abs=1e-6)
    # Replacing a memory keeps one entry per name.
    matcher.add("cat", torch.tensor([[1.0, 1.0]]))
    assert len(matcher) == 2
    assert by_name(matcher.score(hand_frame()))["cat"].score == pytest.approx(1.0, abs=1e-6)
    matcher.remove("mug")
    matcher.remove("mug")
    assert matcher.names == ("cat",)
    matcher.remove("cat")
    assert len(matcher) == 0
    assert matcher.score(hand_frame()) == []


def test_add_then_remove_long_memory_gives_same_scores_as_fresh_bank():
    memories = random_bank(6, 8, seed=6)
    frame = torch.randn(9, 8, generator=torch.Generator().manual_seed(7))  # (9, 8)
    edited = Matcher()
    edited.set_concepts(memories)
    edited.add("long", torch.randn(20, 8))
    edited.remove("long")
    fresh = Matcher()
    fresh.set_concepts(memories)
    a, b = by_name(edited.score(frame)), by_name(fresh.score(frame))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].score == pytest.approx(b[name].score, abs=1e-6)
        assert a[name].matched.tolist() == b[name].matched.tolist()


def test_bank_dtype_follows_setting():
    matcher = Matcher(dtype=torch.float64)
    matcher.set_concepts({"mug": torch.tensor([[1.0, 1.0]], dtype=torch.float16)})
    (result,) = matcher.score(torch.tensor([[1.0, 0.0]]))
    assert result.score == pytest.approx(R2, abs=1e-12)


def test_concurrent_set_concepts_and_score_never_mix_banks():
    bank_a = random_bank(3, 16, seed=8)
    bank_b = {f"b{i}": m for i, m in enumerate(random_bank(5, 16, seed=9).values())}
    matcher = Matcher(prefilter_top=4)
    matcher.set_concepts(bank_a)
    frame = torch.randn(30, 16)  # (30, 16)
    errors = []
    seen = set()
    stop = threading.Event()

    def writer():
        try:
            for i in range(300):
                matcher.set_concepts(bank_b if i % 2 else bank_a)
                matcher.add("extra", torch.randn(7, 16))
                matcher.remove("extra")
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)
        finally:
            stop.set()

    def reader():
        try:
            while not stop.is_set():
                names = frozenset(r.name for r in matcher.score(frame))
                seen.add(names)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    allowed_a = set(bank_a)
    allowed_b = set(bank_b)
    for names in seen:
        core = set(names) - {"extra"}
        assert core <= allowed_a or core <= allowed_b


def test_decide_uses_both_thresholds():
    assert decide(0.9, accept=0.8, reject=0.5) == "accept"
    assert decide(0.8, accept=0.8, reject=0.5) == "accept"
    assert decide(0.6, accept=0.8, reject=0.5) == "uncertain"
    assert decide(0.5, accept=0.8, reject=0.5) == "reject"
    assert decide(0.1, accept=0.8, reject=0.5) == "reject"


def test_decide_refuses_reject_not_below_accept():
    with pytest.raises(PersonalVLMError, match="below accept"):
        decide(0.5, accept=0.5, reject=0.5)
    with pytest.raises(PersonalVLMError):
        decide(0.5, accept=0.4, reject=0.6)


def test_a_concept_nothing_else_resembles_is_accepted_sooner_and_one_with_a_look_alike_is_not():
    from personal_vlm_node.matcher import IMPOSTOR_MARGIN, concept_accepts

    g = torch.Generator().manual_seed(3)
    mug = torch.randn(6, 16, generator=g)
    twin = mug + 0.05 * torch.randn(6, 16, generator=g)            # a look-alike of the mug
    ball = torch.randn(6, 16, generator=g)
    m = Matcher()
    m.set_concepts({"mug": mug, "twin": twin, "ball": ball})
    impostors = m.impostor_scores()
    assert impostors["mug"] > 0.95 and impostors["twin"] > 0.95 and impostors["ball"] < 0.6
    assert m.impostor_scores() is impostors                          # once per bank
    accepts = concept_accepts(impostors, 0.9, 0.5)
    assert accepts["mug"] == accepts["twin"] == 0.9                  # never above the calibrated accept
    assert accepts["ball"] == pytest.approx(max(0.7, impostors["ball"] + IMPOSTOR_MARGIN))
    m.remove("twin")
    assert m.impostor_scores()["mug"] < 0.6                          # the look-alike is gone: recomputed
    m.remove("ball")
    assert m.impostor_scores() == {"mug": None} and concept_accepts({"mug": None}, 0.9, 0.5) == {"mug": 0.9}
