"""The one façade every front end uses: teach, recognize, ask, observe, forget, concepts.

The ROS node and the CLI call only this class. It owns the VLM adapter, the concept store and the
model profile, and hands each job to the part that does it: the :class:`~.bank.ConceptBank` keeps
the matcher's memories in step with the store, the :class:`~.teaching.Teacher` introduces
concepts (the R2P fingerprint on a background thread), and the :class:`~.frames.FramePath` turns
camera frames into named detections, verifying uncertain ones in the background.
"""

from __future__ import annotations

import logging
import time

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from . import ego, prompts, r2p
from .assistant_calibration import SelfCalibrating
from .assistant_icpt import WithICPT
from .bank import ConceptBank
from .errors import PersonalVLMError
from .frames import Detection, FramePath, FrameResult
from .matcher import Matcher
from .options import AssistantOptions, check_thresholds
from .output import stderr_progress
from .profiles import ModelProfile, load_profile
from .settings import ASSISTANT_LIVE, BY_NAME as SETTINGS_BY_NAME
from .store import ConceptLibrary, ConceptRecord, ForgetResult, open_library, validate_name
from .teaching import MAX_REFERENCE_IMAGES, Teacher, TeachResult, encode_reference, expand_rois
from .vlm import ImageTokens, Memory, VLMAdapter, load_vlm

log = logging.getLogger(__name__)

# Front ends import these from here, beside the façade that returns them.
__all__ = ["MAX_QUESTION_CHARS", "MAX_REFERENCE_IMAGES", "AskResult", "Assistant", "Detection", "FrameResult",
           "Recognition", "TeachResult", "expand_rois"]

MAX_QUESTION_CHARS = 1000


_stderr_progress = stderr_progress()


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


