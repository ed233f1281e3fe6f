"""Ego: a concept is a memory of the VLM's own visual tokens, chosen by its own attention.

Concept introduction, per reference image r (at most two generations and one extra forward):

1. One generation describes the subject with distinctive keywords and estimates the share of the
   image it covers, α_c (percent). A second, longer generation (the R2P fingerprint: attributes +
   one-sentence description) is not needed for the memory and runs later, in the background.
2. K_c = min(K, max(K_min, round(α_c · N_r / 100))), N_r = number of visual tokens of image r.
   With a region of interest, α_c is the ROI's share of the image (measured, not estimated).
   When the answer gives no area (unparsable, or out of range), α_c is the median of the other
   views' areas, and without any, the attention's own extent: the share of tokens whose I_j is at
   least half the peak (step 3 runs first). This rule is the project's; the paper leaves it open.
3. One forward pass over prompt + the model's own answer captures, at the profile's layers ℓ ∈ Λ,
   the attention A^ℓ_{h,t,j} of the rows t that produced keyword tokens to visual token j:
       I_j = mean_{ℓ∈Λ} mean_h mean_t A^ℓ_{h,t,j}
   Only tokens inside the ROI are eligible. The memory is the top-K_c tokens by I_j, restored to
   spatial (row-major) order: X_c = F_r[sort(topK(I))]. Several images: memories concatenated.

Recognition: memory X_c as soft tokens + the frame → p(yes) = λ_yes / (λ_yes + λ_no).
Calibration: on single-subject images with masks, layers are ranked by the share of their top-K
attended tokens that fall on the mask; the best L make the profile.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
import zlib
from dataclasses import dataclass, field

import torch

from . import prompts
# The introduction's answer, read back (ego.<name> still reaches them).
from .ego_text import introduction_complete, json_objects, parse_introduction  # noqa: F401
from .errors import PersonalVLMError
from .vlm.base import ImageTokens, Memory, VLMAdapter


# ---- keywords to tokens ---------------------------------------------------------------------
def keyword_spans(answer: str, keywords: list[str]) -> list[tuple[int, int]]:
    """Character spans of every whole-word occurrence of the keywords in the answer (any case)."""
    spans = []
    for keyword in keywords:
        if not keyword.strip():
            continue
        pattern = rf"(?<!\w){re.escape(keyword.strip())}(?!\w)"
        spans += [m.span() for m in re.finditer(pattern, answer, re.IGNORECASE)]
    return sorted(set(spans))


_NOT_KEYWORD_CHARS = " \t\n\"'`“”‘’"


def token_char_spans(tokenizer, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``token_ids`` and each token's character span in it.

    Decoded cumulatively, so spans are those of the tokens the model actually generated (a
    re-tokenised copy of the text can split differently). A token that ends inside a multi-byte
    character gets an empty span; the token that completes the character covers it.
    """
    spans, previous = [], 0
    text = ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=False)
        end = len(text.rstrip("\ufffd"))
        spans.append((min(previous, end), end))
        previous = end
    return text, spans


def keyword_token_indices(text: str, spans: list[tuple[int, int]], keywords: list[str],
                          skip: set[int] = frozenset()) -> list[int]:
    """Indices of the generated tokens that spell a keyword, matched on word boundaries.

    A token belongs to a keyword when the characters it shares with the keyword's span are more
    than quotes and spaces: ``"red`` counts for "red", a bare ``"`` or ``", "`` never does, and a
    keyword split over several tokens contributes all of them. ``skip``: special-token indices.
    """
    chosen = set()
    for start, end in keyword_spans(text, keywords):
        for i, (s, e) in enumerate(spans):
            if i in skip or s >= end or e <= start:
                continue
            if text[max(s, start):min(e, end)].strip(_NOT_KEYWORD_CHARS):
                chosen.add(i)
    return sorted(chosen)


