"""encoder_backend auto: which pairs are measured, the fastest wins, the choice is cached per machine."""

import json

import pytest
import torch

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.runtime.auto import candidates, choose


def test_cpu_without_bf16_units_measures_fp32_torch_and_onnxruntime_only():
    assert candidates("cpu", {"avx2", "fma"}, True, True) == [("torch", "float32"), ("onnxruntime", "fp32")]


def test_cpu_with_amx_also_measures_torch_bfloat16():
    pairs = candidates("cpu", {"avx512f", "amx_bf16", "amx_tile"}, False, False)
    assert pairs == [("torch", "float32"), ("torch", "bfloat16")]


def test_gpu_measures_half_precisions_onnxruntime_and_tensorrt():
    assert candidates("cuda", set(), True, True) == [
        ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"), ("onnxruntime", "fp32"),
        ("tensorrt", "fp16")]


class Fakes:
    def __init__(self, seconds, broken=()):
        self.seconds, self.broken = seconds, set(broken)
        self.built, self.measured = [], []

    def build(self, pair):
        self.built.append(pair)
        if pair in self.broken:
            raise PersonalVLMError(f"{pair[0]} is not installed")
        return pair

    def measure(self, encoder):
        self.measured.append(encoder)
        return self.seconds[encoder]


def test_fastest_pair_wins_and_every_timing_is_recorded(tmp_path):
    fakes = Fakes({("torch", "float32"): 10.0, ("torch", "bfloat16"): 1.4, ("onnxruntime", "fp32"): 7.0})
    pair, encoder, record = choose(list(fakes.seconds), fakes.build, fakes.measure, tmp_path / "auto.json", "m1")
    assert pair == ("torch", "bfloat16") and encoder == ("torch", "bfloat16")
    assert record["seconds"] == {"torch/float32": 10.0, "torch/bfloat16": 1.4, "onnxruntime/fp32": 7.0}
    saved = json.loads((tmp_path / "auto.json").read_text())
    assert saved["m1"]["choice"] == ["torch", "bfloat16"]


def test_cached_choice_is_reused_without_measuring_on_the_same_machine(tmp_path):
    pairs = [("torch", "float32"), ("onnxruntime", "fp32")]
    choose(pairs, Fakes({pairs[0]: 2.0, pairs[1]: 1.0}).build, Fakes({pairs[0]: 2.0, pairs[1]: 1.0}).measure,
           tmp_path / "auto.json", "m1")
    again = Fakes({pairs[0]: 2.0, pairs[1]: 1.0})
    pair, _, _ = choose(pairs, again.build, again.measure, tmp_path / "auto.json", "m1")
    assert pair == ("onnxruntime", "fp32")
    assert again.built == [("onnxruntime", "fp32")] and again.measured == []


def test_another_machine_measures_again(tmp_path):
    pairs = [("torch", "float32"), ("onnxruntime", "fp32")]
    first = Fakes({pairs[0]: 2.0, pairs[1]: 1.0})
    choose(pairs, first.build, first.measure, tmp_path / "auto.json", "m1")
    other = Fakes({pairs[0]: 1.0, pairs[1]: 3.0})
    pair, _, _ = choose(pairs, other.build, other.measure, tmp_path / "auto.json", "m2")
    assert pair == ("torch", "float32") and len(other.measured) == 2
    saved = json.loads((tmp_path / "auto.json").read_text())
    assert saved["m1"]["choice"] == ["onnxruntime", "fp32"] and saved["m2"]["choice"] == ["torch", "float32"]


def test_cached_choice_no_longer_offered_is_measured_again(tmp_path):
    first = Fakes({("torch", "float32"): 2.0, ("onnxruntime", "fp32"): 1.0})
    choose(list(first.seconds), first.build, first.measure, tmp_path / "auto.json", "m1")
    later = Fakes({("torch", "float32"): 2.0})                     # onnxruntime uninstalled
    pair, _, _ = choose([("torch", "float32")], later.build, later.measure, tmp_path / "auto.json", "m1")
    assert pair == ("torch", "float32") and later.measured == [("torch", "float32")]


def test_pair_that_fails_to_build_is_skipped_and_recorded(tmp_path):
    fakes = Fakes({("torch", "float32"): 2.0, ("tensorrt", "fp16"): 0.1}, broken=[("tensorrt", "fp16")])
    pair, _, record = choose(list(fakes.seconds), fakes.build, fakes.measure, tmp_path / "auto.json", "m1")
    assert pair == ("torch", "float32")
    assert "not installed" in record["errors"]["tensorrt/fp16"]


def test_nothing_working_is_a_user_error(tmp_path):
    fakes = Fakes({("onnxruntime", "fp32"): 1.0}, broken=[("onnxruntime", "fp32")])
    with pytest.raises(PersonalVLMError, match="encoder_backend torch"):
        choose(list(fakes.seconds), fakes.build, fakes.measure, tmp_path / "auto.json", "m1")


def test_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "auto.json").write_text("{not json")
    fakes = Fakes({("torch", "float32"): 1.0})
    pair, _, _ = choose([("torch", "float32")], fakes.build, fakes.measure, tmp_path / "auto.json", "m1")
    assert pair == ("torch", "float32") and fakes.measured


def test_auto_on_a_tiny_model_measures_once_then_reuses_the_choice(adapters, tmp_path):
    from PIL import Image

    from personal_vlm_node.runtime.auto import auto_encoder

    adapter = adapters("qwen2_5_vl")
    said = []
    auto_encoder(adapter, cache_dir=tmp_path, progress=said.append, repeats=1)
    (cache_file,) = tmp_path.glob("*-auto.json")
    (record,) = json.loads(cache_file.read_text()).values()
    assert {"torch/float32", "onnxruntime/fp32"} <= set(record["seconds"])
    said.clear()
    encoder = auto_encoder(adapter, cache_dir=tmp_path, progress=said.append, repeats=1)
    assert any("measured before" in line for line in said)
    picture = Image.new("RGB", (64, 48), (120, 30, 200))
    reference = adapter.encode_image(picture)
    tokens = adapter.encode_image(picture, encoder=encoder)
    assert tokens.features.shape == reference.features.shape
    assert torch.allclose(tokens.features.float(), reference.features.float(), atol=1e-3, rtol=1e-3)


def test_torch_bfloat16_encoder_keeps_the_float32_weights_and_stays_close(adapters):
    from PIL import Image

    from personal_vlm_node.runtime.auto import TorchEncoder

    adapter = adapters("qwen2_5_vl")
    picture = Image.new("RGB", (64, 48), (20, 200, 90))
    reference = adapter.encode_image(picture).features
    features = adapter.encode_image(picture, encoder=TorchEncoder(adapter, torch.bfloat16)).features
    assert features.dtype == adapter.dtype == torch.float32
    assert next(adapter.model.parameters()).dtype == torch.float32
    scale = reference.abs().max()
    assert (features - reference).abs().max() <= 0.05 * scale
