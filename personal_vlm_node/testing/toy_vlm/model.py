"""The toy's tokenizer (one token per fixed stretch of a prompt), chat template and Qwen2.5-VL config."""

from __future__ import annotations

import json
import re

from ... import prompts
from .. import toy_world as tw
from .recipe import Recipe


# ---- tokenizer and chat template ---------------------------------------------------------------
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|image_pad|>", "<|video_pad|>"]
# The toy checkpoint's own template: ChatML with no system turn (every token of a prompt costs
# training time on the CPU); the adapter renders whatever a checkpoint's template says.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_LOCATIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def _corpus() -> str:
    from ...r2p import ATTRIBUTE_LABELS

    words = [prompts.INTRODUCE, prompts.FINGERPRINT, prompts.RECOGNIZE, prompts.PAIRWISE_PROMPT,
             prompts.ATTRIBUTE_QUESTION, prompts.DESCRIPTION_QUESTION, prompts.COT_PROMPT,
             prompts.ASK_INTRO, prompts.ASK_RULE, prompts.ATTRIBUTE_TEXT, "This is", "the main subject",
             "You are a helpful assistant.", "Yes", "No", "none", " ".join(ATTRIBUTE_LABELS.values()),
             "What colour is the", "Where is the", "sticker stickers plastic", " ".join(_LOCATIONS)]
    words += list(tw.CATEGORIES) + list(tw.COLORS) + list(tw.PATTERNS) + list(tw.PATTERN_WORDS.values())
    words += list(tw.MARKS) + list(tw.SYLLABLES)
    words += [json.dumps({"keywords": ["red", "striped", "mug"], "area": 30})]
    words += [json.dumps(tw.ObjectLook("mug", "red", "stripes", "blue", "star").fingerprint())]
    words += [json.dumps({"seen_attributes": {"Fluffy": ["mug", "red and blue", "blue stripes", "star sticker"]},
                          "reasoning": "only Fluffy has every attribute", "answer": "none"})]
    words += [str(i) for i in range(0, 101)]
    return "\n".join(words * 3)


_PROMPT_TEMPLATES = ("INTRODUCE", "FINGERPRINT", "RECOGNIZE", "RECOGNIZE_JOINT_INTRO", "ASK_INTRO", "ASK_RULE",
                     "COT_PROMPT", "PAIRWISE_PROMPT", "ATTRIBUTE_QUESTION", "DESCRIPTION_QUESTION")


def prompt_phrases(min_chars: int = 12) -> list[str]:
    """The fixed stretches of the project's prompt templates (the text between their ``{slots}``).

    The toy's tokenizer writes each as one token. The prompts stay exactly the project's: the
    rendered text is unchanged and the adapter tokenizes it with the checkpoint's own tokenizer;
    only fewer tokens carry it, which is what makes training affordable on a CPU (the long
    fixed instructions are 3/4 of a describe sequence otherwise). A changed prompt changes the
    recipe key (prompts.py is hashed) and the toy is trained again with the new phrases."""
    phrases = []
    for name in _PROMPT_TEMPLATES:
        text = getattr(prompts, name)
        for piece in re.split(r"(?<!\{)\{[a-z_]+\}(?!\})", text):
            piece = piece.replace("{{", "{").replace("}}", "}")
            if len(piece) >= min_chars and piece not in phrases:
                phrases.append(piece)
    return phrases


def build_tokenizer(vocab_size: int):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from ..tiny_model import train_byte_level_bpe

    phrases = prompt_phrases()
    tok = train_byte_level_bpe(_corpus(), vocab_size - len(phrases), _SPECIALS)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in phrases])
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"the toy tokenizer has {tok.get_vocab_size()} ids, more than {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=_SPECIALS[1:])


def build_model(recipe: Recipe, tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    head_dim = recipe.text_hidden // recipe.text_heads
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2]
    mrope.append(half - sum(mrope))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=recipe.vocab_size, hidden_size=recipe.text_hidden, intermediate_size=recipe.text_intermediate,
            num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
            num_key_value_heads=recipe.text_kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=recipe.vision_depth, hidden_size=recipe.vision_hidden, intermediate_size=recipe.vision_intermediate,
            num_heads=recipe.vision_heads, out_hidden_size=recipe.text_hidden, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=recipe.image_size, fullatt_block_indexes=list(range(recipe.vision_depth)),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(recipe.seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    side = recipe.image_size
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": side * side}, patch_size=14, merge_size=2,
        temporal_patch_size=2)
    return model, processor
