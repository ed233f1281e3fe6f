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

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import prompts
from ..profiles import PROFILE_HINT
from . import toy_world as tw

CACHE_ENV = "PERSONAL_VLM_TOY_CACHE"
PROFILE_NAME = "qwen2.5-vl-toy"          # models/qwen2.5-vl-toy.yaml, found through personal_vlm.json
_CODE_FILES = ("testing/toy_vlm.py", "testing/toy_world.py", "prompts.py")


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
                    ("attribute", 3, 1.0, 1), ("scene", 2, 0.5, 0), ("cot", 1, 0.5, 0))
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
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for rel in code_files:
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "personal_vlm" / "toy"


def _say(message: str) -> None:
    print(f"[toy_vlm] {message}", file=sys.stderr, flush=True)


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
    from ..r2p import ATTRIBUTE_LABELS

    words = [prompts.INTRODUCE, prompts.FINGERPRINT, prompts.RECOGNIZE, prompts.PAIRWISE_PROMPT,
             prompts.ATTRIBUTE_QUESTION, prompts.DESCRIPTION_QUESTION, prompts.COT_PROMPT,
             prompts.ASK_INTRO, prompts.ASK_RULE, prompts.ATTRIBUTE_TEXT, "This is", "the main subject",
             "You are a helpful assistant.", "Yes", "No", "none", " ".join(ATTRIBUTE_LABELS.values()),
             "What colour is the", "Where is the", "sticker stickers plastic", " ".join(_LOCATIONS)]
    words += list(tw.CATEGORIES) + list(tw.COLORS) + list(tw.PATTERNS) + list(tw.PATTERN_WORDS.values())
    words += list(tw.MARKS) + list(tw.SYLLABLES)
    words += [json.dumps({"keywords": ["red", "striped", "mug"], "area": 30})]
    words += [json.dumps(tw.ObjectLook("mug", "red", "stripes", "blue", "star").fingerprint())]
    words += [json.dumps({"reasoning": "pattern and feature match", "answer": "none", "seen_attributes": ["red"]})]
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

    from .tiny_model import train_byte_level_bpe

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


# ---- samples ---------------------------------------------------------------------------------
class _Img:
    """An image part while a prompt is being assembled (stands where ImageTokens/Memory go).
    ``token_labels``: per merged visual token, 1 where it shows the object asked about (training
    only: a dense auxiliary target, never part of a prompt)."""

    def __init__(self, image, name: str = "", token_labels=None):
        self.image, self.name, self.token_labels = image, name, token_labels


