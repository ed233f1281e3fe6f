"""Calibration of a model profile: Ego's layers and the decision thresholds, measured on data.

Two measurements, both written to the profile (``models/<model>.yaml``):

1. **Layers** (:func:`personal_vlm_node.profiles.calibrate_layers`): on single-subject images with masks, each layer is
   ranked by the share of its top-K attended image tokens (attention of the rows that produced
   the description's keywords) that lie on the subject's mask (``mask_hit_rate``); the best L
   layers make the profile.
2. **Thresholds** (:func:`fit_thresholds`), on a held-out labelled split (a dataset in any
   ``eval`` layout; its concepts are taught into a temporary store, every (query, concept) pair
   is scored by the matcher and by Ego's in-context check):

   - ``recognize_threshold``: Ego's p(yes) threshold maximising the weighted accuracy
     Wtd = ½(TP/(TP+FN) + TN/(TN+FP)) of Ego alone on the split, averaged over thresholds within
     ``EGO_THRESHOLD_WINDOW`` of it: a split's best single threshold often sits on the edge of the
     positives' cluster of scores, where the Wtd falls steeply, and another scene set whose
     positives score a little lower then loses much of its recall there;
   - ``accept_threshold`` / ``reject_threshold``: the matcher's band. Accept is the lowest score
     above which at most ``max_error`` of the split's negatives lie (and never below the matcher's
     own Wtd-optimal threshold); reject the highest score below which at most ``max_error`` of the
     positives lie (never above it). So the matcher decides alone only where it errs at most that
     often; what lies between goes to Ego;
   - ``r2p_margin``: the smallest margin m such that Ego's decisions with |p − τ| ≥ m are correct
     at least ``1 − max_error`` of the time on the split (capped at 0.5); Ego's verdicts closer to
     its threshold than m go to R2P.

   The figures behind each choice (Wtd at the threshold, the pairs used) go to
   ``profile.calibration["thresholds"]``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .errors import PersonalVLMError


# ---- thresholds from scores -----------------------------------------------------------------
def weighted_accuracy(positives: list[float], negatives: list[float], threshold: float) -> float:
    """½ (share of positives ≥ threshold + share of negatives < threshold)."""
    tp = sum(p >= threshold for p in positives) / len(positives)
    tn = sum(n < threshold for n in negatives) / len(negatives)
    return 0.5 * (tp + tn)


EGO_THRESHOLD_WINDOW = 0.1     # p(yes) units: Ego's threshold maximises the mean Wtd within ± this
_WINDOW_POINTS = 41


def best_threshold(positives: list[float], negatives: list[float], window: float = 0.0) -> tuple[float, float]:
    """The threshold maximising Wtd (a midpoint between neighbouring scores) and the Wtd there.

    ``window`` > 0: the threshold maximising the Wtd averaged over [t − window, t + window], so a
    small shift of the scores costs little (ties: the one nearest 0.5)."""
    if not positives or not negatives:
        raise PersonalVLMError("calibration needs both positive and negative pairs; the split has "
                               f"{len(positives)} positives and {len(negatives)} negatives")
    pos = torch.tensor(sorted(positives), dtype=torch.float64)
    neg = torch.tensor(sorted(negatives), dtype=torch.float64)

    def wtd(t: torch.Tensor) -> torch.Tensor:
        tp = (len(pos) - torch.searchsorted(pos, t, side="left")) / len(pos)     # positives ≥ t
        tn = torch.searchsorted(neg, t, side="left") / len(neg)                  # negatives < t
        return 0.5 * (tp + tn)

    values = sorted(set(positives) | set(negatives))
    candidates = torch.tensor([values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])]
                              + [values[-1] + 1e-6], dtype=torch.float64)
    if window > 0:
        offsets = torch.linspace(-window, window, _WINDOW_POINTS, dtype=torch.float64)
        score = wtd((candidates[:, None] + offsets[None, :]).contiguous()).mean(dim=1)
    else:
        score = wtd(candidates)
    # The best score; among equal ones, the candidate nearest 0.5.
    best = float(max(zip(score.tolist(), candidates.tolist()), key=lambda sc: (round(sc[0], 12), -abs(sc[1] - 0.5)))[1])
    return best, weighted_accuracy(positives, negatives, best)


def _quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def fit_thresholds(match_pos: list[float], match_neg: list[float], ego_pos: list[float], ego_neg: list[float],
                   max_error: float = 0.05) -> dict:
    """Accept/reject, Ego's threshold and the R2P margin (see the module docstring)."""
    m_best, m_wtd = best_threshold(match_pos, match_neg)
    accept = max(m_best, _quantile(match_neg, 1.0 - max_error) + 1e-4)
    reject = min(m_best, _quantile(match_pos, max_error) - 1e-4)
    if reject >= accept:
        reject = accept - 0.02
    accept, reject = min(1.0, accept), max(-1.0, reject)
    tau, e_wtd = best_threshold(ego_pos, ego_neg, window=EGO_THRESHOLD_WINDOW)
    tau = min(0.99, max(0.01, tau))
    scored = [(abs(p - tau), p >= tau) for p in ego_pos] + [(abs(p - tau), p < tau) for p in ego_neg]
    margin = 0.5
    for m in sorted({round(d, 4) for d, _ in scored}):
        kept = [ok for d, ok in scored if d >= m]
        if kept and sum(kept) / len(kept) >= 1.0 - max_error:
            margin = m
            break
    uncertain = sum(reject < s < accept for s in match_pos + match_neg) / len(match_pos + match_neg)
    return {
        "accept_threshold": round(accept, 4), "reject_threshold": round(reject, 4),
        "recognize_threshold": round(tau, 4), "r2p_margin": round(min(0.5, margin), 4),
        "figures": {
            "max_error": max_error, "pairs": {"positive": len(match_pos), "negative": len(match_neg)},
            "match_wtd_at_best": round(m_wtd, 4), "match_best_threshold": round(m_best, 4),
            "match_uncertain_share": round(uncertain, 4),
            "ego_wtd_at_threshold": round(e_wtd, 4), "ego_threshold_window": EGO_THRESHOLD_WINDOW,
        },
    }


