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
   attributes, checks them one by one and names — answer first, so the token cap cannot cut it
   off — the best candidate ĉ_CoT (or none) and, per candidate i, the attributes A_{q,i} it saw. Parsing tolerates prose, broken JSON and names it did not offer (→ none).
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
unsure: :func:`cascade_decision`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import prompts
from .ego import json_objects
from .prompts import ATTRIBUTE_QUESTION, ATTRIBUTE_TEXT, COT_PROMPT, DESCRIPTION_QUESTION, PAIRWISE_PROMPT
from .errors import PersonalVLMError
from .options import PAIRWISE_REFERENCES
from .vlm.base import ImageTokens, Memory, Part, VLMAdapter

# ---- the fingerprint: what R2P knows of a concept beyond its memory ----------------------------
FINGERPRINT_KEYS = ("shape", "material", "color", "pattern", "distinct_features", "text_or_brand")


def parse_fingerprint(text: str) -> dict:
    """R2P attributes + description from the fingerprint answer; never raises."""
    attributes: dict[str, str] = {}
    description = ""
    for obj in json_objects(text):
        lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        lowered.setdefault("color", lowered.get("colour"))
        for key in FINGERPRINT_KEYS:
            value = lowered.get(key)
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            if value is not None and str(value).strip() and str(value).strip().lower() != "none":
                attributes[key] = str(value).strip()[:120]
        description = str(lowered.get("description") or "").strip()[:300]
        break
    if not attributes:
        for key in FINGERPRINT_KEYS:
            match = re.search(rf"{key.replace('_', '[ _]')}\W*[:=]\W*([^\n,;\"}}]+)", text, re.IGNORECASE)
            if match and match.group(1).strip().lower() != "none":
                attributes[key] = match.group(1).strip()[:120]
    if not description:
        plain = re.sub(r"[{}\[\]\"]", " ", text).strip()
        description = re.split(r"(?<=[.!?])\s", plain)[0][:300] if plain else ""
    return {"attributes": attributes, "description": description}



def describe_fingerprint(vlm: VLMAdapter, tokens: ImageTokens, name: str, category: str) -> dict:
    """The R2P fingerprint (second generation); run in the background after teaching."""
    generation = vlm.generate(prompts.fingerprint(tokens, name, category, vlm.family), max_new_tokens=120)
    fingerprint = parse_fingerprint(generation.text)
    fingerprint["raw"] = generation.text[:1000]
    return fingerprint


# ---- prompt wording lives in prompts.py --------------------------------------------------------

# How an attribute key reads in a question ("Does the object … have this colour: red?").
ATTRIBUTE_LABELS = {"shape": "shape", "material": "material", "color": "colour", "pattern": "pattern",
                    "distinct_features": "feature", "text_or_brand": "text or brand"}

TEXT_SIMILARITY_VLM = "vlm_yes_no"
_NONE_ANSWERS = {"", "none", "no", "null", "nothing", "neither", "none of them", "none of these",
                 "no match", "unknown", "n/a"}


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


def unit(cosine: float) -> float:
    """[-1, 1] → [0, 1]: (cos + 1) / 2, clamped (rounding can step past ±1)."""
    return min(1.0, max(0.0, (float(cosine) + 1.0) / 2.0))