def model_image(image, side: int) -> np.ndarray:
    """(side, side, 3) uint8: ``image`` resized as the toy's image processor resizes it (bicubic)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def mask_cover(mask: np.ndarray, side: int, cell: int = 28) -> np.ndarray:
    """(g, g) share of each merged token's cell that ``mask`` covers, on the model's ``side`` px grid."""
    from PIL import Image

    m = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((side, side), Image.BOX))
    g = side // cell
    return m.reshape(g, cell, g, cell).mean(axis=(1, 3))


def token_cover(rendered: tw.Rendered, which: list[bool], side: int, share: float = 0.2) -> np.ndarray:
    """(g·g,) 1 for merged tokens whose cell is covered ≥ ``share`` by the objects flagged in ``which``."""
    size = rendered.masks[0].shape[0] if rendered.masks else side
    m = np.zeros((size, size), bool)
    for flag, mask in zip(which, rendered.masks):
        if flag:
            m |= mask
    return (mask_cover(m, side) >= share).astype(np.int64).reshape(-1)


@dataclass
class Sample:
    task: str
    parts: list            # str | _Img
    answer: str
    info: dict = field(default_factory=dict)
    follow_ups: list = field(default_factory=list)   # further (parts, answer) turns of the same chat


def _area_word(area: float) -> int:
    return int(max(5, min(100, 5 * round(area / 5))))


def _name(rng) -> str:
    return tw.random_name(rng, set())


def _location(box, size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    col, row = min(2, int(cx * 3)), min(2, int(cy * 3))
    return _LOCATIONS[row * 3 + col]


def _negative_look(rng, look: tw.ObjectLook, difficulty: float = 1.0) -> tuple[tw.ObjectLook, str]:
    """A different object, and which kind of negative it is. ``difficulty`` 0 → mostly objects that
    differ in everything; 1 → mostly look-alikes and same-category / same-colour objects."""
    u = rng.random()
    lookalike_share = 0.1 + 0.35 * difficulty
    same_category = lookalike_share + 0.15 + 0.05 * difficulty
    same_color = same_category + 0.15 + 0.1 * difficulty
    if u < lookalike_share:
        other = tw.lookalike(rng, look)
        kind = "lookalike_pattern" if other.pattern != look.pattern else "lookalike_mark"
        return other, kind
    if u < same_category:
        other = tw.random_look(rng, category=look.category)
        while other.color == look.color:
            other = tw.random_look(rng, category=look.category)
        return other, "same_category"
    if u < same_color:
        other = tw.random_look(rng, color=look.color)
        while other.category == look.category:
            other = tw.random_look(rng, color=look.color)
        return other, "same_color"
    return tw.distractor(rng, [look]), "random"


def _query_scene(rng, target: tw.ObjectLook | None, avoid: list[tw.ObjectLook], size: int):
    extra = int(rng.integers(0, 3))
    looks = ([target] if target else []) + [tw.distractor(rng, avoid) for _ in range(extra)]
    if not looks:
        looks = [tw.distractor(rng, avoid)]
    order = rng.permutation(len(looks))
    looks = [looks[i] for i in order]
    spec = tw.scene(rng, looks, image_size=size)
    return spec


def make_sample(task: str, rng: np.random.Generator, size: int, follow_ups: int = 0,
                difficulty: float = 1.0) -> Sample:
    """One training (or held-out) sample of ``task``, drawn from ``rng``. ``follow_ups``: further
    questions in the same chat (recognize: more query images about the same reference; attribute:
    more attributes of the same image), so one prefill trains several decisions. ``difficulty``:
    the share of hard negatives (see :func:`_negative_look`); held-out figures use 1."""
    from ..r2p import ATTRIBUTE_LABELS

    if task in ("describe", "fingerprint"):
        look = tw.random_look(rng)
        spec = tw.scene(rng, [look], size_range=(60, 124), occlusion=0.15, image_size=size)
        r = tw.render(spec)
        name = _name(rng) if rng.random() < 0.7 else "the main subject"
        category = look.category if rng.random() < 0.5 and name != "the main subject" else ""
        img = _Img(r.image)
        if task == "describe":
            parts = prompts.introduce(img, name, category)
            answer = json.dumps({"keywords": look.keywords(), "area": _area_word(r.area(0))})
        else:
            parts = prompts.fingerprint(img, name, category)
            answer = json.dumps(look.fingerprint())
        return Sample(task, parts, answer, {"look": look, "area": r.area(0)})
    if task == "recognize":
        look = tw.random_look(rng)
        name = _name(rng)
        ref = tw.render(tw.reference_scene(rng, look, image_size=size)).image
        pairwise = rng.random() >= 0.75
        description = f" ({look.description()})" if pairwise and rng.random() < 0.5 else ""
        turns = []
        for t in range(max(1, follow_ups + 1)):
            positive = rng.random() < 0.5
            shown, kind = (look, "positive") if positive else _negative_look(rng, look, difficulty)
            spec = _query_scene(rng, shown, [look, shown], size)
            rendered = tw.render(spec)
            query = _Img(rendered.image, token_labels=lambda side, r=rendered, w=[p.look == look for p in spec.objects]:
                         token_cover(r, w, side))
            question = (prompts.PAIRWISE_PROMPT if pairwise else prompts.RECOGNIZE).format(name=name)
            if t == 0 and not pairwise:
                parts = prompts.recognize(_Img(ref, name), query)
            elif t == 0:
                parts = [f"This is {name}: ", _Img(ref, name), description + "\n", query, "\n" + question]
            else:
                parts = [query, "\n" + question]     # the same chat: more images of the question
            turns.append((parts, "Yes" if positive else "No", kind))
        (parts, answer, kind), rest = turns[0], turns[1:]
        return Sample(task, parts, answer, {"kind": kind}, [(p, a) for p, a, _ in rest])
    if task == "attribute":
        look = tw.random_look(rng)
        spec = tw.scene(rng, [look], size_range=(60, 120), occlusion=0.1, image_size=size)
        image = tw.render(spec).image
        turns = []
        for t in range(max(1, follow_ups + 1)):
            truth = rng.random() < 0.5
            other, _ = _negative_look(rng, look, difficulty) if rng.random() < 0.7 else (tw.random_look(rng), "random")
            source = look if truth else other
            key = ["shape", "color", "pattern", "distinct_features", "description"][int(rng.integers(5))]
            value = source.fingerprint()[key]
            answer_yes = value == look.fingerprint()[key]
            if key == "description":
                question = prompts.DESCRIPTION_QUESTION.format(value=value)
            else:
                question = prompts.ATTRIBUTE_QUESTION.format(label=ATTRIBUTE_LABELS[key], value=value)
            turns.append(([_Img(image), "\n" + question] if t == 0 else [question], "Yes" if answer_yes else "No", key))
        (parts, answer, key), rest = turns[0], turns[1:]
        return Sample(task, parts, answer, {"key": key}, [(p, a) for p, a, _ in rest])
    if task == "scene":
        n = int(rng.integers(1, 4))
        looks: list[tw.ObjectLook] = []
        while len(looks) < n:
            candidate = tw.random_look(rng)
            if all(candidate.category != l.category for l in looks):
                looks.append(candidate)
        spec = tw.scene(rng, looks, occlusion=0.0, image_size=size)
        r = tw.render(spec)
        i = int(rng.integers(n))
        if r.boxes[i] is None:
            i = 0
        look = looks[i]
        if rng.random() < 0.5 or r.boxes[i] is None:
            question, answer = f"What colour is the {look.category}?", look.color
        else:
            question, answer = f"Where is {look.phrase()}?", _location(r.boxes[i], size)
        return Sample(task, [_Img(r.image), "\n" + question], answer, {"kind": question.split()[0]})
    if task == "cot":
        target = tw.random_look(rng)
        twin = tw.lookalike(rng, target)
        third = tw.distractor(rng, [target, twin])
        cands = [target, twin, third][: 2 + int(rng.integers(2))]
        names = [_name(rng) for _ in cands]
        order = rng.permutation(len(cands))
        cands, names = [cands[i] for i in order], [names[i] for i in order]
        present = int(rng.integers(-1, len(cands)))       # -1: none of them
        shown = cands[present] if present >= 0 else tw.distractor(rng, cands)
        spec = _query_scene(rng, shown, cands + [shown], size)
        image = tw.render(spec).image
        lines = []
        for i, (c, n) in enumerate(zip(cands, names), 1):
            fp = c.fingerprint()
            described = "; ".join(f"{ATTRIBUTE_LABELS.get(k, k)}: {v}" for k, v in fp.items() if k != "description")
            lines.append(f"{i}. {n}: {described}. {fp['description']}")
        seen = [shown.color, tw.PATTERN_WORDS[shown.pattern], shown.category]
        answer = json.dumps({"reasoning": "checked colour, pattern and feature",
                             "answer": names[present] if present >= 0 else "none", "seen_attributes": seen})
        return Sample(task, [_Img(image), "\n" + prompts.COT_PROMPT.format(candidates="\n".join(lines))], answer,
                      {"present": present >= 0})
    raise ValueError(task)


def rendered_kind(text: str, index: int) -> str:
    """Whether the ``index``-th sentinel-delimited field of ``text`` (odd index) is an image or an answer."""
    count = 0
    for ch in text:
        if ch in "\ue000\ue002":
            count += 1
            if 2 * count - 1 == index:
                return "image" if ch == "\ue000" else "answer"
    raise ValueError(index)


# ---- batching ---------------------------------------------------------------------------------
class Encoder:
    """Sample → token ids / labels / images, rendered exactly as the adapters render prompts."""

    def __init__(self, tokenizer, processor, model_config):
        self.tok, self.processor = tokenizer, processor
        self.side = int(round(math.sqrt(processor.size["longest_edge"])))     # square images of this side
        self.image_id = model_config.image_token_id
        self.start_id, self.end_id = model_config.vision_start_token_id, model_config.vision_end_token_id
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
        return self._cache[text]

    def encode(self, sample: Sample, tokens_per_image: int):
        """Token ids, labels (answer tokens and their end-of-turn) and images of a chat whose first
        user turn is exactly what the adapter renders for ``sample.parts``; follow-up turns (more
        questions about more images) continue the same chat."""
        images, image_parts = [], []

        def text_of(parts):
            out = []
            for part in parts:
                if isinstance(part, str):
                    out.append(part)
                else:
                    out.append(f"\ue000{len(images)}\ue001")
                    images.append(part.image)
                    image_parts.append(part)
            return "".join(out)

        turns = [(sample.parts, sample.answer)] + list(sample.follow_ups)
        messages = []
        for k, (parts, _) in enumerate(turns):
            messages.append({"role": "user", "content": [{"type": "text", "text": text_of(parts)}]})
            if k + 1 < len(turns):
                messages.append({"role": "assistant", "content": [{"type": "text", "text": f"\ue002{k}\ue003"}]})
        rendered = self.tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True) + f"\ue002{len(turns) - 1}\ue003"
        ids: list[int] = []
        labels: list[int] = []
        aux: list[int] = []
        pending_end = False
        for i, piece in enumerate(re.split("[\ue000-\ue003]", rendered)):
            kind = i % 2
            if kind and rendered_kind(rendered, i) == "image":
                ids += [self.start_id] + [self.image_id] * tokens_per_image + [self.end_id]
                labels += [-100] * (tokens_per_image + 2)
                target = image_parts[int(piece)].token_labels
                target = target(self.side) if callable(target) else target
                aux += [-100] + (list(map(int, target)) if target is not None else [-100] * tokens_per_image) + [-100]
            elif kind:
                answer = self._ids(turns[int(piece)][1])
                ids += answer
                labels += answer
                aux += [-100] * len(answer)
                pending_end = True
            else:
                chunk = self._ids(piece)
                ids += chunk
                labels += [-100] * len(chunk)
                aux += [-100] * len(chunk)
                if pending_end and chunk:
                    if chunk[0] == self.im_end:
                        labels[len(labels) - len(chunk)] = self.im_end
                    pending_end = False
        if pending_end:
            ids.append(self.im_end)
            labels.append(self.im_end)
            aux.append(-100)
        return ids, labels, images, aux

    def batch_lists(self, samples: list[Sample], tokens_per_image: int):
        """Plain lists and uint8 arrays (cheap to send between processes)."""
        rows = [self.encode(s, tokens_per_image) for s in samples]
        images = [model_image(im, self.side) for r in rows for im in r[2]]
        return [r[0] for r in rows], [r[1] for r in rows], images, [r[3] for r in rows]

    def tensors(self, ids_list, labels_list, images, aux_list=None, patch: int = 14, merge: int = 2):
        import torch

        length = max(len(i) for i in ids_list)
        ids = torch.full((len(ids_list), length), self.pad, dtype=torch.long)
        labels = torch.full((len(ids_list), length), -100, dtype=torch.long)
        aux = torch.full((len(ids_list), length), -100, dtype=torch.long)
        mask = torch.zeros((len(ids_list), length), dtype=torch.long)
        for b, (i, l) in enumerate(zip(ids_list, labels_list)):
            ids[b, :len(i)] = torch.tensor(i)
            labels[b, :len(l)] = torch.tensor(l)
            mask[b, :len(i)] = 1
            if aux_list is not None:
                aux[b, :len(aux_list[b])] = torch.tensor(aux_list[b])
        pixels, grids = zip(*(patchify(im, self.processor, patch, merge) for im in images))
        return ids, labels, mask, torch.cat(pixels), torch.stack(grids), aux

    def batch(self, samples: list[Sample], tokens_per_image: int):
        return self.tensors(*self.batch_lists(samples, tokens_per_image))


def patchify(image: np.ndarray, processor, patch: int = 14, merge: int = 2):
    """Qwen2-VL's pixel patches of an (H, W, 3) uint8 image whose sides are multiples of
    patch·merge and within the processor's pixel budget (no resize): what the processor computes."""
    import torch

    h, w, _ = image.shape
    mean = np.asarray(processor.image_mean, np.float32)
    std = np.asarray(processor.image_std, np.float32)
    x = (image.astype(np.float32) * np.float32(processor.rescale_factor) - mean) / std        # (H, W, C)
    x = np.repeat(x.transpose(2, 0, 1)[None], 2, axis=0)                                     # (T, C, H, W)
    gh, gw = h // patch, w // patch
    x = x.reshape(1, 2, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * 2 * patch * patch)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([1, gh, gw])


