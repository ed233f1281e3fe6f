"""Teaching a concept: reference pictures → Ego memory → concept store, then the R2P fingerprint.

The concept is matchable as soon as :meth:`Teacher.teach` returns (its memory is stored and in the
bank); the fingerprint, a second generation, is written on a background thread and the caller may
wait for it (:meth:`TeachResult.wait_fingerprint`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from . import ego, r2p
from .bank import ConceptBank
from .errors import PersonalVLMError
from .images import load_image
from .store import ConceptRecord, ConceptStore, validate_category
from .vlm import ImageTokens, VLMAdapter

log = logging.getLogger(__name__)

MAX_REFERENCE_IMAGES = 8
MAX_CATEGORY_CHARS = 64


@dataclass
class TeachResult:
    name: str
    memory_tokens: int
    keywords: list[str]
    seconds: float                         # until the concept was usable (memory stored)
    timings: dict[str, float]              # per step, seconds
    fingerprint: Future = field(repr=False)   # resolves to the fingerprint dict when complete

    def wait_fingerprint(self, timeout: float | None = None) -> dict:
        return self.fingerprint.result(timeout)


def expand_rois(rois, pictures) -> list:
    """One checked ROI (or None) per picture from none, one for all, or one per picture."""
    if rois is None:
        return [None] * len(pictures)
    if not isinstance(rois, (list, tuple)) or (rois and not isinstance(rois[0], (list, tuple, type(None)))):
        rois = [rois]
    if len(rois) == 1 and len(pictures) > 1:
        rois = list(rois) * len(pictures)
    if len(rois) != len(pictures):
        raise PersonalVLMError(f"{len(rois)} regions of interest for {len(pictures)} images; "
                               "give one per image or one for all")
    out = []
    for roi, picture in zip(rois, pictures):
        if roi is not None and len(roi) != 4:
            raise PersonalVLMError("a region of interest is four numbers: x, y, width, height")
        out.append(ego.check_roi(roi, picture.size))
    return out


def encode_reference(vlm: VLMAdapter, encoder, picture) -> ImageTokens:
    """A reference picture's visual tokens, through the frame path's encoder when it takes the
    picture's size (memories and frames then come from the same tower and precision, and
    teaching gets the faster encoder); the model's torch tower otherwise (``encoder`` None)."""
    if encoder is not None:
        try:
            return vlm.encode_image(picture, encoder=encoder)
        except PersonalVLMError as exc:     # e.g. an encoder exported for one image size only
            log.info("reference encoded with the torch tower: %s", exc)
    return vlm.encode_image(picture)


@dataclass
class _Request:
    """A teach call, checked: what is taught, and what the concept already has when views are added."""

    name: str
    category: str
    pictures: list
    rois: list
    previous: ConceptRecord | None      # the concept being given more views, else None
    old_pictures: list                  # its stored reference pictures


