"""Tiny random-weight VLMs of the real architectures, built fully offline.

Each builder writes a folder laid out like a Hugging Face checkpoint (config.json, safetensors
weights, tokenizer files, preprocessor_config.json, chat template), so tests, benchmarks and smoke
runs load it with ``from_pretrained(folder)`` through exactly the code path of a real checkpoint.

THE WEIGHTS ARE RANDOM: these models produce meaningless text. They exist to exercise shapes,
token bookkeeping, positions, attention capture and I/O, never quality.

    python -m personal_vlm_node.testing.tiny_model OUT_DIR --family qwen2_5_vl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# A small corpus so the byte-level BPE learns the words our prompts use; the ids stay tiny.
_CORPUS = """
Describe the main subject of this image with a few distinctive keywords. Answer with JSON.
keywords attributes shape material color colour pattern distinct features text brand description
What share of the image does the subject cover? Answer with a number from 0 to 100 percent.
Is this <concept>? Answer Yes or No. Yes No yes no. The answer is Yes. The answer is No.
my mug Fluffy the cat Grandpa's cane a red ceramic mug with a white handle on the table sofa
round square tall small large blue green white black striped dotted plain wooden metal plastic
Where is it? Which of these is in the image? none of them. You are a helpful assistant.
user assistant system image picture photo object person dog cat cup bottle chair bag toy
0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 % { } [ ] " : , . ? ! ' -
"""


@dataclass(frozen=True)
class _Family:
    special_tokens: list[str]
    chat_template: str


_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ image_placeholder }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_FAMILIES = {
    "qwen2_5_vl": _Family(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                        "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        chat_template=_CHATML_TEMPLATE.replace(
            "{{ image_placeholder }}", "<|vision_start|><|image_pad|><|vision_end|>"),
    ),
    "internvl": _Family(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                        "<IMG_CONTEXT>", "<video>"],
        chat_template=_CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"),
    ),
    "idefics3": _Family(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                        "<fake_token_around_image>", "<global-img>"]
        + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
        chat_template=(
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
        ),
    ),
}
FAMILIES = tuple(_FAMILIES)
_VOCAB_SIZE = 512  # the model's embedding rows; the tokenizer is trained to stay below it


def train_byte_level_bpe(corpus: str, vocab_size: int, special_tokens: list[str], unk_token: str | None = None):
    """A byte-level BPE trained offline on ``corpus``, ids below ``vocab_size``; specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 16,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return tok


def _build_tokenizer(family: _Family):
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_level_bpe(_CORPUS, _VOCAB_SIZE, family.special_tokens)
    first = family.special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=first,
        eos_token=family.special_tokens[2],
        pad_token=first,
        unk_token=first,
        additional_special_tokens=family.special_tokens[1:],
    )


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


def _qwen2_5_vl(tokenizer, size="tiny"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    text, vision, max_pixels = _QWEN_SIZES[size]
    text = dict(text)
    mrope = text.pop("mrope_section")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=_VOCAB_SIZE, max_position_embeddings=4096, **text,
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


def _internvl(tokenizer, size="tiny"):
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=[224, 224], patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
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


def _idefics3(tokenizer, size="tiny"):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=128, patch_size=16,
        ),
        text_config=dict(
            model_type="llama", vocab_size=_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<image>"),
        scale_factor=2,  # (128/16)² = 64 patches → 16 tokens per tile
    )
    model = Idefics3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 256}, max_image_size={"longest_edge": 128}, do_image_splitting=True,
    )
    return model, processor


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "internvl": _internvl, "idefics3": _idefics3}


SIZES = ("tiny", "realistic")


def build_tiny_model(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight checkpoint of ``family`` to ``out_dir`` and return the folder.

    ``size="realistic"`` (qwen2_5_vl only) uses Qwen2.5-VL-3B's dimensions with a shortened LLM.
    """
    import torch

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES or (size == "realistic" and family != "qwen2_5_vl"):
        raise ValueError(f"size {size!r} is not available for {family}; realistic exists for qwen2_5_vl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec = _FAMILIES[family]
    tokenizer = _build_tokenizer(spec)
    model, image_processor = _BUILDERS[family](tokenizer, size)
    if family == "idefics3":
        # The processor reads these from the tokenizer's special-token attributes.
        tokenizer.image_token = "<image>"
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(spec.chat_template)
    (out / "TINY_RANDOM_WEIGHTS.txt").write_text(
        f"{size.capitalize()} {family} model with RANDOM weights, for tests and benchmarks only. "
        "Its outputs mean nothing.\n")
    meta = {"family": family, "size": size, "random_weights": True, "seed": seed}
    (out / "tiny_model.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personal_vlm_node.testing.tiny_model",
        description="Build a tiny RANDOM-WEIGHT model of a real VLM architecture, offline.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="realistic: Qwen2.5-VL-3B dimensions, shortened LLM (qwen2_5_vl only)")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir, args.family, args.seed, args.size)
    print(f"wrote a {args.size} {args.family} model with RANDOM weights (test use only) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
