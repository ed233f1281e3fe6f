"""The per-frame path: encoder → matcher → decision → verifier → tracker, on tiny models."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from personal_vlm_node.assistant import Assistant
from personal_vlm_node.frames import UncertainMatch
from personal_vlm_node.profiles import ModelProfile
from personal_vlm_node.r2p import Verdict
from personal_vlm_node.store import ConceptStore
from personal_vlm_node.testing.kit import photo


@pytest.fixture
def make(adapters, tmp_path):
    made = []

    def build(family="qwen2_5_vl", verification=False, **profile):
        values = {"max_memory_tokens": 8, "min_memory_tokens": 2, **profile}
        a = Assistant(adapters(family), ConceptStore(tmp_path / f"store{len(made)}"), ModelProfile(**values),
                      progress=None, verification=verification, verifications_per_second=50.0)
        made.append(a)
        return a

    yield build
    for a in made:
        a.close()


def test_a_taught_concept_is_detected_on_its_own_picture_after_hysteresis(make, family):
    a = make(family, accept_threshold=0.999, reject_threshold=0.5)
    picture = photo(1)
    a.teach("my mug", [picture], category="mug")
    # The memory is a subset of this picture's own tokens: every memory token matches exactly.
    first = a.observe(picture)
    assert first.detections == []                      # k=2 of n=3: not on the first frame
    second = a.observe(picture)
    assert [d.name for d in second.detections] == ["my mug"]
    detection = second.detections[0]
    assert detection.score == pytest.approx(1.0, abs=1e-4)
    assert detection.source == "match" and detection.category == "mug" and detection.track_id >= 1
    x, y, w, h = detection.box
    assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 300 + 1e-3 and y + h <= 200 + 1e-3
    assert set(second.timings) == {"encode", "match", "total"}
    assert a.observe(picture).detections[0].track_id == detection.track_id


def test_a_forgotten_concept_disappears_on_the_next_frame(make):
    a = make(accept_threshold=0.999, reject_threshold=0.5)
    picture = photo(2)
    a.teach("Fluffy", [picture])
    a.observe(picture)
    assert [d.name for d in a.observe(picture).detections] == ["Fluffy"]
    a.forget("Fluffy")
    assert a.observe(picture).detections == []


def test_uncertain_scores_are_verified_off_the_frame_path(make):
    # Every score falls in the uncertain band; the Ego check decides (threshold 0 = always yes).
    a = make(verification=True, accept_threshold=1.5, reject_threshold=-1.0, recognize_threshold=0.0)
    picture = photo(3)
    a.teach("Grandpa's cane", [picture])
    first = a.observe(picture)
    assert first.uncertain == ["Grandpa's cane"] and first.detections == []
    deadline = time.monotonic() + 60
    detections = []
    while time.monotonic() < deadline and not detections:
        detections = a.observe(picture).detections
    assert [d.source for d in detections] == ["ego"]
    assert 0.0 <= detections[0].score <= 1.0
    assert a.verifier.stats["verified"] >= 1
    verdict = a.verifier.result("Grandpa's cane")
    assert isinstance(verdict, Verdict) and verdict.present and verdict.stages is None
    assert detections[0].score == pytest.approx(verdict.p_yes)


def test_an_uncertain_match_is_queued_with_its_frame_and_every_concept_s_score(make):
    a = make(verification=True, accept_threshold=1.5, reject_threshold=-1.0)
    a.verifier.stop()                                 # keep the request queued
    picture = photo(5)
    a.teach("mug", [picture])
    queued = []
    a.verifier._verify = lambda request: queued.append(request.payload)
    a.observe(picture)
    assert a.verifier.pending == ["mug"]
    a.verifier.verify_next()
    (case,) = queued
    assert isinstance(case, UncertainMatch) and case.concept == "mug" and case.frame is picture
    assert set(case.scores) == {"mug"} and case.tokens.num_tokens > 0


def test_without_verification_uncertain_concepts_are_not_detected(make):
    a = make(verification=False, accept_threshold=1.5, reject_threshold=-1.0)
    picture = photo(4)
    a.teach("thing", [picture])
    for _ in range(3):
        result = a.observe(picture)
    assert result.detections == [] and result.uncertain == []


def test_encoding_a_frame_does_not_wait_for_the_language_model(make):
    a = make()
    picture = photo(6)
    with a.vlm._lock:                       # a long /ask holds the model's lock
        tokens = a.vlm.encode_image(picture)
    assert tokens.num_tokens > 0


def test_closing_without_waiting_interrupts_generation(make):
    from personal_vlm_node.errors import PersonalVLMError

    a = make()
    a.close(wait=False)
    with pytest.raises(PersonalVLMError, match="interrupted"):
        a.vlm.generate(["Describe ", a.vlm.encode_image(photo(7))], max_new_tokens=4)
    a.vlm._interrupted.clear()              # the adapter is shared with other tests


def test_ask_streams_the_growing_answer_and_stops_when_told(make):
    a = make()
    partial = []
    full = a.ask("Describe this.", photo(8), on_partial=lambda text: partial.append(text) is None)
    assert not full.stopped and partial and partial[-1] == full.answer
    assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:]))

    seen = []
    stopped = a.ask("Describe this.", photo(8), on_partial=lambda text: seen.append(text) or len(seen) < 2)
    assert stopped.stopped and len(seen) == 2 and stopped.answer == seen[-1]


def test_settings_change_while_running_and_bad_ones_are_refused(make):
    from personal_vlm_node.errors import PersonalVLMError

    a = make()
    profile = a.configuration()
    a.configure(accept_threshold=0.9, reject_threshold=0.2)
    assert a.thresholds() == (0.9, 0.2)
    with pytest.raises(PersonalVLMError, match=r"reject_threshold \(0.95\) must be below accept_threshold \(0.9\)"):
        a.configure(reject_threshold=0.95)
    assert a.thresholds() == (0.9, 0.2)
    a.configure(max_concepts_in_context=3, r2p_margin=0.3)
    assert a.profile.max_concepts_in_context == 3 and a.r2p_margin == 0.3
    with pytest.raises(PersonalVLMError, match=r"r2p_margin must lie in \[0, 0.5\], got 0.9"):
        a.configure(r2p_margin=0.9, max_concepts_in_context=4)
    assert (a.r2p_margin, a.profile.max_concepts_in_context) == (0.3, 3)     # a refused change changes nothing
    with pytest.raises(PersonalVLMError, match="max_concepts_in_context must be a whole number"):
        a.configure(max_concepts_in_context=2.5)
    with pytest.raises(PersonalVLMError, match=r"max_concepts_in_context must lie in \[0, 64\], got 65"):
        a.configure(max_concepts_in_context=65)
    with pytest.raises(PersonalVLMError, match="r2p_margin must be a number, got 'wide'"):
        a.configure(r2p_margin="wide")
    with pytest.raises(PersonalVLMError, match="overlay cannot change while running"):
        a.configure(overlay=False)
    a.configure(accept_threshold=-1, reject_threshold=None, max_concepts_in_context=-1, r2p_margin=None)
    assert {k: v for k, v in a.configuration().items() if k != "verification"} == \
        {k: v for k, v in profile.items() if k != "verification"}          # None / negative: the profile's
    linears = [m for m in a.vlm.language_model.modules() if isinstance(m, torch.nn.Linear)]
    a.configure(verification=True)
    assert a.verification is True and all(m._forward_pre_hooks for m in linears)
    a.configure(verification=False)
    assert a.verification is False and not any(m._forward_pre_hooks for m in linears)


def test_when_ego_is_unsure_r2p_settles_and_keeps_every_stage(adapters, tmp_path):
    # A margin of 0.5 around the threshold makes every Ego verdict "unsure".
    a = Assistant(adapters("internvl"), ConceptStore(tmp_path / "s"),
                  ModelProfile(max_memory_tokens=8, min_memory_tokens=2, accept_threshold=1.5,
                               reject_threshold=-1.0),
                  progress=None, verification=True, verifications_per_second=50.0, r2p_margin=0.5)
    try:
        picture = photo(8)
        a.teach("my mug", [picture]).wait_fingerprint(timeout=120)
        a.teach("Fluffy", [photo(9)])
        deadline = time.monotonic() + 120
        verdict = None
        while time.monotonic() < deadline and verdict is None:
            a.observe(picture)
            verdict = a.verifier.result("my mug")
            time.sleep(0.05)
        assert verdict is not None and verdict.source == "r2p"
        assert {"candidates", "pairwise"} & set(verdict.stages)
        assert 0.0 <= verdict.confidence <= 1.0
    finally:
        a.close()


# ---- a store shared by several processes, each on its own model -----------------------------

def _assistant(adapters, family, store_dir, rebuild=True, **profile):
    values = {"max_memory_tokens": 8, "min_memory_tokens": 2, "accept_threshold": 0.999,
              "reject_threshold": 0.5, **profile}
    return Assistant(adapters(family), ConceptStore(store_dir), ModelProfile(**values), progress=None,
                     verification=False, rebuild=rebuild)


def test_a_concept_taught_and_forgotten_elsewhere_is_followed_on_refresh(adapters, tmp_path):
    node = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
    cli = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
    picture = photo(3)
    try:
        cli.teach("lamp", [picture], category="lamp")
        assert node.refresh() is True
        node.observe(picture)
        detections = node.observe(picture).detections
        assert [(d.name, d.category) for d in detections] == [("lamp", "lamp")]
        assert node.refresh() is False                       # nothing changed since
        cli.forget("lamp")
        node.refresh()
        assert node.observe(picture).detections == []
        assert node.ask("what is this?", picture).concepts == []
    finally:
        node.close()
        cli.close()


def test_the_store_watcher_thread_follows_changes_within_a_second(adapters, tmp_path):
    node = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
    other = ConceptStore(tmp_path / "s")
    picture = photo(4)
    teacher = _assistant(adapters, "qwen2_5_vl", tmp_path / "t")
    try:
        teacher.teach("lamp", [picture])
        record = teacher.store.get("lamp")
        node.watch_store(period=0.05)
        other.add(record, teacher.store.load_memory("lamp"), teacher.store.load_images("lamp"))
        deadline = time.monotonic() + 1.0
        while "lamp" not in node.matcher.names and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "lamp" in node.matcher.names
        other.forget("lamp")
        deadline = time.monotonic() + 1.0
        while "lamp" in node.matcher.names and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "lamp" not in node.matcher.names
    finally:
        node.close()
        teacher.close()


def test_memories_are_never_matched_across_models(adapters, tmp_path):
    qwen = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
    picture = photo(5)
    try:
        qwen.teach("mug", [picture])
        original = qwen.store.load_memory("mug")["memory"].clone()
        # Another model that may not rebuild: the concept is reported, not matched.
        intern = _assistant(adapters, "internvl", tmp_path / "s", rebuild=False)
        assert intern.unmatched == {"mug"}
        assert "mug" not in intern.matcher.names
        intern.close()
        # Rebuilt for the other model: both models keep their own memory.
        intern = _assistant(adapters, "internvl", tmp_path / "s")
        assert "mug" in intern.matcher.names and intern.unmatched == set()
        assert torch.equal(qwen.memory("mug"), original)
        assert not torch.equal(intern.memory("mug").float()[:1], original[:1]) or \
            intern.memory("mug").shape != original.shape
        intern.close()
        # The first model finds its memory untouched: nothing to rebuild.
        again = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
        assert again.rebuild_stale_memories() == []
        assert torch.equal(again.memory("mug"), original)
        again.close()
    finally:
        qwen.close()


def test_a_concept_whose_rebuild_fails_is_not_matched(adapters, tmp_path):
    qwen = _assistant(adapters, "qwen2_5_vl", tmp_path / "s")
    qwen.teach("mug", [photo(6)])
    qwen.close()
    directory = next((tmp_path / "s" / "concepts").iterdir())
    (directory / "ref_0.png").unlink()
    intern = _assistant(adapters, "internvl", tmp_path / "s")
    try:
        assert "mug" not in intern.matcher.names
        assert intern.unmatched == {"mug"}
    finally:
        intern.close()


def test_a_verification_pauses_inside_the_language_model_while_a_frame_is_processed(make):
    a = make("qwen2_5_vl", verification=True)
    a.verifier.stop()                                 # drive the queue by hand
    linears = [m for m in a.vlm.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m._forward_pre_hooks for m in linears)
    reached, release = threading.Event(), threading.Event()
    calls = []

    def verify(request):                              # one LM pass, as a verification does
        reached.set()
        release.wait(5.0)
        a.vlm.yes_probability(["Is this a mug?"])
        calls.append(request.key)
        return Verdict(False, 0.0, "ego")

    a.verifier._verify = verify
    a.verifier.submit("mug", None)
    worker = threading.Thread(target=a.verifier.verify_next)
    worker.start()
    assert reached.wait(5.0)
    with a.verifier.frame():
        release.set()
        deadline = time.monotonic() + 5.0
        while a.verifier.stats["yields"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.verifier.stats["yields"] == 1 and calls == []     # paused at a linear layer
    worker.join(5.0)
    assert calls == ["mug"]
    a.close()
    assert not any(m._forward_pre_hooks for m in linears)


def test_teaching_encodes_through_the_frame_encoder_and_falls_back_where_it_cannot(adapters, tmp_path):
    """Memories come from the frame path's own encoder (same tower and precision as the frames);
    a picture that encoder refuses (e.g. an export for one size only) goes through the torch tower."""
    from personal_vlm_node.errors import PersonalVLMError

    adapter = adapters("qwen2_5_vl")
    calls = []

    def encoder(tensors):
        calls.append(True)
        if len(calls) == 2:
            raise PersonalVLMError("exported for 448 px images only")
        with torch.inference_mode():
            return adapter.vision_forward(tensors) * 2.0        # tell its tokens apart from the tower's

    a = Assistant(adapter, ConceptStore(tmp_path / "store"), ModelProfile(max_memory_tokens=8, min_memory_tokens=2),
                  progress=None, encoder=encoder, verification=False)
    try:
        picture = photo(7)
        through_encoder = a.encode_reference(picture)
        fallback = a.encode_reference(picture)
        tower = adapter.encode_image(picture)
        assert torch.allclose(through_encoder.features, 2.0 * tower.features, atol=1e-5)
        assert torch.equal(fallback.features, tower.features)
        calls.clear()
        a.teach("my mug", [picture]).wait_fingerprint()
        assert len(calls) == 1                             # the teaching picture went through the encoder
        memory = a.stored_memory("my mug")["memory"]
        assert all((2.0 * tower.features.float() - row.float()).abs().sum(-1).min() < 1e-3 for row in memory)
    finally:
        a.close()


def test_with_concept_thresholds_a_concept_unlike_the_others_is_accepted_at_its_own_threshold(adapters, tmp_path):
    # The profile's accept lies beyond every score: only a concept's own, lower accept can detect it.
    profile = ModelProfile(max_memory_tokens=8, min_memory_tokens=2, accept_threshold=1.5, reject_threshold=-1.0)
    a = Assistant(adapters("qwen2_5_vl"), ConceptStore(tmp_path / "store"), profile, progress=None,
                  verification=False, concept_thresholds=True)
    try:
        a.teach("thing", [photo(4)])
        assert a.concept_accepts() == {"thing": 1.5}                  # alone: no impostor to measure
        a.teach("other", [photo(5)])
        accepts = a.concept_accepts()
        impostors = a.matcher.impostor_scores()
        assert accepts["thing"] == pytest.approx(max(0.25, impostors["thing"] + 0.01)) and accepts["thing"] < 1.0
        assert a.concept_accepts(enabled=False) == {}
        for _ in range(3):
            result = a.observe(photo(4))
        assert "thing" in [d.name for d in result.detections]         # the profile's accept alone: never
    finally:
        a.close()
