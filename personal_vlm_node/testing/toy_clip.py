"""A toy CLIP trained on the toy world, so R2P's image–text and attribute scores mean something.

The real ``CLIPModel`` classes at a small size, trained on the CPU in about 8 minutes on
:mod:`.toy_world` scenes against the texts R2P sends it: ``ATTRIBUTE_TEXT`` ("a photo of <value>")
for every fingerprint attribute, and the one-sentence descriptions. The loss is a sigmoid loss over
every (image, text) pair of a batch, labelled by whether the text is true of some object in the
image (many images share "a photo of red", so softmax contrast would be wrong). Saved with
``save_pretrained`` + tokenizer + image processor, so ``--verifier-model <folder>`` loads it like
``openai/clip-vit-base-patch32``. Cached like the toy VLM, under a key of its recipe and code.

    python -m personal_vlm_node.testing.toy_clip OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import prompts
from . import toy_world as tw
from .toy_vlm import build_once, cache_root, recipe_key

_CODE_FILES = ("testing/toy_clip.py", "testing/toy_world/looks.py", "testing/toy_world/scenes.py", "prompts.py")
_KEYS = ("shape", "color", "pattern", "distinct_features", "description")


@dataclass(frozen=True)
class ClipRecipe:
    seed: int = 0
    image_size: int = 112
    patch: int = 14
    hidden: int = 96
    layers: int = 3
    text_hidden: int = 64
    text_layers: int = 2
    projection: int = 64
    vocab_size: int = 512
    steps: int = 1000                # 300 left colour at 0.74 and descriptions at 0.64 on held-out pairs
    batch: int = 48
    lr: float = 2e-3

    def key(self) -> str:
        return recipe_key(asdict(self), _CODE_FILES)


CLIP_RECIPE = ClipRecipe()


def _say(message: str) -> None:
    print(f"[toy_clip] {message}", file=sys.stderr, flush=True)


def _values(look: tw.ObjectLook) -> dict[str, str]:
    fp = look.fingerprint()
    return {k: fp[k] for k in _KEYS}


def _texts_for(look: tw.ObjectLook) -> list[str]:
    return [prompts.ATTRIBUTE_TEXT.format(value=v) for k, v in _values(look).items() if k != "description"] + \
        [_values(look)["description"]]


def _corpus() -> str:
    rng = np.random.default_rng(0)
    lines = [" ".join(_texts_for(tw.random_look(rng))) for _ in range(400)]
    return "\n".join(lines)


def _tokenizer(vocab_size: int):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from .tiny_model import train_byte_level_bpe

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = train_byte_level_bpe(_corpus(), vocab_size, [bos, eos], unk_token=eos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=eos, model_max_length=64), tok.token_to_id(bos), tok.token_to_id(eos)


def _sample(rng: np.random.Generator, size: int):
    """A scene and the looks it shows."""
    looks = [tw.random_look(rng)]
    if rng.random() < 0.5:
        looks.append(tw.distractor(rng, looks))
    if rng.random() < 0.3:
        looks.insert(0, tw.lookalike(rng, looks[0]))
    spec = tw.scene(rng, looks, image_size=size)
    r = tw.render(spec)
    visible = [l for l, b in zip(looks, r.boxes) if b is not None]
    return r.image, visible


def _true_of(text: str, looks: list[tw.ObjectLook]) -> bool:
    return any(text in _texts_for(l) for l in looks)


def train_clip(recipe: ClipRecipe, out: Path, progress=_say) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(recipe.seed)
    tokenizer, bos, eos = _tokenizer(recipe.vocab_size)
    text = dict(vocab_size=recipe.vocab_size, hidden_size=recipe.text_hidden, intermediate_size=recipe.text_hidden * 4,
                num_hidden_layers=recipe.text_layers, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=recipe.hidden, intermediate_size=recipe.hidden * 4, num_hidden_layers=recipe.layers,
                  num_attention_heads=3, image_size=recipe.image_size, patch_size=recipe.patch)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection))
    processor = CLIPImageProcessorPil(size={"shortest_edge": recipe.image_size},
                                      crop_size={"height": recipe.image_size, "width": recipe.image_size})
    bias = torch.nn.Parameter(torch.tensor(-4.0))
    scale = torch.nn.Parameter(torch.tensor(2.3))
    opt = torch.optim.AdamW(list(model.parameters()) + [bias, scale], lr=recipe.lr, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    running = None
    for step in range(recipe.steps):
        rng = np.random.default_rng([recipe.seed, 21, step])
        images, looks = zip(*(_sample(rng, tw.IMAGE_SIZE) for _ in range(recipe.batch)))
        texts = []
        for ls in looks:
            own = _texts_for(ls[0])
            texts.append(own[int(rng.integers(len(own)))])
            neg = _texts_for(tw.lookalike(rng, ls[0]) if rng.random() < 0.5 else tw.random_look(rng))
            texts.append(neg[int(rng.integers(len(neg)))])
        texts = list(dict.fromkeys(texts))
        labels = torch.tensor([[1.0 if _true_of(t, ls) else 0.0 for t in texts] for ls in looks])
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=enc["input_ids"],
                                                  attention_mask=enc["attention_mask"]).pooler_output, dim=-1)
        logits = img @ txt.T * scale.exp() + bias
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = recipe.lr * min(1.0, (step + 1) / 20) * (1.0 if step < 0.8 * recipe.steps else 0.3)
        opt.step()
        running = float(loss) if running is None else 0.9 * running + 0.1 * float(loss)
        if progress and (step + 1) % 50 == 0:
            per = (time.perf_counter() - t0) / (step + 1)
            progress(f"step {step + 1}/{recipe.steps}  {per:.2f} s/step  loss {running:.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return {"steps": recipe.steps, "train_seconds": round(seconds, 1), "final_loss": round(running, 4),
            "parameters": sum(p.numel() for p in model.parameters())}


def evaluate_clip(folder, seed: int = 54321, count: int = 80) -> dict:
    """Held-out: for an image of one object, does its own attribute text beat a look-alike's?"""
    from ..r2p import ImageTextSimilarity

    sim = ImageTextSimilarity(str(folder), device="cpu")
    rng = np.random.default_rng(seed)
    wins = {k: [0, 0] for k in _KEYS}
    for _ in range(count):
        look = tw.random_look(rng)
        twin = tw.lookalike(rng, look) if rng.random() < 0.5 else tw.random_look(rng)
        image = tw.render(tw.scene(rng, [look], image_size=tw.IMAGE_SIZE)).image
        emb = sim.embed_image(image)
        a, b = _values(look), _values(twin)
        for k in _KEYS:
            if a[k] == b[k]:
                continue
            ta = a[k] if k == "description" else prompts.ATTRIBUTE_TEXT.format(value=a[k])
            tb = b[k] if k == "description" else prompts.ATTRIBUTE_TEXT.format(value=b[k])
            s = sim.similarity(emb, [ta, tb])
            wins[k][0] += 1
            wins[k][1] += int(s[0] > s[1])
    return {k: round(c / n, 3) if n else None for k, (n, c) in wins.items()}


MARKER = "toy_clip.json"   # written last: a cached toy CLIP is complete once it is there


def toy_clip_folder(recipe: ClipRecipe = CLIP_RECIPE) -> Path:
    """Where the toy CLIP of ``recipe`` is cached (complete once :data:`MARKER` is in it)."""
    return cache_root() / f"clip-toy-{recipe.key()}"


def ensure_toy_clip(recipe: ClipRecipe = CLIP_RECIPE, progress=_say, evaluate_count: int = 80) -> Path:
    def build(tmp: Path) -> None:
        figures = train_clip(recipe, tmp, progress)
        meta = {"recipe": asdict(recipe), "training": figures,
                "held_out_pairwise_accuracy": evaluate_clip(tmp, count=evaluate_count)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")

    return build_once(toy_clip_folder(recipe), MARKER, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.toy_clip",
                                     description="Train (once, cached) the toy CLIP and copy it to OUT.")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    cached = ensure_toy_clip()
    out = Path(args.out)
    if out.resolve() != cached.resolve():
        shutil.copytree(cached, out, dirs_exist_ok=True)
    print(json.dumps({"model": str(out), **json.loads((out / MARKER).read_text())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
