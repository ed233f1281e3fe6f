"""ICPT inside the Assistant: prompts taught beside memories, made on demand, chosen as the method,
and a projector that cannot be had leaving Ego in charge."""

from __future__ import annotations

import pytest
import torch

from personal_vlm_node import icpt, prompts
from personal_vlm_node.assistant import Assistant
from personal_vlm_node.icpt_prompts import PROJECTOR_KEY, PROMPT_KEY, projector_id
from personal_vlm_node.profiles import ModelProfile
from personal_vlm_node.store import ConceptStore
from personal_vlm_node.testing.kit import photo

FAMILY = "qwen2_5_vl"


@pytest.fixture(scope="module")
def projector_file(adapters, tmp_path_factory):
    vlm = adapters(FAMILY)
    torch.manual_seed(0)
    projector = icpt.Projector(icpt.ProjectorConfig(vlm.hidden_size, hidden=32, queries=8))
    projector.set_statistics(3.0, torch.randn(vlm.hidden_size))
    path = tmp_path_factory.mktemp("icpt") / "projector.safetensors"
    icpt.save_projector(path, projector.eval(), icpt.backbone_fingerprint(vlm))
    return path


def _assistant(adapters, store, **options):
    profile = ModelProfile(max_memory_tokens=4, min_memory_tokens=4)
    return Assistant(adapters(FAMILY), ConceptStore(store), profile, progress=None, verification=False,
                     verifier_model=None, **options)


def test_teaching_stores_the_prompt_beside_the_memory_and_icpt_recognises_with_it(adapters, projector_file, tmp_path):
    with _assistant(adapters, tmp_path / "s", icpt_projector=str(projector_file),
                    recognition_method="icpt") as a:
        assert a.recognition_method == "icpt" and not a.warnings
        result = a.teach("my mug", [photo(3), photo(4)])
        assert result.timings["icpt"] >= 0
        stored = a.stored_memory("my mug")
        assert stored[PROMPT_KEY].shape[1] == a.vlm.hidden_size and 4 <= stored[PROMPT_KEY].shape[0] <= 8
        assert bytes(stored[PROJECTOR_KEY].tolist()).decode() == projector_id(projector_file)
        # The prompt is the projector's, from the two views taught.
        views = [a.encode_reference(photo(k)) for k in (3, 4)]
        made = icpt.make_prompt(a.vlm, a.icpt_prompts.projector, views, "my mug")
        assert torch.allclose(stored[PROMPT_KEY], made.tokens, atol=1e-5)
        # recognize asks with the prompt (not the memory), against ICPT's threshold.
        image = photo(3)
        [found] = a.recognize(image, ["my mug"])
        expected = a.vlm.yes_probability(prompts.recognize(a.icpt_prompt("my mug"), a.vlm.encode_image(image)))
        assert found.p_yes == pytest.approx(expected, abs=1e-5)
        assert a.recognition_threshold == a.icpt_threshold == 0.5


def test_a_concept_taught_before_the_projector_gets_its_prompt_from_its_pictures_on_demand(
        adapters, projector_file, tmp_path):
    with _assistant(adapters, tmp_path / "s") as a:
        a.teach("Fluffy", [photo(5), photo(6)])
        assert PROMPT_KEY not in a.stored_memory("Fluffy")
        ego_memory = a.stored_memory("Fluffy")["memory"].clone()
    with _assistant(adapters, tmp_path / "s", icpt_projector=str(projector_file)) as a:
        assert a.recognition_method == "ego"          # a projector loaded does not change the method
        prompt = a.icpt_prompt("Fluffy")
        views = [a.encode_reference(p) for p in a.store.load_images("Fluffy")]
        assert torch.allclose(prompt.tokens, icpt.make_prompt(a.vlm, a.icpt_prompts.projector, views, "Fluffy").tokens,
                              atol=1e-5)
        stored = a.stored_memory("Fluffy")           # written back beside the memory, which is unchanged
        assert torch.equal(stored[PROMPT_KEY], prompt.tokens) and torch.equal(stored["memory"], ego_memory)
    with _assistant(adapters, tmp_path / "s", icpt_projector=str(projector_file)) as a:
        assert torch.equal(a.icpt_prompt("Fluffy").tokens, prompt.tokens)     # read, not made again


