"""A tiny Qwen3-VL checkpoint (random weights) for tests: real geometry (16 px patches, 2×2 merge,
interleaved M-RoPE, DeepStack at two vision layers), a few thousand parameters per layer."""

from __future__ import annotations

from ..qwen2_5_vl.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from ..tiny import VOCAB_SIZE, TinyKit


def _build(tokenizer, size="tiny"):
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    # Qwen3-VL's processor geometry (16 px patches, 2×2 merge → 32 px per token), small pixel budget.
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
        patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return model, processor


KITS = {"qwen3_vl": TinyKit(QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, _build)}
