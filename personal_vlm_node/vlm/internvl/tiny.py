"""A tiny InternVL checkpoint (random weights) for tests."""

from __future__ import annotations

from ..tiny import CHATML_TEMPLATE, VOCAB_SIZE, TinyKit


def _build(tokenizer, size="tiny"):
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=[224, 224], patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<IMG_CONTEXT>"),
        image_seq_length=64,  # (224/14)² patches, pixel-shuffled by 0.5 → 8×8 tokens per tile
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    processor = GotOcr2ImageProcessorPil(
        size={"height": 224, "width": 224}, crop_to_patches=False, min_patches=1, max_patches=4,
    )
    return model, processor


KITS = {
    "internvl": TinyKit(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"), _build),
}
