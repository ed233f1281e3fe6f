"""``personal-vlm eval``: how well taught concepts are recognised, on a personalization dataset.

Protocol (the recognition task of MyVLM, Yo'LLaVA and R2P): each concept is taught from its first
``--shots`` training images (sorted by name, numbers in natural order); each test image is a
query; every (query, concept) pair is a *positive* when the concept is in the query and a
*negative* otherwise. A method says present / absent for every pair:

- ``match``    the matcher's late-interaction score s_c ≥ the accept threshold;
- ``ego``      Ego's in-context check, p_yes ≥ the recognition threshold;
- ``r2p``      R2P's decision among the matcher's top ``--r2p-pool`` concepts (present iff chosen);
- ``cascade``  what the frame path does: the matcher's accept / reject stand, its uncertain band
               goes to Ego, and R2P settles what Ego is unsure of (|p_yes − threshold| < margin).

Metrics, per concept and over all pairs:
    positive accuracy  TP / (TP + FN)      (recall on positives)
    negative accuracy  TN / (TN + FP)      (specificity on negatives)
    Wtd                ½ (positive accuracy + negative accuracy)
    precision          TP / (TP + FP),   recall = positive accuracy,   F1 = 2PR / (P + R)
A ratio with a zero denominator is reported as null. Also: seconds per query and per concept
introduction (until usable, and until its fingerprint is complete).

Dataset layouts (``--layout auto`` detects them in this order):

- ``generic``  ``ROOT/concepts/<name>/*`` reference images of each concept (the first ``--shots``
               are used) and ``ROOT/queries.json``: a list of ``{"image": "path/relative/to/ROOT",
               "concepts": ["names", "present"]}``; an empty list is a pure negative, several
               names a multi-concept image.
- ``perva``    ``ROOT/{train,test}/<category>/<concept>/*`` (PerVA); ``ROOT/{train,test}/<concept>/*``
               without the category level is read the same way.
- ``yollava``  ``ROOT/<concept>/{train,test}/*`` (Yo'LLaVA).
- ``myvlm``    ``ROOT/<concept>/*`` (MyVLM). The queries are the images listed in ``--test-list``
               (one ``<concept>/<file>`` per line, relative to ROOT; ``#`` comments) or else the
               last ``--test-last N`` images of each concept (default: every image after the
               first ``--shots``); the references are the first ``--shots`` of the others.

Outputs in ``--out DIR``: ``results.json``, ``results.md`` (tables), ``wtd_per_concept.png`` and
``score_histogram.png``; ``progress.jsonl`` gets one line per query as it completes and a rerun
skips the queries already there, so an interrupted run (Ctrl-C) resumes where it stopped. The
concepts are taught into ``DIR/store``, never into the user's own store.
"""

from __future__ import annotations

import torch

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PersonalVLMError

LAYOUTS = ("generic", "perva", "yollava", "myvlm")
METHODS = ("match", "ego", "r2p", "cascade")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MAX_SHOTS = 8          # the Assistant's limit of reference images per concept

PROGRESS_FILE = "progress.jsonl"
INTRODUCTIONS_FILE = "introductions.jsonl"
SETTINGS_FILE = "run.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
WTD_PLOT = "wtd_per_concept.png"
HISTOGRAM_PLOT = "score_histogram.png"


def _say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


# ---- datasets ------------------------------------------------------------------------------
@dataclass
class Query:
    image: Path
    concepts: tuple[str, ...]     # the concepts present in the image
    key: str                      # the image's path relative to the dataset root: the resume key


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
    from .store import validate_name

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
        nested = [d for d in _subdirs(first) if _images(d)]
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
    return [(q, c, c in q.concepts) for q in dataset.queries for c in dataset.concepts]


# ---- metrics -----------------------------------------------------------------------------
@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, positive: bool, predicted: bool) -> None:
        if positive:
            if predicted:
                self.tp += 1
            else:
                self.fn += 1
        elif predicted:
            self.fp += 1
        else:
            self.tn += 1


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def recognition_metrics(counts: Counts) -> dict:
    """Positive / negative / weighted accuracy, precision, recall, F1 (None where undefined)."""
    positive = _ratio(counts.tp, counts.tp + counts.fn)
    negative = _ratio(counts.tn, counts.tn + counts.fp)
    precision = _ratio(counts.tp, counts.tp + counts.fp)
    weighted = None if positive is None or negative is None else (positive + negative) / 2
    if precision is None or positive is None:
        f1 = None
    else:
        f1 = 0.0 if precision + positive == 0 else 2 * precision * positive / (precision + positive)
    return {**asdict(counts), "positives": counts.tp + counts.fn, "negatives": counts.tn + counts.fp,
            "positive_accuracy": positive, "negative_accuracy": negative, "weighted_accuracy": weighted,
            "precision": precision, "recall": positive, "f1": f1}


