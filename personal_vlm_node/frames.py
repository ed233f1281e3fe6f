"""The frame path: camera frame → encoder → matcher → decision band → verification → tracker.

It never runs the language model itself. Concepts whose match score falls in the uncertain band
are handed to the verification queue (:mod:`.verification_queue`) as an :class:`UncertainMatch`;
the queue's worker settles each one with the decision cascade (:func:`.r2p.settle_uncertain`:
Ego's in-context check, then R2P when Ego is itself unsure) and its :class:`~.r2p.Verdict` counts
on the frames that follow. The tracker then applies k-of-n hysteresis and smooths the boxes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .errors import PersonalVLMError
from .images import load_image
from .matcher import Matcher, decide
from .options import AssistantOptions
from .profiles import ModelProfile
from .r2p import ImageTextSimilarity, R2PVerifier, Verdict, settle_uncertain
from .store import ConceptStore
from .tracker import Observation, Tracker
from .verification_queue import Request, VerificationQueue
from .vlm import ImageTokens, Memory, VLMAdapter

REFERENCE_CACHE_ENTRIES = 2048    # reference tokens / embeddings kept before the cache starts over: bounds its memory


@dataclass
class Detection:
    name: str
    category: str
    score: float                     # matcher score, or p(yes) when a verifier decided
    source: str                      # "match" | "ego" | "r2p"
    box: tuple[float, float, float, float]   # (x, y, w, h) in source pixels, EMA-smoothed
    track_id: int


@dataclass
class FrameResult:
    detections: list[Detection]
    uncertain: list[str]             # concepts handed to (or waiting on) the verifier this frame
    timings: dict[str, float]        # encode, match, total (seconds)


@dataclass(frozen=True)
class UncertainMatch:
    """One concept the matcher was unsure of on one frame: everything its verification looks at."""

    concept: str
    tokens: ImageTokens              # the frame, encoded (Ego and R2P prompt with it)
    frame: object                    # the frame as given: R2P's image–text scores need its pixels
    scores: Mapping[str, float]      # the matcher's score of every concept on this frame: R2P's candidates


class FrameSettings(Protocol):
    """The settings the frame path reads on every frame (they may change while it runs)."""

    profile: ModelProfile            # context_tokens: the joint prompt's budget
    verification: bool               # settle the uncertain band at all
    r2p_margin: float                # Ego this close to its threshold → R2P
    r2p_pool: int                    # R2P's candidates without a contrastive model
    recognition_threshold: float     # the recognition method's p(yes) that counts as present

    def thresholds(self) -> tuple[float, float]: ...

    def recognition_memory(self, name: str) -> Memory: ...   # Ego's memory or ICPT's prompt

    def joint_size(self) -> int | None: ...


class FramePath:
    """Named detections on camera frames, and the background verification of uncertain ones."""

    def __init__(self, vlm: VLMAdapter, store: ConceptStore, matcher: Matcher, encoder,
                 options: AssistantOptions, settings: FrameSettings, r2p: R2PVerifier,
                 text_similarity: ImageTextSimilarity | None = None):
        self.vlm, self.store, self.matcher, self.encoder = vlm, store, matcher, encoder
        self.settings = settings
        self.r2p = r2p
        self.text_similarity = text_similarity
        self.tracker = Tracker(k=options.tracker_k, n=options.tracker_n)
        self.queue = VerificationQueue(self.verify, max_per_second=options.verifications_per_second,
                                       max_busy_fraction=options.verification_busy_fraction)
        self._lock = threading.Lock()             # tracker state: frame worker vs. forget/teach
        self._reference_cache: dict[tuple, object] = {}     # (name, what, updated) → tokens / embeddings
        self.prefetch = None       # (features, token_boxes) → None: a large library's resident set, before scoring

    # ---- frames -----------------------------------------------------------------------------
    def observe(self, frame, categories: Mapping[str, str]) -> FrameResult:
        """Detections of the concepts in ``categories`` (name → category) on one frame."""
        with self.queue.frame():          # the verifier pauses while this frame is processed
            return self._observe(frame, categories)

    def _observe(self, frame, categories: Mapping[str, str]) -> FrameResult:
        t0 = time.perf_counter()
        tokens = self.vlm.encode_image(frame, encoder=self.encoder)
        t1 = time.perf_counter()
        accept, reject = self.settings.thresholds()
        own = self.settings.concept_accepts()                  # per concept, when concept_thresholds is on
        verification = self.settings.verification
        observations, uncertain = [], []
        if self.prefetch is not None:
            self.prefetch(tokens.features, tokens.token_boxes)
        matches = self.matcher.score(tokens.features, tokens.token_boxes)
        scores = {m.name: m.score for m in matches}          # R2P's candidates, if it runs
        for match in matches:
            decision = decide(match.score, own.get(match.name, accept), reject)
            if decision == "accept":
                observations.append(Observation(match.name, match.score, match.box, "match"))
            elif decision == "uncertain" and verification:
                uncertain.append(match.name)
                verdict = self.queue.submit(match.name, UncertainMatch(match.name, tokens, frame, scores))
                if verdict is not None and verdict.present:
                    observations.append(Observation(match.name, verdict.confidence, match.box, verdict.source))
        t2 = time.perf_counter()
        with self._lock:
            tracks = self.tracker.update(observations, frame_size=tokens.source_size)
        detections = [Detection(t.name, categories.get(t.name, ""), t.score, t.source, t.box, t.track_id)
                      for t in tracks if t.name in categories]
        return FrameResult(detections, uncertain,
                           {"encode": t1 - t0, "match": t2 - t1, "total": time.perf_counter() - t0})

    def observe_settled(self, frame, categories: Mapping[str, str], timeout: float = 300.0) -> FrameResult:
        """:meth:`observe` for a single picture: waits for the verdicts on its uncertain concepts.

        The frame path never waits for the model; one picture has no later frame to carry the
        verdicts, so they are awaited here and the picture observed again with them.
        """
        result = self.observe(frame, categories)
        if not result.uncertain or not self.settings.verification:
            return result
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.queue.result(name) is not None for name in result.uncertain):
                break
            time.sleep(0.05)
        self.tracker.reset()
        settled = self.observe(frame, categories)
        settled.uncertain = [n for n in settled.uncertain if self.queue.result(n) is None]
        return settled

    def forget(self, name: str) -> None:
        """``name`` is no longer matched: end its track and drop its verdicts."""
        with self._lock:
            self.tracker.forget(name)
        self.queue.invalidate(name)

    def invalidate(self, name: str) -> None:
        """``name``'s memory changed: its verdicts are stale."""
        self.queue.invalidate(name)

    # ---- verification -------------------------------------------------------------------------
    def verify(self, request: Request) -> Verdict | None:
        """The cascade (:func:`.r2p.settle_uncertain`) for one uncertain concept on its frame.

        Ego in-context check first; when Ego is itself unsure (p_yes within ``r2p_margin`` of the
        threshold), R2P decides among the frame's best-matching concepts, by the scores the
        matcher gave on that frame. None: the concept was forgotten while it waited.
        """
        case: UncertainMatch = request.payload
        try:
            self.stored_memory(case.concept)
        except PersonalVLMError:
            return None
        settings = self.settings
        verdicts, _ = settle_uncertain(
            self.vlm, case.tokens, [case.concept], settings.recognition_memory,
            threshold=settings.recognition_threshold, margin=settings.r2p_margin, verifier=self.r2p,
            scores=case.scores, fingerprint_of=lambda n: self.store.get(n).fingerprint, pool=settings.r2p_pool,
            image=(lambda: load_image(case.frame)) if self.text_similarity is not None else None,
            embeddings_of=self.reference_embeddings, reference_of=self.reference_tokens,
            joint=settings.joint_size(), budget=settings.profile.context_tokens)
        return verdicts[case.concept]

    def stored_memory(self, name: str) -> dict:
        return self.store.load_memory(name, model=self.vlm.identity)

    def _cached(self, name: str, what: str, compute):
        key = (name, what, self.store.get(name).updated)
        if key not in self._reference_cache:
            if len(self._reference_cache) > REFERENCE_CACHE_ENTRIES:
                self._reference_cache.clear()
            self._reference_cache[key] = compute()
        return self._reference_cache[key]

    def reference_embeddings(self, name: str, model: ImageTextSimilarity | None = None):
        """(R, E) contrastive embeddings of the concept's reference pictures, by ``model`` (default:
        the frame path's own contrastive model); None without one. Stored at teaching; computed (and
        kept in memory) for concepts taught without this model."""
        model = model or self.text_similarity
        if model is None:
            return None
        import torch

        stored = self.store.get(name).extra.get("reference_embeddings") or {}
        what = f"embeddings:{model.name}"
        if stored.get("model") == model.name and stored.get("vectors"):
            return self._cached(name, what, lambda: torch.tensor(stored["vectors"]))
        return self._cached(name, what, lambda: torch.stack(
            [model.embed_image(p) for p in self.store.load_images(name)]).cpu())

    def reference_tokens(self, name: str) -> ImageTokens:
        """The concept's first reference picture, encoded (R2P's pairwise step shows it)."""
        return self._cached(name, "tokens", lambda: self.vlm.encode_image(self.store.load_images(name)[0]))
