"""One evaluation run: teach, decide every (query, concept) pair, resumable files, the results.

See :mod:`personal_vlm_node.evaluation` for the protocol and the files written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PersonalVLMError
from ..options import PAIRWISE_REFERENCES, RECOGNITION_METHODS, RECOGNITIONS, check_thresholds
from ..output import stderr_progress, write_atomic
from .datasets import Dataset, Query, _relative
from .metrics import summarize
from .report import HISTOGRAM_PLOT, SELF_JUDGED, SELF_JUDGED_NAME, WTD_PLOT, bar_chart_png, histogram_png, results_markdown

METHODS = ("match", "ego", "icpt", "r2p", "cascade")

PROGRESS_FILE = "progress.jsonl"
INTRODUCTIONS_FILE = "introductions.jsonl"
SETTINGS_FILE = "run.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

_say = stderr_progress("eval")


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
    pairwise_reference: str = "image"      # R2P's pairwise step shows the reference picture, or "memory"
    recognition: str | None = None         # Ego: "per_concept" or "joint"; None: the model profile's
    verifier_model: str | None = None      # CLIP / SigLIP for R2P; None: the VLM checks attributes
    r2p_pool: int = 10                     # R2P's candidates: the matcher's top concepts
    max_queries: int | None = None         # evaluate only the first N queries (a rerun can extend)
    concept_thresholds: bool = False       # match / cascade: each concept's own accept (matcher.concept_accepts)
    recognition_method: str | None = None  # cascade: "ego" or "icpt" settles the uncertain band; None: the assistant's

    def check(self) -> EvalOptions:
        if self.method not in METHODS:
            raise PersonalVLMError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.r2p_pool < 1 or self.top_k < 1:
            raise PersonalVLMError("--r2p-pool and --top-k must be at least 1")
        if self.max_queries is not None and self.max_queries < 1:
            raise PersonalVLMError("--max-queries must be at least 1")
        if self.recognition not in (None, *RECOGNITIONS):
            raise PersonalVLMError(f"--recognition must be one of {', '.join(RECOGNITIONS)}, got {self.recognition!r}")
        if self.recognition_method not in (None, *RECOGNITION_METHODS):
            raise PersonalVLMError(f"--recognition-method must be one of {', '.join(RECOGNITION_METHODS)}, "
                                   f"got {self.recognition_method!r}")
        if self.pairwise_reference not in PAIRWISE_REFERENCES:
            raise PersonalVLMError(f"--pairwise-reference must be one of {', '.join(PAIRWISE_REFERENCES)}, "
                                   f"got {self.pairwise_reference!r}")
        return self


class _Methods:
    """Per-query decisions of every method, on one encoded query image."""

    def __init__(self, assistant, dataset: Dataset, options: EvalOptions, text_similarity=None):
        from .. import r2p
        from ..vlm import Memory

        self.assistant, self.dataset, self.options = assistant, dataset, options
        profile_accept, profile_reject = assistant.thresholds()
        self.accept = profile_accept if options.accept is None else options.accept
        self.reject = profile_reject if options.reject is None else options.reject
        self.threshold = assistant.profile.recognize_threshold if options.threshold is None else options.threshold
        self.margin = assistant.profile.r2p_margin if options.margin is None else options.margin
        self.recognition = options.recognition or assistant.profile.recognition
        self.joint = assistant.joint_size(self.recognition)
        problem = check_thresholds(self.accept, self.reject)
        if problem:
            raise PersonalVLMError(problem)
        from ..matcher import concept_accepts

        # Per concept, from the taught library's impostors (every concept is taught by now).
        self.accepts = concept_accepts(assistant.matcher.impostor_scores(), self.accept, self.reject) \
            if options.concept_thresholds else {}
        self.memories = {c: Memory.from_stored(assistant.stored_memory(c), c) for c in dataset.concepts}
        # ICPT's prompts, for --method icpt and for a cascade whose uncertain band ICPT settles.
        self.prompts = {}
        if _uses_icpt(assistant, options):
            self.prompts = {c: assistant.icpt_prompt(c) for c in dataset.concepts}
            self.threshold = assistant.icpt_threshold if options.threshold is None else options.threshold
        self.fingerprints = {c: assistant.store.get(c).fingerprint for c in dataset.concepts}
        self.r2p = r2p.R2PVerifier(assistant.vlm, text_similarity, top_k=options.top_k,
                                   pairwise_threshold=options.pairwise_threshold,
                                   pairwise_reference=options.pairwise_reference)
        self.text_similarity = text_similarity

    def _embeddings_of(self, name: str):
        """R2P's s_VV: the references' contrastive embeddings; None without a contrastive model."""
        return None if self.text_similarity is None else self.assistant.reference_embeddings(name, self.text_similarity)

    def evaluate(self, query: Query) -> dict:
        from ..images import load_image

        image = load_image(query.image)
        tokens = self.assistant.vlm.encode_image(image)
        scores = self._match_scores(tokens)
        decide = getattr(self, f"_{self.options.method}")
        pairs, r2p_result = decide(tokens, image, scores)
        record = {"query": query.key, "concepts": list(query.concepts),
                  "pairs": [{"concept": c, "label": c in query.concepts, **pair} for c, pair in pairs.items()
                            if query.negative_for is None or c == query.negative_for]}
        if r2p_result is not None:
            record["r2p"] = {"decision": r2p_result.decision, "stages": r2p_result.stages}
        return record

    def _match_scores(self, tokens) -> dict[str, float]:
        concepts = set(self.dataset.concepts)
        return {m.name: m.score for m in self.assistant.matcher.score(tokens.features, tokens.token_boxes)
                if m.name in concepts}

    def _ego_p_yes(self, tokens, concept: str, scores: dict[str, float]) -> float:
        from .. import ego

        return ego.p_yes(self.assistant.vlm, tokens, [concept], self.memories.__getitem__, self.joint, scores,
                         self.assistant.profile.context_tokens)[concept]

    def _run_r2p(self, tokens, image, scores: dict[str, float], must_include=()):
        from ..r2p import candidates_from_scores

        candidates = candidates_from_scores(scores, self.options.r2p_pool, self.fingerprints.__getitem__,
                                            self.memories.__getitem__, must_include,
                                            embeddings_of=self._embeddings_of,
                                            reference_of=self.assistant.reference_tokens)
        return self.r2p.verify(tokens, image, candidates)

    def _match(self, tokens, image, scores):
        return {c: {"predicted": c in scores and scores[c] >= self.accepts.get(c, self.accept), "score": scores.get(c),
                    "source": "match"}
                for c in self.dataset.concepts}, None

    def _ego(self, tokens, image, scores):
        out = {}
        for c in self.dataset.concepts:
            p = self._ego_p_yes(tokens, c, scores)
            out[c] = {"predicted": p >= self.threshold, "score": p, "source": "ego"}
        return out, None

    def _icpt(self, tokens, image, scores):
        from .. import ego

        # ICPT's prompts stand where Ego's memories stand (one prompt per concept, or all in one).
        p = ego.p_yes(self.assistant.vlm, tokens, list(self.dataset.concepts), self.prompts.__getitem__, self.joint,
                      scores, self.assistant.profile.context_tokens)
        return {c: {"predicted": p[c] >= self.threshold, "score": p[c], "source": "icpt"}
                for c in self.dataset.concepts}, None

    def _r2p(self, tokens, image, scores):
        result = self._run_r2p(tokens, image, scores)
        return {c: {"predicted": result.present(c), "score": result.score_for(c), "source": "r2p"}
                for c in self.dataset.concepts}, result

    def _cascade(self, tokens, image, scores):
        """The frame path's cascade (:func:`~personal_vlm_node.r2p.settle_uncertain` decides the
        matcher's uncertain band); ``score`` is the matcher's (one scale for the histogram)."""
        from ..matcher import decide
        from ..r2p import settle_uncertain

        stages = {c: "reject" if scores.get(c) is None else decide(scores[c], self.accepts.get(c, self.accept), self.reject)
                  for c in self.dataset.concepts}
        verdicts, result = settle_uncertain(
            self.assistant.vlm, tokens, [c for c, stage in stages.items() if stage == "uncertain"],
            (self.prompts or self.memories).__getitem__, threshold=self.threshold, margin=self.margin,
            verifier=self.r2p, scores=scores, fingerprint_of=self.fingerprints.__getitem__,
            pool=self.options.r2p_pool, image=lambda: image, embeddings_of=self._embeddings_of,
            reference_of=self.assistant.reference_tokens, joint=self.joint,
            budget=self.assistant.profile.context_tokens)
        out = {}
        for c, stage in stages.items():
            verdict = verdicts.get(c)
            if verdict is None:
                out[c] = {"predicted": stage == "accept", "score": scores.get(c), "source": "match", "p_yes": None}
            else:
                stage = "icpt" if self.prompts and verdict.stage == "ego" else verdict.stage
                out[c] = {"predicted": verdict.present, "score": scores.get(c), "source": stage,
                          "p_yes": verdict.p_yes}
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


def _settings(assistant, dataset: Dataset, options: EvalOptions, test_split: dict) -> dict:
    values = asdict(options)
    values.pop("max_queries")
    prompts = assistant.icpt_prompts
    return {"dataset": str(dataset.root), "layout": dataset.layout, "shots": dataset.shots, **test_split,
            "model": assistant.vlm.identity, **values,
            # A run's prompts come from one projector: another one is another run.
            **({"icpt_projector": prompts.id} if prompts is not None and _uses_icpt(assistant, options) else {})}


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
    write_atomic(path, json.dumps(settings, indent=2, ensure_ascii=False))


# ---- the run -------------------------------------------------------------------------------
def _uses_icpt(assistant, options: EvalOptions) -> bool:
    """ICPT decides: --method icpt, or a cascade whose uncertain band ICPT settles."""
    method = options.recognition_method or assistant.recognition_method
    return options.method == "icpt" or (options.method == "cascade" and method == "icpt")


def _icpt_figures(assistant, methods, introductions) -> dict | None:
    """The projector, its prompts' length and what making one took, when ICPT ran."""
    if not methods.prompts:
        return None
    prompts = assistant.icpt_prompts
    return {"projector": str(prompts.path), "projector_id": prompts.id, "threshold": methods.threshold,
            "tokens_per_concept": _mean([m.tokens.shape[0] for m in methods.prompts.values()]),
            "ego_tokens_per_concept": _mean([m.tokens.shape[0] for m in methods.memories.values()]),
            "seconds_per_prompt": _mean([r.get("icpt_seconds") for r in introductions]),
            "seconds_per_encoding": _mean([r.get("encode_seconds") for r in introductions])}


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
                      "icpt_seconds": result.timings.get("icpt"), "encode_seconds": result.timings.get("encode"),
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
    # Only now that the run's settings are accepted may the run's store be changed.
    if assistant.rebuild_stale_memories():
        assistant.reload()
    if text_similarity is None and options.verifier_model and options.method in ("r2p", "cascade"):
        from ..r2p import load_text_similarity

        progress(f"loading the R2P verifier model {options.verifier_model}…")
        text_similarity = load_text_similarity(options.verifier_model, str(assistant.vlm.device),
                                               lambda message: progress(f"warning: {message}"))
    if text_similarity is None and options.method in ("r2p", "cascade"):
        progress(SELF_JUDGED)

    if _uses_icpt(assistant, options):
        assistant.require_icpt()            # why ICPT is not loaded, before anything is taught
    introductions = _teach(assistant, dataset, out, progress)
    methods = _Methods(assistant, dataset, options, text_similarity)
    queries = dataset.queries[:options.max_queries] if options.max_queries else dataset.queries
    # A failed query is written down (with its error) but not done: a rerun tries it again.
    done = {r["query"] for r in read_lines(out / PROGRESS_FILE) if "error" not in r}
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
        if "error" in record:
            progress(f"{finished}/{total} queries ({query.key} failed: {record['error']}; a rerun retries it)")
        else:
            progress(f"{finished}/{total} queries")

    keys = {q.key for q in queries}
    latest = {}                          # the newest line per query: a retried failure is replaced
    for r in read_lines(out / PROGRESS_FILE):
        if r.get("query") in keys:
            latest[r["query"]] = r
    records = list(latest.values())
    failed = [r for r in records if "error" in r]
    if failed:
        progress(f"{len(failed)} of {total} queries failed; run the same command again to retry them")
    summary = summarize(records, dataset.concepts, methods.threshold)
    timed = [r["seconds"] for r in records if "error" not in r]
    results = {
        "method": options.method,
        "model": assistant.vlm.model_id,
        "dataset": {"root": str(dataset.root), "layout": dataset.layout, "shots": dataset.shots,
                    "concepts": len(dataset.concepts), "queries": len(records) - len(failed),
                    "failed": len(failed), "of_queries": len(dataset.queries)},
        "thresholds": {"accept": methods.accept, "reject": methods.reject, "recognize": methods.threshold,
                       "margin": methods.margin, "pairwise": options.pairwise_threshold,
                       "concept_accepts": {c: round(v, 4) for c, v in methods.accepts.items()} or None},
        "ego": {"recognition": methods.recognition, "memories_per_prompt": methods.joint or 1,
                "context_tokens": assistant.profile.context_tokens},
        "icpt": _icpt_figures(assistant, methods, introductions),
        "r2p": {"top_k": options.top_k, "pool": options.r2p_pool, "pairwise_reference": options.pairwise_reference,
                "text_similarity": text_similarity.name if text_similarity is not None else SELF_JUDGED_NAME},
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
    write_atomic(out / RESULTS_JSON, json.dumps(results, indent=2, ensure_ascii=False))
    write_atomic(out / RESULTS_MD, results_markdown(results))
    write_atomic(out / WTD_PLOT, bar_chart_png(
        {c: m["weighted_accuracy"] for c, m in results["per_concept"].items()},
        f"Wtd per concept ({options.method})"))
    positives = [p["score"] for r in records for p in r.get("pairs", []) if p["label"] and p["score"] is not None]
    negatives = [p["score"] for r in records for p in r.get("pairs", []) if not p["label"] and p["score"] is not None]
    markers = {"ego": {"threshold": methods.threshold}, "r2p": {}}.get(
        options.method, {"accept": methods.accept, "reject": methods.reject})
    write_atomic(out / HISTOGRAM_PLOT, histogram_png(positives, negatives, _score_name(options.method), markers))
    return results


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _score_name(method: str) -> str:
    return {"match": "matcher score s_c", "ego": "Ego p_yes", "icpt": "ICPT p_yes", "r2p": "R2P score (p_i, else s)",
            "cascade": "matcher score s_c"}[method]
