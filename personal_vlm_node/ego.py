"""Ego: a concept is a memory of the VLM's own visual tokens, chosen by its own attention.

Concept introduction, per reference image r (at most two generations and one extra forward):

1. One generation describes the subject with distinctive keywords and estimates the share of the
   image it covers, α_c (percent). A second, longer generation (the R2P fingerprint: attributes +
   one-sentence description) is not needed for the memory and runs later, in the background.
2. K_c = min(K, max(K_min, round(α_c · N_r / 100))), N_r = number of visual tokens of image r.
   With a region of interest, α_c is the ROI's share of the image (measured, not estimated).
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

import json
import math
import re
import time
from dataclasses import dataclass, field

import torch

from . import prompts
from .errors import PersonalVLMError
from .vlm.base import ImageTokens, Memory, VLMAdapter

_STOPWORDS = frozenset(
    "a an the and or of with on in at to for is are it its this that photo image picture shows "
    "keywords keyword area json answer percent percentage covers cover like".split())


# ---- robust parsing of model output ---------------------------------------------------------
def json_objects(text: str):
    """Yield every parsable ``{...}`` object in ``text`` (models wrap, truncate and chat)."""
    for start in [m.start() for m in re.finditer(r"\{", text)]:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    chunk = text[start:end + 1]
                    for candidate in (chunk, re.sub(r",\s*([}\]])", r"\1", chunk.replace("'", '"'))):
                        try:
                            value = json.loads(candidate)
                        except ValueError:
                            continue
                        if isinstance(value, dict):
                            yield value
                            break
                    break


def parse_introduction(text: str) -> tuple[list[str], float | None]:
    """Keywords and area (percent) from the introduction answer; never raises."""
    keywords: list[str] = []
    area: float | None = None
    for obj in json_objects(text):
        raw = obj.get("keywords") or obj.get("keyword") or []
        if isinstance(raw, str):
            raw = re.split(r"[,;]", raw)
        if isinstance(raw, list):
            keywords = [str(k).strip() for k in raw if str(k).strip()]
        value = obj.get("area", obj.get("coverage"))
        try:
            area = float(str(value).rstrip("% ")) if value is not None else None
        except ValueError:
            area = None
        break
    if not keywords:
        match = re.search(r"keywords?\W*[:=]\W*\[?([^\]\n}.]*)", text, re.IGNORECASE)
        source = match.group(1) if match else text
        keywords = [w for w in re.findall(r"[^\W\d_][\w'-]*", source) if w.lower() not in _STOPWORDS][:6]
    if area is None:
        match = re.search(r"area\W*[:=]?\W*(\d+(?:\.\d+)?)", text, re.IGNORECASE) or \
            re.search(r"(\d+(?:\.\d+)?)\s*%", text)
        area = float(match.group(1)) if match else None
    if area is not None and not 0.0 < area <= 100.0:
        area = None
    seen, unique = set(), []
    for k in keywords:
        if k.lower() not in seen and len(k) <= 40:
            seen.add(k.lower())
            unique.append(k)
    return unique[:8], area


def keyword_spans(answer: str, keywords: list[str]) -> list[tuple[int, int]]:
    """Character spans of the keywords inside the model's answer (case-insensitive)."""
    spans = []
    lowered = answer.lower()
    for keyword in keywords:
        start = lowered.find(keyword.lower())
        if start >= 0:
            spans.append((start, start + len(keyword)))
    return spans


# ---- memory selection -------------------------------------------------------------------
def memory_size(area: float | None, num_tokens: int, max_tokens: int, min_tokens: int) -> int:
    """K_c = min(K, α_c·N_r/100) with a floor; an unknown area keeps K."""
    if area is None:
        k = max_tokens
    else:
        k = min(max_tokens, max(min_tokens, round(area * num_tokens / 100.0)))
    return max(1, min(k, num_tokens))


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
    area: float | None
    num_tokens: int
    indices: torch.Tensor          # (K_r,) chosen token indices, ascending
    importance: torch.Tensor       # (N_r,) I_j
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Introduction:
    """A concept's memory and what produced it."""

    memory: dict[str, torch.Tensor]     # stored verbatim by the ConceptStore
    keywords: list[str]
    memory_tokens: int
    images: list[ImageIntroduction]
    timings: dict[str, float]