def summarize(records: list[dict], concepts: list[str]) -> dict:
    """Overall and per-concept metrics from per-query records (records with an error are skipped)."""
    overall, per_concept = Counts(), {c: Counts() for c in concepts}
    sources: dict[str, int] = {}
    for record in records:
        for pair in record.get("pairs", []):
            if pair["concept"] not in per_concept:
                continue
            overall.add(pair["label"], pair["predicted"])
            per_concept[pair["concept"]].add(pair["label"], pair["predicted"])
            sources[pair["source"]] = sources.get(pair["source"], 0) + 1
    per = {c: recognition_metrics(k) for c, k in per_concept.items()}
    weighted = [m["weighted_accuracy"] for m in per.values() if m["weighted_accuracy"] is not None]
    return {"overall": recognition_metrics(overall), "per_concept": per, "decided_by": sources,
            "macro_weighted_accuracy": sum(weighted) / len(weighted) if weighted else None}


# ---- running the methods --------------------------------------------------------------------
@dataclass
class EvalOptions:
    method: str = "match"
    accept: float | None = None            # None: the model profile's thresholds
    reject: float | None = None
    threshold: float | None = None         # Ego p_yes threshold; None: the profile's recognize_threshold
    margin: float | None = None            # cascade: R2P when |p_yes − threshold| < margin; None: the profile's
    top_k: int = 3
    pairwise_threshold: float = 0.5
    pairwise_reference: str = "image"      # R2P pairwise beside the reference picture, or "memory"
    verifier_model: str | None = None      # CLIP / SigLIP for R2P; None: the VLM checks attributes
    r2p_pool: int = 10                     # R2P's candidates: the matcher's top concepts
    max_queries: int | None = None         # evaluate only the first N queries (a rerun can extend)

    def check(self) -> EvalOptions:
        if self.method not in METHODS:
            raise PersonalVLMError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.r2p_pool < 1 or self.top_k < 1:
            raise PersonalVLMError("--r2p-pool and --top-k must be at least 1")
        if self.max_queries is not None and self.max_queries < 1:
            raise PersonalVLMError("--max-queries must be at least 1")
        return self


