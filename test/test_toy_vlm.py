"""The toy VLM and toy CLIP.

Fast tests train a two-step recipe into a temporary cache: training, saving, loading through
``load_vlm`` / ``ImageTextSimilarity``, the cache key and its reuse. The accuracy floors need the
full recipe (≈17 min on 2 cores, then cached): the toy VLM's run by default, the toy CLIP's with
``PERSONAL_VLM_TOY_TESTS=all``; a toy not cached yet trains in the background while the other tests
run (see conftest).
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


@pytest.fixture
def quick_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(toy_vlm_mod.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


QUICK = dataclasses.replace(toy_vlm_mod.RECIPE, steps=2, vision_steps=2, vision_batch=2,
                            tasks=(("describe", 1, 1.0, 0), ("recognize", 1, 2.0, 1), ("attribute", 1, 1.0, 1)))


def test_training_writes_a_checkpoint_that_loads_and_a_second_call_reuses_it(quick_cache, monkeypatch):
    from personal_vlm_node.vlm import load_vlm

    folder = toy_vlm_mod.ensure_toy_vlm(QUICK, progress=None, evaluate=False)
    assert folder.parent == quick_cache and QUICK.key() in folder.name
    meta = json.loads((folder / "toy_vlm.json").read_text())
    assert meta["training"]["steps"] == 2 and meta["key"] == QUICK.key()
    vlm = load_vlm(str(folder), device="cpu", dtype="float32")
    assert vlm.family == "qwen2_5_vl" and vlm.num_layers == QUICK.text_layers
    assert load_profile(str(folder)).model == "qwen2.5-vl-toy"   # models/qwen2.5-vl-toy.yaml via personal_vlm.json
    monkeypatch.setattr(toy_vlm_mod, "train", lambda *a, **k: pytest.fail("trained again"))
    assert toy_vlm_mod.ensure_toy_vlm(QUICK, progress=None, evaluate=False) == folder
    figures = toy_vlm_mod.evaluate_tasks(folder, per_task=1)
    assert set(figures) >= {"describe", "recognize", "attribute", "scene", "cot"}


def test_training_inputs_are_what_the_adapter_sends_at_inference(quick_cache):
    """Token ids, answer labels, pixels and M-RoPE positions of a training chat equal what the
    adapter builds for the same prompt and answer from the saved checkpoint (processor included)."""
    import torch

    from personal_vlm_node.vlm import load_vlm

    folder = toy_vlm_mod.ensure_toy_vlm(QUICK, progress=None, evaluate=False)
    vlm = load_vlm(str(folder), device="cpu", dtype="float32")
    enc = toy_vlm_mod.Encoder(vlm.tokenizer, vlm.image_processor, vlm.config)
    tokens = (QUICK.image_size // 28) ** 2
    rng = np.random.default_rng(1)
    for task in ("describe", "fingerprint", "recognize", "attribute", "scene", "cot"):
        sample = toy_vlm_mod.make_sample(task, rng, QUICK.world_size)
        ids, labels, images, _ = enc.encode(sample, tokens)
        prompt = vlm.build([vlm.encode_image(p.image) if isinstance(p, toy_vlm_mod._Img) else p for p in sample.parts],
                           answer=sample.answer)
        assert prompt.input_ids[0].tolist() + [vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")] == ids, task
        assert labels.index(next(l for l in labels if l != -100)) == prompt.answer_start
        assert vlm.tokenizer.decode([l for l in labels if l != -100]) == sample.answer + "<|im_end|>"
        grids = []
        for image in images:
            pixels, grid = toy_vlm_mod.patchify(toy_vlm_mod.model_image(image, enc.side), vlm.image_processor)
            reference = vlm.image_processor(images=[image], return_tensors="pt")
            assert torch.allclose(pixels, reference["pixel_values"], atol=1e-5)
            assert grid.tolist() == reference["image_grid_thw"][0].tolist() == [1, 10, 10]
            grids.append(grid)
        t = torch.tensor([ids])
        vlm.model.model.rope_deltas = None
        positions, _ = vlm.model.model.get_rope_index(
            t, mm_token_type_ids=(t == vlm.config.image_token_id).int(), image_grid_thw=torch.stack(grids),
            attention_mask=torch.ones_like(t))
        assert torch.equal(positions[..., :-1], prompt.position_ids), task


def test_the_toy_tokenizer_writes_each_fixed_prompt_stretch_as_one_token_and_decodes_prompts_unchanged():
    from personal_vlm_node import prompts

    tok = toy_vlm_mod.build_tokenizer(toy_vlm_mod.RECIPE.vocab_size)
    assert len(tok) <= toy_vlm_mod.RECIPE.vocab_size
    for phrase in toy_vlm_mod.prompt_phrases():
        assert len(tok(phrase, add_special_tokens=False)["input_ids"]) == 1
    for text in ("\n" + prompts.INTRODUCE.format(subject="miju (a bottle)"),
                 "\n" + prompts.RECOGNIZE.format(name="ruga"),
                 '{"keywords": ["red", "striped", "mug", "star"], "area": 15}', "Yes", "No"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("\n" + prompts.INTRODUCE.format(subject="miju (a bottle)"), add_special_tokens=False)["input_ids"]) < 16


def test_the_toy_clip_trains_saves_and_loads_as_a_verifier(quick_cache):
    from personal_vlm_node.r2p import ImageTextSimilarity

    recipe = dataclasses.replace(toy_clip_mod.CLIP_RECIPE, steps=2, batch=4)
    folder = toy_clip_mod.ensure_toy_clip(recipe, progress=None, evaluate_count=2)
    sim = ImageTextSimilarity(str(folder), device="cpu")
    image = toy_world.render(toy_world.scene(np.random.default_rng(0), [toy_world.ObjectLook("ball", "red")])).image
    assert sim.scores(image, ["a photo of red", "a photo of blue"]).shape == (2,)


def test_a_second_run_reuses_the_cached_toy_without_training(toy_vlm, monkeypatch):
    monkeypatch.setattr(toy_vlm_mod, "train", lambda *a, **k: pytest.fail("trained again"))
    assert toy_vlm_mod.ensure_toy_vlm() == toy_vlm


def test_the_toy_is_a_checkpoint_with_its_calibrated_profile(toy_vlm):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "chat_template.jinja", "toy_vlm.json", "toy_accuracy.json"):
        assert (toy_vlm / name).is_file(), name
    profile = load_profile(str(toy_vlm))
    # models/qwen2.5-vl-toy.yaml, found through the folder's personal_vlm.json
    assert profile.calibration, "the toy's profile was not found"


def test_the_toy_reaches_its_accuracy_floors_on_held_out_scenes(toy_vlm):
    acc = json.loads((toy_vlm / "toy_accuracy.json").read_text())
    # Measured on scenes from a seed never used in training (see toy_vlm.evaluate_tasks), 60
    # describe samples (one standard error ≈ 6 points). Floors well above chance (colour 1/7,
    # category 1/6, pattern 1/4, yes/no 1/2) and below what the recipe measured on two CPUs: they
    # fail when learning breaks. The category is copied from the prompt when the prompt names it
    # (35 % of the samples) and read from the image otherwise: on an Intel Xeon, over 150 scenes,
    # 57 % and 32 % (blended 0.48), and on another CI machine the blend was 0.317; its floor sits 3
    # standard errors below the Xeon's. Attribute yes/no (0.55-0.63 over four trainings, 60 samples)
    # is too close to chance to be a floor.
    floors = {("describe", "color"): 0.55, ("describe", "category"): 0.28, ("describe", "pattern"): 0.35,
              ("recognize", "all"): toy_vlm_mod.YES_NO_FLOOR, ("recognize", "positive"): 0.7}
    below = [f"{task} {key} {acc[task][key]} < {floor}" for (task, key), floor in floors.items()
             if acc[task][key] < floor]
    assert not below, f"below the floors: {below}; all figures: {acc}"
    assert toy_vlm_mod.weak_yes_no(acc) is None
    assert "near chance" in toy_vlm_mod.weak_yes_no({"recognize": {"all": 0.57, "positive": 0.32}})
    # Both halves of the category are measured apart, so the toy's weak shape reading shows.
    assert {"category_given", "category_read"} <= set(acc["describe"])


def _toy_split_results(toy_vlm, tmp_path, method: str, **options) -> dict:
    """``method`` evaluated on a small held-out toy split (seed 7: 4 concepts, 3 tests each)."""
    from personal_vlm_node.vlm import load_vlm

    world = toy_world.write_dataset(tmp_path / "world", seed=7, concepts=4, layout="yollava", references=2, tests=3)
    data = evaluation.load_dataset(world, shots=2)
    vlm = load_vlm(str(toy_vlm), device="cpu", dtype="float32")
    with Assistant(vlm, ConceptStore(tmp_path / "store"), load_profile(str(toy_vlm)), progress=None,
                   verification=False, verifier_model=None, **options) as assistant:
        return evaluation.evaluate(assistant, data, tmp_path / "run",
                                   evaluation.EvalOptions(method=method, verifier_model=None), progress=None)


def test_ego_recognises_concepts_on_a_held_out_toy_split(toy_vlm, tmp_path):
    results = _toy_split_results(toy_vlm, tmp_path, "ego")
    # Chance is 0.5; half of the negatives are look-alikes (same category and colour).
    assert results["overall"]["weighted_accuracy"] >= 0.7


def test_the_cascade_recognises_concepts_on_a_held_out_toy_split(toy_vlm, tmp_path):
    results = _toy_split_results(toy_vlm, tmp_path, "cascade")
    # Measured 0.875 (as Ego alone) on an Intel Xeon, the matcher deciding 33 of the 48 pairs; the
    # floor leaves 12 points for another CPU's toy. (Ego joint has no floor: on this toy, which
    # cannot bind names to several images, it is at chance.)
    assert results["overall"]["weighted_accuracy"] >= 0.75
    assert results["decided_by"].get("match", 0) > 0 and set(results["stages"]) >= {"match"}


def test_icpt_recognises_concepts_on_a_held_out_toy_split_with_the_toy_projector(toy_vlm, toy_projector, tmp_path):
    results = _toy_split_results(toy_vlm, tmp_path, "icpt", icpt_projector=str(toy_projector))
    # Chance is 0.5 (half of the negatives are look-alikes). Measured 0.875 on an Intel Xeon (Ego:
    # 0.903 on the same split); the floor leaves 15 points for another CPU's toy and projector.
    assert results["overall"]["weighted_accuracy"] >= 0.72
    assert results["icpt"]["tokens_per_concept"] <= results["icpt"]["ego_tokens_per_concept"]
    assert results["decided_by"] == {"icpt": 48}


def test_the_toy_clip_scores_an_objects_own_attributes_above_a_lookalikes(toy_clip):
    meta = json.loads((toy_clip / "toy_clip.json").read_text())
    acc = meta["held_out_pairwise_accuracy"]
    assert acc["color"] >= 0.8
    assert acc["description"] >= 0.75
    from personal_vlm_node.r2p import ImageTextSimilarity

    sim = ImageTextSimilarity(str(toy_clip), device="cpu")
    image = toy_world.render(toy_world.scene(np.random.default_rng(0), [toy_world.ObjectLook("ball", "red")])).image
    assert int(sim.scores(image, ["a photo of red", "a photo of blue"]).argmax()) == 0


def test_background_training_reports_a_failure_with_its_log_and_stops_its_process_group(quick_cache):
    import subprocess
    import sys

    from personal_vlm_node.testing import toy_background

    assert not toy_background.ready("toy_vlm") and not toy_background.ready("toy_clip")
    log = quick_cache / "log"
    quick_cache.mkdir()
    log.write_text("step 1\nRuntimeError: out of memory\n")
    failed = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    problem = toy_background.wait(failed, "toy_vlm", log, poll_s=0.05)
    assert "exit code 3" in problem and "RuntimeError: out of memory" in problem
    assert toy_background.wait(None, "toy_vlm", None) is None
    # A trainer and the renderer it forked: stop() ends both.
    trainer = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                "print('up', flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE, start_new_session=True)
    assert trainer.stdout.readline().strip() == b"up"
    toy_background.stop(trainer)
    assert trainer.returncode == -15           # ended by the SIGTERM to its group, not by a later kill
    for _ in range(50):       # the renderer is gone (or a zombie no one reaps, in a container)
        states = subprocess.run(["ps", "-o", "stat=", "-g", str(trainer.pid)], capture_output=True, text=True).stdout
        if all(state.startswith("Z") for state in states.split()):
            break
        time.sleep(0.1)
    assert all(state.startswith("Z") for state in states.split()), states


def test_toy_clip_recipe_key_changes_with_the_recipe():
    assert dataclasses.replace(toy_clip_mod.CLIP_RECIPE, steps=1).key() != toy_clip_mod.CLIP_RECIPE.key()


def test_which_toy_tests_run_is_set_by_one_variable():
    import conftest

    # The default: the VLM's and its ICPT projector's.
    assert conftest.toys_on(None) == conftest.toys_on("vlm") == {"toy_vlm", "toy_projector"}
    assert conftest.toys_on("all") == conftest.toys_on("1") == {"toy_vlm", "toy_projector", "toy_clip"}
    assert conftest.toys_on("0") == set()
    with pytest.raises(pytest.UsageError, match="use vlm"):
        conftest.toys_on("clip please")


def test_the_background_trainer_trains_only_the_toys_named_and_refuses_unknown_ones(capsys):
    from personal_vlm_node.testing import toy_background

    assert toy_background.main(["toy_vlm_typo"]) == 2
    assert "unknown toy" in capsys.readouterr().err


def test_the_background_trainer_runs_at_the_lowest_priority():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import os, sys; from pathlib import Path; from personal_vlm_node.testing import toy_background as tb; "
            "group = Path('/proc/self/autogroup'); "
            "tb.TOYS['probe'] = (None, None, lambda: (os.nice(0), group.read_text().strip() if group.exists() else '')); "
            "sys.exit(tb.main(['probe']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          start_new_session=True)        # as toy_background.start runs it
    assert done.returncode == 0, done.stderr
    assert "[toy_background] probe: (19, " in done.stdout     # the renderer it forks inherits it
    if Path("/proc/self/autogroup").exists():               # the session's scheduling group too
        assert "nice 19" in done.stdout, done.stdout