def token_importance(attention: torch.Tensor, keyword_tokens: list[int], other_tokens: list[int],
                     rows: str = "predict", baseline: str = "answer") -> torch.Tensor | None:
    """I_j from one layer's captured attention ``(T', N)`` (row i produced token i). (N,)

    ``rows``: "predict" reads the rows that produced each keyword token (row i for token i);
    "own" reads the keyword tokens' own rows (row i+1). ``baseline``: "answer" subtracts the mean
    attention of the answer's other (non-keyword) rows, so visual tokens that draw attention
    whatever is said (attention sinks) do not win the top-K; "none" keeps the raw mean.
    None when no keyword row exists.
    """
    shift = 0 if rows == "predict" else 1
    available = attention.shape[0]
    pick = [i + shift for i in keyword_tokens if i + shift < available]
    if not pick:
        return None
    importance = attention[pick].float().mean(0)                                  # (N,)
    if baseline == "answer":
        others = [i + shift for i in other_tokens if i + shift < available]
        if others:
            importance = importance - attention[others].float().mean(0)
    return importance


# ---- memory selection -------------------------------------------------------------------
def memory_size(area: float | None, num_tokens: int, max_tokens: int, min_tokens: int,
                budget: float | None = None) -> int:
    """K_c = min(K, max(K_min, α_c·N_r/100)); an unknown area keeps K.

    K is the budget share of the image's tokens (Ego: 20 % of N_r) capped at ``max_tokens``;
    without a budget, K = ``max_tokens``.
    """
    cap = max_tokens if budget is None else min(max_tokens, max(min_tokens, round(budget * num_tokens)))
    if area is None:
        k = cap
    else:
        k = min(cap, max(min_tokens, round(area * num_tokens / 100.0)))
    return max(1, min(k, num_tokens))


def attention_area(importance: torch.Tensor) -> float | None:
    """The subject's area (percent) as the attention sees it: the share of tokens whose importance
    is at least half the peak (a full width at half maximum). None when nothing stands out."""
    peak = float(importance.max())
    if not math.isfinite(peak) or peak <= 0.0:
        return None
    return 100.0 * int((importance >= 0.5 * peak).sum()) / importance.numel()


def roi_mask(token_boxes: torch.Tensor, roi: tuple[float, float, float, float] | None,
             floor: int = 0) -> torch.Tensor:
    """(N,) bool: tokens whose centre lies inside the ROI (x, y, w, h); all True without one.

    ``floor``: an ROI that covers fewer tokens is widened to the ``floor`` tokens whose centres
    lie nearest the ROI's centre, so a small subject still gets the memory's minimum K.
    """
    if roi is None:
        return torch.ones(token_boxes.shape[0], dtype=torch.bool)
    x, y, w, h = roi
    cx = (token_boxes[:, 0] + token_boxes[:, 2]) / 2
    cy = (token_boxes[:, 1] + token_boxes[:, 3]) / 2
    inside = (cx >= x) & (cx <= x + w) & (cy >= y) & (cy <= y + h)
    if not inside.any():
        # An ROI smaller than one token: keep the token(s) it overlaps most.
        ix = (token_boxes[:, 2].clamp(max=x + w) - token_boxes[:, 0].clamp(min=x)).clamp(min=0)
        iy = (token_boxes[:, 3].clamp(max=y + h) - token_boxes[:, 1].clamp(min=y)).clamp(min=0)
        overlap = ix * iy
        inside = overlap >= overlap.max() if overlap.max() > 0 else inside
    floor = min(floor, token_boxes.shape[0])
    if int(inside.sum()) < floor:
        distance = (cx - (x + w / 2)) ** 2 + (cy - (y + h / 2)) ** 2        # (N,)
        distance = distance.masked_fill(inside, -1.0)                       # keep what was inside
        inside = torch.zeros_like(inside)
        inside[torch.topk(distance, floor, largest=False).indices] = True
    return inside


def select_tokens(importance: torch.Tensor, k: int, eligible: torch.Tensor) -> torch.Tensor:
    """Indices of the top-k eligible tokens by I_j, in spatial (ascending) order. (k,)"""
    scores = importance.float().masked_fill(~eligible, float("-inf"))
    k = min(k, int(eligible.sum()))
    top = torch.topk(scores, k).indices
    return torch.sort(top).values


