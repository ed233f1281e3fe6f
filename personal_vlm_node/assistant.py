"""The one façade every front end uses: teach, recognize, ask, forget, concepts.

The ROS node and the CLI call only this class. It owns the VLM adapter, the concept store, the
model profile and the matcher bank (all concept memories, for the similarity filter), and runs the
slow part of teaching (the R2P fingerprint) on a background thread.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from . import ego, prompts, r2p
from .errors import PersonalVLMError
from .images import load_image
from .matcher import Matcher, decide
from .options import AssistantOptions, check_thresholds
from .output import stderr_progress
from .tracker import Observation, Tracker
from .verifier import Request, VerificationQueue
from .profiles import ModelProfile, load_profile
from .settings import ASSISTANT_LIVE, BY_NAME as SETTINGS_BY_NAME
from .store import ConceptRecord, ConceptStore, ForgetResult, MemoryMissing, validate_category, validate_name
from .vlm import Memory, VLMAdapter, load_vlm

log = logging.getLogger(__name__)

MAX_REFERENCE_IMAGES = 8
MAX_QUESTION_CHARS = 1000


_stderr_progress = stderr_progress()


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


@dataclass
class Recognition:
    name: str
    p_yes: float
    present: bool


@dataclass
class AskResult:
    answer: str
    concepts: list[str]
    seconds: float
    stopped: bool = False            # on_partial ended the answer early (a cancelled request)


def _with_overrides(profile: ModelProfile, options: AssistantOptions) -> ModelProfile:
    """The profile with the options' thresholds and M where they are set, checked together."""
    changes = {name: value for name in ("accept_threshold", "reject_threshold", "max_concepts_in_context")
               if (value := getattr(options, name)) is not None}
    if not changes:
        return profile
    merged = replace(profile, **changes)
    problem = check_thresholds(merged.accept_threshold, merged.reject_threshold)
    if problem:
        raise PersonalVLMError(f"invalid settings: {problem}")
    return merged


def _frame_encoder(vlm: VLMAdapter, options: AssistantOptions, progress):
    """The frame path's vision encoder for ``options.backend``; None = the model's torch tower."""
    if options.backend == "torch":
        return None
    if options.backend == "auto":
        from .runtime.auto import auto_encoder

        return auto_encoder(vlm, cache_dir=options.engine_cache, progress=progress)
    try:
        from .runtime import make_encoder
    except ImportError as exc:
        raise PersonalVLMError(f"encoder backend {options.backend} is not available in this installation "
                               f"({exc}); use torch") from exc
    return make_encoder(vlm, options.backend, cache_dir=options.engine_cache, progress=progress)


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


def _install_yield_points(vlm: VLMAdapter, yield_point) -> list:
    """Call ``yield_point`` before every linear layer of the language model and its head.

    A verification (a language-model pass on the verifier's thread) then pauses within
    milliseconds when a frame starts encoding; on other threads the call returns at once.
    """
    modules = [m for m in vlm.language_model.modules() if isinstance(m, torch.nn.Linear)]
    head = getattr(vlm.model, "lm_head", None)
    if isinstance(head, torch.nn.Linear):
        modules.append(head)
    return [m.register_forward_pre_hook(lambda module, args: yield_point()) for m in modules]


