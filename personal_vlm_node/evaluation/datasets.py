"""The dataset layouts of ``personal-vlm eval`` (generic, PerVA, Yo'LLaVA, MyVLM) and the pairs they give.

See :mod:`personal_vlm_node.evaluation` for the layouts and the protocol.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PersonalVLMError
from ..images import IMAGE_SUFFIXES

LAYOUTS = ("generic", "perva", "yollava", "myvlm")
MAX_SHOTS = 8          # the Assistant's limit of reference images per concept


NEGATIVE_EXAMPLES = "negative_example"     # Yo'LLaVA: train/<concept>/negative_example/


@dataclass
class Query:
    image: Path
    concepts: tuple[str, ...]     # the concepts present in the image
    key: str                      # the image's path relative to the dataset root: the resume key
    negative_for: str | None = None   # a hard negative of this one concept, paired with it only


@dataclass
class Dataset:
    root: Path
    layout: str
    shots: int
    references: dict[str, list[Path]]      # concept → its reference images (the first `shots`)
    queries: list[Query]
    categories: dict[str, str] = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.references)


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=_natural_key)


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key) \
        if folder.is_dir() else []


def detect_layout(root: Path) -> str:
    """The layout of ``root`` (see the module docstring); PersonalVLMError when none fits."""
    root = Path(root)
    if not root.is_dir():
        raise PersonalVLMError(f"dataset folder not found: {root}")
    if (root / "queries.json").is_file() and (root / "concepts").is_dir():
        return "generic"
    if (root / "train").is_dir() and (root / "test").is_dir():
        if any((c / NEGATIVE_EXAMPLES).is_dir() for c in _subdirs(root / "train")):
            return "yollava"
        return "perva"
    children = _subdirs(root)
    if any((c / "train").is_dir() and (c / "test").is_dir() for c in children):
        return "yollava"
    if any(_images(c) for c in children):
        return "myvlm"
    raise PersonalVLMError(
        f"{root} matches no dataset layout: expected queries.json + concepts/ (generic), "
        "train/ + test/ (PerVA), <concept>/train + <concept>/test (Yo'LLaVA) or <concept>/<images> (MyVLM)")


def _concept_name(folder_name: str, where: Path) -> str:
    from ..names import validate_name

    try:
        return validate_name(folder_name)
    except PersonalVLMError as exc:
        raise PersonalVLMError(f"{where}: the folder name is not a usable concept name ({exc})") from exc


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _perva_concepts(split: Path) -> dict[str, tuple[str, Path]]:
    """concept → (category, folder) under one split; a split without categories has category ""."""
    found: dict[str, tuple[str, Path]] = {}
    for first in _subdirs(split):
        nested = [d for d in _subdirs(first) if _images(d) and d.name != NEGATIVE_EXAMPLES]
        entries = [(first.name, d) for d in nested] if nested else [("", first)]
        for category, folder in entries:
            name = _concept_name(folder.name, folder)
            if name in found:
                name = _concept_name(f"{folder.name} ({category})", folder)
            found[name] = (category, folder)
    return found


def _read_test_list(path: Path, root: Path) -> set[str]:
    if not Path(path).is_file():
        raise PersonalVLMError(f"test list not found: {path}")
    entries = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.add(Path(line).as_posix() if not Path(line).is_absolute() else _relative(Path(line), root))
    return entries


def load_dataset(root, layout: str = "auto", shots: int = 1, test_list=None, test_last: int | None = None) -> Dataset:
    """Reference images and queries of the dataset at ``root`` (layouts in the module docstring)."""
    root = Path(root).expanduser().resolve()
    if not isinstance(shots, int) or not 1 <= shots <= MAX_SHOTS:
        raise PersonalVLMError(f"--shots must be between 1 and {MAX_SHOTS}, got {shots!r}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise PersonalVLMError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise PersonalVLMError(f"dataset folder not found: {root}")
    train: dict[str, list[Path]] = {}
    queries: list[Query] = []
    categories: dict[str, str] = {}

    if layout == "generic":
        for folder in _subdirs(root / "concepts"):
            train[_concept_name(folder.name, folder)] = _images(folder)
        try:
            listed = json.loads((root / "queries.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PersonalVLMError(f"{root / 'queries.json'} is not readable JSON: {exc}") from exc
        listed = listed.get("queries", []) if isinstance(listed, dict) else listed
        if not isinstance(listed, list):
            raise PersonalVLMError(f"{root / 'queries.json'} must hold a list of {{\"image\", \"concepts\"}}")
        for i, entry in enumerate(listed):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise PersonalVLMError(f"queries.json entry {i} needs an \"image\" path")
            present = entry.get("concepts") or []
            present = [present] if isinstance(present, str) else list(present)
            unknown = [c for c in present if c not in train]
            if unknown:
                raise PersonalVLMError(f"queries.json entry {i} names concepts without a folder in concepts/: {unknown}")
            image = (root / entry["image"]).resolve()
            queries.append(Query(image, tuple(present), Path(entry["image"]).as_posix()))

    elif layout == "perva":
        train_concepts = _perva_concepts(root / "train")
        test_concepts = _perva_concepts(root / "test")
        for name, (category, folder) in train_concepts.items():
            train[name] = _images(folder)
            categories[name] = category
        for name, (_, folder) in test_concepts.items():
            if name not in train:
                raise PersonalVLMError(f"{folder} has test images but no training images under train/")
            queries += [Query(p, (name,), _relative(p, root)) for p in _images(folder)]

    elif layout == "yollava" and (root / "train").is_dir() and (root / "test").is_dir():
        for folder in _subdirs(root / "train"):
            name = _concept_name(folder.name, folder)
            train[name] = _images(folder)
        for folder in _subdirs(root / "test"):
            name = _concept_name(folder.name, folder)
            if name not in train:
                raise PersonalVLMError(f"{folder} has test images but no training images under train/")
            queries += [Query(p, (name,), _relative(p, root)) for p in _images(folder)]
        for name in list(train):
            negatives = _images(root / "train" / name / NEGATIVE_EXAMPLES)
            queries += [Query(p, (), _relative(p, root), negative_for=name) for p in negatives]

    elif layout == "yollava":
        for folder in _subdirs(root):
            if (folder / "train").is_dir():
                name = _concept_name(folder.name, folder)
                train[name] = _images(folder / "train")
                queries += [Query(p, (name,), _relative(p, root)) for p in _images(folder / "test")]

    else:   # myvlm
        listed = _read_test_list(test_list, root) if test_list else None
        if test_last is not None and test_last < 1:
            raise PersonalVLMError(f"--test-last must be at least 1, got {test_last}")
        for folder in _subdirs(root):
            images = _images(folder)
            if not images:
                continue
            name = _concept_name(folder.name, folder)
            if listed is not None:
                tests = [p for p in images if _relative(p, root) in listed]
            elif test_last is not None:
                tests = images[-test_last:] if test_last < len(images) else []
                if not tests:
                    raise PersonalVLMError(f"{folder} has {len(images)} images: too few to keep the last "
                                           f"{test_last} as queries and still teach from one")
            else:
                tests = images[shots:]
            train[name] = [p for p in images if p not in tests]
            queries += [Query(p, (name,), _relative(p, root)) for p in tests]

    empty = [n for n, refs in train.items() if not refs]
    if empty:
        raise PersonalVLMError(f"no reference images for {', '.join(map(repr, empty))} in {root}")
    if not train:
        raise PersonalVLMError(f"no concepts found in {root} (layout {layout})")
    if not queries:
        raise PersonalVLMError(f"no query images found in {root} (layout {layout})")
    references = {name: images[:shots] for name, images in train.items()}
    return Dataset(root, layout, shots, references, queries, categories)


def pairs(dataset: Dataset) -> list[tuple[Query, str, bool]]:
    """Every (query, concept, positive?) pair of the protocol."""
    return [(q, c, c in q.concepts) for q in dataset.queries for c in dataset.concepts
            if q.negative_for is None or c == q.negative_for]
