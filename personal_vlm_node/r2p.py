"""R2P: retrieval and reasoning on concept fingerprints, for the cases the memory match can't settle.

Every taught concept c has a *fingerprint* (written in the background after teaching, see
:func:`describe_fingerprint`): attributes A_c = {shape, material, color,
pattern, distinct_features, text_or_brand} and a one-sentence description d_c. Given a query image
q and a short list of candidate concepts (with their visual scores from the matcher), R2P runs:

1. **Retrieval.** s_c = ½ (s_VV(q, c) + s_VT(q, d_c)), top-K candidates by s_c — over the whole
   library when a contrastive model is configured (two dot products per concept), else over the
   matcher's best few (each s_VT then costs VLM forwards).
     s_VV  image–image similarity of the contrastive model's embeddings, (cos(E(q), E(r_c)) + 1) / 2
           with r_c the concept's reference pictures (embedded once at teaching, max over views);
           without a contrastive model, the matcher's late-interaction score
           mean_k max_j cos(M_c[k], F_q[j]) mapped from [-1, 1] to [0, 1] by (s + 1) / 2;
     s_VT  image–text similarity σ(q, d_c) between the image and the fingerprint description.
   σ comes from a contrastive image–text model (CLIP / SigLIP, :class:`ImageTextSimilarity`):
   σ(q, t) = (cos(E_img(q), E_txt(t)) + 1) / 2 ∈ [0, 1], an affine map that keeps the ranking of
   the cosines and puts them on the scale of s_VV. Without such a model the VLM answers itself:
   σ(q, a) = p_yes("Does the object in the image have this <attribute>: <value>?"), and s_VT is
   the mean of σ over the concept's attributes (``"text_similarity": "vlm_yes_no"`` in the stages).
   A concept whose fingerprint is still pending has no s_VT: s_c = s_VV for it.
2. **Attribute-focused chain of thought.** One generation sees the image and the K candidates'
   attributes, checks them one by one, writes per candidate i the attributes A_{q,i} it sees and
   short notes, and only then names the best candidate ĉ_CoT (or none): the answer follows from
   the reasoning instead of being explained after it. An answer given before any reasoning is
   refused (ĉ_CoT = none, ``refused`` in the stage), and so is one the token cap cut off; both
   go on to pairwise reasoning. Parsing tolerates prose, broken JSON and names it did not offer
   (→ none).
3. **Cross-modal attribute verification.** For every candidate,
     s_VA(c) = mean_{a ∈ A_c ∩ S} σ(q, "a photo of <a>")   (all of A_c when S names none of them),
   with the keys S names (color, shape…) used for every candidate so they are compared on the same
   attributes. Verification passes when argmax_c s_VA(c) = ĉ_CoT; the decision is then ĉ_CoT.
4. **Pairwise reasoning** when it fails (or the CoT said none): for each candidate, its reference
   picture (``pairwise_reference="image"``, as in R2P; or its memory as soft tokens, "memory") is
   shown next to the query image and the VLM is asked "Is this <name>?":
     p_i = λ_yes / (λ_yes + λ_no)
   The best candidate wins when p_i ≥ τ (``pairwise_threshold``, default 0.5); otherwise none.

:class:`R2PResult` keeps every stage's numbers for logs, the overlay and evaluation.

The frame path uses R2P last, after the matcher and Ego's in-context check, only when Ego is itself
unsure: :func:`cascade_decision`. There, when R2P's chain of thought and its attribute check agree,
R2P's answer stands. When they do not, R2P's pairwise p_i for the concept and Ego's p_yes are two
answers to the same yes/no question (beside the reference picture, beside the memory), and the
cascade adds their evidence instead of letting the second replace the first:
  present ⇔ (p_yes − τ_Ego) + (p_i − τ) ≥ 0,   score = ((p_yes − τ_Ego) + (p_i − τ) + 1) / 2.
(Chosen on the toy's tuning worlds, where it beat letting the pairwise step decide alone; see
docs/methods.md.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import prompts
from .prompts import COT_PROMPT, PAIRWISE_PROMPT
from .errors import PersonalVLMError
from .options import PAIRWISE_REFERENCES
# The similarity and the parsers are R2P's own; r2p.<name> keeps reaching them for its users.
from .r2p_similarity import (DEFAULT_VERIFIER, SIGLIP_VERIFIER, TEXT_SIMILARITY_VLM, Evidence,  # noqa: F401
                             ImageTextSimilarity, load_text_similarity, unit)
from .r2p_text import (ATTRIBUTE_LABELS, FINGERPRINT_KEYS, attribute_question, parse_fingerprint,  # noqa: F401
                       parse_reasoning, parse_seen_by_candidate, read_reasoning, resolve_name, seen_keys)
from .vlm.base import ImageTokens, Memory, Part, VLMAdapter


def describe_fingerprint(vlm: VLMAdapter, tokens: ImageTokens, name: str, category: str) -> dict:
    """The R2P fingerprint (second generation); run in the background after teaching."""
    generation = vlm.generate(prompts.fingerprint(tokens, name, category, vlm.family), max_new_tokens=120)
    fingerprint = parse_fingerprint(generation.text)
    fingerprint["raw"] = generation.text[:1000]
    return fingerprint


@dataclass
class Candidate:
    """A concept R2P may choose, as the caller knows it for this image."""

    name: str
    visual_score: float          # the matcher's score in [-1, 1]: s_VV without a contrastive model
    fingerprint: dict            # {"attributes": {...}, "description": str}; {} while pending
    memory: torch.Tensor | Memory   # (K_c, D) the concept memory (or a laid-out Memory), for pairwise
    reference_embeddings: torch.Tensor | None = None   # (R, E) unit contrastive embeddings of its references
    reference: object = None     # its first reference picture as ImageTokens, or a callable giving them

    def reference_tokens(self) -> ImageTokens | None:
        """The reference picture's tokens (loaded on first use: only pairwise reasoning needs them)."""
        if callable(self.reference):
            self.reference = self.reference()
        return self.reference

    def as_memory(self) -> Memory:
        return self.memory if isinstance(self.memory, Memory) else Memory(self.memory, self.name)

    @property
    def attributes(self) -> dict[str, str]:
        raw = (self.fingerprint or {}).get("attributes") or {}
        return {k: str(v) for k, v in raw.items() if k in FINGERPRINT_KEYS and str(v).strip()}

    @property
    def description(self) -> str:
        return str((self.fingerprint or {}).get("description") or "").strip()


