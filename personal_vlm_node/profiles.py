"""Per-model profiles: the attention layers Ego reads, memory sizes and decision thresholds.

A profile is a YAML file under ``models/`` (or any path) named after the model id, e.g.
``models/qwen2.5-vl-3b-instruct.yaml``. Without one, documented defaults apply: the layers
from the middle to three quarters of the depth, where keyword→image attention is most grounded.
``personal-vlm calibrate`` measures the layers for a checkpoint and writes its profile.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from .errors import PersonalVLMError
from .options import RECOGNITION_METHODS, RECOGNITIONS, check_thresholds
from .settings import BY_PROFILE_KEY, check_profile_key

PROFILE_DIR = Path(__file__).resolve().parent.parent / "models"   # in a source checkout
USER_PROFILE_DIR = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "personal_vlm" / "models"


def profile_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins: $PERSONAL_VLM_PROFILES, the user's config,
    the source checkout's models/, the installed share/personal_vlm_node/models."""
    dirs = [Path(p) for p in os.environ.get("PERSONAL_VLM_PROFILES", "").split(os.pathsep) if p]
    return dirs + [USER_PROFILE_DIR, PROFILE_DIR, Path(sys.prefix) / "share" / "personal_vlm_node" / "models"]


def default_profile_path(model: str) -> Path:
    """Where calibration writes: the checkout's models/ when writable, else the user's config."""
    target = PROFILE_DIR if PROFILE_DIR.is_dir() and os.access(PROFILE_DIR, os.W_OK) else USER_PROFILE_DIR
    return target / profile_names(model)[-1]