class _Methods:
    """Per-query decisions of every method, on one encoded query image."""

    def __init__(self, assistant, dataset: Dataset, options: EvalOptions, text_similarity=None):
        from . import r2p
        from .vlm import Memory

        self.assistant, self.dataset, self.options = assistant, dataset, options
        profile_accept, profile_reject = assistant.thresholds()
        self.accept = profile_accept if options.accept is None else options.accept
        self.reject = profile_reject if options.reject is None else options.reject
        self.threshold = assistant.profile.recognize_threshold if options.threshold is None else options.threshold
        self.margin = assistant.profile.r2p_margin if options.margin is None else options.margin
        if not self.reject < self.accept:
            raise PersonalVLMError(f"the reject threshold ({self.reject}) must be below the accept threshold "
                                   f"({self.accept})")
        self.memories = {c: Memory.from_stored(assistant.store.load_memory(c), c) for c in dataset.concepts}
        self.fingerprints = {c: assistant.store.get(c).fingerprint for c in dataset.concepts}
        self._joint: dict = {}
        self._embeddings: dict = {}

    def _reference_embeddings(self, concept: str):
        similarity = self.r2p.text_similarity
        if similarity is None:
            return None
        if concept not in self._embeddings:
            from .images import load_image

            self._embeddings[concept] = torch.stack(
                [similarity.embed_image(load_image(p)) for p in self.dataset.references[concept]]).cpu()
        return self._embeddings[concept]
        self.r2p = r2p.R2PVerifier(assistant.vlm, text_similarity, top_k=options.top_k,
                                   pairwise_threshold=options.pairwise_threshold,
                                   pairwise_reference=options.pairwise_reference)

    def evaluate(self, query: Query) -> dict:
        from .images import load_image

        image = load_image(query.image)
        tokens = self.assistant.vlm.encode_image(image)
        scores = self._match_scores(tokens)
        decide = getattr(self, f"_{self.options.method}")
        pairs, r2p_result = decide(tokens, image, scores)
        record = {"query": query.key, "concepts": list(query.concepts),
                  "pairs": [{"concept": c, "label": c in query.concepts, **pair} for c, pair in pairs.items()]}
        if r2p_result is not None:
            record["r2p"] = {"decision": r2p_result.decision, "stages": r2p_result.stages}
        return record

    def _match_scores(self, tokens) -> dict[str, float]:
        concepts = set(self.dataset.concepts)
        return {m.name: m.score for m in self.assistant.matcher.score(tokens.features, tokens.token_boxes)
                if m.name in concepts}

    def _ego_p_yes(self, tokens, concept: str, scores: dict[str, float] | None = None) -> float:
        from . import ego

        if self.assistant.profile.recognition != "joint":
            return ego.recognize(self.assistant.vlm, tokens, [self.memories[concept]])[concept]
        # The top-M memories by matcher score in one prompt (with the concept asked about).
        m = max(1, self.assistant.profile.max_concepts_in_context)
        ranked = sorted(scores or {}, key=lambda c: -(scores or {})[c])
        names = ranked[:m] if concept in ranked[:m] else ranked[:m - 1] + [concept]
        key = (id(tokens), tuple(names))
        if key not in self._joint:
            self._joint = {key: ego.recognize_joint(self.assistant.vlm, tokens,
                                                    [self.memories[n] for n in names])}
        return self._joint[key][concept]

    def _run_r2p(self, tokens, image, scores: dict[str, float], must_include=()):
        from .r2p import candidates_from_scores

        # With a contrastive model, retrieval ranks the whole library (as R2P does); else the pool.
        pool = None if self.r2p.text_similarity is not None else self.options.r2p_pool
        candidates = candidates_from_scores(scores, pool, self.fingerprints.__getitem__,
                                            self.memories.__getitem__, must_include,
                                            embeddings_of=self._reference_embeddings,
                                            reference_of=self.assistant.reference_tokens)
        return self.r2p.verify(tokens, image, candidates)

    def _match(self, tokens, image, scores):
        return {c: {"predicted": c in scores and scores[c] >= self.accept, "score": scores.get(c), "source": "match"}
                for c in self.dataset.concepts}, None

    def _ego(self, tokens, image, scores):
        out = {}
        for c in self.dataset.concepts:
            p = self._ego_p_yes(tokens, c, scores)
            out[c] = {"predicted": p >= self.threshold, "score": p, "source": "ego"}
        return out, None

    def _r2p(self, tokens, image, scores):
        result = self._run_r2p(tokens, image, scores)
        return {c: {"predicted": result.present(c), "score": result.score_for(c), "source": "r2p"}
                for c in self.dataset.concepts}, result

    def _cascade(self, tokens, image, scores):
        """The frame path's cascade; ``score`` is the matcher's (one scale for the histogram)."""
        from .matcher import decide
        from .r2p import cascade_decision

        out, to_r2p = {}, []
        for c in self.dataset.concepts:
            s = scores.get(c)
            stage = "reject" if s is None else decide(s, self.accept, self.reject)
            p_yes = self._ego_p_yes(tokens, c, scores) if stage == "uncertain" else None
            verdict = cascade_decision(stage, p_yes, self.margin, self.threshold)
            source = "match" if stage != "uncertain" else ("r2p" if verdict == "r2p" else "ego")
            out[c] = {"predicted": verdict == "accept", "score": s, "source": source, "p_yes": p_yes}
            if verdict == "r2p":
                to_r2p.append(c)
        result = None
        if to_r2p:
            # One R2P run per query settles every concept Ego was unsure of.
            result = self._run_r2p(tokens, image, scores, must_include=to_r2p)
            for c in to_r2p:
                out[c]["predicted"] = result.present(c)
        return out, result


# ---- files ---------------------------------------------------------------------------------
def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable before the next query starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of ``path``; a line cut short by an interruption is dropped (and
    removed from the file, so the next append starts on a fresh line)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _settings(assistant, dataset: Dataset, options: EvalOptions, test_split: dict) -> dict:
    values = asdict(options)
    values.pop("max_queries")
    method = {k: getattr(assistant.profile, k) for k in (
        "layers", "max_memory_tokens", "min_memory_tokens", "memory_budget", "memory_layout", "attention_rows",
        "attention_baseline", "introduction_passes", "recognition", "max_concepts_in_context", "max_image_pixels")}
    return {"dataset": str(dataset.root), "layout": dataset.layout, "shots": dataset.shots, **test_split,
            "model": assistant.vlm.fingerprint, **values, "profile": method}