@dataclass
class R2PResult:
    """R2P's decision on one image and what every stage found.

    ``stages`` (JSON-serialisable): ``retrieval`` {text_similarity ("<model_type>:<model>" or
    "vlm_yes_no"), candidates: [{name, s_vv, s_vt, s, top_k}] best first}; ``reasoning`` {text,
    answer, seen_attributes, seen_keys}; ``verification`` {s_va: {name: value}, keys, best, passed,
    reason}; ``pairwise`` {p: {name: p_i}, best, threshold, decision} only when it ran; ``seconds``
    per stage. With no candidates only ``retrieval`` and ``seconds`` are present.
    """

    decision: str | None         # the concept's name, or None: none of the candidates
    source: str = "r2p"
    stages: dict = field(default_factory=dict)

    def present(self, name: str) -> bool:
        return self.decision == name

    def score_for(self, name: str) -> float | None:
        """The confidence R2P ended with for ``name``: p_i when pairwise reasoning ran, else the
        retrieval score s; None when ``name`` was not among the top-K candidates."""
        pairwise = self.stages.get("pairwise") or {}
        if name in pairwise.get("p", {}):
            return pairwise["p"][name]
        for row in self.stages.get("retrieval", {}).get("candidates", []):
            if row["name"] == name and row["top_k"]:
                return row["s"]
        return None


