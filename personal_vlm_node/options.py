"""What a front end can choose, in one place: the choice lists, the defaults and :class:`AssistantOptions`.

The CLI's flags and the benchmark build their choices and their :class:`AssistantOptions` from
here, and :mod:`.settings` (every setting's default, range and meaning) builds on these lists. Importing
this module costs nothing (no torch, no transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import PersonalVLMError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
# R2P's contrastive model by default (the paper's choice), and the SigLIP alternative.
DEFAULT_VERIFIER = "openai/clip-vit-large-patch14-336"
SIGLIP_VERIFIER = "google/siglip-so400m-patch14-384"
BACKENDS = ("torch", "onnxruntime", "tensorrt")          # vision encoder on the frame path
ENCODER_CHOICES = BACKENDS + ("auto",)                   # auto: the fastest here, measured once
PRECISIONS = ("fp16", "fp32")                            # TensorRT engine precision
DTYPES = ("auto", "float32", "bfloat16", "float16")      # weight precision of the model
EXPORT_OPSET = 20              # ONNX opset of exported encoders: dynamo needs ≥ 18, TensorRT 10 parses ≤ 22
# What R2P's pairwise step shows beside the query: the candidate's reference picture (R2P) or its memory.
PAIRWISE_REFERENCES = ("image", "memory")
# Ego's recognition: one prompt per concept, or every concept's memory in one prompt while they fit.
RECOGNITIONS = ("per_concept", "joint")
# What settles the matcher's uncertain band and fills /ask's prompt: Ego's memories or ICPT's prompts.
RECOGNITION_METHODS = ("ego", "icpt")
RANDOM_MODEL_SIZES = ("tiny", "realistic")                # random-weight models `bench` builds by itself


def check_thresholds(accept: float, reject: float) -> str | None:
    """Why this decision band is unusable, or None: everything between the two goes to verification."""
    if not reject < accept:
        return f"reject_threshold ({reject:g}) must be below accept_threshold ({accept:g})"
    return None


@dataclass(frozen=True)
class AssistantOptions:
    """How an :class:`~personal_vlm_node.assistant.Assistant` runs, beyond the model and the store.

    ``None`` thresholds and ``max_concepts_in_context`` keep the model profile's values.
    """

    backend: str = "torch"                    # frame-path vision encoder: one of ENCODER_CHOICES
    engine_cache: str | None = None           # exported ONNX files / TensorRT engines; None = default
    accept_threshold: float | None = None     # match score that detects without verification
    reject_threshold: float | None = None     # match score that rejects without verification
    max_concepts_in_context: int | None = None   # M: memories in one /ask prompt
    verification: bool = True                 # settle uncertain matches with the model
    verifications_per_second: float = 2.0
    verification_busy_fraction: float = 0.5   # most of the time the verifier may compute (see verification_queue.py)
    verifier_model: str | None = DEFAULT_VERIFIER   # CLIP/SigLIP id or folder for R2P; None = the VLM's yes/no
    r2p_margin: float | None = None           # Ego p(yes) this close to its threshold goes to R2P; None = profile's
    r2p_top_k: int = 3
    r2p_pool: int = 5
    tracker_k: int = 2                        # a track appears after k detections in the last n frames
    tracker_n: int = 3
    resident_concepts: int = 10000            # most memories in memory; a larger fleet library loads on demand (bank.prefetch)
    concept_thresholds: bool = False          # each concept's own accept, from the library's impostors (matcher.concept_accepts)
    auto_calibrate: bool = True               # the node measures an uncalibrated checkpoint once (autocalibration)
    calibration_cache: str | None = None      # automatic calibrations; None = $XDG_CACHE_HOME/personal_vlm/calibration
    recognition_method: str | None = None     # "ego" or "icpt" for the uncertain band and /ask; None = the profile's
    icpt_projector: str | None = None         # ICPT projector file; None = the profile's icpt.projector

    def check(self) -> None:
        """Refuse settings that cannot work, with what to change: each field's choices and range
        are its setting's (:mod:`personal_vlm_node.settings`), and the band must not be crossed."""
        from .settings import check_option

        for item in fields(self):
            check_option(item.name, getattr(self, item.name))
        if self.accept_threshold is not None and self.reject_threshold is not None:
            problem = check_thresholds(self.accept_threshold, self.reject_threshold)
            if problem:
                raise PersonalVLMError(problem)