def _check_settings(out: Path, settings: dict, restart: bool) -> None:
    path = out / SETTINGS_FILE
    if restart:
        for name in (PROGRESS_FILE, INTRODUCTIONS_FILE, SETTINGS_FILE, RESULTS_JSON, RESULTS_MD, WTD_PLOT,
                     HISTOGRAM_PLOT):
            (out / name).unlink(missing_ok=True)
    elif path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous != settings:
            changed = sorted(k for k in set(settings) | set(previous or {})
                             if (previous or {}).get(k) != settings.get(k))
            raise PersonalVLMError(
                f"{out} holds a run with other settings ({', '.join(changed)}); "
                "use another --out, or pass --restart to start this one over")
    _write_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False))


# ---- the run -------------------------------------------------------------------------------
def _teach(assistant, dataset: Dataset, out: Path, progress) -> list[dict]:
    """Teach every concept not yet taught by this run (resumable); their introduction times."""
    done = {r["name"]: r for r in read_lines(out / INTRODUCTIONS_FILE)}
    records = []
    for i, name in enumerate(dataset.concepts):
        record = done.get(name)
        if record is None or name not in assistant.store or assistant.store.get(name).fingerprint_complete is None:
            progress(f"teaching {i + 1}/{len(dataset.concepts)}: {name}")
            result = assistant.teach(name, dataset.references[name], category=dataset.categories.get(name, ""),
                                     overwrite=True)
            result.wait_fingerprint()          # R2P needs it; and it must not compete with the queries
            record = {"name": name, "seconds": result.seconds, "memory_tokens": result.memory_tokens,
                      "fingerprint_seconds": result.timings.get("fingerprint_complete"),
                      "references": [_relative(p, dataset.root) for p in dataset.references[name]]}
            _append_line(out / INTRODUCTIONS_FILE, record)
        records.append(record)
    return records