# ---- R2P ---------------------------------------------------------------------------------------
class R2PVerifier:
    """The four R2P stages over one query image; see the module docstring."""

    def __init__(self, vlm: VLMAdapter, text_similarity: ImageTextSimilarity | None = None,
                 top_k: int = 3, pairwise_threshold: float = 0.5, cot_max_new_tokens: int = 256,
                 pairwise_reference: str = "image"):
        if not isinstance(top_k, int) or top_k < 1:
            raise PersonalVLMError(f"R2P top_k must be an integer >= 1, got {top_k!r}")
        if not 0.0 <= pairwise_threshold <= 1.0:
            raise PersonalVLMError(f"R2P pairwise_threshold must lie in [0, 1], got {pairwise_threshold!r}")
        self.vlm = vlm
        self.text_similarity = text_similarity
        self.top_k = top_k
        self.pairwise_threshold = pairwise_threshold
        self.cot_max_new_tokens = cot_max_new_tokens
        if pairwise_reference not in PAIRWISE_REFERENCES:
            raise PersonalVLMError(f"R2P pairwise_reference must be {' or '.join(PAIRWISE_REFERENCES)}, "
                                   f"got {pairwise_reference!r}")
        self.pairwise_reference = pairwise_reference

    def verify(self, image_tokens: ImageTokens, image, candidates: list[Candidate]) -> R2PResult:
        """R2P's decision on ``image`` among ``candidates`` (pass the matcher's top few: without a
        contrastive model, retrieval costs one VLM forward per attribute of every candidate)."""
        timings: dict[str, float] = {}
        stages: dict = {"seconds": timings}
        evidence = Evidence(self.vlm, self.text_similarity, image_tokens, image)
        t = time.perf_counter()
        top, stages["retrieval"] = self.retrieve(evidence, candidates)
        timings["retrieval"] = time.perf_counter() - t
        if not top:
            return R2PResult(None, stages=stages)

        t = time.perf_counter()
        stages["reasoning"] = self.reason(image_tokens, top)
        timings["reasoning"] = time.perf_counter() - t
        answer = stages["reasoning"]["answer"]

        t = time.perf_counter()
        stages["verification"] = self.verify_attributes(evidence, top, answer, stages["reasoning"]["seen_attributes"],
                                                        stages["reasoning"].get("seen_by_candidate"))
        timings["verification"] = time.perf_counter() - t
        if stages["verification"]["passed"]:
            return R2PResult(answer, stages=stages)

        t = time.perf_counter()
        stages["pairwise"] = self.pairwise(image_tokens, top)
        timings["pairwise"] = time.perf_counter() - t
        return R2PResult(stages["pairwise"]["decision"], stages=stages)

    # 1. retrieval ---------------------------------------------------------------------------
    def retrieve(self, evidence: Evidence, candidates: list[Candidate]) -> tuple[list[Candidate], dict]:
        """Top-K by s = ½(s_VV + s_VT); s = s_VV for a concept without a fingerprint yet.

        s_VV is the image–image similarity of the contrastive model's embeddings, max over the
        concept's reference views, when both are there; else the matcher's score (recorded as
        ``visual_similarity: matcher``).
        """
        s_vt = evidence.descriptions(candidates)
        s_vv = evidence.image_similarities(candidates)
        rows = []
        for c, vt, image_vv in zip(candidates, s_vt, s_vv):
            vv = unit(c.visual_score) if image_vv is None else image_vv
            rows.append({"name": c.name, "s_vv": vv, "s_vt": vt, "s": vv if vt is None else 0.5 * (vv + vt),
                         "s_vv_from": "matcher" if image_vv is None else "image"})
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["s"])
        for rank, i in enumerate(order):
            rows[i]["top_k"] = rank < self.top_k
        top = [candidates[i] for i in order[:self.top_k]]
        return top, {"text_similarity": evidence.kind,
                     "visual_similarity": evidence.kind if any(v is not None for v in s_vv) else "matcher",
                     "candidates": [rows[i] for i in order]}

    # 2. attribute-focused chain of thought --------------------------------------------------
    def reason_prompt(self, image_tokens: ImageTokens, top: list[Candidate]) -> list[Part]:
        lines = []
        for i, c in enumerate(top, 1):
            described = "; ".join(f"{ATTRIBUTE_LABELS.get(k, k)}: {v}" for k, v in c.attributes.items())
            if c.description:
                described = f"{described}. {c.description}" if described else c.description
            lines.append(f"{i}. {c.name}: {described or 'no attributes recorded'}")
        return [image_tokens, "\n" + COT_PROMPT.format(candidates="\n".join(lines))]

    def reason(self, image_tokens: ImageTokens, top: list[Candidate]) -> dict:
        """One generation; ĉ_CoT and the attributes seen, parsed robustly."""
        generation = self.vlm.generate(self.reason_prompt(image_tokens, top), max_new_tokens=self.cot_max_new_tokens)
        names = [c.name for c in top]
        reading = read_reasoning(generation.text, names)
        answer, seen = reading.answer, reading.seen
        return {"text": generation.text[:2000], "answer": answer, "seen_attributes": seen[:16],
                "refused": reading.refused,
                "seen_keys": seen_keys(seen, top),
                "seen_by_candidate": parse_seen_by_candidate(generation.text, names)}

    # 3. cross-modal attribute verification --------------------------------------------------
    def verify_attributes(self, evidence: Evidence, top: list[Candidate], answer: str | None,
                          seen: list[str], seen_by_candidate: dict[str, list[str]] | None = None) -> dict:
        """s_VA(c) = mean σ(q, "a photo of <a>") over the attributes seen; pass iff argmax = ĉ_CoT.

        With per-candidate lists A_{q,c} (the CoT's answer names them per candidate), each candidate
        is checked on the attributes seen for it; else all on the keys seen for any of them.
        """
        keys = seen_keys(seen, top)
        s_va: dict[str, float | None] = {}
        for c in top:
            own = (seen_by_candidate or {}).get(c.name)
            wanted = seen_keys(own, [c]) if own else keys
            chosen = {k: v for k, v in c.attributes.items() if k in wanted} or c.attributes
            values = list(evidence.attributes(chosen).values())
            s_va[c.name] = sum(values) / len(values) if values else None
        scored = {n: v for n, v in s_va.items() if v is not None}
        best = max(scored, key=scored.get) if scored else None
        if answer is None:
            reason = "the reasoning named no candidate"
        elif best is None:
            reason = "no candidate has attributes to verify"
        elif best != answer:
            reason = f"attributes favour {best!r}"
        else:
            reason = "agrees"
        return {"s_va": s_va, "keys": keys, "best": best, "passed": answer is not None and best == answer,
                "reason": reason}

    # 4. pairwise reasoning ------------------------------------------------------------------
    def pairwise_prompt(self, image_tokens: ImageTokens, candidate: Candidate) -> list[Part]:
        """The query beside the candidate's reference picture (as R2P does), or beside its memory
        (``pairwise_reference="memory"``, or when no reference picture is at hand)."""
        reference = f" ({candidate.description})" if candidate.description else ""
        shown = candidate.reference_tokens() if self.pairwise_reference == "image" else None
        if shown is None:
            shown = candidate.as_memory()
        return [f"This is {candidate.name}: ", shown, reference + "\n",
                image_tokens, "\n" + PAIRWISE_PROMPT.format(name=candidate.name)]

    def pairwise(self, image_tokens: ImageTokens, top: list[Candidate]) -> dict:
        """p_i = λ_yes/(λ_yes+λ_no) per candidate; best wins above τ."""
        p = {c.name: self.vlm.yes_probability(self.pairwise_prompt(image_tokens, c)) for c in top}
        best = max(p, key=p.get)
        decision = best if p[best] >= self.pairwise_threshold else None
        return {"p": p, "best": best, "threshold": self.pairwise_threshold, "decision": decision,
                "reference": self.pairwise_reference}