@pytest.mark.parametrize("problem", ["missing", "damaged", "foreign"])
def test_a_projector_that_cannot_be_had_leaves_icpt_unavailable_with_one_warning_and_ego_working(
        adapters, projector_file, tmp_path, problem):
    path = tmp_path / "p.safetensors"
    if problem == "damaged":
        path.write_bytes(projector_file.read_bytes()[:100])
    elif problem == "foreign":
        other = adapters("idefics3")
        projector = icpt.Projector(icpt.ProjectorConfig(other.hidden_size, hidden=32, queries=8))
        projector.set_statistics(3.0, torch.zeros(other.hidden_size))
        icpt.save_projector(path, projector, icpt.backbone_fingerprint(other))
    with _assistant(adapters, tmp_path / "s", icpt_projector=str(path), recognition_method="icpt") as a:
        assert len(a.warnings) == 1 and a.warnings[0].startswith("ICPT unavailable:")
        assert "\n" not in a.warnings[0] and "Ego recognises instead" in a.warnings[0]
        assert a.recognition_method == "ego" and a.icpt_prompts is None
        a.teach("cane", [photo(7)])
        assert PROMPT_KEY not in a.stored_memory("cane")
        [found] = a.recognize(photo(7), ["cane"])
        assert found.p_yes == pytest.approx(a.vlm.yes_probability(prompts.recognize(
            a.recognition_memory("cane"), a.vlm.encode_image(photo(7)))), abs=1e-5)


def test_icpt_named_without_a_projector_says_so_once_and_ego_recognises(adapters, tmp_path):
    with _assistant(adapters, tmp_path / "s", recognition_method="icpt") as a:
        assert a.recognition_method == "ego"
        assert len(a.warnings) == 1 and "no ICPT projector is named" in a.warnings[0]


def test_the_background_gap_draws_each_query_on_the_references_background_and_on_a_fresh_one(adapters, projector_file):
    import numpy as np

    from personal_vlm_node.testing import background_gap, toy_world

    rng = np.random.default_rng(3)
    look = toy_world.random_look(rng)
    reference_spec = toy_world.reference_scene(rng, look)
    reference = np.asarray(toy_world.render(reference_spec).image, np.float32)
    [(same, fresh, positive), (_, _, negative)] = background_gap._queries(rng, look, reference_spec, 1)
    assert positive and not negative
    # The corners (clutter, no object) are the reference's in the first image, not in the second.
    corner = (slice(0, 12), slice(0, 12))
    assert np.abs(np.asarray(same, np.float32)[corner] - reference[corner]).mean() < 25
    assert np.abs(np.asarray(fresh, np.float32)[corner] - reference[corner]).mean() > \
        np.abs(np.asarray(same, np.float32)[corner] - reference[corner]).mean()
    vlm = adapters(FAMILY)
    figures = background_gap.measure(vlm, {"p": icpt.load_projector(projector_file, vlm)}, concepts=1, per_kind=1)
    assert set(figures) == {"p", "ego"} and figures["p"]["pairs"] == 2
    assert figures["p"]["gap"] == pytest.approx(figures["p"]["same_background_wtd"] - figures["p"]["fresh_background_wtd"],
                                                abs=1e-3)


def test_eval_of_icpt_without_a_projector_says_so_before_teaching_anything(adapters, tmp_path):
    from personal_vlm_node import evaluation
    from personal_vlm_node.errors import PersonalVLMError
    from personal_vlm_node.testing.toy_world import write_dataset

    world = write_dataset(tmp_path / "w", seed=7, concepts=2, layout="yollava", references=1, tests=1)
    with _assistant(adapters, tmp_path / "s") as a:
        for method in ("icpt", "cascade"):
            options = evaluation.EvalOptions(method=method, recognition_method="icpt" if method == "cascade" else None)
            with pytest.raises(PersonalVLMError, match="ICPT is not loaded: name a projector"):
                evaluation.evaluate(a, evaluation.load_dataset(world, shots=1), tmp_path / method, options, progress=None)
        assert len(a.store) == 0
