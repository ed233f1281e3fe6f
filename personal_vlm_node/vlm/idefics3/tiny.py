"""Tiny Idefics3 and SmolVLM2 checkpoints (random weights) for tests.

SmolVLM2 (``model_type: smolvlm``) is Idefics3's architecture with its own classes; both run
through :class:`~.adapter.Idefics3Adapter`.
"""

from __future__ import annotations

from ..tiny import VOCAB_SIZE, TinyKit

_SPECIAL_TOKENS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                    "<fake_token_around_image>", "<global-img>"]
                   + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    # As SmolVLM writes it: "User: text", "Assistant: Yes" (": " before text, ":" before an image).
    "{{ message['role'] | capitalize }}:"
    "{%- if message['content'] is string or message['content'][0]['type'] != 'image' %} {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<end_of_utterance>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def _config_kwargs(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=128, patch_size=16,
        ),
        text_config=dict(
            model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<image>"),
        scale_factor=2,  # (128/16)² = 64 patches → 16 tokens per tile
    )


_PROCESSOR_KWARGS = dict(size={"longest_edge": 256}, max_image_size={"longest_edge": 128}, do_image_splitting=True)


def _idefics3(tokenizer, size="tiny"):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil

    config = Idefics3Config(**_config_kwargs(tokenizer))
    model = Idefics3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model, Idefics3ImageProcessorPil(**_PROCESSOR_KWARGS)


def _smolvlm(tokenizer, size="tiny"):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    config = SmolVLMConfig(**_config_kwargs(tokenizer))
    model = SmolVLMForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model, SmolVLMImageProcessorPil(**_PROCESSOR_KWARGS)


# The processors read the image marker from the tokenizer's special-token attributes.
_MARKERS = {"image_token": "<image>"}

KITS = {
    "idefics3": TinyKit(_SPECIAL_TOKENS, _CHAT_TEMPLATE, _idefics3, tokenizer_attributes=_MARKERS),
    "smolvlm": TinyKit(_SPECIAL_TOKENS, _CHAT_TEMPLATE, _smolvlm, tokenizer_attributes=_MARKERS),
}
