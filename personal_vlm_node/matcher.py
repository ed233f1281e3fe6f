"""Matcher: score every concept memory against one camera frame (Ego's late interaction).

A concept c is stored as a memory M_c of K_c visual tokens of the VLM, shape (K_c, D). A frame
gives N visual tokens F, shape (N, D), in the same feature space. The detection score is

    s_c = (1 / K_c) * sum_k max_j cos(M_c[k], F[j])

i.e. every memory token looks for its best partner among the frame tokens, and the concept
scores the mean of those best similarities. j*_k = argmax_j cos(M_c[k], F[j]) is the frame token
that memory token k matched; the box of a detection is built from the boxes of those tokens.

All concepts are scored at once: the memories live in one zero-padded bank (C, K_max, D) with a
mask (C, K_max), so one batched matmul gives every cos(M_c[k], F[j]) and a masked mean gives
every s_c. For big libraries a pooled-vector prefilter (one (C, D) x (D, N) matmul) keeps only the
`prefilter_top` most promising concepts for the full late interaction, so 10,000 concepts cost
about what `prefilter_top` concepts cost.

The bank is an immutable snapshot swapped in one assignment: a thread that scores while another
one teaches or forgets sees the old bank or the new one, never a mix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from personal_vlm_node.errors import PersonalVLMError

# Below this norm a token is treated as the zero vector: it stays zero after normalisation
# (cos 0 with everything) instead of becoming NaN.
_MIN_NORM = 1e-12


@dataclass
class MatchResult:
    """One concept's score on one frame."""

    name: str
    score: float  # s_c = mean_k max_j cos(M_c[k], F[j])
    box: tuple[float, float, float, float]  # (x, y, w, h) in source-image pixels
    matched: torch.Tensor  # (K_c,) long: index j*_k of the best frame token for memory token k


def decide(score: float, accept: float, reject: float) -> str:
    """Turn a score into "accept" (score >= accept), "reject" (score <= reject) or "uncertain".

    "uncertain" is the band that goes to the verifier; it is empty only if the thresholds meet,
    which is refused so that a profile with swapped thresholds is caught at once.
    """
    if not reject < accept:
        raise PersonalVLMError(
            f"reject threshold ({reject}) must be below accept threshold ({accept}); "
            "fix the thresholds in the model profile"
        )
    if score >= accept:
        return "accept"
    if score <= reject:
        return "reject"
    return "uncertain"


IMPOSTOR_MARGIN = 0.01    # a concept's own accept lies this far above its strongest impostor's score


def concept_accepts(impostors: dict[str, float], accept: float, reject: float,
                    margin: float = IMPOSTOR_MARGIN) -> dict[str, float]:
    """Per-concept accept thresholds from the library's impostors (:meth:`Matcher.impostor_scores`).

    accept_c = min(accept, max((accept + reject) / 2, impostor_c + margin)): a concept that nothing
    else in the library resembles is accepted sooner, never below the middle of the calibrated
    band; one with a look-alike keeps the calibrated accept. With fewer than two concepts there is
    no impostor to measure and every concept keeps ``accept``. (Raising a concept's accept above the
    calibrated one, or fitting it to augmented views of its own pictures, was measured and lowered
    Wtd: docs/profiles.md, Per-concept thresholds.)
    """
    floor = (accept + reject) / 2
    return {name: min(accept, max(floor, score + margin)) if score is not None else accept
            for name, score in impostors.items()}


