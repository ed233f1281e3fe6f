"""A toy Qwen2.5-VL that has actually learned to see the toy world, trained on the CPU.

The real ``Qwen2_5_VLForConditionalGeneration`` classes at a small size (about 1.2 M parameters,
140 px images → 25 visual tokens; scenes are drawn at the world's 168 px and resized exactly as
the checkpoint's image processor resizes them), trained from scratch on :mod:`.toy_world` scenes
through the project's own prompts (:mod:`personal_vlm_node.prompts`, rendered with the
checkpoint's chat template exactly as the adapters render them). What keeps a step cheap on a
CPU: a chat template with no system turn, a tokenizer that writes each fixed stretch of a prompt
template as one token (:func:`prompt_phrases`; the text is unchanged), many samples per step and
the output layer run only on answer rows. The one-image tasks train alone for the first
``first_share`` of the steps, then every task together. It learns what real VLMs can do and the
methods rely on:

- describe the subject with keywords and the share of the image it covers (``INTRODUCE``);
- the fingerprint attributes (``FINGERPRINT``);
- yes/no on whether the object shown in one whole image appears in another (``RECOGNIZE`` and
  ``PAIRWISE_PROMPT`` with two images in context), with look-alikes as hard negatives;
- yes/no on attributes (``ATTRIBUTE_QUESTION`` / ``DESCRIPTION_QUESTION``), R2P's attribute
  reasoning (``COT_PROMPT``) and short scene questions (where is / what colour is the …).

It is NOT trained on concept memories or on recognition with spliced tokens: Ego's claim, that a
few of the model's own visual tokens carry a concept, is tested on it, not trained into it.

The checkpoint is written with ``save_pretrained`` (+ tokenizer, image processor, chat template),
so ``load_vlm(folder)`` loads it like any checkpoint. It is cached under a key of its recipe and
of this code (``$PERSONAL_VLM_TOY_CACHE``, default ``~/.cache/personal_vlm/toy``): it trains once
per machine. Next to the weights, ``toy_accuracy.json`` holds its held-out accuracy on its own tasks.

    python -m personal_vlm_node.testing.toy_vlm OUT     # reuses the cache when present
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from .batching import Encoder, forward_loss, patchify
from .data import Sample, _Img, make_sample, mask_cover, model_image, rendered_kind, token_cover
from .evaluate import evaluate_tasks
from .model import CHAT_TEMPLATE, build_model, build_tokenizer, prompt_phrases
from .recipe import CACHE_ENV, PROFILE_NAME, RECIPE, Recipe, _say, cache_root, recipe_key
from .training import train, training_threads

__all__ = ["CACHE_ENV", "CHAT_TEMPLATE", "MARKER", "PROFILE_NAME", "RECIPE", "YES_NO_FLOOR", "Encoder", "Recipe",
           "Sample", "build_model", "build_once", "build_tokenizer", "cache_root", "ensure_toy_vlm",
           "evaluate_tasks", "forward_loss", "make_sample", "mask_cover", "model_image", "patchify",
           "prompt_phrases", "recipe_key", "rendered_kind", "token_cover", "toy_vlm_folder", "train",
           "training_threads", "weak_yes_no"]


# ---- the cache --------------------------------------------------------------------------------
def build_once(final: Path, marker: str, build) -> Path:
    """``final`` once ``final/marker`` exists; otherwise ``build(folder)`` fills a fresh temporary
    folder, under one machine-wide lock (one training at a time), and it is renamed to ``final``."""
    import fcntl

    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / marker).is_file():
            return final
        # Under the lock no one else is building: what a killed build left behind goes.
        for stale in final.parent.glob(f".{final.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
        build(tmp)
        os.replace(tmp, final)
    return final


YES_NO_FLOOR = 0.65       # held-out two-image yes/no below this: recognition on the toy means little


def weak_yes_no(accuracy: dict) -> str | None:
    """Why this toy cannot measure recognition (its two-image yes/no near chance), or None."""
    recognize = accuracy.get("recognize", {})
    if recognize.get("all", 0.0) >= YES_NO_FLOOR and recognize.get("positive", 0.0) >= YES_NO_FLOOR:
        return None
    return (f"this toy's two-image yes/no is near chance on held-out scenes (all {recognize.get('all')}, "
            f"positives {recognize.get('positive')}): it did not leave its plateau, and recognition measured "
            f"on it means little; train longer (--steps)")


MARKER = "toy_vlm.json"    # written last: a cached toy is complete once it is there


def toy_vlm_folder(recipe: Recipe = RECIPE) -> Path:
    """Where the toy of ``recipe`` is cached (complete once :data:`MARKER` is in it)."""
    return cache_root() / f"qwen2_5_vl-toy-{recipe.key()}"


def ensure_toy_vlm(recipe: Recipe = RECIPE, progress=_say, evaluate: bool = True) -> Path:
    """The cached trained toy for ``recipe`` (trained now, once per machine, when missing)."""
    def build(tmp: Path) -> None:
        figures = train(recipe, tmp, progress)
        meta = {"recipe": asdict(recipe), "key": recipe.key(), "training": figures,
                "trained_on": "personal_vlm_node.testing.toy_world scenes; no concept memories, no spliced tokens"}
        if evaluate:
            if progress:
                progress("measuring held-out accuracy on its own tasks")
            meta["held_out_accuracy"] = evaluate_tasks(tmp, progress=progress)
            (tmp / "toy_accuracy.json").write_text(json.dumps(meta["held_out_accuracy"], indent=1) + "\n")
        (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")

    return build_once(toy_vlm_folder(recipe), MARKER, build)
