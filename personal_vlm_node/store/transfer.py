"""Copying concepts between libraries (``personal-vlm store push`` / ``pull``) and checking one.

A copy carries each concept whole — its record (name, category, keywords, fingerprint, ROIs…), its
reference pictures and its memory for every backbone it has one for — through
:class:`~personal_vlm_node.store.library.ConceptLibrary`'s operations only, so it works between any
two backends: a local folder into a fleet library and back, or between two libraries. Each concept
is one atomic write in the target; a concept the target has already is left alone unless
``overwrite``. Nothing is ever removed from the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from personal_vlm_node.errors import PersonalVLMError
from personal_vlm_node.names import quoted
from .library import ConceptLibrary


@dataclass
class CopyReport:
    source: str
    target: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)         # already in the target
    failed: dict[str, str] = field(default_factory=dict)     # name → why (damaged in the source, refused)

    def as_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "copied": self.copied, "skipped": self.skipped,
                "failed": self.failed}

    def lines(self) -> list[str]:
        lines = [f"copied {len(self.copied)} concept(s) from {self.source} to {self.target}"]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} alone that {self.target} has already (pass --overwrite to "
                         f"replace them): {', '.join(quoted(n) for n in self.skipped[:10])}"
                         + (", ..." if len(self.skipped) > 10 else ""))
        lines += [f"not copied {quoted(name)}: {why}" for name, why in sorted(self.failed.items())]
        return lines


def _tokens(memory: dict, fallback: int) -> int:
    tokens = memory.get("memory")
    return int(tokens.shape[0]) if getattr(tokens, "ndim", 0) == 2 else fallback


def copy_concepts(source: ConceptLibrary, target: ConceptLibrary, overwrite: bool = False,
                  progress=None) -> CopyReport:
    if target.read_only:
        raise PersonalVLMError(f"{target.location()} cannot be written; nothing was copied")
    report = CopyReport(source.location(), target.location())
    names = source.names()
    have = set(target.names())
    for i, name in enumerate(names, 1):
        if progress:
            progress(f"copying {quoted(name)} ({i}/{len(names)})")
        if name in have and not overwrite:
            report.skipped.append(name)
            continue
        try:
            record = source.get(name)
            taught, *others = source.memory_models(name)
            memory = source.load_memory(name, taught)
            pictures = source.load_images(name)
            extra_memories = [(identity, source.load_memory(name, identity)) for identity in others]
            # A name refused by the target (a look-alike of one it has) stops this concept only.
            target.add(replace(record, model_identity=taught), memory, pictures, overwrite=overwrite)
            for identity, other in extra_memories:
                target.replace_memory(name, other, identity, _tokens(other, record.memory_tokens))
        except PersonalVLMError as e:
            report.failed[name] = str(e)
            continue
        report.copied.append(name)
    return report


@dataclass
class CheckReport:
    location: str
    concepts: int
    problems: dict[str, str]
    memories: dict[str, int]        # model identity → concepts with a memory for it

    def as_dict(self) -> dict:
        return {"location": self.location, "concepts": self.concepts, "problems": self.problems,
                "memories": self.memories, "healthy": not self.problems}

    def lines(self) -> list[str]:
        lines = [f"{self.location}: {self.concepts} concept(s), "
                 + ("all readable" if not self.problems else f"{len(self.problems)} damaged")]
        lines += [f"  memories for {identity}: {count}" for identity, count in sorted(self.memories.items())]
        lines += [f"  DAMAGED {quoted(name)}: {why}" for name, why in sorted(self.problems.items())]
        return lines


def check_library(library: ConceptLibrary) -> CheckReport:
    """Every concept's record, memories and pictures read back; what cannot be, and why."""
    problems = dict(library.problems())
    memories: dict[str, int] = {}
    names = library.names()
    for name in names:
        if name in problems:
            continue
        try:
            for identity in library.memory_models(name):
                library.load_memory(name, identity)
                memories[identity] = memories.get(identity, 0) + 1
            if not library.load_images(name):
                problems[name] = "it has no reference picture"
        except PersonalVLMError as e:
            problems[name] = str(e)
    return CheckReport(library.location(), len(names), problems, memories)