@dataclass
class ModelProfile:
    model: str = ""
    layers: list[int] = field(default_factory=list)   # empty → default_layers(num_layers)
    max_memory_tokens: int = 256      # cap on K, the visual tokens kept per reference image
    min_memory_tokens: int = 4        # floor of K_c, so a tiny subject still gets a memory
    memory_budget: float = 0.2        # K = budget · the image's tokens (Ego: 20 %); 0 → K = the cap
    memory_layout: str = "image"      # memories spliced inside vision markers at their grid
                                      # positions ("image") or as 1-D text rows ("text")
    attention_rows: str = "predict"   # rows read per keyword token: the row predicting it, or "own"
    attention_baseline: str = "answer"  # subtract the answer's non-keyword rows ("answer") or "none"
    introduction_passes: int = 1      # 1: attention captured while generating; 2: extra forward
    max_image_pixels: int = 0         # every picture (reference or frame) downscaled to at most this
                                      # many pixels before the processor; 0 = the processor's limits
    recognition: str = "per_concept"  # Ego check: one prompt per concept, or "joint": all the
                                      # memories that fit in one prompt, a yes-probability per name
    accept_threshold: float = 0.80    # matcher score at or above which a frame is a detection
    reject_threshold: float = 0.55    # at or below which it is not; between goes to verification
    recognize_threshold: float = 0.5  # Ego in-context p(yes) that counts as present
    r2p_margin: float = 0.15          # Ego p(yes) this close to recognize_threshold goes to R2P
    max_concepts_in_context: int = 64  # M: most memories in one prompt (/ask, joint recognition)
    context_tokens: int = 4096        # most memory tokens in one prompt: every concept goes in while
                                      # they fit, the best-matching first when they do not
    recognition_method: str = "ego"   # the uncertain band and /ask: Ego's memories or ICPT's prompts
    icpt: dict = field(default_factory=dict)   # ICPT: {projector: <file, absolute or in the checkpoint
                                      # folder>, threshold: <p(yes) that counts as present, default 0.5>}
    calibration: dict = field(default_factory=dict)   # how the layers were chosen, when measured

    def resolved_layers(self, num_layers: int) -> list[int]:
        layers = self.layers or default_layers(num_layers)
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise PersonalVLMError(
                f"profile for {self.model or 'this model'} names layers {bad}, but the model has "
                f"{num_layers}; recalibrate with `personal-vlm calibrate`")
        return sorted(set(layers))

    def validate(self) -> ModelProfile:
        if not 1 <= self.min_memory_tokens <= self.max_memory_tokens:
            raise PersonalVLMError("profile: need 1 <= min_memory_tokens <= max_memory_tokens")
        if self.max_image_pixels < 0:
            raise PersonalVLMError("profile: max_image_pixels must be >= 0 (0 = the processor's limits)")
        if not 0.0 <= self.memory_budget <= 1.0:
            raise PersonalVLMError("profile: memory_budget is a share of the image's tokens in [0, 1]")
        choices = {"memory_layout": ("image", "text"), "attention_rows": ("predict", "own"),
                   "attention_baseline": ("answer", "none"), "introduction_passes": (1, 2),
                   "recognition": RECOGNITIONS, "recognition_method": RECOGNITION_METHODS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise PersonalVLMError(f"profile: {key} must be one of {', '.join(map(str, allowed))}, "
                                       f"got {getattr(self, key)!r}")
        problem = check_thresholds(self.accept_threshold, self.reject_threshold)
        if problem:
            raise PersonalVLMError(f"profile: {problem}")
        if not 0.0 <= self.recognize_threshold <= 1.0:
            raise PersonalVLMError("profile: recognize_threshold must lie in [0, 1]")
        if not isinstance(self.context_tokens, int) or self.context_tokens < self.max_memory_tokens:
            raise PersonalVLMError(f"profile: context_tokens must be an integer >= max_memory_tokens "
                                   f"({self.max_memory_tokens}), so one concept always fits; got {self.context_tokens!r}")
        unknown = sorted(set(self.icpt) - {"projector", "threshold"}) if isinstance(self.icpt, dict) else None
        if unknown is None or unknown:
            raise PersonalVLMError(f"profile: icpt takes the keys projector and threshold, got {self.icpt!r}")
        if not 0.0 <= float(self.icpt.get("threshold", 0.5)) <= 1.0:
            raise PersonalVLMError("profile: icpt.threshold must lie in [0, 1]")
        for key in BY_PROFILE_KEY:           # the keys a user setting overrides: its range, written there
            check_profile_key(key, getattr(self, key))
        return self


def default_layers(num_layers: int, count: int = 4) -> list[int]:
    """Up to ``count`` evenly spaced layers from L/2 to 3L/4 (inclusive)."""
    lo, hi = num_layers // 2, max(num_layers // 2, (3 * num_layers) // 4)
    span = list(range(lo, min(hi, num_layers - 1) + 1))
    if len(span) <= count:
        return span
    step = (len(span) - 1) / (count - 1)
    return sorted({span[round(i * step)] for i in range(count)})


def profile_filename(model: str) -> str:
    """``Qwen/Qwen2.5-VL-3B-Instruct`` → ``qwen2.5-vl-3b-instruct.yaml``; folders use their name."""
    base = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-") + ".yaml"


PROFILE_HINT = "personal_vlm.json"   # in a checkpoint folder: {"profile": "<name>"} names its profile


def profile_names(model: str) -> list[str]:
    """File names a model's profile may have: from the model id / folder name, then the name a
    local checkpoint folder gives in ``personal_vlm.json`` (so a copied or cached folder with any
    name still finds its profile)."""
    names = [profile_filename(model)]
    hint = Path(model).expanduser() / PROFILE_HINT
    if hint.is_file():
        try:
            name = json.loads(hint.read_text()).get("profile")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.strip() and profile_filename(name) not in names:
            names.append(profile_filename(name))
    return names


def find_profile(model: str, path: str | Path | None = None) -> Path | None:
    """The file :func:`load_profile` reads: ``path``, else the first ``<model>.yaml`` in
    :func:`profile_dirs`; None when the defaults apply."""
    if path:
        candidate = Path(path)
        if not candidate.is_file():
            raise PersonalVLMError(f"model profile not found: {candidate}")
        return candidate
    found = [d / name for name in profile_names(model) for d in profile_dirs() if (d / name).is_file()]
    return found[0] if found else None


def load_profile(model: str, path: str | Path | None = None) -> ModelProfile:
    """The profile at ``path``, else ``<model>.yaml`` in :func:`profile_dirs` (see
    :func:`profile_names`), else the defaults."""
    candidate = find_profile(model, path)
    if candidate is None:
        return ModelProfile(model=model).validate()
    try:
        data = yaml.safe_load(candidate.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PersonalVLMError(f"model profile {candidate} is not valid YAML: {exc}") from exc
    known = {f.name for f in fields(ModelProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PersonalVLMError(f"model profile {candidate} has unknown keys {unknown}; known: {sorted(known)}")
    data.setdefault("model", model)
    try:
        return ModelProfile(**data).validate()
    except TypeError as exc:
        raise PersonalVLMError(f"model profile {candidate}: {exc}") from exc


def save_profile(profile: ModelProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(asdict(profile), sort_keys=False))
    return path


def calibrate_layers(profile: ModelProfile, vlm, pairs: list[tuple], top_k: int, keep: int,
                     progress=None) -> ModelProfile:
    """``profile`` with the ``keep`` layers whose keyword attention lands best on the subject.

    ``pairs`` are (image, mask) files of single-subject pictures; each layer is scored by the
    share of its ``top_k`` most attended visual tokens that fall on the mask
    (:func:`personal_vlm_node.ego.rank_layers`), and every layer's score is kept in
    ``calibration``.
    """
    import time

    import numpy as np
    import torch
    from PIL import Image

    from . import ego
    from .images import load_image

    samples = []
    for image_path, mask_path in pairs:
        image = load_image(image_path)
        with Image.open(mask_path) as m:
            mask = torch.from_numpy(np.asarray(m.convert("L").resize(image.size)) > 127)   # (H, W)
        if not mask.any():
            raise PersonalVLMError(f"mask {mask_path} is empty")
        samples.append((vlm.encode_image(image), mask))
    t0 = time.perf_counter()
    scores = ego.rank_layers(vlm, samples, top_k, progress=progress,
                             options=ego.IntroductionOptions.from_profile(profile, []))
    ranked = sorted(scores, key=lambda l: -scores[l])
    calibration = {"images": len(samples), "top_k": top_k,
                   "mask_hit_rate": {int(l): round(s, 4) for l, s in scores.items()},
                   "seconds": round(time.perf_counter() - t0, 2)}
    return replace(profile, layers=sorted(ranked[: min(keep, len(ranked))]), calibration=calibration)
