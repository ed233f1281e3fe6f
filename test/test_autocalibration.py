"""A checkpoint calibrates itself on the built-in synthetic world, once, cached per checkpoint.

Every family's tiny random-weight checkpoint goes through the whole calibration (a small synthetic
set: the procedure, not the figures, is what a random model can show); the trained toy's figures are
in docs/calibration.md. Bad input: an unwritable cache, a cancelled run, a model whose attention
cannot be captured — a clear message, the uncalibrated values in use, nothing half-written used.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from personal_vlm_node import autocalibration as ac
from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.profiles import ModelProfile, load_profile

REPO = Path(__file__).resolve().parent.parent
SMALL = ac.SyntheticSet(layer_images=4, split_concepts=2, split_tests=2)


def _uncalibrated(folder) -> ModelProfile:
    return load_profile(str(folder))


def test_the_shipped_real_profiles_lack_both_parts_and_the_toys_lacks_none():
    for path in sorted((REPO / "models").glob("*.yaml")):
        profile = load_profile("x", path)
        expected = [] if path.stem == "qwen2.5-vl-toy" else ["layers", "thresholds"]
        assert ac.missing_parts(profile) == expected, path.name


def test_what_a_user_chose_or_measured_stays():
    assert ac.missing_parts(ModelProfile()) == ["layers", "thresholds"]
    assert ac.missing_parts(ModelProfile(layers=[3, 5])) == ["thresholds"]
    assert ac.missing_parts(ModelProfile(accept_threshold=0.97)) == ["layers"]       # written by hand
    assert ac.missing_parts(ModelProfile(calibration={"thresholds": {"pairs": 9}})) == ["layers"]


def test_the_cache_name_follows_the_checkpoint_the_settings_and_what_is_measured(tmp_path, tiny_checkpoints):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoints["qwen2_5_vl"], folder)
    first = ac.checkpoint_fingerprint(folder)
    assert first == ac.checkpoint_fingerprint(tiny_checkpoints["qwen2_5_vl"])     # the same weights anywhere
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ac.checkpoint_fingerprint(folder) != first                             # other weights
    profile = ModelProfile(model="m")
    base = ac.cache_path(first, profile, ["layers", "thresholds"], tmp_path)
    assert base.parent == tmp_path and base.name.startswith("m-" + first)
    assert ac.cache_path(first, replace(profile, max_memory_tokens=64), ["layers", "thresholds"], tmp_path) != base
    assert ac.cache_path(first, replace(profile, layers=[1]), ["thresholds"], tmp_path) != \
        ac.cache_path(first, replace(profile, layers=[2]), ["thresholds"], tmp_path)
    with pytest.raises(PersonalVLMError, match="cannot read the checkpoint"):
        ac.checkpoint_fingerprint(tmp_path / "missing")


def test_the_native_side_comes_from_each_familys_processor(adapters):
    sides = {family: ac.native_side(adapters(family).image_processor)
             for family in ("qwen2_5_vl", "qwen3_vl", "internvl", "idefics3")}
    # Qwen: sqrt(max_pixels); InternVL: its tile; SmolVLM: max_image_size (128, raised to the floor).
    assert sides == {"qwen2_5_vl": 224, "qwen3_vl": 256, "internvl": 224, "idefics3": ac.MIN_SIDE}


def test_the_synthetic_scenes_keep_their_share_of_a_bigger_picture(tmp_path):
    from personal_vlm_node.testing import toy_world as tw

    small = json.loads((tw.write_dataset(tmp_path / "a", seed=1, concepts=1, layout="calibrate")
                        / "toy_world.json").read_text())
    big = json.loads((tw.write_dataset(tmp_path / "b", seed=1, concepts=1, layout="calibrate", image_size=336)
                      / "toy_world.json").read_text())
    areas = lambda meta: [o["area"] for objects in meta["images"].values() for o in objects]     # noqa: E731
    assert areas(big) == pytest.approx(areas(small), abs=3.0)        # % of the picture, not pixels


def test_every_family_calibrates_itself_and_the_profile_loads(adapters, family, tiny_checkpoints, tmp_path):
    vlm = adapters(family)
    profile = _uncalibrated(tiny_checkpoints[family])
    said = []
    result = ac.calibrate(vlm, profile, tmp_path / "cache", said.append, SMALL, every_s=0.0)
    assert result.parts == ["layers", "thresholds"] and result.path.is_file()
    assert said[0].startswith("calibrating (0/") and all("calibrating (" in line for line in said)
    written = load_profile("x", result.path)                 # a profile like any other
    assert written.layers and all(0 <= l < vlm.num_layers for l in written.layers)
    assert written.reject_threshold < written.accept_threshold and 0 < written.recognize_threshold < 1
    assert written.calibration["auto"]["parts"] == ["layers", "thresholds"]
    assert set(written.calibration["mask_hit_rate"]) == set(range(vlm.num_layers))
    # The next start finds it and uses it.
    done, path = ac.cached_profile(vlm, profile, tmp_path / "cache", SMALL)
    assert path == result.path and done.layers == written.layers
    assert done.accept_threshold == written.accept_threshold


def test_a_cached_calibration_is_used_on_the_next_start_and_shown(adapters, tiny_checkpoints, tmp_path):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.store import ConceptStore

    vlm = adapters("qwen2_5_vl")
    folder = tiny_checkpoints["qwen2_5_vl"]
    profile = _uncalibrated(folder)
    cache = tmp_path / "cache"
    shown = ac.describe_profile(str(folder), cache=cache)
    assert shown["state"] == "uncalibrated" and "calibrate --auto" in shown["text"]
    result = ac.calibrate(vlm, profile, cache)            # the full synthetic set, as the node runs it
    assistant = Assistant(vlm, ConceptStore(tmp_path / "store"), profile=profile, progress=None,
                          verification=False, verifier_model=None, calibration_cache=str(cache))
    try:
        status = assistant.calibration_status()
        assert status["state"] == "calibrated" and status["file"] == str(result.path)
        assert assistant.profile.accept_threshold == result.profile.accept_threshold
        assert assistant.layers == result.profile.layers
    finally:
        assistant.close()
    shown = ac.describe_profile(str(folder), cache=cache)
    assert shown["state"] == "calibrated automatically" and shown["cached_calibration"] == str(result.path)
    assert shown["values"]["layers"] == result.profile.layers


def test_an_unwritable_cache_is_one_clear_error_and_the_defaults_stay(adapters, tiny_checkpoints, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    profile = _uncalibrated(tiny_checkpoints["qwen2_5_vl"])
    with pytest.raises(PersonalVLMError, match="is not writable .*uncalibrated values stay in use"):
        ac.calibrate(adapters("qwen2_5_vl"), profile, blocker / "cache", synthetic=SMALL)
    adopted, warned = [], []
    run = ac.Background(adapters("qwen2_5_vl"), profile, adopted.append, blocker / "cache", log=lambda m: None,
                        warn=warned.append, synthetic=SMALL)
    run.thread.join(60)
    assert run.state == "failed" and not adopted
    assert run.status().startswith("uncalibrated: ") and len(warned) == 1 and "\n" not in warned[0]


def test_an_interrupted_calibration_leaves_nothing_that_is_used(adapters, tiny_checkpoints, tmp_path):
    vlm = adapters("qwen2_5_vl")
    profile = _uncalibrated(tiny_checkpoints["qwen2_5_vl"])
    cache = tmp_path / "cache"
    stop = threading.Event()

    def progress(line):
        if "(3/" in line:
            stop.set()                               # Ctrl-C, shutdown: stops at the next step

    with pytest.raises(ac.Cancelled):
        ac.calibrate(vlm, profile, cache, progress, SMALL, stop, every_s=0.0)
    assert not list(cache.glob("*.yaml"))
    # What a killed run leaves (its temporary file) is never read, and goes with the next run.
    final = ac.cache_path(ac.vlm_fingerprint(vlm), profile, ["layers", "thresholds"], cache, SMALL)
    stale = final.parent / f".{final.name}.tmp12345"
    stale.write_text("layers: [0")
    assert ac.cached_profile(vlm, profile, cache, SMALL) == (None, final)
    ac.calibrate(vlm, profile, cache, synthetic=SMALL)
    assert final.is_file() and not stale.exists()


def test_a_model_whose_attention_cannot_be_captured_is_a_clear_message(tiny_checkpoints, tmp_path):
    from personal_vlm_node.vlm import load_vlm

    vlm = load_vlm(str(tiny_checkpoints["qwen2_5_vl"]), device="cpu", dtype="float32")
    vlm.model.set_attn_implementation({"text_config": "sdpa"})        # attention no longer observable
    with pytest.raises(PersonalVLMError, match="automatic calibration failed while ranking the layers"):
        ac.calibrate(vlm, _uncalibrated(tiny_checkpoints["qwen2_5_vl"]), tmp_path / "cache", synthetic=SMALL)
    assert not list((tmp_path / "cache").glob("*.yaml"))


def test_a_running_assistant_adopts_a_calibration_and_repicks_older_memories(adapters, tiny_checkpoints, tmp_path):
    from personal_vlm_node.assistant import Assistant
    from personal_vlm_node.store import ConceptStore
    from personal_vlm_node.testing.kit import photo

    vlm = adapters("qwen2_5_vl")
    profile = _uncalibrated(tiny_checkpoints["qwen2_5_vl"])
    assistant = Assistant(vlm, ConceptStore(tmp_path / "store"), profile=profile, progress=None,
                          verification=False, verifier_model=None, calibration_cache=str(tmp_path / "cache"))
    try:
        assert assistant.calibration_status()["state"] == "uncalibrated"
        before = list(assistant.layers)
        assistant.teach("my mug", [photo(1)]).wait_fingerprint()
        assert assistant.store.get("my mug").extra["layers"] == before
        assistant.configure(reject_threshold=0.2)                     # changed while running: it stays
        calibrated = replace(profile, layers=[0], accept_threshold=0.91, reject_threshold=0.6,
                             recognize_threshold=0.42, r2p_margin=0.07, calibration={"thresholds": {"pairs": 1}})
        rebuilt = assistant.adopt_calibration(calibrated, file=tmp_path / "x.yaml")
        assert rebuilt == ["my mug"] and assistant.layers == [0]
        assert (assistant.profile.accept_threshold, assistant.profile.reject_threshold) == (0.91, 0.2)
        assert assistant.profile.recognize_threshold == 0.42 and assistant.r2p_margin == 0.07
        assistant._background.submit(lambda: None).result(timeout=120)      # the re-pick ran
        assert assistant.store.get("my mug").extra["layers"] == [0]
        assert assistant.calibration_status()["state"] == "calibrated"
        assistant.configure(reject_threshold=-1)                      # "the profile's" is the calibrated one now
        assert assistant.profile.reject_threshold == 0.6
    finally:
        assistant.close()


def test_calibrate_auto_and_profile_show_from_the_command_line(tiny_checkpoints, tmp_path, capsys):
    from personal_vlm_node.cli import main

    model, cache = str(tiny_checkpoints["idefics3"]), str(tmp_path / "cache")
    assert main(["--model", model, "--device", "cpu", "--json", "calibrate", "--auto", "--cache", cache]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["measured"] == ["layers", "thresholds"] and Path(out["profile"]).is_file()
    assert main(["--model", model, "--json", "profile", "show", "--cache", cache]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "calibrated automatically" and shown["values"]["layers"] == out["layers"]
    assert main(["--model", model, "calibrate", "--auto", "--images", "x", "--masks", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "give one or the other" in err
    toy = load_profile("x", REPO / "models" / "qwen2.5-vl-toy.yaml")
    assert not ac.missing_parts(toy)
    assert main(["--model", model, "--profile", str(REPO / "models" / "qwen2.5-vl-toy.yaml"), "calibrate",
                 "--auto", "--cache", cache]) == 0
    assert "calibrated already" in capsys.readouterr().out


def test_the_cache_file_says_what_it_is_and_reads_back(adapters, tiny_checkpoints, tmp_path):
    result = ac.calibrate(adapters("internvl"), _uncalibrated(tiny_checkpoints["internvl"]), tmp_path, synthetic=SMALL)
    text = result.path.read_text()
    assert text.startswith("# Calibrated automatically on the built-in synthetic world")
    data = yaml.safe_load(text)
    assert data["calibration"]["auto"]["seeds"] == {"layers": ac.LAYER_SEED, "thresholds": ac.SPLIT_SEED}
    assert data["calibration"]["thresholds"]["dataset"].startswith("toy_world --seed 150")