def check_roi(roi, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Validate an ROI (x, y, w, h) in source pixels; all-zero means none.

    An ROI partly outside the image is clipped to it; one that is empty, wholly outside or not
    made of finite numbers is refused.
    """
    if roi is None:
        return None
    try:
        x, y, w, h = (float(v) for v in roi)
    except (TypeError, ValueError) as exc:
        raise PersonalVLMError(f"a region of interest is four numbers x, y, w, h; got {roi!r}") from exc
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise PersonalVLMError(
            f"region of interest (x={x:g}, y={y:g}, w={w:g}, h={h:g}) must be made of finite numbers")
    if x == y == w == h == 0:
        return None
    width, height = size
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        raise PersonalVLMError(
            f"region of interest (x={x:g}, y={y:g}, w={w:g}, h={h:g}) is empty or outside the "
            f"{width}×{height} image")
    return (x0, y0, x1 - x0, y1 - y0)


@dataclass
class ImageIntroduction:
    """What one reference image contributed."""

    answer: str
    keywords: list[str]
    area: float | None             # α_c as K_c used it (see area_from)
    num_tokens: int
    indices: torch.Tensor          # (K_r,) chosen token indices, ascending
    importance: torch.Tensor       # (N_r,) I_j
    timings: dict[str, float] = field(default_factory=dict)
    keyword_token_ids: list[int] = field(default_factory=list)   # the generated tokens read
    area_from: str = "answer"      # answer | roi | views (the other views' median) | attention | none


@dataclass
class Introduction:
    """A concept's memory and what produced it."""

    memory: dict[str, torch.Tensor]     # stored verbatim by the ConceptStore
    keywords: list[str]
    memory_tokens: int
    images: list[ImageIntroduction]
    timings: dict[str, float]


@dataclass
class IntroductionOptions:
    """How a memory is chosen; every choice is a profile option (see profiles.ModelProfile)."""

    layers: list[int]                 # Λ: the text layers whose attention is read
    max_tokens: int = 256             # K's absolute cap
    min_tokens: int = 4               # K_c's floor
    budget: float | None = 0.2        # K = budget · N_r (Ego: 20 % of the image's tokens)
    rows: str = "predict"             # "predict" (row i-1 of keyword token i) | "own" (row i)
    baseline: str = "answer"          # "answer": subtract the non-keyword rows' mean | "none"
    passes: int = 1                   # 1: attention captured while generating | 2: extra forward
    max_new_tokens: int = 48

    @classmethod
    def from_profile(cls, profile, layers: list[int]) -> IntroductionOptions:
        return cls(list(layers), profile.max_memory_tokens, profile.min_memory_tokens,
                   profile.memory_budget or None, profile.attention_rows, profile.attention_baseline,
                   profile.introduction_passes)


@dataclass
class Attended:
    """What the introduction generation said and where its keywords looked, per layer."""

    text: str
    keywords: list[str]
    area: float | None                         # as the answer gave it
    importance: dict[int, torch.Tensor]        # layer → (N_r,) I_j at that layer
    keyword_token_ids: list[int]
    timings: dict[str, float]


def attend(vlm: VLMAdapter, tokens: ImageTokens, name: str, category: str,
           options: IntroductionOptions) -> Attended:
    """One generation that describes the subject and, in the same pass, captures the attention
    (``passes: 2``: a teacher-forced forward over the generated tokens afterwards)."""
    timings = {}
    layers = options.layers
    parts = prompts.introduce(tokens, name, category, vlm.family)
    t0 = time.perf_counter()
    # Stops as soon as the answer object closes: what follows it is never read.
    generation = vlm.generate(parts, max_new_tokens=options.max_new_tokens,
                              attention_layers=layers if options.passes == 1 else None,
                              on_text=lambda text: not introduction_complete(text))
    timings["describe"] = time.perf_counter() - t0
    keywords, area = parse_introduction(generation.text)
    answer_ids = list(generation.token_ids)
    t1 = time.perf_counter()
    if not answer_ids:
        # Nothing generated: attend from the concept's name, given as the answer.
        answer_ids = vlm._text_ids(name) or [vlm._placeholder_id]
        attention_maps = vlm.answer_attention(parts, answer_ids, layers)
        keywords = keywords or [name]
    elif options.passes == 1:
        attention_maps = generation.attention
    else:
        attention_maps = vlm.answer_attention(parts, answer_ids, layers)
    timings["attention"] = time.perf_counter() - t1
    text, spans = token_char_spans(vlm.tokenizer, answer_ids)
    special = set(vlm.tokenizer.all_special_ids)
    skip = {i for i, t in enumerate(answer_ids) if t in special}
    keyword_tokens = keyword_token_indices(text, spans, keywords, skip)
    answer_tokens = [i for i in range(len(answer_ids)) if i not in skip and text[slice(*spans[i])].strip()]
    if not keyword_tokens:
        keyword_tokens, other_tokens = answer_tokens or list(range(len(answer_ids))), []
    else:
        other_tokens = [i for i in answer_tokens if i not in keyword_tokens]
    importance = {}
    for layer in layers:
        attention_map = attention_maps[layer][:, : tokens.num_tokens]                 # (T', N_r)
        value = token_importance(attention_map, keyword_tokens, other_tokens, options.rows, options.baseline)
        if value is None:      # "own" row of a last token that has none: the predicting rows
            value = token_importance(attention_map, keyword_tokens, other_tokens, "predict", options.baseline)
        importance[layer] = value
    return Attended(generation.text or name, keywords, area, importance,
                    [answer_ids[i] for i in keyword_tokens], timings)


def introduce_image(vlm: VLMAdapter, tokens: ImageTokens, name: str, category: str,
                    options: IntroductionOptions, roi=None) -> ImageIntroduction:
    """Steps 1–3 for one reference image."""
    return select_memory(tokens, attend(vlm, tokens, name, category, options), options, roi)


def select_memory(tokens: ImageTokens, attended: Attended, options: IntroductionOptions, roi=None,
                  views_area: float | None = None) -> ImageIntroduction:
    """Step 2 and the selection of step 3: K_c from α_c, then the top-K_c tokens by I_j.
    ``views_area``: the other views' median area, used when this view's answer gave none."""
    importance = torch.stack([attended.importance[l] for l in options.layers]).mean(0)   # (N_r,) I_j
    area, area_from = attended.area, "answer"
    if roi is not None:
        width, height = tokens.source_size
        area, area_from = 100.0 * roi[2] * roi[3] / (width * height), "roi"
    elif area is None and views_area is not None:
        area, area_from = views_area, "views"
    elif area is None:
        area = attention_area(importance)
        area_from = "attention" if area is not None else "none"
    eligible = roi_mask(tokens.token_boxes, roi, floor=options.min_tokens)
    k = memory_size(area, tokens.num_tokens, options.max_tokens, options.min_tokens, options.budget)
    indices = select_tokens(importance, k, eligible)
    return ImageIntroduction(attended.text, attended.keywords, area, tokens.num_tokens, indices, importance,
                             attended.timings, attended.keyword_token_ids, area_from)


def build_memory(images: list[ImageTokens], intros: list[ImageIntroduction]) -> dict[str, torch.Tensor]:
    """Concatenate per-image memories; keep positions and grids so other feature spaces can be used."""
    memory = torch.cat([img.features[i.indices].float().cpu() for img, i in zip(images, intros)])  # (K_c, D)
    positions = torch.cat([i.indices.cpu() for i in intros])                                        # (K_c,)
    image_index = torch.cat([torch.full((len(i.indices),), r, dtype=torch.long)
                             for r, i in enumerate(intros)])                                       # (K_c,)
    importance = torch.cat([i.importance[i.indices].float().cpu() for i in intros])                 # (K_c,)
    grids = torch.tensor([list(img.grid) for img in images], dtype=torch.long)                      # (R, 2)
    num_tokens = torch.tensor([img.num_tokens for img in images], dtype=torch.long)                 # (R,)
    boxes = torch.cat([img.token_boxes[i.indices].float().cpu() for img, i in zip(images, intros)]) # (K_c, 4)
    out = {"memory": memory, "positions": positions, "image_index": image_index,
           "importance": importance, "grids": grids, "num_tokens": num_tokens, "boxes": boxes}
    if all(img.layer_features is not None for img in images):         # e.g. Qwen3-VL's DeepStack
        out["layer_features"] = torch.cat([img.layer_features[i.indices].float().cpu()
                                           for img, i in zip(images, intros)])                       # (K_c, S, D)
    return out


# Memory entries a family may lack: views are joined with them only when both sides have them.
_OPTIONAL_MEMORY_KEYS = ("layer_features",)


def append_views(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A concept memory with further reference views: ``new``'s images follow ``old``'s."""
    if old["memory"].shape[1] != new["memory"].shape[1]:
        raise PersonalVLMError("the stored memory was built with another model; re-teach the concept")
    views = int(old["grids"].shape[0]) if "grids" in old else int(old.get("image_index", torch.zeros(1)).max()) + 1
    out = {}
    for key, value in new.items():
        if key in _OPTIONAL_MEMORY_KEYS and key not in old:
            continue
        if key not in old:
            raise PersonalVLMError("the stored memory predates multi-view teaching; re-teach the concept")
        out[key] = torch.cat([old[key], value + views if key == "image_index" else value])
    return out


def introduce(vlm: VLMAdapter, images: list[ImageTokens], name: str, category: str,
              options: IntroductionOptions, rois=None, progress=None) -> Introduction:
    """Ego concept introduction over 1..R reference images (see the module docstring)."""
    rois = list(rois) if rois else [None] * len(images)
    attended = []
    for r, tokens in enumerate(images):
        if progress:
            progress(f"reference image {r + 1}/{len(images)}: describing and attending")
        attended.append(attend(vlm, tokens, name, category, options))
    intros = []
    for r, (tokens, roi) in enumerate(zip(images, rois)):
        known = [a.area for k, a in enumerate(attended) if k != r and a.area is not None]
        views_area = float(statistics.median(known)) if known else None
        intros.append(select_memory(tokens, attended[r], options, roi, views_area))
    keywords: list[str] = []
    for intro in intros:
        keywords += [k for k in intro.keywords if k.lower() not in {x.lower() for x in keywords}]
    memory = build_memory(images, intros)
    timings = {
        "describe": sum(i.timings["describe"] for i in intros),
        "attention": sum(i.timings["attention"] for i in intros),
    }
    return Introduction(memory, keywords[:12], int(memory["memory"].shape[0]), intros, timings)


# ---- recognition ------------------------------------------------------------------------
def recognize(vlm: VLMAdapter, image: ImageTokens, memories: list[Memory]) -> dict[str, float]:
    """Ego in-context recognition: p(yes) per concept, its memory spliced as soft tokens."""
    return {m.name: vlm.yes_probability(prompts.recognize(m, image, vlm.family)) for m in memories}


def joint_context(names: list[str], scores: dict[str, float], size: int, budget: int | None = None,
                  size_of=None) -> list[str]:
    """The memories of a joint prompt, in :func:`context_order`: the concepts asked about
    (``names``, always) and then the others, best-scoring first, while they fit — at most ``size``
    memories and, with a ``budget``, at most ``budget`` memory tokens (``size_of(name)``: K_c).
    Every concept goes in when all fit; the similarity filter ranks only beyond that."""
    asked = list(dict.fromkeys(names))
    others = sorted((n for n in scores if n not in asked), key=lambda n: -scores[n])
    chosen = list(asked)
    used = sum(size_of(n) for n in asked) if budget is not None and size_of is not None else 0
    for name in others:
        if len(chosen) >= size:
            break
        if budget is not None and size_of is not None:
            cost = size_of(name)
            if used + cost > budget:
                break                     # best first: the filter keeps the top, never skips to smaller ones
            used += cost
        chosen.append(name)
    return context_order(chosen)


def context_order(names: list[str]) -> list[str]:
    """``names`` shuffled by a seed made of the set itself. Where a memory stands then says nothing
    about which concept is asked or which matched best (asked first was a cue a model can learn),
    and the same concepts always stand in the same order, so results repeat and the prompts for
    several names over one frame share their prefix."""
    order = sorted(names)
    random.Random(zlib.crc32("\x00".join(order).encode())).shuffle(order)
    return order


def p_yes(vlm: VLMAdapter, image: ImageTokens, names: list[str], memory_of, joint: int | None = None,
          scores: dict[str, float] | None = None, budget: int | None = None) -> dict[str, float]:
    """Ego's p(yes) for ``names``: one prompt per concept (``joint=None``), or one prompt holding
    the memories of ``names`` and of the others in ``scores`` while they fit (at most ``joint``
    memories and ``budget`` memory tokens; beyond that the best-matching by ``scores``), a
    yes-probability per name. ``memory_of(name)`` gives a :class:`Memory`."""
    if joint is None:
        return {n: recognize(vlm, image, [memory_of(n)])[n] for n in names}
    loaded: dict[str, Memory] = {}           # each memory loaded once: sized, then spliced

    def memory(name: str) -> Memory:
        if name not in loaded:
            loaded[name] = memory_of(name)
        return loaded[name]

    together = joint_context(names, scores or {}, joint, budget, lambda n: int(memory(n).tokens.shape[0]))
    return recognize_joint(vlm, image, [memory(n) for n in together], list(dict.fromkeys(names)))


def recognize_joint(vlm: VLMAdapter, image: ImageTokens, memories: list[Memory],
                    names: list[str] | None = None) -> dict[str, float]:
    """Ego recognition with every memory in one prompt, so concepts compete: p(yes) per name
    (default: every memory's name). The memories and the image are read once for all names."""
    names = [m.name for m in memories] if names is None else names
    asked = [prompts.recognize_joint(memories, image, n, vlm.family) for n in names]
    return dict(zip(names, vlm.yes_probabilities(asked)))


# ---- calibration ------------------------------------------------------------------------
def mask_overlap(token_boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) share of each token's box covered by the binary mask (H, W) of the source image."""
    h, w = mask.shape
    out = torch.zeros(token_boxes.shape[0])
    m = mask.float()
    for j, (x0, y0, x1, y1) in enumerate(token_boxes.tolist()):
        c0, c1 = int(x0), max(int(x0) + 1, min(w, int(round(x1))))
        r0, r1 = int(y0), max(int(y0) + 1, min(h, int(round(y1))))
        out[j] = m[r0:r1, c0:c1].mean() if r0 < h and c0 < w else 0.0
    return out


def rank_layers(vlm: VLMAdapter, samples: list[tuple[ImageTokens, torch.Tensor]], top_k: int,
                progress=None, options: IntroductionOptions | None = None) -> dict[int, float]:
    """Mean share of each layer's top-K attended tokens that lie on the subject's mask."""
    layers = list(range(vlm.num_layers))
    options = IntroductionOptions(layers) if options is None else \
        IntroductionOptions(**{**options.__dict__, "layers": layers})
    totals = {l: 0.0 for l in layers}
    for s, (tokens, mask) in enumerate(samples):
        if progress:
            progress(f"calibration image {s + 1}/{len(samples)}")
        attended = attend(vlm, tokens, "the main subject", "", options)
        on_mask = mask_overlap(tokens.token_boxes, mask) >= 0.5                  # (N,)
        k = min(top_k, tokens.num_tokens)
        for l in layers:
            top = torch.topk(attended.importance[l], k).indices
            totals[l] += float(on_mask[top].float().mean())
    return {l: totals[l] / max(1, len(samples)) for l in layers}
