"""ConceptBank: the matcher's memories of every concept, kept in step with the concept store.

The store is the truth and may be changed by other processes (another node, the CLI); the bank
holds what this model matches against. It loads this model's memory of every concept, follows
the store's changes (:meth:`ConceptBank.refresh`, or a watcher thread), stops matching a concept
the moment it is forgotten, and rebuilds, from the stored reference pictures, memories that this
model has not got yet. A concept whose files are damaged is left out and reported; the others
are still recognised.

A fleet library larger than ``resident_limit`` concepts (of this model) is not held whole: the bank
keeps at most that many memories resident — the most recently taught at the start, then what the
frames ask for — and before each frame is scored, :meth:`ConceptBank.prefetch` asks the library's
pgvector index (:meth:`~personal_vlm_node.store.postgres.PostgresLibrary.nearest`) for the concepts
nearest to the frame's region means, loads those not resident and lets the least recently wanted
go. Offline, the resident ones are matched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from . import ego
from .errors import PersonalVLMError
from .frames import FramePath
from .matcher import Matcher, region_queries
from .store import ConceptRecord, ConceptStore, ForgetResult, MemoryMissing, validate_name
from .vlm import VLMAdapter

log = logging.getLogger(__name__)


class ConceptBank:
    """This model's memories in the matcher, the store's categories, and what could not be loaded.

    ``frames`` is told when a concept's memory goes away (its track and verdicts end) or changes
    (its verdicts are stale). ``encode_reference(picture)`` encodes a stored reference picture
    for a rebuild; ``background`` runs rebuilds that :meth:`refresh` finds are needed.
    """

    def __init__(self, store: ConceptStore, vlm: VLMAdapter, matcher: Matcher, frames: FramePath,
                 introduction: ego.IntroductionOptions, encode_reference: Callable, background: Executor,
                 progress: Callable[[str], None], rebuild: bool = True, resident_limit: int | None = None):
        self.store, self.vlm, self.matcher, self.frames = store, vlm, matcher, frames
        self.introduction = introduction
        self.encode_reference = encode_reference
        self.background = background
        self.progress = progress
        self.rebuild = rebuild
        self.lock = threading.Lock()             # the bank's versions: the store watcher vs. teach/forget
        self.categories: dict[str, str] = {}     # every stored concept → its category
        self.versions: dict[str, str] = {}       # name → id of the memory in the matcher
        self.unmatched: set[str] = set()          # concepts with no memory for this model
        self.damaged: dict[str, str] = {}         # concepts left out because their files are damaged → why
        self.listeners: list = []                 # called (no arguments) whenever the bank of concepts changed
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._watcher = store.watch()
        self.resident_limit = resident_limit
        self.large = False                        # a library too large to hold whole: see prefetch()
        self.available: dict[str, str] = {}      # large: every concept with a memory for this model → its id
        self._wanted: dict[str, float] = {}      # large: resident concept → when a frame last wanted it
        frames.prefetch = self.prefetch           # the frame path asks before it scores a frame

    def _too_large(self, versions: dict) -> bool:
        return self.resident_limit is not None and self.store.indexed and len(versions) > self.resident_limit

    def recognizable(self) -> list[str]:
        """Every concept this model can find: in the matcher, or (a large library) on demand."""
        return sorted(self.available) if self.large else list(self.matcher.names)

    # ---- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load this model's memory of every concept into the matcher; others are never matched."""
        with self.lock:
            self._watcher.changed()            # what is loaded now is current
            versions = self.store.memory_versions(self.vlm.identity)
            records = self.store.list()
            self.large = self._too_large(versions)
            if self.large:
                self.available = dict(versions)
                newest = sorted((r for r in records if r.name in versions), key=lambda r: -r.updated)
                versions = {r.name: versions[r.name] for r in newest[:self.resident_limit]}
                self._wanted = {name: 0.0 for name in versions}
            bank = {}
            for record in records:
                self.categories[record.name] = record.category
                if record.name not in versions:
                    continue
                try:
                    bank[record.name] = self.checked_memory(record.name)
                except MemoryMissing:
                    versions.pop(record.name)
                except PersonalVLMError as exc:
                    self._set_damaged(record.name, exc)
                    versions.pop(record.name)
            self.matcher.set_concepts(bank)
            self.versions = versions
            self._report_unmatched(set(self.categories) - set(bank) - set(self.damaged) - set(self.available))

    def stored_memory(self, name: str) -> dict:
        """This model's stored memory of ``name``: the tokens and their layout (positions, grids);
        MemoryMissing when it has none."""
        return self.store.load_memory(name, model=self.vlm.identity)

    def checked_memory(self, name: str):
        """The (K_c, D) memory of ``name``, refused as damage unless it has this model's size.

        The store already refuses unreadable files and non-finite values; this catches a memory
        file that reads but cannot be matched, so one bad concept never stops the others.
        """
        try:
            memory = self.stored_memory(name)["memory"]
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

    # ---- following the store ------------------------------------------------------------------
    def refresh(self) -> bool:
        """Follow changes other processes made to the store; True when the bank changed.

        One cheap query when nothing changed. A concept taught elsewhere becomes matchable, a
        forgotten one stops being detected at once, a re-taught one is reloaded; a concept with no
        memory for this model is reported (and rebuilt in the background when rebuilding is on).
        """
        if not self._watcher.changed():
            return False
        with self.lock:
            versions = self.store.memory_versions(self.vlm.identity)
            records = {r.name: r for r in self.store.list()}
            every = versions
            if self.large or self._too_large(versions):
                # Only what is resident is followed, and what was newly taught is loaded.
                known = set(self.available) | set(self.versions)
                self.available, self.large = dict(versions), True
                versions = {n: v for n, v in versions.items() if n in self.versions or n not in known}
            changed = False
            for name in list(self.versions):
                if name not in versions:
                    self._drop(name)
                    changed = True
            for name in list(self.damaged):
                if name not in versions:
                    self.damaged.pop(name)
            for name, version in versions.items():
                if self.versions.get(name) == version:
                    continue
                try:
                    memory = self.checked_memory(name)
                except MemoryMissing as exc:          # changed again meanwhile: the next check sees it
                    log.info("%s", exc)
                    continue
                except PersonalVLMError as exc:
                    if name in self.versions:         # a damaged new version replaces the old one
                        self._drop(name)
                        changed = True
                    self._set_damaged(name, exc)
                    continue
                self.damaged.pop(name, None)
                self.matcher.add(name, memory)
                self.frames.invalidate(name)
                self.versions[name] = version
                changed = True
            for name in list(self.categories):
                if name not in records:
                    self.categories.pop(name, None)
            for name, record in records.items():
                self.categories[name] = record.category
            missing = set(records) - set(every)
            newly_missing = missing - self.unmatched
            self._report_unmatched(missing)
            if self.large:
                now = time.monotonic()
                for name in self.versions:
                    self._wanted.setdefault(name, now)
                changed |= self._evict(keep=set())
        if newly_missing and self.rebuild:
            self.background.submit(self.rebuild_stale_memories)
        if changed:
            self.changed()
        return changed

    # ---- a library too large to hold whole -------------------------------------------------------
    def prefetch(self, features, token_boxes=None) -> None:
        """Before a frame (N, D) is scored: make resident the concepts the library's index finds
        nearest to its region means (at most the matcher's ``prefilter_top``). A no-op unless the
        library is large; offline, the resident concepts are matched as they are."""
        if not self.large:
            return
        try:
            names = self.store.nearest(self.vlm.identity, region_queries(features, token_boxes),
                                       min(self.matcher.prefilter_top, self.resident_limit))
        except PersonalVLMError as exc:
            log.debug("prefilter from the library skipped: %s", exc)
            return
        now = time.monotonic()
        with self.lock:
            loaded = {}
            for name in names:
                if name in self.versions:
                    self._wanted[name] = now
                elif name in self.available and name not in self.damaged:
                    try:
                        loaded[name] = self.checked_memory(name)
                    except MemoryMissing:
                        continue
                    except PersonalVLMError as exc:
                        self._set_damaged(name, exc)
                        continue
                    self._wanted[name] = now
            if loaded:
                self.matcher.update(add=loaded)
                for name in loaded:
                    self.versions[name] = self.available[name]
            self._evict(keep=set(names))

    def _evict(self, keep: set[str]) -> bool:
        """Let the least recently wanted resident concepts go, beyond ``resident_limit``."""
        extra = len(self.versions) - (self.resident_limit or len(self.versions))
        if extra <= 0:
            return False
        order = sorted((n for n in self.versions if n not in keep), key=lambda n: self._wanted.get(n, 0.0))
        gone = order[:extra]
        self.matcher.update(remove=gone)
        for name in gone:
            self.versions.pop(name, None)
            self._wanted.pop(name, None)
            self.frames.forget(name)
        return bool(gone)

    def watch(self, period: float = 0.2) -> None:
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

    def close(self) -> None:
        """Stop watching the store."""
        self._watch_stop.set()
        if self._watch_thread is not None and self._watch_thread is not threading.current_thread():
            self._watch_thread.join(5.0)
        if self._watch_thread is None or not self._watch_thread.is_alive():
            self._watcher.close()

    def changed(self) -> None:
        """Tell :attr:`listeners` that the concepts matched against changed (teach, forget, or
        another process's change seen by :meth:`refresh`)."""
        for listener in list(self.listeners):
            listener()

    # ---- this process's own changes -------------------------------------------------------------
    def add(self, record: ConceptRecord, memory: dict, pictures: list, overwrite: bool = False) -> None:
        """Store a concept whose memory is already built and make it matchable at once."""
        with self.lock:
            self.store.add(record, memory, pictures, overwrite=overwrite)
            self.matcher.add(record.name, memory["memory"])
            self.categories[record.name] = record.category
            self.frames.invalidate(record.name)
            self.versions[record.name] = self.store.memory_versions(self.vlm.identity).get(record.name, "")
            if self.large:
                self.available[record.name] = self.versions[record.name]
                self._wanted[record.name] = time.monotonic()
                self._evict(keep={record.name})
        self.changed()

    def forget(self, name: str) -> ForgetResult:
        """Forget ``name`` everywhere; the result names any folder that could not be removed."""
        name = validate_name(name)
        with self.lock:
            result = self.store.forget(name)
            self._drop(name)
            self.categories.pop(name, None)
            self.unmatched.discard(name)
            self.damaged.pop(name, None)
        if result.left_behind:
            log.warning("%s", result.message)
        self.changed()
        return result

    def _drop(self, name: str) -> None:
        self.matcher.remove(name)
        self.frames.forget(name)
        self.versions.pop(name, None)
        self.available.pop(name, None)
        self._wanted.pop(name, None)

    def rebuild_stale_memories(self) -> list[str]:
        """Rebuild, from the stored reference images, every memory missing for this model.

        Memories of this model in another precision are cast when used, not rebuilt.
        """
        have = self.store.memory_versions(self.vlm.identity)
        stale = [r for r in self.store.list() if r.name not in have]
        return self._rebuild(stale, "for this model")

    def rebuild_memories_of_other_layers(self, layers: list[int], background: bool = True) -> list[str]:
        """Pick again, with Ego's attention at ``layers``, the memories of this model that were
        picked at other layers (taught before a calibration changed them); in the background unless
        told otherwise. Concepts that do not say which layers picked them are left as they are."""
        have = self.store.memory_versions(self.vlm.identity)
        other = [r for r in self.store.list() if r.name in have and r.extra.get("layers") is not None
                 and list(r.extra["layers"]) != list(layers)]
        if other:
            if background:
                self.background.submit(self._rebuild, other, "with the calibrated layers")
            else:
                self._rebuild(other, "with the calibrated layers")
        return [r.name for r in other]

    def _rebuild(self, records: list, why: str) -> list[str]:
        for i, record in enumerate(records):
            self.progress(f"rebuilding the memory of {record.name!r} {why} ({i + 1}/{len(records)})")
            try:
                images = self.store.load_images(record.name)
                tokens = [self.encode_reference(image) for image in images]
                intro = ego.introduce(self.vlm, tokens, record.name, record.category, self.introduction,
                                      rois=record.extra.get("rois"))
                self.store.replace_memory(record.name, intro.memory, self.vlm.identity, intro.memory_tokens,
                                          extra={**record.extra, "rebuilt": time.time(),
                                                 "layers": list(self.introduction.layers)})
            except PersonalVLMError as exc:
                self.progress(f"could not rebuild {record.name!r}: {exc}; it is not matched with this model")
        return [r.name for r in records]
