"""The trained toy VLM and toy CLIP: cached once per machine, accurate on their own tasks, and
recognition through Ego that means something on a held-out toy split.

The first run on a machine trains the toy (≈15 min on 2 cores) inside the ``toy_vlm`` session
fixture; every later run finds it in the cache.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from personal_vlm_node import evaluation
from personal_vlm_node.assistant import Assistant
from personal_vlm_node.profiles import load_profile
from personal_vlm_node.store import ConceptStore
import numpy as np

from personal_vlm_node.testing import toy_clip as toy_clip_mod
from personal_vlm_node.testing import toy_vlm as toy_vlm_mod
from personal_vlm_node.testing import toy_world


def test_the_recipe_key_names_the_recipe_and_the_code():
    recipe = toy_vlm_mod.RECIPE
    assert recipe.key() == toy_vlm_mod.Recipe().key()
    assert dataclasses.replace(recipe, steps=recipe.steps + 1).key() != recipe.key()
    assert len(recipe.key()) == 16


def test_a_second_run_reuses_the_cached_toy_without_training(toy_vlm, monkeypatch):
    monkeypatch.setattr(toy_vlm_mod, "train", lambda *a, **k: pytest.fail("trained again"))
    t0 = time.perf_counter()
    assert toy_vlm_mod.ensure_toy_vlm() == toy_vlm
    assert time.perf_counter() - t0 < 2.0


def test_the_toy_is_a_checkpoint_with_its_calibrated_profile(toy_vlm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "chat_template.jinja", "toy_vlm.json", "toy_accuracy.json"):
        assert (toy_vlm / name).is_file(), name
    profile = load_profile(str(toy_vlm))
    assert profile.layers, "models/qwen2.5-vl-toy.yaml is found through the folder's personal_vlm.json"
    assert profile.calibration.get("mask_hit_rate")


def test_the_toy_reaches_its_accuracy_floors_on_held_out_scenes(toy_vlm):
    acc = json.loads((toy_vlm / "toy_accuracy.json").read_text())
    # Measured on scenes from a seed never used in training (see toy_vlm.evaluate_tasks).
    assert acc["describe"]["color"] >= 0.9
    assert acc["describe"]["category"] >= 0.7
    assert acc["describe"]["pattern"] >= 0.7
    assert acc["recognize"]["all"] >= 0.75
    assert acc["recognize"]["positive"] >= 0.7
    assert acc["attribute"]["all"] >= 0.65


def test_ego_recognises_concepts_on_a_held_out_toy_split(toy_vlm, tmp_path):
    world = toy_world.write_dataset(tmp_path / "world", seed=7, concepts=4, layout="yollava", references=2, tests=3)
    data = evaluation.load_dataset(world, shots=2)
    from personal_vlm_node.vlm import load_vlm

    vlm = load_vlm(str(toy_vlm), device="cpu", dtype="float32")
    with Assistant(vlm, ConceptStore(tmp_path / "store"), load_profile(str(toy_vlm)), progress=None,
                   verification=False) as assistant:
        results = evaluation.evaluate(assistant, data, tmp_path / "run", evaluation.EvalOptions(method="ego"),
                                      progress=None)
    # Chance is 0.5; half of the negatives are look-alikes (same category and colour).
    assert results["overall"]["weighted_accuracy"] >= 0.7


def test_the_toy_clip_scores_an_objects_own_attributes_above_a_lookalikes(toy_clip):
    meta = json.loads((toy_clip / "toy_clip.json").read_text())
    acc = meta["held_out_pairwise_accuracy"]
    assert acc["color"] >= 0.8
    assert acc["description"] >= 0.75
    from personal_vlm_node.r2p import ImageTextSimilarity

    sim = ImageTextSimilarity(str(toy_clip), device="cpu")
    image = toy_world.render(toy_world.scene(np.random.default_rng(0), [toy_world.ObjectLook("ball", "red")])).image
    assert int(sim.scores(image, ["a photo of red", "a photo of blue"]).argmax()) == 0


def test_toy_clip_recipe_key_changes_with_the_recipe():
    assert dataclasses.replace(toy_clip_mod.CLIP_RECIPE, steps=1).key() != toy_clip_mod.CLIP_RECIPE.key()