def forward_loss(model, ids, labels, mask, pixel_values, grid_thw, aux=None, aux_head=None):
    """Mean cross-entropy of the answer tokens, through the same splice + M-RoPE path as the adapter.

    With ``aux_head``: also the dense auxiliary loss — at every query-image token the last hidden
    state predicts whether the token shows the object of the reference image (binary cross-entropy)."""
    import torch
    import torch.nn.functional as F

    inner = model.model
    embeds = inner.language_model.get_input_embeddings()(ids)
    feats = torch.cat(list(inner.get_image_features(pixel_values, grid_thw).pooler_output))
    image_rows = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image_rows[..., None].expand_as(embeds), feats.to(embeds.dtype))
    inner.rope_deltas = None
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=image_rows.int(), image_grid_thw=grid_thw,
                                        attention_mask=mask)
    out = inner.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
    target = labels[:, 1:]
    answer = target != -100                      # only the rows that predict an answer token
    logits = model.lm_head(out.last_hidden_state[:, :-1][answer])
    loss = F.cross_entropy(logits.float(), target[answer])
    if aux_head is None or aux is None or not (aux >= 0).any():
        return loss, None
    where = aux >= 0
    aux_logits = aux_head(out.last_hidden_state[where]).squeeze(-1)
    return loss, F.binary_cross_entropy_with_logits(aux_logits.float(), aux[where].float())


