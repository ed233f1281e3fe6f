"""Tiny random-weight VLMs of the real architectures, built fully offline.

The recipes live with their families (``vlm/<family>/tiny.py``, one or more kits each, found
through the registry in :mod:`personal_vlm_node.vlm`); this module trains the tokenizer and writes
a folder laid out like a Hugging Face checkpoint (config.json, safetensors
weights, tokenizer files, preprocessor_config.json, chat template), so tests, benchmarks and smoke
runs load it with ``from_pretrained(folder)`` through exactly the code path of a real checkpoint.

THE WEIGHTS ARE RANDOM: these models produce meaningless text. They exist to exercise shapes,
token bookkeeping, positions, attention capture and I/O, never quality.

    python -m personal_vlm_node.testing.tiny_model OUT_DIR --family qwen2_5_vl
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ..options import RANDOM_MODEL_SIZES
from ..vlm.tiny import VOCAB_SIZE, TinyKit

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


def _kits() -> dict:
    """Every tiny kit of every registered family (``vlm/<family>/tiny.py``), by kit name."""
    from ..vlm import FAMILIES as _REGISTERED

    kits = {}
    for family in _REGISTERED:
        kits.update(importlib.import_module(f"personal_vlm_node.vlm.{family}.tiny").KITS)
    return kits


_KITS = _kits()
KIT_NAMES = tuple(_KITS)      # a family's kits: qwen2_5_vl, …, and variants such as a SmolVLM2


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


def _build_tokenizer(family: TinyKit):
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_level_bpe(_CORPUS, VOCAB_SIZE, family.special_tokens)
    first = family.special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=first,
        eos_token=family.special_tokens[2],
        pad_token=first,
        unk_token=first,
        additional_special_tokens=family.special_tokens[1:],
    )


SIZES = RANDOM_MODEL_SIZES


def build_tiny_model(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight checkpoint of ``family`` to ``out_dir`` and return the folder.

    ``size="realistic"`` (qwen2_5_vl only) uses Qwen2.5-VL-3B's dimensions with a shortened LLM.
    """
    import torch

    if family not in _KITS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(KIT_NAMES)}")
    spec = _KITS[family]
    if size not in spec.sizes:
        raise ValueError(f"size {size!r} is not available for {family}; it has {', '.join(spec.sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer(spec)
    model, image_processor = spec.build(tokenizer, size)
    for name, value in spec.tokenizer_attributes.items():
        setattr(tokenizer, name, value)
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
    parser.add_argument("--family", default="qwen2_5_vl", choices=KIT_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="realistic: Qwen2.5-VL-3B dimensions, shortened LLM (qwen2_5_vl only)")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir, args.family, args.seed, args.size)
    print(f"wrote a {args.size} {args.family} model with RANDOM weights (test use only) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