def region_queries(features: torch.Tensor, token_boxes: torch.Tensor | None = None, cells: int = 4) -> torch.Tensor:
    """(Q, D) a frame's query vectors for a library's index: the normalised mean of its tokens in
    each cell of a ``cells`` x ``cells`` grid over the frame (by token box centres; without boxes,
    ``cells``² runs of consecutive tokens). An object covers a few cells, so its mean dominates
    theirs; Q <= cells² keeps one frame at a few index searches instead of one per token."""
    f = _normalise(features.detach().to("cpu", torch.float32))                    # (N, D)
    if token_boxes is None or token_boxes.shape[0] != f.shape[0]:
        groups = torch.arange(f.shape[0]) * (cells * cells) // max(1, f.shape[0])
    else:
        boxes = token_boxes.detach().to("cpu", torch.float64)                     # (N, 4) x0 y0 x1 y1
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        def cell(v):
            low, high = float(v.min()), float(v.max())
            return ((v - low) / max(high - low, 1e-9) * cells).long().clamp(0, cells - 1)
        groups = cell(cy) * cells + cell(cx)
    sums = torch.zeros(cells * cells, f.shape[1]).index_add_(0, groups, f)      # (cells², D)
    present = torch.bincount(groups, minlength=cells * cells) > 0
    return _normalise(sums[present])


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension; zero vectors stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)


@dataclass(frozen=True)
class _Bank:
    """An immutable snapshot of every concept memory, ready for batched scoring."""

    names: tuple[str, ...]
    memories: torch.Tensor  # (C, K_max, D) L2-normalised memory tokens, zero-padded along K
    mask: torch.Tensor  # (C, K_max) bool: True where a real memory token sits
    counts: torch.Tensor  # (C,) K_c as the bank's dtype, the denominator of the mean over k
    pooled: torch.Tensor  # (C, D) p_c = normalise(mean_k normalise(M_c[k]))

    @property
    def dim(self) -> int:
        return self.memories.shape[2]