# ---- scores on a labelled split ----------------------------------------------------------------
def split_scores(assistant, dataset, progress=None) -> dict[str, list[float]]:
    """Matcher score and Ego p(yes) of every (query, concept) pair, concepts taught from the split."""
    from . import ego
    from .images import load_image
    from .vlm import Memory

    for i, name in enumerate(dataset.concepts):
        if progress:
            progress(f"teaching {i + 1}/{len(dataset.concepts)}: {name}")
        assistant.teach(name, dataset.references[name], category=dataset.categories.get(name, ""),
                        overwrite=True).wait_fingerprint()
    memories = [Memory.from_stored(assistant.store.load_memory(c), c) for c in dataset.concepts]
    out = {"match_pos": [], "match_neg": [], "ego_pos": [], "ego_neg": []}
    for q, query in enumerate(dataset.queries):
        if progress:
            progress(f"scoring query {q + 1}/{len(dataset.queries)}")
        tokens = assistant.vlm.encode_image(load_image(query.image))
        scores = {m.name: m.score for m in assistant.matcher.score(tokens.features, tokens.token_boxes)}
        p_yes = ego.recognize(assistant.vlm, tokens, memories)
        for c in dataset.concepts:
            side = "pos" if c in query.concepts else "neg"
            out[f"match_{side}"].append(float(scores.get(c, -1.0)))
            out[f"ego_{side}"].append(float(p_yes[c]))
    return out


def calibrate_thresholds(vlm, profile, dataset, progress=None, max_error: float = 0.05) -> dict:
    """Teach the split's concepts into a throw-away store, score every pair, fit the thresholds,
    and set them on ``profile``; returns what :func:`fit_thresholds` returns."""
    from .assistant import Assistant
    from .store import ConceptStore

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="personal_vlm_calibration_") as tmp:
        assistant = Assistant(vlm, ConceptStore(Path(tmp) / "store"), profile=profile, progress=None,
                              verification=False, rebuild=False, verifier_model=None)   # R2P is not run
        try:
            scores = split_scores(assistant, dataset, progress)
        finally:
            assistant.close()
    fitted = fit_thresholds(scores["match_pos"], scores["match_neg"], scores["ego_pos"], scores["ego_neg"], max_error)
    profile.accept_threshold = fitted["accept_threshold"]
    profile.reject_threshold = fitted["reject_threshold"]
    profile.recognize_threshold = fitted["recognize_threshold"]
    profile.r2p_margin = fitted["r2p_margin"]
    fitted["figures"]["dataset"] = str(dataset.root)
    fitted["figures"]["seconds"] = round(time.perf_counter() - t0, 1)
    return fitted


# ---- the whole calibration of one model ------------------------------------------------------
def calibrate_model(model: str, pairs: list[tuple] = (), dataset=None, *, top_k: int = 16, keep: int = 4,
                    max_error: float = 0.05, out=None, profile_path=None, device: str = "auto",
                    dtype: str = "auto", progress=None) -> dict:
    """Load ``model``, measure its layers on image–mask ``pairs`` and / or its thresholds on a
    labelled ``dataset``, and write the profile (to ``out``, default: the model's profile path).

    Returns ``{"profile": path written, "layers", "mask_hit_rate"}`` when layers were measured and
    the fitted thresholds when a dataset was given.
    """
    from .profiles import calibrate_layers, default_profile_path, load_profile, save_profile
    from .vlm import load_vlm

    profile = load_profile(model, profile_path)
    vlm = load_vlm(model, device=device, dtype=dtype)
    result = {}
    if pairs:
        profile = calibrate_layers(profile, vlm, list(pairs), top_k, keep, progress=progress)
        result.update({"layers": profile.layers, "mask_hit_rate": profile.calibration["mask_hit_rate"]})
    if dataset is not None:
        fitted = calibrate_thresholds(vlm, profile, dataset, progress, max_error)
        profile.calibration = {**{k: v for k, v in (profile.calibration or {}).items() if k != "note"},
                               "thresholds": fitted["figures"]}
        result.update({k: v for k, v in fitted.items() if k != "figures"})
    written = save_profile(profile, out or default_profile_path(model))
    return {"profile": str(written), **result}
