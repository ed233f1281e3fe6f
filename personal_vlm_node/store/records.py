"""The records a store hands out: a concept's row, a forget's result, and the model key memories are filed under."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import quoted


def model_key(identity: str) -> str:
    """The part of a model identity that a memory depends on: everything but the precision.

    Adapters write ``family|model id|revision|dtype|d<hidden size>`` (``VLMAdapter.identity``); a
    memory made in one dtype is cast for the same model in another. Other strings are compared whole.
    """
    parts = identity.split("|")
    if len(parts) == 5 and parts[3] in _DTYPE_NAMES:
        return "|".join(parts[:3] + parts[4:])
    return identity


_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64"}


class MemoryMissing(PersonalVLMError):
    """The concept exists but has no memory built for the asked model (rebuild it or report it)."""


def default_store_dir() -> Path:
    """``$XDG_DATA_HOME/personal_vlm``, or ``~/.local/share/personal_vlm`` when it is unset."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "personal_vlm"


@dataclass
class ConceptRecord:
    name: str
    category: str
    keywords: list[str]
    fingerprint: dict  # R2P attributes + description; {} until the background pass completes it
    fingerprint_complete: float | None  # unix time the fingerprint was completed, None if pending
    memory_tokens: int  # K_c, total over all reference images
    model_identity: str  # the model the memory was built with (VLMAdapter.identity); stored as model_fingerprint
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # method-specific JSON (ROIs, timings, ...)


@dataclass
class ForgetResult:
    """What a forget removed: the concept is gone from the index whatever ``left_behind`` says."""

    name: str
    left_behind: list[str] = field(default_factory=list)  # "path (reason)" for each folder not removed

    @property
    def message(self) -> str:
        if not self.left_behind:
            return f"forgot {quoted(self.name)}"
        return (f"forgot {quoted(self.name)}, but could not remove {'; '.join(self.left_behind)}: remove it by hand "
                "(the store retries each time it is opened)")