def introduce_image(vlm: VLMAdapter, tokens: ImageTokens, name: str, category: str, layers: list[int],
                    max_tokens: int, min_tokens: int, roi=None) -> ImageIntroduction:
    """Steps 1–3 for one reference image (one generation + one attention forward)."""
    timings = {}
    t0 = time.perf_counter()
    generation = vlm.generate(prompts.introduce(tokens, name, category, vlm.family), max_new_tokens=48)
    timings["describe"] = time.perf_counter() - t0
    keywords, area = parse_introduction(generation.text)
    answer = generation.text
    spans = keyword_spans(answer, keywords)
    if not answer.strip():
        # Nothing generated: attend from the concept's name, given as the answer.
        answer = name
        spans = [(0, len(name))]
    elif not spans:
        spans = [(0, len(answer))]
    eligible = roi_mask(tokens.token_boxes, roi, floor=min_tokens)
    if roi is not None:
        width, height = tokens.source_size
        area = 100.0 * roi[2] * roi[3] / (width * height)
    t1 = time.perf_counter()
    per_layer = vlm.attention_to_images(prompts.introduce(tokens, name, category, vlm.family),
                                        answer, spans, layers)
    timings["attention"] = time.perf_counter() - t1
    importance = torch.stack([per_layer[l][0] for l in layers]).mean(0)     # (N_r,) I_j
    k = memory_size(area, tokens.num_tokens, max_tokens, min_tokens)
    indices = select_tokens(importance, k, eligible)
    return ImageIntroduction(answer, keywords, area, tokens.num_tokens, indices, importance, timings)


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
    return {"memory": memory, "positions": positions, "image_index": image_index,
            "importance": importance, "grids": grids, "num_tokens": num_tokens, "boxes": boxes}


def introduce(vlm: VLMAdapter, images: list[ImageTokens], name: str, category: str, layers: list[int],
              max_tokens: int, min_tokens: int, rois=None, progress=None) -> Introduction:
    """Ego concept introduction over 1..R reference images (see the module docstring)."""
    rois = list(rois) if rois else [None] * len(images)
    intros = []
    for r, (tokens, roi) in enumerate(zip(images, rois)):
        if progress:
            progress(f"reference image {r + 1}/{len(images)}: describing and attending")
        intros.append(introduce_image(vlm, tokens, name, category, layers, max_tokens, min_tokens, roi))
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
                progress=None) -> dict[int, float]:
    """Mean share of each layer's top-K attended tokens that lie on the subject's mask."""
    layers = list(range(vlm.num_layers))
    totals = {l: 0.0 for l in layers}
    for s, (tokens, mask) in enumerate(samples):
        if progress:
            progress(f"calibration image {s + 1}/{len(samples)}")
        generation = vlm.generate(prompts.introduce(tokens, "the main subject", "", vlm.family),
                                  max_new_tokens=48)
        keywords, _ = parse_introduction(generation.text)
        answer = generation.text or "the main subject"
        spans = keyword_spans(answer, keywords) or [(0, len(answer))]
        per_layer = vlm.attention_to_images(prompts.introduce(tokens, "the main subject", "", vlm.family),
                                            answer, spans, layers)
        on_mask = mask_overlap(tokens.token_boxes, mask) >= 0.5                  # (N,)
        k = min(top_k, tokens.num_tokens)
        for l in layers:
            top = torch.topk(per_layer[l][0], k).indices
            totals[l] += float(on_mask[top].float().mean())
    return {l: totals[l] / max(1, len(samples)) for l in layers}