# ---- image–text similarity σ -----------------------------------------------------------------
class ImageTextSimilarity:
    """Cosine similarity between an image and texts in a contrastive model's joint space.

    ``model``: a Hugging Face id or a local folder of a CLIP or SigLIP checkpoint (anything whose
    ``AutoModel`` has ``get_image_features`` and ``get_text_features``). Text embeddings are cached,
    because fingerprints do not change between frames. Safe to share between threads.
    """

    TEXT_CACHE = 4096

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32"):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from .vlm import resolve_checkpoint

        folder = resolve_checkpoint(model)
        if device in ("", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise PersonalVLMError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from exc
        if dtype not in ("float32", "bfloat16", "float16"):
            raise PersonalVLMError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
        self.model_id = model
        self.model = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype)).to(self.device).eval()
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise PersonalVLMError(
                f"{model!r} is not a contrastive image–text model (CLIP, SigLIP); set the R2P "
                "verifier model to one, or leave it empty to let the VLM verify attributes itself")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.model_type = str(getattr(self.model.config, "model_type", ""))
        text_config = self.model.config.get_text_config()
        self.max_text_tokens = int(getattr(text_config, "max_position_embeddings", 77))
        self.name = f"{self.model_type}:{model}"      # how the stages record it
        self._lock = threading.Lock()
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def embed_image(self, image) -> torch.Tensor:
        """(E,) unit-norm image embedding."""
        from .images import load_image

        pixels = self.image_processor(images=load_image(image), return_tensors="pt")
        pixels = {k: v.to(self.device, self.model.dtype if v.is_floating_point() else v.dtype)
                  for k, v in pixels.items()}
        with self._lock, torch.inference_mode():
            embedding = self._pooled(self.model.get_image_features(**pixels))[0].float()      # (E,)
        return embedding / embedding.norm().clamp_min(1e-12)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(T, E) unit-norm text embeddings, cached per text."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            # SigLIP was trained on texts padded to a fixed length and pools the last position.
            padding = "max_length" if self.model_type.startswith("siglip") else True
            encoded = self.tokenizer(missing, padding=padding, truncation=True, max_length=self.max_text_tokens,
                                     return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            if self.model_type.startswith("siglip"):
                inputs.pop("attention_mask", None)     # SigLIP attends to its padding, as trained
            with self._lock, torch.inference_mode():
                embeddings = self._pooled(self.model.get_text_features(**inputs)).float().cpu()   # (T', E)
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            with self._lock:
                for text, embedding in zip(missing, embeddings):
                    self._text_cache[text] = embedding
                while len(self._text_cache) > self.TEXT_CACHE:
                    self._text_cache.popitem(last=False)
        with self._lock:
            return torch.stack([self._text_cache[t] for t in texts]) if texts else torch.zeros(0, 0)

    def similarity(self, image_embedding: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(T,) cosines in [-1, 1] between an :meth:`embed_image` result and ``texts``."""
        if not texts:
            return torch.zeros(0)
        return self.embed_texts(texts) @ image_embedding.cpu()

    def scores(self, image, texts: list[str]) -> torch.Tensor:
        """(T,) cosines in [-1, 1] between ``image`` and each of ``texts``."""
        return self.similarity(self.embed_image(image), texts)


class _Evidence:
    """σ(q, ·) ∈ [0, 1] for one query image, from the contrastive model or the VLM; cached per text."""

    def __init__(self, vlm: VLMAdapter, similarity: ImageTextSimilarity | None,
                 image_tokens: ImageTokens, image):
        self.vlm, self.similarity, self.image_tokens, self.image = vlm, similarity, image_tokens, image
        self.kind = similarity.name if similarity is not None else TEXT_SIMILARITY_VLM
        self._image_embedding = None
        self._cache: dict[str, float] = {}

    def _contrastive(self, texts: list[str]) -> list[float]:
        if self._image_embedding is None:
            self._image_embedding = self.similarity.embed_image(self.image)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for text, cosine in zip(missing, self.similarity.similarity(self._image_embedding, missing).tolist()):
            self._cache[text] = unit(cosine)
        return [self._cache[t] for t in texts]

    def _yes_no(self, questions: list[str]) -> list[float]:
        for question in dict.fromkeys(questions):
            if question not in self._cache:
                self._cache[question] = self.vlm.yes_probability([self.image_tokens, "\n" + question])
        return [self._cache[q] for q in questions]

    def image_similarities(self, candidates: list[Candidate]) -> list[float | None]:
        """s_VV per candidate: (max_r cos(E(q), E(ref_r)) + 1) / 2, or None without embeddings."""
        if self.similarity is None or self.image is None:
            return [None] * len(candidates)
        out = []
        for c in candidates:
            if c.reference_embeddings is None or not len(c.reference_embeddings):
                out.append(None)
                continue
            if self._image_embedding is None:
                self._image_embedding = self.similarity.embed_image(self.image)
            cosines = c.reference_embeddings.float() @ self._image_embedding.cpu()      # (R,)
            out.append(unit(float(cosines.max())))
        return out

    def attributes(self, attributes: dict[str, str]) -> dict[str, float]:
        """σ(q, a) for each attribute key → value."""
        keys = list(attributes)
        if self.similarity is not None:
            values = self._contrastive([ATTRIBUTE_TEXT.format(value=attributes[k]) for k in keys])
        else:
            values = self._yes_no([attribute_question(k, attributes[k]) for k in keys])
        return dict(zip(keys, values))

    def descriptions(self, candidates: list[Candidate]) -> list[float | None]:
        """s_VT per candidate: σ(q, d_c), or with the VLM the mean σ over A_c; None when pending."""
        if self.similarity is not None:
            texts = [c.description or ", ".join(c.attributes.values()) for c in candidates]
            scored = self._contrastive([t for t in texts if t])
            it = iter(scored)
            return [next(it) if t else None for t in texts]
        out = []
        for c in candidates:
            attributes = c.attributes or ({"description": c.description} if c.description else {})
            values = list(self.attributes(attributes).values())
            out.append(sum(values) / len(values) if values else None)
        return out


def attribute_question(key: str, value: str) -> str:
    if key == "description":
        return DESCRIPTION_QUESTION.format(value=value)
    return ATTRIBUTE_QUESTION.format(label=ATTRIBUTE_LABELS.get(key, key.replace("_", " ")), value=value)


# ---- parsing the chain of thought --------------------------------------------------------------
_ANSWER_KEYS = ("answer", "best_match", "best", "concept", "match", "prediction", "name")
_SEEN_KEYS = ("seen_attributes", "attributes_seen", "matched_attributes", "seen", "attributes")
_QUOTED_OR_BARE = r"""\s*[:=]\s*(?:(["'])(.*?)\1(?=\s*(?:[,}\]\n]|$))|([^\n,;}\]]*?)(?=\s*(?:\.\s|\.$|[\n,;}\]]|$)))"""
_ANSWER_FIELD = re.compile(r"""(?<!\w)["']?(?:answer|best[ _]match|concept)["']?""" + _QUOTED_OR_BARE, re.IGNORECASE)
_ANSWER_PROSE = re.compile(r"\banswer\s+is\s*:?\s*(.+?)(?:\.\s|\.$|[\n;]|$)", re.IGNORECASE)
_SEEN_FIELD = re.compile(r"""["']?seen[ _]attributes["']?\s*[:=]\s*\[?([^\]\n}]*)""", re.IGNORECASE)


def resolve_name(raw, names: list[str]) -> str | None:
    """Map the model's answer to one of ``names`` (case-insensitive, 1-based index, or a phrase that
    contains exactly one name); "none" and anything unknown → None."""
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        index = int(raw)
        return names[index - 1] if float(raw) == index and 1 <= index <= len(names) else None
    text = str(raw).strip().strip("\"'`*.,;:!? ").strip()
    lowered = text.lower()
    if lowered in _NONE_ANSWERS:
        return None
    for name in names:
        if name.lower() == lowered:
            return name
    if lowered.isdigit():
        return resolve_name(int(lowered), names)
    if re.match(r"none\b", lowered):
        return None
    contained = [n for n in names if re.search(rf"(?<!\w){re.escape(n.lower())}(?!\w)", lowered)]
    # "my mug" and "mug" both contained: the longer name is the one meant.
    contained = [n for n in contained if not any(n != m and n.lower() in m.lower() for m in contained)]
    return contained[0] if len(contained) == 1 else None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}: {v}" for k, v in value.items() if v not in (None, False, "", "no", "none")]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip().strip("\"'") for s in re.split(r"[,;]", str(value)) if s.strip().strip("\"'")]


def _seen_by_name(value, names: list[str]) -> dict[str, list[str]] | None:
    """{"my mug": ["red"], …} → per candidate; None when the keys are not candidate names."""
    if not isinstance(value, dict) or not value:
        return None
    resolved = {resolve_name(k, names): v for k, v in value.items()}
    if None in resolved:
        return None
    return {name: _as_list(v) for name, v in resolved.items()}


def parse_seen_by_candidate(text: str, names: list[str]) -> dict[str, list[str]]:
    """A_{q,i}: the attributes the CoT says it saw, per candidate, when it answered that way."""
    for obj in json_objects(text or ""):
        lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        for key in _SEEN_KEYS:
            per = _seen_by_name(lowered.get(key), names)
            if per is not None:
                return per
    return {}


def parse_reasoning(text: str, names: list[str]) -> tuple[str | None, list[str]]:
    """(ĉ_CoT or None, the attributes the model says it saw) from the CoT answer; never raises."""
    for obj in json_objects(text or ""):
        lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        answer_key = next((k for k in _ANSWER_KEYS if k in lowered), None)
        if answer_key is None:
            continue
        raw = next((lowered[k] for k in _SEEN_KEYS if k in lowered), None)
        per = _seen_by_name(raw, names)
        seen = [a for values in per.values() for a in values] if per is not None else _as_list(raw)
        return resolve_name(lowered[answer_key], names), seen
    # Not JSON (truncated, prose): the last "answer: X" field, else the last "the answer is X".
    text = text or ""
    answer = None
    fields = list(_ANSWER_FIELD.finditer(text))
    if fields:
        last = fields[-1]
        answer = resolve_name(last.group(2) if last.group(2) is not None else last.group(3), names)
    else:
        prose = list(_ANSWER_PROSE.finditer(text))
        answer = resolve_name(prose[-1].group(1), names) if prose else None
    seen_match = _SEEN_FIELD.search(text)
    seen = _as_list(seen_match.group(1)) if seen_match else []
    return answer, seen


def seen_keys(seen: list[str], candidates: list[Candidate]) -> list[str]:
    """The attribute keys (color, shape, …) that the model's seen attributes refer to.

    An item refers to a key when it names the key ("colour", "color: red") or quotes one of the
    candidates' values for it ("red", "white handle").
    """
    keys = []
    for key in FINGERPRINT_KEYS:
        labels = {key, key.replace("_", " "), ATTRIBUTE_LABELS[key]}
        values = [c.attributes[key].lower() for c in candidates if key in c.attributes]
        for item in (s.lower().strip() for s in seen):
            head = item.split(":", 1)[0].strip()
            if head in labels or any(v and (v in item or (len(item) >= 3 and item in v)) for v in values):
                keys.append(key)
                break
    return keys


# ---- R2P ---------------------------------------------------------------------------------------
class R2PVerifier:
    """The four R2P stages over one query image; see the module docstring."""

    def __init__(self, vlm: VLMAdapter, text_similarity: ImageTextSimilarity | None = None,
                 top_k: int = 3, pairwise_threshold: float = 0.5, cot_max_new_tokens: int = 160,
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
        evidence = _Evidence(self.vlm, self.text_similarity, image_tokens, image)
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
    def retrieve(self, evidence: _Evidence, candidates: list[Candidate]) -> tuple[list[Candidate], dict]:
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
        answer, seen = parse_reasoning(generation.text, names)
        return {"text": generation.text[:2000], "answer": answer, "seen_attributes": seen[:16],
                "seen_keys": seen_keys(seen, top),
                "seen_by_candidate": parse_seen_by_candidate(generation.text, names)}

    # 3. cross-modal attribute verification --------------------------------------------------
    def verify_attributes(self, evidence: _Evidence, top: list[Candidate], answer: str | None,
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


@dataclass
class Verdict:
    """How the cascade settled one concept the matcher was unsure of, on one image."""

    present: bool
    p_yes: float                     # Ego's in-context p(yes)
    source: str                      # "ego", or "r2p" when Ego was itself unsure
    score: float | None = None       # R2P's score for the concept, when R2P decided


def settle_uncertain(vlm: VLMAdapter, tokens: ImageTokens, names: list[str], memory_of, *,
                     threshold: float, margin: float, verifier: R2PVerifier, scores: dict[str, float],
                     fingerprint_of, pool: int, image=None, embeddings_of=None,
                     reference_of=None, joint: int | None = None) -> tuple[dict[str, Verdict], R2PResult | None]:
    """The decision cascade for ``names``, the concepts in the matcher's uncertain band on one image.

    Ego's in-context p_yes decides each one; those Ego is itself unsure of (:func:`cascade_decision`)
    are settled together by one R2P run over the ``pool`` best-matching concepts. ``scores`` are the
    matcher's scores on this image (not computed again here); ``memory_of(name)`` and
    ``fingerprint_of(name)`` give a concept's (K, D) memory and fingerprint; ``image()`` gives the
    picture for the image-text scores, asked for only when R2P runs. ``joint``: Ego asks about
    ``names`` in one prompt that also holds the best-matching other concepts' memories (``joint``
    memories in all; the profile's ``recognition: joint``), else one prompt per concept. The frame
    path and the evaluation both decide through this function.
    """
    from . import ego

    def memory(name: str) -> Memory:
        found = memory_of(name)
        return found if isinstance(found, Memory) else Memory(found, name)

    verdicts, unsure = {}, []
    for name, p_yes in ego.p_yes(vlm, tokens, names, memory, joint, scores).items():
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
    for name in unsure:
        verdicts[name].present = result.present(name)
        verdicts[name].score = result.score_for(name)
    return verdicts, result
