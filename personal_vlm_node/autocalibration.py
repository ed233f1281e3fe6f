"""A checkpoint calibrates itself: Ego's layers and every decision threshold, measured once on the
built-in synthetic world and cached per checkpoint.

A profile shipped without measurements (``layers: []``, ``calibration.note: not calibrated``) leaves
Ego reading attention from default layers no measurement chose, and the matcher deciding by
thresholds fitted to no model's score scale. On the first start of such a checkpoint the node runs
what ``personal-vlm calibrate`` does by hand, on data the project draws itself — the toy world
(:mod:`personal_vlm_node.testing.toy_world`), offline and deterministic, with exact masks:

1. **layers**: single-object scenes with masks (``--layout calibrate``, seed :data:`LAYER_SEED`,
   :attr:`SyntheticSet.layer_images` images); every layer is ranked by the share of its top-K
   keyword-attended tokens on the mask (:func:`personal_vlm_node.profiles.calibrate_layers`), with
   K a quarter of one image's tokens (4…16) and the best ``min(4, L/2)`` layers kept;
2. **thresholds**: a labelled split with look-alike pairs (``--layout yollava``, seed
   :data:`SPLIT_SEED`): the matcher's accept/reject band, Ego's threshold and the R2P margin
   (:func:`personal_vlm_node.calibration.fit_thresholds`).

Both seeds are the project's tuning seeds — never a seed any figure is reported on. The scenes are
drawn at the checkpoint's native resolution (:func:`native_side`).

Only what the profile lacks is measured (:func:`measured_parts`): layers a profile names (ranked on
a user's own images, or chosen) and thresholds a user fitted on their own split
(``calibration.thresholds``) or wrote by hand (any of them off the defaults) stay, and win over the
synthetic ones.

The result is a whole profile YAML in the cache (:func:`cache_dir`), named by the checkpoint's
fingerprint (:func:`checkpoint_fingerprint`: its config and the head and tail of every weight file),
the profile settings a calibration depends on, and what was measured (:func:`cache_path`). It is
written under a temporary name and renamed once complete, so an interrupted calibration (Ctrl-C,
kill) leaves nothing a later start reads; that start calibrates again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .errors import PersonalVLMError
from .profiles import ModelProfile, profile_filename

CACHE_ENV = "PERSONAL_VLM_CALIBRATION_CACHE"
LAYER_SEED = 100                # tuning seeds (the toy profile was calibrated by hand on the same ones)
SPLIT_SEED = 150
VERSION = 1                     # of this procedure: a change here calibrates every checkpoint again
PARTS = ("layers", "thresholds")
# The profile keys a calibration fits, and those it depends on (a change calibrates again).
FITTED_KEYS = ("layers", "accept_threshold", "reject_threshold", "recognize_threshold", "r2p_margin")
SHAPING_KEYS = ("max_memory_tokens", "min_memory_tokens", "memory_budget", "memory_layout", "attention_rows",
                "attention_baseline", "introduction_passes", "max_image_pixels", "recognition", "context_tokens")
_HEAD_TAIL = 1 << 20            # bytes of each weight file's start and end that go into the fingerprint


@dataclass(frozen=True)
class SyntheticSet:
    """How much of the toy world a calibration draws (tests draw less)."""

    layer_images: int = 24        # single-object scenes with masks (toy_world --layout calibrate)
    split_concepts: int = 8       # concepts of the labelled split, in look-alike pairs
    split_tests: int = 6          # query scenes per concept
    max_error: float = 0.05       # error share the matcher band and the R2P margin may leave


SYNTHETIC = SyntheticSet()


# ---- what a profile has measured ---------------------------------------------------------------
def measured_parts(profile: ModelProfile) -> set[str]:
    """Which parts of ``profile`` are a user's (measured or chosen), and stay: "layers" when it names
    layers; "thresholds" when they were fitted (``calibration.thresholds``) or any of them differs
    from the documented defaults (written by hand). The rest is what a calibration measures."""
    calibration = profile.calibration or {}
    defaults = ModelProfile()
    parts = set()
    if profile.layers:
        parts.add("layers")
    if calibration.get("thresholds") or any(getattr(profile, k) != getattr(defaults, k) for k in FITTED_KEYS[1:]):
        parts.add("thresholds")
    return parts


def missing_parts(profile: ModelProfile) -> list[str]:
    have = measured_parts(profile)
    return [p for p in PARTS if p not in have]


# ---- where a calibration is kept ---------------------------------------------------------------
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$PERSONAL_VLM_CALIBRATION_CACHE``, else ``$XDG_CACHE_HOME/personal_vlm/calibration``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "personal_vlm" / "calibration"


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A digest of the checkpoint in ``folder``: its config.json and, for every weight file, its
    name, size and first and last MiB (cheap on a multi-GB checkpoint; a fine-tune changes them)."""
    folder = Path(folder)
    h = hashlib.sha256()
    try:
        h.update((folder / "config.json").read_bytes())
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
        for path in weights:
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                if size <= 2 * _HEAD_TAIL:
                    h.update(f.read())                  # a small file: all of it
                else:
                    h.update(f.read(_HEAD_TAIL))
                    f.seek(size - _HEAD_TAIL)
                    h.update(f.read(_HEAD_TAIL))
    except OSError as exc:
        raise PersonalVLMError(f"cannot read the checkpoint in {folder} to fingerprint it: {exc}") from exc
    return h.hexdigest()[:16]