def evaluate(assistant, dataset: Dataset, out, options: EvalOptions | None = None, progress=_say,
             restart: bool = False, text_similarity=None, test_split: dict | None = None) -> dict:
    """Teach, run every query not done yet, then write results.json, results.md and the plots.

    ``text_similarity``: an :class:`~personal_vlm_node.r2p.ImageTextSimilarity` for R2P; by default
    one is loaded from ``options.verifier_model`` when set.
    """
    options = (options or EvalOptions()).check()
    progress = progress or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings(assistant, dataset, options, test_split or {}), restart)
    if text_similarity is None and options.verifier_model and options.method in ("r2p", "cascade"):
        from .r2p import ImageTextSimilarity

        progress(f"loading the R2P verifier model {options.verifier_model}…")
        text_similarity = ImageTextSimilarity(options.verifier_model, device=str(assistant.vlm.device))

    introductions = _teach(assistant, dataset, out, progress)
    methods = _Methods(assistant, dataset, options, text_similarity)
    queries = dataset.queries[:options.max_queries] if options.max_queries else dataset.queries
    done = {r["query"] for r in read_lines(out / PROGRESS_FILE)}
    todo = [q for q in queries if q.key not in done]
    total = len(queries)
    finished = total - len(todo)
    if finished:
        progress(f"{finished}/{total} queries already done, resuming")
    for query in todo:
        t0 = time.perf_counter()
        try:
            record = methods.evaluate(query)
        except PersonalVLMError as exc:
            record = {"query": query.key, "concepts": list(query.concepts), "error": str(exc)}
        record["seconds"] = time.perf_counter() - t0
        _append_line(out / PROGRESS_FILE, record)
        finished += 1
        progress(f"{finished}/{total} queries")

    keys = {q.key for q in queries}
    records = [r for r in read_lines(out / PROGRESS_FILE) if r.get("query") in keys]
    summary = summarize(records, dataset.concepts)
    timed = [r["seconds"] for r in records if "error" not in r]
    results = {
        "method": options.method,
        "model": assistant.vlm.model_id,
        "dataset": {"root": str(dataset.root), "layout": dataset.layout, "shots": dataset.shots,
                    "concepts": len(dataset.concepts), "queries": len(records), "of_queries": len(dataset.queries)},
        "thresholds": {"accept": methods.accept, "reject": methods.reject, "recognize": methods.threshold,
                       "margin": methods.margin, "pairwise": options.pairwise_threshold},
        "r2p": {"top_k": options.top_k, "pool": options.r2p_pool if text_similarity is None else None,
                "text_similarity": text_similarity.name if text_similarity is not None else "vlm_yes_no",
                "judge": "contrastive model" if text_similarity is not None else
                "the VLM itself (s_VT, s_VA by yes/no; no contrastive model configured)"},
        **summary,
        "timing": {
            "seconds_per_query": sum(timed) / len(timed) if timed else None,
            "seconds_per_concept_introduction": _mean([r["seconds"] for r in introductions]),
            "seconds_per_fingerprint": _mean([r.get("fingerprint_seconds") for r in introductions]),
        },
        "errors": [{"query": r["query"], "error": r["error"]} for r in records if "error" in r],
        "files": {"markdown": RESULTS_MD, "wtd_plot": WTD_PLOT, "histogram": HISTOGRAM_PLOT,
                  "progress": PROGRESS_FILE},
    }
    _write_atomic(out / RESULTS_JSON, json.dumps(results, indent=2, ensure_ascii=False))
    _write_atomic(out / RESULTS_MD, results_markdown(results))
    _write_atomic(out / WTD_PLOT, bar_chart_png(
        {c: m["weighted_accuracy"] for c, m in results["per_concept"].items()},
        f"Wtd per concept ({options.method})"))
    positives = [p["score"] for r in records for p in r.get("pairs", []) if p["label"] and p["score"] is not None]
    negatives = [p["score"] for r in records for p in r.get("pairs", []) if not p["label"] and p["score"] is not None]
    markers = {"ego": {"threshold": methods.threshold}, "r2p": {}}.get(
        options.method, {"accept": methods.accept, "reject": methods.reject})
    _write_atomic(out / HISTOGRAM_PLOT, histogram_png(positives, negatives, _score_name(options.method), markers))
    return results


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _score_name(method: str) -> str:
    return {"match": "matcher score s_c", "ego": "Ego p_yes", "r2p": "R2P score (p_i, else s)",
            "cascade": "matcher score s_c"}[method]


# ---- reports -------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict) -> str:
    """The results as markdown tables."""
    columns = ("positives", "negatives", "positive_accuracy", "negative_accuracy", "weighted_accuracy",
               "precision", "recall", "f1")
    header = "| concept | pos | neg | pos acc | neg acc | Wtd | precision | recall | F1 |"
    rule = "|---|--:|--:|--:|--:|--:|--:|--:|--:|"

    def row(name, metrics):
        cells = [_fmt(metrics[k]) for k in columns]
        return f"| {name.replace('|', '/')} | " + " | ".join(cells) + " |"

    data, timing = results["dataset"], results["timing"]
    lines = [
        f"# Recognition: `{results['method']}` on {Path(data['root']).name}",
        "",
        f"- model: `{results['model']}`",
        f"- dataset: {data['root']} (layout {data['layout']}, {data['concepts']} concepts, "
        f"{data['queries']} of {data['of_queries']} queries, {data['shots']} shot(s))",
        "- thresholds: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results["thresholds"].items()),
        f"- R2P: top-{results['r2p']['top_k']} of "
        + ("the whole library" if results['r2p']['pool'] is None else f"the matcher's top {results['r2p']['pool']}")
        + f", text similarity {results['r2p']['text_similarity']}"
        + ("; without a contrastive model s_VT and s_VA are the VLM judging its own answers, and "
           "s_VV is the matcher's score" if results['r2p']['text_similarity'] == "vlm_yes_no" else
           "; s_VV from the contrastive model's image embeddings"),
        "- decided by: " + (", ".join(f"{k} {v}" for k, v in sorted(results["decided_by"].items())) or "–"),
        f"- seconds per query {_fmt(timing['seconds_per_query'])}, per concept introduction "
        f"{_fmt(timing['seconds_per_concept_introduction'])} (fingerprint complete after "
        f"{_fmt(timing['seconds_per_fingerprint'])})",
        "",
        "## Overall",
        "",
        header, rule, row("all pairs", results["overall"]),
        "",
        f"Mean Wtd over concepts: {_fmt(results['macro_weighted_accuracy'])}",
        "",
        "## Per concept",
        "",
        header, rule,
        *[row(name, metrics) for name, metrics in results["per_concept"].items()],
        "",
        f"![Wtd per concept]({WTD_PLOT})",
        "",
        f"![Scores of positives and negatives]({HISTOGRAM_PLOT})",
        "",
    ]
    if results["errors"]:
        lines += ["## Queries that failed", ""] + [f"- {e['query']}: {e['error']}" for e in results["errors"]] + [""]
    return "\n".join(lines)