# ---- training ---------------------------------------------------------------------------------
def _lr(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    start = int(recipe.decay_from * recipe.steps)
    if step < start:
        return recipe.lr
    return recipe.lr * max(0.05, 1.0 - (step - start) / max(1, recipe.steps - start))


def _step_batches(recipe: Recipe, enc: Encoder, step: int):
    rng = np.random.default_rng([recipe.seed, 11, step])
    tokens_per_image = (recipe.image_size // 28) ** 2
    out = []
    first = int(recipe.first_share * recipe.steps)
    difficulty = min(1.0, max(0, step - first) / max(1.0, recipe.curriculum * recipe.steps))
    for task, count, weight, follow_ups in (recipe.first_tasks if step < first else recipe.tasks):
        if count:
            samples = [make_sample(task, rng, recipe.world_size, follow_ups, difficulty) for _ in range(count)]
            out.append((task, weight, enc.batch_lists(samples, tokens_per_image)))
    return out


_HEADS = (("color", list(tw.COLORS)), ("category", list(tw.CATEGORIES)), ("pattern", list(tw.PATTERNS)),
          ("color2", [""] + list(tw.COLORS)), ("mark", list(tw.MARKS)))


def _vision_batch(recipe: Recipe, step: int):
    """Stage 1: scenes and, per merged visual token, the attributes of the object covering most of
    it (class 0 = background): dense labels, the way a vision encoder is pretrained before a VLM."""
    rng = np.random.default_rng([recipe.seed, 31, step])
    cell = 28
    images, labels = [], []
    for _ in range(recipe.vision_batch):
        looks = [tw.random_look(rng) for _ in range(int(rng.integers(1, 4)))]
        r = tw.render(tw.scene(rng, looks, size_range=(52, 124), image_size=recipe.world_size))
        g = recipe.image_size // cell
        cover = np.stack([mask_cover(m, recipe.image_size, cell) for m in r.masks])   # (O, g, g)
        best = cover.argmax(0)
        on = cover.max(0) >= 0.25
        lab = np.zeros((g * g, len(_HEADS)), dtype=np.int64)
        for k, (attr, values) in enumerate(_HEADS):
            per_object = np.array([values.index(getattr(l, attr)) + 1 for l in looks])
            lab[:, k] = np.where(on, per_object[best], 0).reshape(-1)
        images.append(model_image(r.image, recipe.image_size))
        labels.append(lab)
    return images, np.concatenate(labels)


def _producer(recipe: Recipe, enc: Encoder, queue, stop) -> None:
    """Draws and renders every step's samples in a second process (the world is numpy + PIL)."""
    for step in range(recipe.vision_steps):
        if stop.is_set():
            return
        queue.put((("vision", step), _vision_batch(recipe, step)))
    for step in range(recipe.steps):
        if stop.is_set():
            return
        queue.put((("chat", step), _step_batches(recipe, enc, step)))


def training_threads() -> int:
    """One thread for the model, the other core renders samples; ``$PERSONAL_VLM_TOY_THREADS`` overrides."""
    return int(os.environ.get("PERSONAL_VLM_TOY_THREADS", "1"))


def train(recipe: Recipe, out: Path, progress=_say) -> dict:
    """Train the toy from scratch and write the checkpoint to ``out``; returns timing figures.

    Samples are drawn from a per-step seed, so the data do not depend on timing; a second process
    renders them while the model trains.
    """
    import multiprocessing

    import torch
    import torch.nn.functional as F

    progress = progress or (lambda message: None)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe.vocab_size)
    for word in ("Yes", "No"):
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"the toy tokenizer splits {word!r}; yes/no readout needs one token")
    model, processor = build_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads())
    progress(f"training a {params / 1e6:.2f} M-parameter Qwen2.5-VL for {recipe.steps} steps "
             f"({sum(n for _, n, _, _ in recipe.tasks)} chats per step, {torch.get_num_threads()} thread(s) "
             "+ one rendering process)")
    enc = Encoder(tokenizer, processor, model.config)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    model.train()
    ctx = multiprocessing.get_context("fork")
    queue, stop = ctx.Queue(maxsize=6), ctx.Event()
    worker = ctx.Process(target=_producer, args=(recipe, enc, queue, stop), daemon=True)
    worker.start()
    t0 = time.perf_counter()
    wait_s = 0.0
    running: dict[str, float] = {}
    try:
        heads = torch.nn.Linear(recipe.text_hidden, sum(len(v) + 1 for _, v in _HEADS))
        vopt = torch.optim.AdamW(list(model.model.visual.parameters()) + list(heads.parameters()),
                                 lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
        sizes = [len(v) + 1 for _, v in _HEADS]
        for step in range(recipe.vision_steps):
            w0 = time.perf_counter()
            got, (images, labels) = queue.get(timeout=600)
            wait_s += time.perf_counter() - w0
            assert got == ("vision", step)
            for g in vopt.param_groups:
                g["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
            pixels, grids = zip(*(patchify(im, processor) for im in images))
            feats = torch.cat(list(model.model.get_image_features(torch.cat(pixels), torch.stack(grids)).pooler_output))
            logits = heads(feats).split(sizes, dim=-1)
            target = torch.from_numpy(labels)
            loss = sum(F.cross_entropy(l, target[:, k]) for k, l in enumerate(logits)) / len(sizes)
            vopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.model.visual.parameters(), 1.0)
            vopt.step()
            running["vision"] = 0.9 * running.get("vision", float(loss.detach())) + 0.1 * float(loss.detach())
            if (step + 1) % 50 == 0:
                per = (time.perf_counter() - t0) / (step + 1)
                progress(f"vision step {step + 1}/{recipe.vision_steps}  {per:.2f} s/step  loss {running['vision']:.3f}")
        del vopt, heads
        if recipe.feature_norm:
            # The projector's outputs land ~500× larger than the text embeddings; scale its last
            # layer so visual tokens enter the language model at a comparable norm.
            with torch.no_grad():
                images, _ = _vision_batch(recipe, recipe.vision_steps)
                pixels, grids = zip(*(patchify(im, processor) for im in images[:8]))
                feats = torch.cat(list(model.model.get_image_features(torch.cat(pixels), torch.stack(grids)).pooler_output))
                scale = recipe.feature_norm / float(feats.norm(dim=-1).mean())
                last = [m for m in model.model.visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.mul_(scale)
                last.bias.mul_(scale)
            progress(f"visual tokens scaled by {scale:.4f} to a mean norm of {recipe.feature_norm}")
        t1 = time.perf_counter()
        aux_head = torch.nn.Linear(recipe.text_hidden, 1) if recipe.match_weight else None
        if aux_head is not None:
            opt.add_param_group({"params": list(aux_head.parameters()), "weight_decay": 0.0})
        for step in range(recipe.steps):
            w0 = time.perf_counter()
            got, batches = queue.get(timeout=600)
            wait_s += time.perf_counter() - w0
            assert got == ("chat", step)
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            opt.zero_grad(set_to_none=True)
            for task, weight, lists in batches:
                loss, aux_loss = forward_loss(model, *enc.tensors(*lists), aux_head=aux_head)
                total = loss * weight
                if aux_loss is not None:
                    total = total + recipe.match_weight * aux_loss
                    running["match"] = 0.9 * running.get("match", float(aux_loss.detach())) + 0.1 * float(aux_loss.detach())
                total.backward()
                running[task] = 0.9 * running.get(task, float(loss.detach())) + 0.1 * float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % 25 == 0 or step == 0:
                spent = time.perf_counter() - t1
                per = spent / (step + 1)
                losses = " ".join(f"{k} {v:.3f}" for k, v in running.items())
                progress(f"step {step + 1}/{recipe.steps}  {per:.2f} s/step  eta {per * (recipe.steps - step - 1) / 60:.1f} min"
                         f"  loss: {losses}")
    finally:
        stop.set()
        while worker.is_alive():
            try:
                queue.get(timeout=0.1)
            except Exception:
                pass
            worker.join(timeout=0.1)
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / PROFILE_HINT).write_text(json.dumps({"profile": PROFILE_NAME}) + "\n")
    return {"parameters": params, "steps": recipe.steps, "vision_steps": recipe.vision_steps,
            "train_seconds": round(seconds, 1), "vision_seconds": round(t1 - t0, 1),
            "seconds_per_step": round((seconds - (t1 - t0)) / recipe.steps, 3),
            "waiting_for_samples_share": round(wait_s / seconds, 3), "threads": training_threads(),
            "final_losses": {k: round(v, 4) for k, v in running.items()}}


# ---- held-out accuracy on its own tasks -------------------------------------------------------
def evaluate_tasks(folder, seed: int = 12345, per_task: int = 60, progress=None) -> dict:
    """Accuracy of the model at ``folder`` on fresh scenes (seed never used in training), through
    the project's adapter (``load_vlm``), exactly as the methods call it."""
    from .. import ego
    from ..vlm import load_vlm

    vlm = load_vlm(str(folder), device="cpu", dtype="float32")
    size = tw.IMAGE_SIZE        # scenes as the world draws them; the adapter's processor resizes them

    def realise(parts):
        return [vlm.encode_image(p.image) if isinstance(p, _Img) else p for p in parts]

    results: dict[str, dict] = {}

    def tally(group: str, key: str, ok: bool):
        g = results.setdefault(group, {})
        n, c = g.get(key, (0, 0))
        g[key] = (n + 1, c + int(ok))

    area_err = []
    for t, task in enumerate(("describe", "recognize", "attribute", "scene", "cot")):
        rng = np.random.default_rng([seed, 100 + t])
        count = per_task * (3 if task == "recognize" else 1)
        for i in range(count):
            s = make_sample(task, rng, size)
            parts = realise(s.parts)
            assert all(not isinstance(p, _Img) for p in parts)
            if task == "describe":
                text = vlm.generate(parts, max_new_tokens=48).text
                keywords, area = ego.parse_introduction(text)
                look = s.info["look"]
                kws = {k.lower() for k in keywords}
                tally("describe", "color", look.color in kws)
                tally("describe", "pattern", tw.PATTERN_WORDS[look.pattern] in kws)
                tally("describe", "category", look.category in kws)
                tally("describe", "mark", (look.mark in kws) if look.mark != "none" else not (kws & set(tw.MARKS)))
                if area is not None:
                    area_err.append(abs(area - s.info["area"]))
                tally("describe", "area_within_10", area is not None and abs(area - s.info["area"]) <= 10)
            elif task in ("recognize", "attribute"):
                p = vlm.yes_probability(parts)
                truth = s.answer == "Yes"
                key = s.info.get("kind") or s.info.get("key")
                tally(task, key, (p >= 0.5) == truth)
                tally(task, "all", (p >= 0.5) == truth)
            elif task == "scene":
                text = vlm.generate(parts, max_new_tokens=6).text.strip().lower()
                tally("scene", s.info["kind"].lower(), text == s.answer)
            else:
                text = vlm.generate(parts, max_new_tokens=64).text
                want = json.loads(s.answer)["answer"]
                got = None
                for obj in ego.json_objects(text):
                    got = str(obj.get("answer"))
                    break
                tally("cot", "answer", got == want)
        if progress:
            progress(f"held-out {task}: done")
    out = {g: {k: round(c / n, 3) for k, (n, c) in v.items()} for g, v in results.items()}
    out["describe"]["area_mean_abs_error"] = round(float(np.mean(area_err)), 2) if area_err else None
    out["samples"] = {g: max(n for n, _ in v.values()) for g, v in results.items()}
    out["seed"] = seed
    # Look-alikes together, as the methods need them.
    rec = results.get("recognize", {})
    la = [rec[k] for k in ("lookalike_pattern", "lookalike_mark") if k in rec]
    if la:
        out["recognize"]["lookalike"] = round(sum(c for _, c in la) / sum(n for n, _ in la), 3)
    return out


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personal_vlm_node.testing.toy_vlm",
                                     description="Train (once, cached) the toy Qwen2.5-VL and copy it to OUT.")
    parser.add_argument("out", help="folder to write the checkpoint to")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps (new cache key)")
    args = parser.parse_args(argv)
    recipe = RECIPE if args.steps is None else Recipe(**{**asdict(RECIPE), "tasks": RECIPE.tasks, "steps": args.steps})
    cached = ensure_toy_vlm(recipe)
    out = Path(args.out)
    if out.resolve() != cached.resolve():
        shutil.copytree(cached, out, dirs_exist_ok=True)
    meta = json.loads((out / MARKER).read_text())
    print(json.dumps({"model": str(out), "cached": str(cached), "training": meta["training"],
                      "held_out_accuracy": meta.get("held_out_accuracy")}, indent=1))
    weak = weak_yes_no(meta["held_out_accuracy"]) if meta.get("held_out_accuracy") else None
    if weak:
        _say(f"warning: {weak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
