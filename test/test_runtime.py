"""Vision-encoder runtimes on tiny random-weight models: ONNX export, onnxruntime, TensorRT cache logic.

Every exported graph is held to the torch vision tower of the same adapter; TensorRT itself can't run
here, so its engine-cache key, rebuild decision and missing-install message are tested without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import onnxruntime as ort
import pytest
import torch

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.runtime import backends, export
from personal_vlm_node.runtime.backends import (cached_export, engine_cache_key, engine_paths, make_encoder,
                                                needs_rebuild, provider_chain)
from personal_vlm_node.cli import main
from personal_vlm_node.testing.kit import photo
from personal_vlm_node.vlm.graph import graph_for
from personal_vlm_node.vlm.base import prepare_image

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder_cache")


@pytest.fixture(scope="module")
def exported(adapters, cache_dir):
    """One cached export per family for the whole module: (folder, encoder.json)."""
    done = {}

    def get(family):
        if family not in done:
            done[family] = cached_export(adapters(family), cache_dir, progress=lambda m: None)
        return done[family]

    return get


def _onnx_tokens(folder, adapter, image):
    """Run the exported graph on onnxruntime CPU directly, feeding the graph inputs by hand."""
    session = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = graph_for(adapter).feeds(adapter.preprocess(prepare_image(image)).tensors)
    (tokens,) = session.run(None, {name: value.numpy() for name, value in feeds.items()})
    return torch.from_numpy(tokens)


def _torch_tokens(adapter, image):
    with torch.inference_mode():
        return adapter.vision_forward(adapter.preprocess(prepare_image(image)).tensors)


# ---- export + parity -----------------------------------------------------------------------------

def test_exported_encoder_matches_the_torch_tower_on_onnxruntime_cpu(adapters, exported, family):
    adapter = adapters(family)
    folder, meta = exported(family)
    assert meta["parity"]["max_abs_error"] < FP32_TOLERANCE
    image = photo(3, 300, 200)
    expected = _torch_tokens(adapter, image)                                      # (N, D)
    got = _onnx_tokens(folder, adapter, image)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < FP32_TOLERANCE


def test_metadata_describes_the_graph_and_hashes_its_file(adapters, exported, family):
    adapter = adapters(family)
    folder, meta = exported(family)
    assert meta["family"] == adapter.family and meta["fingerprint"] == adapter.identity
    assert meta["dtype"] == "float32" and meta["image_size"] is None and meta["external_data"] is False
    session = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [i["name"] for i in meta["inputs"]] == [i.name for i in session.get_inputs()]
    assert meta["outputs"][0]["name"] == session.get_outputs()[0].name == "visual_tokens"
    assert meta["dynamic_axes"]["pixel_values"] == {"0": meta["inputs"][0]["shape"][0]}
    for shapes in meta["profile"].values():
        assert all(lo <= opt <= hi for lo, opt, hi in zip(shapes["min"], shapes["opt"], shapes["max"]))
    assert meta["onnx_sha256"] == hashlib.sha256((folder / "encoder.onnx").read_bytes()).hexdigest()


def test_one_qwen_graph_serves_two_image_sizes(adapters, exported):
    adapter = adapters("qwen2_5_vl")
    folder, meta = exported("qwen2_5_vl")
    assert meta["dynamic_axes"]["pixel_values"] == {"0": "patches"}
    counts = []
    for image in (photo(1, 448, 448), photo(2, 320, 120)):
        expected = _torch_tokens(adapter, image)
        got = _onnx_tokens(folder, adapter, image)
        assert (got - expected).abs().max().item() < FP32_TOLERANCE
        counts.append(got.shape[0])
    assert counts[0] != counts[1]                                                # really two grids


def test_qwen_windows_are_a_padded_batch_of_whole_windows(adapters):
    # A 6×6 patch grid: 3×3 merged tokens of 4 patches; windows of 2×2 tokens: whole, cut on the
    # right, cut at the bottom, and the corner (4, 2, 2 and 1 tokens).
    graph = graph_for(adapters("qwen2_5_vl"))
    assert (graph.unit, graph.window_side) == (4, 2)
    meta = graph.grid_metadata(torch.tensor([[1, 6, 6]]))
    assert meta["window_index"].tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8]
    pad = [-1]
    assert meta["window_slots"].tolist() == [list(range(0, 16)), list(range(16, 24)) + pad * 8,
                                             list(range(24, 32)) + pad * 8, list(range(32, 36)) + pad * 12]
    # Each patch's row in the (4 windows × 16) batch.
    assert meta["window_unpad"].tolist() == list(range(24)) + list(range(32, 40)) + list(range(48, 52))
    assert meta["reverse_index"][meta["window_index"].long()].tolist() == list(range(9))


def _tiny_qwen2_vl(qwen2_5_folder, out):
    """A Qwen2-VL checkpoint (no window attention) sharing the tiny Qwen2.5-VL tokenizer and processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    shutil.copytree(qwen2_5_folder, out)
    source = json.loads((out / "config.json").read_text())
    text = source["text_config"]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=text["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"],
                         pad_token_id=text["pad_token_id"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **{k: source[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")})
    torch.manual_seed(0)
    (out / "model.safetensors").unlink()
    Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").save_pretrained(out)
    return out


def test_qwen2_vl_without_windows_exports_too(tiny_checkpoints, tmp_path):
    from personal_vlm_node.vlm import load_vlm

    adapter = load_vlm(str(_tiny_qwen2_vl(tiny_checkpoints["qwen2_5_vl"], tmp_path / "qwen2_vl")),
                       device="cpu", dtype="float32")
    assert adapter.config.model_type == "qwen2_vl"
    folder, meta = cached_export(adapter, tmp_path / "cache", progress=lambda m: None)
    assert [i["name"] for i in meta["inputs"]] == ["pixel_values", "position_ids"]
    for image in (photo(8, 300, 200), photo(9, 100, 400)):
        assert (_onnx_tokens(folder, adapter, image) - _torch_tokens(adapter, image)).abs().max() < FP32_TOLERANCE


def test_idefics3_graph_takes_any_number_of_tiles(adapters, exported):
    adapter = adapters("idefics3")
    folder, _ = exported("idefics3")
    wide, square = photo(4, 400, 100), photo(5, 300, 300)
    tiles = [adapter.preprocess(prepare_image(im)).tensors["pixel_values"].shape[1] for im in (wide, square)]
    assert tiles[0] != tiles[1]
    for image in (wide, square):
        assert (_onnx_tokens(folder, adapter, image) - _torch_tokens(adapter, image)).abs().max() < FP32_TOLERANCE


def test_fixed_size_export_refuses_other_image_sizes(adapters, tmp_path):
    adapter = adapters("qwen2_5_vl")
    onnx_path = export.export_encoder(adapter, tmp_path / "fixed", image_size=112, progress=lambda m: None)
    meta = export.read_metadata(onnx_path.parent)
    assert meta["image_size"] == 112 and meta["dynamic_axes"] == {}
    encoder = backends.make_onnxruntime_encoder(adapter, onnx_path.parent, meta, progress=lambda m: None)
    same = photo(6, 112, 112)
    assert (encoder(adapter.preprocess(prepare_image(same)).tensors) - _torch_tokens(adapter, same)).abs().max() \
        < FP32_TOLERANCE
    with pytest.raises(PersonalVLMError, match="without --image-size"):
        adapter.encode_image(photo(0, 320, 120), encoder=encoder)


def test_export_refuses_a_graph_that_disagrees_with_torch(adapters, exported):
    adapter = adapters("idefics3")
    folder, _ = exported("idefics3")
    graph = graph_for(adapter)
    example = graph.feeds(adapter.preprocess(prepare_image(photo(0, 200, 150))).tensors)
    module = graph.module()
    assert export.verify_parity(module, folder / "encoder.onnx", [example])[0]["max_abs_error"] < FP32_TOLERANCE

    def drifted(**feeds):
        return module(**feeds) + 0.01

    with pytest.raises(PersonalVLMError, match="differs from torch"):
        export.verify_parity(drifted, folder / "encoder.onnx", [example])


def test_big_towers_keep_their_weights_in_external_data(adapters, tmp_path, monkeypatch):
    adapter = adapters("internvl")
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)                        # every tower counts as big
    folder, meta = cached_export(adapter, tmp_path, progress=lambda m: None)
    data = folder / "encoder.onnx.data"
    assert meta["external_data"] is True and data.stat().st_size > (folder / "encoder.onnx").stat().st_size
    both = hashlib.sha256((folder / "encoder.onnx").read_bytes() + data.read_bytes()).hexdigest()
    assert meta["onnx_sha256"] == both
    encoder = make_encoder(adapter, "onnxruntime", cache_dir=tmp_path, progress=lambda m: None)
    image = photo(0, 200, 200)
    assert (adapter.encode_image(image, encoder=encoder).features - _torch_tokens(adapter, image)).abs().max() \
        < FP32_TOLERANCE


def test_export_rejects_an_impossible_image_size(adapters, tmp_path):
    with pytest.raises(PersonalVLMError, match="out of range"):
        export.export_encoder(adapters("internvl"), tmp_path, image_size=5)


def test_export_of_a_bfloat16_model_leaves_the_model_untouched(tiny_checkpoints, tmp_path):
    from personal_vlm_node.vlm import load_vlm

    adapter = load_vlm(str(tiny_checkpoints["qwen2_5_vl"]), device="cpu", dtype="bfloat16")
    encoder = make_encoder(adapter, "onnxruntime", cache_dir=tmp_path, progress=lambda m: None)
    assert all(p.dtype == torch.bfloat16 for p in adapter.model.parameters())
    image = photo(0, 300, 200)
    fast, reference = adapter.encode_image(image, encoder=encoder), adapter.encode_image(image)
    assert fast.features.dtype == torch.bfloat16
    # The graph computes in float32: it differs from the bf16 tower by bf16 rounding only.
    assert (fast.features.float() - reference.features.float()).abs().max() < 0.05


# ---- make_encoder ------------------------------------------------------------------------------

def test_onnxruntime_encoder_gives_the_same_tokens_and_boxes_as_torch(adapters, cache_dir, exported, family):
    adapter = adapters(family)
    exported(family)
    encoder = make_encoder(adapter, "onnxruntime", cache_dir=cache_dir, progress=lambda m: None)
    assert encoder.provider == "CPUExecutionProvider"
    image = photo(7, 333, 222)
    fast, reference = adapter.encode_image(image, encoder=encoder), adapter.encode_image(image)
    assert fast.features.dtype == reference.features.dtype == adapter.dtype
    assert (fast.features - reference.features).abs().max().item() < FP32_TOLERANCE
    assert torch.equal(fast.token_boxes, reference.token_boxes)
    assert fast.grid == reference.grid and fast.segment_ids == reference.segment_ids
    assert fast.slots == reference.slots


def test_second_make_encoder_reuses_the_cached_export(adapters, cache_dir, exported, monkeypatch):
    adapter = adapters("internvl")
    folder, _ = exported("internvl")
    onnx_mtime = (folder / "encoder.onnx").stat().st_mtime_ns
    exports = []
    monkeypatch.setattr(backends, "export_encoder", lambda *a, **k: exports.append(a))
    messages = []
    for _ in range(2):
        encoder = make_encoder(adapter, "onnxruntime", cache_dir=cache_dir, progress=messages.append)
        assert encoder.folder == folder
    assert exports == []
    assert (folder / "encoder.onnx").stat().st_mtime_ns == onnx_mtime
    assert sum("reusing" in m for m in messages) == 2


def test_an_unfinished_export_is_done_again(adapters, exported, tmp_path):
    adapter = adapters("internvl")
    done, _ = exported("internvl")
    folder = tmp_path / done.name
    shutil.copytree(done, folder)
    (folder / "encoder.json").unlink()                                           # as if killed mid-export
    messages = []
    again, meta = cached_export(adapter, tmp_path, progress=messages.append)
    assert again == folder and meta["family"] == "internvl"
    assert any(m.startswith("exporting") for m in messages)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]         # no scratch left behind


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert backends.default_cache_dir() == tmp_path / "personal_vlm" / "encoders"


def test_export_key_changes_with_the_model_and_the_size_mode():
    key = backends.export_key("qwen2_5_vl|m|local|bfloat16|d64", None)
    assert key == backends.export_key("qwen2_5_vl|m|local|bfloat16|d64", None)
    assert key != backends.export_key("qwen2_5_vl|m|local|float32|d64", None)
    assert key != backends.export_key("qwen2_5_vl|m|local|bfloat16|d64", 448)


def test_torch_backend_means_the_adapters_own_tower(adapters):
    assert make_encoder(adapters("internvl"), "torch") is None


def test_unknown_backend_is_a_user_error(adapters):
    with pytest.raises(PersonalVLMError, match="torch, onnxruntime, tensorrt"):
        make_encoder(adapters("internvl"), "openvino")
    with pytest.raises(PersonalVLMError, match="fp16, fp32"):
        make_encoder(adapters("internvl"), "onnxruntime", precision="int8")


def test_tensorrt_backend_without_tensorrt_says_what_to_install(adapters, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)                           # import fails even if installed
    with pytest.raises(PersonalVLMError) as info:
        make_encoder(adapters("internvl"), "tensorrt", cache_dir=tmp_path)
    assert "pip install tensorrt" in str(info.value) and "onnxruntime" in str(info.value)
    assert not any(tmp_path.iterdir())                                           # failed before exporting


def test_tensorrt_backend_without_a_cuda_gpu_says_so(adapters, monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_import_tensorrt", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PersonalVLMError, match="CUDA"):
        make_encoder(adapters("internvl"), "tensorrt", cache_dir=tmp_path)


# ---- onnxruntime providers ---------------------------------------------------------------------

def test_providers_go_tensorrt_then_cuda_then_cpu_with_an_engine_cache(tmp_path):
    profile = {"pixel_values": {"min": [16, 1176], "opt": [1024, 1176], "max": [8192, 1176]},
               "window_index": {"min": [4], "opt": [256], "max": [2048]}}
    chain = provider_chain(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"],
                           "fp16", tmp_path, profile, device_id=1)
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider"]
    trt = chain[0][1]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path) and trt["device_id"] == 1
    assert trt["trt_profile_min_shapes"] == "pixel_values:16x1176,window_index:4"
    assert trt["trt_profile_max_shapes"] == "pixel_values:8192x1176,window_index:2048"
    assert chain[1][1] == {"device_id": 1}


def test_providers_use_only_what_onnxruntime_has(tmp_path):
    assert provider_chain(["AzureExecutionProvider", "CPUExecutionProvider"], "fp16", tmp_path) == [
        ("CPUExecutionProvider", {})]
    chain = provider_chain(["TensorrtExecutionProvider", "CPUExecutionProvider"], "fp32", tmp_path)
    assert [n for n, _ in chain] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert chain[0][1]["trt_fp16_enable"] is False


# ---- TensorRT engine cache -----------------------------------------------------------------------

KEY_INPUTS = {"onnx_sha256": "ab" * 32, "gpu_name": "NVIDIA Orin sm_87", "trt_version": "10.3.0",
              "precision": "fp16"}


def test_engine_key_is_stable_for_the_same_inputs():
    assert engine_cache_key(**KEY_INPUTS) == engine_cache_key(**KEY_INPUTS)
    assert len(engine_cache_key(**KEY_INPUTS)) == 64


@pytest.mark.parametrize("field,other", [("onnx_sha256", "cd" * 32), ("gpu_name", "NVIDIA RTX 4090 sm_89"),
                                         ("trt_version", "10.7.0"), ("precision", "fp32")])
def test_engine_key_changes_with_each_of_its_inputs(field, other):
    assert engine_cache_key(**{**KEY_INPUTS, field: other}) != engine_cache_key(**KEY_INPUTS)


def _write_engine(folder, key, payload=b"engine-bytes", recorded_key=None, recorded_bytes=None):
    engine, record = engine_paths(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(payload)
    record.write_text(json.dumps({"key": recorded_key or key,
                                  "engine_bytes": len(payload) if recorded_bytes is None else recorded_bytes}))


def test_engine_is_built_when_missing_and_reused_when_the_key_matches(tmp_path):
    key = engine_cache_key(**KEY_INPUTS)
    assert needs_rebuild(tmp_path / "tensorrt", key)
    _write_engine(tmp_path / "tensorrt", key)
    assert not needs_rebuild(tmp_path / "tensorrt", key)


def test_engine_is_rebuilt_when_any_key_input_changes(tmp_path):
    _write_engine(tmp_path, engine_cache_key(**KEY_INPUTS))
    for field, other in [("gpu_name", "NVIDIA RTX 4090 sm_89"), ("trt_version", "10.7.0"),
                         ("precision", "fp32"), ("onnx_sha256", "cd" * 32)]:
        assert needs_rebuild(tmp_path, engine_cache_key(**{**KEY_INPUTS, field: other}))


def test_engine_is_rebuilt_when_its_file_is_truncated_or_its_record_disagrees(tmp_path):
    key = engine_cache_key(**KEY_INPUTS)
    _write_engine(tmp_path / "a", key, recorded_bytes=999)                       # file shorter than recorded
    assert needs_rebuild(tmp_path / "a", key)
    _write_engine(tmp_path / "b", key, recorded_key="0" * 64)
    assert needs_rebuild(tmp_path / "b", key)
    engine, record = engine_paths(tmp_path / "c", key)
    _write_engine(tmp_path / "c", key)
    record.write_text("{not json")
    assert needs_rebuild(tmp_path / "c", key)


# ---- command line ---------------------------------------------------------------------------------

def test_export_command_writes_the_folder_and_checks_every_backend(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "encoder"
    assert main(["--model", str(tiny_checkpoints["internvl"]), "--device", "cpu", "--dtype", "float32", "--json",
                 "export-encoder", "--out", str(out), "--backend-check"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)                                            # stdout holds only the result
    assert result["onnx"] == str(out / "encoder.onnx") and (out / "encoder.json").is_file()
    assert result["family"] == "internvl" and result["max_abs_error"] < FP32_TOLERANCE
    rows = {row["provider"]: row for row in result["backends"]}
    assert rows["CPUExecutionProvider"]["max_abs_error"] < FP32_TOLERANCE
    tensorrt = [row for row in result["backends"] if row["backend"] == "tensorrt"]
    assert len(tensorrt) == 1
    if "unavailable" in tensorrt[0]:
        assert "tensorrt" in tensorrt[0]["unavailable"].lower()
    assert "parity ok" in captured.err                                           # progress went to stderr


def test_export_command_parses_a_fixed_image_size():
    from personal_vlm_node.cli import build_parser

    args = build_parser().parse_args(["export-encoder", "--out", "x", "--image-size", "448"])
    assert args.image_size == 448 and args.backend_check is False and args.out == "x"
    assert args.opset == export.DEFAULT_OPSET


def test_onnxruntime_feeds_come_to_the_host_as_float32_whatever_the_model_dtype():
    from personal_vlm_node.runtime.backends import _host_array

    pixels = _host_array(torch.ones(2, 3, dtype=torch.bfloat16))
    grid = _host_array(torch.tensor([[1, 4, 4]]))
    assert pixels.dtype.name == "float32" and pixels.sum() == 6.0
    assert grid.dtype.name == "int64"


def test_to_device_on_the_cpu_only_casts():
    from personal_vlm_node.vlm.base import to_device

    moved = to_device(torch.ones(3), torch.device("cpu"), torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
