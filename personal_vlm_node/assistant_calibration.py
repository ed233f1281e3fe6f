"""The Assistant's self-calibration: its profile completed from the cache, a calibration run in the
background while it serves, and the result adopted while running (:mod:`.autocalibration` measures).

A part of :class:`~personal_vlm_node.assistant.Assistant`, kept in a file of its own by job; it uses
the Assistant's ``vlm``, ``profile``, ``options``, ``bank`` and ``introduction``.
"""

from __future__ import annotations

from dataclasses import replace

from . import autocalibration
from .errors import PersonalVLMError
from .options import AssistantOptions, check_thresholds
from .profiles import ModelProfile


class SelfCalibrating:
    """Calibration state and actions of an Assistant (mixed into it)."""

    calibration_file = None      # the cached automatic calibration in use
    _calibration = None          # the background run (autocalibration.Background), if one started

    def _with_cached_calibration(self, vlm, profile: ModelProfile, options: AssistantOptions) -> ModelProfile:
        """``profile`` completed by this checkpoint's cached automatic calibration, when it lacks one."""
        try:
            cached, path = autocalibration.cached_profile(vlm, profile, options.calibration_cache)
        except PersonalVLMError as exc:
            self._warn(str(exc))
            return profile
        if cached is None:
            return profile
        self.calibration_file = path
        return cached

    def calibration_status(self) -> dict:
        """Where the profile's measurements stand: ``state`` "calibrated" (every part measured, by a
        user or automatically), "calibrating", "uncalibrated" (defaults in use) or "failed";
        ``text`` one line for logs and diagnostics; ``missing`` the parts not measured;
        ``file`` the cached automatic calibration in use, if any."""
        missing = autocalibration.missing_parts(self._profile_as_loaded)
        running = self._calibration
        file = str(self.calibration_file) if self.calibration_file else ""
        if running is not None and running.state == "calibrating":
            return {"state": "calibrating", "text": running.status() + "; the uncalibrated values are in use",
                    "missing": missing, "file": file}
        if not missing:
            text = "calibrated" + (f" automatically ({file})" if file else "")
            return {"state": "calibrated", "text": text, "missing": [], "file": file}
        if running is not None and running.state == "failed":
            return {"state": "failed", "text": running.status(), "missing": missing, "file": file}
        return {"state": "uncalibrated", "text": f"uncalibrated ({' and '.join(missing)} not measured): the "
                                                 "profile's default values are in use", "missing": missing, "file": file}

    def calibrate_in_background(self, log=None) -> bool:
        """Measure what the profile lacks on the synthetic world, on a thread of its own, while this
        Assistant serves with the uncalibrated values; the result is cached and adopted when done
        (:mod:`personal_vlm_node.autocalibration`). False when nothing is missing or one runs."""
        if not autocalibration.missing_parts(self._profile_as_loaded):
            return False
        if self._calibration is not None and self._calibration.running():
            return False
        self._calibration = autocalibration.Background(
            self.vlm, replace(self._profile_as_loaded), self.adopt_calibration, self.options.calibration_cache,
            log=log or self.progress, warn=self._warn)
        return True

    def adopt_calibration(self, calibrated: ModelProfile, file=None) -> list[str]:
        """Use ``calibrated``'s layers and thresholds from now on. A threshold changed while running
        (or set by an option) stays as it is. Memories picked with other layers are picked again from
        their stored pictures in the background. Returns the concepts whose memories are rebuilt."""
        old = self._profile_as_loaded
        self._profile_as_loaded = replace(old, **{k: getattr(calibrated, k) for k in autocalibration.FITTED_KEYS},
                                          calibration=calibrated.calibration)
        if file is not None:
            self.calibration_file = file
        elif self._calibration is not None and self._calibration.path is not None:
            self.calibration_file = self._calibration.path
        follows = {"accept_threshold": self.options.accept_threshold is None,
                   "reject_threshold": self.options.reject_threshold is None}
        band = {k: (getattr(calibrated, k) if follows[k] and getattr(self.profile, k) == getattr(old, k)
                    else getattr(self.profile, k)) for k in follows}
        if check_thresholds(band["accept_threshold"], band["reject_threshold"]) is None:
            self.profile.accept_threshold, self.profile.reject_threshold = band["accept_threshold"], band["reject_threshold"]
        self.profile.recognize_threshold = calibrated.recognize_threshold
        if self.options.r2p_margin is None and self.r2p_margin == old.r2p_margin:
            self.r2p_margin = calibrated.r2p_margin
        self.profile.layers, self.profile.calibration = list(calibrated.layers), calibrated.calibration
        self.layers = self.profile.resolved_layers(self.vlm.num_layers)
        self.introduction.layers[:] = self.layers
        return self.bank.rebuild_memories_of_other_layers(self.layers)

