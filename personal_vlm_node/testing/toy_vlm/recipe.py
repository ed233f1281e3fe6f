"""The toy's recipe: everything that decides its trained weights, and the cache key made of it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import toy_world as tw

CACHE_ENV = "PERSONAL_VLM_TOY_CACHE"
PROFILE_NAME = "qwen2.5-vl-toy"          # models/qwen2.5-vl-toy.yaml, found through personal_vlm.json
# The source files that shape what the toy learns (and what its cached accuracy says).
_CODE_FILES = ("testing/toy_vlm/recipe.py", "testing/toy_vlm/model.py", "testing/toy_vlm/data.py",
               "testing/toy_vlm/batching.py", "testing/toy_vlm/training.py", "testing/toy_vlm/evaluate.py",
               "testing/toy_world/looks.py", "testing/toy_world/scenes.py", "prompts.py")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; its hash names the cache entry."""

    seed: int = 0
    image_size: int = 140            # model input: 140 px → 5×5 = 25 visual tokens
    world_size: int = tw.IMAGE_SIZE  # scenes are drawn as the world draws them, then resized like the processor
    vocab_size: int = 1024
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_depth: int = 3
    vision_heads: int = 2
    vision_intermediate: int = 192
    # The two-image yes/no sits on a plateau (loss ≈ ln 2 per decision) until it suddenly starts to
    # fall, after 500-1,100 steps of training on it, depending on the CPU's float kernels. What
    # counts is how long it trains at the full learning rate: it starts at step 200 (first_share)
    # and keeps the full rate until step 1,120, so it has 920 steps there and 480 more while the
    # rate decays. (Earlier recipes trained describe alone for 35 % of the steps: with 1,500 steps
    # the yes/no never left its plateau on an AMD EPYC, with 3,000 it left it at step 2,150.)
    steps: int = 1600
    lr: float = 1.5e-3
    warmup: int = 45
    decay_from: float = 0.7          # flat learning rate, then linear decay over the last 30 %
    weight_decay: float = 0.01
    curriculum: float = 0.3          # hard negatives ramp up over this share of the steps
    vision_steps: int = 200          # stage 1: the vision tower alone, per-token attribute labels
    vision_batch: int = 24
    feature_norm: float = 1.0        # mean norm of visual tokens after stage 1 (0: leave as trained)
    match_weight: float = 1.0        # dense auxiliary: query-image tokens predict "shows the reference object"
    # samples per step and loss weight of each task
    # (task, chats per step, loss weight, follow-up questions per chat)
    tasks: tuple = (("describe", 16, 1.0, 0), ("fingerprint", 1, 0.5, 0), ("recognize", 12, 2.0, 1),
                    ("attribute", 3, 1.0, 1), ("scene", 2, 0.5, 0), ("cot", 2, 0.5, 0))
    # The first share of the steps trains describe alone: reading the image is learned first,
    # without the noisy gradients of yes/no questions at chance. In a mix from step 0 (or with
    # attribute yes/no, fingerprint and scene questions beside it) the describe loss stayed on its
    # prior plateau for 450-600+ steps; alone it left the plateau by step ~150.
    first_share: float = 0.125
    first_tasks: tuple = (("describe", 24, 1.0, 0),)

    def key(self) -> str:
        return recipe_key(asdict(self), _CODE_FILES)


RECIPE = Recipe()


def recipe_key(recipe: dict, code_files) -> str:
    """A cache key of a training recipe and the source files that shape what it trains."""
    root = Path(__file__).resolve().parents[2]     # personal_vlm_node/
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for rel in code_files:
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "personal_vlm" / "toy"


def _say(message: str) -> None:
    print(f"[toy_vlm] {message}", file=sys.stderr, flush=True)