class Assistant(SelfCalibrating, WithICPT):
    """Construct with :meth:`open` (model id or folder) or from a loaded adapter and a store.

    ``options`` (:class:`AssistantOptions`) says how it runs; keyword arguments named like its
    fields override single options. ``encoder`` injects a ready frame-path encoder callable.
    ``warn_to`` gets each warning (one line; default: ``progress``), which ``warnings`` keeps.
    """

    def __init__(self, vlm: VLMAdapter, store: ConceptLibrary, profile: ModelProfile | None = None,
                 progress=_stderr_progress, rebuild: bool = True, encoder=None,
                 options: AssistantOptions | None = None, warn_to=None, **overrides):
        options = replace(options or AssistantOptions(), **overrides)
        options.check()
        self.options = options
        self.vlm = vlm
        self.store = store
        profile = profile or load_profile(vlm.model_id)
        self.warnings: list[str] = []

        def warn(message: str) -> None:
            self.warnings.append(message)
            (warn_to or self.progress)(message if warn_to else f"warning: {message}")

        self.progress = progress or (lambda message: None)
        self._warn = warn
        # A checkpoint calibrated automatically before (autocalibration): its cached measurements.
        self.calibration_file = None
        self._calibration = None
        profile = self._with_cached_calibration(vlm, profile, options)
        # The profile as loaded, before any override: configure(<setting>=None) returns to it.
        self._profile_as_loaded = replace(profile)
        self.profile = _with_overrides(profile, options)
        self.layers = self.profile.resolved_layers(vlm.num_layers)
        self.introduction = ego.IntroductionOptions.from_profile(self.profile, self.layers)
        vlm.memory_layout = self.profile.memory_layout
        vlm.max_image_pixels = self.profile.max_image_pixels
        self.matcher = Matcher()
        # None = the model's torch vision tower.
        self.encoder = encoder if encoder is not None else _frame_encoder(vlm, options, self.progress)
        self.verification = options.verification
        self._yield_hooks = []
        # R2P settles what Ego itself is unsure of (|p_yes - threshold| < r2p_margin).
        # A contrastive model whose weights cannot be had is one warning, and R2P works without it.
        self.text_similarity = r2p.load_text_similarity(options.verifier_model, str(vlm.device), warn)
        self.r2p = r2p.R2PVerifier(vlm, self.text_similarity, top_k=options.r2p_top_k)
        # None: the profile's (calibrated) margin.
        self.r2p_margin = self.profile.r2p_margin if options.r2p_margin is None else options.r2p_margin
        self.r2p_pool = options.r2p_pool
        self.frames = FramePath(vlm, store, self.matcher, self.encoder, options, settings=self, r2p=self.r2p,
                                text_similarity=self.text_similarity)
        if self.verification:
            self._yield_hooks = vlm.call_before_every_layer(self.verifier.yield_point)
            self.verifier.start()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint")
        self.bank = ConceptBank(store, vlm, self.matcher, self.frames, self.introduction, self.encode_reference,
                                self._background, self.progress, rebuild=rebuild,
                                resident_limit=self.options.resident_concepts)
        self.teacher = Teacher(vlm, store, self.bank, self.introduction, self.encode_reference, self._background,
                               self.progress, text_similarity=self.text_similarity)
        self._open_icpt()                  # the projector, when one is named: prompts taught beside memories
        self.teacher.prompts = self.icpt_prompts
        if rebuild:
            self.rebuild_stale_memories()
        self.bank.load()

    @classmethod
    def open(cls, model: str, store_dir=None, device: str = "auto", dtype: str = "auto",
             profile_path=None, progress=_stderr_progress, options: AssistantOptions | None = None,
             start_offline: bool = False, **overrides) -> Assistant:
        """Load the model (HF id or folder) and the store; rebuild memories of another model.

        ``options`` (:class:`AssistantOptions`): encoder backend and engine cache, threshold and
        M overrides, verification and its verifier model, R2P margin, tracker k-of-n.
        ``start_offline``: a fleet library out of reach opens from this machine's offline copy (the
        node's choice). Keyword arguments (``rebuild``, ``encoder``, an option's name) go to the constructor.
        """
        (options or AssistantOptions()).check()         # before the model loads: the cheap mistakes
        profile = load_profile(model, profile_path)
        store = open_library(store_dir, start_offline=start_offline)
        if progress:
            progress(f"loading {model} ({device}, {dtype})…")
        try:
            assistant = cls(load_vlm(model, device=device, dtype=dtype), store, profile, progress=progress,
                            options=options, **overrides)
        except BaseException:
            store.close()
            raise
        assistant._opened_store = True
        return assistant

    @staticmethod
    def calibrate(model: str, pairs: list[tuple] = (), dataset=None, **options) -> dict:
        """Measure ``model``'s layers (image–mask ``pairs``) and / or thresholds (a labelled
        ``dataset``) and write its profile: :func:`personal_vlm_node.calibration.calibrate_model`."""
        from .calibration import calibrate_model

        return calibrate_model(model, pairs, dataset, **options)

    @staticmethod
    def export_encoder(model: str, out_dir, **options) -> dict:
        """Export ``model``'s vision encoder to ONNX (and check the backends here):
        :func:`personal_vlm_node.runtime.export.export_model_encoder`."""
        from .runtime.export import export_model_encoder

        return export_model_encoder(model, out_dir, **options)

    def close(self, wait: bool = True) -> None:
        """Stop the background work. ``wait=False`` (shutdown) interrupts running generations
        and drops pending fingerprints instead of finishing them."""
        if self._calibration is not None:
            self._calibration.stop(timeout=30.0 if wait else 5.0)
        if not wait:
            self.vlm.interrupt()
        self.bank.close()
        self.verifier.stop()
        self._remove_yield_points()
        self._background.shutdown(wait=wait, cancel_futures=not wait)
        if getattr(self, "_opened_store", False):       # open() made it: its connections end here
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the parts' state, as front ends read it ------------------------------------------------
    @property
    def verifier(self):
        """The verification queue of the frame path (its ``stats``, ``result(name)``)."""
        return self.frames.queue

    @property
    def tracker(self):
        return self.frames.tracker

    @property
    def damaged(self) -> dict[str, str]:
        """Concepts left out because their files are damaged → why."""
        return self.bank.damaged

    @property
    def unmatched(self) -> set[str]:
        """Concepts with no memory for this model."""
        return self.bank.unmatched

    @property
    def bank_listeners(self) -> list:
        """Called (no arguments) whenever the bank of concepts changed."""
        return self.bank.listeners

    # ---- concept memory -----------------------------------------------------------------------
    def reload(self) -> None:
        """Load the bank again from the store (after memories were rebuilt)."""
        self.bank.load()

    def refresh(self) -> bool:
        """Follow changes other processes made to the store; True when the bank changed."""
        return self.bank.refresh()

    def watch_store(self, period: float = 0.2) -> None:
        """Check the store for other processes' changes every ``period`` s on a thread of its own."""
        self.bank.watch(period)

    def rebuild_stale_memories(self) -> list[str]:
        """Rebuild, from the stored reference images, every memory missing for this model."""
        return self.bank.rebuild_stale_memories()

    def stored_memory(self, name: str) -> dict:
        """This model's stored memory of ``name``: the tokens and their layout (positions, grids);
        MemoryMissing when it has none."""
        return self.bank.stored_memory(name)

    def memory(self, name: str):
        """This model's memory of ``name`` (K_c, D); MemoryMissing when it has none."""
        return self.stored_memory(name)["memory"]

    def add_concept(self, record: ConceptRecord, memory: dict, pictures: list, overwrite: bool = False) -> None:
        """Store a concept whose memory is already built and make it matchable at once."""
        self.bank.add(record, memory, pictures, overwrite=overwrite)

    # ---- teaching -------------------------------------------------------------------------
    def encode_reference(self, picture) -> ImageTokens:
        """A reference picture's visual tokens, through the frame path's encoder when it takes the
        picture's size; the model's torch tower otherwise."""
        return encode_reference(self.vlm, self.encoder, picture)

    def teach(self, name: str, images: list, category: str = "", rois=None,
              overwrite: bool = False, add: bool = False) -> TeachResult:
        """Ego concept introduction; the concept is usable when this returns.

        ``add``: the images are further views of an existing concept: only they are introduced, and
        their memory tokens are appended to the concept's (its fingerprint is kept).
        """
        return self.teacher.teach(name, images, category=category, rois=rois, overwrite=overwrite, add=add)

    # ---- using concepts ---------------------------------------------------------------------
    def _memories(self, names: list[str], skip_gone: bool = False) -> list[Memory]:
        """This model's memories of ``names``. ``skip_gone``: leave out concepts forgotten (or left
        without a memory for this model) since the similarity filter ranked them."""
        memories = []
        for n in names:
            try:
                memories.append(self.recognition_memory(n))
            except PersonalVLMError:
                if not skip_gone:
                    raise
                log.info("concept %r left out: forgotten or not rebuilt for this model", n)
        return memories

    def _match_scores(self, tokens) -> dict[str, float]:
        """Every concept's matcher score on the image's tokens."""
        self.bank.prefetch(tokens.features, tokens.token_boxes)
        return {m.name: m.score for m in self.matcher.score(tokens.features, tokens.token_boxes)}

    def in_context(self, tokens, limit: int, scores: dict[str, float] | None = None) -> list[str]:
        """The concepts one prompt holds: every one while they fit (at most ``limit`` memories and
        the profile's ``context_tokens``), else the best-matching first (the similarity filter).
        ``scores``: the matcher's scores on these tokens, when already computed."""
        if limit <= 0 or len(self.matcher) == 0:
            return []
        scores = self._match_scores(tokens) if scores is None else scores
        sizes = self.matcher.memory_sizes()
        chosen = ego.joint_context([], scores, limit, self.profile.context_tokens, lambda n: sizes.get(n, 0))
        return sorted(chosen, key=lambda n: -scores[n])

    def recognize(self, image, names: list[str] | None = None) -> list[Recognition]:
        """Ego in-context recognition of ``names`` (default: :meth:`in_context`, every concept while they fit)."""
        tokens = self.vlm.encode_image(image)
        joint = self.joint_size()
        matched = self._match_scores(tokens) if len(self.matcher) and (names is None or joint is not None) else {}
        if names is None:
            names = self.in_context(tokens, max(1, self.profile.max_concepts_in_context), matched)
        else:
            names = [validate_name(n) for n in names]
            for n in names:
                self.store.get(n)
        scores = ego.p_yes(self.vlm, tokens, names, lambda n: self._memories([n])[0], joint, matched,
                           self.profile.context_tokens)
        threshold = self.recognition_threshold
        results = [Recognition(n, p, p >= threshold) for n, p in scores.items()]
        return sorted(results, key=lambda r: -r.p_yes)

    def ask(self, question: str, image, on_partial=None) -> AskResult:
        """Answer about ``image`` with every concept in the prompt while they fit (:meth:`in_context`).

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
        ranked = self.in_context(tokens, self.profile.max_concepts_in_context)       # best-matching first
        memories = self._memories(ego.context_order(ranked), skip_gone=True)         # position says nothing
        parts = prompts.ask(memories, tokens, question, self.vlm.family)
        generation = self.vlm.generate(parts, max_new_tokens=128, on_text=on_partial)
        held = {m.name for m in memories}
        return AskResult(generation.text, [n for n in ranked if n in held], time.perf_counter() - t0,
                         generation.stopped)

    def forget(self, name: str) -> ForgetResult:
        """Forget ``name`` everywhere; the result names any folder that could not be removed."""
        return self.bank.forget(name)

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
        """Most memories in one joint Ego prompt (``recognition: joint``: M, within ``context_tokens``),
        None per concept.
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
            self._yield_hooks = self.vlm.call_before_every_layer(self.verifier.yield_point)
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
                "dtype": str(self.vlm.dtype).replace("torch.", ""), "store": self.store.location()}

    def recognizable(self) -> list[str]:
        """The concepts with a memory for this model: those the frame path and ``recognize`` can find."""
        return self.bank.recognizable()

    def knows(self, name: str) -> bool:
        """Whether a concept of this name is taught (as the store has it, whatever this model's memory)."""
        return name in self.store

    # ---- the frame path ---------------------------------------------------------------------
    def thresholds(self) -> tuple[float, float]:
        return self.profile.accept_threshold, self.profile.reject_threshold

    def concept_accepts(self, enabled: bool | None = None) -> dict[str, float]:
        """Each concept's own accept threshold (``concept_thresholds``; ``enabled`` overrides the
        option): :func:`personal_vlm_node.matcher.concept_accepts` of the library's impostors. Empty
        when off: every concept then has the profile's."""
        from .matcher import concept_accepts

        if not (self.options.concept_thresholds if enabled is None else enabled):
            return {}
        return concept_accepts(self.matcher.impostor_scores(), *self.thresholds())

    def observe(self, frame) -> FrameResult:
        """Named detections on one camera frame. Never runs the language model.

        Encoder → late-interaction scores of every memory → accept / uncertain / reject. Uncertain
        concepts go to the verification queue (Ego in-context check, on a budget, cached per
        concept); a fresh verdict from it counts on this frame, a pending one does not wait.
        The tracker then applies k-of-n hysteresis and smooths the boxes.
        """
        return self.frames.observe(frame, self.bank.categories)

    def observe_settled(self, frame, timeout: float = 300.0) -> FrameResult:
        """``observe`` for a single picture: waits for the verdicts on its uncertain concepts."""
        return self.frames.observe_settled(frame, self.bank.categories, timeout)

    def reference_embeddings(self, name: str, model=None):
        """(R, E) contrastive embeddings of the concept's reference pictures, by ``model`` (default:
        the assistant's own contrastive model); None without one."""
        return self.frames.reference_embeddings(name, model)

    def reference_tokens(self, name: str) -> ImageTokens:
        """The concept's first reference picture, encoded (R2P's pairwise step shows it)."""
        return self.frames.reference_tokens(name)