# ---- where R2P sits in the decision cascade ------------------------------------------------
def candidates_from_scores(scores: dict[str, float], pool: int | None, fingerprint_of, memory_of,
                           must_include=(), embeddings_of=None, reference_of=None) -> list[Candidate]:
    """The ``pool`` best concepts by matcher score (None: all of them), plus ``must_include``.

    ``fingerprint_of(name)`` and ``memory_of(name)`` give a concept's fingerprint and memory;
    ``embeddings_of(name)`` its (R, E) reference embeddings (or None), ``reference_of(name)`` its
    reference picture's ImageTokens (called only if pairwise reasoning needs them).
    """
    names = sorted(scores, key=lambda n: -scores[n])
    names = names[:pool] if pool is not None else names
    names += [n for n in must_include if n not in names]
    return [Candidate(n, scores.get(n, -1.0), fingerprint_of(n), memory_of(n),
                      embeddings_of(n) if embeddings_of else None,
                      (lambda n=n: reference_of(n)) if reference_of else None) for n in names]


def cascade_decision(match_decision: str, ego_p_yes: float | None = None, margin: float = 0.15,
                     threshold: float = 0.5) -> str:
    """"accept", "reject" or "r2p" for one concept on one frame.

    The matcher's own accept / reject stand. In its uncertain band, Ego's in-context p_yes decides
    unless it is itself unsure, |p_yes − threshold| < margin: then R2P settles it.
    """
    if match_decision in ("accept", "reject"):
        return match_decision
    if match_decision != "uncertain":
        raise ValueError(f"match decision must be accept, reject or uncertain, got {match_decision!r}")
    if not 0.0 <= margin <= 1.0:
        raise PersonalVLMError(f"the R2P margin must lie in [0, 1], got {margin!r}")
    if ego_p_yes is None:
        raise ValueError("an uncertain match needs Ego's p_yes before the cascade can decide")
    if abs(ego_p_yes - threshold) < margin:
        return "r2p"
    return "accept" if ego_p_yes >= threshold else "reject"


