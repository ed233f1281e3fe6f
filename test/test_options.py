"""The options every front end builds for the façade: one list per choice, checked before loading."""

from __future__ import annotations

import pytest

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.options import BACKENDS, DTYPES, ENCODER_CHOICES, AssistantOptions, check_thresholds
from personal_vlm_node.profiles import ModelProfile


def test_the_backend_and_dtype_lists_are_the_ones_every_front_end_offers():
    from personal_vlm_node.cli import build_parser
    from personal_vlm_node.settings import PARAMETERS
    from personal_vlm_node.runtime.backends import BACKENDS as RUNTIME_BACKENDS
    from personal_vlm_node.vlm import DTYPES as VLM_DTYPES

    assert BACKENDS == RUNTIME_BACKENDS == ("torch", "onnxruntime", "tensorrt")
    assert ENCODER_CHOICES == PARAMETERS["encoder_backend"].choices == BACKENDS + ("auto",)
    assert DTYPES == VLM_DTYPES == PARAMETERS["dtype"].choices
    parser = build_parser()
    dtype = next(a for a in parser._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == DTYPES
    detect = parser._subparsers._group_actions[0].choices["detect"]
    backend = next(a for a in detect._actions if a.dest == "backend")
    assert tuple(backend.choices) == ENCODER_CHOICES


def test_options_refuse_an_unknown_backend_and_a_crossed_band():
    with pytest.raises(PersonalVLMError, match="unknown encoder backend 'cuda'"):
        AssistantOptions(backend="cuda").check()
    with pytest.raises(PersonalVLMError, match=r"reject_threshold \(0.7\) must be below accept_threshold \(0.5\)"):
        AssistantOptions(accept_threshold=0.5, reject_threshold=0.7).check()
    assert check_thresholds(0.8, 0.55) is None
    with pytest.raises(PersonalVLMError, match="verification_busy_fraction"):
        AssistantOptions(verification_busy_fraction=0.0).check()
    AssistantOptions(backend="auto", verification_busy_fraction=1.0).check()


def test_threshold_overrides_merge_with_the_profile_and_are_checked_together():
    from personal_vlm_node.assistant import _with_overrides

    profile = ModelProfile(accept_threshold=0.8, reject_threshold=0.55, max_concepts_in_context=5)
    merged = _with_overrides(profile, AssistantOptions(accept_threshold=0.9, max_concepts_in_context=3))
    assert (merged.accept_threshold, merged.reject_threshold, merged.max_concepts_in_context) == (0.9, 0.55, 3)
    assert profile.accept_threshold == 0.8                     # the loaded profile itself is untouched
    with pytest.raises(PersonalVLMError, match=r"reject_threshold \(0.55\) must be below accept_threshold \(0.3\)"):
        _with_overrides(profile, AssistantOptions(accept_threshold=0.3))


def test_the_assistant_is_configured_by_its_options(adapters, tmp_path):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.store import ConceptStore

    options = AssistantOptions(verification=False, tracker_k=1, tracker_n=1, r2p_margin=0.3, reject_threshold=0.1)
    with Assistant(adapters("internvl"), ConceptStore(tmp_path / "s"), ModelProfile(), progress=None,
                   options=options) as assistant:
        assert (assistant.tracker.k, assistant.tracker.n) == (1, 1)
        assert assistant.thresholds() == (0.8, 0.1)
        assert assistant.r2p_margin == 0.3 and assistant.verification is False and assistant.encoder is None
        assert assistant.check_name("  my mug ") == "my mug"
        with pytest.raises(PersonalVLMError):
            assistant.check_name("   ")