def vlm_fingerprint(vlm) -> str:
    """The fingerprint of a loaded adapter's checkpoint (its folder's; else its identity's)."""
    folder = getattr(vlm, "checkpoint_folder", None)
    if folder is not None:
        return checkpoint_fingerprint(folder)
    return hashlib.sha256(str(vlm.identity).encode()).hexdigest()[:16]


def _request_key(profile: ModelProfile, parts: list[str], synthetic: SyntheticSet) -> str:
    """What else decides a calibration: the shaping settings, the parts measured (and the layers
    kept when only thresholds are fitted: they depend on them), the synthetic set, the procedure."""
    shaping = {k: getattr(profile, k) for k in SHAPING_KEYS}
    if "layers" not in parts:
        shaping["layers"] = list(profile.layers)
    if "thresholds" not in parts:
        shaping.update({k: getattr(profile, k) for k in FITTED_KEYS[1:]})
    text = json.dumps({"version": VERSION, "parts": sorted(parts), "profile": shaping,
                       "synthetic": asdict(synthetic)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cache_path(fingerprint: str, profile: ModelProfile, parts: list[str], cache=None,
               synthetic: SyntheticSet = SYNTHETIC) -> Path:
    stem = Path(profile_filename(profile.model or "model")).stem
    return cache_dir(cache) / f"{stem}-{fingerprint}-{_request_key(profile, parts, synthetic)}.yaml"


def with_calibration(profile: ModelProfile, calibrated: ModelProfile, parts: list[str]) -> ModelProfile:
    """``profile`` with the ``parts`` ``calibrated`` measured (its other keys are the user's)."""
    changes = {}
    if "layers" in parts:
        changes["layers"] = list(calibrated.layers)
    if "thresholds" in parts:
        changes.update({k: getattr(calibrated, k) for k in FITTED_KEYS[1:]})
    calibration = {k: v for k, v in (profile.calibration or {}).items() if k != "note"}
    for key in ("images", "top_k", "mask_hit_rate", "seconds") if "layers" in parts else ():
        if key in calibrated.calibration:
            calibration[key] = calibrated.calibration[key]
    if "thresholds" in parts:
        calibration["thresholds"] = calibrated.calibration.get("thresholds", {})
    calibration["auto"] = calibrated.calibration.get("auto", {})
    return replace(profile, **changes, calibration=calibration).validate()


def cached_profile(vlm, profile: ModelProfile, cache=None, synthetic: SyntheticSet = SYNTHETIC):
    """(``profile`` completed by this checkpoint's cached calibration, the file) or (None, the file
    it would be in). Nothing is looked up when the profile lacks nothing."""
    if not missing_parts(profile):
        return None, None
    return cached_for(vlm_fingerprint(vlm), profile, cache, synthetic)


def cached_for(fingerprint: str, profile: ModelProfile, cache=None, synthetic: SyntheticSet = SYNTHETIC):
    """:func:`cached_profile` of the checkpoint with ``fingerprint`` (no model loaded)."""
    parts = missing_parts(profile)
    path = cache_path(fingerprint, profile, parts, cache, synthetic)
    if not path.is_file():
        return None, path
    try:
        data = yaml.safe_load(path.read_text()) or {}
        calibrated = ModelProfile(**data).validate()
    except (OSError, yaml.YAMLError, TypeError, PersonalVLMError) as exc:
        raise PersonalVLMError(f"the cached calibration {path} is unreadable ({exc}); delete it and it is "
                               "measured again") from exc
    return with_calibration(profile, calibrated, parts), path


# ---- the native resolution ---------------------------------------------------------------------
MIN_SIDE, MAX_SIDE = 168, 448    # the toy world's own size; a side past which scenes gain no detail


def native_side(image_processor) -> int:
    """The side, in pixels, of the square pictures the checkpoint sees at its processor's default
    budget, within [:data:`MIN_SIDE`, :data:`MAX_SIDE`]: SmolVLM's ``max_image_size``, InternVL's
    fixed tile, or for Qwen the square root of ``max_pixels`` (its ``size.longest_edge``)."""
    def field(holder, key):             # a dict or transformers' SizeDict
        if holder is None:
            return None
        return holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)

    size = getattr(image_processor, "size", None)
    biggest = getattr(image_processor, "max_image_size", None)
    if field(biggest, "longest_edge"):
        side = int(field(biggest, "longest_edge"))
    elif field(size, "height"):
        side = int(field(size, "height"))
    elif field(size, "longest_edge"):
        edge = int(field(size, "longest_edge"))
        side = int(edge ** 0.5) if edge > 4096 else edge      # a pixel count (Qwen) or a side
    else:
        side = MAX_SIDE
    return max(MIN_SIDE, min(MAX_SIDE, side))


# ---- progress ----------------------------------------------------------------------------------
class Cancelled(Exception):
    """The calibration was asked to stop (shutdown)."""


class Progress:
    """Steps done of a known total, a time estimate, and a throttled report.

    ``step(text)`` is called as each step starts (the step before it is then done). ``report`` gets
    one line at most every ``every_s`` seconds, and the first and the last. ``cancelled`` (an Event)
    stops the calibration at the next step."""

    def __init__(self, total: int, report=None, every_s: float = 5.0, cancelled: threading.Event | None = None):
        self.total, self.done, self.text = max(1, total), 0, "starting"
        self.report, self.every_s, self.cancelled = report, every_s, cancelled
        self.t0 = time.monotonic()
        self._last = -1e9
        self._started = 0

    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        return (time.monotonic() - self.t0) / self.done * (self.total - self.done)

    def line(self) -> str:
        eta = self.eta_s()
        left = "" if eta is None else f", about {_duration(eta)} left"
        return f"calibrating ({self.done}/{self.total}{left}): {self.text}"

    def step(self, text: str) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise Cancelled()
        self.done = min(self.total, self._started)
        self._started += 1
        self.text = text
        now = time.monotonic()
        if self.report and (now - self._last >= self.every_s or self.done == 0):
            self._last = now
            self.report(self.line())

    def finish(self) -> None:
        self.done, self.text = self.total, "done"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


# ---- the calibration -----------------------------------------------------------------------------
@dataclass
class Result:
    profile: ModelProfile          # the profile completed by the calibration
    path: Path | None              # the cache file written (None: nothing was missing)
    parts: list[str]               # what was measured
    seconds: float


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe"):
            pass
    except OSError as exc:
        raise PersonalVLMError(
            f"the calibration cache {folder} is not writable ({exc.strerror or exc}); set calibration_cache_dir "
            f"(node) or ${CACHE_ENV} to a writable folder; the uncalibrated values stay in use") from exc


def calibrate(vlm, profile: ModelProfile, cache=None, progress=None, synthetic: SyntheticSet = SYNTHETIC,
              cancelled: threading.Event | None = None, every_s: float = 5.0, started=None) -> Result:
    """Measure what ``profile`` lacks on the synthetic world and cache it (see the module docstring).

    ``progress`` gets throttled "calibrating (n/N, about … left): …" lines; ``cancelled`` stops it
    (:class:`Cancelled`); ``started(steps)`` gets the :class:`Progress` once the total is known. Any failure is a PersonalVLMError saying what failed; nothing is cached then.
    """
    from . import media
    from .calibration import calibrate_thresholds
    from .evaluation import load_dataset
    from .images import load_image
    from .profiles import calibrate_layers
    from .testing.toy_world import write_dataset

    t0 = time.perf_counter()
    parts = missing_parts(profile)
    if not parts:
        return Result(profile, None, [], 0.0)
    fingerprint = vlm_fingerprint(vlm)
    path = cache_path(fingerprint, profile, parts, cache, synthetic)
    _writable(path.parent)
    side = native_side(vlm.image_processor)
    layer_concepts = max(1, -(-synthetic.layer_images // 4))        # the layout draws 4 scenes a concept
    total = (layer_concepts * 4 if "layers" in parts else 0) + (
        synthetic.split_concepts * (1 + synthetic.split_tests) if "thresholds" in parts else 0)
    steps = Progress(total, progress, every_s, cancelled)
    if started is not None:
        started(steps)
    work = replace(profile, calibration=dict(profile.calibration or {}))
    stage = "drawing the synthetic scenes"
    try:
        with tempfile.TemporaryDirectory(prefix="personal_vlm_calibration_") as tmp:
            if "layers" in parts:
                folder = write_dataset(Path(tmp) / "layers", seed=LAYER_SEED, concepts=layer_concepts,
                                       layout="calibrate", image_size=side)
                pairs = media.image_mask_pairs(folder / "images", folder / "masks")
                stage = "ranking the layers (attention on the subject's mask)"
                probe = vlm.encode_image(load_image(pairs[0][0]))
                top_k = max(4, min(16, round(probe.num_tokens / 4)))
                keep = max(1, min(4, vlm.num_layers // 2))
                work = calibrate_layers(work, vlm, pairs, top_k, keep, progress=steps.step)
            if "thresholds" in parts:
                stage = "drawing the synthetic scenes"
                folder = write_dataset(Path(tmp) / "split", seed=SPLIT_SEED, concepts=synthetic.split_concepts,
                                       layout="yollava", tests=synthetic.split_tests, image_size=side)
                dataset = load_dataset(folder, "yollava")
                stage = "fitting the thresholds (matcher and Ego on a labelled split)"
                fitted = calibrate_thresholds(vlm, work, dataset, steps.step, synthetic.max_error)
                fitted["figures"]["dataset"] = f"toy_world --seed {SPLIT_SEED} --layout yollava"
                work.calibration = {**work.calibration, "thresholds": fitted["figures"]}
    except (Cancelled, KeyboardInterrupt):
        raise
    except PersonalVLMError as exc:
        raise PersonalVLMError(f"automatic calibration failed while {stage}: {exc}") from exc
    except Exception as exc:     # a model whose attention cannot be captured, …: said, never a crash
        raise PersonalVLMError(f"automatic calibration failed while {stage}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    steps.finish()
    seconds = time.perf_counter() - t0
    work.calibration["auto"] = {
        "fingerprint": fingerprint, "parts": parts, "side": side, "seconds": round(seconds, 1),
        "seeds": {"layers": LAYER_SEED, "thresholds": SPLIT_SEED}, "synthetic": asdict(synthetic),
        "version": VERSION, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    completed = with_calibration(profile, work, parts)
    _write(path, completed)
    return Result(completed, path, parts, seconds)


def _write(path: Path, profile: ModelProfile) -> None:
    """Whole or not at all: a temporary file renamed into place; what a killed run left goes."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    header = ("# Calibrated automatically on the built-in synthetic world (personal_vlm_node.autocalibration);\n"
              "# delete this file to measure again, or calibrate on your own images: personal-vlm calibrate.\n")
    tmp.write_text(header + yaml.safe_dump(asdict(profile), sort_keys=False))
    os.replace(tmp, path)


# ---- from the command line -------------------------------------------------------------------------
def calibrate_checkpoint(model: str, profile_path=None, cache=None, device: str = "auto", dtype: str = "auto",
                         progress=None, out=None, synthetic: SyntheticSet = SYNTHETIC) -> dict:
    """``personal-vlm calibrate --auto``: load ``model``, measure what its profile lacks on the
    synthetic world (again, even when a calibration is cached) and cache it; ``out``: also write the
    completed profile there. Returns what was measured and where it went (``summary``: one line)."""
    from .profiles import find_profile, load_profile, save_profile
    from .vlm import load_vlm

    source = find_profile(model, profile_path)
    profile = load_profile(model, profile_path)
    parts = missing_parts(profile)
    if not parts:
        where = source or "the defaults"
        return {"profile": str(where), "measured": [], "summary":
                f"the profile {where} is calibrated already (layers and thresholds measured on a user's data "
                "win over the synthetic world); nothing to do. To measure on the synthetic world anyway, pass "
                "--profile a profile without measurements"}
    _writable(cache_dir(cache))
    vlm = load_vlm(model, device=device, dtype=dtype)
    result = calibrate(vlm, profile, cache, progress, synthetic, every_s=1.0 if progress else 5.0)
    if out:
        save_profile(result.profile, out)
    fitted = {k: getattr(result.profile, k) for k in FITTED_KEYS}
    summary = (", ".join(f"{k} {v}" for k, v in fitted.items()) + f" measured ({' and '.join(parts)}) in "
               f"{_duration(result.seconds)} on the synthetic world; cached in {result.path}"
               + (f" and written to {out}" if out else ""))
    return {"profile": str(result.path), "measured": parts, "seconds": round(result.seconds, 1), **fitted,
            "out": str(out) if out else None, "summary": summary}


def describe_profile(model: str, profile_path=None, cache=None) -> dict:
    """``personal-vlm profile show``: the profile in use for ``model`` — its file, what is measured,
    the cached automatic calibration that completes it (when the checkpoint is here), its values."""
    from .profiles import find_profile, load_profile
    from .vlm import resolve_checkpoint

    source = find_profile(model, profile_path)
    profile = load_profile(model, profile_path)
    parts = missing_parts(profile)
    state, cached_file, note = "calibrated", None, ""
    if parts:
        state = "uncalibrated"
        try:
            folder = resolve_checkpoint(model)
        except PersonalVLMError as exc:
            note = f"the checkpoint is not here, so its cached calibration cannot be looked up ({exc})"
        else:
            completed, path = cached_for(checkpoint_fingerprint(folder), profile, cache)
            if completed is not None:
                profile, state, cached_file = completed, "calibrated automatically", path
            else:
                note = (f"not calibrated yet ({' and '.join(parts)} not measured): the node measures it on its first "
                        f"start (auto_calibrate), or run `personal-vlm --model {model} calibrate --auto`; it will "
                        f"be cached in {path}")
    values = {k: getattr(profile, k) for k in FITTED_KEYS + SHAPING_KEYS + ("max_concepts_in_context",)}
    calibration = profile.calibration or {}
    lines = [f"model: {model}", f"profile: {source or 'built-in defaults (no profile file)'}", f"state: {state}"]
    if cached_file:
        lines.append(f"cached calibration: {cached_file}")
    if note:
        lines.append(note)
    lines += [f"{k}: {v}" for k, v in values.items()]
    if calibration.get("mask_hit_rate"):
        rates = ", ".join(f"{l}: {r}" for l, r in calibration["mask_hit_rate"].items())
        lines.append(f"layer ranking (share of top-{calibration.get('top_k')} attended tokens on the mask): {rates}")
    figures = calibration.get("thresholds") or {}
    if figures:
        lines.append(f"thresholds fitted on {figures.get('dataset', '?')}: matcher Wtd {figures.get('match_wtd_at_best')}, "
                     f"Ego Wtd {figures.get('ego_wtd_at_threshold')}, pairs {figures.get('pairs')}")
    return {"model": model, "profile": str(source) if source else None, "state": state,
            "cached_calibration": str(cached_file) if cached_file else None, "missing": [] if cached_file else parts,
            "values": values, "calibration": calibration, "text": "\n".join(lines)}


# ---- in the background, while the node serves ------------------------------------------------------
class Background:
    """One calibration on its own thread while the node serves with the uncalibrated values.

    ``status()`` says where it is ("calibrating (n/N, about … left): …", "done", "uncalibrated: why");
    ``on_done(profile)`` adopts the result; ``stop()`` cancels it at the next step (shutdown)."""

    def __init__(self, vlm, profile: ModelProfile, on_done, cache=None, log=None, warn=None,
                 synthetic: SyntheticSet = SYNTHETIC, every_s: float = 10.0):
        self.cancelled = threading.Event()
        self.state, self.error, self.path = "calibrating", None, None
        self.steps: Progress | None = None
        log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        warn = warn or log

        def run() -> None:
            try:
                result = calibrate(vlm, profile, cache, log, synthetic, self.cancelled, every_s,
                                   started=lambda steps: setattr(self, "steps", steps))
                self.path = result.path
                on_done(result.profile)
                self.state = "done"
                log(f"calibrated {' and '.join(result.parts)} in {_duration(result.seconds)} on the synthetic "
                    f"world, cached in {result.path}; in use now")
            except Cancelled:
                self.state = "cancelled"
            except PersonalVLMError as exc:
                self.state, self.error = "failed", str(exc)
                warn(f"{exc}; serving with the uncalibrated values")
            except Exception as exc:           # a bug: said, and the node keeps serving
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                warn(f"automatic calibration failed: {self.error}; serving with the uncalibrated values")

        self.thread = threading.Thread(target=run, name="calibration", daemon=True)
        self.thread.start()

    def status(self) -> str:
        if self.state == "calibrating":
            return self.steps.line() if self.steps is not None else "calibrating (starting)"
        if self.state == "failed":
            return f"uncalibrated: {self.error}"
        return self.state

    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self.cancelled.set()
        self.thread.join(timeout)