def _latin1(text: str) -> str:
    # Pillow's built-in bitmap font covers Latin-1 only.
    return text.encode("latin-1", "replace").decode("latin-1")


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bar_chart_png(values: dict[str, float | None], title: str, max_rows: int = 200) -> bytes:
    """Horizontal bars of values in [0, 1], one row per name (the first ``max_rows``)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    names = list(values)[:max_rows]
    label_w, bar_w, row_h, top = 190, 420, 18, 34
    image = Image.new("RGB", (label_w + bar_w + 70, top + row_h * max(1, len(names)) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), _latin1(title), fill="black", font=font)
    for x in (0.0, 0.5, 1.0):
        px = label_w + round(x * bar_w)
        draw.line([(px, top - 4), (px, top + row_h * len(names))], fill=(200, 200, 200))
        draw.text((px - 8, top + row_h * len(names) + 6), f"{x:.1f}", fill="black", font=font)
    for i, name in enumerate(names):
        y = top + i * row_h
        label = name if len(name) <= 28 else name[:27] + "…"
        draw.text((10, y + 3), _latin1(label), fill="black", font=font)
        value = values[name]
        if value is None:
            draw.text((label_w + 4, y + 3), "n/a", fill=(120, 120, 120), font=font)
            continue
        width = round(min(1.0, max(0.0, value)) * bar_w)
        draw.rectangle([label_w, y + 2, label_w + max(1, width), y + row_h - 3], fill=(66, 114, 196))
        draw.text((label_w + width + 4, y + 3), f"{value:.3f}", fill="black", font=font)
    return _png(image)


def histogram_png(positives: list[float], negatives: list[float], score_name: str,
                  markers: dict[str, float] | None = None, bins: int = 20) -> bytes:
    """Side-by-side histogram (share of each class per bin) of positives' and negatives' scores."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    markers = {k: v for k, v in (markers or {}).items() if v is not None}
    everything = positives + negatives + list(markers.values())
    lo, hi = (min(everything), max(everything)) if everything else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    width, height, left, right, top, bottom = 640, 340, 50, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), _latin1(f"{score_name}: positives (n={len(positives)}) vs negatives (n={len(negatives)})"),
              fill="black", font=font)

    def shares(values):
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
        return [c / len(values) if values else 0.0 for c in counts]

    pos, neg = shares(positives), shares(negatives)
    peak = max(pos + neg + [1e-9])
    slot = plot_w / bins
    colours = {"positives": (46, 139, 87), "negatives": (214, 96, 77)}
    for b in range(bins):
        x0 = left + b * slot
        for offset, share, colour in ((0.1, pos[b], colours["positives"]), (0.5, neg[b], colours["negatives"])):
            if share > 0:
                bar_h = share / peak * plot_h
                draw.rectangle([x0 + offset * slot, top + plot_h - bar_h, x0 + (offset + 0.4) * slot, top + plot_h],
                               fill=colour)
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    for value in (lo, (lo + hi) / 2, hi):
        x = left + (value - lo) / (hi - lo) * plot_w
        draw.text((x - 12, top + plot_h + 6), f"{value:.2f}", fill="black", font=font)
    draw.text((4, top - 4), f"{peak:.2f}", fill="black", font=font)
    draw.text((4, top + plot_h - 10), "0", fill="black", font=font)
    draw.text((4, top + plot_h + 20), "share of each class per bin", fill=(90, 90, 90), font=font)
    for name, value in markers.items():
        x = left + (value - lo) / (hi - lo) * plot_w
        draw.line([(x, top), (x, top + plot_h)], fill=(90, 90, 90))
        label = _latin1(f"{name} {value:.2f}")
        text_w = draw.textlength(label, font=font)
        # Above the plot, on the side of the line that keeps the label inside the picture.
        draw.text((x + 3 if x + 3 + text_w < width else x - 3 - text_w, top - 14), label, fill=(90, 90, 90), font=font)
    legend_y = height - 16
    for i, (name, colour) in enumerate(colours.items()):
        x = left + 300 + i * 120
        draw.rectangle([x, legend_y, x + 10, legend_y + 10], fill=colour)
        draw.text((x + 14, legend_y), name, fill="black", font=font)
    return _png(image)


