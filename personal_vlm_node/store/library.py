"""ConceptLibrary: what the rest of the package may ask of a concept store, whatever keeps it.

The assistant, the CLI, the evaluation and the node use a store only through these operations.
:class:`~personal_vlm_node.store.local.ConceptStore` keeps them in one local folder (an SQLite
index and one folder per version); a library shared by several robots implements the same
operations over a database, and ``test/test_store_contract.py`` holds every backend to the same
behaviour.

What every backend promises:

- a write is atomic: after a crash at any instant a concept is wholly present or wholly absent;
- names are checked with :mod:`personal_vlm_node.names` (``validate_name``, look-alikes refused);
- a memory is keyed by :func:`~personal_vlm_node.store.records.model_key` of the model identity
  it was built with, so memories of two models never replace each other;
- reads of damaged data raise :class:`~personal_vlm_node.errors.PersonalVLMError` saying what to
  do, and ``list`` leaves damaged concepts out (``problems`` says why);
- ``watch()`` returns a cheap probe whose ``changed()`` is true after any writer's commit, this
  process's or another's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from PIL import Image

from .records import ConceptRecord, ForgetResult


class LibraryWatcher(Protocol):
    """Tells whether anyone committed a change since the last call."""

    def changed(self) -> bool: ...

    def close(self) -> None: ...


class ConceptLibrary(ABC):
    """The concepts a user taught: records, memories per model, reference pictures."""

    read_only: bool = False      # every read works; a write raises one line saying why
    indexed: bool = False        # nearest() answers from a vector index: a library too large to hold
                                 # whole is matched through it (ConceptBank.prefetch)

    @abstractmethod
    def location(self) -> str:
        """Where the concepts are kept, as a user would write it (a folder, a database URL
        without its password)."""

    # ---- writes ------------------------------------------------------------------------------
    @abstractmethod
    def add(self, record: ConceptRecord, memory: dict[str, torch.Tensor], images: list[Image.Image],
            overwrite: bool = False) -> ConceptRecord:
        """Store a new concept (or, with ``overwrite``, replace one) with its memory and pictures."""

    @abstractmethod
    def update_fingerprint(self, name: str, fingerprint: dict, keywords: list[str] | None = None,
                           expected_created: float | None = None) -> ConceptRecord:
        """Record a concept's completed R2P fingerprint; with ``expected_created``, only on the
        version created then (a concept re-taught meanwhile raises)."""

    @abstractmethod
    def replace_memory(self, name: str, memory: dict[str, torch.Tensor], model_identity: str,
                       memory_tokens: int, extra: dict | None = None) -> ConceptRecord:
        """Store a memory rebuilt from the stored pictures for the model ``model_identity``."""

    @abstractmethod
    def forget(self, name: str) -> ForgetResult:
        """Delete the concept: its record, its memories and its reference pictures."""

    # ---- reads -------------------------------------------------------------------------------
    @abstractmethod
    def check_new_name(self, name: str) -> str:
        """``name`` as it would be stored, or PersonalVLMError (invalid, or a look-alike)."""

    @abstractmethod
    def get(self, name: str) -> ConceptRecord:
        """The concept's record; PersonalVLMError when there is none or it is damaged."""

    @abstractmethod
    def __contains__(self, name: object) -> bool: ...

    @abstractmethod
    def names(self) -> list[str]:
        """Every concept's name, sorted, damaged ones included."""

    @abstractmethod
    def list(self) -> list[ConceptRecord]:
        """All readable records, sorted by name."""

    @abstractmethod
    def problems(self) -> dict[str, str]:
        """Concept name → why it is damaged."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_memory(self, name: str, model: str | None = None) -> dict[str, torch.Tensor]:
        """The concept's memory exactly as stored (for ``model``'s identity when given), on CPU."""

    @abstractmethod
    def has_memory(self, name: str, model: str) -> bool:
        """Whether the concept has a memory built for ``model``."""

    @abstractmethod
    def memory_versions(self, model: str) -> dict[str, str]:
        """Concept name → an id of its memory for ``model``, that changes whenever it is replaced."""

    @abstractmethod
    def watch(self) -> LibraryWatcher:
        """A cheap probe for commits by anyone."""

    @abstractmethod
    def load_images(self, name: str) -> list[Image.Image]:
        """The reference pictures as stored, fully loaded."""

    @abstractmethod
    def memory_models(self, name: str) -> list[str]:
        """The model identities the concept has a memory for (the one it was taught with first)."""

    def nearest(self, model: str, queries: torch.Tensor, k: int) -> list[str]:
        """The ``k`` concepts whose pooled memory vector for ``model`` is nearest to any of
        ``queries`` (Q, D); only where ``indexed``."""
        raise NotImplementedError(f"{type(self).__name__} has no vector index")

    # ---- the backend's own state -----------------------------------------------------------
    def health(self) -> str | None:
        """None when every operation can be served; else one line saying what cannot, and why."""
        return None

    def close(self) -> None:
        """Let go of connections and files (a no-op where there are none)."""
