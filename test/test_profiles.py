"""The method settings a profile carries: every default of ModelProfile and every shipped models/*.yaml.

A change here changes what Ego and R2P compute for every user who has no profile of their own (the
defaults) or who runs a shipped model (the files): these tests make such a change a deliberate one.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from personal_vlm_node.profiles import ModelProfile, load_profile

MODELS = Path(__file__).resolve().parents[1] / "models"

DEFAULTS = {
    "model": "",
    "layers": [],
    "max_memory_tokens": 256,
    "min_memory_tokens": 4,
    "memory_budget": 0.2,
    "memory_layout": "image",
    "attention_rows": "predict",
    "attention_baseline": "answer",
    "introduction_passes": 1,
    "max_image_pixels": 0,
    "recognition": "per_concept",
    "accept_threshold": 0.80,
    "reject_threshold": 0.55,
    "recognize_threshold": 0.5,
    "r2p_margin": 0.15,
    "max_concepts_in_context": 64,
    "context_tokens": 4096,
    "recognition_method": "ego",
    "icpt": {},
    "calibration": {},
}

# What an uncalibrated shipped profile writes out: the defaults' memory sizes and thresholds.
UNCALIBRATED = {
    "layers": [],
    "max_memory_tokens": 256,
    "min_memory_tokens": 4,
    "accept_threshold": 0.8,
    "reject_threshold": 0.55,
    "recognize_threshold": 0.5,
    "r2p_margin": 0.15,
    "max_concepts_in_context": 64,
    "context_tokens": 4096,
}

# Every key of every shipped profile except its calibration record.
SHIPPED = {
    "internvl3-1b-hf.yaml": {"model": "OpenGVLab/InternVL3-1B-hf", **UNCALIBRATED},
    "internvl3-2b-hf.yaml": {"model": "OpenGVLab/InternVL3-2B-hf", **UNCALIBRATED},
    "qwen2.5-vl-3b-instruct.yaml": {"model": "Qwen/Qwen2.5-VL-3B-Instruct", **UNCALIBRATED},
    "qwen2.5-vl-7b-instruct.yaml": {"model": "Qwen/Qwen2.5-VL-7B-Instruct", **UNCALIBRATED},
    "smolvlm-256m-instruct.yaml": {"model": "HuggingFaceTB/SmolVLM-256M-Instruct", **UNCALIBRATED},
    "smolvlm-500m-instruct.yaml": {"model": "HuggingFaceTB/SmolVLM-500M-Instruct", **UNCALIBRATED},
    # The toy writes every key: its calibration measured the layers, memory size and thresholds.
    "qwen2.5-vl-toy.yaml": {**{k: v for k, v in DEFAULTS.items() if k != "calibration"},
                            "model": "qwen2.5-vl-toy", "layers": [0, 3], "max_memory_tokens": 32,
                            "accept_threshold": 0.9497, "reject_threshold": 0.8142,
                            "recognize_threshold": 0.5467, "r2p_margin": 0.1965, "context_tokens": 1024},
}


def test_every_profile_default_is_the_documented_one():
    assert [f.name for f in fields(ModelProfile)] == list(DEFAULTS)
    assert asdict(ModelProfile()) == DEFAULTS


def test_a_profile_refuses_an_unknown_recognition_method_and_icpt_key():
    from personal_vlm_node.errors import PersonalVLMError

    with pytest.raises(PersonalVLMError, match="recognition_method must be one of ego, icpt"):
        ModelProfile(recognition_method="lora").validate()
    with pytest.raises(PersonalVLMError, match="icpt takes the keys projector and threshold"):
        ModelProfile(icpt={"projektor": "p.safetensors"}).validate()
    with pytest.raises(PersonalVLMError, match="icpt.threshold"):
        ModelProfile(icpt={"threshold": 1.5}).validate()
    assert ModelProfile(recognition_method="icpt", icpt={"projector": "p.safetensors", "threshold": 0.4}).validate()


def test_the_shipped_profiles_are_the_pinned_ones():
    assert sorted(p.name for p in MODELS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_profile_sets_exactly_its_pinned_method_keys(name):
    data = yaml.safe_load((MODELS / name).read_text())
    assert "calibration" in data       # how its layers and thresholds came about is always recorded
    assert {k: v for k, v in data.items() if k != "calibration"} == SHIPPED[name]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_profile_loads_as_its_keys_over_the_defaults(name):
    profile = asdict(load_profile("", MODELS / name))
    profile.pop("calibration")
    expected = {k: v for k, v in DEFAULTS.items() if k != "calibration"}
    assert profile == {**expected, **SHIPPED[name]}


def test_an_unknown_model_gets_the_defaults_under_its_own_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONAL_VLM_PROFILES", str(tmp_path))
    profile = load_profile("nobody/never-shipped-vlm")
    assert asdict(profile) == {**DEFAULTS, "model": "nobody/never-shipped-vlm"}
