"""Tiny random-weight contrastive image–text models (CLIP, SigLIP), built fully offline.

The folder looks like a Hugging Face checkpoint (config.json, safetensors weights, tokenizer files,
preprocessor_config.json), so :class:`personal_vlm_node.r2p.ImageTextSimilarity` loads it with
``from_pretrained(folder)`` exactly as it loads ``openai/clip-vit-base-patch32`` or
``google/siglip-base-patch16-224``.

THE WEIGHTS ARE RANDOM: the similarities mean nothing. They exercise shapes, tokenisation,
pooling and I/O, never quality.

    python -m personal_vlm_node.testing.tiny_clip OUT_DIR --kind clip
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("clip", "siglip")

# Words of the fingerprint prompts and attributes, so the byte-level BPE keeps ids few and short.
_CORPUS = """
a photo of red blue green white black brown grey yellow striped dotted plain wooden metal plastic
ceramic plush fabric glass round square tall small large cylinder handle logo text brand none
my mug Fluffy the cat Grandpa's cane a toy dog bottle chair bag cup sofa table with and on in
"""
_VOCAB_SIZE = 320
_IMAGE_SIZE = 32
_TEXT_LENGTH = 64        # SigLIP pads every text to this length; CLIP truncates at it


def _tokenizer(kind: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from .tiny_model import train_byte_level_bpe

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = train_byte_level_bpe(_CORPUS, _VOCAB_SIZE, [bos, eos], unk_token=eos)
    bos_id, eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
    if kind == "clip":
        # CLIP pools the text at its end-of-text token: every text must end with one.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)])
    else:
        # SigLIP pools the last position of a fixed-length, right-padded sequence.
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, eos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=eos, model_max_length=_TEXT_LENGTH)
    return fast, bos_id, eos_id


def build_tiny_clip(out_dir: str | Path, kind: str = "clip", seed: int = 0) -> Path:
    """Write a random-weight ``kind`` ("clip" or "siglip") checkpoint to ``out_dir``; return it."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer, bos_id, eos_id = _tokenizer(kind)
    text = dict(vocab_size=_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=_TEXT_LENGTH,
                bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=_IMAGE_SIZE, patch_size=8)
    if kind == "clip":
        from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessorPil(size={"shortest_edge": _IMAGE_SIZE},
                                          crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    else:
        from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "TINY_RANDOM_WEIGHTS.txt").write_text(
        f"Tiny {kind} model with RANDOM weights, for tests only. Its similarities mean nothing.\n")
    (out / "tiny_model.json").write_text(json.dumps({"kind": kind, "random_weights": True, "seed": seed}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m personal_vlm_node.testing.tiny_clip",
        description="Build a tiny RANDOM-WEIGHT CLIP or SigLIP model, offline.")
    parser.add_argument("out_dir")
    parser.add_argument("--kind", default="clip", choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_clip(args.out_dir, args.kind, args.seed)
    print(f"wrote a tiny {args.kind} model with RANDOM weights (test use only) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
