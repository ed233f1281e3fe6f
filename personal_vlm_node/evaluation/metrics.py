"""Recognition metrics of ``personal-vlm eval``: counts per pair, accuracies, precision, recall, F1."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


STAGES = ("match", "ego", "icpt", "r2p", "r2p_pairwise_ego")   # the cascade's stages, in the order they hand cases on


def summarize(records: list[dict], concepts: list[str], threshold: float | None = None) -> dict:
    """Overall and per-concept metrics from per-query records (records with an error are skipped).

    ``stages``: per deciding stage (the pair's ``source``), its decisions and how right they were;
    with Ego's ``threshold``, also what Ego alone (p_yes ≥ threshold) decided on the same pairs
    (``ego_alone``), so a stage after Ego shows whether it improves on it."""
    overall, per_concept = Counts(), {c: Counts() for c in concepts}
    sources: dict[str, int] = {}
    by_stage: dict[str, Counts] = {}
    ego_alone: dict[str, Counts] = {}
    for record in records:
        for pair in record.get("pairs", []):
            if pair["concept"] not in per_concept:
                continue
            overall.add(pair["label"], pair["predicted"])
            per_concept[pair["concept"]].add(pair["label"], pair["predicted"])
            sources[pair["source"]] = sources.get(pair["source"], 0) + 1
            by_stage.setdefault(pair["source"], Counts()).add(pair["label"], pair["predicted"])
            if threshold is not None and pair.get("p_yes") is not None:
                ego_alone.setdefault(pair["source"], Counts()).add(pair["label"], pair["p_yes"] >= threshold)
    per = {c: recognition_metrics(k) for c, k in per_concept.items()}
    weighted = [m["weighted_accuracy"] for m in per.values() if m["weighted_accuracy"] is not None]
    order = [s for s in STAGES if s in by_stage] + sorted(s for s in by_stage if s not in STAGES)
    stages = {s: {**_stage_row(by_stage[s]),
                  **({"ego_alone": _stage_row(ego_alone[s])} if s in ego_alone else {})} for s in order}
    return {"overall": recognition_metrics(overall), "per_concept": per, "decided_by": sources,
            "stages": stages,
            "macro_weighted_accuracy": sum(weighted) / len(weighted) if weighted else None}


def _stage_row(counts: Counts) -> dict:
    """A stage's decisions: how many, the share right, and Wtd, recall, precision over them."""
    m = recognition_metrics(counts)
    decisions = m["positives"] + m["negatives"]
    return {"decisions": decisions, "accuracy": _ratio(counts.tp + counts.tn, decisions),
            "positives": m["positives"], "negatives": m["negatives"], "weighted_accuracy": m["weighted_accuracy"],
            "recall": m["recall"], "precision": m["precision"]}
