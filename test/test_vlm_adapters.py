"""Adapter behaviour on tiny random-weight models of every supported family.

Each test compares the adapter's own mechanics (splicing, positions, attention capture) with the
reference path of the transformers model itself.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.testing.kit import photo
from personal_vlm_node.vlm import Memory, load_vlm
from personal_vlm_node.vlm.base import prepare_image

QWEN = ("qwen2_5_vl", "qwen3_vl")      # M-RoPE families: positions from input_ids + token types


def _reference_pixel_inputs(adapter, image):
    """What the transformers model itself takes for ``image`` (processor output)."""
    prepared = prepare_image(image).image
    if adapter.family in QWEN:
        inputs = adapter.image_processor(images=[prepared], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    if adapter.family == "internvl":
        inputs = adapter.image_processor(images=[prepared], crop_to_patches=False, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"]}
    inputs = adapter.image_processor(images=[[prepared]], return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "pixel_attention_mask": inputs["pixel_attention_mask"]}


def _token_types(prompt):
    types = torch.zeros_like(prompt.input_ids, dtype=torch.int32)
    for rows in prompt.image_positions:
        types[0, rows] = 1
    return types


def _capture_llm_inputs(adapter):
    seen = {}

    def hook(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["deepstack_visual_embeds"] = kwargs.get("deepstack_visual_embeds")
        seen["visual_pos_masks"] = kwargs.get("visual_pos_masks")

    return seen, adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_visual_tokens_equal_the_models_own_input_embeddings_at_image_positions(adapters, family):
    adapter = adapters(family)
    image = photo()
    tokens = adapter.encode_image(image)
    prompt = adapter.build(["Describe this: ", tokens])
    assert tokens.features.shape == (len(tokens.slots), adapter.hidden_size)
    extra = _reference_pixel_inputs(adapter, image)
    if adapter.family in QWEN:
        extra["mm_token_type_ids"] = _token_types(prompt)
    seen, handle = _capture_llm_inputs(adapter)
    try:
        with torch.inference_mode():
            adapter.model(input_ids=prompt.input_ids, **extra)
    finally:
        handle.remove()
    reference = seen["inputs_embeds"][0]
    rows = prompt.image_positions[0]
    torch.testing.assert_close(reference[rows], tokens.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, prompt.inputs_embeds[0], atol=1e-5, rtol=1e-5)
    # Families with DeepStack (Qwen3-VL) also feed per-layer visual features to the LLM.
    if seen["deepstack_visual_embeds"] is None:
        assert prompt.lm_inputs == {}
    else:
        assert torch.equal(seen["visual_pos_masks"], prompt.lm_inputs["visual_pos_masks"])
        assert len(seen["deepstack_visual_embeds"]) == len(prompt.lm_inputs["deepstack_visual_embeds"]) > 0
        for theirs, ours in zip(seen["deepstack_visual_embeds"], prompt.lm_inputs["deepstack_visual_embeds"]):
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_captured_attention_equals_eager_output_attentions(adapters, tiny_checkpoints, family):
    adapter = adapters(family)
    eager = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoints[family], dtype=torch.float32, attn_implementation="eager").eval()
    tokens = adapter.encode_image(photo(1))
    answer = "a red ceramic mug"
    spans = [(2, 5), (6, 13)]          # "red", "ceramic"
    layers = [0, 2, 3]
    captured = adapter.attention_to_images([tokens, "Describe it."], answer, spans, layers)

    prompt = adapter.build([tokens, "Describe it."], answer=answer)
    rows = [prompt.answer_start + i - 1 for i, (s, e) in enumerate(prompt.answer_offsets)
            if any(s < b and e > a for a, b in spans)]
    assert rows, "the spans must map to answer tokens"
    eager_lm = eager.model.text_model if adapter.family == "idefics3" else eager.model.language_model
    with torch.inference_mode():
        out = eager_lm(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                       output_attentions=True, **prompt.lm_inputs)
    for layer in layers:
        expected = out.attentions[layer][0, :, rows, :].mean(dim=(0, 1))[prompt.image_positions[0]]
        torch.testing.assert_close(captured[layer][0], expected, atol=1e-6, rtol=1e-4)
        assert 0.0 < float(captured[layer][0].sum()) <= 1.0 + 1e-6


def test_generation_with_spliced_memory_equals_the_reference_forward(adapters, family):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(2))
    memory = Memory(torch.randn(5, adapter.hidden_size) * 0.05, "my mug")
    generation = adapter.generate(["This is ", memory, ". Is it in ", tokens, "?"], max_new_tokens=6)
    assert len(generation.token_ids) >= 1
    prompt = generation.prompt
    # Reference: one full forward of the transformers model over prompt + generated tokens; it
    # derives positions itself (M-RoPE from input_ids + token types on Qwen).
    generated = torch.tensor([generation.token_ids], dtype=torch.long)
    ids = torch.cat([prompt.input_ids, generated], dim=1)
    embeds = torch.cat([prompt.inputs_embeds, adapter.language_model.get_input_embeddings()(generated)], dim=1)
    kwargs = {}
    if adapter.family in QWEN:
        adapter.model.model.rope_deltas = None
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[0, : prompt.input_ids.shape[1]] = _token_types(prompt)[0]
        kwargs = {"input_ids": ids, "mm_token_type_ids": types,
                  "image_grid_thw": tokens.rope["image_grid_thw"]}
    if adapter.family == "qwen3_vl":
        # Qwen3-VL takes input_ids or inputs_embeds, not both: mark the image rows with the image
        # token's embedding and let the model encode the pixels itself (visual tokens + DeepStack),
        # at the positions of its own get_rope_index.
        image_rows = prompt.image_positions[0]
        with torch.inference_mode():
            image_embedding = adapter.language_model.get_input_embeddings()(
                torch.tensor(adapter.config.image_token_id))
            embeds = embeds.clone()
            embeds[0, image_rows] = image_embedding
        position_ids, _ = adapter.model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                             image_grid_thw=kwargs["image_grid_thw"])
        adapter.model.model.rope_deltas = None
        kwargs = {"pixel_values": _reference_pixel_inputs(adapter, photo(2))["pixel_values"],
                  "image_grid_thw": kwargs["image_grid_thw"], "position_ids": position_ids}
    with torch.inference_mode():
        logits = adapter.model(inputs_embeds=embeds, **kwargs).logits[0]
    start = prompt.input_ids.shape[1] - 1
    predicted = logits[start : start + len(generation.token_ids)].argmax(-1).tolist()
    assert predicted == generation.token_ids
    with torch.inference_mode():
        first, _ = adapter._run(prompt.inputs_embeds, prompt.position_ids, **prompt.lm_inputs)
    torch.testing.assert_close(first[0], logits[start].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qwen", QWEN)
def test_qwen_positions_are_three_dimensional_for_the_image_and_linear_for_memories(adapters, qwen):
    adapter = adapters(qwen)
    tokens = adapter.encode_image(photo())
    prompt = adapter.build([tokens, Memory(torch.zeros(4, adapter.hidden_size))])
    rows, cols = tokens.grid
    image_pos = prompt.position_ids[:, 0, prompt.image_positions[0]]          # (3, N)
    assert image_pos[1].max() - image_pos[1].min() == rows - 1
    assert image_pos[2].max() - image_pos[2].min() == cols - 1
    mem = prompt.position_ids[:, 0, prompt.memory_positions[0]]               # (3, K)
    assert torch.equal(mem[0], mem[1]) and torch.equal(mem[1], mem[2])
    assert torch.equal(mem[0], torch.arange(int(mem[0, 0]), int(mem[0, 0]) + 4))


def test_yes_probability_is_a_probability_and_depends_on_the_input(adapters, family):
    adapter = adapters(family)
    a = adapter.encode_image(photo(3))
    b = adapter.encode_image(Image.new("RGB", (300, 200), (250, 10, 10)))
    memory = Memory(a.features[:6], "thing")
    p_a = adapter.yes_probability(["Is ", memory, " in this image? ", a, " Answer Yes or No."])
    p_b = adapter.yes_probability(["Is ", memory, " in this image? ", b, " Answer Yes or No."])
    assert 0.0 <= p_a <= 1.0 and 0.0 <= p_b <= 1.0
    assert abs(p_a - p_b) > 1e-6


def test_image_features_are_reused_across_prompts(adapters, family, monkeypatch):
    adapter = adapters(family)
    tokens = adapter.encode_image(photo(4))
    calls = []
    original = adapter.model.model.get_image_features
    monkeypatch.setattr(adapter.model.model, "get_image_features",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    adapter.generate([tokens, "What is this?"], max_new_tokens=2)
    adapter.yes_probability([tokens, "Is it a mug?"])
    assert calls == []


@pytest.mark.parametrize("case", ["tiny", "huge", "wide", "tall", "gray", "rgba", "sixteen_bit", "float"])
def test_odd_images_encode_and_their_boxes_stay_inside_the_source(adapters, family, case):
    adapter = adapters(family)
    rng = np.random.default_rng(5)
    image = {
        "tiny": lambda: Image.new("RGB", (1, 1), (10, 20, 30)),
        "huge": lambda: Image.new("RGB", (6000, 4000), (40, 90, 200)),
        "wide": lambda: Image.fromarray(rng.integers(0, 255, (6, 2000, 3), dtype=np.uint8)),
        "tall": lambda: Image.fromarray(rng.integers(0, 255, (1500, 9, 3), dtype=np.uint8)),
        "gray": lambda: Image.fromarray(rng.integers(0, 255, (120, 90), dtype=np.uint8), "L"),
        "rgba": lambda: Image.fromarray(rng.integers(0, 255, (80, 100, 4), dtype=np.uint8), "RGBA"),
        "sixteen_bit": lambda: Image.fromarray(rng.integers(0, 65535, (64, 48), dtype=np.uint16)),
        "float": lambda: rng.random((50, 70)).astype(np.float32),
    }[case]()
    tokens = adapter.encode_image(image)
    width, height = tokens.source_size
    assert tokens.features.shape[0] == tokens.token_boxes.shape[0] > 0
    assert torch.isfinite(tokens.features).all()
    boxes = tokens.token_boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width + 1e-3).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height + 1e-3).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # Together the tokens cover the whole source image.
    assert float(boxes[:, 0].min()) == pytest.approx(0, abs=1e-3)
    assert float(boxes[:, 2].max()) == pytest.approx(width, rel=1e-3)
    assert float(boxes[:, 3].max()) == pytest.approx(height, rel=1e-3)


def test_token_boxes_map_back_through_the_processor_resize(adapters):
    adapter = adapters("qwen2_5_vl")
    tokens = adapter.encode_image(photo(0, 400, 100))
    rows, cols = tokens.grid
    first = tokens.token_boxes[0].tolist()
    assert first == pytest.approx([0, 0, 400 / cols, 100 / rows], rel=1e-4)
    last = tokens.token_boxes[-1].tolist()
    assert last == pytest.approx([400 - 400 / cols, 100 - 100 / rows, 400, 100], rel=1e-4)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n garbage that is not a png", "not a readable image"),
    (b"hello world", "not a readable image"),
])
def test_corrupt_images_raise_the_project_error(adapters, data, message):
    with pytest.raises(PersonalVLMError, match=message):
        adapters("qwen2_5_vl").encode_image(data)


def test_truncated_png_and_zero_size_arrays_raise_the_project_error(adapters):
    buffer = io.BytesIO()
    photo().save(buffer, "PNG")
    with pytest.raises(PersonalVLMError):
        adapters("internvl").encode_image(buffer.getvalue()[:200])
    with pytest.raises(PersonalVLMError, match="zero size"):
        adapters("internvl").encode_image(np.zeros((0, 10, 3), np.uint8))


def test_memory_of_the_wrong_width_is_refused(adapters):
    adapter = adapters("idefics3")
    with pytest.raises(PersonalVLMError, match="re-teach"):
        adapter.build(["x", Memory(torch.zeros(3, adapter.hidden_size + 1), "old")])


def test_missing_weights_give_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PersonalVLMError, match="`hf download "):
        load_vlm("Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(PersonalVLMError, match="not found"):
        load_vlm(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonalVLMError, match="config.json"):
        load_vlm(str(tmp_path / "empty"))


def test_unsupported_architecture_and_bad_settings_are_refused(tiny_checkpoints, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(PersonalVLMError, match="not supported"):
        load_vlm(str(folder))
    with pytest.raises(PersonalVLMError, match="dtype"):
        load_vlm(str(tiny_checkpoints["qwen2_5_vl"]), dtype="float8")
    with pytest.raises(PersonalVLMError, match="device"):
        load_vlm(str(tiny_checkpoints["qwen2_5_vl"]), device="quantum")


def test_tiny_model_command_says_the_weights_are_random(tmp_path, capsys):
    from personal_vlm_node.testing.tiny_model import main

    assert main([str(tmp_path / "m"), "--family", "internvl"]) == 0
    assert "RANDOM" in capsys.readouterr().out
    assert (tmp_path / "m" / "TINY_RANDOM_WEIGHTS.txt").is_file()


def test_auto_dtype_uses_bfloat16_only_where_it_is_fast(monkeypatch):
    from personal_vlm_node import vlm as vlm_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert vlm_module._pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert vlm_module._pick_dtype("auto", cpu) == torch.bfloat16
    assert vlm_module._pick_dtype("float16", cpu) == torch.float16
