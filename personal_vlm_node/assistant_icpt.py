"""The Assistant's ICPT: its projector, the concepts' prompts, and which method recognises.

A part of :class:`~personal_vlm_node.assistant.Assistant`, kept in a file of its own by job; it uses
the Assistant's ``vlm``, ``profile``, ``options``, ``store``, ``encode_reference`` and ``_warn``.

The projector file comes from the ``icpt_projector`` option, else the profile's ``icpt.projector``
(absolute, ``~``, or a file in the checkpoint folder). One that is missing, damaged or made for
another backbone leaves ICPT unavailable, says so once, and Ego keeps working. The recognition
method (the ``recognition_method`` option, else the profile's) decides what the matcher's uncertain
band and /ask put in the prompt: Ego's memories, or ICPT's prompts with ICPT's threshold.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PersonalVLMError
from .icpt_prompts import ConceptPrompts
from .vlm.base import Memory

DEFAULT_ICPT_THRESHOLD = 0.5


def projector_path(option: str | None, profile, model_folder) -> Path | None:
    """Where the projector is, or None when no projector is named."""
    named = option or (profile.icpt or {}).get("projector") or ""
    if not named:
        return None
    path = Path(str(named)).expanduser()
    if not path.is_absolute() and model_folder is not None and (Path(model_folder) / path).exists():
        return Path(model_folder) / path
    return path


class WithICPT:
    """ICPT state and lookups of an Assistant (mixed into it)."""

    icpt_prompts: ConceptPrompts | None = None     # None: ICPT unavailable
    icpt_problem: str = ""                          # why it is unavailable, when a projector was named
    recognition_method: str = "ego"

    def _open_icpt(self) -> None:
        path = projector_path(self.options.icpt_projector, self.profile, getattr(self.vlm, "checkpoint_folder", None))
        if path is not None:
            from . import icpt

            try:
                projector = icpt.load_projector(path, self.vlm)
                self.icpt_prompts = ConceptPrompts(self.vlm, projector, path, self.store, self.encode_reference)
            except PersonalVLMError as exc:
                self.icpt_problem = f"ICPT unavailable: {exc}; Ego recognises instead"
                self._warn(self.icpt_problem)
        method = self.options.recognition_method or self.profile.recognition_method
        if method == "icpt" and self.icpt_prompts is None:
            if path is None:
                self.icpt_problem = ("recognition_method is icpt but no ICPT projector is named (icpt_projector, or "
                                     "the profile's icpt.projector); Ego recognises instead")
                self._warn(self.icpt_problem)
            method = "ego"
        self.recognition_method = method

    @property
    def icpt_threshold(self) -> float:
        """ICPT's p(yes) that counts as present (the profile's ``icpt.threshold``)."""
        return float((self.profile.icpt or {}).get("threshold", DEFAULT_ICPT_THRESHOLD))

    def require_icpt(self) -> ConceptPrompts:
        """The loaded projector's prompts; PersonalVLMError saying why when ICPT is not loaded."""
        if self.icpt_prompts is None:
            raise PersonalVLMError(self.icpt_problem or "ICPT is not loaded: name a projector (--icpt-projector, the "
                                   "icpt_projector parameter or the profile's icpt.projector)")
        return self.icpt_prompts

    def icpt_prompt(self, name: str) -> Memory:
        """``name``'s ICPT prompt (made from its stored pictures when it has none yet)."""
        return self.require_icpt().prompt(name)

    def recognition_status(self, why: bool = True) -> str:
        """``ego``, ``icpt (projector <id>)``, or (``why``) ``ego (why ICPT is not in use)`` when it was asked for."""
        if self.recognition_method == "icpt":
            return f"icpt (projector {self.icpt_prompts.id})"
        return f"ego ({self.icpt_problem})" if why and self.icpt_problem and self.icpt_prompts is None else "ego"

    def recognition_memory(self, name: str) -> Memory:
        """What the recognition method puts in a prompt for ``name``: its Ego memory or its ICPT prompt."""
        if self.recognition_method == "icpt":
            return self.icpt_prompt(name)
        return Memory.from_stored(self.stored_memory(name), name)

    @property
    def recognition_threshold(self) -> float:
        """The p(yes) that counts as present for the recognition method."""
        return self.icpt_threshold if self.recognition_method == "icpt" else self.profile.recognize_threshold