class Matcher:
    """Late-interaction scores of all concept memories against a frame's visual tokens.

    Box rule (how `MatchResult.box` is built from the matched frame tokens):
      1. similarity gate: keep memory token k only if its best cosine is at least
         `box_similarity` times the concept's best cosine max_k max_j cos(M_c[k], F[j]); a few
         memory tokens of background or of a hidden part land on some unrelated patch with a low
         cosine, and must not stretch the box across the image (if the best cosine is <= 0,
         only the best-matching tokens are kept);
      2. spatial trim: over the distinct frame tokens left, each side of the box ignores the
         floor(`box_quantile` * T) most extreme tokens (T = number of distinct tokens), which
         drops isolated far-away matches but leaves a compact blob untouched: several tokens
         share each edge row/column, so dropping one of them does not move the edge. With
         fewer than 1 / box_quantile tokens nothing is trimmed and the box is the exact union.
    The box is the union of the token boxes that remain, returned as (x, y, w, h). Without
    token boxes the box is (0, 0, 0, 0).
    """

    def __init__(
        self,
        prefilter_top: int = 64,
        box_quantile: float = 0.1,
        box_similarity: float = 0.7,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(prefilter_top, int) or prefilter_top < 1:
            raise PersonalVLMError(f"prefilter_top must be an integer >= 1, got {prefilter_top!r}")
        if not 0.0 <= box_quantile < 0.5:
            raise PersonalVLMError(f"box_quantile must be in [0, 0.5), got {box_quantile!r}")
        if not 0.0 <= box_similarity <= 1.0:
            raise PersonalVLMError(f"box_similarity must be in [0, 1], got {box_similarity!r}")
        self.prefilter_top = prefilter_top
        self.box_quantile = box_quantile
        self.box_similarity = box_similarity
        self.dtype = dtype
        self.device = torch.device(device)
        # Writers (set_concepts/add/remove) are serialised so that two concurrent edits don't
        # lose one another; readers never take the lock, they read `_bank` once.
        self._write_lock = threading.Lock()
        self._bank = self._empty_bank()

    # ------------------------------------------------------------------ bank
    def _empty_bank(self) -> _Bank:
        return _Bank(
            names=(),
            memories=torch.zeros(0, 0, 0, dtype=self.dtype, device=self.device),  # (0, 0, 0)
            mask=torch.zeros(0, 0, dtype=torch.bool, device=self.device),  # (0, 0)
            counts=torch.zeros(0, dtype=self.dtype, device=self.device),  # (0,)
            pooled=torch.zeros(0, 0, dtype=self.dtype, device=self.device),  # (0, 0)
        )

    def _prepare(self, name: str, memory: torch.Tensor) -> torch.Tensor:
        """Check one memory and return it normalised in the bank's dtype and device."""
        if not isinstance(name, str) or not name:
            raise PersonalVLMError(f"concept name must be a non-empty string, got {name!r}")
        if not isinstance(memory, torch.Tensor) or memory.ndim != 2 or memory.shape[0] == 0:
            shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory)
            raise PersonalVLMError(
                f"memory of concept {name!r} must be a (K, D) tensor with K >= 1, got {shape}; "
                "teach the concept again"
            )
        m = memory.detach().to(device=self.device, dtype=self.dtype)  # (K_c, D)
        return _normalise(m)

    def _build(self, names: list[str], memories: list[torch.Tensor]) -> _Bank:
        """Pad already-normalised memories into a bank."""
        if not names:
            return self._empty_bank()
        dims = {m.shape[1] for m in memories}
        if len(dims) != 1:
            raise PersonalVLMError(
                f"concept memories have different token sizes {sorted(dims)}: they were built "
                "with different models; rebuild them with the current model"
            )
        padded = torch.nn.utils.rnn.pad_sequence(memories, batch_first=True)  # (C, K_max, D)
        lengths = torch.tensor([m.shape[0] for m in memories], device=self.device)  # (C,)
        k_max = padded.shape[1]
        mask = torch.arange(k_max, device=self.device)[None, :] < lengths[:, None]  # (C, K_max)
        # The padding is zero, so the sum over K_max is the sum over the real tokens.
        pooled = _normalise(padded.sum(dim=1))  # (C, D)
        return _Bank(tuple(names), padded, mask, lengths.to(self.dtype), pooled)

    def set_concepts(self, memories: dict[str, torch.Tensor]) -> None:
        """Replace the whole bank with `memories` (name -> (K_c, D) tensor)."""
        names = list(memories)
        prepared = [self._prepare(n, memories[n]) for n in names]
        bank = self._build(names, prepared)
        with self._write_lock:
            self._bank = bank

    def add(self, name: str, memory: torch.Tensor) -> None:
        """Add a concept, or replace the memory of one with the same name."""
        m = self._prepare(name, memory)  # (K_c, D)
        with self._write_lock:
            bank = self._without(self._bank, name)
            if bank.names and m.shape[1] != bank.dim:
                raise PersonalVLMError(
                    f"memory of {name!r} has token size {m.shape[1]} but the other concepts "
                    f"have {bank.dim}: it was built with another model; rebuild it with the "
                    "current model"
                )
            if not bank.names:
                self._bank = self._build([name], [m])
                return
            k_max = max(bank.memories.shape[1], m.shape[0])
            pad_old = k_max - bank.memories.shape[1]
            old = torch.nn.functional.pad(bank.memories, (0, 0, 0, pad_old))  # (C, K_max, D)
            old_mask = torch.nn.functional.pad(bank.mask, (0, pad_old))  # (C, K_max)
            new = torch.nn.functional.pad(m, (0, 0, 0, k_max - m.shape[0]))  # (K_max, D)
            new_mask = torch.arange(k_max, device=self.device) < m.shape[0]  # (K_max,)
            count = torch.tensor([m.shape[0]], dtype=self.dtype, device=self.device)  # (1,)
            self._bank = _Bank(
                names=bank.names + (name,),
                memories=torch.cat([old, new[None]]),
                mask=torch.cat([old_mask, new_mask[None]]),
                counts=torch.cat([bank.counts, count]),
                pooled=torch.cat([bank.pooled, _normalise(m.sum(dim=0))[None]]),
            )

    def impostor_scores(self) -> dict[str, float | None]:
        """For every concept c, the best score of c's memory on another concept's memory tokens
        taken as a frame (the other's object, as the matcher sees it): how high an impostor from
        this library scores for c. None with no other concept. Computed once per bank."""
        bank = self._bank
        cached = getattr(self, "_impostors", None)
        if cached is not None and cached[0] is bank:
            return cached[1]
        best = torch.full((len(bank.names),), float("-inf"), dtype=self.dtype, device=self.device)
        for d in range(len(bank.names)):
            frame = bank.memories[d, bank.mask[d]]                                   # (K_d, D)
            sims = torch.einsum("ckd,jd->ckj", bank.memories, frame).amax(dim=2)     # (C, K_max)
            scores = (sims * bank.mask).sum(dim=1) / bank.counts                      # (C,)
            scores[d] = float("-inf")
            best = torch.maximum(best, scores)
        out = {name: (float(v) if torch.isfinite(v) else None) for name, v in zip(bank.names, best)}
        self._impostors = (bank, out)
        return out

    def update(self, add: dict[str, torch.Tensor] | None = None, remove=()) -> None:
        """Add (or replace) several memories and remove several concepts in one rebuild of the
        bank: what a large library's resident set changes per frame (``add`` one at a time would
        copy the bank once per concept)."""
        add = add or {}
        prepared = {name: self._prepare(name, memory) for name, memory in add.items()}
        gone = set(remove) | set(prepared)
        with self._write_lock:
            bank = self._bank
            names, memories = [], []
            for i, name in enumerate(bank.names):
                if name not in gone:
                    names.append(name)
                    memories.append(bank.memories[i, :int(bank.counts[i])])    # (K_c, D), normalised
            names += list(prepared)
            memories += list(prepared.values())
            self._bank = self._build(names, memories)

    def remove(self, name: str) -> None:
        """Forget a concept; unknown names are ignored (forgetting twice is not an error)."""
        with self._write_lock:
            self._bank = self._without(self._bank, name)

    def _without(self, bank: _Bank, name: str) -> _Bank:
        if name not in bank.names:
            return bank
        keep = [i for i, n in enumerate(bank.names) if n != name]
        if not keep:
            return self._empty_bank()
        index = torch.tensor(keep, device=self.device)  # (C - 1,)
        counts = bank.counts[index]
        # Drop padding columns that only the removed concept needed.
        k_max = int(counts.max().item())
        return _Bank(
            names=tuple(bank.names[i] for i in keep),
            memories=bank.memories[index, :k_max],
            mask=bank.mask[index, :k_max],
            counts=counts,
            pooled=bank.pooled[index],
        )

    def __len__(self) -> int:
        return len(self._bank.names)

    @property
    def names(self) -> tuple[str, ...]:
        return self._bank.names

    def memory_sizes(self) -> dict[str, int]:
        """K_c, the memory tokens of each concept (what it costs in a prompt's context)."""
        bank = self._bank
        return {n: int(k) for n, k in zip(bank.names, bank.counts.tolist())}

    # ----------------------------------------------------------------- score
    def score(
        self,
        frame_tokens: torch.Tensor,
        token_boxes: torch.Tensor | None = None,
        top: int | None = None,
    ) -> list[MatchResult]:
        """Score the concepts against one frame, best first.

        frame_tokens: (N, D) visual tokens of the frame. token_boxes: (N, 4) box of each token
        as [x0, y0, x1, y1] in source-image pixels, or None. top: return at most this many
        results (None: all scored concepts). When the bank holds more than `prefilter_top`
        concepts only the prefilter's survivors are scored and returned.
        """
        bank = self._bank  # one read: the whole call sees one consistent bank
        self._check_frame(frame_tokens, token_boxes)
        if top is not None and (not isinstance(top, int) or top < 1):
            raise ValueError(f"top must be a positive integer or None, got {top!r}")
        if not bank.names:
            return []
        if frame_tokens.shape[1] != bank.dim:
            raise PersonalVLMError(
                f"frame tokens have size {frame_tokens.shape[1]} but the concept memories have "
                f"{bank.dim}: the memories were built with another model or feature space; "
                "rebuild them from their reference images with the current model"
            )
        with torch.no_grad():
            f = _normalise(frame_tokens.to(device=self.device, dtype=self.dtype))  # (N, D)
            candidates = self._prefilter(bank, f)  # (C',) long
            memories = bank.memories[candidates]  # (C', K_max, D)
            mask = bank.mask[candidates]  # (C', K_max)
            counts = bank.counts[candidates]  # (C',)
            # cos(M_c[k], F[j]) for every candidate c, memory token k, frame token j.
            cos = torch.matmul(memories, f.T)  # (C', K_max, N)
            best, matched = cos.max(dim=2)  # (C', K_max) each: max_j and argmax_j
            best = best.masked_fill(~mask, 0.0)
            scores = best.sum(dim=1) / counts  # (C',)  s_c
            order = torch.argsort(scores, descending=True)  # (C',)
            if top is not None:
                order = order[:top]
            boxes = None
            if token_boxes is not None:
                boxes = token_boxes.detach().to(device="cpu", dtype=torch.float64)  # (N, 4)
            best_cpu, matched_cpu = best.cpu(), matched.cpu()
            counts_cpu = counts.long().cpu()
            results = []
            for row in order.tolist():
                k_c = int(counts_cpu[row])
                cos_c = best_cpu[row, :k_c]  # (K_c,)
                matched_c = matched_cpu[row, :k_c].clone()  # (K_c,)
                box = (0.0, 0.0, 0.0, 0.0) if boxes is None else self._box(cos_c, matched_c, boxes)
                name = bank.names[int(candidates[row])]
                results.append(MatchResult(name, float(scores[row]), box, matched_c))
        return results

    def _check_frame(self, frame_tokens: torch.Tensor, token_boxes: torch.Tensor | None) -> None:
        if not isinstance(frame_tokens, torch.Tensor) or frame_tokens.ndim != 2:
            shape = tuple(frame_tokens.shape) if isinstance(frame_tokens, torch.Tensor) else None
            raise ValueError(f"frame_tokens must be an (N, D) tensor, got shape {shape}")
        if frame_tokens.shape[0] == 0:
            raise PersonalVLMError(
                "the frame gave no visual tokens (empty image?); send a non-empty image"
            )
        if token_boxes is not None and tuple(token_boxes.shape) != (frame_tokens.shape[0], 4):
            raise ValueError(
                f"token_boxes must have shape ({frame_tokens.shape[0]}, 4), "
                f"got {tuple(token_boxes.shape)}"
            )

    def _prefilter(self, bank: _Bank, f: torch.Tensor) -> torch.Tensor:
        """Indices of the concepts that get the full late interaction.

        With more than `prefilter_top` concepts, each is first scored by max_j cos(p_c, F[j]),
        where p_c is the direction of its mean memory token, and the best `prefilter_top` are
        kept. Otherwise every concept is kept and the result is exact.
        """
        c = len(bank.names)
        if c <= self.prefilter_top:
            return torch.arange(c, device=self.device)  # (C,)
        coarse = torch.matmul(bank.pooled, f.T).max(dim=1).values  # (C,)
        return torch.topk(coarse, self.prefilter_top).indices  # (prefilter_top,)

    def _box(
        self, cos: torch.Tensor, matched: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the frame tokens matched by one concept; rule in the class docstring.

        cos: (K_c,) best cosine of each memory token; matched: (K_c,) its frame token;
        boxes: (N, 4) token boxes [x0, y0, x1, y1].
        """
        best = cos.max()
        if best > 0:
            keep = cos >= self.box_similarity * best  # (K_c,) bool
        else:
            keep = cos == best
        tokens = torch.unique(matched[keep])  # (T,) distinct frame tokens
        kept = boxes[tokens]  # (T, 4)
        trim = int(self.box_quantile * tokens.shape[0])
        x0 = kept[:, 0].sort().values[trim]
        y0 = kept[:, 1].sort().values[trim]
        x1 = kept[:, 2].sort(descending=True).values[trim]
        y1 = kept[:, 3].sort(descending=True).values[trim]
        return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