class Teacher:
    """Ego concept introduction into the store and the bank, one teaching at a time."""

    def __init__(self, vlm: VLMAdapter, store: ConceptStore, bank: ConceptBank,
                 introduction: ego.IntroductionOptions, encode: Callable[[object], ImageTokens],
                 background: Executor, progress: Callable[[str], None],
                 text_similarity: r2p.ImageTextSimilarity | None = None):
        self.vlm, self.store, self.bank = vlm, store, bank
        self.introduction = introduction
        self.encode = encode
        self.background = background
        self.progress = progress
        self.text_similarity = text_similarity
        self.prompts = None              # icpt_prompts.ConceptPrompts: ICPT's prompt stored beside the memory
        self._lock = threading.Lock()

    def teach(self, name: str, images: list, category: str = "", rois=None,
              overwrite: bool = False, add: bool = False) -> TeachResult:
        """Ego concept introduction; the concept is usable when this returns.

        ``add``: the images are further views of an existing concept: only they are introduced, and
        their memory tokens are appended to the concept's (its fingerprint is kept).
        """
        t0 = time.perf_counter()
        request = self._check(name, images, category, rois, overwrite, add)
        name, category, previous = request.name, request.category, request.previous
        with self._lock:
            t1 = time.perf_counter()
            tokens = [self.encode(picture) for picture in request.pictures]
            t_encode = time.perf_counter() - t1
            intro = ego.introduce(self.vlm, tokens, name, category, self.introduction, rois=request.rois,
                                  progress=self.progress if len(request.pictures) > 1 else None)
            now = time.time()
            timings = {"encode": t_encode, **intro.timings}
            extra = {"rois": [list(r) if r else None for r in request.rois],
                     "areas": [i.area for i in intro.images], "area_from": [i.area_from for i in intro.images],
                     "answers": [i.answer[:500] for i in intro.images],
                     "layers": list(self.introduction.layers)}     # Ego's layers that picked the memory
            memory, keywords = intro.memory, intro.keywords
            if self.text_similarity is not None:
                extra["reference_embeddings"] = self._reference_embeddings(request)
            if self.prompts is not None and previous is None:
                memory, timings["icpt"] = self.prompts.attach(memory, tokens, name)
            if previous is not None:            # (its ICPT prompt is made again from every view when next needed)
                memory = ego.append_views(self.bank.stored_memory(name), memory)
                keywords = list(dict.fromkeys(previous.keywords + intro.keywords))[:12]
                extra = {**previous.extra, **extra,
                         **{k: list(previous.extra.get(k) or [None] * len(request.old_pictures)) + extra[k]
                            for k in ("rois", "areas", "area_from", "answers")}}
            record = ConceptRecord(
                name=name, category=category, keywords=keywords,
                fingerprint=previous.fingerprint if previous else {},
                fingerprint_complete=previous.fingerprint_complete if previous else None,
                memory_tokens=int(memory["memory"].shape[0]),
                model_identity=self.vlm.identity, created=previous.created if previous else now,
                updated=now, extra=extra)
            t2 = time.perf_counter()
            self.bank.add(record, memory, request.old_pictures + request.pictures,
                          overwrite=overwrite or previous is not None)
            timings["store"] = time.perf_counter() - t2
        seconds = time.perf_counter() - t0
        timings["usable"] = seconds
        if previous is not None and previous.fingerprint_complete is not None:
            future: Future = Future()
            future.set_result(previous.fingerprint)
        else:
            future = self.background.submit(self._complete_fingerprint, name, tokens[0], category,
                                            record.created, t0, timings)
        return TeachResult(name, record.memory_tokens, keywords, seconds, timings, future)

    def _check(self, name: str, images: list, category: str, rois, overwrite: bool, add: bool) -> _Request:
        """Everything a caller can get wrong, refused before the model runs."""
        name = self.store.check_new_name(name)
        if add and overwrite:
            raise PersonalVLMError("pass add (more views) or overwrite (replace), not both")
        category = validate_category(category or "")
        if len(category) > MAX_CATEGORY_CHARS:
            raise PersonalVLMError(f"category is over {MAX_CATEGORY_CHARS} characters")
        if not images:
            raise PersonalVLMError("teaching needs at least one reference image")
        previous = None
        if add and name in self.store:
            previous = self.store.get(name)
            category = category or previous.category
        elif name in self.store and not overwrite:
            raise PersonalVLMError(f"a concept named {name!r} already exists; pass overwrite to replace it, "
                                   "or add to give it more views")
        old_pictures = self.store.load_images(name) if previous else []
        if len(images) + len(old_pictures) > MAX_REFERENCE_IMAGES:
            raise PersonalVLMError(f"at most {MAX_REFERENCE_IMAGES} reference images per concept"
                                   + (f"; {name!r} has {len(old_pictures)} already" if previous else ""))
        pictures = [load_image(image, label=f"images[{i}]") for i, image in enumerate(images)]
        return _Request(name, category, pictures, expand_rois(rois, pictures), previous, old_pictures)

    def _reference_embeddings(self, request: _Request) -> dict:
        """R2P's s_VV: the references' contrastive embeddings, computed once, stored with the concept."""
        similarity, previous = self.text_similarity, request.previous
        vectors = [similarity.embed_image(p).tolist() for p in request.pictures]
        old = (previous.extra.get("reference_embeddings") or {}) if previous else {}
        if previous is not None and old.get("model") == similarity.name:
            vectors = old["vectors"] + vectors
        elif previous is not None:
            vectors = [similarity.embed_image(p).tolist() for p in request.old_pictures] + vectors
        return {"model": similarity.name, "vectors": [[round(v, 6) for v in row] for row in vectors]}

    def _complete_fingerprint(self, name, tokens, category, created, t0, timings) -> dict:
        t = time.perf_counter()
        fingerprint = r2p.describe_fingerprint(self.vlm, tokens, name, category)
        timings["fingerprint"] = time.perf_counter() - t
        timings["fingerprint_complete"] = time.perf_counter() - t0
        try:
            self.store.update_fingerprint(name, fingerprint, expected_created=created)
        except PersonalVLMError as exc:                       # forgotten or re-taught meanwhile
            log.info("fingerprint of %r not stored: %s", name, exc)
        return fingerprint
