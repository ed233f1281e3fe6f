"""Every concept's ICPT prompt for the loaded projector, stored beside its Ego memory.

A prompt P_c (L_c, D) is one forward pass of the projector over the concept's reference views
(:func:`.icpt.make_prompt`). Teaching writes it into the concept's memory file for this backbone
(memories are per backbone, so prompts are too), under ``icpt_prompt``, with the id of the projector
that made it under ``icpt_projector``. A concept taught before a projector existed, or by another
projector, gets its prompt from its stored reference pictures the first time it is needed; that
prompt is then stored the same way (or, where the library cannot be written, kept in memory).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import torch

from .errors import PersonalVLMError
from .vlm.base import ImageTokens, Memory

log = logging.getLogger(__name__)

PROMPT_KEY = "icpt_prompt"          # (L_c, D) in the memory file
PROJECTOR_KEY = "icpt_projector"    # (16,) uint8: the id of the projector that made it
MAX_CACHED = 4096                   # prompts made on demand and kept in memory


def projector_id(path: str | Path) -> str:
    """The projector file's id: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _id_tensor(ident: str) -> torch.Tensor:
    return torch.tensor(list(ident.encode("ascii")), dtype=torch.uint8)      # (16,)


def _id_of(tensor) -> str | None:
    if tensor is None:
        return None
    try:
        return bytes(tensor.to(torch.uint8).tolist()).decode("ascii")
    except (UnicodeDecodeError, ValueError):
        return None


def stored_prompt(memory: dict, ident: str, name: str) -> Memory | None:
    """The prompt in a stored memory dict when ``ident``'s projector made it, else None."""
    prompt = memory.get(PROMPT_KEY)
    if prompt is None or _id_of(memory.get(PROJECTOR_KEY)) != ident or prompt.ndim != 2 or prompt.shape[0] == 0:
        return None
    return Memory(prompt.float(), name)


class ConceptPrompts:
    """ICPT prompts of the library's concepts for one projector and one backbone.

    ``encode_reference(picture)`` encodes a stored reference picture (the Assistant's).
    """

    def __init__(self, vlm, projector, path: str | Path, store, encode_reference):
        self.vlm, self.projector, self.store = vlm, projector, store
        self.path = Path(path)
        self.id = projector_id(path)
        self.encode_reference = encode_reference
        self._made: dict[tuple[str, float], Memory] = {}       # (name, record updated) → prompt
        self._lock = threading.Lock()

    def make(self, images: list[ImageTokens], name: str) -> Memory:
        from . import icpt

        return icpt.make_prompt(self.vlm, self.projector, images[:icpt.MAX_VIEWS], name)

    def attach(self, memory: dict, images: list[ImageTokens], name: str) -> tuple[dict, float]:
        """``memory`` with ``name``'s prompt from the views ``images`` beside it; the seconds it took."""
        t0 = time.perf_counter()
        prompt = self.make(images, name)
        return {**memory, PROMPT_KEY: prompt.tokens, PROJECTOR_KEY: _id_tensor(self.id)}, time.perf_counter() - t0

    def prompt(self, name: str) -> Memory:
        """``name``'s prompt: the stored one, or one made now from its stored pictures (and stored)."""
        stored = self.store.load_memory(name, model=self.vlm.identity)
        found = stored_prompt(stored, self.id, name)
        if found is not None:
            return found
        record = self.store.get(name)
        key = (record.name, record.updated)
        with self._lock:
            if key in self._made:
                return self._made[key]
            pictures = self.store.load_images(name)
            if not pictures:
                raise PersonalVLMError(f"concept {name!r} has no stored pictures to make its ICPT prompt from; "
                                       "teach it again")
            prompt = self.make([self.encode_reference(p) for p in pictures], record.name)
            try:
                self.store.replace_memory(record.name, {**stored, PROMPT_KEY: prompt.tokens,
                                                        PROJECTOR_KEY: _id_tensor(self.id)},
                                          self.vlm.identity, record.memory_tokens)
            except PersonalVLMError as exc:       # a read-only or offline library: keep it here
                log.info("ICPT prompt of %r kept in memory only: %s", record.name, exc)
            if len(self._made) >= MAX_CACHED:
                self._made.clear()
            self._made[key] = prompt
            return prompt