# ---- command line ----------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``personal-vlm`` subcommands."""
    parser = subparsers.add_parser(
        "eval", help="recognition accuracy on a personalization dataset (Yo'LLaVA, PerVA, MyVLM, generic)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset root folder")
    parser.add_argument("--out", required=True, help="results folder; a rerun resumes the run in it")
    parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    parser.add_argument("--method", default="match", choices=METHODS)
    parser.add_argument("--shots", type=int, default=1, help=f"reference images per concept (1..{MAX_SHOTS})")
    parser.add_argument("--test-list", default=None, help="myvlm: file listing the query images (<concept>/<file>)")
    parser.add_argument("--test-last", type=int, default=None,
                        help="myvlm: the last N images of each concept are queries (default: all after --shots)")
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--accept", type=float, default=None, help="matcher accept threshold (default: profile)")
    parser.add_argument("--reject", type=float, default=None, help="matcher reject threshold (default: profile)")
    parser.add_argument("--threshold", type=float, default=None, help="Ego p_yes threshold (default: profile)")
    parser.add_argument("--margin", type=float, default=None,
                        help="cascade: R2P when |p_yes - threshold| < margin (default: the model profile's r2p_margin)")
    parser.add_argument("--top-k", type=int, default=3, help="R2P: candidates kept by retrieval")
    parser.add_argument("--r2p-pool", type=int, default=10, help="R2P: the matcher's top concepts it retrieves from")
    parser.add_argument("--pairwise-threshold", type=float, default=0.5, help="R2P: p_i needed to decide")
    parser.add_argument("--pairwise-reference", default="image", choices=("image", "memory"),
                        help="R2P pairwise: show the candidate's reference picture (as R2P does) or its memory")
    parser.add_argument("--verifier-model", default=None,
                        help="R2P: CLIP/SigLIP id or folder for image-text similarity (default: the VLM answers)")
    parser.add_argument("--restart", action="store_true", help="discard the results already in --out")
    return parser


def run(args) -> None:
    """``personal-vlm eval``: load the model, evaluate, print the overall metrics."""
    from .assistant import Assistant

    dataset = load_dataset(args.dataset, args.layout, args.shots, args.test_list, args.test_last)
    options = EvalOptions(method=args.method, accept=args.accept, reject=args.reject, threshold=args.threshold,
                          margin=args.margin, top_k=args.top_k, pairwise_threshold=args.pairwise_threshold,
                          pairwise_reference=args.pairwise_reference,
                          verifier_model=args.verifier_model, r2p_pool=args.r2p_pool,
                          max_queries=args.max_queries).check()
    out = Path(args.out).expanduser()
    _say(f"{dataset.layout} dataset: {len(dataset.concepts)} concepts, {len(dataset.queries)} queries, "
         f"{len(pairs(dataset))} pairs")
    split = {"test_list": str(args.test_list) if args.test_list else None, "test_last": args.test_last}
    with Assistant.open(args.model, store_dir=out / "store", device=args.device, dtype=args.dtype,
                        profile_path=getattr(args, "profile", None), progress=_say, verification=False) as assistant:
        results = evaluate(assistant, dataset, out, options, restart=args.restart, test_split=split)
    overall = results["overall"]
    if getattr(args, "json", False):
        print(json.dumps({k: results[k] for k in ("method", "dataset", "overall", "macro_weighted_accuracy",
                                                  "timing", "decided_by")} | {"out": str(out)}, ensure_ascii=False))
    else:
        print(f"{options.method}: Wtd {_fmt(overall['weighted_accuracy'])} (positive {_fmt(overall['positive_accuracy'])}, "
              f"negative {_fmt(overall['negative_accuracy'])}), precision {_fmt(overall['precision'])}, "
              f"recall {_fmt(overall['recall'])}, F1 {_fmt(overall['f1'])} over {results['dataset']['queries']} "
              f"queries; {_fmt(results['timing']['seconds_per_query'])} s/query. Results in {out / RESULTS_MD}")