class Assistant:
    """Construct with :meth:`open` (model id or folder) or from a loaded adapter and a store.

    ``options`` (:class:`AssistantOptions`) says how it runs; keyword arguments named like its
    fields override single options. ``encoder`` injects a ready frame-path encoder callable.
    """

    def __init__(self, vlm: VLMAdapter, store: ConceptStore, profile: ModelProfile | None = None,
                 progress=_stderr_progress, rebuild: bool = True, encoder=None,
                 options: AssistantOptions | None = None, **overrides):
        options = replace(options or AssistantOptions(), **overrides)
        options.check()
        self.options = options
        self.vlm = vlm
        self.store = store
        profile = profile or load_profile(vlm.model_id)
        # The profile as loaded, before any override: configure(<setting>=None) returns to it.
        self._profile_as_loaded = replace(profile)
        self.profile = _with_overrides(profile, options)
        self.layers = self.profile.resolved_layers(vlm.num_layers)
        self.introduction = ego.IntroductionOptions.from_profile(self.profile, self.layers)
        vlm.memory_layout = self.profile.memory_layout
        vlm.max_image_pixels = self.profile.max_image_pixels
        self.progress = progress or (lambda message: None)
        self.matcher = Matcher()
        # None = the model's torch vision tower.
        self.encoder = encoder if encoder is not None else _frame_encoder(vlm, options, self.progress)
        self.tracker = Tracker(k=options.tracker_k, n=options.tracker_n)
        self.verification = options.verification
        self.verifier = VerificationQueue(self._verify_uncertain, max_per_second=options.verifications_per_second,
                                          max_busy_fraction=options.verification_busy_fraction)
        self._yield_hooks = []
        self._categories: dict[str, str] = {}
        # R2P settles what Ego itself is unsure of (|p_yes - threshold| < r2p_margin).
        self.text_similarity = (r2p.ImageTextSimilarity(options.verifier_model, device=str(vlm.device))
                                if options.verifier_model else None)
        self.r2p = r2p.R2PVerifier(vlm, self.text_similarity, top_k=options.r2p_top_k)
        # None: the profile's (calibrated) margin.
        self.r2p_margin = self.profile.r2p_margin if options.r2p_margin is None else options.r2p_margin
        self.r2p_pool = options.r2p_pool
        self._reference_cache: dict[tuple, object] = {}     # (name, what, updated) → tokens / embeddings
        if self.verification:
            self._yield_hooks = _install_yield_points(vlm, self.verifier.yield_point)
            self.verifier.start()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint")
        self._teach_lock = threading.Lock()
        self._frame_lock = threading.Lock()      # tracker state: frame worker vs. forget/teach
        self._bank_lock = threading.Lock()       # the bank's versions: the store watcher vs. teach/forget
        self._bank_versions: dict[str, str] = {}  # name → id of the memory in the matcher
        self.unmatched: set[str] = set()          # concepts with no memory for this model
        self.damaged: dict[str, str] = {}         # concepts left out because their files are damaged → why
        self._rebuild = rebuild
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self.bank_listeners: list = []            # called (no arguments) whenever the bank of concepts changed
        self._watcher = store.watch()
        if rebuild:
            self.rebuild_stale_memories()
        self._load_bank()

    @classmethod
    def open(cls, model: str, store_dir=None, device: str = "auto", dtype: str = "auto",
             profile_path=None, progress=_stderr_progress, options: AssistantOptions | None = None,
             **overrides) -> Assistant:
        """Load the model (HF id or folder) and the store; rebuild memories of another model.

        ``options`` (:class:`AssistantOptions`): encoder backend and engine cache, threshold and
        M overrides, verification and its verifier model, R2P margin, tracker k-of-n. Keyword
        arguments (``rebuild``, ``encoder`` or an option's name) go to the constructor.
        """
        (options or AssistantOptions()).check()         # before the model loads: the cheap mistakes
        profile = load_profile(model, profile_path)
        store = ConceptStore(store_dir)
        if progress:
            progress(f"loading {model} ({device}, {dtype})…")
        vlm = load_vlm(model, device=device, dtype=dtype)
        return cls(vlm, store, profile, progress=progress, options=options, **overrides)

    def close(self, wait: bool = True) -> None:
        """Stop the background work. ``wait=False`` (shutdown) interrupts running generations
        and drops pending fingerprints instead of finishing them."""
        if not wait:
            self.vlm.interrupt()
        self._watch_stop.set()
        if self._watch_thread is not None and self._watch_thread is not threading.current_thread():
            self._watch_thread.join(5.0)
        if self._watch_thread is None or not self._watch_thread.is_alive():
            self._watcher.close()
        self.verifier.stop()
        self._remove_yield_points()
        self._background.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- concept memory -----------------------------------------------------------------------
    def _load_bank(self) -> None:
        """Load this model's memory of every concept into the matcher; others are never matched."""
        with self._bank_lock:
            self._watcher.changed()            # what is loaded now is current
            versions = self.store.memory_versions(self.vlm.fingerprint)
            bank = {}
            for record in self.store.list():
                self._categories[record.name] = record.category
                if record.name not in versions:
                    continue
                try:
                    bank[record.name] = self._checked_memory(record.name)
                except MemoryMissing:
                    versions.pop(record.name)
                except PersonalVLMError as exc:
                    self._set_damaged(record.name, exc)
                    versions.pop(record.name)
            self.matcher.set_concepts(bank)
            self._bank_versions = versions
            self._report_unmatched(set(self._categories) - set(bank) - set(self.damaged))

    def reload(self) -> None:
        """Load the bank again from the store (after memories were rebuilt)."""
        self._load_bank()

    def stored_memory(self, name: str) -> dict:
        """This model's stored memory of ``name``: the tokens and their layout (positions, grids);
        MemoryMissing when it has none."""
        return self.store.load_memory(name, model=self.vlm.fingerprint)

    def memory(self, name: str):
        """This model's memory of ``name`` (K_c, D); MemoryMissing when it has none."""
        return self.stored_memory(name)["memory"]

    def _checked_memory(self, name: str):
        """:meth:`memory`, refused as damage unless it is a (K_c, D) tensor of this model's size.

        The store already refuses unreadable files and non-finite values; this catches a memory
        file that reads but cannot be matched, so one bad concept never stops the others.
        """
        try:
            memory = self.memory(name)
        except KeyError as exc:
            raise PersonalVLMError(f"concept {name!r} is damaged: its memory file has no {exc} tensor; "
                                   "forget it and teach it again") from exc
        if memory.ndim != 2 or memory.shape[0] == 0 or memory.shape[1] != self.vlm.hidden_size:
            raise PersonalVLMError(
                f"concept {name!r} is damaged: its memory has shape {tuple(memory.shape)}, not (K, "
                f"{self.vlm.hidden_size}) as this model's; forget it and teach it again")
        return memory

    def _set_damaged(self, name: str, exc: PersonalVLMError) -> None:
        """Leave ``name`` out of recognition, saying so once per distinct reason."""
        reason = str(exc)
        if self.damaged.get(name) != reason:
            log.warning("%s (it is not recognised until then; the other concepts are)", reason)
        self.damaged[name] = reason

    def _report_unmatched(self, names: set[str]) -> None:
        for name in sorted(names - self.unmatched):
            log.warning("concept %r has no memory for %s and is not matched until it is rebuilt "
                        "or taught again", name, self.vlm.model_id)
        self.unmatched = set(names)

    def refresh(self) -> bool:
        """Follow changes other processes made to the store; True when the bank changed.

        One cheap query when nothing changed. A concept taught elsewhere becomes matchable, a
        forgotten one stops being detected at once, a re-taught one is reloaded; a concept with no
        memory for this model is reported (and rebuilt in the background when rebuilding is on).
        """
        if not self._watcher.changed():
            return False
        with self._bank_lock:
            versions = self.store.memory_versions(self.vlm.fingerprint)
            records = {r.name: r for r in self.store.list()}
            changed = False
            for name in list(self._bank_versions):
                if name not in versions:
                    self._drop(name)
                    changed = True
            for name in list(self.damaged):
                if name not in versions:
                    self.damaged.pop(name)
            for name, version in versions.items():
                if self._bank_versions.get(name) == version:
                    continue
                try:
                    memory = self._checked_memory(name)
                except MemoryMissing as exc:          # changed again meanwhile: the next check sees it
                    log.info("%s", exc)
                    continue
                except PersonalVLMError as exc:
                    if name in self._bank_versions:   # a damaged new version replaces the old one
                        self._drop(name)
                        changed = True
                    self._set_damaged(name, exc)
                    continue
                self.damaged.pop(name, None)
                self.matcher.add(name, memory)
                self.verifier.invalidate(name)
                self._bank_versions[name] = version
                changed = True
            for name in list(self._categories):
                if name not in records:
                    self._categories.pop(name, None)
            for name, record in records.items():
                self._categories[name] = record.category
            missing = set(records) - set(versions)
            newly_missing = missing - self.unmatched
            self._report_unmatched(missing)
        if newly_missing and self._rebuild:
            self._background.submit(self.rebuild_stale_memories)
        if changed:
            self._bank_changed()
        return changed

    def _drop(self, name: str) -> None:
        self.matcher.remove(name)
        with self._frame_lock:
            self.tracker.forget(name)
        self.verifier.invalidate(name)
        self._bank_versions.pop(name, None)

    def _bank_changed(self) -> None:
        """Tell :attr:`bank_listeners` that the concepts matched against changed (teach, forget, or
        another process's change seen by :meth:`refresh`)."""
        for listener in list(self.bank_listeners):
            listener()

    def watch_store(self, period: float = 0.2) -> None:
        """Check the store for other processes' changes every ``period`` s on a thread of its own."""
        def run():
            while not self._watch_stop.wait(period):
                try:
                    self.refresh()
                except Exception:             # a damaged row must not end the watching
                    log.exception("checking the concept store for changes failed")

        if self._watch_thread is None:
            self._watch_thread = threading.Thread(target=run, name="store-watcher", daemon=True)
            self._watch_thread.start()

    def rebuild_stale_memories(self) -> list[str]:
        """Rebuild, from the stored reference images, every memory missing for this model.

        Memories of this model in another precision are cast when used, not rebuilt.
        """
        have = self.store.memory_versions(self.vlm.fingerprint)
        stale = [r for r in self.store.list() if r.name not in have]
        for i, record in enumerate(stale):
            self.progress(f"rebuilding the memory of {record.name!r} for this model ({i + 1}/{len(stale)})")
            try:
                images = self.store.load_images(record.name)
                tokens = [self.encode_reference(image) for image in images]
                intro = ego.introduce(self.vlm, tokens, record.name, record.category, self.introduction,
                                      rois=record.extra.get("rois"))
                self.store.replace_memory(record.name, intro.memory, self.vlm.fingerprint,
                                          intro.memory_tokens, extra={**record.extra, "rebuilt": time.time()})
            except PersonalVLMError as exc:
                self.progress(f"could not rebuild {record.name!r}: {exc}; it is not matched with this model")
        return [r.name for r in stale]

    # ---- teaching -------------------------------------------------------------------------
    def encode_reference(self, picture):
        """A reference picture's visual tokens, through the frame path's encoder when it takes the
        picture's size (memories and frames then come from the same tower and precision, and
        teaching gets the faster encoder); the model's torch tower otherwise."""
        if self.encoder is not None:
            try:
                return self.vlm.encode_image(picture, encoder=self.encoder)
            except PersonalVLMError as exc:     # e.g. an encoder exported for one image size only
                log.info("reference encoded with the torch tower: %s", exc)
        return self.vlm.encode_image(picture)

    def teach(self, name: str, images: list, category: str = "", rois=None,
              overwrite: bool = False, add: bool = False) -> TeachResult:
        """Ego concept introduction; the concept is usable when this returns.

        ``add``: the images are further views of an existing concept: only they are introduced, and
        their memory tokens are appended to the concept's (its fingerprint is kept).
        """
        t0 = time.perf_counter()
        name = self.store.check_new_name(name)
        if add and overwrite:
            raise PersonalVLMError("pass add (more views) or overwrite (replace), not both")
        category = validate_category(category or "")
        if len(category) > 64:
            raise PersonalVLMError("category is over 64 characters")
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
        rois = expand_rois(rois, pictures)
        with self._teach_lock:
            t1 = time.perf_counter()
            tokens = [self.encode_reference(picture) for picture in pictures]
            t_encode = time.perf_counter() - t1
            intro = ego.introduce(self.vlm, tokens, name, category, self.introduction,
                                  rois=rois, progress=self.progress if len(pictures) > 1 else None)
            now = time.time()
            timings = {"encode": t_encode, **intro.timings}
            extra = {"rois": [list(r) if r else None for r in rois],
                     "areas": [i.area for i in intro.images],
                     "answers": [i.answer[:500] for i in intro.images]}
            memory, keywords = intro.memory, intro.keywords
            if self.text_similarity is not None:
                # R2P's s_VV: the references' contrastive embeddings, computed once, stored with the concept.
                vectors = [self.text_similarity.embed_image(p).tolist() for p in pictures]
                old = (previous.extra.get("reference_embeddings") or {}) if previous else {}
                if previous is not None and old.get("model") == self.text_similarity.name:
                    vectors = old["vectors"] + vectors
                elif previous is not None:
                    vectors = [self.text_similarity.embed_image(p).tolist() for p in old_pictures] + vectors
                extra["reference_embeddings"] = {"model": self.text_similarity.name,
                                                 "vectors": [[round(v, 6) for v in row] for row in vectors]}
            if previous is not None:
                memory = ego.append_views(self.stored_memory(name), memory)
                keywords = list(dict.fromkeys(previous.keywords + intro.keywords))[:12]
                extra = {**previous.extra, **extra,
                         **{k: list(previous.extra.get(k) or [None] * len(old_pictures)) + extra[k]
                            for k in ("rois", "areas", "answers")}}
            record = ConceptRecord(
                name=name, category=category, keywords=keywords,
                fingerprint=previous.fingerprint if previous else {},
                fingerprint_complete=previous.fingerprint_complete if previous else None,
                memory_tokens=int(memory["memory"].shape[0]),
                model_fingerprint=self.vlm.fingerprint, created=previous.created if previous else now,
                updated=now, extra=extra)
            t2 = time.perf_counter()
            self.add_concept(record, memory, old_pictures + pictures, overwrite=overwrite or previous is not None)
            timings["store"] = time.perf_counter() - t2
        seconds = time.perf_counter() - t0
        timings["usable"] = seconds
        if previous is not None and previous.fingerprint_complete is not None:
            future: Future = Future()
            future.set_result(previous.fingerprint)
        else:
            future = self._background.submit(self._complete_fingerprint, name, tokens[0], category,
                                             record.created, t0, timings)
        return TeachResult(name, record.memory_tokens, keywords, seconds, timings, future)

    def add_concept(self, record: ConceptRecord, memory: dict, pictures: list, overwrite: bool = False) -> None:
        """Store a concept whose memory is already built and make it matchable at once."""
        with self._bank_lock:
            self.store.add(record, memory, pictures, overwrite=overwrite)
            self.matcher.add(record.name, memory["memory"])
            self._categories[record.name] = record.category
            self.verifier.invalidate(record.name)
            self._bank_versions[record.name] = self.store.memory_versions(self.vlm.fingerprint).get(record.name, "")
        self._bank_changed()

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

    # ---- using concepts ---------------------------------------------------------------------
    def _memories(self, names: list[str], skip_gone: bool = False) -> list[Memory]:
        """This model's memories of ``names``. ``skip_gone``: leave out concepts forgotten (or left
        without a memory for this model) since the similarity filter ranked them."""
        memories = []
        for n in names:
            try:
                memories.append(Memory.from_stored(self.stored_memory(n), n))
            except PersonalVLMError:
                if not skip_gone:
                    raise
                log.info("concept %r left out: forgotten or not rebuilt for this model", n)
        return memories

    def candidates(self, tokens, limit: int) -> list[str]:
        """Similarity filter: the ``limit`` concepts whose memories best match the image's tokens."""
        if limit <= 0 or len(self.matcher) == 0:
            return []
        return [m.name for m in self.matcher.score(tokens.features, tokens.token_boxes, top=limit)]

    def recognize(self, image, names: list[str] | None = None) -> list[Recognition]:
        """Ego in-context recognition of ``names`` (default: the similarity filter's top-M)."""
        tokens = self.vlm.encode_image(image)
        if names is None:
            names = self.candidates(tokens, max(1, self.profile.max_concepts_in_context))
        else:
            names = [validate_name(n) for n in names]
            for n in names:
                self.store.get(n)
        joint, matched = self.joint_size(), {}
        if joint is not None and len(self.matcher):
            matched = {m.name: m.score for m in self.matcher.score(tokens.features, tokens.token_boxes)}
        scores = ego.p_yes(self.vlm, tokens, names, lambda n: self._memories([n])[0], joint, matched)
        threshold = self.profile.recognize_threshold
        results = [Recognition(n, p, p >= threshold) for n, p in scores.items()]
        return sorted(results, key=lambda r: -r.p_yes)

    def ask(self, question: str, image, on_partial=None) -> AskResult:
        """Answer about ``image``; only the top-M matching concepts enter the prompt.

        ``on_partial(answer_so_far)`` is called after each generated token; returning False stops
        the answer there (``AskResult.stopped``).
        """
        t0 = time.perf_counter()
        question = (question or "").strip()
        if not question:
            raise PersonalVLMError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise PersonalVLMError(f"the question is over {MAX_QUESTION_CHARS} characters")
        tokens = self.vlm.encode_image(image)
        names = self.candidates(tokens, self.profile.max_concepts_in_context)
        memories = self._memories(names, skip_gone=True)
        parts = prompts.ask(memories, tokens, question, self.vlm.family)
        generation = self.vlm.generate(parts, max_new_tokens=128, on_text=on_partial)
        return AskResult(generation.text, [m.name for m in memories], time.perf_counter() - t0, generation.stopped)

    def forget(self, name: str) -> ForgetResult:
        """Forget ``name`` everywhere; the result names any folder that could not be removed."""
        name = validate_name(name)
        with self._bank_lock:
            result = self.store.forget(name)
            self._drop(name)
            self._categories.pop(name, None)
            self.unmatched.discard(name)
            self.damaged.pop(name, None)
        if result.left_behind:
            log.warning("%s", result.message)
        self._bank_changed()
        return result

    def concepts(self) -> list[ConceptRecord]:
        return self.store.list()

    def check_name(self, name: str) -> str:
        """The concept name as stored, or PersonalVLMError saying what is wrong with it (a look-alike
        of an existing concept's name included)."""
        return self.store.check_new_name(name)

    # ---- settings that may change while running ----------------------------------------------
    def configure(self, **changes) -> None:
        """Change settings while running: any of :data:`personal_vlm_node.settings.ASSISTANT_LIVE`
        (``accept_threshold``, ``reject_threshold``, ``max_concepts_in_context``, ``verification``,
        ``r2p_margin``) by name.

        None or a negative number returns a setting to the model profile's value; a setting not
        named keeps its current one. Everything is checked before anything applies (each value's
        range, and reject_threshold below accept_threshold), so a refused change changes nothing.
        """
        values = self.configuration_after(**changes)
        self.profile.accept_threshold = values["accept_threshold"]
        self.profile.reject_threshold = values["reject_threshold"]
        self.profile.max_concepts_in_context = values["max_concepts_in_context"]
        self.r2p_margin = values["r2p_margin"]
        self._set_verification(values["verification"])

    def configuration(self) -> dict:
        """The live settings' current values, by name."""
        return {"accept_threshold": self.profile.accept_threshold, "reject_threshold": self.profile.reject_threshold,
                "max_concepts_in_context": self.profile.max_concepts_in_context,
                "verification": self.verification, "r2p_margin": self.r2p_margin}

    def configuration_after(self, **changes) -> dict:
        """What :meth:`configure` would set for ``changes``, checked; PersonalVLMError says why not."""
        unknown = sorted(set(changes) - set(ASSISTANT_LIVE))
        if unknown:
            raise PersonalVLMError(f"{', '.join(unknown)} cannot change while running; "
                                   f"these can: {', '.join(ASSISTANT_LIVE)}")
        values = self.configuration()
        for name, value in changes.items():
            setting = SETTINGS_BY_NAME[name]
            if setting.kind in (int, float) and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PersonalVLMError(f"{name} must be a number, got {value!r}")
            if setting.follows_profile and (value is None or value < 0):
                value = getattr(self._profile_as_loaded, setting.profile_key)
            else:
                if setting.kind is int and int(value) != value:
                    raise PersonalVLMError(f"{name} must be a whole number, got {value!r}")
                problem = setting.problem(value, bounded=setting.bounded_in_library)
                if problem:
                    raise PersonalVLMError(f"{problem}, got {value!r}")
            values[name] = setting.kind(value)
        problem = check_thresholds(values["accept_threshold"], values["reject_threshold"])
        if problem:
            raise PersonalVLMError(problem)
        return values

    def joint_size(self, recognition: str | None = None) -> int | None:
        """Memories in one joint Ego prompt (``recognition: joint``: the top-M), None per concept.
        ``recognition``: that choice instead of the profile's (eval compares the two)."""
        if (recognition or self.profile.recognition) != "joint":
            return None
        return max(1, self.profile.max_concepts_in_context)

    def _set_verification(self, enabled: bool) -> None:
        """Settle uncertain matches with the model (starts or stops the verification worker)."""
        enabled = bool(enabled)
        if enabled == self.verification:
            return
        self.verification = enabled
        if enabled:
            self._yield_hooks = _install_yield_points(self.vlm, self.verifier.yield_point)
            self.verifier.start()
        else:
            self.verifier.stop()
            self._remove_yield_points()
            self.verifier.invalidate(lambda key: True)

    def _remove_yield_points(self) -> None:
        for handle in self._yield_hooks:
            handle.remove()
        self._yield_hooks = []

    # ---- what a front end reads ---------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        """What is loaded, as a front end reports it: model, family, device, dtype, store folder."""
        return {"model": str(self.vlm.model_id), "family": str(self.vlm.family), "device": str(self.vlm.device),
                "dtype": str(self.vlm.dtype).replace("torch.", ""), "store": str(self.store.root)}

    def knows(self, name: str) -> bool:
        """Whether a concept of this name is taught (as the store has it, whatever this model's memory)."""
        return name in self.store

    # ---- the frame path ---------------------------------------------------------------------
    def thresholds(self) -> tuple[float, float]:
        return self.profile.accept_threshold, self.profile.reject_threshold

    def observe(self, frame) -> FrameResult:
        """Named detections on one camera frame. Never runs the language model.

        Encoder → late-interaction scores of every memory → accept / uncertain / reject. Uncertain
        concepts go to the verification queue (Ego in-context check, on a budget, cached per
        concept); a fresh verdict from it counts on this frame, a pending one does not wait.
        The tracker then applies k-of-n hysteresis and smooths the boxes.
        """
        with self.verifier.frame():          # the verifier pauses while this frame is processed
            return self._observe(frame)

    def _observe(self, frame) -> FrameResult:
        t0 = time.perf_counter()
        tokens = self.vlm.encode_image(frame, encoder=self.encoder)
        t1 = time.perf_counter()
        accept, reject = self.thresholds()
        observations, uncertain = [], []
        matches = self.matcher.score(tokens.features, tokens.token_boxes)
        scores = {m.name: m.score for m in matches}          # R2P's candidates, if it runs
        for match in matches:
            decision = decide(match.score, accept, reject)
            if decision == "accept":
                observations.append(Observation(match.name, match.score, match.box, "match"))
            elif decision == "uncertain" and self.verification:
                uncertain.append(match.name)
                verdict = self.verifier.submit(match.name, (tokens, match.name, frame, scores))
                if verdict is not None and verdict["present"]:
                    observations.append(Observation(match.name, verdict["p_yes"], match.box, verdict["source"]))
        t2 = time.perf_counter()
        with self._frame_lock:
            tracks = self.tracker.update(observations, frame_size=tokens.source_size)
        detections = [Detection(t.name, self._categories.get(t.name, ""), t.score, t.source, t.box, t.track_id)
                      for t in tracks if t.name in self._categories]
        return FrameResult(detections, uncertain,
                           {"encode": t1 - t0, "match": t2 - t1, "total": time.perf_counter() - t0})

    def observe_settled(self, frame, timeout: float = 300.0) -> FrameResult:
        """``observe`` for a single picture: waits for the verdicts on its uncertain concepts.

        The frame path never waits for the model; one picture has no later frame to carry the
        verdicts, so they are awaited here and the picture observed again with them.
        """
        result = self.observe(frame)
        if not result.uncertain or not self.verification:
            return result
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.verifier.result(name) is not None for name in result.uncertain):
                break
            time.sleep(0.05)
        self.tracker.reset()
        settled = self.observe(frame)
        settled.uncertain = [n for n in settled.uncertain if self.verifier.result(n) is None]
        return settled

    def _cached(self, name: str, what: str, compute):
        key = (name, what, self.store.get(name).updated)
        if key not in self._reference_cache:
            if len(self._reference_cache) > 4 * MAX_REFERENCE_IMAGES * 64:
                self._reference_cache.clear()
            self._reference_cache[key] = compute()
        return self._reference_cache[key]

    def reference_embeddings(self, name: str, model=None):
        """(R, E) contrastive embeddings of the concept's reference pictures, by ``model`` (default:
        the assistant's own contrastive model); None without one. Stored at teaching; computed (and
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

    def reference_tokens(self, name: str):
        """The concept's first reference picture, encoded (R2P's pairwise step shows it)."""
        return self._cached(name, "tokens", lambda: self.vlm.encode_image(self.store.load_images(name)[0]))

    def _verify_uncertain(self, request: Request) -> dict | None:
        """The cascade (:func:`r2p.settle_uncertain`) for one uncertain concept on its frame.

        Ego in-context check first; when Ego is itself unsure (p_yes within ``r2p_margin`` of the
        threshold), R2P decides among the frame's best-matching concepts, by the scores the
        matcher gave on that frame.
        """
        tokens, name, frame, scores = request.payload
        try:
            self.stored_memory(name)
        except PersonalVLMError:
            return None                    # forgotten while queued
        verdicts, result = r2p.settle_uncertain(
            self.vlm, tokens, [name], lambda n: Memory.from_stored(self.stored_memory(n), n),
            threshold=self.profile.recognize_threshold, margin=self.r2p_margin, verifier=self.r2p,
            scores=scores, fingerprint_of=lambda n: self.store.get(n).fingerprint, pool=self.r2p_pool,
            image=(lambda: load_image(frame)) if self.text_similarity is not None else None,
            embeddings_of=self.reference_embeddings, reference_of=self.reference_tokens,
            joint=self.joint_size())
        verdict = verdicts[name]
        if result is None:
            return {"present": verdict.present, "p_yes": verdict.p_yes, "source": "ego"}
        return {"present": verdict.present, "p_yes": verdict.p_yes if verdict.score is None else verdict.score,
                "source": "r2p", "r2p": result.stages}