PAIRWISE_WITH_EGO = "r2p_pairwise_ego"     # Verdict.settled_by when R2P's pairwise step and Ego decided together


@dataclass
class Verdict:
    """How the cascade settled one concept the matcher was unsure of, on one image."""

    present: bool
    p_yes: float                     # Ego's in-context p(yes)
    source: str                      # "ego", or "r2p" when Ego was itself unsure
    score: float | None = None       # R2P's score for the concept, when R2P decided
    stages: dict | None = None       # R2P's stages (:attr:`R2PResult.stages`), when R2P decided
    settled_by: str = ""             # with source "r2p": "" R2P's own answer, PAIRWISE_WITH_EGO its
                                     # pairwise step and Ego's p_yes together

    @property
    def stage(self) -> str:
        """Which stage of the cascade decided: "ego", "r2p" or PAIRWISE_WITH_EGO (eval's per-stage table)."""
        return self.settled_by or self.source

    @property
    def confidence(self) -> float:
        """The score a detection carries: R2P's when it scored the concept, else Ego's p(yes)."""
        return self.p_yes if self.score is None else self.score


def settle_uncertain(vlm: VLMAdapter, tokens: ImageTokens, names: list[str], memory_of, *,
                     threshold: float, margin: float, verifier: R2PVerifier, scores: dict[str, float],
                     fingerprint_of, pool: int, image=None, embeddings_of=None,
                     reference_of=None, joint: int | None = None,
                     budget: int | None = None) -> tuple[dict[str, Verdict], R2PResult | None]:
    """The decision cascade for ``names``, the concepts in the matcher's uncertain band on one image.

    Ego's in-context p_yes decides each one; those Ego is itself unsure of (:func:`cascade_decision`)
    are settled together by one R2P run over the ``pool`` best-matching concepts. ``scores`` are the
    matcher's scores on this image (not computed again here); ``memory_of(name)`` and
    ``fingerprint_of(name)`` give a concept's (K, D) memory and fingerprint; ``image()`` gives the
    picture for the image-text scores, asked for only when R2P runs. ``joint``: Ego asks about
    ``names`` in one prompt that also holds the other concepts' memories while they fit (at most
    ``joint`` memories and ``budget`` memory tokens, the best-matching first beyond that; the
    profile's ``recognition: joint``), else one prompt per concept. The frame
    path and the evaluation both decide through this function.
    """
    from . import ego

    def memory(name: str) -> Memory:
        found = memory_of(name)
        return found if isinstance(found, Memory) else Memory(found, name)

    verdicts, unsure = {}, []
    for name, p_yes in ego.p_yes(vlm, tokens, names, memory, joint, scores, budget).items():
        decision = cascade_decision("uncertain", p_yes, margin, threshold)
        verdicts[name] = Verdict(decision == "accept", p_yes, "r2p" if decision == "r2p" else "ego")
        if decision == "r2p":
            unsure.append(name)
    if not unsure:
        return verdicts, None
    # With a contrastive model retrieval is cheap: rank the whole library, as R2P does.
    pool = None if verifier.text_similarity is not None else pool
    candidates = candidates_from_scores(scores, pool, fingerprint_of, memory_of, unsure,
                                        embeddings_of=embeddings_of, reference_of=reference_of)
    result = verifier.verify(tokens, image() if image is not None else None, candidates)
    pairwise = (result.stages.get("pairwise") or {}).get("p", {})
    for name in unsure:
        verdict = verdicts[name]
        verdict.stages = result.stages
        if name in pairwise:
            # R2P's reasoning and its attribute check did not agree, so R2P fell back on a yes/no
            # beside the reference picture: the same question Ego asked beside the memory. Neither
            # overrides the other; their evidence adds up (see the module docstring).
            evidence = (verdict.p_yes - threshold) + (pairwise[name] - verifier.pairwise_threshold)
            verdict.present, verdict.score, verdict.settled_by = evidence >= 0, unit(evidence), PAIRWISE_WITH_EGO
        else:
            verdict.present, verdict.score = result.present(name), result.score_for(name)
    return verdicts, result
