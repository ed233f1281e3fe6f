"""Tiny Qwen2.5-VL checkpoints (random weights) for tests and benchmarks."""

from __future__ import annotations

from ..tiny import CHATML_TEMPLATE, VOCAB_SIZE, TinyKit

# Qwen2.5-VL-3B-Instruct's dimensions, for benchmarks that mean something on a CPU. The language
# model keeps only REALISTIC_TEXT_LAYERS of its 36 layers (random init of all 3B parameters takes
# minutes); per-layer LLM costs scale linearly. The vocabulary stays tiny (it only sizes the
# embedding table and the LM head).
REALISTIC_TEXT_LAYERS = 4
_QWEN_SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1]),
             224 * 224),
    "realistic": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=REALISTIC_TEXT_LAYERS,
                       num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24]),
                  dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       fullatt_block_indexes=[7, 15, 23, 31]),
                  448 * 448),
}


def _build(tokenizer, size="tiny"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    text, vision, max_pixels = _QWEN_SIZES[size]
    text = dict(text)
    mrope = text.pop("mrope_section")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, max_position_embeddings=4096, **text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112
                           if size == "realistic" else 56, **vision),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # Real Qwen2.5-VL geometry (14 px patches, 2×2 merge) with a small pixel budget.
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": max_pixels},
        patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    return model, processor


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ image_placeholder }}", "<|vision_start|><|image_pad|><|vision_end|>")

KITS = {
    "qwen2_5_vl": TinyKit(QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, _build, sizes=("tiny", "realistic")),
}
