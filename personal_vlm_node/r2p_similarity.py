"""R2P's image–text similarity σ(q, ·) ∈ [0, 1]: a contrastive model's cosines, or the VLM's own yes/no.

σ(q, t) = (cos(E_img(q), E_txt(t)) + 1) / 2 with a CLIP / SigLIP model (:class:`ImageTextSimilarity`);
without one, σ(q, a) = p_yes("Does the object in the image have this <attribute>: <value>?").
:class:`Evidence` gathers σ for one query image, cached per text, for every stage of :mod:`.r2p`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from .errors import PersonalVLMError
from .options import DEFAULT_VERIFIER, SIGLIP_VERIFIER  # noqa: F401  (R2P's contrastive models)
from .prompts import ATTRIBUTE_TEXT
from .r2p_text import attribute_question
from .vlm.base import ImageTokens, VLMAdapter

if TYPE_CHECKING:
    from .r2p import Candidate


TEXT_SIMILARITY_VLM = "vlm_yes_no"


def unit(cosine: float) -> float:
    """[-1, 1] → [0, 1]: (cos + 1) / 2, clamped (rounding can step past ±1)."""
    return min(1.0, max(0.0, (float(cosine) + 1.0) / 2.0))


def load_text_similarity(model: str | None, device: str = "auto", warn=None) -> ImageTextSimilarity | None:
    """The contrastive model ``model`` for R2P, or None: none asked for (``""`` / None), or its
    weights cannot be had (not in the Hugging Face cache and no network, a folder that is missing
    or not a CLIP/SigLIP checkpoint). Then ``warn`` gets one line saying so, and R2P works as it
    does without one: s_VV from the matcher, σ from the VLM's own yes/no. Never raises for that."""
    if not model:
        return None
    try:
        return ImageTextSimilarity(model, device=device)
    except Exception as exc:  # noqa: BLE001 - a verifier that does not load is optional: say so, go on
        if warn:
            warn(f"R2P verifier model {model!r} not loaded, so R2P uses the matcher's visual score and the "
                 f"VLM's own yes/no instead: {str(exc).splitlines()[0]} (verifier_model \"\" uses none "
                 "without this warning)")
        return None


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

        folder = resolve_checkpoint(model, setting="verifier_model")
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


class Evidence:
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
