"""Training and held-out samples of the toy's tasks, drawn from the toy world through the project's prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ... import prompts
from .. import toy_world as tw
from .model import _LOCATIONS

# The attributes the chain of thought checks per candidate (material and text are the same on every toy object).
_COT_KEYS = ("shape", "color", "pattern", "distinct_features")


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
    from ...r2p import ATTRIBUTE_LABELS

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
        return Sample(task, parts, answer, {"look": look, "area": r.area(0), "category_given": bool(category)})
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
        # The reasoning as the prompt asks for it, before the answer: per candidate, its listed
        # attributes that the object in the image has; the answer is the candidate that has them all.
        shown_fp = shown.fingerprint()
        seen = {n: [c.fingerprint()[k] for k in _COT_KEYS
                    if c.fingerprint()[k] == shown_fp[k] and c.fingerprint()[k] != "none"]
                for c, n in zip(cands, names)}
        answer_name = names[present] if present >= 0 else "none"
        notes = f"only {answer_name} has every attribute" if present >= 0 else "none has every attribute"
        answer = json.dumps({"seen_attributes": seen, "reasoning": notes, "answer": answer_name})
        return Sample(task, [_Img(image), "\n" + prompts.COT_PROMPT.format(candidates="\n".join(lines))], answer,
                      {"present": present >= 0, "names": names})
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
